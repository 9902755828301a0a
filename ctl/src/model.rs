// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Rates computed from two samples of the store's counters.

use std::time::Instant;

use serde::Serialize;
use vtmem_api::{OpCounters, Recovery, StoreStats, VmDetails};

/// Hit rate of a set of counters: hits over answered gets (hits + misses),
/// `None` without any. Not hits / gets: `gets` is bumped before the lookup
/// and `get_hits` after it, so a snapshot taken in between would show a hit
/// as missing; each answered get bumps exactly one of hits and misses.
/// Gets that failed (no such pool) are errors, not misses.
pub fn hit_rate(c: &OpCounters) -> Option<f64> {
    let answered = c.get_hits + c.get_misses;
    (answered > 0).then(|| c.get_hits as f64 / answered as f64)
}

/// Puts refused for any reason.
pub fn refused(c: &OpCounters) -> u64 {
    c.puts_refused_no_space + c.puts_refused_quota + c.puts_refused_frozen + c.puts_refused_other
}

/// The counters that moved between two snapshots (each saturating at 0, so
/// that a VM removed and added again between them cannot go negative).
pub fn delta(before: &OpCounters, after: &OpCounters) -> OpCounters {
    OpCounters {
        puts: after.puts.saturating_sub(before.puts),
        puts_stored: after.puts_stored.saturating_sub(before.puts_stored),
        puts_refused_no_space: after
            .puts_refused_no_space
            .saturating_sub(before.puts_refused_no_space),
        puts_refused_quota: after
            .puts_refused_quota
            .saturating_sub(before.puts_refused_quota),
        puts_refused_frozen: after
            .puts_refused_frozen
            .saturating_sub(before.puts_refused_frozen),
        puts_refused_other: after
            .puts_refused_other
            .saturating_sub(before.puts_refused_other),
        gets: after.gets.saturating_sub(before.gets),
        get_hits: after.get_hits.saturating_sub(before.get_hits),
        get_misses: after.get_misses.saturating_sub(before.get_misses),
        flush_pages: after.flush_pages.saturating_sub(before.flush_pages),
        flush_objects: after.flush_objects.saturating_sub(before.flush_objects),
        evictions: after.evictions.saturating_sub(before.evictions),
        dedup_hits: after.dedup_hits.saturating_sub(before.dedup_hits),
        zero_pages: after.zero_pages.saturating_sub(before.zero_pages),
        same_filled_pages: after
            .same_filled_pages
            .saturating_sub(before.same_filled_pages),
        bytes_in: after.bytes_in.saturating_sub(before.bytes_in),
        bytes_stored: after.bytes_stored.saturating_sub(before.bytes_stored),
    }
}

/// One `status` result and when it was taken.
#[derive(Clone, Debug)]
pub struct Sample {
    /// When the answer arrived.
    pub at: Instant,
    /// The store's statistics.
    pub stats: StoreStats,
    /// The daemon's `uptime_seconds` in that answer, if it reports one.
    pub uptime: Option<f64>,
    /// Its state directory, if it has one.
    pub state_dir: Option<String>,
    /// What its start took back from the state directory.
    pub recovered: Option<Recovery>,
}

impl Sample {
    /// The state-directory lines of `status`.
    pub fn state(&self) -> Option<crate::render::StateDirInfo<'_>> {
        self.state_dir
            .as_deref()
            .map(|dir| crate::render::StateDirInfo {
                dir,
                recovered: self.recovered.as_ref(),
            })
    }
}

/// What one VM did between two samples.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmActivity {
    /// VM name.
    pub name: String,
    /// Whether a VMM is attached (`None` if the VM was not in `list`).
    pub connected: Option<bool>,
    /// Whether puts are frozen.
    pub frozen: bool,
    /// Put calls per second.
    pub puts_per_sec: f64,
    /// Get calls per second.
    pub gets_per_sec: f64,
    /// Hits / gets over the interval (`None` without gets).
    pub hit_rate: Option<f64>,
    /// Ephemeral pages evicted per second.
    pub evictions_per_sec: f64,
    /// Puts refused per second (every reason).
    pub refused_per_sec: f64,
    /// Uncompressed bytes stored per second.
    pub bytes_in_per_sec: f64,
    /// Persistent bytes held now.
    pub persistent_bytes: u64,
    /// Ephemeral bytes held now.
    pub ephemeral_bytes: u64,
    /// Pages held now (both kinds).
    pub pages: u64,
}

/// The store's activity between two samples.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Activity {
    /// Seconds between the samples.
    pub interval_secs: f64,
    /// Host limit now.
    pub host_limit: u64,
    /// Host memory used now.
    pub host_used: u64,
    /// Pages stored now.
    pub stored_pages: u64,
    /// Evictions per second, all VMs.
    pub evictions_per_sec: f64,
    /// Puts per second, all VMs.
    pub puts_per_sec: f64,
    /// Gets per second, all VMs.
    pub gets_per_sec: f64,
    /// Per VM, in the order of the later sample.
    pub vms: Vec<VmActivity>,
}

/// Compares two samples. A VM present only in the later one counts from
/// zero (it was added during the interval); a VM gone from it is left out.
/// `connected` looks VMs up in a `list` result taken with the later sample.
pub fn activity(before: &Sample, after: &Sample, list: &[VmDetails]) -> Activity {
    // The daemon's own clock, when it reports one, measures the interval
    // without the answers' transit times.
    let secs = match (before.uptime, after.uptime) {
        (Some(b), Some(a)) if a > b => a - b,
        _ => after.at.saturating_duration_since(before.at).as_secs_f64(),
    }
    .max(1e-3);
    let per_sec = |n: u64| n as f64 / secs;
    let zero = OpCounters::default();
    let mut total = OpCounters::default();
    let vms = after
        .stats
        .clients
        .iter()
        .map(|c| {
            let prev = before
                .stats
                .clients
                .iter()
                .find(|p| p.name == c.name)
                .map_or(&zero, |p| &p.counters);
            let d = delta(prev, &c.counters);
            total.accumulate(&d);
            VmActivity {
                name: c.name.clone(),
                connected: list
                    .iter()
                    .find(|v| v.info.name.as_str() == c.name)
                    .map(|v| v.info.connected),
                frozen: c.frozen,
                puts_per_sec: per_sec(d.puts),
                gets_per_sec: per_sec(d.gets),
                hit_rate: hit_rate(&d),
                evictions_per_sec: per_sec(d.evictions),
                refused_per_sec: per_sec(refused(&d)),
                bytes_in_per_sec: per_sec(d.bytes_in),
                persistent_bytes: c.persistent_bytes,
                ephemeral_bytes: c.ephemeral_bytes,
                pages: c.persistent_pages + c.ephemeral_pages,
            }
        })
        .collect();
    Activity {
        interval_secs: secs,
        host_limit: after.stats.host_limit,
        host_used: after.stats.host_used,
        stored_pages: after.stats.stored_pages,
        evictions_per_sec: per_sec(total.evictions),
        puts_per_sec: per_sec(total.puts),
        gets_per_sec: per_sec(total.gets),
        vms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vtmem_api::ClientStats;

    fn client(name: &str, puts: u64, gets: u64, hits: u64, evictions: u64) -> ClientStats {
        ClientStats {
            name: name.to_string(),
            persistent_bytes: 4096,
            counters: OpCounters {
                puts,
                gets,
                get_hits: hits,
                get_misses: gets - hits,
                evictions,
                puts_refused_quota: 1,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn hit_rate_ignores_gets_still_in_flight() {
        // A snapshot taken between a get's `gets` bump and its `get_hits`
        // bump: every answered get hit, so the rate is exactly 1.
        let c = OpCounters {
            gets: 11,
            get_hits: 10,
            ..Default::default()
        };
        assert_eq!(hit_rate(&c), Some(1.0));
        let failed_only = OpCounters {
            gets: 3,
            ..Default::default()
        };
        assert_eq!(hit_rate(&failed_only), None);
        let mixed = OpCounters {
            gets: 4,
            get_hits: 1,
            get_misses: 3,
            ..Default::default()
        };
        assert_eq!(hit_rate(&mixed), Some(0.25));
    }

    #[test]
    fn rates_between_samples() {
        let t0 = Instant::now();
        let before = Sample {
            at: t0,
            uptime: None,
            state_dir: None,
            recovered: None,
            stats: StoreStats {
                clients: vec![client("a", 10, 10, 5, 0), client("gone", 5, 5, 5, 5)],
                ..Default::default()
            },
        };
        let after = Sample {
            at: t0 + Duration::from_secs(2),
            uptime: None,
            state_dir: None,
            recovered: None,
            stats: StoreStats {
                clients: vec![client("a", 30, 14, 8, 4), client("new", 2, 0, 0, 0)],
                ..Default::default()
            },
        };
        let list = vec![VmDetails {
            info: vtmem_api::VmInfo {
                name: "a".parse().unwrap(),
                socket: "/run/vtmem/a.sock".into(),
                connected: true,
                connections: 1,
                frozen: false,
                config: "a".parse().unwrap(),
            },
            device: Default::default(),
            stats: client("a", 0, 0, 0, 0),
        }];
        let act = activity(&before, &after, &list);
        assert_eq!(act.interval_secs, 2.0);
        assert_eq!(act.vms.len(), 2);
        let a = &act.vms[0];
        assert_eq!(a.connected, Some(true));
        assert_eq!(a.puts_per_sec, 10.0);
        assert_eq!(a.gets_per_sec, 2.0);
        assert_eq!(a.hit_rate, Some(0.75));
        assert_eq!(a.evictions_per_sec, 2.0);
        assert_eq!(a.refused_per_sec, 0.0);
        let n = &act.vms[1];
        assert_eq!(n.connected, None);
        assert_eq!(n.puts_per_sec, 1.0);
        assert_eq!(n.refused_per_sec, 0.5);
        assert_eq!(n.hit_rate, None);
        assert_eq!(act.puts_per_sec, 11.0);
        assert_eq!(act.evictions_per_sec, 2.0);
    }

    #[test]
    fn counters_never_go_negative() {
        let before = OpCounters {
            puts: 10,
            ..Default::default()
        };
        assert_eq!(delta(&before, &OpCounters::default()).puts, 0);
    }
}
