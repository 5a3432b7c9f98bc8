//! `cargo xtask bench migrate`: planned migration of a 1 GiB guest rewriting a hot set.
//!
//! ```text
//!   sink ─ primary (unprotected, `dirty`, 1 vCPU, 1 GiB, ws_mib = hot set)
//!        └ receiver: tandem standby (pinned to the last CPU, standing in for another host)
//!   tandem ctl primary.sock migrate RECEIVER --max-downtime-ms 5
//!   downtime = the receiver's "guest running" (its takeover report) − the moment the primary
//!              froze the guest for the last epoch (the ctl answer), both Unix ms on this host
//! ```
//!
//! The guest cannot measure the downtime itself: the receiver restores its TSC, so its clock
//! does not move while it is stopped (as with QEMU). Every run's sink stream must equal the
//! reference stream of the whole run, record for record.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use ft::percentile;
use testkit::pair::{check_exact, Pair, PairConfig};

/// Runs per hot set.
const REPS: usize = 3;
/// The downtime budget asked for.
const BUDGET_MS: u64 = 5;
/// Iterations of the guest (long enough to outlive the migration of 1 GiB).
const ITERS: &str = "200M";

/// One migration's numbers.
struct Run {
    downtime_ms: f64,
    stopped_here_ms: f64,
    total_ms: f64,
    epochs: u32,
    last_pages: u64,
    throttle: f64,
    forced: bool,
    records: u64,
    /// The receiver's claim, sink connection and restore, ms.
    steps: (f64, f64, f64),
    /// Of the downtime: the freeze → the receiver starting to take over (last epoch captured,
    /// sent, committed, acknowledged, its output released, the switch sent and read), ms.
    before_takeover_ms: f64,
}

fn one(bin: &std::path::Path, hot_mib: u64, rep: usize) -> Result<Run, String> {
    let dir = std::env::temp_dir().join(format!(
        "tandem-bench-migrate-{}-{hot_mib}-{rep}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let guest: Vec<String> = [
        "--guest",
        "dirty",
        "--vcpus",
        "1",
        "--mem-mib",
        "1024",
        "--guest-arg",
        &format!("ws_mib={hot_mib}"),
        "--guest-arg",
        &format!("iters={ITERS}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cfg = PairConfig {
        bin: bin.to_path_buf(),
        dir: dir.clone(),
        guest,
        interval_ms: 50,
        primary_env: vec![],
        log: "info".into(),
        hosts: crate::bench_stall::other_cpu(),
    };
    let mut pair = Pair::start_sink(cfg).map_err(|e| format!("starting the sink: {e}"))?;
    pair.start_primary_alone()
        .map_err(|e| format!("starting the primary: {e}"))?;
    let t0 = Instant::now();
    while pair.sink_report().accepted == 0 {
        if t0.elapsed() > Duration::from_secs(30) {
            return Err(format!("no output from the primary ({})", dir.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the guest's hot set get hot.
    std::thread::sleep(Duration::from_millis(500));
    let to = pair
        .new_receiver()
        .map_err(|e| format!("starting the receiver: {e}"))?;
    let done = pair
        .migrate(&to, BUDGET_MS)
        .map_err(|e| format!("{e} ({})", dir.display()))?;
    let st = pair
        .promote_receiver(Duration::from_secs(30))
        .ok_or("the old primary did not exit")?;
    if !st.success() {
        return Err(format!("the old primary exited {st} ({})", dir.display()));
    }
    let takeover = pair
        .status("primary")
        .and_then(|s| s.ft)
        .and_then(|ft| ft.failover().cloned())
        .ok_or("the receiver has no takeover report")?;
    let st = pair
        .wait_primary(Duration::from_secs(600))
        .ok_or("the guest did not finish on the receiver")?;
    if !st.success() {
        return Err(format!("the receiver exited {st} ({})", dir.display()));
    }
    let want = workloads::Workload::parse(
        "dirty",
        &[
            ("ws_mib".into(), hot_mib.to_string()),
            ("iters".into(), ITERS.into()),
        ],
    )
    .map_err(|e| e.to_string())?
    .reference_all(1);
    let records = check_exact(&pair, &want)
        .map_err(|e| format!("the stream is not exact: {e} ({})", dir.display()))?;
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Run {
        downtime_ms: takeover.resumed_unix_ms - done.frozen_unix_ms,
        steps: (takeover.claim_ms, takeover.sink_ms, takeover.restore_ms),
        before_takeover_ms: takeover.resumed_unix_ms - takeover.activation_ms - done.frozen_unix_ms,
        stopped_here_ms: done.downtime_ms,
        total_ms: done.total_ms,
        epochs: done.converging_epochs,
        last_pages: done.last_epoch_pages,
        throttle: done.max_throttle,
        forced: done.forced,
        records,
    })
}

/// Runs the benchmark and appends its table to `out`.
pub fn bench(out: &mut String) -> Result<(), String> {
    let bin = crate::pair::build_tandem()?;
    let mut text = format!(
        "### Planned migration (`cargo xtask bench migrate`)\n\n\
         `dirty` guest, 1 vCPU, 1 GiB, rewriting a hot set of `ws_mib` continuously (16 pages \
         an iteration, one word each), running unprotected; a `tandem standby` on a fresh port, \
         pinned to the last CPU (standing in for another host), receives it: `tandem ctl \
         primary.sock migrate ADDR --max-downtime-ms {BUDGET_MS}`, {REPS} runs per hot set. \
         Downtime: the primary froze the guest for the last epoch → the receiver's guest runs \
         (its takeover report), Unix ms of this host's clock; the guest cannot see it (its TSC \
         is restored). Stopped here: freeze → the receiver's confirmation, as the primary sees \
         it. Total: the request → moved (pre-copy of 1 GiB included). Every run's sink stream \
         was checked exact.\n\n\
         Of the downtime, the receiver's claim (file arbiter: create + fsync) and restore of \
         vCPU/device state are shown apart (p50); its hello to the sink comes after the guest \
         runs (output waits for it) and is not downtime.\n\n\
         | hot set | downtime ms p50 (max) | stopped here ms p50 | claim / restore / (sink) ms | total ms p50 | converging epochs | last epoch pages | throttle max | forced |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    for hot in [1u64, 16, 64] {
        let mut runs = Vec::new();
        for rep in 0..REPS {
            let r = one(&bin, hot, rep)?;
            println!(
                "hot {hot} MiB run {rep}: downtime {:.2} ms = {:.2} to the switch + takeover \
                 (claim {:.2}, then sink {:.2} after the restore {:.2} ms); stopped here {:.2} ms; total {:.0} \
                 ms, {} converging epochs, last {} pages, throttle {:.0} %{}, {} records exact",
                r.downtime_ms,
                r.before_takeover_ms,
                r.steps.0,
                r.steps.1,
                r.steps.2,
                r.stopped_here_ms,
                r.total_ms,
                r.epochs,
                r.last_pages,
                r.throttle * 100.0,
                if r.forced { ", forced" } else { "" },
                r.records
            );
            runs.push(r);
        }
        let col = |f: fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
        let down = col(|r| r.downtime_ms);
        let row = format!(
            "| {hot} MiB | {:.2} ({:.2}) | {:.2} | {:.2} / {:.2} / {:.2} | {:.0} | {} | {} | {} | {} |\n",
            percentile(&down, 50.0),
            down.iter().cloned().fold(0.0, f64::max),
            percentile(&col(|r| r.stopped_here_ms), 50.0),
            percentile(&col(|r| r.steps.0), 50.0),
            percentile(&col(|r| r.steps.2), 50.0),
            percentile(&col(|r| r.steps.1), 50.0),
            percentile(&col(|r| r.total_ms), 50.0),
            runs.iter()
                .map(|r| r.epochs.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            runs.iter()
                .map(|r| r.last_pages.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            runs.iter()
                .map(|r| format!("{:.0} %", r.throttle * 100.0))
                .collect::<Vec<_>>()
                .join(", "),
            runs.iter().filter(|r| r.forced).count(),
        );
        print!("{row}");
        text.push_str(&row);
    }
    writeln!(out, "{text}").map_err(|e| e.to_string())
}
