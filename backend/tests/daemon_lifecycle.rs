// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! VMs added and removed at run time, connections, reconnects, signals.

mod common;

use std::os::unix::net::{UnixListener, UnixStream};

use common::*;
use serde_json::{json, Value};

fn connected(d: &Vtmemd, vm: &str) -> (bool, u64) {
    let list = d.raw().ok("list", Value::Null);
    let v = find_vm(&list, vm).unwrap();
    (
        v["connected"].as_bool().unwrap(),
        v["connections"].as_u64().unwrap(),
    )
}

#[test]
fn add_and_remove_vms_at_run_time() {
    let d = vtmemd(&["--vm", "vm1"]);
    let mut c = d.raw();
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
    wait_until("vm2 connected", DEADLINE, || connected(&d, "vm2").0);
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
    let d = vtmemd(&["--vm", "a", "--vm", "b"]);
    let s1 = UnixStream::connect(d.socket("a")).unwrap();
    wait_until("a connected", DEADLINE, || connected(&d, "a") == (true, 1));
    assert_eq!(connected(&d, "b"), (false, 0));
    drop(s1);
    wait_until("a disconnected", DEADLINE, || {
        connected(&d, "a") == (false, 1)
    });
    // The same socket accepts the next connection.
    let _s2 = UnixStream::connect(d.socket("a")).unwrap();
    wait_until("a reconnected", DEADLINE, || {
        connected(&d, "a") == (true, 2)
    });
    // Garbage from one VMM ends its connection only.
    let mut s3 = UnixStream::connect(d.socket("b")).unwrap();
    use std::io::Write;
    let _ = s3.write_all(&[0xff; 64]);
    wait_until("b served and dropped", DEADLINE, || {
        connected(&d, "b").1 == 1
    });
    wait_until("b disconnected", DEADLINE, || !connected(&d, "b").0);
    assert_eq!(connected(&d, "a"), (true, 2));
    let _s4 = UnixStream::connect(d.socket("b")).unwrap();
    wait_until("b reconnected", DEADLINE, || {
        connected(&d, "b") == (true, 2)
    });
}

#[test]
fn sigterm_removes_every_socket() {
    let d = vtmemd(&["--vm", "vm1", "--vm", "vm2"]);
    d.raw().ok("add-vm", json!({"name": "vm3"}));
    let _conn = UnixStream::connect(d.socket("vm1")).unwrap();
    wait_until("vm1 connected", DEADLINE, || connected(&d, "vm1").0);
    let st = d.stop();
    assert_eq!(st.code(), Some(0), "stderr:\n{}", d.log());
    for f in ["vm1.sock", "vm2.sock", "vm3.sock", "vtmemd.ctl"] {
        assert!(!d.dir().join(f).exists(), "{f} left behind");
    }
}

#[test]
fn sigint_also_shuts_down_cleanly() {
    let d = vtmemd(&["--vm", "vm1"]);
    let st = d.stop_by(Signal::INT);
    assert_eq!(st.code(), Some(0), "stderr:\n{}", d.log());
    assert!(!d.socket("vm1").exists());
    assert!(!d.control_path().exists());
}

#[test]
fn stale_sockets_are_replaced_live_ones_refused() {
    let dir = temp_dir();
    // A socket file nobody listens on (left by a killed daemon).
    drop(UnixListener::bind(dir.path().join("vm1.sock")).unwrap());
    assert!(dir.path().join("vm1.sock").exists());
    let d = Vtmemd::start_in(VTMEMD, dir, &["--vm", "vm1"]);
    let _s = UnixStream::connect(d.socket("vm1")).unwrap();
    wait_until("vm1 connected", DEADLINE, || connected(&d, "vm1").0);

    // A second daemon on the same directory must not steal the sockets.
    let out = run_vtmemd(&["--socket-dir", d.dir().to_str().unwrap(), "--vm", "vm1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    assert!(d.is_alive());
    assert!(d.socket("vm1").exists());
    assert!(d.control_path().exists());
    d.raw().ok("status", Value::Null);

    // Adding a VM whose socket path is held by a live listener fails too.
    let _other = UnixListener::bind(d.dir().join("vm9.sock")).unwrap();
    let e = d.raw().err("add-vm", json!({"name": "vm9"}));
    assert!(e.contains("in use"), "{e}");
    assert!(find_vm(&d.raw().ok("list", Value::Null), "vm9").is_none());
}
