// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The systemd units of `contrib/systemd/` and the default configuration
//! `contrib/vtmemd.toml`: `systemd-analyze verify` accepts the units (run
//! against the vtmemd cargo built), they agree with the daemon's defaults
//! and socket names, and their system-call filter lets through every call
//! vtmemd makes, at start and under its own sandbox.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use vtmem_backend::config::{FileConfig, DEFAULT_CONTROL_SOCKET, DEFAULT_SOCKET_DIR};
use vtmem_backend::systemd::CONTROL_NAME;

const UNITS: [&str; 3] = ["vtmemd.service", "vtmemd.socket", "vtmemd-vm@.socket"];

fn contrib() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib")
}

fn unit(name: &str) -> String {
    std::fs::read_to_string(contrib().join("systemd").join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The values of `key=` in a unit's text (comments skipped).
fn values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
        .collect()
}

fn value(text: &str, key: &str) -> String {
    let v = values(text, key);
    assert_eq!(v.len(), 1, "{key}: {v:?}");
    v[0].clone()
}

fn systemd_analyze() -> Option<&'static str> {
    let found = Path::new("/usr/bin/systemd-analyze").exists();
    if !found {
        eprintln!("skipped: systemd-analyze is not installed (Debian package systemd)");
    }
    found.then_some("/usr/bin/systemd-analyze")
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    // The units as installed, but starting the vtmemd cargo built (verify
    // checks that ExecStart= is executable). Man pages are checked where
    // they are installed: the package test (tests/deb).
    let dir = temp_dir();
    for name in UNITS {
        let text = unit(name).replace("/usr/libexec/vtmemd", VTMEMD);
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let out = run(
        Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(dir.path().join("vtmemd.service"))
            .arg(dir.path().join("vtmemd.socket"))
            .arg(dir.path().join("vtmemd-vm@web1.socket"))
            .current_dir(dir.path()),
        DEADLINE,
    );
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");

    // A mistake is caught: the check has teeth.
    let broken = unit("vtmemd.service").replace("Restart=on-failure", "Restart=sometimes");
    std::fs::write(dir.path().join("vtmemd.service"), broken).unwrap();
    let out = run(
        Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(dir.path().join("vtmemd.service")),
        DEADLINE,
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("sometimes"), "{text}");
}

#[test]
fn the_units_agree_with_the_daemon() {
    let service = unit("vtmemd.service");
    assert_eq!(value(&service, "Type"), "notify");
    assert_eq!(value(&service, "NotifyAccess"), "main");
    assert_eq!(value(&service, "Restart"), "on-failure");
    assert_eq!(
        value(&service, "ExecStart"),
        "/usr/libexec/vtmemd --config /etc/vtmem/vtmemd.toml"
    );
    assert_eq!(
        Path::new("/run").join(value(&service, "RuntimeDirectory")),
        Path::new(DEFAULT_SOCKET_DIR)
    );
    assert_eq!(value(&service, "RuntimeDirectoryPreserve"), "yes");
    assert_eq!(value(&service, "StateDirectory"), "vtmem");
    // The sandbox's promises, made by systemd before vtmemd runs.
    assert_eq!(value(&service, "NoNewPrivileges"), "yes");
    // At most CAP_CHOWN, which vtmemd keeps only for socket owners.
    assert_eq!(value(&service, "CapabilityBoundingSet"), "CAP_CHOWN");
    assert_eq!(value(&service, "AmbientCapabilities"), "");
    assert_eq!(value(&service, "ProtectSystem"), "strict");
    assert_eq!(value(&service, "MemoryDenyWriteExecute"), "yes");
    assert_eq!(
        value(&service, "RestrictAddressFamilies"),
        "AF_UNIX AF_INET AF_INET6"
    );

    let control = unit("vtmemd.socket");
    assert_eq!(value(&control, "ListenStream"), DEFAULT_CONTROL_SOCKET);
    assert_eq!(value(&control, "FileDescriptorName"), CONTROL_NAME);
    assert_eq!(value(&control, "SocketMode"), "0600");

    let vm = unit("vtmemd-vm@.socket");
    assert_eq!(
        value(&vm, "ListenStream"),
        format!("{DEFAULT_SOCKET_DIR}/%i.sock")
    );
    assert_eq!(value(&vm, "FileDescriptorName"), "%i");
    assert_eq!(value(&vm, "Service"), "vtmemd.service");

    // The default configuration parses and names the same places.
    let conf = FileConfig::load(&contrib().join("vtmemd.toml")).expect("default configuration");
    assert_eq!(
        conf.socket_dir.as_deref(),
        Some(Path::new(DEFAULT_SOCKET_DIR))
    );
    assert_eq!(
        conf.control_socket.as_deref(),
        Some(Path::new(DEFAULT_CONTROL_SOCKET))
    );
    let state = conf.state_file.expect("a state file");
    assert!(state.starts_with("/var/lib/vtmem"), "{}", state.display());
}

/// The system calls a `SystemCallFilter=` group allows, expanded.
fn expand(analyze: &str, group: &str, into: &mut BTreeSet<String>) {
    let out = run(
        Command::new(analyze).args(["syscall-filter", group]),
        DEADLINE,
    );
    assert!(out.status.success(), "syscall-filter {group}");
    let text = String::from_utf8(out.stdout).unwrap();
    for word in text
        .lines()
        .skip(1)
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
    {
        if word.starts_with('@') {
            expand(analyze, word, into);
        } else {
            into.insert(word.to_string());
        }
    }
}

#[test]
fn the_unit_filter_lets_through_every_call_vtmemd_makes() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let service = unit("vtmemd.service");
    let mut allowed = BTreeSet::new();
    for item in value(&service, "SystemCallFilter").split_whitespace() {
        if item.starts_with('@') {
            expand(analyze, item, &mut allowed);
        } else {
            allowed.insert(item.to_string());
        }
    }
    assert!(allowed.len() > 100, "{allowed:?}");
    // Before its own sandbox: capabilities, no-new-privileges, the user
    // switch, installing the filter; then everything on its allow-list.
    let start_up = [
        "capget",
        "capset",
        "prctl",
        "setgroups",
        "setresuid",
        "setresgid",
        "seccomp",
    ];
    let serving = vtmem_backend::sandbox::allowed_syscalls();
    let missing: Vec<&str> = start_up
        .into_iter()
        .chain(serving.iter().map(|(name, _, _)| *name))
        .filter(|name| !allowed.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "SystemCallFilter= of vtmemd.service refuses {missing:?}"
    );
}
