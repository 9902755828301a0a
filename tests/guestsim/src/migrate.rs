// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The live-migration benchmark: how large a VM's device state is and how
//! fast two vtmemd processes move it.
//!
//! A simulated VM stores a realistic page mix ([`Corpus`]) in a persistent
//! pool of vtmemd A; its VMM stops the rings and saves the device state
//! (`SET_DEVICE_STATE_FD`, what QEMU does in the stop-and-copy phase), and
//! a second connection, to vtmemd B, loads it. Both transfers are timed
//! natively (pipe to and from this process), and a sample of the pages is
//! read back from B.

use std::time::Instant;

use serde::Serialize;

use crate::daemon;
use crate::pages::{Corpus, CorpusRunOptions};
use crate::{PoolSpec, Result, Vm, VmOptions, PAGE_SIZE};

/// The figures.
#[derive(Clone, Debug, Serialize)]
pub struct MigrateReport {
    /// Persistent pages moved.
    pub pages: u64,
    /// What the pages are charged on the source (stored sizes + 64 B).
    pub stored_bytes: u64,
    /// Bytes of the device state.
    pub state_bytes: u64,
    /// Device-state bytes per page.
    pub state_bytes_per_page: f64,
    /// Saving: seconds, pages/s, MB/s of device state.
    pub export_seconds: f64,
    pub export_pages_per_second: f64,
    pub export_mb_per_second: f64,
    /// Loading: seconds, pages/s, MB/s of device state.
    pub import_seconds: f64,
    pub import_pages_per_second: f64,
    pub import_mb_per_second: f64,
    /// Export plus import time for 1 GiB of persistent pages (4 KiB each,
    /// this mix): what the device state adds to a migration's downtime
    /// when source and destination do not overlap.
    pub seconds_per_gib: f64,
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Runs the benchmark.
pub fn run(opts: &CorpusRunOptions) -> Result<MigrateReport> {
    let n = opts.pages();
    let binary = daemon::vtmemd_binary(opts.vtmemd.as_deref())?;
    let a = daemon::start(&binary, &["vm".into()], &[])?;
    let b = daemon::start(&binary, &["vm".into()], &[])?;
    eprintln!("loading {n} pages of corpus");
    let corpus = Corpus::load(n);

    let src = Vm::connect(a.socket("vm"), &VmOptions::default())?;
    let pool = src.new_pool(PoolSpec::persistent())?;
    eprintln!("storing them in vtmemd A");
    corpus.store(&src, pool)?;
    let held = a.client_stats("vm");

    src.stop_rings()?;
    let t = Instant::now();
    let state = src.save_device_state()?;
    let export = t.elapsed().as_secs_f64();

    let dst = Vm::connect(
        b.socket("vm"),
        &VmOptions {
            reset_on_connect: false,
            ..VmOptions::default()
        },
    )?;
    let t = Instant::now();
    dst.load_device_state(&state)?;
    let import = t.elapsed().as_secs_f64();

    // A sample read back.
    corpus.verify_sample(&dst, pool, 61)?;
    src.disconnect();
    dst.disconnect();

    let pages = held.persistent_pages;
    let bytes = state.len() as u64;
    let per_gib = (1u64 << 30) as f64 / (pages as f64 * PAGE_SIZE as f64);
    Ok(MigrateReport {
        pages,
        stored_bytes: held.persistent_bytes,
        state_bytes: bytes,
        state_bytes_per_page: bytes as f64 / pages as f64,
        export_seconds: export,
        export_pages_per_second: pages as f64 / export,
        export_mb_per_second: mb(bytes) / export,
        import_seconds: import,
        import_pages_per_second: pages as f64 / import,
        import_mb_per_second: mb(bytes) / import,
        seconds_per_gib: (export + import) * per_gib,
    })
}

impl MigrateReport {
    /// The figures as a table.
    pub fn table(&self) -> String {
        format!(
            "device state of {} persistent pages ({:.1} MiB charged on the source)\n\
             \x20 state bytes        {} ({:.0} B a page, {:.1} % of the raw pages)\n\
             \x20 export (save)      {:.3} s  {:.0} pages/s  {:.0} MB/s\n\
             \x20 import (load)      {:.3} s  {:.0} pages/s  {:.0} MB/s\n\
             \x20 export + import    {:.2} s per GiB of persistent pages\n",
            self.pages,
            self.stored_bytes as f64 / (1 << 20) as f64,
            self.state_bytes,
            self.state_bytes_per_page,
            100.0 * self.state_bytes_per_page / PAGE_SIZE as f64,
            self.export_seconds,
            self.export_pages_per_second,
            self.export_mb_per_second,
            self.import_seconds,
            self.import_pages_per_second,
            self.import_mb_per_second,
            self.seconds_per_gib,
        )
    }
}
