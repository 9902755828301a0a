// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Size-class slab allocator for stored page contents.
//!
//! Contents of 1 to [`PAGE_SIZE`] bytes are rounded up to a class that is a
//! multiple of [`CLASS_STEP`] (64 classes of 64, 128, ... 4096 bytes). Each
//! class carves fixed slots out of chunks of at most [`CHUNK_BYTES`]; a slot
//! is named by a `u32` (chunk number and slot number). Free slots are kept in
//! an intrusive list inside the chunk (the first four bytes of a free slot
//! hold the next free slot), so a slot costs no metadata of its own; a chunk
//! whose last slot is freed is released at once. One allocation per chunk,
//! never one per page.
//!
//! The allocator is not synchronised: each dedup shard owns one, under the
//! shard's lock.

use vtmem_protocol::PAGE_SIZE;

/// Granularity of size classes.
pub const CLASS_STEP: usize = 64;
/// Number of size classes.
pub const NUM_CLASSES: usize = PAGE_SIZE / CLASS_STEP;
/// Upper bound on a chunk's size.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Bits of a slot address that name the slot inside its chunk.
const SLOT_BITS: u32 = 10;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
/// Chunks one class can have.
const MAX_CHUNKS: u32 = 1 << (32 - SLOT_BITS);
const NIL: u32 = u32::MAX;

/// The class of a content of `len` bytes (1..=PAGE_SIZE).
pub const fn class_of(len: usize) -> usize {
    let len = if len == 0 { 1 } else { len };
    len.div_ceil(CLASS_STEP) - 1
}

/// Bytes of one slot of `class`.
pub const fn class_size(class: usize) -> usize {
    (class + 1) * CLASS_STEP
}

/// Bytes of the slot that holds `len` bytes.
pub const fn slot_bytes(len: usize) -> usize {
    class_size(class_of(len))
}

/// Slots in one chunk of `class`.
const fn slots_per_chunk(class: usize) -> usize {
    CHUNK_BYTES / class_size(class)
}

#[derive(Debug)]
struct Chunk {
    /// Allocated at full size, filled as slots are first used (bump), so
    /// the memory is written once, never zeroed first.
    data: Vec<u8>,
    used: u32,
    /// Head of the intrusive free list (slot number) or NIL.
    free_head: u32,
    /// Slots below `bump` have been handed out at least once.
    bump: u32,
    /// The chunk's number is in its class's `avail` list.
    listed: bool,
}

#[derive(Debug, Default)]
struct Class {
    chunks: Vec<Option<Chunk>>,
    /// Released chunk numbers, reused first.
    spare: Vec<u32>,
    /// Chunks with at least one free slot.
    avail: Vec<u32>,
}

/// A size-class slab allocator.
#[derive(Debug)]
pub struct Slab {
    classes: Vec<Class>,
    footprint: u64,
    live: u64,
    chunks: u64,
}

impl Default for Slab {
    fn default() -> Self {
        Self::new()
    }
}

impl Slab {
    pub fn new() -> Self {
        Slab {
            classes: (0..NUM_CLASSES).map(|_| Class::default()).collect(),
            footprint: 0,
            live: 0,
            chunks: 0,
        }
    }

    /// Stores `src` (1..=PAGE_SIZE bytes) in a new slot; returns its address.
    ///
    /// Panics only if a class runs out of chunk numbers (2^22 chunks of
    /// 64 KiB: 256 GiB in one class of one shard).
    pub fn alloc(&mut self, src: &[u8]) -> u32 {
        let len = src.len();
        debug_assert!((1..=PAGE_SIZE).contains(&len));
        let class_no = class_of(len);
        let size = class_size(class_no);
        let per_chunk = slots_per_chunk(class_no) as u32;
        let class = &mut self.classes[class_no];
        let chunk_no = loop {
            match class.avail.last() {
                Some(&n) => {
                    let usable = class.chunks[n as usize]
                        .as_ref()
                        .is_some_and(|c| c.used < per_chunk);
                    if usable {
                        break n;
                    }
                    // Defensive: never expected, the list is kept exact.
                    class.avail.pop();
                }
                None => {
                    let n = class.spare.pop().unwrap_or_else(|| {
                        class.chunks.push(None);
                        (class.chunks.len() - 1) as u32
                    });
                    assert!(n < MAX_CHUNKS, "slab class exhausted");
                    let bytes = per_chunk as usize * size;
                    class.chunks[n as usize] = Some(Chunk {
                        data: Vec::with_capacity(bytes),
                        used: 0,
                        free_head: NIL,
                        bump: 0,
                        listed: true,
                    });
                    class.avail.push(n);
                    self.footprint += bytes as u64;
                    self.chunks += 1;
                    break n;
                }
            }
        };
        let Some(chunk) = class.chunks[chunk_no as usize].as_mut() else {
            unreachable!("chunk chosen above exists");
        };
        let slot = if chunk.free_head != NIL {
            let slot = chunk.free_head;
            let at = slot as usize * size;
            let mut next = [0u8; 4];
            next.copy_from_slice(&chunk.data[at..at + 4]);
            chunk.free_head = u32::from_le_bytes(next);
            chunk.data[at..at + len].copy_from_slice(src);
            slot
        } else {
            debug_assert_eq!(chunk.data.len(), chunk.bump as usize * size);
            chunk.data.extend_from_slice(src);
            chunk.data.resize(chunk.data.len() + size - len, 0);
            chunk.bump += 1;
            chunk.bump - 1
        };
        chunk.used += 1;
        if chunk.used == per_chunk {
            chunk.listed = false;
            if class.avail.last() == Some(&chunk_no) {
                class.avail.pop();
            } else if let Some(pos) = class.avail.iter().position(|&n| n == chunk_no) {
                class.avail.swap_remove(pos);
            }
        }
        self.live += size as u64;
        (chunk_no << SLOT_BITS) | slot
    }

    fn locate(&self, len: usize, addr: u32) -> (usize, &Chunk) {
        let class_no = class_of(len);
        let chunk = self.classes[class_no].chunks[(addr >> SLOT_BITS) as usize]
            .as_ref()
            .expect("slot address names a live chunk");
        ((addr & SLOT_MASK) as usize * class_size(class_no), chunk)
    }

    /// The `len` bytes stored at `addr`.
    pub fn get(&self, len: usize, addr: u32) -> &[u8] {
        let (at, chunk) = self.locate(len, addr);
        &chunk.data[at..at + len]
    }

    /// Frees the slot at `addr` that was allocated for `len` bytes.
    pub fn free(&mut self, len: usize, addr: u32) {
        let class_no = class_of(len);
        let size = class_size(class_no);
        let class = &mut self.classes[class_no];
        let chunk_no = addr >> SLOT_BITS;
        let slot = addr & SLOT_MASK;
        let chunk = class.chunks[chunk_no as usize]
            .as_mut()
            .expect("freeing a slot of a live chunk");
        debug_assert!(slot < chunk.bump && chunk.used > 0);
        chunk.used -= 1;
        self.live -= size as u64;
        if chunk.used == 0 {
            let bytes = (slots_per_chunk(class_no) * size) as u64;
            if chunk.listed {
                if let Some(pos) = class.avail.iter().rposition(|&n| n == chunk_no) {
                    class.avail.swap_remove(pos);
                }
            }
            class.chunks[chunk_no as usize] = None;
            // Trim released chunks at the end instead of keeping them spare.
            if chunk_no as usize + 1 == class.chunks.len() {
                while matches!(class.chunks.last(), Some(None)) {
                    class.chunks.pop();
                }
                let len = class.chunks.len() as u32;
                class.spare.retain(|&n| n < len);
            } else {
                class.spare.push(chunk_no);
            }
            if class.chunks.is_empty() {
                class.chunks = Vec::new();
                class.spare = Vec::new();
                class.avail = Vec::new();
            }
            self.footprint -= bytes;
            self.chunks -= 1;
            return;
        }
        let at = slot as usize * size;
        chunk.data[at..at + 4].copy_from_slice(&chunk.free_head.to_le_bytes());
        chunk.free_head = slot;
        if !chunk.listed {
            chunk.listed = true;
            class.avail.push(chunk_no);
        }
    }

    /// Bytes held in chunks (what the allocator takes from the system).
    pub fn footprint(&self) -> u64 {
        self.footprint
    }

    /// Bytes of live slots.
    pub fn live(&self) -> u64 {
        self.live
    }

    /// Chunks currently allocated.
    #[cfg(test)]
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Bytes of the allocator's own bookkeeping.
    pub fn metadata_bytes(&self) -> u64 {
        let mut total = (self.classes.capacity() * std::mem::size_of::<Class>()) as u64;
        for c in &self.classes {
            total += (c.chunks.capacity() * std::mem::size_of::<Option<Chunk>>()
                + (c.spare.capacity() + c.avail.capacity()) * 4) as u64;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_in_64_byte_steps() {
        assert_eq!(class_of(1), 0);
        assert_eq!(class_of(64), 0);
        assert_eq!(class_of(65), 1);
        assert_eq!(class_of(PAGE_SIZE), NUM_CLASSES - 1);
        assert_eq!(slot_bytes(3584), 3584);
        assert_eq!(slot_bytes(3585), 3648);
        assert_eq!(slot_bytes(PAGE_SIZE), PAGE_SIZE);
        for class in 0..NUM_CLASSES {
            assert!(slots_per_chunk(class) >= 16);
            assert!(slots_per_chunk(class) <= 1 << SLOT_BITS);
        }
    }

    #[test]
    fn data_round_trips_and_slots_do_not_overlap() {
        let mut slab = Slab::new();
        let mut held = Vec::new();
        for i in 0..3000usize {
            let len = 1 + (i * 37) % PAGE_SIZE;
            let byte = (i % 251) as u8;
            let addr = slab.alloc(&vec![byte; len]);
            held.push((len, addr, byte));
        }
        for &(len, addr, byte) in &held {
            assert!(slab.get(len, addr).iter().all(|&b| b == byte));
        }
        let live: u64 = held.iter().map(|&(l, _, _)| slot_bytes(l) as u64).sum();
        assert_eq!(slab.live(), live);
        assert!(slab.footprint() >= live);
        for (len, addr, _) in held {
            slab.free(len, addr);
        }
        assert_eq!(slab.live(), 0);
        assert_eq!(slab.footprint(), 0);
        assert_eq!(slab.chunks(), 0);
    }

    #[test]
    fn free_slots_are_reused_before_new_chunks() {
        let mut slab = Slab::new();
        let per = slots_per_chunk(class_of(1000));
        let data = [7u8; 1000];
        let addrs: Vec<u32> = (0..per).map(|_| slab.alloc(&data)).collect();
        assert_eq!(slab.chunks(), 1);
        slab.free(1000, addrs[3]);
        slab.free(1000, addrs[7]);
        let a = slab.alloc(&[1u8; 1000]);
        let b = slab.alloc(&[2u8; 1000]);
        assert_eq!(slab.chunks(), 1, "freed slots reused");
        let mut got = [a, b];
        got.sort_unstable();
        assert_eq!(got, [addrs[3], addrs[7]]);
        // The chunk is full again: the next allocation needs a new chunk.
        assert!(
            slab.get(1000, a).iter().all(|&x| x == 1),
            "reused slot rewritten"
        );
        assert!(slab.get(1000, addrs[0]).iter().all(|&x| x == 7));
        let c = slab.alloc(&data);
        assert_eq!(slab.chunks(), 2);
        slab.free(1000, c);
        assert_eq!(slab.chunks(), 1, "empty chunk released");
    }

    #[test]
    fn empty_chunks_in_the_middle_are_released_and_renumbered() {
        let mut slab = Slab::new();
        let per = slots_per_chunk(class_of(4096));
        let all: Vec<u32> = (0..per * 3).map(|_| slab.alloc(&[1u8; 4096])).collect();
        assert_eq!(slab.chunks(), 3);
        // Empty the middle chunk.
        for &a in &all[per..2 * per] {
            slab.free(4096, a);
        }
        assert_eq!(slab.chunks(), 2);
        assert_eq!(slab.footprint(), 2 * (per * 4096) as u64);
        // A new chunk reuses the released number, the rest still reads back.
        let x = slab.alloc(&[9u8; 4096]);
        assert_eq!(x >> SLOT_BITS, 1);
        assert!(slab.get(4096, all[0]).iter().all(|&b| b == 1));
        assert!(slab.get(4096, x).iter().all(|&b| b == 9));
    }

    #[test]
    fn alternating_alloc_free_keeps_footprint_bounded() {
        let mut slab = Slab::new();
        let keep = slab.alloc(&[0u8; 200]);
        for _ in 0..10_000 {
            let a = slab.alloc(&[1u8; 200]);
            slab.free(200, a);
        }
        assert_eq!(slab.chunks(), 1);
        slab.free(200, keep);
        assert_eq!(slab.footprint(), 0);
    }
}
