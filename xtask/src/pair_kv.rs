//! `cargo xtask run-pair --guest kv`: the `kv` guest protected, live, with clients whose
//! history is checked at the end.
//!
//! ```text
//!  host 10.78.0.1 ─ bridge ─┬─ TAP a ─ tandem primary: kv 10.78.0.2:6379, log on primary.disk
//!                           └─ TAP b ─ tandem standby: its own replica disk
//!  N clients (this process): INCR / RPUSH / SET / GET on keys of their own, without pause
//!  live: connections, requests/s, latency p50/p99, epoch pause, lag
//!  end:  connections reset, acknowledged writes lost, the outage of the failover, and the
//!        survivor's disk replayed from the host against what the clients were told
//! ```
//!
//! Needs root (a bridge and TAPs). `redis-cli -h 10.78.0.2` from the host talks to the same
//! server while it runs.

use std::io::{IsTerminal, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ft::status::Role;
use testkit::kv::{outage_at, replay_disk, run_client, History, Progress, GAP_KEPT};
use testkit::pair::{Hosts, Pair, PairConfig};

use crate::bench_kv::{disk, lab, wait_for_kv};
use crate::pair::RunPairArgs;

const GUEST_IP: &str = "10.78.0.2";
const HOST_CIDR: &str = "10.78.0.1/24";
/// How long the clients run when neither `--secs` nor a kill says otherwise.
const DEFAULT_SECS: u64 = 10;
/// How long the clients go on after a kill (or a re-protection) when `--secs` is not given.
const AFTER_KILL_SECS: u64 = 5;

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// `cargo xtask run-pair --guest kv`.
pub fn run(a: &RunPairArgs) -> Result<(), String> {
    if !a.guest_args.is_empty() {
        return Err(
            "--guest-arg is for the workload guests; run-pair --guest kv sets kv's own".into(),
        );
    }
    let bin = crate::pair::build_tandem()?;
    let dir = std::env::temp_dir().join(format!("tandem-pair-kv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let image = dir.join("kv.elf");
    std::fs::write(&image, guest_images::KV).map_err(|e| e.to_string())?;
    let (_links, tap_a, tap_b) =
        lab("r", HOST_CIDR).map_err(|e| format!("{e} (run-pair --guest kv needs root)"))?;
    // A disk for the primary and one replica for every standby that may run.
    for n in ["primary", "standby", "standby2"] {
        disk(&dir.join(format!("{n}.disk")))?;
    }
    let cfg = PairConfig {
        bin,
        dir: dir.clone(),
        guest: vec![
            "--image".into(),
            image.display().to_string(),
            "--vcpus".into(),
            "1".into(),
            "--mem-mib".into(),
            a.mem_mib.to_string(),
            "--net".into(),
            format!("tap={tap_a}"),
            "--disk".into(),
            dir.join("primary.disk").display().to_string(),
            "--guest-arg".into(),
            format!("ip={GUEST_IP}/24"),
        ],
        interval_ms: a.interval_ms,
        primary_env: vec![],
        log: "warn".into(),
        hosts: Hosts {
            standby_args: vec![
                "--net".into(),
                format!("tap={tap_b}"),
                "--disk".into(),
                dir.join("{node}.disk").display().to_string(),
            ],
            ..Hosts::default()
        },
    };
    let mut pair = Pair::start_standby(cfg).map_err(|e| format!("starting the pair: {e}"))?;
    pair.start_primary()
        .map_err(|e| format!("starting the primary: {e}"))?;
    let addr: SocketAddr = format!("{GUEST_IP}:6379").parse().expect("an address");
    wait_for_kv(&addr)?;
    pair.wait_protected(Duration::from_secs(60))
        .ok_or_else(|| format!("never protected: {}", pair.log("primary")))?;
    println!(
        "kv is protected at {addr} ({} ms epochs; the standby has its own TAP {tap_b} and disk \
         replica). Point a client at it: redis-cli -h {GUEST_IP}",
        a.interval_ms
    );
    println!("(logs, disks and the sink's records in {})", dir.display());

    // The clients.
    let stop = Arc::new(AtomicBool::new(false));
    let progress: Vec<Arc<Progress>> = (0..a.clients)
        .map(|_| {
            let p = Progress::default();
            p.collect_latencies.store(true, Ordering::Relaxed);
            Arc::new(p)
        })
        .collect();
    let mut clients = Vec::new();
    for (id, p) in progress.iter().enumerate() {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("client {id}: connect to {addr}: {e}"))?;
        let (stop, p) = (stop.clone(), p.clone());
        clients.push(std::thread::spawn(move || run_client(s, id, &stop, &p)));
    }
    let t0 = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let mut end = Duration::from_secs(a.secs.unwrap_or(DEFAULT_SECS));
    let mut killed: Option<Instant> = None;
    let mut killed_unix_ms: Option<f64> = None;
    let mut failover: Option<ft::status::FailoverReport> = None;
    let mut rejoined = false;
    let mut reprotect: Option<Instant> = None;
    let mut all_latencies: Vec<Duration> = Vec::new();
    let mut window: Vec<Duration> = Vec::new();
    let mut last = (0.0, 0u64);
    let mut next_print = 1.0;
    while t0.elapsed() < end {
        let t = t0.elapsed().as_secs_f64();
        if let (Some(k), None) = (a.kill_primary_after_ms, killed) {
            if t0.elapsed() >= Duration::from_millis(k) {
                // The instant of the kill, not of its end: `kill_primary` also waits for the
                // killed process to be torn down, which can outlast the failover.
                killed = Some(Instant::now());
                killed_unix_ms = Some(pair.kill_primary());
                println!("\nkilled the primary (SIGKILL) at t={t:.2}s");
                if a.secs.is_none() {
                    end = t0.elapsed() + Duration::from_secs(AFTER_KILL_SECS);
                }
            }
        }
        if killed.is_some() && failover.is_none() {
            if let Some(st) = pair.wait_takeover(Duration::ZERO) {
                failover = st.ft.as_ref().and_then(|ft| ft.failover().cloned());
                if let (Some(f), Some(k)) = (&failover, killed_unix_ms) {
                    println!(
                        "\nthe standby took over: kill → guest running {:.1} ms (silence at \
                         detection {:.1} ms, activation {:.1} ms), generation {}",
                        f.resumed_unix_ms - k,
                        f.silence_ms,
                        f.activation_ms,
                        f.generation
                    );
                }
            }
        }
        if a.rejoin && failover.is_some() && !rejoined {
            pair.rejoin()
                .map_err(|e| format!("starting a new standby: {e}"))?;
            rejoined = true;
            reprotect = Some(Instant::now());
            println!("\nthe standby took over; a fresh standby joins it");
        }
        if let Some(r) = reprotect {
            if let Some(st) = pair.wait_protected(Duration::ZERO) {
                let sync = st.ft.and_then(|ft| ft.last_sync);
                let rounds = sync
                    .as_ref()
                    .and_then(|s| s.precopy.as_ref())
                    .map(|p| {
                        p.rounds
                            .iter()
                            .map(|r| format!("{} pages in {:.0} ms", r.pages, r.ms))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                println!(
                    "\nPROTECTED again {:.0} ms after the new standby started (pre-copy rounds: \
                     {rounds}; completing epoch {} pages; pre-copy end → protected {:.0} ms)",
                    r.elapsed().as_secs_f64() * 1e3,
                    sync.as_ref().map_or(0, |s| s.completing_pages),
                    sync.as_ref().map_or(f64::NAN, |s| s.joined_to_protected_ms
                        - s.precopy.as_ref().map_or(0.0, |p| p.ms)),
                );
                reprotect = None;
            }
        }
        for p in &progress {
            if let Ok(mut l) = p.latencies.lock() {
                window.append(&mut l);
            }
        }
        if t >= next_print {
            let who = if killed.is_some() && !rejoined {
                "standby"
            } else {
                "primary"
            };
            let answered: u64 = progress
                .iter()
                .map(|p| p.requests.load(Ordering::Relaxed))
                .sum();
            let rate = (answered - last.1) as f64 / (t - last.0).max(1e-3);
            last = (t, answered);
            window.sort_unstable();
            let open = clients.iter().filter(|c| !c.is_finished()).count();
            let ft = pair.status(who).and_then(|s| s.ft);
            let (role, gen, protection) = match &ft {
                Some(ft) => (
                    match ft.role {
                        Role::Primary => "primary",
                        Role::Standby => "standby",
                    },
                    ft.generation.unwrap_or(0),
                    if ft.protected == Some(false) {
                        "UNPROTECTED".to_string()
                    } else {
                        format!(
                            "epoch pause p50 {:.2} ms | lag {:.1} ms",
                            ft.pause_ms.as_ref().map_or(f64::NAN, |p| p.p50),
                            ft.lag_ms.unwrap_or(f64::NAN)
                        )
                    },
                ),
                None => ("—", 0, String::new()),
            };
            let line = format!(
                "t={t:5.1}s {role} gen {gen} | {open} connections | {rate:6.0} req/s | latency \
                 p50 {:.1} ms p99 {:.1} ms | {protection}",
                percentile_ms(&window, 0.5),
                percentile_ms(&window, 0.99),
            );
            all_latencies.append(&mut window);
            if tty {
                print!("\r{line}\x1b[K");
                let _ = std::io::stdout().flush();
                next_print = t + 0.5;
            } else {
                println!("{line}");
                next_print = t + 1.0;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!();
    stop.store(true, Ordering::Relaxed);
    let histories: Vec<History> = clients
        .into_iter()
        .map(|c| c.join().unwrap_or_default())
        .collect();
    for p in &progress {
        if let Ok(mut l) = p.latencies.lock() {
            all_latencies.append(&mut l);
        }
    }
    all_latencies.sort_unstable();

    println!("── summary ──────────────────────────────────────────────");
    let requests: u64 = progress
        .iter()
        .map(|p| p.requests.load(Ordering::Relaxed))
        .sum();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "requests: {requests} answered on {} connections in {secs:.1} s ({:.0}/s); latency p50 \
         {:.2} ms, p99 {:.2} ms, max {:.1} ms",
        a.clients,
        requests as f64 / secs,
        percentile_ms(&all_latencies, 0.5),
        percentile_ms(&all_latencies, 0.99),
        percentile_ms(&all_latencies, 1.0),
    );
    if let Some(k) = killed {
        let outage = outage_at(&histories, k);
        println!(
            "failover: {}; {}",
            match (&failover, killed_unix_ms) {
                (Some(f), Some(at)) => format!(
                    "{} → generation {} from epoch {}, kill → guest running {:.1} ms",
                    f.reason,
                    f.generation,
                    f.from_epoch,
                    f.resumed_unix_ms - at
                ),
                _ => "the standby did not take over".into(),
            },
            if outage.is_zero() {
                format!(
                    "no client waited over {} ms between two replies across the kill",
                    GAP_KEPT.as_millis()
                )
            } else {
                format!(
                    "client-visible outage {:.0} ms (the longest gap between two replies \
                     across the kill)",
                    outage.as_secs_f64() * 1e3
                )
            }
        );
    }
    let who = if killed.is_some() && !rejoined {
        "standby"
    } else {
        "primary"
    };
    if let Some(p) = pair
        .status(who)
        .and_then(|s| s.ft)
        .and_then(|ft| ft.pause_ms)
        .filter(|p| p.count > 0)
    {
        println!(
            "epoch pause: p50 {:.3} ms, p99 {:.3} ms over {} epochs; p50 of each phase (ms): {}",
            p.p50,
            p.p99,
            p.count,
            p.phases_p50
                .iter()
                .map(|p| format!("{} {:.3}", p.phase, p.ms))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let reset: Vec<String> = histories
        .iter()
        .enumerate()
        .filter_map(|(id, h)| h.error.as_ref().map(|e| format!("client {id}: {e}")))
        .collect();
    let lost: usize = histories.iter().map(History::lost).sum();
    println!("connections reset: {}", reset.len());
    for r in &reset {
        println!("  {r}");
    }
    println!("acknowledged writes lost: {lost}");
    for (id, h) in histories.iter().enumerate() {
        if let Some(m) = &h.list_mismatch {
            println!("  client {id}: {m}");
        }
    }
    // The disk of whoever runs the guest now, read from the host.
    let survivor = if killed.is_some() && !rejoined {
        "standby".to_string()
    } else {
        pair.primary_node().to_string()
    };
    let disk_path = dir.join(format!("{survivor}.disk"));
    let replay = replay_disk(&disk_path, &histories);
    match &replay {
        Ok(n) => println!(
            "the survivor's disk ({survivor}.disk) replays {n} log records to exactly the \
             acknowledged history"
        ),
        Err(e) => println!("the survivor's disk ({survivor}.disk): {e}"),
    }
    drop(pair);
    if a.keep {
        println!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if !reset.is_empty() || lost > 0 || replay.is_err() {
        return Err("a client saw a reset or lost an acknowledged write".into());
    }
    Ok(())
}
