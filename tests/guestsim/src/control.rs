// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small client of vtmemd's control socket: newline-delimited JSON,
//! `{"version":1,"command":...}` in, `{"ok":true,"result":...}` or
//! `{"ok":false,"error":...}` out.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::{Error, Result};

/// One connection to the control socket.
#[derive(Debug)]
pub struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    /// Connects to the control socket at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        let s = UnixStream::connect(path.as_ref())
            .map_err(|e| Error::Control(format!("connect {}: {e}", path.as_ref().display())))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(Error::Io)?;
        let writer = s.try_clone().map_err(Error::Io)?;
        Ok(Control {
            reader: BufReader::new(s),
            writer,
        })
    }

    /// Sends `command` with the fields of `args` (an object or null) and
    /// returns the whole reply.
    pub fn request(&mut self, command: &str, args: Value) -> Result<Value> {
        let mut msg = Map::new();
        msg.insert("version".into(), json!(1));
        msg.insert("command".into(), json!(command));
        msg.insert("args".into(), args);
        let mut line = serde_json::to_string(&Value::Object(msg))
            .map_err(|e| Error::Control(e.to_string()))?;
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| Error::Control(format!("send: {e}")))?;
        let mut reply = String::new();
        let n = self
            .reader
            .read_line(&mut reply)
            .map_err(|e| Error::Control(format!("receive: {e}")))?;
        if n == 0 {
            return Err(Error::Control("connection closed".into()));
        }
        serde_json::from_str(&reply)
            .map_err(|e| Error::Control(format!("bad reply {reply:?}: {e}")))
    }

    /// Sends `command` and returns its `result`, or the daemon's error.
    pub fn call(&mut self, command: &str, args: Value) -> Result<Value> {
        let r = self.request(command, args)?;
        if r.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(r.get("result").cloned().unwrap_or(Value::Null))
        } else {
            Err(Error::Control(format!(
                "{command} failed: {}",
                r.get("error").cloned().unwrap_or(r.clone())
            )))
        }
    }

    /// `status`: the store's statistics.
    pub fn status(&mut self) -> Result<Value> {
        self.call("status", Value::Null)
    }

    /// The statistics of one client (VM) from `status`.
    pub fn client(&mut self, name: &str) -> Result<Value> {
        let st = self.status()?;
        st.get("clients")
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.get("name").and_then(Value::as_str) == Some(name))
            })
            .cloned()
            .ok_or_else(|| Error::Control(format!("no client {name} in status")))
    }

    /// `add-vm` with `name` and further fields of `args` (an object or
    /// null): `persistent_quota`, `ephemeral_quota`, `weight`,
    /// `dedup_group`, `authorized_uuids`.
    pub fn add_vm(&mut self, name: &str, args: Value) -> Result<Value> {
        let mut m = match args {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        m.insert("name".into(), json!(name));
        self.call("add-vm", Value::Object(m))
    }

    /// `remove-vm`.
    pub fn remove_vm(&mut self, vm: &str) -> Result<()> {
        self.call("remove-vm", json!({ "vm": vm })).map(drop)
    }

    /// `set-quota` in bytes (`None` leaves that quota alone).
    pub fn set_quota(
        &mut self,
        vm: &str,
        persistent: Option<u64>,
        ephemeral: Option<u64>,
    ) -> Result<()> {
        let mut m = Map::new();
        m.insert("vm".into(), json!(vm));
        if let Some(p) = persistent {
            m.insert("persistent".into(), json!(p));
        }
        if let Some(e) = ephemeral {
            m.insert("ephemeral".into(), json!(e));
        }
        self.call("set-quota", Value::Object(m)).map(drop)
    }

    /// `set-limit`: the host memory limit in bytes.
    pub fn set_limit(&mut self, bytes: u64) -> Result<()> {
        self.call("set-limit", json!({ "bytes": bytes })).map(drop)
    }

    /// `freeze`: puts of this VM are refused.
    pub fn freeze(&mut self, vm: &str) -> Result<()> {
        self.call("freeze", json!({ "vm": vm })).map(drop)
    }

    /// `thaw`.
    pub fn thaw(&mut self, vm: &str) -> Result<()> {
        self.call("thaw", json!({ "vm": vm })).map(drop)
    }

    /// `show`: one VM's details.
    pub fn show(&mut self, vm: &str) -> Result<Value> {
        self.call("show", json!({ "vm": vm }))
    }

    /// `list`: every VM.
    pub fn list(&mut self) -> Result<Value> {
        self.call("list", Value::Null)
    }

    /// `host_used` from `status`.
    pub fn host_used(&mut self) -> Result<u64> {
        let st = self.status()?;
        u64_field(&st, "host_used")
    }
}

/// Reads an unsigned integer field of a JSON object.
pub fn u64_field(v: &Value, key: &str) -> Result<u64> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::Control(format!("no integer {key:?} in {v}")))
}
