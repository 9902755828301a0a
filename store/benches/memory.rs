// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Real memory against the host limit under adversarial access patterns.
//!
//! `cargo bench -p vtmem-store --bench memory` (add `-- --quick` for the
//! 64 MiB limit only).
//!
//! Each pattern (see `tests/common/memory_patterns.rs`) runs in a fresh
//! child process, so that one pattern's freed heap does not count against
//! the next. The table shows, per pattern and limit: the pages stored, the
//! store's own account of real bytes (allocator chunks plus the real size
//! of every table), what it charged (pages plus overhead), and the
//! process's resident memory growth (VmRSS after less before), with its
//! ratio to the limit.

use std::process::Command;

#[path = "../tests/common/memory_patterns.rs"]
mod memory_patterns;

use memory_patterns::{run, PATTERNS};
use vtmem_store::*;

const PATTERN_ENV: &str = "VTMEM_MEMORY_PATTERN";
const LIMIT_ENV: &str = "VTMEM_MEMORY_LIMIT";

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// In the child: runs one pattern and prints one line of figures.
fn child(pattern: &str, limit: u64) {
    let before = rss();
    let s = Store::new(StoreConfig { host_limit: limit });
    let admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = admin.data();
    let mut peak_real = 0;
    let mut peak_rss = 0;
    let stored = run(pattern, &s, &c, |s, _| {
        let st = s.stats();
        peak_real = peak_real.max(st.allocator_footprint + st.metadata_bytes);
        peak_rss = peak_rss.max(rss());
    });
    let st = s.stats();
    println!(
        "{} {} {} {} {}",
        stored,
        peak_real,
        st.host_used + st.host_overhead,
        peak_rss.saturating_sub(before),
        st.host_overhead
    );
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn main() {
    if let (Ok(pattern), Ok(limit)) = (std::env::var(PATTERN_ENV), std::env::var(LIMIT_ENV)) {
        child(&pattern, limit.parse().expect("limit in bytes"));
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let limits: &[u64] = if quick { &[64] } else { &[64, 256] };
    let exe = std::env::current_exe().expect("own path");
    println!(
        "{:<22} {:>6} {:>10} {:>11} {:>11} {:>11} {:>9}",
        "pattern", "limit", "pages", "real (MiB)", "charged", "RSS growth", "RSS/limit"
    );
    for &limit_mib in limits {
        for pattern in PATTERNS {
            let limit = limit_mib << 20;
            let out = Command::new(&exe)
                .env(PATTERN_ENV, pattern)
                .env(LIMIT_ENV, limit.to_string())
                .output()
                .expect("run the pattern");
            assert!(out.status.success(), "{pattern}: {out:?}");
            let line = String::from_utf8_lossy(&out.stdout);
            let v: Vec<u64> = line
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            let [stored, real, charged, grown, _overhead] = v[..] else {
                panic!("{pattern}: unexpected output {line}");
            };
            println!(
                "{:<22} {:>4}Mi {:>10} {:>11.1} {:>11.1} {:>11.1} {:>9.2}",
                pattern,
                limit_mib,
                stored,
                mib(real),
                mib(charged),
                mib(grown),
                grown as f64 / limit as f64
            );
        }
    }
}
