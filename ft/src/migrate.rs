//! Planned migration (`tandem ctl SOCK migrate ADDR`): how the last epoch is made small
//! enough, and how the guest is slowed down until it is.
//!
//! ```text
//!  primary (this host)                                        receiver (tandem standby at ADDR)
//!   │ pre-copy rounds, guest running (as any new standby) ───▶ │ pre-copy image
//!   │ completing epoch ──────────────────────────────────────▶ │ builds the VM, commits: it
//!   │                                                          │ protects the VM now
//!   │ converging epochs, back to back, exact dirty sets ─────▶ │ commits each
//!   │   after each Ack: Converge::assess — last? else throttle │
//!   │ Freeze (guest stopped), last epoch F ──────────────────▶ │ commits F
//!   │ ◀──────────────────────────────────────────────── Ack(F) │
//!   │ release F's output (the last release here); Switch(F) ─▶ │ claims g+1 at the arbiter
//!   │ ◀────────────────────────────────── Ack(g+1, F): Switched │ activates, releases, runs
//!   │ exits 0: "moved to ADDR"                                 │ primary of g+1 (unprotected)
//! ```
//!
//! **Convergence.** Epochs of the switching phase re-arm every page they copy
//! ([`vmx::machine::EpochCapture::precise`]), so each carries exactly what the guest wrote
//! since the previous capture, and they go back to back (the next is captured when the last is
//! acknowledged), so that window is one round trip. [`Converge`] models a round trip as
//! `fixed + pages / rate`, learning `fixed` (the shortest round trip seen) and `rate` (the
//! best pages per second seen on an epoch of [`MIN_RATE_PAGES`] or more) from the epochs
//! themselves, i.e. from the measured link. The last epoch is expected to carry about as many
//! pages as the one just acknowledged (dirtied over a similar window): when its predicted
//! round trip fits [`LAST_EPOCH_SHARE`] of `--max-downtime-ms`, the next capture is the last
//! (the rest of the budget is for the switch itself: the receiver's claim, sink connection
//! and activation).
//!
//! **Throttle.** When an epoch did not shrink to 9/10 of the one before, the guest is slowed
//! one step further along [`THROTTLE_STEPS`]: [`Throttle`] stuns every vCPU for that fraction
//! of each [`THROTTLE_PERIOD`] (with the monitor's ordinary stun/unstun), so the guest runs,
//! and dirties memory, that much less of the time: 30 %, 50 %, 70 %, 85 %, 93 %, 97 %, 99 %
//! stopped. At 99 % the migration always converges: after [`FORCE_AFTER`] more epochs the
//! next one is the last whatever its size (the downtime is then what it is, and reported).
//! A throttle stun never waits for another stun (an epoch's capture, a pause): if the VM is
//! stopped already, that period is skipped.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use monitor::Vm;

/// Default `--max-downtime-ms`.
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(5);
/// The share of the downtime budget the last epoch's round trip may take.
pub const LAST_EPOCH_SHARE: f64 = 0.5;
/// The fractions of time the throttle stuns the guest, step by step.
pub const THROTTLE_STEPS: [f64; 8] = [0.0, 0.3, 0.5, 0.7, 0.85, 0.93, 0.97, 0.99];
/// Epochs assessed at the last throttle step before the next one is the last anyway.
pub const FORCE_AFTER: u32 = 3;
/// Converging epochs before the next one is the last anyway.
pub const MAX_EPOCHS: u32 = 200;
/// Epochs smaller than this do not teach the link rate (their round trip is all fixed cost).
pub const MIN_RATE_PAGES: u64 = 64;
/// The throttle's period.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// What [`Converge::assess`] decided.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Assessment {
    /// The next capture is the last.
    pub last: bool,
    /// The throttle's fraction from now on.
    pub throttle: f64,
    /// The last epoch's predicted round trip.
    pub predicted: Duration,
    /// `last` because the limits were reached, not because the budget fits.
    pub forced: bool,
}

/// The convergence policy (see the module doc). Pure: tests drive it with numbers.
#[derive(Clone, Debug)]
pub struct Converge {
    max_downtime: Duration,
    step: usize,
    prev_pages: Option<u64>,
    fixed: Option<f64>,
    rate: Option<f64>,
    epochs: u32,
    at_max: u32,
}

impl Converge {
    /// A policy for a downtime budget of `max_downtime`.
    pub fn new(max_downtime: Duration) -> Self {
        Converge {
            max_downtime,
            step: 0,
            prev_pages: None,
            fixed: None,
            rate: None,
            epochs: 0,
            at_max: 0,
        }
    }

    /// Converging epochs assessed so far.
    pub fn epochs(&self) -> u32 {
        self.epochs
    }

    /// The throttle's fraction now.
    pub fn throttle(&self) -> f64 {
        THROTTLE_STEPS[self.step]
    }

    /// The link rate learnt so far, pages per second.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// An epoch of `pages` pages took `rtt` from its capture to its acknowledgement: is the
    /// next capture the last, and how hard is the guest throttled from now on?
    pub fn assess(&mut self, pages: u64, rtt: Duration) -> Assessment {
        self.epochs += 1;
        let t = rtt.as_secs_f64();
        let fixed = self.fixed.map_or(t, |f| f.min(t));
        self.fixed = Some(fixed);
        if pages >= MIN_RATE_PAGES && t > fixed {
            let r = pages as f64 / (t - fixed);
            self.rate = Some(self.rate.map_or(r, |x| x.max(r)));
        }
        let predicted = match self.rate {
            Some(r) => fixed + pages as f64 / r,
            None => t,
        };
        let predicted = Duration::from_secs_f64(predicted.max(0.0));
        let budget = self.max_downtime.mul_f64(LAST_EPOCH_SHARE);
        let at_max = self.step + 1 == THROTTLE_STEPS.len();
        if at_max {
            self.at_max += 1;
        }
        let forced = self.epochs >= MAX_EPOCHS || self.at_max >= FORCE_AFTER;
        let last = predicted <= budget || forced;
        if !last && !at_max && self.prev_pages.is_some_and(|p| pages * 10 > p * 9) {
            self.step += 1;
        }
        self.prev_pages = Some(pages);
        Assessment {
            last,
            throttle: self.throttle(),
            predicted,
            forced: forced && predicted > budget,
        }
    }
}

/// Slows the guest down: stuns every vCPU for a fraction of each [`THROTTLE_PERIOD`], on a
/// thread of its own, until dropped.
pub struct Throttle {
    permille: Arc<AtomicU32>,
    stop: Option<Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    /// Starts throttling `vm` by `fraction` (0 to 0.99).
    pub fn start(vm: Arc<Vm>, fraction: f64) -> std::io::Result<Throttle> {
        let permille = Arc::new(AtomicU32::new(to_permille(fraction)));
        let (stop, stopped) = bounded::<()>(0);
        let p = permille.clone();
        let thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                // Waits `d`; false when told to stop.
                let wait =
                    |d: Duration| matches!(stopped.recv_timeout(d), Err(RecvTimeoutError::Timeout));
                let mut warned = false;
                loop {
                    let f = f64::from(p.load(Ordering::Relaxed)) / 1000.0;
                    if f <= 0.0 {
                        if !wait(THROTTLE_PERIOD) {
                            return;
                        }
                        continue;
                    }
                    let on = THROTTLE_PERIOD.mul_f64(f);
                    let go_on = match vm.try_stun() {
                        Ok(Some(g)) => {
                            let go_on = wait(on);
                            if let Err(e) = g.unstun() {
                                log::error!("throttle: cannot unstun the guest: {e}");
                            }
                            go_on
                        }
                        // Stopped by someone else already: this period is theirs.
                        Ok(None) => wait(on),
                        Err(e) => {
                            if !std::mem::replace(&mut warned, true) {
                                log::warn!("throttle: cannot stun the guest: {e}");
                            }
                            wait(on)
                        }
                    };
                    if !go_on || !wait(THROTTLE_PERIOD.saturating_sub(on)) {
                        return;
                    }
                }
            })?;
        Ok(Throttle {
            permille,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Throttles by `fraction` (0 to 0.99) from now on.
    pub fn set(&self, fraction: f64) {
        self.permille
            .store(to_permille(fraction), Ordering::Relaxed);
    }
}

impl Drop for Throttle {
    /// Stops throttling: returns once the guest is no longer stunned by the throttle.
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn to_permille(fraction: f64) -> u32 {
    (fraction.clamp(0.0, 0.99) * 1000.0).round() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_small_epoch_on_a_fast_link_is_the_last_at_once() {
        let mut c = Converge::new(5 * MS);
        let a = c.assess(10, MS);
        assert!(a.last && !a.forced, "{a:?}");
        assert_eq!(a.throttle, 0.0);
    }

    #[test]
    fn epochs_that_do_not_shrink_throttle_the_guest_step_by_step() {
        let mut c = Converge::new(5 * MS);
        // 4,096 pages take 40 ms each time: the link does ~100k pages/s; never fits 2.5 ms.
        let mut seen = Vec::new();
        for _ in 0..4 {
            let a = c.assess(4096, 40 * MS);
            assert!(!a.last, "{a:?}");
            seen.push(a.throttle);
        }
        assert_eq!(seen, [0.0, 0.3, 0.5, 0.7]);
    }

    #[test]
    fn shrinking_epochs_keep_the_throttle_and_converge() {
        let mut c = Converge::new(5 * MS);
        // A fixed cost of 1 ms and 200 pages per ms: 2,001 pages take 11 ms.
        assert!(!c.assess(2001, 11 * MS).last);
        assert!(!c.assess(1000, Duration::from_micros(6000)).last);
        assert_eq!(c.throttle(), 0.0, "shrinking epochs are not throttled");
        // 100 pages: 1 ms + 0.5 ms fits half of 5 ms.
        let a = c.assess(100, Duration::from_micros(1500));
        assert!(a.last && !a.forced, "{a:?}");
        assert!(a.predicted <= Duration::from_micros(2500), "{a:?}");
    }

    #[test]
    fn a_guest_that_never_slows_enough_is_switched_anyway_at_the_last_step() {
        let mut c = Converge::new(5 * MS);
        let mut n = 0;
        let a = loop {
            n += 1;
            let a = c.assess(4096, 40 * MS);
            if a.last {
                break a;
            }
            assert!(n < 20, "never converged");
        };
        assert!(a.forced, "{a:?}");
        assert_eq!(a.throttle, 0.99);
        // Seven steps to reach 99 % (from the second epoch on), then FORCE_AFTER epochs at
        // 99 %, the last of which says the next is the last.
        assert_eq!(n as usize, THROTTLE_STEPS.len() + FORCE_AFTER as usize);
    }

    #[test]
    fn the_link_rate_is_learnt_from_the_epochs() {
        let mut c = Converge::new(100 * MS);
        c.assess(10, MS);
        c.assess(1000, 11 * MS);
        // (1000 pages) / (11 ms - 1 ms) = 100 pages per ms.
        assert_eq!(c.rate().map(|r| r.round()), Some(100_000.0));
    }

    #[test]
    fn fractions_are_bounded() {
        assert_eq!(to_permille(2.0), 990);
        assert_eq!(to_permille(-1.0), 0);
        assert_eq!(to_permille(0.5), 500);
    }
}
