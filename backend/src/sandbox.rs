// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The sandbox `vtmemd` enters once it serves: no new privileges, no
//! capabilities, optionally another user, and a seccomp allow-list of
//! system calls.
//!
//! It comes in two steps around [`crate::launch`]:
//!
//! 1. [`prepare`], before any thread starts (so that every thread inherits
//!    what it sets): sets no-new-privileges, empties the capability
//!    bounding and ambient sets, and, unless the process is to switch to a
//!    non-root user afterwards, switches group (`--group`) and empties the
//!    effective, permitted and inheritable sets (keeping `CAP_CHOWN` alone
//!    when VMs at start have socket owners to be given their sockets). It
//!    also compiles the
//!    seccomp filters, so that a filter that cannot be built stops the
//!    start before anything listens.
//! 2. [`Prepared::enter`], once every socket listens: switches to
//!    `--user`/`--group` if asked (in every thread: the C library's
//!    `setresuid` and friends change all threads of the process, and the
//!    kernel clears each thread's capabilities when it leaves uid 0), then
//!    installs the filters in every thread (`SECCOMP_FILTER_FLAG_TSYNC`);
//!    threads started later inherit them.
//!
//! The allow-list ([`allowed_syscalls`]) is what the daemon's own code,
//! the rust-vmm crates, the standard library and the C library call while
//! serving: vhost-user messages (`recvmsg` with descriptors, `mmap` of
//! guest memory), eventfds, epoll, threads started per connection and per
//! VM added at run time, sockets bound and removed at run time, the state
//! file, the state directory's files, signals, logging, and the abort of a panic. A call outside it
//! kills the process (`SECCOMP_RET_KILL_PROCESS`): a half-dead daemon, one
//! of whose threads died holding a lock of the shared store, would be
//! worse than a dead one, and the kernel names the call in its log.
//! `--sandbox=log` lets such calls through and has the kernel log them
//! instead, to find what a new code path needs.

use std::collections::BTreeMap;
use std::io;

use log::{info, warn};
use rustix::thread::{CapabilitySet, CapabilitySets};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::Deserialize;

/// How much of the sandbox `vtmemd` enters (`--sandbox`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// Everything; a system call outside the allow-list kills the process.
    #[default]
    Enforce,
    /// Everything, but a system call outside the allow-list is allowed and
    /// logged by the kernel (to build or check the list).
    Log,
    /// No sandbox at all (debugging); `--user`/`--group` still apply.
    None,
}

impl SandboxMode {
    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxMode::Enforce => "enforce",
            SandboxMode::Log => "log",
            SandboxMode::None => "none",
        }
    }
}

/// The sandbox settings of a [`crate::DaemonConfig`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SandboxConfig {
    /// `--sandbox`.
    pub mode: SandboxMode,
    /// `--user`, resolved: the uid to run as once the sockets listen.
    pub uid: Option<u32>,
    /// `--group` (or the user's primary group), resolved.
    pub gid: Option<u32>,
}

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A `prctl` or `capset` failed.
    #[error("sandbox: cannot {0}: {1}")]
    Setup(&'static str, io::Error),
    /// The credentials cannot be changed.
    #[error("cannot switch to {0}: {1} (switching user or group needs root)")]
    Credentials(String, io::Error),
    /// Capabilities that should be gone are still there.
    #[error("sandbox: capabilities left after switching to uid {0}: {1:#x}")]
    CapabilitiesLeft(u32, u64),
    /// The seccomp filter cannot be built or installed.
    #[error("sandbox: seccomp: {0}")]
    Seccomp(String),
}

fn setup(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> SandboxError {
    move |e| SandboxError::Setup(what, e.into())
}

/// What [`prepare`] did, and what [`Prepared::enter`] still has to do.
#[derive(Debug)]
pub struct Prepared {
    mode: SandboxMode,
    /// A switch to a non-root uid left for [`Prepared::enter`].
    switch: Option<(u32, u32)>,
    /// The filters, in the order they are installed.
    filters: Vec<BpfProgram>,
    /// Whether the bounding set could be emptied.
    bounding_cleared: bool,
}

/// The first step: call before any thread starts (see the module
/// documentation). `control_group` is the group the control socket will be
/// given: a process that drops its capabilities now joins it instead, so
/// that it may still hand the socket to it. `keep_chown`: VMs at start
/// have a `socket-user` or `socket-group`, so a process that keeps its
/// user keeps `CAP_CHOWN`, and only it, to give their sockets (and those
/// of VMs added later) to them.
pub fn prepare(
    config: &SandboxConfig,
    control_group: Option<u32>,
    keep_chown: bool,
) -> Result<Prepared, SandboxError> {
    let enforce = config.mode != SandboxMode::None;
    let euid = rustix::process::geteuid().as_raw();
    let switch = match config.uid {
        Some(uid) if uid != 0 && uid != euid => {
            let gid = config.gid.unwrap_or(rustix::process::getegid().as_raw());
            Some((uid, gid))
        }
        _ => None,
    };
    if let Some((uid, _)) = switch {
        // Fail now rather than once everything listens.
        let caps = rustix::thread::capabilities(None).map_err(setup("read the capabilities"))?;
        if !caps
            .effective
            .contains(CapabilitySet::SETUID | CapabilitySet::SETGID)
        {
            let e = io::Error::from(rustix::io::Errno::PERM);
            return Err(SandboxError::Credentials(format!("uid {uid}"), e));
        }
    }
    let filters = if enforce {
        let mismatch = match config.mode {
            SandboxMode::Log => SeccompAction::Log,
            _ => SeccompAction::KillProcess,
        };
        build_filters(mismatch)?
    } else {
        Vec::new()
    };
    let mut bounding_cleared = false;
    if enforce {
        rustix::thread::set_no_new_privs(true).map_err(setup("set no-new-privileges"))?;
        bounding_cleared = clear_bounding_set()?;
        match rustix::thread::clear_ambient_capability_set() {
            // Kernels before 4.3 have no ambient set.
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(setup("clear the ambient capabilities")(e)),
        }
    }
    if switch.is_none() {
        early_group(config.gid, if enforce { control_group } else { None })?;
        if enforce {
            let caps =
                rustix::thread::capabilities(None).map_err(setup("read the capabilities"))?;
            let keep = if keep_chown {
                caps.permitted & CapabilitySet::CHOWN
            } else {
                CapabilitySet::empty()
            };
            drop_capabilities(keep)?;
        }
    } else if enforce {
        // Keep what binding and the switch need until the switch, which
        // takes the rest away; the inheritable set goes now.
        let caps = rustix::thread::capabilities(None).map_err(setup("read the capabilities"))?;
        drop_capabilities(caps.permitted)?;
    }
    Ok(Prepared {
        mode: config.mode,
        switch,
        filters,
        bounding_cleared,
    })
}

impl Prepared {
    /// The second step: call once every socket listens.
    pub fn enter(self) -> Result<(), SandboxError> {
        if let Some((uid, gid)) = self.switch {
            creds::switch_all_threads(uid, gid)?;
            let caps =
                rustix::thread::capabilities(None).map_err(setup("read the capabilities"))?;
            let left = caps.effective | caps.permitted;
            if self.mode != SandboxMode::None && !left.is_empty() {
                return Err(SandboxError::CapabilitiesLeft(uid, left.bits()));
            }
            info!("running as uid {uid}, gid {gid}");
        }
        if self.mode == SandboxMode::None {
            warn!("sandbox: none (--sandbox=none)");
            return Ok(());
        }
        // Read before the filter, which does not allow capget.
        let caps = rustix::thread::capabilities(None).map_err(setup("read the capabilities"))?;
        let left = caps.effective | caps.permitted;
        for filter in &self.filters {
            seccompiler::apply_filter_all_threads(filter)
                .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
        }
        info!(
            "sandbox: {} (seccomp allow-list of {} system calls, no new privileges, capabilities {}{})",
            self.mode.as_str(),
            allowed_syscalls().len(),
            if left.is_empty() {
                "none".to_string()
            } else {
                format!("{:#x}", left.bits())
            },
            if self.bounding_cleared {
                ", bounding set empty"
            } else {
                ""
            }
        );
        Ok(())
    }
}

/// Empties the bounding set if the process may (it needs `CAP_SETPCAP`);
/// returns whether it did.
fn clear_bounding_set() -> Result<bool, SandboxError> {
    let caps = rustix::thread::capabilities(None).map_err(setup("read the capabilities"))?;
    if !caps.effective.contains(CapabilitySet::SETPCAP) {
        // Without it the bounding set cannot shrink. It matters only to
        // execve, which no-new-privileges and the filter rule out.
        return Ok(false);
    }
    for bit in 0..64 {
        let cap = CapabilitySet::from_bits_retain(1 << bit);
        match rustix::thread::capability_is_in_bounding_set(cap) {
            Ok(true) => rustix::thread::remove_capability_from_bounding_set(cap)
                .map_err(setup("drop a capability from the bounding set"))?,
            Ok(false) => {}
            // Past the last capability this kernel knows.
            Err(_) => break,
        }
    }
    Ok(true)
}

/// Sets the effective and permitted sets to `keep` (a subset of the
/// permitted set) and empties the inheritable set, in the calling thread.
fn drop_capabilities(keep: CapabilitySet) -> Result<(), SandboxError> {
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(setup("drop capabilities"))
}

/// The group change made before any thread starts (no switch to another
/// user follows): `gid` if given; and membership of the control socket's
/// group, so that the socket can be given to it without `CAP_CHOWN`. Only
/// the calling thread changes, which is the whole process at this point.
fn early_group(gid: Option<u32>, control_group: Option<u32>) -> Result<(), SandboxError> {
    use rustix::process::Gid;
    let caps = rustix::thread::capabilities(None).map_err(setup("read the capabilities"))?;
    let can_setgid = caps.effective.contains(CapabilitySet::SETGID);
    let egid = rustix::process::getegid().as_raw();
    let current = rustix::process::getgroups().map_err(setup("read the groups"))?;
    let mut groups: Vec<u32> = match gid {
        Some(g) => vec![g],
        None => current.iter().map(|g| g.as_raw()).collect(),
    };
    let primary = gid.unwrap_or(egid);
    if let Some(cg) = control_group {
        if can_setgid && cg != primary && !groups.contains(&cg) {
            groups.push(cg);
        }
    }
    let changed = gid.is_some_and(|g| g != egid)
        || groups != current.iter().map(|g| g.as_raw()).collect::<Vec<_>>();
    if !changed {
        return Ok(());
    }
    let name = || format!("gid {primary}");
    let raw: Vec<Gid> = groups.iter().map(|&g| Gid::from_raw(g)).collect();
    rustix::thread::set_thread_groups(&raw)
        .map_err(|e| SandboxError::Credentials(name(), e.into()))?;
    if let Some(g) = gid {
        let g = Gid::from_raw(g);
        rustix::thread::set_thread_res_gid(g, g, g)
            .map_err(|e| SandboxError::Credentials(name(), e.into()))?;
    }
    Ok(())
}

/// Credential changes that must reach every thread of the process.
///
/// The kernel changes the credentials of the calling thread only; the C
/// library's `setgroups`, `setresgid` and `setresuid` run the system call
/// in every thread of the process (glibc and musl both do), which rustix
/// does not offer. They are `unsafe` in the `libc` crate as every foreign
/// function is, hence this module's exception to the crate's
/// `deny(unsafe_code)`.
#[allow(unsafe_code)]
mod creds {
    use super::SandboxError;
    use std::io;

    /// Switches every thread to `uid` and `gid`, with `gid` as the only
    /// supplementary group.
    pub(super) fn switch_all_threads(uid: u32, gid: u32) -> Result<(), SandboxError> {
        let fail = |what: String| move |e: io::Error| SandboxError::Credentials(what, e);
        let groups = [gid as libc::gid_t];
        // SAFETY: `groups` is a valid array of one gid for the call.
        let r = unsafe { libc::setgroups(groups.len(), groups.as_ptr()) };
        check(r).map_err(fail(format!("gid {gid}")))?;
        // SAFETY: plain system call wrapper taking integers.
        let r = unsafe { libc::setresgid(gid, gid, gid) };
        check(r).map_err(fail(format!("gid {gid}")))?;
        // SAFETY: plain system call wrapper taking integers.
        let r = unsafe { libc::setresuid(uid, uid, uid) };
        check(r).map_err(fail(format!("uid {uid}")))
    }

    fn check(r: libc::c_int) -> io::Result<()> {
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// A rule matched only when argument `arg` (32 bits) compares to `value`.
fn arg32(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompRule, SandboxError> {
    let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    SeccompRule::new(vec![cond]).map_err(|e| SandboxError::Seccomp(e.to_string()))
}

/// Why a system call may be made, and under which condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Any arguments.
    Any,
    /// `mmap`, `mprotect`: never executable memory (`PROT_EXEC` clear).
    NotExecutable,
    /// `clone`: a thread (`CLONE_THREAD`), never a process.
    Thread,
    /// `prctl`: `PR_SET_NAME` only (thread names).
    SetName,
    /// `ioctl`: `FIONBIO` only (blocking mode of a socket).
    NonBlocking,
    /// `socket`: `AF_UNIX` only (connecting to a VM socket).
    Unix,
    /// `tgkill`: this process's threads only (`abort`).
    OwnProcess,
}

/// The allow-list: every system call `vtmemd` makes once it serves, by
/// name, with its condition.
pub fn allowed_syscalls() -> Vec<(&'static str, i64, Condition)> {
    use Condition::*;
    macro_rules! sys {
        ($name:ident) => {
            sys!($name, Any)
        };
        ($name:ident, $cond:expr) => {
            (stringify!($name), libc_sys::$name, $cond)
        };
    }
    #[allow(unused_mut)]
    let mut list = vec![
        // Memory: the allocator, thread stacks, guest memory (SET_MEM_TABLE).
        sys!(brk),
        sys!(mmap, NotExecutable),
        sys!(mprotect, NotExecutable),
        sys!(munmap),
        sys!(mremap),
        sys!(madvise),
        // Threads (per VM, connection and queue) and their synchronisation.
        sys!(clone, Thread),
        // Allowed here, but answered ENOSYS by the second filter, so that
        // the C library falls back to `clone`, whose flags can be checked.
        sys!(clone3),
        sys!(set_robust_list),
        sys!(rseq),
        sys!(sigaltstack),
        sys!(prctl, SetName),
        sys!(sched_getaffinity),
        sys!(sched_yield),
        sys!(futex),
        sys!(gettid),
        sys!(getpid),
        sys!(getrandom),
        sys!(exit),
        sys!(exit_group),
        // Time: busy-polling, timestamps, back-off sleeps.
        sys!(clock_gettime),
        sys!(clock_nanosleep),
        sys!(nanosleep),
        // Signals: waiting for SIGINT/SIGTERM, abort() after a panic.
        sys!(rt_sigprocmask),
        sys!(rt_sigtimedwait),
        sys!(rt_sigaction),
        sys!(rt_sigreturn),
        sys!(restart_syscall),
        sys!(tgkill, OwnProcess),
        // Descriptors: vhost-user messages, eventfds, epoll, logging.
        sys!(read),
        sys!(readv),
        sys!(write),
        sys!(writev),
        sys!(close),
        sys!(fcntl),
        sys!(ioctl, NonBlocking),
        sys!(eventfd2),
        sys!(epoll_create1),
        sys!(epoll_ctl),
        sys!(epoll_pwait),
        // Sockets: VM sockets added at run time, control and metrics
        // connections, vhost-user messages with descriptors.
        sys!(socket, Unix),
        sys!(bind),
        sys!(listen),
        sys!(connect),
        sys!(accept4),
        sys!(getsockname),
        sys!(getsockopt),
        sys!(setsockopt),
        sys!(shutdown),
        sys!(recvfrom),
        sys!(recvmsg),
        sys!(sendto),
        sys!(sendmsg),
        // Files: the state file, socket files placed and removed.
        sys!(openat),
        sys!(fstat),
        sys!(newfstatat),
        sys!(statx),
        sys!(lseek),
        sys!(fsync),
        sys!(fdatasync),
        sys!(renameat),
        sys!(renameat2),
        sys!(linkat),
        sys!(unlinkat),
        sys!(getdents64),
        // The state directory's files (`--state-dir`): the arena's extents
        // punched when freed, journals made at their size and written
        // mapped (`mmap` above), records of the clients file and chunk
        // directory written in place, snapshots renamed over the old.
        sys!(pread64),
        sys!(pwrite64),
        sys!(ftruncate),
        sys!(fallocate),
        sys!(flock),
        sys!(msync),
        // A VM socket added at run time: created 0600 (umask), given its
        // mode and owner (chown needs a capability vtmemd no longer has, so
        // it fails with EPERM and the add is refused cleanly).
        sys!(umask),
        sys!(fchmodat),
        sys!(fchownat),
    ];
    // The older calls the C library still uses on x86-64 (`epoll_wait`,
    // `rename`, `unlink`), which other architectures lack.
    #[cfg(target_arch = "x86_64")]
    list.extend([
        sys!(epoll_wait),
        sys!(rename),
        sys!(unlink),
        sys!(chmod),
        sys!(chown),
    ]);
    list
}

/// The system call numbers of the target, by name.
#[allow(non_upper_case_globals)]
mod libc_sys {
    macro_rules! numbers {
        ($($name:ident => $sys:ident),* $(,)?) => {
            $(pub(super) const $name: i64 = libc::$sys as i64;)*
        };
    }
    numbers! {
        brk => SYS_brk, mmap => SYS_mmap, mprotect => SYS_mprotect, munmap => SYS_munmap,
        mremap => SYS_mremap, madvise => SYS_madvise, clone => SYS_clone, clone3 => SYS_clone3,
        set_robust_list => SYS_set_robust_list, rseq => SYS_rseq, sigaltstack => SYS_sigaltstack,
        prctl => SYS_prctl, sched_getaffinity => SYS_sched_getaffinity,
        sched_yield => SYS_sched_yield, futex => SYS_futex, gettid => SYS_gettid,
        getpid => SYS_getpid, getrandom => SYS_getrandom, exit => SYS_exit,
        exit_group => SYS_exit_group, clock_gettime => SYS_clock_gettime,
        clock_nanosleep => SYS_clock_nanosleep, nanosleep => SYS_nanosleep,
        rt_sigprocmask => SYS_rt_sigprocmask, rt_sigtimedwait => SYS_rt_sigtimedwait,
        rt_sigaction => SYS_rt_sigaction, rt_sigreturn => SYS_rt_sigreturn,
        restart_syscall => SYS_restart_syscall, tgkill => SYS_tgkill, read => SYS_read,
        readv => SYS_readv, write => SYS_write, writev => SYS_writev, close => SYS_close,
        fcntl => SYS_fcntl, ioctl => SYS_ioctl, eventfd2 => SYS_eventfd2,
        epoll_create1 => SYS_epoll_create1, epoll_ctl => SYS_epoll_ctl,
        epoll_pwait => SYS_epoll_pwait, socket => SYS_socket, bind => SYS_bind,
        listen => SYS_listen, connect => SYS_connect, accept4 => SYS_accept4,
        getsockname => SYS_getsockname, getsockopt => SYS_getsockopt,
        setsockopt => SYS_setsockopt, shutdown => SYS_shutdown, recvfrom => SYS_recvfrom,
        recvmsg => SYS_recvmsg, sendto => SYS_sendto, sendmsg => SYS_sendmsg,
        openat => SYS_openat, fstat => SYS_fstat, newfstatat => SYS_newfstatat,
        statx => SYS_statx, lseek => SYS_lseek, fsync => SYS_fsync, fdatasync => SYS_fdatasync,
        renameat => SYS_renameat, renameat2 => SYS_renameat2, linkat => SYS_linkat,
        unlinkat => SYS_unlinkat, umask => SYS_umask, fchmodat => SYS_fchmodat,
        fchownat => SYS_fchownat, getdents64 => SYS_getdents64, pread64 => SYS_pread64,
        pwrite64 => SYS_pwrite64, ftruncate => SYS_ftruncate, fallocate => SYS_fallocate,
        flock => SYS_flock, msync => SYS_msync,
    }
    #[cfg(target_arch = "x86_64")]
    numbers! {
        epoll_wait => SYS_epoll_wait, rename => SYS_rename, unlink => SYS_unlink,
        chmod => SYS_chmod, chown => SYS_chown,
    }
}

/// The rules of one allowed call.
fn rules(cond: Condition, pid: u32) -> Result<Vec<SeccompRule>, SandboxError> {
    use SeccompCmpOp::{Eq, MaskedEq};
    let exec = libc::PROT_EXEC as u64;
    Ok(match cond {
        Condition::Any => Vec::new(),
        Condition::NotExecutable => vec![arg32(2, MaskedEq(exec), 0)?],
        Condition::Thread => {
            let thread = libc::CLONE_THREAD as u64;
            vec![arg32(0, MaskedEq(thread), thread)?]
        }
        Condition::SetName => vec![arg32(0, Eq, libc::PR_SET_NAME as u64)?],
        // FIONBIO's type differs between C libraries.
        #[allow(clippy::unnecessary_cast)]
        Condition::NonBlocking => vec![arg32(1, Eq, libc::FIONBIO as u64)?],
        Condition::Unix => vec![arg32(0, Eq, libc::AF_UNIX as u64)?],
        Condition::OwnProcess => vec![arg32(0, Eq, u64::from(pid))?],
    })
}

/// Compiles the two filters, in the order they are to be installed: the
/// one that answers `clone3` with ENOSYS, then the allow-list (which does
/// not allow installing more filters).
fn build_filters(mismatch: SeccompAction) -> Result<Vec<BpfProgram>, SandboxError> {
    let err = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    let pid = std::process::id();
    let mut allow = BTreeMap::new();
    for (_, nr, cond) in allowed_syscalls() {
        allow.insert(nr, rules(cond, pid)?);
    }
    let allow = SeccompFilter::new(allow, mismatch, SeccompAction::Allow, arch).map_err(err)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc_sys::clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(err)?;
    [clone3, allow]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(err))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_names_each_call_once() {
        let list = allowed_syscalls();
        let mut names: Vec<_> = list.iter().map(|(n, _, _)| *n).collect();
        let mut numbers: Vec<_> = list.iter().map(|(_, nr, _)| *nr).collect();
        names.sort_unstable();
        names.dedup();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(names.len(), list.len());
        assert_eq!(numbers.len(), list.len());
        // What would undo the sandbox is not there.
        for bad in [
            "execve", "execveat", "ptrace", "seccomp", "setuid", "capset", "fork",
        ] {
            assert!(!names.contains(&bad), "{bad}");
        }
    }

    #[test]
    fn filters_compile() {
        for mismatch in [SeccompAction::KillProcess, SeccompAction::Log] {
            let filters = build_filters(mismatch).unwrap();
            assert_eq!(filters.len(), 2);
            assert!(filters.iter().all(|f| !f.is_empty()));
        }
    }

    #[test]
    fn modes_parse() {
        use clap::ValueEnum;
        for mode in [SandboxMode::Enforce, SandboxMode::Log, SandboxMode::None] {
            assert_eq!(SandboxMode::from_str(mode.as_str(), false), Ok(mode));
        }
        assert_eq!(SandboxMode::default(), SandboxMode::Enforce);
    }
}
