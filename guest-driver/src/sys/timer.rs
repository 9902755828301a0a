// SPDX-License-Identifier: GPL-2.0

//! Arming a high-resolution timer embedded in a pinned object without
//! keeping a handle, on top of the `kernel` crate's `HrTimer`.
//!
//! The `kernel` crate's handles (`ArcHrTimerHandle`, `PinHrTimerHandle`)
//! cancel the timer when dropped, which means waiting for its callback:
//! they cannot be replaced under the spinlock that the callback takes. A
//! flush timer is armed and re-armed under that lock, so here the owner
//! instead promises to cancel the timer before it goes away
//! ([`CancelTimerOnDrop`]).

use kernel::{
    bindings,
    prelude::*,
    time::{
        hrtimer::{HasHrTimer, HrTimerMode},
        Delta,
    },
};

/// Types whose embedded high-resolution timer is cancelled with
/// [`cancel_timer`] before they are dropped.
///
/// # Safety
///
/// Implementers must call [`cancel_timer`] on themselves in their `Drop`
/// (or `PinnedDrop`), and the timer callback must not use the object after
/// that.
pub(crate) unsafe trait CancelTimerOnDrop {}

/// Arms (or re-arms) the timer embedded in `this` to fire after `delay`,
/// without a handle: the owner cancels it when it is dropped.
pub(crate) fn start_timer<T>(this: Pin<&T>, delay: Delta)
where
    T: HasHrTimer<T> + CancelTimerOnDrop,
    T::TimerMode: HrTimerMode<Expires = Delta>,
{
    // SAFETY: `this` is a valid pinned object; it cancels its timer before
    // it is dropped (`CancelTimerOnDrop`), so it lives until the timer fires
    // or is cancelled.
    unsafe { T::start(this.get_ref(), delay) };
}

/// Cancels the timer embedded in `this`, waiting for a running callback.
/// Must not be called with a lock held that the callback takes.
pub(crate) fn cancel_timer<T: HasHrTimer<T>>(this: &T) {
    // SAFETY: `this` is a valid `T`.
    let timer = unsafe { T::c_timer_ptr(this) };
    // SAFETY: `timer` points to the initialised timer embedded in `this`.
    unsafe { bindings::hrtimer_cancel(timer.cast_mut()) };
}
