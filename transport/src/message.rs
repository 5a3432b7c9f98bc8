//! The one enum of control messages (serde + postcard).
//!
//! A message is one postcard value: the variant's tag as a varint, then its fields in order
//! (integers as varints, `[u8; 32]` as 32 raw bytes, strings and blobs as a varint length and
//! the bytes). The tag is the variant's position in [`Message`], so the order of the enum is
//! the wire format; the table below is the contract, and `wire_tags_are_as_documented` holds
//! the enum to it. A variant is never removed from the middle: it is retired in place.
//!
//! ```text
//!  ┌──────────┬───────────────────────────────┐
//!  │ tag (var)│ fields (postcard, in order)   │
//!  └──────────┴───────────────────────────────┘
//!   tag  message        fields
//!    0   Hello          version u16, nonce [32], plaintext bool
//!    1   HelloReply     version u16, nonce [32], proof [32]
//!    2   Auth           proof [32]
//!    3   FullSync       fence, mem_bytes u64, vcpus u32
//!    4   EpochBegin     fence, pages u64
//!    5   (retired)      was VcpuState, never sent; decode refuses it
//!    6   DeviceState    fence, name str (1..=64 B), version u32, data bytes (<= MAX_STATE)
//!    7   EpochEnd       fence, ranges u64, digest [32]
//!    8   Ack            fence
//!    9   Nack           fence, code (varint: 0 Malformed, 1 Stale, 2 OutOfOrder, 3 Internal),
//!                       message str (<= MAX_TEXT)
//!   10   Heartbeat      fence
//!   11   Goodbye        -
//!   12   Intent         intent (varint: 0 Protect, 1 Join)
//!   13   PreCopy        fence, round u32, pages u64
//!   14   PreCopyEnd     fence, round u32, ranges u64, digest [32]
//!   15   Input          fence, card u32, frame bytes (14..=MAX_INPUT_FRAME B)
//!   16   Switch         fence
//!   fence = generation u64, epoch u64
//! ```
//!
//! vCPU state travels as a `DeviceState` section named `vcpu/N`.

use serde::{Deserialize, Serialize};

use crate::frame::{Fence, FrameType};
use crate::{Error, Result};

/// Longest text in a message (reasons, nack messages, names).
pub const MAX_TEXT: usize = 4096;
/// Largest state blob in a message.
pub const MAX_STATE: usize = 8 << 20;
/// Largest frame an `Input` message carries (a virtio-net frame, ethernet header included).
pub const MAX_INPUT_FRAME: usize = 65536;

/// Why a receiver refused something.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NackCode {
    /// It did not decode or broke a rule.
    Malformed,
    /// Its generation is older than the receiver's.
    Stale,
    /// It came out of order (epoch gap, step before its predecessor).
    OutOfOrder,
    /// The receiver failed to apply it.
    Internal,
}

/// Every message of the replication protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Client → server: the first handshake message.
    Hello {
        /// Protocol version the client speaks.
        version: u16,
        /// Fresh client nonce.
        nonce: [u8; 32],
        /// The client runs without authentication and encryption.
        plaintext: bool,
    },
    /// Server → client: version accepted, server nonce, and the server's proof of the key.
    HelloReply {
        /// The version both will speak.
        version: u16,
        /// Fresh server nonce.
        nonce: [u8; 32],
        /// HMAC proving the server holds the key.
        proof: [u8; 32],
    },
    /// Client → server: the client's proof of the key.
    Auth {
        /// HMAC proving the client holds the key.
        proof: [u8; 32],
    },
    /// A full copy of the VM follows.
    FullSync {
        /// Sender's generation and epoch.
        fence: Fence,
        /// Guest memory size.
        mem_bytes: u64,
        /// vCPU count.
        vcpus: u32,
    },
    /// An epoch's dirty pages and state follow.
    EpochBegin {
        /// Sender's generation and the epoch's number.
        fence: Fence,
        /// Dirty pages in the epoch.
        pages: u64,
    },
    /// Tag 5, retired: it was `VcpuState`, which no build sent (vCPU state is a
    /// `DeviceState` named `vcpu/N`). It holds the place so later tags keep their numbers;
    /// [`Message::decode`] refuses it and nothing sends it.
    Retired,
    /// One group's or module's saved state.
    DeviceState {
        /// Sender's generation and epoch.
        fence: Fence,
        /// Section name.
        name: String,
        /// Section version.
        version: u32,
        /// Saved state.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The epoch is complete; commit it.
    EpochEnd {
        /// Sender's generation and epoch.
        fence: Fence,
        /// Page ranges sent in the epoch.
        ranges: u64,
        /// Digest of the epoch's decoded pages (`checkpoint::digest`), for the receiver to check.
        digest: [u8; 32],
    },
    /// The receiver committed up to this epoch.
    Ack {
        /// Receiver's view.
        fence: Fence,
    },
    /// The receiver refused something.
    Nack {
        /// What it refused.
        fence: Fence,
        /// Why, as a code.
        code: NackCode,
        /// Why, for people.
        message: String,
    },
    /// Liveness when there is nothing else to send.
    Heartbeat {
        /// Sender's generation and epoch.
        fence: Fence,
    },
    /// The sender leaves cleanly.
    Goodbye,
    /// Client → server, first after the handshake: what the client comes for. A server answers
    /// a purpose it does not serve with a `Nack` and closes.
    Intent {
        /// What the client wants.
        intent: Intent,
    },
    /// One pre-copy round of a full sync begins: `pages` pages follow (read while the guest
    /// runs; later rounds resend what it dirtied meanwhile).
    PreCopy {
        /// Sender's generation and the epoch the sync completes with.
        fence: Fence,
        /// Round number (0 = every page).
        round: u32,
        /// Pages in the round.
        pages: u64,
    },
    /// The pre-copy round is complete. The standby sends it back once it has verified the
    /// round (or `Nack`s it): the primary captures the completing epoch only after the last
    /// round's answer.
    PreCopyEnd {
        /// As in its `PreCopy`.
        fence: Fence,
        /// As in its `PreCopy`.
        round: u32,
        /// Page ranges sent in the round.
        ranges: u64,
        /// Digest of the round's decoded pages (as in `EpochEnd`).
        digest: [u8; 32],
    },
    /// A frame the guest's network card `card` received, sent as it arrives (input
    /// replication): `fence.epoch` is the epoch whose capture will include its effects. A
    /// standby that takes over from committed epoch C delivers again the frames of epochs
    /// after C, which its copy of the guest never saw (see `ft::inputs`).
    Input {
        /// Sender's generation, and the epoch the frame belongs to.
        fence: Fence,
        /// The card's device window.
        card: u32,
        /// The ethernet frame.
        #[serde(with = "serde_bytes")]
        frame: Vec<u8>,
    },
    /// Primary → standby, the switch of a planned migration: the primary, stopped since
    /// epoch `fence.epoch` (which the standby committed), hands the VM over. The standby takes
    /// over as generation `fence.generation + 1` (claimed at its arbiter, as in a failover),
    /// answers `Ack` with that generation and the epoch before it runs the guest, and the
    /// sender ends. A standby that cannot answers `Nack` and the VM stays where it was.
    Switch {
        /// The primary's generation and its last epoch.
        fence: Fence,
    },
}

/// What a client of a replication listener comes for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// A primary asks this standby to protect it.
    Protect,
    /// A standby offers to protect this (unprotected) primary: it wants a full sync.
    Join,
}

impl Message {
    /// The frame type this message travels in.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Message::Hello { .. } | Message::HelloReply { .. } | Message::Auth { .. } => {
                FrameType::Handshake
            }
            Message::Heartbeat { .. } => FrameType::Heartbeat,
            _ => FrameType::Control,
        }
    }

    /// The fence of a state-changing message.
    pub fn fence(&self) -> Option<Fence> {
        match self {
            Message::FullSync { fence, .. }
            | Message::EpochBegin { fence, .. }
            | Message::DeviceState { fence, .. }
            | Message::EpochEnd { fence, .. }
            | Message::PreCopy { fence, .. }
            | Message::PreCopyEnd { fence, .. }
            | Message::Input { fence, .. }
            | Message::Switch { fence }
            | Message::Ack { fence }
            | Message::Nack { fence, .. }
            | Message::Heartbeat { fence } => Some(*fence),
            _ => None,
        }
    }

    /// Encodes with postcard.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("messages always encode")
    }

    /// Decodes and checks: the whole input must be one message, and texts and blobs stay
    /// within their limits.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (m, rest): (Message, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|e| Error::Message(e.to_string()))?;
        if !rest.is_empty() {
            return Err(Error::Message(format!(
                "{} stray bytes after the message",
                rest.len()
            )));
        }
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<()> {
        let text = |what: &str, s: &str| {
            if s.len() > MAX_TEXT {
                Err(Error::Message(format!(
                    "{what} of {} bytes, limit {MAX_TEXT}",
                    s.len()
                )))
            } else {
                Ok(())
            }
        };
        let blob = |d: &[u8]| {
            if d.len() > MAX_STATE {
                Err(Error::Message(format!(
                    "state of {} bytes, limit {MAX_STATE}",
                    d.len()
                )))
            } else {
                Ok(())
            }
        };
        match self {
            Message::Retired => Err(Error::Message(
                "message tag 5 is retired (a peer of another protocol?)".into(),
            )),
            Message::DeviceState { name, data, .. } => {
                if name.is_empty() || name.len() > 64 {
                    return Err(Error::Message(format!(
                        "state name of {} bytes",
                        name.len()
                    )));
                }
                blob(data)
            }
            Message::Nack { message, .. } => text("nack message", message),
            Message::Input { frame, .. } => {
                if frame.len() < 14 || frame.len() > MAX_INPUT_FRAME {
                    return Err(Error::Message(format!(
                        "an input frame of {} bytes (14..={MAX_INPUT_FRAME})",
                        frame.len()
                    )));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Epoch, Generation};
    use proptest::prelude::*;

    fn fence() -> impl Strategy<Value = Fence> {
        (any::<u64>(), any::<u64>()).prop_map(|(g, e)| Fence {
            generation: Generation(g),
            epoch: Epoch(e),
        })
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u16>(), any::<[u8; 32]>(), any::<bool>()).prop_map(
                |(version, nonce, plaintext)| Message::Hello {
                    version,
                    nonce,
                    plaintext
                }
            ),
            (any::<u16>(), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(
                |(version, nonce, proof)| Message::HelloReply {
                    version,
                    nonce,
                    proof
                }
            ),
            any::<[u8; 32]>().prop_map(|proof| Message::Auth { proof }),
            (fence(), any::<u64>(), any::<u32>()).prop_map(|(fence, mem_bytes, vcpus)| {
                Message::FullSync {
                    fence,
                    mem_bytes,
                    vcpus,
                }
            }),
            (fence(), any::<u64>()).prop_map(|(fence, pages)| Message::EpochBegin { fence, pages }),
            (
                fence(),
                "[a-z/]{1,64}",
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(fence, name, version, data)| Message::DeviceState {
                    fence,
                    name,
                    version,
                    data
                }),
            (fence(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(fence, ranges, digest)| {
                Message::EpochEnd {
                    fence,
                    ranges,
                    digest,
                }
            }),
            fence().prop_map(|fence| Message::Ack { fence }),
            (fence(), ".{0,100}").prop_map(|(fence, message)| Message::Nack {
                fence,
                code: NackCode::Stale,
                message
            }),
            fence().prop_map(|fence| Message::Heartbeat { fence }),
            Just(Message::Goodbye),
            Just(Message::Intent {
                intent: Intent::Join
            }),
            (fence(), any::<u32>(), any::<u64>()).prop_map(|(fence, round, pages)| {
                Message::PreCopy {
                    fence,
                    round,
                    pages,
                }
            }),
            (fence(), any::<u32>(), any::<u64>(), any::<[u8; 32]>()).prop_map(
                |(fence, round, ranges, digest)| Message::PreCopyEnd {
                    fence,
                    round,
                    ranges,
                    digest,
                }
            ),
            (
                fence(),
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 14..300)
            )
                .prop_map(|(fence, card, frame)| Message::Input { fence, card, frame }),
            fence().prop_map(|fence| Message::Switch { fence }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(m in message()) {
            prop_assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }

        #[test]
        fn arbitrary_bytes_decode_or_error(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(&b);
        }
    }

    #[test]
    fn trailing_bytes_and_huge_texts_are_refused() {
        let mut b = Message::Goodbye.encode();
        b.push(0);
        assert!(Message::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("stray"));
        let big = Message::Nack {
            fence: Fence::default(),
            code: NackCode::Internal,
            message: "x".repeat(MAX_TEXT + 1),
        };
        assert!(Message::decode(&big.encode())
            .unwrap_err()
            .to_string()
            .contains("limit"));
        // Input frames: an ethernet header at least, a virtio-net frame at most.
        for len in [0, 13, MAX_INPUT_FRAME + 1] {
            let m = Message::Input {
                fence: Fence::default(),
                card: 0,
                frame: vec![0; len],
            };
            assert!(Message::decode(&m.encode()).is_err(), "{len}");
        }
        // A length prefix that promises more than the input holds.
        let lie = [6u8, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(Message::decode(&lie).is_err());
    }

    #[test]
    fn wire_tags_are_as_documented() {
        let f = Fence::default();
        let tagged = [
            (
                0,
                Message::Hello {
                    version: 1,
                    nonce: [0; 32],
                    plaintext: false,
                },
            ),
            (
                1,
                Message::HelloReply {
                    version: 1,
                    nonce: [0; 32],
                    proof: [0; 32],
                },
            ),
            (2, Message::Auth { proof: [0; 32] }),
            (
                3,
                Message::FullSync {
                    fence: f,
                    mem_bytes: 0,
                    vcpus: 1,
                },
            ),
            (4, Message::EpochBegin { fence: f, pages: 0 }),
            (5, Message::Retired),
            (
                6,
                Message::DeviceState {
                    fence: f,
                    name: "vcpu/0".into(),
                    version: 1,
                    data: vec![],
                },
            ),
            (
                7,
                Message::EpochEnd {
                    fence: f,
                    ranges: 0,
                    digest: [0; 32],
                },
            ),
            (8, Message::Ack { fence: f }),
            (
                9,
                Message::Nack {
                    fence: f,
                    code: NackCode::Malformed,
                    message: String::new(),
                },
            ),
            (10, Message::Heartbeat { fence: f }),
            (11, Message::Goodbye),
            (
                12,
                Message::Intent {
                    intent: Intent::Protect,
                },
            ),
            (
                13,
                Message::PreCopy {
                    fence: f,
                    round: 0,
                    pages: 0,
                },
            ),
            (
                14,
                Message::PreCopyEnd {
                    fence: f,
                    round: 0,
                    ranges: 0,
                    digest: [0; 32],
                },
            ),
            (
                15,
                Message::Input {
                    fence: f,
                    card: 0,
                    frame: vec![0; 14],
                },
            ),
            (16, Message::Switch { fence: f }),
        ];
        for (tag, m) in tagged {
            assert_eq!(m.encode()[0], tag, "{m:?}");
        }
        // The retired tag is refused, alone or with the old VcpuState's fields after it.
        let e = Message::decode(&[5]).unwrap_err().to_string();
        assert!(e.contains("retired"), "{e}");
        assert!(Message::decode(&[5, 1, 2, 0, 3, 9, 9, 9]).is_err());
    }
}
