// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Prometheus metrics: the text exposition format (version 0.0.4) served by
//! a small HTTP/1.1 responder on a TCP socket (`--metrics-address`).
//!
//! The responder answers `GET /metrics` (and `HEAD`), 404 for any other
//! path, 405 for other methods, one request per connection. Requests are
//! bounded: at most [`MAX_REQUEST`] bytes of head, read and write timeouts,
//! and at most [`MAX_CONNECTIONS`] connections served at once (more are
//! answered 503 and closed). There is no authentication: keep the address
//! on loopback or a management network.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::accept::accept_until_stopped;
use crate::daemon::Daemon;
use vtmem_store::OpCounters;

/// Longest request head (request line and headers) accepted.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Connections served at the same time.
pub const MAX_CONNECTIONS: usize = 8;
/// Read and write timeout of a connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Builds one exposition: metric families, each with HELP and TYPE lines
/// before its samples.
#[derive(Default)]
struct Exposition {
    out: String,
}

/// Escapes a label value (`\`, `"`, newline).
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Formats a sample value: integers as such, infinity as `+Inf`.
fn value(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if v.is_nan() {
        "NaN".to_string()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A quota as a gauge value: unlimited is `+Inf`.
fn quota(bytes: u64) -> f64 {
    if bytes == u64::MAX {
        f64::INFINITY
    } else {
        bytes as f64
    }
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", value(v));
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], v);
    }

    /// A family with one sample per VM (`rows`: name and value).
    fn per_vm(&mut self, name: &str, kind: &str, help: &str, rows: &[(&str, f64)]) {
        self.family(name, kind, help);
        for (vm, v) in rows {
            self.sample(name, &[("vm", vm)], *v);
        }
    }

    /// A gauge family with one `persistent` and one `ephemeral` sample per
    /// VM; VMs with `None` are left out.
    fn per_vm_by_kind(&mut self, name: &str, help: &str, rows: &[(&str, Option<(f64, f64)>)]) {
        self.family(name, "gauge", help);
        for (vm, values) in rows {
            if let Some((persistent, ephemeral)) = values {
                self.sample(name, &[("vm", vm), ("kind", "persistent")], *persistent);
                self.sample(name, &[("vm", vm), ("kind", "ephemeral")], *ephemeral);
            }
        }
    }
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

/// Renders every metric of the daemon.
pub fn render(daemon: &Daemon) -> String {
    let stats = daemon.store().stats();
    let vms = daemon.vms();
    let mut e = Exposition::default();

    // The store.
    e.single(
        "vtmem_uptime_seconds",
        "gauge",
        "Seconds since vtmemd started.",
        daemon.uptime().as_secs_f64(),
    );
    e.single(
        "vtmem_host_limit_bytes",
        "gauge",
        "Host memory the store may use for pages and metadata.",
        stats.host_limit as f64,
    );
    e.single(
        "vtmem_host_used_bytes",
        "gauge",
        "Host memory charged against the limit (data, metadata, reservations).",
        stats.host_used as f64,
    );
    e.single(
        "vtmem_data_bytes",
        "gauge",
        "Bytes of stored page data (compressed or raw).",
        stats.data_bytes as f64,
    );
    e.single(
        "vtmem_metadata_bytes",
        "gauge",
        "Bytes of store metadata.",
        stats.metadata_bytes as f64,
    );
    e.single(
        "vtmem_stored_pages",
        "gauge",
        "Pages held in all pools (a shared pool counted once).",
        stats.stored_pages as f64,
    );
    e.single(
        "vtmem_unique_pages",
        "gauge",
        "Distinct page contents stored.",
        stats.unique_pages as f64,
    );
    e.single(
        "vtmem_zero_pages",
        "gauge",
        "Zero pages held.",
        stats.zero_pages as f64,
    );
    e.single(
        "vtmem_reserved_pages",
        "gauge",
        "Pages reserved and not yet spent.",
        stats.reserved_pages as f64,
    );
    e.single(
        "vtmem_compression_ratio",
        "gauge",
        "Uncompressed bytes of unique contents divided by their stored bytes.",
        stats.compression_ratio,
    );
    e.single(
        "vtmem_dedup_ratio",
        "gauge",
        "Non-zero pages held divided by distinct contents.",
        stats.dedup_ratio,
    );
    e.single("vtmem_vms", "gauge", "VMs served.", vms.len() as f64);
    e.single("vtmem_pools", "gauge", "Pools alive.", stats.pools as f64);

    // Store-wide counters, including VMs removed since the start.
    let c = &stats.counters;
    e.family(
        "vtmem_store_puts_total",
        "counter",
        "Puts by result, all VMs (including removed ones).",
    );
    for (result, n) in put_results(c) {
        e.sample("vtmem_store_puts_total", &[("result", result)], n as f64);
    }
    e.family(
        "vtmem_store_gets_total",
        "counter",
        "Gets by result, all VMs (including removed ones).",
    );
    for (result, n) in get_results(c) {
        e.sample("vtmem_store_gets_total", &[("result", result)], n as f64);
    }
    e.single(
        "vtmem_store_flushed_pages_total",
        "counter",
        "Pages flushed by the guests, all VMs.",
        c.flush_pages as f64,
    );
    e.single(
        "vtmem_store_evictions_total",
        "counter",
        "Ephemeral pages evicted, all VMs.",
        c.evictions as f64,
    );
    e.single(
        "vtmem_store_dedup_hits_total",
        "counter",
        "Puts stored by sharing an identical stored content, all VMs.",
        c.dedup_hits as f64,
    );

    // Per VM: the VMs of the registry, with the store's view of each.
    struct Row<'a> {
        name: &'a str,
        connected: bool,
        connections: u64,
        device: vtmem_api::DeviceStats,
        stats: Option<&'a vtmem_store::ClientStats>,
    }
    let rows: Vec<Row> = vms
        .iter()
        .map(|vm| Row {
            name: vm.name().as_str(),
            connected: vm.is_connected(),
            connections: vm.connections(),
            device: vm.counters(),
            stats: stats.clients.iter().find(|s| s.name == vm.name().as_str()),
        })
        .collect();
    let gauge = |f: &dyn Fn(&Row) -> f64| -> Vec<(&str, f64)> {
        rows.iter().map(|r| (r.name, f(r))).collect()
    };
    let st =
        |r: &Row, f: &dyn Fn(&vtmem_store::ClientStats) -> u64| r.stats.map(f).unwrap_or(0) as f64;

    e.per_vm(
        "vtmem_vm_connected",
        "gauge",
        "1 if a VMM is attached to the VM's socket.",
        &gauge(&|r| f64::from(u8::from(r.connected))),
    );
    e.per_vm(
        "vtmem_vm_connections_total",
        "counter",
        "vhost-user connections accepted since the VM was added.",
        &gauge(&|r| r.connections as f64),
    );
    e.per_vm(
        "vtmem_vm_frozen",
        "gauge",
        "1 if the VM's puts are refused (frozen).",
        &gauge(&|r| f64::from(u8::from(r.stats.is_some_and(|s| s.frozen)))),
    );
    e.per_vm(
        "vtmem_vm_weight",
        "gauge",
        "The VM's weight for sharing ephemeral capacity.",
        &gauge(&|r| r.stats.map_or(0.0, |s| f64::from(s.config.weight))),
    );
    let by_kind = |f: &dyn Fn(&Row) -> Option<(f64, f64)>| -> Vec<(&str, Option<(f64, f64)>)> {
        rows.iter().map(|r| (r.name, f(r))).collect()
    };
    e.per_vm_by_kind(
        "vtmem_vm_quota_bytes",
        "The VM's quota by pool kind (+Inf: unlimited).",
        &by_kind(&|r| {
            r.stats.map(|s| {
                (
                    quota(s.config.persistent_quota),
                    quota(s.config.ephemeral_quota),
                )
            })
        }),
    );
    e.per_vm_by_kind(
        "vtmem_vm_pages",
        "Pages the VM holds, by pool kind.",
        &by_kind(&|r| {
            Some((
                st(r, &|s| s.persistent_pages),
                st(r, &|s| s.ephemeral_pages),
            ))
        }),
    );
    e.per_vm_by_kind(
        "vtmem_vm_bytes",
        "Bytes charged to the VM (data and metadata), by pool kind.",
        &by_kind(&|r| {
            Some((
                st(r, &|s| s.persistent_bytes),
                st(r, &|s| s.ephemeral_bytes),
            ))
        }),
    );
    let zero = OpCounters::default();
    let counters =
        |r: &Row<'_>| -> OpCounters { r.stats.map_or(zero.clone(), |s| s.counters.clone()) };
    e.family("vtmem_vm_puts_total", "counter", "The VM's puts by result.");
    for r in &rows {
        for (result, n) in put_results(&counters(r)) {
            e.sample(
                "vtmem_vm_puts_total",
                &[("vm", r.name), ("result", result)],
                n as f64,
            );
        }
    }
    e.family("vtmem_vm_gets_total", "counter", "The VM's gets by result.");
    for r in &rows {
        for (result, n) in get_results(&counters(r)) {
            e.sample(
                "vtmem_vm_gets_total",
                &[("vm", r.name), ("result", result)],
                n as f64,
            );
        }
    }
    e.per_vm(
        "vtmem_vm_flushed_pages_total",
        "counter",
        "Pages the VM flushed.",
        &gauge(&|r| counters(r).flush_pages as f64),
    );
    e.per_vm(
        "vtmem_vm_flushed_objects_total",
        "counter",
        "Objects the VM flushed.",
        &gauge(&|r| counters(r).flush_objects as f64),
    );
    e.per_vm(
        "vtmem_vm_evictions_total",
        "counter",
        "The VM's ephemeral pages evicted.",
        &gauge(&|r| counters(r).evictions as f64),
    );
    e.per_vm(
        "vtmem_vm_dedup_hits_total",
        "counter",
        "The VM's puts stored by sharing an identical content.",
        &gauge(&|r| counters(r).dedup_hits as f64),
    );
    e.per_vm(
        "vtmem_vm_device_chains_total",
        "counter",
        "Descriptor chains taken from the VM's request queues.",
        &gauge(&|r| r.device.chains as f64),
    );
    e.per_vm(
        "vtmem_vm_device_rejected_chains_total",
        "counter",
        "Chains answered with a request-level error.",
        &gauge(&|r| r.device.rejected_chains as f64),
    );
    e.per_vm(
        "vtmem_vm_device_dropped_chains_total",
        "counter",
        "Chains returned with used length 0 (malformed).",
        &gauge(&|r| r.device.dropped_chains as f64),
    );
    e.per_vm(
        "vtmem_vm_device_kicks_total",
        "counter",
        "Queue events handled (guest kicks).",
        &gauge(&|r| r.device.kicks as f64),
    );
    e.per_vm(
        "vtmem_vm_device_notifications_total",
        "counter",
        "Used-ring interrupts sent to the guest.",
        &gauge(&|r| r.device.notifications as f64),
    );
    e.out
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
    let active = Arc::new(AtomicUsize::new(0));
    accept_until_stopped(
        "metrics",
        &listener,
        &stop,
        |l| l.accept(),
        |(stream, peer)| {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
            let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::AcqRel);
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
            }
            let d = daemon.clone();
            let a = active.clone();
            let spawned = thread::Builder::new()
                .name("vtmem-metrics-conn".to_string())
                .spawn(move || {
                    if let Err(e) = serve_connection(&d, stream) {
                        debug!("metrics: {peer}: {e}");
                    }
                    a.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = spawned {
                active.fetch_sub(1, Ordering::AcqRel);
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
fn serve_connection(daemon: &Daemon, mut s: TcpStream) -> io::Result<()> {
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
    let body = render(daemon);
    respond(&mut s, 200, "OK", CONTENT_TYPE, body.as_bytes(), head_only)
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
    fn values_and_labels() {
        assert_eq!(value(3.0), "3");
        assert_eq!(value(0.5), "0.5");
        assert_eq!(value(f64::INFINITY), "+Inf");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut e = Exposition::default();
        e.family("vtmem_x_total", "counter", "X.");
        e.sample("vtmem_x_total", &[("vm", "a"), ("result", "hit")], 2.0);
        assert_eq!(
            e.out,
            "# HELP vtmem_x_total X.\n# TYPE vtmem_x_total counter\nvtmem_x_total{vm=\"a\",result=\"hit\"} 2\n"
        );
    }

    #[test]
    fn counts_follow_the_store() {
        use crate::config::{DaemonConfig, DeviceSettings};
        use vtmem_api::{ByteSize, VmSpec};
        use vtmem_store::{Handle, ObjectId, PoolSpec, Store, StoreConfig, PAGE_SIZE};
        let dir = std::env::temp_dir().join(format!("vtmem-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = DaemonConfig {
            socket_dir: dir.clone(),
            control_socket: dir.join("ctl"),
            control_group: None,
            host_limit: ByteSize(1 << 26),
            device: DeviceSettings::default(),
            vms: Vec::new(),
            metrics_address: None,
            state_file: None,
        };
        let daemon = Daemon::new(
            Store::new(StoreConfig {
                host_limit: 1 << 26,
            }),
            &config,
        );
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
        let text = render(&daemon);
        for line in [
            "vtmem_vm_puts_total{vm=\"a\",result=\"stored\"} 3",
            "vtmem_vm_puts_total{vm=\"a\",result=\"frozen\"} 1",
            "vtmem_vm_gets_total{vm=\"a\",result=\"hit\"} 1",
            "vtmem_vm_gets_total{vm=\"a\",result=\"miss\"} 1",
            "vtmem_vm_pages{vm=\"a\",kind=\"persistent\"} 3",
            "vtmem_vm_frozen{vm=\"a\"} 1",
            "vtmem_stored_pages 3",
            "vtmem_store_puts_total{result=\"stored\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // Store totals keep counting a VM after it is removed.
        daemon.remove_vm(vm.name()).unwrap();
        let text = render(&daemon);
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
