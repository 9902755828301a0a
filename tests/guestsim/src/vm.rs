// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A simulated VM: the VMM half sets the device up over vhost-user the way
//! QEMU does, the driver half runs the request queues in shared guest RAM.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VringConfigData};
use vmm_sys_util::eventfd::EventFd;
use vtmem_protocol::{
    DeviceConfig, Handle, ObjectId, PoolSpec, Status, CONFIG_SIZE, MAX_REQUEST_QUEUES,
    VTMEM_F_EPHEMERAL, VTMEM_F_MQ, VTMEM_F_RESERVE, VTMEM_F_SHARED,
};

use crate::memory::{Allocator, GuestRam};
use crate::queue::{ring_bytes, Queue, QueueConfig, QueueStats, SLOT_BYTES};
use crate::raw::{RawChainBuilder, SCRATCH_BYTES};
use crate::ring::RingLayout;
use crate::{Error, Page, Result, PAGE_SIZE};

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Every device feature bit this driver knows.
pub const KNOWN_DEVICE_FEATURES: u64 =
    1 << VTMEM_F_EPHEMERAL | 1 << VTMEM_F_SHARED | 1 << VTMEM_F_MQ | 1 << VTMEM_F_RESERVE;

/// How to set up a VM.
#[derive(Clone, Debug)]
pub struct VmOptions {
    /// Request queues to use (capped by what the device offers).
    pub queues: u16,
    /// Entries per ring (a power of two).
    pub queue_size: u16,
    /// Requests that may be in flight per queue.
    pub depth: usize,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` if offered.
    pub event_idx: bool,
    /// Negotiate `VIRTIO_RING_F_INDIRECT_DESC` if offered and use it.
    pub indirect: bool,
    /// Device feature bits (`1 << VTMEM_F_*`) to accept if offered.
    pub device_features: u64,
    /// Send `RESET` once the queues are up, as a driver does at probe.
    pub reset_on_connect: bool,
    /// How long to wait for any completion.
    pub timeout: Duration,
    /// Spin on the used ring this long before sleeping.
    pub spin: Duration,
    /// Pages of guest RAM set aside as the guest's own memory
    /// ([`Vm::guest_pages`]), for zero-copy requests.
    pub guest_pages: u64,
    /// Negotiate `REPLY_ACK` and wait for every message to be acknowledged
    /// (without it, messages race ahead of the backend as with a VMM that
    /// does not wait).
    pub reply_ack: bool,
    /// Leave the rings disabled after setting them up; [`Vm::enable_queues`]
    /// enables them (no `RESET` is sent at connect then).
    pub defer_enable: bool,
    /// Hand the backend guest RAM that is not sealed against shrinking, as
    /// a careless or hostile VMM could.
    pub unsealed_memory: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            queues: 1,
            queue_size: 256,
            depth: 8,
            event_idx: true,
            indirect: true,
            device_features: KNOWN_DEVICE_FEATURES,
            reset_on_connect: true,
            timeout: Duration::from_secs(20),
            spin: Duration::ZERO,
            guest_pages: 0,
            reply_ack: true,
            defer_enable: false,
            unsealed_memory: false,
        }
    }
}

/// What was negotiated with the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Virtio features the device offered.
    pub offered: u64,
    /// Virtio features acknowledged.
    pub acked: u64,
    /// vhost-user protocol features acknowledged.
    pub protocol: u64,
    /// Queues the backend reported (`GET_QUEUE_NUM`, 1 without MQ).
    pub backend_queues: u64,
    /// The device's configuration space.
    pub config: DeviceConfig,
}

impl Negotiated {
    /// Whether virtio feature `bit` was acknowledged.
    pub fn has(&self, bit: u32) -> bool {
        self.acked & (1u64 << bit) != 0
    }
}

/// A connected, running simulated VM.
pub struct Vm {
    socket: PathBuf,
    /// The vhost-user connection (a clone, for the watchdog of [`Vm::shutdown`]).
    /// The connection's socket, for waits on it (replaced by
    /// [`Vm::reconnect`]).
    stream: Mutex<UnixStream>,
    /// Each queue's kick and call eventfds, as a VMM keeps them across
    /// back ends (the queues' own are behind their locks).
    notifiers: Vec<(EventFd, EventFd)>,
    /// Each request queue's ring, where [`Vm::used_indexes`] reads.
    layouts: Vec<RingLayout>,
    frontend: Mutex<Frontend>,
    ram: Arc<GuestRam>,
    queues: Vec<Mutex<Queue>>,
    scratch: Mutex<u64>,
    guest_pages: GuestPages,
    negotiated: Negotiated,
}

/// Pages of guest RAM that stand for the guest's own memory: requests can
/// point page buffers at them directly ([`crate::PageSource::InGuest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPages {
    base: u64,
    count: u64,
}

impl GuestPages {
    /// Number of pages.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Guest address of page `i`.
    pub fn addr(&self, i: u64) -> u64 {
        assert!(i < self.count, "guest page {i} of {}", self.count);
        self.base + i * PAGE_SIZE as u64
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("socket", &self.socket)
            .field("queues", &self.queues.len())
            .field("negotiated", &self.negotiated)
            .finish_non_exhaustive()
    }
}

/// Shuts a vhost-user socket down if a setup step outlasts its deadline, so
/// that a blocked read returns.
struct Watchdog {
    cancel: mpsc::Sender<()>,
    fired: std::thread::JoinHandle<bool>,
}

impl Watchdog {
    fn arm(stream: &UnixStream, timeout: Duration) -> Result<Self> {
        let s = stream.try_clone().map_err(Error::Io)?;
        let (cancel, rx) = mpsc::channel::<()>();
        let fired = std::thread::spawn(move || match rx.recv_timeout(timeout) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
                true
            }
            _ => false,
        });
        Ok(Watchdog { cancel, fired })
    }

    /// Stops the watchdog; fails if it had fired.
    fn disarm(self) -> Result<()> {
        let _ = self.cancel.send(());
        if self.fired.join().unwrap_or(true) {
            return Err(Error::Setup("vhost-user setup timed out".into()));
        }
        Ok(())
    }
}

fn vhost_err(what: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |e| Error::Vhost(what, e)
}

impl Vm {
    /// Connects to a vtmemd VM socket and brings the device up.
    pub fn connect(socket: impl AsRef<Path>, opts: &VmOptions) -> Result<Vm> {
        let socket = socket.as_ref().to_path_buf();
        let stream = UnixStream::connect(&socket)
            .map_err(|e| Error::Setup(format!("connect {}: {e}", socket.display())))?;
        // A backend that never answers (or serves another frontend) must not
        // hang the VMM forever: the vhost crate retries timed-out reads, so
        // a watchdog shuts the socket down instead.
        let watchdog = Watchdog::arm(&stream, opts.timeout)?;
        let res = Self::setup(socket, stream, opts);
        let fired = watchdog.disarm().is_err();
        match res {
            Err(_) if fired => Err(Error::Timeout(opts.timeout)),
            Ok(_) if fired => Err(Error::Timeout(opts.timeout)),
            res => res,
        }
    }

    fn setup(socket: PathBuf, stream: UnixStream, opts: &VmOptions) -> Result<Vm> {
        let stream_clone = stream.try_clone().map_err(Error::Io)?;
        let mut fe = Frontend::from_stream(stream, MAX_REQUEST_QUEUES as u64);
        // Every message asks for an acknowledgement once REPLY_ACK is
        // negotiated, so nothing races ahead of the backend (in particular
        // no kick before SET_VRING_ENABLE is processed).
        if opts.reply_ack {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        fe.set_owner().map_err(vhost_err("SET_OWNER"))?;
        let offered = fe.get_features().map_err(vhost_err("GET_FEATURES"))?;
        let pf = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & pf == 0 {
            return Err(Error::Setup(
                "backend does not offer VHOST_USER_F_PROTOCOL_FEATURES".into(),
            ));
        }
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(Error::Setup(
                "backend does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        let proto_offered = fe
            .get_protocol_features()
            .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
        // DEVICE_STATE and LOG_SHMFD when offered, as QEMU does, for the
        // migration tests.
        let mut wanted_proto = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::DEVICE_STATE
            | VhostUserProtocolFeatures::LOG_SHMFD;
        if opts.reply_ack {
            wanted_proto |= VhostUserProtocolFeatures::REPLY_ACK;
        }
        let proto = proto_offered & wanted_proto;
        if !proto.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(Error::Setup(
                "backend does not offer the CONFIG protocol feature".into(),
            ));
        }
        fe.set_protocol_features(proto)
            .map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
        let backend_queues = if proto.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(vhost_err("GET_QUEUE_NUM"))?
        } else {
            1
        };
        let (_, cfg_bytes) = fe
            .get_config(
                0,
                CONFIG_SIZE as u32,
                VhostUserConfigFlags::empty(),
                &[0u8; CONFIG_SIZE],
            )
            .map_err(vhost_err("GET_CONFIG"))?;
        let config = DeviceConfig::decode(&cfg_bytes)
            .map_err(|e| Error::Device(format!("config space: {e}")))?;

        let mut wanted =
            pf | 1 << VIRTIO_F_VERSION_1 | (opts.device_features & KNOWN_DEVICE_FEATURES);
        if opts.event_idx {
            wanted |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if opts.indirect {
            wanted |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        let acked = offered & wanted;
        fe.set_features(acked).map_err(vhost_err("SET_FEATURES"))?;
        let negotiated = Negotiated {
            offered,
            acked,
            protocol: proto.bits(),
            backend_queues,
            config,
        };

        let device_queues = if negotiated.has(VTMEM_F_MQ) {
            config.num_request_queues as u64
        } else {
            1
        };
        let nq = (opts.queues.max(1) as u64)
            .min(device_queues)
            .min(backend_queues.max(1)) as u16;

        let depth = opts.depth.max(1);
        let size = ring_bytes(opts.queue_size) * nq as u64
            + SLOT_BYTES * depth as u64 * nq as u64
            + SCRATCH_BYTES
            + opts.guest_pages * PAGE_SIZE as u64
            + (1 << 20);
        let name = CString::new(format!(
            "vtmem-guest-{}",
            socket.file_stem().and_then(|s| s.to_str()).unwrap_or("vm")
        ))
        .map_err(|_| Error::Setup("socket name holds a NUL byte".into()))?;
        let size = size.next_multiple_of(1 << 21);
        let ram = Arc::new(if opts.unsealed_memory {
            GuestRam::new_unsealed(&name, size)?
        } else {
            GuestRam::new(&name, size)?
        });
        let mut alloc = Allocator::new(ram.base(), ram.end());
        let scratch = alloc.alloc(SCRATCH_BYTES, 4096)?;
        let guest_pages = GuestPages {
            base: alloc.alloc(opts.guest_pages * PAGE_SIZE as u64, 4096)?,
            count: opts.guest_pages,
        };

        fe.set_mem_table(&[ram.region_info()?])
            .map_err(vhost_err("SET_MEM_TABLE"))?;

        let qcfg = QueueConfig {
            indirect: negotiated.has(VIRTIO_RING_F_INDIRECT_DESC),
            timeout: opts.timeout,
            spin: opts.spin,
        };
        let event_idx = negotiated.has(VIRTIO_RING_F_EVENT_IDX);
        let mut queues = Vec::with_capacity(nq as usize);
        let mut layouts = Vec::with_capacity(nq as usize);
        let mut notifiers = Vec::with_capacity(nq as usize);
        for q in 0..nq {
            let queue = Queue::new(
                q,
                ram.clone(),
                &mut alloc,
                opts.queue_size,
                depth,
                event_idx,
                qcfg,
            )?;
            let l = queue.ring().layout();
            let qi = q as usize;
            fe.set_vring_num(qi, opts.queue_size)
                .map_err(vhost_err("SET_VRING_NUM"))?;
            fe.set_vring_base(qi, 0)
                .map_err(vhost_err("SET_VRING_BASE"))?;
            let addr = VringConfigData {
                queue_max_size: opts.queue_size,
                queue_size: opts.queue_size,
                flags: 0,
                desc_table_addr: ram.host_address(l.desc)?,
                used_ring_addr: ram.host_address(l.used)?,
                avail_ring_addr: ram.host_address(l.avail)?,
                log_addr: None,
            };
            fe.set_vring_addr(qi, &addr)
                .map_err(vhost_err("SET_VRING_ADDR"))?;
            fe.set_vring_kick(qi, queue.kick_fd())
                .map_err(vhost_err("SET_VRING_KICK"))?;
            fe.set_vring_call(qi, queue.call_fd())
                .map_err(vhost_err("SET_VRING_CALL"))?;
            if !opts.defer_enable {
                fe.set_vring_enable(qi, true)
                    .map_err(vhost_err("SET_VRING_ENABLE"))?;
            }
            layouts.push(l);
            notifiers.push((
                queue.kick_fd().try_clone().map_err(Error::Io)?,
                queue.call_fd().try_clone().map_err(Error::Io)?,
            ));
            queues.push(Mutex::new(queue));
        }

        let vm = Vm {
            socket,
            stream: Mutex::new(stream_clone),
            notifiers,
            layouts,
            frontend: Mutex::new(fe),
            ram,
            queues,
            scratch: Mutex::new(scratch),
            guest_pages,
            negotiated,
        };
        if opts.reset_on_connect && !opts.defer_enable {
            let st = vm.reset()?;
            if st != Status::Ok {
                return Err(Error::Status(st));
            }
        }
        Ok(vm)
    }

    /// The socket this VM is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What was negotiated.
    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// The device's configuration space.
    pub fn config(&self) -> DeviceConfig {
        self.negotiated.config
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The guest's own pages ([`VmOptions::guest_pages`]).
    pub fn guest_pages(&self) -> GuestPages {
        self.guest_pages
    }

    /// Copies `page` into guest page `i`.
    pub fn write_guest_page(&self, i: u64, page: &Page) -> Result<()> {
        self.ram.write(self.guest_pages.addr(i), page)
    }

    /// Reads guest page `i`.
    pub fn read_guest_page(&self, i: u64) -> Result<Box<Page>> {
        let mut p: Box<Page> = Box::new([0u8; PAGE_SIZE]);
        self.ram.read(self.guest_pages.addr(i), &mut p[..])?;
        Ok(p)
    }

    /// The used index of each request queue, read from guest memory, as a
    /// VMM that lost its back end reads it to rewind the ring (QEMU's
    /// `virtio_queue_restore_last_avail_idx`). No queue lock is taken.
    pub fn used_indexes(&self) -> Result<Vec<u16>> {
        self.layouts
            .iter()
            .map(|l| self.ram.load(l.used_idx(), Ordering::Acquire))
            .collect()
    }

    /// Chains each queue has made available that the device has not
    /// returned (available index minus used index, from guest memory).
    pub fn unanswered_chains(&self) -> Result<Vec<u16>> {
        self.layouts
            .iter()
            .map(|l| {
                let avail: u16 = self.ram.load(l.avail_idx(), Ordering::Acquire)?;
                let used: u16 = self.ram.load(l.used_idx(), Ordering::Acquire)?;
                Ok(avail.wrapping_sub(used))
            })
            .collect()
    }

    /// Waits up to `limit` for the back end to close the vhost-user
    /// connection; true once it has (the socket reads end-of-file).
    pub fn wait_backend_gone(&self, limit: Duration) -> Result<bool> {
        let stream = self.stream()?;
        if !crate::sys::wait_readable(&stream, limit).map_err(Error::Io)? {
            return Ok(false);
        }
        let mut byte = [0u8; 1];
        match rustix::net::recv(&stream, &mut byte, rustix::net::RecvFlags::PEEK) {
            Ok((0, _)) => Ok(true),
            // A message the frontend did not ask for: not the end.
            Ok(_) => Ok(false),
            Err(e) => Err(Error::Io(e.into())),
        }
    }

    /// A handle on the current connection's socket.
    fn stream(&self) -> Result<UnixStream> {
        self.stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_clone()
            .map_err(Error::Io)
    }

    /// Connects to the next back end on the same socket path once the last
    /// one went away (an upgrade, a restart, a crash), as QEMU's
    /// vhost-user devices do with `reconnect-ms`: the same features,
    /// memory table, rings and eventfds; each ring's base is the used
    /// index in guest memory, so chains the old back end took and never
    /// answered are offered again; then one kick per queue, as QEMU's
    /// virtio core gives a queue whose notifier it starts. Requests in
    /// flight on the queues (even ones a thread is waiting for) are
    /// answered by the new back end. Retries the connection until
    /// `timeout` while the socket is not there yet.
    pub fn reconnect(&self, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => break s,
                // Nothing to wait on until the new back end binds its
                // socket: poll the path until the deadline.
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(Error::Setup(format!(
                        "reconnect {}: {e}",
                        self.socket.display()
                    )))
                }
            }
        };
        let watchdog = Watchdog::arm(&stream, timeout)?;
        let res = self.restart_on(&stream);
        let fired = watchdog.disarm().is_err();
        let fe = match res {
            Err(_) | Ok(_) if fired => return Err(Error::Timeout(timeout)),
            res => res?,
        };
        *self.frontend.lock().unwrap_or_else(|p| p.into_inner()) = fe;
        *self.stream.lock().unwrap_or_else(|p| p.into_inner()) = stream;
        for (kick, _) in &self.notifiers {
            kick.write(1).map_err(Error::Io)?;
        }
        Ok(())
    }

    /// The vhost-user setup of [`Vm::reconnect`] on a new connection.
    fn restart_on(&self, stream: &UnixStream) -> Result<Frontend> {
        let n = &self.negotiated;
        let mut fe = Frontend::from_stream(
            stream.try_clone().map_err(Error::Io)?,
            MAX_REQUEST_QUEUES as u64,
        );
        let proto = VhostUserProtocolFeatures::from_bits_truncate(n.protocol);
        if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        fe.set_owner().map_err(vhost_err("SET_OWNER"))?;
        let offered = fe.get_features().map_err(vhost_err("GET_FEATURES"))?;
        if offered & n.acked != n.acked {
            return Err(Error::Setup(format!(
                "the new back end offers features {offered:#x}, not all of {:#x}",
                n.acked
            )));
        }
        let proto_offered = fe
            .get_protocol_features()
            .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
        if !proto_offered.contains(proto) {
            return Err(Error::Setup(format!(
                "the new back end offers protocol features {proto_offered:?}, not all of {proto:?}"
            )));
        }
        fe.set_protocol_features(proto)
            .map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
        if proto.contains(VhostUserProtocolFeatures::MQ) {
            let queues = fe.get_queue_num().map_err(vhost_err("GET_QUEUE_NUM"))?;
            if queues < self.queues.len() as u64 {
                return Err(Error::Setup(format!(
                    "the new back end has {queues} queues, not {}",
                    self.queues.len()
                )));
            }
        }
        fe.set_features(n.acked)
            .map_err(vhost_err("SET_FEATURES"))?;
        fe.set_mem_table(&[self.ram.region_info()?])
            .map_err(vhost_err("SET_MEM_TABLE"))?;
        for (qi, (l, (kick, call))) in self.layouts.iter().zip(&self.notifiers).enumerate() {
            let used: u16 = self.ram.load(l.used_idx(), Ordering::Acquire)?;
            fe.set_vring_num(qi, l.size)
                .map_err(vhost_err("SET_VRING_NUM"))?;
            fe.set_vring_base(qi, used)
                .map_err(vhost_err("SET_VRING_BASE"))?;
            let addr = VringConfigData {
                queue_max_size: l.size,
                queue_size: l.size,
                flags: 0,
                desc_table_addr: self.ram.host_address(l.desc)?,
                used_ring_addr: self.ram.host_address(l.used)?,
                avail_ring_addr: self.ram.host_address(l.avail)?,
                log_addr: None,
            };
            fe.set_vring_addr(qi, &addr)
                .map_err(vhost_err("SET_VRING_ADDR"))?;
            fe.set_vring_kick(qi, kick)
                .map_err(vhost_err("SET_VRING_KICK"))?;
            fe.set_vring_call(qi, call)
                .map_err(vhost_err("SET_VRING_CALL"))?;
            fe.set_vring_enable(qi, true)
                .map_err(vhost_err("SET_VRING_ENABLE"))?;
        }
        Ok(fe)
    }

    /// Number of request queues in use.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Exclusive access to request queue `i` (for pipelining, raw chains,
    /// or driving queues from several threads).
    pub fn queue(&self, i: usize) -> MutexGuard<'_, Queue> {
        self.queues[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sum of every queue's counters.
    pub fn stats(&self) -> QueueStats {
        let mut s = QueueStats::default();
        for i in 0..self.queues.len() {
            let mut q = self.queue(i);
            // Best effort: a failing eventfd read only loses a count.
            let _ = q.collect_interrupts();
            let t = q.stats();
            s.requests += t.requests;
            s.ops += t.ops;
            s.kicks += t.kicks;
            s.kicks_suppressed += t.kicks_suppressed;
            s.interrupts += t.interrupts;
            s.sleeps += t.sleeps;
            s.completions += t.completions;
        }
        s
    }

    /// Clears every queue's counters.
    pub fn reset_stats(&self) {
        for i in 0..self.queues.len() {
            let mut q = self.queue(i);
            let _ = q.collect_interrupts();
            q.reset_stats();
        }
    }

    /// Kick eventfd writes so far.
    pub fn kicks(&self) -> u64 {
        self.stats().kicks
    }

    /// Device interrupts so far.
    pub fn interrupts(&self) -> u64 {
        self.stats().interrupts
    }

    /// Starts a hand-built chain on queue `q` (malformed-request tests).
    pub fn raw_chain(&self, q: usize) -> RawChainBuilder<'_> {
        let scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        RawChainBuilder::new(self, q, scratch)
    }

    /// `RESET` on queue 0.
    pub fn reset(&self) -> Result<Status> {
        self.queue(0).reset()
    }

    /// `NEW_POOL` on queue 0.
    pub fn new_pool(&self, spec: PoolSpec) -> Result<u32> {
        self.queue(0).new_pool(spec)
    }

    /// `DESTROY_POOL` on queue 0.
    pub fn destroy_pool(&self, pool: u32) -> Result<Status> {
        self.queue(0).destroy_pool(pool)
    }

    /// `PUT`s on queue 0.
    pub fn put_batch(&self, pages: &[(Handle, &Page)]) -> Result<Vec<Status>> {
        self.queue(0).put_batch(pages)
    }

    /// Reserved `PUT`s on queue 0.
    pub fn put_batch_reserved(&self, pages: &[(Handle, &Page)]) -> Result<Vec<Status>> {
        self.queue(0).put_batch_with(pages, true)
    }

    /// `GET`s on queue 0.
    pub fn get_batch(&self, handles: &[Handle]) -> Result<Vec<(Status, Box<Page>)>> {
        self.queue(0).get_batch(handles)
    }

    /// `FLUSH_PAGE` on queue 0.
    pub fn flush_page(&self, handle: Handle) -> Result<Status> {
        self.queue(0).flush_page(handle)
    }

    /// `FLUSH_PAGE`s on queue 0.
    pub fn flush_pages(&self, handles: &[Handle]) -> Result<Vec<Status>> {
        self.queue(0).flush_pages(handles)
    }

    /// `FLUSH_OBJECT` on queue 0.
    pub fn flush_object(&self, pool: u32, object: ObjectId) -> Result<Status> {
        self.queue(0).flush_object(pool, object)
    }

    /// `RESERVE` on queue 0.
    pub fn reserve(&self, pool: u32, pages: u64) -> Result<u64> {
        self.queue(0).reserve(pool, pages)
    }

    /// `UNRESERVE` on queue 0.
    pub fn unreserve(&self, pool: u32, pages: u64) -> Result<u64> {
        self.queue(0).unreserve(pool, pages)
    }

    /// `SET_VRING_ENABLE 1` on every queue (after [`VmOptions::defer_enable`]).
    pub fn enable_queues(&self) -> Result<()> {
        let mut fe = self.frontend.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..self.queues.len() {
            fe.set_vring_enable(i, true)
                .map_err(vhost_err("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stops the rings the way a VMM stops a device (`SET_VRING_ENABLE 0`,
    /// `GET_VRING_BASE`), then closes the connection. Returns each queue's
    /// ring base as the backend reported it.
    pub fn shutdown(self) -> Result<Vec<u32>> {
        let timeout = self.queue(0).timeout();
        let watchdog = Watchdog::arm(&self.stream()?, timeout)?;
        let res = self.stop_rings();
        if watchdog.disarm().is_err() {
            return Err(Error::Timeout(timeout));
        }
        res
    }

    /// Stops the rings as a VMM stops a device before saving its state
    /// (`SET_VRING_ENABLE 0`, `GET_VRING_BASE` on each), keeping the
    /// connection. Returns each queue's ring base.
    pub fn stop_rings(&self) -> Result<Vec<u32>> {
        let mut fe = self.frontend.lock().unwrap_or_else(|p| p.into_inner());
        let mut bases = Vec::new();
        for i in 0..self.queues.len() {
            fe.set_vring_enable(i, false)
                .map_err(vhost_err("SET_VRING_ENABLE"))?;
            bases.push(fe.get_vring_base(i).map_err(vhost_err("GET_VRING_BASE"))?);
        }
        Ok(bases)
    }

    /// `SET_FEATURES` again with the negotiated features, what QEMU sends
    /// when it starts the device again (a source whose migration failed).
    pub fn set_features_again(&self) -> Result<()> {
        let fe = self.frontend.lock().unwrap_or_else(|p| p.into_inner());
        fe.set_features(self.negotiated.acked)
            .map_err(vhost_err("SET_FEATURES"))
    }

    /// Starts logging the device's writes to guest memory, as QEMU does
    /// when a migration begins: `SET_FEATURES` with `VHOST_F_LOG_ALL`, then
    /// `SET_LOG_BASE` with a new shared-memory log (one bit per 4 KiB page
    /// of guest physical memory, QEMU's layout).
    pub fn start_dirty_log(&self) -> Result<DirtyLog> {
        if self.negotiated.protocol & VhostUserProtocolFeatures::LOG_SHMFD.bits() == 0 {
            return Err(Error::Setup("back end does not offer LOG_SHMFD".into()));
        }
        let pages = self.ram.end().div_ceil(PAGE_SIZE as u64);
        let bytes = pages.div_ceil(8).next_multiple_of(8);
        let file = crate::sys::unsealed_memfd(c"vtmem-guestsim-dirty-log", bytes)
            .map_err(Error::Memory)?;
        let fe = self.frontend.lock().unwrap_or_else(|p| p.into_inner());
        fe.set_features(self.negotiated.acked | VhostUserVirtioFeatures::LOG_ALL.bits())
            .map_err(vhost_err("SET_FEATURES"))?;
        fe.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: bytes,
                mmap_offset: 0,
                mmap_handle: file.as_raw_fd(),
            }),
        )
        .map_err(vhost_err("SET_LOG_BASE"))?;
        Ok(DirtyLog { file })
    }

    /// `SET_DEVICE_STATE_FD` with one end of a new pipe (the write end to
    /// save, the read end to load); returns the connection, locked, and
    /// this side's end.
    fn start_state_transfer(
        &self,
        direction: VhostTransferStateDirection,
    ) -> Result<(MutexGuard<'_, Frontend>, std::fs::File)> {
        let (rd, wr) = rustix::pipe::pipe().map_err(|e| Error::Io(e.into()))?;
        let (theirs, ours) = match direction {
            VhostTransferStateDirection::SAVE => (wr, rd),
            _ => (rd, wr),
        };
        let fe = self.frontend.lock().unwrap_or_else(|p| p.into_inner());
        let channel = fe
            .set_device_state_fd(direction, VhostTransferStatePhase::STOPPED, theirs)
            .map_err(vhost_err("SET_DEVICE_STATE_FD"))?;
        if channel.is_some() {
            return Err(Error::Device("back end chose a channel of its own".into()));
        }
        Ok((fe, std::fs::File::from(ours)))
    }

    /// Saves the device's state as QEMU's migration does: a pipe's write
    /// end to `SET_DEVICE_STATE_FD` (save, stopped), everything read from
    /// it until the back end closes it, then `CHECK_DEVICE_STATE`.
    pub fn save_device_state(&self) -> Result<Vec<u8>> {
        use std::io::Read;
        let (fe, mut r) = self.start_state_transfer(VhostTransferStateDirection::SAVE)?;
        let mut state = Vec::new();
        r.read_to_end(&mut state).map_err(Error::Io)?;
        fe.check_device_state()
            .map_err(vhost_err("CHECK_DEVICE_STATE"))?;
        Ok(state)
    }

    /// Loads a device state: a pipe's read end to `SET_DEVICE_STATE_FD`
    /// (load, stopped), `state` written to it and the pipe closed, then
    /// `CHECK_DEVICE_STATE`, whose failure is returned.
    pub fn load_device_state(&self, state: &[u8]) -> Result<()> {
        use std::io::Write;
        let (fe, mut w) = self.start_state_transfer(VhostTransferStateDirection::LOAD)?;
        // A back end that refuses early closes its end: the rest of the
        // write fails, and CHECK_DEVICE_STATE says why.
        let _ = w.write_all(state);
        drop(w);
        fe.check_device_state()
            .map_err(vhost_err("CHECK_DEVICE_STATE"))
    }

    /// Closes the connection at once, whatever is in flight (a VMM crash or
    /// kill). Guest RAM stays mapped here until the `Vm` is dropped.
    pub fn disconnect(self) {
        drop(self);
    }
}

/// The log of a VM's guest pages the device wrote, from
/// [`Vm::start_dirty_log`].
#[derive(Debug)]
pub struct DirtyLog {
    file: std::fs::File,
}

impl DirtyLog {
    /// Whether the device marked the 4 KiB page holding `gpa` dirty.
    pub fn is_dirty(&self, gpa: u64) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        let page = gpa / PAGE_SIZE as u64;
        let mut byte = [0u8];
        self.file
            .read_exact_at(&mut byte, page / 8)
            .map_err(Error::Io)?;
        Ok(byte[0] & (1 << (page % 8)) != 0)
    }

    /// Clears every bit, as QEMU does after each pass over guest memory.
    pub fn clear(&self) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let len = self.file.metadata().map_err(Error::Io)?.len();
        self.file
            .write_all_at(&vec![0u8; len as usize], 0)
            .map_err(Error::Io)
    }
}
