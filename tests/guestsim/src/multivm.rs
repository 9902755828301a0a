// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The benchmark behind `vtmem-guestsim multivm`: N VMs in one dedup group,
//! one thread and one socket each, storing realistic page mixes in a fresh
//! `vtmemd` per step. Reports aggregate throughput, per-core efficiency
//! against a single-core hash + compress + copy loop measured in the same
//! run, host bytes per guest page, dedup and compression ratios, and the
//! round-trip latency of batches under load.
//!
//! Each VM's pages (interleaved, same layout in every VM):
//!
//! - 40% from a common "OS image" set (pages of real files: shared
//!   libraries, `/usr/bin` binaries, text), identical in every VM;
//! - 12% zero pages;
//! - 18% private file-like pages: real file pages with 16 bytes stamped
//!   with the VM and page number (unique, but compress like file pages);
//! - 30% anonymous-like pages: pseudo-random cache lines mixed with zero
//!   and repeated lines (LZ4 compresses them roughly 2:1).

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use vtmem_api::Request;
use vtmem_protocol::{Handle, Op, PoolSpec, Status, PAGE_SIZE};
use vtmem_testkit::Rng;
use xxhash_rust::xxh3::xxh3_128;

use crate::daemon;
use crate::pages::{checksum, Corpus};
use crate::queue::PageSource;
use crate::vm::{Vm, VmOptions};
use crate::{Error, Page, Result};

/// VM counts measured by default.
pub const DEFAULT_VMS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];
/// Operations per request.
pub const BATCH: usize = 32;
/// Requests in flight per VM.
pub const DEPTH: usize = 8;
/// Percent of each VM's pages from the common OS-image set.
pub const SHARED_PCT: u64 = 40;
/// Percent of zero pages.
pub const ZERO_PCT: u64 = 12;
/// Percent of private file-like pages.
pub const PRIVATE_FILE_PCT: u64 = 18;
/// Largest pool of distinct file pages the private pages are drawn from.
const MAX_FILE_POOL: usize = 32768;

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct MultiVmOptions {
    /// VM counts, one step each.
    pub vms: Vec<usize>,
    /// Pages each VM stores (default 1024 quick, 8192 full).
    pub pages_per_vm: Option<usize>,
    /// Short run.
    pub quick: bool,
    /// The daemon binary (found automatically when `None`).
    pub vtmemd: Option<PathBuf>,
}

/// What the pages were made of.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PageMix {
    /// Percent shared across VMs (common OS-image set).
    pub shared_pct: u64,
    /// Percent zero pages.
    pub zero_pct: u64,
    /// Percent private file-like pages.
    pub private_file_pct: u64,
    /// Percent anonymous-like pages.
    pub anon_pct: u64,
    /// Distinct real-file pages loaded (shared set plus private pool).
    pub file_pages: usize,
    /// Of those, from `/usr/bin`.
    pub bin_pages: usize,
    /// Of those, synthetic text pages used because files ran out.
    pub synthetic_pages: usize,
}

/// The single-core reference: XXH3-128 + LZ4 + 4 KiB copy per page.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Limit {
    /// Pages per second on one core (best of the measurements).
    pub pages_per_s: f64,
    /// Every measurement, pages per second (start and end of the run).
    pub samples: Vec<f64>,
}

/// Figures of one VM count.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Step {
    /// VMs, one thread and one socket each.
    pub vms: usize,
    /// Pages each VM stored.
    pub pages_per_vm: usize,
    /// Put and get phases repeated this often (fresh pool each round).
    pub rounds: usize,
    /// Puts per second, all VMs together.
    pub put_per_s: f64,
    /// Gets per second, all VMs together (every page checked afterwards).
    pub get_per_s: f64,
    /// CPU cores busy during puts (daemon plus simulated guests).
    pub put_cores: f64,
    /// CPU cores busy during gets.
    pub get_cores: f64,
    /// (puts/s / put_cores) / limit.
    pub put_efficiency: f64,
    /// (gets/s / get_cores) / limit.
    pub get_efficiency: f64,
    /// (puts/s / online CPUs) / limit.
    pub put_efficiency_all_cpus: f64,
    /// Gets read back and compared.
    pub verified_gets: u64,
    /// Pages the store held after the first round of puts.
    pub stored_pages: u64,
    /// Of those, zero pages.
    pub zero_pages: u64,
    /// Distinct contents held.
    pub unique_pages: u64,
    /// `host_used` after the first round of puts.
    pub host_used: u64,
    /// host_used / stored_pages.
    pub host_bytes_per_page: f64,
    /// From `status`.
    pub dedup_ratio: f64,
    /// From `status`.
    pub compression_ratio: f64,
    /// Batch round trip during puts, median, microseconds.
    pub put_p50_us: f64,
    /// 99th percentile.
    pub put_p99_us: f64,
    /// Batch round trip during gets, median, microseconds.
    pub get_p50_us: f64,
    /// 99th percentile.
    pub get_p99_us: f64,
}

/// Everything measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MultiVmReport {
    /// `--quick` run.
    pub quick: bool,
    /// Online CPUs.
    pub cpus: usize,
    /// Operations per request.
    pub batch: usize,
    /// Requests in flight per VM.
    pub depth: usize,
    /// Page mix.
    pub mix: PageMix,
    /// The single-core reference.
    pub limit: Limit,
    /// One per VM count.
    pub steps: Vec<Step>,
    /// Wall time, seconds.
    pub seconds: f64,
}

fn rate(ops: u64, d: Duration) -> f64 {
    ops as f64 / d.as_secs_f64().max(1e-9)
}

fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Pages of regular files in `dir` (not recursive), all-zero pages skipped.
fn read_dir_pages(dir: &Path, want: usize) -> Vec<Box<Page>> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files {
        if out.len() >= want {
            break;
        }
        if !fs::symlink_metadata(&f).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let Ok(file) = fs::File::open(&f) else {
            continue;
        };
        let mut data = Vec::new();
        let left = (want - out.len()) * PAGE_SIZE;
        if file.take(left as u64).read_to_end(&mut data).is_err() {
            continue;
        }
        for chunk in data.chunks(PAGE_SIZE) {
            let mut p: Box<Page> = Box::new([0u8; PAGE_SIZE]);
            p[..chunk.len()].copy_from_slice(chunk);
            if p.iter().any(|&b| b != 0) {
                out.push(p);
            }
        }
    }
    out.truncate(want);
    out
}

/// Real-file pages without zero pages: about a third from `/usr/bin`, the
/// rest from [`Corpus::load`] (shared libraries and text).
fn file_pages(n: usize) -> (Vec<Box<Page>>, PageMix) {
    let bin = read_dir_pages(Path::new("/usr/bin"), n / 3);
    let corpus = Corpus::load(n - bin.len() + n / 8);
    let mut mix = PageMix {
        shared_pct: SHARED_PCT,
        zero_pct: ZERO_PCT,
        private_file_pct: PRIVATE_FILE_PCT,
        anon_pct: 100 - SHARED_PCT - ZERO_PCT - PRIVATE_FILE_PCT,
        bin_pages: bin.len(),
        synthetic_pages: corpus.mix.synthetic,
        ..PageMix::default()
    };
    let rest: Vec<Box<Page>> = corpus
        .pages
        .into_iter()
        .filter(|p| p.iter().any(|&b| b != 0))
        .collect();
    // Interleave so the shared set (the first pages) has both kinds.
    let mut out = Vec::with_capacity(n);
    let (mut b, mut r) = (bin.into_iter(), rest.into_iter());
    while out.len() < n {
        let next = if out.len() % 3 == 0 {
            b.next().or_else(|| r.next())
        } else {
            r.next().or_else(|| b.next())
        };
        match next {
            Some(p) => out.push(p),
            None => break,
        }
    }
    mix.file_pages = out.len();
    (out, mix)
}

/// An anonymous-like page: per 64-byte line, half random, 30% zero, 20% a
/// repeat of the previous line.
fn anon_page(seed: u64) -> Box<Page> {
    let mut p: Box<Page> = Box::new([0u8; PAGE_SIZE]);
    let mut rng = Rng::new(mix64(seed));
    let mut next = || rng.next_u64();
    for line in 0..PAGE_SIZE / 64 {
        let r = next() % 10;
        let (head, tail) = p.split_at_mut(line * 64);
        let cur = &mut tail[..64];
        if r < 5 || line == 0 {
            for w in cur.chunks_exact_mut(8) {
                w.copy_from_slice(&next().to_le_bytes());
            }
        } else if r < 8 {
            // zero line
        } else {
            cur.copy_from_slice(&head[head.len() - 64..]);
        }
    }
    p
}

/// Which kind of page slot `k` of a VM holds (same layout in every VM).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Shared,
    Zero,
    PrivateFile,
    Anon,
}

fn kind(k: usize) -> Kind {
    let b = mix64(k as u64 ^ 0x5eed) % 100;
    if b < SHARED_PCT {
        Kind::Shared
    } else if b < SHARED_PCT + ZERO_PCT {
        Kind::Zero
    } else if b < SHARED_PCT + ZERO_PCT + PRIVATE_FILE_PCT {
        Kind::PrivateFile
    } else {
        Kind::Anon
    }
}

/// The file pages: the first `shared` are the OS-image set.
struct Files {
    pages: Vec<Box<Page>>,
    shared: usize,
}

/// Calls `f` with each page of VM `vm` in order.
fn vm_pages(
    files: &Files,
    vm: usize,
    n: usize,
    mut f: impl FnMut(usize, &Page) -> Result<()>,
) -> Result<()> {
    let private = files.pages.len() - files.shared;
    let (mut si, mut pi) = (0usize, 0usize);
    let zero: Box<Page> = Box::new([0u8; PAGE_SIZE]);
    for k in 0..n {
        match kind(k) {
            Kind::Shared => {
                f(k, &files.pages[si % files.shared.max(1)])?;
                si += 1;
            }
            Kind::Zero => f(k, &zero)?,
            Kind::PrivateFile => {
                let j = (vm * 7919 + pi) % private.max(1);
                let mut p = files.pages[files.shared + j].clone();
                p[..8].copy_from_slice(&(vm as u64).to_le_bytes());
                p[8..16].copy_from_slice(&(pi as u64 | 1 << 63).to_le_bytes());
                f(k, &p)?;
                pi += 1;
            }
            Kind::Anon => f(k, &anon_page((vm as u64) << 32 | k as u64))?,
        }
    }
    Ok(())
}

/// Single-core hash + compress + copy loop over `pages` for about `secs`.
fn measure_limit(pages: &[Box<Page>], secs: f64) -> f64 {
    let mut buf = vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)];
    let mut dst: Vec<Box<Page>> = (0..pages.len().min(1024))
        .map(|_| Box::new([0u8; PAGE_SIZE]))
        .collect();
    let t = Instant::now();
    let mut done = 0u64;
    let mut acc = 0u128;
    while t.elapsed().as_secs_f64() < secs {
        for (i, p) in pages.iter().enumerate() {
            acc ^= xxh3_128(&p[..]);
            acc ^= lz4_flex::block::compress_into(&p[..], &mut buf).unwrap_or(0) as u128;
            let d = &mut dst[i % 1024.min(pages.len())];
            d.copy_from_slice(&p[..]);
            std::hint::black_box(&d);
        }
        done += pages.len() as u64;
    }
    std::hint::black_box(acc);
    rate(done, t.elapsed())
}

/// CPU seconds used by this process (all threads).
fn self_cpu() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds used by process `pid` (from `/proc/PID/stat`).
pub(crate) fn proc_cpu(pid: u32) -> f64 {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: field 3 is index 0; utime is 14, stime 15.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

fn total_cpu(daemon_pid: Option<u32>) -> f64 {
    self_cpu() + daemon_pid.map(proc_cpu).unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn handle(pool: u32, i: usize) -> Handle {
    vtmem_testkit::handle(pool, 1, i as u64)
}

/// Pipelines `reqs`, recording each request's round trip; counts
/// operations that did not return OK.
fn timed_pipeline(
    vm: &Vm,
    reqs: Vec<(Vec<Op>, PageSource<'static>)>,
    lat: &mut Vec<Duration>,
) -> Result<usize> {
    let mut q = vm.queue(0);
    let depth = DEPTH.min(q.depth()).max(1);
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut bad = 0usize;
    let mut done = |c: crate::Completion, sent: &mut HashMap<u64, Instant>| -> Result<()> {
        if let Some(t) = sent.remove(&c.ticket.0) {
            lat.push(t.elapsed());
        }
        bad += c.statuses()?.iter().filter(|s| **s != Status::Ok).count();
        Ok(())
    };
    for (ops, src) in reqs {
        while sent.len() >= depth {
            let c = q.wait_any()?;
            done(c, &mut sent)?;
        }
        let t = Instant::now();
        let ticket = q.submit_with(&ops, &src)?;
        sent.insert(ticket.0, t);
        q.kick()?;
    }
    while !sent.is_empty() {
        let c = q.wait_any()?;
        done(c, &mut sent)?;
    }
    Ok(bad)
}

fn requests(
    vm: &Vm,
    n: usize,
    base: u64,
    make: impl Fn(usize) -> Op,
) -> Vec<(Vec<Op>, PageSource<'static>)> {
    let gp = vm.guest_pages();
    (0..n)
        .step_by(BATCH)
        .map(|start| {
            let end = (start + BATCH).min(n);
            let ops = (start..end).map(&make).collect();
            let addrs = (start..end).map(|i| gp.addr(base + i as u64)).collect();
            (ops, PageSource::InGuest(addrs))
        })
        .collect()
}

/// What one VM thread hands back.
#[derive(Default)]
struct VmResult {
    put_lat: Vec<Duration>,
    get_lat: Vec<Duration>,
    verified: u64,
}

fn status_f64(st: &Value, key: &str) -> f64 {
    st.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

fn status_u64(st: &Value, key: &str) -> u64 {
    st.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Runs one VM count against a fresh daemon.
fn step(
    opts: &MultiVmOptions,
    files: &Arc<Files>,
    vms: usize,
    n: usize,
    min_ops: usize,
    limit: f64,
    cpus: usize,
) -> Result<Step> {
    let specs: Vec<String> = (0..vms)
        .map(|v| format!("vm{v},dedup-group=os-image"))
        .collect();
    let binary = daemon::vtmemd_binary(opts.vtmemd.as_deref())?;
    let daemon = daemon::start(&binary, &specs, &["--host-limit".into(), "16G".into()])?;
    let pid = daemon.pid();
    let rounds = min_ops.div_ceil(vms * n).max(1);
    let barrier = Arc::new(Barrier::new(vms + 1));
    let first_err: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
    let mut threads = Vec::with_capacity(vms);
    for v in 0..vms {
        let socket = daemon.socket(&format!("vm{v}"));
        let (barrier, first_err, files) = (barrier.clone(), first_err.clone(), files.clone());
        threads.push(std::thread::spawn(move || {
            let mut out = VmResult::default();
            let mut err: Option<Error> = None;
            let attempt = |err: &mut Option<Error>, f: &mut dyn FnMut() -> Result<()>| {
                if err.is_none() {
                    *err = f().err();
                }
            };
            let mut vm: Option<Vm> = None;
            let mut sums: Vec<u64> = Vec::new();
            attempt(&mut err, &mut || {
                let opts = VmOptions {
                    guest_pages: 2 * n as u64,
                    depth: DEPTH,
                    ..VmOptions::default()
                };
                let m = Vm::connect(&socket, &opts)?;
                vm_pages(&files, v, n, |k, p| {
                    sums.push(checksum(p));
                    m.write_guest_page(k as u64, p)
                })?;
                vm = Some(m);
                Ok(())
            });
            barrier.wait();
            let mut pool = 0u32;
            for _ in 0..rounds {
                attempt(&mut err, &mut || {
                    let m = vm.as_ref().ok_or_else(|| Error::Setup("no VM".into()))?;
                    pool = m.new_pool(PoolSpec::persistent())?;
                    let poison: Box<Page> = Box::new([0xa5u8; PAGE_SIZE]);
                    for k in 0..n {
                        m.write_guest_page((n + k) as u64, &poison)?;
                    }
                    Ok(())
                });
                barrier.wait(); // puts start
                attempt(&mut err, &mut || {
                    let m = vm.as_ref().ok_or_else(|| Error::Setup("no VM".into()))?;
                    let reqs = requests(m, n, 0, |i| Op::Put {
                        handle: handle(pool, i),
                        reserved: false,
                    });
                    let bad = timed_pipeline(m, reqs, &mut out.put_lat)?;
                    if bad > 0 {
                        return Err(Error::Device(format!("{bad} puts refused")));
                    }
                    Ok(())
                });
                barrier.wait(); // puts done; status taken
                barrier.wait(); // gets start
                attempt(&mut err, &mut || {
                    let m = vm.as_ref().ok_or_else(|| Error::Setup("no VM".into()))?;
                    let reqs = requests(m, n, n as u64, |i| Op::Get {
                        handle: handle(pool, i),
                    });
                    let bad = timed_pipeline(m, reqs, &mut out.get_lat)?;
                    if bad > 0 {
                        return Err(Error::Device(format!("{bad} gets missed")));
                    }
                    Ok(())
                });
                barrier.wait(); // gets done
                attempt(&mut err, &mut || {
                    let m = vm.as_ref().ok_or_else(|| Error::Setup("no VM".into()))?;
                    for (k, sum) in sums.iter().enumerate() {
                        if checksum(&*m.read_guest_page((n + k) as u64)?) != *sum {
                            return Err(Error::Device(format!(
                                "VM {v}: page {k} came back with other content"
                            )));
                        }
                    }
                    out.verified += n as u64;
                    m.destroy_pool(pool)?;
                    Ok(())
                });
            }
            if let Some(e) = err {
                let mut g = first_err.lock().unwrap_or_else(|p| p.into_inner());
                if g.is_none() {
                    *g = Some(e);
                }
            }
            if let Some(m) = vm {
                m.disconnect();
            }
            out
        }));
    }
    barrier.wait(); // set up
    let (mut put_time, mut get_time) = (Duration::ZERO, Duration::ZERO);
    let (mut put_cpu, mut get_cpu) = (0.0, 0.0);
    let mut status = Value::Null;
    for r in 0..rounds {
        barrier.wait();
        let (t, c) = (Instant::now(), total_cpu(pid));
        barrier.wait();
        put_time += t.elapsed();
        put_cpu += total_cpu(pid) - c;
        if r == 0 {
            status = daemon
                .try_control()
                .and_then(|mut c| c.call(&Request::Status {}))
                .map_err(|e| Error::Control(e.to_string()))?;
        }
        barrier.wait();
        let (t, c) = (Instant::now(), total_cpu(pid));
        barrier.wait();
        get_time += t.elapsed();
        get_cpu += total_cpu(pid) - c;
    }
    let mut res = VmResult::default();
    for th in threads {
        let r = th
            .join()
            .map_err(|_| Error::Setup("VM thread panicked".into()))?;
        res.put_lat.extend(r.put_lat);
        res.get_lat.extend(r.get_lat);
        res.verified += r.verified;
    }
    if let Some(e) = first_err.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    if !daemon.is_alive() {
        return Err(Error::Daemon(format!("died; log:\n{}", daemon.log())));
    }
    let ops = (vms * n * rounds) as u64;
    let put_per_s = rate(ops, put_time);
    let get_per_s = rate(ops, get_time);
    let put_cores = put_cpu / put_time.as_secs_f64().max(1e-9);
    let get_cores = get_cpu / get_time.as_secs_f64().max(1e-9);
    let eff = |r: f64, cores: f64| {
        if cores > 0.0 && limit > 0.0 {
            r / cores / limit
        } else {
            0.0
        }
    };
    res.put_lat.sort();
    res.get_lat.sort();
    let stored = status_u64(&status, "stored_pages");
    let host_used = status_u64(&status, "host_used");
    Ok(Step {
        vms,
        pages_per_vm: n,
        rounds,
        put_per_s,
        get_per_s,
        put_cores,
        get_cores,
        put_efficiency: eff(put_per_s, put_cores),
        get_efficiency: eff(get_per_s, get_cores),
        put_efficiency_all_cpus: eff(put_per_s, cpus as f64),
        verified_gets: res.verified,
        stored_pages: stored,
        zero_pages: status_u64(&status, "zero_pages"),
        unique_pages: status_u64(&status, "unique_pages"),
        host_used,
        host_bytes_per_page: if stored > 0 {
            host_used as f64 / stored as f64
        } else {
            0.0
        },
        dedup_ratio: status_f64(&status, "dedup_ratio"),
        compression_ratio: status_f64(&status, "compression_ratio"),
        put_p50_us: percentile(&res.put_lat, 0.50),
        put_p99_us: percentile(&res.put_lat, 0.99),
        get_p50_us: percentile(&res.get_lat, 0.50),
        get_p99_us: percentile(&res.get_lat, 0.99),
    })
}

/// Runs the benchmark, printing a progress line per step to stderr.
pub fn run(opts: &MultiVmOptions) -> Result<MultiVmReport> {
    let t0 = Instant::now();
    let mut counts = if opts.vms.is_empty() {
        DEFAULT_VMS.to_vec()
    } else {
        opts.vms.clone()
    };
    counts.retain(|&v| v > 0);
    let max_vms = counts.iter().copied().max().unwrap_or(1);
    let n = opts
        .pages_per_vm
        .unwrap_or(if opts.quick { 1024 } else { 8192 })
        .max(BATCH);
    let min_ops = if opts.quick { 100_000 } else { 500_000 };
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());

    let shared = (n * SHARED_PCT as usize).div_ceil(100) + BATCH;
    let private = (n * PRIVATE_FILE_PCT as usize / 100 * max_vms).clamp(BATCH, MAX_FILE_POOL);
    eprintln!(
        "loading {} file pages ({shared} shared, {private} private pool)",
        shared + private
    );
    let (pages, mix) = file_pages(shared + private);
    if pages.len() < 2 {
        return Err(Error::Setup("no file pages found under /usr".into()));
    }
    let shared = shared.min(pages.len() / 2);
    let files = Arc::new(Files { pages, shared });
    eprintln!(
        "file pages: {} ({} from /usr/bin, {} synthetic)",
        mix.file_pages, mix.bin_pages, mix.synthetic_pages
    );

    // The reference loop runs over one VM's page mix.
    let mut sample = Vec::with_capacity(n.min(4096));
    vm_pages(&files, 0, n.min(4096), |_, p| {
        sample.push(Box::new(*p));
        Ok(())
    })?;
    let limit_secs = if opts.quick { 1.0 } else { 3.0 };
    let mut limit = Limit::default();
    limit.samples.push(measure_limit(&sample, limit_secs));
    limit.pages_per_s = limit.samples[0];
    eprintln!(
        "single-core limit (xxh3-128 + lz4 + 4 KiB copy): {:.0} pages/s",
        limit.pages_per_s
    );

    let mut report = MultiVmReport {
        quick: opts.quick,
        cpus,
        batch: BATCH,
        depth: DEPTH,
        mix,
        ..MultiVmReport::default()
    };
    for &v in &counts {
        let s = step(opts, &files, v, n, min_ops, limit.pages_per_s, cpus)?;
        eprintln!(
            "{v:>3} VMs: put {:.0}/s get {:.0}/s, {:.0} host B/page, dedup {:.2}, compression {:.2}, put p99 {:.0} us ({:.0} s so far)",
            s.put_per_s,
            s.get_per_s,
            s.host_bytes_per_page,
            s.dedup_ratio,
            s.compression_ratio,
            s.put_p99_us,
            t0.elapsed().as_secs_f64()
        );
        report.steps.push(s);
    }
    limit.samples.push(measure_limit(&sample, limit_secs));
    limit.pages_per_s = limit.samples.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "single-core limit again: {:.0} pages/s",
        limit.samples[limit.samples.len() - 1]
    );
    // Efficiencies against the best limit measured.
    for s in &mut report.steps {
        let l = limit.pages_per_s;
        s.put_efficiency = s.put_per_s / s.put_cores.max(1e-9) / l;
        s.get_efficiency = s.get_per_s / s.get_cores.max(1e-9) / l;
        s.put_efficiency_all_cpus = s.put_per_s / cpus as f64 / l;
    }
    report.limit = limit;
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

impl MultiVmReport {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "vtmem-guestsim multivm{}: {} CPUs, batch {}, {} in flight per VM; pages {}% shared OS image, {}% zero, {}% private file, {}% anonymous\n\
             single-core limit (xxh3-128 + lz4 + copy): {:.0} pages/s; efficiency = (rate / cores busy) / limit\n\n",
            if self.quick { " --quick" } else { "" },
            self.cpus,
            self.batch,
            self.depth,
            self.mix.shared_pct,
            self.mix.zero_pct,
            self.mix.private_file_pct,
            self.mix.anon_pct,
            self.limit.pages_per_s
        );
        s.push_str(" VMs | pages/VM |    puts/s |    gets/s | cores p/g | eff put | eff get | host B/page | dedup | compr | put p50/p99 us | get p50/p99 us\n");
        s.push_str("-----+----------+-----------+-----------+-----------+---------+---------+-------------+-------+-------+----------------+---------------\n");
        for t in &self.steps {
            s.push_str(&format!(
                "{:>4} | {:>8} | {:>9.0} | {:>9.0} | {:>4.2}/{:<4.2} | {:>7.2} | {:>7.2} | {:>11.0} | {:>5.2} | {:>5.2} | {:>6.0}/{:<7.0} | {:>6.0}/{:<7.0}\n",
                t.vms,
                t.pages_per_vm,
                t.put_per_s,
                t.get_per_s,
                t.put_cores,
                t.get_cores,
                t.put_efficiency,
                t.get_efficiency,
                t.host_bytes_per_page,
                t.dedup_ratio,
                t.compression_ratio,
                t.put_p50_us,
                t.put_p99_us,
                t.get_p50_us,
                t.get_p99_us
            ));
        }
        s
    }
}
