// SPDX-License-Identifier: GPL-2.0

//! The vtmem device: probe, start and remove, and the debugfs file. Safe
//! Rust only; C is reached through `crate::sys`.
//!
//! A bound device is three layers, as on the host (request, exec, store):
//!
//! - the [`Transport`]: one request queue per CPU (up to the device's
//!   `num_request_queues`), batching, requests and their answers;
//! - two thin front ends on top of it, each registered with its kernel
//!   hook: [`Frontswap`] (swap pages, persistent pools, reservations) and
//!   [`Cleancache`] (clean page-cache pages, ephemeral pools).

use crate::cleancache::Cleancache;
use crate::frontswap::{Frontswap, SwapState};
use crate::stats::DeviceEvents;
use crate::sys::{self, VirtioDevice, VirtioDriver};
use crate::transport::{QueueParams, Transport};
use crate::wire::{self, DeviceConfig, Op, Status};
use core::fmt;
use kernel::{
    debugfs::{Dir, File},
    new_mutex,
    prelude::*,
    sync::{atomic::Relaxed, Arc, Mutex},
};

#[cfg(CONFIG_FRONTSWAP)]
type SwapRegistration = sys::FrontswapRegistration;
/// Without frontswap in the kernel there is nothing to register.
#[cfg(not(CONFIG_FRONTSWAP))]
type SwapRegistration = ();

#[cfg(CONFIG_CLEANCACHE)]
type CacheRegistration = sys::CleancacheRegistration;
/// Without cleancache in the kernel there is nothing to register.
#[cfg(not(CONFIG_CLEANCACHE))]
type CacheRegistration = ();

/// Tunables, from the module parameters.
#[derive(Clone, Copy)]
pub(crate) struct Params {
    pub(crate) batch_size: u32,
    pub(crate) batch_timeout_us: u32,
    pub(crate) batches_per_queue: u32,
    pub(crate) reserve_pages: u32,
    pub(crate) max_queues: u32,
    pub(crate) selftest: bool,
    pub(crate) cleancache: bool,
    pub(crate) cleancache_shared: bool,
    pub(crate) cleancache_filter_kib: u32,
    pub(crate) cleancache_batch_gets: bool,
    pub(crate) device_timeout_ms: u32,
    pub(crate) swap_async_loads: bool,
}

/// What the debugfs file shows: every layer's counters and pools.
struct Report {
    events: Arc<DeviceEvents>,
    transport: Arc<Transport>,
    swap: Arc<Frontswap>,
    cache: Arc<Cleancache>,
}

impl Report {
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.swap.show_stats(f)?;
        self.cache.show_stats(f)?;
        self.events
            .for_each(&mut |name, v| writeln!(f, "{name} {v}"))?;
        self.transport.show(f)?;
        self.swap.show_pools(f)?;
        self.cache.show_pools(f)
    }
}

/// A bound vtmem device.
#[pin_data]
pub(crate) struct Device {
    params: Params,
    /// `VTMEM_F_EPHEMERAL` was negotiated.
    ephemeral: bool,
    events: Arc<DeviceEvents>,
    transport: Arc<Transport>,
    swap: Arc<Frontswap>,
    cache: Arc<Cleancache>,
    /// The frontswap registration, from start to remove.
    #[pin]
    swap_reg: Mutex<Option<SwapRegistration>>,
    /// The cleancache registration, from start to remove.
    #[pin]
    cache_reg: Mutex<Option<CacheRegistration>>,
    _debugfs: Dir,
    #[pin]
    _stats_file: File<Report>,
}

impl Device {
    /// Registers the cleancache front end (at start). A failure leaves the
    /// device serving swap only.
    fn register_cache(&self) {
        if !self.ephemeral {
            pr_info!("the device offers no ephemeral pools: no cleancache\n");
            return;
        }
        #[cfg(CONFIG_CLEANCACHE)]
        match sys::CleancacheRegistration::register(
            self.cache.clone(),
            self.params.cleancache_batch_gets,
        ) {
            Ok(reg) => {
                *self.cache_reg.lock() = Some(reg);
                pr_info!("registered as the cleancache backend\n");
            }
            Err(e) => pr_warn!("cannot register as the cleancache backend: {:?}\n", e),
        }
        #[cfg(not(CONFIG_CLEANCACHE))]
        pr_warn!("kernel without cleancache: the device does not cache file pages\n");
    }

    /// Unregisters from cleancache (at remove); no cleancache operation
    /// runs once this returns.
    fn unregister_cache(&self) {
        // The registration is dropped (unregistered) with the condition.
        if self.cache_reg.lock().take().is_some() {
            pr_info!("unregistered from cleancache\n");
        }
    }

    /// Builds the layers on top of `transport`. On failure the caller shuts
    /// the transport down.
    fn build(
        transport: &Arc<Transport>,
        swap_state: Arc<SwapState>,
        params: Params,
        reserve: bool,
        vdev: &VirtioDevice,
    ) -> Result<Arc<Self>> {
        let ephemeral = vdev.has_feature(wire::VTMEM_F_EPHEMERAL);
        let shared = params.cleancache_shared && vdev.has_feature(wire::VTMEM_F_SHARED);
        let swap = Arc::new(
            Frontswap::new(
                transport.clone(),
                swap_state,
                reserve,
                params.reserve_pages,
                params.swap_async_loads,
            ),
            GFP_KERNEL,
        )?;
        let cache = Arc::pin_init(
            Cleancache::new(transport.clone(), shared, params.cleancache_filter_kib),
            GFP_KERNEL,
        )?;
        let events = Arc::new(DeviceEvents::new(), GFP_KERNEL)?;
        let report = Report {
            events: events.clone(),
            transport: transport.clone(),
            swap: swap.clone(),
            cache: cache.clone(),
        };
        let debugfs = Dir::new(c"vtmem");
        Arc::pin_init(
            try_pin_init!(Device {
                params,
                ephemeral,
                events,
                transport: transport.clone(),
                swap,
                cache,
                swap_reg <- new_mutex!(None, "vtmem_swap"),
                cache_reg <- new_mutex!(None, "vtmem_cache"),
                _stats_file <- debugfs.read_callback_file(
                    c"stats",
                    report,
                    &|r: &Report, f: &mut fmt::Formatter<'_>| r.show(f)
                ),
                _debugfs: debugfs,
            }),
            GFP_KERNEL,
        )
    }
}

impl VirtioDriver for Device {
    const NAME: &'static CStr = c"vtmem";
    const DEVICE_ID: u32 = wire::VIRTIO_ID_TMEM;
    const FEATURES: &'static [u32] = &[
        wire::VTMEM_F_EPHEMERAL,
        wire::VTMEM_F_SHARED,
        wire::VTMEM_F_MQ,
        wire::VTMEM_F_RESERVE,
    ];

    fn probe(vdev: &VirtioDevice) -> Result<Arc<Self>> {
        let params = crate::params();
        let mut raw = [0u8; wire::CONFIG_SIZE];
        vdev.read_config(&mut raw)?;
        let cfg = DeviceConfig::decode(&raw).map_err(|e| {
            pr_err!("unusable device configuration: {:?}\n", e);
            EINVAL
        })?;
        let mq = vdev.has_feature(wire::VTMEM_F_MQ);
        let reserve = vdev.has_feature(wire::VTMEM_F_RESERVE);
        let offered = if mq { cfg.num_request_queues } else { 1 };
        let mut nq = u32::from(offered).min(kernel::cpu::nr_cpu_ids()).max(1);
        if params.max_queues > 0 {
            nq = nq.min(params.max_queues);
        }
        let max_ops = cfg.max_ops_per_request.min(wire::MAX_OPS_PER_REQUEST);
        let slots = (params.batch_size as u16).clamp(1, max_ops);
        let queue_params = QueueParams {
            batches: params.batches_per_queue,
            max_ops,
            slots,
            timeout_us: params.batch_timeout_us,
            device_timeout_ms: params.device_timeout_ms,
        };

        // The frontswap state learns of every answered batch (reservations).
        let swap_state = Arc::pin_init(SwapState::new(params.reserve_pages), GFP_KERNEL)?;
        let (transport, ring) =
            Transport::new::<Device>(vdev, nq as usize, &queue_params, swap_state.clone())?;
        let transport = match Arc::new(transport, GFP_KERNEL) {
            Ok(t) => t,
            Err(e) => {
                // The transport and its virtqueues were dropped: delete them.
                vdev.del_vqs::<crate::batch::Batch>(core::iter::empty());
                return Err(e.into());
            }
        };
        let dev = match Self::build(&transport, swap_state, params, reserve, vdev) {
            Ok(dev) => dev,
            Err(e) => {
                transport.shutdown(vdev);
                return Err(e);
            }
        };
        pr_info!(
            "virtio{}: protocol {}, back end {:#010x}, {} of {} queue(s), ring {}, batch {} pages / {} us, reserve {}\n",
            vdev.index(),
            cfg.version,
            cfg.generation,
            nq,
            offered,
            ring,
            slots,
            params.batch_timeout_us,
            if reserve { params.reserve_pages } else { 0 }
        );
        Ok(dev)
    }

    fn start(this: &Arc<Self>, _vdev: &VirtioDevice) -> Result {
        let [st] = this.transport.call(0, [Op::Reset])?;
        if st.status != Status::Ok {
            pr_err!("RESET failed: {}\n", st.status.name());
            return Err(EIO);
        }
        pr_info!("device reset, ready\n");
        if this.params.selftest {
            match this.swap.selftest() {
                Ok(()) => pr_info!("selftest passed\n"),
                Err(_) => pr_err!("selftest FAILED\n"),
            }
        }
        #[cfg(CONFIG_FRONTSWAP)]
        {
            let reg = sys::FrontswapRegistration::register(this.swap.clone())?;
            *this.swap_reg.lock() = Some(reg);
            pr_info!("registered as the frontswap backend\n");
        }
        #[cfg(not(CONFIG_FRONTSWAP))]
        pr_warn!("kernel without frontswap: the device is not used for swap\n");
        if this.params.cleancache {
            this.register_cache();
        }
        Ok(())
    }

    fn queue_done(&self, index: u32) {
        self.transport.queue_done(index);
    }

    fn config_changed(&self) {
        // Nothing else in the configuration can change: the new back end
        // serves the same pools, and requests it had not answered were
        // offered to it again.
        self.events.device_reconnects.add(1, Relaxed);
    }

    fn remove(&self, vdev: &VirtioDevice) {
        self.unregister_cache();
        #[cfg(CONFIG_FRONTSWAP)]
        if let Some(mut reg) = self.swap_reg.lock().take() {
            // frontswap pins the module while it holds pages, so this only
            // fails when the device is unbound or unplugged with swap pages
            // in it: those pages are lost.
            match reg.unregister() {
                Ok(()) => pr_info!("unregistered from frontswap\n"),
                Err(e) => pr_err!(
                    "device removed while holding swap pages ({:?}): they are lost\n",
                    e
                ),
            }
        }
        self.cache.close_pools();
        self.swap.close_areas();
        self.transport.shutdown(vdev);
        pr_info!("device removed\n");
    }
}
