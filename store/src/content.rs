// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Stored contents: classification, compression and deduplication.
//!
//! A [`Domain`] is one deduplication scope (one client, one dedup group, or
//! one shared pool). It is split into shards chosen by content hash; each
//! shard has its own lock, content table, dedup index and slab allocator,
//! so puts of different contents rarely contend.
//!
//! * The content table is an array of 28-byte [`Entry`]s in blocks of
//!   [`ENTRY_BLOCK`], with an intrusive free list; an entry is named by a
//!   [`ContentRef`] (`u32`: shard and entry number) and reference-counted by
//!   the pages that point to it.
//! * The dedup index is an open-addressing table of entry numbers (4 bytes a
//!   slot, linear probing, backward-shift deletion), keyed by the content's
//!   seeded xxh3-128 hash, which the entry itself holds.
//! * A hash match is never trusted: the candidate is decompressed (or read)
//!   and compared byte for byte with the new page, so a hash collision can
//!   only cost a comparison, never return another page's data.
//! * Same-filled pages (every 64-bit word equal) that are not zero are
//!   entries with no data: the pattern is kept in the entry. All-zero pages
//!   need no entry at all ([`ZERO_REF`]).
//! * Other pages are compressed with LZ4 into a fixed buffer; if the result
//!   is larger than [`RAW_THRESHOLD`] (7/8 of a page, zcache2's threshold:
//!   past it the saving does not pay for the decompression) the page is
//!   stored raw.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vtmem_protocol::PAGE_SIZE;
use xxhash_rust::xxh3::xxh3_128_with_seed;

use super::account::{Overhead, CONTENT_METADATA_COST};
use super::alloc::{slot_bytes, Slab};
use super::journal::{Form, Record};
use super::persist::DomainLog;
use super::state::Arena;
use super::Page;

/// Compressed pages larger than this are stored raw (7/8 of a page).
pub const RAW_THRESHOLD: usize = PAGE_SIZE * 7 / 8;
/// Output buffer LZ4 needs for one page (its worst-case expansion).
pub const LZ4_BOUND: usize = lz4_flex::block::get_maximum_output_size(PAGE_SIZE);
/// Entries per block of the content table.
pub const ENTRY_BLOCK: usize = 128;

/// Reference to stored content, as kept in a page index slot.
///
/// Bits 0..30 name the content (`ZERO_REF` or shard and entry number); bits
/// 30 and 31 are flags owned by the page index.
pub type ContentRef = u32;
/// Bits of a [`ContentRef`] that name the content.
pub const ID_MASK: u32 = (1 << 30) - 1;
/// The all-zero page: no entry, no data.
pub const ZERO_REF: ContentRef = ID_MASK;
/// Bits of a content id that name the entry within its shard.
pub(crate) const ENTRY_BITS: u32 = 26;
const ENTRY_MASK: u32 = (1 << ENTRY_BITS) - 1;
/// Largest number of shards a domain may have.
pub const MAX_SHARDS: usize = 1 << (30 - ENTRY_BITS);
const NIL: u32 = u32::MAX;

/// What a page holds, decided before any hashing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Every byte zero.
    Zero,
    /// Every 64-bit word equal to this (non-zero) value.
    Same(u64),
    /// Anything else.
    Data,
}

/// Classifies a page: zero, same-filled or data.
pub fn classify(page: &Page) -> Class {
    let mut words = page.chunks_exact(8).map(|w| {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        u64::from_le_bytes(b)
    });
    let first = words.next().unwrap_or(0);
    if words.all(|w| w == first) {
        if first == 0 {
            Class::Zero
        } else {
            Class::Same(first)
        }
    } else {
        Class::Data
    }
}

/// Fills `out` with the 64-bit `pattern`.
pub fn fill_pattern(out: &mut Page, pattern: u64) {
    let bytes = pattern.to_le_bytes();
    for w in out.chunks_exact_mut(8) {
        w.copy_from_slice(&bytes);
    }
}

/// Compresses `page` into `buf`; `None` if it should be stored raw.
pub fn compress(page: &Page, buf: &mut [u8; LZ4_BOUND]) -> Option<usize> {
    match lz4_flex::block::compress_into(page, buf) {
        Ok(n) if n <= RAW_THRESHOLD => Some(n),
        _ => None,
    }
}

/// How an entry's data is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Free = 0,
    Lz4 = 1,
    Raw = 2,
    Pattern = 3,
}

/// Lookup key of a content: its seeded 128-bit hash (data) or a mixed form
/// of the pattern followed by the pattern itself (same-filled pages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    words: [u32; 4],
    kind: Kind,
}

impl Key {
    fn bucket_hash(&self) -> u64 {
        self.words[0] as u64 | (self.words[1] as u64) << 32
    }

    fn shard_hash(&self) -> u32 {
        // Bits 32..63 of the seeded hash: the top bits pick the shard, the
        // low bits of word 0 pick the index bucket.
        self.words[1]
    }

    fn pattern(&self) -> u64 {
        self.words[2] as u64 | (self.words[3] as u64) << 32
    }
}

/// One content-table entry: 28 bytes.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// The key's words.
    hash: [u32; 4],
    /// Pages that point here; 0 = free.
    refs: u32,
    /// Slab address (Lz4, Raw) or next free entry (Free).
    loc: u32,
    /// Stored bytes (Lz4, Raw).
    len: u16,
    kind: Kind,
    /// With a crash-safe state: its `CONTENT` or `PATTERN` record is
    /// written (a persistent page references it or did).
    logged: bool,
}

const FREE_ENTRY: Entry = Entry {
    hash: [0; 4],
    refs: 0,
    loc: NIL,
    len: 0,
    kind: Kind::Free,
    logged: false,
};

impl Entry {
    fn key(&self) -> Key {
        Key {
            words: self.hash,
            kind: self.kind,
        }
    }

    /// Client-chargeable data bytes: the slot size, 0 for a pattern.
    fn data_bytes(&self) -> u64 {
        match self.kind {
            Kind::Lz4 | Kind::Raw => slot_bytes(self.len as usize) as u64,
            Kind::Pattern | Kind::Free => 0,
        }
    }
}

/// Data to store for a new content.
#[derive(Clone, Copy, Debug)]
pub enum NewData<'a> {
    /// LZ4-compressed bytes.
    Lz4(&'a [u8]),
    /// The page itself.
    Raw,
    /// No data: a same-filled page.
    Pattern,
}

impl NewData<'_> {
    /// Bytes of the slot this data takes (0 for a pattern).
    pub fn slot_bytes(&self) -> u64 {
        match self {
            NewData::Lz4(b) => slot_bytes(b.len()) as u64,
            NewData::Raw => PAGE_SIZE as u64,
            NewData::Pattern => 0,
        }
    }

    /// Bytes written to the allocator.
    pub fn stored_bytes(&self) -> u64 {
        match self {
            NewData::Lz4(b) => b.len() as u64,
            NewData::Raw => PAGE_SIZE as u64,
            NewData::Pattern => 0,
        }
    }
}

/// Outcome of [`Domain::insert`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// A new entry holds the data.
    New(ContentRef),
    /// Equal content was already held (by a put that raced this one); one
    /// more reference was taken on it and nothing was stored.
    Existing(ContentRef, u64),
}

/// What dropping a reference released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Released {
    /// Client-chargeable data bytes of the content.
    pub data_bytes: u64,
    /// The last reference went: the content and its slot were freed.
    pub freed: bool,
    /// The content is a same-filled pattern.
    pub pattern: bool,
}

/// Stored content as it is kept, for moving it without recompression
/// (a VM's device state).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored<'a> {
    /// Every 64-bit word equal to this value.
    Pattern(u64),
    /// LZ4-compressed bytes of a page.
    Lz4(&'a [u8]),
    /// The page itself.
    Raw(&'a [u8]),
}

/// Reading stored content failed: a store bug, never a guest's doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Corrupt;

/// Per-shard sizes for statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainStats {
    /// Live data entries (Lz4 or Raw).
    pub data_entries: u64,
    /// Live pattern entries.
    pub pattern_entries: u64,
    /// Of the data entries, those stored raw.
    pub raw_entries: u64,
    /// Bytes of live slots.
    pub slot_bytes: u64,
    /// Bytes held by the allocator's chunks.
    pub footprint: u64,
    /// Bytes of metadata (tables, index, allocator bookkeeping).
    pub metadata_bytes: u64,
    /// References held (pages pointing into the domain).
    pub refs: u64,
}

#[derive(Debug, Default)]
struct Shard {
    blocks: Vec<Box<[Entry]>>,
    free_head: u32,
    live: u32,
    /// Open-addressing table of entry numbers (NIL = empty).
    index: Vec<u32>,
    index_len: usize,
    slab: Slab,
    data_entries: u64,
    pattern_entries: u64,
    raw_entries: u64,
    refs: u64,
    /// Excess last reported to the store's [`Overhead`].
    overhead: u64,
    /// The shard's number in its domain.
    no: u32,
    /// The domain's journal, with a crash-safe state.
    log: Option<Arc<DomainLog>>,
}

/// Points entry `owner` at the slot its data moved to; with a journal,
/// records the move of a logged entry (before the old slot is reused).
fn relocate(blocks: &mut [Box<[Entry]>], owner: u32, to: u32, log: Option<&DomainLog>, no: u32) {
    let n = owner as usize;
    if let Some(e) = blocks
        .get_mut(n / ENTRY_BLOCK)
        .and_then(|b| b.get_mut(n % ENTRY_BLOCK))
    {
        e.loc = to;
        if let (true, Some(log)) = (e.logged, log) {
            log.append(&Record::Move {
                entry: no << ENTRY_BITS | owner,
                addr: to,
            });
        }
    }
}

/// Bytes of a shard's structures that are never charged as overhead: its
/// empty tables and the first blocks of each, what every shard costs.
pub const SHARD_BASE_COST: u64 = 16 * 1024;

impl Shard {
    fn new(no: u32) -> Self {
        Shard {
            free_head: NIL,
            no,
            ..Default::default()
        }
    }

    /// Writes entry `n`'s `CONTENT` or `PATTERN` record unless it is
    /// written already (rules 1 and 4 of the design).
    fn log_content(&mut self, n: u32) {
        let Some(log) = &self.log else {
            return;
        };
        let e = *self.entry(n);
        if e.logged {
            return;
        }
        let entry = self.no << ENTRY_BITS | n;
        let r = match e.kind {
            Kind::Lz4 | Kind::Raw => Record::Content {
                entry,
                addr: e.loc,
                len: e.len,
                form: if e.kind == Kind::Raw {
                    Form::Raw
                } else {
                    Form::Lz4
                },
            },
            Kind::Pattern => Record::Pattern {
                entry,
                pattern: e.key().pattern(),
            },
            Kind::Free => return,
        };
        log.append(&r);
        self.entry_mut(n).logged = true;
    }

    fn entry(&self, n: u32) -> &Entry {
        &self.blocks[n as usize / ENTRY_BLOCK][n as usize % ENTRY_BLOCK]
    }

    fn entry_checked(&self, n: u32) -> Option<&Entry> {
        self.blocks
            .get(n as usize / ENTRY_BLOCK)?
            .get(n as usize % ENTRY_BLOCK)
    }

    fn entry_mut(&mut self, n: u32) -> &mut Entry {
        &mut self.blocks[n as usize / ENTRY_BLOCK][n as usize % ENTRY_BLOCK]
    }

    fn mask(&self) -> usize {
        self.index.len() - 1
    }

    /// Finds an entry with `key` whose content equals `page`.
    fn find(&self, key: &Key, page: &Page) -> Option<u32> {
        if self.index.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = key.bucket_hash() as usize & mask;
        loop {
            let n = self.index[i];
            if n == NIL {
                return None;
            }
            let e = self.entry(n);
            if e.hash == key.words
                && (e.kind == Kind::Pattern) == (key.kind == Kind::Pattern)
                && self.same_content(e, page)
            {
                return Some(n);
            }
            i = (i + 1) & mask;
        }
    }

    /// Full comparison of an entry's content with `page`.
    fn same_content(&self, e: &Entry, page: &Page) -> bool {
        match e.kind {
            // The key holds the pattern itself: equal keys are equal pages.
            Kind::Pattern => true,
            Kind::Raw => self.slab.get(PAGE_SIZE, e.loc) == &page[..],
            Kind::Lz4 => {
                let src = self.slab.get(e.len as usize, e.loc);
                let mut scratch = [0u8; PAGE_SIZE];
                matches!(
                    lz4_flex::block::decompress_into(src, &mut scratch),
                    Ok(PAGE_SIZE)
                ) && scratch == *page
            }
            Kind::Free => false,
        }
    }

    fn index_insert(&mut self, n: u32) {
        if (self.index_len + 1) * 4 > self.index.len() * 3 {
            let cap = (self.index.len() * 2).max(16);
            self.rebuild_index(cap);
        }
        let mask = self.mask();
        let mut i = self.entry(n).key().bucket_hash() as usize & mask;
        while self.index[i] != NIL {
            i = (i + 1) & mask;
        }
        self.index[i] = n;
        self.index_len += 1;
    }

    fn index_remove(&mut self, n: u32) {
        let mask = self.mask();
        let mut i = self.entry(n).key().bucket_hash() as usize & mask;
        while self.index[i] != n {
            debug_assert!(self.index[i] != NIL, "entry missing from index");
            i = (i + 1) & mask;
        }
        // Backward-shift deletion: keep every later entry of the probe run
        // reachable from its ideal bucket.
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let m = self.index[j];
            if m == NIL {
                break;
            }
            let ideal = self.entry(m).key().bucket_hash() as usize & mask;
            // The entry at j may move to the hole unless its ideal bucket
            // lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < ideal && ideal <= j
            } else {
                hole < ideal || ideal <= j
            };
            if !stays {
                self.index[hole] = m;
                hole = j;
            }
        }
        self.index[hole] = NIL;
        self.index_len -= 1;
        if self.index.len() > 64 && self.index_len * 8 < self.index.len() {
            self.rebuild_index(self.index.len() / 2);
        }
    }

    fn rebuild_index(&mut self, cap: usize) {
        let old = std::mem::replace(&mut self.index, vec![NIL; cap]);
        let mask = cap - 1;
        for n in old.into_iter().filter(|&n| n != NIL) {
            let mut i = self.entry(n).key().bucket_hash() as usize & mask;
            while self.index[i] != NIL {
                i = (i + 1) & mask;
            }
            self.index[i] = n;
        }
    }

    fn new_entry(&mut self, e: Entry) -> Option<u32> {
        let n = if self.free_head != NIL {
            let n = self.free_head;
            self.free_head = self.entry(n).loc;
            n
        } else {
            let total = self.blocks.len() * ENTRY_BLOCK;
            // The last entry number stays unused: with the last shard it
            // would spell ZERO_REF.
            if total + ENTRY_BLOCK > ENTRY_MASK as usize {
                return None;
            }
            self.blocks
                .push(vec![FREE_ENTRY; ENTRY_BLOCK].into_boxed_slice());
            // Chain the new block's entries, first one taken now.
            for k in (total + 1..total + ENTRY_BLOCK).rev() {
                let head = self.free_head;
                self.entry_mut(k as u32).loc = head;
                self.free_head = k as u32;
            }
            total as u32
        };
        *self.entry_mut(n) = e;
        self.live += 1;
        Some(n)
    }

    /// What the shard really holds beyond what its contents are charged
    /// (slot bytes and [`CONTENT_METADATA_COST`] each), less
    /// [`SHARD_BASE_COST`].
    fn excess(&self) -> u64 {
        let real = self.slab.footprint() + self.metadata_bytes();
        let charged =
            self.slab.live() + u64::from(self.live) * CONTENT_METADATA_COST + SHARD_BASE_COST;
        real.saturating_sub(charged)
    }

    /// Reports a change of [`Shard::excess`] to the store and its domain.
    fn settle(&mut self, overhead: &Overhead, reported: &AtomicU64) {
        let now = self.excess();
        if now == self.overhead {
            return;
        }
        overhead.moved(self.overhead, now);
        if now > self.overhead {
            reported.fetch_add(now - self.overhead, Ordering::AcqRel);
        } else {
            reported.fetch_sub(self.overhead - now, Ordering::AcqRel);
        }
        self.overhead = now;
    }

    fn free_entry(&mut self, n: u32) {
        let e = *self.entry(n);
        self.index_remove(n);
        match e.kind {
            Kind::Lz4 | Kind::Raw => {
                let Shard {
                    slab,
                    blocks,
                    log,
                    no,
                    ..
                } = self;
                slab.free(e.len as usize, e.loc, |owner, to| {
                    relocate(blocks, owner, to, log.as_deref(), *no);
                });
                self.data_entries -= 1;
                if e.kind == Kind::Raw {
                    self.raw_entries -= 1;
                }
            }
            Kind::Pattern => self.pattern_entries -= 1,
            Kind::Free => {}
        }
        self.drop_entry(n);
    }

    /// Bytes storing one new content would grow the tables by.
    fn insert_growth(&self) -> u64 {
        let mut grow = 0;
        if (self.index_len + 1) * 4 > self.index.len() * 3 {
            grow += (self.index.len().max(8) * 4) as u64;
        }
        if self.free_head == NIL {
            grow += (ENTRY_BLOCK * std::mem::size_of::<Entry>()) as u64;
        }
        grow
    }

    /// Compacts the allocator's classes that hold a chunk of holes.
    fn reclaim(&mut self) {
        let Shard {
            slab,
            blocks,
            log,
            no,
            ..
        } = self;
        slab.reclaim(|owner, to| relocate(blocks, owner, to, log.as_deref(), *no));
    }

    /// Puts an entry that is in no index and holds no slot back on the
    /// free list.
    fn drop_entry(&mut self, n: u32) {
        let head = self.free_head;
        *self.entry_mut(n) = Entry {
            loc: head,
            ..FREE_ENTRY
        };
        self.free_head = n;
        self.live -= 1;
        if self.live == 0 {
            // Give every table back once the shard is empty.
            self.blocks = Vec::new();
            self.index = Vec::new();
            self.index_len = 0;
            self.free_head = NIL;
        }
    }

    fn read(&self, n: u32, out: &mut Page) -> Result<(), Corrupt> {
        let e = self.entry(n);
        match e.kind {
            Kind::Lz4 => {
                let src = self.slab.get(e.len as usize, e.loc);
                match lz4_flex::block::decompress_into(src, out) {
                    Ok(PAGE_SIZE) => Ok(()),
                    _ => Err(Corrupt),
                }
            }
            Kind::Raw => {
                out.copy_from_slice(self.slab.get(PAGE_SIZE, e.loc));
                Ok(())
            }
            Kind::Pattern => {
                fill_pattern(out, e.key().pattern());
                Ok(())
            }
            Kind::Free => Err(Corrupt),
        }
    }

    fn release(&mut self, n: u32) -> Released {
        let e = self.entry_mut(n);
        debug_assert!(e.refs > 0 && e.kind != Kind::Free);
        e.refs -= 1;
        let r = Released {
            data_bytes: e.data_bytes(),
            freed: e.refs == 0,
            pattern: e.kind == Kind::Pattern,
        };
        self.refs -= 1;
        if r.freed {
            self.free_entry(n);
        }
        r
    }

    fn metadata_bytes(&self) -> u64 {
        (self.blocks.len() * ENTRY_BLOCK * std::mem::size_of::<Entry>()
            + self.blocks.capacity() * std::mem::size_of::<Box<[Entry]>>()
            + self.index.capacity() * 4) as u64
            + self.slab.metadata_bytes()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // What the shards still report leaves with them.
        for shard in self.shards.iter_mut() {
            let shard = shard.get_mut();
            self.overhead.moved(shard.overhead, 0);
            shard.overhead = 0;
        }
    }
}

/// Process-wide count of domains, to name them in statistics.
static NEXT_DOMAIN: AtomicU64 = AtomicU64::new(1);

/// One deduplication scope.
#[derive(Debug)]
pub struct Domain {
    shards: Box<[Mutex<Shard>]>,
    shard_bits: u32,
    seed: u64,
    id: u64,
    overhead: Arc<Overhead>,
    /// This domain's part of `overhead` (the sum of its shards').
    reported: AtomicU64,
    /// Its journal, with a crash-safe state.
    pub(crate) log: Option<Arc<DomainLog>>,
}

fn folded_mul(a: u64, b: u64) -> u64 {
    let r = a as u128 * b as u128;
    r as u64 ^ (r >> 64) as u64
}

impl Domain {
    /// A domain with `shards` shards (a power of two up to [`MAX_SHARDS`]).
    /// Its structures' excess is reported to `overhead`.
    pub fn new(shards: usize, seed: u64, overhead: Arc<Overhead>) -> Self {
        assert!(shards.is_power_of_two() && shards <= MAX_SHARDS);
        Domain {
            shards: (0..shards)
                .map(|n| Mutex::new(Shard::new(n as u32)))
                .collect(),
            shard_bits: shards.trailing_zeros(),
            seed,
            id: NEXT_DOMAIN.fetch_add(1, Ordering::Relaxed),
            overhead,
            reported: AtomicU64::new(0),
            log: None,
        }
    }

    /// A domain of a crash-safe state: its slabs' chunks are extents of
    /// `arena`, and its contents referenced by persistent pages are
    /// recorded in `log`.
    pub fn in_state(
        shards: usize,
        seed: u64,
        overhead: Arc<Overhead>,
        arena: &Arc<Arena>,
        log: Arc<DomainLog>,
    ) -> Self {
        let mut d = Domain::new(shards, seed, overhead);
        for (n, shard) in d.shards.iter_mut().enumerate() {
            let shard = shard.get_mut();
            shard.slab = Slab::in_arena(arena.clone(), log.number, n as u8);
            shard.log = Some(log.clone());
        }
        d.log = Some(log);
        d
    }

    /// A number naming this domain.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Key of a data page (its seeded xxh3-128 hash).
    pub fn data_key(&self, page: &Page) -> Key {
        let h = xxh3_128_with_seed(page, self.seed);
        Key {
            words: [
                h as u32,
                (h >> 32) as u32,
                (h >> 64) as u32,
                (h >> 96) as u32,
            ],
            kind: Kind::Lz4,
        }
    }

    /// Key of a same-filled page: a seeded mix of the pattern (so that a
    /// guest cannot aim patterns at one index bucket) and the pattern itself.
    pub fn pattern_key(&self, pattern: u64) -> Key {
        let m = folded_mul(pattern ^ self.seed, 0x9E37_79B9_7F4A_7C15)
            ^ folded_mul(pattern.rotate_left(32) ^ !self.seed, 0xC2B2_AE3D_27D4_EB4F);
        Key {
            words: [
                m as u32,
                (m >> 32) as u32,
                pattern as u32,
                (pattern >> 32) as u32,
            ],
            kind: Kind::Pattern,
        }
    }

    /// The kind of key to use for content stored as `data`.
    fn keyed(key: &Key, data: &NewData<'_>) -> Key {
        let kind = match data {
            NewData::Lz4(_) => Kind::Lz4,
            NewData::Raw => Kind::Raw,
            NewData::Pattern => Kind::Pattern,
        };
        Key { kind, ..*key }
    }

    fn shard_of(&self, key: &Key) -> usize {
        if self.shard_bits == 0 {
            0
        } else {
            (key.shard_hash() >> (32 - self.shard_bits)) as usize
        }
    }

    fn make_ref(&self, shard: usize, n: u32) -> ContentRef {
        (shard as u32) << ENTRY_BITS | n
    }

    fn split(&self, r: ContentRef) -> (usize, u32) {
        let r = r & ID_MASK;
        debug_assert!(r != ZERO_REF);
        ((r >> ENTRY_BITS) as usize, r & ENTRY_MASK)
    }

    /// Bytes the shard of `key` would grow its tables by to store one new
    /// content (an estimate, as of now): a doubled dedup index, a new block
    /// of entries.
    pub fn insert_growth(&self, key: &Key) -> u64 {
        self.shards[self.shard_of(key)].lock().insert_growth()
    }

    /// Under one lock: the slot bytes of stored content equal to `page`,
    /// if there is some (no reference taken), or else what storing it
    /// would grow the shard's tables by ([`Domain::insert_growth`]).
    pub fn peek(&self, key: &Key, page: &Page) -> Result<u64, u64> {
        let shard = self.shards[self.shard_of(key)].lock();
        match shard.find(key, page) {
            Some(n) => Ok(shard.entry(n).data_bytes()),
            None => Err(shard.insert_growth()),
        }
    }

    /// Takes a reference on stored content equal to `page`, if any.
    /// Returns the reference and the content's data bytes.
    /// `persistent`: for a persistent page (its content is recorded in
    /// the journal, if not yet, before the reference is returned).
    pub fn acquire(&self, key: &Key, page: &Page, persistent: bool) -> Option<(ContentRef, u64)> {
        let s = self.shard_of(key);
        let mut shard = self.shards[s].lock();
        let n = shard.find(key, page)?;
        let e = shard.entry_mut(n);
        if e.refs == u32::MAX {
            return None;
        }
        e.refs += 1;
        let bytes = e.data_bytes();
        shard.refs += 1;
        if persistent {
            shard.log_content(n);
        }
        Some((self.make_ref(s, n), bytes))
    }

    /// Stores new content, unless equal content appeared meanwhile (then
    /// takes a reference on it instead). `None` only if the shard's content
    /// table is full (2^26 entries).
    /// `persistent`: as for [`Domain::acquire`].
    pub fn insert(
        &self,
        key: &Key,
        page: &Page,
        persistent: bool,
        data: NewData<'_>,
    ) -> Option<Inserted> {
        let s = self.shard_of(key);
        let mut shard = self.shards[s].lock();
        let key = Self::keyed(key, &data);
        if let Some(n) = shard.find(&key, page) {
            let e = shard.entry_mut(n);
            if e.refs < u32::MAX {
                e.refs += 1;
                let bytes = e.data_bytes();
                shard.refs += 1;
                if persistent {
                    shard.log_content(n);
                }
                return Some(Inserted::Existing(self.make_ref(s, n), bytes));
            }
        }
        let len = match data {
            NewData::Lz4(bytes) => bytes.len(),
            NewData::Raw => PAGE_SIZE,
            NewData::Pattern => 0,
        };
        let entry = Entry {
            hash: key.words,
            refs: 1,
            loc: NIL,
            len: len as u16,
            kind: key.kind,
            logged: false,
        };
        let n = shard.new_entry(entry)?;
        if len > 0 {
            let src = match data {
                NewData::Lz4(bytes) => bytes,
                _ => &page[..],
            };
            let Some(loc) = shard.slab.alloc(src, n) else {
                shard.drop_entry(n);
                shard.settle(&self.overhead, &self.reported);
                return None;
            };
            shard.entry_mut(n).loc = loc;
        }
        match key.kind {
            Kind::Pattern => shard.pattern_entries += 1,
            Kind::Raw => {
                shard.data_entries += 1;
                shard.raw_entries += 1;
            }
            _ => shard.data_entries += 1,
        }
        shard.refs += 1;
        if persistent {
            // Rule 1: the bytes are in the slot, and the record is
            // complete before the entry can be found.
            shard.log_content(n);
        }
        shard.index_insert(n);
        shard.settle(&self.overhead, &self.reported);
        Some(Inserted::New(self.make_ref(s, n)))
    }

    /// Drops one reference.
    pub fn release(&self, r: ContentRef) -> Released {
        let (s, n) = self.split(r);
        let mut shard = self.shards[s].lock();
        let rel = shard.release(n);
        if rel.freed {
            shard.settle(&self.overhead, &self.reported);
        }
        rel
    }

    /// The shards' excess computed afresh (what [`Domain::overhead`] must
    /// equal when no operation is in flight).
    pub fn recount_overhead(&self) -> u64 {
        self.shards.iter().map(|s| s.lock().excess()).sum()
    }

    /// Bytes of overhead this domain's shards hold against the host limit.
    pub fn overhead(&self) -> u64 {
        self.reported.load(Ordering::Acquire)
    }

    /// Gives back the allocator holes eviction left, in every shard.
    pub fn reclaim(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.reclaim();
            shard.settle(&self.overhead, &self.reported);
        }
    }

    /// Copies the content out.
    pub fn read(&self, r: ContentRef, out: &mut Page) -> Result<(), Corrupt> {
        let (s, n) = self.split(r);
        self.shards[s].lock().read(n, out)
    }

    /// Runs `f` on the content as stored (under the shard's lock).
    pub fn with_stored<R>(
        &self,
        r: ContentRef,
        f: impl FnOnce(Stored<'_>) -> R,
    ) -> Result<R, Corrupt> {
        let (s, n) = self.split(r);
        let shard = self.shards.get(s).ok_or(Corrupt)?.lock();
        let e = shard.entry_checked(n).ok_or(Corrupt)?;
        let stored = match e.kind {
            Kind::Lz4 => Stored::Lz4(shard.slab.get(e.len as usize, e.loc)),
            Kind::Raw => Stored::Raw(shard.slab.get(PAGE_SIZE, e.loc)),
            Kind::Pattern => Stored::Pattern(e.key().pattern()),
            Kind::Free => return Err(Corrupt),
        };
        Ok(f(stored))
    }

    /// Copies the content out and drops one reference, under one lock.
    pub fn read_release(&self, r: ContentRef, out: &mut Page) -> (Result<(), Corrupt>, Released) {
        let (s, n) = self.split(r);
        let mut shard = self.shards[s].lock();
        let res = shard.read(n, out);
        let rel = shard.release(n);
        if rel.freed {
            shard.settle(&self.overhead, &self.reported);
        }
        (res, rel)
    }

    /// Adopts what a crash-safe state recorded for this (new, empty)
    /// domain: `contents` (content reference, where it is, pages
    /// referencing it) in the slabs' `chunks` (shard, class, chunk number,
    /// extent), all checked by `recover.rs` to lie inside listed chunks of
    /// their shard and class. Every content is read back and its hash
    /// recomputed for the dedup index; one that does not decompress to a
    /// page is an error. Slots and chunks no content holds are freed.
    pub fn adopt(
        &self,
        contents: &[(ContentRef, super::journal::Stored, u32)],
        chunks: Vec<(u8, u8, u32, super::state::Extent)>,
    ) -> Result<(), String> {
        use super::journal::Stored as Rec;
        let mut by_shard: Vec<Vec<(u8, u32, super::state::Extent)>> =
            (0..self.shards.len()).map(|_| Vec::new()).collect();
        for (s, class, chunk, e) in chunks {
            let list = by_shard
                .get_mut(usize::from(s))
                .ok_or_else(|| format!("chunk of shard {s}, of {} shards", self.shards.len()))?;
            list.push((class, chunk, e));
        }
        let mut slots: Vec<Vec<(usize, u32, u32)>> =
            (0..self.shards.len()).map(|_| Vec::new()).collect();
        for &(r, stored, _) in contents {
            let (s, n) = ((r >> ENTRY_BITS) as usize, r & ENTRY_MASK);
            if r >= ZERO_REF || s >= self.shards.len() || n >= ENTRY_MASK {
                return Err(format!("content entry {r} out of range"));
            }
            if let Rec::Slot { addr, len, .. } = stored {
                slots[s].push((usize::from(len), addr, n));
            }
        }
        for (s, (chunks, slots)) in by_shard.into_iter().zip(slots).enumerate() {
            self.shards[s].lock().slab.adopt(chunks, slots)?;
        }
        let mut page = [0u8; PAGE_SIZE];
        for &(r, stored, refs) in contents {
            let (s, n) = ((r >> ENTRY_BITS) as usize, r & ENTRY_MASK);
            let mut shard = self.shards[s].lock();
            let (key, loc, len) = match stored {
                Rec::Pattern(p) => (self.pattern_key(p), NIL, 0),
                Rec::Slot { addr, len, form } => {
                    let src = shard.slab.get(usize::from(len), addr);
                    let kind = match form {
                        Form::Raw => {
                            if src.len() != PAGE_SIZE {
                                return Err(format!("raw content entry {r} of {len} bytes"));
                            }
                            page.copy_from_slice(src);
                            Kind::Raw
                        }
                        Form::Lz4 => {
                            if !matches!(
                                lz4_flex::block::decompress_into(src, &mut page),
                                Ok(PAGE_SIZE)
                            ) {
                                return Err(format!(
                                    "content entry {r}: its {len} bytes at {addr:#x} do not decompress to a page"
                                ));
                            }
                            Kind::Lz4
                        }
                    };
                    (
                        Key {
                            kind,
                            ..self.data_key(&page)
                        },
                        addr,
                        len,
                    )
                }
            };
            while shard.blocks.len() * ENTRY_BLOCK <= n as usize {
                shard
                    .blocks
                    .push(vec![FREE_ENTRY; ENTRY_BLOCK].into_boxed_slice());
            }
            if shard.entry(n).kind != Kind::Free {
                return Err(format!("content entry {r} adopted twice"));
            }
            *shard.entry_mut(n) = Entry {
                hash: key.words,
                refs: refs.max(1),
                loc,
                len,
                kind: key.kind,
                logged: true,
            };
            shard.live += 1;
            shard.refs += u64::from(refs.max(1));
            match key.kind {
                Kind::Pattern => shard.pattern_entries += 1,
                Kind::Raw => {
                    shard.data_entries += 1;
                    shard.raw_entries += 1;
                }
                _ => shard.data_entries += 1,
            }
            shard.index_insert(n);
        }
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let total = (shard.blocks.len() * ENTRY_BLOCK) as u32;
            shard.free_head = NIL;
            for n in (0..total).rev() {
                if shard.entry(n).kind == Kind::Free {
                    let head = shard.free_head;
                    shard.entry_mut(n).loc = head;
                    shard.free_head = n;
                }
            }
            shard.settle(&self.overhead, &self.reported);
        }
        Ok(())
    }

    /// Every live content whose record is written (referenced by a
    /// persistent page now or before), with where it is: what a
    /// checkpoint keeps (rule 4), read with every shard locked. The
    /// caller holds every lock that records are appended under, so the
    /// result matches the journal.
    /// `f` runs with the shards still locked.
    pub(crate) fn with_logged_contents<R>(
        &self,
        f: impl FnOnce(std::collections::HashMap<u32, super::journal::Stored>) -> R,
    ) -> R {
        use super::journal::Stored as Rec;
        let guards: Vec<_> = self.shards.iter().map(|s| s.lock()).collect();
        let mut out = std::collections::HashMap::new();
        for (s, shard) in guards.iter().enumerate() {
            for (b, block) in shard.blocks.iter().enumerate() {
                for (i, e) in block.iter().enumerate() {
                    if !e.logged || e.kind == Kind::Free {
                        continue;
                    }
                    let n = (b * ENTRY_BLOCK + i) as u32;
                    let stored = match e.kind {
                        Kind::Pattern => Rec::Pattern(e.key().pattern()),
                        Kind::Raw => Rec::Slot {
                            addr: e.loc,
                            len: e.len,
                            form: Form::Raw,
                        },
                        _ => Rec::Slot {
                            addr: e.loc,
                            len: e.len,
                            form: Form::Lz4,
                        },
                    };
                    out.insert(self.make_ref(s, n), stored);
                }
            }
        }
        f(out)
    }

    /// Sizes of the whole domain.
    pub fn stats(&self) -> DomainStats {
        let mut st = DomainStats {
            metadata_bytes: (std::mem::size_of::<Self>()
                + self.shards.len() * std::mem::size_of::<Mutex<Shard>>())
                as u64,
            ..Default::default()
        };
        for shard in self.shards.iter() {
            let sh = shard.lock();
            st.data_entries += sh.data_entries;
            st.pattern_entries += sh.pattern_entries;
            st.raw_entries += sh.raw_entries;
            st.slot_bytes += sh.slab.live();
            st.footprint += sh.slab.footprint();
            st.metadata_bytes += sh.metadata_bytes();
            st.refs += sh.refs;
        }
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_from(seed: u64) -> Page {
        // Compressible but distinct: a short text-like pattern plus the seed.
        let mut p = [0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = b"the quick brown fox "[(i + seed as usize) % 20] ^ (i / 512) as u8;
        }
        p[..8].copy_from_slice(&seed.to_le_bytes());
        p
    }

    fn random_page(mut x: u64) -> Page {
        let mut p = [0u8; PAGE_SIZE];
        for w in p.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        p
    }

    fn store(d: &Domain, page: &Page) -> (ContentRef, bool) {
        match classify(page) {
            Class::Zero => (ZERO_REF, false),
            Class::Same(w) => {
                let key = d.pattern_key(w);
                if let Some((r, _)) = d.acquire(&key, page, false) {
                    return (r, true);
                }
                match d.insert(&key, page, false, NewData::Pattern).unwrap() {
                    Inserted::New(r) => (r, false),
                    Inserted::Existing(r, _) => (r, true),
                }
            }
            Class::Data => {
                let key = d.data_key(page);
                if let Some((r, _)) = d.acquire(&key, page, false) {
                    return (r, true);
                }
                let mut buf = [0u8; LZ4_BOUND];
                let data = match compress(page, &mut buf) {
                    Some(n) => NewData::Lz4(&buf[..n]),
                    None => NewData::Raw,
                };
                match d.insert(&key, page, false, data).unwrap() {
                    Inserted::New(r) => (r, false),
                    Inserted::Existing(r, _) => (r, true),
                }
            }
        }
    }

    #[test]
    fn classify_pages() {
        assert_eq!(classify(&[0u8; PAGE_SIZE]), Class::Zero);
        let mut p = [0u8; PAGE_SIZE];
        fill_pattern(&mut p, 0x0102_0304_0506_0708);
        assert_eq!(classify(&p), Class::Same(0x0102_0304_0506_0708));
        p[PAGE_SIZE - 1] ^= 1;
        assert_eq!(classify(&p), Class::Data);
        let mut z = [0u8; PAGE_SIZE];
        z[0] = 1;
        assert_eq!(classify(&z), Class::Data);
    }

    #[test]
    fn compression_threshold() {
        let mut buf = [0u8; LZ4_BOUND];
        let n = compress(&page_from(1), &mut buf).expect("text compresses");
        assert!(n < PAGE_SIZE / 2);
        assert_eq!(compress(&random_page(7), &mut buf), None, "random is raw");
    }

    #[test]
    fn store_read_release_round_trip() {
        let d = Domain::new(4, 42, Arc::default());
        let pages = [page_from(1), page_from(2), random_page(3), {
            let mut p = [0u8; PAGE_SIZE];
            fill_pattern(&mut p, 0xdead_beef);
            p
        }];
        let refs: Vec<ContentRef> = pages.iter().map(|p| store(&d, p).0).collect();
        let st = d.stats();
        assert_eq!(st.data_entries, 3);
        assert_eq!(st.pattern_entries, 1);
        assert_eq!(st.raw_entries, 1);
        for (r, p) in refs.iter().zip(&pages) {
            let mut out = [1u8; PAGE_SIZE];
            d.read(*r, &mut out).unwrap();
            assert_eq!(&out, p);
        }
        for r in refs {
            assert!(d.release(r).freed);
        }
        let st = d.stats();
        assert_eq!(
            (st.data_entries, st.slot_bytes, st.footprint, st.refs),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn duplicates_share_one_entry_with_refcounts() {
        let d = Domain::new(2, 9, Arc::default());
        let p = page_from(5);
        let (a, hit_a) = store(&d, &p);
        let (b, hit_b) = store(&d, &p);
        assert!(!hit_a && hit_b);
        assert_eq!(a, b);
        assert_eq!(d.stats().data_entries, 1);
        assert_eq!(d.stats().refs, 2);
        let r = d.release(a);
        assert!(!r.freed);
        let mut out = [0u8; PAGE_SIZE];
        d.read(b, &mut out).unwrap();
        assert_eq!(out, p);
        assert!(d.release(b).freed);
    }

    #[test]
    fn hash_collision_never_returns_other_data() {
        // Forge a collision: insert page B under page A's key. A later
        // lookup of A with A's key finds B's entry by hash, and must reject
        // it on the full comparison.
        let d = Domain::new(1, 3, Arc::default());
        let a = page_from(10);
        let b = page_from(11);
        let key_a = d.data_key(&a);
        let mut buf = [0u8; LZ4_BOUND];
        let n = compress(&b, &mut buf).unwrap();
        let Inserted::New(rb) = d
            .insert(&key_a, &b, false, NewData::Lz4(&buf[..n]))
            .unwrap()
        else {
            panic!("b is new");
        };
        assert_eq!(
            d.acquire(&key_a, &a, false),
            None,
            "collision must not match"
        );
        let n = compress(&a, &mut buf).unwrap();
        let Inserted::New(ra) = d
            .insert(&key_a, &a, false, NewData::Lz4(&buf[..n]))
            .unwrap()
        else {
            panic!("a is new despite the equal hash");
        };
        assert_ne!(ra, rb);
        let mut out = [0u8; PAGE_SIZE];
        d.read(ra, &mut out).unwrap();
        assert_eq!(out, a);
        d.read(rb, &mut out).unwrap();
        assert_eq!(out, b);
        // Both remain findable; removing one keeps the other reachable.
        assert_eq!(d.acquire(&key_a, &a, false).map(|x| x.0), Some(ra));
        d.release(rb);
        assert_eq!(d.acquire(&key_a, &a, false).map(|x| x.0), Some(ra));
        d.release(ra);
        d.release(ra);
        assert!(d.release(ra).freed);
        assert_eq!(d.stats().footprint, 0);
    }

    #[test]
    fn index_survives_many_inserts_and_removals() {
        // Exercises growth, shrinking and backward-shift deletion.
        let d = Domain::new(1, 77, Arc::default());
        let mut live: Vec<(u64, ContentRef)> = Vec::new();
        for i in 0..5000u64 {
            let p = random_page(i + 1);
            live.push((i + 1, store(&d, &p).0));
            if i % 3 == 2 {
                let (seed, r) = live.remove((i as usize * 7) % live.len());
                assert!(d.release(r).freed, "page {seed}");
            }
        }
        for &(seed, r) in &live {
            let p = random_page(seed);
            // Still deduplicates against the survivor.
            let (r2, hit) = store(&d, &p);
            assert!(hit);
            assert_eq!(r2, r);
            d.release(r2);
            let mut out = [0u8; PAGE_SIZE];
            d.read(r, &mut out).unwrap();
            assert_eq!(out, p);
        }
        for (_, r) in live.drain(..) {
            d.release(r);
        }
        let st = d.stats();
        assert_eq!((st.data_entries, st.footprint), (0, 0));
    }

    #[test]
    fn patterns_deduplicate_by_value() {
        let d = Domain::new(4, 5, Arc::default());
        let mut p = [0u8; PAGE_SIZE];
        fill_pattern(&mut p, 7);
        let mut q = [0u8; PAGE_SIZE];
        fill_pattern(&mut q, 8);
        let (a, _) = store(&d, &p);
        let (b, hit) = store(&d, &p);
        let (c, _) = store(&d, &q);
        assert!(hit && a == b && a != c);
        let mut out = [0u8; PAGE_SIZE];
        d.read(c, &mut out).unwrap();
        assert_eq!(out, q);
        assert_eq!(d.stats().slot_bytes, 0, "patterns store no data");
    }

    #[test]
    fn contents_spread_over_all_shards() {
        let d = Domain::new(16, 0xabc, Arc::default());
        let mut used = [0u32; 16];
        for i in 0..1600u64 {
            let (r, _) = store(&d, &random_page(i + 1));
            used[(r >> ENTRY_BITS) as usize] += 1;
        }
        assert!(used.iter().all(|&n| n > 50), "{used:?}");
        for i in 0..200u64 {
            let mut p = [0u8; PAGE_SIZE];
            fill_pattern(&mut p, i * 0x0101 + 1);
            let (r, _) = store(&d, &p);
            used[(r >> ENTRY_BITS) as usize] += 1;
        }
        assert!(used.iter().all(|&n| n > 55), "{used:?}");
    }

    #[test]
    fn no_content_id_spells_the_zero_marker() {
        let largest =
            (MAX_SHARDS as u32 - 1) << ENTRY_BITS | (ENTRY_MASK + 1 - ENTRY_BLOCK as u32 - 1);
        assert!(largest < ZERO_REF);
        // The table refuses before reaching the reserved number.
        let mut sh = Shard::new(0);
        sh.blocks = vec![vec![FREE_ENTRY; 0].into_boxed_slice(); ENTRY_MASK as usize / ENTRY_BLOCK];
        assert_eq!(sh.new_entry(FREE_ENTRY), None);
    }

    #[test]
    fn read_release_frees_under_one_lock() {
        let d = Domain::new(1, 1, Arc::default());
        let p = page_from(99);
        let (r, _) = store(&d, &p);
        let mut out = [0u8; PAGE_SIZE];
        let (res, rel) = d.read_release(r, &mut out);
        assert!(res.is_ok() && rel.freed);
        assert_eq!(out, p);
    }
}
