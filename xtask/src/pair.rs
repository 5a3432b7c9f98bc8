//! `cargo xtask run-pair` and `cargo xtask bench ft`: a protected pair of real `tandem`
//! processes on loopback.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmx::ft::pair::{Pair, PairConfig};
use vmx::ft::{percentile, unix_ms};

/// Options of `run-pair`.
#[derive(clap::Args, Clone, Debug)]
pub struct RunPairArgs {
    /// SIGKILL the primary this many ms after it started (the standby takes over).
    #[arg(long, value_name = "MS")]
    pub kill_primary_after_ms: Option<u64>,
    /// Epoch interval in ms.
    #[arg(long, default_value_t = 50)]
    pub interval_ms: u64,
    /// Workload guest: counter or dirty.
    #[arg(long, default_value = "dirty")]
    pub guest: String,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
    /// Workload parameter KEY=VALUE (repeatable), e.g. iters=20M.
    #[arg(long = "guest-arg", value_name = "KEY=VALUE")]
    pub guest_args: Vec<String>,
    /// Keep the working directory (keys, logs, the sink's records).
    #[arg(long)]
    pub keep: bool,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Builds the release `tandem` and returns its path.
pub fn build_tandem() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = std::process::Command::new(cargo)
        .current_dir(root())
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "vmx",
            "--bin",
            "tandem",
        ])
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !st.success() {
        return Err("building tandem failed".into());
    }
    Ok(root().join("target/release/tandem"))
}

fn kv(args: &[String]) -> Result<Vec<(String, String)>, String> {
    args.iter()
        .map(|a| {
            a.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("--guest-arg {a:?} is not KEY=VALUE"))
        })
        .collect()
}

fn guest_cli(guest: &str, vcpus: u32, mem_mib: u64, args: &[(String, String)]) -> Vec<String> {
    let mut v = vec![
        "--guest".into(),
        guest.into(),
        "--vcpus".into(),
        vcpus.to_string(),
        "--mem-mib".into(),
        mem_mib.to_string(),
    ];
    for (k, val) in args {
        v.push("--guest-arg".into());
        v.push(format!("{k}={val}"));
    }
    v
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / (1 << 20) as f64)
}

fn status_line(t: f64, s: &Value, sink_records: u64, last: &mut (f64, u64)) -> String {
    let ft = &s["ft"];
    let sent = ft["bytes_sent"]["pages"].as_f64().unwrap_or(0.0)
        + ft["bytes_sent"]["state"].as_f64().unwrap_or(0.0);
    let rate = if t > last.0 {
        (sink_records.saturating_sub(last.1)) as f64 / (t - last.0)
    } else {
        0.0
    };
    *last = (t, sink_records);
    format!(
        "t={t:5.1}s {} gen {} epoch {} ack {} | pause p50 {:.2} ms p99 {:.2} ms | lag {:.1} ms | sent {} | sink {} records ({:.0}/s)",
        ft["role"].as_str().unwrap_or("?"),
        ft["generation"],
        ft["epoch"],
        ft["last_ack"],
        ft["pause_ms"]["p50"].as_f64().unwrap_or(0.0),
        ft["pause_ms"]["p99"].as_f64().unwrap_or(0.0),
        ft["lag_ms"].as_f64().unwrap_or(0.0),
        mib(sent),
        sink_records,
        rate,
    )
}

/// What one pair run produced.
pub struct PairRun {
    /// The primary's last status (or final JSON).
    pub primary: Value,
    /// The primary's run report (when it finished).
    pub primary_report: Value,
    /// The standby's final JSON.
    pub standby: Value,
    /// Kill → the standby's guest running, ms.
    pub failover_ms: Option<f64>,
    /// The sink's verdict.
    pub sink: vmx::ft::sink::SinkReport,
    /// The sink's stream equals the reference model's.
    pub exact: Option<bool>,
    /// The directory.
    pub dir: PathBuf,
}

/// Runs one pair; `live` prints the status line.
pub fn run_pair_once(
    bin: &std::path::Path,
    a: &RunPairArgs,
    live: bool,
) -> Result<PairRun, String> {
    let kvs = kv(&a.guest_args)?;
    let w = workloads::Workload::parse(&a.guest, &kvs).map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!(
        "tandem-pair-{}-{}",
        std::process::id(),
        (unix_ms() as u64) % 1_000_000
    ));
    let cfg = PairConfig {
        bin: bin.to_path_buf(),
        dir: dir.clone(),
        guest: guest_cli(&a.guest, a.vcpus, a.mem_mib, &kvs),
        interval_ms: a.interval_ms,
        primary_env: vec![],
        log: "info".into(),
    };
    let mut pair = Pair::start_standby(cfg).map_err(|e| format!("starting the pair: {e}"))?;
    if live {
        println!(
            "sink {}  standby {}  (logs, key and records in {})",
            pair.sink_addr,
            pair.standby_addr,
            dir.display()
        );
    }
    pair.start_primary()
        .map_err(|e| format!("starting the primary: {e}"))?;
    let t0 = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let mut killed_at = None;
    let mut last_primary = Value::Null;
    let mut last = (0.0, 0u64);
    let mut next_print = 0.0;
    loop {
        let t = t0.elapsed().as_secs_f64();
        if let (Some(k), None) = (a.kill_primary_after_ms, killed_at) {
            if t0.elapsed() >= Duration::from_millis(k) {
                if !pair.primary_running() {
                    println!("\nthe primary finished before {k} ms: nothing to kill");
                    killed_at = Some(f64::NAN);
                } else {
                    killed_at = Some(pair.kill_primary());
                    if live {
                        println!("\nkilled the primary (SIGKILL) at t={t:.2}s");
                    }
                }
            }
        }
        let who = if killed_at.is_some_and(|k| !k.is_nan()) {
            "standby"
        } else {
            "primary"
        };
        if let Some(s) = pair.status(who) {
            if who == "primary" {
                last_primary = s.clone();
            }
            if live && t >= next_print && s["ft"].is_object() {
                let line = status_line(t, &s, pair.sink_report().accepted, &mut last);
                if tty {
                    print!("\r{line}\x1b[K");
                    let _ = std::io::stdout().flush();
                    next_print = t + 0.2;
                } else {
                    println!("{line}");
                    next_print = t + 1.0;
                }
            }
        }
        let primary_done = !pair.primary_running();
        let standby_done = pair.wait_standby(Duration::ZERO).is_some();
        if primary_done && standby_done {
            break;
        }
        if t > 600.0 {
            return Err(format!(
                "the pair did not finish within 10 minutes ({})",
                dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if live {
        println!();
    }
    let standby = pair.result("standby").unwrap_or(Value::Null);
    let result = pair.result("primary");
    let primary_report = result.as_ref().map_or(Value::Null, |p| p["report"].clone());
    let primary = result
        .map(|p| p["ft"].clone())
        .unwrap_or(last_primary["ft"].clone());
    let failover_ms = killed_at.filter(|k| !k.is_nan()).and_then(|k| {
        standby["failover"]["resumed_unix_ms"]
            .as_f64()
            .map(|r| r - k)
    });
    let want = w.reference_all(a.vcpus);
    let got = pair.sink_stream();
    let exact = Some(
        got.len() == want.len()
            && got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.iter().map(|(_, r)| *r).eq(w.iter().copied())),
    );
    Ok(PairRun {
        primary,
        primary_report,
        standby,
        failover_ms,
        sink: pair.sink_report(),
        exact,
        dir,
    })
}

/// `cargo xtask run-pair`.
pub fn run_pair(a: RunPairArgs) -> Result<(), String> {
    let bin = build_tandem()?;
    let r = run_pair_once(&bin, &a, true)?;
    let p = &r.primary;
    println!("── summary ──────────────────────────────────────────────");
    println!(
        "primary: {} epochs acknowledged, {} full sync(s), {} NACKs, throttled {} times",
        p["counters"]["epochs"],
        p["counters"]["full_syncs"],
        p["counters"]["nacks"],
        p["counters"]["throttles"]
    );
    println!(
        "epoch pause: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms over {} epochs",
        p["pause_ms"]["p50"].as_f64().unwrap_or(0.0),
        p["pause_ms"]["p99"].as_f64().unwrap_or(0.0),
        p["pause_ms"]["max"].as_f64().unwrap_or(0.0),
        p["pause_ms"]["count"]
    );
    println!(
        "sent: pages {} (of {} dirty), state {}, held output {}",
        mib(p["bytes_sent"]["pages"].as_f64().unwrap_or(0.0)),
        mib(p["counters"]["mem_bytes"].as_f64().unwrap_or(0.0)),
        mib(p["bytes_sent"]["state"].as_f64().unwrap_or(0.0)),
        mib(p["bytes_sent"]["records"].as_f64().unwrap_or(0.0)),
    );
    if r.standby["took_over"] == true {
        let f = &r.standby["failover"];
        println!(
            "failover: {} → generation {} from epoch {}; kill → guest running {:.1} ms \
             (silence at detection {:.1} ms, activation {:.1} ms)",
            f["reason"].as_str().unwrap_or("?"),
            f["generation"],
            f["from_epoch"],
            r.failover_ms.unwrap_or(f64::NAN),
            f["silence_ms"].as_f64().unwrap_or(0.0),
            f["activation_ms"].as_f64().unwrap_or(0.0)
        );
    } else {
        println!(
            "failover: none (the primary finished; the standby committed {} epochs)",
            r.standby["commits"]
        );
    }
    let s = &r.sink;
    println!(
        "sink: {} records received, {} accepted, {} gaps, {} duplicates, {} stale-generation rejections; by generation {:?}",
        s.received, s.accepted, s.gaps, s.duplicates, s.stale_rejections, s.by_generation
    );
    let exact = r.exact == Some(true);
    println!(
        "verdict: {} — the sink's stream {} the uninterrupted run's stream",
        s.verdict(),
        if exact { "EQUALS" } else { "DIFFERS FROM" }
    );
    if a.keep {
        println!("kept {}", r.dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&r.dir);
    }
    if exact && s.gaps == 0 && s.duplicates == 0 {
        Ok(())
    } else {
        Err("the output stream is not exact".into())
    }
}

/// `cargo xtask bench ft`.
pub fn bench(out: &mut String) -> Result<(), String> {
    let bin = build_tandem()?;
    let mut text = String::from(
        "### Fault tolerance (`cargo xtask bench ft`)\n\n\
         `dirty` guest (40M iterations), 1 vCPU, 256 MiB; the working set (ws_mib) sets the \
         dirty rate (the guest rewrites all of it many times per epoch). Throughput = guest \
         iterations per second of guest run time (start to done, including the wait for the \
         full sync's acknowledgement); FT off is `tandem run`. Dirtied MB/s and pages/epoch \
         count epochs only (not the full sync).\n\n\
         | ws_mib | FT | guest it/s | slowdown | dirtied MB/s | pages/epoch | pause p50 ms | pause p99 ms | SAVE step p50 ms | throttles |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for ws in [1u64, 2, 4] {
        let iters = 40_000_000u64;
        let args = vec![format!("ws_mib={ws}"), format!("iters={iters}")];
        let kvs = kv(&args)?;
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["run", "--json"])
            .args(guest_cli("dirty", 1, 256, &kvs));
        let o = cmd.output().map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(format!(
                "tandem run: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        let rep: Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
        let base_ms = rep["vcpus"][0]["run_ms"].as_f64().unwrap_or(1.0);
        let base = iters as f64 / (base_ms / 1e3);
        let row = format!("| {ws} | off | {base:.3e} | – | – | – | – | – | – | – |\n");
        print!("{row}");
        text.push_str(&row);
        for interval in [50u64, 25] {
            let a = RunPairArgs {
                kill_primary_after_ms: None,
                interval_ms: interval,
                guest: "dirty".into(),
                vcpus: 1,
                mem_mib: 256,
                guest_args: args.clone(),
                keep: false,
            };
            let r = run_pair_once(&bin, &a, false)?;
            let _ = std::fs::remove_dir_all(&r.dir);
            let ft = &r.primary;
            if r.exact != Some(true) {
                return Err(format!("ws {ws}, {interval} ms: the stream is not exact"));
            }
            // Guest run time (start to done) from the primary's report.
            let wall_ms = r.primary_report["vcpus"][0]["run_ms"]
                .as_f64()
                .ok_or("the primary's report has no run time")?;
            let epochs = (ft["counters"]["epochs"].as_f64().unwrap_or(1.0)
                - ft["counters"]["full_syncs"].as_f64().unwrap_or(0.0))
            .max(1.0);
            let mem = ft["counters"]["mem_bytes"].as_f64().unwrap_or(0.0);
            let tput = iters as f64 / (wall_ms / 1e3);
            let row = format!(
                "| {ws} | {} Hz | {tput:.3e} | {:.1} % | {:.1} | {:.0} | {:.3} | {:.3} | {:.3} | {} |\n",
                1000 / interval,
                (1.0 - tput / base) * 100.0,
                mem / (wall_ms / 1e3) / 1e6,
                mem / 4096.0 / epochs,
                ft["pause_ms"]["p50"].as_f64().unwrap_or(0.0),
                ft["pause_ms"]["p99"].as_f64().unwrap_or(0.0),
                ft["pause_ms"]["save_step_p50"].as_f64().unwrap_or(0.0),
                ft["counters"]["throttles"],
            );
            print!("{row}");
            text.push_str(&row);
        }
    }
    // Failover over 10 kills.
    let mut fo = Vec::new();
    let mut act = Vec::new();
    for _ in 0..10 {
        let a = RunPairArgs {
            kill_primary_after_ms: Some(800),
            interval_ms: 50,
            guest: "dirty".into(),
            vcpus: 2,
            mem_mib: 256,
            guest_args: vec!["iters=12M".into()],
            keep: false,
        };
        let r = run_pair_once(&bin, &a, false)?;
        let _ = std::fs::remove_dir_all(&r.dir);
        if r.exact != Some(true) {
            return Err("failover: the stream is not exact".into());
        }
        if let Some(ms) = r.failover_ms {
            fo.push(ms);
            act.push(
                r.standby["failover"]["activation_ms"]
                    .as_f64()
                    .unwrap_or(0.0),
            );
        }
    }
    let row = format!(
        "\nFailover (SIGKILL of the primary at 800 ms, `dirty` 2 vCPUs, 256 MiB, 50 ms epochs), \
         {} kills, kill → standby's guest running: p50 {:.1} ms, max {:.1} ms; of which \
         activation (restore of vCPU/device state, sink reconnect, release of inherited \
         output) p50 {:.1} ms. Detection is immediate (the kernel closes the dead primary's \
         socket); the 4 × interval silence rule covers hosts that vanish without a FIN. Every \
         run's sink stream was exact.\n",
        fo.len(),
        percentile(&fo, 50.0),
        fo.iter().cloned().fold(0.0, f64::max),
        percentile(&act, 50.0)
    );
    print!("{row}");
    text.push_str(&row);
    writeln!(out, "{text}").unwrap();
    Ok(())
}
