// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The driver side of a split virtqueue (virtio 1.x, section 2.7), laid out
//! in guest RAM: descriptor table, available ring and used ring, with
//! `VIRTIO_RING_F_EVENT_IDX` notification suppression in both directions and
//! `VIRTIO_RING_F_INDIRECT_DESC` tables.
//!
//! The ring knows nothing of vtmem: it moves chains of guest buffers and
//! hands back `(token, used length)` pairs.

use std::sync::atomic::{fence, Ordering};

use crate::memory::{Allocator, GuestRam};
use crate::{Error, Result};

/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Available ring flag (no EVENT_IDX): the driver wants no interrupts.
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag (no EVENT_IDX): the device wants no kicks.
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;
/// Size of one descriptor.
pub const DESC_SIZE: u64 = 16;

/// One descriptor as it sits in a descriptor table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// `VRING_DESC_F_*` bits.
    pub flags: u16,
    /// Index of the next descriptor when `flags` has `VRING_DESC_F_NEXT`.
    pub next: u16,
}

impl Descriptor {
    /// The 16 bytes of the descriptor in guest memory.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// One buffer of a well-formed chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Segment {
    /// A device-readable buffer.
    pub fn readable(addr: u64, len: u32) -> Self {
        Segment {
            addr,
            len,
            write: false,
        }
    }

    /// A device-writable buffer.
    pub fn writable(addr: u64, len: u32) -> Self {
        Segment {
            addr,
            len,
            write: true,
        }
    }
}

/// Where a raw descriptor's `next` field points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// The descriptor at this position of the same chain (or table).
    Pos(usize),
    /// This exact table index, whatever it holds.
    Abs(u16),
}

/// A descriptor of a raw (possibly malformed) chain: flags are taken as
/// given, and `next` is resolved against the table indices the chain gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDescriptor {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `VRING_DESC_F_*` bits, exactly as written to the table.
    pub flags: u16,
    /// Value of the `next` field.
    pub next: Link,
}

/// Guest addresses of the three parts of a split ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Number of descriptors (a power of two).
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

impl RingLayout {
    /// Carves a ring of `size` entries out of guest RAM, with the alignments
    /// of the virtio specification (16, 2, 4; page-aligned here).
    pub fn alloc(alloc: &mut Allocator, size: u16) -> Result<Self> {
        if !size.is_power_of_two() {
            return Err(Error::Setup(format!(
                "queue size {size} is not a power of two"
            )));
        }
        let n = size as u64;
        let desc = alloc.alloc(DESC_SIZE * n, 4096)?;
        let avail = alloc.alloc(6 + 2 * n, 4096)?;
        let used = alloc.alloc(6 + 8 * n, 4096)?;
        Ok(RingLayout {
            size,
            desc,
            avail,
            used,
        })
    }

    /// Guest address of the available ring's index.
    pub fn avail_idx(&self) -> u64 {
        self.avail + 2
    }

    fn avail_entry(&self, i: u16) -> u64 {
        self.avail + 4 + 2 * (i % self.size) as u64
    }

    fn used_event(&self) -> u64 {
        self.avail + 4 + 2 * self.size as u64
    }

    /// Guest address of the used ring's index.
    pub fn used_idx(&self) -> u64 {
        self.used + 2
    }

    fn used_entry(&self, i: u16) -> u64 {
        self.used + 4 + 8 * (i % self.size) as u64
    }

    fn avail_event(&self) -> u64 {
        self.used + 4 + 8 * self.size as u64
    }

    fn desc_addr(&self, i: u16) -> u64 {
        self.desc + DESC_SIZE * i as u64
    }
}

/// `vring_need_event()` of the virtio specification: whether moving an index
/// from `old` to `new` crosses the other side's `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One used-ring entry, matched with the chain it completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// The caller's token for the chain.
    pub token: u64,
    /// Head descriptor index the device returned.
    pub head: u16,
    /// Bytes the device says it wrote.
    pub len: u32,
}

#[derive(Debug)]
struct InFlight {
    token: u64,
    descs: Vec<u16>,
}

/// Driver state of one split ring.
#[derive(Debug)]
pub struct SplitRing {
    layout: RingLayout,
    event_idx: bool,
    free: Vec<u16>,
    in_flight: Vec<Option<InFlight>>,
    in_flight_count: usize,
    avail_idx: u16,
    kick_base: u16,
    last_used: u16,
    interrupts_enabled: bool,
}

impl SplitRing {
    /// Zeroes the ring in guest memory and starts with every descriptor free.
    ///
    /// With `event_idx`, kicks honour the device's `avail_event` and the
    /// driver asks for interrupts through `used_event`; without it the
    /// `NO_NOTIFY` / `NO_INTERRUPT` flags are used.
    pub fn new(ram: &GuestRam, layout: RingLayout, event_idx: bool) -> Result<Self> {
        let n = layout.size as usize;
        ram.fill(layout.desc, n * DESC_SIZE as usize, 0)?;
        ram.fill(layout.avail, 6 + 2 * n, 0)?;
        ram.fill(layout.used, 6 + 8 * n, 0)?;
        let mut ring = SplitRing {
            layout,
            event_idx,
            free: (0..layout.size).rev().collect(),
            in_flight: (0..n).map(|_| None).collect(),
            in_flight_count: 0,
            avail_idx: 0,
            kick_base: 0,
            last_used: 0,
            interrupts_enabled: true,
        };
        // Start with interrupts off: the driver asks for one when it waits.
        ring.disable_interrupts(ram)?;
        Ok(ring)
    }

    /// The ring's addresses.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Descriptors not in use.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Chains handed to the device and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.in_flight_count
    }

    /// Index the next available entry goes to (the shadow `avail->idx`).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Next used entry the driver will read.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    fn take_descs(&mut self, n: usize) -> Result<Vec<u16>> {
        if n == 0 {
            return Err(Error::Setup("empty chain".into()));
        }
        if n > self.free.len() {
            return Err(Error::RingFull {
                needed: n,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - n;
        let mut v = self.free.split_off(at);
        v.reverse();
        Ok(v)
    }

    fn write_desc(&self, ram: &GuestRam, at: u64, d: &Descriptor) -> Result<()> {
        ram.write(at, &d.encode())
    }

    /// Queues a well-formed chain. With `indirect_table` (guest memory for
    /// `segments.len()` descriptors) the chain takes a single ring slot.
    /// Returns the head index. The chain is visible to the device at once;
    /// call [`SplitRing::kick_needed`] to learn whether to notify it.
    pub fn add(
        &mut self,
        ram: &GuestRam,
        segments: &[Segment],
        indirect_table: Option<u64>,
        token: u64,
    ) -> Result<u16> {
        let flags_of = |s: &Segment| if s.write { VRING_DESC_F_WRITE } else { 0 };
        match indirect_table {
            Some(table) => {
                let mut bytes = Vec::with_capacity(segments.len() * DESC_SIZE as usize);
                for (i, s) in segments.iter().enumerate() {
                    let last = i + 1 == segments.len();
                    let d = Descriptor {
                        addr: s.addr,
                        len: s.len,
                        flags: flags_of(s) | if last { 0 } else { VRING_DESC_F_NEXT },
                        next: if last { 0 } else { (i + 1) as u16 },
                    };
                    bytes.extend_from_slice(&d.encode());
                }
                ram.write(table, &bytes)?;
                let descs = self.take_descs(1)?;
                let d = Descriptor {
                    addr: table,
                    len: bytes.len() as u32,
                    flags: VRING_DESC_F_INDIRECT,
                    next: 0,
                };
                self.write_desc(ram, self.layout.desc_addr(descs[0]), &d)?;
                self.publish(ram, descs, token)
            }
            None => {
                let descs = self.take_descs(segments.len())?;
                for (i, s) in segments.iter().enumerate() {
                    let last = i + 1 == segments.len();
                    let d = Descriptor {
                        addr: s.addr,
                        len: s.len,
                        flags: flags_of(s) | if last { 0 } else { VRING_DESC_F_NEXT },
                        next: if last { 0 } else { descs[i + 1] },
                    };
                    self.write_desc(ram, self.layout.desc_addr(descs[i]), &d)?;
                }
                self.publish(ram, descs, token)
            }
        }
    }

    /// Queues a raw chain: each descriptor gets a free table slot, `flags`
    /// are written as given and [`Link::Pos`] links are resolved to the
    /// slots the chain received. The head is the first descriptor.
    pub fn add_raw(&mut self, ram: &GuestRam, descs: &[RawDescriptor], token: u64) -> Result<u16> {
        let idx = self.take_descs(descs.len())?;
        for (i, r) in descs.iter().enumerate() {
            let next = match r.next {
                Link::Pos(p) => idx.get(p).copied().unwrap_or(p as u16),
                Link::Abs(a) => a,
            };
            let d = Descriptor {
                addr: r.addr,
                len: r.len,
                flags: r.flags,
                next,
            };
            if let Err(e) = self.write_desc(ram, self.layout.desc_addr(idx[i]), &d) {
                self.free.extend(idx.iter().rev());
                return Err(e);
            }
        }
        self.publish(ram, idx, token)
    }

    fn publish(&mut self, ram: &GuestRam, descs: Vec<u16>, token: u64) -> Result<u16> {
        let head = descs[0];
        ram.store(
            self.layout.avail_entry(self.avail_idx),
            head,
            Ordering::Relaxed,
        )?;
        self.in_flight[head as usize] = Some(InFlight { token, descs });
        self.in_flight_count += 1;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Release: the descriptors and the ring entry are visible before the
        // index that publishes them.
        ram.store(self.layout.avail_idx(), self.avail_idx, Ordering::Release)?;
        Ok(head)
    }

    /// Fault injection: makes `head` available without it being a chain
    /// this driver built (it may be out of range). Nothing is tracked: the
    /// device should not return it.
    pub fn publish_raw_head(&mut self, ram: &GuestRam, head: u16) -> Result<()> {
        ram.store(
            self.layout.avail_entry(self.avail_idx),
            head,
            Ordering::Relaxed,
        )?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        ram.store(self.layout.avail_idx(), self.avail_idx, Ordering::Release)
    }

    /// Fault injection: writes `idx` to `avail->idx` (the shadow index is
    /// left alone, so the ring is unusable afterwards).
    pub fn corrupt_avail_idx(&mut self, ram: &GuestRam, idx: u16) -> Result<()> {
        ram.store(self.layout.avail_idx(), idx, Ordering::Release)
    }

    /// Whether the device must be notified of the chains added since the
    /// last call: `avail_event` with EVENT_IDX, `NO_NOTIFY` otherwise.
    pub fn kick_needed(&mut self, ram: &GuestRam) -> Result<bool> {
        // The index store must be visible before the device's suppression
        // state is read (the device does the mirror image).
        fence(Ordering::SeqCst);
        let old = self.kick_base;
        let new = self.avail_idx;
        self.kick_base = new;
        if old == new {
            return Ok(false);
        }
        if self.event_idx {
            let event: u16 = ram.load(self.layout.avail_event(), Ordering::Acquire)?;
            Ok(need_event(event, new, old))
        } else {
            let flags: u16 = ram.load(self.layout.used, Ordering::Acquire)?;
            Ok(flags & VRING_USED_F_NO_NOTIFY == 0)
        }
    }

    /// The device's `avail_event` (meaningful with EVENT_IDX).
    pub fn avail_event(&self, ram: &GuestRam) -> Result<u16> {
        ram.load(self.layout.avail_event(), Ordering::Acquire)
    }

    /// The device's `used->idx`.
    pub fn used_idx(&self, ram: &GuestRam) -> Result<u16> {
        ram.load(self.layout.used_idx(), Ordering::Acquire)
    }

    /// Takes the next used entry, if the device has returned one.
    pub fn pop_used(&mut self, ram: &GuestRam) -> Result<Option<UsedElem>> {
        let used_idx = self.used_idx(ram)?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let pending = used_idx.wrapping_sub(self.last_used) as usize;
        if pending > self.in_flight_count {
            return Err(Error::Device(format!(
                "used index moved {pending} entries ahead with {} chains in flight",
                self.in_flight_count
            )));
        }
        // `used_idx` was loaded with Acquire, so the entry is visible.
        let at = self.layout.used_entry(self.last_used);
        let id: u32 = ram.load(at, Ordering::Relaxed)?;
        let len: u32 = ram.load(at + 4, Ordering::Relaxed)?;
        self.last_used = self.last_used.wrapping_add(1);
        let entry = usize::try_from(id)
            .ok()
            .and_then(|i| self.in_flight.get_mut(i))
            .and_then(Option::take)
            .ok_or_else(|| Error::Device(format!("used id {id} is not a chain in flight")))?;
        self.in_flight_count -= 1;
        self.free.extend(entry.descs.iter().rev());
        Ok(Some(UsedElem {
            token: entry.token,
            head: id as u16,
            len,
        }))
    }

    /// Asks for an interrupt when the device returns the next chain (or,
    /// with `delay`, the `delay`-th next chain: EVENT_IDX only). Returns
    /// whether used entries are already waiting, in which case the caller
    /// must reap them instead of sleeping.
    pub fn enable_interrupts(&mut self, ram: &GuestRam, delay: u16) -> Result<bool> {
        if self.event_idx {
            let event = self.last_used.wrapping_add(delay);
            ram.store(self.layout.used_event(), event, Ordering::Relaxed)?;
        } else if !self.interrupts_enabled {
            ram.store(self.layout.avail, 0u16, Ordering::Relaxed)?;
        }
        self.interrupts_enabled = true;
        // The request for an interrupt must be visible before the used index
        // is checked again, or a completion between the two is missed.
        fence(Ordering::SeqCst);
        Ok(self.used_idx(ram)? != self.last_used)
    }

    /// Tells the device the driver does not want interrupts (a hint the
    /// device may ignore).
    pub fn disable_interrupts(&mut self, ram: &GuestRam) -> Result<()> {
        if self.event_idx {
            // Half the index space behind: no used index the device can
            // reach before the driver asks again crosses it.
            let event = self.last_used.wrapping_sub(0x8000);
            ram.store(self.layout.used_event(), event, Ordering::Relaxed)?;
        } else if self.interrupts_enabled {
            ram.store(
                self.layout.avail,
                VRING_AVAIL_F_NO_INTERRUPT,
                Ordering::Relaxed,
            )?;
        }
        self.interrupts_enabled = false;
        Ok(())
    }
}
