//! # transport — Tandem's replication link
//!
//! Carries a VM's memory and state from a primary to a standby. Built to be the safest part of
//! the system: every byte from the peer is hostile until proven otherwise.
//!
//! ```text
//!  client (primary)                                   server (standby)
//!    │ Hello{version, nonce_c}  ─────────────────────▶ │ accept own or previous version
//!    │ ◀──────────── HelloReply{version, nonce_s, proof_s}
//!    │   proof_s = HMAC(K_auth, "server" ‖ transcript)  │
//!    │ check proof_s (constant time)                    │
//!    │ Auth{proof_c = HMAC(K_auth, "client" ‖ transcript)} ─▶ check proof_c (constant time)
//!    │ ═══════ every later frame: AES-256-GCM, key per direction from ═══════
//!    │ ═══════ HKDF(PSK, nonce_c ‖ nonce_s), nonce = frame counter, AAD = header ══
//!    │ FullSync / EpochBegin / Pages / DeviceState (vcpu/N, groups) / EpochEnd ─▶
//!    │ ◀──────────────────────────────────────── Ack / Nack{code, message}
//!    │ Heartbeat ⇄  Cancel (abort) │ EndOfStream (clean end) │ Goodbye
//! ```
//!
//! * The pre-shared key is 32 random bytes from a key file; it never crosses the wire, and the
//!   transcript holds only HMACs keyed by a 256-bit secret, so there is nothing to guess
//!   offline. Fresh nonces on both sides make a recorded handshake useless; the frame counter
//!   in the AEAD nonce makes a replayed, dropped or reordered frame fail authentication.
//! * Every frame header's length is checked against its type's maximum before allocation;
//!   every decoded message and page range is checked before it touches anything
//!   ([`pages::decode_range`] checks alignment, bounds against the receiver's memory, codec,
//!   and the decompressed size before decompressing).
//! * Every state-changing message carries a [`Fence`] (generation, epoch).
#![forbid(unsafe_code)]

pub mod channel;
pub mod frame;
pub mod handshake;
pub mod message;
pub mod pages;

pub use bytes::Bytes;
pub use channel::{Channel, Received};
pub use frame::{Epoch, Fence, FrameError, FrameHeader, FrameType, Generation, HEADER_LEN, MAGIC};
pub use handshake::Psk;
pub use message::{Intent, Message};
pub use pages::{Codec, PageRange};

/// Protocol version this build speaks. 4: a range may be a `Patch` (the changed words against
/// the copy sent before; `pages`), which a version-3 peer cannot decode. 3: page digests hash each range with XXH3-128 (were
/// BLAKE3; `checkpoint::digest`). 2: frames sealed with AES-256-GCM (were ChaCha20-Poly1305),
/// page digests BLAKE3 (were SHA-256), a standby answers every pre-copy round's end.
pub const PROTOCOL_VERSION: u16 = 4;
/// Oldest protocol version this build accepts from a peer: older peers compute another page
/// digest or cannot decode a patch, so every epoch would be refused; the handshake says so
/// instead.
pub const OLDEST_ACCEPTED_VERSION: u16 = PROTOCOL_VERSION;

/// Everything that can go wrong on the link. Each rejection has its own variant.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A frame header was refused.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The peer speaks a protocol version this build does not.
    #[error("protocol version mismatch: the peer offered v{offered}, this build speaks v{ours} and accepts v{oldest} to v{ours}: run the same Tandem release on both hosts")]
    Version {
        /// What the peer offered.
        offered: u16,
        /// What this build speaks.
        ours: u16,
        /// The oldest version this build accepts.
        oldest: u16,
    },
    /// The peer does not know the key (or the handshake was replayed or tampered with).
    #[error("authentication failed: {0} (do both sides use the same --key-file?)")]
    Auth(&'static str),
    /// A sealed frame did not authenticate: altered, replayed, reordered or dropped.
    #[error(
        "frame {seq} failed authentication: altered, replayed, reordered or from another session"
    )]
    Seal {
        /// The frame counter it was expected to carry.
        seq: u64,
    },
    /// The handshake ended early or went out of order.
    #[error("handshake: {0}")]
    Handshake(String),
    /// A message did not decode.
    #[error("bad message: {0}")]
    Message(String),
    /// A page range was refused (the message says which rule it broke).
    #[error("bad page range: {0}")]
    Pages(String),
    /// One side wants plaintext and the other does not.
    #[error("one side runs --insecure-plaintext and the other does not")]
    PlaintextMismatch,
    /// The key file is unusable.
    #[error("key file {path}: {msg}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// The connection failed or closed in the middle of a frame.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
