// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmemd` command line: help, capabilities, one-line errors.

mod common;

use common::*;
use serde_json::Value;

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The program failed with exactly one non-empty line on stderr containing `needle`.
fn fails_with(args: &[&str], code: i32, needle: &str) {
    let out = run_vtmemd(args);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    // Informational log lines of a start that got some way are fine; the
    // error itself must be one line.
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains(" INFO "))
        .collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{err}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: {:?} does not mention {needle:?}",
        lines[0]
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn help_explains_the_options() {
    let out = run_vtmemd(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--socket-dir",
        "--config",
        "--vm",
        "--host-limit",
        "--queues",
        "--queue-size",
        "--poll-us",
        "--control-socket",
        "--log-level",
        "--print-capabilities",
        "persistent-quota",
        "vhost-user-tmem-pci",
    ] {
        assert!(text.contains(opt), "--help does not mention {opt}");
    }
    let out = run_vtmemd(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("vtmemd"));
}

#[test]
fn print_capabilities() {
    let out = run_vtmemd(&["--print-capabilities"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "tmem");
    let features: Vec<&str> = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for f in ["ephemeral", "shared", "mq", "reserve"] {
        assert!(features.contains(&f), "{features:?}");
    }
    // It needs nothing else, not even a socket directory.
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

#[test]
fn command_line_errors_are_one_line() {
    fails_with(&["--no-such-flag"], 2, "--no-such-flag");
    fails_with(&["--socket-dir", "/tmp", "--queues", "abc"], 2, "--queues");
    fails_with(&["--socket-dir", "/tmp", "--log-level", "loud"], 2, "loud");
    // Typed values are refused while the command line is parsed.
    fails_with(&["--socket-dir", "/tmp", "--host-limit", "12Q"], 2, "12Q");
    fails_with(&["--socket-dir", "/tmp", "--vm", "weight=5"], 2, "name");
    fails_with(&["--socket-dir", "/tmp", "--vm", "name=a/b"], 2, "a/b");
    fails_with(
        &["--socket-dir", "/tmp", "--vm", "name=a,colour=red"],
        2,
        "colour",
    );
    fails_with(
        &["--socket-dir", "/tmp", "--vm", "name=a,auth=xyz"],
        2,
        "xyz",
    );
}

#[test]
fn configuration_errors_are_one_line() {
    let dir = temp_dir();
    let d = dir.path().to_str().unwrap();
    fails_with(&[], 1, "socket directory");
    fails_with(&["--socket-dir", d, "--queues", "65"], 1, "queues");
    fails_with(&["--socket-dir", d, "--queue-size", "100"], 1, "queue size");
    fails_with(&["--socket-dir", d, "--poll-us", "1000000000"], 1, "poll");
    fails_with(
        &["--socket-dir", d, "--vm", "a", "--vm", "a"],
        1,
        "more than once",
    );
    fails_with(
        &["--socket-dir", d, "--config", "/nonexistent/vtmemd.toml"],
        1,
        "/nonexistent/vtmemd.toml",
    );
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "queues = 2\nsockets = 3\n").unwrap();
    fails_with(
        &["--socket-dir", d, "--config", cfg.to_str().unwrap()],
        1,
        "line 2",
    );
    std::fs::write(&cfg, "[[vm]]\nname = \"x\"\nweight = 0\n").unwrap();
    fails_with(
        &["--socket-dir", d, "--config", cfg.to_str().unwrap()],
        1,
        "weight",
    );
    // Nothing was left behind by the failed starts.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "bad.toml")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn socket_path_occupied_by_a_file() {
    let dir = temp_dir();
    std::fs::write(dir.path().join("vm1.sock"), b"not a socket").unwrap();
    fails_with(
        &["--socket-dir", dir.path().to_str().unwrap(), "--vm", "vm1"],
        1,
        "not a socket",
    );
    // The control socket it had created is gone again.
    assert!(!dir.path().join("vtmemd.ctl").exists());
}

#[test]
fn socket_dir_is_a_file() {
    let dir = temp_dir();
    let f = dir.path().join("file");
    std::fs::write(&f, b"x").unwrap();
    fails_with(&["--socket-dir", f.to_str().unwrap()], 1, "not a directory");
}

#[test]
fn configuration_file_and_flags_combine() {
    let dir = temp_dir();
    let cfg = dir.path().join("vtmemd.toml");
    std::fs::write(
        &cfg,
        r#"
host-limit = "256M"
queues = 2

[[vm]]
name = "fromfile"
persistent-quota = "64M"
authorized-uuids = ["00112233-4455-6677-8899-aabbccddeeff"]
"#,
    )
    .unwrap();
    let d = Vtmemd::start_in(
        VTMEMD,
        dir,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--queues",
            "3",
            "--vm",
            "name=fromflag,weight=7",
        ],
    );
    assert!(d.ready_line().contains("2 VM(s)"), "{}", d.ready_line());
    assert!(d.ready_line().contains("3 queue(s)"), "{}", d.ready_line());
    assert!(d.socket("fromfile").exists());
    assert!(d.socket("fromflag").exists());
    let mut c = d.raw();
    let vm = c.ok("show", serde_json::json!({"vm": "fromfile"}));
    assert_eq!(vm["config"]["persistent_quota"], 64 << 20);
    assert_eq!(
        vm["config"]["authorized_uuids"][0],
        "00112233-4455-6677-8899-aabbccddeeff"
    );
    let vm = c.ok("show", serde_json::json!({"vm": "fromflag"}));
    assert_eq!(vm["config"]["weight"], 7);
    assert_eq!(c.ok("status", Value::Null)["host_limit"], 256 << 20);
}
