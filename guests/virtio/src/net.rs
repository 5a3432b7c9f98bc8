//! smoltcp over virtio-net (feature `smoltcp`): [`NetDev`] is a polled `smoltcp::phy::Device`.
//!
//! ```text
//!  RX: QUEUE buffers of RX_BUF bytes stay posted; a used one is copied into `frame` (header
//!      stripped, length checked) and posted again at once, so smoltcp never holds queue memory
//!  TX: smoltcp fills `tx`, which is sent synchronously (a full queue drops the frame)
//! ```

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::Error as VirtioError;

use crate::IdentityHal;

/// Receive/transmit queue size.
pub const QUEUE: usize = 32;
/// Receive buffer: virtio-net header (≤ 12 bytes) + an Ethernet frame of MTU 1500.
pub const RX_BUF: usize = 2048;
/// Largest Ethernet frame we send or accept (14-byte header + 1500).
pub const MTU: usize = 1514;

pub type Raw = VirtIONetRaw<IdentityHal, MmioTransport<'static>, QUEUE>;

/// The virtio-net card as a smoltcp device. Received frames are copied out of the virtqueue
/// buffer (which is posted again at once) into `frame`.
pub struct NetDev {
    raw: Raw,
    bufs: Vec<Vec<u8>>,
    /// Descriptor token → index in `bufs` of the buffer posted with it.
    posted: [Option<usize>; QUEUE],
    frame: Vec<u8>,
    tx: Vec<u8>,
    /// Received frames dropped (too long, or shorter than their header).
    pub dropped: u64,
}

impl NetDev {
    pub fn new(mut raw: Raw) -> Result<Self, VirtioError> {
        let mut bufs: Vec<Vec<u8>> = (0..QUEUE).map(|_| vec![0u8; RX_BUF]).collect();
        let mut posted = [None; QUEUE];
        for (i, b) in bufs.iter_mut().enumerate() {
            // SAFETY: `b` is heap memory owned by `bufs`, which outlives the queue's use of it
            // (NetDev owns both; it is never touched until `receive_complete`).
            let token = unsafe { raw.receive_begin(b) }?;
            post(&mut posted, token, i);
        }
        Ok(NetDev {
            raw,
            bufs,
            posted,
            frame: Vec::with_capacity(RX_BUF),
            tx: vec![0u8; MTU],
            dropped: 0,
        })
    }

    /// Takes one received frame into `self.frame`; false when none is waiting. Bad frames are
    /// dropped (and counted).
    fn pop_frame(&mut self) -> bool {
        while let Some(token) = self.raw.poll_receive() {
            let Some(i) = self
                .posted
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                panic!("virtio-net: the device used descriptor {token}, which holds no buffer");
            };
            let buf = &mut self.bufs[i];
            // SAFETY: `buf` is the buffer posted with `token`.
            let got = unsafe { self.raw.receive_complete(token, buf) };
            let ok = match got {
                Ok((hdr, len)) => match hdr.checked_add(len) {
                    Some(end) if end <= buf.len() && len <= MTU => {
                        self.frame.clear();
                        self.frame.extend_from_slice(&buf[hdr..end]);
                        true
                    }
                    _ => false,
                },
                Err(VirtioError::WrongToken) => {
                    panic!("virtio-net: the used ring is out of step (token {token})")
                }
                // Shorter than its header: popped, but nothing to deliver.
                Err(_) => false,
            };
            // SAFETY: as in `new`.
            let again = unsafe { self.raw.receive_begin(&mut self.bufs[i]) }
                .unwrap_or_else(|e| panic!("virtio-net: cannot repost a receive buffer: {e}"));
            post(&mut self.posted, again, i);
            if ok {
                return true;
            }
            self.dropped += 1;
        }
        false
    }
}

fn post(posted: &mut [Option<usize>; QUEUE], token: u16, i: usize) {
    match posted.get_mut(usize::from(token)) {
        Some(slot @ None) => *slot = Some(i),
        _ => panic!("virtio-net: the driver returned token {token} twice"),
    }
}

/// A received frame, lent to smoltcp.
pub struct Rx<'a>(&'a [u8]);
/// A frame to send, filled by smoltcp.
pub struct Tx<'a> {
    raw: &'a mut Raw,
    buf: &'a mut Vec<u8>,
}

impl smoltcp::phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl smoltcp::phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        let frame = &mut self.buf[..len];
        let r = f(frame);
        // A failed send drops the frame, as a lossy link would.
        let _ = self.raw.send(frame);
        r
    }
}

impl Device for NetDev {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        if !self.pop_frame() {
            return None;
        }
        let NetDev { raw, frame, tx, .. } = self;
        Some((Rx(frame), Tx { raw, buf: tx }))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Tx<'_>> {
        Some(Tx {
            raw: &mut self.raw,
            buf: &mut self.tx,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(1);
        caps
    }
}

/// The first virtio-net device of the boot-info page (or the `index`-th), initialised, as a
/// smoltcp device; with its MAC address.
pub fn open(
    env: &tandem_rt::Env,
    index: usize,
) -> Result<(NetDev, [u8; 6]), alloc::string::String> {
    use alloc::format;
    use virtio_drivers::transport::DeviceType;
    let dev = crate::find(env, tandem_rt::guest_abi::boot::VIRTIO_ID_NET, index)
        .map_err(|e| format!("network device {index}: {e}"))?;
    let transport = crate::transport(&dev, DeviceType::Network)
        .map_err(|e| format!("network device {index} at {:#x}: {e}", dev.base))?;
    let raw = Raw::new(transport).map_err(|e| format!("virtio-net init: {e}"))?;
    let mac = raw.mac_address();
    let nic = NetDev::new(raw).map_err(|e| format!("virtio-net buffers: {e}"))?;
    Ok((nic, mac))
}
