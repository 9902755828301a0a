// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The Grafana dashboard (`contrib/grafana/vtmem.json`) and the Prometheus
//! alerting rules (`contrib/prometheus/vtmem-rules.yml`): every metric
//! name and label value they use is one a running vtmemd really exports
//! (scraped here, with a simulated VM at work), and, where Debian's
//! `promtool` is installed (package prometheus), the rules load, their
//! unit tests pass, and every dashboard query parses as PromQL.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::guest::*;
use common::*;
use vtmem_guestsim::{PoolSpec, Status};

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(contrib(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Metrics Prometheus itself makes, not vtmemd.
const PROMETHEUS_OWN: [&str; 1] = ["up"];

/// Every `vtmem_...` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("vtmem_") {
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// Every `label="value"` (or `=~`, `!=`) matcher in `text`, as (label, value).
fn matchers(text: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for label in ["result", "kind"] {
        for op in ["=\"", "!=\""] {
            let pat = format!("{label}{op}");
            let mut rest = text;
            while let Some(i) = rest.find(&pat) {
                let tail = &rest[i + pat.len()..];
                let end = tail.find('"').unwrap_or(tail.len());
                out.insert((label.to_string(), tail[..end].to_string()));
                rest = &tail[end..];
            }
        }
    }
    out
}

/// The dashboard's queries: every panel target and the variable queries.
fn dashboard_queries() -> Vec<String> {
    let dash: serde_json::Value = serde_json::from_str(&read("grafana/vtmem.json")).unwrap();
    let mut queries = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().expect("targets") {
            queries.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for var in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["definition"].as_str() {
            queries.push(q.to_string());
        }
    }
    queries
}

/// One scrape of a vtmemd serving a VM that stored and read pages:
/// metric name (as exposed) → label sets.
fn scrape() -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let d = vtmemd_with_vms(
        &["vm1", "vm2,weight=50"],
        &["--metrics-address", "127.0.0.1:0", "--host-limit", "64M"],
    );
    let vm = connect(&d, "vm1");
    let pool = vm.new_pool(PoolSpec::ephemeral()).unwrap();
    let data = pages(9, 16);
    let st = vm.put_batch(&items(pool, 1, &data)).unwrap();
    assert!(st.iter().all(|s| *s == Status::Ok), "{st:?}");
    vm.get_batch(&[handle(pool, 1, 0)]).unwrap();

    let line = d.ready_line();
    let start = line.find("metrics http://").expect("metrics address") + "metrics http://".len();
    let addr = &line[start..start + line[start..].find("/metrics").unwrap()];
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    let body = page.split_once("\r\n\r\n").expect("a response").1;
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let mut out: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for sample in scrape.samples {
        let labels = sample
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.entry(sample.metric).or_default().push(labels);
    }
    drop(vm);
    out
}

#[test]
fn dashboard_and_rules_use_only_exported_metrics() {
    let exported = scrape();
    assert!(exported.contains_key("vtmem_vm_pages"), "{exported:?}");
    let label_values: BTreeSet<(String, String)> = exported
        .values()
        .flatten()
        .flat_map(|ls| ls.iter().map(|(k, v)| (k.clone(), v.clone())))
        .collect();

    let rules = read("prometheus/vtmem-rules.yml");
    let dashboard = dashboard_queries().join("\n");
    for (what, text) in [("dashboard", &dashboard), ("rules", &rules)] {
        let used = metric_names(text);
        assert!(used.len() >= 8, "{what}: {used:?}");
        let unknown: Vec<_> = used.iter().filter(|n| !exported.contains_key(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{what} uses metrics vtmemd does not export: {unknown:?}\nexported: {:?}",
            exported.keys().collect::<Vec<_>>()
        );
        let bad: Vec<_> = matchers(text)
            .into_iter()
            .filter(|m| !label_values.contains(m))
            .collect();
        assert!(
            bad.is_empty(),
            "{what} matches label values never exported: {bad:?}"
        );
    }
    // The rules name the metrics Prometheus makes itself only as such.
    for own in PROMETHEUS_OWN {
        assert!(!exported.contains_key(own));
    }
    // What the issue asks the dashboard and the alerts to cover.
    for name in [
        "vtmem_vm_pages",
        "vtmem_vm_bytes",
        "vtmem_vm_gets_total",
        "vtmem_vm_puts_total",
        "vtmem_vm_evictions_total",
        "vtmem_host_used_bytes",
        "vtmem_host_limit_bytes",
        "vtmem_compression_ratio",
        "vtmem_dedup_ratio",
    ] {
        assert!(dashboard.contains(name), "dashboard lacks {name}");
    }
    for alert in [
        "VtmemHostNearLimit",
        "VtmemVmOverQuota",
        "VtmemVmFrozen",
        "VtmemVmEvictionsAboveShare",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
    }
}

#[test]
fn the_checker_catches_a_wrong_name() {
    assert_eq!(
        metric_names("rate(vtmem_vm_gets_total{x}[5m]) / my_vtmem_thing + vtmem_nope"),
        BTreeSet::from(["vtmem_vm_gets_total".to_string(), "vtmem_nope".to_string()])
    );
    assert_eq!(
        matchers(r#"a{result="hit",kind!="ephemeral"}"#),
        BTreeSet::from([
            ("kind".to_string(), "ephemeral".to_string()),
            ("result".to_string(), "hit".to_string())
        ])
    );
}

fn promtool() -> Option<&'static str> {
    let found = Path::new("/usr/bin/promtool").exists();
    if !found {
        eprintln!(
            "skipped: promtool is not installed (Debian package prometheus; \
             scripts/apt-setup.sh install prometheus)"
        );
    }
    found.then_some("/usr/bin/promtool")
}

fn promtool_ok(args: &[&str], dir: &Path) -> String {
    let tool = promtool().unwrap();
    let out = run(Command::new(tool).args(args).current_dir(dir), DEADLINE);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn promtool_checks_and_tests_the_rules() {
    if promtool().is_none() {
        return;
    }
    let dir = contrib("prometheus");
    let text = promtool_ok(&["check", "rules", "vtmem-rules.yml"], &dir);
    assert!(text.contains("SUCCESS: 7 rules found"), "{text}");
    let text = promtool_ok(&["test", "rules", "vtmem-rules.test.yml"], &dir);
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn promtool_parses_every_dashboard_query() {
    if promtool().is_none() {
        return;
    }
    // Each query as a recording rule, Grafana's variables replaced by
    // what they become at query time.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let queries = dashboard_queries();
    for (i, q) in queries.iter().enumerate() {
        let q = q.replace("$__rate_interval", "5m").replace("$vm", ".*");
        let q = if q.starts_with("label_values(") {
            // A Grafana function: its metric is the query.
            q["label_values(".len()..q.find(',').unwrap()].to_string()
        } else {
            q
        };
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: '{}'\n",
            q.replace('\'', "''")
        ));
    }
    let dir = temp_dir();
    std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
    let text = promtool_ok(&["check", "rules", "dashboard.yml"], dir.path());
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{text}"
    );
}
