//! Frame headers.
//!
//! ```text
//!  frame header (12 bytes, little endian)
//!  ┌───────────┬──────┬───────┬──────────┬────────────┐
//!  │ magic     │ type │ flags │ reserved │ length     │  then `length` payload bytes
//!  │ "TDM\x01" │ u8   │ u8    │ u16 = 0  │ u32        │
//!  └───────────┴──────┴───────┴──────────┴────────────┘
//! ```
//!
//! After the handshake every payload is sealed (AES-256-GCM, the header as associated
//! data), so `length` counts the ciphertext and its 16-byte tag.

use serde::{Deserialize, Serialize};

/// Magic at the start of every frame (the last byte is the framing version).
pub const MAGIC: [u8; 4] = *b"TDM\x01";
/// Size of a frame header.
pub const HEADER_LEN: usize = 12;

/// Frame types and the most payload each may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum FrameType {
    /// Handshake messages.
    Handshake = 1,
    /// Control messages (epoch begin/end, ack, nack, state).
    Control = 2,
    /// A batch of guest page ranges.
    Pages = 3,
    /// Liveness when there is nothing else to send.
    Heartbeat = 4,
    /// The sender aborts the stream.
    Cancel = 5,
    /// The stream ends cleanly.
    EndOfStream = 6,
}

impl FrameType {
    /// The largest payload this type may declare.
    pub const fn max_len(self) -> u32 {
        match self {
            FrameType::Handshake => 4 << 10,
            FrameType::Control => 16 << 20,
            FrameType::Pages => 64 << 20,
            FrameType::Heartbeat | FrameType::Cancel | FrameType::EndOfStream => 256,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => FrameType::Handshake,
            2 => FrameType::Control,
            3 => FrameType::Pages,
            4 => FrameType::Heartbeat,
            5 => FrameType::Cancel,
            6 => FrameType::EndOfStream,
            _ => return None,
        })
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The frame's type.
    pub kind: FrameType,
    /// Type-specific flags.
    pub flags: u8,
    /// Payload length (checked against the type's maximum).
    pub len: u32,
}

/// A frame header that cannot be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than a header.
    #[error("truncated frame header: {0} of {HEADER_LEN} bytes")]
    Truncated(usize),
    /// Not a Tandem frame, or a framing version this build does not speak.
    #[error("bad frame magic {0:02x?}: the peer is not Tandem, or speaks another framing version")]
    BadMagic([u8; 4]),
    /// An unknown frame type.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// Reserved bits set.
    #[error("frame header reserved field is {0:#x}, must be 0")]
    Reserved(u16),
    /// A length over the type's maximum.
    #[error("{kind:?} frame declares {len} bytes, more than its maximum {max}")]
    TooLong {
        /// The type.
        kind: FrameType,
        /// Declared length.
        len: u32,
        /// The maximum.
        max: u32,
    },
}

impl FrameHeader {
    /// A header for `len` payload bytes of `kind`, if `len` is within bounds.
    pub fn new(kind: FrameType, flags: u8, len: usize) -> Result<Self, FrameError> {
        let max = kind.max_len();
        match u32::try_from(len) {
            Ok(len) if len <= max => Ok(FrameHeader { kind, flags, len }),
            _ => Err(FrameError::TooLong {
                kind,
                len: u32::try_from(len).unwrap_or(u32::MAX),
                max,
            }),
        }
    }

    /// The 12 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.kind as u8;
        b[5] = self.flags;
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes and checks a header: magic, type, reserved bits, and length against the type's
    /// maximum, before anyone allocates for the payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let b: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(FrameError::Truncated(bytes.len()))?;
        let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let kind = FrameType::from_u8(b[4]).ok_or(FrameError::UnknownType(b[4]))?;
        let reserved = u16::from_le_bytes([b[6], b[7]]);
        if reserved != 0 {
            return Err(FrameError::Reserved(reserved));
        }
        let len = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if len > kind.max_len() {
            return Err(FrameError::TooLong {
                kind,
                len,
                max: kind.max_len(),
            });
        }
        Ok(FrameHeader {
            kind,
            flags: b[5],
            len,
        })
    }
}

/// Which primary: bumped by every standby that takes over. A message from an older
/// generation is stale and refused.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Generation(pub u64);

/// Which checkpoint of the current generation.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

/// The fencing token of a state-changing message: ordered by generation, then epoch.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Fence {
    /// The sender's generation.
    pub generation: Generation,
    /// The sender's epoch.
    pub epoch: Epoch,
}

impl Fence {
    /// Whether a message stamped `self` may be accepted by a receiver that has seen `latest`:
    /// never from an older generation, and within one generation only moving forward.
    pub fn admits_after(&self, latest: &Fence) -> bool {
        self.generation > latest.generation
            || (self.generation == latest.generation && self.epoch > latest.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        for kind in [
            FrameType::Handshake,
            FrameType::Control,
            FrameType::Pages,
            FrameType::EndOfStream,
        ] {
            let h = FrameHeader::new(kind, 7, 100).unwrap();
            assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn hostile_headers_are_refused_with_their_own_error() {
        let good = FrameHeader::new(FrameType::Pages, 0, 10).unwrap().encode();
        assert_eq!(
            FrameHeader::decode(&good[..5]),
            Err(FrameError::Truncated(5))
        );
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(FrameError::BadMagic(_))
        ));
        let mut b = good;
        b[4] = 99;
        assert_eq!(FrameHeader::decode(&b), Err(FrameError::UnknownType(99)));
        let mut b = good;
        b[6] = 1;
        assert_eq!(FrameHeader::decode(&b), Err(FrameError::Reserved(1)));
        let mut b = good;
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(FrameError::TooLong { .. })
        ));
        let mut b = FrameHeader::new(FrameType::Heartbeat, 0, 0)
            .unwrap()
            .encode();
        b[8..12].copy_from_slice(&257u32.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(FrameError::TooLong { max: 256, .. })
        ));
        assert!(FrameHeader::new(FrameType::Handshake, 0, 5000).is_err());
    }

    #[test]
    fn every_byte_string_decodes_or_errors_without_panicking() {
        // A cheap exhaustive sweep over the type and length bytes of otherwise valid headers.
        let base = FrameHeader::new(FrameType::Control, 0, 0).unwrap().encode();
        for t in 0..=255u8 {
            for l in [
                0u32,
                1,
                256,
                257,
                4096,
                4097,
                16 << 20,
                (16 << 20) + 1,
                u32::MAX,
            ] {
                let mut b = base;
                b[4] = t;
                b[8..12].copy_from_slice(&l.to_le_bytes());
                if let Ok(h) = FrameHeader::decode(&b) {
                    assert!(h.len <= h.kind.max_len());
                }
            }
        }
    }

    #[test]
    fn fences_refuse_stale_generations_and_old_epochs() {
        let f = |g, e| Fence {
            generation: Generation(g),
            epoch: Epoch(e),
        };
        assert!(f(1, 5).admits_after(&f(1, 4)));
        assert!(!f(1, 4).admits_after(&f(1, 4)));
        assert!(f(2, 0).admits_after(&f(1, 900)));
        assert!(!f(1, 901).admits_after(&f(2, 0)));
    }
}
