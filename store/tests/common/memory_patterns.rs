// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Access patterns that try to make the store hold more real memory than
//! its host limit: shared by the adversarial tests (`store_memory.rs`) and
//! the memory bench (`benches/memory.rs`).
//!
//! Each fills the host until puts are refused, in a layout chosen to cost
//! the store as much as possible per charged byte, and calls `check` after
//! every phase.

use vtmem_store::*;
use vtmem_testkit::{handle as h, sized_page, zero_page};

/// The patterns, by name.
pub const PATTERNS: [&str; 4] = [
    "stranding-flush",
    "one-page-per-object",
    "many-pools",
    "scattered-zero",
];

/// Puts `page(i)` at `at(i)` for i = 0, 1, ... until a put is refused or
/// `max` were stored; returns how many were stored.
fn fill(c: &DataHandle, max: u64, at: impl Fn(u64) -> Handle, page: impl Fn(u64) -> Page) -> u64 {
    let mut i = 0;
    while i < max && c.put(&at(i), &page(i), false).is_ok() {
        i += 1;
    }
    i
}

/// Bytes of random data that make page `i` land in size class `i % 63`.
fn class_bytes(i: u64) -> usize {
    64 * (i % 63) as usize + 40
}

/// Runs `pattern` against client `c`; `check` sees the store after each
/// phase. Returns the pages stored in the last phase.
pub fn run(pattern: &str, s: &Store, c: &DataHandle, mut check: impl FnMut(&Store, &str)) -> u64 {
    let limit = s.host_limit();
    match pattern {
        // Fill every size class, flush all but one page in 64, refill with
        // new pages, three times: without compaction every flushed chunk
        // stays allocated and each refill takes new ones.
        "stranding-flush" => {
            let p = c.new_pool(PoolSpec::persistent()).unwrap();
            let mut last = 0;
            for round in 0..3u64 {
                let base = round << 40;
                let n = fill(
                    c,
                    u64::MAX,
                    |i| h(p, 1, base + i),
                    |i| sized_page(base + i, class_bytes(i)),
                );
                check(s, "filled");
                for i in 0..n {
                    if i % 64 != 0 {
                        c.flush_page(&h(p, 1, base + i)).unwrap();
                    }
                }
                check(s, "flushed");
                last = n;
            }
            last
        }
        // Zero pages cost no data, only metadata: one object each, so each
        // page also costs an object entry and an index block.
        "one-page-per-object" => {
            let p = c.new_pool(PoolSpec::persistent()).unwrap();
            let n = fill(c, limit / 16, |i| h(p, i, 0), |_| zero_page());
            check(s, "filled");
            n
        }
        // Every pool a client may open, each filled with small pages one
        // per index block.
        "many-pools" => {
            let pools: Vec<u32> = (0..16)
                .map(|k| {
                    let spec = if k % 2 == 0 {
                        PoolSpec::persistent()
                    } else {
                        PoolSpec::ephemeral()
                    };
                    c.new_pool(spec).unwrap()
                })
                .collect();
            let mut total = 0;
            for (k, &p) in pools.iter().enumerate() {
                let seed = (k as u64) << 40;
                total += fill(
                    c,
                    limit / 4096 / 16 + 1,
                    |i| h(p, i % 7, i * 16),
                    |i| sized_page(seed + i, 100),
                );
            }
            check(s, "filled");
            total
        }
        // Zero pages sixteen indexes apart: one index block each.
        "scattered-zero" => {
            let p = c.new_pool(PoolSpec::persistent()).unwrap();
            let n = fill(c, limit / 16, |i| h(p, 1, i * 16), |_| zero_page());
            check(s, "filled");
            n
        }
        other => panic!("no pattern {other}"),
    }
}
