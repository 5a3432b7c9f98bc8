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
//! No interrupts are delivered to guests on this machine: the drivers are used in polling
//! mode only (the blocking calls spin on the used ring, which lives in guest RAM, so the spin
//! causes no exits).
#![no_std]

extern crate alloc;

#[cfg(feature = "smoltcp")]
pub mod net;

use core::alloc::Layout;
use core::ptr::NonNull;

use tandem_rt::guest_abi::boot::MmioDevice;
use tandem_rt::guest_abi::layout::{MAX_MMIO_DEVICES, MMIO_BASE, MMIO_SIZE, PAGE_SIZE};
use tandem_rt::Env;
pub use virtio_drivers;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

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
