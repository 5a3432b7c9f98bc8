//! `cargo xtask bench tracking`: dirty bitmap, dirty ring or copy-on-write epochs, as the guest
//! sees them (issue 15: measure, not assume).
//!
//! The `stall-probe` guest (1 vCPU, 256 MiB) rewrites a hot set (one qword per page per loop
//! iteration) for `RUN_MS` ms while this process captures it every `EPOCH_MS` ms, with no
//! standby and no network: only the capture.
//!
//! ```text
//!   off     nothing (the 100 % line)
//!   bitmap  stun ─ DirtyLog::take_epoch (KVM bitmap, hot pages kept writable, CLEAR every
//!           4th take) ─ copy_runs ─ unstun                        (today's epoch capture)
//!   ring    stun ─ harvest the vCPU dirty rings + KVM_RESET_DIRTY_RINGS ─ copy_runs ─ unstun
//!   cow     stun ─ take_epoch ─ UFFDIO_WRITEPROTECT the dirty runs ─ unstun; then the copier
//!           copies and un-protects chunk by chunk while a handler thread copies first any
//!           page the guest faults on (monitor::cow)
//! ```
//!
//! Modes run interleaved (off, bitmap, ring, cow, off, …) and the whole set `REPS` times,
//! because the machine is shared and noisy. Kept = iterations/s ÷ the same repetition's `off`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_abi::Record;
use guest_images::model::{self, StallRun};
use monitor::cow::{CowEpochReport, CowTracker};
use monitor::{ModuleTable, UserRpc, Vm, VmConfig};

/// Guest time of every run, ms.
const RUN_MS: u64 = 4000;
/// Capture interval (20 Hz).
const EPOCH_MS: u64 = 50;
/// Gap threshold, µs, and most gap records.
const THRESHOLD_US: u64 = 50;
const MAX_GAPS: u64 = 5000;
/// Dirty ring per vCPU in the bench: 65,536 entries (this host's maximum), so a 16 MiB hot
/// set (4,096 pages) never fills it within an epoch.
const RING_BYTES: u32 = 1 << 20;
/// Repetitions of the interleaved set.
const REPS: usize = 3;

/// How dirty pages are tracked and captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No capture.
    Off,
    /// KVM dirty bitmap, today's path.
    Bitmap,
    /// KVM dirty ring.
    Ring,
    /// Bitmap + userfaultfd write-protect, copy after the unstun.
    Cow,
    /// Cow with the copier held back `LATE_MS` after the unstun: the fault handler copies
    /// every page the guest writes first (measures the uffd fault path).
    CowLate,
}

/// How long `cow-late` holds the copier back, ms.
const LATE_MS: u64 = 25;

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Bitmap => "bitmap",
            Mode::Ring => "ring",
            Mode::Cow => "cow",
            Mode::CowLate => "cow-late",
        }
    }
}

/// One run's result.
pub struct Run {
    /// The probe's view.
    pub probe: StallRun,
    /// Stun → unstun of every epoch.
    pub pauses: Vec<Duration>,
    /// Pages captured per epoch.
    pub pages: Vec<u64>,
    /// Copy-on-write epochs.
    pub cow: Vec<CowEpochReport>,
    /// Dirty ring: entries harvested, ring-full exits.
    pub ring_harvested: u64,
    /// Dirty ring full exits.
    pub ring_full: u64,
    /// Pages checked against guest memory (verify runs only).
    pub verified_pages: u64,
    /// Pages the guest changed between the stun and the end of a cow copy (verify runs).
    pub written_during_copy: u64,
    /// KVM's own counters of vCPU 0 over the run (delta): [`KVM_COUNTERS`].
    pub kvm: [u64; 4],
}

/// The KVM statistics `Run::kvm` holds.
const KVM_COUNTERS: [&str; 4] = ["pf_taken", "pf_fixed", "exits", "tlb_flush"];

/// What a run is.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// Tracking mode.
    pub mode: Mode,
    /// Hot set KiB.
    pub hot_kib: u64,
    /// Guest RAM MiB.
    pub mem_mib: u64,
    /// Guest run time, ms.
    pub run_ms: u64,
    /// Dirty ring bytes (ring mode).
    pub ring_bytes: u32,
    /// Check every epoch's pages against guest memory (slow: whole-memory compares while
    /// stunned).
    pub verify: bool,
    /// Cow: let the guest run this long after the unstun before the copier starts (so that
    /// it meets protected pages: the check then means something).
    pub copy_delay: Duration,
}

struct Collect(Vec<Record>);

impl devices::OutputSink for Collect {
    fn records(&mut self, _vcpu: u32, records: &[Record]) -> std::io::Result<()> {
        self.0.extend_from_slice(records);
        Ok(())
    }
}

/// `len` bytes of guest memory from `gpa` (through the epochs' own copier).
fn read_mem(vm: &Vm, gpa: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut runs = vm
        .dirty_log()
        .copy_runs(&[(gpa / 4096, len as u64 / 4096)])
        .map_err(|e| e.to_string())?;
    Ok(runs.pop().map(|r| r.data).unwrap_or_default())
}

/// The vCPU thread's policy: SCHED_OTHER unless `TANDEM_TRACKING_SCHED=idle`. Tandem's
/// default, SCHED_IDLE, lets every other runnable thread of a shared machine preempt the
/// guest, which then measures the neighbours' load more than the tracking.
fn sched() -> monitor::VcpuSched {
    match std::env::var("TANDEM_TRACKING_SCHED").as_deref() {
        Ok("idle") => monitor::VcpuSched::Idle,
        _ => monitor::VcpuSched::Normal,
    }
}

/// Runs the probe once under `s`.
pub fn run(s: Setup) -> Result<Run, String> {
    let e = |e: monitor::Error| e.to_string();
    let image = guest_images::STALL_PROBE;
    let at = monitor::layout::LOAD_ADDR;
    let entry = monitor::image::entry_point(image, at, None).map_err(e)?;
    let cfg = VmConfig {
        entry,
        boot_args: format!(
            "ms={} hot_kib={} threshold_us={THRESHOLD_US} max={MAX_GAPS}",
            s.run_ms, s.hot_kib
        ),
        dirty_ring_bytes: if s.mode == Mode::Ring {
            s.ring_bytes
        } else {
            0
        },
        vcpu_sched: sched(),
        ..VmConfig::new(s.mem_mib, 1)
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let vm = Arc::new(Vm::new(&cfg, ModuleTable::standard(vec![]), tx).map_err(e)?);
    vm.load_guest(image, at, Some(entry)).map_err(e)?;
    let rings = vec![vm.layout().ring(0)];
    let mut dev = devices::OutputDevice::new(vm.memory().clone(), rings);
    let drainer = std::thread::spawn(move || {
        let mut sink = Collect(Vec::new());
        for rpc in rx.iter() {
            match rpc {
                UserRpc::OutputDoorbell { vcpu } => {
                    let _ = dev.drain(vcpu, &mut sink);
                }
                UserRpc::VcpuDone { vcpu } => {
                    let _ = dev.drain(vcpu, &mut sink);
                    break;
                }
                UserRpc::VcpuError { error, .. } => {
                    log::error!("vCPU failed: {error}");
                    break;
                }
                _ => {}
            }
        }
        sink.0
    });
    let cow = match s.mode {
        Mode::Cow | Mode::CowLate => Some(CowTracker::new(vm.memory()).map_err(e)?),
        _ => None,
    };
    let log = vm.dirty_log();
    let mut r = Run {
        probe: StallRun::default(),
        pauses: Vec::new(),
        pages: Vec::new(),
        cow: Vec::new(),
        ring_harvested: 0,
        ring_full: 0,
        verified_pages: 0,
        written_during_copy: 0,
        kvm: [0; 4],
    };
    let kstats = vm.vcpu_kvm_stats(0).map_err(e)?;
    if std::env::var_os("TANDEM_KVM_STATS_NAMES").is_some() {
        eprintln!("KVM vCPU statistics: {:?}", kstats.names());
    }
    let kread = || KVM_COUNTERS.map(|n| kstats.get(n).unwrap_or(0));
    let k0 = kread();
    let mut shadow: Option<Vec<u8>> = None;
    vm.start().map_err(e)?;
    let stats = || vm.vcpu_stats(0);
    let deadline = Instant::now() + Duration::from_millis(s.run_ms * 10 + 30_000);
    let mut next = Instant::now() + Duration::from_millis(EPOCH_MS);
    while !stats().done.load(Ordering::Acquire) {
        if drainer.is_finished() || Instant::now() > deadline {
            break;
        }
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(5)));
            continue;
        }
        next += Duration::from_millis(EPOCH_MS);
        if next < Instant::now() {
            next = Instant::now() + Duration::from_millis(EPOCH_MS);
        }
        if s.mode == Mode::Off {
            continue;
        }
        let t0 = Instant::now();
        let g = vm.stun().map_err(e)?;
        let dirty = log.take_epoch().map_err(e)?;
        let runs = dirty.runs();
        r.pages.push(runs.iter().map(|r| r.1).sum());
        if s.verify {
            // Every page the guest changed since the last epoch must be in this one's set.
            let now_mem = read_mem(&vm, 0, vm.layout().mem_bytes as usize)?;
            if let Some(old) = &shadow {
                let bits = dirty.bitmap();
                for (p, (a, b)) in old.chunks(4096).zip(now_mem.chunks(4096)).enumerate() {
                    let set = bits.get(p / 64).copied().unwrap_or(0) >> (p % 64) & 1 == 1;
                    if a != b && !set {
                        return Err(format!(
                            "{}: page {p} changed but is not in the epoch's dirty set",
                            s.mode.name()
                        ));
                    }
                }
            }
            shadow = Some(now_mem);
        }
        match &cow {
            None => {
                let copied = log.copy_runs(&runs).map_err(e)?;
                if s.verify {
                    let mem = shadow.as_ref().expect("verify keeps a shadow");
                    for run in &copied {
                        let at = run.gpa as usize;
                        if run.data != mem[at..at + run.data.len()] {
                            return Err(format!("copied run at {:#x} differs", run.gpa));
                        }
                        r.verified_pages += run.data.len() as u64 / 4096;
                    }
                }
                g.unstun().map_err(e)?;
                r.pauses.push(t0.elapsed());
                monitor::dirty::recycle(copied);
            }
            Some(cow) => {
                let epoch = cow.protect(&runs).map_err(e)?;
                g.unstun().map_err(e)?;
                r.pauses.push(t0.elapsed());
                std::thread::sleep(if s.mode == Mode::CowLate {
                    Duration::from_millis(LATE_MS)
                } else {
                    s.copy_delay
                });
                let (copied, rep) = cow.copy(epoch).map_err(e)?;
                r.cow.push(rep);
                if s.verify {
                    // The copy must be memory at the stun, whatever the guest wrote since.
                    let mem = shadow.as_ref().expect("verify keeps a shadow");
                    for run in &copied {
                        let at = run.gpa as usize;
                        let stunned = &mem[at..at + run.data.len()];
                        for (i, (c, m)) in
                            run.data.chunks(4096).zip(stunned.chunks(4096)).enumerate()
                        {
                            if c != m {
                                return Err(format!(
                                    "cow: page {:#x} copied after the unstun differs from \
                                     memory at the stun",
                                    run.gpa + i as u64 * 4096
                                ));
                            }
                        }
                        let now_mem = read_mem(&vm, run.gpa, run.data.len())?;
                        r.written_during_copy += now_mem
                            .chunks(4096)
                            .zip(stunned.chunks(4096))
                            .filter(|(a, b)| a != b)
                            .count() as u64;
                        r.verified_pages += run.data.len() as u64 / 4096;
                    }
                }
            }
        }
    }
    let records = drainer.join().map_err(|_| "the drain thread panicked")?;
    let k1 = kread();
    for i in 0..KVM_COUNTERS.len() {
        r.kvm[i] = k1[i].saturating_sub(k0[i]);
    }
    if let Some(ring) = vm.dirty_rings() {
        r.ring_harvested = ring.stats.harvested.load(Ordering::Relaxed);
        r.ring_full = ring.stats.full_exits.load(Ordering::Relaxed);
    }
    drop(cow);
    r.probe = model::stall_run(&records).ok_or_else(|| {
        format!(
            "{} {} KiB: the probe did not complete a run ({} records)",
            s.mode.name(),
            s.hot_kib,
            records.len()
        )
    })?;
    Ok(r)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn rate(run: &StallRun) -> f64 {
    run.iterations as f64 / (run.elapsed_ns.max(1) as f64 / 1e9)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

const HEAD: &str = "| hot set | mode | kept | stall p50 ms | stall p99 ms | stall max ms | gaps > 50 µs | pause p50 ms | pause p99 ms | pages/epoch | KVM pf/epoch | exits/epoch | µs lost per KVM pf | uffd faults/epoch | cow copy done p50 / p99 ms (protect p50) | ring full |\n\
                    |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";

/// A table row; `base` = the same repetition's `off` iterations/s.
fn row(hot_kib: u64, mode: Mode, r: &Run, base: f64) -> String {
    let p = &r.probe;
    let gaps = sorted(p.gaps.iter().map(|g| g.0 as f64 / 1e6).collect());
    let pauses = sorted(r.pauses.iter().map(|d| d.as_secs_f64() * 1e3).collect());
    // Per epoch = per EPOCH_MS of guest time (also for `off`, which has no epochs).
    let epochs = (p.elapsed_ns as f64 / 1e6 / EPOCH_MS as f64).max(1.0);
    let pages = mean(&r.pages.iter().map(|&n| n as f64).collect::<Vec<_>>());
    let kept = rate(p) / base;
    let [_, pf_fixed, exits, _] = r.kvm;
    // Guest time lost beyond the pauses, per page fault KVM fixed.
    let lost_ms = (1.0 - kept) * p.elapsed_ns as f64 / 1e6 - pauses.iter().sum::<f64>();
    let per_fault = if mode == Mode::Off || pf_fixed == 0 {
        "–".to_string()
    } else {
        format!("{:.1}", lost_ms * 1e3 / pf_fixed as f64)
    };
    let (uffd, copy) = if matches!(mode, Mode::Cow | Mode::CowLate) {
        let c = sorted(
            r.cow
                .iter()
                .map(|c| c.copy_time.as_secs_f64() * 1e3)
                .collect(),
        );
        let prot = sorted(
            r.cow
                .iter()
                .map(|c| c.protect_time.as_secs_f64() * 1e3)
                .collect(),
        );
        let f: u64 = r.cow.iter().map(|c| c.faults).sum();
        (
            format!("{:.1}", f as f64 / r.cow.len().max(1) as f64),
            format!(
                "{:.2} / {:.2} ({:.2})",
                pct(&c, 50.0),
                pct(&c, 99.0),
                pct(&prot, 50.0)
            ),
        )
    } else {
        ("–".into(), "–".into())
    };
    let dash = |v: f64| {
        if mode == Mode::Off {
            "–".to_string()
        } else {
            format!("{v:.3}")
        }
    };
    format!(
        "| {} MiB | {} | {:.1} % | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {:.0} | {:.0} | {per_fault} | {uffd} | {copy} | {} |\n",
        hot_kib / 1024,
        mode.name(),
        kept * 100.0,
        pct(&gaps, 50.0),
        pct(&gaps, 99.0),
        p.largest_ns as f64 / 1e6,
        p.over,
        dash(pct(&pauses, 50.0)),
        dash(pct(&pauses, 99.0)),
        if mode == Mode::Off {
            "–".into()
        } else {
            format!("{pages:.0}")
        },
        pf_fixed as f64 / epochs,
        exits as f64 / epochs,
        if mode == Mode::Ring {
            r.ring_full.to_string()
        } else {
            "–".into()
        },
    )
}

/// Runs the benchmark and appends its tables to `out`.
pub fn bench(out: &mut String) -> Result<(), String> {
    let modes = [
        Mode::Off,
        Mode::Bitmap,
        Mode::Ring,
        Mode::Cow,
        Mode::CowLate,
    ];
    let mut text = format!(
        "### Dirty tracking: bitmap, ring, copy-on-write (`cargo xtask bench tracking`)\n\n\
         `stall-probe` guest, 1 vCPU, 256 MiB, {RUN_MS} ms of guest time per run, rewriting one \
         qword per page of its hot set on every loop iteration; captured every {EPOCH_MS} ms \
         with no standby (stun, harvest, copy, unstun); vCPU thread {:?} \
         (`TANDEM_TRACKING_SCHED=idle` for Tandem's default). Modes interleaved within each \
         repetition. Kept = iterations/s ÷ the same repetition's `off`. Pause = stun to \
         unstun. KVM pf = page faults KVM fixed (`pf_fixed` of vCPU 0's KVM statistics) and \
         exits = KVM's exit count, both per 50 ms of guest time; µs lost per KVM pf = (guest \
         time lost − pauses) ÷ KVM pf. uffd faults = write-protect faults the cow handler \
         read, per epoch. Cow copy done = from the write-protect to the last page copied (the guest runs meanwhile); \
         protect = the UFFDIO_WRITEPROTECT calls, inside the pause. `cow-late` holds the copier \
         back {LATE_MS} ms so that the fault handler serves every page the guest writes first.\n\n",
        sched()
    );
    for rep in 1..=REPS {
        let mut t = format!("Run {rep} of {REPS}:\n\n{HEAD}");
        print!("Run {rep} of {REPS}:\n\n{HEAD}");
        for hot_kib in [1024u64, 16 * 1024] {
            let mut base = 0.0;
            for mode in modes {
                let r = run(Setup {
                    mode,
                    hot_kib,
                    mem_mib: 256,
                    run_ms: RUN_MS,
                    ring_bytes: RING_BYTES,
                    verify: false,
                    copy_delay: Duration::ZERO,
                })?;
                if mode == Mode::Off {
                    base = rate(&r.probe);
                }
                let line = row(hot_kib, mode, &r, base);
                print!("{line}");
                t.push_str(&line);
            }
        }
        t.push('\n');
        println!();
        text.push_str(&t);
    }
    writeln!(out, "{text}").map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm() -> bool {
        std::path::Path::new("/dev/kvm").exists()
    }

    /// The VM tests run one at a time: on a 2-CPU machine three guests at once starve each
    /// other of the faults the checks need.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn verify(mode: Mode, ring_bytes: u32) -> Run {
        let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        run(Setup {
            mode,
            hot_kib: 4096,
            mem_mib: 64,
            run_ms: 1000,
            ring_bytes,
            verify: true,
            copy_delay: Duration::from_millis(10),
        })
        .unwrap()
    }

    #[test]
    fn bitmap_and_ring_epochs_hold_every_changed_page_and_copy_it_exactly() {
        if !kvm() {
            return;
        }
        for (mode, ring) in [(Mode::Bitmap, 0), (Mode::Ring, RING_BYTES)] {
            let r = verify(mode, ring);
            eprintln!(
                "{mode:?}: {} epochs, {} pages checked, KVM pf_fixed {}",
                r.pages.len(),
                r.verified_pages,
                r.kvm[1]
            );
            assert!(r.pages.len() > 5, "{mode:?}: epochs ran");
            assert!(r.verified_pages > 100, "{mode:?}: pages were checked");
            if mode == Mode::Ring {
                assert!(r.ring_harvested > 0, "the ring saw the guest's writes");
            }
        }
    }

    #[test]
    fn a_full_dirty_ring_is_harvested_by_the_vcpu_and_nothing_is_lost() {
        if !kvm() {
            return;
        }
        // 4 KiB = 256 entries, less the reserve KVM keeps: far fewer than the 1,024 pages of
        // the hot set the guest rewrites between two epochs.
        let r = verify(Mode::Ring, 4 << 10);
        eprintln!(
            "ring of 256 entries: {} epochs, {} full exits, {} entries harvested, {} pages checked",
            r.pages.len(),
            r.ring_full,
            r.ring_harvested,
            r.verified_pages
        );
        assert!(r.ring_full > 0, "the ring filled");
        assert!(r.verified_pages > 100, "pages were checked");
    }

    #[test]
    fn cow_copies_equal_memory_at_the_stun_while_the_guest_writes_on() {
        if !kvm() {
            return;
        }
        let r = verify(Mode::Cow, 0);
        let faults: u64 = r.cow.iter().map(|c| c.faults).sum();
        let handler: u64 = r.cow.iter().map(|c| c.handler_copies).sum();
        eprintln!(
            "cow: {} epochs, {} pages checked, {faults} write-protect faults, {handler} pages \
             copied by the fault handler, {} pages rewritten during the copies",
            r.cow.len(),
            r.verified_pages,
            r.written_during_copy
        );
        assert!(r.verified_pages > 100, "pages were checked");
        assert!(
            faults > 0,
            "the guest's writes through KVM raised userfaultfd write-protect faults"
        );
        assert!(
            r.written_during_copy > 0,
            "the guest wrote protected pages during the copy (so the check means something)"
        );
    }
}
