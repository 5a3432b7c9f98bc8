//! `cargo xtask run-pair` and `cargo xtask bench ft`: a protected pair of real `tandem`
//! processes on loopback.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ft::status::{EndReport, FtStatus, LastSync, Role};
use ft::{percentile, unix_ms};
use testkit::pair::{Pair, PairConfig, Status};

/// The `dirty` guest's length when `run-pair` kills the primary and no `iters=` is given.
const KILL_DEFAULT_ITERS: &str = "iters=20M";

/// Options of `run-pair`.
#[derive(clap::Args, Clone, Debug)]
pub struct RunPairArgs {
    /// SIGKILL the primary this many ms after it started (the standby takes over).
    #[arg(long, value_name = "MS")]
    pub kill_primary_after_ms: Option<u64>,
    /// Epoch interval in ms.
    #[arg(long, default_value_t = 50)]
    pub interval_ms: u64,
    /// The guest: `counter` or `dirty` (workloads whose record stream the sink checks), or
    /// `kv` (the Redis-compatible server on a TAP and a disk, driven by `--clients`
    /// connections whose history is checked at the end; needs root).
    #[arg(long, default_value = "dirty")]
    pub guest: String,
    /// `--guest kv`: client connections (each INCR, RPUSH, SET, GET on keys of its own).
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// `--guest kv`: how long the clients run, in seconds (default 10, or until 5 s after the
    /// kill). The kill of `--kill-primary-after-ms` counts from the clients' start.
    #[arg(long)]
    pub secs: Option<u64>,
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
    /// After the failover, start a fresh standby that joins the survivor
    /// (`tandem standby --join`), and show it being re-protected by pre-copy.
    #[arg(long, requires = "kill_primary_after_ms")]
    pub rejoin: bool,
    /// Host scheduling of the primary's vCPU threads (`tandem primary --vcpu-sched`:
    /// idle, normal, nice, nice:N); tandem's default when left out.
    #[arg(long, value_name = "POLICY")]
    pub vcpu_sched: Option<String>,
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Builds the release `tandem` and returns its path (in `CARGO_TARGET_DIR` when that is
/// set, as cargo puts it there). `TANDEM_BIN=PATH` runs that binary instead, unbuilt (e.g. an
/// older build, to measure a change against).
pub fn build_tandem() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("TANDEM_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // `cargo xtask` runs this binary with the variables cargo sets for a package it runs
    // (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, ...); `ring`'s build script reruns when they
    // change, so a nested build that inherits them and the next `cargo xtask` (without them)
    // would rebuild ring and everything above it every time.
    let mut cmd = std::process::Command::new(cargo);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|p| k.starts_with(p))
        {
            cmd.env_remove(&*k);
        }
    }
    let st = cmd
        .current_dir(root())
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "tandem",
            "--bin",
            "tandem",
        ])
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !st.success() {
        return Err("building tandem failed".into());
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    Ok(target.join("release/tandem"))
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

/// An optional number as the status line always showed it (`null` when absent).
fn show<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "null".into(), |v| v.to_string())
}

fn status_line(t: f64, ft: &FtStatus, sink_records: u64, last: &mut (f64, u64)) -> String {
    let sent = ft
        .bytes_sent
        .as_ref()
        .map_or(0.0, |b| (b.pages + b.state) as f64);
    let rate = if t > last.0 {
        (sink_records.saturating_sub(last.1)) as f64 / (t - last.0)
    } else {
        0.0
    };
    *last = (t, sink_records);
    let sync = match &ft.sync {
        Some(sy) => format!(
            " | SYNC {} {}/{} pages",
            sy.phase,
            show(sy.sent_pages),
            show(sy.round_pages)
        ),
        None if ft.protected == Some(false) => " | UNPROTECTED".to_string(),
        None => String::new(),
    };
    let pause = ft.pause_ms.clone().unwrap_or_default();
    format!(
        "t={t:5.1}s {} gen {} epoch {} ack {}{sync} | pause p50 {:.2} ms p99 {:.2} ms | lag {:.1} ms | sent {} | sink {} records ({:.0}/s)",
        match ft.role {
            Role::Primary => "primary",
            Role::Standby => "standby",
        },
        show(ft.generation),
        show(ft.epoch),
        show(ft.last_ack),
        pause.p50,
        pause.p99,
        ft.lag_ms.unwrap_or(0.0),
        mib(sent),
        sink_records,
        rate,
    )
}

/// What one pair run produced.
pub struct PairRun {
    /// The primary's last replication status (or its final one).
    pub primary: Option<FtStatus>,
    /// The primary's run report (when it finished).
    pub primary_report: Option<vmx::RunReport>,
    /// What the standby printed at its end.
    pub standby: Option<EndReport>,
    /// Kill → the standby's guest running, ms.
    pub failover_ms: Option<f64>,
    /// The sink's verdict.
    pub sink: sink::SinkReport,
    /// The sink's stream equals the reference model's.
    pub exact: Option<bool>,
    /// The directory.
    pub dir: PathBuf,
    /// With --rejoin: new standby started → the survivor protected again, ms.
    pub reprotect_ms: Option<f64>,
    /// With --rejoin: the survivor's account of the sync, and the new standby's end.
    pub rejoin: Rejoin,
}

/// With --rejoin: how the survivor was protected again.
#[derive(Default)]
pub struct Rejoin {
    /// The survivor's account of the sync.
    pub sync: Option<LastSync>,
    /// What the new standby printed at its end.
    pub new_standby: Option<EndReport>,
}

/// Runs one pair; `live` prints the status line.
pub fn run_pair_once(
    bin: &std::path::Path,
    a: &RunPairArgs,
    live: bool,
) -> Result<PairRun, String> {
    let mut guest_args = a.guest_args.clone();
    let sized = guest_args
        .iter()
        .any(|g| g.starts_with("iters=") || g.starts_with("n="));
    if a.kill_primary_after_ms.is_some() && a.guest == "dirty" && !sized {
        // The default `dirty` run ends in about a second; a failover needs a guest that is
        // still running when the primary dies.
        guest_args.push(KILL_DEFAULT_ITERS.into());
        if live {
            println!("guest: dirty with {KILL_DEFAULT_ITERS} (long enough to outlive the kill; set iters= to change)");
        }
    }
    let kvs = kv(&guest_args)?;
    let w = workloads::Workload::parse(&a.guest, &kvs).map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!(
        "tandem-pair-{}-{}",
        std::process::id(),
        (unix_ms() as u64) % 1_000_000
    ));
    let cfg = PairConfig {
        bin: bin.to_path_buf(),
        dir: dir.clone(),
        guest: {
            let mut g = guest_cli(&a.guest, a.vcpus, a.mem_mib, &kvs);
            if let Some(p) = &a.vcpu_sched {
                g.extend(["--vcpu-sched".to_string(), p.clone()]);
            }
            g
        },
        interval_ms: a.interval_ms,
        primary_env: vec![],
        log: "info".into(),
        hosts: Default::default(),
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
    let mut last_primary: Option<Status> = None;
    let mut last = (0.0, 0u64);
    let mut next_print = 0.0;
    let mut rejoin_started: Option<Instant> = None;
    let mut reprotect_ms = None;
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
        let killed = killed_at.is_some_and(|k| !k.is_nan());
        if a.rejoin && killed && rejoin_started.is_none() {
            pair.wait_takeover(Duration::from_secs(30))
                .ok_or_else(|| format!("the standby did not take over ({})", dir.display()))?;
            let t = Instant::now();
            pair.rejoin()
                .map_err(|e| format!("starting a new standby: {e}"))?;
            rejoin_started = Some(t);
            if live {
                println!(
                    "
the standby took over; started a fresh standby that joins it (it will \
                     listen on {} for the next one)",
                    pair.standby_addr
                );
            }
        }
        if let (Some(t), None) = (rejoin_started, reprotect_ms) {
            if pair.wait_protected(Duration::ZERO).is_some() {
                let ms = t.elapsed().as_secs_f64() * 1e3;
                reprotect_ms = Some(ms);
                if live {
                    println!(
                        "
PROTECTED again {ms:.0} ms after the new standby started"
                    );
                }
            }
        }
        let who = if killed && rejoin_started.is_none() {
            "standby"
        } else {
            "primary"
        };
        if let Some(s) = pair.status(who) {
            if live && t >= next_print {
                if let Some(ft) = &s.ft {
                    let line = status_line(t, ft, pair.sink_report().accepted, &mut last);
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
            if who == "primary" && rejoin_started.is_none() {
                last_primary = Some(s);
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
    // After a rejoin the survivor (the standby that took over) is in the primary role.
    let (standby, result, rejoin) = if rejoin_started.is_some() {
        let survivor = pair.result("primary");
        let rejoin = Rejoin {
            sync: survivor
                .as_ref()
                .and_then(|s| s.ft.as_ref())
                .and_then(|ft| ft.last_sync.clone()),
            new_standby: pair.result("standby"),
        };
        (survivor, None, rejoin)
    } else {
        (
            pair.result("standby"),
            pair.result("primary"),
            Rejoin::default(),
        )
    };
    let primary_report = result.as_ref().and_then(|p| p.run_report().cloned());
    let primary = match result {
        Some(p) => p.ft,
        None => last_primary.and_then(|s| s.ft),
    };
    let failover_ms = killed_at.filter(|k| !k.is_nan()).and_then(|k| {
        standby
            .as_ref()
            .and_then(|s| s.failover.as_ref())
            .map(|f| f.resumed_unix_ms - k)
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
        reprotect_ms,
        rejoin,
    })
}

/// `cargo xtask run-pair` with a workload guest (`--guest kv` is [`crate::pair_kv::run`]).
pub fn run_pair(a: RunPairArgs) -> Result<(), String> {
    let bin = build_tandem()?;
    let r = run_pair_once(&bin, &a, true)?;
    let p = r.primary.as_ref();
    let c = p
        .and_then(FtStatus::primary_counters)
        .cloned()
        .unwrap_or_default();
    let pause = p.and_then(|p| p.pause_ms.clone()).unwrap_or_default();
    let sent = p.and_then(|p| p.bytes_sent.clone()).unwrap_or_default();
    println!("── summary ──────────────────────────────────────────────");
    println!(
        "primary: {} epochs acknowledged, {} full sync(s), {} NACKs, {} late (the next \
         epoch waited for the Ack, the guest running), throttled {} times",
        c.epochs, c.full_syncs, c.nacks, c.late_epochs, c.throttles
    );
    // Only a primary that finished its guest leaves a report.
    if let Some(v) = r.primary_report.as_ref().and_then(|p| p.vcpus.first()) {
        println!(
            "guest: vCPU 0 ran {:.0} ms from start to done, protected (`tandem run` runs the \
             same guest unprotected)",
            v.run_ms
        );
    }
    if let Some(sy) = p.and_then(|p| p.last_sync.as_ref()).filter(|s| s.first) {
        let rounds = sy.precopy.as_ref().map_or(0, |p| p.rounds.len());
        println!(
            "first sync: pre-copy in {rounds} rounds while the guest ran, protected {:.0} ms \
             after the primary connected; completing epoch {}: {} pages, the guest stopped \
             {:.2} ms (of which stopping the vCPUs {:.2} ms)",
            sy.joined_to_protected_ms,
            sy.completing_epoch,
            sy.completing_pages,
            sy.completing_pause_ms,
            sy.completing_stun_ms
        );
    }
    println!(
        "epoch pause: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms over {} epochs",
        pause.p50, pause.p99, pause.max, pause.count
    );
    if !pause.phases_p50.is_empty() {
        println!(
            "  where it goes (p50 of each phase, ms): {}",
            pause
                .phases_p50
                .iter()
                .map(|p| format!("{} {:.3}", p.phase, p.ms))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "sent: pages {} (of {} dirty), state {}, held output {}",
        mib(sent.pages as f64),
        mib(c.mem_bytes as f64),
        mib(sent.state as f64),
        mib(sent.records as f64),
    );
    let standby = r.standby.as_ref();
    match standby.and_then(|s| s.failover.as_ref()) {
        Some(f) if standby.is_some_and(|s| s.took_over == Some(true)) => println!(
            "failover: {} → generation {} from epoch {}; kill → guest running {:.1} ms \
             (silence at detection {:.1} ms, activation {:.1} ms)",
            f.reason,
            f.generation,
            f.from_epoch,
            r.failover_ms.unwrap_or(f64::NAN),
            f.silence_ms,
            f.activation_ms
        ),
        _ => println!(
            "failover: none (the primary finished; the standby committed {} epochs)",
            show(standby.and_then(|s| s.commits))
        ),
    }
    if a.rejoin {
        let sync = r.rejoin.sync.as_ref();
        match r.reprotect_ms {
            Some(ms) => {
                let rounds: Vec<String> = sync
                    .and_then(|s| s.precopy.as_ref())
                    .map(|p| {
                        p.rounds
                            .iter()
                            .map(|r| format!("{} pages in {:.0} ms", r.pages, r.ms))
                            .collect()
                    })
                    .unwrap_or_default();
                println!(
                    "re-protection: new standby started → protected {ms:.0} ms (join → the \
                     standby's commit {:.0} ms); pre-copy rounds: {}; the new standby committed \
                     {} epochs and saw the guest finish",
                    sync.map_or(f64::NAN, |s| s.joined_to_protected_ms),
                    rounds.join(", "),
                    show(r.rejoin.new_standby.as_ref().and_then(|s| s.commits))
                );
            }
            None => println!("re-protection: NOT reached before the guest finished"),
        }
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
    if a.rejoin && r.reprotect_ms.is_none() {
        return Err("the survivor was not protected again".into());
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
         count epochs only (not the full sync). Copy alone = copying pages/epoch pages from a \
         source just written, in this process, best of 21, on one thread / with the copy crew \
         (helpers pinned to the other CPUs, as the pause copies beyond 2 MiB; \
         `floor::hot_copy_ms`): the floor of the pause's copy, measured in the same run.\n\n\
         | ws_mib | FT | guest it/s | slowdown | dirtied MB/s | pages/epoch | pause p50 ms | pause p99 ms | SAVE step p50 ms | copy alone ms (1 thread / crew) | throttles |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    // 640 KiB at 40 Hz dirties 25 MiB/s: the rate issue 15 sets its goal at.
    // 8 MiB: the 2,000 pages per epoch its pause goal names.
    let sets: [(&str, String, &[u64]); 5] = [
        ("0.625", "ws_kib=640".into(), &[25]),
        ("1", "ws_mib=1".into(), &[50, 25]),
        ("2", "ws_mib=2".into(), &[50, 25]),
        ("4", "ws_mib=4".into(), &[50, 25]),
        ("8", "ws_mib=8".into(), &[25]),
    ];
    for (ws, ws_arg, intervals) in sets {
        let iters = 40_000_000u64;
        let args = vec![ws_arg, format!("iters={iters}")];
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
        let rep: vmx::RunReport =
            serde_json::from_slice(&o.stdout).map_err(|e| format!("tandem run --json: {e}"))?;
        let base_ms = rep.vcpus.first().map_or(1.0, |v| v.run_ms);
        let base = iters as f64 / (base_ms / 1e3);
        let row = format!("| {ws} | off | {base:.3e} | – | – | – | – | – | – | – | – |\n");
        print!("{row}");
        text.push_str(&row);
        for &interval in intervals {
            let a = RunPairArgs {
                kill_primary_after_ms: None,
                interval_ms: interval,
                guest: "dirty".into(),
                vcpus: 1,
                mem_mib: 256,
                guest_args: args.clone(),
                keep: false,
                rejoin: false,
                clients: 8,
                secs: None,
                vcpu_sched: None,
            };
            let r = run_pair_once(&bin, &a, false)?;
            let _ = std::fs::remove_dir_all(&r.dir);
            let ft = r.primary.clone().ok_or("the primary left no status")?;
            let c = ft.primary_counters().cloned().unwrap_or_default();
            let pause = ft.pause_ms.clone().unwrap_or_default();
            if r.exact != Some(true) {
                return Err(format!("ws {ws}, {interval} ms: the stream is not exact"));
            }
            // Guest run time (start to done) from the primary's report.
            let wall_ms = r
                .primary_report
                .as_ref()
                .and_then(|p| p.vcpus.first())
                .map(|v| v.run_ms)
                .ok_or("the primary's report has no run time")?;
            let epochs = (c.epochs as f64 - c.full_syncs as f64).max(1.0);
            let mem = c.mem_bytes as f64;
            let tput = iters as f64 / (wall_ms / 1e3);
            let pages = mem / 4096.0 / epochs;
            let (copy1, copy2) = crate::floor::hot_copy_ms(pages.round() as u64);
            let row = format!(
                "| {ws} | {} Hz | {tput:.3e} | {:.1} % | {:.1} | {pages:.0} | {:.3} | {:.3} | {:.3} | {copy1:.3} / {copy2:.3} | {} |\n",
                1000 / interval,
                (1.0 - tput / base) * 100.0,
                mem / (wall_ms / 1e3) / 1e6,
                pause.p50,
                pause.p99,
                pause.save_step_p50,
                c.throttles,
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
            rejoin: false,
            clients: 8,
            secs: None,
            vcpu_sched: None,
        };
        let r = run_pair_once(&bin, &a, false)?;
        let _ = std::fs::remove_dir_all(&r.dir);
        if r.exact != Some(true) {
            return Err("failover: the stream is not exact".into());
        }
        if let Some(ms) = r.failover_ms {
            fo.push(ms);
            act.push(
                r.standby
                    .as_ref()
                    .and_then(|s| s.failover.as_ref())
                    .map_or(0.0, |f| f.activation_ms),
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

/// `cargo xtask soak`: many SIGKILLs of the primary at random moments, each followed by a
/// fresh standby joining the survivor.
pub fn soak(cycles: u32, iters: &str) -> Result<(), String> {
    let bin = build_tandem()?;
    let kvs = kv(&[format!("iters={iters}")])?;
    let w = workloads::Workload::parse("dirty", &kvs).map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("tandem-soak-{}", std::process::id()));
    let cfg = PairConfig {
        bin,
        dir: dir.clone(),
        guest: guest_cli("dirty", 2, 256, &kvs),
        interval_ms: 50,
        primary_env: vec![],
        log: "info".into(),
        hosts: Default::default(),
    };
    println!(
        "soak: {cycles} cycles of SIGKILL (random moment) → takeover → a fresh standby joins; \
         `dirty` guest, 2 vCPUs, 256 MiB, iters={iters}; logs in {}",
        dir.display()
    );
    let t0 = Instant::now();
    let rep = testkit::pair::soak(&cfg, &w.reference_all(2), cycles, |i, c| {
        println!(
            "cycle {i:3}: generation {:3}, kill → running {:6.1} ms, new standby → protected {:6.0} ms (join → commit {:5.0} ms)",
            c.generation, c.failover_ms, c.reprotect_ms, c.join_to_protected_ms
        );
    })?;
    let fo: Vec<f64> = rep.cycles.iter().map(|c| c.failover_ms).collect();
    let rp: Vec<f64> = rep.cycles.iter().map(|c| c.reprotect_ms).collect();
    println!(
        "soak: {} cycles over {} pairs in {:.0} s, every cycle ended protected; every pair's \
         stream exact ({} records); failover p50 {:.1} ms max {:.1} ms; re-protection p50 {:.0} \
         ms max {:.0} ms",
        rep.cycles.len(),
        rep.pairs,
        t0.elapsed().as_secs_f64(),
        rep.records,
        percentile(&fo, 50.0),
        fo.iter().cloned().fold(0.0, f64::max),
        percentile(&rp, 50.0),
        rp.iter().cloned().fold(0.0, f64::max),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `cargo xtask bench reprotect`: how long a new standby takes to protect a running primary.
pub fn bench_reprotect(out: &mut String) -> Result<(), String> {
    let bin = build_tandem()?;
    let mut text = String::from(
        "### Re-protection (`cargo xtask bench reprotect`)\n\n\
         `dirty` guest, 2 vCPUs, 50 ms epochs, the guest running throughout. *Redial*: the \
         standby is SIGKILLed, the primary runs unprotected, a new standby starts on the same \
         address and the primary dials it. *Join*: the primary is SIGKILLed, the standby takes \
         over, and a new standby joins the survivor (`--join`). Wall = new standby process \
         started → primary's status protected (its full sync committed); join → commit is \
         the primary's own count. Pre-copy rounds are pages per round.\n\n\
         | guest RAM | path | wall ms (median of 3) | join → commit ms | pre-copy rounds (last run) | completing epoch pages |\n\
         |---|---|---|---|---|---|\n",
    );
    for mem in [256u64, 1024] {
        let kvs = kv(&["iters=400M".into(), "ws_mib=2".into()])?;
        let dir = std::env::temp_dir().join(format!("tandem-reprotect-{}", std::process::id()));
        let cfg = PairConfig {
            bin: bin.clone(),
            dir: dir.clone(),
            guest: guest_cli("dirty", 2, mem, &kvs),
            interval_ms: 50,
            primary_env: vec![],
            log: "info".into(),
            hosts: Default::default(),
        };
        let patience = Duration::from_secs(60);
        let mut pair = Pair::start_standby(cfg).map_err(|e| e.to_string())?;
        pair.start_primary().map_err(|e| e.to_string())?;
        pair.wait_protected(patience)
            .ok_or("the primary was never protected")?;
        let row = |path: &str, walls: &mut Vec<f64>, joins: &[f64], st: Option<&Status>| {
            let sync = st
                .and_then(|s| s.ft.as_ref())
                .and_then(|ft| ft.last_sync.as_ref());
            let rounds: Vec<String> = sync
                .and_then(|s| s.precopy.as_ref())
                .map(|p| p.rounds.iter().map(|r| r.pages.to_string()).collect())
                .unwrap_or_default();
            format!(
                "| {mem} MiB | {path} | {:.0} | {:.0} | {} | {} |\n",
                percentile(walls, 50.0),
                percentile(joins, 50.0),
                rounds.join(" → "),
                show(sync.map(|s| s.completing_pages))
            )
        };
        let (mut walls, mut joins) = (Vec::new(), Vec::new());
        let mut last: Option<Status> = None;
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(500));
            pair.kill_standby();
            let t = Instant::now();
            while pair
                .status("primary")
                .is_none_or(|s| s.ft.is_some_and(|ft| ft.protected == Some(true)))
            {
                if t.elapsed() > patience {
                    return Err("the primary never noticed the lost standby".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let t = Instant::now();
            pair.restart_standby().map_err(|e| e.to_string())?;
            let st = pair
                .wait_protected(patience)
                .ok_or("never protected again")?;
            walls.push(t.elapsed().as_secs_f64() * 1e3);
            joins.push(
                st.ft
                    .as_ref()
                    .and_then(|ft| ft.last_sync.as_ref())
                    .map_or(f64::NAN, |s| s.joined_to_protected_ms),
            );
            last = Some(st);
        }
        let r = row("redial", &mut walls, &joins, last.as_ref());
        print!("{r}");
        text.push_str(&r);
        let (mut walls, mut joins) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(500));
            let c = pair.kill_and_rejoin(patience)?;
            walls.push(c.reprotect_ms);
            joins.push(c.join_to_protected_ms);
            last = pair.status("primary");
        }
        let r = row("join", &mut walls, &joins, last.as_ref());
        print!("{r}");
        text.push_str(&r);
        drop(pair);
        let _ = std::fs::remove_dir_all(&dir);
    }
    writeln!(out, "{text}").unwrap();
    Ok(())
}

/// `cargo xtask bench faults`: the pair through network faults between two netns hosts.
pub fn bench_faults(out: &mut String) -> Result<(), String> {
    use testkit::netlab::{run_fault, Fault, NetLab};
    let bin = build_tandem()?;
    let lab = match NetLab::new("tndbench", 64) {
        Ok(l) => l,
        Err(e) => {
            println!("bench faults skipped: {e}");
            return Ok(());
        }
    };
    let mut text = String::from(
        "### Network faults and partitions (`cargo xtask bench faults`)\n\n\
         Primary and standby on two network namespaces joined by a bridge; the sink in the \
         root namespace and the arbiter directory reachable from both. Loss and partitions \
         are nftables drops between the two hosts (both directions); the delay is a relay \
         that holds every byte 100 ms each way (this kernel has no `sch_netem`). `dirty` \
         guest, 2 vCPUs. *Commits* = epochs the standby committed while the fault lasted. \
         *Old primary* = its exit code (0 finished, 3 FENCED). *Finished the guest* counts \
         processes that ran the guest to its end as primary.\n\n\
         | fault | interval | commits during | takeover after | old primary | finished the guest | sink generations | stream | stale refusals |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    // (fault, delay ms, fault duration ms, interval ms, guest iterations)
    type Case = (Option<Fault>, Option<u64>, u64, u64, &'static str);
    let cases: [Case; 8] = [
        (Some(Fault::Partition), None, 100, 50, "6M"),
        (Some(Fault::Partition), None, 1000, 50, "6M"),
        (Some(Fault::Partition), None, 3000, 50, "8M"),
        (Some(Fault::Partition), None, 3000, 1000, "8M"),
        (Some(Fault::Loss(0.10)), None, 4000, 50, "20M"),
        (Some(Fault::Loss(0.10)), None, 4000, 500, "20M"),
        (None, Some(100), 3000, 50, "4M"),
        (None, Some(100), 3000, 200, "4M"),
    ];
    for (fault, delay, ms, interval, iters) in cases {
        let kvs = kv(&[format!("iters={iters}")])?;
        let w = workloads::Workload::parse("dirty", &kvs).map_err(|e| e.to_string())?;
        let dir = std::env::temp_dir().join(format!("tandem-faults-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = PairConfig {
            bin: bin.clone(),
            dir: dir.clone(),
            guest: guest_cli("dirty", 2, 128, &kvs),
            interval_ms: interval,
            primary_env: vec![],
            log: "info".into(),
            hosts: Default::default(),
        };
        let r = run_fault(
            &lab,
            &cfg,
            &w.reference_all(2),
            fault,
            delay.map(Duration::from_millis),
            Duration::from_millis(ms),
        )?;
        let row = format!(
            "| {} | {} ms | {} | {} | {} | {} | {:?} | {} | {} |\n",
            r.fault,
            r.interval_ms,
            r.acks_during_fault,
            match r.takeover_after_ms {
                None => "none".to_string(),
                Some(t) if t.is_nan() => "after the fault ended".to_string(),
                Some(t) => format!("{t:.0} ms"),
            },
            match r.primary_exit {
                Some(0) => "finished".to_string(),
                Some(3) => "FENCED (3)".to_string(),
                other => format!("{other:?}"),
            },
            r.finished_primaries,
            r.generations,
            match &r.exact {
                Ok(n) => format!("exact ({n} records)"),
                Err(e) => format!("NOT exact: {e}"),
            },
            r.stale_rejections
        );
        print!("{row}");
        text.push_str(&row);
        let _ = std::fs::remove_dir_all(&dir);
        if r.exact.is_err() || r.finished_primaries != 1 {
            writeln!(out, "{text}").unwrap();
            return Err(format!("{}: the outcome is wrong: {r:?}", r.fault));
        }
    }
    writeln!(out, "{text}").unwrap();
    Ok(())
}
