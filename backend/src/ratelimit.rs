// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small token bucket, and a logger built on it, so that a guest that
//! sends garbage in a tight loop cannot flood the host's log.

use parking_lot::Mutex;
use std::fmt;
use std::time::{Duration, Instant};

/// A token bucket: `burst` events at once, then `per_sec` a second.
#[derive(Debug)]
pub struct TokenBucket {
    burst: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32, per_sec: u32) -> Self {
        Self::new_at(burst, per_sec, Instant::now())
    }

    /// A full bucket, with an explicit clock (for tests).
    pub fn new_at(burst: u32, per_sec: u32, now: Instant) -> Self {
        TokenBucket {
            burst: f64::from(burst.max(1)),
            per_sec: f64::from(per_sec),
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes one token if there is one, now.
    pub fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }
}

#[derive(Debug)]
struct LimiterState {
    bucket: TokenBucket,
    suppressed: u64,
}

/// Logs at most a burst of messages, then a few a second; counts the rest
/// and reports how many were dropped with the next message that gets out.
#[derive(Debug)]
pub struct RateLimitedLog {
    prefix: String,
    state: Mutex<LimiterState>,
}

impl RateLimitedLog {
    /// Default: 10 messages at once, then 1 a second.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self::with_rate(prefix, 10, 1)
    }

    /// A logger with its own rate.
    pub fn with_rate(prefix: impl Into<String>, burst: u32, per_sec: u32) -> Self {
        RateLimitedLog {
            prefix: prefix.into(),
            state: Mutex::new(LimiterState {
                bucket: TokenBucket::new(burst, per_sec),
                suppressed: 0,
            }),
        }
    }

    /// Logs `args` at `level` unless the rate is exceeded. Returns whether
    /// the message was logged.
    pub fn log(&self, level: log::Level, args: fmt::Arguments<'_>) -> bool {
        let suppressed = {
            let mut st = self.state.lock();
            if !st.bucket.take() {
                st.suppressed = st.suppressed.saturating_add(1);
                return false;
            }
            std::mem::take(&mut st.suppressed)
        };
        if suppressed > 0 {
            log::log!(
                level,
                "{}: {args} ({suppressed} similar messages suppressed)",
                self.prefix
            );
        } else {
            log::log!(level, "{}: {args}", self.prefix);
        }
        true
    }

    /// Logs a warning, rate limited.
    pub fn warn(&self, args: fmt::Arguments<'_>) -> bool {
        self.log(log::Level::Warn, args)
    }
}

/// How long a full bucket of `burst` tokens at `per_sec` takes to refill.
pub fn refill_time(burst: u32, per_sec: u32) -> Duration {
    if per_sec == 0 {
        Duration::MAX
    } else {
        Duration::from_secs_f64(f64::from(burst) / f64::from(per_sec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bursts_then_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(3, 2, t0);
        assert!(b.take_at(t0));
        assert!(b.take_at(t0));
        assert!(b.take_at(t0));
        assert!(!b.take_at(t0));
        // Half a second at 2/s gives one token back.
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.take_at(t1));
        assert!(!b.take_at(t1));
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(100);
        for _ in 0..3 {
            assert!(b.take_at(t2));
        }
        assert!(!b.take_at(t2));
        assert_eq!(refill_time(3, 2), Duration::from_millis(1500));
    }

    #[test]
    fn logger_counts_suppressed() {
        let l = RateLimitedLog::with_rate("t", 2, 0);
        assert!(l.warn(format_args!("a")));
        assert!(l.warn(format_args!("b")));
        assert!(!l.warn(format_args!("c")));
        assert_eq!(l.state.lock().suppressed, 1);
    }
}
