// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the `guest_*` tests share: simulated VMs (the guest simulator)
//! against the real vtmemd.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vtmem_guestsim::{Handle, ObjectId, PoolSpec, Status, Vm, VmOptions};

use super::{checksum, handle, random_page, vtmemd_with_vms, wait_until, Page, Vtmemd, DEADLINE};

/// Starts vtmemd with a `--vm` for each spec and the `extra` arguments.
pub fn daemon(vms: &[&str], extra: &[&str]) -> Vtmemd {
    vtmemd_with_vms(vms, extra)
}

/// Connects to `name` with default options.
pub fn connect(d: &Vtmemd, name: &str) -> Vm {
    connect_with(d, name, VmOptions::default())
}

/// Connects to `name`.
pub fn connect_with(d: &Vtmemd, name: &str, opts: VmOptions) -> Vm {
    Vm::connect(d.socket(name), &opts)
        .unwrap_or_else(|e| panic!("connect {name}: {e}\nlog:\n{}", d.log()))
}

/// `n` distinct incompressible pages, seeded by `seed`.
pub fn pages(seed: u64, n: usize) -> Vec<Box<Page>> {
    (0..n as u64)
        .map(|i| Box::new(random_page(seed << 32 | i)))
        .collect()
}

/// Pairs handles with pages for `put_batch`.
pub fn items(pool: u32, obj: u64, pages: &[Box<Page>]) -> Vec<(Handle, &Page)> {
    pages
        .iter()
        .enumerate()
        .map(|(i, p)| (handle(pool, obj, i as u64), &**p))
        .collect()
}

/// Asserts the daemon process still runs.
pub fn assert_alive(d: &Vtmemd) {
    assert!(
        d.is_alive(),
        "vtmemd died: {:?}\nlog:\n{}",
        d.exit_status(),
        d.log()
    );
}

/// A VM doing verified put/get/flush rounds in a thread until stopped.
pub struct Neighbour {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Neighbour {
    /// Connects to `name` and starts the I/O loop.
    pub fn start(d: &Vtmemd, name: &str) -> Neighbour {
        let vm = connect(d, name);
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (stop2, rounds2) = (stop.clone(), rounds.clone());
        let thread = std::thread::spawn(move || -> Result<(), String> {
            let pool = vm
                .new_pool(PoolSpec::persistent())
                .map_err(|e| e.to_string())?;
            let mut round = 0u64;
            while !stop2.load(Ordering::Relaxed) || round < 2 {
                let pg = pages(1000 + round, 48);
                let st = vm
                    .put_batch(&items(pool, round, &pg))
                    .map_err(|e| e.to_string())?;
                if st.iter().any(|s| *s != Status::Ok) {
                    return Err(format!("round {round}: puts {st:?}"));
                }
                let hs: Vec<_> = (0..48).map(|i| handle(pool, round, i)).collect();
                let got = vm.get_batch(&hs).map_err(|e| e.to_string())?;
                for (i, (s, p)) in got.iter().enumerate() {
                    if *s != Status::Ok || checksum(p) != checksum(&pg[i]) {
                        return Err(format!("round {round}: page {i} came back {s}"));
                    }
                }
                vm.flush_object(pool, ObjectId([round, 0, 0]))
                    .map_err(|e| e.to_string())?;
                round += 1;
                rounds2.store(round, Ordering::Relaxed);
            }
            Ok(())
        });
        Neighbour {
            stop,
            rounds,
            thread: Some(thread),
        }
    }

    /// Rounds completed so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more rounds completed (or the loop ended
    /// early, which [`Neighbour::finish`] reports); panics at the deadline.
    pub fn wait_rounds(&self, n: u64) {
        let target = self.rounds() + n;
        wait_until(&format!("neighbour round {target}"), DEADLINE, || {
            self.rounds() >= target || self.thread.as_ref().is_some_and(|t| t.is_finished())
        });
    }

    /// Stops the loop and returns the rounds done; panics on any error.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("neighbour thread")
            .unwrap_or_else(|e| panic!("neighbour VM: {e}"));
        self.rounds()
    }
}
