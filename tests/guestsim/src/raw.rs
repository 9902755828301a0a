// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hand-built descriptor chains for malformed-request tests: any address,
//! length, flag or link, direct or through indirect tables, with buffers in
//! a scratch area of guest RAM.

use std::sync::MutexGuard;
use std::time::Duration;

use vtmem_protocol::{
    response_len, Op, OpStatus, RequestBuilder, Response, ResponseHeader, MAX_REQUEST_LEN,
};

use crate::queue::Ticket;
use crate::ring::{
    Link, RawDescriptor, DESC_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use crate::vm::Vm;
use crate::{Error, Result};

/// Guest RAM set aside for raw chains.
pub const SCRATCH_BYTES: u64 = 2 << 20;

/// Encodes a well-formed request buffer for `ops` with `tag`.
pub fn request_bytes(ops: &[Op], tag: u64) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_REQUEST_LEN];
    let mut b = RequestBuilder::new(&mut buf).expect("buffer holds a header");
    for op in ops {
        b.push(op).expect("at most MAX_OPS_PER_REQUEST operations");
    }
    let len = b.finish(tag).expect("at least one operation");
    buf.truncate(len);
    buf
}

impl RawDescriptor {
    /// A descriptor with no flags (the chain ends here).
    pub fn new(addr: u64, len: u32, flags: u16) -> Self {
        RawDescriptor {
            addr,
            len,
            flags,
            next: Link::Pos(0),
        }
    }

    /// The same descriptor continuing at chain position `pos`.
    pub fn then(mut self, pos: usize) -> Self {
        self.flags |= VRING_DESC_F_NEXT;
        self.next = Link::Pos(pos);
        self
    }

    /// The same descriptor continuing at absolute table index `idx`.
    pub fn then_abs(mut self, idx: u16) -> Self {
        self.flags |= VRING_DESC_F_NEXT;
        self.next = Link::Abs(idx);
        self
    }
}

#[derive(Debug)]
struct Entry {
    desc: RawDescriptor,
    auto_link: bool,
}

/// Builds one raw chain in a VM's scratch memory and runs it.
#[derive(Debug)]
pub struct RawChainBuilder<'a> {
    vm: &'a Vm,
    queue: usize,
    base: MutexGuard<'a, u64>,
    used: u64,
    entries: Vec<Entry>,
    writable: Vec<(u64, u32)>,
    timeout: Option<Duration>,
}

/// What came back for a raw chain.
#[derive(Debug, Clone)]
pub struct RawOutcome {
    /// Which submission this was.
    pub ticket: Ticket,
    /// Length the device put in the used ring.
    pub used_len: u32,
    /// Contents of each buffer added with [`RawChainBuilder::writable`],
    /// read back after completion, in order.
    pub writable: Vec<Vec<u8>>,
}

impl RawOutcome {
    /// Decodes the first writable buffer as a response: the header and
    /// every status entry it announces.
    pub fn response(&self) -> Result<(ResponseHeader, Vec<OpStatus>)> {
        let buf = self
            .writable
            .first()
            .ok_or_else(|| Error::Setup("chain had no writable buffer".into()))?;
        let r = Response::parse(buf).map_err(Error::Wire)?;
        let h = r.header();
        let mut st = Vec::with_capacity(h.num_ops as usize);
        for i in 0..h.num_ops {
            st.push(r.status(i).map_err(Error::Wire)?);
        }
        Ok((h, st))
    }
}

impl<'a> RawChainBuilder<'a> {
    pub(crate) fn new(vm: &'a Vm, queue: usize, base: MutexGuard<'a, u64>) -> Self {
        RawChainBuilder {
            vm,
            queue,
            base,
            used: 0,
            entries: Vec::new(),
            writable: Vec::new(),
            timeout: None,
        }
    }

    /// Waits at most this long for the device to return the chain.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Reserves `len` zeroed bytes of scratch memory; returns the address.
    pub fn alloc(&mut self, len: u64) -> Result<u64> {
        let start = self.used.next_multiple_of(64);
        if start + len > SCRATCH_BYTES {
            return Err(Error::Setup("raw chain scratch memory exhausted".into()));
        }
        self.used = start + len;
        let addr = *self.base + start;
        self.vm.ram().fill(addr, len as usize, 0)?;
        Ok(addr)
    }

    /// Copies `bytes` into scratch memory; returns the address.
    pub fn buf(&mut self, bytes: &[u8]) -> Result<u64> {
        let addr = self.alloc(bytes.len() as u64)?;
        self.vm.ram().write(addr, bytes)?;
        Ok(addr)
    }

    /// Appends a device-readable buffer holding `bytes`, linked to the next
    /// descriptor added.
    pub fn readable(mut self, bytes: &[u8]) -> Result<Self> {
        let addr = self.buf(bytes)?;
        self.push_auto(RawDescriptor::new(addr, bytes.len() as u32, 0));
        Ok(self)
    }

    /// Appends a zeroed device-writable buffer of `len` bytes, read back
    /// into [`RawOutcome::writable`] after completion.
    pub fn writable(mut self, len: u32) -> Result<Self> {
        let addr = self.alloc(len as u64)?;
        self.writable.push((addr, len));
        self.push_auto(RawDescriptor::new(addr, len, VRING_DESC_F_WRITE));
        Ok(self)
    }

    /// Appends a device-readable buffer of `len` bytes at any address
    /// (inside guest RAM or not).
    pub fn readable_at(mut self, addr: u64, len: u32) -> Self {
        self.push_auto(RawDescriptor::new(addr, len, 0));
        self
    }

    /// Appends a device-writable buffer of `len` bytes at any address.
    pub fn writable_at(mut self, addr: u64, len: u32) -> Self {
        self.push_auto(RawDescriptor::new(addr, len, VRING_DESC_F_WRITE));
        self
    }

    /// Appends a descriptor exactly as given: no automatic link.
    pub fn desc(mut self, d: RawDescriptor) -> Self {
        self.entries.push(Entry {
            desc: d,
            auto_link: false,
        });
        self
    }

    /// Appends an `INDIRECT` descriptor whose table holds `table`, written
    /// to scratch memory as given (links are positions in the table).
    pub fn indirect(mut self, table: &[RawDescriptor]) -> Result<Self> {
        let mut bytes = Vec::with_capacity(table.len() * DESC_SIZE as usize);
        for d in table {
            let next = match d.next {
                Link::Pos(p) => p as u16,
                Link::Abs(a) => a,
            };
            let desc = crate::ring::Descriptor {
                addr: d.addr,
                len: d.len,
                flags: d.flags,
                next,
            };
            bytes.extend_from_slice(&desc.encode());
        }
        let addr = self.buf(&bytes)?;
        self.push_auto(RawDescriptor::new(
            addr,
            bytes.len() as u32,
            VRING_DESC_F_INDIRECT,
        ));
        Ok(self)
    }

    /// Adds a zeroed writable buffer to scratch memory without putting it
    /// in the chain (for hand-made indirect tables); it is read back like
    /// the others. Returns its address.
    pub fn writable_buf(&mut self, len: u32) -> Result<u64> {
        let addr = self.alloc(len as u64)?;
        self.writable.push((addr, len));
        Ok(addr)
    }

    fn push_auto(&mut self, d: RawDescriptor) {
        self.entries.push(Entry {
            desc: d,
            auto_link: true,
        });
    }

    /// The descriptors as they will be queued.
    pub fn descriptors(&self) -> Vec<RawDescriptor> {
        let n = self.entries.len();
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                if e.auto_link && i + 1 < n {
                    e.desc.then(i + 1)
                } else {
                    e.desc
                }
            })
            .collect()
    }

    /// Queues the chain, kicks the device and waits for it to come back.
    pub fn submit(self) -> Result<RawOutcome> {
        let descs = self.descriptors();
        let mut q = self.vm.queue(self.queue);
        let old = self.timeout.map(|t| {
            let old = q.timeout();
            q.set_timeout(t);
            old
        });
        let res = (|| {
            let t = q.submit_raw(&descs)?;
            q.force_kick()?;
            q.wait_raw(t)
        })();
        if let Some(old) = old {
            q.set_timeout(old);
        }
        let done = res?;
        let mut writable = Vec::with_capacity(self.writable.len());
        for &(addr, len) in &self.writable {
            writable.push(self.vm.ram().read_vec(addr, len as usize)?);
        }
        Ok(RawOutcome {
            ticket: done.ticket,
            used_len: done.used_len,
            writable,
        })
    }
}

/// Bytes of a response buffer for `num_ops` operations (re-exported for
/// tests that size buffers by hand).
pub const fn response_bytes(num_ops: u16) -> u32 {
    response_len(num_ops) as u32
}
