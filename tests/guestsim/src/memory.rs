// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest RAM: one memfd-backed region mapped in this process and shared with
//! the backend through `SET_MEM_TABLE`, plus a bump allocator that lays out
//! rings and buffers in it.

use std::ffi::CStr;
use std::sync::atomic::Ordering;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::bytes::AtomicAccess;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::sys;
use crate::{Error, Result};

/// Guest physical address where guest RAM starts. Address 0 and everything
/// below this are outside guest memory, which malformed-request tests use.
pub const GUEST_RAM_BASE: u64 = 0x10_0000;

/// Guest RAM shared with the backend.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    base: u64,
    size: u64,
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM at [`GUEST_RAM_BASE`],
    /// sealed against shrinking and growing as QEMU's memfd backend does.
    pub fn new(name: &CStr, size: u64) -> Result<Self> {
        Self::from_file(sys::memfd(name, size).map_err(Error::Memory)?, size)
    }

    /// Like [`GuestRam::new`], without the seals.
    pub fn new_unsealed(name: &CStr, size: u64) -> Result<Self> {
        Self::from_file(
            sys::unsealed_memfd(name, size).map_err(Error::Memory)?,
            size,
        )
    }

    fn from_file(file: std::fs::File, size: u64) -> Result<Self> {
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(GUEST_RAM_BASE),
            size as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| Error::Setup(format!("mapping guest memory: {e}")))?;
        Ok(GuestRam {
            mem,
            base: GUEST_RAM_BASE,
            size,
        })
    }

    /// The vm-memory view of guest RAM.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// First guest physical address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// One past the last guest physical address.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    /// Address of `gpa` in this process (what `SET_VRING_ADDR` carries).
    pub fn host_address(&self, gpa: u64) -> Result<u64> {
        let region = self
            .mem
            .find_region(GuestAddress(gpa))
            .ok_or(Error::OutOfGuestMemory(gpa))?;
        let offset = gpa - region.start_addr().0;
        let ptr = self
            .mem
            .get_host_address(GuestAddress(region.start_addr().0))
            .map_err(|_| Error::OutOfGuestMemory(gpa))?;
        Ok(ptr as u64 + offset)
    }

    /// The region description for `SET_MEM_TABLE`.
    pub fn region_info(&self) -> Result<VhostUserMemoryRegionInfo> {
        let region = self
            .mem
            .find_region(GuestAddress(self.base))
            .ok_or(Error::OutOfGuestMemory(self.base))?;
        VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(|e| Error::Setup(format!("describing guest memory: {e}")))
    }

    /// Copies `data` to guest address `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| Error::OutOfGuestMemory(gpa))
    }

    /// Copies guest memory at `gpa` into `out`.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<()> {
        self.mem
            .read_slice(out, GuestAddress(gpa))
            .map_err(|_| Error::OutOfGuestMemory(gpa))
    }

    /// Reads `len` bytes at `gpa` into a new vector.
    pub fn read_vec(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(gpa, &mut v)?;
        Ok(v)
    }

    /// Fills `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<()> {
        let chunk = [byte; 4096];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len());
            self.write(gpa + done as u64, &chunk[..n])?;
            done += n;
        }
        Ok(())
    }

    /// Atomic store of a ring field (little-endian on every supported host).
    pub fn store<T: AtomicAccess>(&self, gpa: u64, val: T, order: Ordering) -> Result<()> {
        self.mem
            .store(val, GuestAddress(gpa), order)
            .map_err(|_| Error::OutOfGuestMemory(gpa))
    }

    /// Atomic load of a ring field.
    pub fn load<T: AtomicAccess>(&self, gpa: u64, order: Ordering) -> Result<T> {
        self.mem
            .load(GuestAddress(gpa), order)
            .map_err(|_| Error::OutOfGuestMemory(gpa))
    }
}

/// Hands out aligned, never-reused ranges of guest RAM.
#[derive(Debug)]
pub struct Allocator {
    next: u64,
    end: u64,
}

impl Allocator {
    /// Allocates from `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        Allocator { next: start, end }
    }

    /// Allocates `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64> {
        let start = self.next.next_multiple_of(align);
        let stop = start
            .checked_add(len)
            .ok_or(Error::Setup("guest memory layout overflows".into()))?;
        if stop > self.end {
            return Err(Error::Setup(format!(
                "guest memory too small: need {len} more bytes at {start:#x}, end {:#x}",
                self.end
            )));
        }
        self.next = stop;
        Ok(start)
    }

    /// First address not handed out yet.
    pub fn used_end(&self) -> u64 {
        self.next
    }
}
