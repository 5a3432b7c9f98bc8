//! `cargo xtask bench kv`: the `kv` guest under real `redis-benchmark`, unprotected and
//! protected, next to a host `redis-server` with `appendfsync always`; then the outage a
//! client sees when the primary is killed.
//!
//! ```text
//!  host 10.79.0.1 ─ bridge ─┬─ TAP a ─ tandem primary (or run): kv 10.79.0.2, log on disk a
//!                           └─ TAP b ─ tandem standby (its own replica disk b)
//!  redis-benchmark -h 10.79.0.2 -t set,get,incr,lpush -n N -c 50 --csv
//!  reference: redis-server --appendonly yes --appendfsync always on 127.0.0.1
//!  outage: one client doing INCR without pause; the longest gap between two replies around
//!          each of KILLS SIGKILLs of the primary (a fresh standby joins after each)
//! ```
//!
//! Needs root (TAPs, a bridge) and Debian's `redis-tools` and `redis-server`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::pair::{Hosts, Pair, PairConfig};

const GUEST_IP: &str = "10.79.0.2";
const HOST_CIDR: &str = "10.79.0.1/24";
/// Requests per redis-benchmark test.
const REQUESTS: u64 = 20_000;
const CLIENTS: u64 = 50;
/// Kills for the outage figure.
const KILLS: usize = 10;

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// Links deleted on drop.
pub(crate) struct Links(Vec<String>);

impl Drop for Links {
    fn drop(&mut self) {
        for l in self.0.iter().rev() {
            let _ = ip(&["link", "del", l]);
        }
    }
}

/// A bridge with `host_cidr` and two TAPs on it (the primary's and the standby's).
pub(crate) fn lab(tag: &str, host_cidr: &str) -> Result<(Links, String, String), String> {
    let pid = std::process::id() % 10000;
    let (br, a, b) = (
        format!("xb{tag}{pid}"),
        format!("xa{tag}{pid}"),
        format!("xs{tag}{pid}"),
    );
    let _ = ip(&["link", "del", &br]);
    ip(&["link", "add", &br, "type", "bridge"])?;
    let mut links = Links(vec![br.clone()]);
    ip(&["addr", "add", host_cidr, "dev", &br])?;
    ip(&["link", "set", &br, "up"])?;
    for t in [&a, &b] {
        let _ = ip(&["link", "del", t]);
        ip(&["tuntap", "add", "name", t, "mode", "tap"])?;
        links.0.push(t.clone());
        ip(&["link", "set", t, "master", &br])?;
        ip(&["link", "set", t, "up"])?;
    }
    Ok((links, a, b))
}

/// A new 64 MiB disk image.
pub(crate) fn disk(path: &Path) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| e.to_string())?;
    f.set_len(64 << 20).map_err(|e| e.to_string())
}

/// Waits (30 s at most) until kv at `addr` answers PING.
pub(crate) fn wait_for_kv(addr: &SocketAddr) -> Result<(), String> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if let Ok(mut s) = TcpStream::connect_timeout(addr, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut b = [0u8; 7];
            if s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut b).is_ok()
                && &b == b"+PONG\r\n"
            {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("kv did not answer on {addr} within 30 s"))
}

/// redis-benchmark's CSV: test → (requests/s, p50 ms, p99 ms).
fn benchmark(host: &str, port: u16) -> Result<Vec<(String, f64, f64, f64)>, String> {
    let o = Command::new("redis-benchmark")
        .args(["-h", host, "-p", &port.to_string()])
        .args(["-t", "set,get,incr,lpush", "--csv"])
        .args(["-n", &REQUESTS.to_string(), "-c", &CLIENTS.to_string()])
        .output()
        .map_err(|e| format!("redis-benchmark: {e} (install Debian's redis-tools)"))?;
    let text = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        return Err(format!(
            "redis-benchmark failed: {text}{}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<String> = line
            .split(',')
            .map(|c| c.trim_matches('"').to_string())
            .collect();
        // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
        if f.len() >= 7 {
            let n = |i: usize| f[i].parse::<f64>().unwrap_or(f64::NAN);
            rows.push((f[0].clone(), n(1), n(4), n(6)));
        }
    }
    if rows.is_empty() {
        return Err(format!("redis-benchmark printed no results: {text}"));
    }
    Ok(rows)
}

fn guest_args(image: &Path, tap: &str, disk: &Path) -> Vec<String> {
    vec![
        "--image".into(),
        image.display().to_string(),
        "--vcpus".into(),
        "1".into(),
        "--mem-mib".into(),
        "256".into(),
        "--net".into(),
        format!("tap={tap}"),
        "--disk".into(),
        disk.display().to_string(),
        "--guest-arg".into(),
        format!("ip={GUEST_IP}/24"),
    ]
}

fn pair(
    bin: &Path,
    dir: &Path,
    image: &Path,
    a: &str,
    b: &str,
    interval_ms: u64,
) -> Result<Pair, String> {
    let mut nodes = vec!["primary".to_string(), "standby".into()];
    nodes.extend((2..=KILLS + 2).map(|n| format!("standby{n}")));
    for n in &nodes {
        disk(&dir.join(format!("{n}.disk")))?;
    }
    let cfg = PairConfig {
        bin: bin.to_path_buf(),
        dir: dir.to_path_buf(),
        guest: guest_args(image, a, &dir.join("primary.disk")),
        interval_ms,
        primary_env: vec![],
        log: "warn".into(),
        hosts: Hosts {
            standby_args: vec![
                "--net".into(),
                format!("tap={b}"),
                "--disk".into(),
                dir.join("{node}.disk").display().to_string(),
            ],
            ..Hosts::default()
        },
    };
    let mut p = Pair::start_standby(cfg).map_err(|e| format!("starting the pair: {e}"))?;
    p.start_primary()
        .map_err(|e| format!("starting the primary: {e}"))?;
    p.wait_protected(Duration::from_secs(30))
        .ok_or_else(|| format!("not protected: {}", p.log("primary")))?;
    Ok(p)
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One connection doing INCR without pause; every reply's arrival time.
fn incr_client(addr: SocketAddr, stop: Arc<AtomicBool>, times: Arc<Mutex<Vec<Instant>>>) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        if s.write_all(b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n").is_err() {
            return;
        }
        loop {
            if let Ok(Some(n)) = kvstore::resp::reply_len(&buf) {
                buf.drain(..n);
                break;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Instant::now());
    }
}

/// Runs the benchmark and appends its tables to `out`.
pub fn bench(out: &mut String) -> Result<(), String> {
    if Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("bench kv needs redis-benchmark (Debian's redis-tools)".into());
    }
    let bin = crate::pair::build_tandem()?;
    let dir = std::env::temp_dir().join(format!("tandem-bench-kv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let image = dir.join("kv.elf");
    std::fs::write(&image, guest_images::KV).map_err(|e| e.to_string())?;
    let (_links, a, b) = lab("k", HOST_CIDR).map_err(|e| format!("{e} (bench kv needs root)"))?;
    let addr: SocketAddr = format!("{GUEST_IP}:6379").parse().expect("address");
    let mut text = format!(
        "### kv under redis-benchmark (`cargo xtask bench kv`)\n\n\
         `kv` guest, 1 vCPU, 256 MiB, its append-only log on a 64 MiB virtio-blk disk \
         (`appendfsync always`: every write flushed before its reply), on a TAP behind a \
         bridge; `redis-benchmark -t set,get,incr,lpush -n {REQUESTS} -c {CLIENTS}` from the \
         host. Protected: a standby on its own TAP and disk replica on the same host, \
         output commit on. Reference: the host's `redis-server --appendonly yes \
         --appendfsync always`.\n\n\
         | server | test | requests/s | p50 ms | p99 ms |\n|---|---|---|---|---|\n"
    );
    let mut rows = |label: &str, r: Vec<(String, f64, f64, f64)>| {
        for (t, rps, p50, p99) in r {
            let row = format!("| {label} | {t} | {rps:.0} | {p50:.3} | {p99:.3} |\n");
            print!("{row}");
            text.push_str(&row);
        }
    };
    // Unprotected.
    disk(&dir.join("run.disk"))?;
    {
        let child = Command::new(&bin)
            .arg("run")
            .args(guest_args(&image, &a, &dir.join("run.disk")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("tandem run: {e}"))?;
        let _run = Reaped(child);
        wait_for_kv(&addr)?;
        rows("kv, unprotected", benchmark(GUEST_IP, 6379)?);
    }
    // Protected at three epoch intervals.
    for interval in [10u64, 20, 50] {
        let d = dir.join(format!("pair-{interval}"));
        std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        let p = pair(&bin, &d, &image, &a, &b, interval)?;
        rows(
            &format!("kv, protected, {interval} ms epochs"),
            benchmark(GUEST_IP, 6379)?,
        );
        drop(p);
    }
    // The host's redis-server.
    {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e} (install Debian's redis-server)"))?;
        let _server = Reaped(child);
        wait_for_kv(&format!("127.0.0.1:{port}").parse().expect("address"))?;
        rows(
            "host redis-server, appendfsync always",
            benchmark("127.0.0.1", port)?,
        );
    }
    // Outage per failover.
    let d = dir.join("kills");
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    let mut p = pair(&bin, &d, &image, &a, &b, 20)?;
    let stop = Arc::new(AtomicBool::new(false));
    let times = Arc::new(Mutex::new(Vec::new()));
    let client = {
        let (stop, times) = (stop.clone(), times.clone());
        std::thread::spawn(move || incr_client(addr, stop, times))
    };
    let mut outages = Vec::new();
    let mut failovers = Vec::new();
    for k in 0..KILLS {
        std::thread::sleep(Duration::from_millis(1500));
        let before = times.lock().unwrap_or_else(|e| e.into_inner()).len();
        let killed = Instant::now();
        let c = p
            .kill_and_rejoin(Duration::from_secs(30))
            .map_err(|e| format!("kill {}: {e}", k + 1))?;
        failovers.push(c.failover_ms);
        // Wait for the client to be answered again, then take the gap around the kill.
        let t0 = Instant::now();
        while times.lock().unwrap_or_else(|e| e.into_inner()).len() <= before + 1 {
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(format!("kill {}: the client got no reply for 30 s", k + 1));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = times.lock().unwrap_or_else(|e| e.into_inner());
        let gap = t
            .windows(2)
            .filter(|w| w[0] <= killed && killed <= w[1])
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        outages.push(gap.as_secs_f64() * 1e3);
    }
    stop.store(true, Ordering::Relaxed);
    drop(p);
    let _ = client.join();
    outages.sort_by(f64::total_cmp);
    failovers.sort_by(f64::total_cmp);
    let row = format!(
        "\nClient-visible outage per failover (one connection doing INCR without pause, 20 ms \
         epochs, {KILLS} SIGKILLs of the primary, a fresh standby joining after each): p50 \
         {:.0} ms, max {:.0} ms; kill → standby's guest running p50 {:.1} ms. A request that \
         reached only the dead primary is delivered again by the standby (input replication), \
         so the client does not wait for its TCP retransmission timeout (≥ 200 ms on Linux); \
         the rest is detection, activation and the first epoch's output commit.\n",
        outages[outages.len() / 2],
        outages[outages.len() - 1],
        failovers[failovers.len() / 2],
    );
    print!("{row}");
    text.push_str(&row);
    let _ = std::fs::remove_dir_all(&dir);
    writeln!(out, "{text}").map_err(|e| e.to_string())
}
