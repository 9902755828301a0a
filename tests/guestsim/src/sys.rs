// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The only place that calls the C library directly: waiting on a file
//! descriptor with a timeout. Everything else in the crate is safe Rust over
//! this wrapper and rustix.
//!
//! `poll` stays on the C library because the descriptors waited on are
//! `vmm_sys_util` event fds (the type the vhost-user frontend takes), which
//! give only a raw descriptor, not the borrowed one rustix's `poll` needs.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use rustix::fs::{MemfdFlags, SealFlags};

/// Creates an anonymous, close-on-exec memory file of `size` bytes: guest RAM
/// that can be handed to the backend with `SET_MEM_TABLE`. Like QEMU's
/// `memory-backend-memfd`, it is sealed against shrinking and growing, so
/// the backend can map it without fearing SIGBUS.
pub fn memfd(name: &CStr, size: u64) -> io::Result<File> {
    let file = unsealed_memfd(name, size)?;
    rustix::fs::fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(file)
}

/// [`memfd`] without the seals: what a careless or hostile VMM could send.
pub fn unsealed_memfd(name: &CStr, size: u64) -> io::Result<File> {
    let file = File::from(rustix::fs::memfd_create(
        name,
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?);
    file.set_len(size)?;
    Ok(file)
}

/// Waits until `fd` is readable or `timeout` passes. Returns whether it is
/// readable. Interrupted waits are retried with the same timeout.
pub fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid pollfd that outlives the call and the count
        // passed is 1, matching the single entry.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(r > 0 && pfd.revents & libc::POLLIN != 0);
    }
}
