// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmemctl` changes what a running guest sees: a lowered quota refuses
//! the next put, freeze refuses puts, auth admits a shared pool, flush and
//! remove-vm free memory, and the statistics commands show the activity.
//! The real `vtmemctl` binary drives a real `vtmemd` while simulated VMs
//! do I/O over vhost-user.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::guest::*;
use common::*;
use serde_json::Value;
use vtmem_guestsim::{Error, PoolSpec, Status, VmOptions};
use vtmem_protocol::Uuid;

const UUID: &str = "6b0e2a54-3f4c-4cde-9a57-0d6e1f3ad3a1";
const UUID_BYTES: Uuid = Uuid::from_bytes([
    0x6b, 0x0e, 0x2a, 0x54, 0x3f, 0x4c, 0x4c, 0xde, 0x9a, 0x57, 0x0d, 0x6e, 0x1f, 0x3a, 0xd3, 0xa1,
])
.unwrap();

/// Runs `vtmemctl` against `d`; returns (exit status, stdout, stderr).
fn ctl_raw(d: &Vtmemd, args: &[&str]) -> (i32, String, String) {
    let out = ctl(d, args);
    (out.code, out.stdout, out.stderr)
}

/// Runs `vtmemctl` and asserts success; returns stdout.
fn ctl_ok(d: &Vtmemd, args: &[&str]) -> String {
    let (code, out, err) = ctl_raw(d, args);
    assert_eq!(code, 0, "vtmemctl {args:?}: {err}");
    out
}

fn ctl_json(d: &Vtmemd, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&ctl_ok(d, &all)).expect("JSON")
}

/// `show --json VM` → `stats`.
fn stats(d: &Vtmemd, vm: &str) -> Value {
    ctl_json(d, &["show", vm])["stats"].clone()
}

fn host_used(d: &Vtmemd) -> u64 {
    ctl_json(d, &["status"])["host_used"].as_u64().unwrap()
}

#[test]
fn lowered_quota_refuses_the_next_put() {
    let d = daemon(&["vm1"], &[]);
    let vm = connect(&d, "vm1");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let data = pages(1, 9);
    let st = vm.put_batch(&items(pool, 1, &data[..8])).unwrap();
    assert!(st.iter().all(|s| *s == Status::Ok), "{st:?}");
    let held = stats(&d, "vm1")["persistent_bytes"].as_u64().unwrap();
    assert!(held >= 8 * 4096, "{held}");

    // Below what the VM holds: nothing is dropped, the next put is refused.
    ctl_ok(&d, &["set-quota", "vm1", "--persistent", "16K"]);
    let st = vm.put_batch(&[(handle(pool, 2, 0), &*data[8])]).unwrap();
    assert_eq!(st, vec![Status::OverQuota]);
    let s = stats(&d, "vm1");
    assert_eq!(s["persistent_pages"], 8);
    assert_eq!(s["counters"]["puts_refused_quota"], 1);
    let list = ctl_ok(&d, &["list"]);
    let row = list.lines().find(|l| l.starts_with("vm1 ")).unwrap();
    assert!(row.starts_with("vm1   yes   active"), "{list}");
    assert!(row.ends_with("0/1/0/0"), "{list}");

    // Raised again: the same put is accepted.
    ctl_ok(&d, &["set-quota", "vm1", "--persistent", "unlimited"]);
    let st = vm.put_batch(&[(handle(pool, 2, 0), &*data[8])]).unwrap();
    assert_eq!(st, vec![Status::Ok]);
    assert_eq!(stats(&d, "vm1")["persistent_pages"], 9);
}

#[test]
fn lowered_ephemeral_quota_evicts_at_once() {
    let d = daemon(&["vm1"], &[]);
    let vm = connect(&d, "vm1");
    let pool = vm.new_pool(PoolSpec::ephemeral()).unwrap();
    let data = pages(2, 64);
    let st = vm.put_batch(&items(pool, 1, &data)).unwrap();
    assert!(st.iter().all(|s| *s == Status::Ok), "{st:?}");
    assert_eq!(stats(&d, "vm1")["ephemeral_pages"], 64);
    ctl_ok(&d, &["set-quota", "vm1", "--ephemeral", "64K"]);
    let s = stats(&d, "vm1");
    assert!(s["ephemeral_bytes"].as_u64().unwrap() <= 64 << 10, "{s}");
    assert!(s["ephemeral_pages"].as_u64().unwrap() < 64, "{s}");
    assert!(s["counters"]["evictions"].as_u64().unwrap() > 0, "{s}");
}

#[test]
fn freeze_refuses_puts_but_not_gets() {
    let d = daemon(&["vm1", "vm2"], &[]);
    let vm1 = connect(&d, "vm1");
    let vm2 = connect(&d, "vm2");
    let p1 = vm1.new_pool(PoolSpec::persistent()).unwrap();
    let p2 = vm2.new_pool(PoolSpec::persistent()).unwrap();
    let data = pages(3, 2);
    assert_eq!(
        vm1.put_batch(&[(handle(p1, 1, 0), &*data[0])]).unwrap(),
        vec![Status::Ok]
    );

    ctl_ok(&d, &["freeze", "vm1"]);
    assert_eq!(
        vm1.put_batch(&[(handle(p1, 1, 1), &*data[1])]).unwrap(),
        vec![Status::Frozen]
    );
    // Gets keep working; the other VM is not affected.
    let got = vm1.get_batch(&[handle(p1, 1, 0)]).unwrap();
    assert_eq!(got[0].0, Status::Ok);
    assert_eq!(checksum(&got[0].1), checksum(&data[0]));
    assert_eq!(
        vm2.put_batch(&[(handle(p2, 1, 0), &*data[1])]).unwrap(),
        vec![Status::Ok]
    );
    let s = stats(&d, "vm1");
    assert_eq!(s["frozen"], true);
    assert_eq!(s["counters"]["puts_refused_frozen"], 1);
    assert!(ctl_ok(&d, &["show", "vm1"]).contains("frozen (puts refused)"));

    ctl_ok(&d, &["thaw", "vm1"]);
    assert_eq!(
        vm1.put_batch(&[(handle(p1, 1, 1), &*data[1])]).unwrap(),
        vec![Status::Ok]
    );
}

#[test]
fn auth_admits_a_shared_pool() {
    let d = daemon(&["vm1", "vm2"], &[]);
    let vm1 = connect(&d, "vm1");
    let vm2 = connect(&d, "vm2");
    let spec = PoolSpec::shared(UUID_BYTES);
    match vm1.new_pool(spec) {
        Err(Error::Status(Status::NotAuthorized)) => {}
        other => panic!("unauthorised NEW_POOL: {other:?}"),
    }

    ctl_ok(&d, &["auth", "vm1", UUID]);
    ctl_ok(&d, &["auth", "vm2", UUID]);
    let p1 = vm1.new_pool(spec).unwrap();
    let p2 = vm2.new_pool(spec).unwrap();
    let data = pages(4, 1);
    assert_eq!(
        vm1.put_batch(&[(handle(p1, 1, 0), &*data[0])]).unwrap(),
        vec![Status::Ok]
    );
    // vm2 joined the same pool: it reads vm1's page.
    let got = vm2.get_batch(&[handle(p2, 1, 0)]).unwrap();
    assert_eq!(got[0].0, Status::Ok);
    assert_eq!(checksum(&got[0].1), checksum(&data[0]));
    let show = ctl_ok(&d, &["show", "vm1"]);
    assert!(show.contains(UUID), "{show}");

    // Withdrawn: vm2 is taken out of the pool at once (its id is unknown
    // now) and cannot join it again.
    ctl_ok(&d, &["deauth", "vm2", UUID]);
    assert_eq!(
        vm2.get_batch(&[handle(p2, 1, 0)]).unwrap()[0].0,
        Status::NoPool
    );
    match vm2.new_pool(spec) {
        Err(Error::Status(Status::NotAuthorized)) => {}
        other => panic!("NEW_POOL after deauth: {other:?}"),
    }
    // vm1, still authorised, still reaches the page.
    assert_eq!(vm1.get_batch(&[handle(p1, 1, 0)]).unwrap()[0].0, Status::Ok);
}

#[test]
fn flush_drops_pages() {
    let d = daemon(&["vm1"], &[]);
    let vm = connect(&d, "vm1");
    let pp = vm.new_pool(PoolSpec::persistent()).unwrap();
    let ep = vm.new_pool(PoolSpec::ephemeral()).unwrap();
    let data = pages(5, 16);
    vm.put_batch(&items(pp, 1, &data)).unwrap();
    vm.put_batch(&items(ep, 1, &data)).unwrap();
    let s = stats(&d, "vm1");
    assert_eq!(
        (s["persistent_pages"].clone(), s["ephemeral_pages"].clone()),
        (16.into(), 16.into())
    );

    ctl_ok(&d, &["flush", "vm1", "--ephemeral"]);
    let s = stats(&d, "vm1");
    assert_eq!(s["persistent_pages"], 16);
    assert_eq!(s["ephemeral_pages"], 0);
    assert_eq!(
        vm.get_batch(&[handle(ep, 1, 0)]).unwrap()[0].0,
        Status::Miss
    );

    ctl_ok(&d, &["flush", "vm1"]);
    let s = stats(&d, "vm1");
    assert_eq!(s["persistent_pages"], 0);
    assert_eq!(
        vm.get_batch(&[handle(pp, 1, 0)]).unwrap()[0].0,
        Status::Miss
    );
    // The pools stay.
    assert_eq!(s["pools"].as_array().unwrap().len(), 2);
    assert_eq!(
        vm.put_batch(&[(handle(pp, 1, 0), &*data[0])]).unwrap(),
        vec![Status::Ok]
    );
}

#[test]
fn remove_vm_frees_its_memory() {
    let d = daemon(&["vm1", "vm2"], &[]);
    let base = host_used(&d);
    // A short timeout: its requests go unanswered once it is removed.
    let opts = VmOptions {
        timeout: Duration::from_secs(2),
        ..VmOptions::default()
    };
    let vm2 = connect_with(&d, "vm2", opts);
    let pool = vm2.new_pool(PoolSpec::persistent()).unwrap();
    let data = pages(6, 256);
    let st = vm2.put_batch(&items(pool, 1, &data)).unwrap();
    assert!(st.iter().all(|s| *s == Status::Ok));
    let full = host_used(&d);
    assert!(full >= base + 256 * 4096, "{base} -> {full}");

    assert_eq!(ctl_ok(&d, &["remove-vm", "vm2"]), "removed vm2\n");
    let after = host_used(&d);
    assert!(after <= base + 64 * 1024, "{base} -> {full} -> {after}");
    assert!(!d.socket("vm2").exists());
    let (code, _, err) = ctl_raw(&d, &["show", "vm2"]);
    assert_eq!((code, err.as_str()), (1, "vtmemctl: no VM named 'vm2'\n"));
    // Its connection was dropped.
    assert!(vm2.put_batch(&[(handle(pool, 2, 0), &*data[0])]).is_err());
    drop(vm2);
    // The other VM is untouched.
    let vm1 = connect(&d, "vm1");
    let p = vm1.new_pool(PoolSpec::persistent()).unwrap();
    assert_eq!(
        vm1.put_batch(&[(handle(p, 1, 0), &*data[0])]).unwrap(),
        vec![Status::Ok]
    );
}

#[test]
fn statistics_show_activity() {
    let d = daemon(&["vm1", "idle"], &[]);
    let busy = Neighbour::start(&d, "vm1");
    busy.wait_rounds(2);

    let frames = ctl_ok(
        &d,
        &["top", "--iterations", "2", "--interval", "0.3", "--json"],
    );
    let frames: Vec<Value> = frames
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(frames.len(), 2);
    for f in &frames {
        let vms = f["vms"].as_array().unwrap();
        let vm1 = vms.iter().find(|v| v["name"] == "vm1").unwrap();
        let idle = vms.iter().find(|v| v["name"] == "idle").unwrap();
        assert_eq!(vm1["connected"], true, "{f}");
        assert!(vm1["puts_per_sec"].as_f64().unwrap() > 0.0, "{f}");
        assert!(vm1["gets_per_sec"].as_f64().unwrap() > 0.0, "{f}");
        assert_eq!(vm1["hit_rate"], 1.0, "{f}");
        assert_eq!(idle["connected"], false, "{f}");
        assert_eq!(idle["puts_per_sec"], 0.0, "{f}");
    }
    // A frame's rates cover 0.3 s, which on a loaded machine may hold the
    // neighbour's puts only: frames are taken until one shows its gets.
    let mut top = String::new();
    wait_until("a top frame with the neighbour's gets", DEADLINE, || {
        top = ctl_ok(&d, &["top", "-n", "1", "-i", "0.3", "--batch"]);
        let row = top.lines().find(|l| l.starts_with("vm1 ")).unwrap();
        !row.contains(" - ")
    });
    let row = top.lines().find(|l| l.starts_with("vm1 ")).unwrap();
    assert!(row.contains("100.00%"), "{top}");
    let list = ctl_ok(&d, &["list"]);
    let row = list.lines().find(|l| l.starts_with("vm1 ")).unwrap();
    assert!(row.starts_with("vm1   yes   active"), "{list}");
    assert!(list.contains("\nVM   POOL  KIND"), "{list}");
    assert!(list.contains("persistent"), "{list}");
    let show = ctl_ok(&d, &["show", "vm1"]);
    assert!(
        show.contains("  connected:         yes (1 connection since added)"),
        "{show}"
    );
    assert!(show.contains("hit rate 100.00%"), "{show}");
    assert!(show.contains("\nPOOL  KIND"), "{show}");
    busy.finish();
    let status = ctl_ok(&d, &["status", "--interval", "0"]);
    assert!(status.contains("compression ratio:  "), "{status}");
}

#[test]
fn status_measures_the_eviction_rate() {
    let d = daemon(&["vm1"], &["--host-limit", "64M"]);
    let vm = connect(&d, "vm1");
    let pool = vm.new_pool(PoolSpec::ephemeral()).unwrap();
    let data = pages(7, 512);
    let st = vm.put_batch(&items(pool, 1, &data)).unwrap();
    assert!(st.iter().all(|s| *s == Status::Ok));

    // Lower the limit between the two samples of `status`: its requests go
    // through a tap that says when each was answered and holds the next
    // until the test lets it through.
    let tapped = temp_dir();
    let tap = Tap::start(&d, &tapped.path().join("tap.ctl"));
    let sampler = Command::new(VTMEMCTL)
        .arg("--socket")
        .arg(&tap.path)
        .args(["status", "--interval", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tap.pass_one(); // the first sample
    let before = d.status().store.counters.evictions;
    ctl_ok(&d, &["set-limit", "1M"]);
    wait_until("evictions after the lower limit", DEADLINE, || {
        d.status().store.counters.evictions > before
    });
    tap.pass_one(); // the second sample
    let out = sampler.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().find(|l| l.starts_with("evictions:")).unwrap();
    let rate: f64 = line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches("/s")
        .parse()
        .unwrap();
    assert!(rate > 0.0, "{text}");
    assert!(stats(&d, "vm1")["ephemeral_pages"].as_u64().unwrap() < 512);
}

/// A control socket in front of a daemon's, for one client: each request
/// line waits for [`Tap::pass_one`], then goes to the daemon, and its
/// answer comes back.
struct Tap {
    path: std::path::PathBuf,
    go: mpsc::Sender<()>,
    answered: mpsc::Receiver<()>,
}

impl Tap {
    fn start(d: &Vtmemd, path: &std::path::Path) -> Tap {
        let listener = UnixListener::bind(path).unwrap();
        let daemon = UnixStream::connect(d.control_path()).unwrap();
        let (go, go_rx) = mpsc::channel::<()>();
        let (answered_tx, answered) = mpsc::channel();
        std::thread::spawn(move || {
            let (client, _) = listener.accept().unwrap();
            let mut from_client = BufReader::new(client.try_clone().unwrap());
            let mut to_client = client;
            let mut from_daemon = BufReader::new(daemon.try_clone().unwrap());
            let mut to_daemon = daemon;
            let mut line = String::new();
            while from_client.read_line(&mut line).unwrap_or(0) > 0 {
                if go_rx.recv().is_err() {
                    return;
                }
                to_daemon.write_all(line.as_bytes()).unwrap();
                line.clear();
                from_daemon.read_line(&mut line).unwrap();
                to_client.write_all(line.as_bytes()).unwrap();
                line.clear();
                let _ = answered_tx.send(());
            }
        });
        Tap {
            path: path.to_path_buf(),
            go,
            answered,
        }
    }

    /// Lets the next request through and waits until it is answered.
    fn pass_one(&self) {
        self.go.send(()).unwrap();
        self.answered
            .recv_timeout(DEADLINE)
            .expect("a request answered through the tap");
    }
}
