//! The standby's copy of the frames the primary's guest received (input replication), kept
//! until the epoch that includes them commits.
//!
//! ```text
//!  primary: frame delivered during epoch e (after capture e-1) ─▶ Input{fence.epoch = e}
//!  standby: keep (e, card, frame)        commit C: drop every e ≤ C (C's state has them)
//!           take over from C: deliver again every kept frame (e > C), in arrival order
//! ```
//!
//! Bounded: at most [`MAX_INPUT_BYTES`] of frames are kept; past it the oldest go (a frame
//! not delivered again costs its sender a retransmission, nothing more).

use std::collections::VecDeque;

/// Most bytes of frames kept.
pub const MAX_INPUT_BYTES: usize = 8 << 20;

/// Frames received by the primary's guest that no committed epoch includes yet.
#[derive(Debug, Default)]
pub struct InputLog {
    frames: VecDeque<(u64, u32, Vec<u8>)>,
    bytes: usize,
    /// Frames dropped to stay within the bound.
    pub dropped: u64,
}

impl InputLog {
    /// Keeps a frame of epoch `epoch` for card `card`.
    pub fn keep(&mut self, epoch: u64, card: u32, frame: Vec<u8>) {
        self.bytes += frame.len();
        self.frames.push_back((epoch, card, frame));
        while self.bytes > MAX_INPUT_BYTES {
            let Some((_, _, f)) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= f.len();
            self.dropped += 1;
        }
    }

    /// Epoch `epoch` committed: its frames and older ones are in the committed state.
    pub fn committed(&mut self, epoch: u64) {
        self.frames.retain(|(e, _, _)| *e > epoch);
        self.bytes = self.frames.iter().map(|f| f.2.len()).sum();
    }

    /// The frames of epochs after `epoch`, in arrival order: (card, frame). Empties the log.
    pub fn take_after(&mut self, epoch: u64) -> Vec<(u32, Vec<u8>)> {
        self.bytes = 0;
        std::mem::take(&mut self.frames)
            .into_iter()
            .filter(|(e, _, _)| *e > epoch)
            .map(|(_, c, f)| (c, f))
            .collect()
    }

    /// Frames kept.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_after_the_committed_epoch_are_delivered_again_in_order() {
        let mut log = InputLog::default();
        log.keep(4, 0, vec![4; 20]);
        log.keep(5, 0, vec![5; 20]);
        log.keep(5, 1, vec![6; 20]);
        log.keep(6, 0, vec![7; 20]);
        log.committed(4);
        assert_eq!(log.len(), 3);
        assert_eq!(
            log.take_after(5),
            vec![(0, vec![7; 20])],
            "epoch 5 committed on the way: only 6 is new to the copy"
        );
        assert!(log.is_empty());
    }

    #[test]
    fn the_log_stays_within_its_bound_dropping_the_oldest() {
        let mut log = InputLog::default();
        for i in 0..200u64 {
            log.keep(i, 0, vec![i as u8; 65536]);
        }
        assert!(log.bytes <= MAX_INPUT_BYTES);
        assert_eq!(log.dropped, 200 - (MAX_INPUT_BYTES / 65536) as u64);
        let after = log.take_after(0);
        assert_eq!(after.last().unwrap().1[0], 199);
    }
}
