// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A real crash of a store with a crash-safe state: a child process (this
//! test binary again) runs three clients' puts and flushes on their own
//! threads, with checkpoints in a loop beside them, and prints each
//! operation once it returned; the parent kills it with SIGKILL at a
//! random moment, recovers the state directory and checks that every
//! handle holds what its last answered operation left there (or, for the
//! one operation in flight on that thread, nothing or its page), and that
//! the charges are exactly those of a fresh store holding the same pages.
//! Three rounds, each child recovering what the last one left.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vtmem_store::*;
use vtmem_testkit::random_page;

const NAMES: [&str; 3] = ["solo", "g1", "g2"];
const HANDLES: u64 = 50;
const CHILD: &str = "VTMEM_SIGKILL_CHILD";
const ROUND: &str = "VTMEM_SIGKILL_ROUND";

fn config() -> StoreConfig {
    StoreConfig {
        host_limit: 256 << 20,
    }
}

fn client_config(t: usize) -> ClientConfig {
    ClientConfig {
        dedup_group: (t > 0).then(|| "grp".to_string()),
        ..ClientConfig::default()
    }
}

fn handle(idx: u64) -> Handle {
    Handle {
        pool: 0,
        object: ObjectId([idx % 3, 1, 2]),
        index: idx,
    }
}

/// Operation `k` of thread `t`: on handle `k % HANDLES`, a flush or a
/// put of `content(t, k)`.
fn is_flush(k: u64) -> bool {
    k % 10 == 9
}

fn content(t: usize, k: u64) -> Page {
    match k % 7 {
        0 => [0u8; PAGE_SIZE],
        1 => [(k % 251) as u8 | 1; PAGE_SIZE],
        // Shared by every thread and round: dedup across the group.
        2 => random_page(k % 5),
        3 => random_page(1000 + t as u64 * 1_000_000 + k),
        _ => {
            let mut p = [0u8; PAGE_SIZE];
            for (i, b) in p.iter_mut().enumerate() {
                *b = b"pages that survive the death of their daemon "[(i + k as usize) % 45];
            }
            p[..8].copy_from_slice(&(t as u64 * 1_000_000 + k).to_le_bytes());
            p
        }
    }
}

/// The child: runs until it is killed.
fn child(dir: &Path, round: u64) {
    let (store, _) = Store::open(dir, config()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (t, name) in NAMES.iter().enumerate() {
        let c = match store.client(name) {
            Some(a) => a.data(),
            None => {
                let c = store.add_client(name, client_config(t)).unwrap().data();
                assert_eq!(c.new_pool(PoolSpec::persistent()).unwrap(), 0);
                c
            }
        };
        println!("READY {t}");
        threads.push(std::thread::spawn(move || {
            for k in round * 1_000_000.. {
                let h = handle(k % HANDLES);
                if is_flush(k) {
                    c.flush_page(&h).unwrap();
                } else {
                    c.put(&h, &content(t, k), false).unwrap();
                }
                println!("ACK {t} {k}");
            }
        }));
    }
    {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                store.checkpoint_all().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
        });
    }
    for t in threads {
        t.join().unwrap();
    }
}

/// What a handle may hold: the page of the last answered operation, or,
/// if an operation was in flight on it, nothing or that one's page.
#[derive(Clone, Debug, Default)]
struct Expect {
    now: Option<Page>,
    in_flight: Option<Option<Page>>,
}

#[test]
fn sigkill_mid_operation_loses_no_answered_page() {
    if let Some(dir) = std::env::var_os(CHILD) {
        let round = std::env::var(ROUND).unwrap().parse().unwrap();
        child(Path::new(&dir), round);
        return;
    }
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("state");
    // (thread, handle) -> what it holds, as verified.
    let mut held: HashMap<(usize, u64), Option<Page>> = HashMap::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    for round in 1..=3u64 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let kill_after = 300 + seed % 3000;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sigkill_mid_operation_loses_no_answered_page",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, &dir)
            .env(ROUND, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut last: [Option<u64>; 3] = [None; 3];
        let mut acks = 0;
        // Every answer the child printed, the ones still in the pipe when
        // it was killed too: those operations returned.
        for line in out.lines() {
            let line = line.unwrap();
            let mut w = line.split_whitespace();
            if w.next() != Some("ACK") {
                continue;
            }
            let t: usize = w.next().unwrap().parse().unwrap();
            let k: u64 = w.next().unwrap().parse().unwrap();
            assert!(last[t].is_none_or(|l| k == l + 1), "answers in order");
            last[t] = Some(k);
            acks += 1;
            if acks == kill_after {
                // SIGKILL, mid-operation.
                child.kill().unwrap();
            }
        }
        child.wait().unwrap();
        assert!(
            acks >= kill_after,
            "the child stopped early ({acks} answers)"
        );
        // What each handle may hold.
        let first = round * 1_000_000;
        let mut expect: HashMap<(usize, u64), Expect> = HashMap::new();
        for (t, last) in last.iter().enumerate() {
            for h in 0..HANDLES {
                expect.insert(
                    (t, h),
                    Expect {
                        now: held.get(&(t, h)).copied().flatten(),
                        in_flight: None,
                    },
                );
            }
            let upto = last.map_or(first, |k| k + 1);
            for k in first..upto {
                let e = expect.get_mut(&(t, k % HANDLES)).unwrap();
                e.now = (!is_flush(k)).then(|| content(t, k));
            }
            let e = expect.get_mut(&(t, upto % HANDLES)).unwrap();
            e.in_flight = Some((!is_flush(upto)).then(|| content(t, upto)));
        }
        // Recover and check.
        let (store, rec) = Store::recover(&dir, config()).unwrap();
        let fresh = Store::new(StoreConfig {
            host_limit: u64::MAX,
        });
        let mut out = [0u8; PAGE_SIZE];
        let mut pages = 0;
        for (t, name) in NAMES.iter().enumerate() {
            let c = store.client(name).unwrap().data();
            let f = fresh.add_client(name, client_config(t)).unwrap().data();
            f.new_pool(PoolSpec::persistent()).unwrap();
            for h in 0..HANDLES {
                let e = &expect[&(t, h)];
                let got = c.get(&handle(h), &mut out).unwrap().then_some(out);
                // An interrupted put has dropped the old copy (as any put
                // does first) and may or may not have stored the new one.
                let ok = got == e.now || e.in_flight.is_some_and(|f| got == f || got.is_none());
                assert!(
                    ok,
                    "round {round}: thread {t} handle {h}: {} after SIGKILL, expected {} (or the operation in flight: {:?})",
                    if got.is_some() { "a page" } else { "nothing" },
                    if e.now.is_some() { "a page" } else { "nothing" },
                    e.in_flight.map(|f| f.is_some())
                );
                held.insert((t, h), got);
                if let Some(p) = got {
                    f.put(&handle(h), &p, false).unwrap();
                    pages += 1;
                }
            }
        }
        assert_eq!(rec.pages, pages);
        let (a, b) = (store.stats(), fresh.stats());
        assert_eq!(a.host_used, b.host_used, "round {round}: host charge");
        assert_eq!(
            a.unique_pages, b.unique_pages,
            "round {round}: unique contents"
        );
        assert_eq!(a.stored_pages, b.stored_pages);
        for (x, y) in a.clients.iter().zip(&b.clients) {
            assert_eq!(
                x.persistent_bytes, y.persistent_bytes,
                "charge of {}",
                x.name
            );
            assert_eq!(x.persistent_pages, y.persistent_pages);
        }
        assert_eq!(store.recount_overhead(), a.host_overhead);
    }
}
