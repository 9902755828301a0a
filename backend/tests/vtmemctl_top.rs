// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmemctl top`: frames with ANSI redraw, batch and JSON frames, and a
//! clean exit on SIGINT.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::*;
use vtmem_api::Request;

const CLEAR: &str = "\x1b[H\x1b[2J";

/// Starts `vtmemctl top args...` against `d`, its outputs piped.
fn spawn_top(d: &Vtmemd, args: &[&str]) -> Child {
    Command::new(VTMEMCTL)
        .arg("--socket")
        .arg(d.control_path())
        .arg("top")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn two_frames_with_redraw() {
    let d = vtmemd_with_vms(&["vm1", "name=vm2,weight=50"], &[]);
    ctl(&d, &["freeze", "vm2"]).ok();
    let started = Instant::now();
    let out = ctl(&d, &["top", "--iterations", "2", "--interval", "0.2"]);
    let text = out.ok();
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(text.matches(CLEAR).count(), 2, "{text:?}");
    let frames: Vec<&str> = text.split(CLEAR).filter(|f| !f.is_empty()).collect();
    assert_eq!(frames.len(), 2);
    for f in frames {
        let lines: Vec<&str> = f.lines().collect();
        assert!(
            lines[0].starts_with("vtmemctl top: every 0.2 s; host 0 B of 1.0 GiB used"),
            "{f}"
        );
        assert_eq!(lines[1], "");
        assert!(
            lines[2].starts_with("VM   CONN  STATE   PUTS/S  GETS/S  HIT RATE"),
            "{f}"
        );
        assert!(
            lines[3].starts_with("vm1  no    active     0.0     0.0         -"),
            "{f}"
        );
        assert!(
            lines[4].starts_with("vm2  no    frozen     0.0     0.0         -"),
            "{f}"
        );
        assert_eq!(lines.len(), 5, "{f}");
    }
}

#[test]
fn batch_and_json_frames() {
    let d = vtmemd_with_vms(&["vm1"], &[]);
    let out = ctl(&d, &["top", "-n", "2", "-i", "0.1", "--batch"]);
    let text = out.ok();
    assert!(!text.contains('\x1b'), "{text:?}");
    assert_eq!(
        text.matches("vtmemctl top: every 0.1 s").count(),
        2,
        "{text}"
    );
    assert_eq!(text.matches("\n\nvtmemctl top:").count(), 1, "{text}");

    let out = ctl(&d, &["top", "-n", "3", "-i", "0.1", "--json"]);
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(lines.len(), 3);
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["interval_secs"].as_f64().unwrap() >= 0.09, "{v}");
        assert_eq!(v["host_limit"], 1u64 << 30);
        assert_eq!(v["vms"][0]["name"], "vm1");
        assert_eq!(v["vms"][0]["connected"], false);
        assert_eq!(v["vms"][0]["puts_per_sec"], 0.0);
        assert_eq!(v["vms"][0]["hit_rate"], serde_json::Value::Null);
    }
}

#[test]
fn follows_vms_added_and_removed() {
    let d = vtmemd_with_vms(&["vm1"], &[]);
    let mut child = spawn_top(&d, &["-i", "0.3", "-n", "4", "--batch"]);
    // Lines as they arrive; the channel closes when top closes its output.
    let (tx, lines) = mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // top writes each frame at once: from its first line on, the first
    // frame is what it is. Only then is vm9 added.
    let first = lines.recv_timeout(DEADLINE).expect("the first frame");
    d.call(&Request::AddVm("vm9".parse().unwrap()));
    let mut text = first + "\n";
    loop {
        match lines.recv_timeout(DEADLINE) {
            Ok(line) => {
                text.push_str(&line);
                text.push('\n');
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("top stalled after:\n{text}"),
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let frames: Vec<&str> = text
        .split("\n\n")
        .filter(|f| f.starts_with("VM "))
        .collect();
    assert_eq!(frames.len(), 4, "{text}");
    assert!(!frames[0].contains("vm9"), "{text}");
    assert!(frames[3].contains("vm9"), "{text}");
}

#[test]
fn sigint_ends_cleanly() {
    let d = vtmemd_with_vms(&["vm1"], &[]);
    let mut child = spawn_top(&d, &["--interval", "0.1"]);
    // Wait for the first frame, then interrupt as Ctrl-C would.
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 64];
    let n = stdout.read(&mut buf).unwrap();
    assert!(n > 0);
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "top did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert!(err.is_empty(), "{err}");
}
