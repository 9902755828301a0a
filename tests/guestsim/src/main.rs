// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmem-guestsim`: command-line front end of the guest simulator.

use std::path::PathBuf;
use std::process::exit;

use clap::{Parser, Subcommand};
use log::error;
use vtmem_guestsim::bench::{self, BenchOptions};
use vtmem_guestsim::migrate;
use vtmem_guestsim::multivm::{self, MultiVmOptions};
use vtmem_guestsim::pages::CorpusRunOptions;
use vtmem_guestsim::pages::{checksum, random_page};
use vtmem_guestsim::upgrade;
use vtmem_guestsim::{PoolSpec, Status, Vm, VmOptions};
use vtmem_testkit::handle;

/// Plays a VMM and a guest vtmem driver against vtmemd over vhost-user.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a private vtmemd and measure throughput, notifications and
    /// latency; print a table, then one JSON line with every figure.
    Bench {
        /// Short run: a smaller working set and fewer latency samples.
        #[arg(long)]
        quick: bool,
        /// vtmemd binary (default: $VTMEMD, else the vtmemd next to this
        /// executable).
        #[arg(long, value_name = "PATH", env = "VTMEMD")]
        vtmemd: Option<PathBuf>,
        /// Pages in the working set.
        #[arg(long, value_name = "N")]
        pages: Option<usize>,
        /// Requests in flight when streaming.
        #[arg(long, value_name = "N", default_value_t = 8)]
        depth: usize,
        /// Device busy-poll window of the second latency run.
        #[arg(long, value_name = "US", default_value_t = 50)]
        poll_us: u32,
        /// Rounds per figure; medians are reported (default 7, or 9
        /// without --quick).
        #[arg(long, value_name = "N")]
        rounds: Option<usize>,
    },
    /// Start a private vtmemd per VM count with that many VMs in one dedup
    /// group, each storing a realistic page mix from its own thread; print
    /// progress to stderr, a table, and write every figure as JSON.
    Multivm {
        /// VM counts, comma-separated.
        #[arg(
            long,
            value_name = "N,N,...",
            value_delimiter = ',',
            default_value = "1,2,4,8,16,32,64"
        )]
        vms: Vec<usize>,
        /// Pages each VM stores (default 1024 with --quick, else 8192).
        #[arg(long, value_name = "N")]
        pages_per_vm: Option<usize>,
        /// Short run: fewer pages and operations per step.
        #[arg(long)]
        quick: bool,
        /// Write the JSON result to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// vtmemd binary (default: $VTMEMD, else the vtmemd next to this
        /// executable).
        #[arg(long, value_name = "PATH", env = "VTMEMD")]
        vtmemd: Option<PathBuf>,
    },
    /// Start two private vtmemds; store a realistic page mix in a VM on the
    /// first, move its device state to the second (as live migration
    /// does) and time both ends; print a table, then one JSON line.
    Migrate(CorpusRunOptions),
    /// Start a private vtmemd with a state directory (in /dev/shm); store
    /// a realistic page mix in a VM, stop vtmemd with SIGTERM, start it
    /// again on the directory, reconnect; store a quarter again, kill
    /// vtmemd with SIGKILL, start it again, reconnect; time each step and
    /// verify the pages; print a table, then one JSON line.
    Upgrade(CorpusRunOptions),
    /// Connect to a running vtmemd VM socket, store pages in a persistent
    /// pool, read them back and compare.
    Check {
        /// The VM's vhost-user socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Pages to store.
        #[arg(long, value_name = "N", default_value_t = 1024)]
        pages: u64,
    },
}

fn check(socket: PathBuf, n: u64) -> vtmem_guestsim::Result<()> {
    let vm = Vm::connect(&socket, &VmOptions::default())?;
    let pool = vm.new_pool(PoolSpec::persistent())?;
    let pages: Vec<_> = (0..n).map(|i| Box::new(random_page(i))).collect();
    let h = |i: u64| handle(pool, 1, i);
    let items: Vec<_> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| (h(i as u64), &**p))
        .collect();
    let st = vm.put_batch(&items)?;
    let stored = st.iter().filter(|s| **s == Status::Ok).count();
    let got = vm.get_batch(&(0..n).map(h).collect::<Vec<_>>())?;
    let mut bad = 0;
    for (i, (s, p)) in got.iter().enumerate() {
        if st[i] == Status::Ok && (*s != Status::Ok || checksum(p) != checksum(&pages[i])) {
            bad += 1;
        }
    }
    vm.destroy_pool(pool)?;
    let s = vm.stats();
    println!(
        "{stored} of {n} pages stored, {bad} came back wrong; {} requests, {} kicks, {} interrupts",
        s.requests, s.kicks, s.interrupts
    );
    if bad > 0 {
        return Err(vtmem_guestsim::Error::Device(format!(
            "{bad} pages came back wrong"
        )));
    }
    Ok(())
}

/// Prints a benchmark's table, then its figures as one JSON line.
fn table_and_json(table: &str, figures: &impl serde::Serialize) -> vtmem_guestsim::Result<()> {
    print!("{table}");
    let line =
        serde_json::to_string(figures).map_err(|e| vtmem_guestsim::Error::Setup(e.to_string()))?;
    println!("{line}");
    Ok(())
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Bench {
            quick,
            vtmemd,
            pages,
            depth,
            poll_us,
            rounds,
        } => bench::run(&BenchOptions {
            quick,
            vtmemd,
            pages,
            depth,
            poll_us,
            rounds,
        })
        .and_then(|r| table_and_json(&r.table(), &r)),
        Command::Multivm {
            vms,
            pages_per_vm,
            quick,
            json,
            vtmemd,
        } => multivm::run(&MultiVmOptions {
            vms,
            pages_per_vm,
            quick,
            vtmemd,
        })
        .and_then(|r| {
            print!("{}", r.table());
            let text = serde_json::to_string_pretty(&r)
                .map_err(|e| vtmem_guestsim::Error::Setup(e.to_string()))?;
            if let Some(path) = json {
                std::fs::write(&path, text + "\n").map_err(vtmem_guestsim::Error::Io)?;
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }),
        Command::Migrate(opts) => migrate::run(&opts).and_then(|r| table_and_json(&r.table(), &r)),
        Command::Upgrade(opts) => upgrade::run(&opts).and_then(|r| table_and_json(&r.table(), &r)),
        Command::Check { socket, pages } => check(socket, pages),
    };
    if let Err(e) = res {
        error!("{e}");
        exit(1);
    }
}
