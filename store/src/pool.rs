// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pools: the handle index, the ephemeral LRU queue and page release.
//!
//! A pool's index lives under one mutex ([`Pool::index`]):
//!
//! * objects are interned: `ObjectId` (24 bytes) -> object number (`u32`);
//! * pages are kept in blocks of 16 consecutive indexes of one object
//!   ([`Block`], 88 bytes: 16 content references and the links of the
//!   object's block list), found through one pool-wide map
//!   `(object number, index / 16) -> block number`. A swap area or a file
//!   read sequentially fills its blocks, so a page costs about 6 bytes of
//!   index; a page alone in its block costs one block;
//! * ephemeral pools keep a FIFO of `(block slot, content id)` pairs, 8
//!   bytes a page, validated lazily against the slot when popped. Private
//!   ephemeral gets are exclusive, so the FIFO of puts is the LRU order;
//!   shared pools set a referenced bit on get and give such pages a second
//!   chance (CLOCK). Every 64 pushes the queue records a stamp of the store
//!   clock, which lets eviction find the pool whose oldest page is oldest.
//!
//! Content is released (and its charges returned) under the pool lock, so
//! a page's charge always leaves the account that holds it then (the pool's
//! owner); lock order is pool, then content shard.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vtmem_protocol::{ObjectId, Uuid};

use super::account::{
    self, Acct, AtomicCounters, Global, CLIENT_PAGE_COST, CONTENT_METADATA_COST, PAGE_METADATA_COST,
};
use super::content::{Corrupt, Domain, Released, ID_MASK, ZERO_REF};
use super::journal::{OpRef, Record};
use super::persist::DomainLog;
use super::Page;

/// Flag in a slot: the page was read since it was queued (shared pools).
pub const REF_BIT: u32 = 1 << 31;
/// Flag in a slot: the put found the content already stored.
pub const DEDUP_BIT: u32 = 1 << 30;
/// An unused slot. Never a valid value: zero pages never carry DEDUP_BIT.
pub const EMPTY: u32 = u32::MAX;
const NIL: u32 = u32::MAX;
/// Indexes per block.
pub const BLOCK_SLOTS: usize = 16;
const SLOT_SHIFT: u32 = 4;
/// A pool's index cannot hold another block of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexFull;

/// Most blocks an index holds: a location is a 32-bit block and slot.
const MAX_BLOCKS: usize = 1 << (32 - SLOT_SHIFT);
/// Queue pushes between two clock stamps.
const MARK_EVERY: u64 = 64;

// ---------------------------------------------------------------------------
// Keyed hasher for the index maps.

fn folded_mul(a: u64, b: u64) -> u64 {
    let r = a as u128 * b as u128;
    r as u64 ^ (r >> 64) as u64
}

/// A fast hasher keyed per store. Object ids and indexes come from guests;
/// the random key keeps them from aiming many keys at one bucket.
#[derive(Clone, Copy, Debug)]
pub struct KeyedState {
    k0: u64,
    k1: u64,
}

impl KeyedState {
    pub fn new(seed: u64) -> Self {
        KeyedState {
            k0: seed,
            k1: folded_mul(seed ^ 0x243F_6A88_85A3_08D3, 0x9E37_79B9_7F4A_7C15) | 1,
        }
    }
}

impl BuildHasher for KeyedState {
    type Hasher = KeyedHasher;
    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher {
            state: self.k0,
            k1: self.k1,
        }
    }
}

/// Hasher of [`KeyedState`] (a folded-multiply construction).
#[derive(Clone, Copy, Debug)]
pub struct KeyedHasher {
    state: u64,
    k1: u64,
}

impl Hasher for KeyedHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.state = folded_mul(self.state ^ v, 0x5851_F42D_4C95_7F2D);
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64);
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }

    fn finish(&self) -> u64 {
        folded_mul(self.state, self.k1).rotate_left((self.k1 & 63) as u32)
    }
}

/// Bytes a hashbrown table of `capacity` entries of `entry` bytes occupies.
pub fn hashmap_bytes(capacity: usize, entry: usize) -> u64 {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 {
        capacity + 1
    } else {
        capacity / 7 * 8
    };
    (buckets * (entry + 1) + 16) as u64
}

/// Bytes a hashbrown table of `capacity` entries of `entry` bytes grows by
/// when one more entry arrives, if it has no room left (`len ==
/// capacity`): its bucket count doubles.
fn hashmap_growth(len: usize, capacity: usize, entry: usize) -> u64 {
    if len < capacity {
        return 0;
    }
    let buckets = match capacity {
        0 => 2,
        c if c < 8 => c + 1,
        c => c / 7 * 8,
    };
    let grown = buckets * 2;
    let grown_capacity = if grown < 8 { grown - 1 } else { grown / 8 * 7 };
    hashmap_bytes(grown_capacity, entry) - hashmap_bytes(capacity, entry)
}

/// Bytes a `Vec` of `capacity` elements of `elem` bytes grows by when one
/// more arrives and it is full (it doubles, to at least 4).
fn vec_growth(len: usize, capacity: usize, elem: usize) -> u64 {
    if len < capacity {
        return 0;
    }
    ((capacity * 2).max(4) - capacity) as u64 * elem as u64
}

// ---------------------------------------------------------------------------
// The page index.

#[derive(Clone, Copy, Debug)]
struct Block {
    obj: u32,
    prev: u32,
    next: u32,
    used: u32,
    base: u64,
    slots: [u32; BLOCK_SLOTS],
}

const FREE_BLOCK: Block = Block {
    obj: NIL,
    prev: NIL,
    next: NIL,
    used: 0,
    base: 0,
    slots: [EMPTY; BLOCK_SLOTS],
};

#[derive(Clone, Copy, Debug)]
struct ObjEntry {
    id: ObjectId,
    head: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockKey {
    obj: u32,
    base: [u32; 2],
}

impl BlockKey {
    fn new(obj: u32, index: u64) -> Self {
        let base = index >> SLOT_SHIFT;
        BlockKey {
            obj,
            base: [base as u32, (base >> 32) as u32],
        }
    }
}

impl Hash for BlockKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.base[0] as u64 | (self.base[1] as u64) << 32);
        h.write_u32(self.obj);
    }
}

/// Maps (object, index) to a content reference.
///
/// A page's location (`loc`) is `block << 4 | slot`; it stays valid while
/// the page is stored.
#[derive(Debug)]
pub struct PageIndex {
    objects: HashMap<ObjectId, u32, KeyedState>,
    objs: Vec<ObjEntry>,
    obj_free: Vec<u32>,
    map: HashMap<BlockKey, u32, KeyedState>,
    blocks: Vec<Block>,
    block_free: u32,
    len: u64,
    /// [`MAX_BLOCKS`]; smaller in tests.
    max_blocks: usize,
}

impl PageIndex {
    pub fn new(hasher: KeyedState) -> Self {
        PageIndex {
            objects: HashMap::with_hasher(hasher),
            objs: Vec::new(),
            obj_free: Vec::new(),
            map: HashMap::with_hasher(hasher),
            blocks: Vec::new(),
            block_free: NIL,
            len: 0,
            max_blocks: MAX_BLOCKS,
        }
    }

    /// Pages held.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Objects held.
    #[cfg(test)]
    pub fn objects(&self) -> usize {
        self.objects.len()
    }

    /// The page at (object, index): its location and value.
    pub fn lookup(&self, obj: &ObjectId, index: u64) -> Option<(u32, u32)> {
        let &o = self.objects.get(obj)?;
        let &b = self.map.get(&BlockKey::new(o, index))?;
        let slot = (index as usize) % BLOCK_SLOTS;
        let v = self.blocks[b as usize].slots[slot];
        (v != EMPTY).then_some((b << SLOT_SHIFT | slot as u32, v))
    }

    /// The value at a location (EMPTY if none).
    pub fn get(&self, loc: u32) -> u32 {
        self.blocks
            .get((loc >> SLOT_SHIFT) as usize)
            .map_or(EMPTY, |b| b.slots[(loc as usize) % BLOCK_SLOTS])
    }

    /// Overwrites the value of a stored page.
    pub fn set(&mut self, loc: u32, v: u32) {
        let slot =
            &mut self.blocks[(loc >> SLOT_SHIFT) as usize].slots[(loc as usize) % BLOCK_SLOTS];
        debug_assert!(*slot != EMPTY && v != EMPTY);
        *slot = v;
    }

    /// Stores `v` at (object, index); returns its location and the value it
    /// replaced, or `None` when the index has no room for another block
    /// (locations are 32 bits: at most 2^28 blocks of 16 pages).
    pub fn insert(&mut self, obj: &ObjectId, index: u64, v: u32) -> Option<(u32, Option<u32>)> {
        debug_assert!(v != EMPTY);
        let full = self.block_free == NIL && self.blocks.len() >= self.max_blocks;
        if full
            && self
                .objects
                .get(obj)
                .is_none_or(|&o| !self.map.contains_key(&BlockKey::new(o, index)))
        {
            return None;
        }
        let o = match self.objects.get(obj) {
            Some(&o) => o,
            None => {
                let e = ObjEntry {
                    id: *obj,
                    head: NIL,
                };
                let o = match self.obj_free.pop() {
                    Some(o) => {
                        self.objs[o as usize] = e;
                        o
                    }
                    None => {
                        self.objs.push(e);
                        (self.objs.len() - 1) as u32
                    }
                };
                self.objects.insert(*obj, o);
                o
            }
        };
        let key = BlockKey::new(o, index);
        let b = match self.map.get(&key) {
            Some(&b) => b,
            None => {
                let head = self.objs[o as usize].head;
                let block = Block {
                    obj: o,
                    prev: NIL,
                    next: head,
                    used: 0,
                    base: index >> SLOT_SHIFT,
                    slots: [EMPTY; BLOCK_SLOTS],
                };
                let b = if self.block_free != NIL {
                    let b = self.block_free;
                    self.block_free = self.blocks[b as usize].next;
                    self.blocks[b as usize] = block;
                    b
                } else {
                    self.blocks.push(block);
                    (self.blocks.len() - 1) as u32
                };
                if head != NIL {
                    self.blocks[head as usize].prev = b;
                }
                self.objs[o as usize].head = b;
                self.map.insert(key, b);
                b
            }
        };
        let slot = (index as usize) % BLOCK_SLOTS;
        let block = &mut self.blocks[b as usize];
        let old = std::mem::replace(&mut block.slots[slot], v);
        let loc = b << SLOT_SHIFT | slot as u32;
        if old == EMPTY {
            block.used += 1;
            self.len += 1;
            Some((loc, None))
        } else {
            Some((loc, Some(old)))
        }
    }

    /// Bytes the index's tables would grow by to store a new page at
    /// (object, index): what a put must find room for before it starts.
    pub fn insert_growth(&self, obj: &ObjectId, index: u64) -> u64 {
        let mut grow = 0;
        let o = self.objects.get(obj).copied();
        if o.is_none() {
            grow += hashmap_growth(
                self.objects.len(),
                self.objects.capacity(),
                std::mem::size_of::<(ObjectId, u32)>(),
            );
            if self.obj_free.is_empty() {
                grow += vec_growth(
                    self.objs.len(),
                    self.objs.capacity(),
                    std::mem::size_of::<ObjEntry>(),
                );
            }
        }
        if o.is_none_or(|o| !self.map.contains_key(&BlockKey::new(o, index))) {
            grow += hashmap_growth(
                self.map.len(),
                self.map.capacity(),
                std::mem::size_of::<(BlockKey, u32)>(),
            );
            if self.block_free == NIL {
                grow += vec_growth(
                    self.blocks.len(),
                    self.blocks.capacity(),
                    std::mem::size_of::<Block>(),
                );
            }
        }
        grow
    }

    /// Removes the page at `loc` and returns its value.
    pub fn take(&mut self, loc: u32) -> u32 {
        let b = loc >> SLOT_SHIFT;
        let block = &mut self.blocks[b as usize];
        let v = std::mem::replace(&mut block.slots[(loc as usize) % BLOCK_SLOTS], EMPTY);
        debug_assert!(v != EMPTY);
        block.used -= 1;
        self.len -= 1;
        if block.used == 0 {
            self.free_block(b);
        }
        v
    }

    fn free_block(&mut self, b: u32) {
        let Block {
            obj,
            prev,
            next,
            base,
            ..
        } = self.blocks[b as usize];
        if prev != NIL {
            self.blocks[prev as usize].next = next;
        } else {
            self.objs[obj as usize].head = next;
        }
        if next != NIL {
            self.blocks[next as usize].prev = prev;
        }
        self.map.remove(&BlockKey::new(obj, base << SLOT_SHIFT));
        self.blocks[b as usize] = Block {
            next: self.block_free,
            ..FREE_BLOCK
        };
        self.block_free = b;
        if self.objs[obj as usize].head == NIL {
            let id = self.objs[obj as usize].id;
            self.objects.remove(&id);
            self.obj_free.push(obj);
        }
        if self.len == 0 {
            self.reset();
        } else {
            shrink_map(&mut self.map);
            shrink_map(&mut self.objects);
        }
    }

    /// Passes up to `max` pages to `f` (object, index, value), in block
    /// order from block `from`; returns the block to go on from, or `None`
    /// once every block was seen. A page stored or removed between calls
    /// may be seen or not; none is seen twice unless it was stored again.
    pub fn visit(
        &self,
        from: u32,
        max: usize,
        mut f: impl FnMut(&ObjectId, u64, u32),
    ) -> Option<u32> {
        let mut seen = 0;
        let mut b = from as usize;
        while b < self.blocks.len() {
            let block = &self.blocks[b];
            if block.obj != NIL {
                if seen >= max {
                    return Some(b as u32);
                }
                let id = &self.objs[block.obj as usize].id;
                for (slot, &v) in block.slots.iter().enumerate() {
                    if v != EMPTY {
                        f(id, block.base << SLOT_SHIFT | slot as u64, v);
                        seen += 1;
                    }
                }
            }
            b += 1;
        }
        None
    }

    /// Removes every page of one object, passing each location and value
    /// to `f`.
    pub fn drain_object(&mut self, obj: &ObjectId, mut f: impl FnMut(u32, u32)) -> u64 {
        let Some(&o) = self.objects.get(obj) else {
            return 0;
        };
        let mut n = 0;
        // `take` frees each block with its last page, the object with its
        // last block, and every table with the pool's last page.
        while self.len > 0 && self.objs[o as usize].head != NIL {
            let b = self.objs[o as usize].head;
            for slot in 0..BLOCK_SLOTS as u32 {
                if self.blocks[b as usize].slots[slot as usize] != EMPTY {
                    let loc = b << SLOT_SHIFT | slot;
                    f(loc, self.take(loc));
                    n += 1;
                    if self.len == 0 {
                        return n;
                    }
                }
            }
        }
        n
    }

    /// Removes every page, passing each location and value to `f`; frees
    /// all tables.
    pub fn drain_all(&mut self, mut f: impl FnMut(u32, u32)) -> u64 {
        let mut n = 0;
        for (b, block) in self.blocks.iter().enumerate() {
            if block.obj != NIL {
                for (slot, &v) in block.slots.iter().enumerate() {
                    if v != EMPTY {
                        f((b as u32) << SLOT_SHIFT | slot as u32, v);
                        n += 1;
                    }
                }
            }
        }
        self.reset();
        n
    }

    fn reset(&mut self) {
        let hasher = *self.map.hasher();
        *self = PageIndex::new(hasher);
    }

    /// Bytes of the index's tables.
    pub fn metadata_bytes(&self) -> u64 {
        hashmap_bytes(
            self.objects.capacity(),
            std::mem::size_of::<(ObjectId, u32)>(),
        ) + hashmap_bytes(self.map.capacity(), std::mem::size_of::<(BlockKey, u32)>())
            + (self.objs.capacity() * std::mem::size_of::<ObjEntry>()
                + self.obj_free.capacity() * 4
                + self.blocks.capacity() * std::mem::size_of::<Block>()) as u64
    }
}

fn shrink_map<K: Eq + Hash, V>(m: &mut HashMap<K, V, KeyedState>) {
    if m.capacity() > 64 && m.len() * 4 < m.capacity() {
        m.shrink_to(m.len() * 2);
    }
}

// ---------------------------------------------------------------------------
// The ephemeral queue.

/// FIFO of `(location, content id)` entries with clock stamps.
#[derive(Debug, Default)]
pub struct LruQueue {
    q: VecDeque<[u32; 2]>,
    /// (sequence number of the first entry it covers, clock stamp)
    marks: VecDeque<(u64, u64)>,
    pushed: u64,
    popped: u64,
}

impl LruQueue {
    pub fn push(&mut self, loc: u32, id: u32, clock: &AtomicU64) {
        let need_mark = self
            .marks
            .back()
            .is_none_or(|&(seq, _)| self.pushed - seq >= MARK_EVERY);
        if need_mark {
            self.marks
                .push_back((self.pushed, clock.fetch_add(1, Ordering::Relaxed)));
        }
        self.q.push_back([loc, id]);
        self.pushed += 1;
    }

    pub fn pop(&mut self) -> Option<[u32; 2]> {
        let e = self.q.pop_front()?;
        self.popped += 1;
        while self.marks.len() >= 2 && self.marks[1].0 <= self.popped {
            self.marks.pop_front();
        }
        Some(e)
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Bytes the queue would grow by with one more entry.
    pub fn push_growth(&self) -> u64 {
        vec_growth(self.q.len(), self.q.capacity(), 8)
    }

    /// Clock stamp of the oldest entry (u64::MAX if empty).
    pub fn head_stamp(&self) -> u64 {
        if self.q.is_empty() {
            u64::MAX
        } else {
            self.marks.front().map_or(u64::MAX, |m| m.1)
        }
    }

    /// Keeps only entries for which `valid` holds (order kept).
    pub fn retain(&mut self, mut valid: impl FnMut([u32; 2]) -> bool) {
        let stamp = self.marks.front().map_or(0, |m| m.1);
        self.q.retain(|&e| valid(e));
        self.q.shrink_to(self.q.len() * 2);
        // Stamps become coarser: the survivors all get the oldest one.
        self.marks.clear();
        self.popped = 0;
        self.pushed = self.q.len() as u64;
        if !self.q.is_empty() {
            self.marks.push_back((0, stamp));
        }
    }

    pub fn clear(&mut self) {
        *self = LruQueue::default();
    }

    pub fn metadata_bytes(&self) -> u64 {
        (self.q.capacity() * 8 + self.marks.capacity() * 16) as u64
    }
}

// ---------------------------------------------------------------------------
// Pools.

/// Gauges of what a pool holds, kept under its lock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    pub pages: u64,
    /// Bytes charged for the pages (data slots + fixed per-page cost).
    pub bytes: u64,
    pub zero: u64,
    pub same: u64,
    pub dedup: u64,
}

impl Gauges {
    /// Counts one page in (`add`) or out.
    fn count(&mut self, value: u32, pattern: bool, bytes: u64, add: bool) {
        let step = |g: &mut u64, n: u64| {
            if add {
                *g += n
            } else {
                *g -= n
            }
        };
        step(&mut self.pages, 1);
        step(&mut self.bytes, bytes);
        if value & ID_MASK == ZERO_REF {
            step(&mut self.zero, 1);
        } else if pattern {
            step(&mut self.same, 1);
        }
        if value & DEDUP_BIT != 0 {
            step(&mut self.dedup, 1);
        }
    }

    /// Moves everything counted in `from` here.
    pub fn absorb(&mut self, from: &Gauges) {
        self.pages += from.pages;
        self.bytes += from.bytes;
        self.zero += from.zero;
        self.same += from.same;
        self.dedup += from.dedup;
    }
}

/// A member of a shared pool that writes to it: the account its pages are
/// charged to and what they are.
#[derive(Debug)]
pub struct Writer {
    pub acct: Arc<Acct>,
    pub gauges: Gauges,
}

/// Who wrote each page of a shared pool. Each member that puts gets a
/// writer slot (kept while it stays a member); every page records its
/// writer's slot, and its charge goes to that member, not to the pool's
/// owner: a member's writes count against its own quota and weighted
/// share.
#[derive(Debug, Default)]
pub struct Writers {
    /// Per index block, the writer slot of each of its pages.
    by_block: Vec<[u16; BLOCK_SLOTS]>,
    slots: Vec<Option<Writer>>,
}

impl Writers {
    /// The slot of `acct`, given one if it has none; `None` only if every
    /// one of 2^16 slots is taken.
    pub fn slot_of(&mut self, acct: &Arc<Acct>) -> Option<u16> {
        if let Some(i) = self
            .slots
            .iter()
            .position(|w| w.as_ref().is_some_and(|w| Arc::ptr_eq(&w.acct, acct)))
        {
            return Some(i as u16);
        }
        let writer = Some(Writer {
            acct: acct.clone(),
            gauges: Gauges::default(),
        });
        if let Some(i) = self.slots.iter().position(Option::is_none) {
            self.slots[i] = writer;
            return Some(i as u16);
        }
        if self.slots.len() > u16::MAX as usize {
            return None;
        }
        self.slots.push(writer);
        Some((self.slots.len() - 1) as u16)
    }

    /// The slot of an existing writer.
    pub fn find(&self, acct: &Acct) -> Option<u16> {
        self.slots
            .iter()
            .position(|w| w.as_ref().is_some_and(|w| std::ptr::eq(&*w.acct, acct)))
            .map(|i| i as u16)
    }

    fn at(&self, loc: u32) -> u16 {
        self.by_block
            .get((loc >> SLOT_SHIFT) as usize)
            .map_or(0, |b| b[(loc as usize) % BLOCK_SLOTS])
    }

    fn set(&mut self, loc: u32, slot: u16) {
        let b = (loc >> SLOT_SHIFT) as usize;
        if self.by_block.len() <= b {
            self.by_block.resize(b + 1, [0; BLOCK_SLOTS]);
        }
        self.by_block[b][(loc as usize) % BLOCK_SLOTS] = slot;
    }

    pub fn writer(&self, slot: u16) -> Option<&Writer> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    fn metadata_bytes(&self) -> u64 {
        (self.by_block.capacity() * std::mem::size_of::<[u16; BLOCK_SLOTS]>()
            + self.slots.capacity() * std::mem::size_of::<Option<Writer>>()) as u64
    }
}

/// What a pool's lock protects.
#[derive(Debug)]
pub struct PoolIndex {
    /// Set once the pool is gone; late operations must undo themselves.
    pub destroyed: bool,
    /// The account the pages are charged to.
    pub owner: Arc<Acct>,
    /// Clients that have the pool open (shared pools; the owner first).
    pub members: Vec<Arc<Acct>>,
    pub pages: PageIndex,
    pub queue: LruQueue,
    pub gauges: Gauges,
    /// Excess of the index over its pages' metadata charge, as last
    /// charged to the owner and the host ([`Pool::settle`]).
    pub overhead: u64,
    /// Shared pools: who wrote each page (and is charged for it).
    pub writers: Option<Writers>,
    /// Exclusive gets' removals not yet settled, by handle (rule 5): how
    /// many, and the value the last one took (what the journal still
    /// holds for the handle, unless a later put replaced it).
    pub taken: HashMap<(ObjectId, u64), (u32, u32)>,
    /// Reserved puts that took their page of the reservation and have not
    /// yet written their `PUT` record (or given up): a `RESERVE` record
    /// counts them as unspent, since each one's `PUT` spends its page.
    pub pending_reserved: u64,
}

/// Bytes of a pool's index that are never charged as overhead: the first
/// allocations of its tables, which every pool makes.
pub const POOL_BASE_COST: u64 = 4096;

/// Result of releasing pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Freed {
    pub pages: u64,
    /// Bytes returned to the host limit.
    pub host: u64,
    /// Bytes returned to the owner's quota.
    pub client: u64,
}

impl Freed {
    /// A target: stop after `pages` pages, or once `client` bytes of the
    /// owner's charge or `host` bytes of the host charge are freed.
    pub fn want(pages: u64, client: u64, host: u64) -> Self {
        Freed {
            pages,
            client,
            host,
        }
    }

    /// Whether these freed amounts meet the target `want`.
    pub fn covers(&self, want: &Freed) -> bool {
        self.pages >= want.pages || self.client >= want.client || self.host >= want.host
    }

    pub fn add(&mut self, o: Freed) {
        self.pages += o.pages;
        self.host += o.host;
        self.client += o.client;
    }
}

/// What a get found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Got {
    Miss,
    Hit,
    /// A hit whose removal (value here) is still to settle.
    Taken(u32),
}

/// Where a pool's records go, with a crash-safe state.
#[derive(Debug, Clone)]
pub struct PoolLog {
    pub log: Arc<DomainLog>,
    /// The owner's durable number.
    pub client: u32,
    /// The pool's id.
    pub pool: u8,
}

/// One pool.
#[derive(Debug)]
pub struct Pool {
    /// Its journal (private pools of a store with a crash-safe state).
    pub journal: Option<PoolLog>,
    pub persistent: bool,
    pub exclusive_gets: bool,
    pub shared: Option<Uuid>,
    pub domain: Arc<Domain>,
    /// Pages reserved and not yet spent.
    pub reserved: AtomicU64,
    /// Stamp of the oldest queued page (u64::MAX if none).
    pub head_stamp: AtomicU64,
    pub counters: AtomicCounters,
    pub index: Mutex<PoolIndex>,
}

/// Charge facts of a page about to be stored.
#[derive(Clone, Copy, Debug)]
pub struct NewPage {
    pub value: u32,
    pub client_cost: u64,
    pub pattern: bool,
    /// The put spent a page of the reservation.
    pub reserved: bool,
    /// Write its `PUT` record (not for a page recovered from one).
    pub log: bool,
}

/// The writer slot of the page at `loc` (shared pools).
fn writer_at(idx: &PoolIndex, loc: u32) -> Option<u16> {
    idx.writers.as_ref().map(|w| w.at(loc))
}

impl Pool {
    pub fn new(
        persistent: bool,
        exclusive_gets: bool,
        shared: Option<Uuid>,
        domain: Arc<Domain>,
        owner: Arc<Acct>,
        hasher: KeyedState,
        journal: Option<PoolLog>,
    ) -> Self {
        Pool {
            journal,
            persistent,
            exclusive_gets,
            shared,
            domain,
            reserved: AtomicU64::new(0),
            head_stamp: AtomicU64::new(u64::MAX),
            counters: AtomicCounters::default(),
            index: Mutex::new(PoolIndex {
                destroyed: false,
                members: vec![owner.clone()],
                owner,
                pages: PageIndex::new(hasher),
                queue: LruQueue::default(),
                gauges: Gauges::default(),
                overhead: 0,
                writers: shared.is_some().then(Writers::default),
                pending_reserved: 0,
                taken: HashMap::new(),
            }),
        }
    }

    pub fn lock(&self) -> parking_lot::MutexGuard<'_, PoolIndex> {
        self.index.lock()
    }

    /// The journal page records of this pool go to: persistent pools of a
    /// store with a crash-safe state.
    fn page_log(&self) -> Option<&PoolLog> {
        self.journal.as_ref().filter(|_| self.persistent)
    }

    /// Writes a page record made by `f` (under the pool's lock).
    #[inline]
    fn log_page(&self, f: impl FnOnce(u32, u8) -> Record) {
        if let Some(j) = self.page_log() {
            j.log.append(&f(j.client, j.pool));
        }
    }

    /// Writes the pool's reservation total (under its lock, after the
    /// change): what is unspent plus what reserved puts in flight took.
    /// `asked`: the request's `RESERVE` (`false`) or `UNRESERVE` (`true`)
    /// that made the change, and its answer. Whether a record was written.
    pub fn log_reserve(&self, idx: &PoolIndex, asked: Option<(OpRef, bool, u64)>) -> bool {
        let Some(j) = self.page_log() else {
            return false;
        };
        let (op, unreserve, answer) = match asked {
            Some((op, unreserve, answer)) => (Some(op), unreserve, answer),
            None => (None, false, 0),
        };
        j.log.append(&Record::Reserve {
            client: j.client,
            pool: j.pool,
            total: self.reserved.load(Ordering::Acquire) + idx.pending_reserved,
            op,
            unreserve,
            answer,
        });
        true
    }

    /// A reserved put takes one page of the reservation (under the pool's
    /// lock, so that `RESERVE` records count it); false if none is left.
    pub fn take_reserved_page(&self) -> bool {
        if self.page_log().is_none() {
            return self
                .reserved
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1))
                .is_ok();
        }
        let mut idx = self.lock();
        let took = self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1))
            .is_ok();
        if took {
            idx.pending_reserved += 1;
        }
        took
    }

    /// A reserved put that took its page gave up before storing: the page
    /// is spent all the same (as it always was), and recorded so.
    pub fn reserved_put_failed(&self) {
        if self.page_log().is_none() {
            return;
        }
        let mut idx = self.lock();
        idx.pending_reserved = idx.pending_reserved.saturating_sub(1);
        self.log_reserve(&idx, None);
    }

    fn publish_head(&self, idx: &PoolIndex) {
        self.head_stamp
            .store(idx.queue.head_stamp(), Ordering::Relaxed);
    }

    /// What the index holds beyond [`PAGE_METADATA_COST`] a page and
    /// [`POOL_BASE_COST`].
    pub fn excess(idx: &PoolIndex) -> u64 {
        let real = idx.pages.metadata_bytes()
            + idx.queue.metadata_bytes()
            + idx.writers.as_ref().map_or(0, Writers::metadata_bytes);
        let charged = idx.pages.len() * PAGE_METADATA_COST + POOL_BASE_COST;
        real.saturating_sub(charged)
    }

    /// Bytes storing a new page at (object, index) would add to the
    /// index's tables right now (an estimate: other puts may get there
    /// first).
    pub fn insert_growth(&self, obj: &ObjectId, index: u64) -> u64 {
        let idx = self.lock();
        let queue = if self.persistent {
            0
        } else {
            idx.queue.push_growth()
        };
        idx.pages.insert_growth(obj, index) + queue
    }

    /// Charges the owner and the host for what the index really holds
    /// beyond [`PAGE_METADATA_COST`] a page (a sparse index, one page per
    /// object, a queue of stale entries), or gives back what it no longer
    /// holds. Called before the lock is released by every change.
    pub fn settle(&self, idx: &mut PoolIndex, g: &Global) {
        let now = Self::excess(idx);
        let was = idx.overhead;
        if now == was {
            return;
        }
        g.overhead.moved(was, now);
        let (counter, _) = idx.owner.kind(self.persistent);
        if now > was {
            account::charge(counter, now - was);
        } else {
            account::uncharge(counter, was - now);
        }
        idx.overhead = now;
    }

    /// Records a new page (its charges were taken by the caller). Returns
    /// what the replaced page, if any, gave back.
    pub fn store_locked(
        &self,
        idx: &mut PoolIndex,
        obj: &ObjectId,
        index: u64,
        page: NewPage,
        writer: &Arc<Acct>,
        g: &Global,
    ) -> Result<Freed, IndexFull> {
        let slot = match idx.writers.as_mut() {
            Some(w) => Some(w.slot_of(writer).ok_or(IndexFull)?),
            None => None,
        };
        let (loc, old) = idx.pages.insert(obj, index, page.value).ok_or(IndexFull)?;
        // Rules 2 and 3: recorded under the lock, before the answer and
        // before the replaced content is released.
        if page.reserved {
            idx.pending_reserved = idx.pending_reserved.saturating_sub(1);
        }
        if page.log {
            self.log_page(|client, pool| Record::Put {
                client,
                pool,
                object: *obj,
                index,
                content: page.value & ID_MASK,
                reserved: page.reserved,
            });
        }
        let old_writer = writer_at(idx, loc);
        idx.gauges
            .count(page.value, page.pattern, page.client_cost, true);
        if let (Some(w), Some(slot)) = (idx.writers.as_mut(), slot) {
            w.set(loc, slot);
            if let Some(Some(wr)) = w.slots.get_mut(slot as usize) {
                wr.gauges
                    .count(page.value, page.pattern, page.client_cost, true);
            }
        }
        if !self.persistent {
            idx.queue.push(loc, page.value & ID_MASK, &g.clock);
            self.maybe_compact(idx);
            self.publish_head(idx);
        }
        let freed = match old {
            Some(v) => self.release_value(idx, old_writer, v, g),
            None => Freed::default(),
        };
        self.settle(idx, g);
        Ok(freed)
    }

    /// Drops the queue's stale entries when they outnumber live pages.
    fn maybe_compact(&self, idx: &mut PoolIndex) {
        let live = idx.pages.len() as usize;
        if idx.queue.len() > 2 * live + 1024 {
            let PoolIndex { pages, queue, .. } = idx;
            queue.retain(|[loc, id]| {
                let v = pages.get(loc);
                v != EMPTY && v & ID_MASK == id
            });
        }
    }

    /// Releases a page value removed from the index: content reference,
    /// gauges, the charge of the account that holds it (its writer in a
    /// shared pool, the owner otherwise) and the host charge.
    pub fn release_value(
        &self,
        idx: &mut PoolIndex,
        writer: Option<u16>,
        v: u32,
        g: &Global,
    ) -> Freed {
        let rel = if v & ID_MASK == ZERO_REF {
            Released {
                data_bytes: 0,
                freed: false,
                pattern: false,
            }
        } else {
            self.domain.release(v & ID_MASK)
        };
        self.account_release(idx, writer, v, rel, g)
    }

    fn account_release(
        &self,
        idx: &mut PoolIndex,
        writer: Option<u16>,
        v: u32,
        rel: Released,
        g: &Global,
    ) -> Freed {
        let client = rel.data_bytes + CLIENT_PAGE_COST;
        let mut host = PAGE_METADATA_COST;
        if rel.freed {
            host += rel.data_bytes + CONTENT_METADATA_COST;
        }
        idx.gauges.count(v, rel.pattern, client, false);
        let by_writer = match (idx.writers.as_mut(), writer) {
            (Some(w), Some(slot)) => w.slots.get_mut(slot as usize).and_then(Option::as_mut),
            _ => None,
        };
        match by_writer {
            Some(wr) => {
                wr.gauges.count(v, rel.pattern, client, false);
                wr.acct.uncharge(self.persistent, client);
            }
            None => idx.owner.uncharge(self.persistent, client),
        }
        g.uncharge(host);
        Freed {
            pages: 1,
            host,
            client,
        }
    }

    /// Copies a page out; for exclusive pools removes it too. An exclusive
    /// get of a persistent pool with a journal removes the page from the
    /// index but neither records the removal nor releases the page: it
    /// returns [`Got::Taken`], and the caller calls [`Pool::settle_taken`]
    /// once the answer is published (rule 5: a get offered again after a
    /// crash before that finds the page).
    pub fn get_deferring(
        &self,
        obj: &ObjectId,
        index: u64,
        out: &mut Page,
        g: &Global,
    ) -> Result<Got, Corrupt> {
        let mut idx = self.lock();
        let Some((loc, v)) = idx.pages.lookup(obj, index) else {
            return Ok(Got::Miss);
        };
        let id = v & ID_MASK;
        if self.exclusive_gets && self.page_log().is_some() {
            // The page stays charged and its content referenced until the
            // removal is settled.
            idx.pages.take(loc);
            let t = idx.taken.entry((*obj, index)).or_default();
            *t = (t.0 + 1, v);
            let res = if id == ZERO_REF {
                out.fill(0);
                Ok(())
            } else {
                self.domain.read(id, out)
            };
            self.settle(&mut idx, g);
            if let Err(e) = res {
                drop(idx);
                self.settle_taken(obj, index, v, g);
                return Err(e);
            }
            return Ok(Got::Taken(v));
        }
        if self.exclusive_gets {
            idx.pages.take(loc);
            let (res, rel) = if id == ZERO_REF {
                out.fill(0);
                (
                    Ok(()),
                    Released {
                        data_bytes: 0,
                        freed: false,
                        pattern: false,
                    },
                )
            } else {
                self.domain.read_release(id, out)
            };
            let writer = writer_at(&idx, loc);
            self.account_release(&mut idx, writer, v, rel, g);
            self.publish_head(&idx);
            self.settle(&mut idx, g);
            res.map(|()| Got::Hit)
        } else {
            if id == ZERO_REF {
                out.fill(0);
            } else {
                self.domain.read(id, out)?;
            }
            if self.shared.is_some() && v & REF_BIT == 0 {
                idx.pages.set(loc, v | REF_BIT);
            }
            Ok(Got::Hit)
        }
    }

    /// Settles an exclusive get's removal ([`Got::Taken`] with the page's
    /// value `v`): records it, unless the handle holds a page again (a
    /// later put's record supersedes it) or another removal of the handle
    /// is still to settle (that one records it), then releases the page.
    pub fn settle_taken(&self, obj: &ObjectId, index: u64, v: u32, g: &Global) {
        let mut idx = self.lock();
        let last = match idx.taken.get_mut(&(*obj, index)) {
            Some((n, _)) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                idx.taken.remove(&(*obj, index));
                true
            }
        };
        // A destroyed pool's pages went with its record.
        if last && !idx.destroyed && idx.pages.lookup(obj, index).is_none() {
            self.log_page(|client, pool| Record::FlushPage {
                client,
                pool,
                object: *obj,
                index,
            });
        }
        self.release_value(&mut idx, None, v, g);
        self.settle(&mut idx, g);
    }

    /// Removes one page; true if there was one.
    pub fn remove(&self, obj: &ObjectId, index: u64, g: &Global) -> bool {
        let mut idx = self.lock();
        let Some((loc, _)) = idx.pages.lookup(obj, index) else {
            return false;
        };
        let v = idx.pages.take(loc);
        self.log_page(|client, pool| Record::FlushPage {
            client,
            pool,
            object: *obj,
            index,
        });
        let writer = writer_at(&idx, loc);
        self.release_value(&mut idx, writer, v, g);
        self.publish_head(&idx);
        self.settle(&mut idx, g);
        true
    }

    /// Removes every page of an object.
    pub fn remove_object(&self, obj: &ObjectId, g: &Global) -> u64 {
        let mut idx = self.lock();
        let mut values = Vec::new();
        let n = idx.pages.drain_object(obj, |loc, v| values.push((loc, v)));
        if n > 0 {
            self.log_page(|client, pool| Record::FlushObject {
                client,
                pool,
                object: *obj,
            });
        }
        for (loc, v) in values {
            let writer = writer_at(&idx, loc);
            self.release_value(&mut idx, writer, v, g);
        }
        self.publish_head(&idx);
        self.settle(&mut idx, g);
        n
    }

    /// Records that every page of the pool is flushed (an administrator's
    /// flush): one `FLUSH_OBJECT` per object, before the pages are
    /// released.
    pub fn log_clear(&self, idx: &PoolIndex) {
        if self.page_log().is_none() {
            return;
        }
        let mut objects = std::collections::BTreeSet::new();
        idx.pages.visit(0, usize::MAX, |o, _, _| {
            objects.insert(*o);
        });
        for object in objects {
            self.log_page(|client, pool| Record::FlushObject {
                client,
                pool,
                object,
            });
        }
    }

    /// Removes every page (the pool stays usable).
    pub fn clear_locked(&self, idx: &mut PoolIndex, g: &Global) -> Freed {
        let mut values = Vec::with_capacity(idx.pages.len() as usize);
        idx.pages.drain_all(|loc, v| values.push((loc, v)));
        idx.queue.clear();
        let mut freed = Freed::default();
        for (loc, v) in values {
            let writer = writer_at(idx, loc);
            freed.add(self.release_value(idx, writer, v, g));
        }
        self.publish_head(idx);
        self.settle(idx, g);
        freed
    }

    /// Removes the pages charged to `acct`: every page of a private pool,
    /// the pages it wrote in a shared one.
    pub fn clear_charged_to(&self, idx: &mut PoolIndex, acct: &Arc<Acct>, g: &Global) -> Freed {
        let Some(w) = idx.writers.as_ref() else {
            return if Arc::ptr_eq(&idx.owner, acct) {
                self.log_clear(idx);
                self.clear_locked(idx, g)
            } else {
                Freed::default()
            };
        };
        let Some(mine) = w.find(acct) else {
            return Freed::default();
        };
        let mut locs = Vec::new();
        for (b, slots) in w.by_block.iter().enumerate() {
            for (i, &slot) in slots.iter().enumerate() {
                let loc = (b as u32) << SLOT_SHIFT | i as u32;
                if slot == mine && idx.pages.get(loc) != EMPTY {
                    locs.push(loc);
                }
            }
        }
        let mut freed = Freed::default();
        for loc in locs {
            let v = idx.pages.take(loc);
            freed.add(self.release_value(idx, Some(mine), v, g));
        }
        self.publish_head(idx);
        self.settle(idx, g);
        freed
    }

    /// Hands the pages `leaver` wrote (shared pools) to `heir`, with their
    /// charges; returns the bytes moved.
    pub fn hand_over(&self, idx: &mut PoolIndex, leaver: &Acct, heir: &Arc<Acct>) -> u64 {
        let PoolIndex { writers, pages, .. } = idx;
        let Some(w) = writers.as_mut() else {
            return 0;
        };
        let Some(from) = w.find(leaver) else {
            return 0;
        };
        let Some(to) = w.slot_of(heir) else {
            return 0;
        };
        for (b, slots) in w.by_block.iter_mut().enumerate() {
            for (i, slot) in slots.iter_mut().enumerate() {
                let loc = (b as u32) << SLOT_SHIFT | i as u32;
                if *slot == from && pages.get(loc) != EMPTY {
                    *slot = to;
                }
            }
        }
        let Some(gone) = w.slots[from as usize].take() else {
            return 0;
        };
        if let Some(Some(h)) = w.slots.get_mut(to as usize) {
            h.gauges.absorb(&gone.gauges);
        }
        gone.acct.uncharge(self.persistent, gone.gauges.bytes);
        let (counter, _) = heir.kind(self.persistent);
        account::charge(counter, gone.gauges.bytes);
        gone.gauges.bytes
    }

    /// Drops the reservation; returns the pages it held.
    pub fn take_reservation(&self) -> u64 {
        self.reserved.swap(0, Ordering::AcqRel)
    }

    /// Evicts the oldest pages (ephemeral pools only) until `want` is met.
    ///
    /// `want.host` and the returned `host` count real memory: the charges
    /// given back, less the allocator holes the evicted pages leave, plus
    /// what compacting the holes afterwards gives back.
    ///
    /// Only pages charged to `victim` go: in a shared pool, the pages it
    /// wrote (the others are queued again, behind).
    pub fn evict(&self, want: Freed, victim: &Acct, g: &Global) -> Freed {
        let mut freed = Freed::default();
        if self.persistent {
            return freed;
        }
        let domain_before = self.domain.overhead();
        let mut idx = self.lock();
        if idx.destroyed {
            return freed;
        }
        let only = match idx.writers.as_ref() {
            Some(w) => match w.find(victim) {
                Some(slot) => Some(slot),
                None => return freed,
            },
            None => None,
        };
        let index_before = idx.overhead;
        let mut budget = want.pages * 8 + 64;
        while !freed.covers(&want) && budget > 0 {
            budget -= 1;
            let Some([loc, id]) = idx.queue.pop() else {
                break;
            };
            let v = idx.pages.get(loc);
            if v == EMPTY || v & ID_MASK != id {
                continue; // stale: flushed, taken by a get, or replaced
            }
            let writer = writer_at(&idx, loc);
            if only.is_some() && writer != only {
                // Another member's page: not the victim's to lose.
                idx.queue.push(loc, id, &g.clock);
                continue;
            }
            if v & REF_BIT != 0 {
                // Second chance for a page read since it was queued.
                idx.pages.set(loc, v & !REF_BIT);
                idx.queue.push(loc, id, &g.clock);
                continue;
            }
            idx.pages.take(loc);
            freed.add(self.release_value(&mut idx, writer, v, g));
        }
        self.publish_head(&idx);
        self.settle(&mut idx, g);
        let index_after = idx.overhead;
        drop(idx);
        if freed.pages > 0 {
            // Evicted slots are holes until their chunks are emptied:
            // give the memory back now, it is what the eviction was for.
            self.domain.reclaim();
            super::account::bump_by(&self.counters.evictions, freed.pages);
            super::account::bump_by(&victim.counters.evictions, freed.pages);
        }
        freed.host = (freed.host + domain_before + index_before)
            .saturating_sub(self.domain.overhead() + index_after);
        freed
    }

    /// Bytes of this pool's metadata.
    pub fn metadata_bytes(&self, idx: &PoolIndex) -> u64 {
        std::mem::size_of::<Self>() as u64
            + idx.pages.metadata_bytes()
            + idx.queue.metadata_bytes()
            + idx.writers.as_ref().map_or(0, Writers::metadata_bytes)
            + (idx.members.capacity() * std::mem::size_of::<Arc<Acct>>()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oid(n: u64) -> ObjectId {
        ObjectId([n, n ^ 0xff, 0])
    }

    #[test]
    fn a_full_index_refuses_instead_of_panicking() {
        let mut ix = PageIndex::new(KeyedState::new(1));
        ix.max_blocks = 2;
        assert!(ix.insert(&oid(1), 0, 1).is_some());
        assert!(ix.insert(&oid(1), 16, 2).is_some());
        // A third block does not fit; the same blocks still take pages.
        assert_eq!(ix.insert(&oid(1), 32, 3), None);
        assert_eq!(ix.insert(&oid(2), 0, 3), None);
        let (loc, old) = ix.insert(&oid(1), 1, 4).unwrap();
        assert_eq!(old, None);
        assert_eq!(ix.get(loc), 4);
        assert_eq!(ix.insert(&oid(1), 1, 5).unwrap().1, Some(4));
        // A block freed is room again.
        let loc = ix.insert(&oid(1), 16, 2).unwrap().0;
        ix.take(loc);
        assert!(ix.insert(&oid(2), 0, 6).is_some());
        assert_eq!(ix.len(), 3);
    }

    #[test]
    fn insert_lookup_replace_take() {
        let mut ix = PageIndex::new(KeyedState::new(1));
        let (loc, old) = ix.insert(&oid(1), 5, 100).unwrap();
        assert_eq!(old, None);
        assert_eq!(ix.lookup(&oid(1), 5), Some((loc, 100)));
        assert_eq!(ix.lookup(&oid(1), 6), None);
        assert_eq!(ix.lookup(&oid(2), 5), None);
        let (loc2, old) = ix.insert(&oid(1), 5, 200).unwrap();
        assert_eq!((loc2, old), (loc, Some(100)));
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.take(loc), 200);
        assert_eq!(ix.lookup(&oid(1), 5), None);
        assert_eq!(ix.len(), 0);
        assert_eq!(ix.objects(), 0);
        assert_eq!(ix.metadata_bytes(), 0, "empty index frees its tables");
    }

    #[test]
    fn blocks_and_objects_are_freed_with_their_last_page() {
        let mut ix = PageIndex::new(KeyedState::new(2));
        let mut locs = Vec::new();
        for obj in 0..10u64 {
            for i in 0..40u64 {
                locs.push((
                    obj,
                    i,
                    ix.insert(&oid(obj), i * 3, (obj * 1000 + i) as u32)
                        .unwrap()
                        .0,
                ));
            }
        }
        assert_eq!(ix.len(), 400);
        assert_eq!(ix.objects(), 10);
        // Remove all of object 3 page by page, and half of object 4.
        for &(obj, i, loc) in &locs {
            if obj == 3 || (obj == 4 && i % 2 == 0) {
                assert_eq!(ix.take(loc), (obj * 1000 + i) as u32);
            }
        }
        assert_eq!(ix.objects(), 9);
        for &(obj, i, _) in &locs {
            let expect = !(obj == 3 || (obj == 4 && i % 2 == 0));
            assert_eq!(ix.lookup(&oid(obj), i * 3).is_some(), expect, "{obj}/{i}");
        }
        let mut seen = Vec::new();
        assert_eq!(ix.drain_object(&oid(4), |_, v| seen.push(v)), 20);
        assert!(seen.iter().all(|v| v / 1000 == 4));
        assert_eq!(ix.objects(), 8);
        let n = ix.drain_all(|_, _| {});
        assert_eq!(n, 320);
        assert_eq!(ix.len(), 0);
        // Draining the last object empties (and frees) the whole index.
        for i in 0..40u64 {
            ix.insert(&oid(9), i, 1).unwrap();
        }
        assert_eq!(ix.drain_object(&oid(9), |_, _| {}), 40);
        assert_eq!(ix.len(), 0);
        assert_eq!(ix.metadata_bytes(), 0);
    }

    #[test]
    fn sparse_and_huge_indexes() {
        let mut ix = PageIndex::new(KeyedState::new(3));
        let idxs = [
            0u64,
            15,
            16,
            u32::MAX as u64,
            u64::MAX,
            u64::MAX - 15,
            1 << 40,
        ];
        for (k, &i) in idxs.iter().enumerate() {
            ix.insert(&oid(7), i, k as u32).unwrap();
        }
        for (k, &i) in idxs.iter().enumerate() {
            assert_eq!(ix.lookup(&oid(7), i).map(|x| x.1), Some(k as u32), "{i}");
        }
        assert_eq!(ix.drain_object(&oid(7), |_, _| {}), idxs.len() as u64);
    }

    #[test]
    fn dense_pages_cost_little_index() {
        let mut ix = PageIndex::new(KeyedState::new(4));
        for i in 0..16_384u64 {
            ix.insert(&oid(1), i, 1).unwrap();
        }
        let per_page = ix.metadata_bytes() as f64 / 16_384.0;
        assert!(per_page < 12.0, "{per_page} bytes per page");
    }

    #[test]
    fn queue_is_fifo_with_monotonic_stamps() {
        let clock = AtomicU64::new(0);
        let mut q = LruQueue::default();
        assert_eq!(q.head_stamp(), u64::MAX);
        for i in 0..200u32 {
            q.push(i, i, &clock);
        }
        let s0 = q.head_stamp();
        for i in 0..130u32 {
            assert_eq!(q.pop(), Some([i, i]));
        }
        assert!(q.head_stamp() > s0, "stamp advances as old entries leave");
        q.retain(|[l, _]| l % 2 == 0);
        assert_eq!(q.pop(), Some([130, 130]));
        assert_eq!(q.pop(), Some([132, 132]));
        q.clear();
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn keyed_hasher_depends_on_key() {
        let a = KeyedState::new(1).hash_one(oid(5));
        let b = KeyedState::new(2).hash_one(oid(5));
        let c = KeyedState::new(1).hash_one(oid(6));
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn hashmap_bytes_matches_hashbrown_capacity_rule() {
        let mut m: HashMap<u64, u64, KeyedState> = HashMap::with_hasher(KeyedState::new(0));
        assert_eq!(hashmap_bytes(m.capacity(), 16), 0);
        for i in 0..100 {
            m.insert(i, i);
        }
        // 100 entries need 128 buckets (capacity 112).
        assert_eq!(m.capacity(), 112);
        assert_eq!(hashmap_bytes(m.capacity(), 16), 128 * 17 + 16);
    }
}
