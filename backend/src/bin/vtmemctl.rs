// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmemctl`: parses the command line, runs the command against vtmemd's
//! control socket, reports errors in one line with an exit status.
//!
//! The program is the `vtmem-ctl` crate, which knows only the control API.
//! Its binary is built here, beside `vtmemd`, because the two ship and are
//! versioned together and the daemon's integration tests drive both.

use std::process::exit;

use clap::Parser;
use vtmem_ctl::{args::usage_error_line, Cli, CtlError};

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
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = vtmem_ctl::run(&cli, &cli.socket, &mut stdout) {
        if e.is_broken_pipe() {
            exit(0);
        }
        eprintln!("vtmemctl: {e}");
        exit(e.exit_code());
    }
}
