// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vtmem-testkit: what the tests of every vtmem crate share.
//!
//! - [`Vtmemd`]: one daemon fixture. It starts the `vtmemd` binary the
//!   caller names (tests pass `env!("CARGO_BIN_EXE_vtmemd")`, so the binary
//!   is always the one cargo just built) in a private temporary directory,
//!   waits for its readiness line with a deadline, and hands out socket
//!   paths, control connections ([`vtmem_api::Client`]), the log, the pid,
//!   `kill`, a graceful `stop` and `restart`.
//! - [`RawControl`]: whole request lines, for tests of the control wire
//!   format that must send what no typed request can express.
//! - [`run`] and [`CtlOutput`]: a binary run to its end with a deadline,
//!   and the checks every `vtmemctl` test makes on what it printed.
//! - [`wait_until`] and [`with_timeout`]: deadlines instead of sleeps.
//! - [`pages`]: one seeded page generator (random, text, zero and
//!   same-filled pages), one handle builder, and the page checksum.

#![forbid(unsafe_code)]

mod control;
mod daemon;
pub mod pages;
mod process;
mod wait;

pub use control::RawControl;
pub use daemon::{StartError, Vtmemd, READY_PREFIX};
pub use pages::{
    checksum, handle, random_page, same_filled_page, sized_page, text_page, zero_page, Page, Rng,
};
pub use process::{run, CtlOutput};
pub use rustix::process::Signal;
pub use wait::{wait_until, with_timeout};

use std::time::Duration;

/// How long a test waits for the daemon or a tool before it fails: long
/// enough for a loaded two-core machine, short enough to fail rather than
/// hang.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A fresh private directory, removed when dropped.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vtmem-test-")
        .tempdir()
        .expect("creating a temporary directory")
}
