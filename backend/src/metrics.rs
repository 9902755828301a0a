// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Prometheus metrics served by a small HTTP/1.1 responder on a TCP socket
//! (`--metrics-address`).
//!
//! Every scrape takes a [`Snapshot`] of the daemon's statistics (the
//! store's, each VM's and its device counters) and encodes it with
//! `prometheus-client` as a [`Collector`] of a fresh registry: nothing is
//! kept or updated on the data path for the metrics' sake. The page is in
//! the Prometheus text format 0.0.4 (the library's OpenMetrics encoder
//! writes an unlimited quota as `inf`, which OpenMetrics does not allow).
//!
//! The responder answers `GET /metrics` (and `HEAD`), 404 for any other
//! path, 405 for other methods, one request per connection. Requests are
//! bounded: at most [`MAX_REQUEST`] bytes of head, read and write timeouts,
//! and at most [`MAX_CONNECTIONS`] connections served at once: a new one
//! takes the slot of the oldest that has not sent its request yet, and is
//! answered 503 only when every slot is serving a request. There is no authentication: keep the address
//! on loopback or a management network.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, LazyLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, warn};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
    GaugeValueEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::accept::{accept_until_stopped, Slot, Slots};
use crate::daemon::Daemon;
use vtmem_api::{ClientStats, DeviceStats, OpCounters, StoreStats};

/// Longest request head (request line and headers) accepted.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Connections served at the same time.
pub const MAX_CONNECTIONS: usize = 8;
/// Read and write timeout of a connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The prefix of every metric name.
const PREFIX: &str = "vtmem";

/// The `Content-Type` of the page: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// A VM's quota as a gauge value: unlimited is `+Inf`.
#[derive(Clone, Copy, Debug)]
struct Quota(u64);

impl EncodeGaugeValue for Quota {
    fn encode(&self, encoder: &mut GaugeValueEncoder) -> fmt::Result {
        if self.0 == u64::MAX {
            f64::INFINITY.encode(encoder)
        } else {
            self.0.encode(encoder)
        }
    }
}

/// The daemon's statistics at one instant: what one scrape shows.
#[derive(Debug)]
pub struct Snapshot {
    uptime: Duration,
    store: StoreStats,
    vms: Vec<VmSnapshot>,
}

/// One VM of a [`Snapshot`].
#[derive(Debug)]
struct VmSnapshot {
    name: String,
    connected: bool,
    connections: u64,
    device: DeviceStats,
    /// The store's view of the VM's client; `None` if it is being removed.
    client: Option<ClientStats>,
}

impl VmSnapshot {
    /// The store's view of the VM: zeros while it is being removed.
    fn stats(&self) -> &ClientStats {
        static ZERO: LazyLock<ClientStats> = LazyLock::new(ClientStats::default);
        self.client.as_ref().unwrap_or(&ZERO)
    }
}

impl Snapshot {
    /// Reads the daemon's statistics now.
    pub fn take(daemon: &Daemon) -> Self {
        let mut store = daemon.store().stats();
        let mut clients = std::mem::take(&mut store.clients);
        let vms = daemon
            .vms()
            .iter()
            .map(|vm| VmSnapshot {
                name: vm.name().to_string(),
                connected: vm.is_connected(),
                connections: vm.connections(),
                device: vm.counters(),
                client: clients
                    .iter()
                    .position(|c| c.name == vm.name().as_str())
                    .map(|i| clients.swap_remove(i)),
            })
            .collect();
        Snapshot {
            uptime: daemon.uptime(),
            store,
            vms,
        }
    }

    /// Encodes the snapshot as a page of the text format.
    pub fn encode(self) -> Result<String, fmt::Error> {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

/// Encodes one family: `name` (before the prefix and the unit and counter
/// suffixes the encoder adds), its help text, and a metric per label set.
/// A family without samples is left out.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let mut m = e.encode_descriptor(name, help, unit, first.metric_type())?;
    for (labels, metric) in samples {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes a family with one unlabelled sample.
fn single<M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric: M,
) -> fmt::Result {
    metric.encode(e.encode_descriptor(name, help, unit, metric.metric_type())?)
}

/// The put and get result breakdowns, as `(label value, count)`.
fn put_results(c: &OpCounters) -> [(&'static str, u64); 5] {
    [
        ("stored", c.puts_stored),
        ("no_space", c.puts_refused_no_space),
        ("over_quota", c.puts_refused_quota),
        ("frozen", c.puts_refused_frozen),
        ("other", c.puts_refused_other),
    ]
}

fn get_results(c: &OpCounters) -> [(&'static str, u64); 2] {
    [("hit", c.get_hits), ("miss", c.get_misses)]
}

/// A VM's two samples of a family by pool kind.
fn by_kind<M>(vm: &str, persistent: M, ephemeral: M) -> [([(&'static str, &str); 2], M); 2] {
    [
        ([("vm", vm), ("kind", "persistent")], persistent),
        ([("vm", vm), ("kind", "ephemeral")], ephemeral),
    ]
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        self.encode_store(&mut e)?;
        self.encode_vms(&mut e)
    }
}

impl Snapshot {
    /// The store's families: gauges, and counters that include the VMs
    /// removed since the start.
    fn encode_store(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let s = &self.store;
        let (bytes, seconds) = (Some(&Unit::Bytes), Some(&Unit::Seconds));
        single(
            e,
            "uptime",
            "Seconds since vtmemd started.",
            seconds,
            ConstGauge::new(self.uptime.as_secs_f64()),
        )?;
        single(
            e,
            "host_limit",
            "Host memory the store may use for pages and metadata.",
            bytes,
            ConstGauge::new(s.host_limit),
        )?;
        single(
            e,
            "host_used",
            "Host memory charged against the limit (data, metadata, reservations).",
            bytes,
            ConstGauge::new(s.host_used),
        )?;
        single(
            e,
            "host_overhead",
            "Host memory the store's structures hold beyond the page charges (allocator holes, sparse indexes, table slack), also held against the limit.",
            bytes,
            ConstGauge::new(s.host_overhead),
        )?;
        single(
            e,
            "allocator_footprint",
            "Bytes of slab chunk memory written: live slots and holes.",
            bytes,
            ConstGauge::new(s.allocator_footprint),
        )?;
        single(
            e,
            "data",
            "Bytes of stored page data (compressed or raw).",
            bytes,
            ConstGauge::new(s.data_bytes),
        )?;
        single(
            e,
            "metadata",
            "Bytes of store metadata.",
            bytes,
            ConstGauge::new(s.metadata_bytes),
        )?;
        for (name, help, v) in [
            (
                "stored_pages",
                "Pages held in all pools (a shared pool counted once).",
                s.stored_pages,
            ),
            (
                "unique_pages",
                "Distinct page contents stored.",
                s.unique_pages,
            ),
            ("zero_pages", "Zero pages held.", s.zero_pages),
            (
                "reserved_pages",
                "Pages reserved and not yet spent.",
                s.reserved_pages,
            ),
        ] {
            single(e, name, help, None, ConstGauge::new(v))?;
        }
        single(
            e,
            "compression_ratio",
            "Uncompressed bytes of unique contents divided by their stored bytes.",
            None,
            ConstGauge::new(s.compression_ratio),
        )?;
        single(
            e,
            "dedup_ratio",
            "Non-zero pages held divided by distinct contents.",
            None,
            ConstGauge::new(s.dedup_ratio),
        )?;
        single(
            e,
            "vms",
            "VMs served.",
            None,
            ConstGauge::new(self.vms.len() as u64),
        )?;
        single(e, "pools", "Pools alive.", None, ConstGauge::new(s.pools))?;

        let c = &s.counters;
        family(
            e,
            "store_puts",
            "Puts by result, all VMs (including removed ones).",
            None,
            put_results(c).map(|(r, n)| ([("result", r)], ConstCounter::new(n))),
        )?;
        family(
            e,
            "store_gets",
            "Gets by result, all VMs (including removed ones).",
            None,
            get_results(c).map(|(r, n)| ([("result", r)], ConstCounter::new(n))),
        )?;
        for (name, help, v) in [
            (
                "store_flushed_pages",
                "Pages flushed by the guests, all VMs.",
                c.flush_pages,
            ),
            (
                "store_evictions",
                "Ephemeral pages evicted, all VMs.",
                c.evictions,
            ),
            (
                "store_dedup_hits",
                "Puts stored by sharing an identical stored content, all VMs.",
                c.dedup_hits,
            ),
        ] {
            single(e, name, help, None, ConstCounter::new(v))?;
        }
        Ok(())
    }

    /// The per-VM families: the VMs of the registry, with the store's view
    /// of each.
    fn encode_vms(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let vms = &self.vms;
        let bytes = Some(&Unit::Bytes);
        let per_vm =
            |e: &mut DescriptorEncoder, name, help, metric: &dyn Fn(&VmSnapshot) -> u64| {
                family(
                    e,
                    name,
                    help,
                    None,
                    vms.iter()
                        .map(|vm| ([("vm", vm.name.as_str())], ConstGauge::new(metric(vm)))),
                )
            };
        let per_vm_counter =
            |e: &mut DescriptorEncoder, name, help, metric: &dyn Fn(&VmSnapshot) -> u64| {
                family(
                    e,
                    name,
                    help,
                    None,
                    vms.iter()
                        .map(|vm| ([("vm", vm.name.as_str())], ConstCounter::new(metric(vm)))),
                )
            };

        per_vm(
            e,
            "vm_connected",
            "1 if a VMM is attached to the VM's socket.",
            &|vm| u64::from(vm.connected),
        )?;
        per_vm_counter(
            e,
            "vm_connections",
            "vhost-user connections accepted since the VM was added.",
            &|vm| vm.connections,
        )?;
        per_vm(
            e,
            "vm_frozen",
            "1 if the VM's puts are refused (frozen).",
            &|vm| u64::from(vm.client.as_ref().is_some_and(|c| c.frozen)),
        )?;
        per_vm(
            e,
            "vm_weight",
            "The VM's weight for sharing ephemeral capacity.",
            &|vm| vm.client.as_ref().map_or(0, |c| u64::from(c.config.weight)),
        )?;
        family(
            e,
            "vm_quota",
            "The VM's quota by pool kind (+Inf: unlimited).",
            bytes,
            vms.iter()
                .filter_map(|vm| {
                    let c = vm.client.as_ref()?;
                    Some(by_kind(
                        &vm.name,
                        ConstGauge::new(Quota(c.config.persistent_quota)),
                        ConstGauge::new(Quota(c.config.ephemeral_quota)),
                    ))
                })
                .flatten(),
        )?;
        family(
            e,
            "vm_pages",
            "Pages the VM holds, by pool kind.",
            None,
            vms.iter().flat_map(|vm| {
                let c = vm.stats();
                by_kind(
                    &vm.name,
                    ConstGauge::new(c.persistent_pages),
                    ConstGauge::new(c.ephemeral_pages),
                )
            }),
        )?;
        family(
            e,
            "vm",
            "Bytes charged to the VM (data and metadata), by pool kind.",
            bytes,
            vms.iter().flat_map(|vm| {
                let c = vm.stats();
                by_kind(
                    &vm.name,
                    ConstGauge::new(c.persistent_bytes),
                    ConstGauge::new(c.ephemeral_bytes),
                )
            }),
        )?;
        family(
            e,
            "vm_puts",
            "The VM's puts by result.",
            None,
            vms.iter().flat_map(|vm| {
                put_results(&vm.stats().counters).map(|(r, n)| {
                    (
                        [("vm", vm.name.as_str()), ("result", r)],
                        ConstCounter::new(n),
                    )
                })
            }),
        )?;
        family(
            e,
            "vm_gets",
            "The VM's gets by result.",
            None,
            vms.iter().flat_map(|vm| {
                get_results(&vm.stats().counters).map(|(r, n)| {
                    (
                        [("vm", vm.name.as_str()), ("result", r)],
                        ConstCounter::new(n),
                    )
                })
            }),
        )?;
        per_vm_counter(e, "vm_flushed_pages", "Pages the VM flushed.", &|vm| {
            vm.stats().counters.flush_pages
        })?;
        per_vm_counter(e, "vm_flushed_objects", "Objects the VM flushed.", &|vm| {
            vm.stats().counters.flush_objects
        })?;
        per_vm_counter(
            e,
            "vm_evictions",
            "The VM's ephemeral pages evicted.",
            &|vm| vm.stats().counters.evictions,
        )?;
        per_vm_counter(
            e,
            "vm_dedup_hits",
            "The VM's puts stored by sharing an identical content.",
            &|vm| vm.stats().counters.dedup_hits,
        )?;
        for (name, help, metric) in [
            (
                "vm_device_chains",
                "Descriptor chains taken from the VM's request queues.",
                (|d: &DeviceStats| d.chains) as fn(&DeviceStats) -> u64,
            ),
            (
                "vm_device_get_chains",
                "Chains holding at least one GET (batched reads).",
                |d| d.get_chains,
            ),
            (
                "vm_device_get_ops",
                "GET operations in those chains.",
                |d| d.get_ops,
            ),
            (
                "vm_device_rejected_chains",
                "Chains answered with a request-level error.",
                |d| d.rejected_chains,
            ),
            (
                "vm_device_dropped_chains",
                "Chains returned with used length 0 (malformed).",
                |d| d.dropped_chains,
            ),
            (
                "vm_device_kicks",
                "Queue events handled (guest kicks).",
                |d| d.kicks,
            ),
            (
                "vm_device_notifications",
                "Used-ring interrupts sent to the guest.",
                |d| d.notifications,
            ),
            (
                "vm_device_poll_hits",
                "Batches found by busy-polling (--poll-us) instead of a kick.",
                |d| d.poll_hits,
            ),
            (
                "vm_device_poll_misses",
                "Busy-poll spins that found nothing.",
                |d| d.poll_misses,
            ),
            (
                "vm_device_state_exports",
                "Device states (the VM's pools and persistent pages) sent to a migration destination.",
                |d| d.state_exports,
            ),
            (
                "vm_device_state_imports",
                "Device states taken from a migration source.",
                |d| d.state_imports,
            ),
            (
                "vm_device_state_failures",
                "Device-state transfers that failed, either direction.",
                |d| d.state_failures,
            ),
            (
                "vm_device_replayed_answers",
                "Operations offered again after a crash and answered from their records.",
                |d| d.replayed_answers,
            ),
        ] {
            per_vm_counter(e, name, help, &|vm| metric(&vm.device))?;
        }
        family(
            e,
            "vm_device_poll",
            "CPU time spent busy-polling the VM's queues (--poll-us).",
            Some(&Unit::Seconds),
            vms.iter().map(|vm| {
                (
                    [("vm", vm.name.as_str())],
                    ConstCounter::new(vm.device.poll_us as f64 / 1e6),
                )
            }),
        )?;
        Ok(())
    }
}

/// Renders every metric of the daemon.
pub fn render(daemon: &Daemon) -> Result<String, fmt::Error> {
    Snapshot::take(daemon).encode()
}

/// The metrics HTTP server.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and starts serving. Port 0 picks a free port; see
    /// [`MetricsServer::local_addr`].
    pub fn start(daemon: Arc<Daemon>, addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop_evt = EventFd::new(EFD_NONBLOCK)?;
        let thread_stop = stop_evt.try_clone()?;
        let thread = thread::Builder::new()
            .name("vtmem-metrics".to_string())
            .spawn(move || accept_loop(daemon, listener, thread_stop))?;
        debug!("metrics: listening on {addr}");
        Ok(MetricsServer {
            addr,
            stop_evt,
            thread: Some(thread),
        })
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections.
    pub fn stop(&mut self) {
        let _ = self.stop_evt.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(daemon: Arc<Daemon>, listener: TcpListener, stop: EventFd) {
    let slots = Slots::new(MAX_CONNECTIONS);
    accept_until_stopped(
        "metrics",
        &listener,
        &stop,
        |l| l.accept(),
        |(stream, peer)| {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
            let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
            let slot = slots.admit(&stream);
            let Some(slot) = slot else {
                let mut s = stream;
                let _ = respond(
                    &mut s,
                    503,
                    "Service Unavailable",
                    "text/plain",
                    b"busy\n",
                    false,
                );
                return;
            };
            let d = daemon.clone();
            let spawned = thread::Builder::new()
                .name("vtmem-metrics-conn".to_string())
                .spawn(move || {
                    if let Err(e) = serve_connection(&d, stream, &slot) {
                        debug!("metrics: {peer}: {e}");
                    }
                });
            if let Err(e) = spawned {
                warn!("metrics: cannot start a connection thread: {e}");
            }
        },
    );
}

/// Writes one response and closes (`Connection: close`).
fn respond(
    s: &mut TcpStream,
    code: u16,
    reason: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if code == 405 {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if !head_only {
        s.write_all(body)?;
    }
    s.flush()
}

/// Reads one request head (bounded) and answers it.
fn serve_connection(daemon: &Daemon, mut s: TcpStream, slot: &Slot) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(pos) = find_head_end(&buf) {
            break pos;
        }
        if buf.len() >= MAX_REQUEST {
            return respond(
                &mut s,
                431,
                "Request Header Fields Too Large",
                "text/plain",
                b"request too large\n",
                false,
            );
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    slot.spoke();
    let head = String::from_utf8_lossy(&buf[..end]);
    let request_line = head.lines().next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return respond(
            &mut s,
            400,
            "Bad Request",
            "text/plain",
            b"bad request\n",
            false,
        );
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return respond(
            &mut s,
            400,
            "Bad Request",
            "text/plain",
            b"bad request\n",
            false,
        );
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(
            &mut s,
            405,
            "Method Not Allowed",
            "text/plain",
            b"only GET\n",
            false,
        );
    }
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" {
        return respond(
            &mut s,
            404,
            "Not Found",
            "text/plain",
            b"not found; try /metrics\n",
            head_only,
        );
    }
    match render(daemon) {
        Ok(body) => respond(&mut s, 200, "OK", CONTENT_TYPE, body.as_bytes(), head_only),
        Err(fmt::Error) => respond(
            &mut s,
            500,
            "Internal Server Error",
            "text/plain",
            b"cannot encode the metrics\n",
            head_only,
        ),
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_with_help_type_and_labels() {
        let snapshot = Snapshot {
            uptime: Duration::from_millis(1500),
            store: StoreStats::default(),
            vms: vec![VmSnapshot {
                name: "vm1".to_string(),
                connected: true,
                connections: 2,
                device: DeviceStats::default(),
                client: None,
            }],
        };
        let text = snapshot.encode().unwrap();
        for block in [
            "# HELP vtmem_uptime_seconds Seconds since vtmemd started.\n\
             # TYPE vtmem_uptime_seconds gauge\n\
             vtmem_uptime_seconds 1.5\n",
            "# HELP vtmem_store_gets_total Gets by result, all VMs (including removed ones).\n\
             # TYPE vtmem_store_gets_total counter\n\
             vtmem_store_gets_total{result=\"hit\"} 0\n\
             vtmem_store_gets_total{result=\"miss\"} 0\n",
            "vtmem_vm_connections_total{vm=\"vm1\"} 2\n",
        ] {
            assert!(text.contains(block), "{block} missing:\n{text}");
        }
        // A VM the store no longer knows has no quota.
        assert!(!text.contains("vtmem_vm_quota_bytes"), "{text}");
    }

    #[test]
    fn counts_follow_the_store() {
        use vtmem_api::VmSpec;
        use vtmem_store::{Handle, ObjectId, PoolSpec, PAGE_SIZE};
        let dir = tempfile::tempdir().unwrap();
        let daemon = crate::testutil::daemon_in(dir.path());
        let vm = daemon.add_vm(&"a".parse::<VmSpec>().unwrap()).unwrap();
        let c = vm.client().data();
        let pool = c.new_pool(PoolSpec::persistent()).unwrap();
        let h = |i| Handle {
            pool,
            object: ObjectId([1, 0, 0]),
            index: i,
        };
        let mut page = [7u8; PAGE_SIZE];
        for i in 0..3 {
            page[0] = i as u8;
            c.put(&h(i), &page, false).unwrap();
        }
        let mut out = [0u8; PAGE_SIZE];
        assert!(c.get(&h(0), &mut out).unwrap());
        assert!(!c.get(&h(9), &mut out).unwrap());
        vm.client().freeze();
        assert!(c.put(&h(5), &page, false).is_err());
        let text = render(&daemon).unwrap();
        for line in [
            "vtmem_vm_puts_total{vm=\"a\",result=\"stored\"} 3",
            "vtmem_vm_puts_total{vm=\"a\",result=\"frozen\"} 1",
            "vtmem_vm_gets_total{vm=\"a\",result=\"hit\"} 1",
            "vtmem_vm_gets_total{vm=\"a\",result=\"miss\"} 1",
            "vtmem_vm_pages{vm=\"a\",kind=\"persistent\"} 3",
            "vtmem_vm_frozen{vm=\"a\"} 1",
            "vtmem_stored_pages 3",
            "vtmem_store_puts_total{result=\"stored\"} 3",
            "vtmem_vm_quota_bytes{vm=\"a\",kind=\"ephemeral\"} +Inf",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // Store totals keep counting a VM after it is removed.
        daemon.remove_vm(vm.name()).unwrap();
        let text = render(&daemon).unwrap();
        assert!(text
            .lines()
            .any(|l| l == "vtmem_store_puts_total{result=\"stored\"} 3"));
        assert!(!text.contains("vm=\"a\""));
        daemon.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn head_end() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\n"), Some(14));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }
}
