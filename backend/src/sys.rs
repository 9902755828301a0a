// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's system calls that the standard library lacks, behind safe
//! functions: blocking and waiting for termination signals, and binding
//! sockets that appear only once they listen, and that no other user can
//! connect to, even for an instant, when they are private; and taking
//! ownership of the listening sockets a service manager hands over.
//!
//! Everything here goes through rustix's safe API except the signal mask
//! and `sigwait`, which rustix offers only as `unsafe` functions of its
//! `runtime` feature (meant for programs without a C library), and the
//! adoption of inherited descriptors, which only exist as numbers until
//! something owns them. They stay in [`signal`] and [`inherited`], the
//! modules of this file allowed `unsafe` code, with [`cpu`]: a thread's
//! CPU time through the C library (rustix's own `clock_gettime` sets up
//! its vDSO lookup on first use, with system calls the sandbox forbids).

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rustix::fs::{Mode, RenameFlags, CWD};
use rustix::io::Errno;

pub use cpu::thread_cpu_time;
pub use inherited::{take_listen_fds, LISTEN_FDS_START};
pub use signal::{signal_name, SignalSet};

#[allow(unsafe_code)]
mod signal {
    use std::io;

    /// A set of signals blocked in the calling thread (and inherited by
    /// every thread it starts afterwards).
    #[derive(Clone, Copy)]
    pub struct SignalSet {
        set: libc::sigset_t,
    }

    impl std::fmt::Debug for SignalSet {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("SignalSet")
        }
    }

    impl SignalSet {
        /// Blocks SIGINT and SIGTERM in the calling thread. Call before
        /// starting any thread, so that they all inherit the mask and the
        /// signals wait for [`SignalSet::wait`].
        pub fn block_termination() -> io::Result<Self> {
            // SAFETY: sigset_t is a plain C bit set; all-zero bytes is a
            // valid value, and sigemptyset below initialises it properly
            // anyway.
            let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: `set` is a valid, writable sigset_t.
            let r = unsafe { libc::sigemptyset(&mut set) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            for sig in [libc::SIGINT, libc::SIGTERM] {
                // SAFETY: `set` is a valid sigset_t and `sig` a valid
                // signal number.
                let r = unsafe { libc::sigaddset(&mut set, sig) };
                if r != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // SAFETY: `set` is initialised; a null old-set pointer is
            // allowed.
            let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            Ok(SignalSet { set })
        }

        /// Waits for one of the blocked signals; returns its number.
        pub fn wait(&self) -> io::Result<i32> {
            let mut sig: libc::c_int = 0;
            loop {
                // SAFETY: `self.set` is an initialised sigset_t and `sig`
                // is a valid place for the result.
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
}

#[allow(unsafe_code)]
mod cpu {
    use std::time::Duration;

    /// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`);
    /// zero if the clock cannot be read.
    pub fn thread_cpu_time() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the call writes only it.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
            return Duration::ZERO;
        }
        Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0).min(999_999_999),
        )
    }
}

#[allow(unsafe_code)]
mod inherited {
    use std::io;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The first descriptor a service manager passes (`SD_LISTEN_FDS_START`).
    pub const LISTEN_FDS_START: RawFd = 3;

    /// Set by the first call of [`take_listen_fds`].
    static TAKEN: AtomicBool = AtomicBool::new(false);

    /// Takes ownership of descriptors `3 .. 3 + count`, the ones a service
    /// manager passed to this process (`LISTEN_FDS`, for this process's
    /// `LISTEN_PID`: the caller checks both). Fails if one of them is not
    /// open, and on any call after the first: the descriptors can be owned
    /// only once.
    pub fn take_listen_fds(count: usize) -> io::Result<Vec<OwnedFd>> {
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Err(io::Error::other("inherited sockets were taken already"));
        }
        let end = RawFd::try_from(count)
            .ok()
            .and_then(|n| n.checked_add(LISTEN_FDS_START))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // Check them all before owning any: an OwnedFd of a number that is
        // not open would close whatever later gets that number.
        for fd in LISTEN_FDS_START..end {
            // SAFETY: F_GETFD reads the descriptor flags of `fd`; on a
            // number that is not an open descriptor it fails with EBADF
            // and changes nothing.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(e.kind(), format!("descriptor {fd}: {e}")));
            }
        }
        Ok((LISTEN_FDS_START..end)
            .map(|fd| {
                // SAFETY: `fd` is open (checked above), and nothing else in
                // the process owns it: the service manager passed it for this
                // process to take, the standard library opens no descriptor
                // of its own below those it was started with, and TAKEN
                // makes this the only place that ever adopts these numbers.
                unsafe { OwnedFd::from_raw_fd(fd) }
            })
            .collect())
    }
}

/// Serialises umask changes within this process.
static UMASK_LOCK: Mutex<()> = Mutex::new(());

/// Binds a Unix socket at `path` created with mode 0600 (under a umask of
/// 0177), so that no other user can connect between bind and chmod.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let _guard = UMASK_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let old = rustix::process::umask(Mode::from_raw_mode(0o177));
    let result = UnixListener::bind(path);
    rustix::process::umask(old);
    result
}

/// Longest socket path the kernel takes (`sun_path` less its NUL).
const SUN_PATH_MAX: usize = 107;

/// Creates a listening Unix socket at `path` that appears there only when
/// it is ready: bound and listening under a temporary name in the same
/// directory, given its final owner and mode by `prepare`, then renamed
/// into place. A client (QEMU, a test, a supervisor) that sees the path
/// can connect at once; with a plain bind there is an instant between
/// bind() creating the file and listen() where it gets ECONNREFUSED.
///
/// `private` creates it with mode 0600 (see [`bind_private`]), else under
/// the process umask. Fails with `AlreadyExists` if something appeared at
/// `path` meanwhile: a socket in use is never replaced.
pub fn bind_ready(
    path: &Path,
    private: bool,
    prepare: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<UnixListener> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let bind = |p: &Path| {
        if private {
            bind_private(p)
        } else {
            UnixListener::bind(p)
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp: PathBuf = dir.join(format!(
        ".vtmem-{}-{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    if tmp.as_os_str().len() > SUN_PATH_MAX {
        // No room for a temporary name: bind in place.
        let listener = bind(path)?;
        prepare(path)?;
        return Ok(listener);
    }
    let _ = std::fs::remove_file(&tmp);
    let listener = bind(&tmp)?;
    let placed = prepare(&tmp).and_then(|()| rename_no_replace(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Renames `from` to `to`, failing with `AlreadyExists` if `to` exists.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    match rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        // A filesystem without RENAME_NOREPLACE: link() never replaces.
        Err(Errno::INVAL) | Err(Errno::NOSYS) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vtmem-sys-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn private_socket_mode() {
        let dir = scratch("mode");
        let path = dir.join("p.sock");
        let mut seen = None;
        let _l = bind_ready(&path, true, |tmp| {
            seen = Some(std::fs::metadata(tmp)?.permissions().mode() & 0o777);
            Ok(())
        })
        .unwrap();
        // Private from the start, not only once in place.
        assert_eq!(seen, Some(0o600));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn socket_appears_listening_and_nothing_else_is_left() {
        let dir = scratch("ready");
        let path = dir.join("vm.sock");
        let l = bind_ready(&path, false, |tmp| {
            // Not yet visible at its final path while being prepared.
            assert!(!path.exists());
            assert!(tmp.exists());
            Ok(())
        })
        .unwrap();
        let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(l.accept().is_ok());
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["vm.sock"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_existing_path_is_never_replaced() {
        let dir = scratch("exists");
        let path = dir.join("vm.sock");
        let _first = bind_ready(&path, false, |_| Ok(())).unwrap();
        let err = bind_ready(&path, false, |_| Ok(())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        // The first socket still answers, and no temporary file is left.
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        // A failing `prepare` leaves nothing behind either.
        let other = dir.join("other.sock");
        let err = bind_ready(&other, true, |_| Err(io::Error::other("no"))).unwrap_err();
        assert_eq!(err.to_string(), "no");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
