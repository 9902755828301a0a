// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Store throughput and footprint.
//!
//! `cargo bench -p vtmem-store --bench store` (add `-- --quick`, or set
//! `VTMEM_BENCH_QUICK=1`, for a shorter run).
//!
//! For zero, duplicate, compressible (pages cut from files shipped with the
//! OS) and random pages it measures puts and gets per second through the
//! store, and in the same run a baseline that only hashes (xxh3-128),
//! compresses (LZ4) and copies the same pages: the ratio is what the
//! store's bookkeeping costs. It also reports host and metadata bytes per
//! stored page, compression and dedup ratios, and one versus two threads
//! putting for two clients. `VTMEM_BENCH_KINDS=random,zero` limits the
//! kinds measured.
//!
//! Timing: each repetition replays the same work; the time of every batch
//! of 256 pages is the minimum over repetitions, which filters out other
//! processes on a shared machine. Both the baseline and the store copy into
//! memory freshly taken from the allocator in 64 KiB chunks, so both pay
//! first-touch page faults; on random (raw) pages those faults are most of
//! the store's extra time (with `MALLOC_TRIM_THRESHOLD_=4000000000` the
//! allocator keeps freed memory and the ratio rises to about 0.8). Gets of
//! the baseline read its arena in order, the store's slots are spread over
//! its shards, which shows on random pages (a plain 4 KiB copy).
//!
//! `VTMEM_BENCH_STATE=DIR` also runs every repetition through a store
//! with a crash-safe state in subdirectories of `DIR` (a tmpfs, such as
//! `/dev/shm/vtmem-bench`, is what vtmemd would use): page data in the
//! arena, metadata journaled. Baseline, heap store and state store
//! alternate, and it reports the state store's rates against both, the
//! state's own metadata per page (journal, snapshot, chunk directory and
//! clients file, as the files hold memory) and the time `Store::recover`
//! takes to rebuild the last repetition's store.

use std::hint::black_box;
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::json;
use vtmem_store::*;
use vtmem_testkit::random_page;
use xxhash_rust::xxh3::xxh3_128;

const LZ4_BOUND: usize = lz4_flex::block::get_maximum_output_size(PAGE_SIZE);

fn random_pages(n: usize, seed: u64) -> Vec<Page> {
    (0..n as u64).map(|i| random_page(seed << 32 | i)).collect()
}

fn same_filled(p: &Page) -> bool {
    let first = &p[..8];
    p.chunks_exact(8).all(|w| w == first)
}

/// Pages cut from real files: shared libraries, binaries, documentation.
fn file_pages(n: usize) -> Vec<Page> {
    let mut files = Vec::new();
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/bin",
        "/usr/share/doc",
        "/usr/lib",
        "/usr/share",
    ] {
        collect_files(Path::new(dir), &mut files, 3, 4000);
    }
    files.sort();
    files.dedup();
    // Interleave sources so every kind of file is represented.
    let mut pages = Vec::with_capacity(n);
    let per_file = 64;
    let mut round = 0;
    while pages.len() < n && round < 64 {
        let before = pages.len();
        for f in &files {
            if pages.len() >= n {
                break;
            }
            let Ok(data) = std::fs::read(f) else {
                continue;
            };
            let chunks: Vec<&[u8]> = data.chunks_exact(PAGE_SIZE).collect();
            for c in chunks.iter().skip(round * per_file).take(per_file) {
                let mut p = [0u8; PAGE_SIZE];
                p.copy_from_slice(c);
                if !same_filled(&p) {
                    pages.push(p);
                }
                if pages.len() >= n {
                    break;
                }
            }
        }
        if pages.len() == before {
            break;
        }
        round += 1;
    }
    pages
}

fn collect_files(dir: &Path, out: &mut Vec<std::path::PathBuf>, depth: u32, max: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if out.len() >= max {
            return;
        }
        let Ok(ft) = e.file_type() else { continue };
        let path = e.path();
        if ft.is_file() {
            if e.metadata().is_ok_and(|m| m.len() >= PAGE_SIZE as u64) {
                out.push(path);
            }
        } else if ft.is_dir() && depth > 0 {
            collect_files(&path, out, depth - 1, max);
        }
    }
}

fn handle(i: usize) -> Handle {
    vtmem_testkit::handle(0, (i / 65536) as u64, i as u64)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Pages per timed batch.
const BATCH: usize = 256;

/// Per-batch minimum over repetitions. The machine may be shared: the
/// minimum of each short batch filters out the time other processes took,
/// and every repetition replays the same work, batch by batch.
#[derive(Default)]
struct BatchMin(Vec<Duration>);

impl BatchMin {
    fn add(&mut self, times: Vec<Duration>) {
        if self.0.is_empty() {
            self.0 = times;
        } else {
            for (m, t) in self.0.iter_mut().zip(times) {
                *m = (*m).min(t);
            }
        }
    }

    fn total(&self) -> Duration {
        self.0.iter().sum()
    }
}

/// Runs `f` on each batch of `n` items, timing each batch.
fn timed_batches(n: usize, mut f: impl FnMut(std::ops::Range<usize>)) -> Vec<Duration> {
    (0..n)
        .step_by(BATCH)
        .map(|start| {
            let t = Instant::now();
            f(start..(start + BATCH).min(n));
            t.elapsed()
        })
        .collect()
}

/// Baseline put: hash, compress into a fixed buffer, copy into memory
/// taken in 64 KiB chunks from the system allocator, as the store takes it
/// (so both pay the same for fresh memory).
fn baseline_put(
    pages: &[Page],
    arena: &mut Vec<Box<[u8]>>,
    locs: &mut Vec<(usize, usize, usize)>,
) -> Vec<Duration> {
    let mut buf = [0u8; LZ4_BOUND];
    let mut at = CHUNK_BYTES;
    arena.clear();
    locs.clear();
    timed_batches(pages.len(), |range| {
        for p in &pages[range] {
            black_box(xxh3_128(p));
            let src: &[u8] = match lz4_flex::block::compress_into(p, &mut buf) {
                Ok(n) if n <= RAW_THRESHOLD => &buf[..n],
                _ => p,
            };
            if at + src.len() > CHUNK_BYTES {
                arena.push(vec![0u8; CHUNK_BYTES].into_boxed_slice());
                at = 0;
            }
            let chunk = arena.len() - 1;
            arena[chunk][at..at + src.len()].copy_from_slice(src);
            locs.push((chunk, at, src.len()));
            at += src.len();
        }
    })
}

/// Baseline get: decompress (or copy) into an output page.
fn baseline_get(arena: &[Box<[u8]>], locs: &[(usize, usize, usize)]) -> Vec<Duration> {
    let mut out = [0u8; PAGE_SIZE];
    timed_batches(locs.len(), |range| {
        for &(chunk, at, len) in &locs[range] {
            let src = &arena[chunk][at..at + len];
            if len == PAGE_SIZE {
                out.copy_from_slice(src);
            } else {
                lz4_flex::block::decompress_into(src, &mut out).unwrap();
            }
            black_box(&out);
        }
    })
}

struct KindResult {
    name: &'static str,
    pages: usize,
    put: f64,
    get: f64,
    base_put: f64,
    base_get: f64,
    host_per_page: f64,
    meta_per_page: f64,
    compression: f64,
    dedup: f64,
    fragmentation: f64,
    /// The same pages through a store with a crash-safe state.
    state: Option<StateResult>,
}

struct StateResult {
    put: f64,
    get: f64,
    /// The state's own files (journal, snapshot, chunk directory), per page.
    meta_per_page: f64,
    /// `Store::recover` of the last repetition's state.
    recovery: Duration,
}

/// Bytes of memory the files of the state directory `dir` hold, but the
/// arena's (page data).
fn state_metadata_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name() != "arena")
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Puts then gets every page through `store`, timing each batch; checks a
/// sample of pages outside the timed loops.
fn run_store(
    name: &str,
    store: &std::sync::Arc<Store>,
    pages: &[Page],
    put: &mut BatchMin,
    get: &mut BatchMin,
) {
    let n = pages.len();
    let c = store
        .add_client("bench", ClientConfig::default())
        .unwrap()
        .data();
    c.new_pool(PoolSpec::persistent()).unwrap();
    put.add(timed_batches(n, |range| {
        for i in range {
            c.put(&handle(i), &pages[i], false).unwrap();
        }
    }));
    let mut out = [0u8; PAGE_SIZE];
    get.add(timed_batches(n, |range| {
        for i in range {
            black_box(c.get(&handle(i), &mut out).unwrap());
        }
    }));
    for i in (0..n).step_by(97) {
        assert!(c.get(&handle(i), &mut out).unwrap());
        assert!(out == pages[i], "{name}: page {i} differs");
    }
}

fn measure(name: &'static str, pages: &[Page], reps: usize) -> KindResult {
    let n = pages.len();
    let mut locs = Vec::with_capacity(n);
    let (mut base_put, mut base_get) = (BatchMin::default(), BatchMin::default());
    let (mut put, mut get) = (BatchMin::default(), BatchMin::default());
    let (mut state_put, mut state_get) = (BatchMin::default(), BatchMin::default());
    let mut last_stats = None;
    let mut state = None;
    let state_base = std::env::var_os("VTMEM_BENCH_STATE").map(std::path::PathBuf::from);
    let config = || StoreConfig {
        host_limit: u64::MAX,
    };
    // The baseline, the store in the heap and the store with a state
    // alternate, so that all three see the same conditions.
    for rep in 0..reps {
        let mut arena = Vec::new();
        base_put.add(baseline_put(pages, &mut arena, &mut locs));
        base_get.add(baseline_get(&arena, &locs));
        drop(arena);

        let store = Store::new(config());
        run_store(name, &store, pages, &mut put, &mut get);
        last_stats = Some(store.stats());
        drop(store);

        let Some(d) = state_base.as_ref().map(|b| b.join(format!("{name}-{rep}"))) else {
            continue;
        };
        let _ = std::fs::remove_dir_all(&d);
        if let Some(base) = d.parent() {
            std::fs::create_dir_all(base).expect("VTMEM_BENCH_STATE directory");
        }
        let store = Store::create(&d, config()).expect("state directory");
        run_store(name, &store, pages, &mut state_put, &mut state_get);
        if rep + 1 == reps {
            let meta = state_metadata_bytes(&d) as f64 / n as f64;
            drop(store);
            let t = Instant::now();
            let (recovered, r) = Store::recover(&d, config()).expect("recovery");
            let took = t.elapsed();
            assert_eq!(r.pages, n as u64, "{name}: pages recovered");
            drop(recovered);
            state = Some(StateResult {
                put: rate(n, state_put.total()),
                get: rate(n, state_get.total()),
                meta_per_page: meta,
                recovery: took,
            });
        } else {
            drop(store);
        }
        let _ = std::fs::remove_dir_all(&d);
    }
    let st = last_stats.unwrap();
    KindResult {
        name,
        pages: n,
        put: rate(n, put.total()),
        get: rate(n, get.total()),
        base_put: rate(n, base_put.total()),
        base_get: rate(n, base_get.total()),
        host_per_page: st.host_used as f64 / n as f64,
        meta_per_page: st.metadata_bytes_per_page,
        compression: st.compression_ratio,
        dedup: st.dedup_ratio,
        fragmentation: st.fragmentation,
        state,
    }
}

/// Metadata per page of an ephemeral pool (adds the LRU queue).
fn ephemeral_metadata(pages: &[Page]) -> f64 {
    let store = Store::new(StoreConfig {
        host_limit: u64::MAX,
    });
    let c = store
        .add_client("eph", ClientConfig::default())
        .unwrap()
        .data();
    c.new_pool(PoolSpec::ephemeral()).unwrap();
    for (i, p) in pages.iter().enumerate() {
        c.put(&handle(i), p, false).unwrap();
    }
    store.stats().metadata_bytes_per_page
}

/// Puts per second of two clients, each with its share of `pages`, on one
/// thread (one client after the other) or on two threads at once.
fn multi_client(pages: &[Page], threads: usize, reps: usize) -> f64 {
    let half = pages.len() / 2;
    let parts = [&pages[..half], &pages[half..2 * half]];
    let mut mins = [BatchMin::default(), BatchMin::default()];
    for _ in 0..reps {
        let store = Store::new(StoreConfig {
            host_limit: u64::MAX,
        });
        let clients: Vec<DataHandle> = (0..2)
            .map(|i| {
                let c = store
                    .add_client(&format!("vm{i}"), ClientConfig::default())
                    .unwrap()
                    .data();
                c.new_pool(PoolSpec::persistent()).unwrap();
                c
            })
            .collect();
        let run = |c: &DataHandle, part: &[Page]| {
            timed_batches(part.len(), |range| {
                for i in range {
                    c.put(&handle(i), &part[i], false).unwrap();
                }
            })
        };
        if threads == 1 {
            let mut times = run(&clients[0], parts[0]);
            times.extend(run(&clients[1], parts[1]));
            mins[0].add(times);
        } else {
            let barrier = Barrier::new(2);
            let times: Vec<Vec<Duration>> = std::thread::scope(|s| {
                let hs: Vec<_> = clients
                    .iter()
                    .zip(parts)
                    .map(|(c, part)| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            barrier.wait();
                            run(c, part)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (m, t) in mins.iter_mut().zip(times) {
                m.add(t);
            }
        }
    }
    let elapsed = mins.iter().map(BatchMin::total).max().unwrap_or_default();
    rate(2 * half, elapsed)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var("VTMEM_BENCH_QUICK").is_ok_and(|v| v != "0");
    let n = if quick { 4096 } else { 16384 };
    let reps = if quick { 3 } else { 5 };
    let started = Instant::now();

    let mut compressible = file_pages(n);
    let from_files = compressible.len();
    if compressible.len() < n {
        eprintln!(
            "only {} pages found in OS files; topping up with generated text",
            compressible.len()
        );
        let words = b"a generated page of text, compressible like documentation. ";
        while compressible.len() < n {
            let k = compressible.len();
            let mut p = [0u8; PAGE_SIZE];
            for (i, b) in p.iter_mut().enumerate() {
                *b = words[(i * 3 + k) % words.len()];
            }
            p[..8].copy_from_slice(&(k as u64).to_le_bytes());
            compressible.push(p);
        }
    }
    let zero = vec![[0u8; PAGE_SIZE]; n];
    let distinct: Vec<Page> = compressible.iter().take(16).copied().collect();
    let duplicate: Vec<Page> = (0..n).map(|i| distinct[i % distinct.len()]).collect();
    let random = random_pages(n, 0x5EED);

    let kinds = [
        ("zero", &zero),
        ("duplicate", &duplicate),
        ("compressible", &compressible),
        ("random", &random),
    ];
    // VTMEM_BENCH_KINDS=random,zero runs only those kinds.
    let only = std::env::var("VTMEM_BENCH_KINDS").ok();
    let results: Vec<KindResult> = kinds
        .iter()
        .filter(|(name, _)| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|k| k == *name))
        })
        .map(|(name, pages)| measure(name, pages, reps))
        .collect();
    let eph_meta = ephemeral_metadata(&compressible);
    let mt1 = multi_client(&compressible, 1, reps);
    let mt2 = multi_client(&compressible, 2, reps);

    println!(
        "vtmem store bench: {n} pages per kind ({from_files} compressible pages from OS files), best of {reps}"
    );
    println!(
        "{:<13} {:>10} {:>10} {:>7} {:>10} {:>10} {:>7} {:>9} {:>9} {:>6} {:>6} {:>6}",
        "kind",
        "put/s",
        "base put/s",
        "ratio",
        "get/s",
        "base get/s",
        "ratio",
        "host B/pg",
        "meta B/pg",
        "compr",
        "dedup",
        "frag"
    );
    let mut json_kinds = serde_json::Map::new();
    for r in &results {
        println!(
            "{:<13} {:>10.0} {:>10.0} {:>7.2} {:>10.0} {:>10.0} {:>7.2} {:>9.1} {:>9.1} {:>6.2} {:>6.1} {:>6.3}",
            r.name,
            r.put,
            r.base_put,
            r.put / r.base_put,
            r.get,
            r.base_get,
            r.get / r.base_get,
            r.host_per_page,
            r.meta_per_page,
            r.compression,
            r.dedup,
            r.fragmentation,
        );
        json_kinds.insert(
            r.name.to_string(),
            json!({
                "pages": r.pages,
                "put_pages_per_s": r.put.round(),
                "baseline_put_pages_per_s": r.base_put.round(),
                "put_ratio": (r.put / r.base_put * 1000.0).round() / 1000.0,
                "get_pages_per_s": r.get.round(),
                "baseline_get_pages_per_s": r.base_get.round(),
                "get_ratio": (r.get / r.base_get * 1000.0).round() / 1000.0,
                "host_bytes_per_page": (r.host_per_page * 10.0).round() / 10.0,
                "metadata_bytes_per_page": (r.meta_per_page * 10.0).round() / 10.0,
                "compression_ratio": (r.compression * 1000.0).round() / 1000.0,
                "dedup_ratio": (r.dedup * 1000.0).round() / 1000.0,
                "fragmentation": (r.fragmentation * 1000.0).round() / 1000.0,
            }),
        );
    }
    if results.iter().any(|r| r.state.is_some()) {
        println!("with a crash-safe state (same run, alternating with the heap store):");
        println!(
            "{:<13} {:>10} {:>7} {:>9} {:>10} {:>7} {:>9} {:>9} {:>11}",
            "kind",
            "put/s",
            "ratio",
            "vs heap",
            "get/s",
            "ratio",
            "vs heap",
            "state B/pg",
            "recovery ms"
        );
    }
    for r in &results {
        if let Some(s) = &r.state {
            println!(
                "{:<13} {:>10.0} {:>7.2} {:>9.2} {:>10.0} {:>7.2} {:>9.2} {:>9.1} {:>11.1}",
                r.name,
                s.put,
                s.put / r.base_put,
                s.put / r.put,
                s.get,
                s.get / r.base_get,
                s.get / r.get,
                s.meta_per_page,
                s.recovery.as_secs_f64() * 1000.0
            );
            if let Some(serde_json::Value::Object(k)) = json_kinds.get_mut(r.name) {
                k.insert(
                    "state".into(),
                    json!({
                        "put_pages_per_s": s.put.round(),
                        "put_ratio": (s.put / r.base_put * 1000.0).round() / 1000.0,
                        "put_vs_heap": (s.put / r.put * 1000.0).round() / 1000.0,
                        "get_pages_per_s": s.get.round(),
                        "get_ratio": (s.get / r.base_get * 1000.0).round() / 1000.0,
                        "get_vs_heap": (s.get / r.get * 1000.0).round() / 1000.0,
                        "metadata_bytes_per_page": (s.meta_per_page * 10.0).round() / 10.0,
                        "recovery_ms": (s.recovery.as_secs_f64() * 10000.0).round() / 10.0,
                    }),
                );
            }
        }
    }
    println!("ephemeral pool, compressible: {eph_meta:.1} metadata B/page (with LRU queue)");
    println!(
        "two clients putting compressible pages: 1 thread {mt1:.0}/s, 2 threads {mt2:.0}/s (x{:.2})",
        mt2 / mt1
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?").to_string();
    println!(
        "elapsed {:.1} s, {} CPUs, load average {load}",
        started.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let out = json!({
        "bench": "store",
        "pages_per_kind": n,
        "compressible_pages_from_files": from_files,
        "kinds": json_kinds,
        "ephemeral_metadata_bytes_per_page": (eph_meta * 10.0).round() / 10.0,
        "multi_client_put_pages_per_s": { "threads_1": mt1.round(), "threads_2": mt2.round(), "speedup": (mt2 / mt1 * 100.0).round() / 100.0 },
        "elapsed_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "load_average": load,
    });
    println!("{out}");
}
