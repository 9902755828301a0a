// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared helpers of the `vtmemctl_*` tests: the real `vtmemd` in a private
//! socket directory, and the real `vtmemctl` run against it.

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The daemon.
pub const VTMEMD: &str = env!("CARGO_BIN_EXE_vtmemd");
/// The tool under test.
pub const VTMEMCTL: &str = env!("CARGO_BIN_EXE_vtmemctl");

#[path = "../common/tempdir.rs"]
mod tempdir;
pub use tempdir::TempDir;

/// What a `vtmemctl` run did.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Asserts success; returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "vtmemctl failed: {self:?}");
        assert!(self.stderr.is_empty(), "stderr on success: {self:?}");
        &self.stdout
    }

    /// Asserts success and parses stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// Asserts failure with `code`, nothing on stdout and exactly one line
    /// on stderr, starting with `vtmemctl: `; returns that line.
    pub fn fails(&self, code: i32) -> &str {
        assert_eq!(self.code, code, "exit status: {self:?}");
        assert!(self.stdout.is_empty(), "stdout on failure: {self:?}");
        assert!(
            self.stderr.ends_with('\n') && self.stderr.matches('\n').count() == 1,
            "not one line: {self:?}"
        );
        let line = self.stderr.trim_end();
        assert!(line.starts_with("vtmemctl: "), "{line}");
        line
    }
}

/// Runs `vtmemctl` with `args`, `VTMEM_CONTROL_SOCKET` set to `env_socket`
/// (or removed).
pub fn vtmemctl_env(args: &[&str], env_socket: Option<&Path>) -> Out {
    let mut cmd = Command::new(VTMEMCTL);
    cmd.args(args).stdin(Stdio::null());
    match env_socket {
        Some(p) => cmd.env("VTMEM_CONTROL_SOCKET", p),
        None => cmd.env_remove("VTMEM_CONTROL_SOCKET"),
    };
    let o = cmd.output().expect("running vtmemctl");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8(o.stdout).unwrap(),
        stderr: String::from_utf8(o.stderr).unwrap(),
    }
}

/// A running `vtmemd`, killed on drop.
pub struct Vtmemd {
    child: Child,
    dir: TempDir,
}

impl Vtmemd {
    /// Starts `vtmemd` with `--vm` specs and more arguments, and waits
    /// until its sockets accept connections.
    pub fn start(vms: &[&str], extra: &[&str]) -> Self {
        let dir = TempDir::new();
        let log = File::create(dir.path().join("vtmemd.log")).unwrap();
        let mut cmd = Command::new(VTMEMD);
        cmd.arg("--socket-dir").arg(dir.path());
        for vm in vms {
            cmd.arg("--vm").arg(vm);
        }
        cmd.args(extra)
            .arg("--log-level")
            .arg("warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("starting vtmemd");
        let mut d = Vtmemd { child, dir };
        let names: Vec<String> = vms
            .iter()
            .map(|s| {
                let first = s.split(',').next().unwrap();
                first.strip_prefix("name=").unwrap_or(first).to_string()
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!("vtmemd exited ({st}) at start: {}", d.log());
            }
            let up = UnixStream::connect(d.control()).is_ok()
                && names.iter().all(|n| d.socket(n).exists());
            if up {
                return d;
            }
            assert!(Instant::now() < deadline, "vtmemd not ready: {}", d.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The control socket.
    pub fn control(&self) -> PathBuf {
        self.dir.path().join("vtmemd.ctl")
    }

    /// A VM's socket.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    /// What the daemon logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vtmemd.log")).unwrap_or_default()
    }

    /// Runs `vtmemctl --socket <control> args...`.
    pub fn ctl(&self, args: &[&str]) -> Out {
        let control = self.control();
        let mut all = vec!["--socket", control.to_str().unwrap()];
        all.extend_from_slice(args);
        vtmemctl_env(&all, None)
    }

    /// `show --json VM`.
    pub fn show(&self, vm: &str) -> Value {
        self.ctl(&["show", "--json", vm]).json()
    }

    /// `list --json`, as a map from VM name to its summary.
    pub fn list(&self) -> serde_json::Map<String, Value> {
        let v = self.ctl(&["list", "--json"]).json();
        v.as_array()
            .expect("list is an array")
            .iter()
            .map(|vm| (vm["name"].as_str().unwrap().to_string(), vm.clone()))
            .collect()
    }

    /// A VM's `config` from `list --json`.
    pub fn config(&self, vm: &str) -> Value {
        self.list()
            .get(vm)
            .unwrap_or_else(|| panic!("{vm} not listed"))["config"]
            .clone()
    }
}

impl Drop for Vtmemd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `u64::MAX`, how the API reports an unlimited quota.
pub const UNLIMITED: u64 = u64::MAX;
