// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Eviction of ephemeral pages.
//!
//! * Over a client's ephemeral quota: that client loses its own oldest
//!   pages ([`evict_own`]).
//! * Over the host limit: weighted LRU ([`Store::evict_weighted`]). The
//!   victim is the client whose ephemeral charge per unit of weight is
//!   largest (the one most above its weighted share); it loses a batch of
//!   [`EVICT_BATCH`] of its own oldest pages, then the victim is chosen
//!   again. Choosing scans the clients (one atomic load each), so a page
//!   costs `O(clients / EVICT_BATCH)` plus `O(1)` amortised queue work.
//!
//! Within a client, "oldest" picks the pool whose queue head carries the
//! oldest clock stamp, then takes pages from its head. Persistent pages are
//! never evicted. Eviction takes one pool lock at a time and is never called
//! with a pool lock held.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use super::account::{lock, Acct, Global};
use super::pool::{Freed, Pool};
use super::Store;

/// Pages evicted per victim selection.
pub const EVICT_BATCH: u64 = 16;

/// Evicts from the pools charged to `acct`, oldest first, until `want`
/// is met (see [`Freed::covers`]).
pub(crate) fn evict_from(acct: &Acct, want: Freed, g: &Global) -> Freed {
    let mut pools: Vec<Arc<Pool>> = lock(&acct.evictable)
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
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
        freed.add(p.evict(rest, g));
    }
    freed
}

/// Evicts `acct`'s own pages until `need` bytes of its charge are freed or
/// none are left.
pub(crate) fn evict_own(acct: &Acct, need: u64, g: &Global) -> Freed {
    let mut total = Freed::default();
    while total.client < need {
        let f = evict_from(
            acct,
            Freed::want(EVICT_BATCH, need - total.client, u64::MAX),
            g,
        );
        if f.pages == 0 {
            break;
        }
        total.add(f);
    }
    total
}

impl Store {
    /// The client most above its weighted share of ephemeral memory.
    fn pick_victim(&self, skip: &[u64]) -> Option<Arc<Acct>> {
        let accts = self.accts.read().unwrap_or_else(|e| e.into_inner());
        let mut best: Option<(&Arc<Acct>, u64, u64)> = None;
        for a in accts.iter() {
            let bytes = a.eph_charged.load(Ordering::Relaxed);
            if bytes == 0 || skip.contains(&a.client_id) {
                continue;
            }
            let w = a.weight.load(Ordering::Relaxed).max(1) as u64;
            // bytes / w > best_bytes / best_w, without division.
            let better =
                best.is_none_or(|(_, bb, bw)| bytes as u128 * bw as u128 > bb as u128 * w as u128);
            if better {
                best = Some((a, bytes, w));
            }
        }
        best.map(|(a, _, _)| a.clone())
    }

    /// Weighted-LRU eviction until `need` host bytes are freed or no
    /// ephemeral page is left.
    pub(crate) fn evict_weighted(&self, need: u64) -> Freed {
        let mut total = Freed::default();
        let mut skip = Vec::new();
        while total.host < need {
            let Some(victim) = self.pick_victim(&skip) else {
                break;
            };
            let want = Freed::want(EVICT_BATCH, u64::MAX, need - total.host);
            let f = evict_from(&victim, want, &self.g);
            if f.pages == 0 {
                // Charged but nothing queued (puts in flight): look elsewhere.
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
            if excess == 0 || self.evict_weighted(excess).pages == 0 {
                break;
            }
        }
    }
}
