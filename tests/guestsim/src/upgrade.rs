// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The restart benchmark: what an orderly restart of vtmemd on its state
//! directory (an upgrade, `systemctl restart`) and a crash (SIGKILL) cost
//! a VM.
//!
//! A simulated VM stores a realistic page mix ([`Corpus`]) in a persistent
//! pool of a vtmemd started with `--state-dir` (in `/dev/shm`, a tmpfs, as
//! in production, where there is one). vtmemd is stopped with
//! SIGTERM (it answers what is in flight and checkpoints the state it
//! keeps there as it runs) and started again on the same directory (it
//! recovers the state before it serves the VM); the VM
//! connects again, as QEMU does, and reads one page. Then the VM stores a
//! quarter of the pages again (so that the journal holds records past the
//! checkpoint), vtmemd is killed with SIGKILL and started again, and the
//! VM reconnects and reads one page. Every step is timed natively, and
//! after each restart every page recovered is counted and a sample is
//! read back and compared.

use std::time::Instant;

use serde::Serialize;
use vtmem_testkit::{handle, temp_dir};

use crate::daemon;
use crate::pages::{Corpus, CorpusRunOptions};
use crate::{Error, PoolSpec, Result, Status, Vm, VmOptions, PAGE_SIZE};

/// The figures.
#[derive(Clone, Debug, Serialize)]
pub struct UpgradeReport {
    /// Persistent pages kept across the restart.
    pub pages: u64,
    /// What the pages are charged (stored sizes + 64 B).
    pub stored_bytes: u64,
    /// Bytes the state directory's files take (allocated, not apparent:
    /// the arena and journals are sparse) after the stop.
    pub state_bytes: u64,
    /// SIGTERM to exit: answering what was in flight, the checkpoint.
    pub stop_seconds: f64,
    /// Start of the new vtmemd to its ready line, recovery included.
    pub start_seconds: f64,
    /// The recovery alone, as the new vtmemd reports it.
    pub recovery_seconds: f64,
    /// SIGTERM to the first request the new vtmemd answered on the VM's
    /// new connection: how long the VM's requests wait (QEMU's
    /// `reconnect-ms` retry interval comes on top).
    pub gap_seconds: f64,
    /// The gap for 1 GiB of persistent pages of this mix.
    pub gap_seconds_per_gib: f64,
    /// The state directory's files but the arena (snapshot, journal,
    /// chunk directory, clients, seed) after the stop, per page.
    pub state_metadata_bytes_per_page: f64,
    /// The store's own metadata in memory per page, after the recovery.
    pub store_metadata_bytes_per_page: f64,
    /// Pages stored again before the kill (records for the journal).
    pub kill_rewritten_pages: u64,
    /// Start of the vtmemd after the kill to its ready line.
    pub kill_start_seconds: f64,
    /// Its recovery alone: snapshot and journal replayed.
    pub kill_recovery_seconds: f64,
    /// SIGKILL to the first request answered on the VM's new connection.
    pub kill_gap_seconds: f64,
}

/// Runs the benchmark.
pub fn run(opts: &CorpusRunOptions) -> Result<UpgradeReport> {
    let n = opts.pages();
    let binary = daemon::vtmemd_binary(opts.vtmemd.as_deref())?;
    // Where vtmemd's state belongs: a tmpfs (the arena is memory, not a
    // file to write back), /dev/shm where there is one.
    let shm = std::path::Path::new("/dev/shm");
    let state = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("vtmem-bench-")
            .tempdir_in(shm)
            .map_err(|e| Error::Daemon(format!("a state directory in /dev/shm: {e}")))?
    } else {
        temp_dir()
    };
    eprintln!("state directory {}", state.path().display());
    let vms = ["vm".to_string()];
    let extra = [
        "--state-dir".to_string(),
        state.path().display().to_string(),
    ];
    let mut d = daemon::start(&binary, &vms, &extra)?;
    let restart_args = daemon::args(&vms, &extra);
    eprintln!("loading {n} pages of corpus");
    let corpus = Corpus::load(n);

    let vm = Vm::connect(d.socket("vm"), &VmOptions::default())?;
    let pool = vm.new_pool(PoolSpec::persistent())?;
    eprintln!("storing them in vtmemd");
    corpus.store(&vm, pool)?;
    let held = d.client_stats("vm");

    eprintln!("stopping vtmemd (SIGTERM) and starting it again");
    let t0 = Instant::now();
    let status = d.stop();
    let stop = t0.elapsed().as_secs_f64();
    if !status.success() {
        return Err(Error::Daemon(format!("vtmemd stopped with {status}")));
    }
    vm.disconnect();
    let dir_error = |e: std::io::Error| {
        Error::Daemon(format!("state directory {}: {e}", state.path().display()))
    };
    let state_bytes = allocated_bytes(state.path(), |_| true).map_err(dir_error)?;
    let state_metadata =
        allocated_bytes(state.path(), |name| name != "arena").map_err(dir_error)?;
    let after = Restarted::start(&mut d, &restart_args, t0, pool, &corpus, &held, "the stop")?;
    let again = after.vm;

    // A sample read back.
    corpus.verify_sample(&again, pool, 61)?;
    let store_meta = d.status().store.metadata_bytes_per_page;

    // A crash: a quarter of the pages stored again, then SIGKILL.
    let rewrite = Corpus {
        pages: corpus.pages[..corpus.pages.len() / 4].to_vec(),
        mix: corpus.mix,
    };
    eprintln!(
        "storing {} pages again, then killing vtmemd (SIGKILL)",
        rewrite.pages.len()
    );
    rewrite.store(&again, pool)?;
    let t2 = Instant::now();
    d.kill();
    again.disconnect();
    let killed = Restarted::start(&mut d, &restart_args, t2, pool, &corpus, &held, "the kill")?;
    let third = killed.vm;
    corpus.verify_sample(&third, pool, 59)?;
    third.disconnect();

    let pages = held.persistent_pages;
    let per_gib = (1u64 << 30) as f64 / (pages as f64 * PAGE_SIZE as f64);
    Ok(UpgradeReport {
        pages,
        stored_bytes: held.persistent_bytes,
        state_bytes,
        stop_seconds: stop,
        start_seconds: after.start_seconds,
        recovery_seconds: after.recovery_seconds,
        gap_seconds: after.gap_seconds,
        gap_seconds_per_gib: after.gap_seconds * per_gib,
        state_metadata_bytes_per_page: state_metadata as f64 / pages as f64,
        store_metadata_bytes_per_page: store_meta,
        kill_rewritten_pages: rewrite.pages.len() as u64,
        kill_start_seconds: killed.start_seconds,
        kill_recovery_seconds: killed.recovery_seconds,
        kill_gap_seconds: killed.gap_seconds,
    })
}

/// A vtmemd started again on the state directory, with the VM connected
/// again as QEMU does, page 0 read back through it, and every page `held`
/// counted recovered.
struct Restarted {
    vm: Vm,
    /// Start to the ready line.
    start_seconds: f64,
    /// The recovery, as the new vtmemd reports it.
    recovery_seconds: f64,
    /// `since` (the signal) to the first answer.
    gap_seconds: f64,
}

impl Restarted {
    fn start(
        d: &mut vtmem_testkit::Vtmemd,
        args: &[String],
        since: Instant,
        pool: u32,
        corpus: &Corpus,
        held: &vtmem_store::ClientStats,
        after: &str,
    ) -> Result<Restarted> {
        let t = Instant::now();
        d.restart(args).map_err(|e| Error::Daemon(e.to_string()))?;
        let start_seconds = t.elapsed().as_secs_f64();
        let vm = Vm::connect(
            d.socket("vm"),
            &VmOptions {
                reset_on_connect: false,
                ..VmOptions::default()
            },
        )?;
        let first = vm.get_batch(&[handle(pool, 1, 0)])?;
        let gap_seconds = since.elapsed().as_secs_f64();
        if first[0].0 != Status::Ok || *first[0].1 != *corpus.pages[0] {
            return Err(Error::Device(format!(
                "page 0 came back {} after {after}, or different",
                first[0].0
            )));
        }
        let recovery = d.status().recovered.ok_or_else(|| {
            Error::Daemon(format!(
                "the vtmemd started after {after} reports no recovery"
            ))
        })?;
        if recovery.pages != held.persistent_pages {
            return Err(Error::Device(format!(
                "{} pages recovered after {after}, of {} stored",
                recovery.pages, held.persistent_pages
            )));
        }
        Ok(Restarted {
            vm,
            start_seconds,
            recovery_seconds: recovery.seconds,
            gap_seconds,
        })
    }
}

impl UpgradeReport {
    /// The figures as a table.
    pub fn table(&self) -> String {
        format!(
            "orderly restart of vtmemd holding {} persistent pages ({:.1} MiB charged)\n\
             \x20 state directory    {} bytes ({:.0} B a page, page data included)\n\
             \x20 metadata           {:.1} B a page in the state's files (arena aside), \
             {:.1} B a page in the store's memory\n\
             \x20 stop (SIGTERM)     {:.3} s  answer in-flight requests, checkpoint\n\
             \x20 start              {:.3} s  of which recovery {:.3} s\n\
             \x20 gap seen by the VM {:.3} s  ({:.2} s per GiB of persistent pages)\n\
             crash (SIGKILL) after {} pages stored again\n\
             \x20 start              {:.3} s  of which recovery {:.3} s\n\
             \x20 gap seen by the VM {:.3} s  (kill to the first answer)\n",
            self.pages,
            self.stored_bytes as f64 / (1 << 20) as f64,
            self.state_bytes,
            self.state_bytes as f64 / self.pages as f64,
            self.state_metadata_bytes_per_page,
            self.store_metadata_bytes_per_page,
            self.stop_seconds,
            self.start_seconds,
            self.recovery_seconds,
            self.gap_seconds,
            self.gap_seconds_per_gib,
            self.kill_rewritten_pages,
            self.kill_start_seconds,
            self.kill_recovery_seconds,
            self.kill_gap_seconds,
        )
    }
}

/// The bytes the files in `dir` whose names pass `keep` take on their
/// file system.
fn allocated_bytes(dir: &std::path::Path, keep: impl Fn(&str) -> bool) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if keep(&e.file_name().to_string_lossy()) {
            total += e.metadata()?.blocks() * 512;
        }
    }
    Ok(total)
}
