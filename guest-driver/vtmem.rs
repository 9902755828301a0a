// SPDX-License-Identifier: GPL-2.0

//! vtmem: paravirtual transcendent memory for KVM guests.
//!
//! A virtio driver for the vtmem device (virtio ID 63, `vhost-user-tmem-pci`
//! in QEMU, served by `vtmemd`) that registers as the kernel's frontswap
//! backend: swap pages go to a persistent pool in host memory instead of the
//! swap disk, in batches of many pages per notification, and a store
//! reported to the kernel as done is never lost (see docs/guest-driver.md).
//! It also registers as the cleancache backend: clean file pages the guest
//! evicts go to an ephemeral host pool and later reads find them there.
//!
//! Layout (as on the host: request, exec, store):
//! - `sys`: the wrappers through which the driver calls C, one module per
//!   kernel interface (virtio, timer, page, frontswap, cleancache);
//! - `batch`: a request of many operations and its buffers;
//! - `transport`: queues, batching, requests and their answers;
//! - `frontswap`, `cleancache`: the two front ends on the transport, one
//!   per kernel hook;
//! - `pagefilter`: which cleancache pages the host may hold, so that gets
//!   of other pages are answered without a round trip (plain Rust, also
//!   tested on the host);
//! - `device`: probe, start and remove, tying the layers together, and the
//!   debugfs file;
//! - `stats`: counters shown in debugfs;
//! - `wire`: the protocol's wire format, compiled from the protocol crate's
//!   own source file (the single definition of the format).

use kernel::prelude::*;

#[path = "src/batch.rs"]
mod batch;
#[path = "src/cleancache.rs"]
mod cleancache;
#[path = "src/device.rs"]
mod device;
#[path = "src/frontswap.rs"]
mod frontswap;
#[cfg_attr(not(CONFIG_CLEANCACHE), allow(dead_code))]
#[path = "src/pagefilter.rs"]
mod pagefilter;
#[path = "src/stats.rs"]
mod stats;
#[path = "src/sys.rs"]
mod sys;
#[path = "src/transport.rs"]
mod transport;
// The protocol crate is linted by `cargo clippy` under the workspace's
// rules; the kernel's stricter `cast_lossless` is not among them.
#[allow(dead_code, unreachable_pub, missing_docs, clippy::cast_lossless)]
#[path = "../protocol/src/wire.rs"]
mod wire;

module! {
    type: VtmemModule,
    name: "vtmem",
    authors: ["vtmem developers"],
    description: "Paravirtual transcendent memory (frontswap and cleancache backend over virtio)",
    license: "GPL",
    params: {
        batch_size: u32 {
            default: 64,
            description: "Pages per batch (request); at most 128",
        },
        batch_timeout_us: u32 {
            default: 10000,
            description: "A partly filled batch goes out after this many microseconds",
        },
        batches_per_queue: u32 {
            default: 6,
            description: "Preallocated batch buffers per request queue",
        },
        reserve_pages: u32 {
            default: 512,
            description: "Host pages kept reserved per swap area so that stores complete at once (0: every store waits for the host)",
        },
        max_queues: u32 {
            default: 0,
            description: "Use at most this many request queues (0: one per CPU, up to the device's)",
        },
        selftest: bool {
            default: false,
            description: "At probe, store and load a few pages through a temporary pool and report",
        },
        cleancache: bool {
            default: true,
            description: "Register as the cleancache backend: clean page-cache pages of ext4 go to an ephemeral host pool",
        },
        device_timeout_ms: u32 {
            default: 60000,
            description: "Waits for a device that leaves work unanswered this long (the host daemon gone) fail: stores go to the swap disk, loads fail (0: wait for ever)",
        },
        swap_async_loads: bool {
            default: true,
            description: "Let swap-in loads travel asynchronously, a readahead window (vm.page-cluster) per request with one notification (false: one synchronous request per page)",
        },
        cleancache_shared: bool {
            default: false,
            description: "Ask for a shared pool named by the filesystem UUID (the host admin must authorise it; otherwise a private pool)",
        },
        cleancache_batch_gets: bool {
            default: true,
            description: "Let readahead ask for a window's file pages in one request (false: one request per page, as the kernel asks without batching)",
        },
        cleancache_filter_kib: u32 {
            default: 4096,
            description: "Most memory (KiB) for tracking which file pages the host may hold, so that reads of other pages do not ask it; pages beyond it are not put (0: no filter, every read asks the host)",
        },
    },
}

/// Module parameters, read once at probe.
pub(crate) fn params() -> device::Params {
    device::Params {
        batch_size: module_parameters::batch_size.value(),
        batch_timeout_us: module_parameters::batch_timeout_us.value(),
        batches_per_queue: module_parameters::batches_per_queue.value(),
        reserve_pages: module_parameters::reserve_pages.value(),
        max_queues: module_parameters::max_queues.value(),
        selftest: module_parameters::selftest.value(),
        cleancache: module_parameters::cleancache.value(),
        cleancache_shared: module_parameters::cleancache_shared.value(),
        cleancache_filter_kib: module_parameters::cleancache_filter_kib.value(),
        cleancache_batch_gets: module_parameters::cleancache_batch_gets.value(),
        device_timeout_ms: module_parameters::device_timeout_ms.value(),
        swap_async_loads: module_parameters::swap_async_loads.value(),
    }
}

struct VtmemModule {
    _driver: sys::Registration<device::Device>,
}

impl kernel::Module for VtmemModule {
    fn init(module: &'static ThisModule) -> Result<Self> {
        sys::init_globals();
        let driver = sys::Registration::new(module)?;
        pr_info!(
            "driver registered (virtio device id {})\n",
            wire::VIRTIO_ID_TMEM
        );
        Ok(Self { _driver: driver })
    }
}
