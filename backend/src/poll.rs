// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Adaptive busy-polling of a request queue (`--poll-us`).
//!
//! After a queue worker drains its ring it may spin for a while, reading
//! the available index, before it turns notifications back on and sleeps:
//! a request that arrives meanwhile costs the guest no kick and the host no
//! wake-up. Spinning pays only while requests come faster than the window;
//! on an idle queue it is CPU thrown away. So the window adapts, the way
//! KVM's halt-polling does:
//!
//! * a spin that finds work keeps the window;
//! * a spin that finds none halves it, down to nothing below a sixteenth of
//!   `--poll-us`: an idle queue stops polling;
//! * a kick that arrives within `--poll-us` of the queue going idle means
//!   a spin would have caught it: the window grows again (doubling, from a
//!   sixteenth of `--poll-us`).
//!
//! The time spent spinning is counted (`poll_us` in the device counters,
//! `vtmem_vm_device_poll_seconds_total`), and so are the spins that found
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

    fn floor(&self) -> Duration {
        self.max / 16
    }

    /// Work arrived by a kick at `now`.
    pub fn kicked(&mut self, now: Instant) {
        let Some(idle) = self.idle_since.take() else {
            return;
        };
        if self.window < self.max && now.saturating_duration_since(idle) <= self.max {
            self.window = if self.window.is_zero() {
                self.floor().max(Duration::from_micros(1)).min(self.max)
            } else {
                (self.window * 2).min(self.max)
            };
        }
    }

    /// A spin found nothing: spin less.
    pub fn missed(&mut self) {
        self.window /= 2;
        if self.window < self.floor() {
            self.window = Duration::ZERO;
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

    #[test]
    fn misses_shrink_the_window_to_nothing() {
        let mut w = PollWindow::new(MAX);
        assert_eq!(w.window(), MAX);
        let mut seen = vec![w.window()];
        while !w.window().is_zero() {
            w.missed();
            seen.push(w.window());
        }
        // Halving down to a sixteenth (10), then below it: zero.
        assert_eq!(
            seen,
            [160, 80, 40, 20, 10, 0].map(Duration::from_micros).to_vec()
        );
    }

    #[test]
    fn kicks_soon_after_idle_grow_it_back() {
        let mut w = PollWindow::new(MAX);
        for _ in 0..6 {
            w.missed();
        }
        assert!(w.window().is_zero());
        let t = Instant::now();
        let mut seen = Vec::new();
        for _ in 0..6 {
            w.idle(t);
            w.kicked(t + Duration::from_micros(30));
            seen.push(w.window());
        }
        assert_eq!(
            seen,
            [10, 20, 40, 80, 160, 160]
                .map(Duration::from_micros)
                .to_vec()
        );
    }

    #[test]
    fn late_kicks_and_kicks_without_idle_change_nothing() {
        let mut w = PollWindow::new(MAX);
        w.missed();
        w.missed();
        let before = w.window();
        let t = Instant::now();
        w.idle(t);
        w.kicked(t + MAX + Duration::from_micros(1));
        assert_eq!(w.window(), before, "an idle gap longer than the window");
        w.kicked(t);
        assert_eq!(w.window(), before, "no idle period before this kick");
    }

    #[test]
    fn zero_max_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        let t = Instant::now();
        w.idle(t);
        w.kicked(t);
        assert!(w.window().is_zero());
    }
}
