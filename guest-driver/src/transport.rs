// SPDX-License-Identifier: GPL-2.0

//! The transport: request queues, batches, requests and their answers.
//! Safe Rust only; the virtqueues are reached through `crate::sys`.
//!
//! It knows the protocol's operations but not what they are for: the front
//! ends (`crate::frontswap`, `crate::cleancache`) choose a queue, lock it
//! and put their operations into its open batch ([`Locked`]), or send a
//! request and wait for its answer ([`Transport::call`],
//! [`Transport::fetch`], [`Locked::fetch`]). Answers nobody waits for reach a front end through
//! an [`AnswerHook`].
//!
//! # Queues and ordering
//!
//! The protocol orders requests only within a queue, so a front end sends
//! every operation on one page (one swap slot, one file) through one queue.
//! Operations of one queue are sent in the order they were added, so a get
//! behind a put of the same page, in the same batch or a later one, sees
//! it.
//!
//! # Batches
//!
//! Each queue has `batches_per_queue` preallocated batches. A batch is
//! *open* (being filled), *ready* (sealed, waiting for ring room), *in
//! flight* (owned by the virtqueue), *done* (answered, holding results for
//! waiting threads) or *free*. An open batch goes out when it is full, when
//! the flush timer fires, or at once when a thread needs the answer.
//!
//! Invalidations never sleep: one that finds no batch is parked in a fixed
//! ring, and parked invalidations go out before anything queued after them.
//!
//! # Asynchronous gets
//!
//! A swap-in may be a `GET` nobody waits for ([`Locked::get_async`]): it
//! joins the open batch like any operation, the page it is for waits in
//! the queue's table of pending loads, and the batch goes out when it is
//! full, when the front end unplugs the queue ([`Transport::unplug`], at
//! the end of a readahead window) or at the flush timeout. When the batch
//! is answered (interrupt context), each pending load takes its page from
//! the batch and is ended. A device that stalls or goes away fails the
//! pending loads: none is left waiting for an answer that may never come.

use crate::batch::Batch;
use crate::stats::QueueStats;
use crate::sys::{self, OnTimer, Timed, VirtioDevice, VirtioDriver};
use crate::wire::{Handle, ObjectId, Op, OpStatus, Status};
use core::fmt;
use kernel::{
    new_condvar, new_spinlock_irq,
    prelude::*,
    sync::{
        atomic::{Atomic, Relaxed},
        Arc, CondVar, SpinLockIrq, SpinLockIrqGuard,
    },
    time::{Delta, Instant, Monotonic},
};

/// Invalidations a queue can park while all its batches are busy.
const OVERFLOW_FLUSHES: usize = 1024;
/// How often threads waiting for the device wake to look at the clock:
/// they never sleep long enough to look hung, however long the device is
/// away.
const WATCH_TICK: Delta = Delta::from_secs(1);

/// Adds one to an event counter.
pub(crate) fn counter(c: &Atomic<u64>) {
    c.add(1, Relaxed);
}

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
    /// [`FlushRing::compact`], which tells `widened`). `false` if there is
    /// still no room.
    fn push(&mut self, op: Op, widen: bool, widened: &mut dyn FnMut(u32, ObjectId)) -> bool {
        let cap = self.buf.len();
        if self.len == cap {
            self.compact(widened);
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
    /// `FLUSH_OBJECT` of it, and tells `widened` of each (pool, object) so
    /// widened. Page cache eviction goes file by file, so the runs are
    /// long. Invalidations commute and nothing else is parked between them,
    /// so the device still sees everything in order; and nothing is queued
    /// while invalidations are parked, so every operation queued before
    /// them comes before the `FLUSH_OBJECT` too.
    fn compact(&mut self, widened: &mut dyn FnMut(u32, ObjectId)) {
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
                    if matches!(prev.op, Op::FlushPage { .. }) {
                        widened(pool, object);
                    }
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
    /// The timer is armed as the waiters' watchdog tick, not for a flush.
    watching: bool,
    dead: bool,
    sleepers: u32,
    /// When the device last answered, or was given work while it had none.
    last_answer: Instant<Monotonic>,
    /// The device has had work and given no answer for the device timeout:
    /// waits fail and no operation is taken until it answers again.
    stalled: bool,
    /// Batches whose waiters gave up on a stalled device (sequence number,
    /// waiters gone): freed when the device gives them back.
    abandoned: KVec<(u64, u32)>,
    /// Asynchronous gets whose batch has not been answered, oldest first
    /// (room for a `GET` in every page slot of every batch).
    loads: KVec<PendingLoad>,
    /// Learns how each asynchronous get ended.
    hook: Arc<dyn AnswerHook>,
}

#[cfg(CONFIG_FRONTSWAP)]
use sys::AsyncLoad;

/// Without frontswap there are no asynchronous loads.
#[cfg(not(CONFIG_FRONTSWAP))]
pub(crate) enum AsyncLoad {}

#[cfg(not(CONFIG_FRONTSWAP))]
impl AsyncLoad {
    fn end(self, _answer: core::result::Result<&[u8], Error>) {
        match self {}
    }
}

/// An asynchronous `GET` waiting for its batch's answer.
struct PendingLoad {
    /// The batch and the operation's index in it.
    seq: u64,
    index: usize,
    load: AsyncLoad,
}

/// The answer to the `GET` at `index` of the answered batch `b`: the page
/// or a miss; an error status (or no result) is `EIO`.
fn get_answer(b: &Batch, index: usize) -> Result<Answer<'_>> {
    match b.ops().get(index).and_then(|m| m.result).map(|s| s.status) {
        Some(Status::Ok) => b.page(index).map(Answer::Hit).ok_or(EIO),
        Some(Status::Miss) => Ok(Answer::Miss),
        _ => Err(EIO),
    }
}

type QGuard<'a> = SpinLockIrqGuard<'a, QueueInner>;

impl QueueInner {
    /// Whether [`Self::open_with_room`] can succeed with the batches at
    /// hand (the open one, or a free one).
    fn has_room(&self, n: usize, pages: usize) -> bool {
        let open_fits = self.open.as_ref().is_some_and(|b| b.has_room(n, pages));
        !self.dead
            && !self.stalled
            && ((open_fits && self.overflow.is_empty()) || !self.free.is_empty())
    }

    /// The open batch if it has room for `n` operations, `pages` of them with
    /// a page; otherwise seals it and opens a free one. `None` if no batch is
    /// free (or the device is gone).
    ///
    /// Parked invalidations (`overflow`) are moved into fresh batches first,
    /// so that they reach the device before any later operation.
    fn open_with_room(&mut self, stats: &QueueStats, n: usize, pages: usize) -> Option<&mut Batch> {
        if self.dead || self.stalled {
            return None;
        }
        loop {
            let fits = self.open.as_ref().is_some_and(|b| b.has_room(n, pages));
            if fits && self.overflow.is_empty() {
                break;
            }
            if self.open.as_ref().is_some_and(|b| !b.is_empty()) {
                stats.full_flushes.add(1, Relaxed);
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

    /// Whether the device is stalled: it has had work and no answer for
    /// `timeout` (`None`: never). Marks it so the first time.
    fn check_stall(&mut self, timeout: Option<Delta>, stats: &QueueStats) -> bool {
        if self.stalled {
            return true;
        }
        let Some(timeout) = timeout else {
            return false;
        };
        if self.in_flight == 0 || self.last_answer.elapsed() < timeout {
            return false;
        }
        self.stalled = true;
        counter(&stats.device_stalls);
        pr_warn!(
            "device gave no answer for {} ms: failing waits until it answers\n",
            timeout.as_millis()
        );
        true
    }

    /// A waiter of batch `seq` gives up: the batch is freed without it.
    fn abandon(&mut self, seq: u64) {
        if let Some(e) = self.abandoned.iter_mut().find(|(s, _)| *s == seq) {
            e.1 += 1;
        } else if self.abandoned.push_within_capacity((seq, 1)).is_err() {
            // One entry a batch: never full.
            pr_err!("internal error: abandoned list full\n");
        }
    }

    fn recycle(&mut self, b: KBox<Batch>) {
        if self.free.push_within_capacity(b).is_err() {
            pr_err!("internal error: free list full\n");
        }
    }

    /// Ends the asynchronous gets of the answered (or failed) batch `b`
    /// with their answers.
    fn end_loads(&mut self, b: &Batch, stats: &QueueStats) {
        let mut i = 0;
        while let Some(p) = self.loads.get(i) {
            if p.seq != b.seq {
                i += 1;
                continue;
            }
            let Ok(p) = self.loads.remove(i) else {
                break;
            };
            let answer = match get_answer(b, p.index) {
                Ok(Answer::Hit(page)) => Ok(page),
                Ok(Answer::Miss) => Err(ENOENT),
                Err(e) => Err(e),
            };
            if answer.is_err() {
                counter(&stats.async_gets_failed);
            }
            self.hook.async_get_ended(answer.map(|_| ()));
            p.load.end(answer);
        }
    }

    /// Fails every asynchronous get not answered yet (a stalled device, a
    /// device going away). Their batches, when answered, end no load.
    fn fail_loads(&mut self, e: Error, stats: &QueueStats) {
        for p in self.loads.drain_all() {
            counter(&stats.async_gets_failed);
            self.hook.async_get_ended(Err(e));
            p.load.end(Err(e));
        }
    }

    /// Whether asynchronous gets wait for an answer.
    fn has_loads(&self) -> bool {
        !self.loads.is_empty()
    }

    /// Whether the open batch carries asynchronous gets.
    fn open_has_loads(&self) -> bool {
        self.open
            .as_ref()
            .is_some_and(|b| self.loads.iter().any(|p| p.seq == b.seq))
    }

    /// A batch was answered (or failed): end its asynchronous gets, and
    /// hand it to its waiters or free it.
    fn finish(&mut self, mut b: KBox<Batch>, stats: &QueueStats) {
        self.end_loads(&b, stats);
        if let Some(pos) = self.abandoned.iter().position(|&(seq, _)| seq == b.seq) {
            if let Ok((_, gone)) = self.abandoned.remove(pos) {
                b.waiters = b.waiters.saturating_sub(gone);
            }
        }
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
        let Some(vq) = self.vq.as_mut() else {
            return;
        };
        let mut added = false;
        let mut failed = None;
        let mut gets = 0;
        while !self.ready.is_empty() {
            let Ok(b) = self.ready.remove(0) else {
                break;
            };
            let (ops, puts) = (b.len() as u64, b.puts() as u64);
            let batch_gets = b.gets() as u64;
            match vq.add(b) {
                Ok(()) => {
                    if self.in_flight == 0 {
                        // The device's silence counts from now.
                        self.last_answer = Instant::now();
                    }
                    self.in_flight += 1;
                    stats.batches.add(1, Relaxed);
                    stats.ops.add(ops, Relaxed);
                    stats.puts.add(puts, Relaxed);
                    stats.gets.add(batch_gets, Relaxed);
                    gets += batch_gets;
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
            self.finish(b, stats);
        }
        if added {
            if let Some(vq) = self.vq.as_mut() {
                if vq.kick() {
                    stats.notifications.add(1, Relaxed);
                    if gets > 0 {
                        stats.get_notifications.add(1, Relaxed);
                    }
                }
            }
        }
    }
}

/// One request queue; it lives in a [`Timed`], whose timer is the queue's
/// flush timer.
#[pin_data]
struct Queue {
    timeout: Delta,
    /// How long the device may keep work unanswered before waits fail
    /// (`None`: they never do).
    device_timeout: Option<Delta>,
    stats: QueueStats,
    #[pin]
    inner: SpinLockIrq<QueueInner>,
    #[pin]
    cv: CondVar,
}

impl OnTimer for Queue {
    fn fired(this: Pin<&Timed<Queue>>) {
        let mut g = this.inner.lock();
        g.timer_armed = false;
        let watching = core::mem::replace(&mut g.watching, false);
        if g.dead {
            return;
        }
        let open = g.open.as_ref().filter(|b| !b.is_empty()).map(|b| b.seq);
        match open {
            Some(seq) if seq == g.timer_seq && !watching => {
                g.seal();
                this.stats().timer_flushes.add(1, Relaxed);
                g.pump(this.stats());
            }
            Some(seq) => {
                // The batch the timer was armed for left already (or this
                // was a watchdog tick); this one is younger: give it a full
                // timeout.
                g.timer_seq = seq;
                g.timer_armed = true;
                this.start(this.timeout);
            }
            None => {}
        }
        if g.sleepers > 0 {
            // The watchdog tick: waiters look at the clock, and sleep on.
            this.cv.notify_all();
            this.watch(&mut g);
        }
        if g.has_loads() {
            // Nobody sleeps here for an asynchronous get: the tick looks
            // at the clock for it, and a stalled device fails it.
            if g.check_stall(this.device_timeout, this.stats()) {
                g.fail_loads(ETIMEDOUT, this.stats());
            } else {
                this.watch(&mut g);
            }
        }
    }
}

impl Timed<Queue> {
    /// Arms the flush timer for the open batch unless it is armed (a
    /// watchdog tick gives way: the flush fires sooner, and re-arms it).
    fn arm(self: Pin<&Self>, g: &mut QGuard<'_>) {
        if (g.timer_armed && !g.watching) || g.dead {
            return;
        }
        if let Some(seq) = g.open.as_ref().filter(|b| !b.is_empty()).map(|b| b.seq) {
            g.timer_seq = seq;
            g.timer_armed = true;
            g.watching = false;
            self.start(self.timeout);
        }
    }

    /// Arms the watchdog tick unless the timer is armed: a thread is about
    /// to wait for the device.
    fn watch(self: Pin<&Self>, g: &mut QGuard<'_>) {
        if g.timer_armed || g.dead {
            return;
        }
        g.timer_armed = true;
        g.watching = true;
        self.start(WATCH_TICK);
    }

    /// Sleeps until notified or the next watchdog tick.
    fn sleep(self: Pin<&Self>, g: &mut QGuard<'_>) {
        self.watch(g);
        g.sleepers += 1;
        self.cv.wait(g);
        g.sleepers -= 1;
    }

    /// Waits until the open batch has room for `n` operations, `pages` of
    /// them with a page. Process context only. `ETIMEDOUT` once the device
    /// is stalled.
    fn wait_open(self: Pin<&Self>, g: &mut QGuard<'_>, n: usize, pages: usize) -> Result {
        loop {
            if g.dead {
                return Err(ENODEV);
            }
            if g.stalled {
                counter(&self.stats().stalled_refusals);
                return Err(ETIMEDOUT);
            }
            if g.open_with_room(self.stats(), n, pages).is_some() {
                return Ok(());
            }
            g.pump(self.stats());
            if g.check_stall(self.device_timeout, self.stats()) {
                counter(&self.stats().waits_timed_out);
                return Err(ETIMEDOUT);
            }
            self.sleep(g);
        }
    }

    /// Waits for the batch `seq` to be answered and reads its results with
    /// `f`. Process context only. `ETIMEDOUT` once the device is stalled:
    /// the batch is then freed without this waiter when it comes back.
    fn wait_result<R>(
        self: Pin<&Self>,
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
            if g.check_stall(self.device_timeout, self.stats()) {
                g.abandon(seq);
                counter(&self.stats().waits_timed_out);
                return Err(ETIMEDOUT);
            }
            self.sleep(g);
        }
    }
}

impl Queue {
    fn new(p: &QueueParams, hook: Arc<dyn AnswerHook>) -> Result<Pin<KBox<Timed<Self>>>> {
        let n = p.batches.clamp(1, 64) as usize;
        let mut free = KVec::with_capacity(n, GFP_KERNEL)?;
        for _ in 0..n {
            free.push(Batch::new(p.max_ops, p.slots)?, GFP_KERNEL)?;
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
            watching: false,
            dead: false,
            sleepers: 0,
            last_answer: Instant::now(),
            stalled: false,
            abandoned: KVec::with_capacity(n, GFP_KERNEL)?,
            loads: KVec::with_capacity(n * usize::from(p.slots.max(1)), GFP_KERNEL)?,
            hook,
        };
        let timeout = Delta::from_micros(i64::from(p.timeout_us.max(1)));
        let device_timeout =
            (p.device_timeout_ms > 0).then(|| Delta::from_millis(i64::from(p.device_timeout_ms)));
        KBox::pin_init(
            Timed::new(try_pin_init!(Queue {
                timeout,
                device_timeout,
                stats: QueueStats::new(),
                inner <- new_spinlock_irq!(inner, "vtmem_queue"),
                cv <- new_condvar!("vtmem_queue_cv"),
            })),
            GFP_KERNEL,
        )
    }

    fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// Sends the open batch now, for a waiting thread.
    fn flush_for_answer(&self, g: &mut QGuard<'_>) {
        g.seal();
        self.stats().sync_flushes.add(1, Relaxed);
        g.pump(self.stats());
    }
}

// ---------------------------------------------------------------------------
// The transport

/// Learns of every batch the device answered, whether or not a thread
/// waits for it: how a front end sees the outcome of operations it did not
/// wait for (reservations granted, reserved puts checked). Called in
/// interrupt context or with a queue locked: must not sleep.
pub(crate) trait AnswerHook: Send + Sync {
    /// The device answered `batch`; every operation has its result.
    fn answered(&self, batch: &Batch);
    /// An asynchronous get ([`Locked::get_async`]) ended: `Ok` a hit,
    /// `ENOENT` a miss, another error a failure (device error, stalled or
    /// gone).
    fn async_get_ended(&self, outcome: Result);
}

/// Sizes of each queue.
pub(crate) struct QueueParams {
    /// Preallocated batches per queue.
    pub(crate) batches: u32,
    /// Operations per batch.
    pub(crate) max_ops: u16,
    /// Page buffers per batch.
    pub(crate) slots: u16,
    /// A partly filled batch goes out after this many microseconds.
    pub(crate) timeout_us: u32,
    /// Waits fail once the device has left work unanswered this long
    /// (0: never).
    pub(crate) device_timeout_ms: u32,
}

/// Why a batch is sent before it is full or timed out.
#[derive(Clone, Copy)]
pub(crate) enum Flush {
    /// No further page operation fits.
    Full,
    /// It carries a reservation refill that must not wait.
    Refill,
}

/// The request queues of one device.
pub(crate) struct Transport {
    queues: KVec<Pin<KBox<Timed<Queue>>>>,
    hook: Arc<dyn AnswerHook>,
    /// The most `GET`s one request can carry (operations and page slots
    /// of a batch).
    max_gets: usize,
}

impl Transport {
    /// Creates `n` queues and their virtqueues (whose callbacks go to
    /// `D::queue_done`, which calls [`Transport::queue_done`]). Returns the
    /// transport and the ring size. Probe only.
    pub(crate) fn new<D: VirtioDriver>(
        vdev: &VirtioDevice,
        n: usize,
        p: &QueueParams,
        hook: Arc<dyn AnswerHook>,
    ) -> Result<(Self, u32)> {
        let mut queues = KVec::with_capacity(n, GFP_KERNEL)?;
        for _ in 0..n {
            queues.push(Queue::new(p, hook.clone())?, GFP_KERNEL)?;
        }
        let vqs = vdev.find_vqs::<D, Batch>(n, usize::from(p.slots) + 2)?;
        let ring = vqs.first().map_or(0, |vq| vq.size());
        for (q, vq) in queues.iter().zip(vqs) {
            q.inner.lock().vq = Some(vq);
        }
        let max_gets = usize::from(p.max_ops.clamp(1, crate::wire::MAX_OPS_PER_REQUEST))
            .min(usize::from(p.slots))
            .clamp(1, MAX_FETCH);
        Ok((
            Self {
                queues,
                hook,
                max_gets,
            },
            ring,
        ))
    }

    /// The most `GET`s one [`Locked::fetch_many`] can send (at least 1).
    pub(crate) fn max_gets(&self) -> usize {
        self.max_gets
    }

    /// Number of queues (at least one).
    pub(crate) fn len(&self) -> usize {
        self.queues.len()
    }

    /// Locks queue `index`.
    pub(crate) fn lock(&self, index: usize) -> Result<Locked<'_>> {
        let q = self.queues.get(index).ok_or(ENODEV)?;
        Ok(Locked {
            t: self,
            q: q.as_ref(),
            g: q.inner.lock(),
        })
    }

    /// Sends `ops` in one request on queue `index` and waits for the answer.
    /// Process context only.
    pub(crate) fn call<const N: usize>(&self, index: usize, ops: [Op; N]) -> Result<[OpStatus; N]> {
        let mut q = self.lock(index)?;
        q.wait_room(N, 0)?;
        let mut first = None;
        for op in ops {
            let slot = q.push(op)?;
            first.get_or_insert(slot);
        }
        let first = first.ok_or(EINVAL)?;
        q.wait_answer(first, |b, first| {
            let mut out = [OpStatus::new(Status::DeviceError); N];
            for (i, o) in out.iter_mut().enumerate() {
                if let Some(r) = b.ops().get(first + i).and_then(|m| m.result) {
                    *o = r;
                }
            }
            out
        })
    }

    /// Sends a `GET` on queue `index` at once (behind every operation queued
    /// there before) and waits for it. `Ok` on a hit, after `out` read the
    /// page; `ENOENT` on a miss. `handle` names the page; it is called with
    /// the queue locked, right before the `GET` is queued (`None`: a miss).
    /// Process context only.
    pub(crate) fn fetch(
        &self,
        index: usize,
        handle: impl FnOnce() -> Option<Handle>,
        out: impl FnOnce(&[u8]),
    ) -> Result {
        self.lock(index)?.fetch(handle, |answer| match answer {
            Answer::Hit(page) => {
                out(page);
                Ok(())
            }
            Answer::Miss => Err(ENOENT),
        })?
    }

    /// Sends the open batch of every queue that holds asynchronous gets:
    /// the front end ended a batch of reads. Never sleeps.
    pub(crate) fn unplug(&self) {
        for q in self.queues.iter() {
            let mut g = q.inner.lock();
            if g.open_has_loads() {
                g.seal();
                counter(&q.stats().unplug_flushes);
                g.pump(q.stats());
            }
        }
    }

    /// Sends every pending operation, parked invalidations included, and
    /// waits until the device answered them all. Process context only.
    pub(crate) fn drain(&self) {
        for q in self.queues.iter() {
            let mut g = q.inner.lock();
            loop {
                if !g.overflow.is_empty() {
                    let _ = g.open_with_room(q.stats(), 0, 0);
                }
                g.seal();
                g.pump(q.stats());
                let idle = g.in_flight == 0 && g.ready.is_empty() && g.overflow.is_empty();
                if g.dead || idle || g.check_stall(q.device_timeout, q.stats()) {
                    break;
                }
                q.as_ref().sleep(&mut g);
            }
        }
    }

    /// Takes back every batch the device has answered on `q` (also outside
    /// its interrupt: a put that found no free batch may find one here) and
    /// wakes the threads waiting on the queue. True if any came back.
    fn reap(&self, q: &Queue, g: &mut QGuard<'_>) -> bool {
        let mut answered = false;
        while let Some((mut b, len)) = g.vq.as_mut().and_then(|vq| vq.get_buf()) {
            g.in_flight = g.in_flight.saturating_sub(1);
            g.last_answer = Instant::now();
            if g.stalled {
                g.stalled = false;
                counter(&q.stats().device_recoveries);
                pr_info!("device answers again\n");
            }
            counter(&q.stats().completions);
            let _ = b.complete(len);
            self.hook.answered(&b);
            g.finish(b, q.stats());
            answered = true;
        }
        if answered && g.sleepers > 0 {
            q.cv.notify_all();
        }
        answered
    }

    /// The device used buffers of queue `index`. Interrupt context.
    pub(crate) fn queue_done(&self, index: u32) {
        let Some(q) = self.queues.get(index as usize) else {
            return;
        };
        let mut g = q.inner.lock();
        while let Some(vq) = g.vq.as_mut() {
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

    /// Stops all use of the device: wakes every waiter (they fail with
    /// `ENODEV`), cancels the flush timers, resets the device and deletes
    /// its queues. Probe (on failure) and remove only.
    pub(crate) fn shutdown(&self, vdev: &VirtioDevice) {
        for q in self.queues.iter() {
            let mut g = q.inner.lock();
            g.dead = true;
            g.fail_loads(ENODEV, q.stats());
            q.cv.notify_all();
            drop(g);
            q.cancel();
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

    /// Writes the transport counters, summed over the queues, for debugfs.
    pub(crate) fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sums = [0u64; 24];
        for q in self.queues.iter() {
            let mut i = 0;
            q.stats().for_each(&mut |_, v| {
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
        match (puts * 100).checked_div(batches) {
            Some(avg) => writeln!(f, "avg_puts_per_batch {}.{:02}", avg / 100, avg % 100)?,
            None => writeln!(f, "avg_puts_per_batch 0.00")?,
        }
        let (gets, get_notes) = (sums[3], sums[5]);
        match (gets * 100).checked_div(get_notes) {
            Some(avg) => writeln!(
                f,
                "avg_gets_per_notification {}.{:02}",
                avg / 100,
                avg % 100
            )?,
            None => writeln!(f, "avg_gets_per_notification 0.00")?,
        }
        writeln!(f, "queues {}", self.queues.len())
    }
}

/// The most `GET`s [`Locked::fetch_many`] takes at once.
pub(crate) const MAX_FETCH: usize = 64;

/// The device's answer to a `GET`.
pub(crate) enum Answer<'a> {
    /// The page, as the device wrote it.
    Hit(&'a [u8]),
    /// The device does not hold the page.
    Miss,
}

/// An operation in the open batch of a queue: which batch, and where in it.
#[derive(Clone, Copy)]
pub(crate) struct Slot {
    seq: u64,
    index: usize,
}

/// A locked queue: a front end adds operations to its open batch and
/// decides when the batch goes out. Everything but [`Locked::wait_room`]
/// and [`Locked::wait_answer`] works in atomic context.
pub(crate) struct Locked<'a> {
    t: &'a Transport,
    q: Pin<&'a Timed<Queue>>,
    g: QGuard<'a>,
}

impl Locked<'_> {
    /// Waits until the open batch has room for `n` operations, `pages` of
    /// them with a page. Process context only.
    pub(crate) fn wait_room(&mut self, n: usize, pages: usize) -> Result {
        self.q.wait_open(&mut self.g, n, pages)
    }

    /// Without sleeping, makes the open batch one with room for `n`
    /// operations, `pages` of them with a page, sealing a fuller one.
    /// `false` if no batch is free (or the device is gone).
    pub(crate) fn try_room(&mut self, n: usize, pages: usize) -> bool {
        self.g.open_with_room(self.q.stats(), n, pages).is_some()
    }

    /// If no batch at hand has room for `n` operations, `pages` of them with
    /// a page, takes back the batches the device has already answered
    /// (whose interrupt may be held off on this very CPU). True if any came
    /// back.
    pub(crate) fn reap_for_room(&mut self, n: usize, pages: usize) -> bool {
        !self.g.has_room(n, pages) && self.t.reap(&self.q, &mut self.g)
    }

    /// Appends `op` to the open batch (which must have room).
    pub(crate) fn push(&mut self, op: Op) -> Result<Slot> {
        let b = self.g.open.as_deref_mut().ok_or(EIO)?;
        let index = b.push(op)?;
        Ok(Slot { seq: b.seq, index })
    }

    /// The page buffer of the `PUT` at `slot`, to fill.
    pub(crate) fn page_mut(&mut self, slot: Slot) -> Option<&mut [u8]> {
        self.g
            .open
            .as_deref_mut()
            .filter(|b| b.seq == slot.seq)?
            .page_mut(slot.index)
    }

    /// Whether no further page operation fits in the open batch.
    pub(crate) fn is_full(&self) -> bool {
        self.g.open.as_ref().is_some_and(|b| b.is_full())
    }

    /// Sends the open batch now.
    pub(crate) fn send(&mut self, why: Flush) {
        self.g.seal();
        let stats = self.q.stats();
        counter(match why {
            Flush::Full => &stats.full_flushes,
            Flush::Refill => &stats.refill_flushes,
        });
        self.g.pump(stats);
    }

    /// Arms the flush timer for the open batch unless it is armed.
    pub(crate) fn arm(&mut self) {
        self.q.arm(&mut self.g);
    }

    /// Sends the open batch at once, waits for the answer to the operation
    /// at `slot` and reads it with `f` (given the batch and the operation's
    /// index in it). Process context only.
    pub(crate) fn wait_answer<R>(
        mut self,
        slot: Slot,
        f: impl FnOnce(&Batch, usize) -> R,
    ) -> Result<R> {
        let b = self
            .g
            .open
            .as_deref_mut()
            .filter(|b| b.seq == slot.seq)
            .ok_or(EIO)?;
        b.waiters += 1;
        self.q.flush_for_answer(&mut self.g);
        self.q
            .wait_result(&mut self.g, slot.seq, |b| f(b, slot.index))
    }

    /// Sends a `GET` at once (behind every operation queued on this queue
    /// before) and waits for the answer, which `answer` reads with the
    /// queue locked. `handle` names the page; it is called with the queue
    /// locked, after any wait for room and right before the `GET` is queued
    /// (`None`: no `GET`, `ENOENT`). A failed `GET` (an error status, a
    /// device that stalled or went away) is an error and `answer` is not
    /// called. Process context only.
    pub(crate) fn fetch<R>(
        mut self,
        handle: impl FnOnce() -> Option<Handle>,
        answer: impl FnOnce(Answer<'_>) -> R,
    ) -> Result<R> {
        self.wait_room(1, 1)?;
        let handle = handle().ok_or(ENOENT)?;
        let slot = self.push(Op::Get { handle })?;
        self.wait_answer(slot, |b, index| get_answer(b, index).map(answer))?
    }

    /// Sends up to `n` `GET`s in one request at once (behind every
    /// operation queued on this queue before) and waits for their answers.
    /// `handle(i)` names the `i`-th page; it is called for each `i` in
    /// `0..n`, in order, with the queue locked, after any wait for room and
    /// right before the `GET`s are queued (`None`: no `GET` for it).
    /// `answer(i, a)` reads the answer of each `GET` sent, with the queue
    /// locked; a failed `GET` (an error status) is not answered, and a
    /// device that stalled or went away answers none (an error). Returns
    /// how many `GET`s were sent. `n` is at most [`Transport::max_gets`]
    /// (`EINVAL` otherwise). Process context only.
    pub(crate) fn fetch_many(
        mut self,
        n: usize,
        mut handle: impl FnMut(usize) -> Option<Handle>,
        mut answer: impl FnMut(usize, Answer<'_>),
    ) -> Result<usize> {
        if n == 0 || n > self.t.max_gets {
            return Err(EINVAL);
        }
        self.wait_room(n, n)?;
        // The batch index of the `GET` of each page sent.
        let mut sent = [None::<usize>; MAX_FETCH];
        let mut first = None;
        for (i, at) in sent.iter_mut().enumerate().take(n) {
            let Some(h) = handle(i) else {
                continue;
            };
            let slot = self.push(Op::Get { handle: h })?;
            first.get_or_insert(slot);
            *at = Some(slot.index);
        }
        let Some(first) = first else {
            return Ok(0);
        };
        self.wait_answer(first, |b, _| {
            let mut count = 0;
            for (i, at) in sent.iter().enumerate() {
                let Some(index) = *at else {
                    continue;
                };
                count += 1;
                if let Ok(a) = get_answer(b, index) {
                    answer(i, a);
                }
            }
            count
        })
    }

    /// Queues a `GET` of `handle` into the open batch (behind every
    /// operation queued on this queue before) without waiting for its
    /// answer: when the batch is answered, `load` is ended with the page
    /// (interrupt context), or failed on a miss, an error, a device that
    /// stalls or goes away. The batch goes out when it is full, at
    /// [`Transport::unplug`], or at the flush timeout. `Err` gives `load`
    /// back, nothing queued (no room for it, device stalled or gone). May
    /// wait for a free batch: process context only.
    #[cfg_attr(not(CONFIG_FRONTSWAP), allow(dead_code))]
    pub(crate) fn get_async(
        &mut self,
        handle: Handle,
        load: AsyncLoad,
    ) -> core::result::Result<(), AsyncLoad> {
        if self.g.loads.len() >= self.g.loads.capacity() || self.wait_room(1, 1).is_err() {
            return Err(load);
        }
        let Ok(slot) = self.push(Op::Get { handle }) else {
            return Err(load);
        };
        let pending = PendingLoad {
            seq: slot.seq,
            index: slot.index,
            load,
        };
        if let Err(e) = self.g.loads.push_within_capacity(pending) {
            // Not reached (room was checked under the lock): the `GET`
            // goes out unread and the page is loaded synchronously.
            return Err(e.0.load);
        }
        counter(&self.q.stats().async_gets);
        if self.is_full() {
            self.send(Flush::Full);
        } else {
            self.arm();
        }
        Ok(())
    }

    /// Queues an invalidation (`FLUSH_PAGE`, `FLUSH_OBJECT`) without
    /// sleeping: into the open batch, or parked until a batch is free.
    /// `false` if even the parking ring was full and `op` is lost. `widen`:
    /// if parking room runs out, the device may be asked to drop the whole
    /// object instead (ephemeral pools only); `widen` is told of every
    /// (pool, object) whose parked page invalidations this call widened,
    /// this one's or others'. `None`: never widen `op` (and tell nobody).
    pub(crate) fn invalidate(
        &mut self,
        op: Op,
        widen: Option<&mut dyn FnMut(u32, ObjectId)>,
    ) -> bool {
        let (q, g) = (self.q, &mut self.g);
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
                counter(&q.stats().full_flushes);
            }
            Some(false) => q.arm(g),
            None => {
                kept = match widen {
                    Some(widened) => g.overflow.push(op, true, widened),
                    None => g.overflow.push(op, false, &mut |_, _| {}),
                };
                // A batch half filled from the overflow must not wait for
                // the next operation.
                q.arm(g);
            }
        }
        g.pump(q.stats());
        kept
    }
}
