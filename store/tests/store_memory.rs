// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Adversarial memory tests: under every access pattern, what the store
//! really holds (allocator chunks plus the real size of every table) stays
//! within the host limit plus a small fixed overhead per client.

#[path = "common/memory_patterns.rs"]
mod memory_patterns;

use memory_patterns::{run, PATTERNS};
use vtmem_store::*;

const LIMIT: u64 = 8 << 20;

fn check(s: &Store, phase: &str, pattern: &str) {
    let st = s.stats();
    let real = st.allocator_footprint + st.metadata_bytes;
    let bound = st.host_limit + st.clients.len() as u64 * FIXED_OVERHEAD_PER_CLIENT;
    assert!(
        real <= bound,
        "{pattern}/{phase}: real {real} B > bound {bound} B: {st:#?}"
    );
    assert!(
        st.host_used + st.host_overhead <= st.host_limit,
        "{pattern}/{phase}: charged {} + overhead {} > limit",
        st.host_used,
        st.host_overhead
    );
    assert_eq!(st.host_overhead, s.recount_overhead(), "{pattern}/{phase}");
}

#[test]
fn real_memory_stays_within_the_limit_under_every_pattern() {
    for pattern in PATTERNS {
        let s = Store::new(StoreConfig { host_limit: LIMIT });
        let admin = s.add_client("vm", ClientConfig::default()).unwrap();
        let c = admin.data();
        let stored = run(pattern, &s, &c, |s, phase| check(s, phase, pattern));
        assert!(stored > 0, "{pattern}: nothing stored");
        // Everything given back: nothing stays charged or allocated.
        c.reset();
        let st = s.stats();
        assert_eq!(
            (st.host_used, st.host_overhead, st.allocator_footprint),
            (0, 0, 0),
            "{pattern}: leak after reset"
        );
    }
}

/// The refill after a stranding flush must find room: compaction gives the
/// flushed chunks back instead of leaving the host full of holes.
#[test]
fn flushed_memory_is_usable_again() {
    let s = Store::new(StoreConfig { host_limit: LIMIT });
    let admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = admin.data();
    let mut fills = Vec::new();
    run("stranding-flush", &s, &c, |s, phase| {
        if phase == "filled" {
            fills.push(s.stats().stored_pages);
        }
    });
    // Each refill stores at least 90 % of what the first fill did, less
    // the one page in 64 each flush kept.
    let first = fills[0];
    for (round, &n) in fills.iter().enumerate().skip(1) {
        assert!(
            n * 10 >= first * 9,
            "round {round}: {n} pages held, first fill {first}"
        );
    }
}
