// SPDX-License-Identifier: GPL-2.0

//! Which cleancache pages the host may hold: the filter that answers a get
//! locally, at no cost, when the host cannot have the page.
//!
//! Plain Rust over `core` only. The module compiles it with the kernel's
//! `RBTree` as the [`ChunkMap`] (see `crate::cleancache`); the host crate
//! `vtmem-guest-logic` compiles the same file with a `BTreeMap` and tests
//! it against a model.
//!
//! # What a bit means
//!
//! One bit per page of a file: set while the host *may* hold the page. The
//! rule the front end keeps is the converse: **a clear bit means a `GET`
//! queued now would miss.** It sets the bit before it queues a `PUT`, and
//! clears it only together with something that removes the page from the
//! host or makes a get of it wrong anyway: a `FLUSH_PAGE` or `FLUSH_OBJECT`
//! it queues, the answer to a `GET` of the page (private pools have
//! exclusive gets: a hit removes the page, a miss means it is gone), or the
//! destruction of the device pool. Every change of a file's bits happens
//! with the file's request queue locked, in the same critical section that
//! queues the operation, so the bits follow the order in which the device
//! executes the operations. A page the host evicted or refused keeps its
//! bit: it costs one miss, never a wrong skip.
//!
//! # Memory
//!
//! Bits are kept in chunks of [`CHUNK_PAGES`] pages (one MiB of a file),
//! one map node per chunk that has a bit set; a chunk whose last bit is
//! cleared is freed. With the kernel's `RBTree` a node is 88 bytes, a
//! `kmalloc-96` object: 0.375 bytes per page when a file's pages are
//! tracked densely, 96 bytes per page at worst (one page per chunk). The
//! number of nodes is bounded by a [`Budget`] shared by every filter of a
//! device; when it is spent, new chunks are refused ([`Untracked::Full`])
//! and the front end does not put the page: a page that was never put
//! cannot be a hit, so nothing is lost but that page's caching. A tracked
//! bit is never dropped to make room.

/// Pages one chunk covers, one bit each.
pub(crate) const CHUNK_PAGES: u64 = 256;
/// 64-bit words of a chunk.
const WORDS: usize = (CHUNK_PAGES / 64) as usize;

/// A file, as cleancache names it: inode number, generation, 0.
pub(crate) type FileId = [u64; 3];

/// A chunk's place: the file and the chunk number (`index / CHUNK_PAGES`).
/// Ordered by file first, so the chunks of one file are adjacent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ChunkKey {
    /// The file.
    pub(crate) file: FileId,
    /// Page index divided by [`CHUNK_PAGES`].
    pub(crate) chunk: u64,
}

impl ChunkKey {
    /// The key of page `index` of `file`, and where its bit is in the
    /// chunk (word, mask).
    fn of(file: &FileId, index: u64) -> (Self, usize, u64) {
        let bit = index % CHUNK_PAGES;
        let key = Self {
            file: *file,
            chunk: index / CHUNK_PAGES,
        };
        // `bit / 64` is below `WORDS`: `bit` is below `CHUNK_PAGES`.
        (key, (bit / 64) as usize, 1u64 << (bit % 64))
    }

    /// The first key of `file`: every chunk of `file` is at or after it.
    pub(crate) fn first(file: &FileId) -> Self {
        Self {
            file: *file,
            chunk: 0,
        }
    }
}

/// The bits of one chunk: page `chunk * CHUNK_PAGES + i` is bit `i % 64` of
/// word `i / 64`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Chunk([u64; WORDS]);

impl Chunk {
    /// Pages marked.
    pub(crate) fn pages(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    fn test(&self, word: usize, mask: u64) -> bool {
        self.0.get(word).is_some_and(|w| w & mask != 0)
    }

    /// Sets a bit; true if it was clear.
    fn set(&mut self, word: usize, mask: u64) -> bool {
        match self.0.get_mut(word) {
            Some(w) => {
                let was_clear = *w & mask == 0;
                *w |= mask;
                was_clear
            }
            None => false,
        }
    }

    /// Clears a bit; true if it was set.
    fn clear(&mut self, word: usize, mask: u64) -> bool {
        match self.0.get_mut(word) {
            Some(w) => {
                let was_set = *w & mask != 0;
                *w &= !mask;
                was_set
            }
            None => false,
        }
    }
}

/// A node could not be allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NoMemory;

/// What a [`PageFilter`] needs of an ordered map (the kernel's `RBTree`,
/// or `BTreeMap` in the host tests). It must not sleep: the filter is used
/// with spinlocks held and interrupts off.
pub(crate) trait ChunkMap: Default {
    /// The chunk at `key`.
    fn chunk(&self, key: &ChunkKey) -> Option<&Chunk>;
    /// The chunk at `key`, to change.
    fn chunk_mut(&mut self, key: &ChunkKey) -> Option<&mut Chunk>;
    /// Adds `chunk` at `key`, where there is none, allocating a node
    /// without sleeping.
    fn insert_new(&mut self, key: ChunkKey, chunk: Chunk) -> Result<(), NoMemory>;
    /// Removes (and frees) the chunk at `key`.
    fn remove_chunk(&mut self, key: &ChunkKey) -> Option<Chunk>;
    /// Removes every chunk of `file`; returns how many chunks and how many
    /// marked pages they held.
    fn remove_file(&mut self, file: &FileId) -> (u64, u64);
}

/// The nodes a device's filters may hold in all, shared by them.
pub(crate) trait Budget {
    /// Takes one node from the budget; false if none is left.
    fn take_node(&self) -> bool;
    /// Gives back `n` nodes.
    fn give_nodes(&self, n: u64);
}

/// Why a page could not be marked: the front end must not put it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Untracked {
    /// The budget (the module parameter's cap) is spent.
    Full,
    /// A node could not be allocated.
    NoMemory,
}

/// The pages of one device pool (on one request queue) that the host may
/// hold.
#[derive(Default)]
pub(crate) struct PageFilter<M> {
    map: M,
    /// Nodes (chunks) in `map`, each taken from the budget.
    chunks: u64,
    /// Bits set in `map`.
    pages: u64,
}

impl<M: ChunkMap> PageFilter<M> {
    /// Whether the host may hold page `index` of `file`.
    pub(crate) fn may_hold(&self, file: &FileId, index: u64) -> bool {
        let (key, word, mask) = ChunkKey::of(file, index);
        self.map.chunk(&key).is_some_and(|c| c.test(word, mask))
    }

    /// Records that page `index` of `file` is about to be put. Needs a new
    /// node (from `budget`) only if no page of its chunk is marked; on
    /// failure nothing changed.
    pub(crate) fn mark(
        &mut self,
        file: &FileId,
        index: u64,
        budget: &impl Budget,
    ) -> Result<(), Untracked> {
        let (key, word, mask) = ChunkKey::of(file, index);
        if let Some(c) = self.map.chunk_mut(&key) {
            if c.set(word, mask) {
                self.pages += 1;
            }
            return Ok(());
        }
        if !budget.take_node() {
            return Err(Untracked::Full);
        }
        let mut c = Chunk::default();
        c.set(word, mask);
        if self.map.insert_new(key, c).is_err() {
            budget.give_nodes(1);
            return Err(Untracked::NoMemory);
        }
        self.chunks += 1;
        self.pages += 1;
        Ok(())
    }

    /// Page `index` of `file` is no longer on the host (or must not be read
    /// from it). Frees its chunk if that was the chunk's last page.
    pub(crate) fn forget(&mut self, file: &FileId, index: u64, budget: &impl Budget) {
        let (key, word, mask) = ChunkKey::of(file, index);
        let Some(c) = self.map.chunk_mut(&key) else {
            return;
        };
        if c.clear(word, mask) {
            self.pages = self.pages.saturating_sub(1);
        }
        if c.is_empty() && self.map.remove_chunk(&key).is_some() {
            self.chunks = self.chunks.saturating_sub(1);
            budget.give_nodes(1);
        }
    }

    /// No page of `file` is on the host any more.
    pub(crate) fn forget_file(&mut self, file: &FileId, budget: &impl Budget) {
        let (chunks, pages) = self.map.remove_file(file);
        self.chunks = self.chunks.saturating_sub(chunks);
        self.pages = self.pages.saturating_sub(pages);
        budget.give_nodes(chunks);
    }

    /// Empties the filter (its device pool is gone). Returns the old map,
    /// for the caller to free outside its lock, and its node count, to give
    /// back to the budget once it is freed.
    pub(crate) fn take_all(&mut self) -> (M, u64) {
        let chunks = core::mem::take(&mut self.chunks);
        self.pages = 0;
        (core::mem::take(&mut self.map), chunks)
    }

    /// Nodes (chunks) in use.
    pub(crate) fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Pages marked.
    pub(crate) fn pages(&self) -> u64 {
        self.pages
    }

    /// The map, for the host tests to check the counters against.
    #[cfg(test)]
    pub(crate) fn map(&self) -> &M {
        &self.map
    }
}

/// The size of the `kmalloc` object that holds `bytes` (x86-64's caches:
/// 8, 16, 32, 64, 96, 128, 192, then powers of two).
pub(crate) const fn kmalloc_size(bytes: usize) -> usize {
    if bytes <= 8 {
        8
    } else if bytes <= 16 {
        16
    } else if bytes <= 32 {
        32
    } else if bytes <= 64 {
        64
    } else if bytes <= 96 {
        96
    } else if bytes <= 128 {
        128
    } else if bytes <= 192 {
        192
    } else {
        bytes.next_power_of_two()
    }
}

/// The memory of one map node holding a chunk, in a binary tree whose
/// nodes carry three pointers (the kernel's `rb_node`) beside key and value.
pub(crate) const NODE_BYTES: usize = kmalloc_size(
    3 * core::mem::size_of::<usize>()
        + core::mem::size_of::<ChunkKey>()
        + core::mem::size_of::<Chunk>(),
);
