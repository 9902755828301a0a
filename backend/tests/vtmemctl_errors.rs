// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmemctl` errors: one line on stderr, exit 1 for the daemon's errors,
//! 2 for usage errors, 3 when the daemon cannot be reached; the socket from
//! `--socket` or `VTMEM_CONTROL_SOCKET`; human sizes.

mod common;

use common::*;

const UUID: &str = "6b0e2a54-3f4c-4cde-9a57-0d6e1f3ad3a1";

#[test]
fn unknown_vm_is_the_daemons_error() {
    let d = vtmemd_with_vms(&["vm1"], &[]);
    let cases: &[&[&str]] = &[
        &["show", "nope"],
        &["set-quota", "nope", "-p", "1G"],
        &["set-weight", "nope", "10"],
        &["freeze", "nope"],
        &["thaw", "nope"],
        &["flush", "nope"],
        &["flush", "nope", "--ephemeral"],
        &["remove-vm", "nope"],
        &["dedup-group", "nope"],
        &["dedup-group", "nope", "web"],
        &["dedup-group", "nope", "--none"],
        &["auth", "nope", UUID],
        &["deauth", "nope", UUID],
    ];
    for args in cases {
        let out = ctl(&d, args);
        assert_eq!(out.fails(1), "vtmemctl: no VM named 'nope'", "{args:?}");
        // The same with --json: errors are never JSON on stdout.
        let mut with_json = args.to_vec();
        with_json.push("--json");
        assert_eq!(ctl(&d, &with_json).fails(1), "vtmemctl: no VM named 'nope'");
    }
    // Nothing changed.
    assert_eq!(ctl_list(&d).len(), 1);
}

#[test]
fn other_daemon_errors() {
    let d = vtmemd_with_vms(&["vm1"], &[]);
    let line = ctl(&d, &["set-limit", "0"]).fails(1).to_string();
    assert!(line.contains("more than 0 bytes"), "{line}");
    let line = ctl(&d, &["add-vm", "vm1"]).fails(1).to_string();
    assert!(line.contains("vm1"), "{line}");
}

#[test]
fn usage_errors() {
    // No daemon is needed: the command line is checked first.
    let d = temp_dir();
    let sock = d.path().join("absent.ctl");
    let s = sock.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["set-quota", "vm1", "--persistent", "12X"],
            "invalid quota '12X'",
        ),
        (
            &["set-quota", "vm1", "--ephemeral", "1.5G"],
            "invalid quota '1.5G'",
        ),
        (&["set-quota", "vm1"], "required"),
        (&["set-limit", "lots"], "invalid size 'lots'"),
        (&["set-limit", "unlimited"], "invalid size 'unlimited'"),
        (
            &["add-vm", "vm3", "--persistent-quota", "9Q"],
            "invalid quota '9Q'",
        ),
        (&["set-weight", "vm1", "0"], "invalid weight '0'"),
        (&["set-weight", "vm1", "heavy"], "invalid weight 'heavy'"),
        (&["auth", "vm1", "not-a-uuid"], "invalid UUID 'not-a-uuid'"),
        (
            &["deauth", "vm1", "00000000-0000-0000-0000-000000000000"],
            "invalid UUID",
        ),
        (&["add-vm", "../evil"], "invalid VM name '../evil'"),
        (
            &["add-vm", "vm3", "--dedup-group", "a,b"],
            "invalid dedup group",
        ),
        (
            &["dedup-group", "vm1", "web", "--none"],
            "cannot be used with",
        ),
        (&["show"], "required"),
        (&["frobnicate"], "unrecognized subcommand 'frobnicate'"),
        (&["list", "--bogus"], "unexpected argument '--bogus'"),
        (&["top", "--interval", "0"], "invalid"),
        (&["top", "--iterations", "0"], "invalid value '0'"),
        (&["status", "--interval", "-1"], ""),
        (&[], "no command given"),
    ];
    for (args, want) in cases {
        let mut all = vec!["--socket", s];
        all.extend_from_slice(args);
        let out = vtmemctl_env(&all, None);
        let line = out.fails(2);
        assert!(line.contains(want), "{args:?}: {line}");
        assert!(line.ends_with("see 'vtmemctl --help'"), "{args:?}: {line}");
    }
}

#[test]
fn missing_daemon() {
    let d = temp_dir();
    let sock = d.path().join("vtmemd.ctl");
    for args in [
        &["status"][..],
        &["list"],
        &["list", "--json"],
        &["show", "vm1"],
        &["freeze", "vm1"],
        &["top", "--iterations", "1"],
    ] {
        let mut all = vec!["--socket", sock.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = vtmemctl_env(&all, None);
        let line = out.fails(3);
        let want = format!("vtmemctl: cannot connect to vtmemd at {}: ", sock.display());
        assert!(line.starts_with(&want), "{args:?}: {line}");
        assert!(line.contains("(os error 2)"), "{args:?}: {line}");
        assert!(
            line.ends_with("(is vtmemd running? see --socket and VTMEM_CONTROL_SOCKET)"),
            "{args:?}: {line}"
        );
    }

    // A socket file nobody listens on (a killed daemon's leftover).
    let stale = d.path().join("stale.ctl");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let out = vtmemctl_env(&["--socket", stale.to_str().unwrap(), "list"], None);
    assert!(out.fails(3).contains("(os error 111)"), "{out:?}");

    // The default path, when neither --socket nor the environment names
    // one (no daemon runs there in a test environment).
    if !std::path::Path::new("/run/vtmem/vtmemd.ctl").exists() {
        let out = vtmemctl_env(&["list"], None);
        assert!(
            out.fails(3).contains("at /run/vtmem/vtmemd.ctl:"),
            "{out:?}"
        );
    }
}

#[test]
fn socket_from_environment() {
    let d = vtmemd_with_vms(&["vm1"], &[]);
    let ctl_path = d.control_path();
    let out = vtmemctl_env(&["list", "--json"], Some(&ctl_path));
    assert_eq!(out.json()[0]["name"], "vm1");
    // --socket wins over the environment.
    let nowhere = temp_dir();
    let absent = nowhere.path().join("x.ctl");
    let out = vtmemctl_env(
        &["--socket", ctl_path.to_str().unwrap(), "list"],
        Some(&absent),
    );
    out.ok();
    let out = vtmemctl_env(&["list"], Some(&absent));
    assert!(out.fails(3).contains(absent.to_str().unwrap()));
    // Global options may follow the command.
    let out = vtmemctl_env(
        &["show", "vm1", "--socket", ctl_path.to_str().unwrap()],
        None,
    );
    assert!(out.ok().starts_with("vm1\n"));
}

#[test]
fn sizes_in_human_units() {
    let d = vtmemd_with_vms(&["vm1"], &[]);
    for (text, bytes) in [
        ("4096", 4096u64),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("2G", 2 << 30),
        ("3gb", 3 << 30),
        ("1T", 1 << 40),
        ("unlimited", u64::MAX),
    ] {
        ctl(
            &d,
            &[
                "set-quota",
                "vm1",
                "--persistent",
                text,
                "--ephemeral",
                text,
            ],
        )
        .ok();
        let c = ctl_config(&d, "vm1");
        assert_eq!(c["persistent_quota"], bytes, "{text}");
        assert_eq!(c["ephemeral_quota"], bytes, "{text}");
    }
    for (text, bytes) in [
        ("2G", 2u64 << 30),
        ("1536M", 1536 << 20),
        ("1000000", 1000000),
    ] {
        ctl(&d, &["set-limit", text]).ok();
        assert_eq!(ctl(&d, &["status", "--json"]).json()["host_limit"], bytes);
    }
    ctl(
        &d,
        &[
            "add-vm",
            "vm2",
            "--persistent-quota",
            "128M",
            "--ephemeral-quota",
            "1g",
        ],
    )
    .ok();
    let c = ctl_config(&d, "vm2");
    assert_eq!(c["persistent_quota"], 128u64 << 20);
    assert_eq!(c["ephemeral_quota"], 1u64 << 30);
}

#[test]
fn help_and_version() {
    let out = vtmemctl_env(&["--help"], None);
    let text = out.ok();
    for cmd in [
        "status",
        "list",
        "show",
        "set-quota",
        "set-weight",
        "set-limit",
        "freeze",
        "thaw",
        "flush",
        "add-vm",
        "remove-vm",
        "dedup-group",
        "auth",
        "deauth",
        "top",
    ] {
        assert!(text.contains(cmd), "{cmd} missing from --help");
    }
    assert!(text.contains("VTMEM_CONTROL_SOCKET"));
    let out = vtmemctl_env(&["set-quota", "--help"], None);
    assert!(out.ok().contains("--persistent <SIZE>"));
    let out = vtmemctl_env(&["--version"], None);
    assert!(out.ok().starts_with("vtmemctl "));
    assert!(std::path::Path::new(VTMEMCTL).is_file());
}
