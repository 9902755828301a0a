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
//!
//! # No futile gets
//!
//! For private pools the front end keeps, per request queue and pool slot,
//! a [`PageFilter`] of the pages the host may hold (see
//! `crate::pagefilter` for the rule and its cost), and answers a get of any
//! other page "miss" without asking the device. Every change of a file's
//! bits happens with the file's queue locked, together with the operation
//! that justifies it: a put marks the page as it is queued; a dropped put
//! (its `FLUSH_PAGE` queued instead), an invalidation, and the answer of a
//! get (hit or miss: gets are exclusive) clear it. A get that failed keeps
//! the bit. A put whose page cannot be tracked (the filter's cap is
//! reached, or no memory) is not sent: its bit is clear, so the host holds
//! no copy of it either. The filters of a slot are emptied only after its
//! device pool was closed, drained and destroyed, and before a new one
//! opens, so no bit of a new pool is ever lost. Shared pools (other guests
//! put pages this one may get) are not filtered, nor is anything when
//! `cleancache_filter_kib` is 0.

#![cfg_attr(not(CONFIG_CLEANCACHE), allow(dead_code))]

use crate::pagefilter::{
    Budget, Chunk, ChunkKey, ChunkMap, FileId, NoMemory, PageFilter, Untracked, NODE_BYTES,
};
use crate::stats::CacheStats;
use crate::transport::{counter, Answer, Flush, Locked, Transport, MAX_FETCH};
use crate::wire::{Handle, ObjectId, Op, PoolSpec, Status, Uuid};
use core::{cell::Cell, fmt};
use kernel::{
    new_mutex, new_spinlock_irq,
    prelude::*,
    rbtree::{RBTree, RBTreeNodeReservation},
    sync::{
        atomic::{Acquire, Atomic, Relaxed, Release},
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
    /// Gets are answered from the filter when the host cannot hold the
    /// page (private pool, filter on).
    filtered: bool,
    /// An invalidation was lost: serve nothing until the pool is replaced.
    stale: bool,
    /// A thread is replacing the device pool.
    resetting: bool,
    /// Tells this opening of the slot from earlier ones (see [`Route`]).
    epoch: u32,
}

impl CachePool {
    fn usable(&self) -> bool {
        self.id.is_some() && !self.stale
    }

    /// This slot's word in [`CacheRoutes`].
    fn route(&self) -> u64 {
        match self.id {
            Some(id) if !self.stale => {
                let filtered = if self.filtered { ROUTE_FILTERED } else { 0 };
                ROUTE_OPEN
                    | filtered
                    | (u64::from(self.epoch & EPOCH_MASK) << EPOCH_SHIFT)
                    | u64::from(id)
            }
            _ => 0,
        }
    }
}

/// Set in a route while the slot's pool is usable; the low 32 bits are
/// then the device pool id.
const ROUTE_OPEN: u64 = 1 << 32;
/// Set in a route whose pool is filtered.
const ROUTE_FILTERED: u64 = 1 << 33;
/// Where a route keeps the slot's epoch: it changes every time the slot
/// becomes usable, so an answer can tell whether the pool it came from is
/// still the one in the slot.
const EPOCH_SHIFT: u32 = 34;
const EPOCH_MASK: u32 = (1 << (64 - EPOCH_SHIFT)) - 1;

/// A usable slot's route: device pool id, whether it is filtered, epoch.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Route(u64);

impl Route {
    fn id(self) -> u32 {
        self.0 as u32
    }

    fn filtered(self) -> bool {
        self.0 & ROUTE_FILTERED != 0
    }
}

/// Each slot's route as the data path sees it, read without a lock:
/// `ROUTE_OPEN`, `ROUTE_FILTERED`, the epoch and the device pool id while
/// the pool is usable (open, not stale), else 0. Written with the
/// `CachePools` lock held whenever a slot changes.
struct CacheRoutes([Atomic<u64>; MAX_CACHE_POOLS]);

/// The slot of kernel pool index `pool`, if it is one.
fn slot_index(pool: i32) -> Option<usize> {
    usize::try_from(pool).ok()
}

impl CacheRoutes {
    fn new() -> Self {
        Self(core::array::from_fn(|_| Atomic::new(0)))
    }

    /// The route of `pool` if operations may use it.
    fn usable(&self, pool: i32) -> Option<Route> {
        let route = self.0.get(slot_index(pool)?)?.load(Acquire);
        (route & ROUTE_OPEN != 0).then_some(Route(route))
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
    /// The epoch of the next slot to become usable.
    next_epoch: u32,
}

impl CachePools {
    fn new() -> Self {
        Self {
            slots: [CachePool::default(); MAX_CACHE_POOLS],
            next_epoch: 1,
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
                    " shared={} filtered={} stale={}",
                    u8::from(s.shared),
                    u8::from(s.filtered),
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

/// The kernel's red-black tree as the filter's map: one node per chunk.
impl ChunkMap for RBTree<ChunkKey, Chunk> {
    fn chunk(&self, key: &ChunkKey) -> Option<&Chunk> {
        self.get(key)
    }

    fn chunk_mut(&mut self, key: &ChunkKey) -> Option<&mut Chunk> {
        self.get_mut(key)
    }

    fn insert_new(&mut self, key: ChunkKey, chunk: Chunk) -> Result<(), NoMemory> {
        // Puts run with interrupts off, during reclaim: never sleep, and
        // leave the atomic reserves to those that cannot do without them
        // (a page that cannot be tracked is simply not put).
        let node = RBTreeNodeReservation::new(GFP_NOWAIT | __GFP_NOWARN).map_err(|_| NoMemory)?;
        // `key` is absent (the caller looked): nothing is replaced.
        drop(self.insert(node.into_node(key, chunk)));
        Ok(())
    }

    fn remove_chunk(&mut self, key: &ChunkKey) -> Option<Chunk> {
        self.remove(key)
    }

    fn remove_file(&mut self, file: &FileId) -> (u64, u64) {
        let (mut chunks, mut pages) = (0, 0);
        let mut cursor = self.cursor_lower_bound_mut(&ChunkKey::first(file));
        while let Some(c) = cursor {
            let (same, n) = {
                let (k, v) = c.current();
                (k.file == *file, v.pages())
            };
            if !same {
                break;
            }
            chunks += 1;
            pages += n;
            // The node is freed here; the cursor moves to the next one.
            cursor = c.remove_current().0;
        }
        (chunks, pages)
    }
}

type Filter = PageFilter<RBTree<ChunkKey, Chunk>>;

/// The filters of one request queue, one per pool slot. Locked only with
/// the queue locked (the data path), or alone (emptying a slot whose
/// device pool is closed, debugfs).
struct QueueFilters([Filter; MAX_CACHE_POOLS]);

/// The nodes every filter of a device may hold together
/// (`cleancache_filter_kib`).
struct NodeBudget {
    used: Atomic<u64>,
    limit: u64,
}

impl Budget for NodeBudget {
    fn take_node(&self) -> bool {
        let mut used = self.used.load(Relaxed);
        loop {
            if used >= self.limit {
                return false;
            }
            match self.used.cmpxchg(used, used + 1, Relaxed) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn give_nodes(&self, n: u64) {
        self.used.fetch_sub(n, Relaxed);
    }
}

/// Every page filter of the cleancache front end (none if the filter is
/// off), and their shared memory budget.
struct CacheFilters {
    queues: KVec<Pin<KBox<SpinLockIrq<QueueFilters>>>>,
    budget: NodeBudget,
}

impl CacheFilters {
    /// Filters for `queues` request queues, holding at most `limit_kib`
    /// KiB of nodes; none if `limit_kib` is 0.
    fn new(queues: usize, limit_kib: u32) -> Result<Self> {
        let limit = u64::from(limit_kib) * 1024 / NODE_BYTES as u64;
        let mut v = KVec::new();
        if limit > 0 {
            v.reserve(queues, GFP_KERNEL)?;
            for _ in 0..queues {
                let filters = QueueFilters(core::array::from_fn(|_| Filter::default()));
                v.push(
                    KBox::pin_init(new_spinlock_irq!(filters, "vtmem_cache_filter"), GFP_KERNEL)?,
                    GFP_KERNEL,
                )?;
            }
        }
        Ok(Self {
            queues: v,
            budget: NodeBudget {
                used: Atomic::new(0),
                limit,
            },
        })
    }

    fn enabled(&self) -> bool {
        !self.queues.is_empty()
    }

    /// Runs `f` on the filter of slot `pool` on queue `queue`. Called with
    /// that queue locked, so that the filter changes in the order the
    /// queue's operations are queued. `None` if there is no such filter.
    fn with<R>(
        &self,
        queue: usize,
        pool: i32,
        f: impl FnOnce(&mut Filter, &NodeBudget) -> R,
    ) -> Option<R> {
        let mut g = self.queues.get(queue)?.lock();
        let filter = g.0.get_mut(slot_index(pool)?)?;
        Some(f(filter, &self.budget))
    }

    /// Empties every filter of slot `pool`. Process context, only while
    /// the slot is closed and its device pool drained and destroyed, so no
    /// bit is set meanwhile.
    fn clear_slot(&self, pool: i32) {
        let Some(i) = slot_index(pool) else {
            return;
        };
        for q in self.queues.iter() {
            let taken = q.lock().0.get_mut(i).map(Filter::take_all);
            if let Some((map, chunks)) = taken {
                // Freed outside the lock, with interrupts on.
                drop(map);
                self.budget.give_nodes(chunks);
            }
        }
    }

    /// Writes the filter's gauges for debugfs.
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mut chunks, mut pages) = (0u64, 0u64);
        for q in self.queues.iter() {
            for filter in q.lock().0.iter() {
                chunks += filter.chunks();
                pages += filter.pages();
            }
        }
        let node = NODE_BYTES as u64;
        writeln!(
            f,
            "cleancache_filter_limit_bytes {}",
            self.budget.limit * node
        )?;
        writeln!(
            f,
            "cleancache_filter_bytes {}",
            self.budget.used.load(Relaxed) * node
        )?;
        writeln!(f, "cleancache_filter_chunks {chunks}")?;
        writeln!(f, "cleancache_filter_pages {pages}")
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
    filters: CacheFilters,
    /// Serialises creating, replacing and destroying cache pools.
    #[pin]
    admin: Mutex<()>,
}

impl Cleancache {
    /// The front end on `transport`; `filter_kib`: the most memory the
    /// page filters may take (0: no filter).
    pub(crate) fn new(
        transport: Arc<Transport>,
        shared: bool,
        filter_kib: u32,
    ) -> impl PinInit<Self, Error> {
        let queues = transport.len();
        try_pin_init!(Cleancache {
            transport,
            shared,
            stats: CacheStats::new(),
            pools <- new_spinlock_irq!(CachePools::new(), "vtmem_cache_pools"),
            routes: CacheRoutes::new(),
            filters: CacheFilters::new(queues, filter_kib)?,
            admin <- new_mutex!((), "vtmem_cache_admin"),
        }? Error)
    }

    /// Writes the counters for debugfs.
    pub(crate) fn show_stats(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.stats
            .for_each(&mut |name, v| writeln!(f, "{name} {v}"))?;
        self.filters.show(f)
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

    /// The route of `pool`, if usable. Called with the pool's queue locked
    /// (see the module documentation).
    fn cache_route(&self, _queue_locked: &Locked<'_>, pool: i32) -> Option<Route> {
        self.routes.usable(pool)
    }

    /// Changes slot `pool` with `f` and publishes its route; `None` if
    /// there is no such slot. A slot that becomes usable gets a new epoch.
    fn update_cache_pool<R>(&self, pool: i32, f: impl FnOnce(&mut CachePool) -> R) -> Option<R> {
        let mut guard = self.pools.lock();
        let pools = &mut *guard;
        let s = pools.slots.get_mut(slot_index(pool)?)?;
        let was_usable = s.usable();
        let r = f(s);
        if s.usable() && !was_usable {
            s.epoch = pools.next_epoch;
            pools.next_epoch = pools.next_epoch.wrapping_add(1) & EPOCH_MASK;
        }
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
        let filtered = !shared && self.filters.enabled();
        // The slot's filters are empty: emptied when it was last closed.
        self.update_cache_pool(index as i32, |s| {
            *s = CachePool {
                id: Some(id),
                uuid,
                shared,
                filtered,
                ..CachePool::default()
            }
        });
        counter(&self.cstats().cleancache_pools);
        pr_info!(
            "filesystem {}: cache pool {index} (device pool {id}, {}{})\n",
            UuidText(uuid),
            if shared { "shared" } else { "private" },
            if filtered { ", filtered" } else { "" }
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
        let qi = self.cache_queue(pool, &key);
        let Ok(mut q) = self.transport.lock(qi) else {
            counter(&self.cstats().cleancache_puts_dropped);
            return;
        };
        let Some(route) = self.cache_route(&q, pool) else {
            // No pool, or a stale one that serves nothing.
            counter(&self.cstats().cleancache_puts_dropped);
            return;
        };
        if route.filtered() {
            // Marked before the put is queued, with the queue locked: a get
            // queued after it is sent.
            let marked = self
                .filters
                .with(qi, pool, |f, budget| f.mark(&key, index, budget))
                // A filtered route always has its filters; were one
                // missing, the page would be untrackable.
                .unwrap_or(Err(Untracked::NoMemory));
            if let Err(why) = marked {
                // Not put. Not on the host either (its bit is clear), so
                // there is no older copy to invalidate.
                counter(&self.cstats().cleancache_puts_dropped);
                counter(match why {
                    Untracked::Full => &self.cstats().cleancache_filter_full,
                    Untracked::NoMemory => &self.cstats().cleancache_filter_nomem,
                });
                return;
            }
        }
        let handle = page_handle(route.id(), key, index);
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
                self.forget_page(qi, pool, route, &key, index);
                let widened = &mut |id, object| self.forget_widened(qi, id, object);
                if !q.invalidate(Op::FlushPage { handle }, Some(widened)) {
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

    /// Before a get: `ENOENT` if `pool` serves nothing now (after
    /// replacing its device pool if it is stale). Process context.
    fn ready_for_get(&self, pool: i32) -> Result {
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
        Ok(())
    }

    fn cache_fetch(&self, pool: i32, key: [u64; 3], index: u64, out: impl FnOnce(&[u8])) -> Result {
        self.ready_for_get(pool)?;
        let qi = self.cache_queue(pool, &key);
        let q = self.transport.lock(qi)?;
        // The filter answers before anything waits for room in a batch.
        let route = self.cache_route(&q, pool).ok_or(ENOENT)?;
        if !self.may_hold(qi, pool, route, &key, index) {
            counter(&self.cstats().cleancache_gets_skipped);
            return Err(ENOENT);
        }
        // The route the GET went to, and whether the filter answered after
        // the wait for room after all.
        let sent: Cell<Option<Route>> = Cell::new(None);
        let skipped = Cell::new(false);
        // Called with the queue locked, right before the GET is queued
        // (the wait for room may have let the route or the page change).
        let handle = || {
            let route = self.routes.usable(pool)?;
            if !self.may_hold(qi, pool, route, &key, index) {
                skipped.set(true);
                return None;
            }
            sent.set(Some(route));
            counter(&self.cstats().cleancache_gets_sent);
            Some(page_handle(route.id(), key, index))
        };
        // Called with the queue locked, with the device's answer. A hit
        // removed the page from the host (exclusive gets), a miss says it is
        // gone: either way the filter forgets it. A failed get keeps it.
        let answer = |a: Answer<'_>| {
            if let Some(route) = sent.get() {
                self.forget_page(qi, pool, route, &key, index);
            }
            match a {
                Answer::Hit(page) => {
                    out(page);
                    Ok(())
                }
                Answer::Miss => {
                    counter(&self.cstats().cleancache_futile_gets);
                    Err(ENOENT)
                }
            }
        };
        // Any failure is a miss to the kernel: it reads the disk.
        let res = q.fetch(handle, answer);
        if skipped.get() {
            counter(&self.cstats().cleancache_gets_skipped);
        }
        if sent.get().is_some() {
            counter(&self.cstats().cleancache_get_requests);
        }
        res?
    }

    /// Reads the pages of a readahead window of file `key` from the host:
    /// `n` pages (at most [`MAX_FETCH`]), the `i`-th at file index
    /// `index(i)`. Every page the filter lets through goes in one request
    /// with one notification (several if a batch holds fewer than the
    /// window's gets), behind the file's pending operations as a single get
    /// is. `out(i, page)` fills the `i`-th page of each hit. Returns the
    /// bitmap of hits (bit `i` for the `i`-th page). Process context.
    pub(crate) fn cache_get_window(
        &self,
        pool: i32,
        key: [u64; 3],
        n: usize,
        index: impl Fn(usize) -> Option<u64>,
        mut out: impl FnMut(usize, &[u8]),
    ) -> u64 {
        let n = n.min(MAX_FETCH);
        let stats = self.cstats();
        counter(&stats.cleancache_get_windows);
        stats.cleancache_get_window_pages.add(n as u64, Relaxed);
        stats.cleancache_gets.add(n as u64, Relaxed);
        let hits = self
            .ready_for_get(pool)
            .map_or(0, |()| self.fetch_window(pool, key, n, &index, &mut out));
        let nr_hits = u64::from(hits.count_ones());
        stats.cleancache_hits.add(nr_hits, Relaxed);
        stats.cleancache_misses.add(n as u64 - nr_hits, Relaxed);
        hits
    }

    /// [`Self::cache_get_window`] for a usable pool: the window in chunks
    /// of as many `GET`s as a request carries.
    fn fetch_window(
        &self,
        pool: i32,
        key: [u64; 3],
        n: usize,
        index: &impl Fn(usize) -> Option<u64>,
        out: &mut impl FnMut(usize, &[u8]),
    ) -> u64 {
        let stats = self.cstats();
        let qi = self.cache_queue(pool, &key);
        let step = self.transport.max_gets();
        let mut hits = 0u64;
        let mut start = 0;
        while start < n {
            let len = step.min(n - start);
            let chunk = start..start + len;
            start += len;
            let Ok(q) = self.transport.lock(qi) else {
                break;
            };
            let Some(route) = self.cache_route(&q, pool) else {
                break;
            };
            // The filter answers before anything waits for room in a batch.
            let wanted = chunk
                .clone()
                .filter(|&i| index(i).is_some_and(|x| self.may_hold(qi, pool, route, &key, x)))
                .count();
            if wanted == 0 {
                stats.cleancache_gets_skipped.add(len as u64, Relaxed);
                continue;
            }
            // The route each page's GET went to; read again with the queue
            // locked right before the GETs are queued, as for a single get
            // (the wait for room may have let the route or a page change).
            let sent: [Cell<Option<(Route, u64)>>; MAX_FETCH] =
                core::array::from_fn(|_| Cell::new(None));
            let skipped = Cell::new(0u64);
            let handle = |j: usize| {
                let x = index(chunk.start + j)?;
                let route = self.routes.usable(pool)?;
                if !self.may_hold(qi, pool, route, &key, x) {
                    skipped.set(skipped.get() + 1);
                    return None;
                }
                sent.get(j)?.set(Some((route, x)));
                Some(page_handle(route.id(), key, x))
            };
            // With the queue locked: a hit removed the page from the host
            // (exclusive gets) and a miss says it is gone, so the filter
            // forgets it either way; a failed GET is not answered and keeps
            // its bit.
            let answer = |j: usize, a: Answer<'_>| {
                let Some((route, x)) = sent.get(j).and_then(Cell::get) else {
                    return;
                };
                self.forget_page(qi, pool, route, &key, x);
                match a {
                    Answer::Hit(page) => {
                        out(chunk.start + j, page);
                        hits |= 1 << (chunk.start + j);
                    }
                    Answer::Miss => counter(&stats.cleancache_futile_gets),
                }
            };
            let res = q.fetch_many(len, handle, answer);
            let nr_sent = sent.iter().filter(|c| c.get().is_some()).count() as u64;
            stats.cleancache_gets_sent.add(nr_sent, Relaxed);
            stats.cleancache_gets_skipped.add(skipped.get(), Relaxed);
            if nr_sent > 0 {
                counter(&stats.cleancache_get_requests);
            }
            if res.is_err() {
                // A stalled or vanished device: the rest of the window is
                // read from the disk.
                break;
            }
        }
        hits
    }

    /// Whether a get of page `index` of `key` must go to the host: always,
    /// unless `route`'s pool is filtered and the host cannot hold the page.
    /// Called with the file's queue locked.
    fn may_hold(&self, qi: usize, pool: i32, route: Route, key: &FileId, index: u64) -> bool {
        !route.filtered()
            || self
                .filters
                .with(qi, pool, |f, _| f.may_hold(key, index))
                .unwrap_or(true)
    }

    /// Page `index` of `key` is no longer on the device pool of `route`.
    /// Called with the file's queue locked. Does nothing if the slot holds
    /// another device pool by now (whose filter was emptied when it opened).
    fn forget_page(&self, qi: usize, pool: i32, route: Route, key: &FileId, index: u64) {
        if route.filtered() && self.routes.usable(pool) == Some(route) {
            self.filters
                .with(qi, pool, |f, budget| f.forget(key, index, budget));
        }
    }

    /// Parked page invalidations of `object` in device pool `id` were
    /// widened into one of the whole file (the parking ring of queue `qi`
    /// was full): every page of it is going, so the filter forgets the file
    /// (instead of sending gets that would miss). Called with the queue
    /// locked; nothing of the file was queued after the parked operations.
    fn forget_widened(&self, qi: usize, id: u32, object: ObjectId) {
        counter(&self.cstats().cleancache_invalidations_widened);
        for pool in 0..MAX_CACHE_POOLS as i32 {
            if let Some(route) = self.routes.usable(pool) {
                if route.id() == id && route.filtered() {
                    self.filters
                        .with(qi, pool, |f, budget| f.forget_file(&object.0, budget));
                }
            }
        }
    }

    /// Drops page `index` of file `key`. May run in atomic context.
    pub(crate) fn cache_invalidate_page(&self, pool: i32, key: [u64; 3], index: u64) {
        counter(&self.cstats().cleancache_invalidate_pages);
        self.cache_invalidate(
            pool,
            &key,
            |id| Op::FlushPage {
                handle: page_handle(id, key, index),
            },
            |f, budget| f.forget(&key, index, budget),
        );
    }

    /// Drops every page of file `key`. May run in atomic context.
    pub(crate) fn cache_invalidate_inode(&self, pool: i32, key: [u64; 3]) {
        counter(&self.cstats().cleancache_invalidate_inodes);
        self.cache_invalidate(
            pool,
            &key,
            |id| Op::FlushObject {
                pool: id,
                object: ObjectId(key),
            },
            |f, budget| f.forget_file(&key, budget),
        );
    }

    /// Queues the invalidation `op` (given the device pool id) and clears
    /// the filter with `forget`, both with the file's queue locked.
    fn cache_invalidate(
        &self,
        pool: i32,
        key: &[u64; 3],
        op: impl FnOnce(u32) -> Op,
        forget: impl FnOnce(&mut Filter, &NodeBudget),
    ) {
        let qi = self.cache_queue(pool, key);
        let Ok(mut q) = self.transport.lock(qi) else {
            return;
        };
        // A stale pool is emptied as a whole before it serves again.
        let Some(route) = self.cache_route(&q, pool) else {
            return;
        };
        if route.filtered() {
            // Whether or not the operation below is lost: a page being
            // invalidated must not be read from the host any more.
            self.filters.with(qi, pool, forget);
        }
        let widened = &mut |id, object| self.forget_widened(qi, id, object);
        if !q.invalidate(op(route.id()), Some(widened)) {
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
        // The slot stays closed (stale) until the new pool is published:
        // no bit is set meanwhile, and none of the new pool's is lost.
        self.filters.clear_slot(pool);
        let new = self.new_cache_pool(uuid);
        let filtered = self.filters.enabled();
        self.update_cache_pool(pool, |s| {
            match new {
                Ok((id, shared)) => {
                    s.id = Some(id);
                    s.shared = shared;
                    s.filtered = !shared && filtered;
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
        // Empty before the slot can be given to another filesystem (which
        // takes the admin lock).
        self.filters.clear_slot(pool);
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

    fn get_pages(
        &self,
        pool: i32,
        key: crate::sys::FileKey,
        pages: &mut crate::sys::PageBatch<'_>,
    ) -> u64 {
        let n = pages.len();
        let mut index = [0u64; crate::sys::GET_BATCH];
        for (i, x) in index.iter_mut().enumerate().take(n) {
            *x = pages.index(i).unwrap_or(0);
        }
        self.cache_get_window(
            pool,
            key.0,
            n.min(crate::sys::GET_BATCH),
            |i| index.get(i).copied(),
            |i, src| pages.write(i, src),
        )
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
