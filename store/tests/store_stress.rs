// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Multi-threaded stress: many clients on several threads, checksummed
//! pages, limits watched throughout, every persistent page verified.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use vtmem_store::*;
use vtmem_testkit::{handle, Rng};
use xxhash_rust::xxh3::xxh3_64;

const CLIENTS: usize = 6;
const WORKERS_PER_CLIENT: usize = 2;
const OPS_PER_WORKER: u64 = 2500;
const HOST_LIMIT: u64 = 3 << 19;
const SHARED: Uuid = Uuid::from_bytes([0xC3; 16]).unwrap();

/// Deterministic content of (client, pool, object, index, version).
///
/// Most pages carry a header naming their handle and version and a checksum
/// of the body; some are zero, same-filled, or a body shared by many
/// handles (dedup).
fn page(client: u64, pool: u64, obj: u64, idx: u64, ver: u64) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    let seed = xxh3_64(&[client, pool, obj, idx, ver].map(u64::to_le_bytes).concat());
    match ver % 11 {
        0 => return p,
        1 => {
            let w = (seed | 1).to_le_bytes();
            for c in p.chunks_exact_mut(8) {
                c.copy_from_slice(&w);
            }
            return p;
        }
        2 => {
            // Same bytes for every handle with this version class.
            for (i, b) in p.iter_mut().enumerate() {
                *b = (i % 97) as u8;
            }
            return p;
        }
        _ => {}
    }
    if ver % 3 == 0 {
        Rng::new(seed).fill(&mut p[48..]);
    } else {
        let words = b"pages swapped out by a busy guest, compressible text ";
        for (i, b) in p[48..].iter_mut().enumerate() {
            *b = words[(i + seed as usize % 31) % words.len()];
        }
    }
    for (k, v) in [client, pool, obj, idx, ver].iter().enumerate() {
        p[k * 8..k * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    let sum = xxh3_64(&p[48..]);
    p[40..48].copy_from_slice(&sum.to_le_bytes());
    p
}

/// For a page with a header: (client, pool, obj, idx, version) if the
/// checksum holds.
fn header(p: &Page) -> Option<[u64; 5]> {
    let rd = |k: usize| u64::from_le_bytes(p[k * 8..k * 8 + 8].try_into().unwrap());
    (rd(5) == xxh3_64(&p[48..])).then(|| [rd(0), rd(1), rd(2), rd(3), rd(4)])
}

#[derive(Default)]
struct Tally {
    puts: u64,
    refused: u64,
    hits: u64,
    reserved_puts: u64,
}

/// One worker: owns objects `2 * w` and `2 * w + 1` of its client's pools,
/// so it knows what every one of its handles must hold.
fn worker(c: &DataHandle, client_no: u64, w: u64, seed: u64, stop_err: &AtomicBool) -> Tally {
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    // pool 0 persistent, pool 1 ephemeral, pool 2 persistent with reservations
    let mut expect: HashMap<(u32, u64, u64), u64> = HashMap::new();
    let mut out = [0u8; PAGE_SIZE];
    for op in 0..OPS_PER_WORKER {
        if stop_err.load(Ordering::Relaxed) {
            break;
        }
        let pool = [0u32, 0, 1, 1, 1, 2][rng.below(6) as usize];
        let obj = 2 * w + rng.below(2);
        let idx = rng.below(96);
        let key = (pool, obj, idx);
        let h = handle(pool, obj, idx);
        match rng.below(10) {
            0..=4 => {
                let ver = op * 16 + rng.below(16);
                let data = page(client_no, pool as u64, obj, idx, ver);
                let reserved = pool == 2;
                if reserved && c.reserve(2, 1) != Ok(1) {
                    // Host or quota full: plain put instead, which may be refused.
                    match c.put(&h, &data, false) {
                        Ok(()) => {
                            expect.insert(key, ver);
                        }
                        Err(_) => {
                            expect.remove(&key);
                            tally.refused += 1;
                        }
                    }
                    continue;
                }
                tally.puts += 1;
                match c.put(&h, &data, reserved) {
                    Ok(()) => {
                        tally.reserved_puts += reserved as u64;
                        expect.insert(key, ver);
                    }
                    Err(e) => {
                        assert!(!reserved, "reserved put refused: {e:?}");
                        assert!(
                            matches!(e, TmemError::NoSpace | TmemError::OverQuota),
                            "{e:?}"
                        );
                        expect.remove(&key);
                        tally.refused += 1;
                    }
                }
            }
            5..=7 => {
                let hit = c.get(&h, &mut out).unwrap();
                match (hit, expect.get(&key)) {
                    (true, Some(&ver)) => {
                        tally.hits += 1;
                        let want = page(client_no, pool as u64, obj, idx, ver);
                        assert!(out == want, "wrong data at {key:?}");
                        if pool == 1 {
                            expect.remove(&key); // exclusive
                        }
                    }
                    (true, None) => panic!("hit without a put at {key:?}"),
                    (false, Some(_)) => {
                        assert_eq!(pool, 1, "persistent page lost at {key:?}");
                        expect.remove(&key);
                    }
                    (false, None) => {}
                }
            }
            8 => {
                c.flush_page(&h).unwrap();
                expect.remove(&key);
            }
            _ => {
                if rng.below(20) == 0 {
                    c.flush_object(pool, &ObjectId([obj, 0, 0])).unwrap();
                    expect.retain(|&(p, o, _), _| !(p == pool && o == obj));
                }
            }
        }
    }
    // Every persistent page must be there, exactly.
    for (&(pool, obj, idx), &ver) in &expect {
        if pool == 1 {
            continue;
        }
        assert!(
            c.get(&handle(pool, obj, idx), &mut out).unwrap(),
            "persistent page lost at the end: {pool}/{obj}/{idx}"
        );
        assert!(out == page(client_no, pool as u64, obj, idx, ver));
    }
    tally
}

/// A hostile guest: several threads hammer the same few handles of one
/// pool with concurrent puts, gets and flushes. Whatever a get returns must
/// be a whole page that was put at that very handle.
fn hostile(c: &DataHandle, client_no: u64, pool: u32, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut out = [0u8; PAGE_SIZE];
    for op in 0..OPS_PER_WORKER {
        let idx = rng.below(4);
        let h = handle(pool, 999, idx);
        match rng.below(3) {
            0 => {
                // Version 5 mod 11: always a headed page.
                let ver = op * 11 + 5;
                let _ = c.put(&h, &page(client_no, pool as u64, 999, idx, ver), false);
            }
            1 => {
                if c.get(&h, &mut out).unwrap() {
                    let hd = header(&out).expect("torn or corrupt page");
                    assert_eq!(
                        hd[..4],
                        [client_no, pool as u64, 999, idx],
                        "another handle's data"
                    );
                }
            }
            _ => c.flush_page(&h).unwrap(),
        }
    }
}

#[test]
fn many_clients_many_threads() {
    let store = Store::new(StoreConfig {
        host_limit: HOST_LIMIT,
    });
    let per = RESERVED_PAGE_CLIENT_COST;
    let admins: Vec<AdminHandle> = (0..CLIENTS)
        .map(|i| {
            let cfg = ClientConfig {
                persistent_quota: if i % 3 == 0 { 40 * per } else { u64::MAX },
                ephemeral_quota: if i % 2 == 0 { 20 * per } else { u64::MAX },
                weight: 50 + 50 * i as u32,
                dedup_group: (i < 2).then(|| "pair".to_string()),
                authorized_uuids: vec![SHARED],
            };
            let admin = store.add_client(&format!("vm{i}"), cfg).unwrap();
            let c = admin.data();
            assert_eq!(c.new_pool(PoolSpec::persistent()), Ok(0));
            assert_eq!(c.new_pool(PoolSpec::ephemeral()), Ok(1));
            assert_eq!(c.new_pool(PoolSpec::persistent()), Ok(2));
            assert_eq!(c.new_pool(PoolSpec::shared(SHARED)), Ok(3));
            assert_eq!(c.new_pool(PoolSpec::persistent()), Ok(4));
            admin
        })
        .collect();
    let clients: Vec<DataHandle> = admins.iter().map(AdminHandle::data).collect();

    let done = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicU64::new(0));
    let threads = CLIENTS * WORKERS_PER_CLIENT + 2;
    let barrier = Arc::new(Barrier::new(threads + 2));
    thread::scope(|s| {
        // The watcher: limits hold at every moment it looks.
        let watcher = {
            let (store, done, samples, barrier) = (&store, &done, &samples, &barrier);
            let admins = &admins;
            s.spawn(move || {
                barrier.wait();
                while !done.load(Ordering::Relaxed) {
                    assert!(store.host_used() <= HOST_LIMIT, "host limit exceeded");
                    for (i, c) in admins.iter().enumerate() {
                        let st = c.stats();
                        if i % 2 == 0 {
                            assert!(st.ephemeral_bytes <= 20 * per, "eph quota of vm{i}");
                        }
                        if i % 3 == 0 {
                            assert!(st.persistent_charged <= 40 * per, "pers quota of vm{i}");
                        }
                    }
                    samples.fetch_add(1, Ordering::Relaxed);
                    thread::yield_now();
                }
            })
        };
        let mut workers = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            for w in 0..WORKERS_PER_CLIENT as u64 {
                let (barrier, failed) = (&barrier, &failed);
                workers.push(s.spawn(move || {
                    barrier.wait();
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        worker(c, i as u64, w, 0x1234_5678 + (i as u64) * 77 + w, failed)
                    }));
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    r.unwrap()
                }));
            }
        }
        // Two hostile threads on the same handles: one client's persistent
        // pool 4 and the shared pool.
        let hostiles: Vec<_> = [(4u32, 11u64), (3, 12)]
            .into_iter()
            .map(|(pool, seed)| {
                let (barrier, c) = (&barrier, &clients[0]);
                s.spawn(move || {
                    barrier.wait();
                    hostile(c, 0, pool, seed);
                })
            })
            .collect();
        barrier.wait();
        let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        let hostile_ok = hostiles.into_iter().all(|h| h.join().is_ok());
        done.store(true, Ordering::Relaxed);
        watcher.join().expect("a limit was exceeded");
        assert!(hostile_ok, "hostile thread saw bad data");
        let mut total = Tally::default();
        for r in results {
            let t = r.expect("worker failed");
            total.puts += t.puts;
            total.refused += t.refused;
            total.hits += t.hits;
            total.reserved_puts += t.reserved_puts;
        }
        eprintln!(
            "stress: {} puts, {} refused, {} reserved, {} hits",
            total.puts, total.refused, total.reserved_puts, total.hits
        );
        assert!(total.hits > 1000, "too few hits to mean anything");
        assert!(total.reserved_puts > 100);
        assert!(total.refused > 0, "limits never reached");
    });
    assert!(samples.load(Ordering::Relaxed) > 0);

    let st = store.stats();
    eprintln!(
        "stress: {} evictions, {} dedup hits, {} watcher samples",
        st.counters.evictions,
        st.counters.dedup_hits,
        samples.load(Ordering::Relaxed)
    );
    assert!(st.host_used <= HOST_LIMIT);
    assert!(st.counters.evictions > 0);
    assert!(st.counters.dedup_hits > 0);
    let expect = st.data_bytes
        + st.unique_pages * CONTENT_METADATA_COST
        + st.stored_pages * PAGE_METADATA_COST
        + st.reserved_pages * RESERVED_PAGE_HOST_COST;
    assert_eq!(st.host_used, expect, "host accounting after the run");
    assert_eq!(
        st.host_overhead,
        store.recount_overhead(),
        "overhead after the run"
    );
    assert!(st.host_used + st.host_overhead <= HOST_LIMIT);

    for c in &clients {
        c.reset();
    }
    let st = store.stats();
    assert_eq!(
        (
            st.host_used,
            st.host_overhead,
            st.stored_pages,
            st.allocator_footprint
        ),
        (0, 0, 0, 0),
        "leak after reset"
    );
}

#[test]
fn concurrent_flood_never_exceeds_the_host_limit() {
    // Persistent puts only: nothing can be evicted, so the limit is the
    // only thing that stops them, and it must stop them exactly.
    let limit = 200 * RESERVED_PAGE_HOST_COST;
    let store = Store::new(StoreConfig { host_limit: limit });
    let stored = AtomicU64::new(0);
    thread::scope(|s| {
        for t in 0..4u64 {
            let store = &store;
            let stored = &stored;
            s.spawn(move || {
                let c = store
                    .add_client(&format!("flood{t}"), ClientConfig::default())
                    .unwrap()
                    .data();
                let p = c.new_pool(PoolSpec::persistent()).unwrap();
                for i in 0..200u64 {
                    // Random distinct pages: each costs exactly one raw page.
                    let data = page(t, 0, 0, i, 3);
                    if c.put(&handle(p, 0, i), &data, false).is_ok() {
                        stored.fetch_add(1, Ordering::Relaxed);
                    }
                    assert!(store.host_used() <= limit);
                }
            });
        }
    });
    assert_eq!(stored.load(Ordering::Relaxed), 200, "exactly what fits");
    assert_eq!(store.host_used(), limit);
}
