// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What `vtmemd` does for a service manager: listening sockets handed over
//! at start (socket activation, as `sd_listen_fds_with_names(3)`), and
//! state notifications (`sd_notify(3)`: `READY=1` once every socket
//! accepts, `STATUS=` lines, `STOPPING=1`).
//!
//! **Inherited sockets.** A service manager that started `vtmemd` for this
//! process (`LISTEN_PID` is its pid) passes `LISTEN_FDS` listening sockets
//! as descriptors 3, 4, ..., and names them in `LISTEN_FDNAMES`
//! (colon-separated; systemd's `FileDescriptorName=`,
//! `systemd-socket-activate --fdname=`). The name `control` is the control
//! socket; any other name is the VM of that name, which the configuration
//! (flags, file or state file) must declare. Each one must be a listening
//! Unix stream socket. [`take_from_env`] reads and clears the three
//! variables (so nothing started later sees them), marks the descriptors
//! close-on-exec and owns them. The service manager keeps its own copy of
//! each socket and its file: `vtmemd` never removes an inherited socket's
//! file, so that connections made while it restarts wait in the socket's
//! queue for the next `vtmemd`.
//!
//! **Notifications** are datagrams to `NOTIFY_SOCKET` (nothing is sent
//! without it): a path, or `@NAME` for an abstract socket, as
//! `sd_notify(3)` defines. One datagram per notification, from the main
//! process (as `NotifyAccess=main` expects), through an unbound
//! `UnixDatagram` of the standard library: `socket(AF_UNIX)` and `sendto`,
//! both in the sandbox's allow-list, so notifications work after the
//! sandbox is in place. (The `sd-notify` crate does the same in as many
//! lines but takes `@NAME` for a path.)

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};

use log::{info, warn};
use rustix::net::{AddressFamily, SocketType};
use vtmem_api::{VmName, VmSpec};

/// The `LISTEN_FDNAMES` name of the control socket.
pub const CONTROL_NAME: &str = "control";

const LISTEN_PID: &str = "LISTEN_PID";
const LISTEN_FDS: &str = "LISTEN_FDS";
const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";

/// What is wrong with the sockets a service manager passed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_PID` is not a number.
    #[error("socket activation: LISTEN_PID='{0}' is not a process id")]
    BadPid(String),
    /// `LISTEN_FDS` is not a number.
    #[error("socket activation: LISTEN_FDS='{0}' is not a number of descriptors")]
    BadCount(String),
    /// Descriptors without names.
    #[error(
        "socket activation: LISTEN_FDS={0} but LISTEN_FDNAMES is not set: name every socket \
         '{CONTROL_NAME}' or after its VM (FileDescriptorName= in the socket unit, \
         systemd-socket-activate --fdname=NAME:NAME...)"
    )]
    NoNames(usize),
    /// As many names as descriptors, please.
    #[error(
        "socket activation: LISTEN_FDS={fds} but LISTEN_FDNAMES='{names}' names {count} \
         socket(s): give exactly one name per socket"
    )]
    NameCount {
        /// `LISTEN_FDS`.
        fds: usize,
        /// `LISTEN_FDNAMES`.
        names: String,
        /// How many names it holds.
        count: usize,
    },
    /// A name that is neither `control` nor a valid VM name.
    #[error(
        "socket activation: inherited socket named '{0}' is neither '{CONTROL_NAME}' nor a \
         valid VM name"
    )]
    BadName(String),
    /// Two sockets for one VM, or two control sockets.
    #[error("socket activation: two inherited sockets are named '{0}'")]
    Duplicate(String),
    /// A VM socket for a VM nobody declared.
    #[error(
        "socket activation: inherited socket '{0}' is for VM '{0}', which is not configured \
         (declare it with --vm name={0} or a [[vm]] table in the configuration file)"
    )]
    UnknownVm(VmName),
    /// A descriptor that is not a listening Unix stream socket, or missing.
    #[error("socket activation: inherited socket '{name}' (descriptor {fd}): {reason}")]
    BadSocket {
        /// Its name.
        name: String,
        /// Its number.
        fd: usize,
        /// What is wrong.
        reason: String,
    },
    /// The descriptors cannot be taken.
    #[error("socket activation: cannot take the inherited sockets: {0}")]
    Take(String),
}

/// One inherited listening socket.
#[derive(Debug)]
pub struct InheritedSocket {
    /// The socket, in blocking mode, close-on-exec.
    pub listener: UnixListener,
    /// The path it is bound to, as far as the kernel knows (an abstract or
    /// unnamed socket has none).
    pub path: Option<PathBuf>,
    /// Its name in `LISTEN_FDNAMES`.
    pub name: String,
}

impl InheritedSocket {
    /// Where it listens, for log and status lines.
    pub fn describe(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => format!("inherited socket '{}'", self.name),
        }
    }
}

/// The sockets passed by the service manager, by purpose.
#[derive(Debug, Default)]
pub struct Inherited {
    /// The control socket (`control`).
    pub control: Option<InheritedSocket>,
    /// VM sockets, by VM name.
    pub vms: BTreeMap<VmName, InheritedSocket>,
}

impl Inherited {
    /// How many sockets were inherited.
    pub fn len(&self) -> usize {
        self.vms.len() + usize::from(self.control.is_some())
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fails if a VM socket names a VM that `vms` (the configuration in
    /// effect) does not declare.
    pub fn check_vms(&self, vms: &[VmSpec]) -> Result<(), ActivationError> {
        match self
            .vms
            .keys()
            .find(|name| !vms.iter().any(|vm| &vm.name == *name))
        {
            Some(name) => Err(ActivationError::UnknownVm(name.clone())),
            None => Ok(()),
        }
    }
}

/// The names of the sockets passed to process `pid`, from the values of
/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`: `None` when nothing was
/// passed to this process (no `LISTEN_PID`, or another process's).
pub fn parse_env(
    pid: u32,
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
) -> Result<Option<Vec<String>>, ActivationError> {
    let Some(listen_pid) = listen_pid else {
        return Ok(None);
    };
    let for_pid: u32 = listen_pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(listen_pid.to_string()))?;
    if for_pid != pid {
        warn!("LISTEN_PID={for_pid} is not this process ({pid}): ignoring LISTEN_FDS");
        return Ok(None);
    }
    let count = match listen_fds {
        None => 0,
        Some(text) => text
            .trim()
            .parse::<u16>()
            .map(usize::from)
            .map_err(|_| ActivationError::BadCount(text.to_string()))?,
    };
    if count == 0 {
        return Ok(Some(Vec::new()));
    }
    let Some(text) = names else {
        return Err(ActivationError::NoNames(count));
    };
    let list: Vec<String> = text.split(':').map(str::to_string).collect();
    if list.len() != count {
        return Err(ActivationError::NameCount {
            fds: count,
            names: text.to_string(),
            count: list.len(),
        });
    }
    Ok(Some(list))
}

/// Sorts named sockets into the control socket and VM sockets.
fn sort<S>(named: Vec<(String, S)>) -> Result<(Option<S>, BTreeMap<VmName, S>), ActivationError> {
    let mut control = None;
    let mut vms = BTreeMap::new();
    for (name, socket) in named {
        if name == CONTROL_NAME {
            if control.replace(socket).is_some() {
                return Err(ActivationError::Duplicate(name));
            }
            continue;
        }
        let vm: VmName = name
            .parse()
            .map_err(|_| ActivationError::BadName(name.clone()))?;
        if vms.insert(vm, socket).is_some() {
            return Err(ActivationError::Duplicate(name));
        }
    }
    Ok((control, vms))
}

/// Checks that `fd` is a listening Unix stream socket, makes it blocking
/// and close-on-exec, and finds its path.
fn listening_socket(
    fd: OwnedFd,
    name: &str,
    number: usize,
) -> Result<InheritedSocket, ActivationError> {
    let bad = |reason: String| ActivationError::BadSocket {
        name: name.to_string(),
        fd: number,
        reason,
    };
    rustix::io::fcntl_setfd(fd.as_fd(), rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| bad(format!("cannot mark it close-on-exec: {e}")))?;
    match rustix::net::sockopt::socket_domain(&fd) {
        Ok(AddressFamily::UNIX) => {}
        Ok(_) => return Err(bad("not a Unix socket".into())),
        Err(e) => return Err(bad(format!("not a socket ({e})"))),
    }
    if rustix::net::sockopt::socket_type(&fd).map_err(|e| bad(e.to_string()))? != SocketType::STREAM
    {
        return Err(bad("not a stream socket (ListenStream=)".into()));
    }
    if !rustix::net::sockopt::socket_acceptconn(&fd).map_err(|e| bad(e.to_string()))? {
        return Err(bad("not listening".into()));
    }
    let listener = UnixListener::from(fd);
    // The service manager may pass it non-blocking; the accept loops
    // choose their own mode.
    listener
        .set_nonblocking(false)
        .map_err(|e| bad(e.to_string()))?;
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(PathBuf::from));
    Ok(InheritedSocket {
        listener,
        path,
        name: name.to_string(),
    })
}

/// Takes the sockets the service manager passed to this process, if any,
/// and removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` from the
/// environment.
///
/// Call it once, before any thread starts (the environment is changed).
pub fn take_from_env() -> Result<Inherited, ActivationError> {
    let var = |k| std::env::var(k).ok();
    let (pid, fds, names) = (var(LISTEN_PID), var(LISTEN_FDS), var(LISTEN_FDNAMES));
    for k in [LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES] {
        std::env::remove_var(k);
    }
    let Some(names) = parse_env(
        std::process::id(),
        pid.as_deref(),
        fds.as_deref(),
        names.as_deref(),
    )?
    else {
        return Ok(Inherited::default());
    };
    if names.is_empty() {
        return Ok(Inherited::default());
    }
    let fds = crate::sys::take_listen_fds(names.len())
        .map_err(|e| ActivationError::Take(e.to_string()))?;
    let mut named = Vec::with_capacity(names.len());
    for (i, (fd, name)) in fds.into_iter().zip(names).enumerate() {
        let socket = listening_socket(fd, &name, i + crate::sys::LISTEN_FDS_START as usize)?;
        named.push((name, socket));
    }
    let (control, vms) = sort(named)?;
    let inherited = Inherited { control, vms };
    for s in inherited.control.iter().chain(inherited.vms.values()) {
        info!("inherited socket '{}': {}", s.name, s.describe());
    }
    Ok(inherited)
}

/// One state change told to the service manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifyState<'a> {
    /// `READY=1`: every socket accepts connections.
    Ready,
    /// `STOPPING=1`: shutting down.
    Stopping,
    /// `STATUS=...`: one line for `systemctl status`.
    Status(&'a str),
}

/// The datagram that carries `states`: one `KEY=VALUE` line each (a
/// status's line breaks become spaces).
pub fn message(states: &[NotifyState<'_>]) -> String {
    let mut text = String::new();
    for s in states {
        match s {
            NotifyState::Ready => text.push_str("READY=1\n"),
            NotifyState::Stopping => text.push_str("STOPPING=1\n"),
            NotifyState::Status(line) => {
                text.push_str("STATUS=");
                text.extend(line.chars().map(|c| if c == '\n' { ' ' } else { c }));
                text.push('\n');
            }
        }
    }
    text
}

/// Sends `states` to the socket `target` names (a path, or `@NAME`).
pub fn send_to(target: &std::ffi::OsStr, states: &[NotifyState<'_>]) -> io::Result<()> {
    let text = message(states);
    let sock = UnixDatagram::unbound()?;
    let sent = match target.as_bytes() {
        [b'@', name @ ..] => {
            sock.send_to_addr(text.as_bytes(), &SocketAddr::from_abstract_name(name)?)?
        }
        [b'/', ..] => sock.send_to(text.as_bytes(), Path::new(target))?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "NOTIFY_SOCKET='{}' is neither an absolute path nor @NAME",
                    target.to_string_lossy()
                ),
            ))
        }
    };
    if sent == text.len() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "notification cut short",
        ))
    }
}

/// Sends `states` to the service manager, if one listens (`NOTIFY_SOCKET`);
/// a failure is logged, never fatal.
pub fn notify(states: &[NotifyState<'_>]) {
    if let Some(target) = std::env::var_os("NOTIFY_SOCKET") {
        if let Err(e) = send_to(&target, states) {
            warn!("cannot notify the service manager: {e}");
        }
    }
}

/// The `STATUS=` text of a daemon that serves: VMs, connections, host
/// memory.
pub fn serving(daemon: &crate::daemon::Daemon) -> String {
    let vms = daemon.vms();
    let connected = vms.iter().filter(|vm| vm.is_connected()).count();
    let store = daemon.store();
    format!(
        "serving {} VM(s), {} connected; host memory {} of {}",
        vms.len(),
        connected,
        vtmem_ctl::format::bytes(store.host_used()),
        vtmem_ctl::format::bytes(store.host_limit()),
    )
}

/// Sends a `STATUS=` line.
pub fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Option<Vec<String>> {
        Some(list.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn env_for_this_process() {
        assert_eq!(parse_env(7, None, Some("2"), Some("a:b")), Ok(None));
        assert_eq!(parse_env(7, Some("8"), Some("2"), Some("a:b")), Ok(None));
        assert_eq!(
            parse_env(7, Some("7"), Some("2"), Some("control:vm1")),
            Ok(names(&["control", "vm1"]))
        );
        assert_eq!(parse_env(7, Some("7"), None, None), Ok(names(&[])));
        assert_eq!(parse_env(7, Some("7"), Some("0"), None), Ok(names(&[])));
    }

    #[test]
    fn env_errors_say_what_is_wrong() {
        assert_eq!(
            parse_env(7, Some("seven"), Some("1"), Some("a")),
            Err(ActivationError::BadPid("seven".into()))
        );
        assert_eq!(
            parse_env(7, Some("7"), Some("-1"), Some("a")),
            Err(ActivationError::BadCount("-1".into()))
        );
        assert_eq!(
            parse_env(7, Some("7"), Some("2"), None),
            Err(ActivationError::NoNames(2))
        );
        let e = parse_env(7, Some("7"), Some("2"), Some("control")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "socket activation: LISTEN_FDS=2 but LISTEN_FDNAMES='control' names 1 socket(s): \
             give exactly one name per socket"
        );
    }

    #[test]
    fn names_sort_into_control_and_vms() {
        let (control, vms) = sort(vec![
            ("vm1".to_string(), 1),
            ("control".to_string(), 2),
            ("vm2".to_string(), 3),
        ])
        .unwrap();
        assert_eq!(control, Some(2));
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[&"vm2".parse::<VmName>().unwrap()], 3);
        assert_eq!(
            sort(vec![("control".to_string(), 1), ("control".to_string(), 2)]).unwrap_err(),
            ActivationError::Duplicate("control".into())
        );
        assert_eq!(
            sort(vec![("a".to_string(), 1), ("a".to_string(), 2)]).unwrap_err(),
            ActivationError::Duplicate("a".into())
        );
        assert_eq!(
            sort(vec![("no/slash".to_string(), 1)]).unwrap_err(),
            ActivationError::BadName("no/slash".into())
        );
        assert!(matches!(
            sort(vec![(String::new(), 1)]).unwrap_err(),
            ActivationError::BadName(_)
        ));
    }

    #[test]
    fn notifications_reach_paths_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let states = [NotifyState::Ready, NotifyState::Status("two\nlines")];
        send_to(path.as_os_str(), &states).unwrap();
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=two lines\n");

        let name = format!("vtmem-test-notify-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(format!("@{name}").as_ref(), &[NotifyState::Stopping]).unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");

        let e = send_to("relative".as_ref(), &[NotifyState::Ready]).unwrap_err();
        assert!(e.to_string().contains("neither an absolute path"), "{e}");
    }

    #[test]
    fn vms_must_be_configured() {
        let listener = |dir: &std::path::Path, n: &str| InheritedSocket {
            listener: UnixListener::bind(dir.join(n)).unwrap(),
            path: None,
            name: n.to_string(),
        };
        let dir = tempfile::tempdir().unwrap();
        let mut inh = Inherited::default();
        inh.vms
            .insert("vm1".parse().unwrap(), listener(dir.path(), "vm1"));
        let declared: Vec<VmSpec> = vec!["vm1".parse().unwrap()];
        assert_eq!(inh.check_vms(&declared), Ok(()));
        let e = inh.check_vms(&[]).unwrap_err();
        assert!(
            e.to_string().contains("VM 'vm1', which is not configured"),
            "{e}"
        );
    }
}
