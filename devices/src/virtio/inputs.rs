//! Input replication for a network card: every frame delivered to the guest is copied out as
//! it is delivered, tagged with the epoch whose capture will include its effects, so that a
//! standby can deliver again the frames its copy of the guest never saw.
//!
//! ```text
//!  TAP ─▶ Net::rx_one ─▶ guest RX buffer
//!                   └──▶ InputTap::delivered ─▶ (epoch e, card, frame) ─▶ sender (the link)
//!  epoch E captured (guest stunned, RX stopped): set_epoch(E + 1)
//!  standby, after taking over from committed epoch C: the frames of epochs > C ─▶ Net::inject
//! ```
//!
//! Why: a request that reached the primary after the last committed epoch is gone with it; the
//! resumed copy of the guest never saw it, and its sender only sends it again when its own
//! retransmission timer fires (≥ 200 ms for Linux TCP). Delivering it again at once turns
//! that wait into the failover time. A frame delivered twice is harmless (networks duplicate
//! frames; TCP and UDP applications cope); one that misses the copy (the primary died before
//! it went out) costs the sender its retransmission, as without this.
//!
//! The copy never blocks the device: when the sender is full or gone the frame is counted as
//! missed, not waited for.

use crossbeam_channel::{Sender, TrySendError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One delivered frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputFrame {
    /// The epoch whose capture includes its effects.
    pub epoch: u64,
    /// The card's device window.
    pub card: u32,
    /// The ethernet frame.
    pub frame: Vec<u8>,
}

/// The input copy of one card (shared by its device and the replication).
pub struct InputTap {
    card: u32,
    on: AtomicBool,
    epoch: AtomicU64,
    out: Mutex<Option<Sender<InputFrame>>>,
    copied: AtomicU64,
    missed: AtomicU64,
}

impl InputTap {
    /// A tap for card `card`, off until [`InputTap::start`].
    pub fn new(card: u32) -> Arc<Self> {
        Arc::new(InputTap {
            card,
            on: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            out: Mutex::new(None),
            copied: AtomicU64::new(0),
            missed: AtomicU64::new(0),
        })
    }

    /// Copies every delivered frame to `out` from now on.
    pub fn start(&self, out: Sender<InputFrame>) {
        *self.out.lock().unwrap_or_else(|p| p.into_inner()) = Some(out);
        self.on.store(true, Ordering::Release);
    }

    /// Stops copying.
    pub fn stop(&self) {
        self.on.store(false, Ordering::Release);
        *self.out.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Frames delivered from now on belong to `epoch` (set while the guest is stunned).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    /// A frame was delivered to the guest.
    pub fn delivered(&self, frame: &[u8]) {
        if !self.on.load(Ordering::Acquire) {
            return;
        }
        let out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = out.as_ref() else { return };
        let f = InputFrame {
            epoch: self.epoch.load(Ordering::Acquire),
            card: self.card,
            frame: frame.to_vec(),
        };
        match tx.try_send(f) {
            Ok(()) => {
                self.copied.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.missed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// (frames copied, frames missed because the sender was full or gone).
    pub fn stats(&self) -> (u64, u64) {
        (
            self.copied.load(Ordering::Relaxed),
            self.missed.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_copied_with_their_epoch_only_while_started_and_never_block() {
        let tap = InputTap::new(3);
        tap.delivered(&[1; 20]);
        let (tx, rx) = crossbeam_channel::bounded(2);
        tap.start(tx);
        tap.set_epoch(7);
        tap.delivered(&[2; 20]);
        tap.set_epoch(8);
        tap.delivered(&[3; 20]);
        tap.delivered(&[4; 20]); // full: missed, not waited for
        let got: Vec<InputFrame> = rx.try_iter().collect();
        assert_eq!(
            got,
            vec![
                InputFrame {
                    epoch: 7,
                    card: 3,
                    frame: vec![2; 20]
                },
                InputFrame {
                    epoch: 8,
                    card: 3,
                    frame: vec![3; 20]
                },
            ]
        );
        assert_eq!(tap.stats(), (2, 1));
        tap.stop();
        tap.delivered(&[5; 20]);
        assert!(rx.try_recv().is_err());
    }
}
