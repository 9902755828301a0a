// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Starts `vtmemd` as a child process in a private socket directory.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::control::Control;
use crate::{Error, Result};

/// One `--vm` argument.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmSpec {
    /// VM name; its socket is `DIR/NAME.sock`.
    pub name: String,
    /// `persistent-quota=` (e.g. `512M`).
    pub persistent_quota: Option<String>,
    /// `ephemeral-quota=`.
    pub ephemeral_quota: Option<String>,
    /// `weight=`.
    pub weight: Option<u32>,
    /// `dedup-group=`.
    pub dedup_group: Option<String>,
    /// `auth=` UUIDs of shared pools the VM may join.
    pub auth: Vec<String>,
}

impl VmSpec {
    /// A VM with the daemon's defaults.
    pub fn new(name: &str) -> Self {
        VmSpec {
            name: name.to_string(),
            ..Default::default()
        }
    }

    /// Sets the persistent quota.
    pub fn persistent_quota(mut self, q: &str) -> Self {
        self.persistent_quota = Some(q.to_string());
        self
    }

    /// Sets the ephemeral quota.
    pub fn ephemeral_quota(mut self, q: &str) -> Self {
        self.ephemeral_quota = Some(q.to_string());
        self
    }

    /// Sets the weight.
    pub fn weight(mut self, w: u32) -> Self {
        self.weight = Some(w);
        self
    }

    /// Puts the VM in a dedup group.
    pub fn dedup_group(mut self, g: &str) -> Self {
        self.dedup_group = Some(g.to_string());
        self
    }

    /// Authorises a shared-pool UUID.
    pub fn auth(mut self, uuid: &str) -> Self {
        self.auth.push(uuid.to_string());
        self
    }

    /// The value of the `--vm` option.
    pub fn to_arg(&self) -> String {
        let mut parts = vec![format!("name={}", self.name)];
        if let Some(q) = &self.persistent_quota {
            parts.push(format!("persistent-quota={q}"));
        }
        if let Some(q) = &self.ephemeral_quota {
            parts.push(format!("ephemeral-quota={q}"));
        }
        if let Some(w) = self.weight {
            parts.push(format!("weight={w}"));
        }
        if let Some(g) = &self.dedup_group {
            parts.push(format!("dedup-group={g}"));
        }
        for a in &self.auth {
            parts.push(format!("auth={a}"));
        }
        parts.join(",")
    }
}

/// How to start the daemon.
#[derive(Clone, Debug, Default)]
pub struct DaemonConfig {
    /// VMs configured at start.
    pub vms: Vec<VmSpec>,
    /// `--host-limit`.
    pub host_limit: Option<String>,
    /// `--queues`.
    pub queues: Option<u16>,
    /// `--poll-us`.
    pub poll_us: Option<u32>,
    /// More arguments, passed as given.
    pub extra_args: Vec<String>,
    /// The binary; [`locate_vtmemd`] when `None`.
    pub binary: Option<PathBuf>,
}

impl DaemonConfig {
    /// A daemon serving these VMs.
    pub fn with_vms(vms: impl IntoIterator<Item = VmSpec>) -> Self {
        DaemonConfig {
            vms: vms.into_iter().collect(),
            ..Default::default()
        }
    }
}

/// A private directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temporary directory.
    pub fn new(prefix: &str) -> Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("{prefix}-{}-{n}-{nanos:x}", std::process::id()));
        fs::create_dir_all(&p).map_err(Error::Io)?;
        Ok(TempDir(p))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Finds the `vtmemd` binary; see [`locate_backend_binary`].
pub fn locate_vtmemd() -> Result<PathBuf> {
    locate_backend_binary("vtmemd")
}

/// Finds a binary of the backend crate (`vtmemd`, `vtmemctl`): `$VTMEMD` /
/// `$VTMEMCTL` (the name in upper case), else next to the running
/// executable in the cargo target directory if it is not older than the
/// backend's sources, else builds the backend's binaries once with
/// `cargo build -p vtmem-backend --bins`.
pub fn locate_backend_binary(name: &str) -> Result<PathBuf> {
    type Found = std::result::Result<PathBuf, String>;
    static FOUND: Mutex<Vec<(String, Found)>> = Mutex::new(Vec::new());
    let mut found = FOUND.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, r)) = found.iter().find(|(n, _)| n == name) {
        return r.clone().map_err(Error::Daemon);
    }
    let r = find_or_build(name);
    found.push((name.to_string(), r.clone()));
    r.map_err(Error::Daemon)
}

fn find_or_build(name: &str) -> std::result::Result<PathBuf, String> {
    let var = name.to_uppercase();
    if let Some(p) = std::env::var_os(&var) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{var}={} is not a file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let candidates = profile_dirs(&exe);
    if let Some(p) = candidates
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file() && !stale(p))
    {
        return Ok(p);
    }
    let release = candidates
        .first()
        .is_some_and(|d| d.file_name().is_some_and(|n| n == "release"));
    build_backend_binaries(release)?;
    candidates
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{name} not found after building it"))
}

/// Whether `bin` is older than the daemon's sources in this workspace (a
/// test run of this crate alone does not rebuild it). Outside the
/// workspace nothing is known to be newer.
fn stale(bin: &Path) -> bool {
    fn newest(p: &Path) -> Option<std::time::SystemTime> {
        let md = fs::metadata(p).ok()?;
        if md.is_file() {
            return md.modified().ok();
        }
        fs::read_dir(p)
            .ok()?
            .flatten()
            .filter_map(|e| newest(&e.path()))
            .max()
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let Ok(built) = fs::metadata(bin).and_then(|m| m.modified()) else {
        return true;
    };
    ["backend/src", "backend/Cargo.toml", "protocol/src"]
        .iter()
        .filter_map(|p| newest(&root.join(p)))
        .any(|t| t > built)
}

/// `target/<profile>` directories the executable may live in.
fn profile_dirs(exe: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(dir) = exe.parent() {
        // Test binaries live in target/<profile>/deps.
        if dir.file_name().is_some_and(|n| n == "deps") {
            if let Some(p) = dir.parent() {
                v.push(p.to_path_buf());
            }
        }
        v.push(dir.to_path_buf());
    }
    v
}

fn build_backend_binaries(release: bool) -> std::result::Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "vtmem-backend", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    let st = cmd
        .status()
        .map_err(|e| format!("running cargo build: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("cargo build of the backend binaries failed: {st}"))
    }
}

/// A running `vtmemd`, killed and cleaned up on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Mutex<Option<Child>>,
    dir: TempDir,
    config: DaemonConfig,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon and waits until every VM socket and the control
    /// socket exist.
    pub fn start(config: DaemonConfig) -> Result<Daemon> {
        let dir = TempDir::new("vtmem-guestsim")?;
        let log = dir.path().join("vtmemd.log");
        let mut d = Daemon {
            child: Mutex::new(None),
            dir,
            config,
            log,
        };
        d.spawn()?;
        Ok(d)
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = match &self.config.binary {
            Some(b) => b.clone(),
            None => locate_vtmemd()?,
        };
        let mut cmd = Command::new(&bin);
        cmd.arg("--socket-dir").arg(self.dir.path());
        for vm in &self.config.vms {
            cmd.arg("--vm").arg(vm.to_arg());
        }
        if let Some(h) = &self.config.host_limit {
            cmd.arg("--host-limit").arg(h);
        }
        if let Some(q) = self.config.queues {
            cmd.arg("--queues").arg(q.to_string());
        }
        if let Some(p) = self.config.poll_us {
            cmd.arg("--poll-us").arg(p.to_string());
        }
        cmd.arg("--control-socket").arg(self.control_path());
        cmd.args(&self.config.extra_args);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(Error::Io)?;
        let log2 = log.try_clone().map_err(Error::Io)?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::Daemon(format!("starting {}: {e}", bin.display())))?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if !self.is_alive() {
                return Err(Error::Daemon(format!(
                    "exited during start-up; log:\n{}",
                    self.log()
                )));
            }
            let socks = self
                .config
                .vms
                .iter()
                .all(|v| self.socket(&v.name).exists());
            if socks
                && self.control_path().exists()
                && Control::connect(self.control_path()).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Daemon(format!(
                    "sockets did not appear in {}; log:\n{}",
                    self.dir.path().display(),
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The socket directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The VM socket of `name`.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    /// The control socket.
    pub fn control_path(&self) -> PathBuf {
        self.dir.path().join("vtmemd.ctl")
    }

    /// A new control-socket connection.
    pub fn control(&self) -> Result<Control> {
        Control::connect(self.control_path())
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.id())
    }

    /// Whether the process is still running.
    pub fn is_alive(&self) -> bool {
        let mut g = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// How the process ended, if it has.
    pub fn exit_status(&self) -> Option<std::process::ExitStatus> {
        let mut g = self.child.lock().unwrap_or_else(|p| p.into_inner());
        g.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Everything the daemon wrote to stdout and stderr.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&self) {
        let mut g = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut c) = g.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the process and starts it again with `config` in the same
    /// socket directory (stored pages are lost: the store is in memory).
    pub fn restart(&mut self, config: DaemonConfig) -> Result<()> {
        self.kill();
        for vm in &self.config.vms {
            let _ = fs::remove_file(self.socket(&vm.name));
        }
        let _ = fs::remove_file(self.control_path());
        self.config = config;
        self.spawn()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
