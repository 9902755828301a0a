// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Executes validated requests against the store, and writes the answers
//! into guest memory.
//!
//! One [`Executor`] per worker thread (per request queue) owns the page
//! buffer and the response buffer, so the data path allocates nothing.
//!
//! **One copy, from a snapshot.** A PUT's page is copied from guest memory
//! into the executor's page buffer, and the store sees only that copy: the
//! hash, the dedup comparison and the compressor all read the same bytes,
//! so a guest that keeps writing the page while the device works cannot
//! make the store keep data that differs from what it hashed or compared.
//!
//! **No copy on the way back.** A GET's page is produced by the store
//! straight into guest memory when the guest's page buffer is one
//! contiguous guest region (`in_guest`, the one `unsafe` block of the data
//! path, says why that is sound); a page buffer split across
//! descriptors gets the page through the executor's page buffer, copied
//! piece by piece. Either way a miss leaves the guest's page untouched.
//!
//! **An exclusive get's removal waits for its answer.** A hit in a
//! persistent pool with exclusive gets, in a store with a crash-safe
//! state, takes the page out of the pool at once (a second get misses)
//! but leaves its removal unrecorded: the store's [`Taken`] is held by the
//! executor until the worker has put the chain's answer in the used ring
//! ([`Executor::settle`]), and only its drop records the removal and frees
//! the page (rule 5 of docs/ARCHITECTURE.md, "Crash-safe state"). A vtmemd
//! that dies in between leaves the page in the state, so the GET that
//! QEMU offers again (it rewinds the ring to the used index) finds it.
//!
//! **Operations that must not run twice are answered once.** `NEW_POOL`,
//! `DESTROY_POOL`, `RESERVE`, `UNRESERVE` and `RESET` run through the
//! store's `run_once` with their request's queue, ring position and tag:
//! one that a dead vtmemd ran and did not answer, offered again at the
//! same position, is answered from its record. The request's entries are
//! settled with the exclusive gets, once its answer is in the used ring
//! (docs/protocol.md section 8).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::ops::Deref;

use log::Level;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory};
use vtmem_protocol::{
    Op, OpStatus, PageBuffer, ResponseHeader, ResponseWriter, Status, MAX_RESPONSE_LEN, PAGE_SIZE,
    RESPONSE_HEADER_SIZE, VTMEM_F_EPHEMERAL, VTMEM_F_RESERVE, VTMEM_F_SHARED,
};

use crate::chain_walk::{Cursor, CursorError};
use crate::ratelimit::RateLimitedLog;
use crate::request::{ChainError, ChainParser, ValidChain};
use vtmem_api::DeviceStats;
use vtmem_store::{DataHandle, OnceOp, OpRef, Page, Taken, TmemError};

/// Device features that change what operations may do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// `VTMEM_F_EPHEMERAL` negotiated.
    pub ephemeral: bool,
    /// `VTMEM_F_SHARED` negotiated.
    pub shared: bool,
    /// `VTMEM_F_RESERVE` negotiated.
    pub reserve: bool,
    /// `VIRTIO_RING_F_INDIRECT_DESC` negotiated.
    pub indirect: bool,
}

impl Features {
    /// Every feature.
    pub const ALL: Features = Features {
        ephemeral: true,
        shared: true,
        reserve: true,
        indirect: true,
    };

    /// Decodes the acknowledged virtio feature bits.
    pub fn from_acked(acked: u64) -> Self {
        use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
        let bit = |b: u32| acked & (1u64 << b) != 0;
        Features {
            ephemeral: bit(VTMEM_F_EPHEMERAL),
            shared: bit(VTMEM_F_SHARED),
            reserve: bit(VTMEM_F_RESERVE),
            indirect: bit(VIRTIO_RING_F_INDIRECT_DESC),
        }
    }
}

/// Per-VM device counters, kept across connections; `show` reports a
/// [`DeviceStats`] copy of them.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Chains taken from the rings.
    pub chains: AtomicU64,
    /// Operations executed (valid or not) in valid chains.
    pub ops: AtomicU64,
    /// Operations that failed to decode (unknown opcode, bad flags...).
    pub invalid_ops: AtomicU64,
    /// Valid chains holding at least one `GET` (a batched read: a
    /// readahead window, a swap-in).
    pub get_chains: AtomicU64,
    /// `GET` operations in those chains.
    pub get_ops: AtomicU64,
    /// Chains answered with a request-level error status.
    pub rejected_chains: AtomicU64,
    /// Chains returned with used length 0.
    pub dropped_chains: AtomicU64,
    /// Notifications sent to the guest (used-ring interrupts).
    pub notifications: AtomicU64,
    /// Queue events handled (kicks, and rings found busy when enabled).
    pub kicks: AtomicU64,
    /// Batches found by busy-polling instead of waiting for a kick.
    pub poll_hits: AtomicU64,
    /// Busy-poll spins that found nothing.
    pub poll_misses: AtomicU64,
    /// Microseconds spent busy-polling.
    pub poll_us: AtomicU64,
    /// Page bytes copied in from guest memory by PUTs.
    pub bytes_from_guest: AtomicU64,
    /// Page bytes copied out to guest memory by GETs.
    pub bytes_to_guest: AtomicU64,
    /// Device states sent to a migration destination (the VM's image).
    pub state_exports: AtomicU64,
    /// Device states taken from a migration source.
    pub state_imports: AtomicU64,
    /// Device-state transfers that failed (either direction).
    pub state_failures: AtomicU64,
    /// Non-idempotent operations answered from their pending entries.
    pub replayed_answers: AtomicU64,
}

impl DeviceCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A plain copy, for reporting.
    pub fn snapshot(&self) -> DeviceStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DeviceStats {
            chains: l(&self.chains),
            ops: l(&self.ops),
            invalid_ops: l(&self.invalid_ops),
            get_chains: l(&self.get_chains),
            get_ops: l(&self.get_ops),
            rejected_chains: l(&self.rejected_chains),
            dropped_chains: l(&self.dropped_chains),
            notifications: l(&self.notifications),
            kicks: l(&self.kicks),
            poll_hits: l(&self.poll_hits),
            poll_misses: l(&self.poll_misses),
            poll_us: l(&self.poll_us),
            state_exports: l(&self.state_exports),
            state_imports: l(&self.state_imports),
            state_failures: l(&self.state_failures),
            replayed_answers: l(&self.replayed_answers),
            bytes_from_guest: l(&self.bytes_from_guest),
            bytes_to_guest: l(&self.bytes_to_guest),
        }
    }
}

/// What became of one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainOutcome {
    /// Used length to report (bytes written to device-writable buffers).
    pub used_len: u32,
    /// Why the chain was refused, if it was.
    pub error: Option<ChainError>,
}

/// Executes chains for one client on one queue.
#[derive(Debug)]
pub struct Executor {
    client: DataHandle,
    parser: ChainParser,
    page: Box<Page>,
    response: Box<[u8; MAX_RESPONSE_LEN]>,
    counters: Arc<DeviceCounters>,
    log: Arc<RateLimitedLog>,
    /// Exclusive gets' removals, recorded when their answers are in the
    /// used ring ([`Executor::settle`]).
    taken: Vec<Taken>,
    /// The queue this executor serves.
    queue: u16,
    /// Whether the queue was started ([`Executor::start`]) since the
    /// executor was made or the ring stopped.
    started: bool,
    /// Ring positions of the requests run since the last settle that had
    /// (or may have had) pending entries: settled by [`Executor::settle`].
    to_settle: Vec<u16>,
    /// Positions that had pending entries when the queue started: the
    /// requests there are settled once answered, whatever they hold.
    /// Empty but after a crash.
    watch: Vec<u16>,
}

impl Executor {
    /// An executor acting for `client`.
    pub fn new(
        client: DataHandle,
        counters: Arc<DeviceCounters>,
        log: Arc<RateLimitedLog>,
    ) -> Self {
        Executor {
            client,
            parser: ChainParser::new(),
            page: Box::new([0u8; PAGE_SIZE]),
            response: Box::new([0u8; MAX_RESPONSE_LEN]),
            counters,
            log,
            taken: Vec::new(),
            queue: 0,
            started: false,
            to_settle: Vec::new(),
            watch: Vec::new(),
        }
    }

    /// The executor of queue `queue` (0 unless told).
    pub fn on_queue(mut self, queue: u16) -> Self {
        self.queue = queue;
        self
    }

    /// Called before each batch with the queue's next available position
    /// and size: the first time after the executor was made or the ring
    /// stopped ([`Executor::stopped`]), the queue starts, and the client's
    /// pending entries of the queue outside `[base, base + size)` are
    /// settled: only the requests from `base` on can be offered again
    /// (docs/protocol.md section 8).
    pub fn start(&mut self, base: u16, size: u16) {
        if !self.started {
            self.started = true;
            self.watch = self.client.start_queue(self.queue, base, size);
        }
    }

    /// The ring stopped (or the VMM asked for its base): the next batch
    /// starts the queue again, maybe at another position.
    pub fn stopped(&mut self) {
        self.started = false;
    }

    /// Records the removals of the exclusive gets run since the last call
    /// (and frees their pages). Call it once the answers of the chains run
    /// since then are in the used ring, never before: until then a crash
    /// must leave those pages in the state, for the gets offered again.
    /// Dropping the executor settles too.
    pub fn settle(&mut self) {
        self.taken.clear();
        if !self.to_settle.is_empty() {
            self.client.settle_requests(self.queue, &self.to_settle);
            self.to_settle.clear();
        }
    }

    /// Exclusive gets whose removals wait for [`Executor::settle`].
    pub fn unsettled(&self) -> usize {
        self.taken.len()
    }

    /// The client this executor acts for.
    pub fn client(&self) -> &DataHandle {
        &self.client
    }

    /// Parses and executes `chain`, taken from a queue whose descriptor
    /// table is at `table` with `queue_size` entries. Never panics on guest
    /// input.
    /// `position`: the chain's position in the available ring (the
    /// queue's next available index when it was taken), which with the
    /// queue names the request for operations that must not run twice.
    pub fn run_descriptor_chain<M, C>(
        &mut self,
        chain: &DescriptorChain<C>,
        table: GuestAddress,
        queue_size: u16,
        features: Features,
        position: u16,
    ) -> ChainOutcome
    where
        C: Deref<Target = M>,
        M: GuestMemory,
    {
        self.run_chain_at(
            chain.memory(),
            table,
            queue_size,
            chain.head_index(),
            features,
            Some(position),
        )
    }

    /// Parses and executes the chain at `head` of the descriptor table at
    /// `table` (`queue_size` entries). Never panics on guest input.
    /// Its non-idempotent operations are not matched with earlier runs
    /// (see [`Executor::run_chain_at`]).
    pub fn run_chain<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        table: GuestAddress,
        queue_size: u16,
        head: u16,
        features: Features,
    ) -> ChainOutcome {
        self.run_chain_at(mem, table, queue_size, head, features, None)
    }

    /// As [`Executor::run_chain`], for the chain at ring position
    /// `position` of the executor's queue: a `NEW_POOL`, `DESTROY_POOL`,
    /// `RESERVE`, `UNRESERVE` or `RESET` that ran already for this request
    /// (and is still pending: its answer not known to be in the used ring)
    /// is answered as it was, not run again.
    pub fn run_chain_at<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        table: GuestAddress,
        queue_size: u16,
        head: u16,
        features: Features,
        position: Option<u16>,
    ) -> ChainOutcome {
        DeviceCounters::add(&self.counters.chains, 1);
        if let Some(p) = position {
            // A request at a position that had entries when the queue
            // started is settled once answered, malformed or not.
            if let Some(i) = self.watch.iter().position(|&w| w == p) {
                self.watch.swap_remove(i);
                self.to_settle.push(p);
            }
        }
        let at = position.map(|position| (self.queue, position));
        self.parser.set_indirect_allowed(features.indirect);
        let Executor {
            client,
            parser,
            page,
            response,
            counters,
            log,
            taken,
            to_settle,
            ..
        } = self;
        match parser.parse(mem, table, queue_size, head) {
            Ok(chain) => {
                let once = Once { at, to_settle };
                let used_len = execute(
                    client,
                    mem,
                    &chain,
                    features,
                    page,
                    &mut response[..],
                    counters,
                    log,
                    taken,
                    once,
                );
                ChainOutcome {
                    used_len,
                    error: None,
                }
            }
            Err(fault) => {
                let mut used_len = 0;
                match (fault.error.status(), fault.reply) {
                    (Some(status), Some(reply)) => {
                        let header = ResponseHeader {
                            num_ops: 0,
                            status,
                            tag: reply.tag,
                        };
                        if Cursor::new(reply.writable)
                            .write_all(mem, &header.encode())
                            .is_ok()
                        {
                            used_len = RESPONSE_HEADER_SIZE as u32;
                        }
                        DeviceCounters::add(&counters.rejected_chains, 1);
                    }
                    _ => DeviceCounters::add(&counters.dropped_chains, 1),
                }
                log.log(
                    Level::Warn,
                    format_args!(
                        "malformed chain (head {head}): {}; {}",
                        fault.error,
                        if used_len == 0 {
                            "returned unused".to_string()
                        } else {
                            format!("answered {}", fault.error.status().unwrap_or(Status::Ok))
                        }
                    ),
                );
                ChainOutcome {
                    used_len,
                    error: Some(fault.error),
                }
            }
        }
    }
}

/// Where a chain's non-idempotent operations are matched and settled.
struct Once<'a> {
    /// The request's queue and ring position, if known.
    at: Option<(u16, u16)>,
    /// Positions to settle once the answers are in the used ring.
    to_settle: &'a mut Vec<u16>,
}

/// Runs the operations of a valid chain in order; writes the statuses and
/// the response header; returns the used length.
#[allow(clippy::too_many_arguments)]
fn execute<M: GuestMemory + ?Sized>(
    client: &DataHandle,
    mem: &M,
    chain: &ValidChain<'_>,
    features: Features,
    page: &mut Page,
    response: &mut [u8],
    counters: &DeviceCounters,
    log: &RateLimitedLog,
    taken: &mut Vec<Taken>,
    once: Once<'_>,
) -> u32 {
    let request = chain.request;
    let tag = request.header().tag;
    let mut replayed = 0u64;
    let mut has_once = false;
    let num_ops = request.num_ops();
    let resp_len = vtmem_protocol::response_len(num_ops);
    let Some(resp_buf) = response.get_mut(..resp_len) else {
        return 0;
    };
    let Ok(mut writer) = ResponseWriter::new(resp_buf, num_ops) else {
        return 0;
    };
    let mut puts = chain.put_pages();
    let mut gets = GetPages::new(chain.response(), resp_len);
    let mut invalid = 0u64;

    for i in 0..num_ops {
        // The opcode byte alone decides which buffer an op consumes, so the
        // buffers stay in step even when the op itself is invalid.
        let buffer = match PageBuffer::for_opcode_byte(request.opcode_byte(i)) {
            PageBuffer::None => PageSlot::None,
            PageBuffer::ToDevice => PageSlot::Put(&mut puts),
            PageBuffer::FromDevice => PageSlot::Get(&mut gets),
        };
        let status = match request.op(i) {
            Err(e) => {
                // The op's page is not used, but the pages after it are.
                buffer.skip();
                invalid += 1;
                log.log(
                    Level::Warn,
                    format_args!(
                        "request tag {}: op {i} (opcode {}) rejected: {e}",
                        request.header().tag,
                        request.opcode_byte(i)
                    ),
                );
                OpStatus::new(e.status())
            }
            Ok(op) => {
                // At most 128 operations a request: the index fits a byte.
                let at = once.at.map(|(queue, position)| OpRef {
                    queue,
                    position,
                    op: i as u8,
                    tag,
                });
                let mut ran = OpRun {
                    at,
                    once: false,
                    replayed: false,
                };
                let (status, copied) =
                    execute_op(client, mem, op, buffer, features, page, taken, &mut ran);
                has_once |= ran.once;
                replayed += u64::from(ran.replayed);
                match copied {
                    Copied::Nothing => {}
                    Copied::FromGuest => {
                        DeviceCounters::add(&counters.bytes_from_guest, PAGE_SIZE as u64)
                    }
                    Copied::ToGuest => {
                        DeviceCounters::add(&counters.bytes_to_guest, PAGE_SIZE as u64);
                    }
                }
                status
            }
        };
        writer.set(i, status);
    }
    DeviceCounters::add(&counters.ops, u64::from(num_ops));
    DeviceCounters::add(&counters.invalid_ops, invalid);
    if let (true, Some((queue, position))) = (has_once, once.at) {
        // Settled once the answer is in the used ring, whether the
        // operations ran, failed or were answered from their entries.
        if !once.to_settle.contains(&position) {
            once.to_settle.push(position);
        }
        if replayed > 0 {
            DeviceCounters::add(&counters.replayed_answers, replayed);
            log::info!(
                "vm {}: request tag {tag} at position {position} of queue {queue} was \
                 offered again: {replayed} operation(s) answered from their records, \
                 not run twice",
                client.name()
            );
        }
    }
    if gets.taken > 0 {
        DeviceCounters::add(&counters.get_chains, 1);
        DeviceCounters::add(&counters.get_ops, u64::from(gets.taken));
    }

    let len = writer.finish(ResponseHeader {
        num_ops,
        status: Status::Ok,
        tag: request.header().tag,
    });
    if chain.response().write_all(mem, &response[..len]).is_err() {
        // Checked when parsing; only a memory map changing under us gets here.
        log.warn(format_args!("cannot write the response buffer"));
        return 0;
    }
    // The response, then every GET page up to the last one written: the
    // bytes written from the start of the writable part.
    len as u32 + gets.filled * PAGE_SIZE as u32
}

/// The GET pages of a chain's writable part, after the response.
///
/// The used length must count bytes written from the start of the writable
/// part (virtio 1.2, 2.7.8.2: the driver may ignore anything past it), so a
/// hit after a miss first fills the pages of the GETs before it that
/// returned nothing with zeros. Pages after the last hit stay untouched.
struct GetPages<'s> {
    /// At the first page not written yet.
    cursor: Cursor<'s>,
    /// GET pages handed out so far.
    taken: u32,
    /// GET pages written so far (data or zeros), from the first.
    filled: u32,
}

/// What the pages of GETs that returned nothing are filled with when a
/// later GET of the same request hits.
static ZERO_PAGE: Page = [0u8; PAGE_SIZE];

impl<'s> GetPages<'s> {
    fn new(mut writable: Cursor<'s>, resp_len: usize) -> Self {
        // Parsing checked that the writable part holds the response and the pages.
        let _ = writable.skip(resp_len as u64);
        GetPages {
            cursor: writable,
            taken: 0,
            filled: 0,
        }
    }

    /// The page of the next GET, by position among the GETs.
    fn take(&mut self) -> u32 {
        self.taken += 1;
        self.taken - 1
    }

    /// Has `produce` write GET page `slot`; it returns `Ok(true)` when it
    /// wrote the whole page (a hit), `Ok(false)` when it wrote nothing (a
    /// miss). When the page is one contiguous guest region, `produce`
    /// writes guest memory itself; otherwise it writes `bounce`, which is
    /// then copied in. After a hit the pages of the GETs before it that
    /// were left out are zeroed. `Err` only when guest memory went away
    /// (the memory map changed since the chain was walked): then the page
    /// was not written, though `produce` may have run into `bounce`.
    fn produce<M: GuestMemory + ?Sized, E>(
        &mut self,
        mem: &M,
        slot: u32,
        bounce: &mut Page,
        produce: impl FnOnce(&mut Page) -> Result<bool, E>,
    ) -> Result<Result<bool, E>, CursorError> {
        let mut at = self.cursor.clone();
        // Parsing checked that the writable part holds every GET page.
        at.skip(u64::from(slot.saturating_sub(self.filled)) * PAGE_SIZE as u64)?;
        let direct = at
            .contiguous(PAGE_SIZE as u64)
            .and_then(|addr| in_guest::page_at(mem, addr));
        let result = match direct {
            Some(page) => page.fill(produce),
            None => {
                let result = produce(bounce);
                if let Ok(true) = result {
                    at.write_all(mem, bounce)?;
                }
                result
            }
        };
        if let Ok(true) = result {
            while self.filled < slot {
                self.cursor.write_all(mem, &ZERO_PAGE)?;
                self.filled += 1;
            }
            self.cursor.skip(PAGE_SIZE as u64)?;
            self.filled += 1;
        }
        Ok(result)
    }
}

/// GET pages produced in place in guest memory: the one `unsafe` block of
/// the data path, kept to one function.
#[allow(unsafe_code)]
mod in_guest {
    use vm_memory::bitmap::BitmapSlice;
    use vm_memory::volatile_memory::PtrGuardMut;
    use vm_memory::{GuestAddress, GuestMemory, Permissions, VolatileSlice};
    use vtmem_protocol::PAGE_SIZE;
    use vtmem_store::Page;

    /// A page of guest memory, mapped contiguously in this process, that a
    /// GET's page may be produced into in place.
    ///
    /// Invariant: `ptr` points at the start of `slice`, which is
    /// `PAGE_SIZE` bytes long.
    pub(super) struct InGuestPage<'m, B: BitmapSlice> {
        slice: VolatileSlice<'m, B>,
        ptr: PtrGuardMut,
    }

    /// The page at `addr` of `mem`, when its 4096 bytes are one contiguous,
    /// writable mapping in this process (`None` otherwise: the caller takes
    /// the bounce path).
    pub(super) fn page_at<M: GuestMemory + ?Sized>(
        mem: &M,
        addr: GuestAddress,
    ) -> Option<InGuestPage<'_, impl BitmapSlice + '_>> {
        let slice = mem
            .get_slices(addr, PAGE_SIZE, Permissions::Write)
            .ok()?
            .next()?
            .ok()?;
        if slice.len() != PAGE_SIZE {
            return None;
        }
        let ptr = slice.ptr_guard_mut();
        Some(InGuestPage { slice, ptr })
    }

    impl<B: BitmapSlice> InGuestPage<'_, B> {
        /// Runs `produce` on the guest's page as a plain `&mut Page`, then
        /// marks the page dirty in the VMM's log unless `produce` reported
        /// a miss (`Ok(false)`: nothing written).
        ///
        /// `produce` must only store into the page: nothing it reads back
        /// from it may decide an index, a length or a branch that memory
        /// safety depends on, because the guest may change those bytes at
        /// any moment. The store's GET keeps to that (`DataHandle::get`).
        pub(super) fn fill<E>(
            self,
            produce: impl FnOnce(&mut Page) -> Result<bool, E>,
        ) -> Result<bool, E> {
            // SAFETY: the pointer is valid for `PAGE_SIZE` bytes: it starts
            // a slice of that length (the type's invariant) inside one guest
            // memory region mapped in this process, and the mapping outlives
            // this call (`mem`, which owns it, stays borrowed for `'m`;
            // vtmemd maps only memfds sealed against shrinking, so no page
            // of it can vanish under us). A `Page` is bytes: alignment 1,
            // every bit pattern valid. The reference does not escape
            // `produce` (a higher-ranked borrow it cannot return).
            // Exclusivity is the part Rust cannot check: the guest's vCPUs,
            // or another worker of this process handed the same guest page
            // by a hostile chain, may read or write these bytes meanwhile,
            // with accesses the compiler does not see. What that can change
            // is the bytes, never what `produce` does: the store only stores
            // into the page (zero and pattern fills, a copy, or lz4_flex's
            // `safe-decode` decompressor, safe Rust whose every access is
            // bounded by positions taken from the compressed input, held in
            // vtmemd's private memory, never by a byte of its output), and
            // nothing in vtmemd reads the page afterwards. So the worst a
            // racing writer gets is wrong bytes in this page, which belongs
            // to the guest that offered it as the destination of its own GET
            // and could overwrite it at will anyway.
            let page = unsafe { &mut *self.ptr.as_ptr().cast::<Page>() };
            let result = produce(page);
            if !matches!(result, Ok(false)) {
                self.slice.bitmap().mark_dirty(0, PAGE_SIZE);
            }
            result
        }
    }
}

/// Where an operation's page is, as a cursor positioned at it.
enum PageSlot<'c, 's> {
    /// The operation has no page.
    None,
    /// A device-readable page, at the cursor.
    Put(&'c mut Cursor<'s>),
    /// A device-writable page, the next of these.
    Get(&'c mut GetPages<'s>),
}

impl PageSlot<'_, '_> {
    /// Moves past the page without touching it.
    fn skip(self) {
        match self {
            // Parsing checked the lengths: a page is always there.
            PageSlot::Put(c) => {
                let _ = c.skip(PAGE_SIZE as u64);
            }
            PageSlot::Get(g) => {
                g.take();
            }
            PageSlot::None => {}
        }
    }
}

/// Which way an operation copied a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Copied {
    Nothing,
    FromGuest,
    ToGuest,
}

/// The wire status a guest sees for a store error.
///
/// The store's errors are its own; this is the one place they meet the
/// protocol. Errors a guest cannot cause by itself (its client removed,
/// an admin-only refusal, content failing its integrity check) become
/// `DEVICE_ERROR`.
pub fn wire_status(error: &TmemError) -> Status {
    match error {
        TmemError::NoSpace => Status::NoSpace,
        TmemError::OverQuota => Status::OverQuota,
        TmemError::Frozen => Status::Frozen,
        TmemError::NoPool => Status::NoPool,
        TmemError::TooManyPools => Status::TooManyPools,
        TmemError::NotAuthorized => Status::NotAuthorized,
        TmemError::NoReservation => Status::NoReservation,
        TmemError::Invalid(_) => Status::Invalid,
        TmemError::ClientGone
        | TmemError::UnknownClient(_)
        | TmemError::ClientExists(_)
        | TmemError::Busy(_) => Status::DeviceError,
    }
}

/// A non-idempotent operation's request, and what became of it.
struct OpRun {
    /// The request and the operation's index in it, if known.
    at: Option<OpRef>,
    /// It was one of the operations that must not run twice (out).
    once: bool,
    /// It was answered from its pending entry (out).
    replayed: bool,
}

/// Executes one decoded operation. Returns its status and the page it
/// copied, if any; an exclusive get's removal goes to `taken`.
#[allow(clippy::too_many_arguments)]
fn execute_op<M: GuestMemory + ?Sized>(
    client: &DataHandle,
    mem: &M,
    op: Op,
    slot: PageSlot<'_, '_>,
    features: Features,
    page: &mut Page,
    taken: &mut Vec<Taken>,
    run: &mut OpRun,
) -> (OpStatus, Copied) {
    let st = OpStatus::new;
    let from = |r: Result<(), TmemError>| match r {
        Ok(()) => st(Status::Ok),
        Err(e) => st(wire_status(&e)),
    };
    let valued = |r: Result<u64, TmemError>| match r {
        Ok(value) => OpStatus {
            status: Status::Ok,
            value,
        },
        Err(e) => st(wire_status(&e)),
    };
    let mut once = |op: OnceOp| {
        run.once = true;
        let answer = client.run_once(op, run.at);
        run.replayed = answer.replayed;
        answer.result
    };
    // Every path below that does not copy the page moves past it.
    let status = match op {
        Op::NewPool(spec) => {
            if (!spec.persistent && !features.ephemeral)
                || (spec.shared.is_some() && !features.shared)
            {
                st(Status::Unsupported)
            } else {
                valued(once(OnceOp::NewPool(spec)))
            }
        }
        Op::DestroyPool { pool } => from(once(OnceOp::DestroyPool(pool)).map(|_| ())),
        Op::Put { handle, reserved } => {
            let PageSlot::Put(cursor) = slot else {
                slot.skip();
                return (st(Status::DeviceError), Copied::Nothing);
            };
            if reserved && !features.reserve {
                let _ = cursor.skip(PAGE_SIZE as u64);
                return (st(Status::Unsupported), Copied::Nothing);
            }
            // The one copy out of guest memory: the store sees only it.
            if cursor.read_exact(mem, &mut page[..]).is_err() {
                return (st(Status::DeviceError), Copied::Nothing);
            }
            return (from(client.put(&handle, page, reserved)), Copied::FromGuest);
        }
        Op::Get { handle } => {
            let PageSlot::Get(gets) = slot else {
                slot.skip();
                return (st(Status::DeviceError), Copied::Nothing);
            };
            let at = gets.take();
            let mut removal = None;
            let got = gets.produce(mem, at, page, |out| {
                client.get_taking(&handle, out).map(|(hit, t)| {
                    removal = t;
                    hit
                })
            });
            // Recorded once the answer is out. If the page could not be
            // written (guest memory went away under the chain), the guest
            // gets DEVICE_ERROR and the page is gone all the same, as with
            // any exclusive get whose answer does not reach the guest
            // while vtmemd lives: the store cannot put it back.
            taken.extend(removal);
            return match got {
                Ok(Ok(true)) => (st(Status::Ok), Copied::ToGuest),
                Ok(Ok(false)) => (st(Status::Miss), Copied::Nothing),
                Ok(Err(e)) => (st(wire_status(&e)), Copied::Nothing),
                Err(_) => (st(Status::DeviceError), Copied::Nothing),
            };
        }
        Op::FlushPage { handle } => from(client.flush_page(&handle)),
        Op::FlushObject { pool, object } => from(client.flush_object(pool, &object)),
        Op::Reserve { pool, pages } => {
            if !features.reserve {
                st(Status::Unsupported)
            } else {
                valued(once(OnceOp::Reserve { pool, pages }))
            }
        }
        Op::Unreserve { pool, pages } => {
            if !features.reserve {
                st(Status::Unsupported)
            } else {
                valued(once(OnceOp::Unreserve { pool, pages }))
            }
        }
        Op::Reset => {
            let _ = once(OnceOp::Reset);
            st(Status::Ok)
        }
    };
    (status, Copied::Nothing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain_walk::Segment;
    use crate::testutil::*;
    use vm_memory::Bytes;

    use crate::device::GuestRam;
    use vtmem_protocol::{Handle, PoolSpec, Response, WireError};
    use vtmem_store::{Store, Uuid};

    const QSIZE: u16 = 256;

    struct Fixture {
        store: Arc<Store>,
        exec: Executor,
    }

    fn fixture() -> Fixture {
        let (store, client) = crate::testutil::store_client();
        let exec = Executor::new(
            client,
            Arc::new(DeviceCounters::default()),
            Arc::new(RateLimitedLog::new("test")),
        );
        Fixture { store, exec }
    }

    fn h(pool: u32, index: u64) -> Handle {
        vtmem_testkit::handle(pool, 7, index)
    }

    /// Sends `ops` (with `puts` as put pages, in order) through a direct or
    /// indirect chain; returns the outcome, the response bytes and the get
    /// pages.
    fn send(
        f: &mut Fixture,
        mem: &GuestRam,
        ring: &mut TestRing<'_>,
        ops: &[Op],
        puts: &[Vec<u8>],
        indirect: bool,
        features: Features,
    ) -> (ChainOutcome, Vec<u8>, Vec<Vec<u8>>) {
        let req = request_bytes(ops, 0x1234);
        let mut bufs = vec![ring.readable(&req)];
        for p in puts {
            bufs.push(ring.readable(p));
        }
        let resp = ring.writable(vtmem_protocol::response_len(ops.len() as u16) as u32);
        bufs.push(resp);
        let gets: Vec<Buf> = ops
            .iter()
            .filter(|o| matches!(o, Op::Get { .. }))
            .map(|_| {
                let b = ring.writable(PAGE_SIZE as u32);
                mem.write_slice(&page_of(0xaa), GuestAddress(b.addr))
                    .unwrap();
                b
            })
            .collect();
        bufs.extend(gets.iter().copied());
        let head = if indirect {
            ring.indirect_chain(&bufs)
        } else {
            ring.chain(&bufs)
        };
        let out = f.exec.run_chain(mem, ring.table(), QSIZE, head, features);
        let resp_bytes = ring.read(resp);
        let pages = gets.iter().map(|b| ring.read(*b)).collect();
        (out, resp_bytes, pages)
    }

    fn statuses(resp: &[u8]) -> Vec<(Status, u64)> {
        let r = Response::parse(resp).unwrap();
        assert_eq!(r.header().status, Status::Ok);
        assert_eq!(r.header().tag, 0x1234);
        (0..r.header().num_ops)
            .map(|i| {
                let s = r.status(i).unwrap();
                (s.status, s.value)
            })
            .collect()
    }

    fn new_pool(f: &mut Fixture, mem: &GuestRam, ring: &mut TestRing<'_>) -> u32 {
        let (out, resp, _) = send(
            f,
            mem,
            ring,
            &[Op::NewPool(PoolSpec::persistent())],
            &[],
            false,
            Features::ALL,
        );
        assert_eq!(out.error, None);
        let st = statuses(&resp);
        assert_eq!(st[0].0, Status::Ok);
        st[0].1 as u32
    }

    #[test]
    fn put_then_get_round_trips() {
        let mut f = fixture();
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let pool = new_pool(&mut f, &mem, &mut ring);
        let data = patterned_page(1);
        let (out, resp, pages) = send(
            &mut f,
            &mem,
            &mut ring,
            &[
                Op::Put {
                    handle: h(pool, 1),
                    reserved: false,
                },
                Op::Get { handle: h(pool, 1) },
            ],
            std::slice::from_ref(&data),
            false,
            Features::ALL,
        );
        assert_eq!(out.error, None);
        assert_eq!(out.used_len as usize, 16 + 2 * 16 + PAGE_SIZE);
        assert_eq!(statuses(&resp), vec![(Status::Ok, 0), (Status::Ok, 0)]);
        assert_eq!(pages[0], data);
        let c = f.exec.counters.snapshot();
        assert_eq!(c.bytes_from_guest, PAGE_SIZE as u64);
        assert_eq!(c.bytes_to_guest, PAGE_SIZE as u64);
        assert_eq!(f.store.stats().clients.len(), 1);
    }

    #[test]
    fn split_buffers_round_trip() {
        // Every arrangement of the same PUT+GET request stores the page
        // from the bytes across the pieces and returns it across the pieces.
        let mut f = fixture();
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let pool = new_pool(&mut f, &mem, &mut ring);
        let mut n = 0u64;
        for rc in READABLE_CUTS {
            for wc in WRITABLE_CUTS {
                n += 1;
                let data = patterned_page(n);
                let ops = [
                    Op::Put {
                        handle: h(pool, n),
                        reserved: false,
                    },
                    Op::Get { handle: h(pool, n) },
                ];
                let mut readable = request_bytes(&ops, 0x1234);
                readable.extend_from_slice(&data);
                let mut ring = TestRing::new(&mem, QSIZE);
                let mut bufs = ring.readable_split(&readable, rc);
                let writable = ring.writable_split(48 + PAGE_SIZE, wc);
                bufs.extend(writable.iter().copied());
                let head = ring.indirect_chain(&bufs);
                let out = f
                    .exec
                    .run_chain(&mem, ring.table(), QSIZE, head, Features::ALL);
                let what = format!("readable cut at {rc:?}, writable at {wc:?}");
                assert_eq!(out.error, None, "{what}");
                assert_eq!(out.used_len as usize, 48 + PAGE_SIZE, "{what}");
                let back = ring.read_all(&writable);
                assert_eq!(
                    statuses(&back[..48]),
                    vec![(Status::Ok, 0), (Status::Ok, 0)],
                    "{what}"
                );
                assert!(back[48..] == data[..], "{what}");
            }
        }
    }

    #[test]
    fn indirect_chain_round_trips() {
        let mut f = fixture();
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let pool = new_pool(&mut f, &mem, &mut ring);
        let pages: Vec<Vec<u8>> = (0..8).map(patterned_page).collect();
        let mut ops: Vec<Op> = (0..8)
            .map(|i| Op::Put {
                handle: h(pool, i),
                reserved: false,
            })
            .collect();
        ops.extend((0..8).rev().map(|i| Op::Get { handle: h(pool, i) }));
        let (out, resp, got) = send(&mut f, &mem, &mut ring, &ops, &pages, true, Features::ALL);
        assert_eq!(out.error, None);
        assert!(statuses(&resp).iter().all(|s| s.0 == Status::Ok));
        for (k, i) in (0..8).rev().enumerate() {
            assert_eq!(got[k], pages[i]);
        }
        assert_eq!(out.used_len as usize, 16 + 16 * 16 + 8 * PAGE_SIZE);
    }

    #[test]
    fn get_miss_writes_nothing() {
        let mut f = fixture();
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let pool = new_pool(&mut f, &mem, &mut ring);
        let (out, resp, pages) = send(
            &mut f,
            &mem,
            &mut ring,
            &[Op::Get { handle: h(pool, 9) }],
            &[],
            false,
            Features::ALL,
        );
        assert_eq!(statuses(&resp), vec![(Status::Miss, 0)]);
        assert_eq!(out.used_len, 32);
        assert_eq!(pages[0], page_of(0xaa));
    }

    #[test]
    fn chains_with_gets_are_counted_with_their_gets() {
        let mut f = fixture();
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let pool = new_pool(&mut f, &mem, &mut ring);
        let data = page_of(7);
        let (_, resp, _) = send(
            &mut f,
            &mem,
            &mut ring,
            &[Op::Put {
                handle: h(pool, 1),
                reserved: false,
            }],
            &[data],
            false,
            Features::ALL,
        );
        assert_eq!(statuses(&resp), vec![(Status::Ok, 0)]);
        let none = f.exec.counters.snapshot();
        assert_eq!((none.get_chains, none.get_ops), (0, 0));
        let ops: Vec<Op> = (0..3).map(|i| Op::Get { handle: h(pool, i) }).collect();
        send(&mut f, &mem, &mut ring, &ops, &[], false, Features::ALL);
        let after = f.exec.counters.snapshot();
        assert_eq!((after.get_chains, after.get_ops), (1, 3));
    }

    #[test]
    fn used_length_counts_a_written_prefix() {
        // GET miss, GET hit, GET miss: the page of the first miss is
        // zeroed so that the used length covers the hit; the last stays.
        let mut f = fixture();
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let pool = new_pool(&mut f, &mem, &mut ring);
        let data = patterned_page(7);
        let (out, _, _) = send(
            &mut f,
            &mem,
            &mut ring,
            &[Op::Put {
                handle: h(pool, 2),
                reserved: false,
            }],
            std::slice::from_ref(&data),
            false,
            Features::ALL,
        );
        assert_eq!(out.used_len, 32);
        let ops = [
            Op::Get { handle: h(pool, 1) },
            Op::Get { handle: h(pool, 2) },
            Op::Get { handle: h(pool, 3) },
        ];
        let (out, resp, pages) = send(&mut f, &mem, &mut ring, &ops, &[], false, Features::ALL);
        assert_eq!(
            statuses(&resp),
            vec![(Status::Miss, 0), (Status::Ok, 0), (Status::Miss, 0)]
        );
        assert_eq!(out.used_len as usize, 16 + 3 * 16 + 2 * PAGE_SIZE);
        assert_eq!(pages[0], page_of(0));
        assert_eq!(pages[1], data);
        assert_eq!(pages[2], page_of(0xaa));
        // Misses alone write no page at all.
        let (out, _, pages) = send(
            &mut f,
            &mem,
            &mut ring,
            &ops[..1],
            &[],
            false,
            Features::ALL,
        );
        assert_eq!(out.used_len, 32);
        assert_eq!(pages[0], page_of(0xaa));
    }

    /// The writable cuts of [`WRITABLE_CUTS`] (response of 48 bytes, then
    /// one page) that leave the page in one buffer.
    fn page_in_one_buffer(cuts: &[usize]) -> bool {
        !cuts.iter().any(|&c| c > 48 && c < 48 + PAGE_SIZE)
    }

    #[test]
    fn get_pages_go_in_place_when_contiguous_and_through_the_bounce_when_split() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let want = patterned_page(11);
        let mut seen = [false; 2];
        for cuts in WRITABLE_CUTS {
            let bufs = ring.writable_split(48 + PAGE_SIZE, cuts);
            let segs: Vec<Segment> = bufs
                .iter()
                .map(|b| Segment {
                    addr: GuestAddress(b.addr),
                    len: b.len,
                    writable: true,
                })
                .collect();
            let mut gets = GetPages::new(Cursor::new(&segs), 48);
            let mut bounce: Box<Page> = Box::new([0u8; PAGE_SIZE]);
            let bounce_at = bounce.as_ptr();
            let mut in_place = None;
            let slot = gets.take();
            let r = gets.produce(&mem, slot, &mut bounce, |out| {
                in_place = Some(out.as_ptr() != bounce_at);
                out.copy_from_slice(&want);
                Ok::<bool, ()>(true)
            });
            assert_eq!(r, Ok(Ok(true)), "{cuts:?}");
            let contiguous = page_in_one_buffer(cuts);
            assert_eq!(in_place, Some(contiguous), "{cuts:?}");
            seen[usize::from(contiguous)] = true;
            assert_eq!(gets.filled, 1);
            assert!(ring.read_all(&bufs)[48..] == want[..], "{cuts:?}");
        }
        assert_eq!(seen, [true, true], "both paths exercised");
    }

    #[test]
    fn a_page_outside_guest_memory_takes_the_bounce_path_and_fails_cleanly() {
        // A page straddling the end of guest memory (as after a memory map
        // change shrank it since the walk): not one mapping, so it is
        // produced into the bounce page, whose copy then fails, as before.
        let mem = guest_memory();
        let segs = [Segment {
            addr: GuestAddress(MEM_SIZE - 2048),
            len: PAGE_SIZE as u32,
            writable: true,
        }];
        let mut gets = GetPages::new(Cursor::new(&segs), 0);
        let mut bounce: Box<Page> = Box::new([0u8; PAGE_SIZE]);
        let slot = gets.take();
        let r = gets.produce(&mem, slot, &mut bounce, |out| {
            out.fill(1);
            Ok::<bool, ()>(true)
        });
        assert!(matches!(r, Err(CursorError::Memory { .. })));
        assert_eq!(gets.filled, 0);
    }

    /// Sends a request of GETs whose page buffers are each one buffer
    /// (`split` false) or three (`split` true), each first filled with
    /// 0xaa; returns the statuses, the used length and the pages.
    fn send_gets(
        f: &mut Fixture,
        mem: &GuestRam,
        ops: &[Op],
        split: bool,
    ) -> (Vec<Status>, u32, Vec<Vec<u8>>) {
        let mut ring = TestRing::new(mem, QSIZE);
        let req = request_bytes(ops, 0x1234);
        let resp = ring.writable(vtmem_protocol::response_len(ops.len() as u16) as u32);
        let mut bufs = vec![ring.readable(&req), resp];
        let mut pages = Vec::new();
        for _ in ops {
            let cuts: &[usize] = if split { &[1, 2049] } else { &[] };
            let page = ring.writable_split(PAGE_SIZE, cuts);
            for b in &page {
                mem.write_slice(&vec![0xaa; b.len as usize], GuestAddress(b.addr))
                    .unwrap();
            }
            bufs.extend(page.iter().copied());
            pages.push(page);
        }
        let head = ring.indirect_chain(&bufs);
        let out = f
            .exec
            .run_chain(mem, ring.table(), QSIZE, head, Features::ALL);
        assert_eq!(out.error, None);
        let st = statuses(&ring.read(resp))
            .into_iter()
            .map(|s| s.0)
            .collect();
        let pages = pages.iter().map(|p| ring.read_all(p)).collect();
        (st, out.used_len, pages)
    }

    #[test]
    fn every_page_kind_comes_back_identical_in_place_and_split() {
        use vtmem_testkit::{same_filled_page, text_page, zero_page};
        let mut f = fixture();
        let mem = guest_memory();
        let mut round = 0u64;
        for spec in [PoolSpec::persistent(), PoolSpec::ephemeral()] {
            for split in [false, true] {
                let what = format!("{spec:?}, split {split}");
                // Contents of their own each round, so that none dedups
                // against an earlier round's.
                round += 1;
                let kinds: Vec<(&str, Vec<u8>)> = vec![
                    ("zero", zero_page().to_vec()),
                    (
                        "pattern",
                        same_filled_page(0x0102_0304_0506_0700 + round).to_vec(),
                    ),
                    ("lz4", text_page(20 + 4 * round).to_vec()),
                    ("raw", patterned_page(21 + 4 * round)),
                    ("deduplicated", text_page(22 + 4 * round).to_vec()),
                ];
                // A fresh pool each time: ephemeral gets take the page.
                let mut ring = TestRing::new(&mem, QSIZE);
                let (_, resp, _) = send(
                    &mut f,
                    &mem,
                    &mut ring,
                    &[Op::NewPool(spec)],
                    &[],
                    false,
                    Features::ALL,
                );
                let pool = statuses(&resp)[0].1 as u32;
                let before = f.store.stats();
                // Every kind at index 1.., the duplicate once more at 9.
                let mut puts: Vec<Op> = (1..=kinds.len() as u64)
                    .map(|i| Op::Put {
                        handle: h(pool, i),
                        reserved: false,
                    })
                    .collect();
                puts.push(Op::Put {
                    handle: h(pool, 9),
                    reserved: false,
                });
                let mut pages: Vec<Vec<u8>> = kinds.iter().map(|k| k.1.clone()).collect();
                pages.push(kinds[4].1.clone());
                let mut ring = TestRing::new(&mem, QSIZE);
                let (_, resp, _) =
                    send(&mut f, &mem, &mut ring, &puts, &pages, true, Features::ALL);
                assert!(statuses(&resp).iter().all(|s| s.0 == Status::Ok), "{what}");
                // The store did tell the kinds apart.
                let after = f.store.stats();
                let vm = &after.clients[0];
                let vm_before = &before.clients[0];
                assert_eq!(after.zero_pages - before.zero_pages, 1, "{what}");
                assert_eq!(
                    after.same_filled_pages - before.same_filled_pages,
                    1,
                    "{what}"
                );
                assert_eq!(after.raw_pages - before.raw_pages, 1, "{what}");
                assert_eq!(
                    vm.deduplicated_pages - vm_before.deduplicated_pages,
                    1,
                    "{what}"
                );

                // A miss, every kind, the duplicate, a miss.
                let mut gets = vec![Op::Get { handle: h(pool, 8) }];
                gets.extend((1..=kinds.len() as u64).map(|i| Op::Get { handle: h(pool, i) }));
                gets.push(Op::Get { handle: h(pool, 9) });
                gets.push(Op::Get {
                    handle: h(pool, 10),
                });
                let (st, used, got) = send_gets(&mut f, &mem, &gets, split);
                let mut want = vec![Status::Ok; gets.len()];
                want[0] = Status::Miss;
                want[gets.len() - 1] = Status::Miss;
                assert_eq!(st, want, "{what}");
                // The miss before a hit is zeroed (the used length covers
                // it), the one after the last hit is untouched.
                assert_eq!(got[0], page_of(0), "{what}");
                for (k, (name, page)) in kinds.iter().enumerate() {
                    assert!(got[k + 1] == *page, "{what}: {name}");
                }
                assert!(got[kinds.len() + 1] == kinds[4].1, "{what}: duplicate");
                assert_eq!(got[gets.len() - 1], page_of(0xaa), "{what}");
                assert_eq!(
                    used as usize,
                    16 + 16 * gets.len() + (gets.len() - 1) * PAGE_SIZE,
                    "{what}"
                );

                // Misses alone touch no page; ephemeral pages were taken
                // by the first GET, persistent ones stay.
                let (st, used, got) = send_gets(&mut f, &mem, &gets[..2], split);
                let second = if spec.persistent {
                    Status::Ok
                } else {
                    Status::Miss
                };
                assert_eq!(st, vec![Status::Miss, second], "{what}");
                if spec.persistent {
                    assert_eq!(got[1], kinds[0].1, "{what}");
                } else {
                    assert_eq!(used, 16 + 2 * 16, "{what}");
                    assert!(got.iter().all(|p| *p == page_of(0xaa)), "{what}");
                }
            }
        }
    }

    #[test]
    fn invalid_ops_get_their_own_status() {
        let mut f = fixture();
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let pool = new_pool(&mut f, &mem, &mut ring);
        let ops = [
            Op::Put {
                handle: h(pool, 1),
                reserved: false,
            },
            Op::Reset, // patched below into an unknown opcode
            Op::Put {
                handle: h(pool, 2),
                reserved: false,
            }, // patched below: undefined flags
            Op::Get { handle: h(pool, 1) },
            Op::DestroyPool { pool: 99 },
        ];
        let mut req = request_bytes(&ops, 0x1234);
        req[16 + 48] = 0xee;
        req[16 + 2 * 48 + 1] = 0x80;
        let r = ring.readable(&req);
        let p1 = ring.readable(&patterned_page(1));
        let p2 = ring.readable(&patterned_page(2));
        let resp = ring.writable(16 + 5 * 16);
        let g = ring.writable(PAGE_SIZE as u32);
        let head = ring.chain(&[r, p1, p2, resp, g]);
        let out = f
            .exec
            .run_chain(&mem, ring.table(), QSIZE, head, Features::ALL);
        assert_eq!(out.error, None);
        assert_eq!(
            statuses(&ring.read(resp)),
            vec![
                (Status::Ok, 0),
                (Status::Unsupported, 0),
                (Status::Invalid, 0),
                (Status::Ok, 0),
                (Status::NoPool, 0),
            ]
        );
        // The GET used the first page buffer after the response, so the
        // invalid PUT's page did not shift the layout.
        assert_eq!(ring.read(g), patterned_page(1));
        assert_eq!(f.exec.counters.snapshot().invalid_ops, 2);
        assert_eq!(WireError::UnknownOpcode(0xee).status(), Status::Unsupported);
    }

    #[test]
    fn store_errors_reach_the_guest_as_their_own_statuses() {
        let cases = [
            (TmemError::NoSpace, Status::NoSpace),
            (TmemError::OverQuota, Status::OverQuota),
            (TmemError::Frozen, Status::Frozen),
            (TmemError::NoPool, Status::NoPool),
            (TmemError::TooManyPools, Status::TooManyPools),
            (TmemError::NotAuthorized, Status::NotAuthorized),
            (TmemError::NoReservation, Status::NoReservation),
            (TmemError::Invalid("x"), Status::Invalid),
            (TmemError::ClientGone, Status::DeviceError),
            (TmemError::Busy("x"), Status::DeviceError),
        ];
        for (error, status) in cases {
            assert_eq!(wire_status(&error), status, "{error}");
        }
    }

    #[test]
    fn features_gate_operations() {
        let mut f = fixture();
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let pool = new_pool(&mut f, &mem, &mut ring);
        let none = Features::default();
        let (_, resp, _) = send(
            &mut f,
            &mem,
            &mut ring,
            &[
                Op::NewPool(PoolSpec::ephemeral()),
                Op::NewPool(PoolSpec::shared(Uuid::from_bytes([1; 16]).unwrap())),
                Op::Reserve { pool, pages: 4 },
                Op::Unreserve { pool, pages: 4 },
                Op::Put {
                    handle: h(pool, 1),
                    reserved: true,
                },
                Op::NewPool(PoolSpec::persistent()),
            ],
            &[patterned_page(3)],
            false,
            none,
        );
        let st: Vec<Status> = statuses(&resp).into_iter().map(|s| s.0).collect();
        assert_eq!(
            st,
            vec![
                Status::Unsupported,
                Status::Unsupported,
                Status::Unsupported,
                Status::Unsupported,
                Status::Unsupported,
                Status::Ok,
            ]
        );
    }

    #[test]
    fn reserve_and_reserved_put() {
        let mut f = fixture();
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let pool = new_pool(&mut f, &mem, &mut ring);
        let (_, resp, _) = send(
            &mut f,
            &mem,
            &mut ring,
            &[
                Op::Reserve { pool, pages: 2 },
                Op::Put {
                    handle: h(pool, 1),
                    reserved: true,
                },
                Op::Unreserve { pool, pages: 1 },
            ],
            &[patterned_page(4)],
            false,
            Features::ALL,
        );
        assert_eq!(
            statuses(&resp),
            vec![(Status::Ok, 2), (Status::Ok, 0), (Status::Ok, 0)]
        );
    }

    #[test]
    fn reset_drops_every_pool() {
        let mut f = fixture();
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let pool = new_pool(&mut f, &mem, &mut ring);
        let (_, resp, _) = send(
            &mut f,
            &mem,
            &mut ring,
            &[
                Op::Put {
                    handle: h(pool, 1),
                    reserved: false,
                },
                Op::Reset,
                Op::Get { handle: h(pool, 1) },
            ],
            &[patterned_page(5)],
            false,
            Features::ALL,
        );
        let st: Vec<Status> = statuses(&resp).into_iter().map(|s| s.0).collect();
        assert_eq!(st, vec![Status::Ok, Status::Ok, Status::NoPool]);
    }

    #[test]
    fn request_level_error_writes_only_a_header() {
        let mut f = fixture();
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let mut req = request_bytes(&[Op::Reset], 0x55);
        req[0] = 9;
        let r = ring.readable(&req);
        let resp = ring.writable(32);
        mem.write_slice(&[0xcc; 32], GuestAddress(resp.addr))
            .unwrap();
        let head = ring.chain(&[r, resp]);
        let out = f
            .exec
            .run_chain(&mem, ring.table(), QSIZE, head, Features::ALL);
        assert_eq!(out.used_len, 16);
        assert_eq!(
            out.error,
            Some(ChainError::BadHeader(WireError::BadVersion(9)))
        );
        let bytes = ring.read(resp);
        let hdr = ResponseHeader::decode(&bytes).unwrap();
        assert_eq!(
            hdr,
            ResponseHeader {
                num_ops: 0,
                status: Status::BadVersion,
                tag: 0x55
            }
        );
        assert_eq!(&bytes[16..], &[0xcc; 16]);
        assert_eq!(f.exec.counters.snapshot().rejected_chains, 1);
    }

    #[test]
    fn dropped_chain_touches_nothing() {
        let mut f = fixture();
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let pool = new_pool(&mut f, &mem, &mut ring);
        // A PUT whose response buffer is too short: nothing executes.
        let req = request_bytes(
            &[Op::Put {
                handle: h(pool, 1),
                reserved: false,
            }],
            1,
        );
        let r = ring.readable(&req);
        let p = ring.readable(&patterned_page(6));
        let resp = ring.writable(20);
        mem.write_slice(&[0xcc; 20], GuestAddress(resp.addr))
            .unwrap();
        let head = ring.chain(&[r, p, resp]);
        let out = f
            .exec
            .run_chain(&mem, ring.table(), QSIZE, head, Features::ALL);
        assert_eq!(out.used_len, 0);
        assert!(matches!(
            out.error,
            Some(ChainError::ResponseTooShort { .. })
        ));
        assert_eq!(ring.read(resp), vec![0xcc; 20]);
        let (_, resp, _) = send(
            &mut f,
            &mem,
            &mut ring,
            &[Op::Get { handle: h(pool, 1) }],
            &[],
            false,
            Features::ALL,
        );
        assert_eq!(statuses(&resp)[0].0, Status::Miss);
        assert_eq!(f.exec.counters.snapshot().dropped_chains, 1);
    }

    #[test]
    fn removed_client_answers_device_error() {
        let mut f = fixture();
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let pool = new_pool(&mut f, &mem, &mut ring);
        f.store.remove_client("vm").unwrap();
        let (out, resp, _) = send(
            &mut f,
            &mem,
            &mut ring,
            &[Op::Get { handle: h(pool, 1) }],
            &[],
            false,
            Features::ALL,
        );
        assert_eq!(out.error, None);
        assert_eq!(statuses(&resp)[0].0, Status::DeviceError);
    }
}

#[cfg(test)]
mod rule5 {
    //! An exclusive get's removal is recorded only once the executor is
    //! told its answer is in the used ring (`settle`).
    use super::*;
    use crate::device::GuestRam;
    use crate::testutil::*;
    use vtmem_protocol::{PoolSpec, Response};
    use vtmem_store::{ClientConfig, Store, StoreConfig};

    const QSIZE: u16 = 256;

    /// What a crash now would leave, recovered: the persistent pages of
    /// "vm".
    fn crash_pages(from: &std::path::Path) -> u64 {
        let (store, _dir) = crash_copy(from, 64 << 20);
        store.client("vm").unwrap().stats().persistent_pages
    }

    fn run(
        exec: &mut Executor,
        mem: &GuestRam,
        ring: &mut TestRing<'_>,
        op: Op,
        put: Option<&[u8]>,
    ) -> (Status, u64) {
        let req = request_bytes(&[op], 7);
        let mut bufs = vec![ring.readable(&req)];
        if let Some(p) = put {
            bufs.push(ring.readable(p));
        }
        let resp = ring.writable(vtmem_protocol::response_len(1) as u32);
        bufs.push(resp);
        if matches!(op, Op::Get { .. }) {
            bufs.push(ring.writable(PAGE_SIZE as u32));
        }
        let head = ring.chain(&bufs);
        exec.run_chain(mem, ring.table(), QSIZE, head, Features::ALL);
        let bytes = ring.read(resp);
        let r = Response::parse(&bytes).unwrap();
        let s = r.status(0).unwrap();
        (s.status, s.value)
    }

    #[test]
    fn an_exclusive_get_is_recorded_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = Store::create(
            &state,
            StoreConfig {
                host_limit: 64 << 20,
            },
        )
        .unwrap();
        let client = store.add_client("vm", ClientConfig::default()).unwrap();
        let mut exec = Executor::new(
            client.data(),
            Arc::new(DeviceCounters::default()),
            Arc::new(RateLimitedLog::new("test")),
        );
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let spec = PoolSpec {
            exclusive_gets: true,
            ..PoolSpec::persistent()
        };
        let (st, pool) = run(&mut exec, &mem, &mut ring, Op::NewPool(spec), None);
        assert_eq!(st, Status::Ok);
        let handle = vtmem_testkit::handle(pool as u32, 7, 1);
        let data = patterned_page(5);
        let put = Op::Put {
            handle,
            reserved: false,
        };
        assert_eq!(
            run(&mut exec, &mem, &mut ring, put, Some(&data)).0,
            Status::Ok
        );
        assert_eq!(exec.unsettled(), 0);

        assert_eq!(
            run(&mut exec, &mem, &mut ring, Op::Get { handle }, None).0,
            Status::Ok
        );
        // Taken: a second get misses, but a crash now keeps the page.
        assert_eq!(exec.unsettled(), 1);
        // Still charged until settled.
        assert_eq!(client.stats().persistent_pages, 1);
        assert_eq!(
            run(&mut exec, &mem, &mut ring, Op::Get { handle }, None).0,
            Status::Miss
        );
        assert_eq!(crash_pages(&state), 1, "the removal was recorded too early");

        exec.settle();
        assert_eq!(exec.unsettled(), 0);
        assert_eq!(
            crash_pages(&state),
            0,
            "the settled removal was not recorded"
        );
        assert_eq!(client.stats().persistent_pages, 0);
    }
}

#[cfg(test)]
mod offered_twice {
    //! A request whose non-idempotent operations ran, offered again after
    //! a crash at the same ring position with the same tag, is answered
    //! from their records (docs/protocol.md section 8).
    use super::*;
    use crate::device::GuestRam;
    use crate::testutil::*;
    use vtmem_protocol::{PoolSpec, Response};
    use vtmem_store::{AdminHandle, ClientConfig, Store, StoreConfig};

    const QSIZE: u16 = 256;
    const QUEUE: u16 = 1;

    fn config() -> StoreConfig {
        StoreConfig {
            host_limit: 64 << 20,
        }
    }

    fn executor(client: &AdminHandle) -> (Executor, Arc<DeviceCounters>) {
        let counters = Arc::new(DeviceCounters::default());
        let e = Executor::new(
            client.data(),
            counters.clone(),
            Arc::new(RateLimitedLog::new("test")),
        )
        .on_queue(QUEUE);
        (e, counters)
    }

    /// Runs `ops` as one request of tag `tag` at ring position `position`;
    /// returns each operation's status and value.
    fn run(exec: &mut Executor, ops: &[Op], tag: u64, position: u16) -> Vec<(Status, u64)> {
        let mem: GuestRam = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let req = request_bytes(ops, tag);
        let r = ring.readable(&req);
        let resp = ring.writable(vtmem_protocol::response_len(ops.len() as u16) as u32);
        let head = ring.chain(&[r, resp]);
        let out = exec.run_chain_at(
            &mem,
            ring.table(),
            QSIZE,
            head,
            Features::ALL,
            Some(position),
        );
        assert_eq!(out.error, None);
        let bytes = ring.read(resp);
        let r = Response::parse(&bytes).unwrap();
        (0..ops.len() as u16)
            .map(|i| {
                let s = r.status(i).unwrap();
                (s.status, s.value)
            })
            .collect()
    }

    fn batch() -> Vec<Op> {
        vec![
            Op::NewPool(PoolSpec::persistent()),
            Op::Reserve { pool: 0, pages: 5 },
        ]
    }

    /// Pools of "vm" and pages reserved.
    fn held(store: &Store) -> (usize, u64) {
        let s = store.client("vm").unwrap().stats();
        (s.pools.len(), s.reserved_pages)
    }

    #[test]
    fn a_new_pool_and_a_reservation_offered_again_are_answered_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = Store::create(&state, config()).unwrap();
        let client = store.add_client("vm", ClientConfig::default()).unwrap();
        let (mut exec, _) = executor(&client);
        exec.start(10, QSIZE);
        let first = run(&mut exec, &batch(), 42, 10);
        assert_eq!(first, vec![(Status::Ok, 0), (Status::Ok, 5)]);
        // Taken and run, the answer not in the used ring: a crash now.
        let (crashed, _keep) = crash_copy(&state, config().host_limit);
        let c = crashed.client("vm").unwrap();
        assert_eq!(c.data().pending_ops().len(), 2);
        let (mut again, counters) = executor(&c);
        again.start(10, QSIZE);
        // Offered again: the same answers, nothing run twice.
        assert_eq!(run(&mut again, &batch(), 42, 10), first);
        assert_eq!(held(&crashed), (1, 5));
        assert_eq!(counters.snapshot().replayed_answers, 2);
        // Once answered and settled, its entries are gone, for good.
        again.settle();
        assert!(c.data().pending_ops().is_empty());
        let (after, _keep2) = crash_copy(_keep.path(), config().host_limit);
        assert!(after.client("vm").unwrap().data().pending_ops().is_empty());
        assert_eq!(held(&after), (1, 5));

        // Another tag, or another position: another request, run anew.
        for (tag, position) in [(43, 10), (42, 11)] {
            let (crashed, _keep) = crash_copy(&state, config().host_limit);
            let c = crashed.client("vm").unwrap();
            let (mut other, counters) = executor(&c);
            other.start(10, QSIZE);
            assert_eq!(
                run(&mut other, &batch(), tag, position),
                vec![(Status::Ok, 1), (Status::Ok, 5)],
                "tag {tag} at {position}"
            );
            assert_eq!(held(&crashed), (2, 10));
            assert_eq!(counters.snapshot().replayed_answers, 0);
        }
    }

    #[test]
    fn entries_before_the_queues_start_were_answered_and_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = Store::create(&state, config()).unwrap();
        let client = store.add_client("vm", ClientConfig::default()).unwrap();
        let (mut exec, _) = executor(&client);
        exec.start(10, QSIZE);
        run(&mut exec, &batch(), 42, 10);
        // The answer reached the used ring (index 11), then the crash came
        // before the Settled record: the queue starts at 11.
        let (crashed, keep) = crash_copy(&state, config().host_limit);
        let c = crashed.client("vm").unwrap();
        let (mut again, counters) = executor(&c);
        again.start(11, QSIZE);
        assert!(c.data().pending_ops().is_empty());
        // Dropped for good: recorded.
        let (after, _keep2) = crash_copy(keep.path(), config().host_limit);
        assert!(after.client("vm").unwrap().data().pending_ops().is_empty());
        // A later request with the same tag at that position (the ring
        // went round) runs.
        assert_eq!(
            run(&mut again, &batch(), 42, 10),
            vec![(Status::Ok, 1), (Status::Ok, 5)]
        );
        assert_eq!(counters.snapshot().replayed_answers, 0);
        // A queue that starts with the entry in its window keeps it, and
        // settles its request once answered, whatever it holds.
        let (crashed, _keep3) = crash_copy(&state, config().host_limit);
        let c = crashed.client("vm").unwrap();
        let (mut other, _) = executor(&c);
        other.start(10u16.wrapping_sub(QSIZE - 1), QSIZE);
        assert_eq!(c.data().pending_ops().len(), 2);
        run(
            &mut other,
            &[Op::FlushObject {
                pool: 0,
                object: vtmem_protocol::ObjectId([1, 2, 3]),
            }],
            9,
            10,
        );
        other.settle();
        assert!(c.data().pending_ops().is_empty());
    }

    #[test]
    fn a_destroy_pool_and_a_reset_offered_again_are_answered_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = Store::create(&state, config()).unwrap();
        let client = store.add_client("vm", ClientConfig::default()).unwrap();
        let (mut exec, _) = executor(&client);
        exec.start(0, QSIZE);
        run(&mut exec, &[Op::Reset], 1, 0);
        run(&mut exec, &[Op::NewPool(PoolSpec::persistent())], 2, 1);
        run(&mut exec, &[Op::NewPool(PoolSpec::persistent())], 3, 2);
        exec.settle();
        assert!(client.data().pending_ops().is_empty());
        // Pool 0 destroyed, a new pool 0 made, in one request: offered
        // again, the second pool 0 must not be destroyed.
        let ops = [
            Op::DestroyPool { pool: 0 },
            Op::NewPool(PoolSpec::persistent()),
        ];
        assert_eq!(
            run(&mut exec, &ops, 4, 3),
            vec![(Status::Ok, 0), (Status::Ok, 0)]
        );
        let (crashed, _keep) = crash_copy(&state, config().host_limit);
        let c = crashed.client("vm").unwrap();
        let (mut again, counters) = executor(&c);
        again.start(3, QSIZE);
        assert_eq!(
            run(&mut again, &ops, 4, 3),
            vec![(Status::Ok, 0), (Status::Ok, 0)]
        );
        assert_eq!(held(&crashed), (2, 0));
        assert_eq!(counters.snapshot().replayed_answers, 2);
        // A reset offered again after pools came (in the same batch) does
        // not destroy them.
        assert_eq!(run(&mut exec, &[Op::Reset], 5, 4), vec![(Status::Ok, 0)]);
        assert_eq!(
            run(&mut exec, &[Op::NewPool(PoolSpec::persistent())], 6, 5),
            vec![(Status::Ok, 0)]
        );
        let (crashed, _keep) = crash_copy(&state, config().host_limit);
        let c = crashed.client("vm").unwrap();
        let (mut again, counters) = executor(&c);
        again.start(4, QSIZE);
        assert_eq!(run(&mut again, &[Op::Reset], 5, 4), vec![(Status::Ok, 0)]);
        assert_eq!(
            run(&mut again, &[Op::NewPool(PoolSpec::persistent())], 6, 5),
            vec![(Status::Ok, 0)]
        );
        assert_eq!(held(&crashed), (1, 0));
        assert_eq!(counters.snapshot().replayed_answers, 2);
    }
}
