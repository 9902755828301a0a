// SPDX-License-Identifier: GPL-2.0

//! The wrappers through which vtmem calls C.
//!
//! Everything the driver needs from the kernel beyond what the `kernel`
//! crate already wraps is reached from here, behind safe types, one small
//! module per kernel interface:
//!
//! - `virtio`: [`DmaBuf`] (memory the device may access), [`Virtqueue`] (a
//!   virtqueue that owns the requests it carries), [`VirtioDevice`],
//!   [`VirtioDriver`] and the driver [`Registration`];
//! - `timer`: [`Timed`], an object with a flush timer beside it, armed
//!   without keeping a handle and cancelled when the object goes;
//! - `page`: [`PageRef`], the page a frontswap or cleancache operation
//!   hands over;
//! - `frontswap` (with `CONFIG_FRONTSWAP`): [`FrontswapRegistration`],
//!   the [`FrontswapBackend`] trait and [`AsyncLoad`] (a swap-in the
//!   backend ends later, from its completion);
//! - `cleancache` (with `CONFIG_CLEANCACHE`): [`CleancacheRegistration`],
//!   the [`CleancacheBackend`] trait, [`FileKey`] and [`PageBatch`] (the
//!   pages of a readahead window asked for at once).
//!
//! Every `unsafe` block of the driver is in these modules; the driver logic
//! in the other modules is safe Rust.

#[path = "sys/virtio.rs"]
mod virtio;
pub(crate) use virtio::{Chain, DmaBuf, Registration, Seg, VirtioDevice, VirtioDriver, Virtqueue};

#[path = "sys/timer.rs"]
mod timer;
pub(crate) use timer::{OnTimer, Timed};

#[cfg(any(CONFIG_FRONTSWAP, CONFIG_CLEANCACHE))]
#[path = "sys/page.rs"]
mod page;
#[cfg(any(CONFIG_FRONTSWAP, CONFIG_CLEANCACHE))]
pub(crate) use page::PageRef;

#[cfg(CONFIG_FRONTSWAP)]
#[path = "sys/frontswap.rs"]
mod frontswap;
#[cfg(CONFIG_FRONTSWAP)]
pub(crate) use frontswap::{AsyncLoad, FrontswapBackend, FrontswapRegistration};

#[cfg(CONFIG_CLEANCACHE)]
#[path = "sys/cleancache.rs"]
mod cleancache;
#[cfg(CONFIG_CLEANCACHE)]
pub(crate) use cleancache::{
    CleancacheBackend, CleancacheRegistration, FileKey, PageBatch, GET_BATCH,
};

/// Initialises global state of this module. Called once, from module init.
pub(crate) fn init_globals() {
    #[cfg(CONFIG_FRONTSWAP)]
    frontswap::init();
    #[cfg(CONFIG_CLEANCACHE)]
    cleancache::init();
}
