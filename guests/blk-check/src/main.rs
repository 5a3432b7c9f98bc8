//! `blk-check`: writes a deterministic pattern over a virtio block device, flushes, reads it
//! all back and verifies it. The host-side reference model is `guest_images::model::blk_*`
//! (`blk_records`, `blk_fill`, `blk_expected_disk`), which tests compare against.
//!
//! Arguments: `seed` (default 1); `mib` (default 0: the whole disk; otherwise only the first
//! `min(mib MiB, disk)` bytes); `dev` (default 0: the first block device of the boot-info page).
//! Probes of the device's refusals (host tests): `ro_write=1` writes even to a disk that says
//! it is read-only (the device must fail the first write: a panic names its error);
//! `past_end=1` first writes one sector at the disk's capacity, just past its end, and panics
//! with `write past the end was accepted` unless the device fails it (then nothing is
//! recorded and the run goes on as usual).
//!
//! ## The pattern
//!
//! The disk is a sequence of little-endian u64 words; word `w` (bytes `8w .. 8w+8`) is
//!
//! ```text
//! z = seed ^ (w * 0x9e37_79b9_7f4a_7c15)
//! z = (z ^ (z >> 30)) * 0xbf58_476d_1ce4_e5b9
//! z = (z ^ (z >> 27)) * 0x94d0_49bb_1331_11eb
//! word = z ^ (z >> 31)                                   (all wrapping)
//! ```
//!
//! The **digest** of a byte range is FNV-1a over its words: `d = 0xcbf2_9ce4_8422_2325`, then
//! for each word `d = (d ^ word) * 0x0000_0100_0000_01b3`.
//!
//! ## Requests
//!
//! Let `total` = bytes checked (a multiple of 512) and `SIZES = [512, 4096, 65536]`. The write
//! pass walks from offset 0: request `k` writes `min(SIZES[k % 3], total - offset)` bytes. Then
//! one flush. The read pass walks again with `SIZES[(k + 1) % 3]` (4 KiB, 64 KiB, 512 B, ...),
//! so its requests straddle the write requests' boundaries, and compares every word.
//!
//! ## Records (kinds from `tandem_rt::kinds`)
//!
//! ```text
//! BLK_INFO      value = total                   aux = seed
//! BLK_WRITTEN   value = digest of the pattern   aux = write requests     (after the flush)
//! BLK_MISMATCH  value = offset of first bad word  aux = the word read    (only on a mismatch)
//! BLK_VERIFIED  value = digest of what was read aux = read requests
//! DONE (2)      value = digest of what was read aux = mismatched words
//! ```
//!
//! A good disk gives `BLK_VERIFIED.value == BLK_WRITTEN.value` and `DONE.aux == 0`. A device
//! error or a read-only disk panics (PANIC records say why). The progress slot holds the bytes
//! done so far (write pass, then read pass).
//!
//! ## Benchmark mode (`bench=1`)
//!
//! Arguments: `bs` (default 65536) bytes per request, a multiple of 512 up to 1 MiB;
//! `depth` (default 16, at most 64) requests queued per notification; `mib` and `seed` as
//! above. `total` is rounded down to whole blocks. `depth` buffers of `bs` bytes are filled
//! once, buffer `j` with the pattern of disk offset `j × bs`; block `k` (disk offset
//! `k × bs`) is written from buffer `k % depth`, so the disk ends up holding, at every offset
//! `o`, the pattern byte of offset `o mod (depth × bs)`. The write pass queues up to `depth`
//! writes (fewer if the queue is full) with notifications held, sends one notification, and
//! waits for them all; then one flush. The read pass does the same with reads and checks the
//! first and last word of every block read. Timing is by `rdtsc` around each pass; nothing
//! is emitted inside a pass.
//!
//! ```text
//! BLK_INFO        value = total                 aux = seed
//! BLK_BENCH       value = bs                    aux = TSC kHz (boot-info page)
//! BLK_BENCH_WRITE value = TSC ticks of the write pass, flush included   aux = ticks of the flush
//! BLK_BENCH_READ  value = TSC ticks of the read pass     aux = notifications of both passes
//! DONE (2)        value = requests per pass             aux = blocks read back wrong
//! ```
#![no_std]
#![no_main]

extern crate alloc;

use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use tandem_rt::guest_abi::boot::VIRTIO_ID_BLOCK;
use tandem_rt::{entry, kind, kinds, rdtsc, Env};
use tandem_virtio::virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
use tandem_virtio::virtio_drivers::transport::mmio::MmioTransport;
use tandem_virtio::virtio_drivers::transport::DeviceType;
use tandem_virtio::virtio_drivers::Error as VirtioError;
use tandem_virtio::{Gated, IdentityHal, NotifyGate};

entry!(main);

const SIZES: [u64; 3] = [512, 4096, 65536];
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn pattern_word(seed: u64, w: u64) -> u64 {
    let mut z = seed ^ w.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        let w = offset / 8 + i as u64;
        chunk.copy_from_slice(&pattern_word(seed, w).to_le_bytes());
    }
}

fn word_at(buf: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[i * 8..i * 8 + 8]);
    u64::from_le_bytes(b)
}

fn main(env: &Env) {
    let seed = env.arg_u64("seed", 1);
    let index = env.arg_u64("dev", 0) as usize;
    let dev = tandem_virtio::find(env, VIRTIO_ID_BLOCK, index)
        .unwrap_or_else(|e| panic!("block device {index}: {e}"));
    let transport = tandem_virtio::transport(&dev, DeviceType::Block)
        .unwrap_or_else(|e| panic!("block device {index} at {:#x}: {e}", dev.base));
    let gate = NotifyGate::new(&dev)
        .unwrap_or_else(|e| panic!("block device {index} at {:#x}: {e}", dev.base));
    let mut blk = VirtIOBlk::<IdentityHal, _>::new(Gated::new(transport, gate.clone()))
        .unwrap_or_else(|e| panic!("virtio-blk init: {e}"));
    if env.arg_u64("ro_write", 0) == 0 {
        assert!(!blk.readonly(), "the disk is read-only");
    }
    let disk = blk
        .capacity()
        .checked_mul(SECTOR_SIZE as u64)
        .expect("disk capacity overflows");
    let total = match env.arg_u64("mib", 0) {
        0 => disk,
        mib => disk.min(mib.saturating_mul(1 << 20)),
    };
    if env.arg_u64("bench", 0) != 0 {
        bench(env, &mut blk, &gate, seed, total);
        return;
    }
    env.emit(kinds::BLK_INFO, total, seed);
    env.doorbell();

    let mut buf = vec![0u8; SIZES[2] as usize];
    if env.arg_u64("past_end", 0) != 0 {
        let sector = disk / SECTOR_SIZE as u64;
        if blk
            .write_blocks(sector as usize, &buf[..SECTOR_SIZE])
            .is_ok()
        {
            panic!("write past the end was accepted (sector {sector})");
        }
    }
    // Write pass.
    let (mut off, mut k, mut digest) = (0u64, 0u64, FNV_OFFSET);
    while off < total {
        let len = SIZES[(k % 3) as usize].min(total - off) as usize;
        let chunk = &mut buf[..len];
        fill(seed, off, chunk);
        for i in 0..len / 8 {
            digest = (digest ^ word_at(chunk, i)).wrapping_mul(FNV_PRIME);
        }
        blk.write_blocks((off / SECTOR_SIZE as u64) as usize, chunk)
            .unwrap_or_else(|e| panic!("write of {len} bytes at {off:#x}: {e}"));
        off += len as u64;
        k += 1;
        env.set_progress(off);
    }
    blk.flush().unwrap_or_else(|e| panic!("flush: {e}"));
    env.emit(kinds::BLK_WRITTEN, digest, k);
    env.doorbell();

    // Read pass, with shifted request sizes.
    let mut want = vec![0u8; SIZES[2] as usize];
    let (mut off, mut k, mut digest, mut bad) = (0u64, 0u64, FNV_OFFSET, 0u64);
    while off < total {
        let len = SIZES[((k + 1) % 3) as usize].min(total - off) as usize;
        let chunk = &mut buf[..len];
        blk.read_blocks((off / SECTOR_SIZE as u64) as usize, chunk)
            .unwrap_or_else(|e| panic!("read of {len} bytes at {off:#x}: {e}"));
        fill(seed, off, &mut want[..len]);
        for i in 0..len / 8 {
            let got = word_at(chunk, i);
            digest = (digest ^ got).wrapping_mul(FNV_PRIME);
            if got != word_at(&want, i) {
                if bad == 0 {
                    env.emit(kinds::BLK_MISMATCH, off + 8 * i as u64, got);
                }
                bad += 1;
            }
        }
        off += len as u64;
        k += 1;
        env.set_progress(total + off);
    }
    env.emit(kinds::BLK_VERIFIED, digest, k);
    env.emit(kind::DONE, digest, bad);
}

type Blk = VirtIOBlk<IdentityHal, Gated<MmioTransport<'static>>>;

/// Requests of one batch: its buffers, in the places the device reads and writes.
struct Batch {
    reqs: Vec<BlkReq>,
    resps: Vec<BlkResp>,
    tokens: Vec<u16>,
    /// Block number of each request.
    blocks: Vec<u64>,
}

/// Queues blocks `first ..` (at most `depth`, fewer when the queue is full, none past `n`)
/// with the notification held, sends it, and waits until the device has used them all;
/// `io(blk, block, i, req, resp)` queues one request. Returns how many were done and the
/// blocks, in `batch.blocks[..m]`.
fn run_batch(
    blk: &mut Blk,
    gate: &NotifyGate,
    batch: &mut Batch,
    first: u64,
    n: u64,
    mut io: impl FnMut(&mut Blk, u64, &mut BlkReq, &mut BlkResp) -> Result<u16, VirtioError>,
    mut done: impl FnMut(&mut Blk, u16, u64, &BlkReq, &mut BlkResp),
) -> u64 {
    let depth = batch.reqs.len();
    gate.hold();
    let mut m = 0;
    while m < depth && first + (m as u64) < n {
        let k = first + m as u64;
        match io(blk, k, &mut batch.reqs[m], &mut batch.resps[m]) {
            Ok(t) => {
                batch.tokens[m] = t;
                batch.blocks[m] = k;
                m += 1;
            }
            Err(VirtioError::QueueFull) if m > 0 => break,
            Err(e) => panic!("queueing block {k}: {e}"),
        }
    }
    gate.release();
    for _ in 0..m {
        let t = loop {
            if let Some(t) = blk.peek_used() {
                break t;
            }
            core::hint::spin_loop();
        };
        let i = batch.tokens[..m]
            .iter()
            .position(|&x| x == t)
            .unwrap_or_else(|| panic!("virtio-blk: the device used token {t}, not queued"));
        let (req, resp) = (&batch.reqs[i], &mut batch.resps[i]);
        done(blk, t, batch.blocks[i], req, resp);
    }
    m as u64
}

/// `bench=1`: see the module docs.
fn bench(env: &Env, blk: &mut Blk, gate: &Rc<NotifyGate>, seed: u64, total: u64) {
    let bs = env.arg_u64("bs", 65536);
    assert!(
        bs.is_multiple_of(SECTOR_SIZE as u64) && (SECTOR_SIZE as u64..=1 << 20).contains(&bs),
        "bs={bs}: a multiple of 512 from 512 to 1 MiB"
    );
    let depth = env.arg_u64("depth", 16).clamp(1, 64) as usize;
    let n = total / bs;
    let total = n * bs;
    env.emit(kinds::BLK_INFO, total, seed);
    env.emit(kinds::BLK_BENCH, bs, env.tsc_khz());
    env.doorbell();

    let bsz = bs as usize;
    let bufs: Vec<Vec<u8>> = (0..depth)
        .map(|j| {
            let mut b = vec![0u8; bsz];
            fill(seed, (j * bsz) as u64, &mut b);
            b
        })
        .collect();
    let mut rbufs: Vec<Vec<u8>> = (0..depth).map(|_| vec![0u8; bsz]).collect();
    let mut batch = Batch {
        reqs: (0..depth).map(|_| BlkReq::default()).collect(),
        resps: (0..depth).map(|_| BlkResp::default()).collect(),
        tokens: vec![0; depth],
        blocks: vec![0; depth],
    };
    let sector = |k: u64| (k * bs / SECTOR_SIZE as u64) as usize;
    let slot = |k: u64| (k % depth as u64) as usize;
    let sent0 = gate.sent();

    // Write pass, then the flush.
    let t0 = rdtsc();
    let mut k = 0;
    while k < n {
        k += run_batch(
            blk,
            gate,
            &mut batch,
            k,
            n,
            // SAFETY: the request, its buffer and its response stay untouched in `batch` and
            // `bufs` until `run_batch` completes them below.
            |blk, k, req, resp| unsafe {
                blk.write_blocks_nb(sector(k), req, &bufs[slot(k)], resp)
            },
            |blk, t, k, req, resp| {
                // SAFETY: the same buffers as queued with token `t`.
                unsafe { blk.complete_write_blocks(t, req, &bufs[slot(k)], resp) }
                    .unwrap_or_else(|e| panic!("write of block {k} ({bs} bytes): {e}"))
            },
        );
    }
    let t1 = rdtsc();
    blk.flush().unwrap_or_else(|e| panic!("flush: {e}"));
    let t2 = rdtsc();

    // Read pass. Each read buffer is handed to the device by one request at a time (a batch
    // holds at most `depth` consecutive blocks), through these pointers.
    let last = bsz / 8 - 1;
    let rptr: Vec<*mut [u8]> = rbufs
        .iter_mut()
        .map(|b| b.as_mut_slice() as *mut [u8])
        .collect();
    let mut bad = 0u64;
    let mut k = 0;
    while k < n {
        k += run_batch(
            blk,
            gate,
            &mut batch,
            k,
            n,
            |blk, k, req, resp| {
                let p: *mut [u8] = rptr[slot(k)];
                // SAFETY: the buffer behind `p` lives in `rbufs` for the whole pass and no
                // other request of the batch uses it; the request and response stay in
                // `batch` until `run_batch` completes them.
                unsafe { blk.read_blocks_nb(sector(k), req, &mut *p, resp) }
            },
            |blk, t, k, req, resp| {
                let p: *mut [u8] = rptr[slot(k)];
                // SAFETY: the device is done with the buffer (token `t` is used); it is the
                // one queued with `t`, and nothing else holds it.
                let b = unsafe { &mut *p };
                // SAFETY: the same buffers as queued with token `t`.
                unsafe { blk.complete_read_blocks(t, req, b, resp) }
                    .unwrap_or_else(|e| panic!("read of block {k} ({bs} bytes): {e}"));
                let j = slot(k);
                if word_at(b, 0) != word_at(&bufs[j], 0)
                    || word_at(b, last) != word_at(&bufs[j], last)
                {
                    bad += 1;
                }
            },
        );
    }
    let t3 = rdtsc();
    env.emit(kinds::BLK_BENCH_WRITE, t2 - t0, t2 - t1);
    env.emit(kinds::BLK_BENCH_READ, t3 - t2, gate.sent() - sent0);
    env.emit(kind::DONE, n, bad);
}
