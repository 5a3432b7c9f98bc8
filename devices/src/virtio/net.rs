//! virtio-net on a TAP interface, without offloads.
//!
//! ```text
//!  queue 0 (RX), device-writable:  ┌ virtio_net_hdr_v1 (12 bytes, zero, num_buffers = 1) ┬ frame ┐
//!  queue 1 (TX), device-readable:  ┌ virtio_net_hdr_v1 (12 bytes, ignored)               ┬ frame ┐
//!
//!  virtio_net_hdr_v1:  flags u8 | gso_type u8 | hdr_len u16 | gso_size u16 | csum_start u16
//!                      | csum_offset u16 | num_buffers u16                    (little endian)
//!  config space:       mac [u8; 6]
//! ```
//!
//! Features: VERSION_1 (so the header is always the 12-byte v1 one) and MAC; no checksum or
//! segmentation offloads, no mergeable buffers, so every frame is a plain ethernet frame of at
//! most [`MAX_FRAME_LEN`] bytes and the TAP needs no vnet header.
//!
//! TX: each chain's frame goes to the [`FrameSink`] (by default the TAP; an output-commit
//! layer may hold frames instead). RX: [`Net::poll`](VirtioDevice::poll) reads frames from
//! the [`FrameSource`] only while the guest has RX buffers, so a frame waits in the TAP rather
//! than in the device. A frame that does not fit the buffer it meets is dropped and counted,
//! never cut. Bad chains (a fault, a header short of 12 bytes, buffers in the wrong
//! direction) are returned with nothing written and counted.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use log::warn;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueT};

use super::chain::{self, Chain};
use super::persist::{DeviceState, NetState};
use super::tap::{Tap, MAX_NAME_LEN};
use super::{Error, GuestMem, Result, VirtioDevice, VIRTIO_F_VERSION_1};

/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of `virtio_net_hdr_v1`.
pub const VNET_HDR_LEN: usize = 12;
/// Longest frame (ethernet header included) the device moves either way.
pub const MAX_FRAME_LEN: usize = 65536;

/// Where transmitted frames go. The default ([`Tap`]) writes them at once; an output-commit
/// layer holds them until the epoch that produced them is safe, then writes them.
pub trait FrameSink: Send {
    /// One ethernet frame from the guest (the virtio-net header already stripped).
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// Whether it takes another frame now; while it does not, the device leaves the guest's
    /// frames in the TX queue (output commit's bound, see [`super::hold`]).
    fn ready(&self) -> bool {
        true
    }
}

/// Where received frames come from.
pub trait FrameSource: Send {
    /// Reads one frame into `buf`; `WouldBlock` when none is waiting. Returns the frame's
    /// length; a length of `buf.len()` may mean a longer frame was cut (see [`Tap::read_frame`]).
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// An fd readable when a frame waits.
    fn fd(&self) -> Option<RawFd> {
        None
    }
}

impl FrameSink for Arc<Tap> {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.write_frame(frame)
    }
}

impl FrameSource for Arc<Tap> {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read_frame(buf)
    }
    fn fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// The two ends of a net device's back end.
pub struct NetBackend {
    /// Transmitted frames.
    pub sink: Box<dyn FrameSink>,
    /// Received frames.
    pub source: Box<dyn FrameSource>,
    /// The TAP behind them, if any.
    pub tap: Option<Arc<Tap>>,
}

impl NetBackend {
    /// Both ends on one TAP.
    pub fn tap(tap: Tap) -> Self {
        let tap = Arc::new(tap);
        NetBackend {
            sink: Box::new(tap.clone()),
            source: Box::new(tap.clone()),
            tap: Some(tap),
        }
    }

    /// Opens the TAP `name` for both ends.
    pub fn open_tap(name: &str) -> Result<Self> {
        Ok(Self::tap(Tap::open(name)?))
    }
}

/// What a net device is given: `tap=NAME[,mac=MAC]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// TAP interface name.
    pub tap: String,
    /// The guest's MAC; by default a locally administered one derived from the TAP name.
    pub mac: Option<[u8; 6]>,
}

const NET_SYNTAX: &str = "tap=NAME[,mac=aa:bb:cc:dd:ee:ff]";

impl NetConfig {
    /// Parses `tap=NAME[,mac=MAC]`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: String| Error::Config {
            given: s.to_string(),
            why,
            expected: NET_SYNTAX,
        };
        let (mut tap, mut mac) = (None, None);
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("tap", n)) => {
                    if n.is_empty() || n.len() > MAX_NAME_LEN || n.contains(['/', ' ']) {
                        return Err(bad(format!("{n:?} is not an interface name (1 to {MAX_NAME_LEN} bytes, no '/' or spaces)")));
                    }
                    tap = Some(n.to_string());
                }
                Some(("mac", m)) => {
                    mac = Some(
                        parse_mac(m).ok_or_else(|| bad(format!("{m:?} is not a MAC address")))?,
                    )
                }
                _ => return Err(bad(format!("unknown option {opt:?}"))),
            }
        }
        let tap = tap.ok_or_else(|| bad("no tap=NAME".into()))?;
        if mac.is_some_and(|m: [u8; 6]| m[0] & 1 != 0) {
            return Err(bad("a multicast MAC cannot be a card's address".into()));
        }
        Ok(NetConfig { tap, mac })
    }

    /// The MAC the guest sees.
    pub fn effective_mac(&self) -> [u8; 6] {
        self.mac.unwrap_or_else(|| {
            // FNV-1a of the name; 02: locally administered, unicast.
            let h = self.tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            let b = h.to_le_bytes();
            [0x02, 0x54, b[0], b[1], b[2], b[3]]
        })
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Counters of a net device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames handed to the sink.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// TX chains dropped: a fault, a short header, writable buffers, a frame too long, or
    /// the sink failed.
    pub tx_dropped: u64,
    /// Times the device stopped taking TX frames because output commit held its bound.
    pub tx_deferred: u64,
    /// Frames put into RX buffers.
    pub rx_frames: u64,
    /// Their bytes (without the header).
    pub rx_bytes: u64,
    /// Frames dropped because the RX buffer they met was too small.
    pub rx_dropped_too_small: u64,
    /// Frames dropped because they were longer than [`MAX_FRAME_LEN`].
    pub rx_dropped_oversize: u64,
    /// RX chains returned unused: a fault or device-readable buffers.
    pub rx_bad_buffers: u64,
    /// Times the device, out of RX buffers, asked for notifications and found new buffers
    /// already there.
    pub rx_rechecks: u64,
}

/// A virtio-net device.
pub struct Net {
    config: NetConfig,
    mac: [u8; 6],
    backend: NetBackend,
    rx_buf: Vec<u8>,
    rx_pending: usize,
    /// Frames to deliver before the back end's (input replay after a failover).
    injected: std::collections::VecDeque<Vec<u8>>,
    /// Where delivered frames are copied (input replication), if anywhere.
    input_tap: Option<Arc<super::inputs::InputTap>>,
    tx_buf: Vec<u8>,
    stats: NetStats,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Net {
    /// Opens the configured TAP.
    pub fn open(config: NetConfig) -> Result<Self> {
        let backend = NetBackend::open_tap(&config.tap)?;
        Ok(Self::new(config, backend))
    }

    /// A device on the given back end.
    pub fn new(config: NetConfig, backend: NetBackend) -> Self {
        Net {
            mac: config.effective_mac(),
            config,
            backend,
            rx_buf: vec![0; MAX_FRAME_LEN + 1],
            rx_pending: 0,
            injected: std::collections::VecDeque::new(),
            input_tap: None,
            tx_buf: Vec::new(),
            stats: NetStats::default(),
        }
    }

    /// A device from its saved state, on `backend` or else on the saved TAP.
    pub fn from_state(state: &NetState, backend: Option<NetBackend>) -> Result<Self> {
        let config = NetConfig {
            tap: state.tap.clone(),
            mac: Some(state.mac),
        };
        Ok(match backend {
            Some(b) => Self::new(config, b),
            None => Self::open(config)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The guest's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Counters.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// The TAP, if the back end is one.
    pub fn tap(&self) -> Option<&Arc<Tap>> {
        self.backend.tap.as_ref()
    }

    /// Replaces where transmitted frames go (e.g. an output-commit buffer in front of the TAP).
    pub fn set_sink(&mut self, sink: Box<dyn FrameSink>) {
        self.backend.sink = sink;
    }

    /// Copies every frame delivered to the guest to `tap` (input replication).
    pub fn set_input_tap(&mut self, tap: Arc<super::inputs::InputTap>) {
        self.input_tap = Some(tap);
    }

    /// Queues frames to deliver to the guest before anything from the back end (a standby
    /// delivering again what its copy of the guest never saw); they go as RX buffers come.
    /// Frames longer than [`MAX_FRAME_LEN`] or shorter than an ethernet header are dropped.
    pub fn inject(&mut self, frames: impl IntoIterator<Item = Vec<u8>>) {
        for f in frames {
            if (14..=MAX_FRAME_LEN).contains(&f.len()) {
                self.injected.push_back(f);
            } else {
                self.stats.rx_dropped_oversize += 1;
            }
        }
    }

    fn tx_one(&mut self, mem: &GuestMem, c: &Chain) {
        let why = if let Some(f) = c.fault {
            Some(f.to_string())
        } else if !c.writable.is_empty() {
            Some("the chain has device-writable buffers".into())
        } else if c.readable_len() < VNET_HDR_LEN as u64 {
            Some(format!(
                "{} bytes is shorter than the {VNET_HDR_LEN}-byte header",
                c.readable_len()
            ))
        } else if c.readable_len() - VNET_HDR_LEN as u64 > MAX_FRAME_LEN as u64 {
            Some(format!(
                "a frame of {} bytes is longer than {MAX_FRAME_LEN}",
                c.readable_len() - VNET_HDR_LEN as u64
            ))
        } else {
            None
        };
        if let Some(why) = why {
            warn!("virtio-net: TX chain at head {} dropped: {why}", c.head);
            self.stats.tx_dropped += 1;
            return;
        }
        let len = (c.readable_len() - VNET_HDR_LEN as u64) as usize;
        self.tx_buf.resize(len, 0);
        if !chain::read_stream(mem, &c.readable, VNET_HDR_LEN as u64, &mut self.tx_buf) {
            self.stats.tx_dropped += 1;
            return;
        }
        match self.backend.sink.send(&self.tx_buf) {
            Ok(()) => {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += len as u64;
            }
            Err(e) => {
                warn!("virtio-net: TX frame of {len} bytes dropped: {e}");
                self.stats.tx_dropped += 1;
            }
        }
    }

    fn process_tx(&mut self, mem: &GuestMem, queue: &mut Queue) -> Result<bool> {
        let mut used = false;
        for _ in 0..queue.size() {
            if !self.backend.sink.ready() {
                self.stats.tx_deferred += 1;
                break;
            }
            let Some(dc) = chain::pop(queue, mem, TX_QUEUE)? else {
                break;
            };
            let c = chain::walk(dc, mem, TX_QUEUE)?;
            self.tx_one(mem, &c);
            chain::add_used(queue, mem, TX_QUEUE, c.head, 0)?;
            used = true;
        }
        Ok(used)
    }

    /// Puts the pending frame into one RX chain; returns the used length.
    fn rx_one(&mut self, mem: &GuestMem, c: &Chain) -> u32 {
        let frame = self.rx_pending;
        let need = (VNET_HDR_LEN + frame) as u64;
        let bad = if let Some(f) = c.fault {
            Some(f.to_string())
        } else if !c.readable.is_empty() {
            Some("the chain has device-readable buffers".to_string())
        } else {
            None
        };
        if let Some(why) = bad {
            warn!(
                "virtio-net: RX chain at head {} returned unused: {why}",
                c.head
            );
            self.stats.rx_bad_buffers += 1;
            return 0;
        }
        self.rx_pending = 0;
        if c.writable_len() < need {
            warn!(
                "virtio-net: RX frame of {frame} bytes dropped: the buffer at head {} holds {} bytes with the header",
                c.head,
                c.writable_len()
            );
            self.stats.rx_dropped_too_small += 1;
            return 0;
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
        if !chain::write_stream(mem, &c.writable, 0, &hdr)
            || !chain::write_stream(mem, &c.writable, VNET_HDR_LEN as u64, &self.rx_buf[..frame])
        {
            self.stats.rx_bad_buffers += 1;
            return 0;
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += frame as u64;
        if let Some(t) = &self.input_tap {
            t.delivered(&self.rx_buf[..frame]);
        }
        need as u32
    }

    /// Moves waiting frames into the guest's RX buffers, then sets RX notification
    /// suppression (VRING_USED_F_NO_NOTIFY): while the guest has RX buffers left the device
    /// needs no QueueNotify for the ones it adds, since [`VirtioDevice::poll`] reads the
    /// available ring whenever a frame comes. Only a device out of buffers, with frames
    /// possibly waiting in the back end, must hear of new ones: it asks for notifications
    /// then, and looks once more so that buffers added just before are not missed. Each
    /// notification is a VM exit, so a guest that re-posts a buffer per frame saves one exit
    /// per frame.
    fn process_rx(&mut self, mem: &GuestMem, queue: &mut Queue) -> Result<bool> {
        if !queue.ready() {
            return Ok(false);
        }
        let err = |source| Error::Queue {
            queue: RX_QUEUE,
            source,
        };
        let mut used = false;
        loop {
            let (moved, starved) = self.rx_frames(mem, queue)?;
            used |= moved;
            if !starved {
                queue.disable_notification(mem).map_err(err)?;
                return Ok(used);
            }
            if !queue.enable_notification(mem).map_err(err)? {
                return Ok(used);
            }
            // Buffers came while notifications were off: frames may wait for them.
            self.stats.rx_rechecks += 1;
        }
    }

    /// One pass of [`Self::process_rx`]: (buffers used, stopped for want of buffers).
    fn rx_frames(&mut self, mem: &GuestMem, queue: &mut Queue) -> Result<(bool, bool)> {
        let mut used = false;
        for _ in 0..usize::from(queue.size()) * 2 {
            if self.rx_pending == 0 {
                if !chain::has_available(queue, mem, RX_QUEUE)? {
                    return Ok((used, true));
                }
                if let Some(f) = self.injected.pop_front() {
                    self.rx_buf[..f.len()].copy_from_slice(&f);
                    self.rx_pending = f.len();
                }
            }
            if self.rx_pending == 0 {
                match self.backend.source.recv(&mut self.rx_buf) {
                    Ok(0) => break,
                    Ok(n) if n > MAX_FRAME_LEN => {
                        warn!("virtio-net: RX frame longer than {MAX_FRAME_LEN} bytes dropped");
                        self.stats.rx_dropped_oversize += 1;
                        continue;
                    }
                    Ok(n) => self.rx_pending = n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        warn!("virtio-net: reading a frame failed: {e}");
                        break;
                    }
                }
            }
            let Some(dc) = chain::pop(queue, mem, RX_QUEUE)? else {
                return Ok((used, true));
            };
            let c = chain::walk(dc, mem, RX_QUEUE)?;
            let len = self.rx_one(mem, &c);
            chain::add_used(queue, mem, RX_QUEUE, c.head, len)?;
            used = true;
        }
        Ok((used, false))
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        guest_abi::boot::VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC
    }

    fn config_space(&self) -> Vec<u8> {
        self.mac.to_vec()
    }

    fn process_queue(
        &mut self,
        mem: &GuestMem,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool> {
        match (index, queues) {
            (TX_QUEUE, [_, tx, ..]) => self.process_tx(mem, tx),
            // New RX buffers: deliver what waits.
            (RX_QUEUE, [rx, ..]) => self.process_rx(mem, rx),
            _ => Ok(false),
        }
    }

    fn poll(&mut self, mem: &GuestMem, queues: &mut [Queue]) -> Result<bool> {
        match queues.get_mut(RX_QUEUE) {
            Some(rx) => self.process_rx(mem, rx),
            None => Ok(false),
        }
    }

    fn poll_fd(&self) -> Option<RawFd> {
        self.backend.source.fd()
    }

    fn reset(&mut self) {
        self.rx_pending = 0;
        self.injected.clear();
    }

    fn save_device(&self) -> DeviceState {
        DeviceState::Net(NetState {
            tap: self.config.tap.clone(),
            mac: self.mac,
        })
    }
}

#[cfg(test)]
mod tests;
