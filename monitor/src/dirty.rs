//! The one owner of the dirty log: snapshots, epochs and pre-copy all read it here.
//!
//! ```text
//!   guest writes ──▶ KVM dirty log (per memslot) ──┐
//!                                                  ├─ OR ─▶ DirtyPages (bit n = page n) ─▶ runs
//!   host writes (devices) ──▶ vm-memory bitmap ────┘        ─▶ copy_runs (rayon) ─▶ PageRun
//! ```
//!
//! [`DirtyLog::take`] fetches and resets both logs at once, so a page written after it is in
//! the next take. A page copied while the guest runs (pre-copy) may be torn; it was written
//! after the take, so it is in the next take too and is sent again.
//!
//! ## Hot pages stay writable between epochs
//!
//! KVM learns of a guest write by write-protecting the page: the first write after a reset
//! faults. On nested KVM-PVM such a fault costs tens of µs, so a guest rewriting 4,096 pages
//! every 50 ms epoch spends the whole epoch faulting (measured: 2 records/s instead of
//! 20,000). With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, KVM re-arms only the pages we name
//! (`KVM_CLEAR_DIRTY_LOG`); [`DirtyLog::take_epoch`] leaves *hot* pages writable:
//!
//! ```text
//!  take n:  dirty D(n)   hot = D(n) ∧ D(n-1) ∧ ¬sweep(n)   re-arm D(n) ∧ ¬hot
//!           sweep(n) = pages p with p mod 16 = n mod 16   (every hot page is re-tested
//!                                                          once in 16 takes)
//! ```
//!
//! A page left writable stays set in KVM's log, so every later take reports it dirty and the
//! epoch copies it (a superset of the written pages, never a subset): a cold page costs at
//! most 16 needless 4 KiB copies, a hot one a single fault in 16 epochs instead of one in
//! every epoch. Without the capability every take re-arms everything, as before.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::layout::PAGE_SIZE;
use crate::shared::VmShared;
use crate::{Error, Result};

/// Contiguous guest pages copied out of a stunned VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// The pages' bytes (a multiple of the page size).
    pub data: Vec<u8>,
}

/// The longest run copied as one piece (2 MiB).
pub const MAX_RUN_PAGES: u64 = 512;

/// A set of guest pages (bit `n` of the bitmap = page `n`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyPages {
    bitmap: Vec<u64>,
    pages: u64,
}

impl DirtyPages {
    /// Every one of `pages` pages.
    pub fn all(pages: u64) -> Self {
        DirtyPages {
            bitmap: vec![u64::MAX; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// A bitmap of `pages` pages (missing words count as clean, extra bits are ignored).
    pub fn from_bitmap(bitmap: Vec<u64>, pages: u64) -> Self {
        DirtyPages { bitmap, pages }
    }

    /// The bitmap.
    pub fn bitmap(&self) -> &[u64] {
        &self.bitmap
    }

    /// Runs of at most [`MAX_RUN_PAGES`] dirty pages: (first page, page count).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        dirty_runs(&self.bitmap, self.pages)
    }
}

/// Turns a dirty bitmap (bit n = page n) into runs of at most [`MAX_RUN_PAGES`] pages:
/// (first page, page count).
pub fn dirty_runs(bitmap: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut start: Option<u64> = None;
    for p in 0..=pages {
        let dirty =
            p < pages && (bitmap.get((p / 64) as usize).copied().unwrap_or(0) >> (p % 64)) & 1 == 1;
        match (dirty, start) {
            (true, None) => start = Some(p),
            (true, Some(s)) if p - s == MAX_RUN_PAGES => {
                runs.push((s, p - s));
                start = Some(p);
            }
            (false, Some(s)) => {
                runs.push((s, p - s));
                start = None;
            }
            _ => {}
        }
    }
    runs
}

/// The dirty log of one VM, and the copy of dirty pages out of its memory.
#[derive(Clone)]
pub struct DirtyLog {
    shared: Arc<VmShared>,
}

impl DirtyLog {
    pub(crate) fn new(shared: Arc<VmShared>) -> Self {
        DirtyLog { shared }
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.shared.layout.mem_bytes
    }

    /// Guest pages.
    pub fn pages(&self) -> u64 {
        self.shared.layout.pages()
    }

    /// Fetches and resets the log: KVM's (guest writes) OR vm-memory's (host writes). Every
    /// page is write-protected again.
    pub fn take(&self) -> Result<DirtyPages> {
        Ok(DirtyPages {
            bitmap: self.shared.take_dirty_bitmap(false)?,
            pages: self.pages(),
        })
    }

    /// Like [`DirtyLog::take`], for back-to-back epochs of a stunned guest: hot pages stay
    /// writable and are reported dirty again next time (see the module doc).
    pub fn take_epoch(&self) -> Result<DirtyPages> {
        Ok(DirtyPages {
            bitmap: self.shared.take_dirty_bitmap(true)?,
            pages: self.pages(),
        })
    }

    /// Whether this host lets hot pages stay writable between epochs.
    pub fn keeps_hot_pages(&self) -> bool {
        self.shared.manual_dirty
    }

    /// Copies `runs` (first page, count) out of guest memory, on every core.
    pub fn copy_runs(&self, runs: &[(u64, u64)]) -> Result<Vec<PageRun>> {
        use rayon::prelude::*;
        let mem = &self.shared.mem;
        runs.par_iter()
            .map(|&(first, n)| {
                let mut data = vec![0u8; (n * PAGE_SIZE) as usize];
                mem.read_slice(&mut data, GuestAddress(first * PAGE_SIZE))
                    .map_err(|e| Error::Memory(e.to_string()))?;
                Ok(PageRun {
                    gpa: first * PAGE_SIZE,
                    data,
                })
            })
            .collect()
    }
}

/// One take in this many re-tests every hot page (re-arms it).
pub const SWEEP: usize = 16;

/// Which dirty pages an epoch re-arms (write-protects) and which it leaves writable, per
/// memory slot (see the module doc). Pure: tests drive it without KVM.
#[derive(Debug, Default)]
pub struct Rearm {
    /// The previous take's KVM bitmap, per slot.
    prev: Vec<Vec<u64>>,
    /// Takes so far (selects the sweep).
    round: usize,
}

impl Rearm {
    /// Given slot `slot`'s dirty bitmap, the pages to re-arm now; remembers `dirty`.
    pub fn select(&mut self, slot: usize, dirty: &[u64]) -> Vec<u64> {
        if self.prev.len() <= slot {
            self.prev.resize(slot + 1, Vec::new());
        }
        if slot == 0 {
            self.round = self.round.wrapping_add(1);
        }
        let r = self.round % SWEEP;
        // Bits of pages p with p mod SWEEP == r, in a 64-page word (64 is a multiple of SWEEP).
        let mut sweep = 0u64;
        let mut b = r;
        while b < 64 {
            sweep |= 1 << b;
            b += SWEEP;
        }
        let prev = &self.prev[slot];
        let clear = dirty
            .iter()
            .enumerate()
            .map(|(w, &d)| {
                let hot = d & prev.get(w).copied().unwrap_or(0) & !sweep;
                d & !hot
            })
            .collect();
        self.prev[slot] = dirty.to_vec();
        clear
    }

    /// Slot `slot` was re-armed whole: nothing in it is hot any more.
    pub fn forget(&mut self, slot: usize) {
        if let Some(p) = self.prev.get_mut(slot) {
            p.clear();
        }
    }
}

// KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log).
mod ioctls {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_iowr_nr!(
        KVM_CLEAR_DIRTY_LOG,
        kvm_bindings::KVMIO,
        0xc0,
        kvm_bindings::kvm_clear_dirty_log
    );
}
use ioctls::KVM_CLEAR_DIRTY_LOG;

/// Asks KVM to leave dirty pages writable until [`clear_dirty_log`] re-arms them. Returns
/// whether it agreed (old hosts: no, and every fetch re-arms everything, as before).
pub(crate) fn enable_manual_protect(kvm: &kvm_ioctls::Kvm, vm: &kvm_ioctls::VmFd) -> bool {
    let cap = kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
    let offered = kvm.check_extension_raw(cap.into());
    // Bit 0: manual protect. (Bit 1, "initially set", would make the first fetch report
    // every page: not wanted, a VM starts clean.)
    if offered & 1 == 0 {
        log::debug!("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered: epochs re-arm every page");
        return false;
    }
    let mut enable = kvm_bindings::kvm_enable_cap {
        cap,
        ..Default::default()
    };
    enable.args[0] = 1;
    match vm.enable_cap(&enable) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("cannot enable manual dirty-log protection ({e}): epochs re-arm every page");
            false
        }
    }
}

/// Re-arms (write-protects and clears in KVM's log) the pages of slot `slot` whose bits are
/// set in `mask`; `pages` is the slot's size in pages.
pub(crate) fn clear_dirty_log(
    vm: &kvm_ioctls::VmFd,
    slot: u32,
    pages: usize,
    mask: &[u64],
) -> Result<()> {
    if mask.iter().all(|&w| w == 0) {
        return Ok(());
    }
    let mut bits = mask.to_vec();
    bits.resize(pages.div_ceil(64), 0);
    let mut arg = kvm_bindings::kvm_clear_dirty_log {
        slot,
        num_pages: u32::try_from(pages)
            .map_err(|_| Error::Memory("memory slot too large".into()))?,
        first_page: 0,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr().cast();
    // SAFETY: the ioctl reads `arg` and `num_pages` bits from `bits`, which holds
    // ceil(pages / 64) words and outlives the call; `vm` is a valid VM fd.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret < 0 {
        return Err(Error::kvm("KVM_CLEAR_DIRTY_LOG")(kvm_ioctls::Error::last()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_pages_stay_writable_and_every_one_is_swept_once_in_sweep_takes() {
        let mut r = Rearm::default();
        let all = vec![u64::MAX; 2];
        // First take: nothing was dirty before, everything is re-armed.
        assert_eq!(r.select(0, &all), all);
        // Pages dirty twice in a row are hot, except the sweep's.
        let mut rearmed = vec![0u64; 2];
        for _ in 0..SWEEP {
            let c = r.select(0, &all);
            assert_eq!(c[0].count_ones(), (64 / SWEEP) as u32);
            rearmed[0] |= c[0];
            rearmed[1] |= c[1];
        }
        assert_eq!(rearmed, all, "every hot page re-tested once in SWEEP takes");
        // A page that went quiet is not hot any more; a new one is re-armed.
        let mut d = vec![0u64; 2];
        d[1] = 0b11;
        let c = r.select(0, &d);
        assert_eq!(c[1] & 0b11, c[1]);
        let c = r.select(0, &d);
        assert!(c[1].count_ones() <= 1, "both pages hot but for the sweep");
        r.forget(0);
        assert_eq!(r.select(0, &d), d, "after a full re-arm nothing is hot");
    }

    #[test]
    fn runs_split_at_gaps_and_at_the_run_limit() {
        let mut bitmap = vec![0u64; 32];
        bitmap[0] = 0b1011;
        bitmap[2..20].fill(u64::MAX);
        let runs = dirty_runs(&bitmap, 64 * 32);
        assert_eq!(runs[0], (0, 2));
        assert_eq!(runs[1], (3, 1));
        assert_eq!(runs[2], (128, MAX_RUN_PAGES));
        assert_eq!(runs[3], (128 + MAX_RUN_PAGES, MAX_RUN_PAGES));
        assert_eq!(
            runs[4],
            (128 + 2 * MAX_RUN_PAGES, 18 * 64 - 2 * MAX_RUN_PAGES)
        );
        assert_eq!(runs.len(), 5);
        assert_eq!(DirtyPages::all(10).runs(), vec![(0, 10)]);
    }
}
