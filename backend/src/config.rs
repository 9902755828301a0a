// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's validated configuration, and the parsers it is built from:
//! human sizes (`512M`), UUIDs, `--vm` specs and the TOML configuration file.
//!
//! Everything here is plain data: nothing opens a socket or touches the
//! store. [`DaemonConfig`] is what [`crate::start`] runs.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vtmem_protocol::{Uuid, MAX_REQUEST_QUEUES};

use vtmem_store::ClientConfig;

/// Default descriptors per request queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Smallest queue size accepted: a request of one op with its response.
pub const MIN_QUEUE_SIZE: u16 = 4;
/// Largest split virtqueue size.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Default host memory limit when none is configured: 1 GiB.
pub const DEFAULT_HOST_LIMIT: u64 = 1 << 30;
/// Longest busy-poll window accepted, in microseconds.
pub const MAX_POLL_US: u64 = 100_000;
/// Longest VM name (it becomes a socket file name).
pub const MAX_VM_NAME_LEN: usize = 64;
/// File name of the default control socket inside the socket directory.
pub const DEFAULT_CONTROL_SOCKET_NAME: &str = "vtmemd.ctl";
/// The usual socket directory (`--socket-dir`), as the documentation and
/// packaging use it.
pub const DEFAULT_SOCKET_DIR: &str = "/run/vtmem";
/// The control socket of a `vtmemd` using [`DEFAULT_SOCKET_DIR`]: where
/// `vtmemctl` looks by default.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/vtmem/vtmemd.ctl";
/// Longest path a Unix socket address can hold (`sun_path` minus the NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// A configuration error: one line, naming what is wrong.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A size that does not parse.
    #[error("invalid size '{0}': expected bytes or a number with K, M, G or T (e.g. 512M)")]
    BadSize(String),
    /// A UUID that does not parse.
    #[error("invalid UUID '{0}': expected 32 hex digits, optionally in 8-4-4-4-12 form")]
    BadUuid(String),
    /// A VM name that cannot be a socket file name.
    #[error("invalid VM name '{0}': use 1 to 64 characters from A-Z a-z 0-9 . _ - and do not start with '.' or '-'")]
    BadVmName(String),
    /// A dedup group name that is empty or unreasonable.
    #[error("invalid dedup group '{0}': use 1 to 64 printable characters without spaces or ','")]
    BadDedupGroup(String),
    /// A `--vm` spec that does not parse.
    #[error("invalid --vm spec '{spec}': {reason}")]
    BadVmSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A VM declared twice.
    #[error("VM '{0}' is declared more than once")]
    DuplicateVm(String),
    /// Weight zero or absurd.
    #[error("invalid weight {0}: must be between 1 and 1000000")]
    BadWeight(u64),
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
    /// The socket directory is not usable.
    #[error("socket directory {0}: {1}")]
    SocketDir(PathBuf, String),
    /// A socket path longer than a Unix socket address.
    #[error("socket path {0} is longer than {MAX_SOCKET_PATH_LEN} bytes")]
    SocketPathTooLong(PathBuf),
    /// The control group does not exist.
    #[error("unknown group '{0}' for the control socket")]
    UnknownGroup(String),
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

/// Parses a size: plain bytes, or a number with a binary unit
/// (`K`, `M`, `G`, `T`, optionally followed by `i`, `iB` or `B`; any case).
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(bad());
    }
    let num: u64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .or_else(|| unit.strip_suffix('i'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(bad()),
    };
    num.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Parses a quota: a size, or `unlimited` (`u64::MAX`).
pub fn parse_quota(s: &str) -> Result<u64> {
    match s.trim().to_ascii_lowercase().as_str() {
        "unlimited" | "none" | "max" => Ok(u64::MAX),
        _ => parse_size(s),
    }
}

/// Formats a byte count for humans (`512M`, `unlimited`).
pub fn format_size(bytes: u64) -> String {
    if bytes == u64::MAX {
        return "unlimited".to_string();
    }
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes % (1u64 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Parses a UUID (see [`Uuid`]'s `FromStr`).
pub fn parse_uuid(s: &str) -> Result<Uuid> {
    s.parse().map_err(|_| ConfigError::BadUuid(s.to_string()))
}

/// Formats a UUID in the 8-4-4-4-12 form.
pub fn format_uuid(uuid: &Uuid) -> String {
    uuid.to_string()
}

/// Checks a VM name: it becomes `<socket-dir>/<name>.sock` and the client's
/// name in the store.
pub fn validate_vm_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_VM_NAME_LEN
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadVmName(name.to_string()))
    }
}

/// Checks a dedup group name.
pub fn validate_dedup_group(group: &str) -> Result<()> {
    let ok = !group.is_empty()
        && group.len() <= 64
        && group.chars().all(|c| c.is_ascii_graphic() && c != ',');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadDedupGroup(group.to_string()))
    }
}

/// Checks a weight.
pub fn validate_weight(weight: u64) -> Result<u32> {
    if (1..=1_000_000).contains(&weight) {
        Ok(weight as u32)
    } else {
        Err(ConfigError::BadWeight(weight))
    }
}

/// One VM (one store client, one vhost-user socket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// The VM's name: socket file name and store client name.
    pub name: String,
    /// Quotas, weight, dedup group, authorised UUIDs.
    pub client: ClientConfig,
}

impl VmConfig {
    /// A VM with the default client configuration.
    pub fn new(name: &str) -> Result<Self> {
        validate_vm_name(name)?;
        Ok(VmConfig {
            name: name.to_string(),
            client: ClientConfig::default(),
        })
    }

    /// Parses a `--vm` spec:
    /// `name=vm1,persistent-quota=512M,ephemeral-quota=1G,weight=100,dedup-group=web,auth=UUID`.
    /// `auth` may repeat; a first item without `=` is the name.
    pub fn parse_spec(spec: &str) -> Result<Self> {
        let bad = |reason: String| ConfigError::BadVmSpec {
            spec: spec.to_string(),
            reason,
        };
        let mut name = None;
        let mut client = ClientConfig::default();
        for (i, item) in spec.split(',').enumerate() {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None if i == 0 => ("name", item),
                None => return Err(bad(format!("'{item}' is not key=value"))),
            };
            let e = |err: ConfigError| bad(err.to_string());
            match key {
                "name" => {
                    validate_vm_name(value).map_err(e)?;
                    name = Some(value.to_string());
                }
                "persistent-quota" => client.persistent_quota = parse_quota(value).map_err(e)?,
                "ephemeral-quota" => client.ephemeral_quota = parse_quota(value).map_err(e)?,
                "weight" => {
                    let w: u64 = value
                        .parse()
                        .map_err(|_| bad(format!("weight '{value}' is not a number")))?;
                    client.weight = validate_weight(w).map_err(e)?;
                }
                "dedup-group" => {
                    if value.is_empty() || value == "none" {
                        client.dedup_group = None;
                    } else {
                        validate_dedup_group(value).map_err(e)?;
                        client.dedup_group = Some(value.to_string());
                    }
                }
                "auth" | "authorized-uuid" => {
                    let uuid = parse_uuid(value).map_err(e)?;
                    if !client.authorized_uuids.contains(&uuid) {
                        client.authorized_uuids.push(uuid);
                    }
                }
                other => {
                    return Err(bad(format!(
                        "unknown key '{other}' (known: name, persistent-quota, ephemeral-quota, weight, dedup-group, auth)"
                    )))
                }
            }
        }
        let name = name.ok_or_else(|| bad("no name= given".to_string()))?;
        Ok(VmConfig { name, client })
    }
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
}

impl Default for DeviceSettings {
    fn default() -> Self {
        DeviceSettings {
            queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            poll: Duration::ZERO,
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
    /// Host memory limit of the store, in bytes.
    pub host_limit: u64,
    /// Device settings shared by all VMs.
    pub device: DeviceSettings,
    /// VMs to serve from the start.
    pub vms: Vec<VmConfig>,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_address: Option<SocketAddr>,
    /// The state file recording run-time changes, if any.
    pub state_file: Option<PathBuf>,
}

impl DaemonConfig {
    /// The socket path of VM `name`.
    pub fn vm_socket_path(socket_dir: &Path, name: &str) -> PathBuf {
        socket_dir.join(format!("{name}.sock"))
    }

    /// Cross-field checks: unique VM names, socket path lengths.
    pub fn validate(&self) -> Result<()> {
        let mut names = BTreeSet::new();
        for vm in &self.vms {
            validate_vm_name(&vm.name)?;
            if !names.insert(vm.name.as_str()) {
                return Err(ConfigError::DuplicateVm(vm.name.clone()));
            }
            check_socket_path(&Self::vm_socket_path(&self.socket_dir, &vm.name))?;
        }
        check_socket_path(&self.control_socket)?;
        if self.host_limit == 0 {
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
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| ConfigError::UnknownGroup(group.to_string()))
}

/// A size in the configuration file: bytes as an integer, or a string with
/// units (`"512M"`, `"unlimited"` for quotas).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SizeValue {
    /// Plain bytes.
    Bytes(u64),
    /// Text with a unit.
    Text(String),
}

impl SizeValue {
    /// Bytes, for a limit (no `unlimited`).
    pub fn size(&self) -> Result<u64> {
        match self {
            SizeValue::Bytes(b) => Ok(*b),
            SizeValue::Text(s) => parse_size(s),
        }
    }

    /// Bytes, for a quota (`unlimited` allowed).
    pub fn quota(&self) -> Result<u64> {
        match self {
            SizeValue::Bytes(b) => Ok(*b),
            SizeValue::Text(s) => parse_quota(s),
        }
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
    pub host_limit: Option<SizeValue>,
    /// Request queues per VM.
    pub queues: Option<u64>,
    /// Queue size.
    pub queue_size: Option<u64>,
    /// Busy-poll window in microseconds.
    pub poll_us: Option<u64>,
    /// Prometheus metrics address.
    pub metrics_address: Option<String>,
    /// State file.
    pub state_file: Option<PathBuf>,
    /// The VMs.
    #[serde(default)]
    pub vm: Vec<FileVm>,
}

/// One `[[vm]]` table of the configuration file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileVm {
    /// The VM's name.
    pub name: String,
    /// Persistent quota.
    pub persistent_quota: Option<SizeValue>,
    /// Ephemeral quota.
    pub ephemeral_quota: Option<SizeValue>,
    /// Weight.
    pub weight: Option<u64>,
    /// Dedup group.
    pub dedup_group: Option<String>,
    /// Authorised shared-pool UUIDs.
    #[serde(default)]
    pub authorized_uuids: Vec<String>,
}

impl FileVm {
    /// Converts to a checked [`VmConfig`].
    pub fn to_vm_config(&self) -> Result<VmConfig> {
        let mut vm = VmConfig::new(&self.name)?;
        if let Some(q) = &self.persistent_quota {
            vm.client.persistent_quota = q.quota()?;
        }
        if let Some(q) = &self.ephemeral_quota {
            vm.client.ephemeral_quota = q.quota()?;
        }
        if let Some(w) = self.weight {
            vm.client.weight = validate_weight(w)?;
        }
        if let Some(g) = &self.dedup_group {
            validate_dedup_group(g)?;
            vm.client.dedup_group = Some(g.clone());
        }
        for u in &self.authorized_uuids {
            let uuid = parse_uuid(u)?;
            if !vm.client.authorized_uuids.contains(&uuid) {
                vm.client.authorized_uuids.push(uuid);
            }
        }
        Ok(vm)
    }
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

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("3GiB").unwrap(), 3 << 30);
        assert_eq!(parse_size("4kb").unwrap(), 4096);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        for bad in ["", "M", "12X", "-1", "1.5G", "99999999999T", "1 G B"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_quota("unlimited").unwrap(), u64::MAX);
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(u64::MAX), "unlimited");
        assert_eq!(format_size(1000), "1000");
    }

    #[test]
    fn uuids() {
        let u = parse_uuid("00112233-4455-6677-8899-aabbccddeeff").unwrap();
        assert_eq!(u.as_bytes()[0], 0x00);
        assert_eq!(u.as_bytes()[15], 0xff);
        assert_eq!(format_uuid(&u), "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(parse_uuid("00112233445566778899AABBCCDDEEFF").unwrap(), u);
        assert!(parse_uuid("0011").is_err());
        assert!(parse_uuid("zz112233445566778899aabbccddeeff").is_err());
        assert!(parse_uuid("00000000-0000-0000-0000-000000000000").is_err());
    }

    #[test]
    fn vm_specs() {
        let vm = VmConfig::parse_spec(
            "name=vm1,persistent-quota=512M,ephemeral-quota=1G,weight=100,dedup-group=web,auth=00112233-4455-6677-8899-aabbccddeeff",
        )
        .unwrap();
        assert_eq!(vm.name, "vm1");
        assert_eq!(vm.client.persistent_quota, 512 << 20);
        assert_eq!(vm.client.ephemeral_quota, 1 << 30);
        assert_eq!(vm.client.weight, 100);
        assert_eq!(vm.client.dedup_group.as_deref(), Some("web"));
        assert_eq!(vm.client.authorized_uuids.len(), 1);

        let vm = VmConfig::parse_spec("vm2").unwrap();
        assert_eq!(vm.name, "vm2");
        assert_eq!(vm.client, ClientConfig::default());

        for bad in [
            "",
            "weight=3",
            "name=../x",
            "name=vm,weight=0",
            "name=vm,weight=x",
            "name=vm,colour=red",
            "name=vm,persistent-quota=lots",
            "name=vm,auth=nope",
            "name=vm,junk",
        ] {
            assert!(VmConfig::parse_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        for good in ["vm1", "a", "web-01.prod", "A_B"] {
            validate_vm_name(good).unwrap();
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_vm_name(bad).is_err(), "{bad}");
        }
    }

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
"#;
        let f = FileConfig::parse(text, Path::new("x.toml")).unwrap();
        assert_eq!(f.socket_dir.as_deref(), Some(Path::new("/run/vtmem")));
        assert_eq!(f.host_limit.as_ref().unwrap().size().unwrap(), 4 << 30);
        assert_eq!(f.vm.len(), 2);
        let vm1 = f.vm[0].to_vm_config().unwrap();
        assert_eq!(vm1.client.ephemeral_quota, 1 << 30);
        assert_eq!(vm1.client.weight, 200);

        let err = FileConfig::parse("sockets = 1\n", Path::new("x.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("x.toml") && msg.contains("line 1"), "{msg}");
        assert!(!msg.contains('\n'));
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
