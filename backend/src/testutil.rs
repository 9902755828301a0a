// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test helpers: real split rings in mock guest memory
//! (`virtio_queue::mock::MockSplitQueue` on a `GuestRam`), a builder
//! for vtmem chains, well-formed or not, and what a crash of a store with
//! a state directory would leave.
//!
//! Note: `MockSplitQueue` lays the used ring out right after the first half
//! of the available ring, so tests keep to a few dozen chains per ring.

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::device::GuestRam;
use vtmem_protocol::{Op, RequestBuilder, MAX_REQUEST_LEN, PAGE_SIZE};

/// Size of the mock guest memory.
pub const MEM_SIZE: u64 = 0x100_0000;
/// Where buffers are allocated.
const DATA_START: u64 = 0x10_0000;

/// A fresh guest memory.
pub fn guest_memory() -> GuestRam {
    GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// One buffer of a chain under construction.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A ring in mock memory plus a buffer allocator.
pub struct TestRing<'a> {
    /// The memory.
    pub mem: &'a GuestRam,
    /// The mock queue.
    pub mock: MockSplitQueue<'a, GuestRam>,
    /// Queue size.
    pub size: u16,
    next_desc: u16,
    next_data: u64,
    avail_idx: u16,
}

impl<'a> TestRing<'a> {
    /// A ring of `size` entries at guest address 0.
    pub fn new(mem: &'a GuestRam, size: u16) -> Self {
        TestRing {
            mem,
            mock: MockSplitQueue::create(mem, GuestAddress(0), size),
            size,
            next_desc: 0,
            next_data: DATA_START,
            avail_idx: 0,
        }
    }

    /// Descriptor table address.
    pub fn table(&self) -> GuestAddress {
        self.mock.desc_table_addr()
    }

    /// Allocates `len` bytes of guest memory (16-byte aligned).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_data;
        self.next_data = (addr + len.max(1) + 15) & !15;
        assert!(self.next_data <= MEM_SIZE, "test memory exhausted");
        addr
    }

    /// Allocates a buffer holding `bytes` (device-readable).
    pub fn readable(&mut self, bytes: &[u8]) -> Buf {
        let addr = self.alloc(bytes.len() as u64);
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        Buf {
            addr,
            len: bytes.len() as u32,
            writable: false,
        }
    }

    /// Allocates a zeroed device-writable buffer.
    pub fn writable(&mut self, len: u32) -> Buf {
        let addr = self.alloc(u64::from(len));
        Buf {
            addr,
            len,
            writable: true,
        }
    }

    /// Device-readable buffers holding `bytes` between the offsets `cuts`
    /// (ascending; a repeated offset makes a zero-length buffer). Each
    /// buffer is allocated on its own, so no two are adjacent.
    pub fn readable_split(&mut self, bytes: &[u8], cuts: &[usize]) -> Vec<Buf> {
        bounds(bytes.len(), cuts)
            .map(|(a, b)| self.readable(&bytes[a..b]))
            .collect()
    }

    /// Device-writable buffers of `len` bytes in all, cut at `cuts` as
    /// [`TestRing::readable_split`] does.
    pub fn writable_split(&mut self, len: usize, cuts: &[usize]) -> Vec<Buf> {
        bounds(len, cuts)
            .map(|(a, b)| self.writable((b - a) as u32))
            .collect()
    }

    /// The bytes of `bufs`, one after the other.
    pub fn read_all(&self, bufs: &[Buf]) -> Vec<u8> {
        bufs.iter().flat_map(|b| self.read(*b)).collect()
    }

    /// Writes one descriptor of the main table.
    pub fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.mock
            .desc_table()
            .store(
                index,
                RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
            )
            .unwrap();
    }

    /// Takes `n` consecutive free descriptor indices.
    pub fn take_descs(&mut self, n: u16) -> u16 {
        let first = self.next_desc;
        assert!(u32::from(first) + u32::from(n) <= u32::from(self.size));
        self.next_desc += n;
        first
    }

    /// Writes `bufs` as a direct chain; returns its head (not yet made available).
    pub fn chain(&mut self, bufs: &[Buf]) -> u16 {
        let first = self.take_descs(bufs.len() as u16);
        for (i, b) in bufs.iter().enumerate() {
            let idx = first + i as u16;
            let mut flags = if b.writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.store_desc(idx, b.addr, b.len, flags, idx + 1);
        }
        first
    }

    /// Writes an indirect table for `bufs` in guest memory; returns its
    /// address and byte length.
    pub fn indirect_table(&mut self, bufs: &[Buf]) -> (u64, u32) {
        let len = bufs.len() as u64 * 16;
        let table = self.alloc(len);
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = RawDescriptor::from(Descriptor::new(b.addr, b.len, flags, i as u16 + 1));
            self.mem
                .write_obj(d, GuestAddress(table + i as u64 * 16))
                .unwrap();
        }
        (table, len as u32)
    }

    /// Writes `bufs` as one indirect table behind one descriptor; returns the head.
    pub fn indirect_chain(&mut self, bufs: &[Buf]) -> u16 {
        let (table, len) = self.indirect_table(bufs);
        let head = self.take_descs(1);
        self.store_desc(head, table, len, VRING_DESC_F_INDIRECT as u16, 0);
        head
    }

    /// Makes the chain at `head` available to the device.
    pub fn make_available(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        self.mock.avail().ring().ref_at(slot).unwrap().store(head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mock.avail().idx().store(self.avail_idx);
    }

    /// Sets the available index directly (to corrupt it).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mock.avail().idx().store(idx);
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(self.mock.used_addr().unchecked_add(2))
            .unwrap()
    }

    /// Used ring entry `i`: (head, len).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let addr = self
            .mock
            .used_addr()
            .unchecked_add(4 + u64::from(i % self.size) * 8);
        let e: VirtqUsedElem = self.mem.read_obj(addr).unwrap();
        (e.id(), e.len())
    }

    /// Reads guest memory.
    pub fn read(&self, buf: Buf) -> Vec<u8> {
        let mut v = vec![0u8; buf.len as usize];
        self.mem.read_slice(&mut v, GuestAddress(buf.addr)).unwrap();
        v
    }
}

/// The `(start, end)` pairs of `0..len` cut at `cuts`.
fn bounds(len: usize, cuts: &[usize]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let starts = std::iter::once(0).chain(cuts.iter().copied());
    let ends = cuts.iter().copied().chain(std::iter::once(len));
    starts.zip(ends)
}

/// Where a driver may cut the readable part of a PUT+GET request
/// (112 request bytes, then a 4096-byte page): one descriptor for all,
/// the header alone, each operation alone, the page in halves or 1+4095,
/// a request that runs into the page, zero-length descriptors.
pub const READABLE_CUTS: &[&[usize]] = &[
    &[112],
    &[],
    &[16],
    &[16, 64, 112],
    &[1, 112],
    &[112, 112 + 2048],
    &[112, 113],
    &[100, 200, 112 + 4095],
    &[0, 16, 16, 112, 4208],
];

/// Where a driver may cut the writable part of a PUT+GET request (a
/// 48-byte response, then a 4096-byte page).
pub const WRITABLE_CUTS: &[&[usize]] = &[
    &[48],
    &[],
    &[16],
    &[16, 32, 48, 48 + 2048],
    &[47, 49],
    &[0, 48, 48, 4144],
];

/// Encodes a request buffer for `ops`.
pub fn request_bytes(ops: &[Op], tag: u64) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_REQUEST_LEN];
    let mut b = RequestBuilder::new(&mut buf).unwrap();
    for op in ops {
        b.push(op).unwrap();
    }
    let len = b.finish(tag).unwrap();
    buf.truncate(len);
    buf
}

/// A page filled with `byte`.
pub fn page_of(byte: u8) -> Vec<u8> {
    vec![byte; PAGE_SIZE]
}

/// A page whose bytes depend on `seed` (not same-filled, so not special-cased).
pub fn patterned_page(seed: u64) -> Vec<u8> {
    vtmem_testkit::random_page(seed).to_vec()
}

/// A store with a 64 MiB limit and the data path of its one client "vm".
pub fn store_client() -> (std::sync::Arc<vtmem_store::Store>, vtmem_store::DataHandle) {
    let store = vtmem_store::Store::new(vtmem_store::StoreConfig {
        host_limit: 64 << 20,
    });
    let client = store
        .add_client("vm", vtmem_store::ClientConfig::default())
        .expect("a new store takes a client")
        .data();
    (store, client)
}

/// A daemon with no VM yet, its sockets in `dir`, a 64 MiB store.
pub fn daemon_in(dir: &std::path::Path) -> std::sync::Arc<crate::daemon::Daemon> {
    let config = crate::config::DaemonConfig {
        socket_dir: dir.to_path_buf(),
        control_socket: dir.join("ctl"),
        control_group: None,
        host_limit: vtmem_api::ByteSize(64 << 20),
        device: crate::config::DeviceSettings::default(),
        vms: Vec::new(),
        metrics_address: None,
        state_file: None,
        state_dir: None,
        sandbox: Default::default(),
    };
    let store = vtmem_store::Store::new(vtmem_store::StoreConfig {
        host_limit: config.host_limit.bytes(),
    });
    crate::daemon::Daemon::new(store, &config)
}

/// What a crash now would leave: a copy of the state directory `from`
/// (its files are mapped shared or written in place, so the copy is the
/// state as it is), recovered with a host limit of `host_limit` bytes;
/// the copy's directory is returned to keep it.
pub fn crash_copy(
    from: &std::path::Path,
    host_limit: u64,
) -> (std::sync::Arc<vtmem_store::Store>, tempfile::TempDir) {
    let to = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.path().join(e.file_name())).unwrap();
    }
    let (store, _) =
        vtmem_store::Store::recover(to.path(), vtmem_store::StoreConfig { host_limit }).unwrap();
    (store, to)
}
