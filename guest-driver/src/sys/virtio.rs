// SPDX-License-Identifier: GPL-2.0

//! The virtio device and its virtqueues.
//!
//! - [`DmaBuf`]: memory the device may read or write.
//! - [`Virtqueue`]: a virtqueue that owns the requests it carries
//!   (`KBox<T>` in, `KBox<T>` out), so that a buffer can neither be freed
//!   nor reused while the device may still access it.
//! - [`VirtioDevice`], [`VirtioDriver`] and [`Registration`]: driver
//!   registration, probe and remove, configuration space, feature bits,
//!   virtqueue set-up.

use core::{marker::PhantomData, ptr::NonNull};
use kernel::{
    bindings,
    error::to_result,
    ffi::{c_int, c_uint},
    prelude::*,
    sync::Arc,
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

/// A virtio device bound to this driver, for the duration of one call of
/// the driver's probe, start or remove.
///
/// Only the callbacks of this module create a `VirtioDevice`, as a local
/// variable, and the driver sees it only as `&VirtioDevice` borrowed for
/// the call. It is neither `Copy` nor `Clone`, so the driver cannot keep
/// it: whatever it needs later (feature bits, say) it reads at probe.
/// Using the device after remove therefore cannot be written in safe code.
///
/// # Invariants
///
/// `dev` points to a virtio device bound to this driver, valid for the
/// lifetime of every `&VirtioDevice` handed out (the callback in which it
/// was created: the virtio core keeps the device alive and bound until
/// remove returns).
pub(crate) struct VirtioDevice {
    dev: NonNull<bindings::virtio_device>,
}

impl VirtioDevice {
    fn ops(&self) -> &bindings::virtio_config_ops {
        // SAFETY: `dev` is valid (type invariant).
        let config = unsafe { (*self.dev.as_ptr()).config };
        // SAFETY: `config` points to the transport's static operations.
        unsafe { &*config }
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
                    name: c"request".as_char_ptr(),
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
    fn probe(dev: &VirtioDevice) -> Result<Arc<Self>>;

    /// Called once the device is live and the queue callbacks reach `this`.
    /// On error, [`VirtioDriver::remove`] is called and probe fails.
    fn start(this: &Arc<Self>, dev: &VirtioDevice) -> Result;

    /// The device used buffers of queue `index`. Interrupt context.
    fn queue_done(&self, index: u32);

    /// The device signalled a configuration change. Interrupt context,
    /// under the virtio core's configuration lock: the configuration
    /// cannot be read here (reading it may sleep).
    fn config_changed(&self);

    /// The device goes away: the driver must stop using it, and reset it and
    /// delete its queues ([`VirtioDevice::del_vqs`]) before returning.
    fn remove(&self, dev: &VirtioDevice);
}

/// The used-buffer callback of every queue.
///
/// # Safety
///
/// Called by the virtio core only, with a valid queue of a device bound to
/// `D`.
unsafe extern "C" fn vq_callback<D: VirtioDriver>(vq: *mut bindings::virtqueue) {
    // SAFETY: the virtio core passes a valid queue of a valid device.
    let vdev = unsafe { (*vq).vdev };
    // SAFETY: as above.
    let index = unsafe { (*vq).index };
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

/// The configuration-change callback.
///
/// # Safety
///
/// Called by the virtio core only, with a device bound to `D`.
unsafe extern "C" fn config_changed_callback<D: VirtioDriver>(vdev: *mut bindings::virtio_device) {
    // SAFETY: the virtio core passes a valid device.
    let data = unsafe { (*vdev).priv_ }.cast::<D>().cast_const();
    if data.is_null() {
        return;
    }
    // SAFETY: the core calls this only while configuration changes are
    // enabled: from after a successful probe (so after `probe_callback` set
    // `priv_` from `Arc::into_raw`) until remove starts, before
    // `remove_callback` reclaims it.
    let driver = unsafe { &*data };
    driver.config_changed();
}

/// The driver's probe.
///
/// # Safety
///
/// Called by the virtio core only, with a device matching the ID table.
unsafe extern "C" fn probe_callback<D: VirtioDriver>(vdev: *mut bindings::virtio_device) -> c_int {
    let Some(dev) = NonNull::new(vdev) else {
        return ENODEV.to_errno();
    };
    // INVARIANT: the virtio core passes a valid device, bound to this driver
    // for this call; `dev` is a local that only lends itself out.
    let dev = VirtioDevice { dev };
    let driver = match D::probe(&dev) {
        Ok(d) => d,
        Err(e) => return e.to_errno(),
    };
    // SAFETY: `vdev` is valid; no callback runs before DRIVER_OK below.
    unsafe { (*vdev).priv_ = Arc::into_raw(driver.clone()).cast_mut().cast() };
    dev.ready();
    match D::start(&driver, &dev) {
        Ok(()) => 0,
        Err(e) => {
            driver.remove(&dev);
            // SAFETY: `vdev` is valid; the queues are deleted, so no
            // callback reads `priv_` any more.
            let data = unsafe { core::mem::take(&mut (*vdev).priv_) };
            // SAFETY: `data` came from `Arc::into_raw` above.
            drop(unsafe { Arc::from_raw(data.cast::<D>().cast_const()) });
            e.to_errno()
        }
    }
}

/// The driver's remove.
///
/// # Safety
///
/// Called by the virtio core only, with a device this driver probed
/// successfully.
unsafe extern "C" fn remove_callback<D: VirtioDriver>(vdev: *mut bindings::virtio_device) {
    // SAFETY: the virtio core passes the device it probed successfully.
    let data = unsafe { (*vdev).priv_ }.cast::<D>().cast_const();
    if data.is_null() {
        return;
    }
    // SAFETY: set by `probe_callback` from `Arc::into_raw`; reclaimed once.
    let driver = unsafe { Arc::from_raw(data) };
    let Some(dev) = NonNull::new(vdev) else {
        return;
    };
    // INVARIANT: the device is bound to this driver until this call returns;
    // `dev` is a local that only lends itself out.
    let dev = VirtioDevice { dev };
    driver.remove(&dev);
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
        let mut table = bindings::virtio_driver::default();
        table.driver.name = D::NAME.as_char_ptr();
        table.id_table = storage.ids.as_ptr();
        table.feature_table = D::FEATURES.as_ptr();
        table.feature_table_size = D::FEATURES.len() as c_uint;
        table.probe = Some(probe_callback::<D>);
        table.remove = Some(remove_callback::<D>);
        table.config_changed = Some(config_changed_callback::<D>);
        let drv = storage.drv.get();
        // SAFETY: `drv` points into the heap allocation of `storage`, which
        // stays at the same address while the registration lives; nothing
        // else accesses it yet. The name, ID table and feature table are
        // static or live in the same allocation.
        unsafe { drv.write(table) };
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
