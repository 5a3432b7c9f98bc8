//! # guest-images — Tandem's Rust guests, ready to load
//!
//! `build.rs` builds the separate `guests/` workspace (no_std, `panic = "abort"`, static at
//! 0x200000) with this build's cargo, and this crate embeds the ELF executables:
//!
//! | image          | what it does (its module doc in `guests/<name>/src/main.rs` is the spec) |
//! |----------------|-------------------------------------------------------------------|
//! | [`HELLO`]      | `n` records with a checksum; [`model::hello_records`]              |
//! | [`PANIC`]      | panics on purpose: PANIC + PANIC_TEXT records; [`model::panic_text`] |
//! | [`BLK_CHECK`]  | pattern write/flush/read/verify on virtio-blk; [`model::blk_records`]; `bench=1`: [`model::blk_bench`] |
//! | [`NET_ECHO`]   | UDP echo server (smoltcp) on virtio-net                            |
//! | [`STALL_PROBE`]| records TSC gaps above a threshold for `ms` milliseconds            |
//!
//! Load one with `monitor::image::load(vm.memory(), bytes, LOAD_ADDR, None)`. Guest
//! arguments (`key=value`) reach the guests through the boot-info page (`VmConfig::boot_args`,
//! `--guest-arg`); virtio devices through its device table (`VmConfig::mmio_devices`). Only
//! vCPU 0 runs a guest's `main`; every other vCPU reports done at once with an empty ring.
#![forbid(unsafe_code)]

pub use guest_abi::ring::Record;

/// The `hello` guest (ELF64).
pub const HELLO: &[u8] = include_bytes!(concat!(env!("GUEST_IMAGES_DIR"), "/hello"));
/// The `panic` guest (ELF64).
pub const PANIC: &[u8] = include_bytes!(concat!(env!("GUEST_IMAGES_DIR"), "/panic"));
/// The `blk-check` guest (ELF64).
pub const BLK_CHECK: &[u8] = include_bytes!(concat!(env!("GUEST_IMAGES_DIR"), "/blk-check"));
/// The `net-echo` guest (ELF64).
pub const NET_ECHO: &[u8] = include_bytes!(concat!(env!("GUEST_IMAGES_DIR"), "/net-echo"));
/// The `stall-probe` guest (ELF64).
pub const STALL_PROBE: &[u8] = include_bytes!(concat!(env!("GUEST_IMAGES_DIR"), "/stall-probe"));

/// The `kv` guest (ELF64): a Redis-compatible server with an append-only log.
pub const KV: &[u8] = include_bytes!(concat!(env!("GUEST_IMAGES_DIR"), "/kv"));

/// Every image, by name.
pub const IMAGES: [(&str, &[u8]); 6] = [
    ("hello", HELLO),
    ("panic", PANIC),
    ("blk-check", BLK_CHECK),
    ("net-echo", NET_ECHO),
    ("stall-probe", STALL_PROBE),
    ("kv", KV),
];

/// The image called `name` (`hello`, `panic`, `blk-check`, `net-echo`, `stall-probe`, `kv`).
pub fn image(name: &str) -> Option<&'static [u8]> {
    IMAGES.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// Writes every image to `dir/<name>.elf` (for `tandem run --image FILE`) and returns the
/// paths, in [`IMAGES`] order.
pub fn write_to(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    IMAGES
        .iter()
        .map(|(name, bytes)| {
            let path = dir.join(format!("{name}.elf"));
            std::fs::write(&path, bytes)?;
            Ok(path)
        })
        .collect()
}

/// Record kinds the guests emit: `guest_abi::ring::kind` plus the guests' own (the same
/// numbers as `tandem_rt::kinds` in `guests/rt`).
pub mod kind {
    pub use guest_abi::ring::kind::*;
    /// blk-check, first record: `value` = disk bytes checked, `aux` = pattern seed.
    pub const BLK_INFO: u32 = 0x20;
    /// blk-check, after the write pass and the flush: `value` = digest of the pattern,
    /// `aux` = write requests.
    pub const BLK_WRITTEN: u32 = 0x21;
    /// blk-check, after the read pass: `value` = digest of what was read, `aux` = read
    /// requests.
    pub const BLK_VERIFIED: u32 = 0x22;
    /// blk-check, the first mismatch only: `value` = disk offset, `aux` = the word read.
    pub const BLK_MISMATCH: u32 = 0x23;
    /// blk-check `bench=1`, after BLK_INFO: `value` = bytes per request, `aux` = TSC kHz.
    pub const BLK_BENCH: u32 = 0x24;
    /// blk-check `bench=1`: `value` = TSC ticks of the write pass with its flush, `aux` =
    /// ticks of the flush.
    pub const BLK_BENCH_WRITE: u32 = 0x25;
    /// blk-check `bench=1`: `value` = TSC ticks of the read pass, `aux` = queue
    /// notifications of both passes.
    pub const BLK_BENCH_READ: u32 = 0x26;
    /// net-echo, interface up: `value` = IPv4 (big-endian u32) << 8 | prefix, `aux` = port.
    pub const NET_UP: u32 = 0x28;
    /// net-echo, every `every` datagrams: `value` = datagrams echoed, `aux` = payload bytes.
    pub const NET_ECHO: u32 = 0x29;
    /// stall-probe, first: `value` = TSC kHz, `aux` = threshold in ns.
    pub const STALL_INFO: u32 = 0x30;
    /// stall-probe, a gap over the threshold: `value` = gap ns, `aux` = its start, ns since
    /// the probe began.
    pub const STALL: u32 = 0x31;
    /// stall-probe, summary: `value` = largest gap ns, `aux` = gaps over the threshold.
    pub const STALL_SUMMARY: u32 = 0x32;
    /// kv, after the log replay at boot: `value` = records replayed, `aux` = log bytes, bit 63
    /// set if a torn tail was cut.
    pub const KV_LOG: u32 = 0x38;
    /// kv, listening: `value` = IPv4 (big-endian u32) << 8 | prefix, `aux` = TCP port.
    pub const KV_UP: u32 = 0x39;
    /// kv, every `stats_ms`: `value` = requests answered, `aux` = open connections.
    pub const KV_STATS: u32 = 0x3a;
}

/// Reference models: what the guests must emit, computed independently on the host.
pub mod model {
    use super::{kind, Record};

    const HELLO_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
    const HELLO_MIX: u64 = 0xff51_afd7_ed55_8ccd;

    fn rec(seq: u64, kind: u32, value: u64, aux: u64) -> Record {
        Record {
            vcpu: 0,
            kind,
            seq,
            value,
            aux,
        }
    }

    /// The records of `hello` with `n=N` (vCPU 0; other vCPUs emit nothing): `n` PROGRESS
    /// records then DONE.
    pub fn hello_records(n: u64) -> Vec<Record> {
        let mut c = HELLO_SEED;
        let mut out = Vec::with_capacity(n as usize + 1);
        for i in 1..=n {
            c = (c ^ i).rotate_left(13).wrapping_mul(HELLO_MIX);
            out.push(rec(i - 1, kind::PROGRESS, c, i));
        }
        out.push(rec(n, kind::DONE, c, n));
        out
    }

    /// FNV-1a 64 (a PANIC record's `aux` is this of the file name).
    pub fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    /// A panic found in a record stream.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Panic {
        /// The line (the PANIC record's `value`).
        pub line: u64,
        /// FNV-1a 64 of the file name (its `aux`).
        pub file_hash: u64,
        /// `file:line: message` from the PANIC_TEXT records that follow it.
        pub text: String,
    }

    /// The first panic in `records`, if any, with its text decoded (lossy UTF-8, trailing
    /// zero padding removed).
    pub fn panic_text(records: &[Record]) -> Option<Panic> {
        let at = records.iter().position(|r| r.kind == kind::PANIC)?;
        let mut bytes = Vec::new();
        for r in records[at + 1..]
            .iter()
            .take_while(|r| r.kind == kind::PANIC_TEXT)
        {
            bytes.extend_from_slice(&r.value.to_le_bytes());
            bytes.extend_from_slice(&r.aux.to_le_bytes());
        }
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        Some(Panic {
            line: records[at].value,
            file_hash: records[at].aux,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// blk-check's request sizes; the write pass uses `BLK_SIZES[k % 3]` for request `k`, the
    /// read pass `BLK_SIZES[(k + 1) % 3]`.
    pub const BLK_SIZES: [u64; 3] = [512, 4096, 65536];
    /// FNV-1a 64 offset basis: the digest of nothing.
    pub const DIGEST_INIT: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

    /// Word `w` (bytes `8w..8w+8`, little endian) of blk-check's pattern for `seed`.
    pub fn blk_word(seed: u64, w: u64) -> u64 {
        let mut z = seed ^ w.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fills `buf` with the pattern bytes of disk offset `offset ..` (`offset` and the length
    /// multiples of 8).
    pub fn blk_fill(seed: u64, offset: u64, buf: &mut [u8]) {
        assert!(offset % 8 == 0 && buf.len() % 8 == 0, "whole words only");
        for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&blk_word(seed, offset / 8 + i as u64).to_le_bytes());
        }
    }

    /// The first `bytes` of the disk after a clean blk-check run with `seed`.
    pub fn blk_expected_disk(seed: u64, bytes: u64) -> Vec<u8> {
        let mut v = vec![0u8; bytes as usize];
        blk_fill(seed, 0, &mut v);
        v
    }

    /// Digest (FNV-1a over little-endian u64 words) of `bytes` (a multiple of 8 long).
    pub fn digest_bytes(bytes: &[u8]) -> u64 {
        bytes.chunks_exact(8).fold(DIGEST_INIT, |d, c| {
            (d ^ u64::from_le_bytes(c.try_into().expect("8 bytes"))).wrapping_mul(FNV_PRIME)
        })
    }

    /// Digest of the pattern over `0 .. total`.
    pub fn blk_digest(seed: u64, total: u64) -> u64 {
        (0..total / 8).fold(DIGEST_INIT, |d, w| {
            (d ^ blk_word(seed, w)).wrapping_mul(FNV_PRIME)
        })
    }

    /// How many requests a pass over `total` bytes makes, with sizes starting at
    /// `BLK_SIZES[phase]`.
    pub fn blk_requests(total: u64, phase: usize) -> u64 {
        let (mut off, mut k) = (0u64, 0u64);
        while off < total {
            off += BLK_SIZES[(k as usize + phase) % 3].min(total - off);
            k += 1;
        }
        k
    }

    /// The bytes blk-check checks on a disk of `disk_bytes` with `mib=` (0: all).
    pub fn blk_total(disk_bytes: u64, mib: u64) -> u64 {
        match mib {
            0 => disk_bytes,
            m => disk_bytes.min(m.saturating_mul(1 << 20)),
        }
    }

    /// The records of a clean blk-check run over `total` bytes (see [`blk_total`]) with
    /// `seed`.
    pub fn blk_records(seed: u64, total: u64) -> Vec<Record> {
        let digest = blk_digest(seed, total);
        vec![
            rec(0, kind::BLK_INFO, total, seed),
            rec(1, kind::BLK_WRITTEN, digest, blk_requests(total, 0)),
            rec(2, kind::BLK_VERIFIED, digest, blk_requests(total, 1)),
            rec(3, kind::DONE, digest, 0),
        ]
    }

    /// The first `total` bytes of the disk after a blk-check `bench=1` run with `seed`, `bs`
    /// bytes per request and `depth` buffers: at offset `o`, the pattern byte of offset
    /// `o mod (depth × bs)`.
    pub fn blk_bench_disk(seed: u64, bs: u64, depth: u64, total: u64) -> Vec<u8> {
        let ring = blk_expected_disk(seed, bs * depth);
        (0..total)
            .map(|o| ring[(o % (bs * depth)) as usize])
            .collect()
    }

    /// A decoded blk-check `bench=1` run.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct BlkBench {
        /// Bytes per pass.
        pub total: u64,
        /// Bytes per request.
        pub bs: u64,
        /// TSC kHz the guest timed with.
        pub tsc_khz: u64,
        /// TSC ticks of the write pass, flush included.
        pub write_ticks: u64,
        /// TSC ticks of the flush alone.
        pub flush_ticks: u64,
        /// TSC ticks of the read pass.
        pub read_ticks: u64,
        /// Queue notifications (VM exits) of both passes.
        pub notifications: u64,
        /// Requests per pass.
        pub requests: u64,
        /// Blocks read back wrong.
        pub bad_blocks: u64,
    }

    impl BlkBench {
        /// `ticks` in seconds by the guest's TSC rate.
        pub fn secs(&self, ticks: u64) -> f64 {
            ticks as f64 / (self.tsc_khz as f64 * 1e3)
        }
    }

    /// Decodes a blk-check `bench=1` record stream (`BLK_INFO`, `BLK_BENCH`,
    /// `BLK_BENCH_WRITE`, `BLK_BENCH_READ`, `DONE`, nothing else), with `seed`; says what is
    /// wrong otherwise.
    pub fn blk_bench(records: &[Record], seed: u64) -> Result<BlkBench, String> {
        let kinds: Vec<u32> = records.iter().map(|r| r.kind).collect();
        let want = [
            kind::BLK_INFO,
            kind::BLK_BENCH,
            kind::BLK_BENCH_WRITE,
            kind::BLK_BENCH_READ,
            kind::DONE,
        ];
        if kinds != want {
            return Err(format!(
                "record kinds {kinds:#x?}, expected {want:#x?}: {records:?}"
            ));
        }
        let r = |i: usize| &records[i];
        if r(0).aux != seed {
            return Err(format!("seed {} in BLK_INFO, {seed} given", r(0).aux));
        }
        let b = BlkBench {
            total: r(0).value,
            bs: r(1).value,
            tsc_khz: r(1).aux,
            write_ticks: r(2).value,
            flush_ticks: r(2).aux,
            read_ticks: r(3).value,
            notifications: r(3).aux,
            requests: r(4).value,
            bad_blocks: r(4).aux,
        };
        if b.bs == 0 || b.total != b.requests * b.bs || b.tsc_khz == 0 {
            return Err(format!("inconsistent bench records: {b:?}"));
        }
        Ok(b)
    }

    /// A decoded stall-probe run.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct StallRun {
        /// TSC kHz the guest used.
        pub tsc_khz: u64,
        /// Threshold in ns.
        pub threshold_ns: u64,
        /// `(gap ns, start ns)` of each recorded gap.
        pub gaps: Vec<(u64, u64)>,
        /// Largest gap in ns.
        pub largest_ns: u64,
        /// Gaps over the threshold (recorded or not).
        pub over: u64,
        /// Elapsed ns by the guest's clock.
        pub elapsed_ns: u64,
        /// TSC reads.
        pub iterations: u64,
    }

    /// Decodes stall-probe's records; `None` if the stream is not a complete run.
    pub fn stall_run(records: &[Record]) -> Option<StallRun> {
        let mut it = records.iter();
        let info = it.next().filter(|r| r.kind == kind::STALL_INFO)?;
        let mut run = StallRun {
            tsc_khz: info.value,
            threshold_ns: info.aux,
            ..StallRun::default()
        };
        for r in it {
            match r.kind {
                kind::STALL => run.gaps.push((r.value, r.aux)),
                kind::STALL_SUMMARY => {
                    run.largest_ns = r.value;
                    run.over = r.aux;
                }
                kind::DONE => {
                    run.elapsed_ns = r.value;
                    run.iterations = r.aux;
                    return Some(run);
                }
                _ => return None,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::model::*;
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn every_image_is_a_static_elf64_x86_64_executable_in_the_image_area() {
        for (name, elf) in IMAGES {
            assert_eq!(&elf[..4], b"\x7fELF", "{name}");
            assert_eq!(elf[4], 2, "{name}: ELFCLASS64");
            assert_eq!(u16_at(elf, 16), 2, "{name}: ET_EXEC");
            assert_eq!(u16_at(elf, 18), 62, "{name}: EM_X86_64");
            assert_eq!(u64_at(elf, 24), 0x20_0000, "{name}: entry");
            let (phoff, phnum) = (u64_at(elf, 32) as usize, u16_at(elf, 56) as usize);
            let mut loads = 0;
            for i in 0..phnum {
                let ph = &elf[phoff + 56 * i..phoff + 56 * (i + 1)];
                if u32::from_le_bytes(ph[0..4].try_into().unwrap()) != 1 {
                    continue;
                }
                loads += 1;
                let (paddr, memsz) = (u64_at(ph, 24), u64_at(ph, 40));
                assert!(
                    paddr >= 0x20_0000 && paddr + memsz <= 0x40_0000,
                    "{name}: segment {paddr:#x}+{memsz:#x}"
                );
            }
            assert!(loads >= 1, "{name}");
            assert!(elf.len() < 1 << 20, "{name} is {} bytes", elf.len());
        }
        assert_eq!(image("hello"), Some(HELLO));
        assert_eq!(image("nope"), None);
        let dir = std::env::temp_dir().join(format!("guest-images-{}", std::process::id()));
        let paths = write_to(&dir).unwrap();
        assert_eq!(std::fs::read(&paths[0]).unwrap(), HELLO);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hello_model() {
        let r = hello_records(0);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].kind, r[0].value, r[0].aux),
            (kind::DONE, 0x9e37_79b9_7f4a_7c15, 0)
        );
        let r = hello_records(3);
        assert_eq!(r.len(), 4);
        assert!(r.iter().enumerate().all(|(i, r)| r.seq == i as u64));
        assert_eq!(r[3].value, r[2].value);
        assert_ne!(r[0].value, r[1].value);
    }

    #[test]
    fn panic_text_decodes_padded_chunks() {
        let text = b"panic/src/main.rs:30: on purpose: x";
        let mut recs = vec![Record {
            kind: kind::PANIC,
            value: 30,
            aux: fnv1a(b"panic/src/main.rs"),
            ..Record::default()
        }];
        for c in text.chunks(16) {
            let mut b = [0u8; 16];
            b[..c.len()].copy_from_slice(c);
            recs.push(Record {
                kind: kind::PANIC_TEXT,
                value: u64::from_le_bytes(b[..8].try_into().unwrap()),
                aux: u64::from_le_bytes(b[8..].try_into().unwrap()),
                ..Record::default()
            });
        }
        let p = panic_text(&recs).unwrap();
        assert_eq!(p.text, "panic/src/main.rs:30: on purpose: x");
        assert_eq!(p.line, 30);
        assert_eq!(panic_text(&hello_records(2)), None);
    }

    #[test]
    fn blk_model_is_consistent() {
        // 512 + 4096 + 65536 + 512 + 4096 = 74752: 5 writes; reads 4096, 65536, 512, 4096, 512.
        let total = 74752;
        assert_eq!(blk_requests(total, 0), 5);
        assert_eq!(blk_requests(total, 1), 5);
        assert_eq!(blk_requests(0, 0), 0);
        assert_eq!(blk_requests(512, 1), 1);
        let disk = blk_expected_disk(7, total);
        assert_eq!(digest_bytes(&disk), blk_digest(7, total));
        assert_ne!(blk_digest(7, total), blk_digest(8, total));
        let mut part = vec![0u8; 64];
        blk_fill(7, 4096, &mut part);
        assert_eq!(&part[..], &disk[4096..4160]);
        let r = blk_records(7, total);
        assert_eq!(
            r.iter().map(|r| r.kind).collect::<Vec<_>>(),
            [
                kind::BLK_INFO,
                kind::BLK_WRITTEN,
                kind::BLK_VERIFIED,
                kind::DONE
            ]
        );
        assert_eq!(r[1].value, r[2].value);
        assert_eq!(blk_total(1 << 30, 2), 2 << 20);
        assert_eq!(blk_total(1 << 20, 0), 1 << 20);
        assert_eq!(blk_records(1, 0)[1].value, DIGEST_INIT);
    }

    #[test]
    fn stall_run_decodes_a_complete_stream() {
        let r = |kind, value, aux| Record {
            kind,
            value,
            aux,
            ..Record::default()
        };
        let recs = [
            r(kind::STALL_INFO, 2_000_000, 50_000),
            r(kind::STALL, 70_000, 1_000),
            r(kind::STALL_SUMMARY, 70_000, 1),
            r(kind::DONE, 1_000_000, 99),
        ];
        let run = stall_run(&recs).unwrap();
        assert_eq!(run.gaps, [(70_000, 1_000)]);
        assert_eq!(run.elapsed_ns, 1_000_000);
        assert_eq!(stall_run(&recs[..3]), None);
    }
}
