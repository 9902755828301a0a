// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vtmem-guestsim: plays both a VMM and a guest's vtmem driver against a
//! real `vtmemd` over vhost-user.
//!
//! The VMM half ([`Vm::connect`]) negotiates features, reads the
//! configuration space, shares a memfd as guest RAM and sets up split rings
//! with kick and call eventfds, like QEMU. The driver half lays out rings
//! and buffers in that RAM, builds descriptor chains with the protocol
//! crate's encoders, notifies the device only when `EVENT_IDX` says so,
//! sleeps on the call eventfd, and checks every response.
//!
//! [`raw`] builds malformed chains; [`bench`], [`multivm`] and [`migrate`]
//! measure, with
//! a `vtmemd` started by the test kit's fixture ([`daemon`]).

pub mod bench;
pub mod daemon;
pub mod memory;
pub mod migrate;
pub mod multivm;
pub mod pages;
pub mod queue;
pub mod raw;
pub mod ring;
mod sys;
pub mod upgrade;
pub mod vm;

pub use queue::{Completion, PageSource, Queue, QueueConfig, QueueStats, RawCompletion, Ticket};
pub use raw::{RawChainBuilder, RawOutcome};
pub use ring::{Link, RawDescriptor};
pub use vm::{DirtyLog, GuestPages, Negotiated, Vm, VmOptions};
pub use vtmem_protocol::{Handle, ObjectId, Op, OpStatus, PoolSpec, Status, PAGE_SIZE};

use std::time::Duration;

/// One page of data.
pub type Page = [u8; PAGE_SIZE];

/// Everything that can go wrong while simulating a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest memory could not be created.
    #[error("guest memory: {0}")]
    Memory(#[source] std::io::Error),
    /// An address outside guest memory was used by the driver itself.
    #[error("address {0:#x} is outside guest memory")]
    OutOfGuestMemory(u64),
    /// A vhost-user request failed.
    #[error("vhost-user {0}: {1}")]
    Vhost(&'static str, #[source] vhost::Error),
    /// Misuse or impossible setup.
    #[error("{0}")]
    Setup(String),
    /// An I/O error on an eventfd, socket or process.
    #[error("I/O: {0}")]
    Io(#[source] std::io::Error),
    /// Not enough free descriptors for a chain.
    #[error("ring full: chain needs {needed} descriptors, {free} free")]
    RingFull {
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// The device broke the virtio or vtmem protocol.
    #[error("device misbehaved: {0}")]
    Device(String),
    /// The device did not complete a request in time.
    #[error("no completion within {0:?}")]
    Timeout(Duration),
    /// The wire format refused to encode or decode.
    #[error("wire format: {0}")]
    Wire(vtmem_protocol::WireError),
    /// An operation was refused with this status.
    #[error("operation refused: {0}")]
    Status(Status),
    /// A whole request was refused with this status.
    #[error("request refused: {0}")]
    Request(Status),
    /// The daemon could not be started or died.
    #[error("vtmemd: {0}")]
    Daemon(String),
    /// The control socket failed or answered with an error.
    #[error("control socket: {0}")]
    Control(String),
}

/// Result of every fallible call in this crate.
pub type Result<T> = std::result::Result<T, Error>;
