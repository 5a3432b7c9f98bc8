//! Snapshots: save at a random moment, restore in a new process, the guest carries on exactly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use checkpoint::group::{ManifestEntry, MANIFEST};
use checkpoint::memfile::{MainMemPersist, MemState};
use checkpoint::{Persist, Section, Snapshot, Trace};
use devices::DigestSink;
use rand::{Rng, SeedableRng};
use tandem_tests::{require_kvm, tandem, tandem_bin, tandem_ok, total_digest, workload};

/// A 2-vCPU `dirty` guest of about a second.
const DIRTY_2X8M: &[&str] = &[
    "--guest",
    "dirty",
    "--guest-arg",
    "iters=8M",
    "--guest-arg",
    "pages=4",
    "--guest-arg",
    "ws_mib=4",
    "--guest-arg",
    "record_every=20k",
    "--vcpus",
    "2",
    "--mem-mib",
    "32",
];

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("tandem-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn(args: &[&str]) -> Child {
    Command::new(tandem_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tandem")
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ctl(sock: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec!["ctl", sock.to_str().unwrap()];
    a.extend_from_slice(args);
    tandem(&a)
}

/// The memory file the state file `state` names.
fn mem_file(state: &Path) -> PathBuf {
    let snap = Snapshot::read_file(state).unwrap();
    MemState::of(&snap)
        .unwrap()
        .file_path(state)
        .unwrap()
        .expect("a sparse memory file")
}

/// Writes state file `to`: the state of `from`, naming a copy of its memory file (`to`'s own,
/// so damaging it leaves `from` whole).
fn copy_snapshot(from: &Path, to: &Path) {
    let mut s = Snapshot::read_file(from).unwrap();
    let mem = mem_file(from);
    let sec = s.take("module/MainMem").unwrap();
    let mut state = MainMemPersist::decode(sec.version, &sec.data).unwrap();
    let copy = checkpoint::files::data_path(to, "mem", "0000000000000000");
    std::fs::copy(&mem, &copy).unwrap();
    state.file = Some(checkpoint::files::name_of(&copy).unwrap());
    s.push(Section {
        name: sec.name,
        version: sec.version,
        data: MainMemPersist::encode(&state).unwrap(),
    })
    .unwrap();
    s.write_file(to).unwrap();
}

fn finish(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tandem failed: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Text lines of the record stream, per vCPU, in order.
fn lines_per_vcpu(files: &[&Path], vcpus: u32) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new(); vcpus as usize];
    for f in files {
        for l in std::fs::read_to_string(f).unwrap().lines() {
            let v: usize = l.split(' ').next().unwrap().parse().unwrap();
            out[v].push(l.to_string());
        }
    }
    out
}

fn reference_lines(w: &workloads::Workload, vcpus: u32) -> Vec<Vec<String>> {
    w.reference_all(vcpus)
        .iter()
        .enumerate()
        .map(|(v, recs)| {
            recs.iter()
                .map(|r| format!("{v} {} {} {:016x} {}", r.seq, r.kind, r.value, r.aux))
                .collect()
        })
        .collect()
}

/// Runs `args`, snapshots with --stop after `delay`, restores in a new process; returns the
/// directory (state file "snap", outputs "a.txt", "b.txt", traces) and the restore's stdout.
fn snapshot_and_restore(tag: &str, args: &[&str], delay: Duration) -> (Dir, String) {
    let d = Dir::new(tag);
    let (sock, a, snap) = (d.join("ctl"), d.join("a.txt"), d.join("snap"));
    let mut run_args = vec![
        "run",
        "--control",
        sock.to_str().unwrap(),
        "--output",
        a.to_str().unwrap(),
    ];
    let trace = d.join("save-trace.json");
    run_args.extend(["--trace", trace.to_str().unwrap()]);
    run_args.extend_from_slice(args);
    let child = spawn(&run_args);
    wait_for(&sock);
    // The snapshot must fall in the middle of the stream: after the first record.
    let t = Instant::now();
    loop {
        let s = ctl(&sock, &["status"]);
        let v: Option<vmx::control::VmStatus> = serde_json::from_slice(&s.stdout).ok();
        if v.as_ref().is_some_and(|v| v.records > 0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no output after 30 s: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(delay);
    let reply = ctl(&sock, &["snapshot", snap.to_str().unwrap(), "--stop"]);
    assert!(
        reply.status.success(),
        "snapshot refused: {}",
        String::from_utf8_lossy(&reply.stdout)
    );
    let first = finish(child);
    assert!(first.contains("suspended to"), "{first}");
    let b = d.join("b.txt");
    let rtrace = d.join("restore-trace.json");
    let out = tandem_ok(&[
        "restore",
        snap.to_str().unwrap(),
        "--output",
        b.to_str().unwrap(),
        "--trace",
        rtrace.to_str().unwrap(),
    ]);
    (d, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("random seed {s}");
    s
}

#[test]
fn snapshot_at_a_random_moment_restores_in_a_new_process_exactly() {
    require_kvm();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            "counter",
            &[("iters", "300M"), ("record_every", "100k")],
            &["--vcpus", "1", "--mem-mib", "32"],
        ),
        (
            "counter",
            &[("iters", "150M"), ("record_every", "100k")],
            &["--vcpus", "4", "--mem-mib", "32"],
        ),
        (
            "dirty",
            &[
                ("iters", "20M"),
                ("pages", "4"),
                ("ws_mib", "4"),
                ("record_every", "20k"),
            ],
            &["--vcpus", "1", "--mem-mib", "32"],
        ),
        (
            "dirty",
            &[
                ("iters", "8M"),
                ("pages", "4"),
                ("ws_mib", "4"),
                ("record_every", "20k"),
            ],
            &["--vcpus", "4", "--mem-mib", "32"],
        ),
    ];
    for (name, gargs, vm_args) in cases {
        let w = workload(name, gargs);
        let vcpus: u32 = vm_args[1].parse().unwrap();
        let mut args = vec!["--guest", *name];
        let kv: Vec<String> = gargs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for a in &kv {
            args.extend(["--guest-arg", a.as_str()]);
        }
        args.extend_from_slice(vm_args);
        let delay = Duration::from_millis(rng.gen_range(30..300));
        let (d, out) = snapshot_and_restore(&format!("{name}{vcpus}"), &args, delay);
        let want = DigestSink::of(&w.reference_all(vcpus));
        assert_eq!(
            total_digest(out.as_bytes()),
            want.total,
            "{name} on {vcpus} vCPUs, snapshot after {delay:?}"
        );
        let got = lines_per_vcpu(&[&d.join("a.txt"), &d.join("b.txt")], vcpus);
        assert_eq!(
            got,
            reference_lines(&w, vcpus),
            "every record exactly once, in order"
        );
        let before = std::fs::read_to_string(d.join("a.txt"))
            .unwrap()
            .lines()
            .count();
        assert!(
            before > 0,
            "the snapshot came after some output ({name}, {vcpus} vCPUs)"
        );
    }
}

#[test]
fn the_checkpoint_trace_runs_monitor_first_on_save_and_vmx_first_on_restore() {
    require_kvm();
    let w = [
        "--guest",
        "counter",
        "--guest-arg",
        "iters=300M",
        "--vcpus",
        "2",
        "--mem-mib",
        "32",
    ];
    let (d, _) = snapshot_and_restore("trace", &w, Duration::from_millis(50));
    let read = |f: &str| -> Trace {
        serde_json::from_str(&std::fs::read_to_string(d.join(f)).unwrap()).unwrap()
    };
    let save = read("save-trace.json");
    let restore = read("restore-trace.json");
    for t in [&save, &restore] {
        t.check_order()
            .unwrap_or_else(|e| panic!("out of order at {e:?} in {t:#?}"));
    }
    let steps = |t: &Trace| -> Vec<String> {
        t.0.iter()
            .map(|e| format!("{:?} {:?} {}", e.state, e.side, e.step))
            .collect()
    };
    assert_eq!(
        steps(&save),
        [
            // Only steps with an effect are traced: no module syncs anything, and of the
            // groups only the output device does (it drains the rings before the save).
            "SaveSync Vmx sync group output: drain output rings",
            "Quiesce Monitor restrict actions",
            "Save Monitor save vCPU state",
            "Save Monitor checkpoint MainMem",
            "Save Monitor checkpoint CPU",
            "Save Monitor checkpoint Irqchip",
            "Save Vmx checkpoint group config",
            "Save Vmx checkpoint group output",
            "Save Vmx checkpoint group vmmdev",
            "Save Vmx write state file",
            "Save Vmx power off",
        ]
    );
    assert_eq!(
        steps(&restore),
        [
            "Restore Vmx restore group config",
            "Restore Vmx restore group output",
            "Restore Vmx restore group vmmdev",
            "Restore Monitor restore MainMem",
            "Restore Monitor restore CPU",
            "Restore Monitor restore Irqchip",
            "Restore Monitor restore vCPU state",
            "RestoreSync Vmx sync group output: drain output rings",
            "RestoreSync Vmx unpause",
        ]
    );
}

#[test]
fn a_checkpoint_that_continues_leaves_the_run_exact() {
    require_kvm();
    let d = Dir::new("continue");
    let (sock, snap) = (d.join("ctl"), d.join("snap"));
    let w = workload(
        "dirty",
        &[
            ("iters", "8M"),
            ("pages", "4"),
            ("ws_mib", "4"),
            ("record_every", "20k"),
        ],
    );
    let child = spawn(
        &["run", "--control", sock.to_str().unwrap()]
            .iter()
            .chain(DIRTY_2X8M)
            .copied()
            .collect::<Vec<_>>(),
    );
    wait_for(&sock);
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(40));
        let r = ctl(
            &sock,
            &[
                "snapshot",
                snap.with_extension(i.to_string()).to_str().unwrap(),
            ],
        );
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stdout));
    }
    assert!(ctl(&sock, &["pause"]).status.success());
    let s = ctl(&sock, &["status"]);
    let st: vmx::control::VmStatus = serde_json::from_slice(&s.stdout).expect("a status");
    assert_eq!(st.state, vmx::control::RunState::Paused);
    assert!(ctl(&sock, &["resume"]).status.success());
    let out = finish(child);
    assert_eq!(
        total_digest(out.as_bytes()),
        DigestSink::of(&w.reference_all(2)).total
    );
    // Each of the five snapshots restores to the same final output.
    let out = tandem_ok(&["restore", snap.with_extension("2").to_str().unwrap()]);
    assert_eq!(
        total_digest(&out.stdout),
        DigestSink::of(&w.reference_all(2)).total
    );
}

#[test]
fn restore_then_snapshot_before_running_is_byte_identical() {
    require_kvm();
    let args = [
        "--guest",
        "counter",
        "--guest-arg",
        "iters=200M",
        "--vcpus",
        "4",
        "--mem-mib",
        "32",
    ];
    let (d, _) = snapshot_and_restore("idem", &args, Duration::from_millis(120));
    let (sock, snap2) = (d.join("ctl2"), d.join("snap2"));
    let child = spawn(&[
        "restore",
        d.join("snap").to_str().unwrap(),
        "--paused",
        "--control",
        sock.to_str().unwrap(),
    ]);
    wait_for(&sock);
    let r = ctl(&sock, &["snapshot", snap2.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stdout));
    assert!(ctl(&sock, &["resume"]).status.success());
    let w = workload("counter", &[("iters", "200M")]);
    assert_eq!(
        total_digest(finish(child).as_bytes()),
        DigestSink::of(&w.reference_all(4)).total
    );
    let (a, b) = (
        Snapshot::read_file(&d.join("snap")).unwrap(),
        Snapshot::read_file(&snap2).unwrap(),
    );
    assert_eq!(a.names(), b.names());
    for s in a.iter() {
        let t = b.get(&s.name).unwrap();
        if s.name == "module/MainMem" {
            // The same index; each state names its own memory file.
            let (x, y) = (
                MainMemPersist::decode(s.version, &s.data).unwrap(),
                MainMemPersist::decode(t.version, &t.data).unwrap(),
            );
            assert_eq!((s.version, &x.index), (t.version, &y.index));
            assert!(x.file.unwrap().starts_with("snap.mem-"));
            assert!(y.file.unwrap().starts_with("snap2.mem-"));
            continue;
        }
        assert_eq!(
            (s.version, &s.data),
            (t.version, &t.data),
            "section {} differs after restore",
            s.name
        );
    }
    assert!(
        a.names().iter().any(|n| n == "vcpu/3") && a.names().iter().any(|n| n == "module/Irqchip")
    );
    assert_eq!(
        std::fs::read(mem_file(&d.join("snap"))).unwrap(),
        std::fs::read(mem_file(&snap2)).unwrap()
    );
}

fn saved(tag: &str) -> (Dir, PathBuf) {
    let args = [
        "--guest",
        "dirty",
        "--guest-arg",
        "iters=20M",
        "--guest-arg",
        "pages=4",
        "--guest-arg",
        "ws_mib=4",
        "--vcpus",
        "2",
        "--mem-mib",
        "32",
    ];
    let (d, _) = snapshot_and_restore(tag, &args, Duration::from_millis(100));
    let snap = d.join("snap");
    (d, snap)
}

fn refused(args: &[&str], needle: &str) {
    let out = tandem(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} was accepted");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
}

#[test]
fn damaged_snapshots_are_refused_with_a_clear_error() {
    require_kvm();
    let (d, snap) = saved("corrupt");
    let good = std::fs::read(&snap).unwrap();
    let bad = d.join("bad");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    for _ in 0..20 {
        let cut = rng.gen_range(0..good.len());
        std::fs::write(&bad, &good[..cut]).unwrap();
        refused(&["restore", bad.to_str().unwrap()], "bad snapshot");
    }
    for _ in 0..100 {
        let mut b = good.clone();
        let i = rng.gen_range(0..b.len());
        b[i] ^= rng.gen_range(1..=255u8);
        std::fs::write(&bad, &b).unwrap();
        let out = tandem(&["restore", bad.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && !err.contains("panicked"),
            "flip at {i}: {err}"
        );
        assert!(
            err.contains("bad snapshot") || err.contains("format v"),
            "flip at {i}: {err}"
        );
    }
    // A newer format says so.
    let mut b = good.clone();
    b[8..12].copy_from_slice(&3u32.to_le_bytes());
    std::fs::write(&bad, &b).unwrap();
    refused(
        &["restore", bad.to_str().unwrap()],
        "format v3 is newer than this build, v1",
    );
    // Memory: a flipped byte is caught by verify and by restore --verify; a short file at once.
    copy_snapshot(&snap, &bad);
    let bad_mem = mem_file(&bad);
    let mem = std::fs::read(mem_file(&snap)).unwrap();
    let used = mem.iter().rposition(|&b| b != 0).unwrap();
    let mut m = mem.clone();
    m[used] ^= 0x40;
    std::fs::write(&bad_mem, &m).unwrap();
    refused(&["verify", bad.to_str().unwrap()], "fails its checksum");
    refused(
        &["restore", "--verify", bad.to_str().unwrap()],
        "fails its checksum",
    );
    std::fs::write(&bad_mem, &mem[..mem.len() - 4096]).unwrap();
    refused(
        &["restore", bad.to_str().unwrap()],
        "wrong or truncated memory file",
    );
    // A missing memory file is named; a whole file at another name is not taken for it.
    std::fs::remove_file(&bad_mem).unwrap();
    std::fs::write(d.join("bad.mem"), &mem).unwrap();
    refused(&["restore", bad.to_str().unwrap()], "is missing");
    refused(&["verify", bad.to_str().unwrap()], "is missing");
    let ok = tandem(&["verify", snap.to_str().unwrap()]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn a_group_missing_on_either_side_is_named() {
    require_kvm();
    let (d, snap) = saved("missing");
    let mut s = Snapshot::read_file(&snap).unwrap();
    let manifest: Vec<ManifestEntry> = s.take(MANIFEST).unwrap().decode().unwrap();
    s.take("group/output").unwrap();
    let kept: Vec<ManifestEntry> = manifest
        .iter()
        .filter(|e| e.name != "output")
        .cloned()
        .collect();
    s.push(Section::encode(MANIFEST, 1, &kept).unwrap())
        .unwrap();
    let bad = d.join("bad");
    // `bad` names snap's memory file, beside it.
    s.write_file(&bad).unwrap();
    refused(
        &["restore", bad.to_str().unwrap()],
        "missing group \"output\": it is in the VM but not in the checkpoint",
    );

    let mut s = Snapshot::read_file(&snap).unwrap();
    let mut more = s
        .take(MANIFEST)
        .unwrap()
        .decode::<Vec<ManifestEntry>>()
        .unwrap();
    more.push(ManifestEntry {
        name: "disk".into(),
        version: 1,
        optional: false,
    });
    s.push(Section {
        name: "group/disk".into(),
        version: 1,
        data: vec![1, 2, 3],
    })
    .unwrap();
    s.push(Section::encode(MANIFEST, 1, &more).unwrap())
        .unwrap();
    s.write_file(&bad).unwrap();
    refused(
        &["restore", bad.to_str().unwrap()],
        "missing group \"disk\": it is in the checkpoint but not in this VM",
    );
}

#[test]
fn compressed_snapshots_restore_exactly_and_refuse_damage() {
    require_kvm();
    let d = Dir::new("zstd");
    let (sock, snap, a) = (d.join("ctl"), d.join("snap"), d.join("a.txt"));
    let child = spawn(
        &[
            "run",
            "--control",
            sock.to_str().unwrap(),
            "--output",
            a.to_str().unwrap(),
        ]
        .iter()
        .chain(DIRTY_2X8M)
        .copied()
        .collect::<Vec<_>>(),
    );
    wait_for(&sock);
    std::thread::sleep(Duration::from_millis(150));
    let r = ctl(
        &sock,
        &["snapshot", snap.to_str().unwrap(), "--stop", "--compress"],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stdout));
    finish(child);
    let beside: Vec<_> = std::fs::read_dir(&d.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snap."))
        .collect();
    assert!(
        beside.is_empty(),
        "memory is inside the state file, no file beside it: {beside:?}"
    );
    let s = Snapshot::read_file(&snap).unwrap();
    assert!(s.names().iter().any(|n| n.starts_with("mem/")));
    assert!(tandem(&["verify", snap.to_str().unwrap()]).status.success());
    let b = d.join("b.txt");
    let out = tandem_ok(&[
        "restore",
        snap.to_str().unwrap(),
        "--output",
        b.to_str().unwrap(),
    ]);
    let w = workload(
        "dirty",
        &[
            ("iters", "8M"),
            ("pages", "4"),
            ("ws_mib", "4"),
            ("record_every", "20k"),
        ],
    );
    assert_eq!(
        total_digest(&out.stdout),
        DigestSink::of(&w.reference_all(2)).total
    );
    assert_eq!(lines_per_vcpu(&[&a, &b], 2), reference_lines(&w, 2));
    // One flipped byte inside a memory chunk, resealed so the file checksums pass: the chunk's
    // own checksum catches it, in verify and in restore.
    let mut s = Snapshot::read_file(&snap).unwrap();
    let name = s
        .names()
        .iter()
        .find(|n| n.starts_with("mem/"))
        .unwrap()
        .clone();
    let mut sec = s.take(&name).unwrap();
    let n = sec.data.len();
    sec.data[n / 2] ^= 0x10;
    s.push(sec).unwrap();
    let bad = d.join("bad");
    s.write_file(&bad).unwrap();
    refused(&["verify", bad.to_str().unwrap()], "memory chunk");
    refused(&["restore", bad.to_str().unwrap()], "memory chunk");
}

/// The data files a state file names (memory, disk copies), by file name.
fn named_files(state: &Path) -> Vec<String> {
    let snap = Snapshot::read_file(state).unwrap();
    let mut names = vec![MemState::of(&snap).unwrap().file.expect("a memory file")];
    let virtio = snap.get("group/virtio").expect("the virtio group");
    let v = <vmx::virtio::VirtioPersist as Persist>::decode(virtio.version, &virtio.data).unwrap();
    names.extend(v.disks.into_iter().map(|d| d.file));
    names.sort();
    names
}

/// Everything in `dir` that belongs to snapshot `snap` by name (`snap.*`).
fn files_beside(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snap."))
        .collect();
    v.sort();
    v
}

/// Issue 16: SIGKILL at random moments of a snapshot that overwrites an older one. After
/// every kill the path holds the complete old snapshot or the complete new one (never the
/// state of one with the memory or disk of the other), it verifies and restores to the
/// uninterrupted run's digest, and the next whole save deletes the killed saves' leftovers.
#[test]
fn sigkill_during_a_snapshot_leaves_the_old_or_the_new_one_whole() {
    require_kvm();
    const KILLS: usize = 20;
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t0 = Instant::now();
    let d = Dir::new("crash");
    let (snap, img) = (d.join("snap"), d.join("disk.img"));
    // A writable disk, so that every save copies it too (the guest does not touch it).
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(4 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 8192], 1 << 20).unwrap();
    drop(f);
    let w = workload(
        "dirty",
        &[
            ("iters", "8M"),
            ("pages", "4"),
            ("ws_mib", "4"),
            ("record_every", "20k"),
        ],
    );
    let want = DigestSink::of(&w.reference_all(2)).total;
    let request = |sock: &Path, req: &vmx::control::Request| {
        vmx::control::request(sock, req, Duration::from_secs(20))
    };
    let snapshot_req = vmx::control::Request::Snapshot {
        path: snap.clone(),
        stop: false,
        compress: false,
    };

    // Snapshot A of a running guest, once it has written output.
    let sock = d.join("ctl-a");
    let mut args = vec![
        "run",
        "--control",
        sock.to_str().unwrap(),
        "--disk",
        img.to_str().unwrap(),
    ];
    args.extend_from_slice(DIRTY_2X8M);
    let mut child = spawn(&args);
    wait_for(&sock);
    let t = Instant::now();
    while request(&sock, &vmx::control::Request::Status).unwrap()["records"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(t.elapsed() < Duration::from_secs(30), "no output");
        std::thread::sleep(Duration::from_millis(5));
    }
    let reply = request(&sock, &snapshot_req).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    child.kill().unwrap();
    child.wait().unwrap();
    // How long a save of a restored guest (the kind killed below: its memory loads lazily
    // from the file) takes here, so that the kills fall before and after its commit.
    let sock = d.join("ctl-calibrate");
    let child = spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--paused",
        "--control",
        sock.to_str().unwrap(),
    ]);
    wait_for(&sock);
    let reply = request(&sock, &snapshot_req).unwrap();
    let save_ms = reply["ms"].as_f64().unwrap_or_else(|| panic!("{reply}"));
    request(&sock, &vmx::control::Request::Resume).unwrap();
    assert_eq!(total_digest(finish(child).as_bytes()), want);

    // Kill a save B to the same path at a random moment, again and again. The calibration
    // is one save (its first reads of the file may be slow, the later ones cached), so the
    // window adapts until kills have fallen on both sides of the commit: halved while every
    // kill left the new snapshot, grown while every kill left the old one.
    let mut window_us = ((save_ms * 2.0 + 10.0) * 1e3) as u64;
    let first_window_us = window_us;
    let (mut kept_old, mut got_new) = (0, 0);
    for i in 0..KILLS {
        let ctx = format!("seed {seed}, kill {i}");
        let old_state = std::fs::read(&snap).unwrap();
        let old_files = named_files(&snap);
        let sock = d.join(&format!("ctl-{i}"));
        let mut child = spawn(&[
            "restore",
            snap.to_str().unwrap(),
            "--paused",
            "--control",
            sock.to_str().unwrap(),
        ]);
        wait_for(&sock);
        // Let the guest move on a little, so the new snapshot differs from the old one.
        request(&sock, &vmx::control::Request::Resume).unwrap();
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..5_000)));
        let (s, r) = (sock.clone(), snapshot_req.clone());
        let saver =
            std::thread::spawn(move || vmx::control::request(&s, &r, Duration::from_secs(20)));
        let delay = Duration::from_micros(rng.gen_range(0..=window_us));
        std::thread::sleep(delay);
        child.kill().unwrap();
        child.wait().unwrap();
        let answered = saver.join().unwrap().is_ok();
        let ctx = format!("{ctx}, {delay:?} after the request (save took {save_ms:.1} ms)");

        let new_state = std::fs::read(&snap).unwrap();
        let files = named_files(&snap);
        if new_state == old_state {
            kept_old += 1;
            assert_eq!(files, old_files, "{ctx}");
            assert!(
                !answered,
                "{ctx}: the save was acknowledged but the old state is there"
            );
        } else {
            got_new += 1;
            assert!(
                files.iter().all(|f| !old_files.contains(f)),
                "{ctx}: the new state names an old file: {files:?} / {old_files:?}"
            );
        }
        if kept_old == 0 {
            window_us = (window_us / 2).max(1_000);
        } else if got_new == 0 {
            window_us += window_us / 2;
        }
        for f in &files {
            assert!(d.join(f).exists(), "{ctx}: {f} is missing");
        }
        // Complete: every memory chunk matches the state, and the run goes on exactly.
        let v = tandem(&["verify", snap.to_str().unwrap()]);
        assert!(
            v.status.success(),
            "{ctx}: {}",
            String::from_utf8_lossy(&v.stderr)
        );
        let out = tandem_ok(&["restore", snap.to_str().unwrap()]);
        assert_eq!(total_digest(&out.stdout), want, "{ctx}");
    }
    eprintln!(
        "{KILLS} kills in a window of {:.1} ms, ending at {:.1} ms: {kept_old} left the old \
         snapshot, {got_new} the new one; leftovers now: {:?}",
        first_window_us as f64 / 1e3,
        window_us as f64 / 1e3,
        files_beside(&d.0)
    );
    assert!(
        kept_old > 0 && got_new > 0,
        "seed {seed}: the kills did not fall both before and after the commit \
         ({kept_old} old, {got_new} new): the window misses the save"
    );

    // A whole save leaves exactly the files its state names.
    let sock = d.join("ctl-last");
    let child = spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--paused",
        "--control",
        sock.to_str().unwrap(),
    ]);
    wait_for(&sock);
    let r = request(&sock, &snapshot_req).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    request(&sock, &vmx::control::Request::Resume).unwrap();
    assert_eq!(total_digest(finish(child).as_bytes()), want);
    assert_eq!(files_beside(&d.0), named_files(&snap), "seed {seed}");
    let out = tandem_ok(&["restore", snap.to_str().unwrap()]);
    assert_eq!(total_digest(&out.stdout), want);
    eprintln!("took {:.1} s", t0.elapsed().as_secs_f64());
}
