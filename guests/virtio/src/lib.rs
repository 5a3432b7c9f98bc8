//! # tandem-virtio — virtio-drivers glue for Tandem's Rust guests
//!
//! * [`IdentityHal`]: the `virtio_drivers::Hal` of a Tandem guest. All RAM is identity-mapped
//!   (GPA == VA), so physical addresses are pointers; DMA buffers come from the guest heap,
//!   page-aligned and zeroed.
//! * [`find`] / [`transport`]: the virtio-mmio devices the monitor lists in the boot-info page
//!   (`guest_abi::boot`, device table: virtio id, GSI, base, size). A window is accepted only
//!   where the ABI puts them: 4 KiB-aligned inside `MMIO_BASE .. MMIO_BASE + 16 × 4 KiB`, size
//!   0x100 ..= 4 KiB. The MMIO window is mapped (2 MiB user page) so CPL3 can touch it; each
//!   access exits to the host's device model.
//!
//! * [`Gated`]: a transport whose queue notifications can be held and sent as one
//!   ([`NotifyGate`]), so that a driver's non-blocking calls can queue many requests for a
//!   single exit.
//!
//! No interrupts are delivered to guests on this machine: the drivers are used in polling
//! mode only (the blocking calls spin on the used ring, which lives in guest RAM, so the spin
//! causes no exits).
#![no_std]

extern crate alloc;

#[cfg(feature = "smoltcp")]
pub mod net;

use alloc::rc::Rc;
use core::alloc::Layout;
use core::cell::Cell;
use core::ptr::NonNull;

use tandem_rt::guest_abi::boot::MmioDevice;
use tandem_rt::guest_abi::layout::{MAX_MMIO_DEVICES, MMIO_BASE, MMIO_SIZE, PAGE_SIZE};
use tandem_rt::Env;
pub use virtio_drivers;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Smallest window: the virtio-mmio header (config space starts at 0x100).
const MIN_WINDOW: u64 = 0x100;

/// The identity-mapped HAL.
pub struct IdentityHal;

fn dma_layout(pages: usize) -> Option<Layout> {
    let bytes = pages.checked_mul(PAGE_SIZE as usize)?;
    Layout::from_size_align(bytes.max(1), PAGE_SIZE as usize).ok()
}

// SAFETY: DMA memory is heap memory owned by the driver until `dma_dealloc`; with GPA == VA
// the device sees exactly what the driver wrote (x86 is cache coherent).
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = dma_layout(pages) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        match NonNull::new(p) {
            Some(nn) => (p as PhysAddr, nn),
            // virtio-drivers turns a zero physical address into `Error::DmaError`.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        match dma_layout(pages) {
            Some(layout) => {
                // SAFETY: allocated by `dma_alloc` with this layout.
                unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
                0
            }
            None => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// Why a device could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindError {
    /// No boot-info page, or fewer devices of that id than asked for.
    Missing,
    /// The window in the boot-info page is not one the ABI allows.
    BadWindow {
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// The window's header is not a virtio-mmio device of the expected type.
    NotVirtio,
}

impl core::fmt::Display for FindError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FindError::Missing => write!(f, "no such virtio-mmio device in the boot-info page"),
            FindError::BadWindow { base, size } => write!(
                f,
                "virtio-mmio window {base:#x}+{size:#x} is outside the ABI's windows"
            ),
            FindError::NotVirtio => write!(f, "the window holds no virtio device of that type"),
        }
    }
}

/// The `index`-th device with virtio id `device_id` (`guest_abi::boot::VIRTIO_ID_*`).
pub fn find(env: &Env, device_id: u32, index: usize) -> Result<MmioDevice, FindError> {
    let info = env.boot_info().ok_or(FindError::Missing)?;
    let dev = info
        .devices()
        .iter()
        .filter(|d| d.device_id == device_id)
        .nth(index)
        .copied()
        .ok_or(FindError::Missing)?;
    check_window(&dev)?;
    Ok(dev)
}

/// Checks that a device window is one of the ABI's virtio-mmio windows.
pub fn check_window(dev: &MmioDevice) -> Result<(), FindError> {
    let end_all = MMIO_BASE + u64::from(MAX_MMIO_DEVICES) * MMIO_SIZE;
    let bad = FindError::BadWindow {
        base: dev.base,
        size: dev.size,
    };
    let end = dev.base.checked_add(dev.size).ok_or(bad)?;
    if dev.base < MMIO_BASE
        || end > end_all
        || !dev.base.is_multiple_of(MMIO_SIZE)
        || !(MIN_WINDOW..=MMIO_SIZE).contains(&dev.size)
    {
        return Err(bad);
    }
    Ok(())
}

/// The virtio-mmio transport of a checked device, if its header is a device of `want`.
pub fn transport(dev: &MmioDevice, want: DeviceType) -> Result<MmioTransport<'static>, FindError> {
    check_window(dev)?;
    let header = NonNull::new(dev.base as *mut VirtIOHeader).ok_or(FindError::NotVirtio)?;
    // SAFETY: the window is one of the ABI's virtio-mmio windows (checked), mapped for the
    // life of the VM and used by this driver alone.
    let t = unsafe { MmioTransport::new(header, dev.size as usize) }
        .map_err(|_| FindError::NotVirtio)?;
    if t.device_type() != want {
        return Err(FindError::NotVirtio);
    }
    Ok(t)
}

/// Offset of the QueueNotify register in a virtio-mmio window.
const QUEUE_NOTIFY: u64 = 0x50;

/// Holds a device's queue notifications (each one is a QueueNotify write, hence a VM exit)
/// while [`hold`](Self::hold) is on, and sends each held queue's once on
/// [`release`](Self::release). Shared between the driver's [`Gated`] transport and its user.
pub struct NotifyGate {
    /// The device's QueueNotify register.
    notify: NonNull<u32>,
    holding: Cell<bool>,
    /// Bit `q`: queue `q` was notified while held.
    pending: Cell<u32>,
    /// Notifications that reached the device.
    sent: Cell<u64>,
}

impl NotifyGate {
    /// A gate, open, for the checked device `dev`.
    pub fn new(dev: &MmioDevice) -> Result<Rc<Self>, FindError> {
        check_window(dev)?;
        let notify =
            NonNull::new((dev.base + QUEUE_NOTIFY) as *mut u32).ok_or(FindError::NotVirtio)?;
        Ok(Rc::new(NotifyGate {
            notify,
            holding: Cell::new(false),
            pending: Cell::new(0),
            sent: Cell::new(0),
        }))
    }

    /// From now on, notifications wait for [`release`](Self::release).
    pub fn hold(&self) {
        self.holding.set(true);
    }

    /// Lets notifications through again and sends the held ones, one per queue.
    pub fn release(&self) {
        self.holding.set(false);
        let mut pending = self.pending.replace(0);
        while pending != 0 {
            let q = pending.trailing_zeros();
            pending &= pending - 1;
            self.send(q);
        }
    }

    /// Notifications that reached the device so far.
    pub fn sent(&self) -> u64 {
        self.sent.get()
    }

    fn send(&self, queue: u32) {
        self.sent.set(self.sent.get() + 1);
        // SAFETY: QueueNotify of a window `check_window` accepted: mapped device memory for
        // the life of the VM, 4-byte aligned; a write has no effect on guest memory.
        unsafe { core::ptr::write_volatile(self.notify.as_ptr(), queue) };
    }
}

/// A virtio-mmio transport whose notifications pass through a [`NotifyGate`] (made for the
/// same device). Notifications of queues 32 and above are never held.
pub struct Gated<T> {
    inner: T,
    gate: Rc<NotifyGate>,
}

impl<T: Transport> Gated<T> {
    /// `inner`, gated by `gate`.
    pub fn new(inner: T, gate: Rc<NotifyGate>) -> Self {
        Gated { inner, gate }
    }
}

impl<T: Transport> Transport for Gated<T> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features)
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        if self.gate.holding.get() && queue < 32 {
            self.gate.pending.set(self.gate.pending.get() | 1 << queue);
        } else {
            self.gate.send(u32::from(queue));
        }
    }
    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }
    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }
    fn read_config_space<V: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<V> {
        self.inner.read_config_space(offset)
    }
    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}
