// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A control-socket connection: one JSON request a line, one answer a line
//! (`docs/control-api.md`).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::CtlError;
use crate::control::CONTROL_API_VERSION;

/// A connection to `vtmemd`'s control socket.
#[derive(Debug)]
pub struct ControlClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects; every later answer must arrive within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, CtlError> {
        let stream = UnixStream::connect(path).map_err(|source| CtlError::Unreachable {
            path: path.to_path_buf(),
            source,
        })?;
        let lost = |e: io::Error| CtlError::Connection {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        stream.set_read_timeout(Some(timeout)).map_err(lost)?;
        stream.set_write_timeout(Some(timeout)).map_err(lost)?;
        let writer = stream.try_clone().map_err(lost)?;
        Ok(ControlClient {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lost(&self, msg: String) -> CtlError {
        CtlError::Connection {
            path: self.path.clone(),
            msg,
        }
    }

    /// Sends a command and returns its `result`; an `{"ok":false}` answer
    /// becomes [`CtlError::Daemon`] with the daemon's message.
    pub fn call(&mut self, command: &str, args: Value) -> Result<Value, CtlError> {
        let request = json!({"version": CONTROL_API_VERSION, "command": command, "args": args});
        let line = format!("{request}\n");
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| self.lost(format!("sending the request: {e}")))?;
        let mut answer = String::new();
        match self.reader.read_line(&mut answer) {
            Ok(0) => return Err(self.lost("vtmemd closed the connection".to_string())),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(self.lost("no answer from vtmemd in time".to_string()))
            }
            Err(e) => return Err(self.lost(format!("reading the answer: {e}"))),
        }
        parse_response(&answer).map_err(|e| match e {
            ResponseError::Daemon(msg) => CtlError::Daemon(msg),
            ResponseError::Malformed(msg) => self.lost(msg),
        })
    }

    /// [`ControlClient::call`], then decodes the result.
    pub fn call_as<T: DeserializeOwned>(
        &mut self,
        command: &str,
        args: Value,
    ) -> Result<T, CtlError> {
        let value = self.call(command, args)?;
        decode(command, value)
    }
}

/// Decodes a command's result into a typed view.
pub fn decode<T: DeserializeOwned>(command: &str, value: Value) -> Result<T, CtlError> {
    serde_json::from_value(value)
        .map_err(|e| CtlError::Daemon(format!("unexpected '{command}' result from vtmemd: {e}")))
}

/// Why an answer line is not a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseError {
    /// `{"ok":false,"error":...}`: the daemon refused the command.
    Daemon(String),
    /// Not a control API answer at all.
    Malformed(String),
}

/// Parses one answer line.
pub fn parse_response(line: &str) -> Result<Value, ResponseError> {
    let bad =
        |what: &str| ResponseError::Malformed(format!("malformed answer from vtmemd: {what}"));
    let value: Value = serde_json::from_str(line.trim()).map_err(|e| bad(&e.to_string()))?;
    let Value::Object(mut map) = value else {
        return Err(bad("not a JSON object"));
    };
    match map.get("ok") {
        Some(Value::Bool(true)) => Ok(map.remove("result").unwrap_or(Value::Null)),
        Some(Value::Bool(false)) => {
            let msg = match map.remove("error") {
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => "vtmemd reported an error without a message".to_string(),
            };
            // One line, whatever the daemon sent.
            Err(ResponseError::Daemon(
                msg.split_whitespace().collect::<Vec<_>>().join(" "),
            ))
        }
        _ => Err(bad("no boolean \"ok\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn responses() {
        assert_eq!(
            parse_response("{\"ok\":true,\"result\":[1]}\n"),
            Ok(json!([1]))
        );
        assert_eq!(parse_response("{\"ok\":true}"), Ok(Value::Null));
        assert_eq!(
            parse_response("{\"ok\":false,\"error\":\"no VM named 'x'\"}"),
            Err(ResponseError::Daemon("no VM named 'x'".into()))
        );
        assert_eq!(
            parse_response("{\"ok\":false,\"error\":\"two\\nlines\"}"),
            Err(ResponseError::Daemon("two lines".into()))
        );
        assert!(matches!(
            parse_response("hello"),
            Err(ResponseError::Malformed(_))
        ));
        assert!(matches!(
            parse_response("[true]"),
            Err(ResponseError::Malformed(_))
        ));
        assert!(matches!(
            parse_response("{\"ok\":1}"),
            Err(ResponseError::Malformed(_))
        ));
    }

    fn temp_socket(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vtmemctl-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn talks_to_a_server() {
        let path = temp_socket("client");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut w = stream;
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let req: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(req["version"], 1);
            assert_eq!(req["command"], "show");
            assert_eq!(req["args"]["vm"], "vm1");
            writeln!(w, "{{\"ok\":true,\"result\":{{\"name\":\"vm1\"}}}}").unwrap();
            line.clear();
            reader.read_line(&mut line).unwrap();
            writeln!(w, "{{\"ok\":false,\"error\":\"no VM named 'vm9'\"}}").unwrap();
            line.clear();
            reader.read_line(&mut line).unwrap();
            // Then hang up without answering.
        });
        let mut c = ControlClient::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(
            c.call("show", json!({"vm": "vm1"})).unwrap(),
            json!({"name": "vm1"})
        );
        let e = c.call("show", json!({"vm": "vm9"})).unwrap_err();
        assert_eq!(e.to_string(), "no VM named 'vm9'");
        assert_eq!(e.exit_code(), 1);
        let e = c.call("list", json!({})).unwrap_err();
        assert_eq!(e.exit_code(), 3, "{e}");
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn unreachable() {
        let path = temp_socket("absent");
        let e = ControlClient::connect(&path, Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.exit_code(), 3);
        let msg = e.to_string();
        assert!(msg.contains("cannot connect to vtmemd"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn times_out() {
        let path = temp_socket("silent");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(500));
            drop(stream);
        });
        let mut c = ControlClient::connect(&path, Duration::from_millis(100)).unwrap();
        let e = c.call("status", json!({})).unwrap_err();
        assert!(e.to_string().contains("in time"), "{e}");
        assert_eq!(e.exit_code(), 3);
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
