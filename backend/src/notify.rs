// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Used-buffer notifications that honour `VRING_AVAIL_F_NO_INTERRUPT`.
//!
//! `virtio_queue::QueueT::needs_notification` follows the driver's
//! `used_event` when `VIRTIO_RING_F_EVENT_IDX` was negotiated, but without
//! it always answers yes: the available ring's `VRING_AVAIL_F_NO_INTERRUPT`
//! flag is not supported. Virtio 1.2, 2.7.7.2: without EVENT_IDX, a device
//! should not notify while the driver sets that flag, and must notify while
//! it is clear. [`needs_notification`] adds the flag.
//!
//! Nothing here is specific to one device type.

use std::sync::atomic::Ordering;

use virtio_bindings::bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Error, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Whether the driver must be notified of the used entries added since the
/// last call: [`QueueT::needs_notification`] (which also resets its count of
/// added entries), and, without EVENT_IDX, the driver's
/// `VRING_AVAIL_F_NO_INTERRUPT` flag.
pub fn needs_notification<Q: QueueT, M: GuestMemory>(
    queue: &mut Q,
    mem: &M,
) -> Result<bool, Error> {
    // This orders the used ring writes before the reads below (it starts
    // with a full fence), as the driver orders its flag write before
    // reading the used index.
    if !queue.needs_notification(mem)? {
        return Ok(false);
    }
    if queue.event_idx_enabled() {
        return Ok(true);
    }
    let flags: u16 = mem
        .load(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .map(u16::from_le)
        .map_err(Error::GuestMemory)?;
    Ok(flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{guest_memory, TestRing};
    use virtio_queue::Queue;

    #[test]
    fn honours_no_interrupt_without_event_idx() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, 16);
        let buf = ring.writable(16);
        let head = ring.chain(&[buf]);
        let mut q: Queue = ring.mock.create_queue().unwrap();
        q.add_used(&mem, head, 0).unwrap();
        assert!(needs_notification(&mut q, &mem).unwrap());
        set_flags(&ring, VRING_AVAIL_F_NO_INTERRUPT as u16);
        q.add_used(&mem, head, 0).unwrap();
        assert!(!needs_notification(&mut q, &mem).unwrap());
        set_flags(&ring, 0);
        q.add_used(&mem, head, 0).unwrap();
        assert!(needs_notification(&mut q, &mem).unwrap());
    }

    #[test]
    fn event_idx_decides_alone_when_negotiated() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, 16);
        let buf = ring.writable(16);
        let head = ring.chain(&[buf]);
        let mut q: Queue = ring.mock.create_queue().unwrap();
        q.set_event_idx(true);
        // The flag is ignored; used_event (0) asks for the first entry.
        set_flags(&ring, VRING_AVAIL_F_NO_INTERRUPT as u16);
        q.add_used(&mem, head, 0).unwrap();
        assert!(needs_notification(&mut q, &mem).unwrap());
        q.add_used(&mem, head, 0).unwrap();
        assert!(!needs_notification(&mut q, &mem).unwrap());
    }

    /// Writes the available ring's flags, as the driver does.
    fn set_flags(ring: &TestRing<'_>, flags: u16) {
        ring.mem.write_obj(flags, ring.mock.avail_addr()).unwrap();
    }
}
