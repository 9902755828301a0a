// SPDX-License-Identifier: GPL-2.0

//! The cleancache operations: clean page-cache pages in ephemeral pools.
//!
//! A front end beside `crate::frontswap`: it shares the device's
//! [`Transport`] (queues and batches) with it. Safe Rust only.
//!
//! # Pools
//!
//! The kernel names a filesystem's pool by the small integer `init_fs`
//! returned: an index into [`CachePools`], which maps it to the device's
//! pool id. The index stays while the device pool behind it may be
//! replaced (see below). A pool is private (gets are exclusive: a hit
//! removes the host copy, so a page lives in one place) unless
//! `cleancache_shared` is set and the host admin authorised the
//! filesystem's UUID for this VM; then it is the shared pool of that UUID
//! and gets keep the page.
//!
//! # Coherency
//!
//! Every operation on one file (puts, gets, invalidations of its pages and
//! of the whole file) goes to one queue, chosen from the pool index and the
//! file key, and the device processes a queue in order. So a get behind a
//! put of the same page sees it, and an invalidation behind a put removes
//! it, however long the put waited in an unsent batch.
//!
//! A put runs in atomic context and cannot wait for a batch. When none is
//! free the put is dropped, and the host may still hold an older copy of
//! the page: a `FLUSH_PAGE` for it is then parked, as is every
//! invalidation that finds no batch, and parked operations go out before
//! anything else queued later. A full parking ring first merges runs of
//! invalidations of one file into one `FLUSH_OBJECT` of it (dropping more
//! of the cache, never less). If that frees nothing, the pool is marked
//! stale: gets miss and puts are dropped until the next get
//! (process context) has drained the queues and replaced the device pool
//! with a new, empty one. Nothing older than a change is ever read back.
//!
//! The device pool id is read with the queue locked, right before an
//! operation is queued, and a pool is only destroyed after its slot was
//! closed and every queue drained: no operation can reach a device pool
//! that was destroyed, whose id the device may have given to a new pool.
//! The data path reads the id from [`CacheRoutes`], one atomic word per
//! slot, not under the `CachePools` lock: every put and get would
//! otherwise take that one lock, on every CPU. Closing stores the word
//! before the drain takes each queue lock, so an operation that locks a
//! queue after the drain passed it reads the closed word, and one that
//! locked it before is queued ahead of the drain.

#![cfg_attr(not(CONFIG_CLEANCACHE), allow(dead_code))]

use crate::stats::CacheStats;
use crate::transport::{counter, Flush, Locked, Transport};
use crate::wire::{Handle, ObjectId, Op, PoolSpec, Status, Uuid};
use core::fmt;
use kernel::{
    new_mutex, new_spinlock_irq,
    prelude::*,
    sync::{
        atomic::{Acquire, Atomic, Release},
        Arc, Mutex, SpinLockIrq,
    },
};

/// Filesystems with a cache pool at one time.
const MAX_CACHE_POOLS: usize = 64;

#[derive(Clone, Copy, Default)]
struct CachePool {
    /// Device pool id; `None` while the slot is free.
    id: Option<u32>,
    /// The filesystem's UUID.
    uuid: Option<Uuid>,
    /// The device pool is the shared pool of `uuid`.
    shared: bool,
    /// An invalidation was lost: serve nothing until the pool is replaced.
    stale: bool,
    /// A thread is replacing the device pool.
    resetting: bool,
}

impl CachePool {
    /// This slot's word in [`CacheRoutes`].
    fn route(&self) -> u64 {
        match self.id {
            Some(id) if !self.stale => ROUTE_OPEN | u64::from(id),
            _ => 0,
        }
    }
}

/// Set in a route while the slot's pool is usable; the low 32 bits are
/// then the device pool id.
const ROUTE_OPEN: u64 = 1 << 32;

/// Each slot's device pool id as the data path sees it, read without a
/// lock: `ROUTE_OPEN | id` while the pool is usable (open, not stale), else
/// 0. Written with the `CachePools` lock held whenever a slot changes.
struct CacheRoutes([Atomic<u64>; MAX_CACHE_POOLS]);

/// The slot of kernel pool index `pool`, if it is one.
fn slot_index(pool: i32) -> Option<usize> {
    usize::try_from(pool).ok()
}

impl CacheRoutes {
    fn new() -> Self {
        Self(core::array::from_fn(|_| Atomic::new(0)))
    }

    /// The device pool id of `pool` if operations may use it.
    fn usable(&self, pool: i32) -> Option<u32> {
        let route = self.0.get(slot_index(pool)?)?.load(Acquire);
        (route & ROUTE_OPEN != 0).then_some(route as u32)
    }

    /// Publishes `slot`'s route (with the `CachePools` lock held).
    fn publish(&self, pool: i32, slot: &CachePool) {
        if let Some(word) = slot_index(pool).and_then(|i| self.0.get(i)) {
            word.store(slot.route(), Release);
        }
    }
}

/// The cache pools, by kernel pool index.
struct CachePools {
    slots: [CachePool; MAX_CACHE_POOLS],
}

impl CachePools {
    fn new() -> Self {
        Self {
            slots: [CachePool::default(); MAX_CACHE_POOLS],
        }
    }

    fn slot(&mut self, pool: i32) -> Option<&mut CachePool> {
        self.slots.get_mut(slot_index(pool)?)
    }

    /// Writes one line per pool for debugfs.
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(id) = s.id {
                write!(f, "cache_pool index={i} id={id} uuid={}", UuidText(s.uuid))?;
                writeln!(
                    f,
                    " shared={} stale={}",
                    u8::from(s.shared),
                    u8::from(s.stale)
                )?;
            }
        }
        Ok(())
    }
}

/// A filesystem UUID as text (none prints as the nil UUID): for `write!`
/// (`core::fmt`, debugfs) and for the kernel's `pr_*!` (`kernel::fmt`).
struct UuidText(Option<Uuid>);

impl fmt::Display for UuidText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(uuid) => fmt::Display::fmt(uuid, f),
            None => f.write_str("00000000-0000-0000-0000-000000000000"),
        }
    }
}

impl kernel::fmt::Display for UuidText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The handle of page `index` of file `key` in device pool `id`.
fn page_handle(id: u32, key: [u64; 3], index: u64) -> Handle {
    Handle {
        pool: id,
        object: ObjectId(key),
        index,
    }
}

/// The cleancache front end of a device.
#[pin_data]
pub(crate) struct Cleancache {
    transport: Arc<Transport>,
    /// Ask for the shared pool of a filesystem's UUID (`cleancache_shared`,
    /// and the device offers shared pools).
    shared: bool,
    stats: CacheStats,
    #[pin]
    pools: SpinLockIrq<CachePools>,
    routes: CacheRoutes,
    /// Serialises creating, replacing and destroying cache pools.
    #[pin]
    admin: Mutex<()>,
}

impl Cleancache {
    pub(crate) fn new(transport: Arc<Transport>, shared: bool) -> impl PinInit<Self> {
        pin_init!(Cleancache {
            transport,
            shared,
            stats: CacheStats::new(),
            pools <- new_spinlock_irq!(CachePools::new(), "vtmem_cache_pools"),
            routes: CacheRoutes::new(),
            admin <- new_mutex!((), "vtmem_cache_admin"),
        })
    }

    /// Writes the counters for debugfs.
    pub(crate) fn show_stats(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.stats
            .for_each(&mut |name, v| writeln!(f, "{name} {v}"))
    }

    /// Writes one line per cache pool for debugfs.
    pub(crate) fn show_pools(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.pools.lock().show(f)
    }

    fn cstats(&self) -> &CacheStats {
        &self.stats
    }

    /// The queue of every operation on file `key` of kernel pool `pool`.
    fn cache_queue(&self, pool: i32, key: &[u64; 3]) -> usize {
        let n = self.transport.len() as u64;
        // Inode numbers are often sequential: mix before taking the rest.
        let h = (key[0] ^ key[1].rotate_left(32) ^ (pool as u64).rotate_left(48))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // The transport has at least one queue (no division by zero).
        (h >> 32).checked_rem(n).unwrap_or(0) as usize
    }

    /// The device pool id of `pool`, if usable. Called with the pool's
    /// queue locked (see the module documentation).
    fn cache_pool_id(&self, _queue_locked: &Locked<'_>, pool: i32) -> Option<u32> {
        self.routes.usable(pool)
    }

    /// Changes slot `pool` with `f` and publishes its route; `None` if
    /// there is no such slot.
    fn update_cache_pool<R>(&self, pool: i32, f: impl FnOnce(&mut CachePool) -> R) -> Option<R> {
        let mut pools = self.pools.lock();
        let s = pools.slot(pool)?;
        let r = f(s);
        self.routes.publish(pool, s);
        Some(r)
    }

    /// Creates a pool for the filesystem `uuid`; returns its kernel index.
    /// A filesystem without a UUID (nil) gets a private pool.
    pub(crate) fn cache_init_fs(&self, uuid: Option<Uuid>) -> Result<i32> {
        let _admin = self.admin.lock();
        let index = self
            .pools
            .lock()
            .slots
            .iter()
            .position(|s| s.id.is_none())
            .ok_or(ENOSPC)?;
        let (id, shared) = self.new_cache_pool(uuid)?;
        self.update_cache_pool(index as i32, |s| {
            *s = CachePool {
                id: Some(id),
                uuid,
                shared,
                ..CachePool::default()
            }
        });
        counter(&self.cstats().cleancache_pools);
        pr_info!(
            "filesystem {}: cache pool {index} (device pool {id}, {})\n",
            UuidText(uuid),
            if shared { "shared" } else { "private" }
        );
        Ok(index as i32)
    }

    /// Asks the device for a pool for `uuid`: the shared one if wanted and
    /// authorised, else a private one. Returns its id and whether shared.
    fn new_cache_pool(&self, uuid: Option<Uuid>) -> Result<(u32, bool)> {
        if let Some(shared) = uuid.filter(|_| self.shared) {
            let [st] = self
                .transport
                .call(0, [Op::NewPool(PoolSpec::shared(shared))])?;
            if st.status == Status::Ok {
                return Ok((st.value as u32, true));
            }
            pr_info!(
                "filesystem {}: no shared pool ({}), using a private one\n",
                UuidText(uuid),
                st.status.name()
            );
        }
        let [st] = self
            .transport
            .call(0, [Op::NewPool(PoolSpec::ephemeral())])?;
        if st.status != Status::Ok {
            pr_warn!(
                "filesystem {}: device refused a cache pool: {}\n",
                UuidText(uuid),
                st.status.name()
            );
            return Err(ENOSPC);
        }
        Ok((st.value as u32, false))
    }

    /// Offers a clean page being evicted. Atomic context: never sleeps;
    /// `fill` copies the page into the batch.
    pub(crate) fn cache_put(
        &self,
        pool: i32,
        key: [u64; 3],
        index: u64,
        fill: impl FnOnce(&mut [u8]),
    ) {
        counter(&self.cstats().cleancache_puts);
        let Ok(mut q) = self.transport.lock(self.cache_queue(pool, &key)) else {
            counter(&self.cstats().cleancache_puts_dropped);
            return;
        };
        let Some(id) = self.cache_pool_id(&q, pool) else {
            // No pool, or a stale one that serves nothing.
            counter(&self.cstats().cleancache_puts_dropped);
            return;
        };
        let handle = page_handle(id, key, index);
        if q.reap_for_room(1, 1) {
            // Answered batches were waiting for the interrupt (which may be
            // held off on this very CPU): take them back instead of
            // dropping the page.
            counter(&self.cstats().cleancache_put_reaps);
        }
        let slot = if q.try_room(1, 1) {
            q.push(Op::Put {
                handle,
                reserved: false,
            })
            .ok()
        } else {
            None
        };
        match slot {
            Some(slot) => {
                if let Some(page) = q.page_mut(slot) {
                    fill(page);
                }
                if q.is_full() {
                    q.send(Flush::Full);
                } else {
                    q.arm();
                }
            }
            None => {
                // Not sent: the host must not keep an older copy either.
                counter(&self.cstats().cleancache_puts_dropped);
                if !q.invalidate(Op::FlushPage { handle }, true) {
                    drop(q);
                    self.mark_stale(pool);
                }
            }
        }
    }

    /// Reads a page from the host. Process context. `Ok` on a hit (after
    /// `out` read the page), `ENOENT` on a miss.
    pub(crate) fn cache_get(
        &self,
        pool: i32,
        key: [u64; 3],
        index: u64,
        out: impl FnOnce(&[u8]),
    ) -> Result {
        counter(&self.cstats().cleancache_gets);
        let res = self.cache_fetch(pool, key, index, out);
        match res {
            Ok(()) => counter(&self.cstats().cleancache_hits),
            Err(_) => counter(&self.cstats().cleancache_misses),
        }
        res
    }

    fn cache_fetch(&self, pool: i32, key: [u64; 3], index: u64, out: impl FnOnce(&[u8])) -> Result {
        // A usable pool needs no reset: no table lock on the hot path. A
        // route that closes meanwhile is read again under the queue lock.
        if self.routes.usable(pool).is_none() {
            let needs_reset = self
                .update_cache_pool(pool, |s| match s.id {
                    Some(_) if s.stale && !s.resetting => {
                        s.resetting = true;
                        Some(true)
                    }
                    Some(_) if !s.stale => Some(false),
                    _ => None,
                })
                .flatten()
                .ok_or(ENOENT)?;
            if needs_reset {
                self.reset_cache_pool(pool);
                return Err(ENOENT);
            }
        }
        let q = self.cache_queue(pool, &key);
        let routes = &self.routes;
        // The pool id is read with the queue locked (`fetch` calls this
        // closure under the lock).
        let handle = || routes.usable(pool).map(|id| page_handle(id, key, index));
        // Any failure is a miss to the kernel: it reads the disk.
        self.transport.fetch(q, handle, out)
    }

    /// Drops page `index` of file `key`. May run in atomic context.
    pub(crate) fn cache_invalidate_page(&self, pool: i32, key: [u64; 3], index: u64) {
        counter(&self.cstats().cleancache_invalidate_pages);
        self.cache_invalidate(pool, &key, |id| Op::FlushPage {
            handle: page_handle(id, key, index),
        });
    }

    /// Drops every page of file `key`. May run in atomic context.
    pub(crate) fn cache_invalidate_inode(&self, pool: i32, key: [u64; 3]) {
        counter(&self.cstats().cleancache_invalidate_inodes);
        self.cache_invalidate(pool, &key, |id| Op::FlushObject {
            pool: id,
            object: ObjectId(key),
        });
    }

    fn cache_invalidate(&self, pool: i32, key: &[u64; 3], op: impl FnOnce(u32) -> Op) {
        let Ok(mut q) = self.transport.lock(self.cache_queue(pool, key)) else {
            return;
        };
        // A stale pool is emptied as a whole before it serves again.
        let Some(id) = self.cache_pool_id(&q, pool) else {
            return;
        };
        if !q.invalidate(op(id), true) {
            drop(q);
            self.mark_stale(pool);
        }
    }

    /// An invalidation of `pool` was lost: serve nothing from it until the
    /// device pool was replaced.
    fn mark_stale(&self, pool: i32) {
        let marked = self.update_cache_pool(pool, |s| {
            let fresh = s.id.is_some() && !s.stale;
            s.stale |= fresh;
            fresh
        });
        if marked == Some(true) {
            pr_warn!(
                "cache pool {pool}: an invalidation found no buffer; the pool will be emptied\n"
            );
        }
    }

    /// Replaces the stale device pool of `pool` with a new, empty one.
    /// Process context; the caller set `resetting`.
    fn reset_cache_pool(&self, pool: i32) {
        let _admin = self.admin.lock();
        let Some((old, uuid)) = self
            .pools
            .lock()
            .slot(pool)
            .and_then(|s| s.id.map(|id| (id, s.uuid)))
        else {
            return;
        };
        // Every operation queued for the old pool reaches the device first.
        self.transport.drain();
        self.destroy_cache_pool(old);
        let new = self.new_cache_pool(uuid);
        self.update_cache_pool(pool, |s| {
            match new {
                Ok((id, shared)) => {
                    s.id = Some(id);
                    s.shared = shared;
                    s.stale = false;
                }
                // No pool: the filesystem is served no more (gets miss).
                Err(_) => *s = CachePool::default(),
            }
            s.resetting = false;
        });
        counter(&self.cstats().cleancache_pool_resets);
    }

    fn destroy_cache_pool(&self, id: u32) {
        match self.transport.call(0, [Op::DestroyPool { pool: id }]) {
            Ok([st]) if st.status == Status::Ok || st.status == Status::NoPool => {}
            Ok([st]) => pr_warn!(
                "cache pool (device {id}): DESTROY_POOL: {}\n",
                st.status.name()
            ),
            Err(e) => pr_warn!("cache pool (device {id}): DESTROY_POOL failed: {:?}\n", e),
        }
    }

    /// The filesystem of `pool` is going away: drop its pool. Process
    /// context.
    pub(crate) fn cache_invalidate_fs(&self, pool: i32) {
        counter(&self.cstats().cleancache_invalidate_fs);
        let _admin = self.admin.lock();
        let closed = self
            .update_cache_pool(pool, |s| core::mem::take(s).id)
            .flatten();
        if let Some(id) = closed {
            // Operations already queued for it reach the device first: none
            // may arrive after the id was given to another pool.
            self.transport.drain();
            self.destroy_cache_pool(id);
        }
    }

    /// Drops every cache pool (device removal, after unregistering).
    pub(crate) fn close_pools(&self) {
        for pool in 0..MAX_CACHE_POOLS as i32 {
            let open = self.pools.lock().slot(pool).is_some_and(|s| s.id.is_some());
            if open {
                self.cache_invalidate_fs(pool);
            }
        }
    }
}

#[cfg(CONFIG_CLEANCACHE)]
impl crate::sys::CleancacheBackend for Cleancache {
    fn init_fs(&self, uuid: &[u8; 16]) -> Result<i32> {
        self.cache_init_fs(Uuid::from_bytes(*uuid))
    }

    fn get_page(
        &self,
        pool: i32,
        key: crate::sys::FileKey,
        index: u64,
        page: &mut crate::sys::PageRef<'_>,
    ) -> Result {
        self.cache_get(pool, key.0, index, |src| page.write(src))
    }

    fn put_page(
        &self,
        pool: i32,
        key: crate::sys::FileKey,
        index: u64,
        page: &crate::sys::PageRef<'_>,
    ) {
        self.cache_put(pool, key.0, index, |dst| page.read(dst));
    }

    fn invalidate_page(&self, pool: i32, key: crate::sys::FileKey, index: u64) {
        self.cache_invalidate_page(pool, key.0, index);
    }

    fn invalidate_inode(&self, pool: i32, key: crate::sys::FileKey) {
        self.cache_invalidate_inode(pool, key.0);
    }

    fn invalidate_fs(&self, pool: i32) {
        self.cache_invalidate_fs(pool);
    }
}
