// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Model-based property test: random operation sequences against a simple
//! reference model of tmem semantics.
//!
//! Three clients: "solo" (own dedup domain) and "g1", "g2" (one dedup
//! group). Each has a persistent pool (id 0; g2's has exclusive gets) and a
//! private ephemeral pool (id 1); solo and g1 also share an ephemeral pool
//! (id 2). The host limit is small, so eviction and refusals happen.
//! Page contents come from a small set: zero, same-filled, compressible,
//! incompressible, near-duplicates, and every content recurs.

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;
use vtmem_store::*;
use vtmem_testkit::{random_page, same_filled_page};

const CLIENTS: usize = 3;
const UUID: Uuid = Uuid::from_bytes([0x5A; 16]).unwrap();
const RAW_PAGE: u64 = RESERVED_PAGE_HOST_COST;
/// Most bytes one put's table growth can need at the model's scale.
const TABLE_GROWTH: u64 = 8192;
const HOST_LIMIT: u64 = 10 * RAW_PAGE;
/// Weights of the model's clients, and their sum.
fn weight(i: usize) -> u64 {
    100 + 100 * i as u64
}
/// Client `i`'s weighted share of the host.
fn share(i: usize) -> u64 {
    HOST_LIMIT * weight(i) / TOTAL_WEIGHT
}
const TOTAL_WEIGHT: u64 = 100 + 200 + 300;

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
    let random = random_page;
    let same = same_filled_page;
    let mut near = same(0x0101_0101_0101_0101);
    near[PAGE_SIZE - 1] = 2;
    vec![
        [0u8; PAGE_SIZE],
        same(0x0101_0101_0101_0101),
        same(0xdead_beef_dead_beef),
        text(1),
        text(2),
        text(3),
        random(1),
        random(2),
        near,
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Put {
        c: usize,
        pool: usize,
        obj: u64,
        idx: u64,
        content: usize,
        reserved: bool,
    },
    Get {
        c: usize,
        pool: usize,
        obj: u64,
        idx: u64,
    },
    Flush {
        c: usize,
        pool: usize,
        obj: u64,
        idx: u64,
    },
    FlushObject {
        c: usize,
        pool: usize,
        obj: u64,
    },
    Recreate {
        c: usize,
        pool: usize,
    },
    Reserve {
        c: usize,
        n: u64,
    },
    Unreserve {
        c: usize,
        n: u64,
    },
    Freeze {
        c: usize,
        on: bool,
    },
    Quota {
        c: usize,
        pers: Option<u64>,
        eph: Option<u64>,
    },
    Reset {
        c: usize,
    },
    FlushAll {
        c: usize,
        eph_only: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0..CLIENTS;
    let pool = 0..3usize;
    prop_oneof![
        14 => (c.clone(), pool.clone(), 0..2u64, 0..5u64, 0..9usize, prop::bool::weighted(0.15))
            .prop_map(|(c, pool, obj, idx, content, reserved)| Op::Put { c, pool, obj, idx, content, reserved }),
        8 => (c.clone(), pool.clone(), 0..2u64, 0..5u64).prop_map(|(c, pool, obj, idx)| Op::Get { c, pool, obj, idx }),
        2 => (c.clone(), pool.clone(), 0..2u64, 0..6u64).prop_map(|(c, pool, obj, idx)| Op::Flush { c, pool, obj, idx }),
        1 => (c.clone(), pool.clone(), 0..2u64).prop_map(|(c, pool, obj)| Op::FlushObject { c, pool, obj }),
        1 => (c.clone(), pool.clone()).prop_map(|(c, pool)| Op::Recreate { c, pool }),
        2 => (c.clone(), 0..5u64).prop_map(|(c, n)| Op::Reserve { c, n }),
        1 => (c.clone(), 0..5u64).prop_map(|(c, n)| Op::Unreserve { c, n }),
        1 => (c.clone(), prop::bool::weighted(0.25)).prop_map(|(c, on)| Op::Freeze { c, on }),
        1 => (c.clone(), prop::option::of(1..8u64), prop::option::of(1..8u64))
            .prop_map(|(c, pers, eph)| Op::Quota { c, pers, eph }),
        1 => c.clone().prop_map(|c| Op::Reset { c }),
        1 => (c, any::<bool>()).prop_map(|(c, eph_only)| Op::FlushAll { c, eph_only }),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum PoolKey {
    Private(usize, usize),
    Shared,
}

struct Harness {
    store: Arc<Store>,
    clients: Vec<DataHandle>,
    admins: Vec<AdminHandle>,
    contents: Vec<Page>,
    /// Client charge of each content (host charge when stored as new
    /// content is the same, except for zero pages).
    cost: Vec<u64>,
    // ---- the model ----
    pages: HashMap<(PoolKey, u64, u64), usize>,
    reserved: [u64; CLIENTS],
    frozen: [bool; CLIENTS],
    pers_quota: [u64; CLIENTS],
    eph_quota: [u64; CLIENTS],
    /// Shared pool members in join order; the first is the owner.
    members: Vec<usize>,
    /// Persistent charge after the previous op (for the lowered-quota rule).
    last_pers: [u64; CLIENTS],
}

fn is_member(c: usize) -> bool {
    c < 2
}

impl Harness {
    fn new() -> Self {
        let contents = contents();
        // Measure each content's charge on its own.
        let cost = contents
            .iter()
            .map(|p| {
                let s = Store::new(StoreConfig {
                    host_limit: u64::MAX,
                });
                let c_admin = s.add_client("m", ClientConfig::default()).unwrap();
                let c = c_admin.data();
                let pool = c.new_pool(PoolSpec::persistent()).unwrap();
                c.put(
                    &Handle {
                        pool,
                        ..Default::default()
                    },
                    p,
                    false,
                )
                .unwrap();
                c_admin.stats().persistent_bytes
            })
            .collect();
        let store = Store::new(StoreConfig {
            host_limit: HOST_LIMIT,
        });
        let names = ["solo", "g1", "g2"];
        let admins: Vec<AdminHandle> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let cfg = ClientConfig {
                    dedup_group: (i > 0).then(|| "g".to_string()),
                    authorized_uuids: if is_member(i) { vec![UUID] } else { vec![] },
                    weight: weight(i) as u32,
                    ..Default::default()
                };
                store.add_client(n, cfg).unwrap()
            })
            .collect();
        let clients = admins.iter().map(AdminHandle::data).collect();
        let mut h = Harness {
            store,
            clients,
            admins,
            contents,
            cost,
            pages: HashMap::new(),
            reserved: [0; CLIENTS],
            frozen: [false; CLIENTS],
            pers_quota: [u64::MAX; CLIENTS],
            eph_quota: [u64::MAX; CLIENTS],
            members: Vec::new(),
            last_pers: [0; CLIENTS],
        };
        for c in 0..CLIENTS {
            h.open_pools(c);
        }
        h
    }

    fn open_pools(&mut self, c: usize) {
        let cl = &self.clients[c];
        let pers = PoolSpec {
            persistent: true,
            exclusive_gets: c == 2,
            shared: None,
        };
        assert_eq!(cl.new_pool(pers), Ok(0));
        assert_eq!(cl.new_pool(PoolSpec::ephemeral()), Ok(1));
        if is_member(c) {
            assert_eq!(cl.new_pool(PoolSpec::shared(UUID)), Ok(2));
            self.members.push(c);
        }
    }

    /// Pool id used for (client, pool choice); clients outside the shared
    /// pool use their private ones.
    fn pool_of(c: usize, pool: usize) -> usize {
        if pool == 2 && !is_member(c) {
            1
        } else {
            pool
        }
    }

    fn key(c: usize, pool: usize) -> PoolKey {
        if pool == 2 {
            PoolKey::Shared
        } else {
            PoolKey::Private(c, pool)
        }
    }

    fn handle(pool: usize, obj: u64, idx: u64) -> Handle {
        Handle {
            pool: pool as u32,
            object: ObjectId([obj, 77, 0]),
            index: idx,
        }
    }

    fn drop_pool(&mut self, key: PoolKey) {
        self.pages.retain(|(k, _, _), _| *k != key);
    }

    fn leave_shared(&mut self, c: usize) {
        self.members.retain(|&m| m != c);
        if self.members.is_empty() {
            self.drop_pool(PoolKey::Shared);
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Put {
                c,
                pool,
                obj,
                idx,
                content,
                reserved,
            } => {
                let pool = Self::pool_of(c, pool);
                let key = Self::key(c, pool);
                let res = self.clients[c].put(
                    &Self::handle(pool, obj, idx),
                    &self.contents[content],
                    reserved,
                );
                let persistent = pool == 0;
                let mk = (key, obj, idx);
                match res {
                    Ok(()) => {
                        if reserved {
                            assert!(
                                persistent && self.reserved[c] > 0,
                                "reserved put without reservation"
                            );
                            self.reserved[c] -= 1;
                        } else {
                            assert!(!self.frozen[c], "put while frozen");
                        }
                        self.pages.insert(mk, content);
                    }
                    Err(e) => {
                        self.pages.remove(&mk);
                        let cost = self.cost[content];
                        match e {
                            TmemError::Frozen => assert!(self.frozen[c] && !reserved),
                            TmemError::NoReservation => {
                                assert!(reserved && (!persistent || self.reserved[c] == 0))
                            }
                            TmemError::OverQuota => {
                                assert!(!reserved, "reserved put refused for quota");
                                if persistent {
                                    let st = self.admins[c].stats();
                                    assert!(
                                        st.persistent_charged + cost > self.pers_quota[c],
                                        "refused though the quota had room: {st:?}"
                                    );
                                } else {
                                    // The writer is charged, in the shared
                                    // pool too.
                                    let st = self.admins[c].stats();
                                    assert_eq!(st.ephemeral_pages, 0, "own pages left to evict");
                                    assert!(cost > self.eph_quota[c]);
                                }
                            }
                            TmemError::NoSpace => {
                                assert!(!reserved, "reserved put refused for space");
                                // Nothing was left that this put could
                                // evict: the charged client's own pages, or
                                // other clients' above their weighted share.
                                for (i, a) in self.admins.iter().enumerate() {
                                    let o = a.stats();
                                    if i == c {
                                        assert_eq!(o.ephemeral_pages, 0, "own pages left to evict");
                                    } else {
                                        assert!(
                                            o.ephemeral_bytes <= share(i),
                                            "{} above its share: {o:?}",
                                            o.name
                                        );
                                    }
                                }
                                let host_cost = if content == 0 {
                                    PAGE_METADATA_COST
                                } else {
                                    cost
                                };
                                // Room is also needed for the tables the
                                // put may grow, at this scale at most a
                                // block of content entries, a doubled
                                // index and a pool's first tables.
                                let st = self.store.stats();
                                let used = st.host_used + st.host_overhead;
                                assert!(
                                    used + host_cost + TABLE_GROWTH > HOST_LIMIT,
                                    "refused for space though {used} + {host_cost} fit: {st:?}"
                                );
                            }
                            other => panic!("unexpected refusal {other:?}"),
                        }
                    }
                }
            }
            Op::Get { c, pool, obj, idx } => {
                let pool = Self::pool_of(c, pool);
                let mk = (Self::key(c, pool), obj, idx);
                let mut out = [0xEEu8; PAGE_SIZE];
                let hit = self.clients[c]
                    .get(&Self::handle(pool, obj, idx), &mut out)
                    .unwrap();
                let expect = self.pages.get(&mk).copied();
                if hit {
                    let Some(want) = expect else {
                        panic!("hit on {mk:?} after miss, flush or exclusive get");
                    };
                    assert!(out == self.contents[want], "{mk:?}: wrong data");
                    let exclusive = pool == 1 || (pool == 0 && c == 2);
                    if exclusive {
                        self.pages.remove(&mk);
                    }
                } else {
                    assert!(out.iter().all(|&b| b == 0xEE), "miss wrote the output");
                    assert!(pool != 0 || expect.is_none(), "persistent page {mk:?} lost");
                    self.pages.remove(&mk);
                }
            }
            Op::Flush { c, pool, obj, idx } => {
                let pool = Self::pool_of(c, pool);
                self.clients[c]
                    .flush_page(&Self::handle(pool, obj, idx))
                    .unwrap();
                self.pages.remove(&(Self::key(c, pool), obj, idx));
            }
            Op::FlushObject { c, pool, obj } => {
                let pool = Self::pool_of(c, pool);
                self.clients[c]
                    .flush_object(pool as u32, &ObjectId([obj, 77, 0]))
                    .unwrap();
                let key = Self::key(c, pool);
                self.pages.retain(|(k, o, _), _| !(*k == key && *o == obj));
            }
            Op::Recreate { c, pool } => {
                let pool = Self::pool_of(c, pool);
                let cl = &self.clients[c];
                cl.destroy_pool(pool as u32).unwrap();
                let spec = match pool {
                    0 => PoolSpec {
                        persistent: true,
                        exclusive_gets: c == 2,
                        shared: None,
                    },
                    1 => PoolSpec::ephemeral(),
                    _ => PoolSpec::shared(UUID),
                };
                assert_eq!(cl.new_pool(spec), Ok(pool as u32));
                if pool == 2 {
                    self.leave_shared(c);
                    self.members.push(c);
                } else {
                    self.drop_pool(PoolKey::Private(c, pool));
                    if pool == 0 {
                        self.reserved[c] = 0;
                    }
                }
            }
            Op::Reserve { c, n } => match self.clients[c].reserve(0, n) {
                Err(TmemError::Frozen) => assert!(self.frozen[c]),
                Err(e) => panic!("reserve: {e:?}"),
                Ok(g) => {
                    assert!(!self.frozen[c]);
                    assert!(g <= n);
                    self.reserved[c] += g;
                    if g < n {
                        let st = self.store.stats();
                        let cs = self.admins[c].stats();
                        let quota_full =
                            cs.persistent_charged + RESERVED_PAGE_CLIENT_COST > self.pers_quota[c];
                        // The fair-share rule: a grant stays within the
                        // client's weighted share of the host, and evicts
                        // other clients' pages only down to their shares.
                        let share_full = cs.persistent_charged + RESERVED_PAGE_HOST_COST > share(c);
                        let others_at_share = self.admins.iter().enumerate().all(|(i, a)| {
                            let o = a.stats();
                            if i == c {
                                o.ephemeral_pages == 0
                            } else {
                                o.ephemeral_bytes <= share(i)
                            }
                        });
                        let host_full = st.host_used + st.host_overhead + RESERVED_PAGE_HOST_COST
                            > HOST_LIMIT
                            && others_at_share;
                        assert!(
                            quota_full || share_full || host_full,
                            "reservation cut short: {cs:?}"
                        );
                    }
                }
            },
            Op::Unreserve { c, n } => {
                let left = self.clients[c].unreserve(0, n).unwrap();
                self.reserved[c] -= n.min(self.reserved[c]);
                assert_eq!(left, self.reserved[c]);
            }
            Op::Freeze { c, on } => {
                if on {
                    self.admins[c].freeze();
                } else {
                    self.admins[c].thaw();
                }
                self.frozen[c] = on;
            }
            Op::Quota { c, pers, eph } => {
                let p = pers.map_or(u64::MAX, |k| k * RAW_PAGE);
                let e = eph.map_or(u64::MAX, |k| k * RAW_PAGE);
                self.admins[c].set_quota(p, e);
                self.pers_quota[c] = p;
                self.eph_quota[c] = e;
            }
            Op::Reset { c } => {
                self.clients[c].reset();
                self.drop_pool(PoolKey::Private(c, 0));
                self.drop_pool(PoolKey::Private(c, 1));
                self.reserved[c] = 0;
                if is_member(c) {
                    self.leave_shared(c);
                }
                self.open_pools(c);
            }
            Op::FlushAll { c, eph_only } => {
                self.admins[c].flush_all(eph_only);
                if !eph_only {
                    self.drop_pool(PoolKey::Private(c, 0));
                }
                self.drop_pool(PoolKey::Private(c, 1));
                // The shared pool loses the pages `c` wrote: the model
                // does not know which, and ephemeral pages may go anyway.
            }
        }
        self.check_invariants();
    }

    fn check_invariants(&mut self) {
        let st = self.store.stats();
        assert!(st.host_used <= HOST_LIMIT, "host limit exceeded");
        let expect = st.data_bytes
            + st.unique_pages * CONTENT_METADATA_COST
            + st.stored_pages * PAGE_METADATA_COST
            + st.reserved_pages * RESERVED_PAGE_HOST_COST;
        assert_eq!(st.host_used, expect, "host accounting");
        assert!(
            st.host_used + st.host_overhead <= HOST_LIMIT,
            "real memory above the limit: {} + {}",
            st.host_used,
            st.host_overhead
        );
        assert_eq!(
            st.host_overhead,
            self.store.recount_overhead(),
            "overhead accounting"
        );
        assert!(st.allocator_footprint >= st.data_bytes);
        for c in 0..CLIENTS {
            let name = ["solo", "g1", "g2"][c];
            let cs = st.clients.iter().find(|x| x.name == name).unwrap();
            assert_eq!(cs.reserved_pages, self.reserved[c], "reservations of {c}");
            let index_overhead: u64 = cs
                .pools
                .iter()
                .filter(|p| p.persistent)
                .map(|p| p.index_overhead)
                .sum();
            assert_eq!(
                cs.persistent_charged,
                cs.persistent_bytes
                    + cs.reserved_pages * RESERVED_PAGE_CLIENT_COST
                    + index_overhead,
                "persistent charge of {c}"
            );
            assert!(
                cs.ephemeral_bytes <= self.eph_quota[c],
                "ephemeral quota of {c}"
            );
            if cs.persistent_charged > self.pers_quota[c] {
                assert!(
                    cs.persistent_charged <= self.last_pers[c],
                    "grew above the persistent quota"
                );
            }
            self.last_pers[c] = cs.persistent_charged;
            // Charges are sums of the per-page rule.
            let model_pers: u64 = self
                .pages
                .iter()
                .filter(|((k, _, _), _)| *k == PoolKey::Private(c, 0))
                .map(|(_, &content)| self.cost[content])
                .sum();
            assert_eq!(cs.persistent_bytes, model_pers, "persistent pages of {c}");
            for ps in &cs.pools {
                let key = Self::key(c, ps.id as usize);
                let model = self.pages.keys().filter(|(k, _, _)| *k == key).count() as u64;
                if ps.persistent {
                    assert_eq!(ps.pages, model, "pool {key:?}");
                } else {
                    assert!(ps.pages <= model, "pool {key:?} holds pages the model lost");
                }
            }
        }
    }

    fn teardown(self) {
        for c in &self.clients {
            c.reset();
        }
        let st = self.store.stats();
        assert_eq!(st.host_used, 0, "leak: {st:#?}");
        assert_eq!(st.host_overhead, 0, "overhead leak: {st:#?}");
        assert_eq!(st.allocator_footprint, 0);
        assert_eq!(st.stored_pages, 0);
        assert_eq!(st.unique_pages, 0);
        for name in ["solo", "g1", "g2"] {
            self.store.remove_client(name).unwrap();
        }
        assert_eq!(self.store.stats().host_used, 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..250)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
        h.teardown();
    }
}

#[test]
fn model_harness_detects_lost_persistent_pages() {
    // The harness itself must be able to fail: a page flushed behind the
    // model's back is reported as lost.
    let mut h = Harness::new();
    h.apply(&Op::Put {
        c: 0,
        pool: 0,
        obj: 0,
        idx: 0,
        content: 3,
        reserved: false,
    });
    h.clients[0].flush_page(&Harness::handle(0, 0, 0)).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        h.apply(&Op::Get {
            c: 0,
            pool: 0,
            obj: 0,
            idx: 0,
        })
    }));
    assert!(r.is_err());
}
