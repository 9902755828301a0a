// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Quotas, the host limit, freezing and reservations under floods of puts
//! from several queues and VMs, checked through the control socket while
//! the flood runs; every refusal must carry its reason.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::guest::*;
use common::*;
use vtmem_api::{ByteSize, ClientStats, Quota, Request, StatusReport};
use vtmem_guestsim::{Error, PoolSpec, Status, Vm, VmOptions, PAGE_SIZE};

const QUOTA: u64 = 1 << 20;
/// Upper bound of what one incompressible page is charged (data plus
/// per-page metadata): used only to say "no room for one more page".
const MAX_PAGE_CHARGE: u64 = 2 * PAGE_SIZE as u64;

/// Polls `status` until stopped; checks `check` on every sample; returns
/// the number of samples.
fn monitor(
    d: &Vtmemd,
    check: impl Fn(&StatusReport) + Send + 'static,
) -> (Arc<AtomicBool>, thread::JoinHandle<usize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let mut ctl = d.control();
    let t = thread::spawn(move || {
        let mut n = 0;
        while !stop2.load(Ordering::Relaxed) {
            check(&ctl.call_as(&Request::Status {}).unwrap());
            n += 1;
            thread::sleep(Duration::from_millis(1));
        }
        n
    });
    (stop, t)
}

fn client<'a>(status: &'a StatusReport, name: &str) -> &'a ClientStats {
    status
        .store
        .clients
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no client {name} in {status:?}"))
}

/// Puts `n` fresh pages of object `obj` on queue `q`; returns (statuses, pages).
fn flood(
    vm: &Vm,
    q: usize,
    pool: u32,
    obj: u64,
    n: usize,
) -> (Vec<Status>, Vec<Box<[u8; PAGE_SIZE]>>) {
    let data = pages(obj * 7 + pool as u64, n);
    let st = vm.queue(q).put_batch(&items(pool, obj, &data)).unwrap();
    (st, data)
}

#[test]
fn persistent_quota_holds_exactly_under_a_flood() {
    let d = daemon(
        &["q,persistent-quota=1M"],
        &["--queues", "2", "--host-limit", "64M"],
    );
    let vm = connect_with(
        &d,
        "q",
        VmOptions {
            queues: 2,
            ..VmOptions::default()
        },
    );
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let (stop, mon) = monitor(&d, |s| {
        let c = client(s, "q");
        let bytes = c.persistent_bytes;
        assert!(bytes <= QUOTA, "quota overshot during the flood: {bytes}");
    });
    // 2 x 300 incompressible pages (2.4 MiB) against a 1 MiB quota, from
    // two queues at once.
    let results: Vec<_> = thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|q| {
                let vm = &vm;
                s.spawn(move || flood(vm, q, pool, q as u64 + 1, 300))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    stop.store(true, Ordering::Relaxed);
    assert!(mon.join().unwrap() > 0);

    let mut accepted = Vec::new();
    for (q, (st, data)) in results.iter().enumerate() {
        for (i, s) in st.iter().enumerate() {
            match s {
                Status::Ok => accepted.push((q as u64 + 1, i, &data[i])),
                Status::OverQuota => {}
                other => panic!("refused put says {other}, not over_quota"),
            }
        }
    }
    let c = d.client_stats("q");
    let bytes = c.persistent_bytes;
    assert_eq!(c.persistent_pages, accepted.len() as u64);
    eprintln!(
        "quota {QUOTA}: {} pages accepted, {bytes} bytes charged",
        accepted.len()
    );
    assert!(bytes <= QUOTA, "{bytes} > quota");
    assert!(
        QUOTA - bytes < MAX_PAGE_CHARGE,
        "quota not used up: {bytes} of {QUOTA}"
    );
    assert!(
        accepted.len() > 200 && accepted.len() <= 256,
        "{} pages accepted",
        accepted.len()
    );

    // Every accepted page is intact.
    for (obj, i, data) in &accepted {
        let (s, p) = &vm.get_batch(&[handle(pool, *obj, *i as u64)]).unwrap()[0];
        assert_eq!(*s, Status::Ok);
        assert_eq!(checksum(p), checksum(data));
    }
    // A refused put dropped any older data at that handle: a put that
    // replaces an accepted page with new content while the quota is full
    // must not leave the old page readable.
    let (obj, i, _) = accepted[0];
    let fresh = pages(999, 1);
    let st = vm
        .put_batch(&[(handle(pool, obj, i as u64), &*fresh[0])])
        .unwrap()[0];
    let (g, p) = &vm.get_batch(&[handle(pool, obj, i as u64)]).unwrap()[0];
    match st {
        Status::Ok => assert_eq!(checksum(p), checksum(&fresh[0])),
        _ => assert_eq!(*g, Status::Miss, "refused replacement left old data"),
    }

    // Flushing frees quota for as many pages.
    let flush: Vec<_> = accepted[1..11]
        .iter()
        .map(|(o, i, _)| handle(pool, *o, *i as u64))
        .collect();
    assert!(vm
        .flush_pages(&flush)
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
    let (st, _) = flood(&vm, 0, pool, 50, 12);
    let ok = st.iter().filter(|s| **s == Status::Ok).count();
    assert!(
        (10..=11).contains(&ok),
        "{ok} puts fit after flushing 10: {st:?}"
    );

    // Lowering the quota keeps persistent pages but refuses new ones.
    let before = d.client_stats("q").persistent_pages;
    d.call(&Request::SetQuota {
        vm: "q".parse().unwrap(),
        persistent: Some(Quota::Limited(ByteSize(QUOTA / 2))),
        ephemeral: None,
    });
    let (st, _) = flood(&vm, 1, pool, 60, 4);
    assert!(st.iter().all(|s| *s == Status::OverQuota), "{st:?}");
    assert_eq!(d.client_stats("q").persistent_pages, before);
    assert_alive(&d);
}

#[test]
fn host_limit_holds_exactly_and_refusals_say_no_space() {
    let d = daemon(&["h1", "h2"], &["--host-limit", "2M"]);
    let limit = 2u64 << 20;
    let (v1, v2) = (connect(&d, "h1"), connect(&d, "h2"));
    let (p1, p2) = (
        v1.new_pool(PoolSpec::persistent()).unwrap(),
        v2.new_pool(PoolSpec::persistent()).unwrap(),
    );
    let (stop, mon) = monitor(&d, move |s| {
        let used = s.store.host_used;
        assert!(
            used <= limit,
            "host limit overshot during the flood: {used}"
        );
    });
    // 2 x 400 pages (3.2 MiB) against 2 MiB, two VMs at once.
    let (r1, r2) = thread::scope(|s| {
        let a = s.spawn(|| flood(&v1, 0, p1, 1, 400));
        let b = s.spawn(|| flood(&v2, 0, p2, 2, 400));
        (a.join().unwrap(), b.join().unwrap())
    });
    stop.store(true, Ordering::Relaxed);
    mon.join().unwrap();
    let mut ok = 0;
    for (st, _) in [&r1, &r2] {
        for s in st {
            match s {
                Status::Ok => ok += 1,
                Status::NoSpace => {}
                other => panic!("refused persistent put says {other}, not no_space"),
            }
        }
    }
    let st = d.status();
    let used = st.store.host_used;
    assert_eq!(st.store.host_limit, limit);
    eprintln!("host limit {limit}: {ok} pages accepted, host_used {used}");
    assert!(
        used <= limit && limit - used < MAX_PAGE_CHARGE,
        "host_used {used} of {limit}"
    );
    let held: u64 = ["h1", "h2"]
        .iter()
        .map(|n| client(&st, n).persistent_pages)
        .sum();
    assert_eq!(held, ok, "accepted puts vs pages held");
    // Both VMs got a share: one cannot starve the other out entirely in a
    // concurrent flood (a weak check, but a lock-order bug would show).
    assert!(r1.0.contains(&Status::Ok) && r2.0.contains(&Status::Ok));

    // Ephemeral puts never fail for space: they evict instead.
    assert_eq!(v1.destroy_pool(p1).unwrap(), Status::Ok);
    assert_eq!(v2.destroy_pool(p2).unwrap(), Status::Ok);
    let e = v1.new_pool(PoolSpec::ephemeral()).unwrap();
    let (st, data) = flood(&v1, 0, e, 3, 1000);
    assert!(
        st.iter().all(|s| *s == Status::Ok),
        "ephemeral puts refused: {:?}",
        st.iter().find(|s| **s != Status::Ok)
    );
    let used = d.status().store.host_used;
    assert!(used <= limit, "host_used {used} after the ephemeral flood");
    let hs: Vec<_> = (0..1000).map(|i| handle(e, 3, i)).collect();
    let mut hits = 0;
    for (i, (s, p)) in v1.get_batch(&hs).unwrap().iter().enumerate() {
        if *s == Status::Ok {
            hits += 1;
            assert_eq!(checksum(p), checksum(&data[i]), "ephemeral page {i}");
        }
    }
    assert!(
        hits > 0 && hits < 1000,
        "{hits} ephemeral hits of 1000 in 2 MiB"
    );
    assert_alive(&d);
}

#[test]
fn frozen_vm_is_refused_puts_but_keeps_gets_and_reservations() {
    let d = daemon(&["f"], &[]);
    let vm = connect(&d, "f");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let data = pages(5, 16);
    assert!(vm
        .put_batch(&items(pool, 1, &data[..8]))
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
    assert_eq!(vm.reserve(pool, 3).unwrap(), 3);

    d.call(&Request::Freeze {
        vm: "f".parse().unwrap(),
    });
    let st = vm.put_batch(&items(pool, 2, &data[8..12])).unwrap();
    assert!(st.iter().all(|s| *s == Status::Frozen), "{st:?}");
    let hs: Vec<_> = (0..8).map(|i| handle(pool, 1, i)).collect();
    for (i, (s, p)) in vm.get_batch(&hs).unwrap().iter().enumerate() {
        assert_eq!(*s, Status::Ok);
        assert_eq!(checksum(p), checksum(&data[i]));
    }
    assert_eq!(vm.flush_page(handle(pool, 1, 0)).unwrap(), Status::Ok);
    // Reserved puts are never refused for being frozen, until the
    // reservation runs out.
    let st = vm
        .put_batch_reserved(&items(pool, 3, &data[12..16]))
        .unwrap();
    assert_eq!(
        st,
        vec![Status::Ok, Status::Ok, Status::Ok, Status::NoReservation]
    );
    let c = d.client_stats("f");
    assert!(c.frozen);
    assert!(c.counters.puts_refused_frozen >= 4, "{c:?}");

    d.call(&Request::Thaw {
        vm: "f".parse().unwrap(),
    });
    assert_eq!(
        vm.put_batch(&items(pool, 2, &data[8..9])).unwrap(),
        vec![Status::Ok]
    );
    assert_alive(&d);
}

#[test]
fn reserved_puts_succeed_with_the_quota_used_up() {
    let d = daemon(&["r,persistent-quota=256K"], &[]);
    let vm = connect(&d, "r");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    // Reservations are charged up front and capped by the quota.
    let granted = vm.reserve(pool, 10).unwrap();
    assert_eq!(granted, 10);
    assert!(vm.reserve(pool, 1000).unwrap() < 1000);
    assert_eq!(
        vm.unreserve(pool, 1000).unwrap(),
        0,
        "unreserve returns what is left"
    );
    assert_eq!(vm.reserve(pool, 10).unwrap(), 10);
    // Fill the rest of the quota.
    let (st, _) = flood(&vm, 0, pool, 1, 100);
    assert!(st.contains(&Status::OverQuota), "quota never reached");
    assert!(st
        .iter()
        .all(|s| matches!(s, Status::Ok | Status::OverQuota)));
    // The reservation still holds.
    let data = pages(8, 10);
    let st = vm.put_batch_reserved(&items(pool, 2, &data)).unwrap();
    assert!(st.iter().all(|s| *s == Status::Ok), "{st:?}");
    let hs: Vec<_> = (0..10).map(|i| handle(pool, 2, i)).collect();
    for (i, (s, p)) in vm.get_batch(&hs).unwrap().iter().enumerate() {
        assert_eq!(*s, Status::Ok);
        assert_eq!(checksum(p), checksum(&data[i]));
    }
    assert_eq!(vm.unreserve(pool, 1).unwrap(), 0);
    match vm.reserve(pool + 100, 1) {
        Err(Error::Status(Status::NoPool)) => {}
        other => panic!("reserve on a bad pool: {other:?}"),
    }
    assert_alive(&d);
}
