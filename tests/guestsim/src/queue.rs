// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One request queue as the guest driver sees it: a split ring, its kick and
//! call eventfds, and a set of request slots (request, response, indirect
//! table and page buffers in guest RAM) so that several requests can be in
//! flight at once.
//!
//! Requests are encoded with the protocol crate's `RequestBuilder` and
//! responses decoded with its `Response`: the format has one definition.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;
use vtmem_protocol::{
    request_len, response_len, Handle, ObjectId, Op, OpStatus, PageBuffer, PoolSpec,
    RequestBuilder, Response, Status, MAX_OPS_PER_REQUEST, MAX_REQUEST_LEN, MAX_RESPONSE_LEN,
    PAGE_SIZE, RESPONSE_HEADER_SIZE,
};

use crate::memory::{Allocator, GuestRam};
use crate::ring::{RawDescriptor, Segment, SplitRing};
use crate::sys;
use crate::{Error, Page, Result};

/// Token bit that marks raw (hand-built) chains in the ring.
const RAW_TOKEN: u64 = 1 << 63;

/// Identifies a submitted request until it completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// Requests submitted.
    pub requests: u64,
    /// Operations submitted.
    pub ops: u64,
    /// Kick eventfd writes.
    pub kicks: u64,
    /// Kicks the device's `avail_event` (or `NO_NOTIFY`) made unnecessary.
    pub kicks_suppressed: u64,
    /// Device signals received on the call eventfd (the eventfd counter sum).
    pub interrupts: u64,
    /// Times the driver slept on the call eventfd.
    pub sleeps: u64,
    /// Used entries reaped.
    pub completions: u64,
}

/// The outcome of a well-formed request.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Which submission this is.
    pub ticket: Ticket,
    /// Length the device put in the used ring.
    pub used_len: u32,
    /// Request-level status from the response header.
    pub status: Status,
    /// Per-operation outcomes (empty unless `status` is OK).
    pub results: Vec<OpStatus>,
    /// For each operation: the page a successful GET returned.
    pub pages: Vec<Option<Box<Page>>>,
}

impl Completion {
    /// Per-operation statuses, or the request-level status as an error.
    pub fn statuses(&self) -> Result<Vec<Status>> {
        if self.status != Status::Ok {
            return Err(Error::Request(self.status));
        }
        Ok(self.results.iter().map(|r| r.status).collect())
    }

    /// The single operation's outcome of a one-operation request.
    pub fn single(&self) -> Result<OpStatus> {
        if self.status != Status::Ok {
            return Err(Error::Request(self.status));
        }
        self.results
            .first()
            .copied()
            .ok_or_else(|| Error::Device("response without status entries".into()))
    }
}

/// The outcome of a raw chain: only what the used ring says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawCompletion {
    /// Which submission this is.
    pub ticket: Ticket,
    /// Length the device put in the used ring.
    pub used_len: u32,
}

#[derive(Debug)]
enum Done {
    Request(Completion),
    Raw(RawCompletion),
}

#[derive(Debug)]
struct Pending {
    ticket: Ticket,
    ops: Vec<Op>,
    /// Guest address of each GET's page buffer, by op position.
    get_bufs: Vec<(usize, u64)>,
    /// Copy GET data out of guest RAM into the completion.
    copy_out: bool,
    writable_len: u64,
}

/// Where a request's page buffers come from.
#[derive(Clone, Debug)]
pub enum PageSource<'a> {
    /// One page per PUT, in op order, copied into the request slot's
    /// buffers; GET data is copied out into [`Completion::pages`].
    Copied(Vec<&'a Page>),
    /// Guest addresses of the page buffers, one per PUT and per GET in op
    /// order, used in place as a real driver does (no copy either way; GET
    /// data stays in guest RAM).
    InGuest(Vec<u64>),
}

/// Guest memory of one request slot.
#[derive(Clone, Copy, Debug)]
struct Slot {
    request: u64,
    response: u64,
    table: u64,
    pages: u64,
}

/// Bytes of guest RAM one slot takes.
pub const SLOT_BYTES: u64 = 8192 + 4096 + 4096 + MAX_OPS_PER_REQUEST as u64 * PAGE_SIZE as u64;
/// Bytes of guest RAM a ring of `size` entries takes.
pub const fn ring_bytes(size: u16) -> u64 {
    let n = size as u64;
    (16 * n).next_multiple_of(4096)
        + (6 + 2 * n).next_multiple_of(4096)
        + (6 + 8 * n).next_multiple_of(4096)
        + 4096
}

/// How a queue builds chains.
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    /// Put chains of more than one buffer in an indirect table.
    pub indirect: bool,
    /// How long to wait for the device before giving up.
    pub timeout: Duration,
    /// Spin on the used ring this long before sleeping on the call eventfd.
    pub spin: Duration,
}

/// One request queue, driven from one thread at a time.
#[derive(Debug)]
pub struct Queue {
    index: u16,
    ram: Arc<GuestRam>,
    ring: SplitRing,
    kick: EventFd,
    call: EventFd,
    cfg: QueueConfig,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    pending: HashMap<u64, (usize, Pending)>,
    done: HashMap<u64, Done>,
    next_ticket: u64,
    stats: QueueStats,
}

impl Queue {
    /// Lays out a ring and `depth` request slots in guest RAM. [`crate::Vm`]
    /// calls this; tests may too, to drive the queue against a device model
    /// in the same process (kick and call eventfds are created here).
    pub fn new(
        index: u16,
        ram: Arc<GuestRam>,
        alloc: &mut Allocator,
        size: u16,
        depth: usize,
        event_idx: bool,
        cfg: QueueConfig,
    ) -> Result<Self> {
        let layout = crate::ring::RingLayout::alloc(alloc, size)?;
        let ring = SplitRing::new(&ram, layout, event_idx)?;
        let mut slots = Vec::with_capacity(depth);
        for _ in 0..depth.max(1) {
            slots.push(Slot {
                request: alloc.alloc(8192, 4096)?,
                response: alloc.alloc(4096, 4096)?,
                table: alloc.alloc(4096, 4096)?,
                pages: alloc.alloc(MAX_OPS_PER_REQUEST as u64 * PAGE_SIZE as u64, 4096)?,
            });
        }
        let flags = libc::EFD_NONBLOCK | libc::EFD_CLOEXEC;
        Ok(Queue {
            index,
            ram,
            ring,
            kick: EventFd::new(flags).map_err(Error::Io)?,
            call: EventFd::new(flags).map_err(Error::Io)?,
            cfg,
            free_slots: (0..slots.len()).rev().collect(),
            slots,
            pending: HashMap::new(),
            done: HashMap::new(),
            next_ticket: 1,
            stats: QueueStats::default(),
        })
    }

    /// The queue's index on the device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The ring (for inspection).
    pub fn ring(&self) -> &SplitRing {
        &self.ring
    }

    /// The eventfd the driver writes to notify the device.
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The eventfd the device writes to interrupt the driver.
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Counters so far.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Clears the counters.
    pub fn reset_stats(&mut self) {
        self.stats = QueueStats::default();
    }

    /// Requests that may be in flight at once.
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    /// Requests and raw chains submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    /// How long waits last.
    pub fn timeout(&self) -> Duration {
        self.cfg.timeout
    }

    /// Changes how long waits last.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.cfg.timeout = timeout;
    }

    fn take_ticket(&mut self, raw: bool) -> Ticket {
        let t = self.next_ticket;
        self.next_ticket += 1;
        Ticket(if raw { t | RAW_TOKEN } else { t })
    }

    /// Queues a request without notifying the device. `put_pages` holds one
    /// page per PUT, in op order; it is copied into the slot's buffers, and
    /// GET data is copied out into the [`Completion`]. Blocks (reaping
    /// completions) while no slot or descriptors are free.
    pub fn submit(&mut self, ops: &[Op], put_pages: &[&Page]) -> Result<Ticket> {
        self.submit_with(ops, &PageSource::Copied(put_pages.to_vec()))
    }

    /// Queues a request whose page buffers are given by `pages`.
    pub fn submit_with(&mut self, ops: &[Op], pages: &PageSource<'_>) -> Result<Ticket> {
        let n = ops.len();
        if n == 0 || n > MAX_OPS_PER_REQUEST as usize {
            return Err(Error::Setup(format!(
                "a request carries 1..={MAX_OPS_PER_REQUEST} operations, not {n}"
            )));
        }
        let puts = ops
            .iter()
            .filter(|o| o.page_buffer() == PageBuffer::ToDevice)
            .count();
        let bufs = ops
            .iter()
            .filter(|o| o.page_buffer() != PageBuffer::None)
            .count();
        match pages {
            PageSource::Copied(p) if p.len() != puts => {
                return Err(Error::Setup(format!("{puts} PUTs but {} pages", p.len())));
            }
            PageSource::InGuest(a) if a.len() != bufs => {
                return Err(Error::Setup(format!(
                    "{bufs} page buffers needed, {} addresses given",
                    a.len()
                )));
            }
            _ => {}
        }
        let chain_len = 2 + ops
            .iter()
            .filter(|o| o.page_buffer() != PageBuffer::None)
            .count();
        let ring_descs = if self.cfg.indirect && chain_len > 1 {
            1
        } else {
            chain_len
        };
        if ring_descs > self.ring.layout().size as usize {
            return Err(Error::RingFull {
                needed: ring_descs,
                free: self.ring.layout().size as usize,
            });
        }
        // Wait for a slot and room in the ring.
        let deadline = Instant::now() + self.cfg.timeout;
        while self.free_slots.is_empty() || self.ring.num_free() < ring_descs {
            self.wait_used(deadline)?;
        }
        let slot_idx = self.free_slots.pop().expect("checked above");
        let slot = self.slots[slot_idx];
        let ticket = self.take_ticket(false);

        // Request buffer.
        let mut req = [0u8; MAX_REQUEST_LEN];
        let mut b = RequestBuilder::new(&mut req).map_err(Error::Wire)?;
        for op in ops {
            b.push(op).map_err(Error::Wire)?;
        }
        let req_len = b.finish(ticket.0).map_err(Error::Wire)?;
        debug_assert_eq!(req_len, request_len(n as u16));
        let ram = &self.ram;
        ram.write(slot.request, &req[..req_len])?;

        // Page buffers: PUT pages first (device-readable), then GET pages
        // (device-writable), each in op order, all from the slot's page area.
        let mut segs = Vec::with_capacity(chain_len);
        segs.push(Segment::readable(slot.request, req_len as u32));
        let resp_len = response_len(n as u16);
        let mut get_bufs = Vec::new();
        let copy_out = match pages {
            PageSource::Copied(put_pages) => {
                let mut page_at = slot.pages;
                for page in put_pages {
                    ram.write(page_at, &page[..])?;
                    segs.push(Segment::readable(page_at, PAGE_SIZE as u32));
                    page_at += PAGE_SIZE as u64;
                }
                segs.push(Segment::writable(slot.response, resp_len as u32));
                for (i, op) in ops.iter().enumerate() {
                    if op.page_buffer() == PageBuffer::FromDevice {
                        segs.push(Segment::writable(page_at, PAGE_SIZE as u32));
                        get_bufs.push((i, page_at));
                        page_at += PAGE_SIZE as u64;
                    }
                }
                true
            }
            PageSource::InGuest(addrs) => {
                let mut it = addrs.iter();
                let mut gets = Vec::new();
                for (i, op) in ops.iter().enumerate() {
                    match op.page_buffer() {
                        PageBuffer::ToDevice => segs.push(Segment::readable(
                            *it.next().expect("counted"),
                            PAGE_SIZE as u32,
                        )),
                        PageBuffer::FromDevice => gets.push((i, *it.next().expect("counted"))),
                        PageBuffer::None => {}
                    }
                }
                segs.push(Segment::writable(slot.response, resp_len as u32));
                for &(i, addr) in &gets {
                    segs.push(Segment::writable(addr, PAGE_SIZE as u32));
                    get_bufs.push((i, addr));
                }
                false
            }
        };
        // Stale bytes must not pass for a response.
        ram.fill(slot.response, RESPONSE_HEADER_SIZE, 0xff)?;
        let table = (self.cfg.indirect && segs.len() > 1).then_some(slot.table);
        if let Err(e) = self.ring.add(ram, &segs, table, ticket.0) {
            self.free_slots.push(slot_idx);
            return Err(e);
        }
        self.pending.insert(
            ticket.0,
            (
                slot_idx,
                Pending {
                    ticket,
                    ops: ops.to_vec(),
                    writable_len: (resp_len + get_bufs.len() * PAGE_SIZE) as u64,
                    get_bufs,
                    copy_out,
                },
            ),
        );
        self.stats.requests += 1;
        self.stats.ops += n as u64;
        Ok(ticket)
    }

    /// Queues a raw chain (see [`crate::raw`]) without notifying the device.
    pub fn submit_raw(&mut self, descs: &[RawDescriptor]) -> Result<Ticket> {
        let deadline = Instant::now() + self.cfg.timeout;
        while self.ring.num_free() < descs.len() {
            self.wait_used(deadline)?;
        }
        let ticket = self.take_ticket(true);
        self.ring.add_raw(&self.ram, descs, ticket.0)?;
        self.stats.requests += 1;
        Ok(ticket)
    }

    /// Fault injection: see [`SplitRing::publish_raw_head`].
    pub fn inject_head(&mut self, head: u16) -> Result<()> {
        self.ring.publish_raw_head(&self.ram, head)
    }

    /// Fault injection: see [`SplitRing::corrupt_avail_idx`].
    pub fn inject_avail_idx(&mut self, idx: u16) -> Result<()> {
        self.ring.corrupt_avail_idx(&self.ram, idx)
    }

    /// Notifies the device if it asked to be (EVENT_IDX) or did not ask not
    /// to be. Returns whether a kick was sent.
    pub fn kick(&mut self) -> Result<bool> {
        if self.ring.kick_needed(&self.ram)? {
            self.kick.write(1).map_err(Error::Io)?;
            self.stats.kicks += 1;
            Ok(true)
        } else {
            self.stats.kicks_suppressed += 1;
            Ok(false)
        }
    }

    /// Notifies the device unconditionally.
    pub fn force_kick(&mut self) -> Result<()> {
        self.ring.kick_needed(&self.ram)?;
        self.kick.write(1).map_err(Error::Io)?;
        self.stats.kicks += 1;
        Ok(())
    }

    /// Reaps every used entry the device has returned. Returns how many.
    pub fn reap(&mut self) -> Result<usize> {
        let mut n = 0;
        while let Some(used) = self.ring.pop_used(&self.ram)? {
            n += 1;
            self.stats.completions += 1;
            if used.token & RAW_TOKEN != 0 {
                self.done.insert(
                    used.token,
                    Done::Raw(RawCompletion {
                        ticket: Ticket(used.token),
                        used_len: used.len,
                    }),
                );
                continue;
            }
            let (slot_idx, pending) = self
                .pending
                .remove(&used.token)
                .ok_or_else(|| Error::Device(format!("used token {:#x} unknown", used.token)))?;
            let result = self.complete(self.slots[slot_idx], &pending, used.len);
            self.free_slots.push(slot_idx);
            self.done.insert(used.token, Done::Request(result?));
        }
        Ok(n)
    }

    fn complete(&self, slot: Slot, p: &Pending, used_len: u32) -> Result<Completion> {
        let n = p.ops.len() as u16;
        let mut resp = [0u8; MAX_RESPONSE_LEN];
        let resp = &mut resp[..response_len(n)];
        self.ram.read(slot.response, resp)?;
        let parsed = Response::parse(resp)
            .map_err(|e| Error::Device(format!("undecodable response: {e}")))?;
        let h = parsed.header();
        if used_len as u64 > p.writable_len {
            return Err(Error::Device(format!(
                "used length {used_len} exceeds the {} writable bytes",
                p.writable_len
            )));
        }
        if h.tag != p.ticket.0 {
            return Err(Error::Device(format!(
                "response tag {:#x}, request tag {:#x}",
                h.tag, p.ticket.0
            )));
        }
        let mut results = Vec::new();
        let mut pages: Vec<Option<Box<Page>>> = (0..n).map(|_| None).collect();
        if h.status == Status::Ok {
            if h.num_ops != n {
                return Err(Error::Device(format!(
                    "response has {} statuses for {n} operations",
                    h.num_ops
                )));
            }
            for i in 0..n {
                results.push(
                    parsed
                        .status(i)
                        .map_err(|e| Error::Device(format!("status {i}: {e}")))?,
                );
            }
            // Used length = response length + the GET pages up to the last
            // that hit (docs/protocol.md section 6).
            let mut filled = 0;
            for (k, &(i, addr)) in p.get_bufs.iter().enumerate() {
                if results[i].status == Status::Ok {
                    if p.copy_out {
                        let mut page: Box<Page> = Box::new([0u8; PAGE_SIZE]);
                        self.ram.read(addr, &mut page[..])?;
                        pages[i] = Some(page);
                    }
                    filled = k + 1;
                }
            }
            let expected = response_len(n) + filled * PAGE_SIZE;
            if used_len as usize != expected {
                return Err(Error::Device(format!(
                    "used length {used_len}, expected {expected} ({n} ops, last get hit at page {filled})"
                )));
            }
        } else if h.num_ops != 0 {
            return Err(Error::Device(format!(
                "failed request ({}) with {} status entries",
                h.status, h.num_ops
            )));
        } else if used_len as usize != RESPONSE_HEADER_SIZE {
            return Err(Error::Device(format!(
                "failed request ({}) with used length {used_len}, expected {RESPONSE_HEADER_SIZE}",
                h.status
            )));
        }
        Ok(Completion {
            ticket: p.ticket,
            used_len,
            status: h.status,
            results,
            pages,
        })
    }

    /// Waits until at least one used entry is reaped (or `deadline`).
    fn wait_used(&mut self, deadline: Instant) -> Result<()> {
        let spin_until = Instant::now() + self.cfg.spin;
        loop {
            if self.reap()? > 0 {
                return Ok(());
            }
            if Instant::now() < spin_until {
                std::hint::spin_loop();
                continue;
            }
            if self.ring.enable_interrupts(&self.ram, 0)? {
                self.ring.disable_interrupts(&self.ram)?;
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                self.ring.disable_interrupts(&self.ram)?;
                return Err(Error::Timeout(self.cfg.timeout));
            }
            self.stats.sleeps += 1;
            if sys::wait_readable(&self.call, deadline - now).map_err(Error::Io)? {
                self.drain_call()?;
            }
            self.ring.disable_interrupts(&self.ram)?;
        }
    }

    fn drain_call(&mut self) -> Result<()> {
        match self.call.read() {
            Ok(v) => {
                self.stats.interrupts += v;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(Error::Io(e)),
        }
    }

    /// Counts device signals that arrived while the driver was not sleeping.
    pub fn collect_interrupts(&mut self) -> Result<u64> {
        self.drain_call()?;
        Ok(self.stats.interrupts)
    }

    /// Waits for one submitted request.
    pub fn wait(&mut self, ticket: Ticket) -> Result<Completion> {
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            match self.done.remove(&ticket.0) {
                Some(Done::Request(c)) => return Ok(c),
                Some(Done::Raw(_)) => {
                    return Err(Error::Setup("ticket is a raw chain".into()));
                }
                None => {}
            }
            if !self.pending.contains_key(&ticket.0) {
                return Err(Error::Setup(format!("ticket {ticket:?} is not in flight")));
            }
            self.wait_used(deadline)?;
        }
    }

    /// Waits for one raw chain.
    pub fn wait_raw(&mut self, ticket: Ticket) -> Result<RawCompletion> {
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            match self.done.remove(&ticket.0) {
                Some(Done::Raw(c)) => return Ok(c),
                Some(Done::Request(_)) => {
                    return Err(Error::Setup("ticket is a request".into()));
                }
                None => {}
            }
            self.wait_used(deadline)?;
        }
    }

    /// Waits for whichever well-formed request completes first.
    pub fn wait_any(&mut self) -> Result<Completion> {
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            let key = self
                .done
                .iter()
                .filter(|(_, d)| matches!(d, Done::Request(_)))
                .map(|(k, _)| *k)
                .min();
            if let Some(k) = key {
                if let Some(Done::Request(c)) = self.done.remove(&k) {
                    return Ok(c);
                }
            }
            if self.pending.is_empty() {
                return Err(Error::Setup("no request in flight".into()));
            }
            self.wait_used(deadline)?;
        }
    }

    /// Submits one request, kicks if needed and waits for it.
    pub fn execute(&mut self, ops: &[Op], put_pages: &[&Page]) -> Result<Completion> {
        let t = self.submit(ops, put_pages)?;
        self.kick()?;
        self.wait(t)
    }

    /// Submits one request with the given page buffers, kicks if needed and
    /// waits for it.
    pub fn execute_with(&mut self, ops: &[Op], pages: &PageSource<'_>) -> Result<Completion> {
        let t = self.submit_with(ops, pages)?;
        self.kick()?;
        self.wait(t)
    }

    /// Runs requests with up to `depth` in flight, calling `on_done` for
    /// each completion (in completion order). The device is kicked only
    /// when its `avail_event` asks for it.
    pub fn pipeline<'p, I>(
        &mut self,
        requests: I,
        depth: usize,
        mut on_done: impl FnMut(Completion) -> Result<()>,
    ) -> Result<()>
    where
        I: IntoIterator<Item = (Vec<Op>, PageSource<'p>)>,
    {
        let depth = depth.clamp(1, self.depth());
        let mut outstanding = 0usize;
        for (ops, pages) in requests {
            while outstanding >= depth {
                let c = self.wait_any()?;
                outstanding -= 1;
                on_done(c)?;
            }
            self.submit_with(&ops, &pages)?;
            outstanding += 1;
            self.kick()?;
        }
        while outstanding > 0 {
            let c = self.wait_any()?;
            outstanding -= 1;
            on_done(c)?;
        }
        Ok(())
    }

    fn one(&mut self, op: Op) -> Result<OpStatus> {
        self.execute(&[op], &[])?.single()
    }

    /// `RESET`: drops every pool of this VM.
    pub fn reset(&mut self) -> Result<Status> {
        Ok(self.one(Op::Reset)?.status)
    }

    /// `NEW_POOL`: returns the pool id, or the refusal as [`Error::Status`].
    pub fn new_pool(&mut self, spec: PoolSpec) -> Result<u32> {
        let r = self.one(Op::NewPool(spec))?;
        if r.status != Status::Ok {
            return Err(Error::Status(r.status));
        }
        u32::try_from(r.value).map_err(|_| Error::Device(format!("pool id {}", r.value)))
    }

    /// `DESTROY_POOL`.
    pub fn destroy_pool(&mut self, pool: u32) -> Result<Status> {
        Ok(self.one(Op::DestroyPool { pool })?.status)
    }

    /// `PUT`s, split into requests of at most `MAX_OPS_PER_REQUEST` and run
    /// with several in flight. `reserved` spends the pool's reservation.
    pub fn put_batch_with(
        &mut self,
        pages: &[(Handle, &Page)],
        reserved: bool,
    ) -> Result<Vec<Status>> {
        let mut out = vec![Status::DeviceError; pages.len()];
        let chunks: Vec<_> = pages
            .chunks(MAX_OPS_PER_REQUEST as usize)
            .enumerate()
            .map(|(c, chunk)| {
                let ops = chunk
                    .iter()
                    .map(|(h, _)| Op::Put {
                        handle: *h,
                        reserved,
                    })
                    .collect::<Vec<_>>();
                let pg = chunk.iter().map(|(_, p)| *p).collect::<Vec<_>>();
                (c, ops, pg)
            })
            .collect();
        let reqs: Vec<_> = chunks
            .into_iter()
            .map(|(_, ops, pg)| (ops, PageSource::Copied(pg)))
            .collect();
        let first = self.next_ticket;
        let depth = self.depth();
        self.pipeline(reqs, depth, |c| {
            let chunk = (c.ticket.0 - first) as usize;
            let st = c.statuses()?;
            let base = chunk * MAX_OPS_PER_REQUEST as usize;
            out[base..base + st.len()].copy_from_slice(&st);
            Ok(())
        })?;
        Ok(out)
    }

    /// `PUT`s (not reserved).
    pub fn put_batch(&mut self, pages: &[(Handle, &Page)]) -> Result<Vec<Status>> {
        self.put_batch_with(pages, false)
    }

    /// `GET`s: for each handle its status and the page (zeroes unless OK).
    pub fn get_batch(&mut self, handles: &[Handle]) -> Result<Vec<(Status, Box<Page>)>> {
        let mut out: Vec<(Status, Box<Page>)> = Vec::with_capacity(handles.len());
        for chunk in handles.chunks(MAX_OPS_PER_REQUEST as usize) {
            let ops: Vec<Op> = chunk.iter().map(|h| Op::Get { handle: *h }).collect();
            let c = self.execute(&ops, &[])?;
            let st = c.statuses()?;
            for (s, p) in st.into_iter().zip(c.pages) {
                out.push((s, p.unwrap_or_else(|| Box::new([0u8; PAGE_SIZE]))));
            }
        }
        Ok(out)
    }

    /// `FLUSH_PAGE` for each handle.
    pub fn flush_pages(&mut self, handles: &[Handle]) -> Result<Vec<Status>> {
        let mut out = Vec::with_capacity(handles.len());
        for chunk in handles.chunks(MAX_OPS_PER_REQUEST as usize) {
            let ops: Vec<Op> = chunk.iter().map(|h| Op::FlushPage { handle: *h }).collect();
            out.extend(self.execute(&ops, &[])?.statuses()?);
        }
        Ok(out)
    }

    /// `FLUSH_PAGE`.
    pub fn flush_page(&mut self, handle: Handle) -> Result<Status> {
        Ok(self.one(Op::FlushPage { handle })?.status)
    }

    /// `FLUSH_OBJECT`.
    pub fn flush_object(&mut self, pool: u32, object: ObjectId) -> Result<Status> {
        Ok(self.one(Op::FlushObject { pool, object })?.status)
    }

    /// `RESERVE`: pages granted, or the refusal as [`Error::Status`].
    pub fn reserve(&mut self, pool: u32, pages: u64) -> Result<u64> {
        let r = self.one(Op::Reserve { pool, pages })?;
        if r.status != Status::Ok {
            return Err(Error::Status(r.status));
        }
        Ok(r.value)
    }

    /// `UNRESERVE`: pages still reserved, or the refusal as [`Error::Status`].
    pub fn unreserve(&mut self, pool: u32, pages: u64) -> Result<u64> {
        let r = self.one(Op::Unreserve { pool, pages })?;
        if r.status != Status::Ok {
            return Err(Error::Status(r.status));
        }
        Ok(r.value)
    }
}
