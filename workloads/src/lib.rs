//! # workloads — deterministic guests for tests and benchmarks
//!
//! Each workload is x86-64 machine code generated here (iced-x86 `code_asm`, no external
//! toolchain) that runs at CPL3 under the entry ABI of `guest_abi::layout`, plus a Rust
//! *reference model* that computes, independently of KVM, the exact record stream the guest
//! must produce. Every vCPU runs its own instance on its own data area; the stream of vCPU `v`
//! depends only on `v` and the parameters, so the same arguments give the same digest on every
//! run and every machine.
//!
//! | workload  | what it does                                                          |
//! |-----------|-----------------------------------------------------------------------|
//! | `counter` | pure compute: `acc = rol(acc ^ i, 13) * C` for `iters` iterations      |
//! | `dirty`   | per iteration writes `pages` pages of a `ws_mib` (or `ws_kib`) working set (read-modify-write, so the checksum depends on memory) |
//!
//! Both write their iteration count to the vCPU's progress slot every iteration and append a
//! record (`kind 1`, value = checksum, aux = iteration) every `record_every` iterations, ring
//! the doorbell every `batch` records, and finish with a `kind 2` record and the done port.
#![forbid(unsafe_code)]

mod asm;

use guest_abi::ring::{kind, RING_SLOTS};
use guest_abi::Record;
use monitor::Layout;

/// Multiplier of the checksum.
pub const MIX: u64 = 0x9e37_79b9_7f4a_7c15;
/// Seed multiplier: vCPU `v` starts with `acc = (v + 1) * SEED`.
pub const SEED: u64 = 0xd1b5_4a32_d192_ed03;
/// Multiplier of the dirty workload's memory words (fits an imm32).
pub const WORD_MIX: u64 = 0x2545_f491;

/// A workload parameter error (the message says what to change).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter is unknown, malformed or out of range.
    #[error("{0}")]
    Param(String),
    /// The code generator failed.
    #[error("cannot assemble the guest: {0}")]
    Asm(String),
}

/// Which workload and with what parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Pure compute.
    Counter(CounterParams),
    /// Memory writer.
    Dirty(DirtyParams),
    /// Compute with LAPIC timer interrupts handled at CPL0.
    Ticker(TickerParams),
}

/// Parameters of `ticker`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickerParams {
    /// Iterations per vCPU.
    pub iters: u64,
    /// Iterations between two records.
    pub record_every: u64,
    /// Records between two doorbells (power of two, ≤ ring size).
    pub batch: u64,
    /// LAPIC timer period in µs.
    pub tick_us: u64,
    /// Heartbeat interval to configure in ms (the timer handler pings every 16 ticks; 0: off).
    pub hb_ms: u64,
}

/// Parameters of `counter`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterParams {
    /// Iterations per vCPU.
    pub iters: u64,
    /// Iterations between two records.
    pub record_every: u64,
    /// Records between two doorbells (power of two, ≤ ring size).
    pub batch: u64,
    /// Heartbeat: interval to configure in ms (0: the guest does not use the heartbeat).
    pub hb_ms: u64,
    /// Heartbeat: iterations between two pings.
    pub hb_every: u64,
    /// Heartbeat: first iteration of a stretch without pings (a "hang").
    pub stall_at: u64,
    /// Heartbeat: length of that stretch in iterations (0: none).
    pub stall_iters: u64,
}

/// Parameters of `dirty`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyParams {
    /// Iterations per vCPU.
    pub iters: u64,
    /// Iterations between two records.
    pub record_every: u64,
    /// Records between two doorbells (power of two, ≤ ring size).
    pub batch: u64,
    /// Working set per vCPU in MiB.
    pub ws_mib: u64,
    /// Working set per vCPU in KiB (a multiple of 4); when not 0 it replaces `ws_mib`.
    pub ws_kib: u64,
    /// Pages written per iteration.
    pub pages: u64,
}

impl DirtyParams {
    /// Pages in the working set of one vCPU.
    pub fn ws_pages(&self) -> u64 {
        if self.ws_kib > 0 {
            self.ws_kib / 4
        } else {
            self.ws_mib * 256
        }
    }
}

fn parse_u64(key: &str, v: &str) -> Result<u64, Error> {
    let v = v.replace('_', "");
    let parsed = if let Some(hex) = v.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()
    } else {
        let (num, mul) = match v.chars().last() {
            Some('k') => (&v[..v.len() - 1], 1_000),
            Some('M') => (&v[..v.len() - 1], 1_000_000),
            Some('G') => (&v[..v.len() - 1], 1_000_000_000),
            _ => (&v[..], 1),
        };
        num.parse::<u64>().ok().and_then(|n| n.checked_mul(mul))
    };
    parsed.ok_or_else(|| Error::Param(format!("--guest-arg {key}={v}: not a number")))
}

impl Workload {
    /// The workload names.
    pub const NAMES: [&'static str; 3] = ["counter", "dirty", "ticker"];

    /// Builds a workload from its name and `key=value` arguments.
    pub fn parse(name: &str, args: &[(String, String)]) -> Result<Self, Error> {
        let mut w = match name {
            "counter" => Workload::Counter(CounterParams {
                iters: 200_000_000,
                record_every: 100_000,
                batch: 64,
                hb_ms: 0,
                hb_every: 1_000_000,
                stall_at: 0,
                stall_iters: 0,
            }),
            "ticker" => Workload::Ticker(TickerParams {
                iters: 300_000_000,
                record_every: 1_000_000,
                batch: 64,
                tick_us: 1000,
                hb_ms: 100,
            }),
            "dirty" => Workload::Dirty(DirtyParams {
                iters: 1_000_000,
                record_every: 1_000,
                batch: 64,
                ws_mib: 8,
                ws_kib: 0,
                pages: 16,
            }),
            other => {
                return Err(Error::Param(format!(
                    "unknown guest {other:?}: use one of {:?}",
                    Self::NAMES
                )))
            }
        };
        for (k, v) in args {
            let n = parse_u64(k, v)?;
            let slot = match (&mut w, k.as_str()) {
                (Workload::Counter(p), "iters") | (Workload::Counter(p), "n") => &mut p.iters,
                (Workload::Counter(p), "record_every") | (Workload::Counter(p), "k") => {
                    &mut p.record_every
                }
                (Workload::Counter(p), "batch") => &mut p.batch,
                (Workload::Counter(p), "hb_ms") => &mut p.hb_ms,
                (Workload::Ticker(p), "iters") | (Workload::Ticker(p), "n") => &mut p.iters,
                (Workload::Ticker(p), "record_every") | (Workload::Ticker(p), "k") => {
                    &mut p.record_every
                }
                (Workload::Ticker(p), "batch") => &mut p.batch,
                (Workload::Ticker(p), "tick_us") => &mut p.tick_us,
                (Workload::Ticker(p), "hb_ms") => &mut p.hb_ms,
                (Workload::Counter(p), "hb_every") => &mut p.hb_every,
                (Workload::Counter(p), "stall_at") => &mut p.stall_at,
                (Workload::Counter(p), "stall_iters") => &mut p.stall_iters,
                (Workload::Dirty(p), "iters") | (Workload::Dirty(p), "n") => &mut p.iters,
                (Workload::Dirty(p), "record_every") | (Workload::Dirty(p), "k") => {
                    &mut p.record_every
                }
                (Workload::Dirty(p), "batch") => &mut p.batch,
                (Workload::Dirty(p), "ws_mib") | (Workload::Dirty(p), "s") => &mut p.ws_mib,
                (Workload::Dirty(p), "ws_kib") => &mut p.ws_kib,
                (Workload::Dirty(p), "pages") | (Workload::Dirty(p), "w") => &mut p.pages,
                _ => {
                    let keys = match w {
                        Workload::Counter(_) => {
                            "iters, record_every, batch, hb_ms, hb_every, stall_at, stall_iters"
                        }
                        Workload::Dirty(_) => "iters, record_every, batch, ws_mib, ws_kib, pages",
                        Workload::Ticker(_) => "iters, record_every, batch, tick_us, hb_ms",
                    };
                    return Err(Error::Param(format!(
                        "--guest-arg {k}: {name} takes {keys}"
                    )));
                }
            };
            *slot = n;
        }
        w.check_params()?;
        Ok(w)
    }

    fn check_params(&self) -> Result<(), Error> {
        let (iters, every, batch) = match self {
            Workload::Counter(p) => (p.iters, p.record_every, p.batch),
            Workload::Dirty(p) => (p.iters, p.record_every, p.batch),
            Workload::Ticker(p) => (p.iters, p.record_every, p.batch),
        };
        if let Workload::Ticker(p) = self {
            if !(10..=1_000_000).contains(&p.tick_us) {
                return Err(Error::Param("tick_us must be 10 to 1000000".into()));
            }
            if p.hb_ms > 3_600_000 {
                return Err(Error::Param("hb_ms must be 0 to 3600000".into()));
            }
        }
        if iters == 0 || iters > 1 << 48 {
            return Err(Error::Param("iters must be 1 to 2^48".into()));
        }
        if every == 0 || every > u32::MAX as u64 {
            return Err(Error::Param("record_every must be 1 to 2^32-1".into()));
        }
        if !batch.is_power_of_two() || batch > RING_SLOTS {
            return Err(Error::Param(format!(
                "batch must be a power of two from 1 to {RING_SLOTS}"
            )));
        }
        if let Workload::Counter(p) = self {
            if p.hb_ms > 3_600_000 {
                return Err(Error::Param("hb_ms must be 0 to 3600000".into()));
            }
            if p.hb_every == 0 || p.hb_every > u32::MAX as u64 {
                return Err(Error::Param("hb_every must be 1 to 2^32-1".into()));
            }
        }
        if let Workload::Dirty(p) = self {
            if p.ws_mib == 0 || p.ws_mib > 16 * 1024 {
                return Err(Error::Param("ws_mib must be 1 to 16384".into()));
            }
            if p.ws_kib % 4 != 0 || p.ws_kib > 16 << 20 {
                return Err(Error::Param(
                    "ws_kib must be a multiple of 4 from 4 to 16777216 (or 0: use ws_mib)".into(),
                ));
            }
            if p.pages == 0 || p.pages > 1 << 20 {
                return Err(Error::Param("pages must be 1 to 2^20".into()));
            }
        }
        Ok(())
    }

    /// The workload's name.
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Counter(_) => "counter",
            Workload::Dirty(_) => "dirty",
            Workload::Ticker(_) => "ticker",
        }
    }

    /// Checks that the workload fits a VM with this layout.
    pub fn check_fits(&self, layout: &Layout) -> Result<(), Error> {
        if let Workload::Dirty(p) = self {
            let need = p.ws_pages() * 4096;
            if need > layout.data_size() {
                let mib_needed = (monitor::layout::DATA_BASE >> 20)
                    + need.div_ceil(1 << 20) * u64::from(layout.vcpus);
                return Err(Error::Param(format!(
                    "the working set ({} KiB per vCPU) does not fit: each of the {} vCPUs \
                     has {} MiB of data; use --mem-mib {} or more (rounded up to even)",
                    need >> 10,
                    layout.vcpus,
                    layout.data_size() >> 20,
                    mib_needed + mib_needed % 2
                )));
            }
        }
        Ok(())
    }

    /// The guest code, to be loaded and entered at `load_addr`.
    pub fn code(&self, load_addr: u64) -> Result<Vec<u8>, Error> {
        asm::assemble(self, load_addr)
    }

    /// The record stream vCPU `vcpu` must produce, computed by the reference model.
    pub fn reference(&self, vcpu: u32) -> Vec<Record> {
        let mut out = Vec::new();
        let mut emit = |kind: u32, value: u64, aux: u64| {
            let seq = out.len() as u64;
            out.push(Record {
                vcpu,
                kind,
                seq,
                value,
                aux,
            });
        };
        let mut acc = (u64::from(vcpu) + 1).wrapping_mul(SEED);
        match self {
            Workload::Counter(p) => {
                for i in 0..p.iters {
                    acc = (acc ^ i).rotate_left(13).wrapping_mul(MIX);
                    if (i + 1) % p.record_every == 0 {
                        emit(kind::PROGRESS, acc, i + 1);
                    }
                }
                emit(kind::DONE, acc, p.iters);
            }
            Workload::Ticker(p) => {
                // aux (the tick count) depends on timing; the model leaves it 0.
                for i in 0..p.iters {
                    acc = (acc ^ i).rotate_left(13).wrapping_mul(MIX);
                    if (i + 1) % p.record_every == 0 {
                        emit(kind::TICK, acc, 0);
                    }
                }
                emit(kind::DONE, acc, 0);
            }
            Workload::Dirty(p) => {
                let npages = p.ws_pages();
                let mut words = vec![0u64; (npages * 512) as usize];
                let (mut page, mut off, mut j) = (0u64, 0u64, 0u64);
                for i in 0..p.iters {
                    for _ in 0..p.pages {
                        let w = &mut words[(page * 512 + off / 8) as usize];
                        *w = w.wrapping_mul(WORD_MIX).wrapping_add(j);
                        acc = acc.rotate_left(7) ^ *w;
                        j += 1;
                        page += 1;
                        if page == npages {
                            page = 0;
                            off = (off + 8) & 4095;
                        }
                    }
                    if (i + 1) % p.record_every == 0 {
                        emit(kind::PROGRESS, acc, i + 1);
                    }
                }
                emit(kind::DONE, acc, p.iters);
            }
        }
        out
    }

    /// Reference streams for every vCPU (computed on parallel threads).
    pub fn reference_all(&self, vcpus: u32) -> Vec<Vec<Record>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..vcpus)
                .map(|v| s.spawn(move || self.reference(v)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("reference thread"))
                .collect()
        })
    }
}

/// The `counter` loop as a native host function (for the throughput comparison): returns the
/// final checksum. It stores the iteration count to `progress` every iteration, as the guest
/// does.
pub fn native_counter(vcpu: u32, iters: u64, progress: &std::sync::atomic::AtomicU64) -> u64 {
    let mut acc = (u64::from(vcpu) + 1).wrapping_mul(SEED);
    for i in 0..iters {
        acc = (acc ^ i).rotate_left(13).wrapping_mul(MIX);
        progress.store(i + 1, std::sync::atomic::Ordering::Relaxed);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[(&str, &str)]) -> Vec<(String, String)> {
        a.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_and_checks_arguments() {
        let w = Workload::parse("counter", &args(&[("iters", "1M"), ("k", "1_000")])).unwrap();
        assert_eq!(
            w,
            Workload::Counter(CounterParams {
                iters: 1_000_000,
                record_every: 1000,
                batch: 64,
                hb_ms: 0,
                hb_every: 1_000_000,
                stall_at: 0,
                stall_iters: 0,
            })
        );
        assert!(Workload::parse("nope", &[])
            .unwrap_err()
            .to_string()
            .contains("counter"));
        assert!(Workload::parse("counter", &args(&[("ws_mib", "3")])).is_err());
        assert!(Workload::parse("counter", &args(&[("iters", "x")])).is_err());
        assert!(Workload::parse("counter", &args(&[("batch", "3")])).is_err());
        assert!(Workload::parse("dirty", &args(&[("pages", "0")])).is_err());
    }

    #[test]
    fn ws_kib_sets_the_working_set_in_pages_and_is_checked() {
        let w = Workload::parse("dirty", &args(&[("ws_kib", "640")])).unwrap();
        let Workload::Dirty(p) = &w else {
            panic!("not dirty")
        };
        assert_eq!(p.ws_pages(), 160);
        let Workload::Dirty(d) = Workload::parse("dirty", &[]).unwrap() else {
            panic!("not dirty")
        };
        assert_eq!(d.ws_pages(), 8 * 256, "ws_mib when ws_kib is not given");
        assert!(Workload::parse("dirty", &args(&[("ws_kib", "641")])).is_err());
        assert!(Workload::parse("dirty", &args(&[("ws_kib", "17000000")])).is_err());
        // The reference model runs over the same working set as the guest.
        assert!(!w.reference_all(1).is_empty());
    }

    #[test]
    fn working_set_must_fit() {
        let w = Workload::parse("dirty", &args(&[("ws_mib", "32")])).unwrap();
        let err = w
            .check_fits(&Layout::new(64, 4).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--mem-mib 136"), "{err}");
        assert!(w.check_fits(&Layout::new(136, 4).unwrap()).is_ok());
    }

    #[test]
    fn reference_streams_differ_per_vcpu_and_end_with_done() {
        let w = Workload::parse("counter", &args(&[("iters", "1000"), ("k", "100")])).unwrap();
        let (a, b) = (w.reference(0), w.reference(1));
        assert_eq!(a.len(), 11);
        assert_ne!(a, b);
        assert_eq!(a.last().unwrap().kind, kind::DONE);
        assert_eq!(a[3].aux, 400);
    }

    #[test]
    fn code_assembles() {
        for name in Workload::NAMES {
            let code = Workload::parse(name, &[]).unwrap().code(0x20_0000).unwrap();
            assert!(code.len() > 64 && code.len() < 4096);
        }
    }
}
