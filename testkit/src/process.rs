// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A binary run to its end, with a deadline, and what `vtmemctl` printed.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// Runs `cmd` (standard input closed, outputs collected) and waits for it
/// to exit; kills it and panics if it has not after `deadline`.
pub fn run(cmd: &mut Command, deadline: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    // Both pipes are read while the child runs, so that a full pipe never
    // stops it; the readers end when it does.
    let collect = |mut pipe: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
        rx
    };
    let out = collect(Box::new(child.stdout.take().expect("piped stdout")));
    let err = collect(Box::new(child.stderr.take().expect("piped stderr")));
    // The stdout reader finishes when the child (and anything it left
    // holding the pipe) is gone: that is the event waited for.
    let stdout = match out.recv_timeout(deadline) {
        Ok(b) => b,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {deadline:?}");
        }
    };
    let stderr = err.recv_timeout(deadline).unwrap_or_default();
    let status = child.wait().expect("waiting for the child");
    Output {
        status,
        stdout,
        stderr,
    }
}

/// What a `vtmemctl` run did.
#[derive(Debug)]
pub struct CtlOutput {
    /// Its exit code (-1 if a signal ended it).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for CtlOutput {
    fn from(o: Output) -> Self {
        CtlOutput {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8(o.stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8(o.stderr).expect("stderr is UTF-8"),
        }
    }
}

impl CtlOutput {
    /// Asserts success with nothing on stderr; returns stdout.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_to_the_end() {
        let o = run(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(20),
        );
        let o = CtlOutput::from(o);
        assert_eq!((o.code, &*o.stdout, &*o.stderr), (3, "out\n", "err\n"));
    }

    #[test]
    #[should_panic(expected = "did not finish within")]
    fn a_hang_fails() {
        run(
            Command::new("sh").args(["-c", "sleep 20"]),
            Duration::from_millis(100),
        );
    }
}
