//! `cargo xtask bench io`: the virtio devices against the host doing the same I/O.
//!
//! ```text
//!  virtio-blk   tandem run blk-check bench=1 bs=B depth=16 mib=64   (timed by the guest's TSC)
//!               vs a host thread: the same blocks from the same buffers, pwrite …, fdatasync,
//!               pread … on the same file (recreated empty before each run)
//!  virtio-net   netns A: TAP ─ tandem (net-echo)        client in A: UDP ping-pong, host-timed
//!               vs netns A ─ veth ─ netns B: a host UDP echo thread in B, the same client in A
//! ```
//!
//! Every run is checked: the disk the guest wrote is `model::blk_bench_disk`, byte for byte,
//! and so is the host thread's; every echo carries the datagram's own bytes.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_images::{model, Record};
use testkit::netlab::NetNs;

use crate::{pair, percentile, us};

/// Bytes per blk pass.
const BLK_MIB: u64 = 64;
/// Requests queued per notification (the guest) and buffers (both sides).
const DEPTH: u64 = 16;
const SEED: u64 = 11;
/// Runs per configuration; the median is reported.
const RUNS: usize = 3;
/// Timed round trips per net measurement (after `WARMUP`).
const ROUND_TRIPS: usize = 20_000;
const WARMUP: usize = 500;
/// Datagrams in flight for the pipelined rate.
const WINDOW: usize = 8;
/// Payload bytes per datagram.
const PAYLOAD: usize = 64;

/// One pass's figures.
#[derive(Clone, Copy, Default)]
struct Pass {
    secs: f64,
    requests: u64,
    bytes: u64,
}

impl Pass {
    fn mbs(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
    fn iops(&self) -> f64 {
        self.requests as f64 / self.secs
    }
}

/// Write pass (flush included), its flush alone (s), read pass, notifications.
#[derive(Clone, Copy, Default)]
struct BlkRun {
    write: Pass,
    flush_secs: f64,
    read: Pass,
    notifications: u64,
}

/// Records of a `--output FILE` text stream (`vcpu seq kind value(hex) aux`) of vCPU 0.
fn records(path: &Path) -> Result<Vec<Record>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .map(|l| {
            let p: Vec<&str> = l.split(' ').collect();
            let bad = || format!("bad record line {l:?} in {}", path.display());
            if p.len() != 5 {
                return Err(bad());
            }
            Ok(Record {
                vcpu: p[0].parse().map_err(|_| bad())?,
                seq: p[1].parse().map_err(|_| bad())?,
                kind: p[2].parse().map_err(|_| bad())?,
                value: u64::from_str_radix(p[3], 16).map_err(|_| bad())?,
                aux: p[4].parse().map_err(|_| bad())?,
            })
        })
        .filter(|r| r.as_ref().map_or(true, |r| r.vcpu == 0))
        .collect()
}

/// A sparse file of `bytes` at `path`, replacing what was there (so that both sides start
/// from an image with no page-cache pages).
fn fresh_disk(path: &Path, bytes: u64) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(bytes).map_err(|e| e.to_string())
}

fn check_disk(path: &Path, bs: u64, who: &str) -> Result<(), String> {
    let got = std::fs::read(path).map_err(|e| e.to_string())?;
    if got != model::blk_bench_disk(SEED, bs, DEPTH, BLK_MIB << 20) {
        return Err(format!(
            "{who}: {} does not hold blk_bench_disk after the run",
            path.display()
        ));
    }
    Ok(())
}

fn guest_blk(tandem: &Path, elf: &Path, img: &Path, bs: u64) -> Result<BlkRun, String> {
    let bytes = BLK_MIB << 20;
    fresh_disk(img, bytes)?;
    let out = img.with_extension("records");
    let o = Command::new(tandem)
        .arg("run")
        .arg("--image")
        .arg(elf)
        .args(["--mem-mib", "64", "--disk"])
        .arg(img)
        .args(["--guest-arg", "bench=1"])
        .args(["--guest-arg", &format!("bs={bs}")])
        .args(["--guest-arg", &format!("depth={DEPTH}")])
        .args(["--guest-arg", &format!("mib={BLK_MIB}")])
        .args(["--guest-arg", &format!("seed={SEED}")])
        .arg("--output")
        .arg(&out)
        .args(["--timeout-secs", "300"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", tandem.display()))?;
    if !o.status.success() {
        return Err(format!(
            "tandem run blk-check failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let b = model::blk_bench(&records(&out)?, SEED)?;
    if b.bad_blocks != 0 {
        return Err(format!("the guest read {} blocks back wrong", b.bad_blocks));
    }
    check_disk(img, bs, "guest")?;
    let pass = |ticks| Pass {
        secs: b.secs(ticks),
        requests: b.requests,
        bytes: b.total,
    };
    Ok(BlkRun {
        write: pass(b.write_ticks),
        flush_secs: b.secs(b.flush_ticks),
        read: pass(b.read_ticks),
        notifications: b.notifications,
    })
}

/// The guest's pattern, done by a host thread on the same file.
fn host_blk(img: &Path, bs: u64) -> Result<BlkRun, String> {
    let bytes = BLK_MIB << 20;
    fresh_disk(img, bytes)?;
    let path = img.to_path_buf();
    std::thread::spawn(move || -> Result<BlkRun, String> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| e.to_string())?;
        let bufs: Vec<Vec<u8>> = (0..DEPTH)
            .map(|j| {
                let mut b = vec![0u8; bs as usize];
                model::blk_fill(SEED, j * bs, &mut b);
                b
            })
            .collect();
        let mut rbufs = bufs.clone();
        let n = bytes / bs;
        let t0 = Instant::now();
        for k in 0..n {
            f.write_all_at(&bufs[(k % DEPTH) as usize], k * bs)
                .map_err(|e| e.to_string())?;
        }
        let t1 = Instant::now();
        f.sync_data().map_err(|e| e.to_string())?;
        let t2 = Instant::now();
        let last = bs as usize - 8;
        let mut bad = 0;
        for k in 0..n {
            let j = (k % DEPTH) as usize;
            let b = &mut rbufs[j];
            f.read_exact_at(b, k * bs).map_err(|e| e.to_string())?;
            if b[..8] != bufs[j][..8] || b[last..] != bufs[j][last..] {
                bad += 1;
            }
        }
        let t3 = Instant::now();
        if bad != 0 {
            return Err(format!("the host thread read {bad} blocks back wrong"));
        }
        let pass = |d: Duration| Pass {
            secs: d.as_secs_f64(),
            requests: n,
            bytes,
        };
        Ok(BlkRun {
            write: pass(t2 - t0),
            flush_secs: (t2 - t1).as_secs_f64(),
            read: pass(t3 - t2),
            notifications: 0,
        })
    })
    .join()
    .map_err(|_| "the host I/O thread panicked".to_string())?
    .and_then(|r| check_disk(img, bs, "host thread").map(|()| r))
}

fn median<T: Copy>(runs: &[T], key: impl Fn(&T) -> f64) -> T {
    let mut v = runs.to_vec();
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    v[v.len() / 2]
}

fn bench_blk(tandem: &Path, elf: &Path, dir: &Path, text: &mut String) -> Result<(), String> {
    writeln!(
        text,
        "virtio-blk: blk-check `bench=1` writes {BLK_MIB} MiB sequentially in blocks of B bytes \
         ({DEPTH} requests queued per notification, as many as the 16-entry queue holds), \
         then one flush (fdatasync on the host), then reads it all back; timed by the guest's \
         TSC. Host: a thread doing the same pwrites from the same buffers, fdatasync, preads, \
         on the same file, recreated empty before each run. Median of {RUNS} runs; every run's \
         file is checked against `model::blk_bench_disk`.\n\n\
         | pass | block | guest MB/s | guest IOPS | host MB/s | host IOPS | guest / host | flush ms guest / host | exits per request |\n\
         |---|---|---|---|---|---|---|---|---|"
    )
    .unwrap();
    let img = dir.join("disk.img");
    for bs in [4096u64, 65536] {
        let mut g = Vec::new();
        let mut h = Vec::new();
        for _ in 0..RUNS {
            g.push(guest_blk(tandem, elf, &img, bs)?);
            h.push(host_blk(&img, bs)?);
        }
        let _ = std::fs::remove_file(&img);
        for (name, pick) in [
            (
                "write + flush",
                (|r: &BlkRun| r.write) as fn(&BlkRun) -> Pass,
            ),
            ("read", |r: &BlkRun| r.read),
        ] {
            let gr = median(&g, |r| pick(r).mbs());
            let hr = median(&h, |r| pick(r).mbs());
            let (gp, hp) = (pick(&gr), pick(&hr));
            let flush = if name == "read" {
                "–".to_string()
            } else {
                format!("{:.1} / {:.1}", gr.flush_secs * 1e3, hr.flush_secs * 1e3)
            };
            let row = format!(
                "| {name} | {} KiB | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} % | {flush} | {:.2} |",
                bs >> 10,
                gp.mbs(),
                gp.iops(),
                hp.mbs(),
                hp.iops(),
                100.0 * gp.mbs() / hp.mbs(),
                gr.notifications as f64 / (2 * gp.requests) as f64,
            );
            println!("{row}");
            writeln!(text, "{row}").unwrap();
        }
    }
    Ok(())
}

/// Round trips of one client socket to `to`: (sorted RTTs of a ping-pong, rate of the
/// ping-pong per s, rate with `WINDOW` datagrams in flight per s). Every echo is checked.
fn udp_client(sock: &UdpSocket, to: SocketAddr) -> Result<(Vec<Duration>, f64, f64), String> {
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let payload = |i: u64| -> [u8; PAYLOAD] {
        let mut p = [0u8; PAYLOAD];
        for (j, b) in p.iter_mut().enumerate() {
            *b = (i.wrapping_mul(0x9e37_79b9) >> (j % 8 * 8)) as u8 ^ j as u8;
        }
        p[..8].copy_from_slice(&i.to_le_bytes());
        p
    };
    let mut buf = [0u8; 2048];
    let mut recv = |want: Option<u64>| -> Result<u64, String> {
        let (n, from) = sock
            .recv_from(&mut buf)
            .map_err(|e| format!("no echo from {to}: {e}"))?;
        let i = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        if from != to || n != PAYLOAD || buf[..n] != payload(i) || want.is_some_and(|w| w != i) {
            return Err(format!("a wrong echo from {from}: {:?}", &buf[..n]));
        }
        Ok(i)
    };
    let send = |i: u64| {
        sock.send_to(&payload(i), to)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let mut rtts = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..(WARMUP + ROUND_TRIPS) as u64 {
        let t = Instant::now();
        send(i)?;
        recv(Some(i))?;
        if i >= WARMUP as u64 {
            rtts.push(t.elapsed());
        }
    }
    let pingpong = rtts.len() as f64 / rtts.iter().sum::<Duration>().as_secs_f64();
    // Pipelined: WINDOW in flight, a new one sent as each echo comes.
    let first = (WARMUP + ROUND_TRIPS) as u64;
    let total = ROUND_TRIPS as u64;
    let mut sent = 0u64;
    let t = Instant::now();
    while sent < WINDOW as u64 {
        send(first + sent)?;
        sent += 1;
    }
    let mut seen = vec![false; ROUND_TRIPS];
    for _ in 0..ROUND_TRIPS {
        let j = recv(None)?;
        let slot = j
            .checked_sub(first)
            .filter(|s| *s < sent)
            .ok_or(format!("echo {j}, never sent"))?;
        if std::mem::replace(&mut seen[slot as usize], true) {
            return Err(format!("echo {j} twice"));
        }
        if sent < total {
            send(first + sent)?;
            sent += 1;
        }
    }
    let pipelined = ROUND_TRIPS as f64 / t.elapsed().as_secs_f64();
    rtts.sort();
    Ok((rtts, pingpong, pipelined))
}

/// A child killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn guest_net(
    tandem: &Path,
    elf: &Path,
    dir: &Path,
) -> Result<(Vec<Duration>, f64, f64, String), String> {
    let pid = std::process::id();
    let ns = NetNs::new(&format!("tdbio{pid}"))?;
    let tap = format!("tdbio{}", pid % 100_000);
    let (host, guest) = (Ipv4Addr::new(10, 215, 0, 1), Ipv4Addr::new(10, 215, 0, 2));
    ns.ip(&["tuntap", "add", "name", &tap, "mode", "tap"])?;
    ns.ip(&["addr", "add", &format!("{host}/30"), "dev", &tap])?;
    ns.ip(&["link", "set", &tap, "up"])?;
    let log = dir.join("net-echo.log");
    let mut cmd = ns.prefix();
    cmd.push(tandem.display().to_string());
    let child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .arg("run")
        .arg("--image")
        .arg(elf)
        .args(["--mem-mib", "64", "--net", &format!("tap={tap}")])
        .args(["--guest-arg", &format!("ip={guest}/30")])
        .args(["--guest-arg", "port=7", "--timeout-secs", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("{}: {e}", tandem.display()))?;
    let _child = Running(child);
    let t = Instant::now();
    while ns
        .ip_output(&["-o", "link", "show", "dev", &tap])
        .map_or(true, |l| l.contains("NO-CARRIER"))
    {
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "tandem never opened the TAP: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sock = ns
        .enter(|| UdpSocket::bind((host, 0)))?
        .map_err(|e| e.to_string())?;
    // The guest answers once its interface is up: retry the first datagram until then.
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let to = SocketAddr::from((guest, 7));
    let t = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        sock.send_to(b"hello", to).map_err(|e| e.to_string())?;
        if sock
            .recv_from(&mut buf)
            .is_ok_and(|(n, _)| &buf[..n] == b"hello")
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err("net-echo never answered".into());
        }
    }
    // Echoes of the retries.
    while sock.recv_from(&mut buf).is_ok() {}
    let (rtts, pp, pl) = udp_client(&sock, to)?;
    Ok((rtts, pp, pl, "guest".into()))
}

fn host_net() -> Result<(Vec<Duration>, f64, f64), String> {
    let pid = std::process::id();
    let a = NetNs::new(&format!("tdbioa{pid}"))?;
    let b = NetNs::new(&format!("tdbiob{pid}"))?;
    let (va, vb) = ("tdbva", "tdbvb");
    a.ip(&["link", "add", va, "type", "veth", "peer", "name", vb])?;
    a.ip(&["link", "set", vb, "netns", b.name()])?;
    let (ia, ib) = (Ipv4Addr::new(10, 216, 0, 1), Ipv4Addr::new(10, 216, 0, 2));
    a.ip(&["addr", "add", &format!("{ia}/30"), "dev", va])?;
    b.ip(&["addr", "add", &format!("{ib}/30"), "dev", vb])?;
    a.ip(&["link", "set", va, "up"])?;
    b.ip(&["link", "set", vb, "up"])?;
    let server = b
        .enter(|| UdpSocket::bind((ib, 7)))?
        .map_err(|e| e.to_string())?;
    server
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !s2.load(Ordering::Relaxed) {
            if let Ok((n, from)) = server.recv_from(&mut buf) {
                let _ = server.send_to(&buf[..n], from);
            }
        }
    });
    let client = a
        .enter(|| UdpSocket::bind((ia, 0)))?
        .map_err(|e| e.to_string())?;
    let r = udp_client(&client, SocketAddr::from((ib, 7)));
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    r
}

fn bench_net(tandem: &Path, elf: &Path, dir: &Path, text: &mut String) -> Result<(), String> {
    writeln!(
        text,
        "\nvirtio-net: a UDP client in a network namespace sends {PAYLOAD}-byte datagrams to \
         net-echo behind a TAP in that namespace (tandem runs there too); {ROUND_TRIPS} \
         ping-pong round trips after {WARMUP} warm-up ones, timed on the host, then \
         {ROUND_TRIPS} more with {WINDOW} in flight. Host: the same client against a UDP \
         echo thread in a second namespace, over a veth pair. Every echo is checked.\n\n\
         | echo | round trips/s | p50 µs | p99 µs | round trips/s, {WINDOW} in flight |\n\
         |---|---|---|---|---|"
    )
    .unwrap();
    let (g, gpp, gpl, _) = guest_net(tandem, elf, dir)?;
    let (h, hpp, hpl) = host_net()?;
    for (name, rtts, pp, pl) in [
        ("net-echo (virtio-net, TAP)", &g, gpp, gpl),
        ("host thread (veth)", &h, hpp, hpl),
    ] {
        let row = format!(
            "| {name} | {pp:.0} | {} | {} | {pl:.0} |",
            us(percentile(rtts, 0.5)),
            us(percentile(rtts, 0.99))
        );
        println!("{row}");
        writeln!(text, "{row}").unwrap();
    }
    let row = format!(
        "| guest / host | {:.0} % | | | {:.0} % |",
        100.0 * gpp / hpp,
        100.0 * gpl / hpl
    );
    println!("{row}");
    writeln!(text, "{row}").unwrap();
    Ok(())
}

/// `cargo xtask bench io`.
pub fn bench(out: &mut String) -> Result<(), String> {
    let tandem = pair::build_tandem()?;
    let dir: PathBuf = pair::root().join("target/bench-io");
    let paths = guest_images::write_to(&dir).map_err(|e| e.to_string())?;
    let elf = |name: &str| {
        paths
            .iter()
            .find(|p| p.file_stem().is_some_and(|s| s == name))
            .cloned()
            .ok_or(format!("no {name} image"))
    };
    let mut text = String::from("### virtio I/O (`cargo xtask bench io`)\n\n");
    bench_blk(&tandem, &elf("blk-check")?, &dir, &mut text)?;
    bench_net(&tandem, &elf("net-echo")?, &dir, &mut text)?;
    writeln!(text).unwrap();
    out.push_str(&text);
    Ok(())
}
