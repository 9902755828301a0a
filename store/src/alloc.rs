// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Size-class slab allocator for stored page contents, with compaction.
//!
//! Contents of 1 to [`PAGE_SIZE`] bytes are rounded up to a class that is a
//! multiple of [`CLASS_STEP`] (64 classes of 64, 128, ... 4096 bytes). Each
//! class carves fixed slots out of chunks of at most [`CHUNK_BYTES`]; a slot
//! is named by a `u32` (chunk number and slot number). Free slots are kept in
//! an intrusive list inside the chunk (the first four bytes of a free slot
//! hold the next free slot); a chunk whose last slot is freed is released at
//! once. One allocation per chunk, never one per page.
//!
//! Each slot records its *owner* (a `u32` the caller chooses: the content
//! table entry that points at it). That is what makes compaction possible:
//! when the free slots of one class add up to [`COMPACT_AT`] bytes, the
//! sparsest chunks are emptied into the others, as zsmalloc's compaction
//! does, and the caller is told each moved slot's owner and new address. So
//! no pattern of frees can strand memory: a class never keeps more than
//! [`COMPACT_AT`] bytes of holes.
//!
//! A chunk's memory is reserved at full size but written, and so made
//! resident, one slot at a time; [`Slab::footprint`] counts what has been
//! written (the *touched* bytes), which is what the chunk really costs.
//! A chunk in the arena is allocated whole when it is made (so that a full
//! file system refuses it then, rather than a write to it killing the
//! process), and costs its whole size.
//!
//! The allocator is not synchronised: each dedup shard owns one, under the
//! shard's lock.
//!
//! With a crash-safe state ([`Slab::in_arena`]) every chunk is an extent of
//! the state's arena (`state.rs`), listed in its chunk directory before its
//! first slot is written and unlisted and punched once its last slot is
//! freed; a slab that is dropped with chunks still in use leaves them
//! listed, with their bytes, for the next open. Without one (the default,
//! for tests and benchmarks) chunks are heap allocations.

use std::sync::Arc;

use vtmem_protocol::PAGE_SIZE;

use super::state::{Arena, ChunkTag, Extent};

/// Granularity of size classes.
pub const CLASS_STEP: usize = 64;
/// Number of size classes.
pub const NUM_CLASSES: usize = PAGE_SIZE / CLASS_STEP;
/// Upper bound on a chunk's size.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Free-slot bytes of one class that start a compaction; it runs until
/// fewer than [`CHUNK_BYTES`] remain or no chunk can be emptied.
pub const COMPACT_AT: usize = 2 * CHUNK_BYTES;
/// Bits of a slot address that name the slot inside its chunk.
pub(crate) const SLOT_BITS: u32 = 10;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
/// Chunks one class can have.
const MAX_CHUNKS: u32 = 1 << (32 - SLOT_BITS);
const NIL: u32 = u32::MAX;
/// Most slots a chunk has (the smallest class).
const MAX_SLOTS: usize = CHUNK_BYTES / CLASS_STEP;

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

/// A chunk's memory.
#[derive(Debug)]
enum Mem {
    /// Reserved at full size, filled as slots are first used (bump), so
    /// the memory is written once, never zeroed first.
    Heap(Vec<u8>),
    /// An extent of the state's arena (zeroed when handed out). Boxed, so
    /// that a chunk stays 64 bytes, as in heap mode: the slab's chunk
    /// tables count against the host limit.
    Arena(Box<Extent>),
}

#[derive(Debug)]
struct Chunk {
    data: Mem,
    /// Owner of every slot handed out so far (its length is the bump
    /// pointer: slots below it have been used at least once).
    owners: Vec<u32>,
    used: u32,
    /// Head of the intrusive free list (slot number) or NIL.
    free_head: u32,
    /// The chunk's number is in its class's `avail` list.
    listed: bool,
}

impl Chunk {
    fn bump(&self) -> u32 {
        self.owners.len() as u32
    }

    #[inline]
    fn bytes(&self) -> &[u8] {
        match &self.data {
            Mem::Heap(v) => v,
            Mem::Arena(e) => e.bytes(),
        }
    }

    #[inline]
    fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.data {
            Mem::Heap(v) => v,
            Mem::Arena(e) => e.bytes_mut(),
        }
    }

    /// Writes `src` into the first unused slot (the bump), of `size` bytes.
    #[inline]
    fn push_slot(&mut self, src: &[u8], size: usize) {
        let at = self.bump() as usize * size;
        match &mut self.data {
            Mem::Heap(v) => {
                debug_assert_eq!(v.len(), at);
                v.extend_from_slice(src);
                v.resize(v.len() + size - src.len(), 0);
            }
            // The extent was zeroed when it was handed out, and slots above
            // the bump were never written.
            Mem::Arena(e) => e.bytes_mut()[at..at + src.len()].copy_from_slice(src),
        }
    }

    /// The free-list link stored in free slot `slot`.
    fn link(&self, slot: u32, size: usize) -> u32 {
        let at = slot as usize * size;
        let mut next = [0u8; 4];
        next.copy_from_slice(&self.bytes()[at..at + 4]);
        u32::from_le_bytes(next)
    }

    /// Puts `slot` at the head of the free list (its first four bytes
    /// become the link).
    fn push_free(&mut self, slot: u32, size: usize) {
        let at = slot as usize * size;
        let head = self.free_head;
        self.bytes_mut()[at..at + 4].copy_from_slice(&head.to_le_bytes());
        self.free_head = slot;
    }
}

/// Where a slab's chunks live with a crash-safe state.
#[derive(Debug)]
struct InArena {
    arena: Arc<Arena>,
    domain: u32,
    shard: u8,
}

#[derive(Debug, Default)]
struct Class {
    chunks: Vec<Option<Chunk>>,
    /// Released chunk numbers, reused first.
    spare: Vec<u32>,
    /// Chunks with at least one free slot.
    avail: Vec<u32>,
    /// Free slots below the chunks' bump pointers (written, not in use).
    holes: u64,
    /// Slots in use.
    used: u64,
}

/// A size-class slab allocator.
#[derive(Debug)]
pub struct Slab {
    classes: Vec<Class>,
    /// Bytes of chunk memory written so far (bumped slots).
    touched: u64,
    live: u64,
    chunks: u64,
    /// Bytes of the chunks' owner tables.
    owner_bytes: u64,
    /// The arena chunks are taken from, if any.
    arena: Option<InArena>,
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
            touched: 0,
            live: 0,
            chunks: 0,
            owner_bytes: 0,
            arena: None,
        }
    }

    /// A slab whose chunks are extents of `arena`, tagged with `domain`
    /// and `shard` in its chunk directory.
    pub fn in_arena(arena: Arc<Arena>, domain: u32, shard: u8) -> Self {
        let mut s = Slab::new();
        s.arena = Some(InArena {
            arena,
            domain,
            shard,
        });
        s
    }

    /// Stores `src` (1..=PAGE_SIZE bytes) in a new slot owned by `owner`;
    /// returns its address, or `None` if the class has no chunk number
    /// left (2^22 chunks of 64 KiB: 256 GiB in one class of one shard).
    pub fn alloc(&mut self, src: &[u8], owner: u32) -> Option<u32> {
        let len = src.len();
        debug_assert!((1..=PAGE_SIZE).contains(&len));
        let class_no = class_of(len);
        self.alloc_in(class_no, src, owner, None)
    }

    /// Allocates in `class_no`, never in chunk `avoid`.
    fn alloc_in(
        &mut self,
        class_no: usize,
        src: &[u8],
        owner: u32,
        avoid: Option<u32>,
    ) -> Option<u32> {
        let len = src.len();
        let size = class_size(class_no);
        let per_chunk = slots_per_chunk(class_no) as u32;
        let class = &mut self.classes[class_no];
        let chunk_no = loop {
            match class.avail.last() {
                Some(&n) => {
                    let usable = class.chunks[n as usize]
                        .as_ref()
                        .is_some_and(|c| c.used < per_chunk)
                        && Some(n) != avoid;
                    if usable {
                        break n;
                    }
                    // Never expected: the list is kept exact, and the chunk
                    // being emptied is taken off it first.
                    class.avail.pop();
                }
                None => {
                    if avoid.is_some() {
                        // Compaction never grows a class.
                        return None;
                    }
                    let n = match class.spare.pop() {
                        Some(n) => n,
                        None if (class.chunks.len() as u32) < MAX_CHUNKS => {
                            class.chunks.push(None);
                            (class.chunks.len() - 1) as u32
                        }
                        None => return None,
                    };
                    let data = match &self.arena {
                        None => Mem::Heap(Vec::with_capacity(per_chunk as usize * size)),
                        Some(a) => {
                            let tag = ChunkTag {
                                domain: a.domain,
                                shard: a.shard,
                                class: class_no as u8,
                                chunk: n,
                            };
                            match a.arena.alloc(tag) {
                                Ok(e) => Mem::Arena(Box::new(e)),
                                // The arena logs why (once while it lasts).
                                Err(_) => {
                                    class.spare.push(n);
                                    return None;
                                }
                            }
                        }
                    };
                    class.chunks[n as usize] = Some(Chunk {
                        data,
                        // Grown as slots are first used: a chunk of small
                        // slots that stays nearly empty costs little.
                        owners: Vec::new(),
                        used: 0,
                        free_head: NIL,
                        listed: true,
                    });
                    class.avail.push(n);
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
            chunk.free_head = chunk.link(slot, size);
            chunk.bytes_mut()[at..at + len].copy_from_slice(src);
            chunk.owners[slot as usize] = owner;
            class.holes -= 1;
            slot
        } else {
            chunk.push_slot(src, size);
            let before = chunk.owners.capacity();
            chunk.owners.push(owner);
            self.owner_bytes += (chunk.owners.capacity() - before) as u64 * 4;
            self.touched += size as u64;
            chunk.bump() - 1
        };
        chunk.used += 1;
        class.used += 1;
        if chunk.used == per_chunk {
            chunk.listed = false;
            if class.avail.last() == Some(&chunk_no) {
                class.avail.pop();
            } else if let Some(pos) = class.avail.iter().position(|&n| n == chunk_no) {
                class.avail.swap_remove(pos);
            }
        }
        self.live += size as u64;
        Some((chunk_no << SLOT_BITS) | slot)
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
        &chunk.bytes()[at..at + len]
    }

    /// Frees the slot at `addr` that was allocated for `len` bytes. If that
    /// leaves the class with [`COMPACT_AT`] bytes of holes, compacts the
    /// class, calling `moved(owner, new_address)` for every slot it moves,
    /// once the copy is made and before the old slot is reused.
    pub fn free(&mut self, len: usize, addr: u32, moved: impl FnMut(u32, u32)) {
        let class_no = class_of(len);
        let size = class_size(class_no);
        let class = &mut self.classes[class_no];
        let chunk_no = addr >> SLOT_BITS;
        let slot = addr & SLOT_MASK;
        let chunk = class.chunks[chunk_no as usize]
            .as_mut()
            .expect("freeing a slot of a live chunk");
        debug_assert!(slot < chunk.bump() && chunk.used > 0);
        chunk.used -= 1;
        class.used -= 1;
        self.live -= size as u64;
        if chunk.used == 0 {
            // Every slot it handed out is a hole now; they leave with it.
            class.holes += 1;
            self.release_chunk(class_no, chunk_no);
            return;
        }
        chunk.push_free(slot, size);
        chunk.owners[slot as usize] = NIL;
        class.holes += 1;
        if !chunk.listed {
            chunk.listed = true;
            class.avail.push(chunk_no);
        }
        if class.holes as usize * size >= COMPACT_AT {
            self.compact(class_no, moved);
        }
    }

    /// Releases an empty chunk (or one whose slots all moved away).
    fn release_chunk(&mut self, class_no: usize, chunk_no: u32) {
        let class = &mut self.classes[class_no];
        let Some(chunk) = class.chunks[chunk_no as usize].take() else {
            return;
        };
        debug_assert_eq!(chunk.used, 0);
        class.holes -= u64::from(chunk.bump());
        self.touched -= u64::from(chunk.bump()) * class_size(class_no) as u64;
        self.owner_bytes -= chunk.owners.capacity() as u64 * 4;
        if chunk.listed {
            if let Some(pos) = class.avail.iter().rposition(|&n| n == chunk_no) {
                class.avail.swap_remove(pos);
            }
        }
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
        } else {
            shrink_list(&mut class.chunks);
            shrink_list(&mut class.spare);
            shrink_list(&mut class.avail);
        }
        self.chunks -= 1;
    }

    /// Empties the sparsest chunks of a class into the free slots of its
    /// other chunks until its holes are below [`CHUNK_BYTES`].
    fn compact(&mut self, class_no: usize, mut moved: impl FnMut(u32, u32)) {
        let size = class_size(class_no);
        let per_chunk = slots_per_chunk(class_no) as u64;
        let mut buf = [0u8; PAGE_SIZE];
        while self.classes[class_no].holes as usize * size >= CHUNK_BYTES {
            let class = &mut self.classes[class_no];
            let Some((victim, victim_used)) = class
                .chunks
                .iter()
                .enumerate()
                .filter_map(|(n, c)| c.as_ref().map(|c| (n as u32, c.used)))
                .min_by_key(|&(_, used)| used)
            else {
                return;
            };
            // Room in the other chunks: every slot of the class that is not
            // in use, minus the victim's own.
            let free_elsewhere = (class.chunks.len() as u64)
                .checked_sub(class.spare.len() as u64)
                .and_then(|live| (live * per_chunk).checked_sub(class.used))
                .and_then(|free| free.checked_sub(per_chunk - u64::from(victim_used)));
            if free_elsewhere.is_none_or(|free| free < u64::from(victim_used)) {
                return;
            }
            let Some(mut chunk) = class.chunks[victim as usize].take() else {
                return;
            };
            if chunk.listed {
                if let Some(pos) = class.avail.iter().rposition(|&n| n == victim) {
                    class.avail.swap_remove(pos);
                }
                chunk.listed = false;
            }
            // Which slots below the bump pointer are free.
            let mut free = [0u64; MAX_SLOTS / 64];
            let mut f = chunk.free_head;
            while f != NIL {
                free[f as usize / 64] |= 1 << (f % 64);
                f = chunk.link(f, size);
            }
            let mut aborted = false;
            for slot in 0..chunk.bump() as usize {
                if free[slot / 64] & (1 << (slot % 64)) != 0 {
                    continue;
                }
                let at = slot * size;
                buf[..size].copy_from_slice(&chunk.bytes()[at..at + size]);
                let owner = chunk.owners[slot];
                // Room was counted above; should it be missing after all,
                // the chunk goes back with what it still holds.
                let Some(to) = self.alloc_in(class_no, &buf[..size], owner, Some(victim)) else {
                    aborted = true;
                    break;
                };
                // Reported before the old copy is overwritten: with a
                // crash-safe state, the caller records the move there, and
                // until that record is written the old copy must stay whole.
                moved(owner, to);
                // The old copy becomes a hole of the chunk being emptied.
                chunk.push_free(slot as u32, size);
                chunk.owners[slot] = NIL;
                chunk.used -= 1;
                let class = &mut self.classes[class_no];
                class.used -= 1;
                class.holes += 1;
                self.live -= size as u64;
            }
            let class = &mut self.classes[class_no];
            if aborted {
                chunk.listed = true;
                class.chunks[victim as usize] = Some(chunk);
                class.avail.push(victim);
                return;
            }
            class.chunks[victim as usize] = Some(chunk);
            self.release_chunk(class_no, victim);
        }
    }

    /// Compacts every class holding a chunk's worth of holes or more, so
    /// that what eviction freed is given back now rather than once the
    /// holes reach [`COMPACT_AT`].
    pub fn reclaim(&mut self, mut moved: impl FnMut(u32, u32)) {
        for class_no in 0..NUM_CLASSES {
            if self.classes[class_no].holes as usize * class_size(class_no) >= CHUNK_BYTES {
                self.compact(class_no, &mut moved);
            }
        }
    }

    /// Bytes of chunk memory in use or written before: live slots and
    /// holes (what the allocator costs). A chunk in the arena is taken
    /// whole when it is made (`Arena::alloc`), so it costs all its bytes.
    pub fn footprint(&self) -> u64 {
        if self.arena.is_some() {
            self.chunks * CHUNK_BYTES as u64
        } else {
            self.touched
        }
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
        total + self.owner_bytes
    }
}

impl Slab {
    /// Adopts chunks of the arena as they were left by a store that
    /// stopped or died: `chunks` are the extents the chunk directory lists
    /// for this slab (class, chunk number, extent), `slots` the slots in
    /// use (stored length, address, owner), each checked by the caller to
    /// lie inside one of `chunks` of its class, no two alike. Every other
    /// slot becomes free; a chunk with no slot in use is given back.
    pub fn adopt(
        &mut self,
        chunks: Vec<(u8, u32, Extent)>,
        slots: impl IntoIterator<Item = (usize, u32, u32)>,
    ) -> Result<(), String> {
        debug_assert!(self.arena.is_some() && self.chunks == 0);
        for (class_no, chunk_no, e) in chunks {
            let class_no = usize::from(class_no);
            if class_no >= NUM_CLASSES || chunk_no >= MAX_CHUNKS {
                return Err(format!(
                    "chunk {chunk_no} of class {class_no}: out of range"
                ));
            }
            let class = &mut self.classes[class_no];
            if class.chunks.len() <= chunk_no as usize {
                class.chunks.resize_with(chunk_no as usize + 1, || None);
            }
            class.chunks[chunk_no as usize] = Some(Chunk {
                data: Mem::Arena(Box::new(e)),
                owners: Vec::new(),
                used: 0,
                free_head: NIL,
                listed: false,
            });
        }
        for (len, addr, owner) in slots {
            if !(1..=PAGE_SIZE).contains(&len) {
                return Err(format!("slot {addr:#x}: length {len}"));
            }
            let class_no = class_of(len);
            let per_chunk = slots_per_chunk(class_no);
            let slot = (addr & SLOT_MASK) as usize;
            let chunk = self.classes[class_no]
                .chunks
                .get_mut((addr >> SLOT_BITS) as usize)
                .and_then(Option::as_mut)
                .filter(|_| slot < per_chunk)
                .ok_or_else(|| format!("slot {addr:#x} of class {class_no}: no such chunk"))?;
            if chunk.owners.len() <= slot {
                chunk.owners.resize(slot + 1, NIL);
            }
            if chunk.owners[slot] != NIL {
                return Err(format!("slot {addr:#x} of class {class_no}: taken twice"));
            }
            chunk.owners[slot] = owner;
            chunk.used += 1;
        }
        for class_no in 0..NUM_CLASSES {
            let size = class_size(class_no);
            let per_chunk = slots_per_chunk(class_no) as u32;
            for n in 0..self.classes[class_no].chunks.len() {
                let class = &mut self.classes[class_no];
                let Some(chunk) = class.chunks[n].as_mut() else {
                    continue;
                };
                if chunk.used == 0 {
                    // Dropping the extent unlists and punches it.
                    class.chunks[n] = None;
                    continue;
                }
                // Above the bump the slab expects zeroes (and counts no
                // memory): an earlier process may have written there.
                let bump_bytes = chunk.bump() as usize * size;
                if let Mem::Arena(e) = &mut chunk.data {
                    e.zero_from(bump_bytes).map_err(|e| e.to_string())?;
                }
                for slot in (0..chunk.bump()).rev() {
                    if chunk.owners[slot as usize] == NIL {
                        chunk.push_free(slot, size);
                        class.holes += 1;
                    }
                }
                class.used += u64::from(chunk.used);
                if chunk.used < per_chunk {
                    chunk.listed = true;
                    class.avail.push(n as u32);
                }
                self.touched += u64::from(chunk.bump()) * size as u64;
                self.live += u64::from(chunk.used) * size as u64;
                self.owner_bytes += chunk.owners.capacity() as u64 * 4;
                self.chunks += 1;
            }
            let class = &mut self.classes[class_no];
            while matches!(class.chunks.last(), Some(None)) {
                class.chunks.pop();
            }
            class.spare = (0..class.chunks.len() as u32)
                .filter(|&n| class.chunks[n as usize].is_none())
                .collect();
        }
        Ok(())
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // Chunks still in use hold stored pages: they stay listed in the
        // arena for the next open. (Emptied chunks were given back when
        // their last slot was freed.)
        for class in &mut self.classes {
            for chunk in class.chunks.drain(..).flatten() {
                if let Mem::Arena(e) = chunk.data {
                    (*e).keep();
                }
            }
        }
    }
}

/// Gives back a list's spare capacity once it is mostly unused.
fn shrink_list<T>(v: &mut Vec<T>) {
    if v.capacity() > 64 && v.len() * 4 < v.capacity() {
        v.shrink_to(v.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A slab and what it should hold: owner -> (len, address, fill byte).
    #[derive(Default)]
    struct Tracked {
        slab: Slab,
        held: HashMap<u32, (usize, u32, u8)>,
        next: u32,
    }

    impl Tracked {
        fn put(&mut self, len: usize, byte: u8) -> u32 {
            let owner = self.next;
            self.next += 1;
            let addr = self.slab.alloc(&vec![byte; len], owner).unwrap();
            self.held.insert(owner, (len, addr, byte));
            owner
        }

        fn drop_owner(&mut self, owner: u32) {
            let (len, addr, _) = self.held.remove(&owner).unwrap();
            let held = &mut self.held;
            self.slab.free(len, addr, |o, to| {
                held.get_mut(&o).expect("moved slot has an owner").1 = to;
            });
        }

        fn check(&self) {
            for &(len, addr, byte) in self.held.values() {
                assert!(self.slab.get(len, addr).iter().all(|&b| b == byte));
            }
            let live: u64 = self
                .held
                .values()
                .map(|&(l, _, _)| slot_bytes(l) as u64)
                .sum();
            assert_eq!(self.slab.live(), live);
            assert!(self.slab.footprint() >= live);
        }
    }

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
        let mut t = Tracked::default();
        let owners: Vec<u32> = (0..3000usize)
            .map(|i| t.put(1 + (i * 37) % PAGE_SIZE, (i % 251) as u8))
            .collect();
        t.check();
        for o in owners {
            t.drop_owner(o);
        }
        t.check();
        assert_eq!(t.slab.live(), 0);
        assert_eq!(t.slab.footprint(), 0);
        assert_eq!(t.slab.chunks(), 0);
        assert_eq!(t.slab.owner_bytes, 0);
    }

    #[test]
    fn free_slots_are_reused_before_new_chunks() {
        let mut slab = Slab::new();
        let per = slots_per_chunk(class_of(1000));
        let data = [7u8; 1000];
        let addrs: Vec<u32> = (0..per)
            .map(|i| slab.alloc(&data, i as u32).unwrap())
            .collect();
        assert_eq!(slab.chunks(), 1);
        slab.free(1000, addrs[3], |_, _| panic!("nothing to compact"));
        slab.free(1000, addrs[7], |_, _| panic!("nothing to compact"));
        let a = slab.alloc(&[1u8; 1000], 100).unwrap();
        let b = slab.alloc(&[2u8; 1000], 101).unwrap();
        assert_eq!(slab.chunks(), 1, "freed slots reused");
        let mut got = [a, b];
        got.sort_unstable();
        assert_eq!(got, [addrs[3], addrs[7]]);
        assert!(
            slab.get(1000, a).iter().all(|&x| x == 1),
            "reused slot rewritten"
        );
        assert!(slab.get(1000, addrs[0]).iter().all(|&x| x == 7));
        // The chunk is full again: the next allocation needs a new chunk.
        let c = slab.alloc(&data, 102).unwrap();
        assert_eq!(slab.chunks(), 2);
        slab.free(1000, c, |_, _| panic!("nothing to compact"));
        assert_eq!(slab.chunks(), 1, "empty chunk released");
    }

    #[test]
    fn empty_chunks_in_the_middle_are_released_and_renumbered() {
        let mut slab = Slab::new();
        let per = slots_per_chunk(class_of(4096));
        let all: Vec<u32> = (0..per * 3)
            .map(|i| slab.alloc(&[1u8; 4096], i as u32).unwrap())
            .collect();
        assert_eq!(slab.chunks(), 3);
        // Empty the middle chunk.
        for &a in &all[per..2 * per] {
            slab.free(4096, a, |_, _| {
                panic!("an emptied chunk needs no compaction")
            });
        }
        assert_eq!(slab.chunks(), 2);
        assert_eq!(slab.footprint(), 2 * (per * 4096) as u64);
        // A new chunk reuses the released number, the rest still reads back.
        let x = slab.alloc(&[9u8; 4096], 1000).unwrap();
        assert_eq!(x >> SLOT_BITS, 1);
        assert!(slab.get(4096, all[0]).iter().all(|&b| b == 1));
        assert!(slab.get(4096, x).iter().all(|&b| b == 9));
    }

    #[test]
    fn alternating_alloc_free_keeps_footprint_bounded() {
        let mut t = Tracked::default();
        let keep = t.put(200, 0);
        for _ in 0..10_000 {
            let a = t.put(200, 1);
            t.drop_owner(a);
        }
        assert_eq!(t.slab.chunks(), 1);
        assert_eq!(t.slab.footprint(), slot_bytes(200) as u64 * 2);
        t.drop_owner(keep);
        assert_eq!(t.slab.footprint(), 0);
    }

    #[test]
    fn footprint_counts_written_slots_not_reserved_chunks() {
        let mut t = Tracked::default();
        t.put(100, 3);
        assert_eq!(t.slab.footprint(), slot_bytes(100) as u64);
        t.put(100, 4);
        assert_eq!(t.slab.footprint(), 2 * slot_bytes(100) as u64);
    }

    /// The stranding pattern: fill every class, then free all but one slot
    /// of each chunk. Without compaction every chunk would stay.
    #[test]
    fn flushing_all_but_one_slot_per_chunk_strands_nothing() {
        let mut t = Tracked::default();
        let mut by_chunk: HashMap<(usize, u32), Vec<u32>> = HashMap::new();
        for class in 0..NUM_CLASSES {
            let len = class_size(class);
            for i in 0..slots_per_chunk(class) * 8 {
                let o = t.put(len, (i % 251) as u8 + 1);
                let addr = t.held[&o].1;
                by_chunk
                    .entry((class, addr >> SLOT_BITS))
                    .or_default()
                    .push(o);
            }
        }
        let full = t.slab.footprint();
        for owners in by_chunk.values() {
            for &o in &owners[1..] {
                t.drop_owner(o);
            }
        }
        t.check();
        // 8 live slots a class: each class now fits in one or two chunks
        // and keeps under COMPACT_AT bytes of holes.
        for (class_no, class) in t.slab.classes.iter().enumerate() {
            assert!(
                class.holes as usize * class_size(class_no) < COMPACT_AT,
                "class {class_no}: {} holes",
                class.holes
            );
        }
        let bound = t.slab.live() + (NUM_CLASSES * COMPACT_AT) as u64;
        assert!(
            t.slab.footprint() <= bound,
            "footprint {} > bound {bound} (was {full})",
            t.slab.footprint()
        );
        for o in t.held.keys().copied().collect::<Vec<_>>() {
            t.drop_owner(o);
        }
        assert_eq!(t.slab.footprint(), 0);
        assert_eq!(t.slab.chunks(), 0);
    }

    /// Random allocations and frees: contents and owners survive every
    /// compaction, and holes never reach the compaction threshold.
    #[test]
    fn random_churn_keeps_contents_and_bounds_holes() {
        let mut t = Tracked::default();
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut live: Vec<u32> = Vec::new();
        for round in 0..40_000u32 {
            let r = rand();
            if live.len() < 50 || r % 3 != 0 {
                let len = [64, 100, 700, 2000, 4096][(r >> 8) as usize % 5];
                live.push(t.put(len, (round % 255) as u8 + 1));
            } else {
                let i = (r >> 16) as usize % live.len();
                t.drop_owner(live.swap_remove(i));
            }
            if round % 4000 == 0 {
                t.check();
            }
            if live.len() > 3000 {
                // Flush most, keeping a scattered few.
                let keep: Vec<u32> = live.iter().copied().step_by(17).collect();
                for o in live.drain(..) {
                    if !keep.contains(&o) {
                        t.drop_owner(o);
                    }
                }
                live = keep;
                t.check();
            }
        }
        for (class_no, class) in t.slab.classes.iter().enumerate() {
            assert!(class.holes as usize * class_size(class_no) < COMPACT_AT);
        }
        t.check();
    }

    #[test]
    fn a_chunk_costs_what_it_did_before_the_arena() {
        // Heap mode's chunk tables are as large as before arena chunks
        // existed (64 bytes a chunk), so its memory bound is unchanged.
        assert_eq!(std::mem::size_of::<Option<Chunk>>(), 64);
    }

    #[test]
    fn arena_chunks_outlive_the_slab_and_are_adopted() {
        use crate::state::{Arena, StateDir};
        let top = tempfile::tempdir().unwrap();
        let p = top.path().join("state");
        let dir = StateDir::create(&p).unwrap();
        let arena = Arena::create(&dir, 64).unwrap();
        let mut slab = Slab::in_arena(arena.clone(), 3, 1);
        let mut held = Vec::new();
        for i in 0..200u32 {
            let len = 1 + (i as usize * 97) % PAGE_SIZE;
            let addr = slab.alloc(&vec![i as u8; len], i).unwrap();
            held.push((len, addr, i));
        }
        // Free every other one: holes, and chunks that stay.
        let mut kept = Vec::new();
        for (k, &(len, addr, owner)) in held.iter().enumerate() {
            if k % 2 == 0 || k >= 190 {
                slab.free(len, addr, |_, _| panic!("no compaction at this size"));
            } else {
                kept.push((len, addr, owner));
            }
        }
        drop(slab);
        drop(arena);
        drop(dir);
        let dir = StateDir::open(&p).unwrap();
        let (arena, chunks) = Arena::open(&dir).unwrap();
        assert!(chunks.iter().all(|(t, _)| t.domain == 3 && t.shard == 1));
        let mut slab = Slab::in_arena(arena.clone(), 3, 1);
        let chunks = chunks
            .into_iter()
            .map(|(t, e)| (t.class, t.chunk, e))
            .collect();
        slab.adopt(chunks, kept.iter().copied()).unwrap();
        // As a recovery ends: chunks dropped from now on are given back.
        arena.recovered();
        for &(len, addr, owner) in &kept {
            assert!(slab.get(len, addr).iter().all(|&b| b == owner as u8));
        }
        // Above each chunk's bump: zeroes, whatever the last process left.
        for (class_no, class) in slab.classes.iter().enumerate() {
            for chunk in class.chunks.iter().flatten() {
                let bump = chunk.bump() as usize * class_size(class_no);
                assert!(chunk.bytes()[bump..].iter().all(|&b| b == 0));
            }
        }
        let live: u64 = kept.iter().map(|&(l, _, _)| slot_bytes(l) as u64).sum();
        assert_eq!(slab.live(), live);
        // Reused holes and new slots work as before.
        let a = slab.alloc(&[9u8; 100], 1000).unwrap();
        assert_eq!(slab.get(100, a), &[9u8; 100][..]);
        slab.free(100, a, |_, _| {});
        for &(len, addr, _) in &kept {
            slab.free(len, addr, |_, _| {});
        }
        assert_eq!(slab.chunks(), 0);
        drop(slab);
        drop(arena);
        drop(dir);
        let dir = StateDir::open(&p).unwrap();
        let (_arena, chunks) = Arena::open(&dir).unwrap();
        assert!(chunks.is_empty(), "every emptied chunk was given back");
    }
}
