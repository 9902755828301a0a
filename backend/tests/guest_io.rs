// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Several simulated VMs on one real vtmemd at once, on several queues:
//! every persistent page accepted comes back intact, ephemeral gets may miss
//! but never return wrong data, flushes and replacements take effect, and
//! no VM sees another's pages.

mod common;

use std::thread;

use common::guest::*;
use common::*;
use vtmem_guestsim::{Error, ObjectId, Op, PoolSpec, Status, VmOptions};
use vtmem_protocol::Uuid;

const UUID: Uuid = Uuid::from_bytes([
    0x5e, 0x11, 0xd0, 0x0d, 0, 1, 0x40, 2, 0x80, 3, 4, 5, 6, 7, 8, 9,
])
.unwrap();
const UUID_TEXT: &str = "5e11d00d-0001-4002-8003-040506070809";

#[test]
fn several_vms_on_several_queues_keep_their_pages_apart() {
    let names = ["a", "b", "c", "d"];
    let d = daemon(&names, &["--queues", "2", "--host-limit", "256M"]);
    let opts = VmOptions {
        queues: 2,
        ..VmOptions::default()
    };
    let mut threads = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let vm = connect_with(&d, name, opts.clone());
        assert_eq!(vm.num_queues(), 2, "{name}: both queues in use");
        let seed = k as u64 * 16;
        threads.push(thread::spawn(move || {
            let pp = vm.new_pool(PoolSpec::persistent()).unwrap();
            let ep = vm.new_pool(PoolSpec::ephemeral()).unwrap();
            let obj1 = pages(seed + 1, 300);
            let obj2 = pages(seed + 2, 300);
            let eph = pages(seed + 3, 200);
            // Two queues driven from two threads at once, one object each
            // (the protocol orders operations per queue only).
            thread::scope(|s| {
                for (q, (obj, data)) in [(1u64, &obj1), (2u64, &obj2)].into_iter().enumerate() {
                    let vm = &vm;
                    s.spawn(move || {
                        let st = vm.queue(q).put_batch(&items(pp, obj, data)).unwrap();
                        assert!(st.iter().all(|s| *s == Status::Ok), "{st:?}");
                    });
                }
            });
            let st = vm.put_batch(&items(ep, 9, &eph)).unwrap();
            assert!(st.iter().all(|s| *s == Status::Ok), "ephemeral puts {st:?}");

            // Persistent: everything back, byte for byte.
            for (obj, data) in [(1u64, &obj1), (2u64, &obj2)] {
                let hs: Vec<_> = (0..data.len() as u64).map(|i| handle(pp, obj, i)).collect();
                for (i, (s, p)) in vm.get_batch(&hs).unwrap().iter().enumerate() {
                    assert_eq!(*s, Status::Ok, "persistent {obj}/{i}");
                    assert_eq!(checksum(p), checksum(&data[i]), "persistent {obj}/{i}");
                }
            }
            // Ephemeral: hits must be right; private ephemeral gets are
            // exclusive, so a second get of a hit misses.
            let hs: Vec<_> = (0..eph.len() as u64).map(|i| handle(ep, 9, i)).collect();
            let first = vm.get_batch(&hs).unwrap();
            for (i, (s, p)) in first.iter().enumerate() {
                match s {
                    Status::Ok => assert_eq!(checksum(p), checksum(&eph[i]), "ephemeral {i}"),
                    Status::Miss => {}
                    other => panic!("ephemeral get {i}: {other}"),
                }
            }
            for (s, _) in vm.get_batch(&hs).unwrap() {
                assert_eq!(s, Status::Miss, "exclusive get left the page behind");
            }

            // Flush one page, one object; replace one page.
            assert_eq!(vm.flush_page(handle(pp, 1, 0)).unwrap(), Status::Ok);
            assert_eq!(
                vm.flush_object(pp, ObjectId([2, 0, 0])).unwrap(),
                Status::Ok
            );
            let newer = Box::new(random_page(seed + 99));
            assert_eq!(
                vm.put_batch(&[(handle(pp, 1, 5), &*newer)]).unwrap(),
                vec![Status::Ok]
            );
            let got = vm
                .get_batch(&[
                    handle(pp, 1, 0),
                    handle(pp, 1, 1),
                    handle(pp, 2, 7),
                    handle(pp, 1, 5),
                ])
                .unwrap();
            assert_eq!(got[0].0, Status::Miss, "flushed page");
            assert_eq!(got[1].0, Status::Ok);
            assert_eq!(checksum(&got[1].1), checksum(&obj1[1]));
            assert_eq!(got[2].0, Status::Miss, "page of a flushed object");
            assert_eq!(got[3].0, Status::Ok);
            assert_eq!(checksum(&got[3].1), checksum(&newer), "replaced page");
            (vm, pp)
        }));
    }
    let vms: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();

    // The store agrees: 299 persistent pages per VM (300 - 1 flushed; the
    // flushed object's 300 are gone).
    for name in names {
        let c = d.client_stats(name);
        assert_eq!(Some(c.persistent_pages), Some(299), "{name}: {c:?}");
    }
    for (vm, pp) in &vms {
        assert_eq!(vm.destroy_pool(*pp).unwrap(), Status::Ok);
        assert_eq!(
            vm.get_batch(&[handle(*pp, 1, 1)]).unwrap()[0].0,
            Status::NoPool
        );
    }
    assert_alive(&d);
}

#[test]
fn shared_pool_is_joined_by_authorised_vms_only() {
    let (s1, s2) = (
        format!("s1,auth={UUID_TEXT}"),
        format!("s2,auth={UUID_TEXT}"),
    );
    let d = daemon(&[&s1, &s2, "s3"], &[]);
    let (v1, v2, v3) = (connect(&d, "s1"), connect(&d, "s2"), connect(&d, "s3"));
    let p1 = v1.new_pool(PoolSpec::shared(UUID)).unwrap();
    let p2 = v2.new_pool(PoolSpec::shared(UUID)).unwrap();
    match v3.new_pool(PoolSpec::shared(UUID)) {
        Err(Error::Status(Status::NotAuthorized)) => {}
        other => panic!("unauthorised join: {other:?}"),
    }
    let data = pages(77, 64);
    let st = v1.put_batch(&items(p1, 3, &data)).unwrap();
    assert!(st.iter().all(|s| *s == Status::Ok));
    // The other member sees the pages (or misses: the pool is ephemeral),
    // and shared gets keep them.
    let hs: Vec<_> = (0..64).map(|i| handle(p2, 3, i)).collect();
    for round in 0..2 {
        let mut hits = 0;
        for (i, (s, p)) in v2.get_batch(&hs).unwrap().iter().enumerate() {
            match s {
                Status::Ok => {
                    hits += 1;
                    assert_eq!(checksum(p), checksum(&data[i]), "shared page {i}");
                }
                Status::Miss => {}
                other => panic!("shared get: {other}"),
            }
        }
        assert!(hits > 0, "round {round}: nothing shared");
    }
    assert_alive(&d);
}

#[test]
fn ops_of_one_request_run_in_order() {
    let d = daemon(&["o"], &[]);
    let vm = connect(&d, "o");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let a = Box::new(random_page(1));
    let b = Box::new(random_page(2));
    // PUT a, GET, PUT b, GET, FLUSH, GET in one request.
    let hh = handle(pool, 1, 1);
    let ops = [
        Op::Put {
            handle: hh,
            reserved: false,
        },
        Op::Get { handle: hh },
        Op::Put {
            handle: hh,
            reserved: false,
        },
        Op::Get { handle: hh },
        Op::FlushPage { handle: hh },
        Op::Get { handle: hh },
    ];
    let c = vm.queue(0).execute(&ops, &[&*a, &*b]).unwrap();
    let st = c.statuses().unwrap();
    assert_eq!(
        st,
        vec![
            Status::Ok,
            Status::Ok,
            Status::Ok,
            Status::Ok,
            Status::Ok,
            Status::Miss
        ]
    );
    assert_eq!(checksum(c.pages[1].as_ref().unwrap()), checksum(&a));
    assert_eq!(checksum(c.pages[3].as_ref().unwrap()), checksum(&b));
    assert!(c.pages[5].is_none());
}

#[test]
fn config_space_and_queue_count_follow_the_daemon() {
    let d = daemon(&["mq"], &["--queues", "3"]);
    let vm = connect_with(
        &d,
        "mq",
        VmOptions {
            queues: 8,
            ..VmOptions::default()
        },
    );
    let n = vm.negotiated();
    assert_eq!(n.backend_queues, 3, "GET_QUEUE_NUM");
    assert_eq!(n.config.num_request_queues, 3);
    assert_eq!(n.config.max_ops_per_request, 128);
    assert_eq!(n.config.max_pools, 16);
    assert_eq!(vm.num_queues(), 3, "a driver uses what the device offers");
    for bit in [
        vtmem_protocol::VTMEM_F_EPHEMERAL,
        vtmem_protocol::VTMEM_F_SHARED,
        vtmem_protocol::VTMEM_F_MQ,
        vtmem_protocol::VTMEM_F_RESERVE,
        vtmem_guestsim::vm::VIRTIO_F_VERSION_1,
        vtmem_guestsim::vm::VIRTIO_RING_F_EVENT_IDX,
        vtmem_guestsim::vm::VIRTIO_RING_F_INDIRECT_DESC,
    ] {
        assert!(n.has(bit), "feature bit {bit} not offered");
    }
    // Every queue serves requests, and all see the same pools.
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    for q in 0..3 {
        let p = Box::new(random_page(q as u64));
        let st = vm
            .queue(q)
            .put_batch(&[(handle(pool, 5, q as u64), &*p)])
            .unwrap();
        assert_eq!(st, vec![Status::Ok], "queue {q}");
        let got = vm
            .queue((q + 1) % 3)
            .get_batch(&[handle(pool, 5, q as u64)])
            .unwrap();
        assert_eq!(checksum(&got[0].1), checksum(&p));
    }
}

#[test]
fn plain_rings_without_event_idx_or_indirect_work() {
    let d = daemon(&["plain"], &[]);
    let vm = connect_with(
        &d,
        "plain",
        VmOptions {
            event_idx: false,
            indirect: false,
            ..VmOptions::default()
        },
    );
    let n = vm.negotiated();
    assert!(!n.has(vtmem_guestsim::vm::VIRTIO_RING_F_EVENT_IDX));
    assert!(!n.has(vtmem_guestsim::vm::VIRTIO_RING_F_INDIRECT_DESC));
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let data = pages(11, 600);
    let st = vm.put_batch(&items(pool, 1, &data)).unwrap();
    assert!(st.iter().all(|s| *s == Status::Ok));
    let hs: Vec<_> = (0..600).map(|i| handle(pool, 1, i)).collect();
    for (i, (s, p)) in vm.get_batch(&hs).unwrap().iter().enumerate() {
        assert_eq!(*s, Status::Ok);
        assert_eq!(checksum(p), checksum(&data[i]));
    }
    let s = vm.stats();
    assert!(s.kicks <= s.requests, "{s:?}");
}

#[test]
fn small_ring_with_indirect_tables_carries_full_batches() {
    let d = daemon(&["small"], &[]);
    let vm = connect_with(
        &d,
        "small",
        VmOptions {
            queue_size: 16,
            ..VmOptions::default()
        },
    );
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let data = pages(12, 128 * 4);
    let st = vm.put_batch(&items(pool, 1, &data)).unwrap();
    assert!(st.iter().all(|s| *s == Status::Ok));
    let hs: Vec<_> = (0..128).map(|i| handle(pool, 1, i)).collect();
    let got = vm.get_batch(&hs).unwrap();
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, (s, p))| *s == Status::Ok && checksum(p) == checksum(&data[i])));
}

#[test]
fn operations_of_features_not_negotiated_are_unsupported() {
    let d = daemon(&[&format!("bare,auth={UUID_TEXT}")], &[]);
    let vm = connect_with(
        &d,
        "bare",
        VmOptions {
            device_features: 0,
            ..VmOptions::default()
        },
    );
    for spec in [PoolSpec::ephemeral(), PoolSpec::shared(UUID)] {
        match vm.new_pool(spec) {
            Err(Error::Status(Status::Unsupported)) => {}
            other => panic!("{spec:?} without its feature: {other:?}"),
        }
    }
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    match vm.reserve(pool, 1) {
        Err(Error::Status(Status::Unsupported)) => {}
        other => panic!("RESERVE without VTMEM_F_RESERVE: {other:?}"),
    }
    let p = Box::new(random_page(3));
    let st = vm.put_batch_reserved(&[(handle(pool, 1, 1), &*p)]).unwrap();
    assert_eq!(st, vec![Status::Unsupported]);
    assert_eq!(
        vm.put_batch(&[(handle(pool, 1, 1), &*p)]).unwrap(),
        vec![Status::Ok]
    );
}

#[test]
fn ephemeral_pages_under_eviction_pressure_are_never_wrong() {
    // Four VMs (two sharing a dedup group and half their content) flood
    // ephemeral pools through a 3 MiB host limit, so evictions race the
    // gets; every hit must carry exactly the data put under that handle.
    let d = daemon(
        &["e1,dedup-group=g", "e2,dedup-group=g", "e3", "e4"],
        &["--host-limit", "3M"],
    );
    let content = |vm: u64, round: u64, i: u64| {
        // e1 and e2 store the same content for even indices.
        let owner = if i % 2 == 0 && vm < 2 { 0 } else { vm };
        Box::new(random_page(owner << 40 | round << 20 | i))
    };
    let mut threads = Vec::new();
    for v in 0..4u64 {
        let vm = connect(&d, &format!("e{}", v + 1));
        threads.push(thread::spawn(move || {
            let pool = vm.new_pool(PoolSpec::ephemeral()).unwrap();
            let (mut hits, mut misses, mut refused) = (0u64, 0u64, 0u64);
            let mut check = |r: u64, obj: u64, n: u64| {
                let hs: Vec<_> = (0..n).map(|i| handle(pool, r * 2 + obj, i)).collect();
                for (i, (s, p)) in vm.get_batch(&hs).unwrap().iter().enumerate() {
                    match s {
                        Status::Ok => {
                            hits += 1;
                            let want = content(v, r * 2 + obj, i as u64);
                            assert_eq!(
                                checksum(p),
                                checksum(&want),
                                "vm {v} round {r} object {obj} page {i}: wrong data"
                            );
                        }
                        Status::Miss => misses += 1,
                        other => panic!("ephemeral get: {other}"),
                    }
                }
            };
            for round in 0..10u64 {
                // Object 0 (128 pages) is read at once, object 1 (64 pages)
                // at the end: 10 MiB put through 3 MiB, evictions certain.
                for (obj, n) in [(0u64, 128u64), (1, 64)] {
                    let data: Vec<_> = (0..n).map(|i| content(v, round * 2 + obj, i)).collect();
                    let st = vm.put_batch(&items(pool, round * 2 + obj, &data)).unwrap();
                    for x in &st {
                        match x {
                            Status::Ok => {}
                            // Should not happen (ephemeral puts evict), but
                            // racing evictions can give up: counted, not
                            // wrong data.
                            Status::NoSpace => refused += 1,
                            other => panic!("ephemeral put refused: {other}"),
                        }
                    }
                }
                check(round, 0, 128);
            }
            for round in 0..10u64 {
                check(round, 1, 64);
            }
            (hits, misses, refused)
        }));
    }
    let (mut hits, mut misses, mut refused) = (0, 0, 0);
    for t in threads {
        let (h, m, r) = t.join().unwrap();
        hits += h;
        misses += m;
        refused += r;
    }
    let evictions = d.status().store.counters.evictions;
    eprintln!("ephemeral pressure: {hits} hits, {misses} misses, {evictions} evictions, {refused} puts refused");
    assert!(hits > 0 && evictions > 0, "no eviction pressure");
    assert!(
        refused * 100 <= 4 * 10 * 192,
        "{refused} ephemeral puts refused for space"
    );
    let used = d.status().store.host_used;
    assert!(used <= 3 << 20, "host_used {used}");
    assert_alive(&d);
}
