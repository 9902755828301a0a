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

/// A panic anywhere ends the process.
///
/// Locks do not poison (parking_lot), so a thread that panicked in the
/// middle of a store operation could leave half-updated state behind for
/// the other threads to trust. Nothing a guest or VMM sends may panic; if
/// a bug does, vtmemd stops at once rather than serve from such a state.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

fn main() {
    abort_on_panic();
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
