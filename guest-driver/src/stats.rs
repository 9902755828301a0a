// SPDX-License-Identifier: GPL-2.0

//! Event counters, shown in debugfs (`/sys/kernel/debug/vtmem/stats`).

use core::fmt;
use kernel::sync::atomic::{Atomic, Relaxed};

macro_rules! counters {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident,)* }) => {
        $(#[$meta])*
        pub(crate) struct $name {
            $($(#[$fmeta])* pub(crate) $field: Atomic<u64>,)*
        }

        impl $name {
            pub(crate) fn new() -> Self {
                Self { $($field: Atomic::new(0),)* }
            }

            /// Calls `f` with each counter's name and value.
            pub(crate) fn for_each(&self, f: &mut dyn FnMut(&'static str, u64) -> fmt::Result) -> fmt::Result {
                $(f(stringify!($field), self.$field.load(Relaxed))?;)*
                Ok(())
            }
        }
    };
}

counters! {
    /// Counters of frontswap traffic and its outcome.
    Stats {
        /// Stores the kernel asked for.
        stores,
        /// Stores completed at once against a reserved host page.
        stores_reserved,
        /// Stores sent without a reservation, waiting for the answer.
        stores_sync,
        /// Synchronous stores the host accepted.
        stores_sync_ok,
        /// Stores refused (host full, quota, frozen): the kernel wrote the disk.
        refusals,
        /// Stores that failed for another reason (no pool, device error).
        store_errors,
        /// Loads the kernel asked for.
        loads,
        /// Of those, loads started asynchronously: sent with the rest of
        /// their readahead window, ended by the answer's interrupt.
        loads_async,
        /// Loads the host answered with the page.
        hits,
        /// Loads the host answered with a miss.
        misses,
        /// Loads that failed (device error).
        load_errors,
        /// Pages invalidated by the kernel.
        invalidates,
        /// Invalidations dropped because no buffer was free (host keeps a stale
        /// page until the pool goes; harmless).
        invalidates_dropped,
        /// Swap areas invalidated (swapoff).
        invalidate_areas,
        /// Pools created.
        pools_created,
        /// Reserved puts the host did not accept: would be a protocol violation.
        reserved_put_failures,
        /// RESERVE operations sent.
        reserve_requests,
        /// Pages the host granted to RESERVE operations.
        reserve_granted,
    }
}

counters! {
    /// Counters of cleancache traffic (clean page-cache pages).
    CacheStats {
        /// Filesystems that got a host pool.
        cleancache_pools,
        /// Pages the kernel offered on eviction.
        cleancache_puts,
        /// Offered pages not sent: no free batch, pool unusable, or device
        /// gone (their older copies are invalidated), or the page filter
        /// could not track them (`cleancache_filter_full`,
        /// `cleancache_filter_nomem`).
        cleancache_puts_dropped,
        /// Puts not sent because the page filter reached its cap
        /// (`cleancache_filter_kib`): a page that cannot be tracked is not
        /// put.
        cleancache_filter_full,
        /// Puts not sent because the page filter could not allocate a node
        /// (atomic context, no memory at hand).
        cleancache_filter_nomem,
        /// Puts that found no free batch until they took back batches the
        /// device had answered before its interrupt was handled.
        cleancache_put_reaps,
        /// Reads the kernel asked for (`hits + misses`).
        cleancache_gets,
        /// Gets sent to the host.
        cleancache_gets_sent,
        /// Gets the page filter answered "miss" without asking the host: it
        /// cannot hold the page (never put, or gone since).
        cleancache_gets_skipped,
        /// Readahead windows the kernel asked for at once (`get_pages`
        /// calls; `cleancache_batch_gets`).
        cleancache_get_windows,
        /// Pages those windows asked for (also in `cleancache_gets`).
        cleancache_get_window_pages,
        /// Requests that carried gets to the host: one per get sent alone,
        /// one per window whose gets were sent together.
        cleancache_get_requests,
        /// Reads the host answered with the page (no disk I/O).
        cleancache_hits,
        /// Reads not served from the host (skipped, missed, or failed): the
        /// disk is read.
        cleancache_misses,
        /// Gets sent that the host answered with a miss: a round trip for
        /// nothing. Without the filter, mostly pages never put; with it,
        /// only pages the host dropped (evicted, or refused when put), and
        /// every miss of a shared pool.
        cleancache_futile_gets,
        /// Pages invalidated by the kernel.
        cleancache_invalidate_pages,
        /// Files invalidated (truncate, punch hole, direct I/O, delete).
        cleancache_invalidate_inodes,
        /// Filesystems invalidated (unmount).
        cleancache_invalidate_fs,
        /// Files whose parked page invalidations were merged into one of
        /// the whole file because the parking ring was full (the host drops
        /// all of the file's pages; the page filter forgets them).
        cleancache_invalidations_widened,
        /// Pools recreated because an invalidation could not be queued (the
        /// only way to be sure no stale page survives).
        cleancache_pool_resets,
    }
}

counters! {
    /// Per-queue transport counters.
    QueueStats {
        /// Requests (batches) made available to the device.
        batches,
        /// Operations in those requests.
        ops,
        /// PUT operations in those requests.
        puts,
        /// GET operations in those requests (swap-ins and cleancache reads).
        gets,
        /// Kicks that actually notified the device.
        notifications,
        /// Those notifications that made a request with a GET available:
        /// `gets / get_notifications` is `avg_gets_per_notification`.
        get_notifications,
        /// GETs nobody waits for (asynchronous swap-in loads), ended by the
        /// interrupt that brings their answer.
        async_gets,
        /// Asynchronous GETs ended as failed: a miss, an error status, or a
        /// device that stalled or went away before answering.
        async_gets_failed,
        /// Requests sent because the front end ended a batch of reads
        /// (frontswap's unplug at the end of a readahead window).
        unplug_flushes,
        /// Requests completed by the device.
        completions,
        /// Requests sent because their batch was full.
        full_flushes,
        /// Requests sent by the batch timeout.
        timer_flushes,
        /// Requests sent at once to get an answer (load, synchronous store).
        sync_flushes,
        /// Requests sent early to carry a reservation refill.
        refill_flushes,
        /// Times a request found the ring full and had to wait.
        ring_full,
        /// Times the device left work unanswered for `device_timeout_ms`.
        device_stalls,
        /// Waits that gave up on a stalled device.
        waits_timed_out,
        /// Operations refused at once because the device was stalled.
        stalled_refusals,
        /// Times a stalled device answered again.
        device_recoveries,
    }
}

counters! {
    /// Counters of the device itself.
    DeviceEvents {
        /// Configuration changes the device signalled. A vtmem device
        /// signals one when a new back end has taken it over and restarted
        /// its rings (QEMU reconnecting to a restarted or upgraded vtmemd),
        /// so this counts the reconnections the guest rode out.
        device_reconnects,
    }
}
