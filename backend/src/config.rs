// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's validated configuration and the TOML configuration file.
//!
//! VM specs, sizes and names are the control API's validated types
//! ([`vtmem_api`]), so a `--vm` flag, a `[[vm]]` table, an `add-vm`
//! request and the state file go through one parser. Everything here is
//! plain data: nothing opens a socket or touches the store.
//! [`DaemonConfig`] is what [`crate::start`] runs.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vtmem_api::{ByteSize, SpecError, ValueError, VmName, VmSpec};
use vtmem_protocol::MAX_REQUEST_QUEUES;
use vtmem_store::ClientConfig;

pub use crate::sandbox::{SandboxConfig, SandboxMode};

/// Default descriptors per request queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Smallest queue size accepted: a request of one op with its response.
pub const MIN_QUEUE_SIZE: u16 = 4;
/// Largest split virtqueue size.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Default host memory limit when none is configured: 1 GiB.
pub const DEFAULT_HOST_LIMIT: ByteSize = ByteSize(1 << 30);
/// Longest busy-poll window accepted, in microseconds.
pub const MAX_POLL_US: u64 = 100_000;
pub use vtmem_api::{DEFAULT_CONTROL_SOCKET, DEFAULT_CONTROL_SOCKET_NAME, DEFAULT_SOCKET_DIR};
/// Longest path a Unix socket address can hold (`sun_path` minus the NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// A configuration error: one line, naming what is wrong.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A value (size, name, weight...) that does not parse.
    #[error(transparent)]
    Value(#[from] ValueError),
    /// A `--vm` spec that does not parse.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A VM declared twice.
    #[error("VM '{0}' is declared more than once")]
    DuplicateVm(VmName),
    /// `--queues` out of range.
    #[error("invalid number of queues {0}: must be between 1 and {MAX_REQUEST_QUEUES}")]
    BadQueues(u64),
    /// `--queue-size` out of range or not a power of two.
    #[error("invalid queue size {0}: must be a power of two between {MIN_QUEUE_SIZE} and {MAX_QUEUE_SIZE}")]
    BadQueueSize(u64),
    /// `--poll-us` out of range.
    #[error("invalid busy-poll window {0} us: must be at most {MAX_POLL_US}")]
    BadPoll(u64),
    /// A host limit of zero.
    #[error("invalid host limit: must be more than 0 bytes")]
    BadHostLimit,
    /// No socket directory anywhere.
    #[error("no socket directory: give --socket-dir or socket-dir in the configuration file")]
    NoSocketDir,
    /// A socket path longer than a Unix socket address.
    #[error("socket path {0} is longer than {MAX_SOCKET_PATH_LEN} bytes")]
    SocketPathTooLong(PathBuf),
    /// A group that does not exist.
    #[error("unknown group '{0}'")]
    UnknownGroup(String),
    /// The user to run as does not exist.
    #[error("unknown user '{0}'")]
    UnknownUser(String),
    /// The group to run as does not exist.
    #[error("unknown group '{0}'")]
    UnknownRunGroup(String),
    /// A user number with no account, and no group given.
    #[error("user {0} has no entry in /etc/passwd: give --group too")]
    NoPrimaryGroup(u32),
    /// The configuration file cannot be read.
    #[error("cannot read configuration file {0}: {1}")]
    ReadFile(PathBuf, String),
    /// The configuration file does not parse.
    #[error("configuration file {0}: {1}")]
    ParseFile(PathBuf, String),
    /// A metrics address that does not parse or resolve.
    #[error("invalid metrics address '{0}': expected [HOST]:PORT, e.g. 127.0.0.1:9464 or :9464")]
    BadMetricsAddress(String),
}

/// Result of the parsers in this module.
pub type Result<T> = std::result::Result<T, ConfigError>;

/// The store's configuration of a VM's client.
pub fn client_config(vm: &VmSpec) -> ClientConfig {
    ClientConfig {
        persistent_quota: vm.persistent_quota.bytes(),
        ephemeral_quota: vm.ephemeral_quota.bytes(),
        weight: vm.weight.get(),
        dedup_group: vm.dedup_group.as_ref().map(|g| g.as_str().to_string()),
        authorized_uuids: vm.authorized_uuids.iter().copied().collect(),
    }
}

/// The spec of a VM declared as `declared` whose client now has this
/// configuration (the inverse of [`client_config`]; the store only ever
/// holds configurations made from specs, so every field is valid). Name
/// and socket ownership come from `declared`.
pub fn vm_spec(declared: &VmSpec, c: &ClientConfig) -> VmSpec {
    let mut vm = declared.clone();
    vm.persistent_quota = c.persistent_quota.into();
    vm.ephemeral_quota = c.ephemeral_quota.into();
    if let Ok(w) = vtmem_api::Weight::new(u64::from(c.weight)) {
        vm.weight = w;
    }
    vm.dedup_group = c.dedup_group.as_deref().and_then(|g| g.parse().ok());
    vm.authorized_uuids = c.authorized_uuids.iter().copied().collect();
    vm
}

/// Settings of the vhost-user device every VM gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSettings {
    /// Request queues (and worker threads) per VM.
    pub queues: u16,
    /// Largest queue size a frontend may set.
    pub queue_size: u16,
    /// Busy-poll window after a queue drains (zero: none).
    pub poll: Duration,
    /// Map guest memory that is not sealed against shrinking (file-backed
    /// memory that cannot be sealed). A VMM that then shrinks the file
    /// kills vtmemd, and with it every VM's pages: see docs/vtmemd.md.
    pub allow_unsealed_memory: bool,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        DeviceSettings {
            queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            poll: Duration::ZERO,
            allow_unsealed_memory: false,
        }
    }
}

/// Checks a queue count.
pub fn validate_queues(n: u64) -> Result<u16> {
    if (1..=u64::from(MAX_REQUEST_QUEUES)).contains(&n) {
        Ok(n as u16)
    } else {
        Err(ConfigError::BadQueues(n))
    }
}

/// Checks a queue size.
pub fn validate_queue_size(n: u64) -> Result<u16> {
    if (u64::from(MIN_QUEUE_SIZE)..=u64::from(MAX_QUEUE_SIZE)).contains(&n) && n.is_power_of_two() {
        Ok(n as u16)
    } else {
        Err(ConfigError::BadQueueSize(n))
    }
}

/// Checks a busy-poll window.
pub fn validate_poll_us(us: u64) -> Result<Duration> {
    if us <= MAX_POLL_US {
        Ok(Duration::from_micros(us))
    } else {
        Err(ConfigError::BadPoll(us))
    }
}

/// Parses `--metrics-address`: `HOST:PORT`, `[V6]:PORT`, `:PORT` or a bare
/// `PORT` (both meaning the loopback address). Port 0 picks a free port.
pub fn parse_metrics_address(s: &str) -> Result<SocketAddr> {
    let bad = || ConfigError::BadMetricsAddress(s.to_string());
    let t = s.trim();
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    if let Some(port) = t
        .strip_prefix(':')
        .or(Some(t).filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())))
    {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(SocketAddr::new(loopback, port));
    }
    if let Ok(addr) = t.parse::<SocketAddr>() {
        return Ok(addr);
    }
    t.to_socket_addrs()
        .map_err(|_| bad())?
        .next()
        .ok_or_else(bad)
}

/// Everything `vtmemd` needs to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Directory of the per-VM sockets `<name>.sock`.
    pub socket_dir: PathBuf,
    /// Path of the control socket.
    pub control_socket: PathBuf,
    /// Group owning the control socket (mode 0660), or none (mode 0600).
    pub control_group: Option<u32>,
    /// Host memory limit of the store.
    pub host_limit: ByteSize,
    /// Device settings shared by all VMs.
    pub device: DeviceSettings,
    /// VMs to serve from the start.
    pub vms: Vec<VmSpec>,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_address: Option<SocketAddr>,
    /// The state file recording run-time changes, if any.
    pub state_file: Option<PathBuf>,
    /// Where the store keeps its crash-safe state (the VMs' persistent
    /// pages), recovered at the next start.
    pub state_dir: Option<PathBuf>,
    /// The sandbox entered once everything listens, and the user to run as.
    pub sandbox: SandboxConfig,
}

impl DaemonConfig {
    /// The socket path of VM `name`.
    pub fn vm_socket_path(socket_dir: &Path, name: &VmName) -> PathBuf {
        socket_dir.join(format!("{name}.sock"))
    }

    /// Cross-field checks: unique VM names, socket path lengths.
    pub fn validate(&self) -> Result<()> {
        let mut names = BTreeSet::new();
        for vm in &self.vms {
            if !names.insert(&vm.name) {
                return Err(ConfigError::DuplicateVm(vm.name.clone()));
            }
            check_socket_path(&Self::vm_socket_path(&self.socket_dir, &vm.name))?;
        }
        check_socket_path(&self.control_socket)?;
        if self.host_limit.bytes() == 0 {
            return Err(ConfigError::BadHostLimit);
        }
        Ok(())
    }
}

/// Fails if `path` cannot be a Unix socket address.
pub fn check_socket_path(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if path.as_os_str().as_bytes().len() > MAX_SOCKET_PATH_LEN {
        Err(ConfigError::SocketPathTooLong(path.to_path_buf()))
    } else {
        Ok(())
    }
}

/// Resolves a group name or number to a gid by reading `/etc/group`.
pub fn resolve_group(group: &str) -> Result<u32> {
    lookup_id("/etc/group", group).ok_or_else(|| ConfigError::UnknownGroup(group.to_string()))
}

/// A number as itself, or the id (third field) of the line of `db` (the
/// `name:x:id:...` format of `/etc/passwd` and `/etc/group`) named `name`.
fn lookup_id(db: &str, name: &str) -> Option<u32> {
    if let Ok(id) = name.parse::<u32>() {
        return Some(id);
    }
    let text = std::fs::read_to_string(db).unwrap_or_default();
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let entry = fields.next()?;
        let id = fields.nth(1)?.parse::<u32>().ok()?;
        (entry == name).then_some(id)
    })
}

/// Resolves a user name or number to its uid and, if it has an entry in
/// `/etc/passwd`, its primary gid.
pub fn resolve_user(user: &str) -> Result<(u32, Option<u32>)> {
    let text = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let number = user.parse::<u32>().ok();
    let entry = text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let uid = fields.nth(1)?.parse::<u32>().ok()?;
        let gid = fields.next()?.parse::<u32>().ok()?;
        (name == user || Some(uid) == number).then_some((uid, gid))
    });
    match (entry, number) {
        (Some((uid, gid)), _) => Ok((uid, Some(gid))),
        (None, Some(uid)) => Ok((uid, None)),
        (None, None) => Err(ConfigError::UnknownUser(user.to_string())),
    }
}

/// Resolves `--user` and `--group` into the sandbox's uid and gid: the
/// group defaults to the user's primary group.
pub fn resolve_credentials(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<(Option<u32>, Option<u32>)> {
    let gid = match group {
        Some(g) => Some(resolve_group(g).map_err(|_| ConfigError::UnknownRunGroup(g.to_string()))?),
        None => None,
    };
    match user {
        Some(u) => {
            let (uid, primary) = resolve_user(u)?;
            let gid = gid.or(primary).ok_or(ConfigError::NoPrimaryGroup(uid))?;
            Ok((Some(uid), Some(gid)))
        }
        None => Ok((None, gid)),
    }
}

/// The TOML configuration file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// Directory of the VM sockets.
    pub socket_dir: Option<PathBuf>,
    /// Control socket path.
    pub control_socket: Option<PathBuf>,
    /// Group of the control socket.
    pub control_group: Option<String>,
    /// Host memory limit.
    pub host_limit: Option<ByteSize>,
    /// Request queues per VM.
    pub queues: Option<u64>,
    /// Queue size.
    pub queue_size: Option<u64>,
    /// Busy-poll window in microseconds.
    pub poll_us: Option<u64>,
    /// Accept guest memory not sealed against shrinking.
    pub allow_unsealed_memory: Option<bool>,
    /// Prometheus metrics address.
    pub metrics_address: Option<String>,
    /// State file.
    pub state_file: Option<PathBuf>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Sandbox mode.
    pub sandbox: Option<SandboxMode>,
    /// User to run as.
    pub user: Option<String>,
    /// Group to run as.
    pub group: Option<String>,
    /// The VMs (`[[vm]]` tables).
    #[serde(default)]
    pub vm: Vec<VmSpec>,
}

impl FileConfig {
    /// Parses configuration text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            let mut msg = e.message().trim().replace('\n', " ");
            if let Some(span) = e.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                msg = format!("line {line}: {msg}");
            }
            ConfigError::ParseFile(path.to_path_buf(), msg)
        })
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::ReadFile(path.to_path_buf(), e.to_string()))?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vtmem_api::{Quota, Weight};

    #[test]
    fn file() {
        let text = r#"
socket-dir = "/run/vtmem"
host-limit = "4G"
queues = 2
poll-us = 50

[[vm]]
name = "vm1"
persistent-quota = "512M"
ephemeral-quota = 1073741824
weight = 200
dedup-group = "web"
authorized-uuids = ["00112233-4455-6677-8899-aabbccddeeff"]

[[vm]]
name = "vm2"
dedup-group = "none"
"#;
        let f = FileConfig::parse(text, Path::new("x.toml")).unwrap();
        assert_eq!(f.socket_dir.as_deref(), Some(Path::new("/run/vtmem")));
        assert_eq!(f.host_limit, Some(ByteSize(4 << 30)));
        assert_eq!(f.vm.len(), 2);
        assert_eq!(f.vm[0].ephemeral_quota, Quota::Limited(ByteSize(1 << 30)));
        assert_eq!(f.vm[0].weight, Weight::new(200).unwrap());
        assert_eq!(f.vm[1].dedup_group, None);
        let err = FileConfig::parse("sockets = 1\n", Path::new("x.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("x.toml") && msg.contains("line 1"), "{msg}");
        assert!(!msg.contains('\n'));
        let err = FileConfig::parse("[[vm]]\nname = \"a\"\nwieght = 3\n", Path::new("x.toml"));
        assert!(err.unwrap_err().to_string().contains("wieght"));
    }

    #[test]
    fn client_config_and_spec_are_inverses() {
        let vm: VmSpec = "vm1,persistent-quota=512M,weight=7,dedup-group=web,auth=00112233445566778899aabbccddeeff"
            .parse()
            .unwrap();
        let c = client_config(&vm);
        assert_eq!(c.persistent_quota, 512 << 20);
        assert_eq!(c.ephemeral_quota, u64::MAX);
        assert_eq!(c.weight, 7);
        assert_eq!(c.dedup_group.as_deref(), Some("web"));
        assert_eq!(vm_spec(&VmSpec::new(vm.name.clone()), &c), vm);
    }

    #[test]
    fn users_and_groups_resolve() {
        assert_eq!(resolve_user("root").unwrap(), (0, Some(0)));
        assert_eq!(resolve_user("1234").unwrap().0, 1234);
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert!(matches!(
            resolve_user("no-such-user-vtmem"),
            Err(ConfigError::UnknownUser(_))
        ));
    }

    #[test]
    fn credentials() {
        assert_eq!(resolve_credentials(None, None).unwrap(), (None, None));
        assert_eq!(
            resolve_credentials(Some("root"), None).unwrap(),
            (Some(0), Some(0))
        );
        assert_eq!(
            resolve_credentials(Some("0"), Some("12345")).unwrap(),
            (Some(0), Some(12345))
        );
        assert_eq!(
            resolve_credentials(None, Some("7")).unwrap(),
            (None, Some(7))
        );
        assert_eq!(
            resolve_credentials(Some("no-such-user-vtmem"), None).unwrap_err(),
            ConfigError::UnknownUser("no-such-user-vtmem".into())
        );
        assert_eq!(
            resolve_credentials(Some("4000000000"), None).unwrap_err(),
            ConfigError::NoPrimaryGroup(4_000_000_000)
        );
        assert_eq!(
            resolve_credentials(None, Some("no-such-group-vtmem")).unwrap_err(),
            ConfigError::UnknownRunGroup("no-such-group-vtmem".into())
        );
        let f = FileConfig::parse(
            "sandbox = \"log\"\nuser = \"vtmem\"\ngroup = \"kvm\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(f.sandbox, Some(SandboxMode::Log));
        assert_eq!(f.user.as_deref(), Some("vtmem"));
        assert!(FileConfig::parse("sandbox = \"off\"\n", Path::new("x.toml")).is_err());
    }

    #[test]
    fn limits() {
        assert!(validate_queues(0).is_err());
        assert!(validate_queues(65).is_err());
        assert_eq!(validate_queues(64).unwrap(), 64);
        assert!(validate_queue_size(100).is_err());
        assert!(validate_queue_size(2).is_err());
        assert_eq!(validate_queue_size(1024).unwrap(), 1024);
        assert!(validate_poll_us(MAX_POLL_US + 1).is_err());
    }
}
