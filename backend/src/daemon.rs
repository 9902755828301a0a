// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One process, many VMs.
//!
//! The [`Daemon`] owns the store and a registry of VMs. Each VM has a store
//! client (its identity), a listening socket `<socket-dir>/<name>.sock` and
//! a serving thread. The thread waits for a frontend, runs a fresh
//! `VhostUserDaemon` (with its own worker threads) for that connection, and
//! after a disconnect goes back to listening on the same socket, so a VMM
//! can reconnect. The client, its pools and pages, live on across
//! connections. VMs come and go at run time without disturbing each other.
//!
//! A VM's socket is either bound here, or inherited from a service manager
//! (socket activation, [`crate::systemd`]); an inherited socket's file
//! belongs to the service manager and is never removed here.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use parking_lot::Mutex;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vtmem_api::{ByteSize, DeviceStats, VmDetails, VmInfo, VmName, VmSpec};

use crate::config::{
    check_socket_path, client_config, resolve_group, resolve_user, vm_spec, ConfigError,
    DaemonConfig, DeviceSettings,
};
use crate::device::VtmemBackend;
use crate::exec::DeviceCounters;
use crate::ratelimit::RateLimitedLog;
use crate::state::{StateError, StateFile, VmState};
use crate::statedir::{Recovered, StateDir, StateDirError};
use crate::systemd::InheritedSocket;
use vtmem_store::{AdminHandle, Store, TmemError};

/// Errors of VM management.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad name, path or setting.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store refused.
    #[error("{0}")]
    Store(#[from] TmemError),
    /// A VM of that name is served already.
    #[error("VM '{0}' already exists")]
    VmExists(VmName),
    /// No VM of that name.
    #[error("no VM named '{0}'")]
    UnknownVm(VmName),
    /// Another process listens on the socket path.
    #[error("socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// The socket cannot be created.
    #[error("cannot listen on {0}: {1}")]
    Listen(PathBuf, String),
    /// A thread cannot be started.
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
    /// The daemon is shutting down.
    #[error("vtmemd is shutting down")]
    ShuttingDown,
    /// The state directory refused (its store, or the VM's recovered
    /// client).
    #[error(transparent)]
    StateDir(#[from] StateDirError),
}

#[derive(Default)]
struct Connection {
    stopping: bool,
    shutdown: Option<ShutdownHandle>,
    /// The connection's backend, quiesced before the connection is dropped.
    backend: Option<Arc<VtmemBackend>>,
}

/// One served VM.
pub struct Vm {
    name: VmName,
    /// The spec it was added with (name and socket ownership are fixed).
    declared: VmSpec,
    socket: PathBuf,
    /// Whether vtmemd made the socket file (else it was inherited).
    owns_socket: bool,
    client: AdminHandle,
    counters: Arc<DeviceCounters>,
    log: Arc<RateLimitedLog>,
    connected: AtomicBool,
    connections: AtomicU64,
    stop_evt: EventFd,
    conn: Mutex<Connection>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.name)
            .field("socket", &self.socket)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Vm {
    /// The VM's name.
    pub fn name(&self) -> &VmName {
        &self.name
    }

    /// Its socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its store client.
    pub fn client(&self) -> &AdminHandle {
        &self.client
    }

    /// Whether a frontend is connected now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Frontend connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// The device counters.
    pub fn counters(&self) -> DeviceStats {
        self.counters.snapshot()
    }

    /// Records a new connection; false if the VM is being stopped (the
    /// caller then shuts the connection down itself).
    fn connected(&self, handle: Option<ShutdownHandle>, backend: &Arc<VtmemBackend>) -> bool {
        let mut conn = self.conn.lock();
        if conn.stopping {
            return false;
        }
        conn.shutdown = handle;
        conn.backend = Some(backend.clone());
        self.connected.store(true, Ordering::Release);
        self.connections.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn disconnected(&self) {
        let mut conn = self.conn.lock();
        conn.shutdown = None;
        conn.backend = None;
        self.connected.store(false, Ordering::Release);
    }

    fn stopping(&self) -> bool {
        self.conn.lock().stopping
    }

    /// Asks the serving thread to finish: answer the requests in flight,
    /// then drop the connection (in that order: see
    /// [`VtmemBackend::quiesce`]), stop listening.
    fn request_stop(&self) {
        let (handle, backend) = {
            let mut conn = self.conn.lock();
            conn.stopping = true;
            (conn.shutdown.take(), conn.backend.take())
        };
        if let Some(b) = backend {
            b.quiesce();
        }
        if let Some(h) = handle {
            h.shutdown();
        }
        let _ = self.stop_evt.write(1);
        // The thread may sit in accept() after a connection attempt that was
        // aborted; a connection of our own wakes it up. Not on an inherited
        // socket: that connection would outlive vtmemd in the service
        // manager's socket and start it again.
        if self.owns_socket {
            let _ = UnixStream::connect(&self.socket);
        }
    }

    /// Removes the socket file, if vtmemd made it.
    fn remove_socket_file(&self) {
        if self.owns_socket {
            let _ = std::fs::remove_file(&self.socket);
        }
    }

    fn join(&self) {
        let handle = self.thread.lock().take();
        if let Some(h) = handle {
            if h.join().is_err() {
                error!("vm {}: serving thread panicked", self.name);
            }
        }
    }

    /// Its settings now.
    pub fn spec(&self) -> VmSpec {
        vm_spec(&self.declared, &self.client.config())
    }

    /// A summary, as `add-vm` answers.
    pub fn info(&self) -> VmInfo {
        VmInfo {
            name: self.name.clone(),
            socket: self.socket.clone(),
            connected: self.is_connected(),
            connections: self.connections(),
            frozen: self.client.is_frozen(),
            config: self.spec(),
        }
    }

    /// Everything about the VM, for `show` and `list`.
    pub fn details(&self) -> VmDetails {
        VmDetails {
            info: self.info(),
            device: self.counters(),
            stats: self.client.stats(),
        }
    }
}

/// The VM registry and the shared store.
#[derive(Debug)]
pub struct Daemon {
    store: Arc<Store>,
    socket_dir: PathBuf,
    settings: DeviceSettings,
    vms: Mutex<BTreeMap<VmName, Arc<Vm>>>,
    /// Serialises add and remove (they block on sockets and threads).
    admin: Mutex<bool>,
    started: Instant,
    state: std::sync::OnceLock<StateFile>,
    state_dir: std::sync::OnceLock<StateDir>,
    recovered: Mutex<Recovered>,
}

impl Daemon {
    /// A daemon with no VMs yet.
    pub fn new(store: Arc<Store>, config: &DaemonConfig) -> Arc<Self> {
        Arc::new(Daemon {
            store,
            socket_dir: config.socket_dir.clone(),
            settings: config.device,
            vms: Mutex::new(BTreeMap::new()),
            admin: Mutex::new(false),
            started: Instant::now(),
            state: std::sync::OnceLock::new(),
            state_dir: std::sync::OnceLock::new(),
            recovered: Mutex::new(Recovered::default()),
        })
    }

    /// Serves VMs from the state directory `dir`, whose store this
    /// daemon's is: a VM added finds the client recovered under its name,
    /// if any. Only the first call counts.
    pub fn attach_state_dir(&self, dir: StateDir) {
        let _ = self.state_dir.set(dir);
    }

    /// The state directory, if any.
    pub fn state_dir(&self) -> Option<&StateDir> {
        self.state_dir.get()
    }

    /// What the VMs served since the start found recovered.
    pub fn recovered(&self) -> Recovered {
        *self.recovered.lock()
    }

    /// VM `vm`'s client: the one recovered from the state directory under
    /// its name (configured as `vm` says), if there is one, else a new one.
    /// The flag says which.
    fn client_for(&self, vm: &VmSpec) -> Result<(AdminHandle, bool), DaemonError> {
        let config = client_config(vm);
        if let Some(dir) = self.state_dir.get() {
            if let Some(client) = dir.claim(&self.store, &vm.name, &config)? {
                return Ok((client, true));
            }
        }
        Ok((self.store.add_client(vm.name.as_str(), config)?, false))
    }

    /// Undoes [`Daemon::client_for`] for a VM that could not be added: a
    /// recovered client waits again, a new one is removed.
    fn release_client(&self, name: &VmName, recovered: bool) {
        match self.state_dir.get() {
            Some(dir) if recovered => dir.unclaim(name),
            _ => {
                let _ = self.store.remove_client(name.as_str());
            }
        }
    }

    /// Logs and counts what VM `name` found recovered in its client.
    fn report_recovered(&self, name: &VmName, client: &AdminHandle) {
        let Some(dir) = self.state_dir.get() else {
            return;
        };
        let time = dir.recovery().map(|r| r.elapsed).unwrap_or_default();
        let stats = client.stats();
        let pools = stats.pools.len() as u64;
        info!(
            "vm {name}: recovered {pools} pools, {} persistent pages ({} bytes) from {} in {} ms",
            stats.persistent_pages,
            stats.persistent_bytes,
            dir.path().display(),
            time.as_millis()
        );
        let mut r = self.recovered.lock();
        r.vms += 1;
        r.pools += pools;
        r.pages += stats.persistent_pages;
        r.bytes += stats.persistent_bytes;
        r.time = time;
    }

    /// Records run-time changes in `file` from now on (see
    /// [`Daemon::save_state`]). Only the first call counts.
    pub fn attach_state_file(&self, file: StateFile) {
        let _ = self.state.set(file);
    }

    /// The state file, if any.
    pub fn state_file(&self) -> Option<&StateFile> {
        self.state.get()
    }

    /// Writes the state file, if there is one.
    pub fn save_state(&self) -> Result<(), StateError> {
        match self.state.get() {
            Some(f) => f.save(|| {
                let vms = self
                    .vms()
                    .iter()
                    .map(|vm| VmState {
                        spec: vm.spec(),
                        frozen: vm.client().is_frozen(),
                    })
                    .collect();
                f.state(ByteSize(self.store.host_limit()), vms)
            }),
            None => Ok(()),
        }
    }

    /// Time since the daemon was created.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The device settings every VM gets.
    pub fn settings(&self) -> DeviceSettings {
        self.settings
    }

    /// The socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// A VM by name.
    pub fn vm(&self, name: &VmName) -> Result<Arc<Vm>, DaemonError> {
        self.vms
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| DaemonError::UnknownVm(name.clone()))
    }

    /// All VMs, by name.
    pub fn vms(&self) -> Vec<Arc<Vm>> {
        self.vms.lock().values().cloned().collect()
    }

    /// Starts serving a VM: creates its client and its socket.
    pub fn add_vm(&self, vm: &VmSpec) -> Result<Arc<Vm>, DaemonError> {
        self.add_vm_on(vm, None)
    }

    /// Starts serving a VM on a socket inherited from the service manager
    /// (its owner and mode are the service manager's business).
    pub fn add_vm_inherited(
        &self,
        vm: &VmSpec,
        socket: InheritedSocket,
    ) -> Result<Arc<Vm>, DaemonError> {
        self.add_vm_on(vm, Some(socket))
    }

    fn add_vm_on(
        &self,
        vm: &VmSpec,
        inherited: Option<InheritedSocket>,
    ) -> Result<Arc<Vm>, DaemonError> {
        let admin = self.admin.lock();
        if *admin {
            return Err(DaemonError::ShuttingDown);
        }
        if self.vms.lock().contains_key(&vm.name) {
            return Err(DaemonError::VmExists(vm.name.clone()));
        }
        let own_path = DaemonConfig::vm_socket_path(&self.socket_dir, &vm.name);
        // A client recovered from the state directory is there before the
        // socket is served: a VMM finds the VM as it was.
        let (client, recovered) = self.client_for(vm)?;
        let (socket, listener) = match inherited {
            Some(inh) => {
                let listener = VmListener {
                    listener: Listener::from(inh.listener),
                    path: None,
                };
                (inh.path.unwrap_or(own_path), listener)
            }
            None => match self.bind_vm_socket(vm, &own_path) {
                Ok(listener) => (own_path, listener),
                Err(e) => {
                    self.release_client(&vm.name, recovered);
                    return Err(e);
                }
            },
        };
        let owns_socket = listener.path.is_some();
        let stop_evt = match EventFd::new(EFD_NONBLOCK) {
            Ok(e) => e,
            Err(e) => {
                self.release_client(&vm.name, recovered);
                return Err(DaemonError::Thread(e));
            }
        };
        let entry = Arc::new(Vm {
            name: vm.name.clone(),
            declared: vm.clone(),
            socket: socket.clone(),
            owns_socket,
            client,
            counters: Arc::new(DeviceCounters::default()),
            log: Arc::new(RateLimitedLog::new(format!("vm {}", vm.name))),
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            stop_evt,
            conn: Mutex::new(Connection::default()),
            thread: Mutex::new(None),
        });
        let settings = self.settings;
        let thread_vm = entry.clone();
        let spawned = thread::Builder::new()
            .name(format!("vtmem-{}", vm.name))
            .spawn(move || serve(thread_vm, listener, settings));
        match spawned {
            Ok(h) => *entry.thread.lock() = Some(h),
            Err(e) => {
                // The listener went down with the closure: socket removed.
                self.release_client(&vm.name, recovered);
                return Err(DaemonError::Thread(e));
            }
        }
        self.vms.lock().insert(vm.name.clone(), entry.clone());
        if recovered {
            self.report_recovered(&vm.name, &entry.client);
        }
        info!(
            "vm {}: listening on {}{} (persistent quota {}, ephemeral quota {}, weight {})",
            vm.name,
            socket.display(),
            if owns_socket { "" } else { ", inherited" },
            vm.persistent_quota,
            vm.ephemeral_quota,
            vm.weight
        );
        drop(admin);
        Ok(entry)
    }

    /// Binds VM `vm`'s socket at `socket`.
    fn bind_vm_socket(&self, vm: &VmSpec, socket: &Path) -> Result<VmListener, DaemonError> {
        check_socket_path(socket)?;
        clear_stale_socket(socket)?;

        let owner = match &vm.socket_user {
            Some(u) => Some(resolve_user(u.as_str())?.0),
            None => None,
        };
        let group = match &vm.socket_group {
            Some(g) => Some(resolve_group(g.as_str())?),
            None => None,
        };
        let mode = vm.socket_mode().bits();
        // Created 0600 and given its owner and mode before it appears under
        // its name: whoever can connect to it is this VM.
        // The mode first: once the socket is another user's, changing it
        // would need CAP_FOWNER too.
        match crate::sys::bind_ready(socket, true, |tmp| {
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode))?;
            if owner.is_some() || group.is_some() {
                std::os::unix::fs::chown(tmp, owner, group)?;
            }
            Ok(())
        }) {
            Ok(l) => Ok(VmListener {
                listener: Listener::from(l),
                path: Some(socket.to_path_buf()),
            }),
            Err(e) => Err(DaemonError::Listen(socket.to_path_buf(), e.to_string())),
        }
    }

    /// Stops serving a VM, frees everything its client holds and removes
    /// its socket.
    pub fn remove_vm(&self, name: &VmName) -> Result<(), DaemonError> {
        let admin = self.admin.lock();
        if *admin {
            return Err(DaemonError::ShuttingDown);
        }
        let vm = self
            .vms
            .lock()
            .remove(name)
            .ok_or_else(|| DaemonError::UnknownVm(name.clone()))?;
        vm.request_stop();
        vm.join();
        vm.remove_socket_file();
        let result = self.store.remove_client(name.as_str());
        drop(admin);
        info!("vm {name}: removed");
        result.map_err(DaemonError::from)
    }

    /// Stops every VM (the clients stay in the store). Later add and remove
    /// calls fail.
    pub fn shutdown(&self) {
        let mut admin = self.admin.lock();
        *admin = true;
        let vms: Vec<Arc<Vm>> = std::mem::take(&mut *self.vms.lock())
            .into_values()
            .collect();
        for vm in &vms {
            vm.request_stop();
        }
        for vm in &vms {
            vm.join();
            vm.remove_socket_file();
        }
        // Every connection is closed and its batches answered: what the
        // clients hold now is what the guests were told. The state
        // directory holds it already; a checkpoint of every domain only
        // spares the next start the replay of the journals.
        if let Some(dir) = self.state_dir.get() {
            let t = Instant::now();
            match self.store.checkpoint_all() {
                Ok(()) => info!(
                    "state directory {}: checkpointed in {} ms",
                    dir.path().display(),
                    t.elapsed().as_millis()
                ),
                // Still recoverable: the journals hold what the snapshots
                // do not.
                Err(e) => warn!(
                    "state directory {}: checkpoint at stop failed (the next start replays the journals): {e}",
                    dir.path().display()
                ),
            }
            for vm in &vms {
                let s = vm.client.stats();
                info!(
                    "vm {}: state kept in {}: {} pools, {} persistent pages ({} bytes)",
                    vm.name,
                    dir.path().display(),
                    s.pools.len(),
                    s.persistent_pages,
                    s.persistent_bytes
                );
            }
        }
    }
}

/// Removes a socket file nobody listens on; refuses to touch a live socket
/// or a file that is not a socket.
fn clear_stale_socket(path: &Path) -> Result<(), DaemonError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DaemonError::Listen(path.to_path_buf(), e.to_string())),
        Ok(meta) if !meta.file_type().is_socket() => {
            Err(DaemonError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(DaemonError::SocketInUse(path.to_path_buf()));
            }
            std::fs::remove_file(path)
                .map_err(|e| DaemonError::Listen(path.to_path_buf(), e.to_string()))
        }
    }
}

const LISTENER_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;

/// Waits until the listener has a connection (true) or the VM is stopped
/// (false).
fn wait_for_connection(epoll: &Epoll, vm: &Vm) -> bool {
    let mut events = [EpollEvent::default(); 2];
    loop {
        if vm.stopping() {
            return false;
        }
        match epoll.wait(-1, &mut events) {
            Ok(n) => {
                if vm.stopping() || events[..n].iter().any(|e| e.data() == STOP_TOKEN) {
                    return false;
                }
                if n > 0 {
                    return true;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("vm {}: cannot wait for connections: {e}", vm.name);
                return false;
            }
        }
    }
}

/// A VM's listening socket; the file vtmemd made for it (none if it was
/// inherited) goes with it.
struct VmListener {
    listener: Listener,
    path: Option<PathBuf>,
}

impl Drop for VmListener {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The serving thread of one VM: accept, serve, repeat.
fn serve(vm: Arc<Vm>, mut socket: VmListener, settings: DeviceSettings) {
    let listener = &mut socket.listener;
    let epoll = match Epoll::new().and_then(|ep| {
        ep.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        ep.ctl(
            ControlOperation::Add,
            vm.stop_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        Ok(ep)
    }) {
        Ok(ep) => ep,
        Err(e) => {
            error!("vm {}: cannot set up epoll: {e}", vm.name);
            return;
        }
    };

    while wait_for_connection(&epoll, &vm) {
        let backend = Arc::new(VtmemBackend::new(
            vm.client.data(),
            settings,
            vm.counters.clone(),
            vm.log.clone(),
        ));
        let mut daemon = match VhostUserDaemon::new(
            format!("vtmem-{}", vm.name),
            backend.clone(),
            backend.memory(),
        ) {
            Ok(d) => d,
            Err(e) => {
                error!("vm {}: cannot create the vhost-user daemon: {e}", vm.name);
                backend.stop_workers();
                thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if let Err(e) = daemon.start(listener) {
            warn!("vm {}: cannot accept a connection: {e}", vm.name);
            backend.stop_workers();
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        if !vm.connected(daemon.shutdown_handle(), &backend) {
            daemon.request_shutdown();
            let _ = daemon.wait();
            backend.stop_workers();
            break;
        }
        info!("vm {}: frontend connected", vm.name);
        let result = daemon.wait();
        backend.stop_workers();
        if backend.migrated_out() {
            // The VM's state went to a migration destination, and the
            // frontend left without starting the device again: the VM runs
            // elsewhere now, with its own copy of every page.
            let held = vm.client.stats();
            vm.client.data().reset();
            info!(
                "vm {}: migrated away; freed {} persistent and {} ephemeral pages",
                vm.name, held.persistent_pages, held.ephemeral_pages
            );
        }
        vm.disconnected();
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("vm {}: frontend disconnected", vm.name),
            Err(e) if vm.stopping() => info!("vm {}: connection closed ({e})", vm.name),
            Err(e) => warn!("vm {}: connection ended: {e}", vm.name),
        }
    }
    // Dropping the listener removes the socket file.
    drop(socket);
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn vm_sockets_get_their_owner_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let d = crate::testutil::daemon_in(dir.path());
        let plain = d.add_vm(&"plain".parse().unwrap()).unwrap();
        let meta = std::fs::metadata(plain.socket()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "private by default");

        let shared = d
            .add_vm(&"shared,socket-group=4321".parse().unwrap())
            .unwrap();
        let meta = std::fs::metadata(shared.socket()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o660, "group access with a group");
        if rustix::process::geteuid().is_root() {
            assert_eq!(meta.gid(), 4321);
            let owned = d
                .add_vm(&"owned,socket-user=1234,socket-mode=0640".parse().unwrap())
                .unwrap();
            let meta = std::fs::metadata(owned.socket()).unwrap();
            assert_eq!((meta.uid(), meta.mode() & 0o777), (1234, 0o640));
            // The spec keeps its socket settings across changes.
            owned.client().set_weight(7).unwrap();
            let spec = owned.spec();
            assert_eq!(spec.socket_user.unwrap().as_str(), "1234");
            assert_eq!(spec.weight.get(), 7);
        }

        let err = d
            .add_vm(
                &"nobody-home,socket-user=no-such-user-vtmem"
                    .parse()
                    .unwrap(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("no-such-user-vtmem"), "{err}");
        assert!(d.vm(&"nobody-home".parse().unwrap()).is_err());
        assert!(!dir.path().join("nobody-home.sock").exists());
        d.shutdown();
    }
}
