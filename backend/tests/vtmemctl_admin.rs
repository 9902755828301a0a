// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Every `vtmemctl` command against a real `vtmemd`: its effect is visible
//! in `list --json`, `show --json` or `status --json`.

mod common;

use common::*;
use serde_json::json;

const UUID_A: &str = "6b0e2a54-3f4c-4cde-9a57-0d6e1f3ad3a1";
const UUID_B: &str = "00112233-4455-6677-8899-aabbccddeeff";

/// The authorised UUIDs of a configuration, sorted (the daemon keeps no
/// particular order).
fn uuids(config: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = config["authorized_uuids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn daemon() -> Vtmemd {
    vtmemd_with_vms(
        &["name=vm1,persistent-quota=512M", "name=vm2,weight=50"],
        &["--host-limit", "1G"],
    )
}

#[test]
fn set_quota() {
    let d = daemon();
    assert_eq!(ctl_config(&d, "vm1")["persistent_quota"], 512u64 << 20);
    assert_eq!(ctl_config(&d, "vm1")["ephemeral_quota"], UNLIMITED);

    let out = ctl(
        &d,
        &[
            "set-quota",
            "vm1",
            "--persistent",
            "256M",
            "--ephemeral",
            "2G",
        ],
    );
    assert_eq!(
        out.ok(),
        "vm1: persistent quota 256.0 MiB, ephemeral quota 2.0 GiB\n"
    );
    let c = ctl_config(&d, "vm1");
    assert_eq!(c["persistent_quota"], 256u64 << 20);
    assert_eq!(c["ephemeral_quota"], 2u64 << 30);

    // One quota at a time leaves the other alone; 'unlimited' is u64::MAX.
    ctl(&d, &["set-quota", "vm1", "-e", "unlimited"]).ok();
    let c = ctl_config(&d, "vm1");
    assert_eq!(c["persistent_quota"], 256u64 << 20);
    assert_eq!(c["ephemeral_quota"], UNLIMITED);

    // show --json has the same configuration, in both places.
    let s = ctl_show(&d, "vm1");
    assert_eq!(s["config"]["persistent_quota"], 256u64 << 20);
    assert_eq!(s["stats"]["config"]["persistent_quota"], 256u64 << 20);

    // --json prints the daemon's result: null.
    let out = ctl(&d, &["--json", "set-quota", "vm2", "-p", "1G"]);
    assert_eq!(out.ok(), "null\n");
    assert_eq!(ctl_config(&d, "vm2")["persistent_quota"], 1u64 << 30);
}

#[test]
fn set_weight_and_limit() {
    let d = daemon();
    assert_eq!(ctl_config(&d, "vm2")["weight"], 50);
    assert_eq!(
        ctl(&d, &["set-weight", "vm2", "300"]).ok(),
        "vm2: weight 300\n"
    );
    assert_eq!(ctl_config(&d, "vm2")["weight"], 300);
    assert_eq!(ctl_show(&d, "vm2")["stats"]["config"]["weight"], 300);

    let st = ctl(&d, &["status", "--json"]).json();
    assert_eq!(st["host_limit"], 1u64 << 30);
    assert_eq!(ctl(&d, &["set-limit", "3G"]).ok(), "host limit 3.0 GiB\n");
    let st = ctl(&d, &["status", "--json"]).json();
    assert_eq!(st["host_limit"], 3u64 << 30);
    ctl(&d, &["set-limit", "123456789"]).ok();
    assert_eq!(
        ctl(&d, &["status", "--json"]).json()["host_limit"],
        123456789u64
    );
}

#[test]
fn freeze_thaw_and_flush() {
    let d = daemon();
    assert_eq!(ctl_show(&d, "vm1")["stats"]["frozen"], false);
    assert_eq!(
        ctl(&d, &["freeze", "vm1"]).ok(),
        "vm1: frozen (puts refused until thawed)\n"
    );
    assert_eq!(ctl_show(&d, "vm1")["stats"]["frozen"], true);
    assert_eq!(ctl_show(&d, "vm2")["stats"]["frozen"], false);
    let list = ctl(&d, &["list"]).ok().to_string();
    let vm1 = list.lines().find(|l| l.starts_with("vm1 ")).unwrap();
    assert!(vm1.contains("frozen"), "{list}");
    assert_eq!(ctl(&d, &["thaw", "vm1"]).ok(), "vm1: thawed\n");
    assert_eq!(ctl_show(&d, "vm1")["stats"]["frozen"], false);

    // Flushing an empty VM succeeds and leaves it empty.
    assert_eq!(ctl(&d, &["flush", "vm1"]).ok(), "vm1: all pages flushed\n");
    assert_eq!(
        ctl(&d, &["flush", "vm1", "--ephemeral"]).ok(),
        "vm1: ephemeral pages flushed\n"
    );
    let s = ctl_show(&d, "vm1");
    assert_eq!(s["stats"]["persistent_pages"], 0);
    assert_eq!(s["stats"]["ephemeral_pages"], 0);
}

#[test]
fn add_and_remove_vm() {
    let d = daemon();
    let out = ctl(
        &d,
        &[
            "add-vm",
            "vm3",
            "--persistent-quota",
            "256M",
            "--ephemeral-quota",
            "1G",
            "--weight",
            "70",
            "--dedup-group",
            "web",
            "--auth",
            UUID_A,
            "--auth",
            "00112233445566778899AABBCCDDEEFF",
        ],
    );
    let sock = d.socket("vm3");
    assert_eq!(
        out.ok(),
        format!("added vm3: listening on {}\n", sock.display())
    );
    assert!(sock.exists());
    let c = ctl_config(&d, "vm3");
    assert_eq!(c["persistent_quota"], 256u64 << 20);
    assert_eq!(c["ephemeral_quota"], 1u64 << 30);
    assert_eq!(c["weight"], 70);
    assert_eq!(c["dedup_group"], "web");
    assert_eq!(uuids(&c), [UUID_B, UUID_A]);
    assert_eq!(ctl_list(&d)["vm3"]["connected"], false);

    // Defaults, and --json prints the new VM's summary.
    let v = ctl(&d, &["add-vm", "vm4", "--json"]).json();
    assert_eq!(v["name"], "vm4");
    assert_eq!(v["config"]["persistent_quota"], UNLIMITED);
    assert_eq!(v["config"]["weight"], 100);
    assert_eq!(v["config"]["dedup_group"], json!(null));
    assert_eq!(ctl_list(&d).len(), 4);

    // A name in use is the daemon's error.
    let out = ctl(&d, &["add-vm", "vm1"]);
    let line = out.fails(1);
    assert!(line.contains("vm1"), "{line}");

    assert_eq!(ctl(&d, &["remove-vm", "vm3"]).ok(), "removed vm3\n");
    assert!(!sock.exists());
    let names: Vec<String> = ctl_list(&d).keys().cloned().collect();
    assert_eq!(names, ["vm1", "vm2", "vm4"]);
    let st = ctl(&d, &["status", "--json"]).json();
    let clients: Vec<&str> = st["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(clients, ["vm1", "vm2", "vm4"]);
    ctl(&d, &["show", "vm3"]).fails(1);

    // The name can be used again, and starts from its defaults.
    ctl(&d, &["add-vm", "vm3"]).ok();
    assert_eq!(ctl_config(&d, "vm3")["persistent_quota"], UNLIMITED);
}

#[test]
fn auth_and_deauth() {
    let d = daemon();
    assert_eq!(ctl_config(&d, "vm1")["authorized_uuids"], json!([]));
    assert_eq!(
        ctl(&d, &["auth", "vm1", UUID_A]).ok(),
        format!("vm1: authorized shared pool {UUID_A}\n")
    );
    // Any accepted spelling is sent in canonical form.
    ctl(&d, &["auth", "vm1", "00112233445566778899aabbccddeeff"]).ok();
    assert_eq!(uuids(&ctl_config(&d, "vm1")), [UUID_B, UUID_A]);
    assert_eq!(ctl_config(&d, "vm2")["authorized_uuids"], json!([]));
    assert_eq!(
        ctl(&d, &["deauth", "vm1", UUID_A]).ok(),
        format!("vm1: deauthorized shared pool {UUID_A}\n")
    );
    assert_eq!(ctl_config(&d, "vm1")["authorized_uuids"], json!([UUID_B]));
    let show = ctl(&d, &["show", "vm1"]).ok().to_string();
    assert!(
        show.contains(&format!("authorized UUIDs:  {UUID_B}")),
        "{show}"
    );
}

#[test]
fn dedup_group() {
    let d = daemon();
    assert_eq!(ctl(&d, &["dedup-group", "vm1"]).ok(), "none\n");
    assert_eq!(ctl(&d, &["dedup-group", "vm1", "--json"]).ok(), "null\n");
    assert_eq!(
        ctl(&d, &["dedup-group", "vm1", "web"]).ok(),
        "vm1: dedup group web\n"
    );
    assert_eq!(ctl_config(&d, "vm1")["dedup_group"], "web");
    assert_eq!(ctl_show(&d, "vm1")["stats"]["config"]["dedup_group"], "web");
    assert_eq!(ctl(&d, &["dedup-group", "vm1"]).ok(), "web\n");
    assert_eq!(ctl(&d, &["dedup-group", "vm1", "--json"]).ok(), "\"web\"\n");
    assert_eq!(
        ctl(&d, &["dedup-group", "vm1", "--none"]).ok(),
        "vm1: no dedup group\n"
    );
    assert_eq!(ctl_config(&d, "vm1")["dedup_group"], json!(null));
}

#[test]
fn human_output() {
    let d = daemon();
    let list = ctl(&d, &["list"]).ok().to_string();
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(lines[0].starts_with("NAME  CONN  STATE   WEIGHT"), "{list}");
    // Aligned: every row as long as the header (right-aligned last column).
    assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{list}");
    assert!(
        lines[1].starts_with("vm1   no    active     100  512.0 MiB"),
        "{list}"
    );
    assert!(
        lines[2].starts_with("vm2   no    active      50  unlimited"),
        "{list}"
    );

    let show = ctl(&d, &["show", "vm2"]).ok().to_string();
    assert!(show.starts_with("vm2\n  socket:"), "{show}");
    assert!(show.contains("  weight:            50\n"), "{show}");
    assert!(show.contains("  dedup group:       none\n"), "{show}");
    assert!(show.ends_with("no pools\n"), "{show}");

    let status = ctl(&d, &["status", "--interval", "0.1"]).ok().to_string();
    assert!(
        status.starts_with("host limit:         1.0 GiB\n"),
        "{status}"
    );
    assert!(status.contains("compression ratio:  1.00\n"), "{status}");
    assert!(status.contains("dedup ratio:        1.00\n"), "{status}");
    assert!(
        status.contains("evictions:          0.0/s (sampled over 0."),
        "{status}"
    );
    assert!(status.contains("VMs:                2 "), "{status}");
    assert!(status.contains("\nuptime:             "), "{status}");
    let status = ctl(&d, &["status", "--interval", "0"]).ok().to_string();
    assert!(
        status.contains("evictions:          0 in total (0.0/s on average since vtmemd started)"),
        "{status}"
    );

    // A daemon with no VMs.
    let empty = vtmemd_with_vms(&[], &[]);
    assert_eq!(ctl(&empty, &["list"]).ok(), "no VMs\n");
    assert_eq!(ctl(&empty, &["list", "--json"]).ok(), "[]\n");
}
