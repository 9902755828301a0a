// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The sandbox of the real `vtmemd`: what `/proc/<pid>/status` shows of
//! every thread once it is ready, and that it still serves (control
//! socket, VMs added and removed, a vhost-user frontend, a clean exit on
//! SIGTERM) under its seccomp allow-list.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

const VTMEMD: &str = env!("CARGO_BIN_EXE_vtmemd");
const DEADLINE: Duration = Duration::from_secs(30);

/// A private directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vtmem-sandbox-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `vtmemd`, killed on drop.
struct Daemon {
    child: Child,
    dir: Dir,
    stderr: mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts `vtmemd --socket-dir <dir> <args>` and waits for its
    /// readiness line, which it prints once inside its sandbox.
    fn start(dir: Dir, args: &[&str]) -> Self {
        let mut child = Command::new(VTMEMD)
            .arg("--socket-dir")
            .arg(&dir.0)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (tx, stderr) = mpsc::channel();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        let mut d = Daemon { child, dir, stderr };
        match lines.recv_timeout(DEADLINE) {
            Ok(l) if l.starts_with("vtmemd ready") => d,
            other => {
                let _ = d.child.kill();
                panic!("vtmemd not ready ({other:?}); stderr:\n{}", d.stderr_text());
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// Everything it wrote on stderr (once it has exited).
    fn stderr_text(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| "(stderr not available)".into())
    }

    /// One control request; the `result` of an `ok` answer.
    fn control(&self, command: &str, args: Value) -> Value {
        let mut s = UnixStream::connect(self.path("vtmemd.ctl")).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let line = json!({"version": 1, "command": command, "args": args});
        writeln!(s, "{line}").unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        let v: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["ok"], true, "{command}: {answer}");
        v["result"].clone()
    }

    /// Sends SIGTERM and waits (with a deadline) for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "vtmemd did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fields of a `status` file of `/proc`.
fn status_of(path: &Path) -> BTreeMap<String, String> {
    fields(&std::fs::read_to_string(path).unwrap())
}

fn fields(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The status of every thread of process `pid` (a thread that ends while
/// they are read, such as a finished connection's, is left out).
fn threads(pid: u32) -> Vec<BTreeMap<String, String>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| {
            let path = t.ok()?.path().join("status");
            path.exists().then(|| std::fs::read_to_string(path).ok())?
        })
        .map(|text| fields(&text))
        .collect()
}

fn own_status() -> BTreeMap<String, String> {
    status_of(Path::new("/proc/self/status"))
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s, 16).unwrap()
}

/// The test process has CAP_SETPCAP, so vtmemd (its child) can empty its
/// bounding set.
fn may_clear_bounding_set() -> bool {
    hex(&own_status()["CapEff"]) & (1 << 8) != 0
}

/// Asserts the sandbox of every thread: a seccomp filter, no new
/// privileges, no capabilities.
fn assert_sandboxed(pid: u32) {
    assert_sandboxed_keeping(pid, 0);
}

/// As [`assert_sandboxed`], the effective and permitted sets holding
/// exactly `kept`.
fn assert_sandboxed_keeping(pid: u32, kept: u64) {
    let own = own_status();
    let own_filters: u64 = own.get("Seccomp_filters").map_or(0, |f| f.parse().unwrap());
    let all = threads(pid);
    assert!(
        all.len() >= 3,
        "main, control and VM threads: {}",
        all.len()
    );
    for st in all {
        let name = &st["Name"];
        assert_eq!(st["Seccomp"], "2", "{name}");
        if let Some(f) = st.get("Seccomp_filters") {
            assert_eq!(f.parse::<u64>().unwrap(), own_filters + 2, "{name}");
        }
        assert_eq!(st["NoNewPrivs"], "1", "{name}");
        for set in ["CapEff", "CapPrm"] {
            assert_eq!(hex(&st[set]), kept, "{name} {set}");
        }
        for set in ["CapInh", "CapAmb"] {
            assert_eq!(hex(&st[set]), 0, "{name} {set}");
        }
        if may_clear_bounding_set() {
            assert_eq!(hex(&st["CapBnd"]), 0, "{name} CapBnd");
        }
    }
}

/// What vtmemd does once sandboxed: control requests, a VM added and
/// removed (a thread, a socket bound and unlinked), a vhost-user frontend
/// connecting and negotiating.
fn exercise(d: &Daemon) {
    let status = d.control("status", Value::Null);
    assert!(status["uptime_seconds"].as_f64().is_some(), "{status}");
    d.control("add-vm", json!({"name": "vm2", "persistent_quota": "4M"}));
    assert!(d.path("vm2.sock").exists());
    let frontend = Frontend::connect(d.path("vm2.sock"), 1).unwrap();
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1: {features:#x}");
    drop(frontend);
    let list = d.control("list", Value::Null);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    d.control("remove-vm", json!({"vm": "vm2"}));
    assert!(!d.path("vm2.sock").exists());
    d.control("set-limit", json!({"bytes": "64M"}));
}

/// Exit status 0 after SIGTERM, every socket removed: never SIGSYS.
fn assert_clean_exit(d: &mut Daemon) {
    let st = d.terminate();
    assert_eq!(
        st.signal(),
        None,
        "vtmemd killed by signal {:?}",
        st.signal()
    );
    assert!(st.success(), "{st}");
    let left: Vec<_> = std::fs::read_dir(&d.dir.0).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn enforcing_by_default_and_still_serving() {
    let mut d = Daemon::start(Dir::new("enforce"), &["--vm", "vm1"]);
    assert_sandboxed(d.pid());
    exercise(&d);
    // Threads started for the frontend and for vm2 inherited the filter;
    // whatever runs now is still sandboxed.
    assert_sandboxed(d.pid());
    assert_clean_exit(&mut d);
}

#[test]
fn enforcing_with_a_state_file_and_metrics() {
    let dir = Dir::new("state");
    let state = dir.0.join("state.json");
    let state_arg = state.to_str().unwrap().to_string();
    let mut d = Daemon::start(
        dir,
        &[
            "--vm",
            "vm1",
            "--sandbox",
            "enforce",
            "--state-file",
            &state_arg,
            "--metrics-address",
            "127.0.0.1:0",
        ],
    );
    assert_sandboxed(d.pid());
    // The state file is rewritten (create, fsync, rename) under the filter.
    d.control("set-weight", json!({"vm": "vm1", "weight": 7}));
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(
        text.contains("\"weight\":7") || text.contains("\"weight\": 7"),
        "{text}"
    );
    std::fs::remove_file(&state).unwrap();
    assert_clean_exit(&mut d);
}

#[test]
fn log_mode_installs_the_filter_too() {
    let mut d = Daemon::start(Dir::new("log"), &["--vm", "vm1", "--sandbox=log"]);
    assert_sandboxed(d.pid());
    exercise(&d);
    assert_clean_exit(&mut d);
}

#[test]
fn none_mode_installs_nothing() {
    let mut d = Daemon::start(Dir::new("none"), &["--vm", "vm1", "--sandbox=none"]);
    let own = own_status();
    for st in threads(d.pid()) {
        // As much seccomp as the test itself runs under: none here.
        assert_eq!(st["Seccomp"], own["Seccomp"]);
        assert_eq!(st.get("Seccomp_filters"), own.get("Seccomp_filters"));
        assert_eq!(st["NoNewPrivs"], own["NoNewPrivs"]);
    }
    exercise(&d);
    assert_clean_exit(&mut d);
}

#[test]
fn switches_user_after_binding() {
    if effective_uid() != 0 {
        eprintln!("skipped: switching user needs root");
        return;
    }
    let dir = Dir::new("user");
    // The user must be able to create and remove sockets in the directory.
    std::os::unix::fs::chown(&dir.0, Some(65534), Some(65534)).unwrap();
    let mut d = Daemon::start(dir, &["--vm", "vm1", "--user", "65534", "--group", "65534"]);
    assert_sandboxed(d.pid());
    for st in threads(d.pid()) {
        assert_eq!(st["Uid"], "65534\t65534\t65534\t65534");
        assert_eq!(st["Gid"], "65534\t65534\t65534\t65534");
        assert_eq!(st["Groups"], "65534");
    }
    // The control socket was bound as root, before the switch: still
    // root's, mode 0600.
    let meta = std::fs::metadata(d.path("vtmemd.ctl")).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (0, 0o600));
    exercise(&d);
    assert_eq!(std::fs::metadata(d.path("vm1.sock")).unwrap().uid(), 0);
    assert_clean_exit(&mut d);
}

/// A state directory served as another user: vtmemd opens it as root,
/// gives it to the user, who checkpoints it at the stop (new snapshots
/// and journals made, old ones removed) and removes a VM's files; the
/// next vtmemd recovers the VM.
#[test]
fn switches_user_with_a_state_directory() {
    if effective_uid() != 0 {
        eprintln!("skipped: switching user needs root");
        return;
    }
    let dir = Dir::new("userstate");
    std::os::unix::fs::chown(&dir.0, Some(65534), Some(65534)).unwrap();
    let states = Dir::new("userstate-dir");
    let state = states.0.join("state");
    let state_arg = state.to_str().unwrap().to_string();
    let args = [
        "--vm",
        "vm1",
        "--user",
        "65534",
        "--group",
        "65534",
        "--state-dir",
        &state_arg,
    ];
    let mut d = Daemon::start(dir, &args);
    assert_sandboxed(d.pid());
    exercise(&d);
    assert_clean_exit(&mut d);
    let err = d.stderr_text();
    assert!(
        err.contains("state directory") && err.contains("checkpointed"),
        "{err}"
    );
    // Nothing went wrong; the one warning allowed is that the test's
    // state directory is not on a tmpfs.
    let wrong = err
        .lines()
        .filter(|l| !l.contains("not a tmpfs"))
        .any(|l| l.contains("WARN") || l.contains("ERROR"));
    assert!(!wrong, "{err}");
    use std::os::unix::fs::MetadataExt;
    for e in std::fs::read_dir(&state).unwrap() {
        let e = e.unwrap();
        assert_eq!(e.metadata().unwrap().uid(), 65534, "{:?}", e.path());
    }
    let dir = Dir::new("userstate2");
    std::os::unix::fs::chown(&dir.0, Some(65534), Some(65534)).unwrap();
    let mut d = Daemon::start(dir, &args);
    assert_eq!(d.control("status", Value::Null)["recovered"]["vms"], 1);
    assert_clean_exit(&mut d);
}

/// Socket owners under the enforcing sandbox: a root daemon that keeps its
/// user keeps `CAP_CHOWN`, and nothing else, to give VM sockets (at start
/// and added later) to their owners.
#[test]
fn root_keeps_only_chown_for_socket_owners() {
    if effective_uid() != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut d = Daemon::start(
        Dir::new("owners"),
        &["--vm", "vm1,socket-user=65534,socket-group=65534"],
    );
    const CAP_CHOWN: u64 = 1 << 0;
    assert_sandboxed_keeping(d.pid(), CAP_CHOWN);
    let meta = std::fs::metadata(d.path("vm1.sock")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o777),
        (65534, 65534, 0o660)
    );
    d.control("add-vm", json!({"name": "vm3", "socket_user": "65534"}));
    let meta = std::fs::metadata(d.path("vm3.sock")).unwrap();
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o777),
        (65534, 0o600)
    );
    assert_clean_exit(&mut d);
}

#[test]
fn root_without_user_gives_the_control_socket_to_its_group() {
    if effective_uid() != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    // Capabilities are gone before the control socket is bound; vtmemd
    // joins the group instead of using CAP_CHOWN.
    let mut d = Daemon::start(
        Dir::new("cgroup"),
        &["--vm", "vm1", "--control-group", "65534"],
    );
    assert_sandboxed(d.pid());
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(d.path("vtmemd.ctl")).unwrap();
    assert_eq!(
        (meta.gid(), meta.permissions().mode() & 0o777),
        (65534, 0o660)
    );
    let st = threads(d.pid()).remove(0);
    assert_eq!(st["Uid"], "0\t0\t0\t0");
    assert!(
        st["Groups"].split_whitespace().any(|g| g == "65534"),
        "{st:?}"
    );
    exercise(&d);
    assert_clean_exit(&mut d);
}

fn effective_uid() -> u32 {
    own_status()["Uid"]
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn unknown_user_is_refused_at_start() {
    let dir = Dir::new("nouser");
    let out = Command::new(VTMEMD)
        .arg("--socket-dir")
        .arg(&dir.0)
        .args(["--user", "no-such-user-vtmem"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown user 'no-such-user-vtmem'"), "{err}");
}
