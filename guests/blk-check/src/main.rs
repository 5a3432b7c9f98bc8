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
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;
use tandem_rt::guest_abi::boot::VIRTIO_ID_BLOCK;
use tandem_rt::{entry, kind, kinds, Env};
use tandem_virtio::virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use tandem_virtio::virtio_drivers::transport::DeviceType;
use tandem_virtio::IdentityHal;

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
    let mut blk = VirtIOBlk::<IdentityHal, _>::new(transport)
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
