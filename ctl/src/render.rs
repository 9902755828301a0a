// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Human output of `status`, `list`, `show` and `top`.

use vtmem_api::{ClientStats, PoolStats, Recovery, StoreStats, VmDetails};

use crate::format::{self, Align, Fields, Table};
use crate::model::{hit_rate, refused, Activity};

/// The eviction rate shown by `status`, measured by sampling the counters
/// twice.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvictionRate {
    /// Evictions per second.
    pub per_sec: f64,
    /// Seconds between the two samples.
    pub over_secs: f64,
}

/// `status`: the store as a whole.
/// A duration for humans: `45s`, `12m 05s`, `3h 02m 05s`, `2d 03h 02m`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m {s:02}s"),
        _ => format!("{d}d {h:02}h {m:02}m"),
    }
}

/// The state directory of `status` and what the daemon's start took back
/// from it.
#[derive(Clone, Copy, Debug)]
pub struct StateDirInfo<'a> {
    /// The directory.
    pub dir: &'a str,
    /// What the start recovered (absent from daemons that do not say).
    pub recovered: Option<&'a Recovery>,
}

/// `status`: the store as a whole; `uptime` is the daemon's, in seconds
/// (absent from daemons that do not report it); `state`, its state
/// directory, if it has one.
pub fn status(
    stats: &StoreStats,
    evictions: Option<EvictionRate>,
    uptime: Option<f64>,
    state: Option<StateDirInfo<'_>>,
) -> String {
    let c = &stats.counters;
    let mut f = Fields::new();
    f.add("host limit", format::bytes(stats.host_limit));
    let real = stats.host_used + stats.host_overhead;
    f.add(
        "host used",
        format!(
            "{} ({} of the limit): pages {}, overhead {}",
            format::bytes(real),
            format::percent(real, stats.host_limit),
            format::bytes(stats.host_used),
            format::bytes(stats.host_overhead)
        ),
    );
    f.add(
        "stored pages",
        format!(
            "{} (unique contents {}, zero {}, same-filled {}, stored raw {})",
            stats.stored_pages,
            stats.unique_pages,
            stats.zero_pages,
            stats.same_filled_pages,
            stats.raw_pages
        ),
    );
    f.add("reserved pages", stats.reserved_pages.to_string());
    f.add(
        "data",
        format!(
            "{} in slabs of {} (fragmentation {})",
            format::bytes(stats.data_bytes),
            format::bytes(stats.allocator_footprint),
            format::ratio(stats.fragmentation)
        ),
    );
    f.add(
        "metadata",
        format!(
            "{} ({} B per stored page)",
            format::bytes(stats.metadata_bytes),
            format::ratio(stats.metadata_bytes_per_page)
        ),
    );
    f.add("compression ratio", format::ratio(stats.compression_ratio));
    f.add("dedup ratio", format::ratio(stats.dedup_ratio));
    f.add(
        "evictions",
        match evictions {
            Some(r) => format!(
                "{}/s (sampled over {:.2} s; {} in total)",
                format::rate(r.per_sec),
                r.over_secs,
                c.evictions
            ),
            None => match uptime {
                Some(up) if up > 0.0 => format!(
                    "{} in total ({}/s on average since vtmemd started)",
                    c.evictions,
                    format::rate(c.evictions as f64 / up)
                ),
                _ => format!("{} in total (rate not sampled)", c.evictions),
            },
        },
    );
    f.add(
        "puts",
        format!(
            "{} (stored {}, refused {}: no space {}, quota {}, frozen {}, other {})",
            c.puts,
            c.puts_stored,
            refused(c),
            c.puts_refused_no_space,
            c.puts_refused_quota,
            c.puts_refused_frozen,
            c.puts_refused_other
        ),
    );
    f.add(
        "gets",
        format!(
            "{} (hits {}, hit rate {})",
            c.gets,
            c.get_hits,
            format::fraction(hit_rate(c))
        ),
    );
    f.add(
        "VMs",
        format!(
            "{} (pools {}, dedup domains {})",
            stats.clients.len(),
            stats.pools,
            stats.dedup_domains
        ),
    );
    if let Some(up) = uptime {
        f.add("uptime", duration(up));
    }
    if let Some(st) = state {
        f.add("state directory", st.dir.to_string());
        f.add(
            "recovered at start",
            match st.recovered {
                Some(r) if r.vms > 0 => format!(
                    "{} persistent pages of {} VM(s) ({} pools, {} of state) in {:.3} s",
                    r.pages,
                    r.vms,
                    r.pools,
                    format::bytes(r.bytes),
                    r.seconds
                ),
                _ => "nothing (no saved state for the VMs declared)".to_string(),
            },
        );
    }
    f.render(0)
}

fn refused_cell(stats: &ClientStats) -> String {
    let c = &stats.counters;
    format!(
        "{}/{}/{}/{}",
        c.puts_refused_no_space, c.puts_refused_quota, c.puts_refused_frozen, c.puts_refused_other
    )
}

fn state(stats: &ClientStats) -> &'static str {
    if stats.frozen {
        "frozen"
    } else {
        "active"
    }
}

fn pool_kind(p: &PoolStats) -> &'static str {
    if p.persistent {
        "persistent"
    } else {
        "ephemeral"
    }
}

fn pools_table(pools: &[(&str, &PoolStats)], with_vm: bool) -> Table {
    let mut cols = vec![
        ("POOL", Align::Right),
        ("KIND", Align::Left),
        ("SHARED", Align::Left),
        ("OWNER", Align::Left),
        ("EXCL", Align::Left),
        ("PAGES", Align::Right),
        ("BYTES", Align::Right),
        ("RESERVED", Align::Right),
        ("PUTS", Align::Right),
        ("GETS", Align::Right),
        ("HIT RATE", Align::Right),
        ("EVICTIONS", Align::Right),
    ];
    if with_vm {
        cols.insert(0, ("VM", Align::Left));
    }
    let mut t = Table::new(&cols);
    for (vm, p) in pools {
        let mut row = vec![
            p.id.to_string(),
            pool_kind(p).to_string(),
            p.shared
                .as_ref()
                .map_or("-".to_string(), ToString::to_string),
            format::yes_no(p.owned).to_string(),
            format::yes_no(p.exclusive_gets).to_string(),
            p.pages.to_string(),
            format::bytes(p.bytes),
            p.reserved_pages.to_string(),
            p.counters.puts.to_string(),
            p.counters.gets.to_string(),
            format::fraction(hit_rate(&p.counters)),
            p.counters.evictions.to_string(),
        ];
        if with_vm {
            row.insert(0, vm.to_string());
        }
        t.row(row);
    }
    t
}

/// `list`: one row per VM, then one row per pool.
pub fn list(vms: &[VmDetails]) -> String {
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("CONN", Align::Left),
        ("STATE", Align::Left),
        ("WEIGHT", Align::Right),
        ("P-QUOTA", Align::Right),
        ("P-PAGES", Align::Right),
        ("P-BYTES", Align::Right),
        ("E-QUOTA", Align::Right),
        ("E-PAGES", Align::Right),
        ("E-BYTES", Align::Right),
        ("ZERO", Align::Right),
        ("DEDUP", Align::Right),
        ("HIT RATE", Align::Right),
        ("REFUSED S/Q/F/O", Align::Right),
    ]);
    let mut pools = Vec::new();
    for d in vms {
        let (vm, s) = (&d.info, &d.stats);
        t.row(vec![
            vm.name.to_string(),
            format::yes_no(vm.connected).to_string(),
            state(s).to_string(),
            vm.config.weight.to_string(),
            format::quota(vm.config.persistent_quota.bytes()),
            s.persistent_pages.to_string(),
            format::bytes(s.persistent_bytes),
            format::quota(vm.config.ephemeral_quota.bytes()),
            s.ephemeral_pages.to_string(),
            format::bytes(s.ephemeral_bytes),
            s.zero_pages.to_string(),
            s.deduplicated_pages.to_string(),
            format::fraction(hit_rate(&s.counters)),
            refused_cell(s),
        ]);
        pools.extend(s.pools.iter().map(|p| (vm.name.as_str(), p)));
    }
    if vms.is_empty() {
        return "no VMs\n".to_string();
    }
    let mut out = t.render();
    if !pools.is_empty() {
        out.push('\n');
        out.push_str(&pools_table(&pools, true).render());
    }
    out
}

/// `show VM`: everything about one VM.
pub fn show(d: &VmDetails) -> String {
    let i = &d.info;
    let s = &d.stats;
    let c = &s.counters;
    let dev = &d.device;
    let mut f = Fields::new();
    f.add("socket", i.socket.display().to_string());
    f.add(
        "connected",
        format!(
            "{} ({} connection{} since added)",
            format::yes_no(i.connected),
            i.connections,
            if i.connections == 1 { "" } else { "s" }
        ),
    );
    f.add(
        "state",
        if s.frozen {
            "frozen (puts refused)"
        } else {
            "active"
        },
    );
    f.add("weight", i.config.weight.to_string());
    f.add(
        "dedup group",
        i.config
            .dedup_group
            .as_ref()
            .map_or("none".to_string(), ToString::to_string),
    );
    f.add(
        "authorized UUIDs",
        if i.config.authorized_uuids.is_empty() {
            "none".to_string()
        } else {
            i.config
                .authorized_uuids
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        },
    );
    f.add(
        "persistent",
        format!(
            "{} pages, {} of {} quota (charged {} with reservations)",
            s.persistent_pages,
            format::bytes(s.persistent_bytes),
            format::quota(i.config.persistent_quota.bytes()),
            format::bytes(s.persistent_charged)
        ),
    );
    f.add(
        "ephemeral",
        format!(
            "{} pages, {} of {} quota",
            s.ephemeral_pages,
            format::bytes(s.ephemeral_bytes),
            i.config.ephemeral_quota
        ),
    );
    f.add(
        "special pages",
        format!(
            "zero {}, same-filled {}, deduplicated {}, reserved {}",
            s.zero_pages, s.same_filled_pages, s.deduplicated_pages, s.reserved_pages
        ),
    );
    f.add(
        "puts",
        format!(
            "{} (stored {}, dedup hits {}; refused: no space {}, quota {}, frozen {}, other {})",
            c.puts,
            c.puts_stored,
            c.dedup_hits,
            c.puts_refused_no_space,
            c.puts_refused_quota,
            c.puts_refused_frozen,
            c.puts_refused_other
        ),
    );
    f.add(
        "gets",
        format!(
            "{} (hits {}, misses {}, hit rate {})",
            c.gets,
            c.get_hits,
            c.get_misses,
            format::fraction(hit_rate(c))
        ),
    );
    f.add(
        "flushes",
        format!("pages {}, objects {}", c.flush_pages, c.flush_objects),
    );
    f.add("evictions", c.evictions.to_string());
    f.add(
        "bytes",
        format!(
            "{} put, {} stored after compression",
            format::bytes(c.bytes_in),
            format::bytes(c.bytes_stored)
        ),
    );
    f.add(
        "device",
        format!(
            "chains {}, ops {}, invalid ops {}, rejected chains {}, dropped chains {}\n\
             chains with GETs {}, {:.1} GETs each\n\
             kicks {}, notifications {}, poll hits {}, poll misses {}, polling CPU {:.3} ms\n\
             {} from the guest, {} to the guest\n\
             device states sent {}, taken {}, failed {}",
            dev.chains,
            dev.ops,
            dev.invalid_ops,
            dev.rejected_chains,
            dev.dropped_chains,
            dev.get_chains,
            dev.get_ops as f64 / dev.get_chains.max(1) as f64,
            dev.kicks,
            dev.notifications,
            dev.poll_hits,
            dev.poll_misses,
            dev.poll_us as f64 / 1000.0,
            format::bytes(dev.bytes_from_guest),
            format::bytes(dev.bytes_to_guest),
            dev.state_exports,
            dev.state_imports,
            dev.state_failures
        ),
    );
    let mut out = format!("{}\n{}", i.name, f.render(2));
    if s.pools.is_empty() {
        out.push_str("\nno pools\n");
    } else {
        let pools: Vec<_> = s.pools.iter().map(|p| ("", p)).collect();
        out.push('\n');
        out.push_str(&pools_table(&pools, false).render());
    }
    out
}

/// One `top` frame (without the screen-clearing escape).
pub fn top(a: &Activity, interval: f64) -> String {
    let mut out = format!(
        "vtmemctl top: every {interval:.1} s; host {} of {} used ({}), {} pages; \
         {} puts/s, {} gets/s, {} evictions/s\n\n",
        format::bytes(a.host_used),
        format::bytes(a.host_limit),
        format::percent(a.host_used, a.host_limit),
        a.stored_pages,
        format::rate(a.puts_per_sec),
        format::rate(a.gets_per_sec),
        format::rate(a.evictions_per_sec),
    );
    let mut t = Table::new(&[
        ("VM", Align::Left),
        ("CONN", Align::Left),
        ("STATE", Align::Left),
        ("PUTS/S", Align::Right),
        ("GETS/S", Align::Right),
        ("HIT RATE", Align::Right),
        ("EVICT/S", Align::Right),
        ("REFUSED/S", Align::Right),
        ("IN/S", Align::Right),
        ("PAGES", Align::Right),
        ("PERSISTENT", Align::Right),
        ("EPHEMERAL", Align::Right),
    ]);
    for v in &a.vms {
        t.row(vec![
            v.name.clone(),
            v.connected.map_or("-", format::yes_no).to_string(),
            if v.frozen { "frozen" } else { "active" }.to_string(),
            format::rate(v.puts_per_sec),
            format::rate(v.gets_per_sec),
            format::fraction(v.hit_rate),
            format::rate(v.evictions_per_sec),
            format::rate(v.refused_per_sec),
            format::byte_rate(v.bytes_in_per_sec),
            v.pages.to_string(),
            format::bytes(v.persistent_bytes),
            format::bytes(v.ephemeral_bytes),
        ]);
    }
    if a.vms.is_empty() {
        out.push_str("no VMs\n");
    } else {
        out.push_str(&t.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VmActivity;
    use vtmem_api::{OpCounters, VmInfo, VmSpec};

    fn details(name: &str, stats: ClientStats) -> VmDetails {
        VmDetails {
            info: VmInfo {
                name: name.parse().unwrap(),
                socket: format!("/run/vtmem/{name}.sock").into(),
                connected: true,
                connections: 1,
                frozen: false,
                config: format!("{name},persistent-quota=512M")
                    .parse::<VmSpec>()
                    .unwrap(),
            },
            device: Default::default(),
            stats,
        }
    }

    fn stats(name: &str) -> ClientStats {
        ClientStats {
            name: name.into(),
            persistent_pages: 3,
            persistent_bytes: 12288,
            frozen: true,
            counters: OpCounters {
                gets: 4,
                get_hits: 3,
                get_misses: 1,
                puts_refused_quota: 2,
                ..Default::default()
            },
            pools: vec![PoolStats {
                id: 0,
                persistent: true,
                pages: 3,
                bytes: 12288,
                owned: true,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn list_rows_and_pools() {
        let idle = ClientStats {
            name: "vm2".into(),
            ..Default::default()
        };
        let out = list(&[details("vm1", stats("vm1")), details("vm2", idle)]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAME  CONN  STATE"), "{out}");
        assert!(lines[1].contains("frozen"), "{out}");
        assert!(lines[1].contains("512.0 MiB"), "{out}");
        assert!(lines[1].contains("unlimited"), "{out}");
        assert!(lines[1].contains("12.0 KiB"), "{out}");
        assert!(lines[1].contains("75.00%"), "{out}");
        assert!(lines[1].ends_with("0/2/0/0"), "{out}");
        assert!(lines[2].starts_with("vm2"), "{out}");
        assert!(lines[2].ends_with(" 0/0/0/0"), "{out}");
        assert_eq!(lines[3], "");
        assert!(lines[4].starts_with("VM   POOL  KIND"), "{out}");
        assert!(lines[5].contains("persistent"), "{out}");
        assert_eq!(list(&[]), "no VMs\n");
    }

    #[test]
    fn show_fields() {
        let out = show(&details("vm1", stats("vm1")));
        assert!(out.starts_with("vm1\n  socket:"), "{out}");
        assert!(out.contains("frozen (puts refused)"), "{out}");
        assert!(out.contains("authorized UUIDs:  none"), "{out}");
        assert!(
            out.contains("3 pages, 12.0 KiB of 512.0 MiB quota"),
            "{out}"
        );
        assert!(out.contains("hit rate 75.00%"), "{out}");
    }

    #[test]
    fn status_fields() {
        let s = StoreStats {
            host_limit: 1 << 30,
            host_used: 1 << 20,
            compression_ratio: 2.5,
            dedup_ratio: 1.0,
            ..Default::default()
        };
        let out = status(
            &s,
            Some(EvictionRate {
                per_sec: 2.0,
                over_secs: 0.5,
            }),
            Some(3725.0),
            None,
        );
        assert!(out.contains("uptime:             1h 02m 05s"), "{out}");
        assert!(!out.contains("state directory"), "{out}");
        assert!(out.contains("host limit:         1.0 GiB"), "{out}");
        assert!(out.contains("1.0 MiB (0.10% of the limit)"), "{out}");
        assert!(out.contains("compression ratio:  2.50"), "{out}");
        assert!(out.contains("dedup ratio:        1.00"), "{out}");
        assert!(out.contains("2.0/s (sampled over 0.50 s"), "{out}");
        assert!(status(&s, None, None, None).contains("rate not sampled"));
        assert!(status(&s, None, Some(10.0), None).contains("on average since vtmemd started"));
        let r = Recovery {
            vms: 2,
            pools: 3,
            pages: 4096,
            bytes: 5 << 20,
            seconds: 0.25,
        };
        let dir = |recovered| {
            Some(StateDirInfo {
                dir: "/var/lib/vtmem",
                recovered,
            })
        };
        let out = status(&s, None, None, dir(Some(&r)));
        assert!(
            out.contains("state directory:     /var/lib/vtmem\n"),
            "{out}"
        );
        assert!(
            out.contains("4096 persistent pages of 2 VM(s) (3 pools, 5.0 MiB of state) in 0.250 s"),
            "{out}"
        );
        assert!(status(&s, None, None, dir(None)).contains("recovered at start:  nothing"));
    }

    #[test]
    fn top_frame() {
        let a = Activity {
            interval_secs: 1.0,
            host_limit: 1 << 30,
            host_used: 0,
            stored_pages: 0,
            evictions_per_sec: 0.0,
            puts_per_sec: 5.0,
            gets_per_sec: 0.0,
            vms: vec![VmActivity {
                name: "vm1".into(),
                connected: Some(false),
                frozen: false,
                puts_per_sec: 5.0,
                gets_per_sec: 0.0,
                hit_rate: None,
                evictions_per_sec: 0.0,
                refused_per_sec: 0.0,
                bytes_in_per_sec: 20480.0,
                persistent_bytes: 0,
                ephemeral_bytes: 0,
                pages: 0,
            }],
        };
        let out = top(&a, 1.0);
        assert!(out.starts_with("vtmemctl top: every 1.0 s"), "{out}");
        assert!(out.contains("VM   CONN  STATE"), "{out}");
        assert!(out.contains("20.0 KiB/s"), "{out}");
    }
}
