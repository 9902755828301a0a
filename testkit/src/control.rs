// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Whole control lines, for tests of the control wire format itself.
//! Everything else speaks through [`vtmem_api::Client`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::{json, Value};

use crate::DEADLINE;

/// A control-socket connection that sends lines as given.
#[derive(Debug)]
pub struct RawControl {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl RawControl {
    /// Connects to the control socket at `path` (panics if nothing
    /// listens there).
    pub fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()));
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.set_write_timeout(Some(DEADLINE)).unwrap();
        let writer = s.try_clone().unwrap();
        RawControl {
            reader: BufReader::new(s),
            writer,
        }
    }

    /// Sends `line` and a newline; returns the answer line, which must be
    /// exactly one line.
    pub fn line(&mut self, line: &str) -> String {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut answer = String::new();
        self.reader.read_line(&mut answer).unwrap();
        assert!(answer.ends_with('\n'), "answer {answer:?} is not one line");
        answer.trim_end().to_string()
    }

    /// Sends `{"version":1,"command":command,"args":args}` (any `args`,
    /// valid or not); returns the whole answer.
    pub fn request(&mut self, command: &str, args: Value) -> Value {
        let line = json!({"version": 1, "command": command, "args": args}).to_string();
        let answer = self.line(&line);
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?}: {e}"))
    }

    /// Sends a request that must succeed; returns its result.
    pub fn ok(&mut self, command: &str, args: Value) -> Value {
        let r = self.request(command, args);
        assert_eq!(r["ok"], json!(true), "{command}: {r}");
        r["result"].clone()
    }

    /// Sends a request that must fail; returns its error, which must be
    /// one non-empty line.
    pub fn err(&mut self, command: &str, args: Value) -> String {
        let r = self.request(command, args);
        assert_eq!(r["ok"], json!(false), "{command}: {r}");
        let e = r["error"].as_str().expect("an error message").to_string();
        assert!(!e.is_empty() && !e.contains('\n'), "{command}: {e:?}");
        e
    }
}
