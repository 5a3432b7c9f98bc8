//! `cargo xtask bench stall`: what a protected guest sees of protection.
//!
//! The `stall-probe` guest spins reading its TSC and, with `hot_kib`, writes one qword into the
//! next page of a hot set on every iteration (so it re-dirties the whole set as fast as it
//! runs). It records every gap between two TSC reads longer than 50 µs: a stun, an exit, a
//! preempted vCPU thread. Each configuration runs the same probe for the same guest time:
//!
//! ```text
//!   FT off      tandem run --image stall-probe          → iterations/s (the 100 % line)
//!   FT n Hz     sink ─ standby ─ primary (loopback)      → iterations/s, gaps, primary's pause
//! ```
//!
//! Throughput kept = protected iterations/s ÷ unprotected iterations/s. Stall percentiles are
//! over the gaps the guest recorded (at most `MAX_GAPS`); the stall rate is gaps per second.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use guest_images::model::{self, StallRun};
use testkit::pair::{Pair, PairConfig};

/// Guest time of every run, ms.
const RUN_MS: u64 = 4000;
/// Gaps the probe records at most.
const MAX_GAPS: u64 = 5000;
/// The gap threshold, µs.
const THRESHOLD_US: u64 = 50;

fn probe_args(hot_kib: u64) -> Vec<String> {
    [
        format!("ms={RUN_MS}"),
        format!("hot_kib={hot_kib}"),
        format!("threshold_us={THRESHOLD_US}"),
        format!("max={MAX_GAPS}"),
    ]
    .into_iter()
    .flat_map(|a| ["--guest-arg".to_string(), a])
    .collect()
}

fn guest_cli(image: &Path, hot_kib: u64, sched: Option<&str>) -> Vec<String> {
    let mut v = vec![
        "--image".to_string(),
        image.display().to_string(),
        "--vcpus".into(),
        "1".into(),
        "--mem-mib".into(),
        "256".into(),
    ];
    v.extend(probe_args(hot_kib));
    if let Some(s) = sched {
        v.extend(["--vcpu-sched".to_string(), s.to_string()]);
    }
    v
}

fn parse_records(text: &str) -> Vec<guest_abi::Record> {
    // `tandem run --output`: `vcpu seq kind value aux`, the value in hex.
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 5 {
                return None;
            }
            Some(guest_abi::Record {
                vcpu: f[0].parse().ok()?,
                seq: f[1].parse().ok()?,
                kind: f[2].parse().ok()?,
                value: u64::from_str_radix(f[3], 16).ok()?,
                aux: f[4].parse().ok()?,
            })
        })
        .collect()
}

fn unprotected(
    bin: &Path,
    image: &Path,
    hot_kib: u64,
    sched: Option<&str>,
    dir: &Path,
) -> Result<StallRun, String> {
    let out = dir.join(format!("off-{hot_kib}.txt"));
    let o = std::process::Command::new(bin)
        .arg("run")
        .args(guest_cli(image, hot_kib, sched))
        .arg("--output")
        .arg(&out)
        .output()
        .map_err(|e| format!("tandem run: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "tandem run: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| e.to_string())?;
    model::stall_run(&parse_records(&text))
        .ok_or_else(|| "the unprotected probe did not complete a run".to_string())
}

/// What `bench stall` runs: every hot set at every rate.
pub struct Plan {
    /// Hot sets, MiB.
    pub hot_mib: Vec<u64>,
    /// Epoch rates, Hz.
    pub hz: Vec<u64>,
    /// The vCPU policy (`--vcpu-sched`), tandem's default when `None`.
    pub vcpu_sched: Option<String>,
    /// Rounds: each one an unprotected run, then every rate protected (1..=20).
    pub reps: usize,
}

/// One protected run as the guest and the primary saw it.
struct Protected {
    run: StallRun,
    pause: ft::status::PauseMs,
    throttles: u64,
    /// Epochs, late epochs, NACKs and page bytes on the wire (after the first sync).
    link: (u64, u64, u64, u64),
}

/// One protected run: the probe's view, the primary's epoch pause and its throttles.
fn protected(
    bin: &Path,
    image: &Path,
    hot_kib: u64,
    interval_ms: u64,
    sched: Option<&str>,
    dir: &Path,
) -> Result<Protected, String> {
    // The probe starts once the standby is synced: its run measures protection, not the
    // first sync (`cargo xtask bench first-sync` measures that).
    let mut guest = guest_cli(image, hot_kib, sched);
    guest.push("--paused".into());
    // A new pair each round, in a fresh directory (its keys are made there).
    let pair_dir = dir.join(format!("pair-{hot_kib}-{interval_ms}"));
    let _ = std::fs::remove_dir_all(&pair_dir);
    let cfg = PairConfig {
        bin: bin.to_path_buf(),
        dir: pair_dir,
        guest,
        interval_ms,
        primary_env: vec![],
        log: "warn".into(),
        hosts: Default::default(),
    };
    let mut pair = Pair::start_standby(cfg).map_err(|e| format!("starting the pair: {e}"))?;
    pair.start_primary()
        .map_err(|e| format!("starting the primary: {e}"))?;
    pair.wait_protected(Duration::from_secs(60))
        .ok_or("the paused probe was not protected within 60 s")?;
    pair.resume("primary")
        .map_err(|e| format!("resuming the probe: {e}"))?;
    let st = pair
        .wait_primary(Duration::from_millis(RUN_MS * 10 + 30_000))
        .ok_or("the protected probe did not finish")?;
    if !st.success() {
        return Err(format!(
            "the primary failed ({st}): {}",
            pair.log("primary")
        ));
    }
    let records: Vec<guest_abi::Record> = pair
        .sink_stream()
        .first()
        .map(|v| v.iter().map(|(_, r)| *r).collect())
        .unwrap_or_default();
    let run = model::stall_run(&records)
        .ok_or("the sink did not receive a complete probe run".to_string())?;
    let ft = pair
        .result("primary")
        .and_then(|r| r.ft)
        .ok_or("the primary left no status")?;
    let pause = ft.pause_ms.clone().unwrap_or_default();
    let throttles = ft.primary_counters().map_or(0, |c| c.throttles);
    let link = ft.primary_counters().map_or((0, 0, 0, 0), |c| {
        (
            c.epochs,
            c.late_epochs,
            c.nacks,
            ft.bytes_sent.as_ref().map_or(0, |b| b.pages),
        )
    });
    Ok(Protected {
        run,
        pause,
        throttles,
        link,
    })
}

/// The share of the guest's time spent in recorded stalls, % (a lower bound in a run with
/// more than `MAX_GAPS` stalls; the runs here have fewer than 4,000).
fn stalled_pct(run: &StallRun) -> f64 {
    let total: u64 = run.gaps.iter().map(|g| g.0).sum();
    total as f64 / run.elapsed_ns.max(1) as f64 * 100.0
}

fn gap_ms(run: &StallRun, p: f64) -> f64 {
    let mut g: Vec<u64> = run.gaps.iter().map(|g| g.0).collect();
    if g.is_empty() {
        return 0.0;
    }
    g.sort_unstable();
    let i = ((p / 100.0) * (g.len() - 1) as f64).round() as usize;
    g[i.min(g.len() - 1)] as f64 / 1e6
}

/// The median of `v` (0 when empty).
fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `median unit`, with `(min–max)` after it when there is more than one value.
fn spread(v: &[f64], unit: &str) -> String {
    let m = median(v.iter().copied());
    if v.len() < 2 {
        return format!("{m:.1}{unit}");
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:.1}{unit} ({lo:.1}–{hi:.1})")
}

fn rate(run: &StallRun) -> f64 {
    run.iterations as f64 / (run.elapsed_ns.max(1) as f64 / 1e9)
}

/// Runs the benchmark and appends its table to `out`.
pub fn bench(plan: &Plan, out: &mut String) -> Result<(), String> {
    if plan.hot_mib.is_empty() || plan.hz.is_empty() {
        return Err("bench stall: give at least one --hot-mib and one --hz".into());
    }
    if let Some(h) = plan.hz.iter().find(|&&h| h == 0 || h > 1000) {
        return Err(format!("bench stall: --hz {h} is out of range (1..=1000)"));
    }
    if !(1..=20).contains(&plan.reps) {
        return Err(format!(
            "bench stall: --reps {} is out of range (1..=20)",
            plan.reps
        ));
    }
    if let Some(m) = plan.hot_mib.iter().find(|&&m| m == 0 || m > 128) {
        return Err(format!(
            "bench stall: --hot-mib {m} is out of range (1..=128; the probe has 256 MiB)"
        ));
    }
    let bin = crate::pair::build_tandem()?;
    let dir = std::env::temp_dir().join(format!("tandem-bench-stall-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let image = dir.join("stall-probe");
    std::fs::write(&image, guest_images::STALL_PROBE).map_err(|e| e.to_string())?;
    let mut text = format!(
        "### What the guest sees (`cargo xtask bench stall`)\n\n\
         `stall-probe` guest, 1 vCPU, 256 MiB, {RUN_MS} ms of guest time per run, rewriting one \
         qword per page of its hot set on every loop iteration; gaps over {THRESHOLD_US} µs \
         between two of its TSC reads are stalls. Kept = protected loop iterations/s ÷ \
         unprotected (`tandem run`); in stalls = the share of the guest's time spent in those \
         gaps (its own clock: less noisy than kept, which compares two runs); pause = the \
         epoch pause the primary measures.\n\n\
         | hot set | FT | kept | in stalls | stalls/s | stall p50 ms | stall p99 ms | stall max ms | pause p50 ms | pause p99 ms | throttles |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    let memcpy = crate::floor::memcpy_gib_s();
    let mut breakdown = String::new();
    let sched = plan.vcpu_sched.as_deref();
    for hot_kib in plan.hot_mib.iter().map(|m| m * 1024) {
        // Round r: the unprotected run, then each rate; kept compares a round's runs.
        let mut offs = Vec::new();
        let mut prot: Vec<Vec<Protected>> = plan.hz.iter().map(|_| Vec::new()).collect();
        for _ in 0..plan.reps {
            offs.push(unprotected(&bin, &image, hot_kib, sched, &dir)?);
            for (i, hz) in plan.hz.iter().enumerate() {
                prot[i].push(protected(&bin, &image, hot_kib, 1000 / hz, sched, &dir)?);
            }
        }
        let per_s = |r: &StallRun| r.over as f64 / (r.elapsed_ns.max(1) as f64 / 1e9);
        let row = format!(
            "| {} MiB | off | 100 % | {:.1} % | {:.1} | {:.3} | {:.3} | {:.3} | – | – | – |\n",
            hot_kib / 1024,
            median(offs.iter().map(stalled_pct)),
            median(offs.iter().map(per_s)),
            median(offs.iter().map(|r| gap_ms(r, 50.0))),
            median(offs.iter().map(|r| gap_ms(r, 99.0))),
            offs.iter().map(|r| r.largest_ns).max().unwrap_or(0) as f64 / 1e6
        );
        print!("{row}");
        text.push_str(&row);
        for (hz, ps) in plan.hz.iter().zip(&prot) {
            let kept: Vec<f64> = ps
                .iter()
                .zip(&offs)
                .map(|(p, off)| rate(&p.run) / rate(off) * 100.0)
                .collect();
            let stalled: Vec<f64> = ps.iter().map(|p| stalled_pct(&p.run)).collect();
            let row = format!(
                "| {} MiB | {hz} Hz | {} | {} | {:.1} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} |\n",
                hot_kib / 1024,
                spread(&kept, " %"),
                spread(&stalled, " %"),
                median(ps.iter().map(|p| per_s(&p.run))),
                median(ps.iter().map(|p| gap_ms(&p.run, 50.0))),
                median(ps.iter().map(|p| gap_ms(&p.run, 99.0))),
                ps.iter().map(|p| p.run.largest_ns).max().unwrap_or(0) as f64 / 1e6,
                median(ps.iter().map(|p| p.pause.p50)),
                median(ps.iter().map(|p| p.pause.p99)),
                ps.iter().map(|p| p.throttles).sum::<u64>(),
            );
            print!("{row}");
            text.push_str(&row);
            // The phases of the round with the median pause.
            let mut by_pause: Vec<&Protected> = ps.iter().collect();
            by_pause.sort_by(|a, b| a.pause.p50.total_cmp(&b.pause.p50));
            let mid = by_pause[by_pause.len() / 2];
            let phases: Vec<String> = mid
                .pause
                .phases_p50
                .iter()
                .map(|ph| format!("{} {:.3}", ph.phase, ph.ms))
                .collect();
            let (epochs, late, nacks, wire) = mid.link;
            let _ = writeln!(
                breakdown,
                "| {} MiB | {hz} Hz | {} | {epochs} · {late} · {nacks} · {:.1} |",
                hot_kib / 1024,
                phases.join(" · "),
                wire as f64 / 1024.0 / epochs.max(1) as f64
            );
        }
    }
    if plan.reps > 1 {
        let note = format!(
            "\n{} rounds; kept is the median of each round's protected ÷ unprotected (range in \
             brackets), the other columns medians over rounds (stall max: the largest; \
             throttles: the sum).\n",
            plan.reps
        );
        print!("{note}");
        text.push_str(&note);
    }
    let line = format!(
        "\nThe physical limit, measured in the same run: one thread copies {memcpy:.1} GiB/s \
         here (256 MiB, best of 5), so copying 1 MiB takes {:.3} ms and 16 MiB {:.2} ms.\n",
        1.0 / 1024.0 / memcpy * 1e3,
        16.0 / 1024.0 / memcpy * 1e3
    );
    print!("{line}");
    text.push_str(&line);
    let table = format!(
        "\nWhere the pause goes (median of each phase, ms; `vmx::machine::PAUSE_PHASES`), and \
         what the link carried in that run (epochs, late epochs, NACKs, page KiB on the wire \
         per epoch):\n\n\
         | hot set | FT | phases p50 ms | epochs · late · NACKs · KiB/epoch |\n|---|---|---|---|\n\
         {breakdown}"
    );
    print!("{table}");
    text.push_str(&table);
    let _ = std::fs::remove_dir_all(&dir);
    writeln!(out, "{text}").map_err(|e| e.to_string())
}

/// Hosts of a pair on one machine, the standby standing in for another host: pinned to the
/// last CPU (`taskset`), so that its work on a sync does not take the primary guest's CPU as
/// it would not on two hosts. Unpinned on a machine with one CPU.
pub fn other_cpu() -> testkit::pair::Hosts {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut h = testkit::pair::Hosts::default();
    if cpus > 1 {
        h.standby_prefix = vec!["taskset".into(), "-c".into(), (cpus - 1).to_string()];
    }
    h
}

/// Guest time of a `first-sync` run, ms (long enough for the sync of 1 GiB and some epochs).
const FIRST_SYNC_MS: u64 = 9000;

/// `cargo xtask bench first-sync`: what a 1 GiB guest with a 16 MiB hot set sees when
/// `tandem primary` starts protecting it (the probe starts with the primary; the standby of
/// the start gets its full sync then). `TANDEM_BIN=PATH` measures another build the same way.
pub fn bench_first_sync(out: &mut String) -> Result<(), String> {
    let bin = crate::pair::build_tandem()?;
    let label = match std::env::var_os("TANDEM_BIN") {
        Some(b) => format!("`{}`", b.to_string_lossy()),
        None => "this tree".to_string(),
    };
    let dir = std::env::temp_dir().join(format!("tandem-bench-first-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let image = dir.join("stall-probe");
    std::fs::write(&image, guest_images::STALL_PROBE).map_err(|e| e.to_string())?;
    let hot_kib = 16 * 1024;
    let mut guest = vec![
        "--image".to_string(),
        image.display().to_string(),
        "--vcpus".into(),
        "1".into(),
        "--mem-mib".into(),
        "1024".into(),
    ];
    for a in [
        format!("ms={FIRST_SYNC_MS}"),
        format!("hot_kib={hot_kib}"),
        "threshold_us=1000".to_string(),
        format!("max={MAX_GAPS}"),
    ] {
        guest.extend(["--guest-arg".to_string(), a]);
    }
    let cfg = PairConfig {
        bin: bin.clone(),
        dir: dir.join("pair"),
        guest,
        interval_ms: 50,
        primary_env: vec![],
        log: "info".into(),
        hosts: other_cpu(),
    };
    let mut pair = Pair::start_standby(cfg).map_err(|e| format!("starting the pair: {e}"))?;
    pair.start_primary()
        .map_err(|e| format!("starting the primary: {e}"))?;
    let st = pair
        .wait_primary(Duration::from_millis(FIRST_SYNC_MS * 10 + 30_000))
        .ok_or("the protected probe did not finish")?;
    if !st.success() {
        return Err(format!(
            "the primary failed ({st}): {}",
            pair.log("primary")
        ));
    }
    let records: Vec<guest_abi::Record> = pair
        .sink_stream()
        .first()
        .map(|v| v.iter().map(|(_, r)| *r).collect())
        .unwrap_or_default();
    let run = model::stall_run(&records)
        .ok_or("the sink did not receive a complete probe run".to_string())?;
    let ft = pair
        .result("primary")
        .and_then(|r| r.ft)
        .ok_or("the primary left no status")?;
    let pause = ft.pause_ms.clone().unwrap_or_default();
    let c = ft.primary_counters().cloned().unwrap_or_default();
    let sync = ft.last_sync.clone();
    let mut gaps = run.gaps.clone();
    gaps.sort_unstable_by_key(|g| std::cmp::Reverse(g.0));
    let top: Vec<String> = gaps
        .iter()
        .take(3)
        .map(|(g, at)| format!("{:.1} ms at {:.2} s", *g as f64 / 1e6, *at as f64 / 1e9))
        .collect();
    let mut text = format!(
        "### Protection from the first second (`cargo xtask bench first-sync`)\n\n\
         `stall-probe` guest, 1 vCPU, 1 GiB, a 16 MiB hot set rewritten as fast as it runs, \
         {FIRST_SYNC_MS} ms of guest time; `tandem primary` starts it and protects it with the \
         standby it connects to at start (50 ms epochs); the standby is pinned to the last CPU \
         (`taskset`), standing in for a host of its own. Gaps: what the guest saw (over 1 ms \
         between two TSC reads). The build: {label}.\n\n\
         Throttled: the time the primary kept the guest stunned waiting for the standby (the \
         stunned full sync of earlier builds waited there for the full sync's \
         acknowledgement; when that began before the probe's first instruction, the probe \
         cannot see it).\n\n\
         | largest guest-seen gaps | gaps > 1 ms | sync (connect → commit) ms | completing epoch: pages, pause ms (of which waiting for the vCPU to stop) | epoch pause p50 / p99 / max ms | throttles, throttled ms |\n\
         |---|---|---|---|---|---|\n"
    );
    let row = format!(
        "| {} | {} | {} | {} | {:.2} / {:.2} / {:.2} | {}, {:.0} |\n",
        top.join(", "),
        run.over,
        sync.as_ref()
            .map_or("–".into(), |s| format!("{:.0}", s.joined_to_protected_ms)),
        sync.as_ref()
            .map_or("– (stunned full sync)".into(), |s| format!(
                "{}, {:.2} (stun {:.2})",
                s.completing_pages, s.completing_pause_ms, s.completing_stun_ms
            )),
        pause.p50,
        pause.p99,
        pause.max,
        c.throttles,
        c.throttled_ms,
    );
    print!("{row}");
    text.push_str(&row);
    if std::env::var_os("TANDEM_BENCH_KEEP").is_some() {
        println!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    writeln!(out, "{text}").map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread_of_rounds() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert_eq!(median(std::iter::empty()), 0.0);
        assert_eq!(spread(&[97.44], " %"), "97.4 %");
        assert_eq!(spread(&[90.0, 98.0, 95.0], " %"), "95.0 % (90.0–98.0)");
    }
}
