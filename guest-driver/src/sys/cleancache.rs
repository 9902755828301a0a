// SPDX-License-Identifier: GPL-2.0

//! Registration as the backend of the kernel's cleancache hooks
//! (`<linux/cleancache.h>`, added by the project's kernel patches).
//!
//! Like frontswap, cleancache calls its backend through a table of plain
//! functions without a context argument, so the registered backend lives
//! in a global, set before registering (registration calls `init_fs` for
//! the filesystems already mounted) and cleared after unregistering (which
//! waits for running operations).

use super::PageRef;
use core::ptr::NonNull;
use kernel::{
    bindings,
    ffi::{c_int, c_uint, c_ulong},
    prelude::*,
    sync::{global_lock, Arc},
    types::Opaque,
};

/// The name of a file within a cleancache pool: inode number, inode
/// generation, 0 (`struct cleancache_filekey`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileKey(pub(crate) [u64; 3]);

/// A cleancache backend: an ephemeral pool per filesystem, which may
/// drop any page at any time but must never return data older than the
/// last put of the page, or data invalidated since.
///
/// See `struct cleancache_ops` for the contexts: [`Self::put_page`] runs
/// in atomic context (the page cache's xarray lock held, interrupts
/// off), and [`Self::invalidate_page`] and [`Self::invalidate_inode`] may;
/// they must neither sleep nor allocate with a sleeping allocation.
pub(crate) trait CleancacheBackend: Send + Sync {
    /// A filesystem with UUID `uuid` opted in (at mount, or before this
    /// backend registered): returns its pool id (>= 0). The pool must
    /// not hold older data of this filesystem. Process context.
    fn init_fs(&self, uuid: &[u8; 16]) -> Result<i32>;
    /// Copies page `index` of file `key` into `page`; `Err(ENOENT)` on a
    /// miss (any error is a miss). Process context, may sleep (no I/O:
    /// called from readahead with the folio locked).
    fn get_page(&self, pool: i32, key: FileKey, index: u64, page: &mut PageRef<'_>) -> Result;
    /// Fills what it can of the pages of `pages` (a readahead window of
    /// file `key`, at most [`GET_BATCH`] pages in ascending index order)
    /// at once; returns the bitmap of the pages filled (bit `i` for
    /// `pages.index(i)`). Same context as [`Self::get_page`].
    fn get_pages(&self, pool: i32, key: FileKey, pages: &mut PageBatch<'_>) -> u64;
    /// Keeps a copy of `page` as page `index` of file `key`, replacing
    /// any older one; if it is dropped instead, no older copy may be
    /// returned later. Atomic context.
    fn put_page(&self, pool: i32, key: FileKey, index: u64, page: &PageRef<'_>);
    /// Drops page `index` of file `key`. Maybe atomic context; must not
    /// be lost.
    fn invalidate_page(&self, pool: i32, key: FileKey, index: u64);
    /// Drops every page of file `key`. Maybe atomic context; must not be
    /// lost.
    fn invalidate_inode(&self, pool: i32, key: FileKey);
    /// The filesystem of `pool` is unmounted: drops the pool. Process
    /// context.
    fn invalidate_fs(&self, pool: i32);
}

/// The most pages one `get_pages` call hands over
/// (`CLEANCACHE_GET_BATCH`).
pub(crate) const GET_BATCH: usize = bindings::CLEANCACHE_GET_BATCH as usize;

/// The pages of one `get_pages` call: a readahead window's folios, which
/// the kernel holds locked and not up to date for the call, and their
/// indexes in the file.
///
/// # Invariants
///
/// `index` and `pages` point to `len` (at most [`GET_BATCH`]) valid
/// entries each for the lifetime `'a`, and every page satisfies the
/// invariants of a [`PageRef`] handed out as `&mut` (a page being read
/// in, which nobody else reads or writes until the call returns).
pub(crate) struct PageBatch<'a> {
    index: *const usize,
    pages: *const *mut bindings::page,
    len: usize,
    _call: core::marker::PhantomData<&'a mut bindings::page>,
}

impl PageBatch<'_> {
    /// Number of pages (1 to [`GET_BATCH`]).
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The file index of page `i`; `None` past the end.
    pub(crate) fn index(&self, i: usize) -> Option<u64> {
        if i >= self.len {
            return None;
        }
        // SAFETY: `i < len`, and `index` has `len` entries (type
        // invariant): the result stays inside them.
        let at = unsafe { self.index.add(i) };
        // SAFETY: a valid entry (type invariant), read only.
        Some(unsafe { *at } as u64)
    }

    /// Overwrites page `i` with `src` (up to a page); does nothing past
    /// the end.
    pub(crate) fn write(&mut self, i: usize, src: &[u8]) {
        if i >= self.len {
            return;
        }
        // SAFETY: `i < len`, and `pages` has `len` entries (type
        // invariant): the result stays inside them.
        let at = unsafe { self.pages.add(i) };
        // SAFETY: a valid entry (type invariant), read only.
        let page = unsafe { *at };
        if let Some(page) = NonNull::new(page) {
            // SAFETY: a page of the batch, being read in and ours until the
            // call returns (type invariant); the `PageRef` lives only for
            // this statement, which `&mut self` keeps exclusive.
            unsafe { PageRef::new(page) }.write(src);
        }
    }
}

global_lock! {
    // SAFETY: initialised by `init()`, called from the module's init
    // before anything else uses it.
    unsafe(uninit) static CC_BACKEND: SpinLockIrq<Option<Arc<dyn CleancacheBackend>>> = None;
}

/// Initialises the global state. Called once, from module init.
pub(crate) fn init() {
    // SAFETY: called once, before any other use of `CC_BACKEND`.
    unsafe { CC_BACKEND.init() };
}

fn backend() -> Option<Arc<dyn CleancacheBackend>> {
    CC_BACKEND.lock().clone()
}

/// Reads the key cleancache passes.
///
/// # Safety
///
/// `key` must be null or point to a valid `struct cleancache_filekey`.
unsafe fn file_key(key: *const bindings::cleancache_filekey) -> Option<FileKey> {
    // SAFETY: `key` is null or valid (the caller's guarantee).
    let key = unsafe { key.as_ref() }?;
    Some(FileKey([key.u[0], key.u[1], key.u[2]]))
}

/// cleancache's `init_fs`.
///
/// # Safety
///
/// Called by cleancache only, through the registered `cleancache_ops`,
/// with the arguments `struct cleancache_ops` documents (a valid key and
/// page, a 16-byte UUID).
unsafe extern "C" fn cc_init_fs(uuid: *const u8) -> c_int {
    let Some(b) = backend() else {
        return ENODEV.to_errno();
    };
    // SAFETY: cleancache passes the super_block's `s_uuid`, 16 bytes,
    // valid for this call (or null, which `as_ref` catches).
    let Some(uuid) = (unsafe { uuid.cast::<[u8; 16]>().as_ref() }) else {
        return EINVAL.to_errno();
    };
    match b.init_fs(uuid) {
        Ok(pool) if pool >= 0 => pool,
        Ok(_) => EINVAL.to_errno(),
        Err(e) => e.to_errno(),
    }
}

/// cleancache's `get_page`.
///
/// # Safety
///
/// Called by cleancache only, through the registered `cleancache_ops`,
/// with the arguments `struct cleancache_ops` documents (a valid key and
/// page, a 16-byte UUID).
unsafe extern "C" fn cc_get_page(
    pool: c_int,
    key: *const bindings::cleancache_filekey,
    index: c_ulong,
    page: *mut bindings::page,
) -> c_int {
    // SAFETY: cleancache passes a valid key for this call.
    let key = unsafe { file_key(key) };
    let (Some(b), Some(key), Some(page)) = (backend(), key, NonNull::new(page)) else {
        return ENOENT.to_errno();
    };
    // SAFETY: cleancache passes the page of a locked, not up to date
    // folio being read in: valid for this call and used by nobody else.
    let mut page = unsafe { PageRef::new(page) };
    match b.get_page(pool, key, index as u64, &mut page) {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

/// cleancache's `get_pages`.
///
/// # Safety
///
/// Called by cleancache only, through the registered `cleancache_ops`,
/// with the arguments `struct cleancache_ops` documents (a valid key,
/// `nr` valid indexes and pages of locked folios being read in, a
/// zeroed bitmap word).
unsafe extern "C" fn cc_get_pages(
    pool: c_int,
    key: *const bindings::cleancache_filekey,
    index: *const usize,
    pages: *mut *mut bindings::page,
    nr: c_uint,
    hits: *mut c_ulong,
) -> c_int {
    // SAFETY: cleancache passes a valid key for this call.
    let key = unsafe { file_key(key) };
    let len = nr as usize;
    let (Some(b), Some(key)) = (backend(), key) else {
        return ENOENT.to_errno();
    };
    if len == 0 || len > GET_BATCH || index.is_null() || pages.is_null() || hits.is_null() {
        return EINVAL.to_errno();
    }
    // INVARIANT: cleancache passes `nr` indexes and pages of locked, not up
    // to date folios for this call; `nr` is at most `GET_BATCH` (checked).
    let mut batch = PageBatch {
        index,
        pages: pages.cast_const(),
        len,
        _call: core::marker::PhantomData,
    };
    let filled = b.get_pages(pool, key, &mut batch) & (u64::MAX >> (64 - len));
    // SAFETY: `hits` is the caller's bitmap word, valid for this call.
    unsafe { *hits = filled as c_ulong };
    filled.count_ones() as c_int
}

/// cleancache's `put_page`.
///
/// # Safety
///
/// Called by cleancache only, through the registered `cleancache_ops`,
/// with the arguments `struct cleancache_ops` documents (a valid key and
/// page, a 16-byte UUID).
unsafe extern "C" fn cc_put_page(
    pool: c_int,
    key: *const bindings::cleancache_filekey,
    index: c_ulong,
    page: *mut bindings::page,
) {
    // SAFETY: cleancache passes a valid key for this call.
    let key = unsafe { file_key(key) };
    if let (Some(b), Some(key), Some(page)) = (backend(), key, NonNull::new(page)) {
        // SAFETY: cleancache passes the page of a clean, locked,
        // unmapped folio that the page cache is removing: valid and
        // unchanging for this call.
        let page = unsafe { PageRef::new(page) };
        b.put_page(pool, key, index as u64, &page);
    }
}

/// cleancache's `invalidate_page`.
///
/// # Safety
///
/// Called by cleancache only, through the registered `cleancache_ops`,
/// with the arguments `struct cleancache_ops` documents (a valid key and
/// page, a 16-byte UUID).
unsafe extern "C" fn cc_invalidate_page(
    pool: c_int,
    key: *const bindings::cleancache_filekey,
    index: c_ulong,
) {
    // SAFETY: cleancache passes a valid key for this call.
    let key = unsafe { file_key(key) };
    if let (Some(b), Some(key)) = (backend(), key) {
        b.invalidate_page(pool, key, index as u64);
    }
}

/// cleancache's `invalidate_inode`.
///
/// # Safety
///
/// Called by cleancache only, through the registered `cleancache_ops`,
/// with the arguments `struct cleancache_ops` documents (a valid key and
/// page, a 16-byte UUID).
unsafe extern "C" fn cc_invalidate_inode(pool: c_int, key: *const bindings::cleancache_filekey) {
    // SAFETY: cleancache passes a valid key for this call.
    let key = unsafe { file_key(key) };
    if let (Some(b), Some(key)) = (backend(), key) {
        b.invalidate_inode(pool, key);
    }
}

/// cleancache's `invalidate_fs`.
///
/// # Safety
///
/// Called by cleancache only, through the registered `cleancache_ops`,
/// with the arguments `struct cleancache_ops` documents (a valid key and
/// page, a 16-byte UUID).
unsafe extern "C" fn cc_invalidate_fs(pool: c_int) {
    if let Some(b) = backend() {
        b.invalidate_fs(pool);
    }
}

/// The driver registered as the cleancache backend.
///
/// # Invariants
///
/// While `ops` is `Some`, it is registered with cleancache and
/// `CC_BACKEND` holds the backend.
pub(crate) struct CleancacheRegistration {
    ops: Option<KBox<Opaque<bindings::cleancache_ops>>>,
}

// SAFETY: only the address of `ops` is used after registration.
unsafe impl Send for CleancacheRegistration {}
// SAFETY: no `&self` method exists.
unsafe impl Sync for CleancacheRegistration {}

impl CleancacheRegistration {
    /// Registers `backend`; cleancache calls its `init_fs` for the
    /// opted-in filesystems already mounted before this returns.
    /// `EBUSY` if another cleancache backend is registered.
    /// `batch_gets`: offer `get_pages`, so that readahead asks for a
    /// window's pages at once (else the kernel asks page by page).
    pub(crate) fn register(backend: Arc<dyn CleancacheBackend>, batch_gets: bool) -> Result<Self> {
        let ops = KBox::new(
            Opaque::new(bindings::cleancache_ops {
                init_fs: Some(cc_init_fs),
                get_page: Some(cc_get_page),
                get_pages: if batch_gets { Some(cc_get_pages) } else { None },
                put_page: Some(cc_put_page),
                invalidate_page: Some(cc_invalidate_page),
                invalidate_inode: Some(cc_invalidate_inode),
                invalidate_fs: Some(cc_invalidate_fs),
                owner: <crate::LocalModule as kernel::ModuleMetadata>::THIS_MODULE.as_ptr(),
            }),
            GFP_KERNEL,
        )?;
        let old = CC_BACKEND.lock().replace(backend);
        drop(old);
        // SAFETY: `ops` is fully initialised and stays allocated while
        // registered (it is only freed after unregistering).
        let ret = unsafe { bindings::cleancache_register_ops(ops.get()) };
        if ret < 0 {
            let old = CC_BACKEND.lock().take();
            drop(old);
            return Err(Error::from_errno(ret));
        }
        // INVARIANT: registered, and `CC_BACKEND` is set.
        Ok(Self { ops: Some(ops) })
    }

    /// Unregisters: no operation runs any more when this returns. The
    /// backend drops its pools itself (`invalidate_fs` is not called).
    /// Does nothing if already unregistered.
    pub(crate) fn unregister(&mut self) {
        let Some(ops) = self.ops.take() else {
            return;
        };
        // SAFETY: `ops` is registered (type invariant). On success no
        // operation runs any more when this returns.
        let ret = unsafe { bindings::cleancache_unregister_ops(ops.get()) };
        if ret < 0 {
            // Cannot happen for registered ops; if it did, the kernel
            // could still use the table and the backend.
            pr_err!("cleancache_unregister_ops failed: {}\n", ret);
            KBox::leak(ops);
            return;
        }
        let old = CC_BACKEND.lock().take();
        drop(old);
    }
}

impl Drop for CleancacheRegistration {
    fn drop(&mut self) {
        self.unregister();
    }
}
