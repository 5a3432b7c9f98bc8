//! Which dirty pages an epoch re-arms, and the two KVM calls behind it (manual dirty-log
//! protect, `KVM_CLEAR_DIRTY_LOG`). See [`crate::dirty`] for why hot pages stay writable.
//!
//! ```text
//!  take n:  dirty D(n)   hot = D(n) ∧ D(n-1) ∧ ¬sweep(n)   re-arm D(n) ∧ ¬hot
//!           sweep(n) = pages p with p mod SWEEP = n mod SWEEP
//! ```

use crate::{Error, Result};

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
}
