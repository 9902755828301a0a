// SPDX-License-Identifier: GPL-2.0

//! The frontswap front end: swap pages in persistent pools, one per swap
//! area, with reservations. Safe Rust only; it reaches the device through
//! the [`Transport`] and the kernel through `crate::sys`.
//!
//! # Queues
//!
//! Every operation on one swap slot uses the same queue: a slot's queue is
//! chosen from its swap offset, by swap cluster (512 slots), and since the
//! kernel's swap allocator hands each CPU clusters of its own, a CPU mostly
//! fills one queue's batches. Control operations use queue 0.
//!
//! # No lost pages
//!
//! A store is reported done before the device has seen it only if it spent
//! a page of the pool's reservation (`RESERVE`), which the device promises
//! never to refuse. Otherwise the store waits for the device's answer and a
//! refusal makes the kernel write the swap disk. See docs/guest-driver.md.

use crate::batch::Batch;
use crate::stats::Stats;
use crate::transport::{counter, AnswerHook, Flush, Transport};
use crate::wire::{self, Handle, ObjectId, Op, OpStatus, PoolSpec, Status};
use core::fmt;
use kernel::{
    new_spinlock_irq,
    prelude::*,
    sync::{Arc, SpinLockIrq},
};

/// Swap areas the kernel can have (`MAX_SWAP_TYPES` is below this).
const MAX_SWAP_TYPES: usize = 32;

/// Swap slots per cluster: the unit of queue selection.
const CLUSTER_SHIFT: u32 = 9;

/// Stores without refill attempts after the device granted nothing.
const RESERVE_BACKOFF: u32 = 64;

#[derive(Clone, Copy, Default)]
struct PoolSlot {
    /// Device pool id while the swap area is on.
    id: Option<u32>,
    /// Reserved device pages not yet spent by a store.
    avail: u64,
    /// Pages asked for by a RESERVE still in flight.
    pending: u64,
    /// Stores to let pass before asking again after an empty grant.
    backoff: u32,
}

/// The pool of each swap area and its reservation.
struct Pools {
    slots: [PoolSlot; MAX_SWAP_TYPES],
    /// Reservation to keep per pool (0: none).
    target: u64,
}

impl Pools {
    fn id(&self, ty: usize) -> Option<u32> {
        self.slots.get(ty).and_then(|s| s.id)
    }

    fn open(&mut self, ty: usize, id: u32) {
        if let Some(s) = self.slots.get_mut(ty) {
            *s = PoolSlot {
                id: Some(id),
                ..PoolSlot::default()
            };
        }
    }

    fn close(&mut self, ty: usize) -> Option<u32> {
        let s = self.slots.get_mut(ty)?;
        let id = s.id;
        *s = PoolSlot::default();
        id
    }

    /// Takes one reserved page if there is one, and decides whether to ask
    /// for more (returns the number of pages to ask for; the caller sends a
    /// `RESERVE` for them).
    fn claim(&mut self, ty: usize, refill_allowed: bool) -> (bool, Option<u64>) {
        let target = self.target;
        let Some(s) = self.slots.get_mut(ty) else {
            return (false, None);
        };
        let reserved = if s.avail > 0 {
            s.avail -= 1;
            true
        } else {
            false
        };
        let mut refill = None;
        if refill_allowed && target > 0 && s.pending == 0 && s.avail < target / 2 {
            if s.backoff > 0 {
                s.backoff -= 1;
            } else {
                s.pending = target - s.avail;
                refill = Some(s.pending);
            }
        }
        (reserved, refill)
    }

    fn begin_reserve(&mut self, ty: usize, pages: u64) {
        if let Some(s) = self.slots.get_mut(ty) {
            s.pending += pages;
        }
    }

    /// The device answered a `RESERVE` of `asked` pages in `pool`.
    fn reserve_done(&mut self, pool: u32, asked: u64, granted: u64) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.id == Some(pool)) {
            s.pending = s.pending.saturating_sub(asked);
            s.avail += granted;
            if granted == 0 {
                s.backoff = RESERVE_BACKOFF;
            }
        }
    }
}

/// The swap pools and the frontswap counters. The transport reports every
/// answered batch here ([`AnswerHook`]), so that reservations granted and
/// reserved puts refused are accounted for although nobody waits for them.
#[pin_data]
pub(crate) struct SwapState {
    #[pin]
    pools: SpinLockIrq<Pools>,
    stats: Stats,
}

impl SwapState {
    /// Pools that keep `reserve_pages` reserved pages each.
    pub(crate) fn new(reserve_pages: u32) -> impl PinInit<Self> {
        pin_init!(SwapState {
            pools <- new_spinlock_irq!(
                Pools {
                    slots: [PoolSlot::default(); MAX_SWAP_TYPES],
                    target: u64::from(reserve_pages),
                },
                "vtmem_pools"
            ),
            stats: Stats::new(),
        })
    }
}

impl AnswerHook for SwapState {
    /// Applies the side effects of an answered batch: reservations granted,
    /// reserved puts checked.
    fn answered(&self, b: &Batch) {
        for meta in b.ops() {
            let st = meta.result.unwrap_or(OpStatus::new(Status::DeviceError));
            match meta.op {
                Op::Reserve { pool, pages } => {
                    let granted = if st.status == Status::Ok {
                        st.value.min(pages)
                    } else {
                        0
                    };
                    self.stats
                        .reserve_granted
                        .add(granted, kernel::sync::atomic::Relaxed);
                    self.pools.lock().reserve_done(pool, pages, granted);
                }
                Op::Put {
                    handle,
                    reserved: true,
                } if st.status != Status::Ok => {
                    counter(&self.stats.reserved_put_failures);
                    pr_err!(
                        "device refused a reserved put (pool {} slot {}): {}\n",
                        handle.pool,
                        handle.index,
                        st.status.name()
                    );
                }
                _ => {}
            }
        }
    }

    /// Counts how an asynchronous load ended, as `get_page` counts its own.
    fn async_get_ended(&self, outcome: Result) {
        match outcome {
            Ok(()) => counter(&self.stats.hits),
            Err(e) if e == ENOENT => counter(&self.stats.misses),
            Err(_) => counter(&self.stats.load_errors),
        }
    }
}

fn handle(pool: u32, ty: usize, offset: u64) -> Handle {
    Handle {
        pool,
        object: ObjectId([ty as u64, 0, 0]),
        index: offset,
    }
}

/// The frontswap front end of a device.
pub(crate) struct Frontswap {
    transport: Arc<Transport>,
    state: Arc<SwapState>,
    /// `VTMEM_F_RESERVE` was negotiated.
    reserve: bool,
    /// Reservation to keep per pool (0: none).
    reserve_pages: u32,
    /// Loads may travel asynchronously, a readahead window per request.
    async_loads: bool,
}

impl Frontswap {
    pub(crate) fn new(
        transport: Arc<Transport>,
        state: Arc<SwapState>,
        reserve: bool,
        reserve_pages: u32,
        async_loads: bool,
    ) -> Self {
        Self {
            transport,
            state,
            reserve,
            reserve_pages,
            async_loads,
        }
    }

    fn stats(&self) -> &Stats {
        &self.state.stats
    }

    /// The queue of swap slot `offset`.
    fn queue_for(&self, offset: u64) -> usize {
        let n = self.transport.len() as u64;
        // The transport has at least one queue (no division by zero).
        (offset >> CLUSTER_SHIFT).checked_rem(n).unwrap_or(0) as usize
    }

    fn pool_id(&self, ty: usize) -> Option<u32> {
        self.state.pools.lock().id(ty)
    }

    /// Writes the counters for debugfs.
    pub(crate) fn show_stats(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.stats()
            .for_each(&mut |name, v| writeln!(f, "{name} {v}"))
    }

    /// Writes one line per swap pool for debugfs.
    pub(crate) fn show_pools(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pools = self.state.pools.lock();
        for (ty, s) in pools.slots.iter().enumerate() {
            if let Some(id) = s.id {
                writeln!(
                    f,
                    "pool type={ty} id={id} reserved={} pending={}",
                    s.avail, s.pending
                )?;
            }
        }
        Ok(())
    }

    /// A swap area was turned on: create its pool and reservation.
    #[cfg_attr(not(CONFIG_FRONTSWAP), allow(dead_code))]
    pub(crate) fn init_area(&self, ty: usize) {
        if ty >= MAX_SWAP_TYPES {
            return;
        }
        let st = match self
            .transport
            .call(0, [Op::NewPool(PoolSpec::persistent())])
        {
            Ok([st]) => st,
            Err(e) => {
                pr_err!("swap area {ty}: cannot create a pool: {:?}\n", e);
                return;
            }
        };
        if st.status != Status::Ok {
            pr_warn!(
                "swap area {ty}: device refused a pool: {}\n",
                st.status.name()
            );
            return;
        }
        let pool = st.value as u32;
        let target = u64::from(self.reserve_pages);
        {
            let mut pools = self.state.pools.lock();
            pools.open(ty, pool);
            if self.reserve && target > 0 {
                pools.begin_reserve(ty, target);
            }
        }
        counter(&self.stats().pools_created);
        if self.reserve && target > 0 {
            counter(&self.stats().reserve_requests);
            if let Err(e) = self.transport.call(
                0,
                [Op::Reserve {
                    pool,
                    pages: target,
                }],
            ) {
                pr_warn!("swap area {ty}: RESERVE failed: {:?}\n", e);
            }
        }
        let reserved = self.state.pools.lock().slots.get(ty).map_or(0, |s| s.avail);
        pr_info!("swap area {ty}: pool {pool}, {reserved} pages reserved\n");
    }

    /// Stores one page, whose bytes `fill` writes into the batch.
    pub(crate) fn put_page(&self, ty: usize, offset: u64, fill: impl FnOnce(&mut [u8])) -> Result {
        counter(&self.stats().stores);
        let Some(pool) = self.pool_id(ty) else {
            counter(&self.stats().store_errors);
            return Err(ENODEV);
        };
        let mut q = self.transport.lock(self.queue_for(offset))?;
        // Room for the PUT and a RESERVE refill.
        if let Err(e) = q.wait_room(2, 1) {
            counter(&self.stats().store_errors);
            return Err(e);
        }
        let (reserved, refill) = self.state.pools.lock().claim(ty, self.reserve);
        let slot = q.push(Op::Put {
            handle: handle(pool, ty, offset),
            reserved,
        })?;
        if let Some(page) = q.page_mut(slot) {
            fill(page);
        }
        let mut refilling = false;
        if let Some(pages) = refill {
            if q.push(Op::Reserve { pool, pages }).is_ok() {
                counter(&self.stats().reserve_requests);
                refilling = true;
            } else {
                self.state.pools.lock().reserve_done(pool, pages, 0);
            }
        }
        if reserved {
            counter(&self.stats().stores_reserved);
            if q.is_full() {
                q.send(Flush::Full);
            } else if refilling {
                // Stores on other queues spend the same reservation: the
                // refill must not wait for this batch to fill up.
                q.send(Flush::Refill);
            } else {
                q.arm();
            }
            return Ok(());
        }
        // No reservation: the kernel must learn whether the device took it.
        counter(&self.stats().stores_sync);
        let st = q.wait_answer(slot, |b, i| b.ops().get(i).and_then(|m| m.result))?;
        match st.map(|s| s.status) {
            Some(Status::Ok) => {
                counter(&self.stats().stores_sync_ok);
                Ok(())
            }
            Some(Status::NoSpace | Status::OverQuota | Status::Frozen) => {
                counter(&self.stats().refusals);
                Err(ENOSPC)
            }
            _ => {
                counter(&self.stats().store_errors);
                Err(EIO)
            }
        }
    }

    /// Loads one page; `out` receives its bytes on a hit.
    pub(crate) fn get_page(&self, ty: usize, offset: u64, out: impl FnOnce(&[u8])) -> Result {
        counter(&self.stats().loads);
        let pool = self.pool_id(ty).ok_or(ENODEV)?;
        let h = handle(pool, ty, offset);
        let res = self
            .transport
            .fetch(self.queue_for(offset), || Some(h), out);
        match res {
            Ok(()) => counter(&self.stats().hits),
            Err(e) if e == ENOENT => counter(&self.stats().misses),
            Err(_) => counter(&self.stats().load_errors),
        }
        res
    }

    /// Starts loading one page into `load` without waiting: its `GET` joins
    /// the open batch of the slot's queue (behind every store and
    /// invalidation of the slot queued before it) and goes out with the
    /// rest of the readahead window at [`Frontswap::unplug`], or earlier
    /// if the batch fills. The answer's interrupt ends `load`. `Err` gives
    /// `load` back unstarted (asynchronous loads off, no pool, no room, or
    /// the device stalled or gone): the kernel then loads it with
    /// [`Frontswap::get_page`].
    #[cfg(CONFIG_FRONTSWAP)]
    pub(crate) fn start_load(
        &self,
        ty: usize,
        offset: u64,
        load: crate::sys::AsyncLoad,
    ) -> core::result::Result<(), crate::sys::AsyncLoad> {
        if !self.async_loads {
            return Err(load);
        }
        let Some(pool) = self.pool_id(ty) else {
            return Err(load);
        };
        let Ok(mut q) = self.transport.lock(self.queue_for(offset)) else {
            return Err(load);
        };
        q.get_async(handle(pool, ty, offset), load)?;
        counter(&self.stats().loads);
        counter(&self.stats().loads_async);
        Ok(())
    }

    /// The kernel ended a batch of reads: send the loads started so far.
    pub(crate) fn unplug(&self) {
        self.transport.unplug();
    }

    /// Drops one page. May be called in atomic context: never sleeps.
    pub(crate) fn flush_page(&self, ty: usize, offset: u64) {
        counter(&self.stats().invalidates);
        let Some(pool) = self.pool_id(ty) else {
            return;
        };
        let Ok(mut q) = self.transport.lock(self.queue_for(offset)) else {
            return;
        };
        let op = Op::FlushPage {
            handle: handle(pool, ty, offset),
        };
        // Swap invalidations are never widened: a swap area is one object
        // whose other pages must stay.
        if !q.invalidate(op, None) {
            counter(&self.stats().invalidates_dropped);
        }
    }

    /// A swap area was turned off: every page of it is gone.
    pub(crate) fn flush_area(&self, ty: usize) {
        counter(&self.stats().invalidate_areas);
        let Some(pool) = self.state.pools.lock().close(ty) else {
            return;
        };
        self.transport.drain();
        match self.transport.call(0, [Op::DestroyPool { pool }]) {
            Ok([st]) if st.status == Status::Ok => {
                pr_info!("swap area {ty}: pool {pool} destroyed\n")
            }
            Ok([st]) => pr_warn!("swap area {ty}: DESTROY_POOL: {}\n", st.status.name()),
            Err(e) => pr_warn!("swap area {ty}: DESTROY_POOL failed: {:?}\n", e),
        }
    }

    /// Stores and loads a few pages through a temporary pool (`selftest=1`).
    pub(crate) fn selftest(&self) -> Result {
        let [st] = self
            .transport
            .call(0, [Op::NewPool(PoolSpec::persistent())])?;
        if st.status != Status::Ok {
            pr_err!("selftest: NEW_POOL: {}\n", st.status.name());
            return Err(EIO);
        }
        let pool = st.value as u32;
        let ty = MAX_SWAP_TYPES - 1;
        self.state.pools.lock().open(ty, pool);
        if self.reserve {
            self.state.pools.lock().begin_reserve(ty, 16);
            self.transport.call(0, [Op::Reserve { pool, pages: 16 }])?;
        }
        let pattern = |off: u64, page: &mut [u8]| {
            for (i, b) in page.iter_mut().enumerate() {
                *b = (off as u8).wrapping_mul(31).wrapping_add(i as u8);
            }
        };
        const N: u64 = 40;
        let mut stored = 0;
        for off in 0..N {
            if self.put_page(ty, off * 3, |p| pattern(off * 3, p)).is_ok() {
                stored += 1;
            }
        }
        let mut good = 0;
        let mut expect = [0u8; wire::PAGE_SIZE];
        for off in 0..N {
            pattern(off * 3, &mut expect);
            let mut same = false;
            if self
                .get_page(ty, off * 3, |p| same = p == &expect[..])
                .is_ok()
                && same
            {
                good += 1;
            }
        }
        for off in 0..N {
            self.flush_page(ty, off * 3);
        }
        let miss = self.get_page(ty, 0, |_| ());
        self.flush_area(ty);
        let after_flush = if miss == Err(ENOENT) {
            "miss"
        } else {
            "UNEXPECTED"
        };
        pr_info!(
            "selftest: stored {stored}/{N}, verified {good}/{N}, load after flush: {after_flush}\n"
        );
        if good == N && miss == Err(ENOENT) {
            Ok(())
        } else {
            Err(EIO)
        }
    }

    /// Destroys every swap pool (device removal, after unregistering).
    pub(crate) fn close_areas(&self) {
        for ty in 0..MAX_SWAP_TYPES {
            if self.pool_id(ty).is_some() {
                self.flush_area(ty);
            }
        }
    }
}

#[cfg(CONFIG_FRONTSWAP)]
impl crate::sys::FrontswapBackend for Frontswap {
    fn init(&self, ty: usize, _nr_pages: u64) {
        self.init_area(ty);
    }

    fn store(&self, ty: usize, offset: u64, page: &crate::sys::PageRef<'_>) -> Result {
        self.put_page(ty, offset, |dst| page.read(dst))
    }

    fn load(&self, ty: usize, offset: u64, page: &mut crate::sys::PageRef<'_>) -> Result {
        self.get_page(ty, offset, |src| page.write(src))
    }

    fn load_async(
        &self,
        ty: usize,
        offset: u64,
        load: crate::sys::AsyncLoad,
    ) -> core::result::Result<(), crate::sys::AsyncLoad> {
        self.start_load(ty, offset, load)
    }

    fn unplug(&self) {
        Frontswap::unplug(self);
    }

    fn invalidate_page(&self, ty: usize, offset: u64) {
        self.flush_page(ty, offset);
    }

    fn invalidate_area(&self, ty: usize) {
        self.flush_area(ty);
    }
}
