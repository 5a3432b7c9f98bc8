//! The guest heartbeat (vmmdev): flatline and reawakening, and version-1 state.

use std::path::PathBuf;

use checkpoint::group::{ManifestEntry, MANIFEST};
use checkpoint::{Section, Snapshot};
use devices::vmmdev::HeartbeatEvent;
use devices::DigestSink;
use tandem_tests::{require_kvm, tandem, workload};
use vmx::{RunEnd, RunReport};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/vmmdev-v1.snap")
}

fn report(out: &std::process::Output) -> RunReport {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let end: RunEnd = serde_json::from_slice(&out.stdout).expect("--json report");
    end.report().cloned().expect("a run report")
}

const HB: [&str; 10] = [
    "--guest-arg",
    "iters=600M",
    "--guest-arg",
    "hb_ms=50",
    "--guest-arg",
    "hb_every=1M",
    "--guest-arg",
    "stall_at=200M",
    "--guest-arg",
    "stall_iters=200M",
];

#[test]
fn a_guest_that_stops_pinging_is_reported_flatlined_then_reawakened() {
    require_kvm();
    let mut args = vec!["run", "--guest", "counter", "--json", "--mem-mib", "32"];
    args.extend_from_slice(&HB);
    let r = report(&tandem(&args));
    let hb = &r.heartbeat;
    assert_eq!(
        hb.interval_ms, 0,
        "the guest turns the heartbeat off before it finishes"
    );
    assert!(hb.pings > 100);
    let events = &hb.events;
    assert_eq!(events.len(), 2, "one flatline, one reawakening: {events:?}");
    let HeartbeatEvent::Flatlined {
        silent_ms: silent, ..
    } = events[0].1
    else {
        panic!("the first event is not a flatline: {events:?}");
    };
    assert!(
        (100..=150).contains(&silent),
        "flatlined after {silent} ms; must be within 2 x 50 + 50 ms"
    );
    let HeartbeatEvent::Reawakened { silent_ms: back } = events[1].1 else {
        panic!("the second event is not a reawakening: {events:?}");
    };
    assert!(back >= 150, "the stall lasted {back} ms");
    let w = workload("counter", &[("iters", "600M")]);
    assert_eq!(r.digest.total, DigestSink::of(&w.reference_all(1)).total);
}

/// How `fixtures/vmmdev-v1.snap` was made (by the version-1 layout, which stays in
/// `devices::vmmdev`). Run with `--ignored` only to regenerate it.
#[test]
#[ignore]
fn regenerate_version_1_fixture() {
    let v1 = devices::vmmdev::VmmDevStateV1 { guest_version: 3 };
    let mut s = Snapshot::default();
    s.push(Section::encode("group/vmmdev", 1, &v1).unwrap())
        .unwrap();
    s.push(
        Section::encode(
            MANIFEST,
            1,
            &vec![ManifestEntry {
                name: "vmmdev".into(),
                version: 1,
                optional: false,
            }],
        )
        .unwrap(),
    )
    .unwrap();
    s.write_file(&fixture()).unwrap();
}

#[test]
fn a_version_1_vmmdev_state_still_loads() {
    require_kvm();
    let old = Snapshot::read_file(&fixture()).expect("the version-1 fixture");
    let v1 = old.get("group/vmmdev").unwrap().clone();
    assert_eq!(v1.version, 1);

    // A current snapshot of a heartbeat guest, with its vmmdev state swapped for the v1 one.
    let dir = std::env::temp_dir().join(format!("tandem-hb-v1-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (sock, snap) = (dir.join("ctl"), dir.join("snap"));
    let mut args = vec![
        "run",
        "--guest",
        "counter",
        "--mem-mib",
        "32",
        "--control",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(&HB);
    let child = std::process::Command::new(tandem_tests::tandem_bin())
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while !sock.exists() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let r = tandem(&[
        "ctl",
        sock.to_str().unwrap(),
        "snapshot",
        snap.to_str().unwrap(),
        "--stop",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stdout));
    child.wait_with_output().unwrap();

    let mut s = Snapshot::read_file(&snap).unwrap();
    let v2 = s.take("group/vmmdev").unwrap();
    assert_eq!(v2.version, 2, "this build writes version 2");
    let mut manifest: Vec<ManifestEntry> = s.take(MANIFEST).unwrap().decode().unwrap();
    manifest
        .iter_mut()
        .filter(|e| e.name == "vmmdev")
        .for_each(|e| e.version = 1);
    s.push(v1).unwrap();
    s.push(Section::encode(MANIFEST, 1, &manifest).unwrap())
        .unwrap();
    s.write_file(&snap).unwrap();

    let r = report(&tandem(&["restore", snap.to_str().unwrap(), "--json"]));
    assert_eq!(r.heartbeat.guest_version, 3, "the v1 state's guest info");
    assert!(
        r.heartbeat.events.is_empty(),
        "heartbeat off after a v1 load"
    );
    let w = workload("counter", &[("iters", "600M")]);
    assert_eq!(r.digest.total, DigestSink::of(&w.reference_all(1)).total);
    std::fs::remove_dir_all(&dir).unwrap();
}
