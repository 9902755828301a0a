// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmemd`: parses the command line, starts the daemon, reports errors.

use std::process::exit;

use clap::error::ErrorKind;
use clap::Parser;
use log::error;
use vtmem_backend::{capabilities, start, Args, DaemonConfig};

fn init_logging(args: &Args) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(args.log_level.into());
    if let Ok(filters) = std::env::var("RUST_LOG") {
        builder.parse_filters(&filters);
    }
    builder.format_timestamp_millis().init();
}

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            exit(0);
        }
        Err(e) => {
            // One line: clap's first line names the problem.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim();
            eprintln!(
                "vtmemd: {} (see --help)",
                first.trim_start_matches("error: ")
            );
            exit(2);
        }
    };

    if args.print_capabilities {
        println!("{}", capabilities());
        return;
    }

    init_logging(&args);

    let config = match DaemonConfig::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            exit(1);
        }
    };

    if let Err(e) = start(config) {
        error!("{e}");
        exit(1);
    }
}
