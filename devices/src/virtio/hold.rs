//! Output commit for a network card: frames the guest transmits, held until the epoch that
//! produced them is acknowledged by the standby.
//!
//! ```text
//!  guest TX queue ─▶ Net::process_tx ─▶ HoldSink ─┬─ passing: ─────────────────▶ TAP
//!                     (stops taking               └─ holding: frames += frame
//!                      descriptors while               (≤ limit bytes)
//!                      !ready())
//!  epoch E captured (guest stunned): take() ─▶ frames of E travel with E's in-flight output
//!  E acknowledged:                   release(frames of E) ─────────────────────▶ TAP
//! ```
//!
//! The bound: while `limit` bytes are held the sink is not `ready`, so the device leaves the
//! guest's descriptors in its TX queue (the guest sees a full queue and retries, as on a slow
//! link); Tandem never drops a frame to make room. Received frames are never held.

use std::sync::{Arc, Mutex, MutexGuard};

use super::net::FrameSink;

/// Bytes a card may hold by default (a 50 ms epoch at ~1.3 Gbit/s).
pub const DEFAULT_HOLD_BYTES: usize = 8 << 20;

/// Frames taken from a hold, in the order the guest sent them.
pub type HeldFrames = Vec<Vec<u8>>;

struct Inner {
    holding: bool,
    frames: HeldFrames,
    bytes: usize,
    /// Where frames finally go (the TAP); `None` until the device is built.
    out: Option<Box<dyn FrameSink>>,
    released: u64,
    release_errors: u64,
}

/// The output-commit buffer of one card (shared by its device, which adds frames, and the
/// replication, which takes and releases them).
pub struct FrameHold {
    inner: Mutex<Inner>,
    limit: usize,
}

/// Counters of a hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldStats {
    /// Frames held now.
    pub held_frames: usize,
    /// Bytes held now.
    pub held_bytes: usize,
    /// Frames written to the back end through this hold (at once or released).
    pub released: u64,
    /// Frames the back end refused when written.
    pub release_errors: u64,
}

impl FrameHold {
    /// A hold that passes frames through until [`FrameHold::set_holding`] and holds at most
    /// `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(FrameHold {
            inner: Mutex::new(Inner {
                holding: false,
                frames: Vec::new(),
                bytes: 0,
                out: None,
                released: 0,
                release_errors: 0,
            }),
            limit: limit.max(super::net::MAX_FRAME_LEN),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets where frames go (the TAP), e.g. when the device is (re)built.
    pub fn set_output(&self, out: Box<dyn FrameSink>) {
        self.lock().out = Some(out);
    }

    /// Holds frames (on) or passes them straight through (off). Frames already held stay
    /// held: whoever holds output decides when they go.
    pub fn set_holding(&self, on: bool) {
        self.lock().holding = on;
    }

    /// Whether frames are held.
    pub fn holding(&self) -> bool {
        self.lock().holding
    }

    /// Takes every frame held so far (those of the epoch being captured).
    pub fn take(&self) -> HeldFrames {
        let mut g = self.lock();
        g.bytes = 0;
        std::mem::take(&mut g.frames)
    }

    /// Writes `frames` to the back end, in order. A frame the back end refuses is counted
    /// and logged (the link lost it, as a wire may); the rest still go.
    pub fn release(&self, frames: HeldFrames) {
        let mut g = self.lock();
        let Inner {
            out,
            released,
            release_errors,
            ..
        } = &mut *g;
        let Some(out) = out.as_mut() else {
            *release_errors += frames.len() as u64;
            log::warn!(
                "{} held frames released with no network back end: dropped",
                frames.len()
            );
            return;
        };
        for f in frames {
            match out.send(&f) {
                Ok(()) => *released += 1,
                Err(e) => {
                    *release_errors += 1;
                    log::warn!("virtio-net: a released frame of {} bytes: {e}", f.len());
                }
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> HoldStats {
        let g = self.lock();
        HoldStats {
            held_frames: g.frames.len(),
            held_bytes: g.bytes,
            released: g.released,
            release_errors: g.release_errors,
        }
    }

    /// The sink a device writes its transmitted frames to.
    pub fn sink(self: &Arc<Self>) -> Box<dyn FrameSink> {
        Box::new(HoldSink(self.clone()))
    }
}

/// A device's view of a [`FrameHold`].
struct HoldSink(Arc<FrameHold>);

impl FrameSink for HoldSink {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let mut g = self.0.lock();
        if g.holding {
            g.bytes += frame.len();
            g.frames.push(frame.to_vec());
            return Ok(());
        }
        let r = match g.out.as_mut() {
            Some(out) => out.send(frame),
            None => Err(std::io::Error::other("no network back end")),
        };
        if r.is_ok() {
            g.released += 1;
        }
        r
    }

    fn ready(&self) -> bool {
        let g = self.0.lock();
        !g.holding || g.bytes + super::net::MAX_FRAME_LEN <= self.0.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Wire(Arc<Mutex<Vec<Vec<u8>>>>);
    impl FrameSink for Wire {
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.0.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
    }

    #[test]
    fn held_frames_leave_only_when_released_in_order_and_the_bound_stops_the_device() {
        let wire = Wire::default();
        let hold = FrameHold::new(0);
        hold.set_output(Box::new(wire.clone()));
        let mut sink = hold.sink();
        sink.send(b"passes").unwrap();
        assert_eq!(
            wire.0.lock().unwrap().len(),
            1,
            "not holding: straight through"
        );
        hold.set_holding(true);
        sink.send(b"one").unwrap();
        sink.send(b"two").unwrap();
        assert_eq!(wire.0.lock().unwrap().len(), 1, "held frames do not leave");
        assert_eq!(hold.stats().held_frames, 2);
        let epoch = hold.take();
        sink.send(b"three").unwrap();
        assert_eq!(wire.0.lock().unwrap().len(), 1);
        hold.release(epoch);
        assert_eq!(
            *wire.0.lock().unwrap(),
            vec![b"passes".to_vec(), b"one".to_vec(), b"two".to_vec()]
        );
        assert_eq!(hold.take(), vec![b"three".to_vec()]);
        // The bound: at `limit` (never below one frame) the device must stop taking frames.
        assert!(sink.ready());
        sink.send(&vec![0u8; super::super::net::MAX_FRAME_LEN])
            .unwrap();
        assert!(!sink.ready(), "full: the device leaves the TX queue alone");
        hold.take();
        assert!(sink.ready());
        hold.set_holding(false);
        assert!(sink.ready());
    }
}
