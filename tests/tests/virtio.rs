//! virtio-mmio devices end to end, with the real `tandem` binary on real KVM: blk-check on a
//! raw disk file (records, digest and the disk itself against `guest_images::model`), a
//! read-only disk and a write past the end refused, a snapshot in the middle of the disk I/O
//! restored in a new process, blk-check's benchmark mode, net-echo over a TAP in a network
//! namespace of the test, and a bad ELF refused.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use checkpoint::Trace;
use devices::{DigestSink, Record};
use guest_images::{kind, model};
use tandem_tests::tap::unavailable as tap_unavailable;
use tandem_tests::{require_kvm, tandem, tandem_bin, tandem_ok, total_digest};
use testkit::netlab::NetNs;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("tandem-virtio-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
    fn s(&self, name: &str) -> String {
        self.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the guest images into `d` and returns the path of `name`.
fn image(d: &Dir, name: &str) -> String {
    guest_images::write_to(&d.0).unwrap();
    d.s(&format!("{name}.elf"))
}

/// A sparse raw disk of `bytes`.
fn disk(path: &Path, bytes: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes).unwrap();
}

/// Records of a `--output FILE` text stream (`vcpu seq kind value(hex) aux`), per vCPU.
fn records(files: &[&Path], vcpus: usize) -> Vec<Vec<Record>> {
    let mut out = vec![Vec::new(); vcpus];
    for f in files {
        for l in std::fs::read_to_string(f).unwrap().lines() {
            let p: Vec<&str> = l.split(' ').collect();
            let r = Record {
                vcpu: p[0].parse().unwrap(),
                seq: p[1].parse().unwrap(),
                kind: p[2].parse().unwrap(),
                value: u64::from_str_radix(p[3], 16).unwrap(),
                aux: p[4].parse().unwrap(),
            };
            out[r.vcpu as usize].push(r);
        }
    }
    out
}

fn spawn(args: &[&str]) -> Child {
    Command::new(tandem_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tandem")
}

fn finish(child: Child) -> (String, String) {
    let out = child.wait_with_output().unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "tandem failed: {e}\n{o}");
    (o, e)
}

/// The panic text of vCPU 0's stream.
fn panic_text(recs: &[Record]) -> String {
    model::panic_text(recs)
        .unwrap_or_else(|| panic!("no panic in {recs:?}"))
        .text
}

const DISK_BYTES: u64 = 8 << 20;

#[test]
fn blk_check_writes_exactly_the_model_disk_and_a_write_past_the_end_is_refused() {
    require_kvm();
    let d = Dir::new("blk");
    let elf = image(&d, "blk-check");
    let img = d.join("disk.img");
    disk(&img, DISK_BYTES);
    let out = d.join("out.txt");
    let r = tandem_ok(&[
        "run",
        "--image",
        &elf,
        "--mem-mib",
        "64",
        "--disk",
        img.to_str().unwrap(),
        "--guest-arg",
        "seed=7",
        "--guest-arg",
        "past_end=1",
        "--output",
        out.to_str().unwrap(),
    ]);
    let got = records(&[&out], 1);
    let want = model::blk_records(7, DISK_BYTES);
    assert_eq!(got[0], want, "the record stream is the model's");
    assert_eq!(
        total_digest(&r.stdout),
        DigestSink::of(&[want]).total,
        "the digest is the model's"
    );
    // Read from the host afterwards: exactly the pattern, and not one byte more (the write
    // past the end was refused, or the guest would have panicked).
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes.len() as u64, DISK_BYTES, "the disk did not grow");
    assert!(
        bytes == model::blk_expected_disk(7, DISK_BYTES),
        "the disk holds exactly blk_expected_disk"
    );
}

#[test]
fn blk_check_bench_mode_batches_its_requests_and_writes_the_model_disk() {
    require_kvm();
    const BYTES: u64 = 4 << 20;
    let d = Dir::new("bench");
    let elf = image(&d, "blk-check");
    let img = d.join("disk.img");
    disk(&img, BYTES);
    let out = d.join("out.txt");
    tandem_ok(&[
        "run",
        "--image",
        &elf,
        "--mem-mib",
        "64",
        "--disk",
        img.to_str().unwrap(),
        "--guest-arg",
        "seed=5",
        "--guest-arg",
        "bench=1",
        "--guest-arg",
        "bs=4096",
        "--guest-arg",
        "depth=16",
        "--output",
        out.to_str().unwrap(),
    ]);
    let got = records(&[&out], 1);
    let b = model::blk_bench(&got[0], 5).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((b.total, b.bs, b.requests), (BYTES, 4096, BYTES / 4096));
    assert_eq!(b.bad_blocks, 0, "every block read back is the one written");
    assert!(b.write_ticks > b.flush_ticks && b.read_ticks > 0, "{b:?}");
    // Requests are queued several per notification (one exit each), not one by one: at
    // least 4 per notification on average over both passes (plus the flush's).
    assert!(
        b.notifications - 1 <= 2 * b.requests / 4,
        "{} notifications for 2 × {} requests",
        b.notifications,
        b.requests
    );
    eprintln!(
        "bench mode: {} requests per pass, {} notifications; write {:.1} ms (flush {:.1}), read {:.1} ms",
        b.requests,
        b.notifications,
        b.secs(b.write_ticks) * 1e3,
        b.secs(b.flush_ticks) * 1e3,
        b.secs(b.read_ticks) * 1e3
    );
    assert!(
        std::fs::read(&img).unwrap() == model::blk_bench_disk(5, 4096, 16, BYTES),
        "the disk holds exactly blk_bench_disk"
    );
}

#[test]
fn a_readonly_disk_refuses_the_guests_writes() {
    require_kvm();
    let d = Dir::new("ro");
    let elf = image(&d, "blk-check");
    let img = d.join("ro.img");
    disk(&img, 4 << 20);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0x5a; 4096], 0).unwrap();
    let before = std::fs::read(&img).unwrap();
    let ro = format!("{},readonly", img.display());
    let run = |extra: &[&str], tag: &str| -> String {
        let out = d.join(&format!("{tag}.txt"));
        let mut args = vec![
            "run",
            "--image",
            &elf,
            "--mem-mib",
            "64",
            "--disk",
            &ro,
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        tandem_ok(&args);
        panic_text(&records(&[&out], 1)[0])
    };
    // The device says read-only (VIRTIO_BLK_F_RO); blk-check stops there.
    let p = run(&[], "plain");
    assert!(p.contains("the disk is read-only"), "{p}");
    // Writing anyway: the device fails the first write with an I/O error.
    let p = run(&["--guest-arg", "ro_write=1"], "forced");
    assert!(
        p.contains("write of 512 bytes at 0x0: I/O error"),
        "the first write fails with the device's IOERR: {p}"
    );
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "the image is untouched"
    );
}

/// Polls `status` until the guest has emitted a record (BLK_INFO: the I/O begins).
fn wait_for_records(sock: &Path) {
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "no control socket");
        std::thread::sleep(Duration::from_millis(2));
    }
    loop {
        let s = tandem(&["ctl", sock.to_str().unwrap(), "status"]);
        let v: Option<vmx::control::VmStatus> = serde_json::from_slice(&s.stdout).ok();
        if v.as_ref().is_some_and(|v| v.records > 0) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no output: {v:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_snapshot_in_the_middle_of_blk_check_io_restores_the_disk_and_carries_on_exactly() {
    require_kvm();
    const BYTES: u64 = 16 << 20;
    let d = Dir::new("snap");
    let elf = image(&d, "blk-check");
    let img = d.join("disk.img");
    disk(&img, BYTES);
    let (sock, a, snap, trace) = (d.s("ctl"), d.s("a.txt"), d.s("snap"), d.s("save.json"));
    let child = spawn(&[
        "run",
        "--image",
        &elf,
        "--mem-mib",
        "64",
        "--disk",
        img.to_str().unwrap(),
        "--guest-arg",
        "seed=3",
        "--control",
        &sock,
        "--output",
        &a,
        "--trace",
        &trace,
    ]);
    wait_for_records(Path::new(&sock));
    let reply = tandem(&["ctl", &sock, "snapshot", &snap, "--stop"]);
    assert!(
        reply.status.success(),
        "snapshot refused: {}",
        String::from_utf8_lossy(&reply.stdout)
    );
    let (first, err) = finish(child);
    assert!(first.contains("suspended to"), "{first}");

    // The snapshot fell inside the I/O: BLK_INFO out, DONE not.
    let before = records(&[Path::new(&a)], 1);
    assert!(!before[0].is_empty(), "BLK_INFO came before the snapshot");
    assert!(
        before[0].iter().all(|r| r.kind != kind::DONE),
        "the snapshot came before the end: {:?}",
        before[0]
    );
    // The disk was captured beside the state file, at that point of the write pass (or
    // later): a prefix of the pattern, zeros after it.
    let copy = std::fs::read_dir(&d.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("snap.disk0-")
        })
        .expect("the disk copy beside the state file");
    let captured = std::fs::read(copy).unwrap();
    assert_eq!(captured.len() as u64, BYTES);
    let want = model::blk_expected_disk(3, BYTES);
    let done = captured
        .chunks(512)
        .zip(want.chunks(512))
        .take_while(|(c, w)| c == w)
        .count() as u64
        * 512;
    assert!(
        captured[done as usize..].iter().all(|&b| b == 0),
        "the capture is the pattern up to {done} and zeros after it"
    );
    eprintln!(
        "snapshot after {done} of {BYTES} bytes written ({} records out)",
        before[0].len()
    );
    let t: Trace = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let steps: Vec<String> = t.0.iter().map(|s| format!("{s:?}")).collect();
    assert!(
        steps.iter().any(|s| s.contains("capture disk 0")),
        "the trace shows the capture: {steps:#?}"
    );
    for line in err.lines().filter(|l| l.contains("capture disk")) {
        eprintln!("{line}");
    }

    // Whatever happens to the image meanwhile, the restore puts the captured disk back.
    std::fs::write(&img, vec![0xee; BYTES as usize]).unwrap();
    let b = d.s("b.txt");
    let rtrace = d.s("restore.json");
    let out = tandem_ok(&["restore", &snap, "--output", &b, "--trace", &rtrace]);
    let rt: Trace = serde_json::from_str(&std::fs::read_to_string(&rtrace).unwrap()).unwrap();
    for t in [&t, &rt] {
        t.check_order()
            .unwrap_or_else(|e| panic!("out of order at {e:?} in {t:#?}"));
    }
    let first_restore = format!("{:?}", rt.0.first().expect("a restore trace"));
    assert!(
        first_restore.contains("restore disk 0"),
        "the disk is put back first: {first_restore}"
    );
    let want_recs = model::blk_records(3, BYTES);
    assert_eq!(
        total_digest(&out.stdout),
        DigestSink::of(std::slice::from_ref(&want_recs)).total,
        "the same digest as an uninterrupted run"
    );
    let all = records(&[Path::new(&a), Path::new(&b)], 1);
    assert_eq!(all[0], want_recs, "every record exactly once");
    assert!(
        std::fs::read(&img).unwrap() == want,
        "the same final disk as an uninterrupted run"
    );
}

/// A child process killed (and reaped) on drop, unless [`finish`] took it.
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn net_echo_answers_10000_udp_datagrams_from_a_client_in_a_netns() {
    require_kvm();
    if let Some(why) = tap_unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    const N: u32 = 10_000;
    let pid = std::process::id();
    let name = format!("tdv{}", pid % 100_000);
    // The TAP lives in a namespace of this test, with a /30: 10.213.x.1 (host) and .2
    // (guest); tandem runs in that namespace (it opens the TAP by name there), and so does
    // the UDP client's socket.
    let ns = match NetNs::new(&format!("tdvns{pid}")) {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("SKIPPED: cannot create a network namespace: {e}");
            return;
        }
    };
    let x = pid % 250;
    let (host, guest) = (
        Ipv4Addr::new(10, 213, x as u8, 1),
        Ipv4Addr::new(10, 213, x as u8, 2),
    );
    let cidr = format!("{host}/30");
    for args in [
        &["tuntap", "add", "name", &name, "mode", "tap"][..],
        &["addr", "add", &cidr, "dev", &name],
        &["link", "set", &name, "up"],
    ] {
        if let Err(e) = ns.ip(args) {
            eprintln!("SKIPPED: cannot set up the TAP in netns {}: {e}", ns.name());
            return;
        }
    }
    let d = Dir::new("net");
    let elf = image(&d, "net-echo");
    let (out, ctl, trace, snap) = (d.s("out.txt"), d.s("ctl"), d.s("trace.json"), d.s("snap"));
    let net = format!("tap={name},mac=02:54:00:12:34:56");
    let gip = format!("ip={guest}/30");
    let count = format!("count={N}");
    let bin = tandem_bin();
    let mut cmd = ns.prefix();
    cmd.push(bin.to_str().unwrap().to_string());
    let child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .args([
            "run",
            "--image",
            &elf,
            "--mem-mib",
            "64",
            "--net",
            &net,
            "--guest-arg",
            &gip,
            "--guest-arg",
            "port=7",
            "--guest-arg",
            &count,
            "--output",
            &out,
            "--timeout-secs",
            "120",
            "--control",
            &ctl,
            "--trace",
            &trace,
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tandem in the netns");
    let mut child = Running(Some(child));
    // Send only once tandem holds the TAP (before that it has no carrier and the host's ARP
    // for the guest fails) and the guest has brought its interface up (NET_UP is out).
    let t = Instant::now();
    while ns
        .ip_output(&["-o", "link", "show", "dev", &name])
        .map_or(true, |l| l.contains("NO-CARRIER"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "tandem never opened the TAP"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_for_records(Path::new(&ctl));

    let sock = ns
        .enter(|| UdpSocket::bind((host, 0)))
        .unwrap()
        .expect("a UDP socket in the netns");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let payload = |i: u32| -> Vec<u8> {
        let len = 16 + (i as usize * 7) % 1000;
        let mut p = i.to_le_bytes().to_vec();
        p.extend((4..len).map(|j| (j as u32 ^ i.wrapping_mul(0x9e37)) as u8));
        p
    };
    // Up to WINDOW datagrams in flight; every echo is checked byte for byte.
    const WINDOW: u32 = 8;
    let (mut sent, mut echoed, mut bytes) = (0u32, 0u32, 0u64);
    let mut got = vec![false; N as usize];
    let mut buf = [0u8; 2048];
    let t0 = Instant::now();
    let mut last = Instant::now();
    // A snapshot that continues, in the middle of the traffic: QUIESCE pauses the RX thread,
    // CONTINUE_SYNC resumes it, and no datagram is lost.
    let mut snapshot = None;
    while echoed < N {
        if echoed >= N / 3 && snapshot.is_none() {
            let (ctl, snap) = (ctl.clone(), snap.clone());
            snapshot = Some(std::thread::spawn(move || {
                tandem(&["ctl", &ctl, "snapshot", &snap])
            }));
        }
        while sent < N && sent - echoed < WINDOW {
            sock.send_to(&payload(sent), (guest, 7)).unwrap();
            sent += 1;
        }
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                assert_eq!(from, (guest, 7).into(), "the echo comes from the guest");
                assert!(n >= 4, "a {n}-byte echo");
                let i = u32::from_le_bytes(buf[..4].try_into().unwrap());
                assert!(i < sent, "echo of datagram {i}, never sent");
                assert_eq!(&buf[..n], &payload(i)[..], "echo {i} is the datagram");
                assert!(!got[i as usize], "datagram {i} echoed twice");
                got[i as usize] = true;
                echoed += 1;
                bytes += n as u64;
                last = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                assert!(
                    last.elapsed() < Duration::from_secs(20),
                    "no echo for 20 s: {echoed} of {sent} sent echoed"
                );
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "{N} datagrams echoed in {secs:.2} s ({:.0} µs per round trip, window {WINDOW})",
        secs * 1e6 / f64::from(N)
    );
    let reply = snapshot.expect("a snapshot").join().unwrap();
    assert!(
        reply.status.success(),
        "snapshot: {}",
        String::from_utf8_lossy(&reply.stdout)
    );
    let (_, _) = finish(child.0.take().expect("tandem"));
    let t: Trace = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let steps: Vec<String> =
        t.0.iter()
            .map(|e| format!("{:?} {:?} {}", e.state, e.side, e.step))
            .collect();
    for want in [
        "Quiesce Vmx quiesce group virtio: paused 1 net RX thread(s)",
        "Save Vmx checkpoint group virtio",
        "ContinueSync Vmx sync group virtio: resumed 1 net RX thread(s)",
    ] {
        assert!(
            steps.iter().any(|s| s == want),
            "{want:?} not in {steps:#?}"
        );
    }
    let recs = records(&[Path::new(&out)], 1).remove(0);
    let up = recs.first().expect("NET_UP");
    assert_eq!(up.kind, kind::NET_UP);
    assert_eq!(up.value, u64::from(u32::from(guest)) << 8 | 30);
    let done = recs.last().unwrap();
    assert_eq!(
        (done.kind, done.value, done.aux),
        (kind::DONE, u64::from(N), bytes)
    );
    let echoes: Vec<u64> = recs
        .iter()
        .filter(|r| r.kind == kind::NET_ECHO)
        .map(|r| r.value)
        .collect();
    assert_eq!(echoes, (1..=10).map(|k| k * 1000).collect::<Vec<_>>());
}

#[test]
fn a_bad_elf_and_a_missing_disk_are_refused_with_exit_2() {
    let d = Dir::new("bad");
    // ELF magic, 64-bit, little endian, then nonsense: a truncated header.
    let bad = d.join("bad.elf");
    let mut bytes = b"\x7fELF\x02\x01\x01".to_vec();
    bytes.resize(40, 0xff);
    std::fs::write(&bad, &bytes).unwrap();
    let o = tandem(&["run", "--image", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--image") && err.contains("bad.elf"),
        "the message names the option and the file: {err}"
    );

    let elf = image(&d, "blk-check");
    let o = tandem(&["run", "--image", &elf, "--disk", "/nonexistent/disk.img"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("/nonexistent/disk.img"), "{err}");

    let o = tandem(&["run", "--image", &elf, "--disk", "x.img,rw"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("FILE[,readonly]"), "{err}");
}

#[test]
fn run_help_documents_the_device_flags() {
    let o = tandem_ok(&["run", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("--disk <FILE[,readonly]>"), "{help}");
    assert!(help.contains("--net <tap=NAME[,mac=MAC]>"), "{help}");
}
