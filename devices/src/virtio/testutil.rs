//! A hand-made driver for tests: rings built byte by byte in a `GuestMem`, the device driven
//! through its MMIO registers, as a guest would.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::mmio::{reg, status, MmioTransport};
use super::{CountingInterrupt, GuestMem, VirtioDevice};

/// Guest RAM of the tests.
pub const MEM_SIZE: u64 = 1 << 20;
/// Where test data buffers go.
pub const DATA: u64 = 0x8_0000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub fn mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Where queue `i`'s rings live.
pub fn layout(i: usize) -> (u64, u64, u64) {
    let base = 0x1_0000 + i as u64 * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

#[derive(Clone, Copy, Debug, Default)]
pub struct DQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub used_seen: u16,
}

pub struct Driver<D> {
    pub t: MmioTransport<D>,
    pub mem: GuestMem,
    pub irq: Arc<CountingInterrupt>,
    pub qs: Vec<DQueue>,
}

impl<D: VirtioDevice> Driver<D> {
    /// A device in reset state.
    pub fn new(dev: D) -> Self {
        Self::with_mem(dev, mem())
    }

    pub fn with_mem(dev: D, mem: GuestMem) -> Self {
        let irq = Arc::new(CountingInterrupt::default());
        let n = dev.queue_max_sizes().len();
        let t = MmioTransport::new(dev, mem.clone(), irq.clone()).unwrap();
        Driver {
            t,
            mem,
            irq,
            qs: vec![DQueue::default(); n],
        }
    }

    /// Up to FEATURES_OK, accepting every offered feature.
    pub fn begin(dev: D) -> Self {
        let mut d = Self::new(dev);
        d.w(reg::STATUS, status::ACKNOWLEDGE);
        d.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let f = d.features();
        d.w(reg::DRIVER_FEATURES_SEL, 0);
        d.w(reg::DRIVER_FEATURES, f as u32);
        d.w(reg::DRIVER_FEATURES_SEL, 1);
        d.w(reg::DRIVER_FEATURES, (f >> 32) as u32);
        d.w(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(d.r(reg::STATUS) & status::FEATURES_OK, status::FEATURES_OK);
        d
    }

    /// Running, with every queue of size `size`.
    pub fn start_with(dev: D, size: u16) -> Self {
        let mut d = Self::begin(dev);
        for i in 0..d.qs.len() {
            d.setup_queue(i, size);
        }
        let st = d.r(reg::STATUS);
        d.w(reg::STATUS, st | status::DRIVER_OK);
        assert!(d.t.is_active(), "status {:#x}", d.t.status());
        d
    }

    /// Running, queues of 16.
    pub fn start(dev: D) -> Self {
        Self::start_with(dev, 16)
    }

    pub fn features(&mut self) -> u64 {
        self.w(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.r(reg::DEVICE_FEATURES);
        self.w(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.r(reg::DEVICE_FEATURES);
        u64::from(lo) | u64::from(hi) << 32
    }

    pub fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    pub fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn setup_queue(&mut self, i: usize, size: u16) {
        let (desc, avail, used) = layout(i);
        // Clean rings.
        self.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(desc))
            .unwrap();
        self.w(reg::QUEUE_SEL, i as u32);
        self.w(reg::QUEUE_NUM, u32::from(size));
        self.w(reg::QUEUE_DESC_LOW, desc as u32);
        self.w(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w(reg::QUEUE_DRIVER_LOW, avail as u32);
        self.w(reg::QUEUE_DRIVER_HIGH, 0);
        self.w(reg::QUEUE_DEVICE_LOW, used as u32);
        self.w(reg::QUEUE_DEVICE_HIGH, 0);
        self.w(reg::QUEUE_READY, 1);
        self.qs[i] = DQueue {
            desc,
            avail,
            used,
            size,
            ..Default::default()
        };
    }

    /// Writes descriptor `idx` of queue `q` raw.
    pub fn desc(&self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.qs[q].desc + u64::from(idx) * 16;
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&b, GuestAddress(at)).unwrap();
    }

    /// Writes a chain of `(addr, len, writable)` buffers into consecutive free descriptors;
    /// returns its head (not yet published).
    pub fn chain(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let size = self.qs[q].size;
        let head = self.qs[q].next_desc;
        let mut idx = head;
        for (i, &(addr, len, wr)) in bufs.iter().enumerate() {
            let next = (idx + 1) % size;
            let mut flags = if wr { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.desc(q, idx, addr, len, flags, next);
            idx = next;
        }
        self.qs[q].next_desc = idx;
        head
    }

    /// Makes `head` available.
    pub fn publish(&mut self, q: usize, head: u16) {
        let dq = &mut self.qs[q];
        let slot = dq.avail + 4 + u64::from(dq.avail_idx % dq.size) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        let idx = dq.avail_idx;
        let at = dq.avail + 2;
        self.mem.write_obj(idx, GuestAddress(at)).unwrap();
    }

    /// Sets the available index directly.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.qs[q].avail_idx = idx;
        self.mem
            .write_obj(idx, GuestAddress(self.qs[q].avail + 2))
            .unwrap();
    }

    pub fn kick(&mut self, q: usize) {
        self.w(reg::QUEUE_NOTIFY, q as u32);
    }

    /// Chain + publish + kick.
    pub fn submit(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let h = self.chain(q, bufs);
        self.publish(q, h);
        self.kick(q);
        h
    }

    /// Used entries the device added since the last call: (id, len).
    pub fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let dq = self.qs[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(dq.used + 2)).unwrap();
        let mut out = vec![];
        let mut i = dq.used_seen;
        while i != idx {
            let at = dq.used + 4 + u64::from(i % dq.size) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            i = i.wrapping_add(1);
        }
        self.qs[q].used_seen = idx;
        out
    }

    pub fn put(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    pub fn needs_reset(&mut self) -> bool {
        self.r(reg::STATUS) & status::NEEDS_RESET != 0
    }
}
