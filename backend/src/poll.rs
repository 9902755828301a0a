// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Adaptive busy-polling of a request queue (`--poll-us`).
//!
//! After a queue worker drains its ring it may spin for a while, reading
//! the available index, before it turns notifications back on and sleeps:
//! a request that arrives meanwhile costs the guest no kick and the host no
//! wake-up. Spinning pays only while requests come faster than the window;
//! on an idle queue it is CPU thrown away. So the window adapts, the way
//! KVM's halt-polling does, on what happens after the queue goes idle:
//!
//! * a spin that finds work keeps the window;
//! * a kick that arrives within `--poll-us` of the queue going idle means a
//!   longer spin would have caught it: the window doubles (from an eighth
//!   of `--poll-us` when it was off);
//! * a kick that arrives later means the queue was really idle and the spin
//!   was wasted: the window halves, and below a sixteenth of `--poll-us`
//!   it is off. An idle queue therefore stops polling after a few kicks.
//!
//! The CPU time the spins take is counted (the worker thread's CPU clock:
//! `poll_us` in the device counters, `vtmem_vm_device_poll_seconds_total`,
//! `polling CPU` in `vtmemctl show`), and so are the spins that found
//! nothing (`poll_misses`).

use std::time::{Duration, Instant};

/// The busy-poll window of one queue.
#[derive(Debug)]
pub struct PollWindow {
    max: Duration,
    window: Duration,
    /// When the queue last went idle (notifications back on), if it did.
    idle_since: Option<Instant>,
}

impl PollWindow {
    /// A window of at most `max` (zero: never poll). It starts full.
    pub fn new(max: Duration) -> Self {
        PollWindow {
            max,
            window: max,
            idle_since: None,
        }
    }

    /// How long to spin now (zero: do not).
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Work arrived by a kick at `now`: grow the window if a longer spin
    /// would have caught it, shrink it if the queue was really idle.
    pub fn kicked(&mut self, now: Instant) {
        let Some(idle) = self.idle_since.take() else {
            return;
        };
        if now.saturating_duration_since(idle) <= self.max {
            self.window = if self.window.is_zero() {
                (self.max / 8).max(Duration::from_micros(1)).min(self.max)
            } else {
                (self.window * 2).min(self.max)
            };
        } else {
            self.window /= 2;
            if self.window < self.max / 16 {
                self.window = Duration::ZERO;
            }
        }
    }

    /// The queue goes idle at `now`.
    pub fn idle(&mut self, now: Instant) {
        self.idle_since = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(160);

    /// Kicks `n` times, each `gap` after the queue went idle; returns the
    /// window after each.
    fn kicks(w: &mut PollWindow, n: usize, gap: Duration) -> Vec<Duration> {
        let t = Instant::now();
        (0..n)
            .map(|_| {
                w.idle(t);
                w.kicked(t + gap);
                w.window()
            })
            .collect()
    }

    fn us(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&u| Duration::from_micros(u)).collect()
    }

    #[test]
    fn an_idle_queue_stops_polling() {
        let mut w = PollWindow::new(MAX);
        assert_eq!(w.window(), MAX);
        // Halving down to a sixteenth (10), then below it: off.
        assert_eq!(
            kicks(&mut w, 6, MAX + Duration::from_micros(1)),
            us(&[80, 40, 20, 10, 0, 0])
        );
    }

    #[test]
    fn kicks_soon_after_idle_grow_it_back() {
        let mut w = PollWindow::new(MAX);
        kicks(&mut w, 5, Duration::from_secs(1));
        assert!(w.window().is_zero());
        // From an eighth of the maximum, doubling.
        assert_eq!(
            kicks(&mut w, 5, Duration::from_micros(30)),
            us(&[20, 40, 80, 160, 160])
        );
    }

    #[test]
    fn a_kick_without_an_idle_period_changes_nothing() {
        let mut w = PollWindow::new(MAX);
        kicks(&mut w, 2, Duration::from_secs(1));
        let before = w.window();
        w.kicked(Instant::now());
        assert_eq!(w.window(), before);
    }

    #[test]
    fn zero_max_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        assert!(kicks(&mut w, 3, Duration::ZERO)
            .iter()
            .all(Duration::is_zero));
        assert!(kicks(&mut w, 3, Duration::from_secs(1))
            .iter()
            .all(Duration::is_zero));
    }
}
