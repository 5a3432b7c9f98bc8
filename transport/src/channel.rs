//! Frames over a byte stream, sealed with AES-256-GCM once the handshake is done.
//!
//! AES-256-GCM (`ring`'s, on AES-NI and carry-less multiply) rather than ChaCha20-Poly1305:
//! every page an epoch sends is sealed by the primary and opened by the standby, on the CPUs
//! the guest runs on. Measured on this class of host (2 MiB frames, one thread): `ring`
//! AES-256-GCM 8.5 GB/s, `ring` ChaCha20-Poly1305 2.0 GB/s, RustCrypto's ChaCha20-Poly1305
//! and AES-256-GCM 1.15 GB/s each; ChaCha20-Poly1305 took 40 % of a standby's CPU with
//! incompressible pages (`perf` of `cargo xtask run-pair`).
//!
//! The AEAD nonce of frame n is n (a counter per direction), and the frame header is the
//! associated data: a frame that is altered, replayed, reordered or dropped fails to open.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::frame::{FrameHeader, FrameType, HEADER_LEN};
use crate::message::{Message, MAX_TEXT};
use crate::pages::{decode_batch_shared, encode_batch_into, PageRange, PageRangeRef};
use crate::{Error, Result};

const TAG: usize = 16;

/// What arrived.
#[derive(Debug)]
pub enum Received {
    /// A control or handshake message.
    Message(Message),
    /// A batch of page ranges (checked structurally; each range is checked when decoded).
    Pages(Vec<PageRange>),
    /// The sender ended the stream cleanly.
    End,
    /// The sender aborted, saying why.
    Cancelled(String),
}

/// One side of a link.
///
/// Each side keeps one buffer per direction, reused frame after frame: a page batch is
/// encoded straight into the send buffer behind room for its header and sealed there, and a
/// frame is read into the receive buffer and opened there. A fresh buffer per frame would be
/// zeroed (or faulted in) first, and sealing a copy of the encoded batch would copy it once
/// more: `perf` of `cargo xtask run-pair` showed those two passes at a seventh of the sender's
/// and of the standby reader's time.
///
/// A page batch is not copied out of the frame it came in: the opened frame becomes a shared
/// [`Bytes`] and every range's payload is a slice of it ([`Received::Pages`]), so a receiver
/// that stages raw pages until its epoch commits stages the frame itself. The frame's buffer
/// comes back to the channel when the last of its ranges is dropped, and a later frame is
/// read into it (at most [`SPARE_FRAMES`] of at most [`SPARE_FRAME_BYTES`] are kept), so it is
/// not zeroed or faulted in again.
///
/// ```text
///   socket ──read──▶ frame buffer ──open (in place)──▶ Bytes ─┬─ range 0 payload ─┐ staged
///                        ▲                                    ├─ range 1 payload ─┤ until
///                        │ spare buffers (≤ SPARE_FRAMES)     └─ …                ┘ commit
///                        └──────────────── last slice dropped ◀───────────────────┘
/// ```
pub struct Channel<S> {
    stream: S,
    send_key: Option<LessSafeKey>,
    recv_key: Option<LessSafeKey>,
    send_seq: u64,
    recv_seq: u64,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
    spare: Arc<Spare>,
}

/// Most frame buffers a channel keeps for reuse once their ranges are dropped.
pub const SPARE_FRAMES: usize = 4;
/// Largest frame buffer kept for reuse (a sender's page frames are 8 MiB and a little more;
/// a larger one is freed, so the spare buffers hold at most 64 MiB).
pub const SPARE_FRAME_BYTES: usize = 16 << 20;

/// Frame buffers whose ranges have all been dropped, ready for the next frame.
#[derive(Default)]
struct Spare(Mutex<Vec<Vec<u8>>>);

impl Spare {
    fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().ok()?.pop()
    }

    fn give(&self, buf: Vec<u8>) {
        if buf.capacity() > SPARE_FRAME_BYTES {
            return;
        }
        if let Ok(mut v) = self.0.lock() {
            if v.len() < SPARE_FRAMES {
                v.push(buf);
            }
        }
    }
}

/// An opened page frame shared by the ranges decoded from it: `buf[..len]` is its payload
/// (the buffer keeps its full, initialized length so a later frame needs no zeroing).
struct Frame {
    buf: Vec<u8>,
    len: usize,
    spare: Weak<Spare>,
}

impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        if let Some(spare) = self.spare.upgrade() {
            spare.give(std::mem::take(&mut self.buf));
        }
    }
}

/// The nonce of frame `seq`: unique per key, as each direction's counter only grows.
fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aes_key(k: &[u8; 32]) -> LessSafeKey {
    // A 32-byte key is what AES-256 takes: `new` cannot refuse it.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).expect("AES-256 takes 32-byte keys"))
}

impl<S> std::fmt::Debug for Channel<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("sealed", &self.send_key.is_some())
            .field("send_seq", &self.send_seq)
            .field("recv_seq", &self.recv_seq)
            .finish_non_exhaustive()
    }
}

impl<S> Channel<S> {
    /// The same channel (keys and counters) over a wrapped stream, e.g. one that notes when
    /// bytes arrive.
    pub fn map_stream<T>(self, f: impl FnOnce(S) -> T) -> Channel<T> {
        Channel {
            stream: f(self.stream),
            send_key: self.send_key,
            recv_key: self.recv_key,
            send_seq: self.send_seq,
            recv_seq: self.recv_seq,
            send_buf: self.send_buf,
            recv_buf: self.recv_buf,
            spare: self.spare,
        }
    }
}

impl Channel<std::net::TcpStream> {
    /// Splits a TCP link into a sending and a receiving half (each on its own thread: one may
    /// block in `recv` while the other sends). Each half keeps its direction's key and counter.
    pub fn split(self) -> Result<(Channel<std::net::TcpStream>, Channel<std::net::TcpStream>)> {
        let twin = self.stream.try_clone()?;
        let tx = Channel {
            stream: self.stream,
            send_key: self.send_key,
            recv_key: None,
            send_seq: self.send_seq,
            recv_seq: 0,
            send_buf: self.send_buf,
            recv_buf: Vec::new(),
            spare: Arc::default(),
        };
        let rx = Channel {
            stream: twin,
            send_key: None,
            recv_key: self.recv_key,
            send_seq: 0,
            recv_seq: self.recv_seq,
            send_buf: Vec::new(),
            recv_buf: self.recv_buf,
            spare: self.spare,
        };
        Ok((tx, rx))
    }
}

impl<S: Read + Write> Channel<S> {
    /// An unsealed channel (handshake, or --insecure-plaintext).
    pub fn plain(stream: S) -> Self {
        Channel {
            stream,
            send_key: None,
            recv_key: None,
            send_seq: 0,
            recv_seq: 0,
            send_buf: Vec::new(),
            recv_buf: Vec::new(),
            spare: Arc::default(),
        }
    }

    /// From now on every frame is sealed.
    pub(crate) fn seal(&mut self, send: [u8; 32], recv: [u8; 32]) {
        self.send_key = Some(aes_key(&send));
        self.recv_key = Some(aes_key(&recv));
        self.send_seq = 0;
        self.recv_seq = 0;
    }

    /// Whether frames are sealed.
    pub fn is_sealed(&self) -> bool {
        self.send_key.is_some()
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Turns the frame at `buf[at..]` into a sealed one: `buf[at..at + HEADER_LEN]` is room
    /// for the header, the payload follows it to the end of `buf`. Writes the header, encrypts
    /// the payload in place and appends its tag (once sealed). A payload too large for a frame
    /// is refused before it takes a sequence number.
    fn seal_in(&mut self, kind: FrameType, buf: &mut Vec<u8>, at: usize) -> Result<()> {
        let body = at + HEADER_LEN;
        let payload_len = buf.len() - body;
        let sealed_len = payload_len + if self.send_key.is_some() { TAG } else { 0 };
        let header = FrameHeader::new(kind, 0, sealed_len)?.encode();
        buf[at..body].copy_from_slice(&header);
        if let Some(k) = &self.send_key {
            let seq = self.send_seq;
            self.send_seq += 1;
            let tag = k
                .seal_in_place_separate_tag(nonce(seq), Aad::from(&header), &mut buf[body..])
                .map_err(|_| Error::Seal { seq })?;
            buf.extend_from_slice(tag.as_ref());
        }
        Ok(())
    }

    /// Sends one frame whose payload `encode` appends to the (emptied) send buffer: the frame
    /// is sealed where it was encoded and goes out in one write.
    fn write_frame_with(
        &mut self,
        kind: FrameType,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<()> {
        let mut buf = std::mem::take(&mut self.send_buf);
        buf.clear();
        buf.resize(HEADER_LEN, 0);
        encode(&mut buf);
        let sent = self
            .seal_in(kind, &mut buf, 0)
            .and_then(|()| Ok(self.stream.write_all(&buf)?))
            .and_then(|()| Ok(self.stream.flush()?));
        self.send_buf = buf;
        sent
    }

    fn write_frame(&mut self, kind: FrameType, payload: &[u8]) -> Result<()> {
        self.write_frame_with(kind, |buf| buf.extend_from_slice(payload))
    }

    /// Reads and opens one frame; its payload is `self.recv_buf[..n]`.
    fn read_frame(&mut self) -> Result<(FrameHeader, usize)> {
        let mut hb = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut hb)?;
        let header = FrameHeader::decode(&hb)?;
        // `decode` bounds the length. The buffer keeps its largest size, so it is zeroed only
        // when it grows; one handed out with a page batch is replaced by a spare one.
        let len = header.len as usize;
        if self.recv_buf.is_empty() {
            if let Some(b) = self.spare.take() {
                self.recv_buf = b;
            }
        }
        if self.recv_buf.len() < len {
            self.recv_buf.resize(len, 0);
        }
        let body = &mut self.recv_buf[..len];
        self.stream.read_exact(body)?;
        let n = match &self.recv_key {
            Some(k) => {
                let seq = self.recv_seq;
                self.recv_seq += 1;
                k.open_in_place(nonce(seq), Aad::from(&hb), body)
                    .map_err(|_| Error::Seal { seq })?
                    .len()
            }
            None => len,
        };
        Ok((header, n))
    }

    /// Sends a message.
    pub fn send(&mut self, m: &Message) -> Result<()> {
        self.write_frame(m.frame_type(), &m.encode())
    }

    /// Sends several messages in one write: each is its own sealed frame (the receiver sees
    /// exactly what [`Channel::send`] of each in turn would give), with one system call and as
    /// few segments as the sizes allow.
    pub fn send_batch(&mut self, ms: &[Message]) -> Result<()> {
        if ms.is_empty() {
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.send_buf);
        buf.clear();
        let mut sealed = Ok(());
        for m in ms {
            let at = buf.len();
            buf.resize(at + HEADER_LEN, 0);
            buf.extend_from_slice(&m.encode());
            sealed = self.seal_in(m.frame_type(), &mut buf, at);
            if sealed.is_err() {
                break;
            }
        }
        let sent = sealed
            .and_then(|()| Ok(self.stream.write_all(&buf)?))
            .and_then(|()| Ok(self.stream.flush()?));
        self.send_buf = buf;
        sent
    }

    /// Sends a batch of page ranges.
    pub fn send_pages(&mut self, ranges: &[PageRange]) -> Result<()> {
        let refs: Vec<PageRangeRef<'_>> = ranges.iter().map(PageRange::wire).collect();
        self.send_page_refs(&refs)
    }

    /// Sends a batch of page ranges with borrowed payloads (the receiver gets the same
    /// [`Received::Pages`] as from [`Channel::send_pages`]), encoded straight into the frame
    /// that carries them.
    pub fn send_page_refs(&mut self, ranges: &[PageRangeRef<'_>]) -> Result<()> {
        self.write_frame_with(FrameType::Pages, |buf| encode_batch_into(ranges, buf))
    }

    /// Sends an opaque payload (at most the control-frame limit) in a sealed control frame, for
    /// protocols that use the handshake and sealing but not [`Message`] (the output sink).
    pub fn send_blob(&mut self, payload: &[u8]) -> Result<()> {
        self.write_frame(FrameType::Control, payload)
    }

    /// Receives a payload sent with [`Channel::send_blob`]. Any other frame type is an error
    /// (a cancel carries its reason).
    pub fn recv_blob(&mut self) -> Result<Vec<u8>> {
        let (header, n) = self.read_frame()?;
        let body = &self.recv_buf[..n];
        match header.kind {
            FrameType::Control => Ok(body.to_vec()),
            FrameType::Cancel => Err(Error::Message(format!(
                "the peer cancelled: {}",
                String::from_utf8_lossy(&body[..body.len().min(MAX_TEXT)])
            ))),
            other => Err(Error::Message(format!(
                "a {other:?} frame where an opaque payload was expected"
            ))),
        }
    }

    /// Ends the stream cleanly.
    pub fn end(&mut self) -> Result<()> {
        self.write_frame(FrameType::EndOfStream, &[])
    }

    /// Aborts the stream, saying why (at most 200 bytes are sent).
    pub fn cancel(&mut self, reason: &str) -> Result<()> {
        let r: String = reason.chars().take(200).collect();
        self.write_frame(FrameType::Cancel, r.as_bytes())
    }

    /// Receives the next frame. Handshake frames are accepted only before the link is sealed.
    pub fn recv(&mut self) -> Result<Received> {
        let (header, n) = self.read_frame()?;
        if header.kind != FrameType::Pages {
            return self.message_frame(header.kind, n);
        }
        // The opened frame is handed out whole: its ranges' payloads are slices of it.
        let frame = Bytes::from_owner(Frame {
            buf: std::mem::take(&mut self.recv_buf),
            len: n,
            spare: Arc::downgrade(&self.spare),
        });
        Ok(Received::Pages(decode_batch_shared(&frame)?))
    }

    /// A frame other than a page batch, whose payload is `self.recv_buf[..n]`.
    fn message_frame(&self, kind: FrameType, n: usize) -> Result<Received> {
        let body = &self.recv_buf[..n];
        match kind {
            FrameType::Handshake if self.recv_key.is_some() => Err(Error::Handshake(
                "a handshake message after the handshake".into(),
            )),
            FrameType::Handshake | FrameType::Control | FrameType::Heartbeat => {
                let m = Message::decode(body)?;
                if m.frame_type() != kind {
                    return Err(Error::Message(format!("{m:?} in a {kind:?} frame")));
                }
                Ok(Received::Message(m))
            }
            FrameType::Pages => Err(Error::Message(
                "a page batch where a message was expected".into(),
            )),
            FrameType::EndOfStream => {
                if !body.is_empty() {
                    return Err(Error::Message("end-of-stream frame with a payload".into()));
                }
                Ok(Received::End)
            }
            FrameType::Cancel => {
                let reason =
                    String::from_utf8_lossy(&body[..body.len().min(MAX_TEXT)]).into_owned();
                Ok(Received::Cancelled(reason))
            }
        }
    }
}
