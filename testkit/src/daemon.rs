// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon fixture: a real `vtmemd` in a private directory.

use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use serde_json::Value;
use tempfile::TempDir;
use vtmem_api::{
    Client, ClientError, ClientStats, Request, StatusReport, VmDetails, DEFAULT_CONTROL_SOCKET_NAME,
};

use crate::control::RawControl;
use crate::DEADLINE;

/// How `vtmemd` starts the line it prints on standard output once every
/// socket accepts connections.
pub const READY_PREFIX: &str = "vtmemd ready";

/// Why a `vtmemd` did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The temporary directory could not be made.
    #[error("creating the socket directory: {0}")]
    Dir(#[source] io::Error),
    /// The binary could not be run.
    #[error("starting {}: {source}", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// It exited (or closed its output) before it was ready.
    #[error("vtmemd exited during start-up ({status}); its output:\n{log}")]
    Exited {
        /// How it ended, as far as known.
        status: String,
        /// What it printed.
        log: String,
    },
    /// It was not ready by the deadline (it has been killed).
    #[error("vtmemd not ready within {deadline:?}; its output:\n{log}")]
    NotReady {
        /// The deadline.
        deadline: Duration,
        /// What it printed.
        log: String,
    },
    /// It said it was ready, but its control socket refused a connection.
    #[error(
        "vtmemd is ready but its control socket does not accept: {source}; its output:\n{log}"
    )]
    Control {
        /// Why.
        source: io::Error,
        /// What it printed.
        log: String,
    },
}

/// A running `vtmemd` with `--socket-dir` a private temporary directory;
/// killed, and the directory removed, on drop.
#[derive(Debug)]
pub struct Vtmemd {
    binary: PathBuf,
    dir: TempDir,
    child: Mutex<Option<Child>>,
    log: Arc<Mutex<String>>,
    ready_line: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vtmemd {
    /// Starts `binary --socket-dir <new temporary directory> args...` and
    /// waits until it is ready; panics if it does not start.
    pub fn start<S: AsRef<OsStr>>(binary: impl AsRef<Path>, args: &[S]) -> Vtmemd {
        Self::try_start(binary, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Same, in `dir` (which may hold a configuration or state file).
    pub fn start_in<S: AsRef<OsStr>>(binary: impl AsRef<Path>, dir: TempDir, args: &[S]) -> Vtmemd {
        Self::try_start_in(binary, dir, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts it in a new temporary directory, or says why not.
    pub fn try_start<S: AsRef<OsStr>>(
        binary: impl AsRef<Path>,
        args: &[S],
    ) -> Result<Vtmemd, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("vtmemd-")
            .tempdir()
            .map_err(StartError::Dir)?;
        Self::try_start_in(binary, dir, args)
    }

    /// Starts it in `dir`, or says why not.
    pub fn try_start_in<S: AsRef<OsStr>>(
        binary: impl AsRef<Path>,
        dir: TempDir,
        args: &[S],
    ) -> Result<Vtmemd, StartError> {
        let mut d = Vtmemd {
            binary: binary.as_ref().to_path_buf(),
            dir,
            child: Mutex::new(None),
            log: Arc::new(Mutex::new(String::new())),
            ready_line: String::new(),
        };
        d.spawn(args)?;
        Ok(d)
    }

    fn spawn<S: AsRef<OsStr>>(&mut self, args: &[S]) -> Result<(), StartError> {
        let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--socket-dir")
            .arg(self.dir.path())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = cmd.spawn().map_err(|source| StartError::Spawn {
            binary: self.binary.clone(),
            source,
        })?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                push_line(&log, &line);
                if line.starts_with(READY_PREFIX) {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(line);
                    }
                }
            }
            // Dropping the sender tells the starter that no readiness line
            // will come.
        });
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.by_ref().read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => push_line(&log, String::from_utf8_lossy(&buf).trim_end()),
                }
            }
        });
        *lock(&self.child) = Some(child);

        match ready_rx.recv_timeout(DEADLINE) {
            Ok(line) => self.ready_line = line,
            Err(RecvTimeoutError::Disconnected) => {
                let status = self
                    .wait_exit(DEADLINE)
                    .map_or_else(|| "still running".to_string(), |s| s.to_string());
                self.kill();
                return Err(StartError::Exited {
                    status,
                    log: self.log(),
                });
            }
            Err(RecvTimeoutError::Timeout) => {
                self.kill();
                return Err(StartError::NotReady {
                    deadline: DEADLINE,
                    log: self.log(),
                });
            }
        }
        if let Err(source) = std::os::unix::net::UnixStream::connect(self.control_path()) {
            self.kill();
            return Err(StartError::Control {
                source,
                log: self.log(),
            });
        }
        Ok(())
    }

    /// The socket directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The vhost-user socket of VM `name`.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    /// The control socket.
    pub fn control_path(&self) -> PathBuf {
        self.dir.path().join(DEFAULT_CONTROL_SOCKET_NAME)
    }

    /// The line `vtmemd` printed when it became ready.
    pub fn ready_line(&self) -> &str {
        &self.ready_line
    }

    /// A new control connection, or why there is none.
    pub fn try_control(&self) -> Result<Client, ClientError> {
        Client::connect(&self.control_path(), DEADLINE)
    }

    /// A new control connection (panics if there is none).
    pub fn control(&self) -> Client {
        self.try_control()
            .unwrap_or_else(|e| panic!("{e}; vtmemd's output:\n{}", self.log()))
    }

    /// Sends one request that must succeed; returns its result.
    pub fn call(&self, request: &Request) -> Value {
        self.control()
            .call(request)
            .unwrap_or_else(|e| panic!("{}: {e}", request.command()))
    }

    /// `status`.
    pub fn status(&self) -> StatusReport {
        self.control()
            .call_as(&Request::Status {})
            .unwrap_or_else(|e| panic!("status: {e}"))
    }

    /// `show`.
    pub fn show(&self, vm: &str) -> VmDetails {
        let vm = vm.parse().unwrap_or_else(|e| panic!("{vm}: {e}"));
        self.control()
            .call_as(&Request::Show { vm })
            .unwrap_or_else(|e| panic!("show: {e}"))
    }

    /// The store's statistics of the client of VM `name`, from `status`.
    pub fn client_stats(&self, name: &str) -> ClientStats {
        let status = self.status();
        status
            .store
            .clients
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no client {name} in status"))
    }

    /// A connection that sends whole lines.
    pub fn raw(&self) -> RawControl {
        RawControl::connect(&self.control_path())
    }

    /// Everything `vtmemd` wrote, standard output and error, since the
    /// first start.
    pub fn log(&self) -> String {
        lock(&self.log).clone()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    /// How it ended, if it has.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        lock(&self.child)
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether it still runs.
    pub fn is_alive(&self) -> bool {
        match lock(&self.child).as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&self) {
        if let Some(mut c) = lock(&self.child).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit; panics if it does not come
    /// by the deadline.
    pub fn stop(&self) -> ExitStatus {
        self.stop_by(Signal::TERM)
    }

    /// Sends `signal` and waits for the exit; panics if it does not come
    /// by the deadline.
    pub fn stop_by(&self, signal: Signal) -> ExitStatus {
        let pid = self.pid().expect("vtmemd is not running");
        let pid = Pid::from_raw(i32::try_from(pid).expect("a pid")).expect("a pid");
        kill_process(pid, signal).unwrap_or_else(|e| panic!("signalling vtmemd: {e}"));
        match self.wait_exit(DEADLINE) {
            Some(status) => status,
            None => {
                self.kill();
                panic!(
                    "vtmemd did not exit on {signal:?} within {DEADLINE:?}; its output:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Waits up to `limit` for the process to exit.
    fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills it if it still runs, removes the sockets it left, and starts
    /// it again with `args` in the same directory (what the store held is
    /// lost, unless it runs with a `--state-dir`).
    pub fn restart<S: AsRef<OsStr>>(&mut self, args: &[S]) -> Result<(), StartError> {
        self.kill();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "sock") || p == self.control_path() {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        self.ready_line.clear();
        self.spawn(args)
    }
}

fn push_line(log: &Mutex<String>, line: &str) {
    let mut log = lock(log);
    log.push_str(line);
    log.push('\n');
}

impl Drop for Vtmemd {
    fn drop(&mut self) {
        self.kill();
    }
}
