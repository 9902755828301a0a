// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A control-socket connection: one request a line, one answer a line.
//! `vtmemctl`, the test kit and the guest simulator all use this one.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::request::{parse_answer, AnswerError, Request};

/// Why a request got no result.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing accepts connections at the path.
    #[error("cannot reach vtmemd at {}: {source}", path.display())]
    Unreachable {
        /// The control socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The connection broke, timed out or carried something that is not an
    /// answer.
    #[error("connection to vtmemd at {} failed: {msg}", path.display())]
    Connection {
        /// The control socket.
        path: PathBuf,
        /// What happened.
        msg: String,
    },
    /// vtmemd refused the request (its message).
    #[error("{0}")]
    Refused(String),
    /// The result does not have the shape the request's result has.
    #[error("unexpected '{command}' result from vtmemd: {msg}")]
    UnexpectedResult {
        /// The request's command.
        command: &'static str,
        /// What did not fit.
        msg: String,
    },
}

/// A connection to `vtmemd`'s control socket.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects; every later read and write waits at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Unreachable {
            path: path.to_path_buf(),
            source,
        })?;
        let lost = |e: io::Error| ClientError::Connection {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        stream.set_read_timeout(Some(timeout)).map_err(lost)?;
        stream.set_write_timeout(Some(timeout)).map_err(lost)?;
        let writer = stream.try_clone().map_err(lost)?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// The control socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lost(&self, msg: String) -> ClientError {
        ClientError::Connection {
            path: self.path.clone(),
            msg,
        }
    }

    /// Sends `request` and returns its result as JSON.
    pub fn call(&mut self, request: &Request) -> Result<Value, ClientError> {
        let line = format!("{}\n", request.to_line());
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
        parse_answer(&answer).map_err(|e| match e {
            AnswerError::Refused(msg) => ClientError::Refused(msg),
            AnswerError::Malformed(_) => self.lost(e.to_string()),
        })
    }

    /// Sends `request` and decodes its result as a `T`.
    pub fn call_as<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ClientError> {
        let value = self.call(request)?;
        serde_json::from_value(value).map_err(|e| ClientError::UnexpectedResult {
            command: request.command(),
            msg: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn talks_to_a_server() {
        let dir = std::env::temp_dir().join(format!("vtmem-api-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&path);
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
        let mut c = Client::connect(&path, Duration::from_secs(5)).unwrap();
        let show = |vm: &str| Request::Show {
            vm: vm.parse().unwrap(),
        };
        assert_eq!(
            c.call(&show("vm1")).unwrap(),
            serde_json::json!({"name": "vm1"})
        );
        let e = c.call(&show("vm9")).unwrap_err();
        assert!(
            matches!(&e, ClientError::Refused(m) if m == "no VM named 'vm9'"),
            "{e}"
        );
        let e = c.call(&Request::List {}).unwrap_err();
        assert!(matches!(e, ClientError::Connection { .. }), "{e}");
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unreachable_names_the_path() {
        let e = Client::connect(Path::new("/nonexistent/vtmemd.ctl"), Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }));
        assert!(e.to_string().contains("/nonexistent/vtmemd.ctl"), "{e}");
    }
}
