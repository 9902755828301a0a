// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket: newline-delimited JSON, one request a line, one
//! response a line. `docs/control-api.md` is the specification.
//!
//! ```text
//! -> {"version":1,"command":"set-quota","args":{"vm":"vm1","persistent":536870912,"ephemeral":"1G"}}
//! <- {"ok":true,"result":null}
//! -> {"version":1,"command":"show","args":{"vm":"nope"}}
//! <- {"ok":false,"error":"no VM named 'nope'"}
//! ```

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, error, warn};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::accept::accept_until_stopped;
use crate::config::{
    parse_quota, parse_size, parse_uuid, validate_dedup_group, validate_weight, SizeValue, VmConfig,
};
use crate::daemon::Daemon;
use vtmem_store::ClientConfig;

/// The control API version this daemon speaks.
pub const CONTROL_API_VERSION: u64 = 1;
/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Commands, in the order `docs/control-api.md` lists them.
pub const COMMANDS: &[&str] = &[
    "status",
    "list",
    "show",
    "add-vm",
    "remove-vm",
    "set-quota",
    "set-weight",
    "set-limit",
    "set-dedup-group",
    "auth",
    "deauth",
    "freeze",
    "thaw",
    "flush",
];

/// Commands whose success rewrites the state file (`--state-file`).
pub const CHANGES_STATE: &[&str] = &[
    "add-vm",
    "remove-vm",
    "set-quota",
    "set-weight",
    "set-limit",
    "set-dedup-group",
    "auth",
    "deauth",
    "freeze",
    "thaw",
];

/// A control request: `{"version":1,"command":"...","args":{...}}`.
///
/// For convenience the arguments may instead be given as top-level fields
/// next to `version` and `command` (`{"version":1,"command":"show","vm":"a"}`);
/// a request must not mix both forms.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlRequest {
    /// API version; must be [`CONTROL_API_VERSION`].
    pub version: u64,
    /// The command.
    pub command: String,
    /// Its arguments (an object; `{}` when there are none).
    pub args: Value,
}

impl ControlRequest {
    /// Parses a request line.
    pub fn parse(line: &str) -> Result<Self, String> {
        let value: Value =
            serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))?;
        let Value::Object(mut map) = value else {
            return Err("malformed request: not a JSON object".to_string());
        };
        let version = match map.remove("version") {
            Some(v) => v
                .as_u64()
                .ok_or_else(|| format!("malformed request: version {v} is not a number"))?,
            None => return Err("malformed request: no \"version\"".to_string()),
        };
        let command = match map.remove("command") {
            Some(Value::String(c)) => c,
            Some(other) => {
                return Err(format!(
                    "malformed request: command {other} is not a string"
                ))
            }
            None => return Err("malformed request: no \"command\"".to_string()),
        };
        let args = match map.remove("args") {
            Some(_) if !map.is_empty() => {
                let extra: Vec<&str> = map.keys().map(String::as_str).collect();
                return Err(format!(
                    "malformed request: unknown fields next to \"args\": {}",
                    extra.join(", ")
                ));
            }
            Some(Value::Null) => json!({}),
            Some(a @ Value::Object(_)) => a,
            Some(other) => return Err(format!("malformed request: args {other} is not an object")),
            None => Value::Object(map),
        };
        Ok(ControlRequest {
            version,
            command,
            args,
        })
    }
}

/// Handles one request line; returns the response line (without newline).
pub fn handle_line(daemon: &Daemon, line: &str) -> String {
    let response = match ControlRequest::parse(line) {
        Err(e) => error_value(e),
        Ok(req) if req.version != CONTROL_API_VERSION => error_value(format!(
            "unsupported control API version {} (this vtmemd speaks {CONTROL_API_VERSION})",
            req.version
        )),
        Ok(req) => match dispatch(daemon, &req.command, req.args) {
            Ok(result) if CHANGES_STATE.contains(&req.command.as_str()) => {
                match daemon.save_state() {
                    Ok(()) => json!({"ok": true, "result": result}),
                    Err(e) => {
                        error!("{e}");
                        error_value(format!("{} done, but not saved: {e}", req.command))
                    }
                }
            }
            Ok(result) => json!({"ok": true, "result": result}),
            Err(e) => error_value(e),
        },
    };
    response.to_string()
}

fn error_value(msg: String) -> Value {
    // One line, always.
    json!({"ok": false, "error": msg.replace('\n', " ")})
}

fn args<T: DeserializeOwned>(command: &str, args: Value) -> Result<T, String> {
    let args = if args.is_null() { json!({}) } else { args };
    serde_json::from_value(args).map_err(|e| format!("{command}: bad arguments: {e}"))
}

fn size_arg(v: &SizeValue, quota: bool) -> Result<u64, String> {
    match v {
        SizeValue::Bytes(b) => Ok(*b),
        SizeValue::Text(s) if quota => parse_quota(s).map_err(|e| e.to_string()),
        SizeValue::Text(s) => parse_size(s).map_err(|e| e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmArg {
    vm: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetQuotaArgs {
    vm: String,
    persistent: Option<SizeValue>,
    ephemeral: Option<SizeValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetWeightArgs {
    vm: String,
    weight: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetLimitArgs {
    bytes: SizeValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlushArgs {
    vm: String,
    #[serde(default)]
    ephemeral_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddVmArgs {
    name: String,
    persistent_quota: Option<SizeValue>,
    ephemeral_quota: Option<SizeValue>,
    weight: Option<u64>,
    dedup_group: Option<String>,
    #[serde(default)]
    authorized_uuids: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DedupGroupArgs {
    vm: String,
    group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UuidArgs {
    vm: String,
    uuid: String,
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| format!("cannot encode the result: {e}"))
}

/// Runs one command.
pub fn dispatch(daemon: &Daemon, command: &str, raw: Value) -> Result<Value, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    match command {
        "status" => {
            let _: NoArgs = args(command, raw)?;
            let mut stats = to_value(&daemon.store().stats())?;
            if let Value::Object(map) = &mut stats {
                let up = daemon.uptime().as_secs_f64();
                map.insert(
                    "uptime_seconds".into(),
                    json!((up * 1000.0).round() / 1000.0),
                );
            }
            Ok(stats)
        }
        "list" => {
            let _: NoArgs = args(command, raw)?;
            let vms: Vec<_> = daemon.vms().iter().map(|vm| vm.details()).collect();
            to_value(&vms)
        }
        "show" => {
            let a: VmArg = args(command, raw)?;
            let vm = daemon.vm(&a.vm).map_err(|e| err(&e))?;
            to_value(&vm.details())
        }
        "add-vm" => {
            let a: AddVmArgs = args(command, raw)?;
            let mut client = ClientConfig::default();
            if let Some(q) = &a.persistent_quota {
                client.persistent_quota = size_arg(q, true)?;
            }
            if let Some(q) = &a.ephemeral_quota {
                client.ephemeral_quota = size_arg(q, true)?;
            }
            if let Some(w) = a.weight {
                client.weight = validate_weight(w).map_err(|e| err(&e))?;
            }
            if let Some(g) = a.dedup_group.filter(|g| !g.is_empty()) {
                validate_dedup_group(&g).map_err(|e| err(&e))?;
                client.dedup_group = Some(g);
            }
            for u in &a.authorized_uuids {
                let uuid = parse_uuid(u).map_err(|e| err(&e))?;
                if !client.authorized_uuids.contains(&uuid) {
                    client.authorized_uuids.push(uuid);
                }
            }
            let vm = VmConfig {
                name: a.name,
                client,
            };
            let entry = daemon.add_vm(&vm).map_err(|e| err(&e))?;
            to_value(&entry.info())
        }
        "remove-vm" => {
            let a: VmArg = args(command, raw)?;
            daemon.remove_vm(&a.vm).map_err(|e| err(&e))?;
            Ok(Value::Null)
        }
        "set-quota" => {
            let a: SetQuotaArgs = args(command, raw)?;
            let vm = daemon.vm(&a.vm).map_err(|e| err(&e))?;
            if a.persistent.is_none() && a.ephemeral.is_none() {
                return Err("set-quota: give persistent, ephemeral or both".to_string());
            }
            let current = vm.client().config();
            let persistent = match &a.persistent {
                Some(v) => size_arg(v, true)?,
                None => current.persistent_quota,
            };
            let ephemeral = match &a.ephemeral {
                Some(v) => size_arg(v, true)?,
                None => current.ephemeral_quota,
            };
            vm.client().set_quota(persistent, ephemeral);
            Ok(Value::Null)
        }
        "set-weight" => {
            let a: SetWeightArgs = args(command, raw)?;
            let vm = daemon.vm(&a.vm).map_err(|e| err(&e))?;
            let w = validate_weight(a.weight).map_err(|e| err(&e))?;
            vm.client().set_weight(w).map_err(|e| err(&e))?;
            Ok(Value::Null)
        }
        "set-limit" => {
            let a: SetLimitArgs = args(command, raw)?;
            let bytes = size_arg(&a.bytes, false)?;
            if bytes == 0 {
                return Err("set-limit: the host limit must be more than 0 bytes".to_string());
            }
            daemon.store().set_host_limit(bytes);
            Ok(Value::Null)
        }
        "set-dedup-group" => {
            let a: DedupGroupArgs = args(command, raw)?;
            let vm = daemon.vm(&a.vm).map_err(|e| err(&e))?;
            let group = a.group.filter(|g| !g.is_empty());
            if let Some(g) = &group {
                validate_dedup_group(g).map_err(|e| err(&e))?;
            }
            vm.client().set_dedup_group(group).map_err(|e| err(&e))?;
            Ok(Value::Null)
        }
        "auth" | "deauth" => {
            let a: UuidArgs = args(command, raw)?;
            let vm = daemon.vm(&a.vm).map_err(|e| err(&e))?;
            let uuid = parse_uuid(&a.uuid).map_err(|e| err(&e))?;
            if command == "auth" {
                vm.client().authorize(uuid);
            } else {
                vm.client().deauthorize(uuid);
            }
            Ok(Value::Null)
        }
        "freeze" | "thaw" => {
            let a: VmArg = args(command, raw)?;
            let vm = daemon.vm(&a.vm).map_err(|e| err(&e))?;
            if command == "freeze" {
                vm.client().freeze();
            } else {
                vm.client().thaw();
            }
            Ok(Value::Null)
        }
        "flush" => {
            let a: FlushArgs = args(command, raw)?;
            let vm = daemon.vm(&a.vm).map_err(|e| err(&e))?;
            vm.client().flush_all(a.ephemeral_only);
            Ok(Value::Null)
        }
        other => Err(format!(
            "unknown command '{other}' (known: {})",
            COMMANDS.join(", ")
        )),
    }
}

/// Serves one connection until it closes.
fn serve_connection(daemon: Arc<Daemon>, stream: UnixStream) {
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
            let r = error_value(format!("request line longer than {MAX_LINE} bytes")).to_string();
            let _ = writeln!(writer, "{r}");
            return;
        } else {
            match std::str::from_utf8(&line) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => handle_line(&daemon, text.trim()),
                Err(_) => error_value("request is not UTF-8".to_string()).to_string(),
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

        let stop_evt = EventFd::new(EFD_NONBLOCK)?;
        let thread_stop = stop_evt.try_clone()?;
        let thread = thread::Builder::new()
            .name("vtmem-control".to_string())
            .spawn(move || accept_loop(daemon, listener, thread_stop))?;
        debug!("control socket listening on {}", path.display());
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop_evt,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting connections and removes the socket.
    pub fn stop(&mut self) {
        let _ = self.stop_evt.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
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
    accept_until_stopped(
        "control",
        &listener,
        &stop,
        |l| l.accept(),
        |(stream, _)| {
            let _ = stream.set_nonblocking(false);
            let d = daemon.clone();
            if let Err(e) = thread::Builder::new()
                .name("vtmem-ctl-conn".to_string())
                .spawn(move || serve_connection(d, stream))
            {
                warn!("control: cannot start a connection thread: {e}");
            }
        },
    );
}
