// SPDX-License-Identifier: GPL-2.0

//! An object with a one-shot high-resolution timer beside it, armed
//! without a handle, on top of the `kernel` crate's `HrTimer`.
//!
//! The `kernel` crate's handles (`ArcHrTimerHandle`, `PinHrTimerHandle`)
//! cancel the timer when dropped, which means waiting for its callback:
//! they cannot be replaced under the spinlock that the callback takes. A
//! flush timer is armed and re-armed under that lock, so [`Timed`] instead
//! cancels the timer when the object is dropped.

use kernel::{
    bindings,
    prelude::*,
    time::{
        hrtimer::{
            HasHrTimer, HrTimer, HrTimerCallback, HrTimerCallbackContext, HrTimerRestart,
            RelativeSoftMode,
        },
        Delta, Monotonic,
    },
};

/// What a [`Timed`] object does when its timer fires.
pub(crate) trait OnTimer: Send + Sync + Sized + 'static {
    /// The timer of `this` fired (soft interrupt context). It may re-arm
    /// it with [`Timed::start`].
    fn fired(this: Pin<&Timed<Self>>);
}

/// `T` with a one-shot timer that is armed without keeping a handle and
/// calls [`OnTimer::fired`]. Derefs to `T`.
///
/// # Invariants
///
/// The timer is initialised, and it is cancelled (waiting for a running
/// callback) before the object is dropped: an armed timer never outlives
/// the object it points to.
#[pin_data(PinnedDrop)]
pub(crate) struct Timed<T: OnTimer> {
    #[pin]
    object: T,
    #[pin]
    timer: HrTimer<Timed<T>>,
}

kernel::impl_has_hr_timer! {
    impl{T: OnTimer} HasHrTimer<Self> for Timed<T> {
        mode: RelativeSoftMode<Monotonic>,
        field: self.timer
    }
}

impl<T: OnTimer> HrTimerCallback for Timed<T> {
    type Pointer<'a> = Pin<&'a Timed<T>>;

    fn run(this: Pin<&Timed<T>>, _ctx: HrTimerCallbackContext<'_, Self>) -> HrTimerRestart {
        T::fired(this);
        HrTimerRestart::NoRestart
    }
}

impl<T: OnTimer> Timed<T> {
    /// Initialises `object` with an idle timer beside it.
    pub(crate) fn new(object: impl PinInit<T, Error>) -> impl PinInit<Self, Error> {
        // INVARIANT: the timer is initialised here and cancelled in `drop`.
        try_pin_init!(Timed {
            object <- object,
            timer <- HrTimer::new(),
        })
    }

    /// Arms (or re-arms) the timer to fire after `delay`.
    pub(crate) fn start(self: Pin<&Self>, delay: Delta) {
        // SAFETY: `self` is a valid pinned object that cancels its timer
        // before it is dropped (type invariant), so it lives until the timer
        // fires or is cancelled.
        unsafe { <Self as HasHrTimer<Self>>::start(self.get_ref(), delay) };
    }

    /// Cancels the timer, waiting for a running callback. Must not be
    /// called with a lock held that the callback takes.
    pub(crate) fn cancel(&self) {
        // SAFETY: `self` is a valid `Timed`.
        let timer = unsafe { <Self as HasHrTimer<Self>>::c_timer_ptr(self) };
        // SAFETY: `timer` points to the initialised timer of `self` (type
        // invariant).
        unsafe { bindings::hrtimer_cancel(timer.cast_mut()) };
    }
}

impl<T: OnTimer> core::ops::Deref for Timed<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.object
    }
}

#[pinned_drop]
impl<T: OnTimer> PinnedDrop for Timed<T> {
    fn drop(self: Pin<&mut Self>) {
        // INVARIANT: no armed timer outlives the object.
        self.cancel();
    }
}
