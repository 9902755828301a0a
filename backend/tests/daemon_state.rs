// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmemd --state-file`: run-time changes survive a restart.

mod common;

use common::*;
use serde_json::{json, Value};

const UUID: &str = "00112233-4455-6677-8899-aabbccddeeff";

fn flags(state: &str) -> Vec<String> {
    [
        "--host-limit",
        "64M",
        "--state-file",
        state,
        "--vm",
        "name=vm1,persistent-quota=16M,weight=100",
        "--vm",
        "vm2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Stops `d` with SIGTERM and starts it again with `flags` in the same
/// socket directory.
fn restart(d: &mut Vtmemd, flags: &[String]) {
    assert!(d.stop().success());
    d.restart(flags).unwrap();
}

#[test]
fn changes_survive_a_restart() {
    let state_dir = temp_dir();
    let state = state_dir.path().join("state.json");
    let state_s = state.to_str().unwrap().to_string();
    let f = flags(&state_s);

    let mut d = vtmemd(&f);
    assert!(state.exists(), "written at start");
    let mut c = d.raw();
    c.ok(
        "set-quota",
        json!({"vm": "vm1", "persistent": "8M", "ephemeral": "4M"}),
    );
    c.ok("set-weight", json!({"vm": "vm1", "weight": 321}));
    c.ok("set-limit", json!({"bytes": "32M"}));
    c.ok("freeze", json!({"vm": "vm1"}));
    c.ok("auth", json!({"vm": "vm1", "uuid": UUID}));
    c.ok("set-dedup-group", json!({"vm": "vm1", "group": "web"}));
    c.ok("remove-vm", json!({"vm": "vm2"}));
    c.ok(
        "add-vm",
        json!({"name": "vm3", "ephemeral_quota": "1M", "weight": 7}),
    );
    let before = c.ok("list", json!({}));
    drop(c);
    restart(&mut d, &f);

    // Same flags: the state file wins.
    assert!(d.ready_line().contains("2 VM(s)"), "{}", d.ready_line());
    assert!(
        d.ready_line().contains("host limit 32M"),
        "{}",
        d.ready_line()
    );
    let mut c = d.raw();
    let after = c.ok("list", json!({}));
    let names = |l: &Value| -> Vec<String> {
        l.as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&after), ["vm1", "vm3"]);
    for vm in ["vm1", "vm3"] {
        let (b, a) = (find_vm(&before, vm).unwrap(), find_vm(&after, vm).unwrap());
        assert_eq!(a["config"], b["config"], "{vm}");
        assert_eq!(a["frozen"], b["frozen"], "{vm}");
    }
    let vm1 = find_vm(&after, "vm1").unwrap();
    assert_eq!(vm1["frozen"], json!(true));
    assert_eq!(vm1["config"]["weight"], json!(321));
    assert_eq!(vm1["config"]["persistent_quota"], json!(8 << 20));
    assert_eq!(vm1["config"]["dedup_group"], json!("web"));
    assert_eq!(vm1["config"]["authorized_uuids"], json!([UUID]));
    assert_eq!(c.ok("status", json!({}))["host_limit"], json!(32 << 20));

    // Thaw and deauth are recorded too.
    c.ok("thaw", json!({"vm": "vm1"}));
    c.ok("deauth", json!({"vm": "vm1", "uuid": UUID}));
    drop(c);
    restart(&mut d, &f);
    let mut c = d.raw();
    let l = c.ok("list", json!({}));
    let vm1 = find_vm(&l, "vm1").unwrap();
    assert_eq!(vm1["frozen"], json!(false));
    assert_eq!(vm1["config"]["authorized_uuids"], json!([]));
    drop(c);
    assert!(d.stop().success());

    // Without the state file, the configuration alone.
    std::fs::remove_file(&state).unwrap();
    d.restart(&f).unwrap();
    let l = d.raw().ok("list", json!({}));
    assert_eq!(names(&l), ["vm1", "vm2"]);
    assert_eq!(find_vm(&l, "vm1").unwrap()["config"]["weight"], json!(100));
}

#[test]
fn a_corrupt_state_file_is_a_one_line_error() {
    let state_dir = temp_dir();
    let state = state_dir.path().join("state.json");
    std::fs::write(&state, "{\"version\":1,\"host_limit\":").unwrap();
    let sock = temp_dir();
    let out = run_vtmemd(&[
        "--socket-dir",
        sock.path().to_str().unwrap(),
        "--state-file",
        state.to_str().unwrap(),
        "--vm",
        "vm1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("state file") && lines[0].contains("fix or remove"),
        "{err}"
    );
    // Nothing was left listening.
    assert!(!sock.path().join("vm1.sock").exists());
    // The file was not overwritten.
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        "{\"version\":1,\"host_limit\":"
    );
}
