//! Which dirty pages an epoch re-arms, and the two KVM calls behind it (manual dirty-log
//! protect, `KVM_CLEAR_DIRTY_LOG`). See [`crate::dirty`] for why hot pages stay writable.
//!
//! ```text
//!  take n:  dirty D(n)   not a clear take: re-arm nothing
//!           clear take c: hot = D(c) ∧ (D(c-1) ∨ D(c-2)) ∧ ¬sweep(c)   re-arm D(c) ∧ ¬hot
//!           (c-1, c-2: the previous clear takes; D there holds every page written since
//!            the clear before, and every page left writable)
//!           sweep(c) = pages p with p mod SWEEP = c mod SWEEP
//!
//!  interval between clear takes (adaptive, CLEAR_EVERY_MIN ..= CLEAR_EVERY_MAX takes):
//!           clean(c) = re-armed at c-1 ∧ ¬D(c)     (stayed clean: the clear at c-1 paid
//!                                                    for those, no copies at every take)
//!           clean(c) ≥ |D(c)| / PAID_SHARE  →  interval / 2   (a moving working set)
//!           otherwise                       →  interval × 2   (a stable hot set)
//! ```
//!
//! Why re-arm only on some takes: on KVM-PVM (shadow paging) every `KVM_CLEAR_DIRTY_LOG`
//! call, however few pages it names, costs the running guest the rebuilding of its mappings
//! afterwards; a guest rewriting a 16 MiB hot set at 40 epochs a second kept 3 % of its
//! throughput with a clear per epoch, 31 % with none (`cargo xtask bench stall` by hand). A
//! page left writable is reported dirty by every take (a superset, never a subset), so
//! skipping a clear costs only copies: a page written once is copied at most `interval`
//! times. How often to pay for a clear is therefore a trade the guest decides: a stable hot
//! set gains nothing from clears (what they re-arm is written again at once), a writer that
//! moves on leaves pages that a clear stops copying. The interval follows what the last
//! clear bought.
//!
//! D(c-2) too: a guest that faults slow may rewrite its hot set less than once between two
//! clear takes; with D(c-1) alone its pages would be re-armed every other time.

use crate::{Error, Result};

/// One clear take in this many re-tests every hot page (re-arms it).
pub const SWEEP: usize = 16;

/// Takes between two clear takes at first (and always, with [`Rearm::every`]).
pub const CLEAR_EVERY: usize = 4;

/// The fewest takes between two clear takes of the adaptive policy.
pub const CLEAR_EVERY_MIN: usize = 2;

/// The most takes between two clear takes of the adaptive policy (32: 1.6 s at 20 Hz).
pub const CLEAR_EVERY_MAX: usize = 32;

/// A clear "paid" when at least 1/`PAID_SHARE` of the pages taken at the next clear take are
/// pages it re-armed that stayed clean (each would have been copied at every take between).
pub const PAID_SHARE: u64 = 32;

/// Which dirty pages an epoch re-arms (write-protects) and which it leaves writable, per
/// memory slot (see the module doc). Pure: tests drive it without KVM.
#[derive(Debug)]
pub struct Rearm {
    /// The previous clear take's KVM bitmap, per slot.
    prev: Vec<Vec<u64>>,
    /// The one before it, per slot.
    prev2: Vec<Vec<u64>>,
    /// What the previous clear take re-armed, per slot.
    rearmed: Vec<Vec<u64>>,
    /// Takes since the last clear take.
    since: usize,
    /// Whether the take under way (slot 0 starts one) is a clear take.
    clearing: bool,
    /// Clear takes so far (selects the sweep).
    clears: usize,
    /// Takes between clear takes now.
    interval: usize,
    /// The bounds of `interval` (equal: a fixed interval).
    bounds: (usize, usize),
    /// Of the last clear take, over its slots: pages it found dirty, and pages the clear
    /// before re-armed that stayed clean since.
    taken: u64,
    stayed_clean: u64,
}

impl Default for Rearm {
    /// The adaptive policy: from [`CLEAR_EVERY`], between [`CLEAR_EVERY_MIN`] and
    /// [`CLEAR_EVERY_MAX`] (see [`Rearm::interval`]).
    fn default() -> Self {
        Rearm::adaptive(CLEAR_EVERY_MIN, CLEAR_EVERY_MAX)
    }
}

impl Rearm {
    /// A policy that re-arms on one take in `every` (at least 1), always.
    pub fn every(every: usize) -> Self {
        Rearm::adaptive(every, every)
    }

    /// A policy whose interval between clear takes starts at [`CLEAR_EVERY`] (within the
    /// bounds) and adapts between `min` and `max` takes: it doubles after a clear that did
    /// not pay (the pages it re-armed were written again: a stable hot set, where a clear
    /// only costs the guest its mappings) and halves after one that did (a moving working
    /// set, where pages left writable would be copied needlessly at every take); see
    /// [`PAID_SHARE`].
    pub fn adaptive(min: usize, max: usize) -> Self {
        let min = min.max(1);
        let max = max.max(min);
        Rearm {
            prev: Vec::new(),
            prev2: Vec::new(),
            rearmed: Vec::new(),
            since: 0,
            clearing: false,
            clears: 0,
            interval: CLEAR_EVERY.clamp(min, max),
            bounds: (min, max),
            taken: 0,
            stayed_clean: 0,
        }
    }

    /// Takes between clear takes now.
    pub fn interval(&self) -> usize {
        self.interval
    }

    /// Given slot `slot`'s dirty bitmap, the pages to re-arm now (none on a take that is not
    /// a clear take); remembers `dirty` on a clear take. Slot 0 starts a take.
    pub fn select(&mut self, slot: usize, dirty: &[u64]) -> Vec<u64> {
        if self.prev.len() <= slot {
            self.prev.resize(slot + 1, Vec::new());
            self.prev2.resize(slot + 1, Vec::new());
            self.rearmed.resize(slot + 1, Vec::new());
        }
        if slot == 0 {
            self.since += 1;
            self.clearing = self.since >= self.interval;
            if self.clearing {
                self.since = 0;
                self.clears = self.clears.wrapping_add(1);
                self.adapt();
            }
        }
        if !self.clearing {
            return vec![0; dirty.len()];
        }
        let r = self.clears % SWEEP;
        // Bits of pages p with p mod SWEEP == r, in a 64-page word (64 is a multiple of SWEEP).
        let mut sweep = 0u64;
        let mut b = r;
        while b < 64 {
            sweep |= 1 << b;
            b += SWEEP;
        }
        let (prev, prev2, rearmed) = (&self.prev[slot], &self.prev2[slot], &self.rearmed[slot]);
        let word = |v: &Vec<u64>, w: usize| v.get(w).copied().unwrap_or(0);
        let mut clean = 0u64;
        let clear: Vec<u64> = dirty
            .iter()
            .enumerate()
            .map(|(w, &d)| {
                clean += u64::from((word(rearmed, w) & !d).count_ones());
                let hot = d & (word(prev, w) | word(prev2, w)) & !sweep;
                d & !hot
            })
            .collect();
        self.stayed_clean += clean;
        self.taken += dirty.iter().map(|d| u64::from(d.count_ones())).sum::<u64>();
        self.prev2[slot] = std::mem::replace(&mut self.prev[slot], dirty.to_vec());
        self.rearmed[slot] = clear.clone();
        clear
    }

    /// At a clear take: judges the previous clear by what the one before it re-armed and
    /// stayed clean, and sets the interval to the next clear.
    fn adapt(&mut self) {
        let (taken, clean) = (self.taken, self.stayed_clean);
        self.taken = 0;
        self.stayed_clean = 0;
        if self.clears <= 2 {
            // No clear before the previous one to judge it by.
            return;
        }
        let (min, max) = self.bounds;
        self.interval = if clean * PAID_SHARE >= taken.max(1) {
            (self.interval / 2).max(min)
        } else {
            (self.interval * 2).min(max)
        };
    }

    /// Slot `slot` was re-armed whole: nothing in it is hot any more.
    pub fn forget(&mut self, slot: usize) {
        for p in [
            self.prev.get_mut(slot),
            self.prev2.get_mut(slot),
            self.rearmed.get_mut(slot),
        ]
        .into_iter()
        .flatten()
        {
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
        let mut r = Rearm::every(1);
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
    fn a_page_dirty_every_other_take_is_hot_and_one_dirty_once_is_not() {
        let mut r = Rearm::every(1);
        let (on, off) = (vec![0b1u64], vec![0u64]);
        // Taken in rounds that avoid page 0's sweep (round % SWEEP == 0).
        assert_eq!(r.select(0, &on), on, "first seen: re-armed");
        assert_eq!(r.select(0, &off), off);
        assert_eq!(r.select(0, &on), off, "dirty two takes ago: hot");
        // Once hot it stays writable, so KVM reports it every take; a quiet spell long enough
        // to leave both windows empty (after a sweep re-armed it) cools it.
        let mut r = Rearm::every(1);
        assert_eq!(r.select(0, &on), on);
        assert_eq!(r.select(0, &off), off);
        assert_eq!(r.select(0, &off), off);
        assert_eq!(r.select(0, &on), on, "dirty three takes ago only: re-armed");
    }

    #[test]
    fn only_every_clear_every_th_take_re_arms_and_a_page_written_once_is_re_armed_there() {
        let mut r = Rearm::every(CLEAR_EVERY);
        let (on, off) = (vec![0b10u64], vec![0u64]);
        // Page 1 written once: it stays writable (and reported) until the next clear take,
        // which re-arms it (it was not dirty at the clear takes before).
        for take in 1..CLEAR_EVERY {
            assert_eq!(r.select(0, &on), off, "take {take} re-arms nothing");
        }
        assert_eq!(r.select(0, &on), on, "the clear take re-arms it");
        // Written again in every interval: hot at the next clear take (unless swept).
        for _ in 1..CLEAR_EVERY {
            assert_eq!(r.select(0, &on), off);
        }
        assert_eq!(r.select(0, &on), off, "hot: left writable");
    }

    /// Takes until the next clear take (which is included), with `dirty` at each.
    fn to_next_clear(r: &mut Rearm, dirty: &dyn Fn(usize) -> Vec<u64>, take: &mut usize) {
        loop {
            *take += 1;
            let c = r.select(0, &dirty(*take));
            if r.clearing {
                return;
            }
            assert!(c.iter().all(|&w| w == 0), "only a clear take re-arms");
        }
    }

    #[test]
    fn a_stable_hot_set_makes_clears_rarer_and_a_moving_one_makes_them_frequent() {
        // 16 MiB rewritten at every take: clears only cost, the interval grows to the most.
        let mut r = Rearm::default();
        assert_eq!(r.interval(), CLEAR_EVERY);
        let hot = |_: usize| vec![u64::MAX; 64];
        let mut take = 0;
        for _ in 0..12 {
            to_next_clear(&mut r, &hot, &mut take);
        }
        assert_eq!(r.interval(), CLEAR_EVERY_MAX);
        // Then a writer that moves on at every take (new pages each time, never rewritten):
        // what a clear re-arms stays clean, so clears pay and come as often as allowed.
        let moving = |t: usize| {
            let mut v = vec![0u64; 4096];
            v[(t * 3) % 4096] = u64::MAX;
            v
        };
        for _ in 0..12 {
            to_next_clear(&mut r, &moving, &mut take);
        }
        assert_eq!(r.interval(), CLEAR_EVERY_MIN);
    }

    #[test]
    fn a_hot_set_that_goes_quiet_is_found_by_the_sweep_and_clears_come_sooner() {
        let mut r = Rearm::default();
        let hot = |_: usize| vec![u64::MAX; 64];
        let mut take = 0;
        for _ in 0..12 {
            to_next_clear(&mut r, &hot, &mut take);
        }
        assert_eq!(r.interval(), CLEAR_EVERY_MAX);
        // The guest stops writing. Its pages stay writable (KVM reports them every take)
        // until re-armed: the sweep re-arms 1/16 of them per clear, and those stay clean.
        let mut writable = vec![u64::MAX; 64];
        let mut clears = 0;
        while r.interval() > CLEAR_EVERY_MIN {
            let w = writable.clone();
            let c = loop {
                let c = r.select(0, &w);
                if r.clearing {
                    break c;
                }
            };
            for (x, y) in writable.iter_mut().zip(&c) {
                *x &= !y;
            }
            clears += 1;
            assert!(
                clears < 12,
                "the interval must shrink while the sweep finds quiet pages"
            );
        }
        assert!(
            writable.iter().map(|w| w.count_ones()).sum::<u32>() < 64 * 64,
            "the sweep re-armed some of the quiet pages"
        );
    }
}
