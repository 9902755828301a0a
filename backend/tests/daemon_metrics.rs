// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmemd --metrics-address`: the Prometheus endpoint, scraped over
//! loopback, parsed, and checked against the control socket.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::json;

/// Parses a page with `prometheus-parse`, then checks what that lenient
/// parser lets pass: no sample line was skipped, every sample has a HELP
/// line and a counter or gauge TYPE line under its own name, counters and
/// only counters end in `_total`, and no series appears twice.
fn parse(text: &str) -> Vec<Sample> {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("a page");
    let lines = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    assert_eq!(scrape.samples.len(), lines, "lines left unparsed:\n{text}");
    for s in &scrape.samples {
        assert!(s.metric.starts_with("vtmem_"), "{}", s.metric);
        assert!(scrape.docs.contains_key(&s.metric), "no HELP: {}", s.metric);
        match s.value {
            Value::Counter(_) => assert!(s.metric.ends_with("_total"), "{}", s.metric),
            Value::Gauge(_) => assert!(!s.metric.ends_with("_total"), "{}", s.metric),
            ref v => panic!("{} has no counter or gauge TYPE: {v:?}", s.metric),
        }
        let same = scrape
            .samples
            .iter()
            .filter(|o| o.metric == s.metric && o.labels == s.labels);
        assert_eq!(same.count(), 1, "{} {:?} twice", s.metric, s.labels);
    }
    scrape.samples
}

/// One HTTP request; returns (status code, headers, body).
fn http(addr: &str, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("a response head");
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, head.to_string(), body.to_string())
}

fn metrics_addr(d: &Vtmemd) -> String {
    let l = &d.ready_line();
    let start = l
        .find("metrics http://")
        .expect("metrics in the ready line")
        + 15;
    let rest = &l[start..];
    rest[..rest.find("/metrics").unwrap()].to_string()
}

fn get(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    match found[0].value {
        Value::Counter(v) | Value::Gauge(v) => v,
        ref v => panic!("{name}: {v:?}"),
    }
}

/// Scrapes the page and parses it.
fn scrape(addr: &str) -> Vec<Sample> {
    let (code, head, body) = http(addr, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(code, 200, "{head}");
    parse(&body)
}

#[test]
fn metrics_match_the_control_socket() {
    let d = vtmemd(&[
        "--host-limit",
        "64M",
        "--metrics-address",
        "127.0.0.1:0",
        "--vm",
        "name=vm1,persistent-quota=16M,ephemeral-quota=32M,weight=100",
        "--vm",
        "vm2",
    ]);
    let addr = metrics_addr(&d);
    let mut c = d.raw();
    c.ok("set-weight", json!({"vm": "vm2", "weight": 250}));
    c.ok("freeze", json!({"vm": "vm1"}));
    c.ok("set-limit", json!({"bytes": "48M"}));

    let (code, head, body) = http(&addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 200, "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let samples = parse(&body);

    let status = c.ok("status", json!({}));
    let list = c.ok("list", json!({}));
    assert_eq!(
        get(&samples, "vtmem_host_limit_bytes", &[]),
        status["host_limit"].as_f64().unwrap()
    );
    assert_eq!(
        get(&samples, "vtmem_host_limit_bytes", &[]),
        48.0 * 1048576.0
    );
    assert_eq!(
        get(&samples, "vtmem_host_used_bytes", &[]),
        status["host_used"].as_f64().unwrap()
    );
    assert_eq!(
        get(&samples, "vtmem_host_overhead_bytes", &[]),
        status["host_overhead"].as_f64().unwrap()
    );
    assert_eq!(
        get(&samples, "vtmem_stored_pages", &[]),
        status["stored_pages"].as_f64().unwrap()
    );
    assert_eq!(
        get(&samples, "vtmem_unique_pages", &[]),
        status["unique_pages"].as_f64().unwrap()
    );
    assert_eq!(get(&samples, "vtmem_vms", &[]), 2.0);
    assert!(
        get(&samples, "vtmem_uptime_seconds", &[])
            <= status["uptime_seconds"].as_f64().unwrap() + 0.01
    );
    for (result, field) in [
        ("stored", "puts_stored"),
        ("no_space", "puts_refused_no_space"),
        ("over_quota", "puts_refused_quota"),
        ("frozen", "puts_refused_frozen"),
        ("other", "puts_refused_other"),
    ] {
        assert_eq!(
            get(&samples, "vtmem_store_puts_total", &[("result", result)]),
            status["counters"][field].as_f64().unwrap()
        );
    }

    for name in ["vm1", "vm2"] {
        let vm = find_vm(&list, name).unwrap();
        let cfg = &vm["config"];
        let l = [("vm", name)];
        assert_eq!(
            get(&samples, "vtmem_vm_weight", &l),
            cfg["weight"].as_f64().unwrap()
        );
        assert_eq!(
            get(&samples, "vtmem_vm_frozen", &l),
            f64::from(u8::from(vm["frozen"].as_bool().unwrap()))
        );
        assert_eq!(
            get(&samples, "vtmem_vm_connected", &l),
            f64::from(u8::from(vm["connected"].as_bool().unwrap()))
        );
        for kind in ["persistent", "ephemeral"] {
            let q = cfg[format!("{kind}_quota")].as_u64().unwrap();
            let want = if q == u64::MAX {
                f64::INFINITY
            } else {
                q as f64
            };
            let kl = [("vm", name), ("kind", kind)];
            assert_eq!(get(&samples, "vtmem_vm_quota_bytes", &kl), want);
            assert_eq!(
                get(&samples, "vtmem_vm_pages", &kl),
                vm["stats"][format!("{kind}_pages")].as_f64().unwrap()
            );
            assert_eq!(
                get(&samples, "vtmem_vm_bytes", &kl),
                vm["stats"][format!("{kind}_bytes")].as_f64().unwrap()
            );
        }
        for result in ["hit", "miss"] {
            get(
                &samples,
                "vtmem_vm_gets_total",
                &[("vm", name), ("result", result)],
            );
        }
        assert_eq!(
            get(&samples, "vtmem_vm_device_chains_total", &l),
            vm["device"]["chains"].as_f64().unwrap()
        );
        for (metric, field) in [
            ("vtmem_vm_device_get_chains_total", "get_chains"),
            ("vtmem_vm_device_get_ops_total", "get_ops"),
        ] {
            assert_eq!(
                get(&samples, metric, &l),
                vm["device"][field].as_f64().unwrap(),
                "{metric}"
            );
        }
        for m in [
            "vtmem_vm_device_rejected_chains_total",
            "vtmem_vm_device_kicks_total",
            "vtmem_vm_device_notifications_total",
            "vtmem_vm_evictions_total",
            "vtmem_vm_dedup_hits_total",
            "vtmem_vm_flushed_pages_total",
        ] {
            get(&samples, m, &l);
        }
    }
    assert_eq!(get(&samples, "vtmem_vm_weight", &[("vm", "vm2")]), 250.0);
    assert_eq!(get(&samples, "vtmem_vm_frozen", &[("vm", "vm1")]), 1.0);
    assert_eq!(
        get(
            &samples,
            "vtmem_vm_quota_bytes",
            &[("vm", "vm2"), ("kind", "ephemeral")]
        ),
        f64::INFINITY
    );
    assert_eq!(
        get(
            &samples,
            "vtmem_vm_quota_bytes",
            &[("vm", "vm1"), ("kind", "persistent")]
        ),
        16.0 * 1048576.0
    );

    // A VM removed disappears from the per-VM series.
    c.ok("remove-vm", json!({"vm": "vm2"}));
    let (_, _, body) = http(&addr, "GET /metrics HTTP/1.0\r\n\r\n");
    let samples = parse(&body);
    assert!(!samples.iter().any(|s| s.labels.get("vm") == Some("vm2")));
    assert_eq!(get(&samples, "vtmem_vms", &[]), 1.0);
}

#[test]
fn connections_show_while_they_last() {
    let d = vtmemd(&["--metrics-address", "127.0.0.1:0", "--vm", "vm1"]);
    let addr = metrics_addr(&d);
    let vm = [("vm", "vm1")];
    let samples = scrape(&addr);
    assert_eq!(get(&samples, "vtmem_vm_connected", &vm), 0.0);
    assert_eq!(get(&samples, "vtmem_vm_connections_total", &vm), 0.0);

    let conn = UnixStream::connect(d.socket("vm1")).unwrap();
    wait_until("the connection counted", DEADLINE, || {
        let samples = scrape(&addr);
        get(&samples, "vtmem_vm_connected", &vm) == 1.0
            && get(&samples, "vtmem_vm_connections_total", &vm) == 1.0
    });
    drop(conn);
    wait_until("the disconnection seen", DEADLINE, || {
        get(&scrape(&addr), "vtmem_vm_connected", &vm) == 0.0
    });
    let samples = scrape(&addr);
    assert_eq!(get(&samples, "vtmem_vm_connections_total", &vm), 1.0);
    let list = d.raw().ok("list", json!({}));
    assert_eq!(find_vm(&list, "vm1").unwrap()["connections"], 1, "{list}");
}

#[test]
fn metrics_endpoint_is_bounded() {
    let d = vtmemd(&["--metrics-address", "127.0.0.1:0", "--vm", "vm1"]);
    let addr = metrics_addr(&d);
    assert_eq!(http(&addr, "GET / HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(&addr, "GET /metricsx HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(&addr, "POST /metrics HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(http(&addr, "garbage\r\n\r\n").0, 400);
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20000));
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(huge.as_bytes());
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    // HEAD: the head only.
    let (code, head, body) = http(&addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(code, 200);
    assert!(body.is_empty(), "{head}");
    // Still serving after all that.
    let (code, _, body) = http(&addr, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(code, 200);
    parse(&body);
}

#[test]
fn metrics_are_off_by_default_and_address_errors_are_one_line() {
    let d = vtmemd(&["--vm", "vm1"]);
    assert!(!d.ready_line().contains("metrics"), "{}", d.ready_line());
    let out = run_vtmemd(&["--socket-dir", "/tmp", "--metrics-address", "nowhere:port"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid metrics address"), "{err}");
}

/// Any local process can open connections to the endpoint. Idle ones used
/// to hold all its slots, after which every scrape got 503; now a scrape
/// always finds room.
#[test]
fn idle_connections_do_not_keep_scrapes_out() {
    let d = vtmemd(&["--metrics-address", "127.0.0.1:0", "--vm", "vm1"]);
    let addr = metrics_addr(&d);
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    for _ in 0..3 {
        let samples = scrape(&addr);
        assert_eq!(get(&samples, "vtmem_vms", &[]), 1.0);
    }
    // The oldest idle connections made room: the daemon closed them.
    for mut s in idle.into_iter().take(3) {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            s.read(&mut buf).unwrap(),
            0,
            "an idle connection kept its slot"
        );
    }
}

/// `--poll-us`: a queue whose requests come back to back is polled, and
/// the CPU the spins took shows in the metrics and in `vtmemctl show`; a
/// queue whose requests come further apart than the window stops
/// polling altogether.
#[test]
fn polling_cpu_is_reported_and_an_idle_queue_stops_polling() {
    use vtmem_guestsim::PoolSpec;
    let d = vtmemd(&[
        "--metrics-address",
        "127.0.0.1:0",
        "--poll-us",
        "2000",
        "--vm",
        "vm1",
    ]);
    let addr = metrics_addr(&d);
    let vm = guest::connect(&d, "vm1");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let page = random_page(1);
    let put = |i: u64| {
        let st = vm.put_batch(&[(handle(pool, 1, i), &page)]).unwrap();
        assert_eq!(st, vec![vtmem_guestsim::Status::Ok]);
    };

    // Back to back: each request arrives within the window of the last.
    for i in 0..300 {
        put(i);
    }
    let busy = d.show("vm1").device;
    assert!(busy.poll_hits > 0, "{busy:?}");
    assert!(busy.poll_us > 0, "{busy:?}");

    // Ten times the window apart: each kick halves the window, and below
    // a sixteenth of it (after five kicks) the queue stops polling.
    let gap = Duration::from_millis(20);
    for i in 0..8 {
        std::thread::sleep(gap);
        put(1000 + i);
    }
    let idle = d.show("vm1").device;
    assert!(idle.poll_misses > busy.poll_misses, "{idle:?}");
    for i in 0..5 {
        std::thread::sleep(gap);
        put(2000 + i);
    }
    let after = d.show("vm1").device;
    assert_eq!(
        (after.poll_us, after.poll_hits, after.poll_misses),
        (idle.poll_us, idle.poll_hits, idle.poll_misses),
        "an idle queue still polls"
    );
    assert_eq!(after.kicks, idle.kicks + 5);

    // The same figures in the metrics and in `vtmemctl show`.
    let samples = scrape(&addr);
    let vm1 = [("vm", "vm1")];
    assert_eq!(
        get(&samples, "vtmem_vm_device_poll_seconds_total", &vm1),
        after.poll_us as f64 / 1e6
    );
    assert_eq!(
        get(&samples, "vtmem_vm_device_poll_hits_total", &vm1),
        after.poll_hits as f64
    );
    assert_eq!(
        get(&samples, "vtmem_vm_device_poll_misses_total", &vm1),
        after.poll_misses as f64
    );
    let shown = ctl(&d, &["show", "vm1"]);
    let want = format!("polling CPU {:.3} ms", after.poll_us as f64 / 1000.0);
    assert!(shown.ok().contains(&want), "{want} not in:\n{}", shown.ok());
}
