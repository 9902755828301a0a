// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared helpers of the `daemon_*` integration tests: run the real
//! `vtmemd` binary in a private socket directory and talk to its control
//! socket.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The binary under test.
pub const VTMEMD: &str = env!("CARGO_BIN_EXE_vtmemd");

#[path = "../common/tempdir.rs"]
mod tempdir;
pub use tempdir::TempDir;

/// Runs `vtmemd` with `args` to completion (for flags that exit at once).
pub fn run(args: &[&str]) -> Output {
    let mut child = Command::new(VTMEMD)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vtmemd {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running `vtmemd`, killed on drop.
pub struct Vtmemd {
    pub child: Child,
    pub dir: TempDir,
    pub stderr: Arc<Mutex<String>>,
    pub ready_line: String,
}

impl Vtmemd {
    /// Starts `vtmemd --socket-dir <tmp> <args>` and waits for its
    /// readiness line.
    pub fn start(args: &[&str]) -> Self {
        let dir = TempDir::new();
        Self::start_in(dir, args)
    }

    /// Same, in a given directory.
    pub fn start_in(dir: TempDir, args: &[&str]) -> Self {
        let mut child = Command::new(VTMEMD)
            .arg("--socket-dir")
            .arg(dir.path())
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let err_buf = stderr.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                err_buf
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let ready_line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "vtmemd did not become ready; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        assert!(ready_line.starts_with("vtmemd ready"), "{ready_line}");
        Vtmemd {
            child,
            dir,
            stderr,
            ready_line,
        }
    }

    pub fn socket(&self, vm: &str) -> PathBuf {
        self.dir.path().join(format!("{vm}.sock"))
    }

    pub fn control_path(&self) -> PathBuf {
        self.dir.path().join("vtmemd.ctl")
    }

    pub fn control(&self) -> Control {
        Control::connect(&self.control_path())
    }

    /// Sends `sig` (e.g. "TERM") and waits for the exit.
    pub fn signal_and_wait(&mut self, sig: &str) -> ExitStatus {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "vtmemd did not exit on SIG{sig}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Vtmemd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A control-socket connection.
pub struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    pub fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let writer = s.try_clone().unwrap();
        Control {
            reader: BufReader::new(s),
            writer,
        }
    }

    /// Sends one raw line, returns the raw answer line.
    pub fn raw(&mut self, line: &str) -> String {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut answer = String::new();
        self.reader.read_line(&mut answer).unwrap();
        assert!(answer.ends_with('\n'), "answer {answer:?} is not one line");
        answer.trim_end().to_string()
    }

    /// Sends a command, returns the whole answer.
    pub fn request(&mut self, command: &str, args: Value) -> Value {
        let line = json!({"version": 1, "command": command, "args": args}).to_string();
        serde_json::from_str(&self.raw(&line)).unwrap()
    }

    /// Sends a command that must succeed; returns its result.
    pub fn ok(&mut self, command: &str, args: Value) -> Value {
        let r = self.request(command, args);
        assert_eq!(r["ok"], json!(true), "{command}: {r}");
        r["result"].clone()
    }

    /// Sends a command that must fail; returns its error text.
    pub fn err(&mut self, command: &str, args: Value) -> String {
        let r = self.request(command, args);
        assert_eq!(r["ok"], json!(false), "{command}: {r}");
        let e = r["error"].as_str().unwrap().to_string();
        assert!(!e.is_empty() && !e.contains('\n'));
        e
    }
}

/// Waits until `cond` holds (polling), or panics with `what`.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The VM named `name` in a `list` result.
pub fn find_vm<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == json!(name))
}
