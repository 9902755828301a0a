// SPDX-License-Identifier: GPL-2.0

//! Registration as the backend of the kernel's frontswap hooks
//! (`<linux/frontswap.h>`, added by the project's kernel patches).
//!
//! frontswap calls a backend through a table of plain functions without a
//! context argument, so the registered backend lives in a global, set
//! before registering (registration calls `init` for areas already on) and
//! cleared after unregistering (which waits for running operations).

use super::PageRef;
use core::ptr::NonNull;
use kernel::{
    bindings,
    ffi::{c_int, c_uint, c_ulong},
    prelude::*,
    sync::{global_lock, Arc},
    types::Opaque,
};

/// A frontswap backend. See `struct frontswap_ops` for the contexts:
/// everything may sleep except [`FrontswapBackend::invalidate_page`].
pub(crate) trait FrontswapBackend: Send + Sync {
    /// Swap area `ty` of `nr_pages` slots was switched on.
    fn init(&self, ty: usize, nr_pages: u64);
    /// Keep a copy of `page` for slot `offset` of area `ty`.
    fn store(&self, ty: usize, offset: u64, page: &PageRef<'_>) -> Result;
    /// Copy slot `offset` of area `ty` into `page`.
    fn load(&self, ty: usize, offset: u64, page: &mut PageRef<'_>) -> Result;
    /// Drop slot `offset` of area `ty`. Atomic context: must not sleep.
    fn invalidate_page(&self, ty: usize, offset: u64);
    /// Area `ty` is being switched off: drop all of it.
    fn invalidate_area(&self, ty: usize);
}

global_lock! {
    // SAFETY: initialised by `init()`, called from the module's init
    // before anything else uses it.
    unsafe(uninit) static BACKEND: SpinLockIrq<Option<Arc<dyn FrontswapBackend>>> = None;
}

/// Initialises the global state. Called once, from module init.
pub(crate) fn init() {
    // SAFETY: called once, before any other use of `BACKEND`.
    unsafe { BACKEND.init() };
}

fn backend() -> Option<Arc<dyn FrontswapBackend>> {
    BACKEND.lock().clone()
}

/// frontswap's `init`: swap area `ty` was switched on.
///
/// # Safety
///
/// Called by frontswap only, through the registered `frontswap_ops`, with
/// the arguments `struct frontswap_ops` documents (a valid, locked page).
unsafe extern "C" fn fs_init(ty: c_uint, nr_pages: c_ulong) {
    if let Some(b) = backend() {
        b.init(ty as usize, nr_pages as u64);
    }
}

/// frontswap's `store`.
///
/// # Safety
///
/// Called by frontswap only, through the registered `frontswap_ops`, with
/// the arguments `struct frontswap_ops` documents (a valid, locked page).
unsafe extern "C" fn fs_store(ty: c_uint, offset: c_ulong, page: *mut bindings::page) -> c_int {
    let (Some(b), Some(page)) = (backend(), NonNull::new(page)) else {
        return ENODEV.to_errno();
    };
    // SAFETY: frontswap passes the locked page of the folio being
    // written out, valid and unchanging for this call.
    let page = unsafe { PageRef::new(page) };
    match b.store(ty as usize, offset as u64, &page) {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

/// frontswap's `load`.
///
/// # Safety
///
/// Called by frontswap only, through the registered `frontswap_ops`, with
/// the arguments `struct frontswap_ops` documents (a valid, locked page).
unsafe extern "C" fn fs_load(ty: c_uint, offset: c_ulong, page: *mut bindings::page) -> c_int {
    let (Some(b), Some(page)) = (backend(), NonNull::new(page)) else {
        return EIO.to_errno();
    };
    // SAFETY: frontswap passes the locked page of the folio being
    // read in, valid for this call and used by nobody else.
    let mut page = unsafe { PageRef::new(page) };
    match b.load(ty as usize, offset as u64, &mut page) {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

/// frontswap's `invalidate_page`.
///
/// # Safety
///
/// Called by frontswap only, through the registered `frontswap_ops`, with
/// the arguments `struct frontswap_ops` documents (a valid, locked page).
unsafe extern "C" fn fs_invalidate_page(ty: c_uint, offset: c_ulong) {
    if let Some(b) = backend() {
        b.invalidate_page(ty as usize, offset as u64);
    }
}

/// frontswap's `invalidate_area`.
///
/// # Safety
///
/// Called by frontswap only, through the registered `frontswap_ops`, with
/// the arguments `struct frontswap_ops` documents (a valid, locked page).
unsafe extern "C" fn fs_invalidate_area(ty: c_uint) {
    if let Some(b) = backend() {
        b.invalidate_area(ty as usize);
    }
}

/// The driver registered as the frontswap backend.
///
/// # Invariants
///
/// While `ops` is `Some`, it is registered with frontswap and `BACKEND`
/// holds the backend.
pub(crate) struct FrontswapRegistration {
    ops: Option<KBox<Opaque<bindings::frontswap_ops>>>,
}

// SAFETY: only the address of `ops` is used after registration.
unsafe impl Send for FrontswapRegistration {}
// SAFETY: no `&self` method exists.
unsafe impl Sync for FrontswapRegistration {}

impl FrontswapRegistration {
    /// Registers `backend`; frontswap calls its `init` for the swap
    /// areas already on before this returns.
    pub(crate) fn register(backend: Arc<dyn FrontswapBackend>) -> Result<Self> {
        let ops = KBox::new(
            Opaque::new(bindings::frontswap_ops {
                init: Some(fs_init),
                store: Some(fs_store),
                load: Some(fs_load),
                invalidate_page: Some(fs_invalidate_page),
                invalidate_area: Some(fs_invalidate_area),
                owner: <crate::LocalModule as kernel::ModuleMetadata>::THIS_MODULE.as_ptr(),
            }),
            GFP_KERNEL,
        )?;
        let old = BACKEND.lock().replace(backend);
        drop(old);
        // SAFETY: `ops` is fully initialised and stays allocated while
        // registered (it is only freed after a successful unregister).
        let ret = unsafe { bindings::frontswap_register_ops(ops.get()) };
        if ret < 0 {
            let old = BACKEND.lock().take();
            drop(old);
            return Err(Error::from_errno(ret));
        }
        // INVARIANT: registered, and `BACKEND` is set.
        Ok(Self { ops: Some(ops) })
    }

    /// Unregisters; fails with `EBUSY` while the backend holds pages,
    /// and then stays registered.
    pub(crate) fn unregister(&mut self) -> Result {
        let Some(ops) = self.ops.as_ref() else {
            return Ok(());
        };
        // SAFETY: `ops` is registered (type invariant). On success no
        // operation runs any more when this returns.
        let ret = unsafe { bindings::frontswap_unregister_ops(ops.get()) };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        self.ops = None;
        let old = BACKEND.lock().take();
        drop(old);
        Ok(())
    }
}

impl Drop for FrontswapRegistration {
    fn drop(&mut self) {
        if self.unregister().is_err() {
            // Still registered: the table must outlive the kernel's use.
            if let Some(ops) = self.ops.take() {
                KBox::leak(ops);
            }
        }
    }
}
