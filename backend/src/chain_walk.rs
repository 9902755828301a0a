// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A fallible walk of a split-virtqueue descriptor chain, and a cursor that
//! reads or writes the walked buffers as one byte stream.
//!
//! `virtio_queue::DescriptorChain` iterates a chain's descriptors, but any
//! defect (a `next` index past the table, an unreadable descriptor, a
//! malformed or nested indirect table) ends the iteration as if the chain
//! ended there, so a device cannot tell a broken chain from a short one.
//! `virtio_queue::Reader` and `Writer` are built on that iterator and read
//! the descriptor table again each time one is made.
//!
//! [`walk`] reads each descriptor once, checks it, and copies it into a
//! list of [`Segment`]s; every way a driver can break a chain is its own
//! [`WalkError`]. The device then works on that copy only: a driver that
//! rewrites the descriptor table afterwards changes nothing. [`Cursor`]
//! reads or writes the bytes of a list of segments (say, the device-readable
//! part of a chain) as one stream, wherever the descriptor boundaries fall,
//! since a device must not assume any particular arrangement of descriptors
//! (virtio 1.2, 2.7.4.1).
//!
//! Nothing here is specific to one device type.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Size of one split-ring descriptor.
pub const DESC_SIZE: u64 = 16;

/// One buffer of a walked chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

/// What a walk accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkOptions {
    /// `VIRTIO_RING_F_INDIRECT_DESC` was negotiated.
    pub indirect: bool,
    /// Most buffers (non-indirect descriptors) a chain may have.
    pub max_segments: usize,
}

/// Every way a driver can break a chain, as [`walk`] finds it.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WalkError {
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
    /// The chain has more buffers than [`WalkOptions::max_segments`].
    #[error("descriptor chain is longer than {max} descriptors")]
    TooManyDescriptors {
        /// The limit.
        max: usize,
    },
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
    /// A buffer (or indirect table) that is not entirely in guest memory.
    #[error("buffer {addr:#x}+{len} is not in guest memory")]
    BadAddress {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
}

/// Walks the chain starting at descriptor `head` of the descriptor table at
/// `table` (`queue_size` entries) into `out` (cleared first).
///
/// Each descriptor is read once. Indirect tables are followed; every buffer
/// must lie entirely in `mem` with the access its direction needs.
/// Zero-length buffers are kept (they carry no bytes). On error, `out`
/// holds the buffers walked so far.
pub fn walk<M: GuestMemory + ?Sized>(
    mem: &M,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    opts: WalkOptions,
    out: &mut Vec<Segment>,
) -> Result<(), WalkError> {
    out.clear();
    if head >= queue_size {
        return Err(WalkError::HeadOutOfRange {
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
            return Err(WalkError::Loop { size });
        }
        ttl -= 1;
        let addr = table.checked_add(u64::from(index) * DESC_SIZE).ok_or(
            WalkError::DescriptorUnreadable {
                addr: table.raw_value(),
            },
        )?;
        let desc: Descriptor = mem
            .read_obj(addr)
            .map_err(|_| WalkError::DescriptorUnreadable {
                addr: addr.raw_value(),
            })?;

        if desc.refers_to_indirect_table() {
            if !opts.indirect {
                return Err(WalkError::IndirectNotNegotiated);
            }
            if in_indirect {
                return Err(WalkError::NestedIndirect);
            }
            if desc.has_next() {
                return Err(WalkError::IndirectWithNext);
            }
            let len = desc.len();
            let entries = u64::from(len) / DESC_SIZE;
            if len == 0 || u64::from(len) % DESC_SIZE != 0 || entries > u64::from(u16::MAX) {
                return Err(WalkError::BadIndirectTable { len });
            }
            if !mem.check_range(desc.addr(), len as usize, Permissions::Read) {
                return Err(WalkError::BadAddress {
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

        if out.len() >= opts.max_segments {
            return Err(WalkError::TooManyDescriptors {
                max: opts.max_segments,
            });
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        };
        let access = if seg.writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if seg.len > 0 && !mem.check_range(seg.addr, seg.len as usize, access) {
            return Err(WalkError::BadAddress {
                addr: seg.addr.raw_value(),
                len: seg.len,
            });
        }
        out.push(seg);

        if !desc.has_next() {
            return Ok(());
        }
        let next = desc.next();
        if next >= size {
            return Err(WalkError::NextOutOfRange { index: next, size });
        }
        index = next;
    }
}

/// [`walk`] for a chain that `virtio_queue` took from the available ring of
/// a queue whose descriptor table is at `table` with `queue_size` entries.
pub fn walk_chain<C, M>(
    chain: &DescriptorChain<C>,
    table: GuestAddress,
    queue_size: u16,
    opts: WalkOptions,
    out: &mut Vec<Segment>,
) -> Result<(), WalkError>
where
    C: Deref<Target = M>,
    M: GuestMemory,
{
    walk(
        chain.memory(),
        table,
        queue_size,
        chain.head_index(),
        opts,
        out,
    )
}

/// Splits walked segments into the device-readable part and the
/// device-writable part that follows it. A driver must put every readable
/// buffer before every writable one (virtio 1.2, 2.7.4.2); if it did not,
/// the error is the position of the first readable segment after a
/// writable one.
pub fn split_directions(segs: &[Segment]) -> Result<(&[Segment], &[Segment]), usize> {
    let w = segs.iter().position(|s| s.writable).unwrap_or(segs.len());
    let (readable, writable) = segs.split_at(w);
    match writable.iter().position(|s| !s.writable) {
        Some(i) => Err(w + i),
        None => Ok((readable, writable)),
    }
}

/// Total bytes of `segs`.
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Why a [`Cursor`] transfer failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CursorError {
    /// The transfer goes past the end of the segments.
    #[error("{wanted} bytes wanted, {left} left in the chain")]
    Overrun {
        /// Bytes the transfer needed.
        wanted: u64,
        /// Bytes left after the cursor.
        left: u64,
    },
    /// Guest memory refused the access (the memory map changed since the walk).
    #[error("guest memory access at {addr:#x}+{len} failed")]
    Memory {
        /// Guest address of the failed piece.
        addr: u64,
        /// Its length.
        len: usize,
    },
}

/// A position in the byte stream made of a list of segments, in order.
///
/// Transfers are all or nothing with respect to the stream: one that would
/// go past the end fails before touching memory and leaves the cursor where
/// it was.
#[derive(Clone, Debug)]
pub struct Cursor<'a> {
    segs: &'a [Segment],
    /// Segment the cursor is in.
    idx: usize,
    /// Offset in that segment.
    off: u32,
    /// Bytes before the cursor.
    pos: u64,
    /// Bytes in all segments.
    total: u64,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `segs`.
    pub fn new(segs: &'a [Segment]) -> Self {
        Cursor {
            segs,
            idx: 0,
            off: 0,
            pos: 0,
            total: total_len(segs),
        }
    }

    /// Bytes before the cursor.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Bytes after the cursor.
    pub fn remaining(&self) -> u64 {
        self.total - self.pos
    }

    fn check(&self, n: u64) -> Result<(), CursorError> {
        if n > self.remaining() {
            return Err(CursorError::Overrun {
                wanted: n,
                left: self.remaining(),
            });
        }
        Ok(())
    }

    /// Calls `f` on each guest piece of the next `n` bytes (address, offset
    /// in the transfer, length), and moves past them.
    fn transfer(
        &mut self,
        n: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> bool,
    ) -> Result<(), CursorError> {
        self.check(n as u64)?;
        let mut done = 0usize;
        while done < n {
            let seg = self.segs[self.idx];
            let avail = (seg.len - self.off) as usize;
            if avail == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let take = avail.min(n - done);
            // In range: the walk checked `seg.addr + seg.len` in memory.
            let addr = seg.addr.unchecked_add(u64::from(self.off));
            if !f(addr, done, take) {
                return Err(CursorError::Memory {
                    addr: addr.raw_value(),
                    len: take,
                });
            }
            done += take;
            self.off += take as u32;
            self.pos += take as u64;
        }
        Ok(())
    }

    /// The guest address of the next `n` bytes when they lie in one
    /// segment (empty segments before them are passed over), `None` when
    /// they span segments or go past the end. Moves nothing.
    pub fn contiguous(&self, n: u64) -> Option<GuestAddress> {
        if n > self.remaining() {
            return None;
        }
        let (mut idx, mut off) = (self.idx, self.off);
        loop {
            let seg = self.segs.get(idx)?;
            let avail = u64::from(seg.len - off);
            if avail == 0 && n > 0 {
                idx += 1;
                off = 0;
                continue;
            }
            // In range: the walk checked `seg.addr + seg.len` in memory.
            return (avail >= n).then(|| seg.addr.unchecked_add(u64::from(off)));
        }
    }

    /// Moves `n` bytes forward without touching memory.
    pub fn skip(&mut self, n: u64) -> Result<(), CursorError> {
        self.check(n)?;
        let mut left = n;
        while left > 0 {
            let seg = self.segs[self.idx];
            let avail = u64::from(seg.len - self.off);
            if avail == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let take = avail.min(left);
            self.off += take as u32;
            self.pos += take;
            left -= take;
        }
        Ok(())
    }

    /// Fills `buf` from guest memory.
    pub fn read_exact<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &mut [u8],
    ) -> Result<(), CursorError> {
        self.transfer(buf.len(), |addr, at, len| {
            mem.read_slice(&mut buf[at..at + len], addr).is_ok()
        })
    }

    /// Writes `buf` to guest memory.
    pub fn write_all<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &[u8],
    ) -> Result<(), CursorError> {
        self.transfer(buf.len(), |addr, at, len| {
            mem.write_slice(&buf[at..at + len], addr).is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{guest_memory, Buf, TestRing, MEM_SIZE};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};

    const QSIZE: u16 = 64;
    const OPTS: WalkOptions = WalkOptions {
        indirect: true,
        max_segments: 8,
    };

    fn run(ring: &TestRing<'_>, head: u16, opts: WalkOptions) -> Result<Vec<Segment>, WalkError> {
        let mut out = Vec::new();
        walk(ring.mem, ring.table(), ring.size, head, opts, &mut out).map(|()| out)
    }

    fn segs(bufs: &[Buf]) -> Vec<Segment> {
        bufs.iter()
            .map(|b| Segment {
                addr: GuestAddress(b.addr),
                len: b.len,
                writable: b.writable,
            })
            .collect()
    }

    fn three(ring: &mut TestRing<'_>) -> Vec<Buf> {
        vec![
            ring.readable(&[1; 10]),
            ring.readable(&[2; 6]),
            ring.writable(20),
        ]
    }

    #[test]
    fn direct_and_indirect_chains() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = three(&mut ring);
        let head = ring.chain(&bufs);
        assert_eq!(run(&ring, head, OPTS).unwrap(), segs(&bufs));
        let head = ring.indirect_chain(&bufs);
        assert_eq!(run(&ring, head, OPTS).unwrap(), segs(&bufs));
        // A direct descriptor followed by an indirect table.
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
        assert_eq!(run(&ring, first, OPTS).unwrap(), segs(&bufs));
    }

    #[test]
    fn walks_a_chain_virtio_queue_popped() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = three(&mut ring);
        let head = ring.chain(&bufs);
        ring.make_available(head);
        let mut q: Queue = ring.mock.create_queue().unwrap();
        let chain = q.iter(&mem).unwrap().next().unwrap();
        let mut out = Vec::new();
        walk_chain(&chain, ring.table(), q.size(), OPTS, &mut out).unwrap();
        assert_eq!(out, segs(&bufs));
    }

    #[test]
    fn every_defect_has_its_error() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let bufs = three(&mut ring);

        assert_eq!(
            run(&ring, QSIZE, OPTS),
            Err(WalkError::HeadOutOfRange {
                index: QSIZE,
                size: QSIZE
            })
        );

        let d = ring.take_descs(1);
        ring.store_desc(d, bufs[0].addr, 10, VRING_DESC_F_NEXT as u16, 99);
        assert_eq!(
            run(&ring, d, OPTS),
            Err(WalkError::NextOutOfRange {
                index: 99,
                size: QSIZE
            })
        );

        let mut out = Vec::new();
        assert_eq!(
            walk(&mem, GuestAddress(MEM_SIZE), QSIZE, 0, OPTS, &mut out),
            Err(WalkError::DescriptorUnreadable { addr: MEM_SIZE })
        );

        let a = ring.take_descs(2);
        ring.store_desc(a, bufs[0].addr, 10, VRING_DESC_F_NEXT as u16, a + 1);
        ring.store_desc(a + 1, bufs[1].addr, 6, VRING_DESC_F_NEXT as u16, a);
        let roomy = WalkOptions {
            max_segments: 100,
            ..OPTS
        };
        assert_eq!(run(&ring, a, roomy), Err(WalkError::Loop { size: QSIZE }));

        let long = ring.chain(&[bufs[0]; 9]);
        assert_eq!(
            run(&ring, long, OPTS),
            Err(WalkError::TooManyDescriptors { max: 8 })
        );

        let ind = ring.indirect_chain(&bufs);
        let no_indirect = WalkOptions {
            indirect: false,
            ..OPTS
        };
        assert_eq!(
            run(&ring, ind, no_indirect),
            Err(WalkError::IndirectNotNegotiated)
        );

        let (inner, inner_len) = ring.indirect_table(&bufs);
        let outer = ring.alloc(16);
        let nested = RawDescriptor::from(Descriptor::new(
            inner,
            inner_len,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        mem.write_obj(nested, GuestAddress(outer)).unwrap();
        let n = ring.take_descs(1);
        ring.store_desc(n, outer, 16, VRING_DESC_F_INDIRECT as u16, 0);
        assert_eq!(run(&ring, n, OPTS), Err(WalkError::NestedIndirect));

        let w = ring.take_descs(2);
        let flags = (VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT) as u16;
        ring.store_desc(w, inner, inner_len, flags, w + 1);
        assert_eq!(run(&ring, w, OPTS), Err(WalkError::IndirectWithNext));

        let b = ring.take_descs(2);
        ring.store_desc(b, inner, 20, VRING_DESC_F_INDIRECT as u16, 0);
        ring.store_desc(b + 1, inner, 0, VRING_DESC_F_INDIRECT as u16, 0);
        assert_eq!(
            run(&ring, b, OPTS),
            Err(WalkError::BadIndirectTable { len: 20 })
        );
        assert_eq!(
            run(&ring, b + 1, OPTS),
            Err(WalkError::BadIndirectTable { len: 0 })
        );

        let o = ring.take_descs(2);
        ring.store_desc(o, MEM_SIZE - 16, 64, VRING_DESC_F_INDIRECT as u16, 0);
        ring.store_desc(o + 1, u64::MAX - 4, 8, 0, 0);
        assert_eq!(
            run(&ring, o, OPTS),
            Err(WalkError::BadAddress {
                addr: MEM_SIZE - 16,
                len: 64
            })
        );
        assert!(matches!(
            run(&ring, o + 1, OPTS),
            Err(WalkError::BadAddress { .. })
        ));
    }

    #[test]
    fn splits_directions() {
        let r = |len| Segment {
            addr: GuestAddress(0),
            len,
            writable: false,
        };
        let w = |len| Segment {
            addr: GuestAddress(0),
            len,
            writable: true,
        };
        let s = [r(1), r(2), w(3)];
        assert_eq!(split_directions(&s), Ok((&s[..2], &s[2..])));
        assert_eq!(split_directions(&s[..2]), Ok((&s[..2], &s[2..2])));
        assert_eq!(split_directions(&[r(1), w(2), r(3), w(4)]), Err(2));
        assert_eq!(total_len(&s), 6);
    }

    /// Segments of `lens` bytes each, back to back from `base`, with gaps.
    fn spread(mem: &crate::device::GuestRam, lens: &[u32]) -> Vec<Segment> {
        let mut addr = 0x1000u64;
        lens.iter()
            .map(|&len| {
                let s = Segment {
                    addr: GuestAddress(addr),
                    len,
                    writable: true,
                };
                mem.write_slice(&vec![0xee; len as usize], s.addr).unwrap();
                addr += u64::from(len) + 7;
                s
            })
            .collect()
    }

    #[test]
    fn cursor_crosses_segment_boundaries() {
        let mem = guest_memory();
        let segs = spread(&mem, &[3, 0, 5, 1, 7]);
        let data: Vec<u8> = (0..16).collect();
        let mut c = Cursor::new(&segs);
        assert_eq!(c.remaining(), 16);
        c.write_all(&mem, &data[..4]).unwrap();
        c.skip(2).unwrap();
        c.write_all(&mem, &data[6..]).unwrap();
        assert_eq!((c.position(), c.remaining()), (16, 0));
        // Every segment holds its share, the skipped bytes are untouched.
        let mut back = vec![0u8; 16];
        let mut r = Cursor::new(&segs);
        r.read_exact(&mem, &mut back).unwrap();
        let mut want = data.clone();
        want[4..6].copy_from_slice(&[0xee, 0xee]);
        assert_eq!(back, want);
        let mut one = [0u8; 1];
        mem.read_slice(&mut one, segs[3].addr).unwrap();
        assert_eq!(one[0], want[8]);
    }

    #[test]
    fn cursor_overrun_moves_nothing() {
        let mem = guest_memory();
        let segs = spread(&mem, &[4, 4]);
        let mut c = Cursor::new(&segs);
        c.skip(3).unwrap();
        assert_eq!(
            c.write_all(&mem, &[0; 6]),
            Err(CursorError::Overrun { wanted: 6, left: 5 })
        );
        assert_eq!(c.skip(6), Err(CursorError::Overrun { wanted: 6, left: 5 }));
        assert_eq!(c.position(), 3);
        let mut buf = [0u8; 5];
        c.read_exact(&mem, &mut buf).unwrap();
        assert_eq!(buf, [0xee; 5]);
        assert_eq!(Cursor::new(&[]).remaining(), 0);
    }

    #[test]
    fn cursor_finds_contiguous_runs() {
        let mem = guest_memory();
        let segs = spread(&mem, &[3, 0, 5, 1]);
        let mut c = Cursor::new(&segs);
        assert_eq!(c.contiguous(3), Some(segs[0].addr));
        assert_eq!(c.contiguous(4), None);
        c.skip(3).unwrap();
        // At the end of a segment: the next non-empty one.
        assert_eq!(c.contiguous(5), Some(segs[2].addr));
        c.skip(1).unwrap();
        assert_eq!(c.contiguous(4), Some(segs[2].addr.unchecked_add(1)));
        assert_eq!(c.contiguous(5), None);
        c.skip(4).unwrap();
        assert_eq!(c.contiguous(1), Some(segs[3].addr));
        assert_eq!(c.contiguous(2), None);
        assert_eq!(c.position(), 8);
        assert_eq!(Cursor::new(&[]).contiguous(1), None);
    }

    #[test]
    fn cursor_reports_memory_that_went_away() {
        let mem = guest_memory();
        let segs = [Segment {
            addr: GuestAddress(MEM_SIZE - 2),
            len: 4,
            writable: true,
        }];
        let mut c = Cursor::new(&segs);
        assert!(matches!(
            c.write_all(&mem, &[0; 4]),
            Err(CursorError::Memory { .. })
        ));
    }
}
