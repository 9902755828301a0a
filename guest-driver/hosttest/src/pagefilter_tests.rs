// SPDX-License-Identifier: GPL-2.0

//! Tests of the cleancache page filter (`guest-driver/src/pagefilter.rs`),
//! with a `BTreeMap` as its map, against a model of the host.

use crate::pagefilter::{
    kmalloc_size, Budget, Chunk, ChunkKey, ChunkMap, FileId, NoMemory, PageFilter, Untracked,
    CHUNK_PAGES, NODE_BYTES,
};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

thread_local! {
    /// Makes node allocations fail, as a `GFP_NOWAIT` one may in the kernel.
    static FAIL_ALLOC: Cell<bool> = const { Cell::new(false) };
}

/// The filter's map on the host.
#[derive(Default)]
struct Map(BTreeMap<ChunkKey, Chunk>);

impl ChunkMap for Map {
    fn chunk(&self, key: &ChunkKey) -> Option<&Chunk> {
        self.0.get(key)
    }

    fn chunk_mut(&mut self, key: &ChunkKey) -> Option<&mut Chunk> {
        self.0.get_mut(key)
    }

    fn insert_new(&mut self, key: ChunkKey, chunk: Chunk) -> Result<(), NoMemory> {
        if FAIL_ALLOC.with(Cell::get) {
            return Err(NoMemory);
        }
        assert!(
            self.0.insert(key, chunk).is_none(),
            "insert_new over a chunk"
        );
        Ok(())
    }

    fn remove_chunk(&mut self, key: &ChunkKey) -> Option<Chunk> {
        self.0.remove(key)
    }

    fn remove_file(&mut self, file: &FileId) -> (u64, u64) {
        let keys: Vec<ChunkKey> = self
            .0
            .range(ChunkKey::first(file)..)
            .take_while(|(k, _)| k.file == *file)
            .map(|(k, _)| *k)
            .collect();
        let mut pages = 0;
        for k in &keys {
            pages += self.0.remove(k).map_or(0, |c| c.pages());
        }
        (keys.len() as u64, pages)
    }
}

/// A budget of `limit` nodes.
struct Nodes {
    used: Cell<u64>,
    limit: u64,
}

impl Nodes {
    fn new(limit: u64) -> Self {
        Self {
            used: Cell::new(0),
            limit,
        }
    }
}

impl Budget for Nodes {
    fn take_node(&self) -> bool {
        if self.used.get() >= self.limit {
            return false;
        }
        self.used.set(self.used.get() + 1);
        true
    }

    fn give_nodes(&self, n: u64) {
        let left = self.used.get().checked_sub(n);
        self.used
            .set(left.expect("more nodes given back than taken"));
    }
}

type Filter = PageFilter<Map>;

const A: FileId = [12, 1, 0];
const B: FileId = [12, 2, 0];
const C: FileId = [13, 0, 0];

/// The filter's counters agree with its map and with the budget; no empty
/// chunk is kept.
fn consistent(f: &Filter, budget: &Nodes) {
    let map = &f.map().0;
    assert!(
        map.values().all(|c| c.pages() > 0),
        "an empty chunk was kept"
    );
    let pages: u64 = map.values().map(Chunk::pages).sum();
    assert_eq!((f.chunks(), f.pages()), (map.len() as u64, pages));
    assert_eq!(budget.used.get(), f.chunks());
    assert!(budget.used.get() <= budget.limit);
}

#[test]
fn node_is_a_kmalloc_96_object() {
    // rb_node (3 pointers) + key (4 words) + 4 words of bits = 88 bytes.
    assert_eq!(NODE_BYTES, 96);
    assert_eq!(CHUNK_PAGES, 256);
    assert_eq!(
        [1, 8, 9, 16, 17, 33, 64, 65, 96, 97, 128, 129, 192, 193, 256, 257].map(kmalloc_size),
        [8, 8, 16, 16, 32, 64, 64, 96, 96, 128, 128, 192, 192, 256, 256, 512]
    );
}

#[test]
fn marks_pages_in_chunks() {
    let budget = Nodes::new(100);
    let mut f = Filter::default();
    assert!(!f.may_hold(&A, 0));
    for i in [0, 63, 64, 255] {
        f.mark(&A, i, &budget).unwrap();
    }
    // One chunk for pages 0..256, a second one for 256.
    assert_eq!((f.chunks(), f.pages()), (1, 4));
    f.mark(&A, 256, &budget).unwrap();
    assert_eq!((f.chunks(), f.pages()), (2, 5));
    // Marking again changes nothing.
    f.mark(&A, 63, &budget).unwrap();
    assert_eq!((f.chunks(), f.pages()), (2, 5));
    for i in [0, 63, 64, 255, 256] {
        assert!(f.may_hold(&A, i), "page {i}");
    }
    for i in [1, 62, 65, 254, 257, 512] {
        assert!(!f.may_hold(&A, i), "page {i}");
    }
    // Other files, even with the same inode number, are apart.
    assert!(!f.may_hold(&B, 0) && !f.may_hold(&C, 0));
    consistent(&f, &budget);

    f.forget(&A, 256, &budget);
    assert_eq!(
        (f.chunks(), f.pages()),
        (1, 4),
        "the emptied chunk is freed"
    );
    f.forget(&A, 1, &budget);
    f.forget(&B, 0, &budget);
    assert_eq!(
        (f.chunks(), f.pages()),
        (1, 4),
        "forgetting clear bits changes nothing"
    );
    consistent(&f, &budget);
}

#[test]
fn the_last_indexes_of_a_file() {
    let budget = Nodes::new(10);
    let mut f = Filter::default();
    for i in [u64::MAX, u64::MAX - 255, u64::MAX - 256, 1 << 40] {
        f.mark(&C, i, &budget).unwrap();
        assert!(f.may_hold(&C, i));
    }
    assert_eq!((f.chunks(), f.pages()), (3, 4));
    assert!(!f.may_hold(&C, u64::MAX - 1));
    f.forget_file(&C, &budget);
    assert_eq!((f.chunks(), f.pages()), (0, 0));
    consistent(&f, &budget);
}

#[test]
fn forget_file_drops_that_file_only() {
    let budget = Nodes::new(100);
    let mut f = Filter::default();
    for file in [A, B, C] {
        for i in (0..2000).step_by(7) {
            f.mark(&file, i, &budget).unwrap();
        }
    }
    let per_file = (0..2000).step_by(7).count() as u64;
    assert_eq!(f.pages(), 3 * per_file);
    f.forget_file(&B, &budget);
    assert_eq!(f.pages(), 2 * per_file);
    for i in (0..2000).step_by(7) {
        assert!(f.may_hold(&A, i) && f.may_hold(&C, i) && !f.may_hold(&B, i));
    }
    consistent(&f, &budget);
    // A file with nothing marked.
    f.forget_file(&[99, 0, 0], &budget);
    assert_eq!(f.pages(), 2 * per_file);
    consistent(&f, &budget);
}

#[test]
fn a_spent_budget_refuses_new_chunks_and_keeps_every_bit() {
    let budget = Nodes::new(2);
    let mut f = Filter::default();
    f.mark(&A, 0, &budget).unwrap();
    f.mark(&A, 300, &budget).unwrap();
    assert_eq!(f.mark(&A, 600, &budget), Err(Untracked::Full));
    assert_eq!(f.mark(&B, 0, &budget), Err(Untracked::Full));
    assert!(!f.may_hold(&A, 600) && !f.may_hold(&B, 0));
    // Pages of chunks already held still fit.
    f.mark(&A, 1, &budget).unwrap();
    f.mark(&A, 301, &budget).unwrap();
    for i in [0, 1, 300, 301] {
        assert!(f.may_hold(&A, i));
    }
    consistent(&f, &budget);
    // A chunk freed makes room again.
    f.forget(&A, 300, &budget);
    f.forget(&A, 301, &budget);
    f.mark(&B, 0, &budget).unwrap();
    consistent(&f, &budget);
}

#[test]
fn a_failed_allocation_changes_nothing() {
    let budget = Nodes::new(10);
    let mut f = Filter::default();
    f.mark(&A, 0, &budget).unwrap();
    FAIL_ALLOC.with(|c| c.set(true));
    let r = f.mark(&A, 1000, &budget);
    // A page of a chunk already held needs no allocation.
    let held = f.mark(&A, 5, &budget);
    FAIL_ALLOC.with(|c| c.set(false));
    assert_eq!(r, Err(Untracked::NoMemory));
    assert_eq!(held, Ok(()));
    assert!(!f.may_hold(&A, 1000));
    assert_eq!((f.chunks(), f.pages()), (1, 2));
    consistent(&f, &budget);
}

#[test]
fn take_all_hands_back_the_map_and_its_nodes() {
    let budget = Nodes::new(100);
    let mut f = Filter::default();
    for i in 0..1000 {
        f.mark(&A, i * 3, &budget).unwrap();
    }
    let chunks = f.chunks();
    let (map, n) = f.take_all();
    assert_eq!(n, chunks);
    assert_eq!(map.0.len() as u64, chunks);
    assert_eq!((f.chunks(), f.pages()), (0, 0));
    assert!(!f.may_hold(&A, 0));
    budget.give_nodes(n);
    consistent(&f, &budget);
}

/// Marks `page`, with the node allocation failing if `fail`.
fn mark(f: &mut Filter, page: (FileId, u64), budget: &Nodes, fail: bool) -> Result<(), Untracked> {
    FAIL_ALLOC.with(|c| c.set(fail));
    let r = f.mark(&page.0, page.1, budget);
    FAIL_ALLOC.with(|c| c.set(false));
    r
}

/// The front end's use of the filter, step by step, against a model of the
/// host's pool (which pages it holds) and of the bits. After every step:
/// every page the host holds is marked (no get of a possible hit is ever
/// skipped), the bits are exactly the model's, and the counters and the
/// budget agree with the map.
/// With `failing`, a third of the node allocations fail.
fn run_model(seed: u64, limit: u64, failing: bool, steps: usize) {
    // Deterministic, so that a failure reproduces from its seed.
    let mut rng = vtmem_testkit::Rng::new(seed);
    let budget = Nodes::new(limit);
    let mut f = Filter::default();
    let mut host: BTreeSet<(FileId, u64)> = BTreeSet::new();
    let mut bits: BTreeSet<(FileId, u64)> = BTreeSet::new();
    let files = [A, B, C];
    let (mut skipped, mut refused, mut hits) = (0u64, 0u64, 0u64);
    for step in 0..steps {
        let file = files[rng.below(3) as usize];
        // Few pages, so that they meet again: some around a chunk
        // boundary, some at the end of the index space, some far away.
        let index = match rng.below(8) {
            0 => u64::MAX - rng.below(4),
            1 => (1 << 40) + rng.below(4),
            2 => CHUNK_PAGES - 6 + rng.below(12),
            _ => rng.below(72),
        };
        let page = (file, index);
        match rng.below(1000) {
            // Put: marked first; if it cannot be, the page is not put (and
            // the host has no copy of it: its bit was clear).
            0..=399 => match mark(&mut f, page, &budget, failing && rng.below(3) == 0) {
                Ok(()) => {
                    bits.insert(page);
                    // The host stores it, or refuses it (dropping any older
                    // copy all the same).
                    if rng.below(10) == 0 {
                        host.remove(&page);
                    } else {
                        host.insert(page);
                    }
                }
                Err(_) => {
                    refused += 1;
                    assert!(
                        !host.contains(&page),
                        "step {step}: unmarked page on the host"
                    );
                }
            },
            // Put dropped for want of a batch: FLUSH_PAGE instead.
            400..=449 => {
                f.forget(&file, index, &budget);
                bits.remove(&page);
                host.remove(&page);
            }
            // Get.
            450..=749 => {
                if !f.may_hold(&file, index) {
                    skipped += 1;
                    assert!(!host.contains(&page), "step {step}: skipped a hit");
                } else if rng.below(20) == 0 {
                    // The get failed (device error, stall): nothing is
                    // known, the bit stays.
                } else {
                    // Exclusive: a hit removes the page, a miss says it is
                    // gone.
                    hits += u64::from(host.remove(&page));
                    f.forget(&file, index, &budget);
                    bits.remove(&page);
                }
            }
            // Invalidate a page.
            750..=849 => {
                f.forget(&file, index, &budget);
                bits.remove(&page);
                host.remove(&page);
            }
            // Invalidate a file (truncate, delete, hole punch, O_DIRECT).
            850..=879 => {
                f.forget_file(&file, &budget);
                bits.retain(|p| p.0 != file);
                host.retain(|p| p.0 != file);
            }
            // The host evicts a page: its bit stays (a miss to come).
            880..=997 => {
                if let Some(&p) = host.iter().nth(rng.below(host.len() as u64 + 1) as usize) {
                    host.remove(&p);
                }
            }
            // Unmount, or a stale pool replaced: the device pool is gone.
            _ => {
                let (map, n) = f.take_all();
                drop(map);
                budget.give_nodes(n);
                bits.clear();
                host.clear();
            }
        }
        for p in &host {
            assert!(
                f.may_hold(&p.0, p.1),
                "step {step}: host page {p:?} not marked"
            );
        }
        for p in &bits {
            assert!(f.may_hold(&p.0, p.1), "step {step}: bit {p:?} lost");
        }
        assert_eq!(f.pages(), bits.len() as u64, "step {step}");
        consistent(&f, &budget);
    }
    // The run exercised what it is about.
    assert!(
        skipped > 0 && hits > 0,
        "seed {seed}: skipped {skipped}, hits {hits}"
    );
    if limit < 8 || failing {
        assert!(refused > 0, "seed {seed}: no page was ever refused");
    }
}

#[test]
fn model_unbounded() {
    for seed in 1..=20 {
        run_model(seed * 0x9e37_79b9, u64::MAX, false, 4000);
    }
}

#[test]
fn model_with_a_small_budget() {
    for seed in 1..=20 {
        run_model(seed * 0x85eb_ca6b, 3, false, 4000);
    }
}

#[test]
fn model_with_failing_allocations() {
    for seed in 1..=20 {
        run_model(seed * 0xc2b2_ae35, 1000, true, 4000);
    }
}
