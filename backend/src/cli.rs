// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command line of `vtmemd`, and its conversion into a [`DaemonConfig`].

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use vtmem_api::{ByteSize, VmSpec};

use crate::config::{
    parse_metrics_address, resolve_credentials, resolve_group, validate_poll_us,
    validate_queue_size, validate_queues, ConfigError, DaemonConfig, DeviceSettings, FileConfig,
    SandboxConfig, SandboxMode, DEFAULT_CONTROL_SOCKET_NAME, DEFAULT_HOST_LIMIT,
};

const LONG_ABOUT: &str = "\
vtmemd serves the vtmem paravirtual transcendent-memory device to many VMs
from one process. Each VM attaches through its own vhost-user socket
<socket-dir>/<name>.sock; the name is the VM's identity in the shared page
store, and its pools and pages survive reconnects of the VMM. VMs are
declared with --vm, in the configuration file, or at run time through the
control socket (newline-delimited JSON, see docs/control-api.md).

Sizes take binary units: 4096, 64K, 512M, 2G, 1T; quotas also 'unlimited'.

Under a service manager (vtmemd.service): listening sockets passed with
LISTEN_FDS/LISTEN_PID are served instead of binding those, named in
LISTEN_FDNAMES 'control' (the control socket) or after a configured VM;
NOTIFY_SOCKET hears READY=1 once every socket accepts, STATUS= lines and
STOPPING=1.";

const AFTER_HELP: &str = "\
Example:
  vtmemd --socket-dir /run/vtmem --host-limit 4G \\
         --vm name=vm1,persistent-quota=512M,ephemeral-quota=1G \\
         --vm name=vm2,weight=50,dedup-group=web

  qemu-system-x86_64 ... \\
    -object memory-backend-memfd,id=mem,size=2G,share=on -numa node,memdev=mem \\
    -chardev socket,id=tmem0,path=/run/vtmem/vm1.sock,reconnect-ms=1000 \\
    -device vhost-user-tmem-pci,chardev=tmem0,num-request-queues=1

QEMU's num-request-queues must equal --queues, and its queue-size must not
exceed --queue-size.";

/// Log levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Lifecycle events (the default).
    Info,
    /// Per-connection details.
    Debug,
    /// Everything.
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(l: LogLevel) -> Self {
        match l {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// `vtmemd` command line.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "vtmemd",
    version,
    about = "vhost-user transcendent-memory (tmem) device for many VMs",
    long_about = LONG_ABOUT,
    after_long_help = AFTER_HELP
)]
pub struct Args {
    /// Directory of the per-VM vhost-user sockets (<DIR>/<name>.sock);
    /// created if missing.
    #[arg(long, value_name = "DIR")]
    pub socket_dir: Option<PathBuf>,

    /// TOML configuration file (settings and [[vm]] tables); command-line
    /// flags override its settings, --vm adds to its VMs.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// A VM to serve, e.g. name=vm1,persistent-quota=512M,ephemeral-quota=1G,weight=100,dedup-group=web,auth=UUID
    /// (repeatable; 'auth' may repeat).
    #[arg(long = "vm", value_name = "SPEC")]
    pub vms: Vec<VmSpec>,

    /// Host memory the store may use for pages and metadata [default: 1G].
    #[arg(long, value_name = "SIZE")]
    pub host_limit: Option<ByteSize>,

    /// Request queues per VM, each with its own worker thread (1-64) [default: 1].
    #[arg(long, value_name = "N")]
    pub queues: Option<u64>,

    /// Largest size of each request queue (power of two) [default: 256].
    #[arg(long, value_name = "N")]
    pub queue_size: Option<u64>,

    /// After a queue drains, busy-poll it for up to N microseconds before
    /// sleeping (0 disables) [default: 0].
    #[arg(long, value_name = "N")]
    pub poll_us: Option<u64>,

    /// Control socket path [default: <socket-dir>/vtmemd.ctl].
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Group that may use the control socket (mode 0660); without it the
    /// socket is mode 0600.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,

    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics ([HOST]:PORT;
    /// ':PORT' or 'PORT' binds the loopback address; port 0 picks one).
    /// Off by default. Keep it on loopback or a management network.
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<String>,

    /// Record run-time changes (control socket) in this JSON file and apply
    /// it over the configuration at start. Off by default.
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,

    /// Keep the store's persistent pages and their metadata in this
    /// directory (created 0700; use a tmpfs) while it runs, and recover
    /// them at start: restarts, upgrades and crashes then lose no
    /// acknowledged page. Off by default.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Accept guest memory that is not sealed against shrinking (memfd
    /// without F_SEAL_SHRINK, or a plain file). Only for file-backed
    /// memory that cannot be sealed: a VMM that shrinks such memory kills
    /// vtmemd and every VM's pages with it.
    #[arg(long)]
    pub allow_unsealed_memory: bool,

    /// Sandbox entered once every socket listens: 'enforce' (seccomp
    /// allow-list, a system call outside it kills vtmemd; no new privileges;
    /// no capabilities), 'log' (the same, but calls outside the list are
    /// only logged by the kernel), 'none' (debugging) [default: enforce].
    #[arg(long, value_enum, value_name = "MODE")]
    pub sandbox: Option<SandboxMode>,

    /// When started as root: run as this user (name or uid) once every
    /// socket listens.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// With --user: run with this group (name or gid) instead of the
    /// user's primary group.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Log level; RUST_LOG, if set, refines it (e.g. RUST_LOG=vtmem_backend::device=debug).
    #[arg(long, value_enum, value_name = "LEVEL", default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// Print the backend's capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
}

impl TryFrom<Args> for DaemonConfig {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let socket_dir = args
            .socket_dir
            .or(file.socket_dir.clone())
            .ok_or(ConfigError::NoSocketDir)?;
        let control_socket = args
            .control_socket
            .or(file.control_socket.clone())
            .unwrap_or_else(|| socket_dir.join(DEFAULT_CONTROL_SOCKET_NAME));
        let control_group = match args.control_group.or(file.control_group.clone()) {
            Some(g) => Some(resolve_group(&g)?),
            None => None,
        };
        let host_limit = args
            .host_limit
            .or(file.host_limit)
            .unwrap_or(DEFAULT_HOST_LIMIT);
        let defaults = DeviceSettings::default();
        let device = DeviceSettings {
            queues: match args.queues.or(file.queues) {
                Some(n) => validate_queues(n)?,
                None => defaults.queues,
            },
            queue_size: match args.queue_size.or(file.queue_size) {
                Some(n) => validate_queue_size(n)?,
                None => defaults.queue_size,
            },
            poll: match args.poll_us.or(file.poll_us) {
                Some(us) => validate_poll_us(us)?,
                None => defaults.poll,
            },
            allow_unsealed_memory: args.allow_unsealed_memory
                || file.allow_unsealed_memory.unwrap_or(false),
        };
        let mut vms = file.vm.clone();
        vms.extend(args.vms);
        let metrics_address = match args.metrics_address.or(file.metrics_address.clone()) {
            Some(a) => Some(parse_metrics_address(&a)?),
            None => None,
        };
        let state_file = args.state_file.or(file.state_file.clone());
        let state_dir = args.state_dir.or(file.state_dir.clone());
        let (uid, gid) = resolve_credentials(
            args.user.as_deref().or(file.user.as_deref()),
            args.group.as_deref().or(file.group.as_deref()),
        )?;
        let sandbox = SandboxConfig {
            mode: args.sandbox.or(file.sandbox).unwrap_or_default(),
            uid,
            gid,
        };
        let config = DaemonConfig {
            socket_dir,
            control_socket,
            control_group,
            host_limit,
            device,
            vms,
            metrics_address,
            state_file,
            state_dir,
            sandbox,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    fn parse(argv: &[&str]) -> Result<DaemonConfig, ConfigError> {
        let args = Args::try_parse_from(std::iter::once("vtmemd").chain(argv.iter().copied()))
            .expect("clap accepts these flags");
        DaemonConfig::try_from(args)
    }

    /// What clap itself refuses: the typed values.
    fn clap_error(argv: &[&str]) -> String {
        Args::try_parse_from(std::iter::once("vtmemd").chain(argv.iter().copied()))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn default_paths_agree() {
        use crate::config::{DEFAULT_CONTROL_SOCKET, DEFAULT_SOCKET_DIR};
        let c = parse(&["--socket-dir", DEFAULT_SOCKET_DIR]).unwrap();
        assert_eq!(c.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
    }

    #[test]
    fn metrics_and_state_flags() {
        let c = parse(&["--socket-dir", "/x"]).unwrap();
        assert_eq!((c.metrics_address, c.state_file), (None, None));
        for (given, want) in [
            (":9464", "127.0.0.1:9464"),
            ("9464", "127.0.0.1:9464"),
            ("0.0.0.0:1", "0.0.0.0:1"),
            ("[::1]:2", "[::1]:2"),
        ] {
            let c = parse(&["--socket-dir", "/x", "--metrics-address", given]).unwrap();
            assert_eq!(c.metrics_address.unwrap().to_string(), want, "{given}");
        }
        assert!(matches!(
            parse(&["--socket-dir", "/x", "--metrics-address", ":99999"]).unwrap_err(),
            ConfigError::BadMetricsAddress(_)
        ));
        let c = parse(&[
            "--socket-dir",
            "/x",
            "--state-file",
            "/var/lib/vtmem/s.json",
        ])
        .unwrap();
        assert_eq!(
            c.state_file.as_deref(),
            Some(Path::new("/var/lib/vtmem/s.json"))
        );
    }

    #[test]
    fn sandbox_flags() {
        let c = parse(&["--socket-dir", "/x"]).unwrap();
        assert_eq!(c.sandbox, SandboxConfig::default());
        assert_eq!(c.sandbox.mode, SandboxMode::Enforce);
        let c = parse(&["--socket-dir", "/x", "--sandbox", "none", "--user", "0"]).unwrap();
        assert_eq!(
            c.sandbox,
            SandboxConfig {
                mode: SandboxMode::None,
                uid: Some(0),
                gid: Some(0)
            }
        );
        let c = parse(&["--socket-dir", "/x", "--sandbox", "log", "--group", "5"]).unwrap();
        assert_eq!(
            (c.sandbox.mode, c.sandbox.uid, c.sandbox.gid),
            (SandboxMode::Log, None, Some(5))
        );
        let e = clap_error(&["--socket-dir", "/x", "--sandbox", "off"]);
        assert!(e.contains("invalid value 'off'"), "{e}");
    }

    #[test]
    fn defaults() {
        let c = parse(&["--socket-dir", "/run/vtmem"]).unwrap();
        assert_eq!(c.socket_dir, Path::new("/run/vtmem"));
        assert_eq!(c.control_socket, Path::new("/run/vtmem/vtmemd.ctl"));
        assert_eq!(c.host_limit, DEFAULT_HOST_LIMIT);
        assert_eq!(c.device, DeviceSettings::default());
        assert!(c.vms.is_empty());
        assert_eq!(c.control_group, None);
    }

    #[test]
    fn flags() {
        let c = parse(&[
            "--socket-dir",
            "/tmp/x",
            "--host-limit",
            "2G",
            "--queues",
            "4",
            "--queue-size",
            "1024",
            "--poll-us",
            "30",
            "--control-socket",
            "/tmp/ctl",
            "--control-group",
            "0",
            "--vm",
            "name=a,persistent-quota=1M",
            "--vm",
            "b",
        ])
        .unwrap();
        assert_eq!(c.host_limit, ByteSize(2 << 30));
        assert_eq!(c.device.queues, 4);
        assert_eq!(c.device.queue_size, 1024);
        assert_eq!(c.device.poll, Duration::from_micros(30));
        assert_eq!(c.control_socket, Path::new("/tmp/ctl"));
        assert_eq!(c.control_group, Some(0));
        assert_eq!(c.vms.len(), 2);
        assert_eq!(c.vms[0].persistent_quota.bytes(), 1 << 20);
    }

    #[test]
    fn errors() {
        assert_eq!(parse(&[]).unwrap_err(), ConfigError::NoSocketDir);
        assert!(matches!(
            parse(&["--socket-dir", "/x", "--queues", "65"]).unwrap_err(),
            ConfigError::BadQueues(65)
        ));
        assert!(matches!(
            parse(&["--socket-dir", "/x", "--queue-size", "300"]).unwrap_err(),
            ConfigError::BadQueueSize(300)
        ));
        let e = clap_error(&["--socket-dir", "/x", "--host-limit", "lots"]);
        assert!(e.contains("invalid size 'lots'"), "{e}");
        let e = clap_error(&["--socket-dir", "/x", "--vm", "a,weight=0"]);
        assert!(e.contains("invalid weight '0'"), "{e}");
        assert!(matches!(
            parse(&["--socket-dir", "/x", "--vm", "a", "--vm", "a"]).unwrap_err(),
            ConfigError::DuplicateVm(_)
        ));
        assert!(matches!(
            parse(&["--socket-dir", &"/d".repeat(60), "--vm", "a"]).unwrap_err(),
            ConfigError::SocketPathTooLong(_)
        ));
        assert!(matches!(
            parse(&[
                "--socket-dir",
                "/x",
                "--control-group",
                "no-such-group-vtmem"
            ])
            .unwrap_err(),
            ConfigError::UnknownGroup(_)
        ));
        assert!(matches!(
            parse(&["--socket-dir", "/x", "--config", "/nonexistent/vtmemd.toml"]).unwrap_err(),
            ConfigError::ReadFile(..)
        ));
    }
}
