//! What every thread of a VM may read: KVM fds, guest memory, layout, host facts. The vCPU
//! threads, the modules, the dirty log and the [`crate::Vm`] handle all hold it; it names none
//! of them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{Layout, PAGE_SIZE};
use crate::state::Restored;
use crate::{Error, Result};

/// Guest memory with a dirty bitmap that also records writes made by the host (devices).
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// The parts of a VM every thread may read. Field order matters: the VM fd is dropped before
/// the memory that is registered with it.
pub struct VmShared {
    /// The KVM system fd.
    pub kvm: Kvm,
    /// The VM fd.
    pub vm_fd: VmFd,
    /// Guest RAM.
    pub mem: GuestMem,
    /// Where things are.
    pub layout: Layout,
    /// Entry point of every vCPU.
    pub entry: u64,
    /// Whether the in-kernel irqchip (LAPIC, IOAPIC, PIC) and PIT exist.
    pub irqchip: bool,
    /// The VM is being restored from a snapshot.
    pub restoring: bool,
    /// The MSRs saved for each vCPU, in restore order.
    pub msrs: Vec<u32>,
    /// This host's KVM is KVM-PVM (it lists the PVM MSRs). PVM runs guest CPL3 natively but
    /// delivers interrupts and exceptions only to PVM-aware guests (through
    /// `MSR_PVM_EVENT_ENTRY`), never through a guest's IDT. Set by the CPU module, which asks
    /// the boot vCPU for PVM's signature MSR.
    pub pvm: AtomicBool,
    /// The CPUID KVM supports, given to every vCPU (fetched once: the ioctl is slow).
    pub cpuid: kvm_bindings::CpuId,
    /// The guest's TSC frequency in kHz (from the boot vCPU; 0 when KVM cannot say).
    pub tsc_khz: u64,
    /// Guest arguments written into the boot-info page.
    pub boot_args: String,
    /// Devices written into the boot-info page.
    pub mmio_devices: Vec<guest_abi::boot::MmioDevice>,
    pub(crate) restored: Mutex<Restored>,
    pub(crate) ran: AtomicBool,
    /// Devices behind unbacked guest-physical addresses ([`crate::Vm::set_mmio_bus`]).
    pub(crate) mmio_bus: OnceLock<Arc<dyn crate::MmioBus>>,
    /// KVM leaves dirty pages writable until told to re-arm them
    /// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`), so hot pages can stay writable across epochs.
    pub(crate) manual_dirty: bool,
    /// Which pages the epochs keep writable ([`crate::rearm::Rearm`]).
    pub(crate) rearm: Mutex<crate::rearm::Rearm>,
    /// The dirty rings, when the VM tracks with them instead of the bitmap ([`crate::ring`]).
    pub(crate) dirty_ring: Option<crate::ring::DirtyRings>,
    /// Helper threads for large page copies ([`crate::crew`]).
    pub(crate) crew: crate::crew::Crew,
}

impl VmShared {
    /// Fetches the dirty-page bitmap, KVM's log (guest writes) OR vm-memory's bitmap (host
    /// writes, e.g. devices), and re-arms tracking: every dirty page when `keep_hot` is off;
    /// with it on, the pages [`crate::rearm::Rearm`] calls hot stay writable (and so dirty in
    /// every later fetch). Bit `n` stands for guest page `n`. Users go through
    /// [`crate::DirtyLog`].
    pub(crate) fn take_dirty_bitmap(&self, keep_hot: bool) -> Result<Vec<u64>> {
        if let Some(ring) = &self.dirty_ring {
            return ring.take(&self.mem, &self.vm_fd, self.layout.pages() as usize);
        }
        let pages = self.layout.pages() as usize;
        let mut out = vec![0u64; pages.div_ceil(64)];
        let mut page_base = 0usize;
        let mut rearm = self.rearm.lock().unwrap_or_else(|p| p.into_inner());
        for (slot, region) in self.mem.iter().enumerate() {
            let mut kvm = self
                .vm_fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(Error::kvm("KVM_GET_DIRTY_LOG"))?;
            let region_pages = (region.len() / PAGE_SIZE) as usize;
            if self.manual_dirty {
                let clear = if keep_hot {
                    rearm.select(slot, &kvm)
                } else {
                    rearm.forget(slot);
                    kvm.clone()
                };
                crate::rearm::clear_dirty_log(&self.vm_fd, slot as u32, region_pages, &clear)?;
            }
            kvm.truncate(region_pages.div_ceil(64));
            let host = std::ops::Deref::deref(region).bitmap().get_and_reset();
            let word =
                |w: usize| kvm.get(w).copied().unwrap_or(0) | host.get(w).copied().unwrap_or(0);
            if page_base % 64 == 0 {
                // Whole words at a time (the usual case: one region from 0).
                for w in 0..region_pages.div_ceil(64) {
                    let valid = (region_pages - w * 64).min(64);
                    let mask = if valid == 64 {
                        u64::MAX
                    } else {
                        (1u64 << valid) - 1
                    };
                    out[page_base / 64 + w] |= word(w) & mask;
                }
            } else {
                for p in 0..region_pages {
                    if word(p / 64) >> (p % 64) & 1 != 0 {
                        let g = page_base + p;
                        out[g / 64] |= 1 << (g % 64);
                    }
                }
            }
            page_base += region_pages;
        }
        Ok(out)
    }

    /// The restored PIT and clock, while no vCPU has run since the restore.
    pub(crate) fn frozen_vm_time(
        &self,
    ) -> Option<(kvm_bindings::kvm_pit_state2, kvm_bindings::kvm_clock_data)> {
        if self.ran.load(Ordering::Acquire) {
            return None;
        }
        self.restored.lock().unwrap_or_else(|p| p.into_inner()).vm
    }
    pub(crate) fn remember_vm_time(
        &self,
        pit: kvm_bindings::kvm_pit_state2,
        clock: kvm_bindings::kvm_clock_data,
    ) {
        self.restored.lock().unwrap_or_else(|p| p.into_inner()).vm = Some((pit, clock));
    }
}
