// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vtmem-api: the control API of `vtmemd`, shared by the daemon, `vtmemctl`,
//! the test kit and the guest simulator.
//!
//! - [`types`]: one validated type per concept ([`VmName`], [`ByteSize`],
//!   [`Quota`], [`Weight`], [`DedupGroup`]); the UUID type is the protocol's.
//! - [`spec`]: [`VmSpec`], one VM's settings, from every source by one parser.
//! - [`request`]: the typed [`Request`], its one wire shape, and the result
//!   types.
//! - [`client`]: a blocking control-socket [`Client`].
//!
//! The specification is `docs/control-api.md`.

#![forbid(unsafe_code)]

pub mod client;
pub mod request;
pub mod spec;
pub mod types;

pub use client::{Client, ClientError};

pub use request::{
    DeviceStats, Recovery, Request, StatusReport, VmDetails, VmInfo, CONTROL_API_VERSION, MAX_LINE,
};
pub use spec::{SpecError, VmSpec};
pub use types::{ByteSize, DedupGroup, Principal, Quota, SocketMode, ValueError, VmName, Weight};
pub use vtmem_protocol::Uuid;
pub use vtmem_store::{ClientStats, OpCounters, PoolStats, StoreStats};

/// File name of the default control socket inside the socket directory.
pub const DEFAULT_CONTROL_SOCKET_NAME: &str = "vtmemd.ctl";
/// The usual socket directory (`vtmemd --socket-dir`), as the
/// documentation and packaging use it.
pub const DEFAULT_SOCKET_DIR: &str = "/run/vtmem";
/// The control socket of a `vtmemd` using [`DEFAULT_SOCKET_DIR`]: where
/// `vtmemctl` looks by default.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/vtmem/vtmemd.ctl";
/// The environment variable naming the control socket for `vtmemctl`.
pub const CONTROL_SOCKET_ENV: &str = "VTMEM_CONTROL_SOCKET";

#[cfg(test)]
mod tests {
    #[test]
    fn default_control_socket_is_in_the_default_directory() {
        assert_eq!(
            super::DEFAULT_CONTROL_SOCKET,
            format!(
                "{}/{}",
                super::DEFAULT_SOCKET_DIR,
                super::DEFAULT_CONTROL_SOCKET_NAME
            )
        );
    }
}
