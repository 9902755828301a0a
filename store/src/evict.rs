// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Eviction of ephemeral pages.
//!
//! * Over a client's ephemeral quota: that client loses its own oldest
//!   pages ([`Store::evict_own`]).
//! * Over the host limit: weighted LRU ([`Store::evict_weighted`]). The
//!   victim is the client whose ephemeral charge per unit of weight is
//!   largest (the one most above its weighted share); it loses a batch of
//!   [`EVICT_BATCH`] of its own oldest pages, then the victim is chosen
//!   again. When a client's put or reservation needs the room, other
//!   clients lose pages only down to their weighted share of the host
//!   (`limit × weight / total weight`); the requester may lose any of its
//!   own. Choosing scans the clients (one atomic load each), so a page
//!   costs `O(clients / EVICT_BATCH)` plus `O(1)` amortised queue work.
//!
//! Within a client, "oldest" picks the pool whose queue head carries the
//! oldest clock stamp, then takes pages from its head. Persistent pages are
//! never evicted. Eviction takes one pool lock at a time and is never called
//! with a pool lock held.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::account::Acct;
use super::pool::Freed;
use super::Store;

/// Pages evicted per victim selection.
pub const EVICT_BATCH: u64 = 16;

impl Store {
    /// Evicts from the pools charged to `acct`, oldest first, until `want`
    /// is met (see [`Freed::covers`]).
    pub(crate) fn evict_from(&self, acct: &Acct, want: Freed) -> Freed {
        let mut pools = self.evictable.pools_of(acct);
        pools.sort_by_key(|p| p.head_stamp.load(Ordering::Relaxed));
        let mut freed = Freed::default();
        for p in pools {
            if freed.covers(&want) {
                break;
            }
            if p.head_stamp.load(Ordering::Relaxed) == u64::MAX {
                continue;
            }
            let rest = Freed::want(
                want.pages - freed.pages,
                want.client - freed.client,
                want.host - freed.host,
            );
            freed.add(p.evict(rest, acct, &self.g));
        }
        freed
    }

    /// Evicts `acct`'s own pages until `need` bytes of its charge are freed
    /// or none are left.
    pub(crate) fn evict_own(&self, acct: &Acct, need: u64) -> Freed {
        let mut total = Freed::default();
        while total.client < need {
            let f = self.evict_from(
                acct,
                Freed::want(EVICT_BATCH, need - total.client, u64::MAX),
            );
            if f.pages == 0 {
                break;
            }
            total.add(f);
        }
        total
    }

    /// The client most above its weighted share of ephemeral memory, and
    /// how many bytes of its charge may go.
    ///
    /// A client's weighted share is `host limit × weight / total weight`
    /// of the live clients. With a `requester`, only the requester itself
    /// (any of its pages) and clients above their share (down to it) are
    /// victims: one VM's puts and reservations never push another VM's
    /// ephemeral memory below its share. Without one (the administrator
    /// lowered the limit), every client is.
    fn pick_victim(&self, skip: &[u64], requester: Option<&Acct>) -> Option<(Arc<Acct>, u64)> {
        let accts = self.accts.read();
        let (limit, total) = (self.g.limit(), super::total_weight(&accts));
        let mut best: Option<(&Arc<Acct>, u64, u64, u64)> = None;
        for a in accts.iter() {
            let bytes = a.eph_charged.load(Ordering::Relaxed);
            if bytes == 0 || skip.contains(&a.client_id) {
                continue;
            }
            let w = a.weight.load(Ordering::Relaxed).max(1) as u64;
            let allowance = match requester {
                Some(r) if r.client_id != a.client_id => {
                    bytes.saturating_sub(super::share_of(limit, a, total))
                }
                _ => u64::MAX,
            };
            if allowance == 0 {
                continue;
            }
            // bytes / w > best_bytes / best_w, without division.
            let better = best
                .is_none_or(|(_, bb, bw, _)| bytes as u128 * bw as u128 > bb as u128 * w as u128);
            if better {
                best = Some((a, bytes, w, allowance));
            }
        }
        best.map(|(a, _, _, allowance)| (a.clone(), allowance))
    }

    /// Weighted-LRU eviction until `need` host bytes are freed or no
    /// ephemeral page may go. `requester` is the client that needs the
    /// room (see [`Store::pick_victim`]), `None` for the administrator.
    pub(crate) fn evict_weighted(&self, need: u64, requester: Option<&Acct>) -> Freed {
        let mut total = Freed::default();
        let mut skip = Vec::new();
        while total.host < need {
            let Some((victim, allowance)) = self.pick_victim(&skip, requester) else {
                break;
            };
            let want = Freed::want(EVICT_BATCH, allowance, need - total.host);
            let f = self.evict_from(&victim, want);
            if f.pages == 0 {
                // Charged but nothing queued (puts in flight), or nothing
                // that fits the allowance: look elsewhere.
                skip.push(victim.client_id);
                continue;
            }
            total.add(f);
        }
        total
    }

    /// Evicts until the host limit holds again (or nothing is evictable).
    pub(crate) fn enforce_host_limit(&self) {
        loop {
            let excess = self.g.excess(0);
            if excess == 0 || self.evict_weighted(excess, None).pages == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::{CONTENT_METADATA_COST, PAGE_METADATA_COST};
    use crate::{ClientConfig, Handle, ObjectId, Page, PoolSpec, StoreConfig, Uuid, PAGE_SIZE};

    const HOST_PER_RAW: u64 = PAGE_SIZE as u64 + CONTENT_METADATA_COST + PAGE_METADATA_COST;

    fn page(seed: u64) -> Page {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut p = [0u8; PAGE_SIZE];
        for w in p.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        p
    }

    fn h(pool: u32, index: u64) -> Handle {
        Handle {
            pool,
            object: ObjectId([1, 2, 3]),
            index,
        }
    }

    fn has(c: &crate::DataHandle, handle: Handle) -> bool {
        // Reads through the index without the exclusive get's removal.
        let table = c.client.table.read();
        let pool = table.pools[handle.pool as usize].as_ref().unwrap();
        let idx = pool.lock();
        idx.pages.lookup(&handle.object, handle.index).is_some()
    }

    #[test]
    fn victim_is_the_client_most_above_its_weighted_share() {
        let s = Store::new(StoreConfig {
            host_limit: u64::MAX,
        });
        let mk = |name: &str, weight| {
            s.add_client(
                name,
                ClientConfig {
                    weight,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let a = mk("a", 100);
        let b = mk("b", 400);
        let c = mk("c", 100);
        a.client.acct.eph_charged.store(1000, Ordering::Relaxed);
        b.client.acct.eph_charged.store(3000, Ordering::Relaxed);
        c.client.acct.eph_charged.store(0, Ordering::Relaxed);
        // a: 10 per weight unit, b: 7.5.
        assert_eq!(
            s.pick_victim(&[], None).unwrap().0.client_id,
            a.client.acct.client_id
        );
        b.set_weight(200).unwrap();
        assert_eq!(
            s.pick_victim(&[], None).unwrap().0.client_id,
            b.client.acct.client_id
        );
        let skip = [b.client.acct.client_id, a.client.acct.client_id];
        assert!(s.pick_victim(&skip, None).is_none(), "c holds nothing");
        a.client.acct.eph_charged.store(0, Ordering::Relaxed);
        b.client.acct.eph_charged.store(0, Ordering::Relaxed);
    }

    #[test]
    fn own_eviction_takes_the_oldest_pool_first() {
        let s = Store::new(StoreConfig {
            host_limit: u64::MAX,
        });
        let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
        let c = c_admin.data();
        let old = c.new_pool(PoolSpec::ephemeral()).unwrap();
        let new = c.new_pool(PoolSpec::ephemeral()).unwrap();
        for i in 0..200 {
            c.put(&h(old, i), &page(i), false).unwrap();
        }
        for i in 0..200 {
            c.put(&h(new, i), &page(1000 + i), false).unwrap();
        }
        assert_eq!(c_admin.evict_ephemeral(150), 150);
        for i in 0..150 {
            assert!(!has(&c, h(old, i)), "old page {i} evicted first");
        }
        for i in 150..200 {
            assert!(has(&c, h(old, i)));
            assert!(has(&c, h(new, i)));
        }
        assert_eq!(c_admin.stats().counters.evictions, 150);
    }

    #[test]
    fn shared_pages_read_since_queued_get_a_second_chance() {
        let s = Store::new(StoreConfig {
            host_limit: u64::MAX,
        });
        let uuid = Uuid::from_bytes([1u8; 16]).unwrap();
        let c_admin = s
            .add_client(
                "vm",
                ClientConfig {
                    authorized_uuids: vec![uuid],
                    ..Default::default()
                },
            )
            .unwrap();
        let c = c_admin.data();
        let p = c.new_pool(PoolSpec::shared(uuid)).unwrap();
        for i in 0..10 {
            c.put(&h(p, i), &page(i), false).unwrap();
        }
        let mut out = [0u8; PAGE_SIZE];
        assert!(c.get(&h(p, 0), &mut out).unwrap());
        assert!(c.get(&h(p, 1), &mut out).unwrap());
        assert_eq!(c_admin.evict_ephemeral(3), 3);
        assert!(
            has(&c, h(p, 0)) && has(&c, h(p, 1)),
            "referenced pages kept"
        );
        for i in 2..5 {
            assert!(!has(&c, h(p, i)));
        }
        // They went to the back of the queue; their chance is used up.
        assert_eq!(c_admin.evict_ephemeral(5), 5);
        assert!(has(&c, h(p, 0)) && has(&c, h(p, 1)));
        assert_eq!(c_admin.evict_ephemeral(2), 2);
        assert!(!has(&c, h(p, 0)) && !has(&c, h(p, 1)));
    }

    #[test]
    fn persistent_pages_are_never_evicted() {
        // Room for the pages and for the tables they grow.
        let s = Store::new(StoreConfig {
            host_limit: 20 * HOST_PER_RAW + 64 * 1024,
        });
        let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
        let c = c_admin.data();
        let p = c.new_pool(PoolSpec::persistent()).unwrap();
        for i in 0..20 {
            c.put(&h(p, i), &page(i), false).unwrap();
        }
        assert_eq!(s.evict_weighted(u64::MAX, None).pages, 0);
        assert_eq!(c_admin.evict_ephemeral(100), 0);
        assert_eq!(c_admin.stats().persistent_pages, 20);
    }

    #[test]
    fn stale_queue_entries_stay_bounded() {
        let s = Store::new(StoreConfig {
            host_limit: u64::MAX,
        });
        let c = s.add_client("vm", ClientConfig::default()).unwrap().data();
        let p = c.new_pool(PoolSpec::ephemeral()).unwrap();
        let mut out = [0u8; PAGE_SIZE];
        // Put and get (exclusive) many times: every get leaves a stale entry.
        for i in 0..20_000u64 {
            c.put(&h(p, i % 7), &page(i % 13), false).unwrap();
            if i % 2 == 0 {
                c.get(&h(p, i % 7), &mut out).unwrap();
            }
        }
        let table = c.client.table.read();
        let idx = table.pools[p as usize].as_ref().unwrap().lock();
        assert!(idx.queue.len() <= 2 * idx.pages.len() as usize + 1025);
    }

    #[test]
    fn weighted_eviction_frees_what_is_asked() {
        let s = Store::new(StoreConfig {
            host_limit: u64::MAX,
        });
        let a_admin = s.add_client("a", ClientConfig::default()).unwrap();
        let a = a_admin.data();
        let p = a.new_pool(PoolSpec::ephemeral()).unwrap();
        for i in 0..100 {
            a.put(&h(p, i), &page(i), false).unwrap();
        }
        let real = |st: crate::StoreStats| st.host_used + st.host_overhead;
        let before = real(s.stats());
        let f = s.evict_weighted(5 * HOST_PER_RAW, None);
        // Real memory: an evicted page's slot is a hole until its chunk is
        // emptied, so eviction goes on until compaction can give a chunk
        // back. It never takes more than a chunk of pages a shard beyond
        // what was asked.
        let raw_per_chunk = (crate::CHUNK_BYTES / PAGE_SIZE) as u64;
        assert!(f.host >= 5 * HOST_PER_RAW, "{f:?}");
        assert!(
            (5..=5 + super::super::CLIENT_SHARDS as u64 * raw_per_chunk).contains(&f.pages),
            "{f:?}"
        );
        assert_eq!(a_admin.stats().ephemeral_pages, 100 - f.pages);
        assert!(before - real(s.stats()) >= 5 * HOST_PER_RAW);
    }
}
