// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vtmemd: the vhost-user device that serves the tmem store
//! ([`vtmem_store`], which knows nothing of virtio) to many VMs. Its
//! control API's types are [`vtmem_api`]'s.
//!
//! Layout:
//!
//! - [`chain_walk`]: a fallible walk of a virtqueue descriptor chain and a
//!   byte-stream cursor over its buffers (nothing vtmem-specific).
//! - [`notify`]: used-buffer notifications that honour the driver's
//!   `VRING_AVAIL_F_NO_INTERRUPT` (nothing vtmem-specific).
//! - [`request`]: descriptor chain → validated request (typed errors).
//! - [`exec`]: runs validated requests against a store client.
//! - [`device`]: the thin vhost-user backend (features, config, queues).
//! - [`daemon`]: many VMs in one process: sockets, serving threads,
//!   reconnects, adding and removing VMs.
//! - [`control`]: the JSON control socket.
//! - [`metrics`]: Prometheus metrics over HTTP.
//! - [`state`]: the state file that carries run-time changes over restarts.
//! - [`sandbox`]: seccomp allow-list, capabilities, user switch.
//! - [`systemd`]: sockets inherited from a service manager (socket
//!   activation) and its notifications (`READY=1`, `STATUS=`, `STOPPING=1`).
//! - [`config`], [`cli`]: configuration file and command line.
//! - [`accept`], [`ratelimit`], [`sys`]: helpers.

// Only `sys`'s signal, inherited-descriptor and CPU-clock modules,
// `sandbox`'s credentials module and `exec`'s in-place GET page opt out,
// with a reason there.
#![deny(unsafe_code)]

use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use log::{info, warn};

pub mod accept;
pub mod chain_walk;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
pub mod exec;
pub mod metrics;
pub mod notify;
pub mod poll;
pub mod ratelimit;
pub mod request;
pub mod sandbox;
pub mod state;
pub mod statedir;
pub mod systemd;

pub mod sys;
#[cfg(test)]
mod testutil;

pub use cli::Args;
pub use config::DaemonConfig;

use config::ConfigError;
use control::ControlServer;
use daemon::{Daemon, DaemonError};
use metrics::MetricsServer;
use systemd::{ActivationError, Inherited, NotifyState};
use vtmem_store::{Store, StoreConfig};

/// Why `vtmemd` could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A VM could not be served.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The socket directory cannot be used.
    #[error("socket directory {0}: {1}")]
    SocketDir(PathBuf, io::Error),
    /// The control socket cannot be served.
    #[error("control socket {0}: {1}")]
    Control(PathBuf, io::Error),
    /// The metrics address cannot be served.
    #[error("metrics address {0}: {1}")]
    Metrics(std::net::SocketAddr, io::Error),
    /// The state file cannot be read, applied or written.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// Signal handling cannot be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    /// The sandbox cannot be entered.
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    /// The sockets passed by the service manager cannot be used.
    #[error(transparent)]
    Activation(#[from] ActivationError),
}

/// The capabilities JSON printed by `--print-capabilities`.
pub fn capabilities() -> String {
    serde_json::json!({
        "type": "tmem",
        "features": device::CAPABILITY_FEATURES,
    })
    .to_string()
}

/// A running daemon: VMs served, control socket listening.
#[derive(Debug)]
pub struct Running {
    daemon: Arc<Daemon>,
    control: ControlServer,
    metrics: Option<MetricsServer>,
}

impl Running {
    /// The VM registry and store.
    pub fn daemon(&self) -> &Arc<Daemon> {
        &self.daemon
    }

    /// The address the metrics server bound, if it runs.
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// The control socket's path (an inherited one's may differ from the
    /// configuration's).
    pub fn control_socket(&self) -> &std::path::Path {
        self.control.path()
    }

    /// Stops everything and removes every socket.
    pub fn shutdown(mut self) {
        if let Some(m) = self.metrics.as_mut() {
            m.stop();
        }
        self.control.stop();
        self.daemon.shutdown();
    }
}

fn prepare_socket_dir(dir: &std::path::Path) -> Result<(), Error> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::SocketDir(
            dir.to_path_buf(),
            io::Error::new(io::ErrorKind::AlreadyExists, "not a directory"),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| Error::SocketDir(dir.to_path_buf(), e))
        }
        Err(e) => Err(Error::SocketDir(dir.to_path_buf(), e)),
    }
}

/// Creates the store, binds the control socket and every VM's socket, and
/// returns once all of them listen.
///
/// With a state file (`config.state_file`), the file, if it exists, is
/// applied over `config` first ([`state::apply`]), and it is written once
/// everything listens.
pub fn launch(config: &DaemonConfig) -> Result<Running, Error> {
    launch_with(config, Inherited::default())
}

/// Same as [`launch`], serving the sockets a service manager passed
/// (`inherited`, from [`systemd::take_from_env`]) instead of binding
/// those: the control socket, and the sockets of the VMs they name, which
/// the configuration in effect (after the state file) must declare.
pub fn launch_with(config: &DaemonConfig, mut inherited: Inherited) -> Result<Running, Error> {
    config.validate()?;
    let mut config = config.clone();
    let mut frozen = Vec::new();
    let state_file = match config.state_file.clone() {
        Some(path) => {
            let declared: Vec<_> = config.vms.iter().map(|v| v.name.clone()).collect();
            if let Some(st) = state::load(&path)? {
                frozen = state::apply(&st, &mut config, &path)?;
                config.validate()?;
                info!(
                    "state file {}: {} VM(s), host limit {}",
                    path.display(),
                    st.vms.len(),
                    st.host_limit
                );
            }
            Some(state::StateFile::new(&path, declared))
        }
        None => None,
    };
    let config = &config;
    inherited.check_vms(&config.vms)?;
    prepare_socket_dir(&config.socket_dir)?;
    let store_config = StoreConfig {
        host_limit: config.host_limit.bytes(),
    };
    let daemon = match &config.state_dir {
        Some(path) => {
            let (store, dir) =
                statedir::open_store(path, store_config).map_err(DaemonError::from)?;
            // Opened (created, recovered) as the user vtmemd starts as;
            // served as `--user`, which makes and removes the state's
            // files (journals, snapshots) in it from now on.
            if let Some(uid) = config.sandbox.uid {
                statedir::give_to(path, uid, config.sandbox.gid).map_err(DaemonError::from)?;
            }
            match dir.recovery() {
                Some(r) => info!(
                    "state directory {}: recovered {} client(s), {} pools, {} persistent pages in {} ms ({} journal records skipped)",
                    path.display(),
                    r.clients,
                    r.pools,
                    r.pages,
                    r.elapsed.as_millis(),
                    r.skipped_records
                ),
                None => info!("state directory {}: new state", path.display()),
            }
            for name in dir.waiting() {
                if !config.vms.iter().any(|v| v.name.as_str() == name) {
                    let held = store.client(&name).map(|c| c.stats());
                    warn!(
                        "vm {name}: its state in {} ({} persistent pages) names no declared VM: kept until such a VM is added",
                        path.display(),
                        held.map_or(0, |s| s.persistent_pages)
                    );
                }
            }
            let daemon = Daemon::new(store, config);
            daemon.attach_state_dir(dir);
            daemon
        }
        None => Daemon::new(Store::new(store_config), config),
    };
    for vm in &config.vms {
        let added = match inherited.vms.remove(&vm.name) {
            Some(socket) => daemon.add_vm_inherited(vm, socket),
            None => daemon.add_vm(vm),
        };
        if let Err(e) = added {
            daemon.shutdown();
            return Err(e.into());
        }
    }
    for name in &frozen {
        if let Ok(vm) = daemon.vm(name) {
            vm.client().freeze();
        }
    }
    if let Some(file) = state_file {
        daemon.attach_state_file(file);
        if let Err(e) = daemon.save_state() {
            daemon.shutdown();
            return Err(e.into());
        }
    }
    // The control socket last: a request waiting in an inherited socket's
    // queue (made while vtmemd restarted) sees every VM, frozen or not.
    let started = match inherited.control.take() {
        Some(s) => {
            let path = s.path.clone().unwrap_or(config.control_socket.clone());
            ControlServer::start_inherited(daemon.clone(), s.listener, &path)
                .map_err(|e| Error::Control(path, e))
        }
        None => ControlServer::start(daemon.clone(), &config.control_socket, config.control_group)
            .map_err(|e| Error::Control(config.control_socket.clone(), e)),
    };
    let mut control = match started {
        Ok(c) => c,
        Err(e) => {
            daemon.shutdown();
            return Err(e);
        }
    };
    let metrics = match config.metrics_address {
        Some(addr) => match MetricsServer::start(daemon.clone(), addr) {
            Ok(m) => Some(m),
            Err(e) => {
                control.stop();
                daemon.shutdown();
                return Err(Error::Metrics(addr, e));
            }
        },
        None => None,
    };
    Ok(Running {
        daemon,
        control,
        metrics,
    })
}

/// Runs `vtmemd` until SIGINT or SIGTERM, then removes every socket and
/// returns `Ok(())`.
///
/// Once everything listens, and before it says it is ready, the process
/// enters its sandbox ([`sandbox`], `config.sandbox`).
///
/// Sockets passed by a service manager (`LISTEN_FDS`) are served instead of
/// binding them ([`systemd`]), and the service manager (`NOTIFY_SOCKET`)
/// hears `READY=1` with the readiness line, `STATUS=` lines, and
/// `STOPPING=1` when a signal arrives.
pub fn start(config: DaemonConfig) -> Result<(), Error> {
    let result = run(config);
    if let Err(e) = &result {
        systemd::status(&format!("failed: {e}"));
    }
    result
}

fn run(config: DaemonConfig) -> Result<(), Error> {
    // Before any thread starts: taking the sockets changes the environment.
    let inherited = systemd::take_from_env()?;
    // Block the termination signals before any thread starts, so that every
    // thread inherits the mask and only `wait` below receives them.
    let signals = sys::SignalSet::block_termination().map_err(Error::Signals)?;
    // Likewise no-new-privileges and the capabilities dropped before
    // binding.
    // VMs given to a socket owner keep the one capability that needs
    // (not those whose socket the service manager made).
    let keep_chown = config
        .vms
        .iter()
        .filter(|vm| !inherited.vms.contains_key(&vm.name))
        .any(|vm| vm.socket_user.is_some() || vm.socket_group.is_some());
    let sandbox = sandbox::prepare(&config.sandbox, config.control_group, keep_chown)?;
    let inherited_count = inherited.len();
    let running = launch_with(&config, inherited)?;
    if let Err(e) = sandbox.enter() {
        running.shutdown();
        return Err(e.into());
    }

    let mut ready = format!(
        "vtmemd ready: {} VM(s) in {}, control socket {}, host limit {}, {} queue(s) of {}",
        running.daemon.vms().len(),
        config.socket_dir.display(),
        running.control_socket().display(),
        vtmem_api::ByteSize(running.daemon.store().host_limit()),
        config.device.queues,
        config.device.queue_size,
    );
    if let Some(addr) = running.metrics_address() {
        let _ = write!(ready, ", metrics http://{addr}/metrics");
    }
    if inherited_count > 0 {
        let _ = write!(ready, ", {inherited_count} inherited socket(s)");
    }
    info!("{ready}");
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{ready}");
    let _ = out.flush();
    drop(out);
    systemd::notify(&[
        NotifyState::Ready,
        NotifyState::Status(&systemd::serving(&running.daemon)),
    ]);

    let why = match signals.wait() {
        Ok(sig) => {
            info!("{}: shutting down", sys::signal_name(sig));
            sys::signal_name(sig).to_string()
        }
        Err(e) => {
            warn!("waiting for signals failed ({e}); shutting down");
            format!("signal wait failed: {e}")
        }
    };
    systemd::notify(&[
        NotifyState::Stopping,
        NotifyState::Status(&format!("stopping ({why})")),
    ]);
    running.shutdown();
    info!("vtmemd stopped");
    Ok(())
}
