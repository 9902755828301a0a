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
    /// Start loading slot `offset` of area `ty` into `load`'s page, and end
    /// `load` (from any context) once the answer is there. The request may
    /// wait for [`FrontswapBackend::unplug`]. `Err` gives `load` back
    /// unstarted: frontswap then calls [`FrontswapBackend::load`].
    fn load_async(
        &self,
        ty: usize,
        offset: u64,
        load: AsyncLoad,
    ) -> core::result::Result<(), AsyncLoad>;
    /// The swap code ended a batch of reads: send the loads held back.
    fn unplug(&self);
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

/// A load frontswap handed to `load_async`: the page of a locked swap-cache
/// folio that stays locked until the load is ended.
///
/// # Invariants
///
/// `page` is the page frontswap passed to `load_async` for a load that
/// was started (`load_async` returned 0) and has not been ended yet:
/// valid, locked, and read by nobody until `frontswap_load_end()` is
/// called for it, which only [`AsyncLoad::end`] does (or `Drop`, which
/// fails it), exactly once.
pub(crate) struct AsyncLoad {
    page: NonNull<bindings::page>,
}

// SAFETY: the page is owned by the load until it ends, whichever CPU or
// context ends it: `frontswap_load_end()` may be called from any context.
unsafe impl Send for AsyncLoad {}

impl AsyncLoad {
    /// Ends the load: with the page's bytes on a hit (`Ok(src)`), or as
    /// failed (`Err(e)`: a miss or a device error; the swap-in then fails
    /// with an I/O error). Any context; never sleeps.
    pub(crate) fn end(self, answer: core::result::Result<&[u8], Error>) {
        let ret = match answer {
            Ok(src) => {
                let mut page = self.page_ref();
                page.write(src);
                0
            }
            Err(e) => e.to_errno(),
        };
        let page = self.page;
        core::mem::forget(self);
        // SAFETY: `page` belongs to a started load not ended yet (type
        // invariant); `self` was forgotten, so it is ended exactly once.
        unsafe { bindings::frontswap_load_end(page.as_ptr(), ret) };
    }

    fn page_ref(&self) -> PageRef<'_> {
        // SAFETY: the page is valid and nobody else reads or writes it until
        // the load ends (type invariant), which cannot happen while `self`
        // is borrowed.
        unsafe { PageRef::new(self.page) }
    }

    /// Gives up ownership without ending the load: `load_async` then
    /// returns an error, and frontswap loads the page itself.
    fn unstarted(self) {
        core::mem::forget(self);
    }
}

impl Drop for AsyncLoad {
    /// A load dropped without an answer fails: its folio is never left
    /// locked.
    fn drop(&mut self) {
        // SAFETY: the load was started and not ended (type invariant);
        // `drop` runs once, and `end` and `unstarted` forget `self`.
        unsafe { bindings::frontswap_load_end(self.page.as_ptr(), EIO.to_errno()) };
    }
}

/// frontswap's `load_async`.
///
/// # Safety
///
/// Called by frontswap only, through the registered `frontswap_ops`, with
/// the arguments `struct frontswap_ops` documents (a valid, locked page).
unsafe extern "C" fn fs_load_async(
    ty: c_uint,
    offset: c_ulong,
    page: *mut bindings::page,
) -> c_int {
    let (Some(b), Some(page)) = (backend(), NonNull::new(page)) else {
        return ENODEV.to_errno();
    };
    // INVARIANT: if the backend keeps `load`, this returns 0, and the load
    // was started; frontswap keeps the folio locked until it is ended. If
    // it gives it back, `unstarted` forgets it and frontswap loads the page
    // synchronously.
    let load = AsyncLoad { page };
    match b.load_async(ty as usize, offset as u64, load) {
        Ok(()) => 0,
        Err(load) => {
            load.unstarted();
            EAGAIN.to_errno()
        }
    }
}

/// frontswap's `unplug`.
///
/// # Safety
///
/// Called by frontswap only, through the registered `frontswap_ops`.
unsafe extern "C" fn fs_unplug() {
    if let Some(b) = backend() {
        b.unplug();
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
                load_async: Some(fs_load_async),
                unplug: Some(fs_unplug),
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
