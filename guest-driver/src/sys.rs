// SPDX-License-Identifier: GPL-2.0

//! The one module of vtmem that calls C.
//!
//! Everything the driver needs from the kernel beyond what the `kernel`
//! crate already wraps is reached from here, behind safe types:
//!
//! - [`DmaBuf`]: memory the device may read or write.
//! - [`Virtqueue`]: a virtqueue that owns the requests it carries
//!   (`KBox<T>` in, `KBox<T>` out), so that a buffer can neither be freed
//!   nor reused while the device may still access it.
//! - [`VirtioDevice`] and [`Registration`]: driver registration, probe and
//!   remove, configuration space, feature bits, virtqueue set-up.
//! - [`start_timer`] / [`cancel_timer`]: arming a flush timer embedded in a
//!   pinned object without keeping a handle.
//! - the frontswap glue (with `CONFIG_FRONTSWAP`): registering the driver
//!   as the backend of the kernel's frontswap hooks.
//! - the cleancache glue (with `CONFIG_CLEANCACHE`): registering the driver
//!   as the backend of the kernel's cleancache hooks, and [`FileKey`].
//! - [`PageRef`]: the page a frontswap or cleancache operation hands over.
//!
//! The driver logic in the other modules contains no `unsafe` block.

use core::{marker::PhantomData, ptr::NonNull};
use kernel::{
    bindings,
    ffi::{c_int, c_uint},
    prelude::*,
    sync::Arc,
    time::{
        hrtimer::{HasHrTimer, HrTimerMode},
        Delta,
    },
    types::Opaque,
    ThisModule,
};

/// Memory the device may read or write.
///
/// # Invariants
///
/// `buf` was allocated with kmalloc (physically contiguous, in the kernel's
/// linear map, so it can be described by a scatterlist) and is never
/// reallocated: its length equals its capacity and never changes.
pub(crate) struct DmaBuf {
    buf: KVec<u8>,
}

impl DmaBuf {
    /// Allocates a zeroed buffer of `len` bytes.
    pub(crate) fn new(len: usize, flags: kernel::alloc::Flags) -> Result<Self> {
        let mut buf = KVec::with_capacity(len, flags)?;
        buf.extend_with(len, 0, flags)?;
        // INVARIANT: `KVec` allocates with kmalloc; the length is fixed from
        // here on because `buf` is never exposed mutably as a vector.
        Ok(Self { buf })
    }

    /// The buffer's length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// The buffer's contents.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    /// The buffer's contents, mutably.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

/// One buffer of a descriptor chain.
pub(crate) enum Seg<'a> {
    /// The first `usize` bytes of the buffer, read by the device.
    Out(&'a DmaBuf, usize),
    /// The first `usize` bytes of the buffer, written by the device.
    In(&'a DmaBuf, usize),
}

/// A request that can travel on a [`Virtqueue`]: it owns its buffers and
/// lists them, device-readable ones first.
pub(crate) trait Chain: Send + Sized {
    /// Calls `f` for each buffer of the chain, in chain order.
    fn segments(&self, f: &mut dyn FnMut(Seg<'_>) -> Result) -> Result;
}

/// A virtqueue carrying requests of type `T`.
///
/// A request handed to [`Virtqueue::add`] is owned by the queue until
/// [`Virtqueue::get_buf`] or [`Virtqueue::detach_unused`] gives it back; the
/// buffers it lists therefore stay allocated and untouched while the device
/// may access them.
///
/// # Invariants
///
/// - `vq` is a virtqueue of a live device, created by [`VirtioDevice::find_vqs`];
///   it stays valid until [`VirtioDevice::del_vqs`] consumes `self`.
/// - Every non-null `data` token in the virtqueue came from
///   `KBox::<T>::into_raw` in [`Virtqueue::add`].
/// - `sg` and `sgp` have the same length and never reallocate.
pub(crate) struct Virtqueue<T: Chain> {
    vq: NonNull<bindings::virtqueue>,
    sg: KVec<bindings::scatterlist>,
    sgp: KVec<*mut bindings::scatterlist>,
    _items: PhantomData<KBox<T>>,
}

// SAFETY: a virtqueue may be used from any CPU as long as calls are
// serialised; every method that touches the ring takes `&mut self`. The
// requests it owns are `Send`.
unsafe impl<T: Chain> Send for Virtqueue<T> {}

// SAFETY: no method taking `&self` touches the ring or the scatterlists.
unsafe impl<T: Chain> Sync for Virtqueue<T> {}

impl<T: Chain> Virtqueue<T> {
    /// Makes `item` available to the device, or gives it back with the error
    /// (`ENOSPC` when the ring is full).
    ///
    /// Never sleeps: usable with spinlocks held and in interrupt context.
    pub(crate) fn add(&mut self, item: KBox<T>) -> core::result::Result<(), (Error, KBox<T>)> {
        let cap = self.sg.len();
        let mut n_out = 0usize;
        let mut n_in = 0usize;
        let sg = &mut self.sg;
        let sgp = &mut self.sgp;
        let built = item.segments(&mut |seg| {
            let i = n_out + n_in;
            let (buf, len, out) = match seg {
                Seg::Out(b, l) => (b, l, true),
                Seg::In(b, l) => (b, l, false),
            };
            if i >= cap || len == 0 || len > buf.len() || (out && n_in > 0) {
                return Err(EINVAL);
            }
            let len = u32::try_from(len).map_err(|_| EINVAL)?;
            let entry: *mut bindings::scatterlist = &mut sg[i];
            // SAFETY: `entry` points to a scatterlist owned by this queue;
            // `buf` is kmalloc memory of at least `len` bytes (invariant of
            // `DmaBuf`), so `virt_to_page()` inside `sg_init_one()` is valid.
            unsafe { bindings::sg_init_one(entry, buf.as_slice().as_ptr().cast(), len) };
            sgp[i] = entry;
            if out {
                n_out += 1;
            } else {
                n_in += 1;
            }
            Ok(())
        });
        if let Err(e) = built {
            return Err((e, item));
        }
        let data = KBox::into_raw(item);
        // SAFETY: `self.vq` is valid (type invariant) and `&mut self`
        // serialises ring accesses. `sgp[..n_out + n_in]` point to initialised
        // single-entry scatterlists (device-readable ones first) describing
        // buffers owned by `*data`, which the queue owns until the device
        // returns it. `data` is non-null.
        let ret = unsafe {
            bindings::virtqueue_add_sgs(
                self.vq.as_ptr(),
                self.sgp.as_mut_ptr(),
                n_out as c_uint,
                n_in as c_uint,
                data.cast(),
                bindings::GFP_ATOMIC | bindings::__GFP_NOWARN,
            )
        };
        if ret < 0 {
            // SAFETY: the virtqueue did not take `data`; it came from
            // `KBox::into_raw` above.
            return Err((Error::from_errno(ret), unsafe { KBox::from_raw(data) }));
        }
        Ok(())
    }

    /// Notifies the device if it asked to be notified; returns whether it was.
    pub(crate) fn kick(&mut self) -> bool {
        // SAFETY: `self.vq` is valid and `&mut self` serialises ring accesses.
        if unsafe { bindings::virtqueue_kick_prepare(self.vq.as_ptr()) } {
            // SAFETY: as above.
            unsafe { bindings::virtqueue_notify(self.vq.as_ptr()) };
            true
        } else {
            false
        }
    }

    /// Takes back one request the device has finished, with the number of
    /// bytes it wrote.
    pub(crate) fn get_buf(&mut self) -> Option<(KBox<T>, u32)> {
        let mut len: c_uint = 0;
        // SAFETY: `self.vq` is valid and `&mut self` serialises ring accesses.
        let data = unsafe { bindings::virtqueue_get_buf(self.vq.as_ptr(), &mut len) };
        let data = NonNull::new(data.cast::<T>())?;
        // SAFETY: every token in the ring came from `KBox::<T>::into_raw`
        // (type invariant), and the device gave this one back.
        Some((unsafe { KBox::from_raw(data.as_ptr()) }, len))
    }

    /// Suppresses used-buffer callbacks.
    pub(crate) fn disable_cb(&mut self) {
        // SAFETY: `self.vq` is valid and `&mut self` serialises ring accesses.
        unsafe { bindings::virtqueue_disable_cb(self.vq.as_ptr()) };
    }

    /// Re-enables callbacks; `false` if buffers arrived meanwhile (the caller
    /// must reap them again).
    pub(crate) fn enable_cb(&mut self) -> bool {
        // SAFETY: `self.vq` is valid and `&mut self` serialises ring accesses.
        unsafe { bindings::virtqueue_enable_cb(self.vq.as_ptr()) }
    }

    /// Takes back a request the device has not returned. Only meaningful
    /// after the device was reset.
    pub(crate) fn detach_unused(&mut self) -> Option<KBox<T>> {
        // SAFETY: `self.vq` is valid and `&mut self` serialises ring accesses.
        let data = unsafe { bindings::virtqueue_detach_unused_buf(self.vq.as_ptr()) };
        let data = NonNull::new(data.cast::<T>())?;
        // SAFETY: every token came from `KBox::<T>::into_raw` (type invariant)
        // and detaching removed it from the ring.
        Some(unsafe { KBox::from_raw(data.as_ptr()) })
    }

    /// Number of descriptors in the ring.
    pub(crate) fn size(&self) -> u32 {
        // SAFETY: `self.vq` is valid; this only reads an immutable field.
        unsafe { bindings::virtqueue_get_vring_size(self.vq.as_ptr()) }
    }
}

/// A virtio device bound to this driver.
///
/// # Invariants
///
/// `dev` points to a virtio device between the driver's probe and the end of
/// its remove; [`Registration`] hands a `VirtioDevice` out only in that
/// window, and the driver must not use it afterwards.
#[derive(Clone, Copy)]
pub(crate) struct VirtioDevice {
    dev: NonNull<bindings::virtio_device>,
}

// SAFETY: the virtio core's device operations may be called from any thread.
unsafe impl Send for VirtioDevice {}
// SAFETY: as above; `&self` methods do not mutate Rust-visible state.
unsafe impl Sync for VirtioDevice {}

impl VirtioDevice {
    fn ops(&self) -> &bindings::virtio_config_ops {
        // SAFETY: `dev` is valid (type invariant) and its `config` points to
        // the transport's static operations.
        unsafe { &*(*self.dev.as_ptr()).config }
    }

    /// The device's position on the virtio bus.
    pub(crate) fn index(&self) -> i32 {
        // SAFETY: `dev` is valid (type invariant); `index` is set at
        // registration and never changes.
        unsafe { (*self.dev.as_ptr()).index }
    }

    /// Whether feature `bit` was negotiated.
    pub(crate) fn has_feature(&self, bit: u32) -> bool {
        // SAFETY: `dev` is valid (type invariant); the features are fixed
        // once probe runs.
        unsafe { bindings::virtio_has_feature(self.dev.as_ptr(), bit) }
    }

    /// Reads the configuration space from offset 0 into `buf`, retrying until
    /// the device's configuration generation is stable. Process context.
    pub(crate) fn read_config(&self, buf: &mut [u8]) -> Result {
        // SAFETY: `dev` is valid (type invariant); `buf` is writable for its
        // length.
        unsafe {
            bindings::virtio_cread_bytes(self.dev.as_ptr(), 0, buf.as_mut_ptr().cast(), buf.len())
        };
        Ok(())
    }

    /// Creates `n` virtqueues whose used-buffer callbacks call
    /// [`VirtioDriver::queue_done`] of `D`, each able to carry chains of up to
    /// `max_segs` buffers.
    pub(crate) fn find_vqs<D: VirtioDriver, T: Chain>(
        &self,
        n: usize,
        max_segs: usize,
    ) -> Result<KVec<Virtqueue<T>>> {
        let mut out = KVec::with_capacity(n, GFP_KERNEL)?;
        let mut raw: KVec<*mut bindings::virtqueue> = KVec::with_capacity(n, GFP_KERNEL)?;
        let mut info: KVec<bindings::virtqueue_info> = KVec::with_capacity(n, GFP_KERNEL)?;
        let mut tables = KVec::with_capacity(n, GFP_KERNEL)?;
        for _ in 0..n {
            raw.push(core::ptr::null_mut(), GFP_KERNEL)?;
            info.push(
                bindings::virtqueue_info {
                    // The core keeps this pointer: it must be static.
                    name: c"request".as_ptr().cast(),
                    callback: Some(vq_callback::<D>),
                    ctx: false,
                },
                GFP_KERNEL,
            )?;
            let mut sg = KVec::with_capacity(max_segs, GFP_KERNEL)?;
            sg.extend_with(max_segs, bindings::scatterlist::default(), GFP_KERNEL)?;
            let mut sgp = KVec::with_capacity(max_segs, GFP_KERNEL)?;
            sgp.extend_with(max_segs, core::ptr::null_mut(), GFP_KERNEL)?;
            tables.push((sg, sgp), GFP_KERNEL)?;
        }
        let n_c = c_uint::try_from(n).map_err(|_| EINVAL)?;
        // SAFETY: `dev` is valid and in probe; `raw` and `info` hold `n`
        // entries; the names are static strings and the callbacks are
        // functions of this module, which outlives the queues (they are
        // deleted in remove, before the module can go away).
        to_result(unsafe {
            bindings::virtio_find_vqs(
                self.dev.as_ptr(),
                n_c,
                raw.as_mut_ptr(),
                info.as_mut_ptr(),
                core::ptr::null_mut(),
            )
        })?;
        for (vq, (sg, sgp)) in raw.into_iter().zip(tables) {
            let Some(vq) = NonNull::new(vq) else {
                // The transport reported success; a null queue is a bug there.
                self.del_vqs_raw();
                return Err(ENODEV);
            };
            // INVARIANT: `vq` was just created for this device.
            out.push(
                Virtqueue {
                    vq,
                    sg,
                    sgp,
                    _items: PhantomData,
                },
                GFP_KERNEL,
            )
            .map_err(|_| {
                self.del_vqs_raw();
                ENOMEM
            })?;
        }
        Ok(out)
    }

    fn del_vqs_raw(&self) {
        if let Some(del) = self.ops().del_vqs {
            // SAFETY: `dev` is valid; no `Virtqueue` refers to its queues
            // any more (callers consume or never created them).
            unsafe { del(self.dev.as_ptr()) };
        }
    }

    /// Sets DRIVER_OK: the device may now process the queues.
    fn ready(&self) {
        // SAFETY: `dev` is valid; this is probe, after the queues were set up
        // and the driver data stored, as `virtio_device_ready()` requires.
        unsafe { bindings::virtio_device_ready(self.dev.as_ptr()) };
    }

    /// Resets the device: it stops using every queue and forgets the
    /// negotiated state. Process context only.
    pub(crate) fn reset(&self) {
        // SAFETY: `dev` is valid; callers are in remove or probe.
        unsafe { bindings::virtio_reset_device(self.dev.as_ptr()) };
    }

    /// Resets the device, takes back and drops every request still in the
    /// queues, and deletes the queues. `vqs` must yield every `Virtqueue`
    /// of the device that still exists; it is consumed after the reset.
    pub(crate) fn del_vqs<T: Chain>(&self, vqs: impl IntoIterator<Item = Virtqueue<T>>) {
        self.reset();
        for mut vq in vqs {
            while vq.detach_unused().is_some() {}
        }
        self.del_vqs_raw();
    }
}

/// A virtio driver implemented in Rust.
pub(crate) trait VirtioDriver: Send + Sync + Sized + 'static {
    /// Driver name.
    const NAME: &'static CStr;
    /// Virtio device ID to bind.
    const DEVICE_ID: u32;
    /// Device feature bits the driver accepts (ring features such as
    /// EVENT_IDX and INDIRECT_DESC are negotiated by the virtio core).
    const FEATURES: &'static [u32];

    /// Builds the driver state for `dev`: reads the configuration, creates the
    /// queues. The device is not yet live (no DRIVER_OK).
    fn probe(dev: VirtioDevice) -> Result<Arc<Self>>;

    /// Called once the device is live and the queue callbacks reach `this`.
    /// On error, [`VirtioDriver::remove`] is called and probe fails.
    fn start(this: &Arc<Self>) -> Result;

    /// The device used buffers of queue `index`. Interrupt context.
    fn queue_done(&self, index: u32);

    /// The device goes away: the driver must stop using it, and reset it and
    /// delete its queues ([`VirtioDevice::del_vqs`]) before returning.
    fn remove(&self);
}

unsafe extern "C" fn vq_callback<D: VirtioDriver>(vq: *mut bindings::virtqueue) {
    // SAFETY: the virtio core passes a valid queue of a valid device.
    let (vdev, index) = unsafe { ((*vq).vdev, (*vq).index) };
    // SAFETY: as above.
    let data = unsafe { (*vdev).priv_ }.cast::<D>().cast_const();
    if data.is_null() {
        return;
    }
    // SAFETY: `priv_` holds a reference from `Arc::into_raw` (see
    // `probe_callback`) from before DRIVER_OK until after the queues are
    // deleted, so no callback runs without it.
    let driver = unsafe { &*data };
    driver.queue_done(index);
}

unsafe extern "C" fn probe_callback<D: VirtioDriver>(vdev: *mut bindings::virtio_device) -> c_int {
    let Some(dev) = NonNull::new(vdev) else {
        return ENODEV.to_errno();
    };
    // INVARIANT: the virtio core passes a valid device; it stays valid until
    // remove returns.
    let dev = VirtioDevice { dev };
    let driver = match D::probe(dev) {
        Ok(d) => d,
        Err(e) => return e.to_errno(),
    };
    // SAFETY: `vdev` is valid; no callback runs before DRIVER_OK below.
    unsafe { (*vdev).priv_ = Arc::into_raw(driver.clone()).cast_mut().cast() };
    dev.ready();
    match D::start(&driver) {
        Ok(()) => 0,
        Err(e) => {
            driver.remove();
            // SAFETY: the queues are deleted, so no callback uses `priv_`;
            // the pointer came from `Arc::into_raw` above.
            unsafe {
                drop(Arc::from_raw((*vdev).priv_.cast::<D>().cast_const()));
                (*vdev).priv_ = core::ptr::null_mut();
            }
            e.to_errno()
        }
    }
}

unsafe extern "C" fn remove_callback<D: VirtioDriver>(vdev: *mut bindings::virtio_device) {
    // SAFETY: the virtio core passes the device it probed successfully.
    let data = unsafe { (*vdev).priv_ }.cast::<D>().cast_const();
    if data.is_null() {
        return;
    }
    // SAFETY: set by `probe_callback` from `Arc::into_raw`; reclaimed once.
    let driver = unsafe { Arc::from_raw(data) };
    driver.remove();
    // SAFETY: `remove` deleted the queues: no callback reads `priv_` now.
    unsafe { (*vdev).priv_ = core::ptr::null_mut() };
}

/// Storage the virtio core points into while the driver is registered.
struct DriverStorage {
    drv: Opaque<bindings::virtio_driver>,
    ids: [bindings::virtio_device_id; 2],
}

/// A registered virtio driver; unregistered on drop.
///
/// # Invariants
///
/// `storage.drv` is registered with the virtio core, and its pointers refer
/// to `storage.ids`, `D::FEATURES` and `D::NAME`, which outlive it.
pub(crate) struct Registration<D: VirtioDriver> {
    storage: KBox<DriverStorage>,
    _driver: PhantomData<D>,
}

// SAFETY: the registration only holds C data that the driver core accesses
// under its own locking; the Rust side never touches it after registering.
unsafe impl<D: VirtioDriver> Send for Registration<D> {}
// SAFETY: as above; no `&self` method exists.
unsafe impl<D: VirtioDriver> Sync for Registration<D> {}

impl<D: VirtioDriver> Registration<D> {
    /// Registers `D` with the virtio core; probe may run before this returns.
    pub(crate) fn new(module: &'static ThisModule) -> Result<Self> {
        let storage = KBox::new(
            DriverStorage {
                drv: Opaque::new(bindings::virtio_driver::default()),
                ids: [
                    bindings::virtio_device_id {
                        device: D::DEVICE_ID,
                        vendor: bindings::VIRTIO_DEV_ANY_ID,
                    },
                    bindings::virtio_device_id::default(),
                ],
            },
            GFP_KERNEL,
        )?;
        let drv = storage.drv.get();
        // SAFETY: `drv` points into the heap allocation of `storage`, which
        // stays at the same address while the registration lives; nothing
        // else accesses it yet. The name, ID table and feature table are
        // static or live in the same allocation.
        unsafe {
            (*drv).driver.name = D::NAME.as_ptr().cast();
            (*drv).id_table = storage.ids.as_ptr();
            (*drv).feature_table = D::FEATURES.as_ptr();
            (*drv).feature_table_size = D::FEATURES.len() as c_uint;
            (*drv).probe = Some(probe_callback::<D>);
            (*drv).remove = Some(remove_callback::<D>);
        }
        // SAFETY: `drv` is fully initialised and outlives the registration
        // (unregistered in `drop`); `module` is this module.
        to_result(unsafe { bindings::__register_virtio_driver(drv, module.as_ptr()) })?;
        // INVARIANT: registered above.
        Ok(Self {
            storage,
            _driver: PhantomData,
        })
    }
}

impl<D: VirtioDriver> Drop for Registration<D> {
    fn drop(&mut self) {
        // SAFETY: registered (type invariant); this removes every bound
        // device (calling remove) before returning.
        unsafe { bindings::unregister_virtio_driver(self.storage.drv.get()) };
    }
}

/// Types whose embedded high-resolution timer is cancelled with
/// [`cancel_timer`] before they are dropped.
///
/// # Safety
///
/// Implementers must call [`cancel_timer`] on themselves in their `Drop`
/// (or `PinnedDrop`), and the timer callback must not use the object after
/// that.
pub(crate) unsafe trait CancelTimerOnDrop {}

/// Arms (or re-arms) the timer embedded in `this` to fire after `delay`,
/// without a handle: the owner cancels it when it is dropped.
pub(crate) fn start_timer<T>(this: Pin<&T>, delay: Delta)
where
    T: HasHrTimer<T> + CancelTimerOnDrop,
    T::TimerMode: HrTimerMode<Expires = Delta>,
{
    // SAFETY: `this` is a valid pinned object; it cancels its timer before
    // it is dropped (`CancelTimerOnDrop`), so it lives until the timer fires
    // or is cancelled.
    unsafe { T::start(this.get_ref(), delay) };
}

/// Cancels the timer embedded in `this`, waiting for a running callback.
/// Must not be called with a lock held that the callback takes.
pub(crate) fn cancel_timer<T: HasHrTimer<T>>(this: &T) {
    // SAFETY: `this` is valid, so is the pointer to its initialised timer.
    unsafe { bindings::hrtimer_cancel(T::c_timer_ptr(this).cast_mut()) };
}

fn to_result(ret: c_int) -> Result {
    if ret < 0 {
        Err(Error::from_errno(ret))
    } else {
        Ok(())
    }
}

/// A page that the kernel hands to a frontswap or cleancache operation for
/// the duration of the call: the page of a swap folio being stored or
/// loaded, or a page cache page being put into or read from cleancache.
///
/// # Invariants
///
/// `page` is a valid page for the lifetime `'a`, and its contents do not
/// change during it: the kernel holds the folio locked (frontswap, and
/// cleancache gets) or has it out of everyone else's reach (a cleancache
/// put runs while the page cache removes the clean, unmapped folio). A
/// `&mut PageRef` is only handed out for a page being read in, which
/// nobody else reads until the operation returns.
#[cfg(any(CONFIG_FRONTSWAP, CONFIG_CLEANCACHE))]
pub(crate) struct PageRef<'a> {
    page: NonNull<bindings::page>,
    _page: PhantomData<&'a mut bindings::page>,
}

#[cfg(any(CONFIG_FRONTSWAP, CONFIG_CLEANCACHE))]
impl PageRef<'_> {
    /// Wraps `page`.
    ///
    /// # Safety
    ///
    /// `page` must satisfy the type invariants for the lifetime chosen by
    /// the caller (the duration of the kernel's call into the backend).
    unsafe fn new(page: NonNull<bindings::page>) -> Self {
        // INVARIANT: guaranteed by the caller.
        Self {
            page,
            _page: PhantomData,
        }
    }

    /// Copies the page into `dst` (up to a page). Never sleeps: usable in
    /// atomic context.
    pub(crate) fn read(&self, dst: &mut [u8]) {
        let len = dst.len().min(bindings::PAGE_SIZE as usize);
        // SAFETY: `page` is valid (type invariant); the mapping is
        // released before returning, on the same CPU (no sleep between).
        unsafe {
            let src = bindings::kmap_local_page(self.page.as_ptr());
            core::ptr::copy_nonoverlapping(src.cast::<u8>(), dst.as_mut_ptr(), len);
            bindings::kunmap_local(src);
        }
    }

    /// Overwrites the page with `src` (up to a page).
    pub(crate) fn write(&mut self, src: &[u8]) {
        let len = src.len().min(bindings::PAGE_SIZE as usize);
        // SAFETY: `page` is valid and being read in by the caller of the
        // operation, which is the only one using it (type invariant); the
        // mapping is released before returning, on the same CPU.
        unsafe {
            let dst = bindings::kmap_local_page(self.page.as_ptr());
            core::ptr::copy_nonoverlapping(src.as_ptr(), dst.cast::<u8>(), len);
            bindings::kunmap_local(dst);
        }
    }
}

#[cfg(CONFIG_FRONTSWAP)]
pub(crate) use frontswap::{FrontswapBackend, FrontswapRegistration};

/// Glue to the kernel's frontswap hooks (`<linux/frontswap.h>`).
///
/// frontswap calls a backend through a table of plain functions without a
/// context argument, so the registered backend lives in a global, set
/// before registering (registration calls `init` for areas already on) and
/// cleared after unregistering (which waits for running operations).
#[cfg(CONFIG_FRONTSWAP)]
mod frontswap {
    use super::*;
    use kernel::{ffi::c_ulong, sync::global_lock};

    /// A frontswap backend. See `struct frontswap_ops` for the contexts:
    /// everything may sleep except [`FrontswapBackend::invalidate_page`].
    pub(crate) trait FrontswapBackend: Send + Sync {
        /// Swap area `ty` of `nr_pages` slots was switched on.
        fn init(&self, ty: usize, nr_pages: u64);
        /// Keep a copy of `page` for slot `offset` of area `ty`.
        fn store(&self, ty: usize, offset: u64, page: &PageRef<'_>) -> Result;
        /// Copy slot `offset` of area `ty` into `page`.
        fn load(&self, ty: usize, offset: u64, page: &mut PageRef<'_>) -> Result;
        /// Drop slot `offset` of area `ty`. Atomic context: must not sleep.
        fn invalidate_page(&self, ty: usize, offset: u64);
        /// Area `ty` is being switched off: drop all of it.
        fn invalidate_area(&self, ty: usize);
    }

    global_lock! {
        // SAFETY: initialised by `init()`, called from the module's init
        // before anything else uses it.
        unsafe(uninit) static BACKEND: SpinLockIrq<Option<Arc<dyn FrontswapBackend>>> = None;
    }

    /// Initialises the global state. Called once, from module init.
    pub(crate) fn init() {
        // SAFETY: called once, before any other use of `BACKEND`.
        unsafe { BACKEND.init() };
    }

    fn backend() -> Option<Arc<dyn FrontswapBackend>> {
        BACKEND.lock().clone()
    }

    unsafe extern "C" fn fs_init(ty: c_uint, nr_pages: c_ulong) {
        if let Some(b) = backend() {
            b.init(ty as usize, nr_pages as u64);
        }
    }

    unsafe extern "C" fn fs_store(ty: c_uint, offset: c_ulong, page: *mut bindings::page) -> c_int {
        let (Some(b), Some(page)) = (backend(), NonNull::new(page)) else {
            return ENODEV.to_errno();
        };
        // SAFETY: frontswap passes the locked page of the folio being
        // written out, valid and unchanging for this call.
        let page = unsafe { PageRef::new(page) };
        match b.store(ty as usize, offset as u64, &page) {
            Ok(()) => 0,
            Err(e) => e.to_errno(),
        }
    }

    unsafe extern "C" fn fs_load(ty: c_uint, offset: c_ulong, page: *mut bindings::page) -> c_int {
        let (Some(b), Some(page)) = (backend(), NonNull::new(page)) else {
            return EIO.to_errno();
        };
        // SAFETY: frontswap passes the locked page of the folio being
        // read in, valid for this call and used by nobody else.
        let mut page = unsafe { PageRef::new(page) };
        match b.load(ty as usize, offset as u64, &mut page) {
            Ok(()) => 0,
            Err(e) => e.to_errno(),
        }
    }

    unsafe extern "C" fn fs_invalidate_page(ty: c_uint, offset: c_ulong) {
        if let Some(b) = backend() {
            b.invalidate_page(ty as usize, offset as u64);
        }
    }

    unsafe extern "C" fn fs_invalidate_area(ty: c_uint) {
        if let Some(b) = backend() {
            b.invalidate_area(ty as usize);
        }
    }

    /// The driver registered as the frontswap backend.
    ///
    /// # Invariants
    ///
    /// While `ops` is `Some`, it is registered with frontswap and `BACKEND`
    /// holds the backend.
    pub(crate) struct FrontswapRegistration {
        ops: Option<KBox<Opaque<bindings::frontswap_ops>>>,
    }

    // SAFETY: only the address of `ops` is used after registration.
    unsafe impl Send for FrontswapRegistration {}
    // SAFETY: no `&self` method exists.
    unsafe impl Sync for FrontswapRegistration {}

    impl FrontswapRegistration {
        /// Registers `backend`; frontswap calls its `init` for the swap
        /// areas already on before this returns.
        pub(crate) fn register(backend: Arc<dyn FrontswapBackend>) -> Result<Self> {
            let ops = KBox::new(
                Opaque::new(bindings::frontswap_ops {
                    init: Some(fs_init),
                    store: Some(fs_store),
                    load: Some(fs_load),
                    invalidate_page: Some(fs_invalidate_page),
                    invalidate_area: Some(fs_invalidate_area),
                    owner: <crate::LocalModule as kernel::ModuleMetadata>::THIS_MODULE.as_ptr(),
                }),
                GFP_KERNEL,
            )?;
            let old = BACKEND.lock().replace(backend);
            drop(old);
            // SAFETY: `ops` is fully initialised and stays allocated while
            // registered (it is only freed after a successful unregister).
            let ret = unsafe { bindings::frontswap_register_ops(ops.get()) };
            if ret < 0 {
                let old = BACKEND.lock().take();
                drop(old);
                return Err(Error::from_errno(ret));
            }
            // INVARIANT: registered, and `BACKEND` is set.
            Ok(Self { ops: Some(ops) })
        }

        /// Unregisters; fails with `EBUSY` while the backend holds pages,
        /// and then stays registered.
        pub(crate) fn unregister(&mut self) -> Result {
            let Some(ops) = self.ops.as_ref() else {
                return Ok(());
            };
            // SAFETY: `ops` is registered (type invariant). On success no
            // operation runs any more when this returns.
            let ret = unsafe { bindings::frontswap_unregister_ops(ops.get()) };
            if ret < 0 {
                return Err(Error::from_errno(ret));
            }
            self.ops = None;
            let old = BACKEND.lock().take();
            drop(old);
            Ok(())
        }
    }

    impl Drop for FrontswapRegistration {
        fn drop(&mut self) {
            if self.unregister().is_err() {
                // Still registered: the table must outlive the kernel's use.
                if let Some(ops) = self.ops.take() {
                    KBox::leak(ops);
                }
            }
        }
    }
}

#[cfg(CONFIG_CLEANCACHE)]
pub(crate) use cleancache::{CleancacheBackend, CleancacheRegistration, FileKey};

/// Glue to the kernel's cleancache hooks (`<linux/cleancache.h>`).
///
/// Like frontswap, cleancache calls its backend through a table of plain
/// functions without a context argument, so the registered backend lives
/// in a global, set before registering (registration calls `init_fs` for
/// the filesystems already mounted) and cleared after unregistering (which
/// waits for running operations).
#[cfg(CONFIG_CLEANCACHE)]
mod cleancache {
    use super::*;
    use kernel::{ffi::c_ulong, sync::global_lock};

    /// The name of a file within a cleancache pool: inode number, inode
    /// generation, 0 (`struct cleancache_filekey`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) struct FileKey(pub(crate) [u64; 3]);

    /// A cleancache backend: an ephemeral pool per filesystem, which may
    /// drop any page at any time but must never return data older than the
    /// last put of the page, or data invalidated since.
    ///
    /// See `struct cleancache_ops` for the contexts: [`Self::put_page`] runs
    /// in atomic context (the page cache's xarray lock held, interrupts
    /// off), and [`Self::invalidate_page`] and [`Self::invalidate_inode`] may;
    /// they must neither sleep nor allocate with a sleeping allocation.
    pub(crate) trait CleancacheBackend: Send + Sync {
        /// A filesystem with UUID `uuid` opted in (at mount, or before this
        /// backend registered): returns its pool id (>= 0). The pool must
        /// not hold older data of this filesystem. Process context.
        fn init_fs(&self, uuid: &[u8; 16]) -> Result<i32>;
        /// Copies page `index` of file `key` into `page`; `Err(ENOENT)` on a
        /// miss (any error is a miss). Process context, may sleep (no I/O:
        /// called from readahead with the folio locked).
        fn get_page(&self, pool: i32, key: FileKey, index: u64, page: &mut PageRef<'_>) -> Result;
        /// Keeps a copy of `page` as page `index` of file `key`, replacing
        /// any older one; if it is dropped instead, no older copy may be
        /// returned later. Atomic context.
        fn put_page(&self, pool: i32, key: FileKey, index: u64, page: &PageRef<'_>);
        /// Drops page `index` of file `key`. Maybe atomic context; must not
        /// be lost.
        fn invalidate_page(&self, pool: i32, key: FileKey, index: u64);
        /// Drops every page of file `key`. Maybe atomic context; must not be
        /// lost.
        fn invalidate_inode(&self, pool: i32, key: FileKey);
        /// The filesystem of `pool` is unmounted: drops the pool. Process
        /// context.
        fn invalidate_fs(&self, pool: i32);
    }

    global_lock! {
        // SAFETY: initialised by `init()`, called from the module's init
        // before anything else uses it.
        unsafe(uninit) static CC_BACKEND: SpinLockIrq<Option<Arc<dyn CleancacheBackend>>> = None;
    }

    /// Initialises the global state. Called once, from module init.
    pub(crate) fn init() {
        // SAFETY: called once, before any other use of `CC_BACKEND`.
        unsafe { CC_BACKEND.init() };
    }

    fn backend() -> Option<Arc<dyn CleancacheBackend>> {
        CC_BACKEND.lock().clone()
    }

    /// Reads the key cleancache passes.
    ///
    /// # Safety
    ///
    /// `key` must be null or point to a valid `struct cleancache_filekey`.
    unsafe fn file_key(key: *const bindings::cleancache_filekey) -> Option<FileKey> {
        // SAFETY: `key` is null or valid (the caller's guarantee).
        let key = unsafe { key.as_ref() }?;
        Some(FileKey([key.u[0], key.u[1], key.u[2]]))
    }

    unsafe extern "C" fn cc_init_fs(uuid: *const u8) -> c_int {
        let Some(b) = backend() else {
            return ENODEV.to_errno();
        };
        // SAFETY: cleancache passes the super_block's `s_uuid`, 16 bytes,
        // valid for this call (or null, which `as_ref` catches).
        let Some(uuid) = (unsafe { uuid.cast::<[u8; 16]>().as_ref() }) else {
            return EINVAL.to_errno();
        };
        match b.init_fs(uuid) {
            Ok(pool) if pool >= 0 => pool,
            Ok(_) => EINVAL.to_errno(),
            Err(e) => e.to_errno(),
        }
    }

    unsafe extern "C" fn cc_get_page(
        pool: c_int,
        key: *const bindings::cleancache_filekey,
        index: c_ulong,
        page: *mut bindings::page,
    ) -> c_int {
        // SAFETY: cleancache passes a valid key for this call.
        let key = unsafe { file_key(key) };
        let (Some(b), Some(key), Some(page)) = (backend(), key, NonNull::new(page)) else {
            return ENOENT.to_errno();
        };
        // SAFETY: cleancache passes the page of a locked, not up to date
        // folio being read in: valid for this call and used by nobody else.
        let mut page = unsafe { PageRef::new(page) };
        match b.get_page(pool, key, index as u64, &mut page) {
            Ok(()) => 0,
            Err(e) => e.to_errno(),
        }
    }

    unsafe extern "C" fn cc_put_page(
        pool: c_int,
        key: *const bindings::cleancache_filekey,
        index: c_ulong,
        page: *mut bindings::page,
    ) {
        // SAFETY: cleancache passes a valid key for this call.
        let key = unsafe { file_key(key) };
        if let (Some(b), Some(key), Some(page)) = (backend(), key, NonNull::new(page)) {
            // SAFETY: cleancache passes the page of a clean, locked,
            // unmapped folio that the page cache is removing: valid and
            // unchanging for this call.
            let page = unsafe { PageRef::new(page) };
            b.put_page(pool, key, index as u64, &page);
        }
    }

    unsafe extern "C" fn cc_invalidate_page(
        pool: c_int,
        key: *const bindings::cleancache_filekey,
        index: c_ulong,
    ) {
        // SAFETY: cleancache passes a valid key for this call.
        let key = unsafe { file_key(key) };
        if let (Some(b), Some(key)) = (backend(), key) {
            b.invalidate_page(pool, key, index as u64);
        }
    }

    unsafe extern "C" fn cc_invalidate_inode(
        pool: c_int,
        key: *const bindings::cleancache_filekey,
    ) {
        // SAFETY: cleancache passes a valid key for this call.
        let key = unsafe { file_key(key) };
        if let (Some(b), Some(key)) = (backend(), key) {
            b.invalidate_inode(pool, key);
        }
    }

    unsafe extern "C" fn cc_invalidate_fs(pool: c_int) {
        if let Some(b) = backend() {
            b.invalidate_fs(pool);
        }
    }

    /// The driver registered as the cleancache backend.
    ///
    /// # Invariants
    ///
    /// While `ops` is `Some`, it is registered with cleancache and
    /// `CC_BACKEND` holds the backend.
    pub(crate) struct CleancacheRegistration {
        ops: Option<KBox<Opaque<bindings::cleancache_ops>>>,
    }

    // SAFETY: only the address of `ops` is used after registration.
    unsafe impl Send for CleancacheRegistration {}
    // SAFETY: no `&self` method exists.
    unsafe impl Sync for CleancacheRegistration {}

    impl CleancacheRegistration {
        /// Registers `backend`; cleancache calls its `init_fs` for the
        /// opted-in filesystems already mounted before this returns.
        /// `EBUSY` if another cleancache backend is registered.
        pub(crate) fn register(backend: Arc<dyn CleancacheBackend>) -> Result<Self> {
            let ops = KBox::new(
                Opaque::new(bindings::cleancache_ops {
                    init_fs: Some(cc_init_fs),
                    get_page: Some(cc_get_page),
                    put_page: Some(cc_put_page),
                    invalidate_page: Some(cc_invalidate_page),
                    invalidate_inode: Some(cc_invalidate_inode),
                    invalidate_fs: Some(cc_invalidate_fs),
                    owner: <crate::LocalModule as kernel::ModuleMetadata>::THIS_MODULE.as_ptr(),
                }),
                GFP_KERNEL,
            )?;
            let old = CC_BACKEND.lock().replace(backend);
            drop(old);
            // SAFETY: `ops` is fully initialised and stays allocated while
            // registered (it is only freed after unregistering).
            let ret = unsafe { bindings::cleancache_register_ops(ops.get()) };
            if ret < 0 {
                let old = CC_BACKEND.lock().take();
                drop(old);
                return Err(Error::from_errno(ret));
            }
            // INVARIANT: registered, and `CC_BACKEND` is set.
            Ok(Self { ops: Some(ops) })
        }

        /// Unregisters: no operation runs any more when this returns. The
        /// backend drops its pools itself (`invalidate_fs` is not called).
        /// Does nothing if already unregistered.
        pub(crate) fn unregister(&mut self) {
            let Some(ops) = self.ops.take() else {
                return;
            };
            // SAFETY: `ops` is registered (type invariant). On success no
            // operation runs any more when this returns.
            let ret = unsafe { bindings::cleancache_unregister_ops(ops.get()) };
            if ret < 0 {
                // Cannot happen for registered ops; if it did, the kernel
                // could still use the table and the backend.
                pr_err!("cleancache_unregister_ops failed: {}\n", ret);
                KBox::leak(ops);
                return;
            }
            let old = CC_BACKEND.lock().take();
            drop(old);
        }
    }

    impl Drop for CleancacheRegistration {
        fn drop(&mut self) {
            self.unregister();
        }
    }
}

/// Initialises global state of this module. Called once, from module init.
pub(crate) fn init_globals() {
    #[cfg(CONFIG_FRONTSWAP)]
    frontswap::init();
    #[cfg(CONFIG_CLEANCACHE)]
    cleancache::init();
}
