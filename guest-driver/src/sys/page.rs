// SPDX-License-Identifier: GPL-2.0

//! The page a frontswap or cleancache operation hands over, on top of the
//! `kernel` crate's [`BorrowedPage`].

use core::ptr::NonNull;
use kernel::{bindings, page::BorrowedPage};

/// A page that the kernel hands to a frontswap or cleancache operation for
/// the duration of the call: the page of a swap folio being stored or
/// loaded, or a page cache page being put into or read from cleancache.
///
/// # Invariants
///
/// `page` is a valid page for the lifetime `'a`, and its contents do not
/// change during it: the kernel holds the folio locked (frontswap, and
/// cleancache gets) or has it out of everyone else's reach (a cleancache
/// put runs while the page cache removes the clean, unmapped folio). A
/// `&mut PageRef` is only handed out for a page being read in, which
/// nobody else reads until the operation returns.
pub(crate) struct PageRef<'a> {
    page: BorrowedPage<'a>,
}

impl PageRef<'_> {
    /// Wraps `page`.
    ///
    /// # Safety
    ///
    /// `page` must satisfy the type invariants for the lifetime chosen by
    /// the caller (the duration of the kernel's call into the backend).
    pub(super) unsafe fn new(page: NonNull<bindings::page>) -> Self {
        // INVARIANT: guaranteed by the caller.
        Self {
            // SAFETY: `page` is valid for the chosen lifetime (the caller's
            // guarantee).
            page: unsafe { BorrowedPage::from_raw(page) },
        }
    }

    /// Copies the page into `dst` (up to a page). Never sleeps: usable in
    /// atomic context.
    pub(crate) fn read(&self, dst: &mut [u8]) {
        let len = dst.len().min(kernel::page::PAGE_SIZE);
        // SAFETY: `dst` is writable for `len` bytes, and nobody writes the
        // page during the call (type invariant). `len` is at most a page, so
        // the bounds check cannot fail.
        let _ = unsafe { self.page.read_raw(dst.as_mut_ptr(), 0, len) };
    }

    /// Overwrites the page with `src` (up to a page).
    pub(crate) fn write(&mut self, src: &[u8]) {
        let len = src.len().min(kernel::page::PAGE_SIZE);
        // SAFETY: `src` is readable for `len` bytes, and the page is being
        // read in by the caller of the operation, which nobody else reads or
        // writes until it returns (type invariant). `len` is at most a page.
        let _ = unsafe { self.page.write_raw(src.as_ptr(), 0, len) };
    }
}
