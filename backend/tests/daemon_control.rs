// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket of a running `vtmemd`.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use serde_json::{json, Value};

const UUID: &str = "00112233-4455-6677-8899-aabbccddeeff";

fn daemon() -> Vtmemd {
    vtmemd(&[
        "--host-limit",
        "64M",
        "--vm",
        "name=vm1,persistent-quota=16M,ephemeral-quota=32M,weight=100,dedup-group=web",
        "--vm",
        "vm2",
    ])
}

#[test]
fn control_socket_is_private() {
    let d = daemon();
    let mode = std::fs::metadata(d.control_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn status_list_show() {
    let d = daemon();
    let mut c = d.raw();
    let st = c.ok("status", Value::Null);
    assert_eq!(st["host_limit"], 64 << 20);
    let clients = st["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 2);

    let list = c.ok("list", json!({}));
    assert_eq!(list.as_array().unwrap().len(), 2);
    let vm1 = find_vm(&list, "vm1").unwrap();
    assert_eq!(vm1["connected"], false);
    assert_eq!(vm1["connections"], 0);
    assert_eq!(vm1["socket"], d.socket("vm1").to_str().unwrap());
    assert_eq!(vm1["config"]["persistent_quota"], 16 << 20);
    assert_eq!(vm1["config"]["ephemeral_quota"], 32 << 20);
    assert_eq!(vm1["config"]["dedup_group"], "web");
    let vm2 = find_vm(&list, "vm2").unwrap();
    assert_eq!(vm2["config"]["persistent_quota"], json!(u64::MAX));

    let show = c.ok("show", json!({"vm": "vm1"}));
    assert_eq!(show["name"], "vm1");
    assert_eq!(show["connected"], false);
    assert_eq!(show["device"]["chains"], 0);
    assert_eq!(show["stats"]["name"], "vm1");
}

#[test]
fn admin_commands_change_the_client() {
    let d = daemon();
    let mut c = d.raw();
    c.ok(
        "set-quota",
        json!({"vm": "vm1", "persistent": "8M", "ephemeral": 4096}),
    );
    let cfg = &c.ok("show", json!({"vm": "vm1"}))["config"];
    assert_eq!(cfg["persistent_quota"], 8 << 20);
    assert_eq!(cfg["ephemeral_quota"], 4096);
    // One of the two alone keeps the other.
    c.ok("set-quota", json!({"vm": "vm1", "ephemeral": "unlimited"}));
    let cfg = &c.ok("show", json!({"vm": "vm1"}))["config"];
    assert_eq!(cfg["persistent_quota"], 8 << 20);
    assert_eq!(cfg["ephemeral_quota"], json!(u64::MAX));

    c.ok("set-weight", json!({"vm": "vm2", "weight": 300}));
    assert_eq!(c.ok("show", json!({"vm": "vm2"}))["config"]["weight"], 300);

    c.ok("set-limit", json!({"bytes": "128M"}));
    assert_eq!(c.ok("status", Value::Null)["host_limit"], 128 << 20);

    c.ok("auth", json!({"vm": "vm2", "uuid": UUID}));
    assert_eq!(
        c.ok("show", json!({"vm": "vm2"}))["config"]["authorized_uuids"],
        json!([UUID])
    );
    c.ok("deauth", json!({"vm": "vm2", "uuid": UUID}));
    assert_eq!(
        c.ok("show", json!({"vm": "vm2"}))["config"]["authorized_uuids"],
        json!([])
    );

    c.ok("set-dedup-group", json!({"vm": "vm2", "group": "db"}));
    assert_eq!(
        c.ok("show", json!({"vm": "vm2"}))["config"]["dedup_group"],
        "db"
    );
    c.ok("set-dedup-group", json!({"vm": "vm2", "group": null}));
    assert_eq!(
        c.ok("show", json!({"vm": "vm2"}))["config"]["dedup_group"],
        Value::Null
    );

    c.ok("freeze", json!({"vm": "vm1"}));
    assert_eq!(c.ok("show", json!({"vm": "vm1"}))["stats"]["frozen"], true);
    c.ok("thaw", json!({"vm": "vm1"}));
    assert_eq!(c.ok("show", json!({"vm": "vm1"}))["stats"]["frozen"], false);

    c.ok("flush", json!({"vm": "vm1"}));
    c.ok("flush", json!({"vm": "vm1", "ephemeral_only": true}));
}

#[test]
fn errors_are_one_line_and_harmless() {
    let d = daemon();
    let mut c = d.raw();
    assert!(c.err("show", json!({"vm": "nope"})).contains("nope"));
    assert!(c.err("frobnicate", json!({})).contains("unknown command"));
    assert!(c.err("show", json!({})).contains("vm"));
    assert!(c
        .err("show", json!({"vm": "vm1", "colour": "red"}))
        .contains("colour"));
    assert!(c
        .err("set-weight", json!({"vm": "vm1", "weight": 0}))
        .contains("weight"));
    assert!(c
        .err("set-weight", json!({"vm": "vm1", "weight": "heavy"}))
        .contains("weight"));
    assert!(c
        .err("set-quota", json!({"vm": "vm1", "persistent": "lots"}))
        .contains("lots"));
    assert!(c
        .err("set-quota", json!({"vm": "vm1"}))
        .contains("persistent"));
    assert!(c.err("set-limit", json!({"bytes": 0})).contains("limit"));
    assert!(c
        .err("auth", json!({"vm": "vm1", "uuid": "not-a-uuid"}))
        .contains("UUID"));
    assert!(c
        .err("add-vm", json!({"name": "../escape"}))
        .contains("invalid VM name"));
    assert!(c.err("add-vm", json!({"name": "vm1"})).contains("exists"));
    assert!(c.err("remove-vm", json!({"vm": "nope"})).contains("nope"));

    // Malformed lines.
    for line in [
        "not json",
        "[1,2]",
        r#"{"command":"status"}"#,
        r#"{"version":1}"#,
        r#"{"version":"1","command":"status"}"#,
        r#"{"version":1,"command":"show","args":{"vm":"vm1"},"vm":"vm1"}"#,
        r#"{"version":1,"command":"show","args":[1]}"#,
    ] {
        let r: Value = serde_json::from_str(&c.line(line)).unwrap();
        assert_eq!(r["ok"], false, "{line}: {r}");
    }
    let r: Value = serde_json::from_str(&c.line(r#"{"version":2,"command":"status"}"#)).unwrap();
    assert!(r["error"].as_str().unwrap().contains("version 2"));

    // Arguments are only ever in "args" (one request shape).
    let r: Value =
        serde_json::from_str(&c.line(r#"{"version":1,"command":"show","vm":"vm2"}"#)).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    // The same connection still works, and so does the daemon.
    c.ok("status", Value::Null);
}

#[test]
fn many_clients_at_once() {
    let d = daemon();
    let path = d.control_path();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut c = RawControl::connect(&path);
                for _ in 0..20 {
                    c.ok("list", Value::Null);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn oversize_request_line_is_refused() {
    let d = daemon();
    let mut c = d.raw();
    let big = format!(
        r#"{{"version":1,"command":"status","pad":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let r: Value = serde_json::from_str(&c.line(&big)).unwrap();
    assert_eq!(r["ok"], false);
    // A new connection is served normally.
    d.raw().ok("status", Value::Null);
}

/// The control socket used to start a thread per connection without
/// bound (2000 idle connections, 2006 threads). Connections are bounded
/// now, and idle ones make room, so an administrator who talks is served.
#[test]
fn idle_connections_do_not_keep_clients_out() {
    let d = daemon();
    let idle: Vec<std::os::unix::net::UnixStream> = (0..200)
        .map(|_| std::os::unix::net::UnixStream::connect(d.control_path()).unwrap())
        .collect();
    for _ in 0..3 {
        let mut c = d.raw();
        assert_eq!(c.ok("show", json!({"vm": "vm1"}))["name"], "vm1");
    }
    let threads = std::fs::read_dir(format!("/proc/{}/task", d.pid().unwrap()))
        .unwrap()
        .count();
    assert!(threads < 64, "{threads} threads for 200 idle connections");
    drop(idle);
}
