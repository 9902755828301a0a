// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! VMs added and removed at run time, connections, reconnects, signals.

mod daemon_util;

use std::os::unix::net::{UnixListener, UnixStream};

use daemon_util::{find_vm, wait_until, TempDir, Vtmemd};
use serde_json::{json, Value};

fn connected(d: &Vtmemd, vm: &str) -> (bool, u64) {
    let list = d.control().ok("list", Value::Null);
    let v = find_vm(&list, vm).unwrap();
    (
        v["connected"].as_bool().unwrap(),
        v["connections"].as_u64().unwrap(),
    )
}

#[test]
fn add_and_remove_vms_at_run_time() {
    let d = Vtmemd::start(&["--vm", "vm1"]);
    let mut c = d.control();
    let info = c.ok(
        "add-vm",
        json!({"name": "vm2", "persistent_quota": "4M", "ephemeral_quota": 8192,
               "weight": 20, "dedup_group": "g", "authorized_uuids": ["00112233445566778899aabbccddeeff"]}),
    );
    assert_eq!(info["name"], "vm2");
    assert_eq!(info["connected"], false);
    assert_eq!(info["config"]["weight"], 20);
    assert!(d.socket("vm2").exists());
    assert_eq!(c.ok("list", Value::Null).as_array().unwrap().len(), 2);
    assert_eq!(
        c.ok("status", Value::Null)["clients"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A frontend attached to vm2 is dropped by remove-vm.
    let s = UnixStream::connect(d.socket("vm2")).unwrap();
    wait_until("vm2 connected", || connected(&d, "vm2").0);
    c.ok("remove-vm", json!({"vm": "vm2"}));
    assert!(!d.socket("vm2").exists());
    assert!(find_vm(&c.ok("list", Value::Null), "vm2").is_none());
    assert_eq!(
        c.ok("status", Value::Null)["clients"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let mut buf = [0u8; 1];
    use std::io::Read;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    assert_eq!((&s).read(&mut buf).unwrap_or(0), 0, "connection not closed");

    // The name can be used again; it starts afresh.
    let info = c.ok("add-vm", json!({"name": "vm2"}));
    assert_eq!(info["connections"], 0);
    assert_eq!(info["config"]["weight"], 100);
    assert!(d.socket("vm2").exists());

    // vm1 was never disturbed.
    assert!(d.socket("vm1").exists());
    assert_eq!(connected(&d, "vm1"), (false, 0));
}

#[test]
fn connections_and_reconnects_are_tracked() {
    let d = Vtmemd::start(&["--vm", "a", "--vm", "b"]);
    let s1 = UnixStream::connect(d.socket("a")).unwrap();
    wait_until("a connected", || connected(&d, "a") == (true, 1));
    assert_eq!(connected(&d, "b"), (false, 0));
    drop(s1);
    wait_until("a disconnected", || connected(&d, "a") == (false, 1));
    // The same socket accepts the next connection.
    let _s2 = UnixStream::connect(d.socket("a")).unwrap();
    wait_until("a reconnected", || connected(&d, "a") == (true, 2));
    // Garbage from one VMM ends its connection only.
    let mut s3 = UnixStream::connect(d.socket("b")).unwrap();
    use std::io::Write;
    let _ = s3.write_all(&[0xff; 64]);
    wait_until("b served and dropped", || connected(&d, "b").1 == 1);
    wait_until("b disconnected", || !connected(&d, "b").0);
    assert_eq!(connected(&d, "a"), (true, 2));
    let _s4 = UnixStream::connect(d.socket("b")).unwrap();
    wait_until("b reconnected", || connected(&d, "b") == (true, 2));
}

#[test]
fn sigterm_removes_every_socket() {
    let mut d = Vtmemd::start(&["--vm", "vm1", "--vm", "vm2"]);
    d.control().ok("add-vm", json!({"name": "vm3"}));
    let _conn = UnixStream::connect(d.socket("vm1")).unwrap();
    wait_until("vm1 connected", || connected(&d, "vm1").0);
    let st = d.signal_and_wait("TERM");
    assert_eq!(st.code(), Some(0), "stderr:\n{}", d.stderr());
    for f in ["vm1.sock", "vm2.sock", "vm3.sock", "vtmemd.ctl"] {
        assert!(!d.dir.path().join(f).exists(), "{f} left behind");
    }
}

#[test]
fn sigint_also_shuts_down_cleanly() {
    let mut d = Vtmemd::start(&["--vm", "vm1"]);
    let st = d.signal_and_wait("INT");
    assert_eq!(st.code(), Some(0), "stderr:\n{}", d.stderr());
    assert!(!d.socket("vm1").exists());
    assert!(!d.control_path().exists());
}

#[test]
fn stale_sockets_are_replaced_live_ones_refused() {
    let dir = TempDir::new();
    // A socket file nobody listens on (left by a killed daemon).
    drop(UnixListener::bind(dir.path().join("vm1.sock")).unwrap());
    assert!(dir.path().join("vm1.sock").exists());
    let mut d = Vtmemd::start_in(dir, &["--vm", "vm1"]);
    let _s = UnixStream::connect(d.socket("vm1")).unwrap();
    wait_until("vm1 connected", || connected(&d, "vm1").0);

    // A second daemon on the same directory must not steal the sockets.
    let out = daemon_util::run(&[
        "--socket-dir",
        d.dir.path().to_str().unwrap(),
        "--vm",
        "vm1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    assert!(d.is_running());
    assert!(d.socket("vm1").exists());
    assert!(d.control_path().exists());
    d.control().ok("status", Value::Null);

    // Adding a VM whose socket path is held by a live listener fails too.
    let _other = UnixListener::bind(d.dir.path().join("vm9.sock")).unwrap();
    let e = d.control().err("add-vm", json!({"name": "vm9"}));
    assert!(e.contains("in use"), "{e}");
    assert!(find_vm(&d.control().ok("list", Value::Null), "vm9").is_none());
}
