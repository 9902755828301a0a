// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Turns a descriptor chain into a validated request.
//!
//! This module walks the split-ring descriptor table itself (rather than
//! trusting a generic iterator) so that every way a guest can break a chain
//! has its own [`ChainError`] variant: loops, indices past the table,
//! nested or malformed indirect tables, buffers outside guest memory, wrong
//! buffer counts, directions or sizes, and bad request headers.
//!
//! The request buffer is copied out of guest memory once, into memory the
//! guest cannot touch, before it is looked at: a guest that rewrites it
//! while the device works changes nothing.
//!
//! Nothing here touches the store; [`crate::exec`] runs what this module
//! validated.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vtmem_protocol::{
    request_len, response_len, Request, RequestHeader, Status, WireError, MAX_OPS_PER_REQUEST,
    MAX_REQUEST_LEN, PAGE_SIZE, REQUEST_HEADER_SIZE, RESPONSE_HEADER_SIZE,
};

/// Size of one split-ring descriptor.
const DESC_SIZE: u64 = 16;

/// Most descriptors a valid chain can have: the request buffer, a page per
/// operation, and the response buffer.
pub const MAX_CHAIN_DESCRIPTORS: usize = 2 + MAX_OPS_PER_REQUEST as usize;

/// One buffer of a chain: guest address, length, direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

/// Everything that can be wrong with a chain.
///
/// [`ChainError::status`] says how the device answers: `None` means the
/// chain is returned with used length 0 (there is nowhere trustworthy to
/// write an answer), `Some(status)` means a response header with that
/// request-level status and no operation executed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ChainError {
    /// The available ring names a head past the descriptor table.
    #[error("chain head {index} is outside the descriptor table of {size} entries")]
    HeadOutOfRange {
        /// The head index.
        index: u16,
        /// Table size.
        size: u16,
    },
    /// A `next` field points past the (direct or indirect) table.
    #[error("descriptor next index {index} is outside the table of {size} entries")]
    NextOutOfRange {
        /// The next index.
        index: u16,
        /// Table size.
        size: u16,
    },
    /// A descriptor table entry is not in guest memory.
    #[error("descriptor at {addr:#x} is not in guest memory")]
    DescriptorUnreadable {
        /// Address of the descriptor.
        addr: u64,
    },
    /// The chain visits more descriptors than its table holds: a loop.
    #[error("descriptor chain loops (more than the {size} entries of its table)")]
    Loop {
        /// Table size.
        size: u16,
    },
    /// The chain is longer than any valid request.
    #[error("descriptor chain is longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// An indirect descriptor although `VIRTIO_RING_F_INDIRECT_DESC` was not negotiated.
    #[error("indirect descriptor used without VIRTIO_RING_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    /// An indirect descriptor inside an indirect table.
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    /// An indirect descriptor that also has `VIRTQ_DESC_F_NEXT`.
    #[error("indirect descriptor with the NEXT flag set")]
    IndirectWithNext,
    /// An indirect table whose length is zero, not a multiple of 16, or too large.
    #[error("indirect table of {len} bytes is not a whole number of descriptors")]
    BadIndirectTable {
        /// Length of the table.
        len: u32,
    },
    /// A buffer that is not entirely in guest memory.
    #[error("buffer {addr:#x}+{len} is not in guest memory")]
    BadAddress {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// No device-writable descriptor at all.
    #[error("chain has no device-writable response buffer")]
    NoResponseBuffer,
    /// The response buffer cannot hold the response.
    #[error("response buffer of {got} bytes is shorter than the {need} bytes needed")]
    ResponseTooShort {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        got: u32,
    },
    /// The chain starts with a device-writable descriptor.
    #[error("chain has no device-readable request buffer")]
    NoRequestBuffer,
    /// The request buffer is malformed.
    #[error("bad request buffer: {0}")]
    BadHeader(WireError),
    /// A device-readable descriptor after the response buffer.
    #[error("device-readable descriptor after the device-writable response buffer")]
    ReadableAfterWritable,
    /// Wrong number of device-readable page buffers.
    #[error("chain carries {got} device-readable page buffers, the PUT operations need {need}")]
    PutPageCount {
        /// Buffers the operations need.
        need: usize,
        /// Buffers the chain has.
        got: usize,
    },
    /// Wrong number of device-writable page buffers.
    #[error("chain carries {got} device-writable page buffers, the GET operations need {need}")]
    GetPageCount {
        /// Buffers the operations need.
        need: usize,
        /// Buffers the chain has.
        got: usize,
    },
    /// A page buffer that is not exactly one page.
    #[error("page buffer {index} is {len} bytes, not {PAGE_SIZE}")]
    PageBufferSize {
        /// Position of the page buffer in the chain.
        index: usize,
        /// Its length.
        len: u32,
    },
}

impl ChainError {
    /// How the device answers the chain: `None` returns it unused,
    /// `Some(status)` writes a response header with that status.
    pub fn status(&self) -> Option<Status> {
        match self {
            ChainError::NoRequestBuffer => Some(Status::BadRequest),
            ChainError::BadHeader(WireError::BadVersion(_)) => Some(Status::BadVersion),
            ChainError::BadHeader(_) => Some(Status::BadRequest),
            ChainError::ReadableAfterWritable
            | ChainError::PutPageCount { .. }
            | ChainError::GetPageCount { .. }
            | ChainError::PageBufferSize { .. } => Some(Status::BadChain),
            _ => None,
        }
    }
}

/// A chain the device cannot execute, and where to answer, if anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFault {
    /// What is wrong.
    pub error: ChainError,
    /// The response buffer and the tag to echo, when `error.status()` is `Some`.
    pub reply: Option<(Buffer, u64)>,
}

impl ChainFault {
    fn drop_chain(error: ChainError) -> Self {
        ChainFault { error, reply: None }
    }
}

impl From<ChainError> for ChainFault {
    fn from(error: ChainError) -> Self {
        Self::drop_chain(error)
    }
}

/// A validated chain: the request (copied out of the guest) and its buffers.
#[derive(Debug, Clone, Copy)]
pub struct ValidChain<'s> {
    /// The decoded request buffer (operations are decoded one by one).
    pub request: Request<'s>,
    /// The response buffer (at least `response_len(num_ops)` bytes).
    pub response: Buffer,
    /// One device-readable page per PUT, in operation order.
    pub put_pages: &'s [Buffer],
    /// One device-writable page per GET, in operation order.
    pub get_pages: &'s [Buffer],
}

/// Reusable buffers for parsing, one per worker: no allocation per chain.
#[derive(Debug)]
pub struct ChainParser {
    buffers: Vec<Buffer>,
    request: Box<[u8; MAX_REQUEST_LEN]>,
    indirect_allowed: bool,
}

impl Default for ChainParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainParser {
    /// A parser. Indirect descriptors are refused until
    /// [`set_indirect_allowed`](Self::set_indirect_allowed).
    pub fn new() -> Self {
        ChainParser {
            buffers: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS),
            request: Box::new([0u8; MAX_REQUEST_LEN]),
            indirect_allowed: false,
        }
    }

    /// Whether `VIRTIO_RING_F_INDIRECT_DESC` was negotiated.
    pub fn set_indirect_allowed(&mut self, allowed: bool) {
        self.indirect_allowed = allowed;
    }

    /// Parses the chain of `chain`, whose queue has its descriptor table at
    /// `table` with `queue_size` entries.
    pub fn parse_descriptor_chain<'s, M, C>(
        &'s mut self,
        chain: &DescriptorChain<C>,
        table: GuestAddress,
        queue_size: u16,
    ) -> Result<ValidChain<'s>, ChainFault>
    where
        C: std::ops::Deref<Target = M>,
        M: GuestMemoryBackend,
    {
        self.parse(chain.memory(), table, queue_size, chain.head_index())
    }

    /// Parses the chain starting at descriptor `head` of the table at
    /// `table` (`queue_size` entries) in `mem`.
    pub fn parse<'s, M: GuestMemoryBackend>(
        &'s mut self,
        mem: &M,
        table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) -> Result<ValidChain<'s>, ChainFault> {
        walk(
            mem,
            table,
            queue_size,
            head,
            self.indirect_allowed,
            &mut self.buffers,
        )?;
        let buffers = &self.buffers[..];

        // The response buffer is the first device-writable descriptor.
        let w = buffers
            .iter()
            .position(|b| b.writable)
            .ok_or(ChainError::NoResponseBuffer)?;
        let response = buffers[w];
        if (response.len as usize) < RESPONSE_HEADER_SIZE {
            return Err(ChainError::ResponseTooShort {
                need: RESPONSE_HEADER_SIZE,
                got: response.len,
            }
            .into());
        }
        let reply = |tag: u64, error: ChainError| ChainFault {
            error,
            reply: Some((response, tag)),
        };

        if w == 0 {
            return Err(reply(0, ChainError::NoRequestBuffer));
        }

        // Copy the request buffer out of guest memory, once.
        let req = buffers[0];
        let copy_len = (req.len as usize).min(MAX_REQUEST_LEN);
        let bytes = &mut self.request[..copy_len];
        if mem.read_slice(bytes, req.addr).is_err() {
            return Err(ChainError::BadAddress {
                addr: req.addr.raw_value(),
                len: req.len,
            }
            .into());
        }
        let bytes = &self.request[..copy_len];
        let tag = match bytes.get(8..REQUEST_HEADER_SIZE) {
            Some(t) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(t);
                u64::from_le_bytes(b)
            }
            None => 0,
        };
        let header =
            RequestHeader::decode(bytes).map_err(|e| reply(tag, ChainError::BadHeader(e)))?;
        let expected = request_len(header.num_ops);
        if req.len as usize != expected {
            let e = if (req.len as usize) < expected {
                WireError::Truncated {
                    needed: expected,
                    got: req.len as usize,
                }
            } else {
                WireError::TrailingBytes {
                    expected,
                    got: req.len as usize,
                }
            };
            return Err(reply(tag, ChainError::BadHeader(e)));
        }
        let request = Request::parse(bytes).map_err(|e| reply(tag, ChainError::BadHeader(e)))?;

        let need = response_len(header.num_ops);
        if (response.len as usize) < need {
            return Err(ChainError::ResponseTooShort {
                need,
                got: response.len,
            }
            .into());
        }

        let put_pages = &buffers[1..w];
        let get_pages = &buffers[w + 1..];
        if get_pages.iter().any(|b| !b.writable) {
            return Err(reply(tag, ChainError::ReadableAfterWritable));
        }
        let counts = request.page_buffers();
        if put_pages.len() != usize::from(counts.to_device) {
            return Err(reply(
                tag,
                ChainError::PutPageCount {
                    need: counts.to_device.into(),
                    got: put_pages.len(),
                },
            ));
        }
        if get_pages.len() != usize::from(counts.from_device) {
            return Err(reply(
                tag,
                ChainError::GetPageCount {
                    need: counts.from_device.into(),
                    got: get_pages.len(),
                },
            ));
        }
        for (i, b) in buffers.iter().enumerate() {
            if i != 0 && i != w && b.len as usize != PAGE_SIZE {
                return Err(reply(
                    tag,
                    ChainError::PageBufferSize {
                        index: i,
                        len: b.len,
                    },
                ));
            }
        }

        Ok(ValidChain {
            request,
            response,
            put_pages,
            get_pages,
        })
    }
}

/// Walks the chain at `head` into `out`, checking every descriptor and that
/// every buffer lies in guest memory.
fn walk<M: GuestMemoryBackend>(
    mem: &M,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    indirect_allowed: bool,
    out: &mut Vec<Buffer>,
) -> Result<(), ChainError> {
    out.clear();
    if head >= queue_size {
        return Err(ChainError::HeadOutOfRange {
            index: head,
            size: queue_size,
        });
    }
    let mut table = table;
    let mut size = queue_size;
    let mut index = head;
    let mut in_indirect = false;
    // Descriptors still allowed in the current table: a chain visits each
    // entry at most once, so more visits than entries means a loop.
    let mut ttl = u32::from(size);
    loop {
        if ttl == 0 {
            return Err(ChainError::Loop { size });
        }
        ttl -= 1;
        let addr = table.checked_add(u64::from(index) * DESC_SIZE).ok_or(
            ChainError::DescriptorUnreadable {
                addr: table.raw_value(),
            },
        )?;
        let desc: Descriptor =
            mem.read_obj(addr)
                .map_err(|_| ChainError::DescriptorUnreadable {
                    addr: addr.raw_value(),
                })?;

        if desc.refers_to_indirect_table() {
            if !indirect_allowed {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if in_indirect {
                return Err(ChainError::NestedIndirect);
            }
            if desc.has_next() {
                return Err(ChainError::IndirectWithNext);
            }
            let len = desc.len();
            let entries = u64::from(len) / DESC_SIZE;
            if len == 0 || u64::from(len) % DESC_SIZE != 0 || entries > u64::from(u16::MAX) {
                return Err(ChainError::BadIndirectTable { len });
            }
            if !mem.check_range(desc.addr(), len as usize) {
                return Err(ChainError::BadAddress {
                    addr: desc.addr().raw_value(),
                    len,
                });
            }
            table = desc.addr();
            size = entries as u16;
            index = 0;
            ttl = u32::from(size);
            in_indirect = true;
            continue;
        }

        if out.len() >= MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        let buf = Buffer {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        };
        if buf.len > 0 && !mem.check_range(buf.addr, buf.len as usize) {
            return Err(ChainError::BadAddress {
                addr: buf.addr.raw_value(),
                len: buf.len,
            });
        }
        out.push(buf);

        if !desc.has_next() {
            return Ok(());
        }
        let next = desc.next();
        if next >= size {
            return Err(ChainError::NextOutOfRange { index: next, size });
        }
        index = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use virtio_queue::desc::RawDescriptor;
    use vtmem_protocol::{Handle, ObjectId, Op, PoolSpec, MAX_REQUEST_LEN, REQUEST_HEADER_SIZE};

    const QSIZE: u16 = 256;

    fn handle(i: u64) -> Handle {
        Handle {
            pool: 1,
            object: ObjectId([7, 0, 0]),
            index: i,
        }
    }

    fn parse(ring: &TestRing<'_>, head: u16) -> Result<(usize, usize, u16), ChainFault> {
        let mut p = ChainParser::new();
        p.set_indirect_allowed(true);
        p.parse(ring.mem, ring.table(), ring.size, head)
            .map(|c| (c.put_pages.len(), c.get_pages.len(), c.request.num_ops()))
    }

    /// Expects a fault that returns the chain unused.
    fn dropped(ring: &TestRing<'_>, head: u16) -> ChainError {
        let f = parse(ring, head).unwrap_err();
        assert_eq!(f.error.status(), None, "{:?}", f.error);
        assert_eq!(f.reply, None);
        f.error
    }

    /// Expects a fault answered with a status; returns the error and tag.
    fn answered(ring: &TestRing<'_>, head: u16) -> (ChainError, u64) {
        let f = parse(ring, head).unwrap_err();
        assert!(f.error.status().is_some(), "{:?}", f.error);
        let (_, tag) = f.reply.expect("a reply buffer");
        (f.error, tag)
    }

    /// Request (1 PUT, 1 GET), put page, response, get page.
    fn good_bufs(ring: &mut TestRing<'_>) -> Vec<Buf> {
        let req = request_bytes(
            &[
                Op::Put {
                    handle: handle(1),
                    reserved: false,
                },
                Op::Get { handle: handle(2) },
            ],
            42,
        );
        vec![
            ring.readable(&req),
            ring.readable(&page_of(1)),
            ring.writable(16 + 2 * 16),
            ring.writable(PAGE_SIZE as u32),
        ]
    }

    #[test]
    fn good_direct_and_indirect() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = good_bufs(&mut ring);
        let head = ring.chain(&bufs);
        assert_eq!(parse(&ring, head).unwrap(), (1, 1, 2));
        let head = ring.indirect_chain(&bufs);
        assert_eq!(parse(&ring, head).unwrap(), (1, 1, 2));
        // A direct descriptor followed by an indirect one is allowed too.
        let (table, len) = ring.indirect_table(&bufs[1..]);
        let first = ring.take_descs(2);
        ring.store_desc(
            first,
            bufs[0].addr,
            bufs[0].len,
            VRING_DESC_F_NEXT as u16,
            first + 1,
        );
        ring.store_desc(first + 1, table, len, VRING_DESC_F_INDIRECT as u16, 0);
        assert_eq!(parse(&ring, first).unwrap(), (1, 1, 2));
        // An oversize response buffer is fine.
        let mut bufs = good_bufs(&mut ring);
        bufs[2] = ring.writable(4096);
        let head = ring.chain(&bufs);
        assert_eq!(parse(&ring, head).unwrap(), (1, 1, 2));
    }

    #[test]
    fn head_out_of_range() {
        let mem = guest_memory();
        let ring = TestRing::new(&mem, QSIZE);
        assert_eq!(
            dropped(&ring, QSIZE),
            ChainError::HeadOutOfRange {
                index: QSIZE,
                size: QSIZE
            }
        );
    }

    #[test]
    fn next_out_of_range() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = good_bufs(&mut ring);
        let head = ring.take_descs(1);
        ring.store_desc(
            head,
            bufs[0].addr,
            bufs[0].len,
            VRING_DESC_F_NEXT as u16,
            999,
        );
        assert_eq!(
            dropped(&ring, head),
            ChainError::NextOutOfRange {
                index: 999,
                size: QSIZE
            }
        );
    }

    #[test]
    fn descriptor_table_outside_memory() {
        let mem = guest_memory();
        let ring = TestRing::new(&mem, QSIZE);
        let mut p = ChainParser::new();
        let err = p
            .parse(&mem, GuestAddress(MEM_SIZE + 0x1000), QSIZE, 0)
            .unwrap_err()
            .error;
        assert_eq!(
            err,
            ChainError::DescriptorUnreadable {
                addr: MEM_SIZE + 0x1000
            }
        );
        drop(ring);
    }

    #[test]
    fn descriptor_loop() {
        // In a table smaller than the longest valid chain, a loop shows as
        // a loop; in larger ones it hits the length limit first.
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, 16);
        let bufs = good_bufs(&mut ring);
        let a = ring.take_descs(2);
        ring.store_desc(
            a,
            bufs[0].addr,
            bufs[0].len,
            VRING_DESC_F_NEXT as u16,
            a + 1,
        );
        ring.store_desc(
            a + 1,
            bufs[1].addr,
            bufs[1].len,
            VRING_DESC_F_NEXT as u16,
            a,
        );
        assert_eq!(dropped(&ring, a), ChainError::Loop { size: 16 });
    }

    #[test]
    fn loop_inside_indirect_table() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = good_bufs(&mut ring);
        let (table, len) = ring.indirect_table(&bufs[..2]);
        // Entry 1 points back to entry 0.
        let d = RawDescriptor::from(Descriptor::new(
            bufs[1].addr,
            bufs[1].len,
            VRING_DESC_F_NEXT as u16,
            0,
        ));
        mem.write_obj(d, GuestAddress(table + 16)).unwrap();
        let head = ring.take_descs(1);
        ring.store_desc(head, table, len, VRING_DESC_F_INDIRECT as u16, 0);
        assert_eq!(dropped(&ring, head), ChainError::Loop { size: 2 });
    }

    #[test]
    fn chain_too_long() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, 512);
        let tiny = ring.readable(&[0u8; 16]);
        let bufs = vec![tiny; MAX_CHAIN_DESCRIPTORS + 1];
        let head = ring.chain(&bufs);
        assert_eq!(dropped(&ring, head), ChainError::TooManyDescriptors);
    }

    #[test]
    fn indirect_not_negotiated() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = good_bufs(&mut ring);
        let head = ring.indirect_chain(&bufs);
        let mut p = ChainParser::new();
        let f = p.parse(&mem, ring.table(), QSIZE, head).unwrap_err();
        assert_eq!(f.error, ChainError::IndirectNotNegotiated);
        assert_eq!(f.reply, None);
    }

    #[test]
    fn nested_indirect() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = good_bufs(&mut ring);
        let (inner, inner_len) = ring.indirect_table(&bufs);
        let outer = ring.alloc(16);
        let d = RawDescriptor::from(Descriptor::new(
            inner,
            inner_len,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        mem.write_obj(d, GuestAddress(outer)).unwrap();
        let head = ring.take_descs(1);
        ring.store_desc(head, outer, 16, VRING_DESC_F_INDIRECT as u16, 0);
        assert_eq!(dropped(&ring, head), ChainError::NestedIndirect);
    }

    #[test]
    fn indirect_with_next() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = good_bufs(&mut ring);
        let (table, len) = ring.indirect_table(&bufs);
        let head = ring.take_descs(2);
        ring.store_desc(
            head,
            table,
            len,
            (VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT) as u16,
            head + 1,
        );
        assert_eq!(dropped(&ring, head), ChainError::IndirectWithNext);
    }

    #[test]
    fn bad_indirect_table_length() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = good_bufs(&mut ring);
        let (table, _) = ring.indirect_table(&bufs);
        let head = ring.take_descs(2);
        ring.store_desc(head, table, 20, VRING_DESC_F_INDIRECT as u16, 0);
        assert_eq!(
            dropped(&ring, head),
            ChainError::BadIndirectTable { len: 20 }
        );
        ring.store_desc(head + 1, table, 0, VRING_DESC_F_INDIRECT as u16, 0);
        assert_eq!(
            dropped(&ring, head + 1),
            ChainError::BadIndirectTable { len: 0 }
        );
    }

    #[test]
    fn indirect_table_outside_memory() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let head = ring.take_descs(1);
        ring.store_desc(head, MEM_SIZE - 16, 64, VRING_DESC_F_INDIRECT as u16, 0);
        assert_eq!(
            dropped(&ring, head),
            ChainError::BadAddress {
                addr: MEM_SIZE - 16,
                len: 64
            }
        );
    }

    #[test]
    fn buffer_outside_memory() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let mut bufs = good_bufs(&mut ring);
        bufs[1].addr = MEM_SIZE - 100;
        let head = ring.chain(&bufs);
        assert_eq!(
            dropped(&ring, head),
            ChainError::BadAddress {
                addr: MEM_SIZE - 100,
                len: PAGE_SIZE as u32
            }
        );
        // Address arithmetic that wraps around is outside memory too.
        let mut bufs = good_bufs(&mut ring);
        bufs[3].addr = u64::MAX - 10;
        let head = ring.chain(&bufs);
        assert!(matches!(
            dropped(&ring, head),
            ChainError::BadAddress { .. }
        ));
    }

    #[test]
    fn no_response_buffer() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = good_bufs(&mut ring);
        let head = ring.chain(&bufs[..2]);
        assert_eq!(dropped(&ring, head), ChainError::NoResponseBuffer);
    }

    #[test]
    fn response_too_short() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        // Shorter than a header.
        let mut bufs = good_bufs(&mut ring);
        bufs[2].len = 8;
        let head = ring.chain(&bufs);
        assert_eq!(
            dropped(&ring, head),
            ChainError::ResponseTooShort { need: 16, got: 8 }
        );
        // A header but not the two statuses.
        let mut bufs = good_bufs(&mut ring);
        bufs[2].len = 16 + 16;
        let head = ring.chain(&bufs);
        assert_eq!(
            dropped(&ring, head),
            ChainError::ResponseTooShort { need: 48, got: 32 }
        );
    }

    #[test]
    fn no_request_buffer() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let resp = ring.writable(64);
        let head = ring.chain(&[resp]);
        assert_eq!(answered(&ring, head), (ChainError::NoRequestBuffer, 0));
        assert_eq!(
            ChainError::NoRequestBuffer.status(),
            Some(Status::BadRequest)
        );
    }

    /// A chain whose request buffer is `req` with a 64-byte response.
    fn with_request(ring: &mut TestRing<'_>, req: &[u8]) -> u16 {
        let r = ring.readable(req);
        let resp = ring.writable(64);
        ring.chain(&[r, resp])
    }

    #[test]
    fn bad_version() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let mut req = request_bytes(&[Op::Reset], 77);
        req[0] = 2;
        let head = with_request(&mut ring, &req);
        let (err, tag) = answered(&ring, head);
        assert_eq!(err, ChainError::BadHeader(WireError::BadVersion(2)));
        assert_eq!(tag, 77);
        assert_eq!(err.status(), Some(Status::BadVersion));
    }

    #[test]
    fn too_many_ops() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let mut req = request_bytes(&[Op::Reset], 5);
        req[2..4].copy_from_slice(&129u16.to_le_bytes());
        let head = with_request(&mut ring, &req);
        let (err, tag) = answered(&ring, head);
        assert_eq!(err, ChainError::BadHeader(WireError::TooManyOps(129)));
        assert_eq!((tag, err.status()), (5, Some(Status::BadRequest)));
    }

    #[test]
    fn zero_ops() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let mut req = request_bytes(&[Op::Reset], 5);
        req[2..4].copy_from_slice(&0u16.to_le_bytes());
        req.truncate(REQUEST_HEADER_SIZE);
        let head = with_request(&mut ring, &req);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::BadHeader(WireError::NoOps)
        );
    }

    #[test]
    fn header_reserved_flags() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let mut req = request_bytes(&[Op::Reset], 5);
        req[4] = 1;
        let head = with_request(&mut ring, &req);
        let (err, _) = answered(&ring, head);
        assert_eq!(err, ChainError::BadHeader(WireError::ReservedNotZero));
        // Request-level: BAD_REQUEST, not the per-op INVALID.
        assert_eq!(err.status(), Some(Status::BadRequest));
    }

    #[test]
    fn request_shorter_than_header() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let head = with_request(&mut ring, &[1, 0, 1]);
        assert_eq!(
            answered(&ring, head),
            (
                ChainError::BadHeader(WireError::Truncated { needed: 16, got: 3 }),
                0
            )
        );
    }

    #[test]
    fn request_shorter_than_its_ops() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let req = request_bytes(&[Op::Reset, Op::Reset], 9);
        let head = with_request(&mut ring, &req[..req.len() - 1]);
        assert_eq!(
            answered(&ring, head),
            (
                ChainError::BadHeader(WireError::Truncated {
                    needed: 112,
                    got: 111
                }),
                9
            )
        );
    }

    #[test]
    fn request_with_trailing_bytes() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let mut req = request_bytes(&[Op::Reset], 9);
        req.extend_from_slice(&[0; 4]);
        let head = with_request(&mut ring, &req);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::BadHeader(WireError::TrailingBytes {
                expected: 64,
                got: 68
            })
        );
    }

    #[test]
    fn oversize_request_buffer() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let mut req = request_bytes(&[Op::Reset], 9);
        req.resize(1 << 20, 0);
        let head = with_request(&mut ring, &req);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::BadHeader(WireError::TrailingBytes {
                expected: 64,
                got: 1 << 20
            })
        );
        const { assert!(MAX_REQUEST_LEN < 1 << 20) };
    }

    #[test]
    fn readable_after_writable() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = good_bufs(&mut ring);
        // request, response, put page, get page
        let head = ring.chain(&[bufs[0], bufs[2], bufs[1], bufs[3]]);
        let (err, tag) = answered(&ring, head);
        assert_eq!((err.clone(), tag), (ChainError::ReadableAfterWritable, 42));
        assert_eq!(err.status(), Some(Status::BadChain));
    }

    #[test]
    fn missing_put_page() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = good_bufs(&mut ring);
        let head = ring.chain(&[bufs[0], bufs[2], bufs[3]]);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::PutPageCount { need: 1, got: 0 }
        );
    }

    #[test]
    fn extra_get_page() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = good_bufs(&mut ring);
        let extra = ring.writable(PAGE_SIZE as u32);
        let head = ring.chain(&[bufs[0], bufs[1], bufs[2], bufs[3], extra]);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::GetPageCount { need: 1, got: 2 }
        );
    }

    #[test]
    fn get_page_in_the_wrong_direction() {
        // A GET whose page is device-readable: it counts as a PUT page.
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let req = request_bytes(&[Op::Get { handle: handle(1) }], 3);
        let r = ring.readable(&req);
        let page = ring.readable(&page_of(0));
        let resp = ring.writable(32);
        let head = ring.chain(&[r, page, resp]);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::PutPageCount { need: 0, got: 1 }
        );
    }

    #[test]
    fn page_buffer_wrong_size() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let mut bufs = good_bufs(&mut ring);
        bufs[1].len = PAGE_SIZE as u32 - 1;
        let head = ring.chain(&bufs);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::PageBufferSize {
                index: 1,
                len: PAGE_SIZE as u32 - 1
            }
        );
        let mut bufs = good_bufs(&mut ring);
        bufs[3].len = 2 * PAGE_SIZE as u32;
        let head = ring.chain(&bufs);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::PageBufferSize {
                index: 3,
                len: 2 * PAGE_SIZE as u32
            }
        );
    }

    #[test]
    fn page_buffers_follow_opcode_bytes_of_invalid_ops() {
        // A PUT with undefined flags is invalid, but still owns a page buffer.
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let mut req = request_bytes(
            &[
                Op::Put {
                    handle: handle(1),
                    reserved: false,
                },
                Op::NewPool(PoolSpec::persistent()),
            ],
            3,
        );
        req[16 + 1] = 0x80;
        let r = ring.readable(&req);
        let page = ring.readable(&page_of(0));
        let resp = ring.writable(48);
        let head = ring.chain(&[r, page, resp]);
        assert_eq!(parse(&ring, head).unwrap(), (1, 0, 2));
        // And an unknown opcode owns none.
        let mut req = request_bytes(&[Op::Reset], 3);
        req[16] = 0xee;
        let head = with_request(&mut ring, &req);
        assert_eq!(parse(&ring, head).unwrap(), (0, 0, 1));
    }

    #[test]
    fn every_error_has_a_disposition() {
        // Drop-class errors never carry a reply; answered ones always do.
        let drop_class = [
            ChainError::HeadOutOfRange { index: 0, size: 0 },
            ChainError::NextOutOfRange { index: 0, size: 0 },
            ChainError::DescriptorUnreadable { addr: 0 },
            ChainError::Loop { size: 0 },
            ChainError::TooManyDescriptors,
            ChainError::IndirectNotNegotiated,
            ChainError::NestedIndirect,
            ChainError::IndirectWithNext,
            ChainError::BadIndirectTable { len: 0 },
            ChainError::BadAddress { addr: 0, len: 0 },
            ChainError::NoResponseBuffer,
            ChainError::ResponseTooShort { need: 0, got: 0 },
        ];
        for e in drop_class {
            assert_eq!(e.status(), None, "{e}");
            assert!(!e.to_string().contains('\n'));
        }
    }
}
