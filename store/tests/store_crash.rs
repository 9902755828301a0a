// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Crash model test of the crash-safe state: random operation sequences
//! against a reference model, interleaved with simulated crashes (the
//! store is dropped at a random point without any shutdown, and a new one
//! is recovered from its state directory).
//!
//! After every recovery: every persistent page the model holds (every
//! acknowledged put not flushed since) comes back byte-identical, the
//! charges are exactly what the pages and reservations cost, ephemeral
//! pools keep their ids, and nothing is leaked; at the end, with every
//! page flushed, nothing is charged and no chunk of the arena is in use.
//!
//! Three clients: "solo" (own dedup domain) and "g1", "g2" (one dedup
//! group, so one domain of the state). Each has a persistent pool (id 0;
//! g2's has exclusive gets) and a private ephemeral pool (id 1); solo and
//! g1 also share an ephemeral pool (id 2).

use std::collections::{HashMap, HashSet};
#[path = "common/state_files.rs"]
mod state_files;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use state_files::journal_of;
use vtmem_store::*;
use vtmem_testkit::{random_page, same_filled_page};

const CLIENTS: usize = 3;
const NAMES: [&str; CLIENTS] = ["solo", "g1", "g2"];
const HOST_LIMIT: u64 = 64 << 20;
const UUID: Uuid = Uuid::from_bytes([0x5A; 16]).unwrap();
/// The model's client number for the shared pool's pages.
const SHARED: usize = 9;

fn contents() -> Vec<Page> {
    let text = |seed: u8| {
        let words = b"the page cache holds clean file pages; swap holds anonymous ones. ";
        let mut p = [0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = words[(i + seed as usize * 5) % words.len()];
        }
        p[100] = seed;
        p
    };
    let mut near = same_filled_page(0x0101_0101_0101_0101);
    near[PAGE_SIZE - 1] = 2;
    vec![
        [0u8; PAGE_SIZE],
        same_filled_page(0x0101_0101_0101_0101),
        same_filled_page(0xdead_beef_dead_beef),
        text(1),
        text(2),
        text(3),
        random_page(1),
        random_page(2),
        near,
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Put {
        c: usize,
        pool: u32,
        obj: u64,
        idx: u64,
        content: usize,
        reserved: bool,
    },
    Get {
        c: usize,
        pool: u32,
        obj: u64,
        idx: u64,
    },
    /// An exclusive get whose answer is published only when the next
    /// operation starts: a crash then comes before it.
    GetLate {
        obj: u64,
        idx: u64,
    },
    Flush {
        c: usize,
        pool: u32,
        obj: u64,
        idx: u64,
    },
    FlushObject {
        c: usize,
        pool: u32,
        obj: u64,
    },
    Recreate {
        c: usize,
        pool: u32,
    },
    Reserve {
        c: usize,
        n: u64,
    },
    Unreserve {
        c: usize,
        n: u64,
    },
    Reset {
        c: usize,
    },
    FlushAll {
        c: usize,
        eph_only: bool,
    },
    /// Checkpoint every domain now (as a journal past its bound does).
    Checkpoint,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0..CLIENTS;
    let pool = 0..3u32;
    prop_oneof![
        16 => (c.clone(), pool.clone(), 0..2u64, 0..6u64, 0..9usize, prop::bool::weighted(0.2))
            .prop_map(|(c, pool, obj, idx, content, reserved)| Op::Put { c, pool, obj, idx, content, reserved }),
        6 => (c.clone(), pool.clone(), 0..2u64, 0..6u64).prop_map(|(c, pool, obj, idx)| Op::Get { c, pool, obj, idx }),
        2 => (0..2u64, 0..6u64).prop_map(|(obj, idx)| Op::GetLate { obj, idx }),
        3 => (c.clone(), pool.clone(), 0..2u64, 0..6u64).prop_map(|(c, pool, obj, idx)| Op::Flush { c, pool, obj, idx }),
        1 => (c.clone(), pool.clone(), 0..2u64).prop_map(|(c, pool, obj)| Op::FlushObject { c, pool, obj }),
        1 => (c.clone(), pool).prop_map(|(c, pool)| Op::Recreate { c, pool }),
        2 => (c.clone(), 0..5u64).prop_map(|(c, n)| Op::Reserve { c, n }),
        1 => (c.clone(), 0..5u64).prop_map(|(c, n)| Op::Unreserve { c, n }),
        1 => c.clone().prop_map(|c| Op::Reset { c }),
        1 => (c, any::<bool>()).prop_map(|(c, eph_only)| Op::FlushAll { c, eph_only }),
        1 => Just(Op::Checkpoint),
        3 => Just(Op::Crash),
    ]
}

fn spec(c: usize, pool: u32) -> PoolSpec {
    match pool {
        0 => PoolSpec {
            exclusive_gets: c == 2,
            ..PoolSpec::persistent()
        },
        1 => PoolSpec::ephemeral(),
        _ => PoolSpec {
            persistent: false,
            exclusive_gets: false,
            shared: Some(UUID),
        },
    }
}

/// The pools client `c` has: the shared one for solo and g1 only.
fn pools_of(c: usize) -> u32 {
    if c < 2 {
        3
    } else {
        2
    }
}

fn handle(pool: u32, obj: u64, idx: u64) -> Handle {
    Handle {
        pool,
        object: ObjectId([obj, 7, 0]),
        index: idx,
    }
}

struct Harness {
    _top: tempfile::TempDir,
    path: PathBuf,
    store: Option<Arc<Store>>,
    clients: Vec<DataHandle>,
    contents: Vec<Page>,
    /// Bytes of each content's slot (0: zero or same-filled).
    slot: Vec<u64>,
    // ---- the model ----
    /// Persistent pages: (client, object, index) -> content.
    pers: HashMap<(usize, u64, u64), usize>,
    /// Ephemeral pages that may be there: (client, object, index) -> content.
    eph: HashMap<(usize, u64, u64), usize>,
    reserved: [u64; CLIENTS],
    crashes: u32,
    /// A get of g2's exclusive pool whose answer is not out yet, with the
    /// page it took.
    late: Option<(Taken, (usize, u64, u64), usize)>,
}

impl Harness {
    fn new() -> Self {
        let contents = contents();
        // Each content's slot, measured on its own.
        let slot = contents
            .iter()
            .map(|p| {
                let s = Store::new(StoreConfig {
                    host_limit: u64::MAX,
                });
                let a = s.add_client("m", ClientConfig::default()).unwrap();
                let c = a.data();
                let pool = c.new_pool(PoolSpec::persistent()).unwrap();
                c.put(&handle(pool, 0, 0), p, false).unwrap();
                a.stats().persistent_bytes - CLIENT_PAGE_COST
            })
            .collect();
        let top = tempfile::tempdir().unwrap();
        let path = top.path().join("state");
        let store = Store::create(
            &path,
            StoreConfig {
                host_limit: HOST_LIMIT,
            },
        )
        .unwrap();
        let mut clients = Vec::new();
        for (i, name) in NAMES.iter().enumerate() {
            let cfg = ClientConfig {
                dedup_group: (i > 0).then(|| "grp".to_string()),
                authorized_uuids: vec![UUID],
                ..ClientConfig::default()
            };
            let c = store.add_client(name, cfg).unwrap().data();
            for pool in 0..pools_of(i) {
                assert_eq!(c.new_pool(spec(i, pool)).unwrap(), pool);
            }
            clients.push(c);
        }
        Harness {
            _top: top,
            path,
            store: Some(store),
            clients,
            contents,
            slot,
            pers: HashMap::new(),
            eph: HashMap::new(),
            reserved: [0; CLIENTS],
            crashes: 0,
            late: None,
        }
    }

    /// Adds a content to choose from; returns its number.
    fn add_content(&mut self, page: Page) -> usize {
        let s = Store::new(StoreConfig {
            host_limit: u64::MAX,
        });
        let a = s.add_client("m", ClientConfig::default()).unwrap();
        let c = a.data();
        let pool = c.new_pool(PoolSpec::persistent()).unwrap();
        c.put(&handle(pool, 0, 0), &page, false).unwrap();
        self.slot
            .push(a.stats().persistent_bytes - CLIENT_PAGE_COST);
        self.contents.push(page);
        self.contents.len() - 1
    }

    fn store(&self) -> &Arc<Store> {
        self.store.as_ref().unwrap()
    }

    fn model(&mut self, _c: usize, pool: u32) -> &mut HashMap<(usize, u64, u64), usize> {
        if pool == 0 {
            &mut self.pers
        } else {
            &mut self.eph
        }
    }

    /// The model's key of a page.
    fn key(c: usize, pool: u32, obj: u64, idx: u64) -> (usize, u64, u64) {
        (if pool == 2 { SHARED } else { c }, obj, idx)
    }

    /// Forgets pages of a private pool (the shared pool's pages may
    /// outlive any one member's leaving: the model keeps them as may-be).
    fn forget(&mut self, c: usize, pool: u32, keep: impl Fn(u64, u64) -> bool) {
        if pool == 2 {
            return;
        }
        self.model(c, pool)
            .retain(|&(cc, o, i), _| cc != c || keep(o, i));
    }

    /// The late get's answer goes out (its removal is recorded), or, in a
    /// crash, never does (the page comes back).
    fn settle_late(&mut self, crash: bool) {
        if let Some((taken, key, content)) = self.late.take() {
            if crash {
                taken.abandon();
                self.pers.insert(key, content);
            } else {
                drop(taken);
            }
        }
    }

    fn apply(&mut self, op: &Op) {
        self.settle_late(matches!(op, Op::Crash));
        // g2 has no shared pool: its pool 2 is its ephemeral one.
        let op = &match op.clone() {
            Op::Put {
                c: 2,
                pool: 2,
                obj,
                idx,
                content,
                reserved,
            } => Op::Put {
                c: 2,
                pool: 1,
                obj,
                idx,
                content,
                reserved,
            },
            Op::Get {
                c: 2,
                pool: 2,
                obj,
                idx,
            } => Op::Get {
                c: 2,
                pool: 1,
                obj,
                idx,
            },
            Op::Flush {
                c: 2,
                pool: 2,
                obj,
                idx,
            } => Op::Flush {
                c: 2,
                pool: 1,
                obj,
                idx,
            },
            Op::FlushObject { c: 2, pool: 2, obj } => Op::FlushObject { c: 2, pool: 1, obj },
            Op::Recreate { c: 2, pool: 2 } => Op::Recreate { c: 2, pool: 1 },
            other => other,
        };
        match *op {
            Op::Put {
                c,
                pool,
                obj,
                idx,
                content,
                reserved,
            } => {
                let reserved = reserved && pool == 0;
                let page = self.contents[content];
                let r = self.clients[c].put(&handle(pool, obj, idx), &page, reserved);
                let key = Self::key(c, pool, obj, idx);
                if reserved && self.reserved[c] == 0 {
                    assert_eq!(r, Err(TmemError::NoReservation));
                    self.model(c, pool).remove(&key);
                    return;
                }
                r.unwrap();
                if reserved {
                    self.reserved[c] -= 1;
                }
                self.model(c, pool).insert(key, content);
            }
            Op::Get { c, pool, obj, idx } => {
                let mut out = [0u8; PAGE_SIZE];
                let hit = self.clients[c]
                    .get(&handle(pool, obj, idx), &mut out)
                    .unwrap();
                let exclusive = pool == 1 || (pool == 0 && c == 2);
                let key = Self::key(c, pool, obj, idx);
                let want = if exclusive {
                    self.model(c, pool).remove(&key)
                } else {
                    self.model(c, pool).get(&key).copied()
                };
                match want {
                    Some(w) if pool == 0 => {
                        assert!(hit, "persistent page ({c}, {obj}, {idx}) lost");
                        assert!(
                            out == self.contents[w],
                            "persistent page ({c}, {obj}, {idx}) changed"
                        );
                    }
                    Some(w) => {
                        if hit {
                            assert!(out == self.contents[w], "ephemeral page changed");
                        }
                    }
                    None => assert!(
                        !hit,
                        "a page the model does not hold: ({c}, {pool}, {obj}, {idx})"
                    ),
                }
            }
            Op::GetLate { obj, idx } => {
                let mut out = [0u8; PAGE_SIZE];
                let (hit, taken) = self.clients[2]
                    .get_taking(&handle(0, obj, idx), &mut out)
                    .unwrap();
                match self.pers.remove(&(2, obj, idx)) {
                    Some(w) => {
                        assert!(hit && out == self.contents[w], "persistent page changed");
                        let taken = taken.expect("an exclusive persistent get defers");
                        self.late = Some((taken, (2, obj, idx), w));
                    }
                    None => assert!(!hit && taken.is_none()),
                }
            }
            Op::Flush { c, pool, obj, idx } => {
                self.clients[c].flush_page(&handle(pool, obj, idx)).unwrap();
                self.model(c, pool).remove(&Self::key(c, pool, obj, idx));
            }
            Op::FlushObject { c, pool, obj } => {
                self.clients[c]
                    .flush_object(pool, &handle(pool, obj, 0).object)
                    .unwrap();
                self.forget(c, pool, |o, _| o != obj);
            }
            Op::Recreate { c, pool } => {
                self.clients[c].destroy_pool(pool).unwrap();
                assert_eq!(self.clients[c].new_pool(spec(c, pool)).unwrap(), pool);
                self.forget(c, pool, |_, _| false);
                if pool == 0 {
                    self.reserved[c] = 0;
                }
            }
            Op::Reserve { c, n } => {
                let got = self.clients[c].reserve(0, n).unwrap();
                assert_eq!(got, n, "unlimited quotas grant everything");
                self.reserved[c] += got;
            }
            Op::Unreserve { c, n } => {
                let left = self.clients[c].unreserve(0, n).unwrap();
                self.reserved[c] -= self.reserved[c].min(n);
                assert_eq!(left, self.reserved[c]);
            }
            Op::Reset { c } => {
                self.clients[c].reset();
                for pool in 0..pools_of(c) {
                    assert_eq!(self.clients[c].new_pool(spec(c, pool)).unwrap(), pool);
                }
                self.forget(c, 0, |_, _| false);
                self.forget(c, 1, |_, _| false);
                self.reserved[c] = 0;
            }
            Op::FlushAll { c, eph_only } => {
                self.store().client(NAMES[c]).unwrap().flush_all(eph_only);
                self.forget(c, 1, |_, _| false);
                if !eph_only {
                    self.forget(c, 0, |_, _| false);
                }
            }
            Op::Checkpoint => self.store().checkpoint_all().unwrap(),
            Op::Crash => self.crash(),
        }
    }

    /// Drops the store with no shutdown, recovers a new one from the state
    /// directory, and checks it.
    fn crash(&mut self) {
        self.kill();
        self.recover();
    }

    /// Drops the store with no shutdown.
    fn kill(&mut self) {
        self.settle_late(true);
        self.clients.clear();
        let store = self.store.take().unwrap();
        assert_eq!(Arc::strong_count(&store), 1, "nothing else holds the store");
        drop(store);
    }

    /// Recovers a store from the state directory and checks it.
    fn recover(&mut self) {
        let (store, rec) = Store::recover(
            &self.path,
            StoreConfig {
                host_limit: HOST_LIMIT,
            },
        )
        .unwrap();
        self.crashes += 1;
        assert_eq!(rec.clients, CLIENTS as u64);
        assert_eq!(rec.pages, self.pers.len() as u64);
        // The configuration comes back from the caller (vtmemd's file), as
        // for clients it adds: here, the authorisations.
        for n in &NAMES[..2] {
            store.client(n).unwrap().authorize(UUID);
        }
        self.clients = NAMES
            .iter()
            .map(|n| store.client(n).expect("client recovered").data())
            .collect();
        self.store = Some(store);
        // Ephemeral pools keep their ids, not their pages.
        self.eph.clear();
        self.check();
    }

    /// Every persistent page is there, byte-identical; charges are exact.
    fn check(&mut self) {
        let store = self.store().clone();
        for (&(c, obj, idx), &content) in &self.pers.clone() {
            let mut out = [0u8; PAGE_SIZE];
            let h = handle(0, obj, idx);
            assert!(
                self.clients[c].get(&h, &mut out).unwrap(),
                "persistent page ({c}, {obj}, {idx}) lost in crash {}",
                self.crashes
            );
            assert!(
                out == self.contents[content],
                "persistent page ({c}, {obj}, {idx}) changed"
            );
            if c == 2 {
                // An exclusive get took it: put it back.
                self.clients[c].put(&h, &out, false).unwrap();
            }
        }
        // Ephemeral pools, private and shared, keep their ids.
        for c in 0..CLIENTS {
            let mut out = [0u8; PAGE_SIZE];
            for pool in 1..pools_of(c) {
                assert!(!self.clients[c].get(&handle(pool, 0, 0), &mut out).unwrap());
            }
        }
        let st = store.stats();
        // Unique contents per domain: solo's, and the group's.
        let domain = |c: usize| usize::from(c > 0);
        let mut unique: HashSet<(usize, usize)> = HashSet::new();
        for (&(c, _, _), &content) in &self.pers {
            if content != 0 {
                unique.insert((domain(c), content));
            }
        }
        let reserved: u64 = self.reserved.iter().sum();
        let expected_host: u64 = unique
            .iter()
            .map(|&(_, content)| self.slot[content] + CONTENT_METADATA_COST)
            .sum::<u64>()
            + self.pers.len() as u64 * PAGE_METADATA_COST
            + reserved * RESERVED_PAGE_HOST_COST;
        assert_eq!(
            st.host_used, expected_host,
            "host charge after crash {}: {st:#?}",
            self.crashes
        );
        assert_eq!(st.unique_pages, unique.len() as u64);
        assert_eq!(st.stored_pages, self.pers.len() as u64);
        assert_eq!(st.reserved_pages, reserved);
        assert_eq!(store.recount_overhead(), st.host_overhead, "overhead");
        for (c, cs) in st.clients.iter().enumerate() {
            let c = NAMES.iter().position(|n| *n == cs.name).unwrap_or(c);
            let pages: Vec<usize> = self
                .pers
                .iter()
                .filter(|((cc, _, _), _)| *cc == c)
                .map(|(_, &content)| content)
                .collect();
            let bytes: u64 = pages
                .iter()
                .map(|&content| self.slot[content] + CLIENT_PAGE_COST)
                .sum();
            assert_eq!(
                cs.persistent_pages,
                pages.len() as u64,
                "pages of {}",
                cs.name
            );
            assert_eq!(cs.persistent_bytes, bytes, "charge of {}", cs.name);
            assert_eq!(
                cs.reserved_pages, self.reserved[c],
                "reservation of {}",
                cs.name
            );
            assert!(
                cs.persistent_charged >= bytes + self.reserved[c] * RESERVED_PAGE_CLIENT_COST,
                "persistent charge of {}",
                cs.name
            );
        }
    }

    /// Flushes everything; nothing may stay charged or in the arena, now
    /// or after one more recovery.
    fn teardown(mut self) {
        for c in 0..CLIENTS {
            self.apply(&Op::Reset { c });
        }
        let st = self.store().stats();
        assert_eq!(st.host_used, 0, "leak: {st:#?}");
        assert_eq!(st.allocator_footprint, 0);
        self.crash();
        let st = self.store().stats();
        assert_eq!(st.host_used, 0, "leak after recovery: {st:#?}");
        assert_eq!(st.allocator_footprint, 0, "chunks left in the arena");
        assert_eq!(arena_blocks(&self.path), 0, "arena memory not given back");
    }
}

/// Bytes of the arena file that hold memory (its holes do not).
fn arena_blocks(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path.join("arena")).unwrap().blocks()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_crash(ops in prop::collection::vec(op(), 1..200)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
        h.crash();
        h.teardown();
    }
}

#[test]
fn crash_harness_detects_lost_persistent_pages() {
    let mut h = Harness::new();
    h.apply(&Op::Put {
        c: 0,
        pool: 0,
        obj: 0,
        idx: 0,
        content: 3,
        reserved: false,
    });
    // Flushed behind the model's back: the check after a crash must fail.
    h.clients[0].flush_page(&handle(0, 0, 0)).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.crash()));
    assert!(r.is_err());
}

#[test]
fn pages_survive_repeated_crashes_with_dedup_and_compaction() {
    let mut h = Harness::new();
    // Contents of many sizes, and many of one size class: flushing most
    // of the latter makes the slab compact, moving logged contents.
    let mut unique: Vec<usize> = Vec::new();
    for seed in 0..1500u64 {
        let mut p = random_page(1000 + seed);
        let keep = if seed % 5 == 0 {
            64 + (seed as usize * 13) % 3000
        } else {
            1000
        };
        p[keep..].fill(0);
        p[PAGE_SIZE - 1] = 1;
        unique.push(h.add_content(p));
    }
    for (i, &content) in unique.iter().enumerate() {
        let i = i as u64;
        h.apply(&Op::Put {
            c: [0, 0, 1, 0, 2][i as usize % 5],
            pool: 0,
            obj: i % 2,
            idx: i,
            content: if i % 7 == 0 {
                (i % 9) as usize
            } else {
                content
            },
            reserved: false,
        });
        if i == 700 {
            h.crash();
        }
        if i == 1100 {
            h.apply(&Op::Checkpoint);
        }
    }
    h.crash();
    let keys: Vec<_> = h.pers.keys().copied().collect();
    for (n, (c, obj, idx)) in keys.into_iter().enumerate() {
        if n == 600 {
            h.apply(&Op::Checkpoint);
        }
        if n % 5 != 0 {
            h.apply(&Op::Flush {
                c,
                pool: 0,
                obj,
                idx,
            });
        }
    }
    h.crash();
    h.crash();
    h.teardown();
}

#[test]
fn a_torn_last_record_loses_only_the_put_it_was_writing() {
    use std::os::unix::fs::FileExt;
    let mut h = Harness::new();
    for idx in 0..6 {
        h.apply(&Op::Put {
            c: 0,
            pool: 0,
            obj: 0,
            idx,
            content: 3 + idx as usize % 5,
            reserved: false,
        });
    }
    h.apply(&Op::Reserve { c: 0, n: 3 });
    // The put the daemon dies in: new content (its CONTENT record is
    // complete) and a PUT record torn in half.
    let fresh = h.add_content(random_page(77));
    h.apply(&Op::Put {
        c: 0,
        pool: 0,
        obj: 1,
        idx: 9,
        content: fresh,
        reserved: true,
    });
    h.kill();
    // solo is client 1, in domain 1.
    let j = journal_of(&h.path, 1);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&j)
        .unwrap();
    let mut place = [0u8; 64];
    let mut last = 0;
    let mut at = 64;
    while f.read_exact_at(&mut place, at).is_ok() && at < 1 << 20 {
        if place.iter().any(|&b| b != 0) {
            last = at;
        }
        at += 64;
    }
    assert!(last > 64, "records were written");
    f.write_all_at(&[0u8; 32], last + 32).unwrap();
    drop(f);
    // Never answered: the model does not hold it, and its reservation page
    // is unspent.
    h.pers.remove(&(0, 1, 9));
    h.reserved[0] += 1;
    h.recover();
    let mut out = [0u8; PAGE_SIZE];
    assert!(!h.clients[0].get(&handle(0, 1, 9), &mut out).unwrap());
    h.crash();
    h.teardown();
}

#[test]
fn a_corrupt_state_is_an_error_naming_the_file() {
    use std::os::unix::fs::FileExt;
    let mut h = Harness::new();
    h.apply(&Op::Put {
        c: 0,
        pool: 0,
        obj: 0,
        idx: 0,
        content: 3,
        reserved: false,
    });
    h.kill();
    let cfg = || StoreConfig {
        host_limit: HOST_LIMIT,
    };
    // A snapshot cut short.
    let snap = h.path.join("d1.snap");
    let len = std::fs::metadata(&snap).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&snap).unwrap();
    f.set_len(len - 3).unwrap();
    let e = Store::recover(&h.path, cfg()).unwrap_err().to_string();
    assert!(e.contains(&snap.display().to_string()), "{e}");
    // A seed file that fails its check.
    let top = tempfile::tempdir().unwrap();
    let p = top.path().join("s");
    drop(Store::create(&p, cfg()).unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(p.join("seed"))
        .unwrap()
        .write_all_at(b"X", 9)
        .unwrap();
    let e = Store::recover(&p, cfg()).unwrap_err().to_string();
    assert!(e.contains("seed"), "{e}");
    // No state at all.
    let e = Store::recover(&top.path().join("none"), cfg())
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
}

/// A recovery that fails (here: the last domain's snapshot is cut short)
/// changes nothing: once the file is whole again, every page comes back.
#[test]
fn a_failed_recovery_leaves_the_state_as_it_was() {
    let mut h = Harness::new();
    for c in 0..CLIENTS {
        for idx in 0..6u64 {
            h.apply(&Op::Put {
                c,
                pool: 0,
                obj: c as u64,
                idx,
                content: (c + idx as usize) % 9,
                reserved: false,
            });
        }
    }
    h.kill();
    // The domain recovered last: its chunks are the ones not adopted yet
    // when its snapshot fails.
    let last = std::fs::read_dir(&h.path)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let n = name
                .strip_prefix('d')?
                .strip_suffix(".snap")?
                .parse::<u32>()
                .ok()?;
            Some(n)
        })
        .max()
        .expect("a snapshot");
    let snap = h.path.join(format!("d{last}.snap"));
    let whole = std::fs::read(&snap).unwrap();
    std::fs::write(&snap, &whole[..whole.len() - 3]).unwrap();
    let chunks_before = std::fs::read(h.path.join("chunks")).unwrap();
    let e = Store::recover(
        &h.path,
        StoreConfig {
            host_limit: HOST_LIMIT,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(&snap.display().to_string()), "{e}");
    assert_eq!(
        std::fs::read(h.path.join("chunks")).unwrap(),
        chunks_before,
        "the failed recovery changed the chunk directory"
    );
    std::fs::write(&snap, &whole).unwrap();
    h.recover();
    h.teardown();
}

#[test]
fn concurrent_puts_flushes_and_checkpoints_recover_exactly() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut h = Harness::new();
    let stop = Arc::new(AtomicBool::new(false));
    let store = h.store().clone();
    let contents = Arc::new(h.contents.clone());
    let checkpointer = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                store.checkpoint_all().unwrap();
                n += 1;
                std::thread::yield_now();
            }
            n
        })
    };
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let client = h.clients[c].clone();
            let contents = contents.clone();
            std::thread::spawn(move || {
                let mut model: HashMap<(usize, u64, u64), usize> = HashMap::new();
                let mut x = 0x2545_f491_4f6c_dd1du64 ^ c as u64;
                for _ in 0..1500 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let (obj, idx) = (x % 2, (x >> 8) % 64);
                    let content = (x >> 20) as usize % contents.len();
                    let hd = handle(0, obj, idx);
                    match (x >> 40) % 8 {
                        0 => {
                            client.flush_page(&hd).unwrap();
                            model.remove(&(c, obj, idx));
                        }
                        1 => {
                            // Ephemeral traffic in the same domain.
                            let _ = client.put(&handle(1, obj, idx), &contents[content], false);
                        }
                        _ => {
                            client.put(&hd, &contents[content], false).unwrap();
                            model.insert((c, obj, idx), content);
                        }
                    }
                }
                model
            })
        })
        .collect();
    for w in workers {
        h.pers.extend(w.join().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    assert!(checkpointer.join().unwrap() > 0);
    drop(store);
    h.crash();
    h.teardown();
}

#[test]
fn an_exclusive_gets_removal_is_recorded_once_its_answer_is_out() {
    let mut h = Harness::new();
    // g2 (client 2) has exclusive persistent gets.
    let put = |h: &mut Harness, idx, content| {
        h.apply(&Op::Put {
            c: 2,
            pool: 0,
            obj: 0,
            idx,
            content,
            reserved: false,
        })
    };
    put(&mut h, 0, 3);
    put(&mut h, 1, 4);
    put(&mut h, 2, 5);
    let mut out = [0u8; PAGE_SIZE];
    // Answered and settled: gone for good.
    let (hit, taken) = h.clients[2].get_taking(&handle(0, 0, 0), &mut out).unwrap();
    assert!(hit && out == h.contents[3]);
    drop(taken.expect("an exclusive persistent get defers its removal"));
    h.pers.remove(&(2, 0, 0));
    // Taken, then the handle stored again and taken again; the first
    // removal settles, the second is cut short by a crash: the second
    // page comes back (the guest, which got no answer, asks again).
    let (hit, first) = h.clients[2].get_taking(&handle(0, 0, 1), &mut out).unwrap();
    assert!(hit);
    assert!(
        !h.clients[2].get(&handle(0, 0, 1), &mut out).unwrap(),
        "reads as empty"
    );
    put(&mut h, 1, 6);
    let (hit, second) = h.clients[2].get_taking(&handle(0, 0, 1), &mut out).unwrap();
    assert!(hit && out == h.contents[6]);
    drop(first);
    second.unwrap().abandon();
    // Taken, not answered, a checkpoint meanwhile: a crash brings it back.
    let (hit, third) = h.clients[2].get_taking(&handle(0, 0, 2), &mut out).unwrap();
    assert!(hit);
    h.apply(&Op::Checkpoint);
    third.unwrap().abandon();
    h.crash();
    h.teardown();
}

#[test]
fn a_dedup_group_keeps_its_domain_across_a_restart() {
    let mut h = Harness::new();
    h.apply(&Op::Put {
        c: 1,
        pool: 0,
        obj: 0,
        idx: 0,
        content: 4,
        reserved: false,
    });
    h.crash();
    let st = h.store().stats();
    // solo's, the group's, the shared pool's.
    assert_eq!(st.dedup_domains, 3);
    let g = h.store().client("g1").unwrap().config().dedup_group;
    assert_eq!(g.as_deref(), Some("grp"));
    // A member added after the restart joins the recovered domain.
    let cfg = ClientConfig {
        dedup_group: Some("grp".into()),
        ..ClientConfig::default()
    };
    let g3 = h.store().add_client("g3", cfg).unwrap().data();
    let pool = g3.new_pool(PoolSpec::persistent()).unwrap();
    g3.put(&handle(pool, 0, 0), &h.contents[4], false).unwrap();
    let after = h.store().stats();
    assert_eq!(after.dedup_domains, 3);
    assert_eq!(after.unique_pages, st.unique_pages, "deduplicated");
    drop(g3);
    h.store().remove_client("g3").unwrap();
    h.crash();
    h.teardown();
}

/// A journal without room for more records (its checkpoint could not
/// make any) refuses what would add to the state: a put into a
/// persistent pool (dropping the handle's old copy, as any refused put
/// does), a new pool, a reservation. What was answered before and after
/// comes back.
#[test]
fn operations_a_full_journal_cannot_record_are_refused() {
    let cfg = || StoreConfig {
        host_limit: 64 << 20,
    };
    let top = tempfile::tempdir().unwrap();
    let p = top.path().join("state");
    let store = Store::create(&p, cfg()).unwrap();
    let data = store
        .add_client("a", ClientConfig::default())
        .unwrap()
        .data();
    let pool = data.new_pool(PoolSpec::persistent()).unwrap();
    let h = |i| Handle {
        pool,
        object: ObjectId([1, 0, 0]),
        index: i,
    };
    let (one, two) = (random_page(1), random_page(2));
    data.put(&h(1), &one, false).unwrap();
    data.put(&h(2), &one, false).unwrap();

    store.set_journal_margin(u64::MAX);
    assert!(matches!(
        data.put(&h(1), &two, false),
        Err(TmemError::NoSpace)
    ));
    let mut out = [0u8; PAGE_SIZE];
    assert!(!data.get(&h(1), &mut out).unwrap(), "the old copy stays");
    assert!(matches!(
        data.new_pool(PoolSpec::persistent()),
        Err(TmemError::NoSpace)
    ));
    assert!(matches!(data.reserve(pool, 4), Err(TmemError::NoSpace)));
    // Removals are not refused.
    data.flush_page(&h(2)).unwrap();

    store.set_journal_margin(0);
    data.put(&h(3), &two, false).unwrap();
    drop(data);
    drop(store);
    let (store, _) = Store::recover(&p, cfg()).unwrap();
    let data = store.client("a").unwrap().data();
    assert!(!data.get(&h(1), &mut out).unwrap());
    assert!(!data.get(&h(2), &mut out).unwrap());
    assert!(data.get(&h(3), &mut out).unwrap());
    assert!(out == two);
}
