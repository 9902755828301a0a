// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmemctl`: parses the command line, runs the command against vtmemd's
//! control socket, reports errors in one line with an exit status.

use std::process::exit;

use clap::Parser;
use vtmem_backend::ctl::{self, args::usage_error_line, Cli, CtlError, SOCKET_ENV};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => match usage_error_line(&e) {
            None => {
                let _ = e.print();
                exit(0);
            }
            Some(line) => {
                let err = CtlError::Usage(line);
                eprintln!("vtmemctl: {err}");
                exit(err.exit_code());
            }
        },
    };
    let socket = cli.socket_path(std::env::var_os(SOCKET_ENV));
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = ctl::run(&cli, &socket, &mut stdout) {
        if e.is_broken_pipe() {
            exit(0);
        }
        eprintln!("vtmemctl: {e}");
        exit(e.exit_code());
    }
}
