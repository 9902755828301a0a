// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Accounting: the charging constants, per-client charge counters, the
//! host-wide counter and the operation counters.
//!
//! Every limit is enforced with a compare-and-swap that adds a charge only if
//! the result stays within the limit ([`try_charge`]), never with a
//! check-then-add, so that a flood of concurrent puts cannot overshoot.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vtmem_protocol::PAGE_SIZE;

/// Host cost of one stored page's own metadata (its slot in the page index,
/// its LRU entry and its share of the index maps), counted once per page.
pub const PAGE_METADATA_COST: u64 = 32;
/// Host cost of one unique content's metadata (content-table entry and
/// dedup-index slot), counted once per distinct content, however many pages
/// share it.
pub const CONTENT_METADATA_COST: u64 = 32;
/// Fixed metadata cost charged to a client for every page it holds.
///
/// It is the page's own cost plus a whole content entry, as if the page
/// were not deduplicated: a client's charge must not depend on what other
/// clients store.
pub const CLIENT_PAGE_COST: u64 = PAGE_METADATA_COST + CONTENT_METADATA_COST;
/// Worst-case client charge of one page: a raw page plus metadata. This is
/// what one reserved page costs against the persistent quota.
pub const RESERVED_PAGE_CLIENT_COST: u64 = PAGE_SIZE as u64 + CLIENT_PAGE_COST;
/// Worst-case host cost of one page: a raw page stored as new content plus
/// both metadata costs. This is what one reserved page holds of the host limit.
pub const RESERVED_PAGE_HOST_COST: u64 =
    PAGE_SIZE as u64 + PAGE_METADATA_COST + CONTENT_METADATA_COST;

/// Adds `amount` to `counter` if the sum stays at or below `limit`.
///
/// One compare-and-swap loop: concurrent callers can never together push
/// the counter past the limit.
pub fn try_charge(counter: &AtomicU64, amount: u64, limit: u64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |cur| {
            cur.checked_add(amount).filter(|&v| v <= limit)
        })
        .is_ok()
}

/// Adds as many `unit`s (at least 1 byte each) as fit below `limit`, at
/// most `max`; returns how many. Never overflows: what is added is at most
/// `limit - cur`.
pub fn try_charge_units(counter: &AtomicU64, unit: u64, max: u64, limit: u64) -> u64 {
    let unit = unit.max(1);
    let mut granted = 0;
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |cur| {
        let room = limit.saturating_sub(cur) / unit;
        granted = room.min(max);
        if granted == 0 {
            None
        } else {
            Some(cur + granted * unit)
        }
    });
    granted
}

/// Adds without a limit (moving a charge that was already admitted).
pub fn charge(counter: &AtomicU64, amount: u64) {
    counter.fetch_add(amount, Ordering::AcqRel);
}

/// Removes a charge.
pub fn uncharge(counter: &AtomicU64, amount: u64) {
    let prev = counter.fetch_sub(amount, Ordering::AcqRel);
    debug_assert!(prev >= amount, "uncharge of {amount} below zero ({prev})");
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $field:ident ),* $(,)?) => {
        /// Operation counters (per pool, per client, global).
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct OpCounters {
            $( $(#[$doc])* pub $field: u64, )*
        }

        impl OpCounters {
            /// Adds every counter of `other` to `self`.
            pub fn accumulate(&mut self, other: &OpCounters) {
                $( self.$field += other.$field; )*
            }
        }

        /// The live, atomic form of [`OpCounters`].
        #[derive(Debug, Default)]
        pub(crate) struct AtomicCounters {
            $( pub $field: AtomicU64, )*
        }

        impl AtomicCounters {
            /// A consistent-enough copy (each counter read once, relaxed).
            pub fn snapshot(&self) -> OpCounters {
                OpCounters { $( $field: self.$field.load(Ordering::Relaxed), )* }
            }

            /// Adds a snapshot's counts (carrying counters over).
            pub fn absorb(&self, o: &OpCounters) {
                $( self.$field.fetch_add(o.$field, Ordering::Relaxed); )*
            }
        }
    };
}

counters! {
    /// Put calls.
    puts,
    /// Puts that stored the page.
    puts_stored,
    /// Puts refused because the host limit was reached.
    puts_refused_no_space,
    /// Puts refused because the client's quota was used up.
    puts_refused_quota,
    /// Puts refused because the client is frozen.
    puts_refused_frozen,
    /// Puts refused for any other reason (no pool, no reservation...).
    puts_refused_other,
    /// Get calls.
    gets,
    /// Gets that found the page.
    get_hits,
    /// Gets that found nothing.
    get_misses,
    /// Flush-page calls.
    flush_pages,
    /// Flush-object calls.
    flush_objects,
    /// Ephemeral pages dropped by the store to make room.
    evictions,
    /// Stored puts whose content was already held (no new data stored).
    dedup_hits,
    /// Stored puts of all-zero pages.
    zero_pages,
    /// Stored puts of same-filled, non-zero pages.
    same_filled_pages,
    /// Uncompressed bytes of stored puts.
    bytes_in,
    /// Bytes actually written to the allocator for them.
    bytes_stored,
}

/// Increments one atomic counter.
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds to one atomic counter.
pub(crate) fn bump_by(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Memory the store's structures use beyond what their pages are charged:
/// allocator holes, sparse indexes, table slack.
///
/// Each structure (a content shard, a pool's index) keeps the excess it
/// last reported and reports the difference after every change, so the
/// total is exact at every moment a lock is released. It counts against the
/// host limit beside the page charges: what is charged plus this overhead is
/// what the store really holds.
#[derive(Debug, Default)]
pub(crate) struct Overhead(AtomicU64);

impl Overhead {
    /// A structure's excess went from `was` to `now` bytes.
    pub fn moved(&self, was: u64, now: u64) {
        if now > was {
            self.0.fetch_add(now - was, Ordering::AcqRel);
        } else if was > now {
            uncharge(&self.0, was - now);
        }
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// Store-wide accounting shared by every client and pool.
#[derive(Debug)]
pub(crate) struct Global {
    /// Host limit in bytes.
    pub host_limit: AtomicU64,
    /// Bytes charged against the host limit for pages and reservations.
    pub host_used: AtomicU64,
    /// Bytes of structure overhead, also held against the host limit.
    pub overhead: Arc<Overhead>,
    /// Coarse clock stamping LRU queue segments, to compare the age of the
    /// heads of different pools.
    pub clock: AtomicU64,
}

impl Global {
    pub fn new(host_limit: u64) -> Self {
        Global {
            host_limit: AtomicU64::new(host_limit),
            host_used: AtomicU64::new(0),
            overhead: Arc::default(),
            clock: AtomicU64::new(0),
        }
    }

    /// Charges the host limit; false if it would be exceeded.
    pub fn try_charge(&self, bytes: u64) -> bool {
        try_charge(&self.host_used, bytes, self.room_limit())
    }

    /// What page charges may reach: the limit less the overhead.
    pub fn room_limit(&self) -> u64 {
        self.limit().saturating_sub(self.overhead.get())
    }

    pub fn uncharge(&self, bytes: u64) {
        uncharge(&self.host_used, bytes);
    }

    pub fn used(&self) -> u64 {
        self.host_used.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> u64 {
        self.host_limit.load(Ordering::Acquire)
    }

    /// Bytes above the limit if `extra` more were charged now.
    pub fn excess(&self, extra: u64) -> u64 {
        self.used()
            .saturating_add(self.overhead.get())
            .saturating_add(extra)
            .saturating_sub(self.limit())
    }
}

/// What a client is charged, and its limits. Pools hold an `Arc` of the
/// account of the client their pages are charged to (the owner).
#[derive(Debug)]
pub(crate) struct Acct {
    /// Unique id of the client (never reused).
    pub client_id: u64,
    /// Persistent pages' charges plus reservations.
    pub pers_charged: AtomicU64,
    /// Ephemeral pages' charges (pools this client owns).
    pub eph_charged: AtomicU64,
    pub pers_quota: AtomicU64,
    pub eph_quota: AtomicU64,
    pub weight: AtomicU32,
    pub frozen: AtomicBool,
    pub counters: AtomicCounters,
}

impl Acct {
    pub fn new(client_id: u64, pers_quota: u64, eph_quota: u64, weight: u32) -> Self {
        Acct {
            client_id,
            pers_charged: AtomicU64::new(0),
            eph_charged: AtomicU64::new(0),
            pers_quota: AtomicU64::new(pers_quota),
            eph_quota: AtomicU64::new(eph_quota),
            weight: AtomicU32::new(weight),
            frozen: AtomicBool::new(false),
            counters: AtomicCounters::default(),
        }
    }

    /// The charge counter and quota for one kind of pool.
    pub fn kind(&self, persistent: bool) -> (&AtomicU64, &AtomicU64) {
        if persistent {
            (&self.pers_charged, &self.pers_quota)
        } else {
            (&self.eph_charged, &self.eph_quota)
        }
    }

    /// Charges the quota of one kind; false if it would be exceeded.
    pub fn try_charge(&self, persistent: bool, bytes: u64) -> bool {
        let (ctr, quota) = self.kind(persistent);
        try_charge(ctr, bytes, quota.load(Ordering::Acquire))
    }

    pub fn uncharge(&self, persistent: bool, bytes: u64) {
        uncharge(self.kind(persistent).0, bytes);
    }

    /// Charge above the ephemeral quota if `extra` more were charged now.
    pub fn eph_excess(&self, extra: u64) -> u64 {
        self.eph_charged
            .load(Ordering::Acquire)
            .saturating_add(extra)
            .saturating_sub(self.eph_quota.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn try_charge_respects_limit() {
        let c = AtomicU64::new(90);
        assert!(!try_charge(&c, 11, 100));
        assert_eq!(c.load(Ordering::Relaxed), 90);
        assert!(try_charge(&c, 10, 100));
        assert_eq!(c.load(Ordering::Relaxed), 100);
        assert!(!try_charge(&c, 1, 100));
        // Overflow is a refusal, not a wrap.
        let c = AtomicU64::new(u64::MAX - 1);
        assert!(!try_charge(&c, 2, u64::MAX));
    }

    #[test]
    fn try_charge_units_grants_what_fits() {
        let c = AtomicU64::new(5);
        assert_eq!(try_charge_units(&c, 10, 100, 50), 4);
        assert_eq!(c.load(Ordering::Relaxed), 45);
        assert_eq!(try_charge_units(&c, 10, 100, 50), 0);
        assert_eq!(c.load(Ordering::Relaxed), 45);
        assert_eq!(try_charge_units(&c, 1, 2, u64::MAX), 2);
    }

    #[test]
    fn concurrent_charges_never_exceed_limit() {
        let c = Arc::new(AtomicU64::new(0));
        let ok = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                let ok = ok.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if try_charge(&c, 7, 1000) {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ok.load(Ordering::Relaxed), 1000 / 7);
        assert_eq!(c.load(Ordering::Relaxed), 1000 / 7 * 7);
    }

    #[test]
    fn reserved_cost_covers_every_real_cost() {
        // The largest real charge: a raw page stored as new content.
        let raw = PAGE_SIZE as u64;
        assert!(RESERVED_PAGE_CLIENT_COST >= raw + CLIENT_PAGE_COST);
        assert!(RESERVED_PAGE_HOST_COST >= raw + PAGE_METADATA_COST + CONTENT_METADATA_COST);
    }

    #[test]
    fn counters_accumulate() {
        let a = AtomicCounters::default();
        bump(&a.puts);
        bump_by(&a.bytes_in, 4096);
        let mut total = a.snapshot();
        total.accumulate(&a.snapshot());
        assert_eq!(total.puts, 2);
        assert_eq!(total.bytes_in, 8192);
    }
}
