// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket: newline-delimited JSON, one request a line, one
//! answer a line. The requests and results are [`vtmem_api`]'s types;
//! `docs/control-api.md` is the specification. This module only serves the
//! socket and runs each typed request against the [`Daemon`].

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, error, warn};
use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vtmem_api::request::{error_line, ok_line};
use vtmem_api::{Recovery, Request, StatusReport, MAX_LINE};

use crate::accept::{accept_until_stopped, Slot, Slots};
use crate::daemon::Daemon;

/// Control connections served at once. More idle ones are shut down to
/// make room (see [`Slots`]); a newcomer is refused only when every
/// connection has sent a request.
pub const MAX_CONNECTIONS: usize = 32;

/// Handles one request line; returns the answer line (without newline).
pub fn handle_line(daemon: &Daemon, line: &str) -> String {
    let request = match Request::parse_line(line) {
        Ok(r) => r,
        Err(e) => return error_line(&e),
    };
    let result = execute(daemon, &request);
    if result.is_ok() && matches!(request, Request::AddVm(_) | Request::RemoveVm { .. }) {
        // The service manager's status line counts the VMs.
        crate::systemd::status(&crate::systemd::serving(daemon));
    }
    match result {
        Ok(result) if request.changes_state() => match daemon.save_state() {
            Ok(()) => result,
            Err(e) => {
                error!("{e}");
                error_line(&format!("{} done, but not saved: {e}", request.command()))
            }
        },
        Ok(result) => result,
        Err(e) => error_line(&e),
    }
}

/// Runs a request; returns the answer line of its result, or the error.
pub fn execute(daemon: &Daemon, request: &Request) -> Result<String, String> {
    fn done<T: Serialize>(result: &T) -> Result<String, String> {
        Ok(ok_line(result))
    }
    let err = |e: &dyn std::fmt::Display| e.to_string();
    match request {
        Request::Status {} => {
            let up = daemon.uptime().as_secs_f64();
            let recovered = daemon.state_dir().map(|_| {
                let r = daemon.recovered();
                Recovery {
                    vms: r.vms,
                    pools: r.pools,
                    pages: r.pages,
                    bytes: r.bytes,
                    seconds: (r.time.as_secs_f64() * 1000.0).round() / 1000.0,
                }
            });
            done(&StatusReport {
                store: daemon.store().stats(),
                uptime_seconds: (up * 1000.0).round() / 1000.0,
                state_dir: daemon.state_dir().map(|d| d.path().display().to_string()),
                recovered,
            })
        }
        Request::List {} => {
            let vms: Vec<_> = daemon.vms().iter().map(|vm| vm.details()).collect();
            done(&vms)
        }
        Request::Show { vm } => done(&daemon.vm(vm).map_err(|e| err(&e))?.details()),
        Request::AddVm(spec) => done(&daemon.add_vm(spec).map_err(|e| err(&e))?.info()),
        Request::RemoveVm { vm } => {
            daemon.remove_vm(vm).map_err(|e| err(&e))?;
            done(&())
        }
        Request::SetQuota {
            vm,
            persistent,
            ephemeral,
        } => {
            let vm = daemon.vm(vm).map_err(|e| err(&e))?;
            if persistent.is_none() && ephemeral.is_none() {
                return Err("set-quota: give persistent, ephemeral or both".to_string());
            }
            let current = vm.client().config();
            vm.client().set_quota(
                persistent.map_or(current.persistent_quota, |q| q.bytes()),
                ephemeral.map_or(current.ephemeral_quota, |q| q.bytes()),
            );
            done(&())
        }
        Request::SetWeight { vm, weight } => {
            let vm = daemon.vm(vm).map_err(|e| err(&e))?;
            vm.client().set_weight(weight.get()).map_err(|e| err(&e))?;
            done(&())
        }
        Request::SetLimit { bytes } => {
            if bytes.bytes() == 0 {
                return Err("set-limit: the host limit must be more than 0 bytes".to_string());
            }
            daemon.store().set_host_limit(bytes.bytes());
            done(&())
        }
        Request::SetDedupGroup { vm, group } => {
            let vm = daemon.vm(vm).map_err(|e| err(&e))?;
            vm.client()
                .set_dedup_group(group.as_ref().map(|g| g.as_str().to_string()))
                .map_err(|e| err(&e))?;
            done(&())
        }
        Request::Auth { vm, uuid } => {
            daemon
                .vm(vm)
                .map_err(|e| err(&e))?
                .client()
                .authorize(*uuid);
            done(&())
        }
        Request::Deauth { vm, uuid } => {
            daemon
                .vm(vm)
                .map_err(|e| err(&e))?
                .client()
                .deauthorize(*uuid);
            done(&())
        }
        Request::Freeze { vm } => {
            daemon.vm(vm).map_err(|e| err(&e))?.client().freeze();
            done(&())
        }
        Request::Thaw { vm } => {
            daemon.vm(vm).map_err(|e| err(&e))?.client().thaw();
            done(&())
        }
        Request::Flush { vm, ephemeral_only } => {
            daemon
                .vm(vm)
                .map_err(|e| err(&e))?
                .client()
                .flush_all(*ephemeral_only);
            done(&())
        }
    }
}

fn serve_connection(daemon: Arc<Daemon>, stream: UnixStream, slot: Slot) {
    let _ = stream.set_read_timeout(None);
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            warn!("control: cannot clone a connection: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Read one line, but never more than MAX_LINE bytes of it.
        let n = match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                debug!("control: connection error: {e}");
                return;
            }
        };
        let response = if n > MAX_LINE && !line.ends_with(b"\n") {
            // Discard the rest of the line (bounded in size and time) so
            // that closing does not reset the connection before the client
            // has read the answer.
            let _ = reader
                .get_ref()
                .set_read_timeout(Some(Duration::from_secs(1)));
            let mut rest = Vec::new();
            let _ = (&mut reader)
                .take(16 * MAX_LINE as u64)
                .read_until(b'\n', &mut rest);
            let r = error_line(&format!("request line longer than {MAX_LINE} bytes"));
            let _ = writeln!(writer, "{r}");
            return;
        } else {
            match std::str::from_utf8(&line) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => {
                    slot.spoke();
                    handle_line(&daemon, text.trim())
                }
                Err(_) => error_line("request is not UTF-8"),
            }
        };
        if writeln!(writer, "{response}").is_err() {
            return;
        }
    }
}

/// The control socket server.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// Whether vtmemd made the socket file (else it was inherited).
    owns_socket: bool,
    stop_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds the control socket (mode 0600, or 0660 and group `group`) and
    /// starts serving it.
    pub fn start(daemon: Arc<Daemon>, path: &Path, group: Option<u32>) -> io::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by another process", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = crate::sys::bind_ready(path, true, |tmp| {
            let mode = if group.is_some() { 0o660 } else { 0o600 };
            if let Some(gid) = group {
                std::os::unix::fs::chown(tmp, None, Some(gid))?;
            }
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode))
        })?;
        Self::serve(daemon, listener, path, true)
    }

    /// Serves a control socket inherited from the service manager, bound
    /// at `path` (its owner and mode are the service manager's; its file
    /// is left in place at the end).
    pub fn start_inherited(
        daemon: Arc<Daemon>,
        listener: UnixListener,
        path: &Path,
    ) -> io::Result<Self> {
        Self::serve(daemon, listener, path, false)
    }

    fn serve(
        daemon: Arc<Daemon>,
        listener: UnixListener,
        path: &Path,
        owns_socket: bool,
    ) -> io::Result<Self> {
        let stop_evt = EventFd::new(EFD_NONBLOCK)?;
        let thread_stop = stop_evt.try_clone()?;
        let thread = thread::Builder::new()
            .name("vtmem-control".to_string())
            .spawn(move || accept_loop(daemon, listener, thread_stop))?;
        debug!("control socket listening on {}", path.display());
        Ok(ControlServer {
            path: path.to_path_buf(),
            owns_socket,
            stop_evt,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting connections and removes the socket file (if vtmemd
    /// made it).
    pub fn stop(&mut self) {
        let _ = self.stop_evt.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            if self.owns_socket {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(daemon: Arc<Daemon>, listener: UnixListener, stop: EventFd) {
    if let Err(e) = listener.set_nonblocking(true) {
        error!("control: {e}");
        return;
    }
    let slots = Slots::new(MAX_CONNECTIONS);
    accept_until_stopped(
        "control",
        &listener,
        &stop,
        |l| l.accept(),
        |(stream, _)| {
            let _ = stream.set_nonblocking(false);
            let slot = slots.admit(&stream);
            let Some(slot) = slot else {
                let mut s = stream;
                let _ = writeln!(
                    s,
                    "{}",
                    error_line(&format!(
                        "too many control connections ({MAX_CONNECTIONS} busy); try again"
                    ))
                );
                return;
            };
            let d = daemon.clone();
            if let Err(e) = thread::Builder::new()
                .name("vtmem-ctl-conn".to_string())
                .spawn(move || serve_connection(d, stream, slot))
            {
                warn!("control: cannot start a connection thread: {e}");
            }
        },
    );
}
