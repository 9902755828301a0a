// SPDX-License-Identifier: GPL-2.0

//! The vtmem device: queues, batching, reservations and the frontswap
//! operations. Safe Rust only; C is reached through `crate::sys`.
//!
//! # Queues and ordering
//!
//! The driver uses one request queue per CPU (up to the device's
//! `num_request_queues`). The protocol orders requests only within a queue,
//! so every operation on one swap slot must use the same queue: a slot's
//! queue is chosen from its swap offset, by swap cluster (512 slots), and
//! since the kernel's swap allocator hands each CPU clusters of its own, a
//! CPU mostly fills one queue's batches.
//!
//! # Batches
//!
//! Each queue has `batches_per_queue` preallocated batches. A batch is
//! *open* (being filled), *ready* (sealed, waiting for ring room), *in
//! flight* (owned by the virtqueue), *done* (answered, holding results for
//! waiting threads) or *free*. An open batch goes out when it is full, when
//! the flush timer fires, or at once when a thread needs the answer (a
//! load, a store without reservation, a control operation). Operations of
//! one queue are sent in the order they were added, so a load behind a
//! store of the same slot, in the same batch or a later one, sees it.
//!
//! # No lost pages
//!
//! A store is reported done before the device has seen it only if it spent
//! a page of the pool's reservation (`RESERVE`), which the device promises
//! never to refuse. Otherwise the store waits for the device's answer and a
//! refusal makes the kernel write the swap disk. See docs/guest-driver.md.
//!
//! The cleancache operations (clean page-cache pages, ephemeral pools) are
//! in the child module `cleancache`; they share the queues and batches.

use crate::batch::Batch;
use crate::stats::{CacheStats, QueueStats, Stats};
use crate::sys::{self, VirtioDevice, VirtioDriver};
use crate::wire::{self, DeviceConfig, Handle, ObjectId, Op, OpStatus, PoolSpec, Status};
use core::fmt;
use kernel::{
    debugfs::{Dir, File},
    new_condvar, new_mutex, new_spinlock_irq,
    prelude::*,
    sync::{Arc, CondVar, Mutex, SpinLockIrq, SpinLockIrqGuard},
    time::{
        hrtimer::{
            HrTimer, HrTimerCallback, HrTimerCallbackContext, HrTimerRestart, RelativeSoftMode,
        },
        Delta, Monotonic,
    },
};

#[path = "cleancache.rs"]
mod cleancache;

/// Swap areas the kernel can have (`MAX_SWAPFILES` is below this).
pub(crate) const MAX_SWAP_TYPES: usize = 32;

/// Swap slots per cluster: the unit of queue selection.
const CLUSTER_SHIFT: u32 = 9;

/// Invalidations a queue can park while all its batches are busy.
const OVERFLOW_FLUSHES: usize = 1024;

/// Stores without refill attempts after the device granted nothing.
const RESERVE_BACKOFF: u32 = 64;

#[cfg(CONFIG_FRONTSWAP)]
type SwapRegistration = sys::FrontswapRegistration;
/// Without frontswap in the kernel there is nothing to register.
#[cfg(not(CONFIG_FRONTSWAP))]
type SwapRegistration = ();

#[cfg(CONFIG_CLEANCACHE)]
type CacheRegistration = sys::CleancacheRegistration;
/// Without cleancache in the kernel there is nothing to register.
#[cfg(not(CONFIG_CLEANCACHE))]
type CacheRegistration = ();

/// Tunables, from the module parameters.
#[derive(Clone, Copy)]
pub(crate) struct Params {
    pub(crate) batch_size: u32,
    pub(crate) batch_timeout_us: u32,
    pub(crate) batches_per_queue: u32,
    pub(crate) reserve_pages: u32,
    pub(crate) max_queues: u32,
    pub(crate) selftest: bool,
    pub(crate) cleancache: bool,
    pub(crate) cleancache_shared: bool,
}

// ---------------------------------------------------------------------------
// Pools and reservations

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
pub(crate) struct Pools {
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

// ---------------------------------------------------------------------------
// State shown in debugfs

/// Counters and pool state, shared with the debugfs file.
pub(crate) struct Shared {
    stats: Stats,
    cache_stats: CacheStats,
    queue_stats: KVec<QueueStats>,
    pools: Pin<KBox<SpinLockIrq<Pools>>>,
    cache_pools: Pin<KBox<SpinLockIrq<cleancache::CachePools>>>,
    cache_routes: cleancache::CacheRoutes,
}

impl Shared {
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.stats
            .for_each(&mut |name, v| writeln!(f, "{name} {v}"))?;
        self.cache_stats
            .for_each(&mut |name, v| writeln!(f, "{name} {v}"))?;
        let mut sums = [0u64; 16];
        for qs in self.queue_stats.iter() {
            let mut i = 0;
            qs.for_each(&mut |_, v| {
                if let Some(s) = sums.get_mut(i) {
                    *s += v;
                }
                i += 1;
                Ok(())
            })?;
        }
        let mut i = 0;
        QueueStats::new().for_each(&mut |name, _| {
            let v = sums.get(i).copied().unwrap_or(0);
            i += 1;
            writeln!(f, "{name} {v}")
        })?;
        let (batches, puts) = (sums[0], sums[2]);
        if batches > 0 {
            let avg = puts * 100 / batches;
            writeln!(f, "avg_puts_per_batch {}.{:02}", avg / 100, avg % 100)?;
        } else {
            writeln!(f, "avg_puts_per_batch 0.00")?;
        }
        writeln!(f, "queues {}", self.queue_stats.len())?;
        let pools = self.pools.lock();
        for (ty, s) in pools.slots.iter().enumerate() {
            if let Some(id) = s.id {
                writeln!(
                    f,
                    "pool type={ty} id={id} reserved={} pending={}",
                    s.avail, s.pending
                )?;
            }
        }
        drop(pools);
        self.cache_pools.lock().show(f)
    }
}

// ---------------------------------------------------------------------------
// Queues

/// An invalidation parked in a [`FlushRing`].
#[derive(Clone, Copy)]
struct Parked {
    op: Op,
    /// May be widened to a `FLUSH_OBJECT` of its object. Only for ephemeral
    /// pools: dropping more of a cache is harmless, while a swap area is one
    /// object whose pages must stay.
    widen: bool,
}

/// The (pool, object) an invalidation applies to.
fn flushed_object(op: &Op) -> Option<(u32, ObjectId)> {
    match *op {
        Op::FlushPage { handle } => Some((handle.pool, handle.object)),
        Op::FlushObject { pool, object } => Some((pool, object)),
        _ => None,
    }
}

/// Invalidations (`FLUSH_PAGE`, `FLUSH_OBJECT`) waiting for a free batch,
/// oldest first (fixed capacity, never allocates).
struct FlushRing {
    buf: KVec<Parked>,
    head: usize,
    len: usize,
}

impl FlushRing {
    fn new(cap: usize) -> Result<Self> {
        let mut buf = KVec::with_capacity(cap.max(1), GFP_KERNEL)?;
        let filler = Parked {
            op: Op::FlushPage {
                handle: Handle::default(),
            },
            widen: false,
        };
        buf.extend_with(cap.max(1), filler, GFP_KERNEL)?;
        Ok(Self {
            buf,
            head: 0,
            len: 0,
        })
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Parks `op`; when the ring is full, first makes room by widening (see
    /// [`FlushRing::compact`]). `false` if there is still no room.
    fn push(&mut self, op: Op, widen: bool) -> bool {
        let cap = self.buf.len();
        if self.len == cap {
            self.compact();
        }
        if self.len == cap {
            return false;
        }
        if let Some(slot) = self.buf.get_mut((self.head + self.len) % cap) {
            *slot = Parked { op, widen };
            self.len += 1;
            true
        } else {
            false
        }
    }

    /// Merges each run of widenable invalidations of one object into one
    /// `FLUSH_OBJECT` of it. Page cache eviction goes file by file, so the
    /// runs are long. Invalidations commute and nothing else is parked
    /// between them, so the device still sees everything in order.
    fn compact(&mut self) {
        let cap = self.buf.len();
        let mut kept: usize = 0;
        for i in 0..self.len {
            let Some(entry) = self.buf.get((self.head + i) % cap).copied() else {
                return;
            };
            let prev = kept
                .checked_sub(1)
                .and_then(|k| self.buf.get_mut((self.head + k) % cap))
                .filter(|prev| prev.widen && entry.widen);
            if let Some(prev) = prev {
                let object = flushed_object(&prev.op);
                if let Some((pool, object)) = object.filter(|_| object == flushed_object(&entry.op))
                {
                    prev.op = Op::FlushObject { pool, object };
                    continue;
                }
            }
            if let Some(slot) = self.buf.get_mut((self.head + kept) % cap) {
                *slot = entry;
            }
            kept += 1;
        }
        self.len = kept;
    }

    fn front(&self) -> Option<Op> {
        if self.len == 0 {
            return None;
        }
        self.buf.get(self.head).map(|p| p.op)
    }

    fn pop(&mut self) {
        if self.len > 0 {
            self.head = (self.head + 1) % self.buf.len();
            self.len -= 1;
        }
    }
}

struct QueueInner {
    vq: Option<sys::Virtqueue<Batch>>,
    open: Option<KBox<Batch>>,
    free: KVec<KBox<Batch>>,
    ready: KVec<KBox<Batch>>,
    done: KVec<KBox<Batch>>,
    in_flight: usize,
    next_seq: u64,
    /// Invalidations that found no batch. While it is not empty no other
    /// operation is added to a batch: they go out first, in order.
    overflow: FlushRing,
    timer_armed: bool,
    timer_seq: u64,
    dead: bool,
    sleepers: u32,
}

type QGuard<'a> = SpinLockIrqGuard<'a, QueueInner>;

impl QueueInner {
    /// Whether [`Self::open_with_room`] can succeed with the batches at
    /// hand (the open one, or a free one).
    fn has_room(&self, n: usize, pages: usize) -> bool {
        let open_fits = self.open.as_ref().is_some_and(|b| b.has_room(n, pages));
        !self.dead && ((open_fits && self.overflow.is_empty()) || !self.free.is_empty())
    }

    /// The open batch if it has room for `n` operations, `pages` of them with
    /// a page; otherwise seals it and opens a free one. `None` if no batch is
    /// free (or the device is gone).
    ///
    /// Parked invalidations (`overflow`) are moved into fresh batches first,
    /// so that they reach the device before any later operation.
    fn open_with_room(&mut self, stats: &QueueStats, n: usize, pages: usize) -> Option<&mut Batch> {
        if self.dead {
            return None;
        }
        loop {
            let fits = self.open.as_ref().is_some_and(|b| b.has_room(n, pages));
            if fits && self.overflow.is_empty() {
                break;
            }
            if self.open.as_ref().is_some_and(|b| !b.is_empty()) {
                stats.full_flushes.add(1, kernel::sync::atomic::Relaxed);
            }
            self.seal();
            let mut b = self.free.pop()?;
            self.next_seq += 1;
            b.reset(self.next_seq);
            while let Some(op) = self.overflow.front() {
                if b.push(op).is_err() {
                    break;
                }
                self.overflow.pop();
            }
            self.open = Some(b);
        }
        self.open.as_deref_mut()
    }

    /// Seals the open batch: it goes out at the next `pump`.
    fn seal(&mut self) {
        let Some(mut b) = self.open.take() else {
            return;
        };
        if b.is_empty() {
            self.recycle(b);
            return;
        }
        b.seal();
        // Every batch is in exactly one place and `ready` can hold them all.
        if let Err(e) = self.ready.push_within_capacity(b) {
            pr_err!("internal error: ready list full\n");
            drop(e);
        }
    }

    fn recycle(&mut self, b: KBox<Batch>) {
        if self.free.push_within_capacity(b).is_err() {
            pr_err!("internal error: free list full\n");
        }
    }

    /// A batch was answered (or failed): hand it to its waiters or free it.
    fn finish(&mut self, b: KBox<Batch>) {
        if b.waiters > 0 {
            if let Err(e) = self.done.push_within_capacity(b) {
                pr_err!("internal error: done list full\n");
                drop(e);
            }
        } else {
            self.recycle(b);
        }
    }

    /// Makes the ready batches available to the device, in order, and
    /// notifies it once if it wants to be.
    fn pump(&mut self, stats: &QueueStats) {
        use kernel::sync::atomic::Relaxed;
        let Some(vq) = self.vq.as_mut() else {
            return;
        };
        let mut added = false;
        let mut failed = None;
        while !self.ready.is_empty() {
            let Ok(b) = self.ready.remove(0) else {
                break;
            };
            let (ops, puts) = (b.len() as u64, b.puts() as u64);
            match vq.add(b) {
                Ok(()) => {
                    self.in_flight += 1;
                    stats.batches.add(1, Relaxed);
                    stats.ops.add(ops, Relaxed);
                    stats.puts.add(puts, Relaxed);
                    added = true;
                }
                Err((e, b)) if e == ENOSPC => {
                    stats.ring_full.add(1, Relaxed);
                    if let Err(e) = self.ready.insert_within_capacity(0, b) {
                        pr_err!("internal error: cannot requeue a batch\n");
                        drop(e);
                    }
                    break;
                }
                Err((e, mut b)) => {
                    // A chain the virtio core rejects cannot succeed later.
                    pr_err!("cannot queue a request: {:?}\n", e);
                    b.fail(Status::DeviceError);
                    failed = Some(b);
                    break;
                }
            }
        }
        if let Some(b) = failed {
            self.finish(b);
        }
        if added {
            if let Some(vq) = self.vq.as_mut() {
                if vq.kick() {
                    stats.notifications.add(1, Relaxed);
                }
            }
        }
    }
}

/// One request queue.
#[pin_data(PinnedDrop)]
pub(crate) struct Queue {
    index: usize,
    timeout: Delta,
    shared: Arc<Shared>,
    #[pin]
    inner: SpinLockIrq<QueueInner>,
    #[pin]
    cv: CondVar,
    #[pin]
    timer: HrTimer<Queue>,
}

kernel::impl_has_hr_timer! {
    impl HasHrTimer<Self> for Queue {
        mode: RelativeSoftMode<Monotonic>,
        field: self.timer
    }
}

impl HrTimerCallback for Queue {
    type Pointer<'a> = Pin<&'a Queue>;

    fn run(this: Pin<&Queue>, _ctx: HrTimerCallbackContext<'_, Self>) -> HrTimerRestart {
        this.timer_fired();
        HrTimerRestart::NoRestart
    }
}

// SAFETY: `Queue`'s `PinnedDrop` cancels the timer, and the callback only
// uses the queue it is embedded in.
unsafe impl sys::CancelTimerOnDrop for Queue {}

#[pinned_drop]
impl PinnedDrop for Queue {
    fn drop(self: Pin<&mut Self>) {
        sys::cancel_timer(&*self);
    }
}

impl Queue {
    fn new(index: usize, shared: Arc<Shared>, p: &Params, max_ops: u16) -> Result<Pin<KBox<Self>>> {
        let n = p.batches_per_queue.clamp(1, 64) as usize;
        let slots = (p.batch_size as u16).clamp(1, max_ops);
        let mut free = KVec::with_capacity(n, GFP_KERNEL)?;
        for _ in 0..n {
            free.push(Batch::new(max_ops, slots)?, GFP_KERNEL)?;
        }
        let inner = QueueInner {
            vq: None,
            open: None,
            free,
            ready: KVec::with_capacity(n, GFP_KERNEL)?,
            done: KVec::with_capacity(n, GFP_KERNEL)?,
            in_flight: 0,
            next_seq: 0,
            overflow: FlushRing::new(OVERFLOW_FLUSHES)?,
            timer_armed: false,
            timer_seq: 0,
            dead: false,
            sleepers: 0,
        };
        let timeout = Delta::from_micros(i64::from(p.batch_timeout_us.max(1)));
        KBox::pin_init(
            try_pin_init!(Queue {
                index,
                timeout,
                shared,
                inner <- new_spinlock_irq!(inner, "vtmem_queue"),
                cv <- new_condvar!("vtmem_queue_cv"),
                timer <- HrTimer::new(),
            }),
            GFP_KERNEL,
        )
    }

    fn stats(&self) -> &QueueStats {
        // `Device::probe` creates one entry per queue.
        self.shared
            .queue_stats
            .get(self.index)
            .unwrap_or(&self.shared.queue_stats[0])
    }

    fn timer_fired(self: Pin<&Self>) {
        let mut g = self.inner.lock();
        g.timer_armed = false;
        if g.dead {
            return;
        }
        let Some((seq, empty)) = g.open.as_ref().map(|b| (b.seq, b.is_empty())) else {
            return;
        };
        if empty {
            return;
        }
        if seq == g.timer_seq {
            g.seal();
            self.stats()
                .timer_flushes
                .add(1, kernel::sync::atomic::Relaxed);
            g.pump(self.stats());
        } else {
            // The batch the timer was armed for left already; this one is
            // younger: give it a full timeout.
            g.timer_seq = seq;
            g.timer_armed = true;
            sys::start_timer(self, self.timeout);
        }
    }

    /// Arms the flush timer for the open batch unless it is armed.
    fn arm(self: Pin<&Self>, g: &mut QGuard<'_>) {
        if g.timer_armed || g.dead {
            return;
        }
        if let Some(seq) = g.open.as_ref().filter(|b| !b.is_empty()).map(|b| b.seq) {
            g.timer_seq = seq;
            g.timer_armed = true;
            sys::start_timer(self, self.timeout);
        }
    }

    /// Waits until the open batch has room for `n` operations, `pages` of
    /// them with a page. Process context only.
    fn wait_open(&self, g: &mut QGuard<'_>, n: usize, pages: usize) -> Result {
        loop {
            if g.dead {
                return Err(ENODEV);
            }
            if g.open_with_room(self.stats(), n, pages).is_some() {
                return Ok(());
            }
            g.pump(self.stats());
            g.sleepers += 1;
            self.cv.wait(g);
            g.sleepers -= 1;
        }
    }

    /// Waits for the batch `seq` to be answered and reads its results with
    /// `f`. Process context only.
    fn wait_result<R>(
        &self,
        g: &mut QGuard<'_>,
        seq: u64,
        f: impl FnOnce(&Batch) -> R,
    ) -> Result<R> {
        loop {
            if g.dead {
                return Err(ENODEV);
            }
            if let Some(pos) = g.done.iter().position(|b| b.seq == seq) {
                let (r, last) = match g.done.get_mut(pos) {
                    Some(b) => {
                        let r = f(b);
                        b.waiters -= 1;
                        (r, b.waiters == 0)
                    }
                    None => return Err(EIO),
                };
                if last {
                    if let Ok(b) = g.done.remove(pos) {
                        g.recycle(b);
                    }
                    if g.sleepers > 0 {
                        self.cv.notify_all();
                    }
                }
                return Ok(r);
            }
            g.sleepers += 1;
            self.cv.wait(g);
            g.sleepers -= 1;
        }
    }

    /// Sends the open batch now, for a waiting thread.
    fn flush_for_answer(&self, g: &mut QGuard<'_>) {
        g.seal();
        self.stats()
            .sync_flushes
            .add(1, kernel::sync::atomic::Relaxed);
        g.pump(self.stats());
    }
}

// ---------------------------------------------------------------------------
// The device

/// A bound vtmem device.
#[pin_data]
pub(crate) struct Device {
    cfg: DeviceConfig,
    /// `VTMEM_F_RESERVE` was negotiated.
    reserve: bool,
    /// `VTMEM_F_EPHEMERAL` was negotiated.
    ephemeral: bool,
    /// `VTMEM_F_SHARED` was negotiated.
    shared_pools: bool,
    params: Params,
    shared: Arc<Shared>,
    queues: KVec<Pin<KBox<Queue>>>,
    /// The frontswap registration, from start to remove.
    #[pin]
    swap: Mutex<Option<SwapRegistration>>,
    /// The cleancache registration, from start to remove.
    #[pin]
    cache: Mutex<Option<CacheRegistration>>,
    /// Serialises creating, replacing and destroying cache pools.
    #[pin]
    cache_admin: Mutex<()>,
    _debugfs: Dir,
    #[pin]
    _stats_file: File<Arc<Shared>>,
}

fn handle(pool: u32, ty: usize, offset: u64) -> Handle {
    Handle {
        pool,
        object: ObjectId([ty as u64, 0, 0]),
        index: offset,
    }
}

fn counter(c: &kernel::sync::atomic::Atomic<u64>) {
    c.add(1, kernel::sync::atomic::Relaxed);
}

impl Device {
    fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    fn queue_for(&self, offset: u64) -> Result<&Pin<KBox<Queue>>> {
        let n = self.queues.len() as u64;
        if n == 0 {
            return Err(ENODEV);
        }
        self.queues
            .get(((offset >> CLUSTER_SHIFT) % n) as usize)
            .ok_or(ENODEV)
    }

    fn pool_id(&self, ty: usize) -> Option<u32> {
        self.shared.pools.lock().id(ty)
    }

    /// Sends `ops` in one request on queue `qi` and waits for the answer.
    fn call<const N: usize>(&self, qi: usize, ops: [Op; N]) -> Result<[OpStatus; N]> {
        let q = self.queues.get(qi).ok_or(ENODEV)?;
        let mut g = q.inner.lock();
        q.wait_open(&mut g, N, 0)?;
        let b = g.open.as_deref_mut().ok_or(EIO)?;
        let first = b.len();
        for op in ops {
            b.push(op)?;
        }
        b.waiters += 1;
        let seq = b.seq;
        q.flush_for_answer(&mut g);
        q.wait_result(&mut g, seq, |b| {
            let mut out = [OpStatus::new(Status::DeviceError); N];
            for (i, o) in out.iter_mut().enumerate() {
                if let Some(r) = b.ops().get(first + i).and_then(|m| m.result) {
                    *o = r;
                }
            }
            out
        })
    }

    /// Takes back every batch the device has answered on `q` (also outside
    /// its interrupt: a put that found no free batch may find one here) and
    /// wakes the threads waiting on the queue. True if any came back.
    fn reap(&self, q: &Queue, g: &mut QGuard<'_>) -> bool {
        let mut answered = false;
        while let Some((mut b, len)) = g.vq.as_mut().and_then(|vq| vq.get_buf()) {
            g.in_flight = g.in_flight.saturating_sub(1);
            q.stats().completions.add(1, kernel::sync::atomic::Relaxed);
            let _ = b.complete(len);
            self.account(&b);
            g.finish(b);
            answered = true;
        }
        if answered && g.sleepers > 0 {
            q.cv.notify_all();
        }
        answered
    }

    /// Applies the side effects of an answered batch: reservations granted,
    /// reserved puts checked.
    fn account(&self, b: &Batch) {
        for meta in b.ops() {
            let st = meta.result.unwrap_or(OpStatus::new(Status::DeviceError));
            match meta.op {
                Op::Reserve { pool, pages } => {
                    let granted = if st.status == Status::Ok {
                        st.value.min(pages)
                    } else {
                        0
                    };
                    self.stats()
                        .reserve_granted
                        .add(granted, kernel::sync::atomic::Relaxed);
                    self.shared.pools.lock().reserve_done(pool, pages, granted);
                }
                Op::Put {
                    handle,
                    reserved: true,
                } if st.status != Status::Ok => {
                    counter(&self.stats().reserved_put_failures);
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

    // --- frontswap operations ------------------------------------------------

    /// A swap area was turned on: create its pool and reservation.
    #[cfg_attr(not(CONFIG_FRONTSWAP), allow(dead_code))]
    pub(crate) fn init_area(&self, ty: usize) {
        if ty >= MAX_SWAP_TYPES {
            return;
        }
        let st = match self.call(0, [Op::NewPool(PoolSpec::persistent())]) {
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
        let target = u64::from(self.params.reserve_pages);
        {
            let mut pools = self.shared.pools.lock();
            pools.open(ty, pool);
            if self.reserve && target > 0 {
                pools.begin_reserve(ty, target);
            }
        }
        counter(&self.stats().pools_created);
        if self.reserve && target > 0 {
            counter(&self.stats().reserve_requests);
            if let Err(e) = self.call(
                0,
                [Op::Reserve {
                    pool,
                    pages: target,
                }],
            ) {
                pr_warn!("swap area {ty}: RESERVE failed: {:?}\n", e);
            }
        }
        let reserved = self
            .shared
            .pools
            .lock()
            .slots
            .get(ty)
            .map_or(0, |s| s.avail);
        pr_info!("swap area {ty}: pool {pool}, {reserved} pages reserved\n");
    }

    /// Stores one page, whose bytes `fill` writes into the batch.
    pub(crate) fn put_page(&self, ty: usize, offset: u64, fill: impl FnOnce(&mut [u8])) -> Result {
        use kernel::sync::atomic::Relaxed;
        counter(&self.stats().stores);
        let Some(pool) = self.pool_id(ty) else {
            counter(&self.stats().store_errors);
            return Err(ENODEV);
        };
        let q = self.queue_for(offset)?;
        let mut g = q.inner.lock();
        // Room for the PUT and a RESERVE refill.
        if let Err(e) = q.wait_open(&mut g, 2, 1) {
            counter(&self.stats().store_errors);
            return Err(e);
        }
        let (reserved, refill) = self.shared.pools.lock().claim(ty, self.reserve);
        let Some(b) = g.open.as_deref_mut() else {
            return Err(EIO);
        };
        let index = b.push(Op::Put {
            handle: handle(pool, ty, offset),
            reserved,
        })?;
        if let Some(page) = b.page_mut(index) {
            fill(page);
        }
        let mut refilling = false;
        if let Some(pages) = refill {
            if b.push(Op::Reserve { pool, pages }).is_ok() {
                counter(&self.stats().reserve_requests);
                refilling = true;
            } else {
                self.shared.pools.lock().reserve_done(pool, pages, 0);
            }
        }
        if reserved {
            counter(&self.stats().stores_reserved);
            if b.is_full() {
                g.seal();
                q.stats().full_flushes.add(1, Relaxed);
                g.pump(q.stats());
            } else if refilling {
                // Stores on other queues spend the same reservation: the
                // refill must not wait for this batch to fill up.
                g.seal();
                q.stats().refill_flushes.add(1, Relaxed);
                g.pump(q.stats());
            } else {
                q.as_ref().arm(&mut g);
            }
            return Ok(());
        }
        // No reservation: the kernel must learn whether the device took it.
        counter(&self.stats().stores_sync);
        b.waiters += 1;
        let seq = b.seq;
        q.flush_for_answer(&mut g);
        let st = q.wait_result(&mut g, seq, |b| b.ops().get(index).and_then(|m| m.result))?;
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
        let res = self.fetch(self.queue_for(offset)?, || Some(h), out);
        match res {
            Ok(()) => counter(&self.stats().hits),
            Err(e) if e == ENOENT => counter(&self.stats().misses),
            Err(_) => counter(&self.stats().load_errors),
        }
        res
    }

    /// Sends a `GET` on `q` at once (behind every operation queued there
    /// before) and waits for it. `Ok` on a hit, after `out` read the page;
    /// `ENOENT` on a miss. `handle` names the page; it is called with the
    /// queue locked, right before the `GET` is queued (`None`: a miss).
    /// Process context only.
    fn fetch(
        &self,
        q: &Queue,
        handle: impl FnOnce() -> Option<Handle>,
        out: impl FnOnce(&[u8]),
    ) -> Result {
        let mut g = q.inner.lock();
        q.wait_open(&mut g, 1, 1)?;
        let handle = handle().ok_or(ENOENT)?;
        let Some(b) = g.open.as_deref_mut() else {
            return Err(EIO);
        };
        let index = b.push(Op::Get { handle })?;
        b.waiters += 1;
        let seq = b.seq;
        q.flush_for_answer(&mut g);
        q.wait_result(&mut g, seq, |b| {
            match b.ops().get(index).and_then(|m| m.result).map(|s| s.status) {
                Some(Status::Ok) => match b.page(index) {
                    Some(page) => {
                        out(page);
                        Ok(())
                    }
                    None => Err(EIO),
                },
                Some(Status::Miss) => Err(ENOENT),
                _ => Err(EIO),
            }
        })?
    }

    /// Drops one page. May be called in atomic context: never sleeps.
    pub(crate) fn flush_page(&self, ty: usize, offset: u64) {
        counter(&self.stats().invalidates);
        let Some(pool) = self.pool_id(ty) else {
            return;
        };
        let Ok(q) = self.queue_for(offset) else {
            return;
        };
        let op = Op::FlushPage {
            handle: handle(pool, ty, offset),
        };
        if !self.invalidate(q, op, false) {
            counter(&self.stats().invalidates_dropped);
        }
    }

    /// Queues an invalidation (`FLUSH_PAGE`, `FLUSH_OBJECT`) on `q` without
    /// sleeping: into the open batch, or parked until a batch is free.
    /// `false` if even the parking ring was full and `op` is lost.
    /// Frontswap's invalidations are never widened.
    fn invalidate(&self, q: &Pin<KBox<Queue>>, op: Op, widen: bool) -> bool {
        let mut g = q.inner.lock();
        Self::queue_invalidation(q, &mut g, op, widen)
    }

    /// [`Device::invalidate`] with the queue already locked.
    /// `widen`: if parking room runs out, the device may be asked to drop
    /// the whole object instead (ephemeral pools only).
    fn queue_invalidation(q: &Pin<KBox<Queue>>, g: &mut QGuard<'_>, op: Op, widen: bool) -> bool {
        use kernel::sync::atomic::Relaxed;
        if g.dead {
            // The device and everything it held are gone.
            return true;
        }
        let full = match g.open_with_room(q.stats(), 1, 0) {
            Some(b) => {
                let _ = b.push(op);
                Some(b.is_full())
            }
            None => None,
        };
        let mut kept = true;
        match full {
            Some(true) => {
                g.seal();
                q.stats().full_flushes.add(1, Relaxed);
            }
            Some(false) => q.as_ref().arm(g),
            None => {
                kept = g.overflow.push(op, widen);
                // A batch half filled from the overflow must not wait for
                // the next operation.
                q.as_ref().arm(g);
            }
        }
        g.pump(q.stats());
        kept
    }

    /// A swap area was turned off: every page of it is gone.
    pub(crate) fn flush_area(&self, ty: usize) {
        counter(&self.stats().invalidate_areas);
        let Some(pool) = self.shared.pools.lock().close(ty) else {
            return;
        };
        self.drain();
        match self.call(0, [Op::DestroyPool { pool }]) {
            Ok([st]) if st.status == Status::Ok => {
                pr_info!("swap area {ty}: pool {pool} destroyed\n")
            }
            Ok([st]) => pr_warn!("swap area {ty}: DESTROY_POOL: {}\n", st.status.name()),
            Err(e) => pr_warn!("swap area {ty}: DESTROY_POOL failed: {:?}\n", e),
        }
    }

    /// Sends every pending operation, parked invalidations included, and
    /// waits until the device answered them all.
    fn drain(&self) {
        for q in self.queues.iter() {
            let mut g = q.inner.lock();
            loop {
                if !g.overflow.is_empty() {
                    let _ = g.open_with_room(q.stats(), 0, 0);
                }
                g.seal();
                g.pump(q.stats());
                let idle = g.in_flight == 0 && g.ready.is_empty() && g.overflow.is_empty();
                if g.dead || idle {
                    break;
                }
                g.sleepers += 1;
                q.cv.wait(&mut g);
                g.sleepers -= 1;
            }
        }
    }

    /// Stores and loads a few pages through a temporary pool (`selftest=1`).
    fn selftest(&self) -> Result {
        let [st] = self.call(0, [Op::NewPool(PoolSpec::persistent())])?;
        if st.status != Status::Ok {
            pr_err!("selftest: NEW_POOL: {}\n", st.status.name());
            return Err(EIO);
        }
        let pool = st.value as u32;
        let ty = MAX_SWAP_TYPES - 1;
        self.shared.pools.lock().open(ty, pool);
        if self.reserve {
            self.shared.pools.lock().begin_reserve(ty, 16);
            self.call(0, [Op::Reserve { pool, pages: 16 }])?;
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

    /// Stops all use of the device and deletes its queues.
    fn teardown(&self, vdev: &VirtioDevice) {
        self.close_cache_pools();
        for ty in 0..MAX_SWAP_TYPES {
            if self.pool_id(ty).is_some() {
                self.flush_area(ty);
            }
        }
        for q in self.queues.iter() {
            let mut g = q.inner.lock();
            g.dead = true;
            q.cv.notify_all();
            drop(g);
            sys::cancel_timer(&**q);
        }
        vdev.del_vqs(self.queues.iter().filter_map(|q| {
            let mut g = q.inner.lock();
            let vq = g.vq.take();
            // Requests still queued are failed for their waiters, who
            // already left (the queue is dead).
            if let Some(mut b) = g.open.take() {
                b.fail(Status::DeviceError);
                g.recycle(b);
            }
            vq
        }));
    }
}

impl VirtioDriver for Device {
    const NAME: &'static CStr = c"vtmem";
    const DEVICE_ID: u32 = wire::VIRTIO_ID_TMEM;
    const FEATURES: &'static [u32] = &[
        wire::VTMEM_F_EPHEMERAL,
        wire::VTMEM_F_SHARED,
        wire::VTMEM_F_MQ,
        wire::VTMEM_F_RESERVE,
    ];

    fn probe(vdev: &VirtioDevice) -> Result<Arc<Self>> {
        let params = crate::params();
        let mut raw = [0u8; wire::CONFIG_SIZE];
        vdev.read_config(&mut raw)?;
        let cfg = DeviceConfig::decode(&raw).map_err(|e| {
            pr_err!("unusable device configuration: {:?}\n", e);
            EINVAL
        })?;
        let mq = vdev.has_feature(wire::VTMEM_F_MQ);
        let reserve = vdev.has_feature(wire::VTMEM_F_RESERVE);
        let offered = if mq { cfg.num_request_queues } else { 1 };
        let mut nq = u32::from(offered).min(kernel::cpu::nr_cpu_ids()).max(1);
        if params.max_queues > 0 {
            nq = nq.min(params.max_queues);
        }
        let max_ops = cfg.max_ops_per_request.min(wire::MAX_OPS_PER_REQUEST);

        let mut queue_stats = KVec::with_capacity(nq as usize, GFP_KERNEL)?;
        for _ in 0..nq {
            queue_stats.push(QueueStats::new(), GFP_KERNEL)?;
        }
        let shared = Arc::new(
            Shared {
                stats: Stats::new(),
                cache_stats: CacheStats::new(),
                queue_stats,
                pools: KBox::pin_init(
                    new_spinlock_irq!(
                        Pools {
                            slots: [PoolSlot::default(); MAX_SWAP_TYPES],
                            target: u64::from(params.reserve_pages),
                        },
                        "vtmem_pools"
                    ),
                    GFP_KERNEL,
                )?,
                cache_pools: KBox::pin_init(
                    new_spinlock_irq!(cleancache::CachePools::new(), "vtmem_cache_pools"),
                    GFP_KERNEL,
                )?,
                cache_routes: cleancache::CacheRoutes::new(),
            },
            GFP_KERNEL,
        )?;
        let mut queues = KVec::with_capacity(nq as usize, GFP_KERNEL)?;
        for i in 0..nq as usize {
            queues.push(Queue::new(i, shared.clone(), &params, max_ops)?, GFP_KERNEL)?;
        }
        let slots = (params.batch_size as u16).clamp(1, max_ops);
        let vqs = vdev.find_vqs::<Device, Batch>(nq as usize, usize::from(slots) + 2)?;
        let ring = vqs.first().map_or(0, |vq| vq.size());
        for (q, vq) in queues.iter().zip(vqs) {
            q.inner.lock().vq = Some(vq);
        }
        let debugfs = Dir::new(c"vtmem");
        let file_data = shared.clone();
        let dev = Arc::pin_init(
            try_pin_init!(Device {
                cfg,
                reserve,
                ephemeral: vdev.has_feature(wire::VTMEM_F_EPHEMERAL),
                shared_pools: vdev.has_feature(wire::VTMEM_F_SHARED),
                params,
                shared: shared.clone(),
                queues,
                swap <- new_mutex!(None, "vtmem_swap"),
                cache <- new_mutex!(None, "vtmem_cache"),
                cache_admin <- new_mutex!((), "vtmem_cache_admin"),
                _stats_file <- debugfs.read_callback_file(
                    c"stats",
                    file_data,
                    &|s: &Arc<Shared>, f: &mut fmt::Formatter<'_>| s.show(f)
                ),
                _debugfs: debugfs,
            }),
            GFP_KERNEL,
        );
        let dev = match dev {
            Ok(dev) => dev,
            Err(e) => {
                // `queues` moved into the failed initialiser and was dropped;
                // the virtqueues went with it, so delete them now.
                vdev.del_vqs::<Batch>(core::iter::empty());
                return Err(e);
            }
        };
        pr_info!(
            "virtio{}: protocol {}, {} of {} queue(s), ring {}, batch {} pages / {} us, reserve {}\n",
            vdev.index(),
            dev.cfg.version,
            nq,
            offered,
            ring,
            slots,
            params.batch_timeout_us,
            if reserve { params.reserve_pages } else { 0 }
        );
        Ok(dev)
    }

    fn start(this: &Arc<Self>, _vdev: &VirtioDevice) -> Result {
        let [st] = this.call(0, [Op::Reset])?;
        if st.status != Status::Ok {
            pr_err!("RESET failed: {}\n", st.status.name());
            return Err(EIO);
        }
        pr_info!("device reset, ready\n");
        if this.params.selftest {
            match this.selftest() {
                Ok(()) => pr_info!("selftest passed\n"),
                Err(_) => pr_err!("selftest FAILED\n"),
            }
        }
        #[cfg(CONFIG_FRONTSWAP)]
        {
            let reg = sys::FrontswapRegistration::register(this.clone())?;
            *this.swap.lock() = Some(reg);
            pr_info!("registered as the frontswap backend\n");
        }
        #[cfg(not(CONFIG_FRONTSWAP))]
        pr_warn!("kernel without frontswap: the device is not used for swap\n");
        if this.params.cleancache {
            Self::register_cache(this);
        }
        Ok(())
    }

    fn queue_done(&self, index: u32) {
        let Some(q) = self.queues.get(index as usize) else {
            return;
        };
        let mut g = q.inner.lock();
        loop {
            let Some(vq) = g.vq.as_mut() else {
                break;
            };
            vq.disable_cb();
            self.reap(q, &mut g);
            if g.vq.as_mut().is_none_or(|vq| vq.enable_cb()) {
                break;
            }
        }
        if !g.overflow.is_empty() {
            // Batches came back: send the parked invalidations.
            let _ = g.open_with_room(q.stats(), 0, 0);
            q.as_ref().arm(&mut g);
        }
        g.pump(q.stats());
    }

    fn remove(&self, vdev: &VirtioDevice) {
        self.unregister_cache();
        #[cfg(CONFIG_FRONTSWAP)]
        if let Some(mut reg) = self.swap.lock().take() {
            // frontswap pins the module while it holds pages, so this only
            // fails when the device is unbound or unplugged with swap pages
            // in it: those pages are lost.
            match reg.unregister() {
                Ok(()) => pr_info!("unregistered from frontswap\n"),
                Err(e) => pr_err!(
                    "device removed while holding swap pages ({:?}): they are lost\n",
                    e
                ),
            }
        }
        self.teardown(vdev);
        pr_info!("device removed\n");
    }
}

#[cfg(CONFIG_FRONTSWAP)]
impl sys::FrontswapBackend for Device {
    fn init(&self, ty: usize, _nr_pages: u64) {
        self.init_area(ty);
    }

    fn store(&self, ty: usize, offset: u64, page: &sys::PageRef<'_>) -> Result {
        self.put_page(ty, offset, |dst| page.read(dst))
    }

    fn load(&self, ty: usize, offset: u64, page: &mut sys::PageRef<'_>) -> Result {
        self.get_page(ty, offset, |src| page.write(src))
    }

    fn invalidate_page(&self, ty: usize, offset: u64) {
        self.flush_page(ty, offset);
    }

    fn invalidate_area(&self, ty: usize) {
        self.flush_area(ty);
    }
}
