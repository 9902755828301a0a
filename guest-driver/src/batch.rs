// SPDX-License-Identifier: GPL-2.0

//! A batch: one request of many operations, with its preallocated buffers.
//!
//! A batch owns a request buffer, a response buffer and `slots` page buffers.
//! Operations are appended in order; each `PUT` and `GET` takes the next page
//! slot, so the slots of the puts (device-readable) and of the gets
//! (device-writable) each appear in the chain in operation order, as the
//! protocol requires. The encoding is done by the protocol's `wire` module.

use crate::sys::{Chain, DmaBuf, Seg};
use crate::wire::{
    self, Op, OpStatus, PageBuffer, RequestHeader, Response, Status, OP_DESC_SIZE, PAGE_SIZE,
};
use kernel::prelude::*;

/// One operation of a batch and, once the device answered, its outcome.
#[derive(Clone, Copy)]
pub(crate) struct OpMeta {
    /// The operation as sent.
    pub(crate) op: Op,
    /// The page slot it uses (PUT, GET).
    pub(crate) slot: u16,
    /// The device's answer; `None` until the batch completed.
    pub(crate) result: Option<OpStatus>,
}

/// A request being filled, in flight, or completed.
pub(crate) struct Batch {
    /// Identifies the batch while it is in use; sent as the request's tag.
    pub(crate) seq: u64,
    /// Threads waiting for this batch's answer.
    pub(crate) waiters: u32,
    req: DmaBuf,
    resp: DmaBuf,
    pages: KVec<DmaBuf>,
    ops: KVec<OpMeta>,
    max_ops: usize,
    slots_used: usize,
    puts: usize,
    gets: usize,
}

impl Batch {
    /// Allocates a batch of up to `max_ops` operations and `slots` pages.
    pub(crate) fn new(max_ops: u16, slots: u16) -> Result<KBox<Self>> {
        let max_ops = max_ops.clamp(1, wire::MAX_OPS_PER_REQUEST);
        let mut pages = KVec::with_capacity(slots as usize, GFP_KERNEL)?;
        for _ in 0..slots {
            pages.push(DmaBuf::new(PAGE_SIZE, GFP_KERNEL)?, GFP_KERNEL)?;
        }
        Ok(KBox::new(
            Self {
                seq: 0,
                waiters: 0,
                req: DmaBuf::new(wire::request_len(max_ops), GFP_KERNEL)?,
                resp: DmaBuf::new(wire::response_len(max_ops), GFP_KERNEL)?,
                pages,
                ops: KVec::with_capacity(max_ops as usize, GFP_KERNEL)?,
                max_ops: max_ops as usize,
                slots_used: 0,
                puts: 0,
                gets: 0,
            },
            GFP_KERNEL,
        )?)
    }

    /// Empties the batch for reuse under a new sequence number.
    pub(crate) fn reset(&mut self, seq: u64) {
        self.seq = seq;
        self.waiters = 0;
        self.ops.clear();
        self.slots_used = 0;
        self.puts = 0;
        self.gets = 0;
    }

    /// Number of operations.
    pub(crate) fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch has no operation.
    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of `PUT` operations.
    pub(crate) fn puts(&self) -> usize {
        self.puts
    }

    /// Number of `GET` operations.
    pub(crate) fn gets(&self) -> usize {
        self.gets
    }

    /// Whether `n` more operations fit, `pages` of them with a page.
    pub(crate) fn has_room(&self, n: usize, pages: usize) -> bool {
        self.ops.len() + n <= self.max_ops && self.slots_used + pages <= self.pages.len()
    }

    /// Whether no further page operation fits (the batch should go out).
    pub(crate) fn is_full(&self) -> bool {
        !self.has_room(1, 1)
    }

    /// Appends `op`; returns its index in the batch.
    pub(crate) fn push(&mut self, op: Op) -> Result<usize> {
        let with_page = op.page_buffer() != PageBuffer::None;
        if !self.has_room(1, usize::from(with_page)) {
            return Err(ENOSPC);
        }
        let index = self.ops.len();
        let at = wire::request_len(index as u16);
        let dst = self
            .req
            .as_mut_slice()
            .get_mut(at..at + OP_DESC_SIZE)
            .ok_or(EINVAL)?;
        dst.copy_from_slice(&op.encode());
        let slot = if with_page {
            self.slots_used += 1;
            self.slots_used - 1
        } else {
            0
        };
        match op.page_buffer() {
            PageBuffer::ToDevice => self.puts += 1,
            PageBuffer::FromDevice => self.gets += 1,
            PageBuffer::None => {}
        }
        self.ops
            .push_within_capacity(OpMeta {
                op,
                slot: slot as u16,
                result: None,
            })
            .map_err(|_| ENOSPC)?;
        Ok(index)
    }

    /// The page buffer of operation `index` (a PUT's data, a GET's result).
    pub(crate) fn page(&self, index: usize) -> Option<&[u8]> {
        let meta = self.ops.get(index)?;
        if meta.op.page_buffer() == PageBuffer::None {
            return None;
        }
        self.pages.get(meta.slot as usize).map(DmaBuf::as_slice)
    }

    /// The page buffer of operation `index`, to fill a PUT's data.
    pub(crate) fn page_mut(&mut self, index: usize) -> Option<&mut [u8]> {
        let meta = self.ops.get(index)?;
        if meta.op.page_buffer() == PageBuffer::None {
            return None;
        }
        self.pages
            .get_mut(meta.slot as usize)
            .map(DmaBuf::as_mut_slice)
    }

    /// The operations and, after completion, their outcomes.
    pub(crate) fn ops(&self) -> &[OpMeta] {
        &self.ops
    }

    /// Writes the request header; the batch is ready to be sent.
    pub(crate) fn seal(&mut self) {
        let header = RequestHeader {
            num_ops: self.ops.len() as u16,
            tag: self.seq,
        };
        if let Some(dst) = self.req.as_mut_slice().get_mut(..wire::REQUEST_HEADER_SIZE) {
            dst.copy_from_slice(&header.encode());
        }
    }

    /// Records the device's answer, `used` bytes written. Every operation
    /// gets a result; a malformed or short answer fails them all
    /// (`DEVICE_ERROR`) or, for a request-level status, with that status.
    pub(crate) fn complete(&mut self, used: u32) -> core::result::Result<(), Status> {
        let n = self.ops.len() as u16;
        let used = used as usize;
        let resp_len = wire::response_len(n);
        let outcome = (|| {
            let bytes = self
                .resp
                .as_slice()
                .get(..used.min(resp_len))
                .ok_or(Status::DeviceError)?;
            let resp = Response::parse(bytes).map_err(|_| Status::DeviceError)?;
            let header = resp.header();
            if header.status != Status::Ok {
                return Err(header.status);
            }
            if header.tag != self.seq || header.num_ops != n {
                return Err(Status::DeviceError);
            }
            Ok(resp)
        })();
        let resp = match outcome {
            Ok(resp) => resp,
            Err(status) => {
                for meta in self.ops.iter_mut() {
                    meta.result = Some(OpStatus::new(status));
                }
                return Err(status);
            }
        };
        let mut written = resp_len;
        for (i, meta) in self.ops.iter_mut().enumerate() {
            let st = resp
                .status(i as u16)
                .unwrap_or(OpStatus::new(Status::DeviceError));
            if meta.op.page_buffer() == PageBuffer::FromDevice && st.status == Status::Ok {
                written += PAGE_SIZE;
            }
            meta.result = Some(st);
        }
        if used < written {
            // The device claims hits it did not write: trust no GET.
            for meta in self.ops.iter_mut() {
                if meta.op.page_buffer() == PageBuffer::FromDevice {
                    meta.result = Some(OpStatus::new(Status::DeviceError));
                }
            }
        }
        Ok(())
    }

    /// Fails every operation (the device went away).
    pub(crate) fn fail(&mut self, status: Status) {
        for meta in self.ops.iter_mut() {
            meta.result = Some(OpStatus::new(status));
        }
    }
}

impl Chain for Batch {
    fn segments(&self, f: &mut dyn FnMut(Seg<'_>) -> Result) -> Result {
        let n = self.ops.len() as u16;
        f(Seg::Out(&self.req, wire::request_len(n)))?;
        for meta in self.ops.iter() {
            if meta.op.page_buffer() == PageBuffer::ToDevice {
                f(Seg::Out(
                    self.pages.get(meta.slot as usize).ok_or(EINVAL)?,
                    PAGE_SIZE,
                ))?;
            }
        }
        f(Seg::In(&self.resp, wire::response_len(n)))?;
        for meta in self.ops.iter() {
            if meta.op.page_buffer() == PageBuffer::FromDevice {
                f(Seg::In(
                    self.pages.get(meta.slot as usize).ok_or(EINVAL)?,
                    PAGE_SIZE,
                ))?;
            }
        }
        Ok(())
    }
}
