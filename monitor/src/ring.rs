//! Dirty-page tracking with KVM's per-vCPU dirty rings — an opt-in experiment (issue 15),
//! measured against the dirty bitmap by `cargo xtask bench tracking`.
//!
//! ```text
//!   VmConfig::dirty_ring_bytes = N  ──▶ KVM_ENABLE_CAP(DIRTY_LOG_RING[_ACQ_REL], N)  (before
//!                                       any vCPU exists), then each vCPU's ring is mmapped
//!                                       from its fd at KVM_DIRTY_LOG_PAGE_OFFSET pages
//!   guest write to a protected page ──▶ KVM pushes {slot, offset} with flag DIRTY onto the
//!                                       writing vCPU's ring
//!   take (DirtyLog::take / take_epoch)──▶ harvest: every DIRTY entry → bit, flag := RESET;
//!                                       OR the vm-memory bitmap (host writes);
//!                                       KVM_RESET_DIRTY_RINGS re-protects what was harvested
//!   ring nearly full ─▶ KVM_EXIT_DIRTY_RING_FULL on that vCPU ──▶ its thread harvests its own
//!                                       ring into `pending` and resets (the next take ORs it)
//! ```
//!
//! With the ring KVM has no dirty bitmap (`KVM_GET_DIRTY_LOG` fails), so
//! [`crate::DirtyLog`]'s takes come here whenever the ring is on. Every harvested page is
//! re-protected by the reset: there is no "keep hot pages writable" with the ring, so a guest
//! faults once per hot page per epoch.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::kvm_dirty_gfn;
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::PAGE_SIZE;
/// Guest memory as the VM maps it (the type of `crate::GuestMem`, named here without
/// importing the module that holds the rings).
type Mem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
use crate::{Error, Result};

/// `kvm_dirty_gfn.flags`: KVM published the entry.
const GFN_F_DIRTY: u32 = 1;
/// `kvm_dirty_gfn.flags`: userspace harvested it (KVM_RESET_DIRTY_RINGS may recycle it).
const GFN_F_RESET: u32 = 2;

mod ioctls {
    #![allow(missing_docs)]
    // KVM_RESET_DIRTY_RINGS = _IO(KVMIO, 0xc7).
    vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);
}

/// Enables the dirty ring on `vm` with `bytes` per vCPU (prefers the ACQ_REL flavour). Must
/// run before any vCPU is created. Returns the bytes enabled.
pub(crate) fn enable(vm: &VmFd, bytes: u32) -> Result<u32> {
    if !bytes.is_power_of_two() || u64::from(bytes) < PAGE_SIZE {
        return Err(Error::Config(format!(
            "dirty ring of {bytes} bytes: it must be a power of two of at least a page"
        )));
    }
    for cap in [
        kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
        kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
    ] {
        let max = vm.check_extension_raw(cap.into());
        if max <= 0 {
            continue;
        }
        if i64::from(bytes) > i64::from(max) {
            return Err(Error::Config(format!(
                "dirty ring of {bytes} bytes: this host allows at most {max}"
            )));
        }
        let mut enable = kvm_bindings::kvm_enable_cap {
            cap,
            ..Default::default()
        };
        enable.args[0] = u64::from(bytes);
        vm.enable_cap(&enable)
            .map_err(Error::kvm("KVM_ENABLE_CAP(DIRTY_LOG_RING)"))?;
        log::debug!("dirty ring on: cap {cap}, {bytes} bytes per vCPU");
        return Ok(bytes);
    }
    Err(Error::Config(
        "this host's KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING)".into(),
    ))
}

/// One vCPU's mapped ring and how far it has been harvested.
struct Ring {
    gfns: *mut kvm_dirty_gfn,
    bytes: usize,
    /// Our next entry to look at (free-running; masked by the entry count).
    fetch: u32,
}

// SAFETY: `gfns` points at a MAP_SHARED mapping owned by this struct (unmapped in Drop); it is
// only dereferenced under the `Mutex` that holds the `Ring`.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `gfns`/`bytes` are exactly the mapping made in `DirtyRings::map`.
        unsafe { libc::munmap(self.gfns.cast(), self.bytes) };
    }
}

/// Counters of the dirty rings.
#[derive(Debug, Default)]
pub struct RingStats {
    /// Entries harvested (pages, with repeats across takes).
    pub harvested: AtomicU64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits taken by vCPUs.
    pub full_exits: AtomicU64,
    /// `KVM_RESET_DIRTY_RINGS` calls.
    pub resets: AtomicU64,
}

/// Every vCPU's dirty ring (see the module doc).
pub struct DirtyRings {
    rings: Vec<Mutex<Ring>>,
    entries: u32,
    /// Pages harvested by vCPU threads on a ring-full exit, for the next take (bit n = page n).
    pending: Mutex<Vec<u64>>,
    /// Counters.
    pub stats: RingStats,
}

impl DirtyRings {
    /// Maps the ring of every vCPU in `fds` (`bytes` each, as enabled by [`enable`]).
    pub(crate) fn map(fds: &[VcpuFd], bytes: u32, pages: u64) -> Result<DirtyRings> {
        use std::os::fd::AsRawFd;
        let mut rings = Vec::with_capacity(fds.len());
        for fd in fds {
            let offset = i64::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE_SIZE as i64;
            // SAFETY: a fresh shared mapping of `bytes` bytes of the vCPU fd at the offset
            // KVM documents for the dirty ring; nothing else refers to the address range.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    offset,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(Error::Host(format!(
                    "cannot map a vCPU's dirty ring: {}",
                    std::io::Error::last_os_error()
                )));
            }
            rings.push(Mutex::new(Ring {
                gfns: p.cast(),
                bytes: bytes as usize,
                fetch: 0,
            }));
        }
        Ok(DirtyRings {
            rings,
            entries: bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32,
            pending: Mutex::new(vec![0; pages.div_ceil(64) as usize]),
            stats: RingStats::default(),
        })
    }

    /// Entries per vCPU ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Harvests ring `vcpu` into `out` (bit n = guest page n); `bases[slot]` is the first guest
    /// page of memory slot `slot`. Returns the entries harvested.
    fn harvest(&self, vcpu: usize, bases: &[u64], out: &mut [u64]) -> u64 {
        let mut ring = self.rings[vcpu].lock().unwrap_or_else(|p| p.into_inner());
        let mask = self.entries - 1;
        let mut n = 0;
        loop {
            let i = (ring.fetch & mask) as usize;
            // SAFETY: i < entries, so the entry lies inside the mapping of `entries` entries.
            let e = unsafe { ring.gfns.add(i) };
            // SAFETY: `flags` is a naturally aligned u32 in shared memory that KVM writes with
            // release semantics (ACQ_REL ring); we access it only atomically.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
            if flags.load(Ordering::Acquire) & GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: the DIRTY flag (acquire) says KVM finished writing slot and offset.
            let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
            // Address space in the high 16 bits (always 0 here), slot id in the low 16.
            if let Some(&base) = bases.get((slot & 0xffff) as usize) {
                let page = base + offset;
                if let Some(w) = out.get_mut((page / 64) as usize) {
                    *w |= 1 << (page % 64);
                }
            }
            flags.store(GFN_F_RESET, Ordering::Release);
            ring.fetch = ring.fetch.wrapping_add(1);
            n += 1;
        }
        self.stats.harvested.fetch_add(n, Ordering::Relaxed);
        n
    }

    fn reset(&self, vm: &VmFd) -> Result<()> {
        self.stats.resets.fetch_add(1, Ordering::Relaxed);
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; `vm` is a valid VM fd.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(vm, ioctls::KVM_RESET_DIRTY_RINGS()) };
        if ret < 0 {
            return Err(Error::kvm("KVM_RESET_DIRTY_RINGS")(
                kvm_ioctls::Error::last(),
            ));
        }
        Ok(())
    }

    /// The dirty set since the last take: every ring, what ring-full exits harvested, and the
    /// host's writes (vm-memory bitmap); re-protects the harvested pages.
    pub(crate) fn take(&self, mem: &Mem, vm: &VmFd, pages: usize) -> Result<Vec<u64>> {
        let bases = slot_bases(mem);
        let mut out = std::mem::replace(
            &mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()),
            vec![0; pages.div_ceil(64)],
        );
        out.resize(pages.div_ceil(64), 0);
        for v in 0..self.rings.len() {
            self.harvest(v, &bases, &mut out);
        }
        for (region, &base) in mem.iter().zip(&bases) {
            let host = std::ops::Deref::deref(region).bitmap().get_and_reset();
            let n = (region.len() / PAGE_SIZE) as usize;
            for (p, g) in (0..n).map(|p| (p, base as usize + p)) {
                if host.get(p / 64).copied().unwrap_or(0) >> (p % 64) & 1 != 0 {
                    out[g / 64] |= 1 << (g % 64);
                }
            }
        }
        self.reset(vm)?;
        Ok(out)
    }

    /// A vCPU's ring is full (`KVM_EXIT_DIRTY_RING_FULL`): harvest it into `pending` and reset,
    /// so the vCPU can run on. Called on that vCPU's thread.
    pub(crate) fn ring_full(&self, vcpu: u32, mem: &Mem, vm: &VmFd) -> Result<()> {
        self.stats.full_exits.fetch_add(1, Ordering::Relaxed);
        let bases = slot_bases(mem);
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            self.harvest(vcpu as usize, &bases, &mut pending);
        }
        self.reset(vm)
    }
}

/// The first guest page of every memory slot (slot n = region n, as MainMem registers them).
fn slot_bases(mem: &Mem) -> Vec<u64> {
    mem.iter().map(|r| r.start_addr().0 / PAGE_SIZE).collect()
}

impl crate::Vm {
    /// The dirty rings, when this VM tracks dirty pages with them
    /// ([`crate::VmConfig::dirty_ring_bytes`]).
    pub fn dirty_rings(&self) -> Option<&DirtyRings> {
        self.shared().dirty_ring.as_ref()
    }
}

/// `KVM_EXIT_DIRTY_RING_FULL`, which kvm-ioctls reports as `VcpuExit::Unsupported`.
pub(crate) const EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
