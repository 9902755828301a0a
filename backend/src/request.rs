// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Turns a descriptor chain into a validated request.
//!
//! The chain is walked once by [`crate::chain_walk`], which reports every
//! way a guest can break the chain itself (loops, indices past the table,
//! nested or malformed indirect tables, buffers outside guest memory). This
//! module then checks the layout of the bytes, with one [`ChainError`]
//! variant per defect: the device-readable part is the request (header and
//! operations) followed by one page per PUT, the device-writable part is the
//! response followed by one page per GET. Where the descriptor boundaries
//! fall does not matter (virtio 1.2, 2.7.4.1: a device must not assume any
//! particular arrangement of descriptors).
//!
//! The request is copied out of guest memory once, into memory the guest
//! cannot touch, before it is looked at: a guest that rewrites it while the
//! device works changes nothing.
//!
//! Nothing here touches the store; [`crate::exec`] runs what this module
//! validated.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory};
use vtmem_protocol::{
    request_len, response_len, Request, RequestHeader, Status, WireError, MAX_OPS_PER_REQUEST,
    MAX_REQUEST_LEN, PAGE_SIZE, REQUEST_HEADER_SIZE, RESPONSE_HEADER_SIZE,
};

use crate::chain_walk::{self, Cursor, CursorError, Segment, WalkError, WalkOptions};

/// Most descriptors a chain may have: one for the request, one per page of
/// the largest request, one for the response. A driver that splits buffers
/// further must stay within this count (docs/protocol.md, section 5).
pub const MAX_CHAIN_DESCRIPTORS: usize = 2 + MAX_OPS_PER_REQUEST as usize;

/// Everything that can be wrong with a chain.
///
/// [`ChainError::status`] says how the device answers: `None` means the
/// chain is returned with used length 0 (there is nowhere trustworthy to
/// write an answer), `Some(status)` means a response header with that
/// request-level status and no operation executed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ChainError {
    /// The chain itself is broken (see [`WalkError`]).
    #[error(transparent)]
    Walk(#[from] WalkError),
    /// No device-writable bytes at all.
    #[error("chain has no device-writable response buffer")]
    NoResponseBuffer,
    /// The device-writable part cannot hold the response.
    #[error(
        "device-writable part of {got} bytes is shorter than the {need} bytes of the response"
    )]
    ResponseTooShort {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        got: u64,
    },
    /// No device-readable bytes at all: the chain starts with a
    /// device-writable descriptor.
    #[error("chain has no device-readable request buffer")]
    NoRequestBuffer,
    /// The request is malformed (including a device-readable part shorter
    /// than the request its header announces).
    #[error("bad request buffer: {0}")]
    BadHeader(WireError),
    /// A device-readable descriptor after a device-writable one.
    #[error("device-readable descriptor {index} follows a device-writable one")]
    ReadableAfterWritable {
        /// Position of the descriptor in the chain.
        index: usize,
    },
    /// The page bytes in one direction are not a whole number of pages.
    #[error(
        "{} page bytes ({bytes}) are not a whole number of {PAGE_SIZE}-byte pages",
        if *writable { "device-writable" } else { "device-readable" }
    )]
    PartialPage {
        /// Device-writable (GET) pages, else device-readable (PUT) ones.
        writable: bool,
        /// Bytes after the request (readable) or the response (writable).
        bytes: u64,
    },
    /// Wrong number of device-readable pages.
    #[error("chain carries {got} device-readable pages, the PUT operations need {need}")]
    PutPageCount {
        /// Pages the operations need.
        need: usize,
        /// Pages the chain has.
        got: u64,
    },
    /// Wrong number of device-writable pages.
    #[error("chain carries {got} device-writable pages, the GET operations need {need}")]
    GetPageCount {
        /// Pages the operations need.
        need: usize,
        /// Pages the chain has.
        got: u64,
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
            ChainError::ReadableAfterWritable { .. }
            | ChainError::PartialPage { .. }
            | ChainError::PutPageCount { .. }
            | ChainError::GetPageCount { .. } => Some(Status::BadChain),
            ChainError::Walk(_)
            | ChainError::NoResponseBuffer
            | ChainError::ResponseTooShort { .. } => None,
        }
    }
}

/// Where to write the answer to a refused chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<'s> {
    /// The device-writable part (at least a response header long).
    pub writable: &'s [Segment],
    /// The tag to echo (0 if the header could not be read).
    pub tag: u64,
}

/// A chain the device cannot execute, and where to answer, if anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFault<'s> {
    /// What is wrong.
    pub error: ChainError,
    /// Where to answer, when `error.status()` is `Some`.
    pub reply: Option<Reply<'s>>,
}

impl From<ChainError> for ChainFault<'_> {
    fn from(error: ChainError) -> Self {
        ChainFault { error, reply: None }
    }
}

/// A validated chain: the request (copied out of the guest) and its buffers.
#[derive(Debug, Clone, Copy)]
pub struct ValidChain<'s> {
    /// The decoded request (operations are decoded one by one).
    pub request: Request<'s>,
    /// The device-readable part: the request, then one page per PUT.
    pub readable: &'s [Segment],
    /// The device-writable part: the response, then one page per GET.
    pub writable: &'s [Segment],
}

impl<'s> ValidChain<'s> {
    /// A cursor at the first PUT page.
    pub fn put_pages(&self) -> Cursor<'s> {
        let mut c = Cursor::new(self.readable);
        // Cannot fail: parsing checked the length of the readable part.
        let _ = c.skip(request_len(self.request.num_ops()) as u64);
        c
    }

    /// A cursor at the start of the response.
    pub fn response(&self) -> Cursor<'s> {
        Cursor::new(self.writable)
    }

    /// Bytes of the response.
    pub fn response_len(&self) -> usize {
        response_len(self.request.num_ops())
    }
}

/// A read the walk checked failed after all: only a memory map changing
/// under the worker gets here.
fn gone(e: CursorError) -> ChainFault<'static> {
    let (addr, len) = match e {
        CursorError::Memory { addr, len } => (addr, len as u32),
        CursorError::Overrun { .. } => (0, 0),
    };
    ChainError::Walk(WalkError::BadAddress { addr, len }).into()
}

/// Reusable buffers for parsing, one per worker: no allocation per chain.
#[derive(Debug)]
pub struct ChainParser {
    segments: Vec<Segment>,
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
            segments: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS),
            request: Box::new([0u8; MAX_REQUEST_LEN]),
            indirect_allowed: false,
        }
    }

    /// Whether `VIRTIO_RING_F_INDIRECT_DESC` was negotiated.
    pub fn set_indirect_allowed(&mut self, allowed: bool) {
        self.indirect_allowed = allowed;
    }

    /// Parses `chain`, which virtio-queue took from a queue whose descriptor
    /// table is at `table` with `queue_size` entries.
    pub fn parse_descriptor_chain<'s, M, C>(
        &'s mut self,
        chain: &DescriptorChain<C>,
        table: GuestAddress,
        queue_size: u16,
    ) -> Result<ValidChain<'s>, ChainFault<'s>>
    where
        C: Deref<Target = M>,
        M: GuestMemory,
    {
        self.parse(chain.memory(), table, queue_size, chain.head_index())
    }

    /// Parses the chain starting at descriptor `head` of the table at
    /// `table` (`queue_size` entries) in `mem`.
    pub fn parse<'s, M: GuestMemory + ?Sized>(
        &'s mut self,
        mem: &M,
        table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) -> Result<ValidChain<'s>, ChainFault<'s>> {
        let opts = WalkOptions {
            indirect: self.indirect_allowed,
            max_segments: MAX_CHAIN_DESCRIPTORS,
        };
        chain_walk::walk(mem, table, queue_size, head, opts, &mut self.segments)
            .map_err(ChainError::from)?;
        let segs = &self.segments[..];

        // The readable part runs up to the first device-writable descriptor;
        // the writable part is the run of device-writable ones after it.
        let w = segs.iter().position(|s| s.writable).unwrap_or(segs.len());
        let readable = &segs[..w];
        let run = segs[w..]
            .iter()
            .position(|s| !s.writable)
            .unwrap_or(segs.len() - w);
        let writable = &segs[w..w + run];
        let misplaced = (w + run < segs.len()).then_some(w + run);

        let written = chain_walk::total_len(writable);
        if written == 0 {
            return Err(ChainError::NoResponseBuffer.into());
        }
        if written < RESPONSE_HEADER_SIZE as u64 {
            return Err(ChainError::ResponseTooShort {
                need: RESPONSE_HEADER_SIZE,
                got: written,
            }
            .into());
        }
        let reply = |tag: u64, error: ChainError| ChainFault {
            error,
            reply: Some(Reply { writable, tag }),
        };

        let read = chain_walk::total_len(readable);
        if read == 0 {
            return Err(reply(0, ChainError::NoRequestBuffer));
        }

        // Copy the request out of guest memory, once: the header first,
        // then the operations it announces.
        let mut cursor = Cursor::new(readable);
        let head_len = (read as usize).min(REQUEST_HEADER_SIZE);
        cursor
            .read_exact(mem, &mut self.request[..head_len])
            .map_err(gone)?;
        let tag = match self.request.get(8..head_len) {
            Some(t) if t.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(t);
                u64::from_le_bytes(b)
            }
            _ => 0,
        };
        let header = RequestHeader::decode(&self.request[..head_len])
            .map_err(|e| reply(tag, ChainError::BadHeader(e)))?;
        let expected = request_len(header.num_ops);
        if read < expected as u64 {
            return Err(reply(
                tag,
                ChainError::BadHeader(WireError::Truncated {
                    needed: expected,
                    got: read as usize,
                }),
            ));
        }
        cursor
            .read_exact(mem, &mut self.request[head_len..expected])
            .map_err(gone)?;

        let need = response_len(header.num_ops);
        if written < need as u64 {
            return Err(ChainError::ResponseTooShort { need, got: written }.into());
        }
        if let Some(index) = misplaced {
            return Err(reply(tag, ChainError::ReadableAfterWritable { index }));
        }

        let request = Request::parse(&self.request[..expected])
            .map_err(|e| reply(tag, ChainError::BadHeader(e)))?;
        let counts = request.page_buffers();
        let page = PAGE_SIZE as u64;
        let put_bytes = read - expected as u64;
        if put_bytes % page != 0 {
            return Err(reply(
                tag,
                ChainError::PartialPage {
                    writable: false,
                    bytes: put_bytes,
                },
            ));
        }
        if put_bytes / page != u64::from(counts.to_device) {
            return Err(reply(
                tag,
                ChainError::PutPageCount {
                    need: counts.to_device.into(),
                    got: put_bytes / page,
                },
            ));
        }
        let get_bytes = written - need as u64;
        if get_bytes % page != 0 {
            return Err(reply(
                tag,
                ChainError::PartialPage {
                    writable: true,
                    bytes: get_bytes,
                },
            ));
        }
        if get_bytes / page != u64::from(counts.from_device) {
            return Err(reply(
                tag,
                ChainError::GetPageCount {
                    need: counts.from_device.into(),
                    got: get_bytes / page,
                },
            ));
        }

        Ok(ValidChain {
            request,
            readable,
            writable,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::Bytes;
    use vtmem_protocol::{Handle, Op, PoolSpec, MAX_REQUEST_LEN, REQUEST_HEADER_SIZE};

    const QSIZE: u16 = 256;

    fn handle(i: u64) -> Handle {
        vtmem_testkit::handle(1, 7, i)
    }

    /// Parses the chain at `head`: (PUT pages, GET pages, operations), or
    /// the error and the tag of the reply, if any.
    fn parse(ring: &TestRing<'_>, head: u16) -> Result<(u64, u64, u16), (ChainError, Option<u64>)> {
        let mut p = ChainParser::new();
        p.set_indirect_allowed(true);
        match p.parse(ring.mem, ring.table(), ring.size, head) {
            Ok(c) => {
                let page = PAGE_SIZE as u64;
                let puts = c.put_pages().remaining() / page;
                let gets = (chain_walk::total_len(c.writable) - c.response_len() as u64) / page;
                Ok((puts, gets, c.request.num_ops()))
            }
            Err(f) => Err((f.error, f.reply.map(|r| r.tag))),
        }
    }

    /// Expects a fault that returns the chain unused.
    fn dropped(ring: &TestRing<'_>, head: u16) -> ChainError {
        let (error, reply) = parse(ring, head).unwrap_err();
        assert_eq!(error.status(), None, "{error:?}");
        assert_eq!(reply, None);
        error
    }

    /// Expects a fault answered with a status; returns the error and tag.
    fn answered(ring: &TestRing<'_>, head: u16) -> (ChainError, u64) {
        let (error, reply) = parse(ring, head).unwrap_err();
        assert!(error.status().is_some(), "{error:?}");
        (error, reply.expect("a reply buffer"))
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
        // The response and the GET pages fill the writable part exactly.
        let mut bufs = good_bufs(&mut ring);
        bufs[2] = ring.writable(4096);
        let head = ring.chain(&bufs);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::PartialPage {
                writable: true,
                bytes: 4096 - 48 + 4096
            }
        );
    }

    #[test]
    fn any_arrangement_of_descriptors_is_accepted() {
        let mem = guest_memory();
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
        let mut readable = req.clone();
        readable.extend_from_slice(&page_of(1));
        for rc in READABLE_CUTS {
            for wc in WRITABLE_CUTS {
                for indirect in [false, true] {
                    let mut ring = TestRing::new(&mem, QSIZE);
                    let mut bufs = ring.readable_split(&readable, rc);
                    bufs.extend(ring.writable_split(48 + PAGE_SIZE, wc));
                    let head = if indirect {
                        ring.indirect_chain(&bufs)
                    } else {
                        ring.chain(&bufs)
                    };
                    assert_eq!(
                        parse(&ring, head),
                        Ok((1, 1, 2)),
                        "readable cut at {rc:?}, writable at {wc:?}, indirect {indirect}"
                    );
                }
            }
        }
    }

    #[test]
    fn split_layouts_keep_their_error_classes() {
        // The same defects, in chains whose buffers are cut anywhere, get the
        // same errors as in the usual layout.
        let mem = guest_memory();
        let ops = [
            Op::Put {
                handle: handle(1),
                reserved: false,
            },
            Op::Get { handle: handle(2) },
        ];
        let req = request_bytes(&ops, 42);
        let mut full = req.clone();
        full.extend_from_slice(&page_of(1));
        let mut ring = TestRing::new(&mem, QSIZE);
        // Page half missing, in two pieces.
        let mut bufs = ring.readable_split(&full[..112 + 2048], &[16, 112]);
        bufs.extend(ring.writable_split(48 + PAGE_SIZE, &[16]));
        let head = ring.chain(&bufs);
        assert_eq!(
            answered(&ring, head),
            (
                ChainError::PartialPage {
                    writable: false,
                    bytes: 2048
                },
                42
            )
        );
        // The GET page missing, the response in three pieces.
        let mut bufs = ring.readable_split(&full, &[64, 112]);
        bufs.extend(ring.writable_split(48, &[16, 32]));
        let head = ring.chain(&bufs);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::GetPageCount { need: 1, got: 0 }
        );
        // A header split 8+8 whose version is wrong still echoes the tag.
        let mut bad = full.clone();
        bad[0] = 7;
        let mut bufs = ring.readable_split(&bad, &[8, 16]);
        bufs.extend(ring.writable_split(48 + PAGE_SIZE, &[]));
        let head = ring.chain(&bufs);
        assert_eq!(
            answered(&ring, head),
            (ChainError::BadHeader(WireError::BadVersion(7)), 42)
        );
        // The request cut short in the middle of an operation.
        let mut bufs = ring.readable_split(&req[..100], &[16, 64]);
        bufs.extend(ring.writable_split(48, &[]));
        let head = ring.chain(&bufs);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::BadHeader(WireError::Truncated {
                needed: 112,
                got: 100
            })
        );
        // The writable part one byte short of the statuses, cut in two:
        // nowhere to answer.
        let mut bufs = ring.readable_split(&full, &[]);
        bufs.extend(ring.writable_split(47, &[16]));
        let head = ring.chain(&bufs);
        assert_eq!(
            dropped(&ring, head),
            ChainError::ResponseTooShort { need: 48, got: 47 }
        );
        // A readable piece of the page after the writable part.
        let mut bufs = ring.readable_split(&full[..112 + 2048], &[112]);
        bufs.extend(ring.writable_split(48 + PAGE_SIZE, &[48]));
        bufs.extend(ring.readable_split(&full[112 + 2048..], &[]));
        let head = ring.chain(&bufs);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::ReadableAfterWritable { index: 4 }
        );
        // Only zero-length writable descriptors: no response buffer.
        let mut bufs = ring.readable_split(&full, &[]);
        bufs.extend(ring.writable_split(0, &[0]));
        let head = ring.chain(&bufs);
        assert_eq!(dropped(&ring, head), ChainError::NoResponseBuffer);
    }

    #[test]
    fn head_out_of_range() {
        let mem = guest_memory();
        let ring = TestRing::new(&mem, QSIZE);
        assert_eq!(
            dropped(&ring, QSIZE),
            ChainError::Walk(WalkError::HeadOutOfRange {
                index: QSIZE,
                size: QSIZE
            })
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
            ChainError::Walk(WalkError::NextOutOfRange {
                index: 999,
                size: QSIZE
            })
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
            ChainError::Walk(WalkError::DescriptorUnreadable {
                addr: MEM_SIZE + 0x1000
            })
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
        assert_eq!(
            dropped(&ring, a),
            ChainError::Walk(WalkError::Loop { size: 16 })
        );
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
        assert_eq!(
            dropped(&ring, head),
            ChainError::Walk(WalkError::Loop { size: 2 })
        );
    }

    #[test]
    fn chain_too_long() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, 512);
        let tiny = ring.readable(&[0u8; 16]);
        let bufs = vec![tiny; MAX_CHAIN_DESCRIPTORS + 1];
        let head = ring.chain(&bufs);
        assert_eq!(
            dropped(&ring, head),
            ChainError::Walk(WalkError::TooManyDescriptors {
                max: MAX_CHAIN_DESCRIPTORS
            })
        );
    }

    #[test]
    fn indirect_not_negotiated() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = good_bufs(&mut ring);
        let head = ring.indirect_chain(&bufs);
        let mut p = ChainParser::new();
        let f = p.parse(&mem, ring.table(), QSIZE, head).unwrap_err();
        assert_eq!(f.error, ChainError::Walk(WalkError::IndirectNotNegotiated));
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
        assert_eq!(
            dropped(&ring, head),
            ChainError::Walk(WalkError::NestedIndirect)
        );
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
        assert_eq!(
            dropped(&ring, head),
            ChainError::Walk(WalkError::IndirectWithNext)
        );
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
            ChainError::Walk(WalkError::BadIndirectTable { len: 20 })
        );
        ring.store_desc(head + 1, table, 0, VRING_DESC_F_INDIRECT as u16, 0);
        assert_eq!(
            dropped(&ring, head + 1),
            ChainError::Walk(WalkError::BadIndirectTable { len: 0 })
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
            ChainError::Walk(WalkError::BadAddress {
                addr: MEM_SIZE - 16,
                len: 64
            })
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
            ChainError::Walk(WalkError::BadAddress {
                addr: MEM_SIZE - 100,
                len: PAGE_SIZE as u32
            })
        );
        // Address arithmetic that wraps around is outside memory too.
        let mut bufs = good_bufs(&mut ring);
        bufs[3].addr = u64::MAX - 10;
        let head = ring.chain(&bufs);
        assert!(matches!(
            dropped(&ring, head),
            ChainError::Walk(WalkError::BadAddress { .. })
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
        let head = ring.chain(&bufs[..3]);
        assert_eq!(
            dropped(&ring, head),
            ChainError::ResponseTooShort { need: 16, got: 8 }
        );
        // A header but not the two statuses.
        let mut bufs = good_bufs(&mut ring);
        bufs[2].len = 16 + 16;
        let head = ring.chain(&bufs[..3]);
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

    /// A chain whose request buffer is `req` with a response of one status.
    fn with_request(ring: &mut TestRing<'_>, req: &[u8]) -> u16 {
        let r = ring.readable(req);
        let resp = ring.writable(32);
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
        // Bytes after the operations are where PUT pages go: four of them
        // are no page.
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let mut req = request_bytes(&[Op::Reset], 9);
        req.extend_from_slice(&[0; 4]);
        let head = with_request(&mut ring, &req);
        let (err, tag) = answered(&ring, head);
        assert_eq!(
            (err.clone(), tag),
            (
                ChainError::PartialPage {
                    writable: false,
                    bytes: 4
                },
                9
            )
        );
        assert_eq!(err.status(), Some(Status::BadChain));
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
            ChainError::PartialPage {
                writable: false,
                bytes: (1 << 20) - 64
            }
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
        assert_eq!(
            (err.clone(), tag),
            (ChainError::ReadableAfterWritable { index: 2 }, 42)
        );
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
            ChainError::PartialPage {
                writable: false,
                bytes: PAGE_SIZE as u64 - 1
            }
        );
        let mut bufs = good_bufs(&mut ring);
        bufs[3].len = PAGE_SIZE as u32 + 1;
        let head = ring.chain(&bufs);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::PartialPage {
                writable: true,
                bytes: PAGE_SIZE as u64 + 1
            }
        );
        // Two pages where one is needed is one page too many.
        let mut bufs = good_bufs(&mut ring);
        bufs[3].len = 2 * PAGE_SIZE as u32;
        let head = ring.chain(&bufs);
        assert_eq!(
            answered(&ring, head).0,
            ChainError::GetPageCount { need: 1, got: 2 }
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
            WalkError::HeadOutOfRange { index: 0, size: 0 }.into(),
            WalkError::NextOutOfRange { index: 0, size: 0 }.into(),
            WalkError::DescriptorUnreadable { addr: 0 }.into(),
            WalkError::Loop { size: 0 }.into(),
            WalkError::TooManyDescriptors { max: 0 }.into(),
            WalkError::IndirectNotNegotiated.into(),
            WalkError::NestedIndirect.into(),
            WalkError::IndirectWithNext.into(),
            WalkError::BadIndirectTable { len: 0 }.into(),
            WalkError::BadAddress { addr: 0, len: 0 }.into(),
            ChainError::NoResponseBuffer,
            ChainError::ResponseTooShort { need: 0, got: 0 },
        ];
        for e in drop_class {
            assert_eq!(e.status(), None, "{e}");
            assert!(!e.to_string().contains('\n'));
        }
    }
}
