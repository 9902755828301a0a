// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vtmem-protocol: the wire format between a guest's vtmem driver and the
//! host's `vtmemd`.
//!
//! `no_std`, no dependencies, no allocation: the guest kernel module compiles
//! `src/wire.rs` directly, so that file is the single definition of the format
//! for both sides. See `docs/protocol.md` for the specification.

#![no_std]
#![forbid(unsafe_code)]

mod wire;

pub use wire::*;

#[cfg(test)]
mod tests;
