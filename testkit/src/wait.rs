// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Deadlines: poll a condition until it holds, run a closure that must
//! finish in time.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Polls `cond` until it holds; panics naming `what` if it still does not
/// after `deadline`.
pub fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(1);
    while !cond() {
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Runs `f` in a thread of its own and returns what it returns; panics
/// naming `name` if it has not finished after `limit` (the thread is left
/// behind: a test that would hang fails instead). A panic in `f` is
/// passed on.
pub fn with_timeout<R, F>(limit: Duration, name: &str, f: F) -> R
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawning a thread");
    match rx.recv_timeout(limit) {
        Ok(r) => {
            let _ = thread.join();
            r
        }
        Err(RecvTimeoutError::Timeout) => panic!("{name} did not finish within {limit:?}"),
        Err(RecvTimeoutError::Disconnected) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("{name} ended without a result"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn wait_until_returns_once_the_condition_holds() {
        let n = AtomicU32::new(0);
        wait_until("three polls", Duration::from_secs(5), || {
            n.fetch_add(1, Ordering::Relaxed) >= 2
        });
        assert_eq!(n.load(Ordering::Relaxed), 3);
    }

    #[test]
    #[should_panic(expected = "waiting for nothing")]
    fn wait_until_fails_at_the_deadline() {
        wait_until("nothing", Duration::from_millis(30), || false);
    }

    #[test]
    fn with_timeout_returns_the_result() {
        assert_eq!(with_timeout(Duration::from_secs(5), "add", || 2 + 2), 4);
    }

    #[test]
    #[should_panic(expected = "sleeper did not finish within")]
    fn with_timeout_fails_a_hang() {
        with_timeout(Duration::from_millis(30), "sleeper", || {
            std::thread::sleep(Duration::from_secs(5))
        });
    }

    #[test]
    #[should_panic(expected = "inner failure")]
    fn with_timeout_passes_a_panic_on() {
        with_timeout(Duration::from_secs(5), "panicker", || {
            panic!("inner failure")
        });
    }
}
