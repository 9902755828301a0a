// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The benchmark behind `vtmem-guestsim bench`: throughput over vhost-user
//! against the same operations as direct calls into the store, notification
//! counts, round-trip latency with and without device busy-polling, and
//! aggregate throughput of several VMs.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde::Serialize;
use vtmem_protocol::{Handle, Op, PoolSpec, Status, PAGE_SIZE};
use vtmem_store::{ClientConfig, DataHandle, Store, StoreConfig};

use vtmem_testkit::Vtmemd;

use crate::daemon;
use crate::pages::{checksum, Corpus, CorpusMix};
use crate::queue::PageSource;
use crate::vm::{Vm, VmOptions};
use crate::{Error, Page, Result};

/// Batch sizes measured.
pub const BATCHES: [usize; 4] = [1, 8, 32, 128];
/// VM counts of the multi-VM run.
pub const VM_COUNTS: [usize; 3] = [1, 4, 16];
/// Fewest pages each VM stores in the multi-VM run.
pub const MIN_MULTI_VM_PAGES: usize = 2048;
/// Batch size of the headline figures and of the multi-VM run.
pub const HEADLINE_BATCH: usize = 32;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Short run (a few minutes on two cores at most).
    pub quick: bool,
    /// The daemon binary (found automatically when `None`).
    pub vtmemd: Option<PathBuf>,
    /// Pages in the working set (default: 8192 quick, 32768 full).
    pub pages: Option<usize>,
    /// Requests in flight per queue when streaming.
    pub depth: usize,
    /// Device busy-poll window for the second latency run, microseconds.
    pub poll_us: u32,
    /// Rounds per figure (the median is reported); default 7 quick, 9 full.
    pub rounds: Option<usize>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            quick: false,
            vtmemd: None,
            pages: None,
            depth: 8,
            poll_us: 50,
            rounds: None,
        }
    }
}

/// Figures of one batch size.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BatchFigures {
    /// Operations per request.
    pub batch: usize,
    /// Puts per second over vhost-user, `depth` requests in flight.
    pub vhost_put_per_s: f64,
    /// Puts per second over vhost-user, one request at a time.
    pub vhost_put_sync_per_s: f64,
    /// Puts per second as direct store calls.
    pub inproc_put_per_s: f64,
    /// `vhost_put_per_s / inproc_put_per_s`.
    pub put_efficiency: f64,
    /// The daemon's CPU time per streamed put (every thread), microseconds.
    pub vhost_put_cpu_us: f64,
    /// The in-process thread's CPU time per put, microseconds.
    pub inproc_put_cpu_us: f64,
    /// `inproc_put_cpu_us / vhost_put_cpu_us`: the share of the daemon's
    /// CPU that is the store's own work, which background load on the
    /// machine moves far less than the wall-clock ratio.
    pub put_efficiency_cpu: f64,
    /// Gets per second over vhost-user, `depth` requests in flight.
    pub vhost_get_per_s: f64,
    /// Gets per second as direct store calls, each into its own page (as
    /// the transport writes each into its own guest page).
    pub inproc_get_per_s: f64,
    /// `vhost_get_per_s / inproc_get_per_s`.
    pub get_efficiency: f64,
    /// The daemon's CPU time per streamed get (every thread), microseconds.
    pub vhost_get_cpu_us: f64,
    /// The in-process thread's CPU time per get, microseconds.
    pub inproc_get_cpu_us: f64,
    /// `inproc_get_cpu_us / vhost_get_cpu_us`.
    pub get_efficiency_cpu: f64,
    /// Gets per second as direct store calls, all into one page buffer
    /// that stays in the cache (the reference before in-place GETs).
    pub inproc_get_hot_per_s: f64,
    /// `vhost_get_per_s / inproc_get_hot_per_s`.
    pub get_efficiency_hot: f64,
    /// Kicks per operation while streaming puts.
    pub kicks_per_op: f64,
    /// Interrupts per operation while streaming puts.
    pub interrupts_per_op: f64,
    /// Kicks per operation while streaming gets.
    pub get_kicks_per_op: f64,
}

/// Round-trip latency of single gets.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Device busy-poll window, microseconds (0: none).
    pub poll_us: u32,
    /// Samples.
    pub samples: usize,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Mean, microseconds.
    pub mean_us: f64,
    /// Kicks per request.
    pub kicks_per_op: f64,
    /// CPU microseconds the device spent busy-polling, per request.
    pub poll_cpu_us_per_op: f64,
    /// CPU microseconds the whole daemon used, per request (its polling
    /// included).
    pub host_cpu_us_per_op: f64,
}

/// Aggregate throughput of several VMs at once.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MultiVm {
    /// VMs, one thread and one socket each.
    pub vms: usize,
    /// Puts per second, all VMs together.
    pub put_per_s: f64,
    /// Gets per second, all VMs together.
    pub get_per_s: f64,
    /// Kicks per operation over all VMs (puts).
    pub kicks_per_op: f64,
}

/// Everything measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// `--quick` run.
    pub quick: bool,
    /// Pages in the working set.
    pub pages: usize,
    /// Where the pages came from.
    pub corpus: CorpusMix,
    /// Requests in flight when streaming.
    pub depth: usize,
    /// Rounds per figure (medians reported).
    pub rounds: usize,
    /// Per batch size.
    pub batches: Vec<BatchFigures>,
    /// Streaming puts at batch 32: vhost-user rate / in-process rate.
    pub transport_efficiency: f64,
    /// Streaming gets at batch 32: vhost-user rate / in-process rate, each
    /// get into its own page.
    pub transport_efficiency_get: f64,
    /// The same against in-process gets into one cached page buffer.
    pub transport_efficiency_get_hot: f64,
    /// Put efficiency at batch 32 by the daemon's CPU time.
    pub transport_efficiency_cpu: f64,
    /// Get efficiency at batch 32 by the daemon's CPU time.
    pub transport_efficiency_get_cpu: f64,
    /// Kicks per op, streaming puts at batch 32.
    pub kicks_per_op: f64,
    /// Interrupts per op, streaming puts at batch 32.
    pub interrupts_per_op: f64,
    /// Single-get latency without and with device busy-polling.
    pub latency: Vec<Latency>,
    /// Several VMs at once.
    pub multi_vm: Vec<MultiVm>,
    /// Pages read back and compared after the put runs.
    pub verified_pages: usize,
    /// Wall time of the whole benchmark, seconds.
    pub seconds: f64,
}

fn handle(pool: u32, tag: u64, i: usize) -> Handle {
    vtmem_testkit::handle(pool, tag, i as u64)
}

fn rate(ops: usize, d: Duration) -> f64 {
    ops as f64 / d.as_secs_f64().max(1e-9)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Direct store calls: the reference the transport is compared with.
struct InProcess {
    client: DataHandle,
    /// The pages gets write into, one per page of the working set,
    /// allocated once and reused by every round, as the daemon writes the
    /// same guest pages every round: the reference's destinations are no
    /// warmer in the caches than the daemon's.
    dests: Vec<Box<Page>>,
}

impl InProcess {
    fn new(pages: usize) -> Result<Self> {
        let store = Store::new(StoreConfig {
            host_limit: 16 << 30,
        });
        let client = store
            .add_client("inproc", ClientConfig::default())
            .map_err(|e| Error::Setup(format!("in-process store: {e}")))?;
        Ok(InProcess {
            client: client.data(),
            dests: (0..pages).map(|_| Box::new([1u8; PAGE_SIZE])).collect(),
        })
    }

    fn store_err(e: impl std::fmt::Display) -> Error {
        Error::Setup(format!("in-process store: {e}"))
    }

    /// Puts then gets every page, twice: into one page buffer, then each
    /// into a page of its own.
    fn run(&mut self, pages: &[Box<Page>], tag: u64) -> Result<InProcessRun> {
        let pool = self
            .client
            .new_pool(PoolSpec::persistent())
            .map_err(Self::store_err)?;
        let cpu = thread_cpu_us();
        let t = Instant::now();
        for (i, p) in pages.iter().enumerate() {
            self.client
                .put(&handle(pool, tag, i), p, false)
                .map_err(Self::store_err)?;
        }
        let put = rate(pages.len(), t.elapsed());
        let put_cpu_us = (thread_cpu_us() - cpu) / pages.len() as f64;
        let mut out: Box<Page> = Box::new([0u8; PAGE_SIZE]);
        let t = Instant::now();
        let mut hits = 0usize;
        for i in 0..pages.len() {
            if self
                .client
                .get(&handle(pool, tag, i), &mut out)
                .map_err(Self::store_err)?
            {
                hits += 1;
            }
            std::hint::black_box(&out);
        }
        let get_hot = rate(pages.len(), t.elapsed());
        // Each get into a page of its own, as the daemon writes each into
        // its guest page.
        let cpu = thread_cpu_us();
        let t = Instant::now();
        for (i, d) in self.dests.iter_mut().take(pages.len()).enumerate() {
            if self
                .client
                .get(&handle(pool, tag, i), d)
                .map_err(Self::store_err)?
            {
                hits += 1;
            }
        }
        let get_own = rate(pages.len(), t.elapsed());
        let get_cpu_us = (thread_cpu_us() - cpu) / pages.len() as f64;
        std::hint::black_box(&self.dests);
        self.client.destroy_pool(pool).map_err(Self::store_err)?;
        if hits != 2 * pages.len() {
            return Err(Error::Setup(format!(
                "in-process store: {hits} of {} gets hit",
                2 * pages.len()
            )));
        }
        Ok(InProcessRun {
            put,
            put_cpu_us,
            get_hot,
            get: get_own,
            get_cpu_us,
        })
    }
}

/// Rates of one [`InProcess::run`], and its CPU time per operation.
struct InProcessRun {
    put: f64,
    put_cpu_us: f64,
    /// Gets into one page buffer.
    get_hot: f64,
    /// Gets each into a page of its own.
    get: f64,
    get_cpu_us: f64,
}

fn vm_options(guest_pages: usize, depth: usize) -> VmOptions {
    VmOptions {
        guest_pages: guest_pages as u64,
        depth,
        ..VmOptions::default()
    }
}

/// Connects a VM and copies `pages` into its own memory.
fn connect<'p>(
    daemon: &Vtmemd,
    name: &str,
    pages: impl ExactSizeIterator<Item = &'p Page>,
    depth: usize,
) -> Result<Vm> {
    let vm = Vm::connect(daemon.socket(name), &vm_options(pages.len(), depth))?;
    for (i, p) in pages.enumerate() {
        vm.write_guest_page(i as u64, p)?;
    }
    Ok(vm)
}

/// Requests of `batch` operations over guest pages `0..n`.
fn requests(
    vm: &Vm,
    n: usize,
    batch: usize,
    make: impl Fn(usize) -> Op,
) -> Vec<(Vec<Op>, PageSource<'static>)> {
    let gp = vm.guest_pages();
    (0..n)
        .step_by(batch)
        .map(|start| {
            let end = (start + batch).min(n);
            let ops = (start..end).map(&make).collect();
            let addrs = (start..end).map(|i| gp.addr(i as u64)).collect();
            (ops, PageSource::InGuest(addrs))
        })
        .collect()
}

/// Streams puts (or gets) of guest pages `0..n`; returns ops/s and the
/// kicks and interrupts it took.
fn stream(
    vm: &Vm,
    n: usize,
    batch: usize,
    depth: usize,
    make: impl Fn(usize) -> Op,
    want: Status,
) -> Result<(f64, u64, u64)> {
    let reqs = requests(vm, n, batch, make);
    vm.reset_stats();
    let mut bad = 0usize;
    let t = Instant::now();
    vm.queue(0).pipeline(reqs, depth, |c| {
        bad += c.statuses()?.iter().filter(|s| **s != want).count();
        Ok(())
    })?;
    let d = t.elapsed();
    let s = vm.stats();
    if bad > 0 {
        return Err(Error::Device(format!(
            "{bad} of {n} operations did not return {want}"
        )));
    }
    Ok((rate(n, d), s.kicks, s.interrupts))
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One round of one batch size: in-process and vhost-user back to back,
/// so both see the same background load.
struct Round {
    in_put: f64,
    in_put_cpu_us: f64,
    in_get: f64,
    in_get_cpu_us: f64,
    in_get_hot: f64,
    put: f64,
    get: f64,
    put_cpu_us: f64,
    get_cpu_us: f64,
    sync: f64,
    kicks: u64,
    irqs: u64,
    get_kicks: u64,
    verified: usize,
}

fn batch_round(
    vm: &Vm,
    inproc: &mut InProcess,
    pages: &[Box<Page>],
    batch: usize,
    depth: usize,
    daemon_cpu_us: &dyn Fn() -> f64,
) -> Result<Round> {
    let n = pages.len();
    let tag = batch as u64;
    let reference = inproc.run(pages, tag)?;

    let pool = vm.new_pool(PoolSpec::persistent())?;
    let put_op = |pool: u32| {
        move |i| Op::Put {
            handle: handle(pool, tag, i),
            reserved: false,
        }
    };
    let cpu_start = daemon_cpu_us();
    let (put, kicks, irqs) = stream(vm, n, batch, depth, put_op(pool), Status::Ok)?;
    let cpu_puts_done = daemon_cpu_us();
    let get_op = |i| Op::Get {
        handle: handle(pool, tag, i),
    };
    let (get, get_kicks, _) = stream(vm, n, batch, depth, get_op, Status::Ok)?;
    let cpu_gets_done = daemon_cpu_us();
    // Read a sample back through the copying path and compare.
    let step = (n / 64).max(1);
    let sample: Vec<usize> = (0..n).step_by(step).collect();
    let handles: Vec<Handle> = sample.iter().map(|&i| handle(pool, tag, i)).collect();
    let got = vm.get_batch(&handles)?;
    for (&i, (st, p)) in sample.iter().zip(&got) {
        if *st != Status::Ok || checksum(p) != checksum(&pages[i]) {
            return Err(Error::Device(format!(
                "page {i} came back as {st} with other content"
            )));
        }
    }
    vm.destroy_pool(pool)?;

    // One request at a time.
    let pool = vm.new_pool(PoolSpec::persistent())?;
    let (sync, _, _) = stream(vm, n, batch, 1, put_op(pool), Status::Ok)?;
    vm.destroy_pool(pool)?;
    Ok(Round {
        in_put: reference.put,
        in_put_cpu_us: reference.put_cpu_us,
        in_get: reference.get,
        in_get_cpu_us: reference.get_cpu_us,
        in_get_hot: reference.get_hot,
        put,
        get,
        put_cpu_us: (cpu_puts_done - cpu_start) / n as f64,
        get_cpu_us: (cpu_gets_done - cpu_puts_done) / n as f64,
        sync,
        kicks,
        irqs,
        get_kicks,
        verified: sample.len(),
    })
}

fn batch_figures(
    vm: &Vm,
    inproc: &mut InProcess,
    pages: &[Box<Page>],
    batch: usize,
    depth: usize,
    rounds: usize,
    daemon_cpu_us: &dyn Fn() -> f64,
) -> Result<(BatchFigures, usize)> {
    let mut r = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        r.push(batch_round(vm, inproc, pages, batch, depth, daemon_cpu_us)?);
    }
    let med = |f: fn(&Round) -> f64| median(&mut r.iter().map(f).collect::<Vec<_>>());
    let ops = (pages.len() * r.len()) as f64;
    let (put, in_put) = (med(|x| x.put), med(|x| x.in_put));
    let (get, in_get) = (med(|x| x.get), med(|x| x.in_get));
    // Efficiency per round (each pair saw the same load), then the median.
    let put_eff = med(|x| ratio(x.put, x.in_put));
    let get_eff = med(|x| ratio(x.get, x.in_get));
    let get_eff_hot = med(|x| ratio(x.get, x.in_get_hot));
    let put_eff_cpu = med(|x| ratio(x.in_put_cpu_us, x.put_cpu_us));
    let get_eff_cpu = med(|x| ratio(x.in_get_cpu_us, x.get_cpu_us));
    Ok((
        BatchFigures {
            batch,
            vhost_put_per_s: put,
            vhost_put_sync_per_s: med(|x| x.sync),
            inproc_put_per_s: in_put,
            put_efficiency: put_eff,
            vhost_put_cpu_us: med(|x| x.put_cpu_us),
            inproc_put_cpu_us: med(|x| x.in_put_cpu_us),
            put_efficiency_cpu: put_eff_cpu,
            vhost_get_per_s: get,
            inproc_get_per_s: in_get,
            get_efficiency: get_eff,
            vhost_get_cpu_us: med(|x| x.get_cpu_us),
            inproc_get_cpu_us: med(|x| x.in_get_cpu_us),
            get_efficiency_cpu: get_eff_cpu,
            inproc_get_hot_per_s: med(|x| x.in_get_hot),
            get_efficiency_hot: get_eff_hot,
            kicks_per_op: r.iter().map(|x| x.kicks).sum::<u64>() as f64 / ops,
            interrupts_per_op: r.iter().map(|x| x.irqs).sum::<u64>() as f64 / ops,
            get_kicks_per_op: r.iter().map(|x| x.get_kicks).sum::<u64>() as f64 / ops,
        },
        r.iter().map(|x| x.verified).sum(),
    ))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn latency(
    daemon: &Vtmemd,
    vm: &Vm,
    pages: usize,
    samples: usize,
    poll_us: u32,
) -> Result<Latency> {
    let pool = vm.new_pool(PoolSpec::persistent())?;
    let n = pages.min(vm.guest_pages().count() as usize);
    stream(
        vm,
        n,
        128,
        4,
        |i| Op::Put {
            handle: handle(pool, 7, i),
            reserved: false,
        },
        Status::Ok,
    )?;
    let gp = vm.guest_pages();
    let mut q = vm.queue(0);
    // Warm up.
    for i in 0..n.min(200) {
        let c = q.execute_with(
            &[Op::Get {
                handle: handle(pool, 7, i),
            }],
            &PageSource::InGuest(vec![gp.addr(i as u64)]),
        )?;
        c.single()?;
    }
    q.reset_stats();
    let polled = || daemon.show("bench0").device.poll_us;
    let polled_before = polled();
    let pid = daemon.pid();
    let host_cpu_before = pid.map(process_cpu_us);
    let mut times = Vec::with_capacity(samples);
    for s in 0..samples {
        let i = (s * 7919) % n;
        let src = PageSource::InGuest(vec![gp.addr(i as u64)]);
        let op = [Op::Get {
            handle: handle(pool, 7, i),
        }];
        let t = Instant::now();
        let c = q.execute_with(&op, &src)?;
        times.push(t.elapsed());
        if c.single()?.status != Status::Ok {
            return Err(Error::Device(format!("latency get {i} missed")));
        }
    }
    let host_cpu_us = match (pid, host_cpu_before) {
        (Some(pid), Some(before)) => process_cpu_us(pid) - before,
        _ => 0.0,
    };
    let kicks = q.stats().kicks;
    let poll_cpu_us = polled().saturating_sub(polled_before);
    drop(q);
    vm.destroy_pool(pool)?;
    let mean =
        times.iter().map(Duration::as_secs_f64).sum::<f64>() / times.len().max(1) as f64 * 1e6;
    times.sort();
    Ok(Latency {
        poll_us,
        samples,
        p50_us: percentile(&times, 0.50),
        p99_us: percentile(&times, 0.99),
        mean_us: mean,
        kicks_per_op: kicks as f64 / samples.max(1) as f64,
        poll_cpu_us_per_op: poll_cpu_us as f64 / samples.max(1) as f64,
        host_cpu_us_per_op: host_cpu_us / samples.max(1) as f64,
    })
}

/// CPU time process `pid` has used (all its threads), microseconds: from
/// its CPU-time clock (nanoseconds), else from `/proc/PID/stat` (ticks).
fn process_cpu_us(pid: u32) -> f64 {
    let Ok(id) = libc::pid_t::try_from(pid) else {
        return crate::multivm::proc_cpu(pid) * 1e6;
    };
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid place for the clock id.
    if unsafe { libc::clock_getcpuclockid(id, &mut clock) } != 0 {
        return crate::multivm::proc_cpu(pid) * 1e6;
    }
    clock_us(clock).unwrap_or_else(|| crate::multivm::proc_cpu(pid) * 1e6)
}

/// CPU time the calling thread has used, microseconds (0 if the clock
/// cannot be read, which Linux does not do).
fn thread_cpu_us() -> f64 {
    clock_us(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0.0)
}

fn clock_us(clock: libc::clockid_t) -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3)
}

fn multi_vm(daemon: &Vtmemd, pages: &[Box<Page>], vms: usize, depth: usize) -> Result<MultiVm> {
    // Each VM stores its own stretch of the corpus (wrapping around), at
    // least MIN_MULTI_VM_PAGES so that a run lasts long enough to measure.
    let n = pages.len();
    let share = (n / vms).max(MIN_MULTI_VM_PAGES.min(n));
    let mut conns = Vec::with_capacity(vms);
    for v in 0..vms {
        let mine = (0..share).map(|k| &*pages[(v * (n / vms) + k) % n]);
        conns.push(connect(daemon, &format!("bench{v}"), mine, depth)?);
    }
    let start = Arc::new(Barrier::new(vms + 1));
    let mid = Arc::new(Barrier::new(vms + 1));
    let end = Arc::new(Barrier::new(vms + 1));
    let mut threads = Vec::with_capacity(vms);
    for vm in conns {
        let (start, mid, end) = (start.clone(), mid.clone(), end.clone());
        threads.push(std::thread::spawn(move || -> Result<u64> {
            let res = (|| {
                let pool = vm.new_pool(PoolSpec::persistent())?;
                let put_reqs = requests(&vm, share, HEADLINE_BATCH, |i| Op::Put {
                    handle: handle(pool, 1, i),
                    reserved: false,
                });
                let get_reqs = requests(&vm, share, HEADLINE_BATCH, |i| Op::Get {
                    handle: handle(pool, 1, i),
                });
                Ok::<_, Error>((pool, put_reqs, get_reqs))
            })();
            start.wait();
            let (pool, put_reqs, get_reqs) = match res {
                Ok(r) => r,
                Err(e) => {
                    mid.wait();
                    end.wait();
                    return Err(e);
                }
            };
            vm.reset_stats();
            let mut bad = 0;
            let r1 = vm.queue(0).pipeline(put_reqs, depth, |c| {
                bad += c.statuses()?.iter().filter(|s| **s != Status::Ok).count();
                Ok(())
            });
            let kicks = vm.stats().kicks;
            mid.wait();
            let r2 = vm.queue(0).pipeline(get_reqs, depth, |c| {
                bad += c.statuses()?.iter().filter(|s| **s != Status::Ok).count();
                Ok(())
            });
            end.wait();
            r1?;
            r2?;
            if bad > 0 {
                return Err(Error::Device(format!("{bad} operations failed")));
            }
            vm.destroy_pool(pool)?;
            Ok(kicks)
        }));
    }
    start.wait();
    let t = Instant::now();
    mid.wait();
    let put_time = t.elapsed();
    let t = Instant::now();
    end.wait();
    let get_time = t.elapsed();
    let mut kicks = 0;
    for th in threads {
        kicks += th
            .join()
            .map_err(|_| Error::Setup("VM thread panicked".into()))??;
    }
    let total = share * vms;
    Ok(MultiVm {
        vms,
        put_per_s: rate(total, put_time),
        get_per_s: rate(total, get_time),
        kicks_per_op: kicks as f64 / total as f64,
    })
}

/// `vtmemd`'s arguments: the VMs `bench0`.., a 16G host limit, and the
/// busy-poll window if any.
fn daemon_args(poll_us: Option<u32>) -> Vec<String> {
    let vms: Vec<String> = (0..*VM_COUNTS.iter().max().unwrap_or(&1))
        .map(|v| format!("bench{v}"))
        .collect();
    let mut extra = vec!["--host-limit".to_string(), "16G".to_string()];
    if let Some(p) = poll_us {
        extra.extend(["--poll-us".to_string(), p.to_string()]);
    }
    daemon::args(&vms, &extra)
}

/// Runs the benchmark, printing progress to stderr.
pub fn run(opts: &BenchOptions) -> Result<Report> {
    let t0 = Instant::now();
    let n = opts.pages.unwrap_or(if opts.quick { 8192 } else { 32768 });
    let lat_samples = if opts.quick { 3000 } else { 20000 };
    let depth = opts.depth.max(1);
    let rounds = opts.rounds.unwrap_or(if opts.quick { 7 } else { 9 }).max(1);
    let corpus = Corpus::load(n);
    eprintln!("corpus: {} pages ({:?})", corpus.pages.len(), corpus.mix);
    let pages = &corpus.pages;

    let binary = daemon::vtmemd_binary(opts.vtmemd.as_deref())?;
    let mut daemon =
        Vtmemd::try_start(&binary, &daemon_args(None)).map_err(|e| Error::Daemon(e.to_string()))?;
    let mut inproc = InProcess::new(n)?;
    let mut report = Report {
        quick: opts.quick,
        pages: n,
        corpus: corpus.mix,
        depth,
        rounds,
        ..Report::default()
    };

    {
        let vm = connect(&daemon, "bench0", pages.iter().map(|p| &**p), depth)?;
        let pid = daemon.pid();
        let daemon_cpu_us = move || pid.map_or(0.0, process_cpu_us);
        for &b in &BATCHES {
            let (f, verified) =
                batch_figures(&vm, &mut inproc, pages, b, depth, rounds, &daemon_cpu_us)?;
            eprintln!("batch {b:>3}: put {:.0}/s (in-process {:.0}/s), get {:.0}/s (in-process {:.0}/s), {:.4} kicks/op", f.vhost_put_per_s, f.inproc_put_per_s, f.vhost_get_per_s, f.inproc_get_per_s, f.kicks_per_op);
            report.verified_pages += verified;
            report.batches.push(f);
        }
        report
            .latency
            .push(latency(&daemon, &vm, n.min(4096), lat_samples, 0)?);
    }
    for &v in &VM_COUNTS {
        let mut runs = Vec::new();
        for _ in 0..rounds.div_ceil(2) {
            runs.push(multi_vm(&daemon, pages, v, depth)?);
        }
        let med = |f: fn(&MultiVm) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let m = MultiVm {
            vms: v,
            put_per_s: med(|m| m.put_per_s),
            get_per_s: med(|m| m.get_per_s),
            kicks_per_op: med(|m| m.kicks_per_op),
        };
        eprintln!(
            "{v:>2} VMs: put {:.0}/s, get {:.0}/s",
            m.put_per_s, m.get_per_s
        );
        report.multi_vm.push(m);
    }

    daemon
        .restart(&daemon_args(Some(opts.poll_us)))
        .map_err(|e| Error::Daemon(e.to_string()))?;
    {
        let lat_pages = &pages[..n.min(4096)];
        let vm = connect(&daemon, "bench0", lat_pages.iter().map(|p| &**p), depth)?;
        report.latency.push(latency(
            &daemon,
            &vm,
            lat_pages.len(),
            lat_samples,
            opts.poll_us,
        )?);
    }
    if !daemon.is_alive() {
        return Err(Error::Daemon(format!(
            "died during the benchmark; log:\n{}",
            daemon.log()
        )));
    }

    if let Some(h) = report.batches.iter().find(|b| b.batch == HEADLINE_BATCH) {
        report.transport_efficiency = h.put_efficiency;
        report.transport_efficiency_get = h.get_efficiency;
        report.transport_efficiency_get_hot = h.get_efficiency_hot;
        report.transport_efficiency_cpu = h.put_efficiency_cpu;
        report.transport_efficiency_get_cpu = h.get_efficiency_cpu;
        report.kicks_per_op = h.kicks_per_op;
        report.interrupts_per_op = h.interrupts_per_op;
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

impl Report {
    /// A human-readable table of the figures.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "vtmem-guestsim bench{}: {} pages (libraries {}, text {}, zero {}, synthetic {}), {} requests in flight, medians of {} rounds\n\n",
            if self.quick { " --quick" } else { "" },
            self.pages,
            self.corpus.library,
            self.corpus.text,
            self.corpus.zero,
            self.corpus.synthetic,
            self.depth,
            self.rounds
        ));
        s.push_str("batch | put/s vhost | put/s 1-deep | put/s in-proc | put eff | get/s vhost | get/s in-proc | get eff | get/s in-proc hot | get eff hot | kicks/op | irqs/op\n");
        s.push_str("------+-------------+--------------+---------------+---------+-------------+---------------+---------+-------------------+-------------+----------+--------\n");
        for b in &self.batches {
            s.push_str(&format!(
                "{:>5} | {:>11.0} | {:>12.0} | {:>13.0} | {:>7.2} | {:>11.0} | {:>13.0} | {:>7.2} | {:>17.0} | {:>11.2} | {:>8.4} | {:>7.4}\n",
                b.batch,
                b.vhost_put_per_s,
                b.vhost_put_sync_per_s,
                b.inproc_put_per_s,
                b.put_efficiency,
                b.vhost_get_per_s,
                b.inproc_get_per_s,
                b.get_efficiency,
                b.inproc_get_hot_per_s,
                b.get_efficiency_hot,
                b.kicks_per_op,
                b.interrupts_per_op
            ));
        }
        s.push_str("\nCPU time per streamed operation: the daemon's (every thread) against the in-process thread's\n\n");
        s.push_str("batch | CPU us/put vhost | CPU us/put in-proc | put CPU eff | CPU us/get vhost | CPU us/get in-proc | get CPU eff\n");
        s.push_str("------+------------------+--------------------+-------------+------------------+--------------------+------------\n");
        for b in &self.batches {
            s.push_str(&format!(
                "{:>5} | {:>16.2} | {:>18.2} | {:>11.2} | {:>16.2} | {:>18.2} | {:>11.2}\n",
                b.batch,
                b.vhost_put_cpu_us,
                b.inproc_put_cpu_us,
                b.put_efficiency_cpu,
                b.vhost_get_cpu_us,
                b.inproc_get_cpu_us,
                b.get_efficiency_cpu
            ));
        }
        s.push_str("\nsingle-get round trip (one request in flight; host CPU: the whole daemon, per request)\n\n");
        s.push_str(
            "poll-us | p50 us | p99 us | mean us | kicks/op | host CPU us/op | of which polling\n",
        );
        s.push_str(
            "--------+--------+--------+---------+----------+----------------+-----------------\n",
        );
        for l in &self.latency {
            s.push_str(&format!(
                "{:>7} | {:>6.1} | {:>6.1} | {:>7.1} | {:>8.2} | {:>14.1} | {:>16.1}\n",
                if l.poll_us == 0 {
                    "off".to_string()
                } else {
                    l.poll_us.to_string()
                },
                l.p50_us,
                l.p99_us,
                l.mean_us,
                l.kicks_per_op,
                l.host_cpu_us_per_op,
                l.poll_cpu_us_per_op
            ));
        }
        s.push_str(&format!(
            "\nseveral VMs (batch {HEADLINE_BATCH}, one thread and socket each)\n"
        ));
        for m in &self.multi_vm {
            s.push_str(&format!(
                "  {:>2} VMs: {:>9.0} puts/s, {:>9.0} gets/s aggregate, {:.4} kicks/op\n",
                m.vms, m.put_per_s, m.get_per_s, m.kicks_per_op
            ));
        }
        s.push_str(&format!(
            "\ntransport efficiency (batch {HEADLINE_BATCH}, streaming puts): {:.2}; gets: {:.2} (against one cached buffer: {:.2}); by the daemon's CPU time: puts {:.2}, gets {:.2}; kicks per op: {:.4} (1 per {:.0} ops)\n",
            self.transport_efficiency,
            self.transport_efficiency_get,
            self.transport_efficiency_get_hot,
            self.transport_efficiency_cpu,
            self.transport_efficiency_get_cpu,
            self.kicks_per_op,
            if self.kicks_per_op > 0.0 { 1.0 / self.kicks_per_op } else { f64::INFINITY }
        ));
        s
    }
}
