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
//! - [`config`], [`cli`]: configuration file and command line.
//! - [`accept`], [`ratelimit`], [`sys`]: helpers.

// Only `sys`'s signal module and `sandbox`'s credentials module opt out,
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
pub mod ratelimit;
pub mod request;
pub mod sandbox;
pub mod state;

pub mod sys;
#[cfg(test)]
mod testutil;

pub use cli::Args;
pub use config::DaemonConfig;

use config::ConfigError;
use control::ControlServer;
use daemon::{Daemon, DaemonError};
use metrics::MetricsServer;
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
    prepare_socket_dir(&config.socket_dir)?;
    let store = Store::new(StoreConfig {
        host_limit: config.host_limit.bytes(),
    });
    let daemon = Daemon::new(store, config);
    let mut control =
        ControlServer::start(daemon.clone(), &config.control_socket, config.control_group)
            .map_err(|e| Error::Control(config.control_socket.clone(), e))?;
    for vm in &config.vms {
        if let Err(e) = daemon.add_vm(vm) {
            control.stop();
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
            control.stop();
            daemon.shutdown();
            return Err(e.into());
        }
    }
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
pub fn start(config: DaemonConfig) -> Result<(), Error> {
    // Block the termination signals before any thread starts, so that every
    // thread inherits the mask and only `wait` below receives them.
    let signals = sys::SignalSet::block_termination().map_err(Error::Signals)?;
    // Likewise no-new-privileges and the capabilities dropped before
    // binding.
    // VMs given to a socket owner keep the one capability that needs.
    let keep_chown = config
        .vms
        .iter()
        .any(|vm| vm.socket_user.is_some() || vm.socket_group.is_some());
    let sandbox = sandbox::prepare(&config.sandbox, config.control_group, keep_chown)?;
    let running = launch(&config)?;
    if let Err(e) = sandbox.enter() {
        running.shutdown();
        return Err(e.into());
    }

    let mut ready = format!(
        "vtmemd ready: {} VM(s) in {}, control socket {}, host limit {}, {} queue(s) of {}",
        running.daemon.vms().len(),
        config.socket_dir.display(),
        config.control_socket.display(),
        vtmem_api::ByteSize(running.daemon.store().host_limit()),
        config.device.queues,
        config.device.queue_size,
    );
    if let Some(addr) = running.metrics_address() {
        let _ = write!(ready, ", metrics http://{addr}/metrics");
    }
    info!("{ready}");
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{ready}");
    let _ = out.flush();
    drop(out);

    match signals.wait() {
        Ok(sig) => info!("{}: shutting down", sys::signal_name(sig)),
        Err(e) => warn!("waiting for signals failed ({e}); shutting down"),
    }
    running.shutdown();
    info!("vtmemd stopped");
    Ok(())
}
