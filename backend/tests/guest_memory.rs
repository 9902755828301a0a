// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A guest that tries to make vtmemd hold more real memory than its host
//! limit, over real vhost-user: it fills every allocator size class, then
//! flushes all but one page in 64 and refills, three times. Before
//! compaction and honest metadata charging this left vtmemd at about 24
//! times the limit; now the daemon's own accounting of real bytes stays
//! within the limit and its resident memory grows by about the limit.

mod common;

use common::guest::*;
use common::*;
use vtmem_guestsim::{PoolSpec, Status, Vm};
use vtmem_testkit::sized_page;

const LIMIT_MIB: u64 = 32;
const BATCH: u64 = 64;

/// Resident memory of a process, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib * 1024
}

/// Page `i` of a round: its random part lands it in size class `i % 63`.
fn page(round: u64, i: u64) -> Box<Page> {
    Box::new(sized_page(round << 40 | i, 64 * (i % 63) as usize + 40))
}

/// Puts pages of round `round` at indexes 0.. until one is refused;
/// returns how many were stored.
fn fill(vm: &Vm, pool: u32, round: u64) -> u64 {
    let mut stored = 0;
    loop {
        let pages: Vec<Box<Page>> = (stored..stored + BATCH).map(|i| page(round, i)).collect();
        let batch: Vec<_> = pages
            .iter()
            .enumerate()
            .map(|(k, p)| (handle(pool, round, stored + k as u64), &**p))
            .collect();
        let statuses = vm.put_batch(&batch).unwrap();
        for st in statuses {
            if st != Status::Ok {
                assert_eq!(st, Status::NoSpace, "refused for another reason");
                return stored;
            }
            stored += 1;
        }
    }
}

#[test]
fn stranding_flushes_cannot_take_memory_beyond_the_limit() {
    let d = daemon(
        &["hostile", "neighbour"],
        &["--host-limit", &format!("{LIMIT_MIB}M")],
    );
    let pid = d.pid().expect("vtmemd runs");
    let baseline = rss_bytes(pid);
    let vm = connect(&d, "hostile");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let mut first = 0;
    for round in 0..3 {
        let stored = fill(&vm, pool, round);
        if round == 0 {
            first = stored;
        }
        // Flushed memory is usable again: each refill stores nearly as
        // much as the first fill.
        assert!(
            stored * 10 >= first * 9,
            "round {round}: {stored} pages, first fill {first}"
        );
        let handles: Vec<_> = (0..stored)
            .filter(|i| i % 64 != 0)
            .map(|i| handle(pool, round, i))
            .collect();
        for chunk in handles.chunks(BATCH as usize) {
            for st in vm.flush_pages(chunk).unwrap() {
                assert_eq!(st, Status::Ok);
            }
        }
        let s = d.status().store;
        assert!(
            s.host_used + s.host_overhead <= s.host_limit,
            "round {round}: {} charged + {} overhead > {}",
            s.host_used,
            s.host_overhead,
            s.host_limit
        );
        assert!(
            s.allocator_footprint + s.metadata_bytes
                <= s.host_limit + 2 * vtmem_store::FIXED_OVERHEAD_PER_CLIENT,
            "round {round}: real {} > limit: {s:#?}",
            s.allocator_footprint + s.metadata_bytes
        );
    }
    let limit = LIMIT_MIB << 20;
    let grown = rss_bytes(pid).saturating_sub(baseline);
    eprintln!(
        "vtmemd RSS grew by {} MiB under a {LIMIT_MIB} MiB limit ({first} pages a fill)",
        grown >> 20
    );
    // The allocator's own slack (freed heap it keeps) comes on top of the
    // limit; before compaction the growth was about 24 times the limit.
    assert!(grown <= 2 * limit, "RSS grew by {grown} B");

    // The neighbour is still served: with the hostile guest's pages gone
    // it has the host.
    vm.reset().unwrap();
    let n = connect(&d, "neighbour");
    let np = n.new_pool(PoolSpec::persistent()).unwrap();
    let data = pages(9, 256);
    for st in n.put_batch(&items(np, 1, &data)).unwrap() {
        assert_eq!(st, Status::Ok);
    }
    assert_alive(&d);
}
