// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user glue: one [`VtmemBackend`] per frontend connection.
//!
//! It advertises the device (features, config space, queues), keeps the
//! guest memory map, and drains request queues: one worker thread per
//! queue, each with its own [`Executor`]. Parsing lives in
//! [`crate::request`], execution in [`crate::exec`]; this module only moves
//! descriptor heads between the rings and the executor.

use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{Error as QueueError, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vtmem_protocol::{
    DeviceConfig, VTMEM_F_EPHEMERAL, VTMEM_F_MQ, VTMEM_F_RESERVE, VTMEM_F_SHARED,
};

use crate::config::DeviceSettings;
use crate::exec::{DeviceCounters, Executor, Features};
use crate::poll::PollWindow;
use crate::ratelimit::RateLimitedLog;
use vtmem_store::{DataHandle, ImageError, ImageSummary};

/// Guest memory as this backend maps it: each region carries the dirty
/// log QEMU hands over for live migration (`VHOST_USER_SET_LOG_BASE`), so
/// every write to guest memory through vm-memory marks its page.
pub type GuestRam = GuestMemoryMmap<BitmapMmapRegion>;

/// Guest memory as the vhost-user crates share it.
pub type GuestMem = GuestMemoryAtomic<GuestRam>;

/// Virtio feature bits the device offers (with `VHOST_F_LOG_ALL`: writes
/// to guest memory are logged while QEMU migrates the VM).
pub const DEVICE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | VhostUserVirtioFeatures::LOG_ALL.bits()
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VTMEM_F_EPHEMERAL)
    | (1 << VTMEM_F_SHARED)
    | (1 << VTMEM_F_MQ)
    | (1 << VTMEM_F_RESERVE);

/// vhost-user protocol features the device offers.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
}

/// Names of the device features, for `--print-capabilities`.
pub const CAPABILITY_FEATURES: &[&str] = &["ephemeral", "shared", "mq", "reserve"];

/// Most chains handled in one pass before the used ring is signalled.
const MAX_BATCH: usize = 256;

/// The `generation` of the next connection's configuration space: distinct
/// for every connection this process serves (a counter), and starting from
/// a random value so that a restarted vtmemd's connections almost surely
/// differ from its predecessor's (a 2^-32 chance per connection that one
/// does not, and the guest then misses one reconnect in its count). Never
/// 0, which says "the device does not tell".
fn next_generation() -> u32 {
    static BASE: LazyLock<u32> = LazyLock::new(|| RandomState::new().hash_one(0u8) as u32);
    static NEXT: AtomicU32 = AtomicU32::new(0);
    match BASE.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) {
        0 => 1,
        g => g,
    }
}

/// The vhost-user backend of one VM for one connection.
#[derive(Debug)]
pub struct VtmemBackend {
    settings: DeviceSettings,
    config: [u8; vtmem_protocol::CONFIG_SIZE],
    mem: Mutex<GuestMem>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    /// One executor per queue; a worker holds its lock while it drains the
    /// queue, so `stop_vring` can wait for the batch in flight.
    executors: Vec<Mutex<Executor>>,
    /// One adaptive busy-poll window per queue (`--poll-us`), used under
    /// the queue's executor lock.
    pollers: Vec<Mutex<PollWindow>>,
    exit_notifiers: Mutex<Vec<EventNotifier>>,
    counters: Arc<DeviceCounters>,
    log: Arc<RateLimitedLog>,
    /// The client, for device-state transfers.
    client: DataHandle,
    /// The device-state transfer in flight (live migration), if any.
    transfer: Mutex<Option<Transfer>>,
    /// Set by [`VtmemBackend::stop_workers`]: a worker stops taking chains
    /// at its next round, however busy the guest keeps the ring.
    stopping: AtomicBool,
    /// This connection's device state went to a migration destination and
    /// the device has not been started since: when the frontend goes, the
    /// VM lives on elsewhere and its pages here can go.
    migrated_out: AtomicBool,
}

/// A device-state transfer running in its own thread (`set_device_state_fd`
/// must not block; `check_device_state` collects the outcome).
#[derive(Debug)]
struct Transfer {
    direction: VhostTransferStateDirection,
    started: Instant,
    thread: std::thread::JoinHandle<Result<ImageSummary, ImageError>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another worker panicked; the data it
    // guards (an executor, a memory handle) is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VtmemBackend {
    /// A backend acting for `client`.
    pub fn new(
        client: DataHandle,
        settings: DeviceSettings,
        counters: Arc<DeviceCounters>,
        log: Arc<RateLimitedLog>,
    ) -> Self {
        let executors = (0..settings.queues)
            .map(|q| {
                let e = Executor::new(client.clone(), counters.clone(), log.clone());
                Mutex::new(e.on_queue(q))
            })
            .collect();
        let pollers = (0..settings.queues)
            .map(|_| Mutex::new(PollWindow::new(settings.poll)))
            .collect();
        VtmemBackend {
            settings,
            config: DeviceConfig::new(settings.queues)
                .with_generation(next_generation())
                .encode(),
            mem: Mutex::new(GuestMemoryAtomic::new(GuestRam::new())),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            executors,
            pollers,
            exit_notifiers: Mutex::new(Vec::new()),
            counters,
            log,
            client,
            transfer: Mutex::new(None),
            stopping: AtomicBool::new(false),
            migrated_out: AtomicBool::new(false),
        }
    }

    /// Whether this connection's device state went to a migration
    /// destination and the device was not started again since (see
    /// docs/vtmemd.md, "Live migration").
    pub fn migrated_out(&self) -> bool {
        self.migrated_out.load(Ordering::Acquire)
    }

    /// The guest memory handle to give `VhostUserDaemon::new`.
    pub fn memory(&self) -> GuestMem {
        lock(&self.mem).clone()
    }

    /// Tells every worker thread of this backend to exit: each finishes
    /// (answers) the batch it holds and takes no more chains.
    pub fn stop_workers(&self) {
        self.stopping.store(true, Ordering::Release);
        for n in lock(&self.exit_notifiers).iter() {
            let _ = n.notify();
        }
    }

    /// Stops every worker taking chains and waits until each has answered
    /// the batch it holds: once this returns, nothing writes to the rings
    /// of this connection any more.
    ///
    /// Call it before dropping a connection on purpose. When the
    /// connection goes, QEMU rewinds each ring to the used index it finds
    /// in guest memory (it cannot ask a back end that is gone); a batch
    /// answered after that would leave the used index ahead of where the
    /// next back end is told to start, and it would take chains the guest
    /// already had answers for.
    pub fn quiesce(&self) {
        self.stopping.store(true, Ordering::Release);
        for executor in &self.executors {
            // A worker holds its executor while it drains the queue, and
            // checks `stopping` before each chain.
            drop(lock(executor));
        }
    }

    /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub fn event_idx(&self) -> bool {
        self.event_idx.load(Ordering::Acquire)
    }

    /// The negotiated device features.
    pub fn features_in_use(&self) -> Features {
        Features::from_acked(self.acked_features.load(Ordering::Acquire))
    }

    /// Drains queue `q` until it is empty and notifications are back on.
    fn process_queue(&self, q: usize, vring: &VringRwLock<GuestMem>) {
        let (Some(executor), Some(poller)) = (self.executors.get(q), self.pollers.get(q)) else {
            return;
        };
        let mut executor = lock(executor);
        let mut poller = lock(poller);
        poller.kicked(Instant::now());
        let mut used: Vec<(u16, u32)> = Vec::with_capacity(MAX_BATCH);

        // Rounds in which the ring claimed work but yielded none: a ring
        // whose entries cannot be read would otherwise spin forever.
        let mut fruitless = 0;
        loop {
            if let Err(e) = vring.disable_notification() {
                self.log
                    .warn(format_args!("queue {q}: cannot disable notifications: {e}"));
            }
            let mut processed = 0;
            let mut polled = false;
            loop {
                if self.stopping.load(Ordering::Acquire) {
                    // What is left stays in the ring for the next back end.
                    return;
                }
                // A fresh memory map and feature set for every pass: a
                // busy-polling worker may run for long, and a memory map
                // update must reach it.
                let mem = lock(&self.mem).memory();
                let features = self.features_in_use();
                let n = match self.drain_once(q, vring, &mem, &mut executor, features, &mut used) {
                    Drain::Full => {
                        processed += MAX_BATCH;
                        continue;
                    }
                    Drain::Stop => {
                        // Stopped or corrupt ring: leave it until the next
                        // kick or until it is started again.
                        let _ = vring.enable_notification();
                        return;
                    }
                    Drain::Done(n) => n,
                };
                processed += n;
                if polled && n == 0 {
                    // Polling saw an index move that yielded no chain.
                    break;
                }
                let window = poller.window();
                if !window.is_zero() {
                    if self.poll_for_work(vring, &mem, window) {
                        DeviceCounters::add_one(&self.counters.poll_hits);
                        polled = true;
                        continue;
                    }
                    DeviceCounters::add_one(&self.counters.poll_misses);
                }
                break;
            }
            match vring.enable_notification() {
                Ok(true) => {
                    fruitless = if processed == 0 { fruitless + 1 } else { 0 };
                    if fruitless > 1 {
                        self.log.warn(format_args!(
                            "queue {q}: available ring announces chains that cannot be read"
                        ));
                        return;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    self.log
                        .warn(format_args!("queue {q}: cannot enable notifications: {e}"));
                    break;
                }
            }
        }
        poller.idle(Instant::now());
    }

    /// Spins for up to `window`; true if work arrived. The CPU time the
    /// spin took (this thread's, so time the thread was preempted meanwhile
    /// is not counted) goes to `poll_us`.
    fn poll_for_work(
        &self,
        vring: &VringRwLock<GuestMem>,
        mem: &GuestRam,
        window: Duration,
    ) -> bool {
        let cpu_start = crate::sys::thread_cpu_time();
        let found = self.spin_for_work(vring, mem, Instant::now() + window);
        let spun = crate::sys::thread_cpu_time().saturating_sub(cpu_start);
        let spun = u64::try_from(spun.as_micros()).unwrap_or(u64::MAX);
        self.counters.poll_us.fetch_add(spun, Ordering::Relaxed);
        found
    }

    fn spin_for_work(
        &self,
        vring: &VringRwLock<GuestMem>,
        mem: &GuestRam,
        deadline: Instant,
    ) -> bool {
        loop {
            {
                let state = vring.get_ref();
                let queue = state.get_queue();
                match queue.avail_idx(mem, Ordering::Acquire) {
                    Ok(idx) if idx.0 != queue.next_avail() => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        }
    }

    /// Takes every available chain, runs them, returns them, and signals
    /// the guest once.
    #[allow(clippy::too_many_arguments)]
    fn drain_once(
        &self,
        q: usize,
        vring: &VringRwLock<GuestMem>,
        mem: &GuestRam,
        executor: &mut Executor,
        features: Features,
        used: &mut Vec<(u16, u32)>,
    ) -> Drain {
        used.clear();
        // The chains are taken under the ring lock and run without it, so
        // that the vhost-user thread is never kept waiting by a batch.
        let (table, size, first, chains) = {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            let table = GuestAddress(queue.desc_table());
            let size = queue.size();
            // The ring position of the first chain taken; each next one is
            // one further (wrapping): with the queue, they name the
            // requests (docs/protocol.md section 8).
            let first = queue.next_avail();
            match queue.iter(mem) {
                Ok(iter) => (table, size, first, iter.take(MAX_BATCH).collect::<Vec<_>>()),
                Err(QueueError::QueueNotReady) => return Drain::Stop,
                Err(e) => {
                    self.log.warn(format_args!("queue {q}: ring unusable: {e}"));
                    return Drain::Stop;
                }
            }
        };
        // The queue starts here (after the VMM set its base): pending
        // entries before `first` were answered.
        executor.start(first, size);
        if chains.is_empty() {
            return Drain::Done(0);
        }
        let full = chains.len() == MAX_BATCH;

        for (n, chain) in chains.iter().enumerate() {
            let head = chain.head_index();
            // At most MAX_BATCH chains: `n` fits.
            let position = first.wrapping_add(n as u16);
            // A bug (never guest input) that panics must cost this chain
            // only, not the worker thread and with it the whole queue.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                executor.run_descriptor_chain(chain, table, size, features, position)
            }));
            let used_len = match run {
                Ok(outcome) => outcome.used_len,
                Err(_) => {
                    log::error!("queue {q}: internal error while handling chain {head}");
                    0
                }
            };
            // A head outside the table names no chain: the used ring can
            // only return heads of the table (virtio-queue refuses others),
            // so the entry is consumed and nothing goes back.
            if head < size {
                used.push((head, used_len));
            }
        }

        let mut state = vring.get_mut();
        let mut added = false;
        for &(head, len) in used.iter() {
            match state.add_used(head, len) {
                Ok(()) => added = true,
                Err(e) => {
                    self.log
                        .warn(format_args!("queue {q}: cannot return chain {head}: {e}"));
                }
            }
        }
        if added {
            match crate::notify::needs_notification(state.get_queue_mut(), mem) {
                Ok(true) => match state.signal_used_queue() {
                    Ok(()) => DeviceCounters::add_one(&self.counters.notifications),
                    Err(e) => {
                        self.log
                            .warn(format_args!("queue {q}: cannot signal the guest: {e}"));
                    }
                },
                Ok(false) => {}
                Err(e) => {
                    self.log
                        .warn(format_args!("queue {q}: cannot read used_event: {e}"));
                }
            }
        }
        drop(state);
        // The answers are in the used ring: the exclusive gets' removals
        // may be recorded now (rule 5), not before.
        executor.settle();
        if full {
            Drain::Full
        } else {
            Drain::Done(chains.len())
        }
    }
}

/// Result of one pass over a queue.
enum Drain {
    /// The batch was full: look again.
    Full,
    /// This many chains were handled; nothing more right now.
    Done(usize),
    /// The ring is stopped, or corrupt (e.g. an impossible available index).
    Stop,
}

impl VhostUserBackend for VtmemBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock<GuestMem>;

    fn num_queues(&self) -> usize {
        usize::from(self.settings.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.settings.queue_size)
    }

    fn features(&self) -> u64 {
        DEVICE_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        // QEMU sets the features each time it starts the device: a source
        // whose migration failed runs the VM again here.
        if self.migrated_out.swap(false, Ordering::AcqRel) {
            log::info!(
                "vm {}: device started again after its state was sent: the VM stays here",
                self.client.name()
            );
        }
        self.acked_features.store(features, Ordering::Release);
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        if !matches!(phase, VhostTransferStatePhase::STOPPED) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "device state can only move while the device is stopped",
            ));
        }
        let mut slot = lock(&self.transfer);
        // A transfer whose frontend never checked it (it gave up on a
        // failed write) is over once its thread is: it does not block this one.
        if slot.as_ref().is_some_and(|t| t.thread.is_finished()) {
            *slot = None;
        }
        if slot.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "a device-state transfer is already in progress",
            ));
        }
        let client = self.client.clone();
        let counters = self.counters.clone();
        let save = matches!(direction, VhostTransferStateDirection::SAVE);
        let thread = std::thread::Builder::new()
            .name(format!("vtmem-state-{}", self.client.name()))
            .spawn(move || {
                let res = if save {
                    client.export_image(&mut io::BufWriter::with_capacity(1 << 20, file))
                } else {
                    client.import_image(&mut io::BufReader::with_capacity(1 << 20, file))
                };
                if let Err(e) = &res {
                    // Logged and counted here: a frontend whose write fails
                    // when the import stops early (QEMU's EPIPE) may never
                    // send CHECK_DEVICE_STATE.
                    counters.state_failures.fetch_add(1, Ordering::Relaxed);
                    log::error!(
                        "vm {}: device state not {}: {e}{}",
                        client.name(),
                        if save { "sent" } else { "taken" },
                        if save {
                            "; the VM keeps its pages here"
                        } else {
                            "; nothing of it was kept"
                        }
                    );
                }
                res
            })?;
        *slot = Some(Transfer {
            direction,
            started: Instant::now(),
            thread,
        });
        // The transfer uses QEMU's own pipe.
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        let Some(t) = lock(&self.transfer).take() else {
            return Err(io::Error::other("no device-state transfer was started"));
        };
        let save = matches!(t.direction, VhostTransferStateDirection::SAVE);
        let (what, counter) = if save {
            ("sent", &self.counters.state_exports)
        } else {
            ("taken", &self.counters.state_imports)
        };
        let outcome = t
            .thread
            .join()
            .unwrap_or(Err(ImageError::Malformed("the transfer thread panicked")));
        match outcome {
            Ok(sum) => {
                counter.fetch_add(1, Ordering::Relaxed);
                log::info!(
                    "vm {}: device state {what}: {} pools, {} persistent pages, {} bytes in {} ms",
                    self.client.name(),
                    sum.pools,
                    sum.pages,
                    sum.bytes,
                    t.started.elapsed().as_millis()
                );
                if save {
                    self.migrated_out.store(true, Ordering::Release);
                }
                Ok(())
            }
            // Counted and logged by the transfer thread.
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = offset as usize;
        match start
            .checked_add(size as usize)
            .and_then(|end| self.config.get(start..end))
        {
            Some(bytes) => bytes.to_vec(),
            // An empty reply tells the frontend the request was invalid.
            None => Vec::new(),
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The config space is read-only: a write changes nothing. It is
        // acknowledged rather than refused because vhost-user-backend ends
        // the connection on any error a handler returns (it sends the
        // REPLY_ACK failure, then stops serving), and a driver poking its
        // config space must not cost the VM its device.
        self.log.warn(format_args!(
            "SET_CONFIG of {} byte(s) at offset {offset} ignored: the config space is read-only",
            buf.len()
        ));
        Ok(())
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        if !self.settings.allow_unsealed_memory {
            check_sealed(&mem.memory()).inspect_err(|e| {
                self.log.warn(format_args!("memory table refused: {e}"));
            })?;
        }
        *lock(&self.mem) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.settings.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        let mine = notifier.try_clone().ok()?;
        lock(&self.exit_notifiers).push(mine);
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Wait for the batch in flight on this queue, if any: once this
        // returns the worker will find the ring stopped.
        if let Some(executor) = self.executors.get(queue_index as usize) {
            // The VMM may start the ring again at another position.
            lock(executor).stopped();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock<GuestMem>],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            self.log.warn(format_args!(
                "queue {thread_id}: unexpected event set {:#x}",
                evset.bits()
            ));
            return Ok(());
        }
        // One queue per thread: the thread index is the queue index and the
        // thread's only vring is `vrings[0]`.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            self.log.warn(format_args!(
                "queue {thread_id}: unknown event {device_event}"
            ));
            return Ok(());
        };
        DeviceCounters::add_one(&self.counters.kicks);
        self.process_queue(thread_id, vring);
        Ok(())
    }
}

impl DeviceCounters {
    fn add_one(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Refuses guest memory a VMM could shrink under the daemon.
///
/// A read of a mapping whose file was truncated raises SIGBUS, which would
/// end vtmemd and every VM's pages with it. Each region must therefore be
/// a file sealed against shrinking (QEMU's `memory-backend-memfd` seals by
/// default) and at least as long as the region.
pub fn check_sealed<B: vm_memory::bitmap::Bitmap>(mem: &GuestMemoryMmap<B>) -> io::Result<()> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in mem.iter() {
        let start = region.start_addr().0;
        let refuse = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest memory region at {start:#x}: {why}"),
            )
        };
        let Some(fo) = region.file_offset() else {
            return Err(refuse("not backed by a file descriptor".into()));
        };
        let seals = rustix::fs::fcntl_get_seals(fo.file())
            .map_err(|e| refuse(format!("cannot read its seals ({e})")))?;
        if !seals.contains(rustix::fs::SealFlags::SHRINK) {
            return Err(refuse(
                "its file is not sealed against shrinking (use a sealed memfd, \
                 or --allow-unsealed-memory for memory that cannot be sealed)"
                    .into(),
            ));
        }
        let size = fo
            .file()
            .metadata()
            .map_err(|e| refuse(format!("cannot read its size ({e})")))?
            .len();
        let end = fo.start().checked_add(region.len());
        if end.is_none_or(|end| end > size) {
            return Err(refuse(format!(
                "the region ends past its file ({} bytes)",
                size
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use vm_memory::{Address, Bytes};
    use vtmem_protocol::{Op, PoolSpec, Response, Status, CONFIG_SIZE};
    use vtmem_store::Store;
    use vtmem_testkit::with_timeout;

    const QSIZE: u16 = 256;
    /// A queue event that takes longer than this has hung.
    const HANG_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

    fn backend(queues: u16, poll_us: u64) -> (Arc<Store>, VtmemBackend) {
        let (store, client) = crate::testutil::store_client();
        let settings = DeviceSettings {
            queues,
            queue_size: QSIZE,
            poll: std::time::Duration::from_micros(poll_us),
            // The test rings live in anonymous memory.
            allow_unsealed_memory: true,
        };
        let b = VtmemBackend::new(
            client,
            settings,
            Arc::new(DeviceCounters::default()),
            Arc::new(RateLimitedLog::new("test")),
        );
        (store, b)
    }

    /// A vring over `ring`, set up the way the vhost-user handler does.
    fn vring(
        b: &VtmemBackend,
        mem: &GuestRam,
        ring: &TestRing<'_>,
        event_idx: bool,
    ) -> VringRwLock<GuestMem> {
        let atomic = GuestMemoryAtomic::new(mem.clone());
        b.update_memory(atomic.clone()).unwrap();
        let features = DEVICE_FEATURES
            & !(if event_idx {
                0
            } else {
                1 << VIRTIO_RING_F_EVENT_IDX
            });
        b.acked_features(features);
        b.set_event_idx(event_idx);
        let v = VringRwLock::new(atomic, QSIZE).unwrap();
        v.set_queue_size(QSIZE);
        v.set_queue_info(
            ring.mock.desc_table_addr().raw_value(),
            ring.mock.avail_addr().raw_value(),
            ring.mock.used_addr().raw_value(),
        )
        .unwrap();
        v.set_queue_event_idx(event_idx);
        v.set_queue_ready(true);
        v.set_enabled(true);
        v
    }

    /// Adds a one-op chain (a persistent NEW_POOL) and makes it available.
    fn add_request(ring: &mut TestRing<'_>) -> (u16, Buf) {
        let req = request_bytes(&[Op::NewPool(PoolSpec::persistent())], 7);
        let r = ring.readable(&req);
        let resp = ring.writable(32);
        let head = ring.chain(&[r, resp]);
        ring.make_available(head);
        (head, resp)
    }

    #[test]
    fn only_memory_sealed_against_shrinking_is_mapped() {
        use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
        use vm_memory::{FileOffset, GuestMemoryBackend};
        let memfd = |pages: u64, seals: SealFlags| {
            let f = std::fs::File::from(
                memfd_create(c"guest", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap(),
            );
            f.set_len(pages * 4096).unwrap();
            if !seals.is_empty() {
                fcntl_add_seals(&f, seals).unwrap();
            }
            f
        };
        let map = |f: std::fs::File, pages: u64| {
            GuestRam::from_ranges_with_files([(
                GuestAddress(0),
                (pages * 4096) as usize,
                Some(FileOffset::new(f, 0)),
            )])
            .unwrap()
        };
        let anon = GuestRam::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        let err = check_sealed(&anon).unwrap_err().to_string();
        assert!(err.contains("not backed by a file"), "{err}");
        let err = check_sealed(&map(memfd(2, SealFlags::empty()), 2)).unwrap_err();
        assert!(err.to_string().contains("not sealed"), "{err}");
        let err = check_sealed(&map(memfd(2, SealFlags::GROW), 2)).unwrap_err();
        assert!(err.to_string().contains("not sealed"), "{err}");
        // Sealed, but shorter than the region the VMM claims.
        let err = check_sealed(&map(memfd(1, SealFlags::SHRINK), 2)).unwrap_err();
        assert!(err.to_string().contains("ends past its file"), "{err}");
        check_sealed(&map(memfd(2, SealFlags::SHRINK | SealFlags::GROW), 2)).unwrap();

        // The backend refuses such a table and keeps the memory it had.
        let (_store, b) = backend(1, 0);
        let unsealed = GuestMemoryAtomic::new(map(memfd(2, SealFlags::empty()), 2));
        let b = VtmemBackend {
            settings: DeviceSettings::default(),
            ..b
        };
        assert!(b.update_memory(unsealed).is_err());
        assert_eq!(lock(&b.mem).memory().num_regions(), 0);
    }

    #[test]
    fn advertises_the_device() {
        let (_s, b) = backend(4, 0);
        assert_eq!(b.num_queues(), 4);
        assert_eq!(b.max_queue_size(), usize::from(QSIZE));
        assert_eq!(b.queues_per_thread(), vec![1, 2, 4, 8]);
        let f = b.features();
        for bit in [32, 29, 28, 30, 0, 1, 2, 3] {
            assert!(f & (1 << bit) != 0, "feature bit {bit}");
        }
        let p = b.protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::MQ));
        assert!(p.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(p.contains(VhostUserProtocolFeatures::REPLY_ACK));
        let cfg = DeviceConfig::decode(&b.get_config(0, CONFIG_SIZE as u32)).unwrap();
        assert_ne!(cfg.generation, 0);
        assert_eq!(cfg, DeviceConfig::new(4).with_generation(cfg.generation));
        assert_eq!(b.get_config(8, 2), 1u16.to_le_bytes().to_vec());
        assert!(b.get_config(8, 16).is_empty());
        assert!(b.get_config(u32::MAX, 2).is_empty());
        assert!(b.set_config(0, &[9, 9]).is_ok());
        assert_eq!(
            DeviceConfig::decode(&b.get_config(0, CONFIG_SIZE as u32)).unwrap(),
            cfg
        );
        assert!(b.exit_event(0).is_some());
    }

    #[test]
    fn every_connection_has_its_own_generation() {
        let generation = |b: &VtmemBackend| {
            DeviceConfig::decode(&b.get_config(0, CONFIG_SIZE as u32))
                .unwrap()
                .generation
        };
        let gens: Vec<u32> = (0..64).map(|_| generation(&backend(1, 0).1)).collect();
        let mut distinct = gens.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), gens.len(), "{gens:?}");
        assert!(!gens.contains(&0));
    }

    #[test]
    fn a_batch_is_signalled_once() {
        let (_s, b) = backend(1, 0);
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let v = vring(&b, &mem, &ring, false);
        let resps: Vec<Buf> = (0..5).map(|_| add_request(&mut ring).1).collect();
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
            .unwrap();
        assert_eq!(ring.used_idx(), 5);
        for (i, resp) in resps.iter().enumerate() {
            let (id, len) = ring.used_elem(i as u16);
            assert_eq!(len, 32);
            assert_eq!(id, (i * 2) as u32);
            let bytes = ring.read(*resp);
            let r = Response::parse(&bytes).unwrap();
            assert_eq!(r.status(0).unwrap().status, Status::Ok);
        }
        let c = b.counters.snapshot();
        assert_eq!((c.chains, c.notifications, c.kicks), (5, 1, 1));
    }

    #[test]
    fn a_stopped_backend_leaves_the_ring_to_the_next() {
        let (_s, b) = backend(1, 0);
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let v = vring(&b, &mem, &ring, false);
        add_request(&mut ring);
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
            .unwrap();
        assert_eq!(ring.used_idx(), 1);
        // Stopping (vtmemd's orderly stop): chains made available later
        // stay in the ring, unanswered, for the next back end.
        b.stop_workers();
        add_request(&mut ring);
        add_request(&mut ring);
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
            .unwrap();
        assert_eq!(ring.used_idx(), 1);
        assert_eq!(b.counters.snapshot().chains, 1);
    }

    #[test]
    fn event_idx_asks_for_the_next_kick() {
        let (_s, b) = backend(1, 0);
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let v = vring(&b, &mem, &ring, true);
        // The driver wants an interrupt after the first used entry.
        let used_event = ring
            .mock
            .avail_addr()
            .unchecked_add(4 + 2 * u64::from(QSIZE));
        mem.write_obj(0u16, used_event).unwrap();
        for _ in 0..3 {
            add_request(&mut ring);
        }
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
            .unwrap();
        assert_eq!(ring.used_idx(), 3);
        // avail_event (after the used ring) tells the driver to kick at 3.
        let avail_event = ring
            .mock
            .used_addr()
            .unchecked_add(4 + 8 * u64::from(QSIZE));
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 3);
        assert_eq!(b.counters.snapshot().notifications, 1);
        // The driver asks for no interrupt before used index 10: none is sent.
        mem.write_obj(9u16, used_event).unwrap();
        add_request(&mut ring);
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
            .unwrap();
        assert_eq!(ring.used_idx(), 4);
        assert_eq!(b.counters.snapshot().notifications, 1);
    }

    #[test]
    fn no_interrupt_flag_is_honoured_without_event_idx() {
        let (_s, b) = backend(1, 0);
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let v = vring(&b, &mem, &ring, false);
        // The driver does not want interrupts: none is sent.
        mem.write_obj(1u16, ring.mock.avail_addr()).unwrap();
        for _ in 0..2 {
            add_request(&mut ring);
            b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
                .unwrap();
        }
        assert_eq!(ring.used_idx(), 2);
        assert_eq!(b.counters.snapshot().notifications, 0);
        // It wants them again: the next batch is signalled.
        mem.write_obj(0u16, ring.mock.avail_addr()).unwrap();
        add_request(&mut ring);
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
            .unwrap();
        assert_eq!(ring.used_idx(), 3);
        assert_eq!(b.counters.snapshot().notifications, 1);
    }

    #[test]
    fn corrupt_available_index_does_not_hang() {
        with_timeout(HANG_LIMIT, "corrupt_available_index_does_not_hang", || {
            let (_s, b) = backend(1, 0);
            let mem = guest_memory();
            let mut ring = TestRing::new(&mem, QSIZE);
            let v = vring(&b, &mem, &ring, true);
            ring.set_avail_idx(QSIZE + 7);
            b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
                .unwrap();
            assert_eq!(ring.used_idx(), 0);
        });
    }

    /// An available ring whose index is readable but whose entries are not
    /// (its header is the last 4 bytes of guest memory): the worker gives
    /// up on it instead of spinning, with or without busy-polling.
    fn unreadable_available_entries(name: &str, poll_us: u64, event_idx: bool) {
        with_timeout(HANG_LIMIT, name, move || {
            let (_s, b) = backend(1, poll_us);
            let mem = guest_memory();
            let ring = TestRing::new(&mem, QSIZE);
            let v = vring(&b, &mem, &ring, event_idx);
            let avail = MEM_SIZE - 4;
            v.set_queue_info(
                ring.mock.desc_table_addr().raw_value(),
                avail,
                ring.mock.used_addr().raw_value(),
            )
            .unwrap();
            mem.write_obj(3u16, GuestAddress(avail + 2)).unwrap();
            b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
                .unwrap();
            assert_eq!(ring.used_idx(), 0);
        });
    }

    #[test]
    fn unreadable_available_entries_do_not_hang() {
        unreadable_available_entries("unreadable_available_entries_do_not_hang", 0, true);
    }

    #[test]
    fn unreadable_available_entries_do_not_hang_a_polling_worker() {
        unreadable_available_entries(
            "unreadable_available_entries_do_not_hang_a_polling_worker",
            1000,
            false,
        );
    }

    #[test]
    fn bad_heads_are_skipped_and_the_rest_served() {
        let (_s, b) = backend(1, 0);
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let v = vring(&b, &mem, &ring, false);
        ring.make_available(QSIZE + 1);
        let (head, _) = add_request(&mut ring);
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
            .unwrap();
        assert_eq!(ring.used_idx(), 1);
        assert_eq!(ring.used_elem(0), (u32::from(head), 32));
        let c = b.counters.snapshot();
        assert_eq!((c.chains, c.dropped_chains), (2, 1));
    }

    #[test]
    fn malformed_chain_is_returned_unused() {
        let (_s, b) = backend(1, 0);
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let v = vring(&b, &mem, &ring, false);
        let req = request_bytes(&[Op::Reset], 1);
        let r = ring.readable(&req);
        let head = ring.chain(&[r]);
        ring.make_available(head);
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
            .unwrap();
        assert_eq!(ring.used_elem(0), (u32::from(head), 0));
    }

    #[test]
    fn stopped_ring_is_left_alone() {
        let (_s, b) = backend(1, 0);
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let v = vring(&b, &mem, &ring, false);
        add_request(&mut ring);
        v.set_queue_ready(false);
        b.stop_vring(0).unwrap();
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
            .unwrap();
        assert_eq!(ring.used_idx(), 0);
    }

    #[test]
    fn busy_poll_picks_up_late_work() {
        // A window far longer than the publisher's delay, so that a loaded
        // machine cannot push the late chain past it (the test then costs
        // one window of spinning after the second chain).
        let (_s, b) = backend(1, 1_000_000);
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let v = vring(&b, &mem, &ring, true);
        add_request(&mut ring);
        // Prepare a second chain but publish it from another thread later.
        let req = request_bytes(&[Op::NewPool(PoolSpec::persistent())], 8);
        let r = ring.readable(&req);
        let resp = ring.writable(32);
        let head = ring.chain(&[r, resp]);
        let avail = ring.mock.avail_addr();
        let mem2 = mem.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            mem2.write_obj(head, avail.unchecked_add(4 + 2)).unwrap();
            mem2.write_obj(2u16, avail.unchecked_add(2)).unwrap();
        });
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
            .unwrap();
        t.join().unwrap();
        assert_eq!(ring.used_idx(), 2);
        let c = b.counters.snapshot();
        assert_eq!(c.poll_hits, 1);
        assert_eq!(c.kicks, 1);
    }

    /// Kicks further apart than `--poll-us`: every spin misses, the window
    /// halves at each kick, and below a sixteenth of `--poll-us` the queue
    /// no longer polls at all.
    #[test]
    fn polling_stops_on_an_idle_queue() {
        let (_s, b) = backend(1, 200);
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, QSIZE);
        let v = vring(&b, &mem, &ring, true);
        let start = Instant::now();
        for _ in 0..10 {
            add_request(&mut ring);
            b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0)
                .unwrap();
            // A gap longer than --poll-us: no spin could have caught the
            // next kick, so the window shrinks.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(ring.used_idx(), 10);
        let c = b.counters.snapshot();
        assert_eq!(c.poll_hits, 0);
        // 200, 100, 50, 25 and 12.5 µs, then none.
        assert_eq!(c.poll_misses, 5);
        // CPU time of the spins: some (387 µs of windows), never more than
        // the time that passed.
        let wall = start.elapsed().as_micros() as u64;
        assert!(c.poll_us > 0 && c.poll_us <= wall, "spun {} µs", c.poll_us);
    }

    #[test]
    fn exit_events_stop_workers() {
        let (_s, b) = backend(2, 0);
        let (c0, _n0) = b.exit_event(0).unwrap();
        let (c1, _n1) = b.exit_event(1).unwrap();
        b.stop_workers();
        c0.consume().unwrap();
        c1.consume().unwrap();
    }
}
