// SPDX-License-Identifier: GPL-2.0

//! The plain-Rust parts of the guest kernel module (`vtmem.ko`), compiled
//! for the host so that `cargo test` checks them. The module is built by
//! Kbuild against the guest kernel, where nothing runs tests; the files
//! included here use `core` only, and the module compiles the very same
//! files (`#[path]`), as it does the protocol's `wire.rs`.
//!
//! - `pagefilter`: which cleancache pages the host may hold (the filter
//!   that spares gets of pages never put). Here its map is a `BTreeMap`;
//!   in the module, the kernel's `RBTree`.

#[cfg(test)]
#[path = "../../src/pagefilter.rs"]
mod pagefilter;

#[cfg(test)]
mod pagefilter_tests;
