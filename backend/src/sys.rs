// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The few raw system calls the daemon needs, behind safe functions:
//! blocking and waiting for termination signals, and binding a socket that
//! no other user can connect to, even for an instant.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Mutex;

/// A set of signals blocked in the calling thread (and inherited by every
/// thread it starts afterwards).
#[derive(Clone, Copy)]
pub struct SignalSet {
    set: libc::sigset_t,
}

impl std::fmt::Debug for SignalSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignalSet")
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(ret))
    }
}

impl SignalSet {
    /// Blocks SIGINT and SIGTERM in the calling thread. Call before
    /// starting any thread, so that they all inherit the mask and the
    /// signals wait for [`SignalSet::wait`].
    pub fn block_termination() -> io::Result<Self> {
        // SAFETY: sigset_t is a plain C bit set; all-zero bytes is a valid
        // value, and sigemptyset below initialises it properly anyway.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, writable sigset_t.
        let r = unsafe { libc::sigemptyset(&mut set) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: `set` is a valid sigset_t and `sig` a valid signal number.
            let r = unsafe { libc::sigaddset(&mut set, sig) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: `set` is initialised; a null old-set pointer is allowed.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        check(r)?;
        Ok(SignalSet { set })
    }

    /// Waits for one of the blocked signals; returns its number.
    pub fn wait(&self) -> io::Result<i32> {
        let mut sig: libc::c_int = 0;
        loop {
            // SAFETY: `self.set` is an initialised sigset_t and `sig` is a
            // valid place for the result.
            let r = unsafe { libc::sigwait(&self.set, &mut sig) };
            match r {
                0 => return Ok(sig),
                libc::EINTR => continue,
                e => return Err(io::Error::from_raw_os_error(e)),
            }
        }
    }
}

/// Name of a signal, for the log.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Serialises umask changes within this process.
static UMASK_LOCK: Mutex<()> = Mutex::new(());

/// Binds a Unix socket at `path` created with mode 0600 (under a umask of
/// 0177), so that no other user can connect between bind and chmod.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let _guard = UMASK_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: umask only changes this process's file creation mask; it
    // cannot fail and has no memory-safety preconditions.
    let old = unsafe { libc::umask(0o177) };
    let result = UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_socket_mode() {
        let dir = std::env::temp_dir().join(format!("vtmem-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.sock");
        let _ = std::fs::remove_file(&path);
        let _l = bind_private(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
