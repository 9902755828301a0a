// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user glue: one [`VtmemBackend`] per frontend connection.
//!
//! It advertises the device (features, config space, queues), keeps the
//! guest memory map, and drains request queues: one worker thread per
//! queue, each with its own [`Executor`]. Parsing lives in
//! [`crate::request`], execution in [`crate::exec`]; this module only moves
//! descriptor heads between the rings and the executor.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
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
use crate::ratelimit::RateLimitedLog;
use crate::store::ClientHandle;

/// Guest memory as the vhost-user crates share it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Virtio feature bits the device offers.
pub const DEVICE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
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
}

/// Names of the device features, for `--print-capabilities`.
pub const CAPABILITY_FEATURES: &[&str] = &["ephemeral", "shared", "mq", "reserve"];

/// Most chains handled in one pass before the used ring is signalled.
const MAX_BATCH: usize = 256;

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
    exit_notifiers: Mutex<Vec<EventNotifier>>,
    counters: Arc<DeviceCounters>,
    log: Arc<RateLimitedLog>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another worker panicked; the data it
    // guards (an executor, a memory handle) is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VtmemBackend {
    /// A backend acting for `client`.
    pub fn new(
        client: ClientHandle,
        settings: DeviceSettings,
        counters: Arc<DeviceCounters>,
        log: Arc<RateLimitedLog>,
    ) -> Self {
        let executors = (0..settings.queues)
            .map(|_| Mutex::new(Executor::new(client.clone(), counters.clone(), log.clone())))
            .collect();
        VtmemBackend {
            settings,
            config: DeviceConfig::new(settings.queues).encode(),
            mem: Mutex::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            executors,
            exit_notifiers: Mutex::new(Vec::new()),
            counters,
            log,
        }
    }

    /// The guest memory handle to give `VhostUserDaemon::new`.
    pub fn memory(&self) -> GuestMem {
        lock(&self.mem).clone()
    }

    /// Tells every worker thread of this backend to exit.
    pub fn stop_workers(&self) {
        for n in lock(&self.exit_notifiers).iter() {
            let _ = n.notify();
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
    fn process_queue(&self, q: usize, vring: &VringRwLock) {
        let Some(executor) = self.executors.get(q) else {
            return;
        };
        let mut executor = lock(executor);
        let mem = lock(&self.mem).memory();
        let features = self.features_in_use();
        let mut heads: Vec<u16> = Vec::with_capacity(MAX_BATCH);
        let mut used: Vec<(u16, u32)> = Vec::with_capacity(MAX_BATCH);

        loop {
            if let Err(e) = vring.disable_notification() {
                self.log
                    .warn(format_args!("queue {q}: cannot disable notifications: {e}"));
            }
            loop {
                match self.drain_once(
                    q,
                    vring,
                    &mem,
                    &mut executor,
                    features,
                    &mut heads,
                    &mut used,
                ) {
                    Drain::Busy => continue,
                    Drain::Broken => {
                        // Leave the ring alone until the next kick.
                        let _ = vring.enable_notification();
                        return;
                    }
                    Drain::Empty => {}
                }
                if !self.settings.poll.is_zero() && self.poll_for_work(vring, &mem) {
                    DeviceCounters::add_one(&self.counters.poll_hits);
                    continue;
                }
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.log
                        .warn(format_args!("queue {q}: cannot enable notifications: {e}"));
                    break;
                }
            }
        }
    }

    /// Spins for up to the busy-poll window; true if work arrived.
    fn poll_for_work(&self, vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
        let deadline = Instant::now() + self.settings.poll;
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
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        executor: &mut Executor,
        features: Features,
        heads: &mut Vec<u16>,
        used: &mut Vec<(u16, u32)>,
    ) -> Drain {
        heads.clear();
        used.clear();
        let (table, size) = {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            let table = GuestAddress(queue.desc_table());
            let size = queue.size();
            match queue.iter(mem) {
                Ok(iter) => heads.extend(iter.take(MAX_BATCH).map(|c| c.head_index())),
                Err(QueueError::QueueNotReady) => return Drain::Empty,
                Err(e) => {
                    self.log.warn(format_args!("queue {q}: ring unusable: {e}"));
                    return Drain::Broken;
                }
            }
            (table, size)
        };
        if heads.is_empty() {
            return Drain::Empty;
        }
        let full = heads.len() == MAX_BATCH;

        for &head in heads.iter() {
            let outcome = executor.run_chain(mem, table, size, head, features);
            if head < size {
                used.push((head, outcome.used_len));
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
            match state.needs_notification() {
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
        if full {
            Drain::Busy
        } else {
            Drain::Empty
        }
    }
}

/// Result of one pass over a queue.
enum Drain {
    /// The batch was full: look again.
    Busy,
    /// Nothing more right now.
    Empty,
    /// The ring itself is corrupt (e.g. an impossible available index).
    Broken,
}

impl VhostUserBackend for VtmemBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

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
        self.acked_features.store(features, Ordering::Release);
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

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the vtmem config space is read-only",
        ))
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
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
            drop(lock(executor));
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
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
