//! Planned migration, end to end: real `tandem sink`, `tandem standby` (the receiver) and
//! `tandem primary` processes on loopback, and the real `tandem ctl SOCK migrate ADDR`. Every
//! run's sink stream must equal the workload's reference stream, record for record, whatever
//! happened (as in the failover tests).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ft::status::FtStatus;
use tandem_tests::{require_kvm, tandem_bin, workload};
use testkit::pair::{check_exact, Pair, PairConfig};

/// The pair tests take both cores; run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const VCPUS: u32 = 2;

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tandem-mig-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A pair directory with the `dirty` guest (`iters` per vCPU, `mem_mib` of RAM).
fn config(dir: &std::path::Path, iters: &str, mem_mib: u64) -> PairConfig {
    PairConfig {
        bin: tandem_bin().clone(),
        dir: dir.to_path_buf(),
        guest: [
            "--guest",
            "dirty",
            "--vcpus",
            &VCPUS.to_string(),
            "--mem-mib",
            &mem_mib.to_string(),
            "--guest-arg",
            &format!("iters={iters}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        interval_ms: 50,
        primary_env: vec![],
        log: "info".into(),
        hosts: Default::default(),
    }
}

fn reference(iters: &str) -> Vec<Vec<devices::Record>> {
    workload("dirty", &[("iters", iters)]).reference_all(VCPUS)
}

fn dump(pair: &Pair) -> String {
    format!(
        "--- primary log ---\n{}\n--- standby log ---\n{}\n--- sink log ---\n{}",
        pair.log("primary"),
        pair.log("standby"),
        pair.log("sink")
    )
}

/// Waits until the sink has some output of the primary.
fn wait_output(pair: &Pair) {
    let t0 = Instant::now();
    while pair.sink_report().accepted == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no output\n{}",
            dump(pair)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The generations the sink heard, in order of first appearance.
fn generations(pair: &Pair) -> Vec<u64> {
    let mut g: Vec<u64> = pair
        .sink_report()
        .by_generation
        .iter()
        .map(|(g, _)| *g)
        .collect();
    g.sort_unstable();
    g
}

/// The old primary ended well and says where the VM went; the receiver runs it as `gen`.
fn check_moved(pair: &mut Pair, to: &str, gen: u64) {
    let st = pair
        .promote_receiver(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the old primary did not exit\n{}", dump(pair)));
    assert!(st.success(), "the old primary exited {st}\n{}", dump(pair));
    // The old primary's files keep its node name, "primary".
    let out = std::fs::read_to_string(pair.dir().join("primary.out")).unwrap_or_default();
    assert!(
        out.contains(&format!("moved to {to}")),
        "the old primary did not say where the VM went: {out}\n{}",
        dump(pair)
    );
    let end: ft::status::EndReport =
        serde_json::from_str(&out[out.find('{').expect("its end report")..]).unwrap();
    match end.report {
        Some(vmx::RunEnd::Moved {
            moved_to,
            generation,
            ..
        }) => assert_eq!((moved_to.as_str(), generation), (to, gen)),
        other => panic!("the old primary ended with {other:?}"),
    }
    let now = pair.status("primary").expect("the receiver's status");
    let ft = now.ft.as_ref().expect("a replication status");
    assert_eq!(ft.role, ft::status::Role::Primary);
    assert_eq!(ft.generation, Some(gen));
    let f = ft.failover().expect("the receiver's takeover");
    assert!(f.reason.contains("planned switch"), "{}", f.reason);
}

/// Waits for the receiver (now primary) to finish the guest, then checks the stream.
fn finish_exact(pair: &mut Pair, iters: &str) -> u64 {
    let st = pair
        .wait_primary(Duration::from_secs(120))
        .unwrap_or_else(|| panic!("the guest did not finish\n{}", dump(pair)));
    assert!(st.success(), "{st}\n{}", dump(pair));
    check_exact(pair, &reference(iters)).unwrap_or_else(|e| panic!("{e}\n{}", dump(pair)))
}

#[test]
fn an_unprotected_primary_moves_to_a_receiver_and_the_stream_stays_exact() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let d = dir("unprotected");
    let iters = "12M";
    let mut pair = Pair::start_sink(config(&d, iters, 256)).expect("sink");
    pair.start_primary_alone().expect("primary");
    wait_output(&pair);
    let to = pair.new_receiver().expect("receiver");
    let done = pair
        .migrate(&to, 5)
        .unwrap_or_else(|e| panic!("{e}\n{}", dump(&pair)));
    eprintln!(
        "moved in {:.0} ms: {} converging epochs, last epoch {} pages, stopped {:.2} ms here \
         until the receiver confirmed, throttle up to {:.0} %",
        done.total_ms,
        done.converging_epochs,
        done.last_epoch_pages,
        done.downtime_ms,
        done.max_throttle * 100.0
    );
    assert_eq!((done.to.as_str(), done.generation), (to.as_str(), 2));
    assert!(!done.switchover);
    assert!(done.precopy.as_ref().is_some_and(|p| !p.rounds.is_empty()));
    check_moved(&mut pair, &to, 2);
    let records = finish_exact(&mut pair, iters);
    // Unprotected output as generation 1 here, the rest as 2 from the receiver.
    assert_eq!(generations(&pair), [1, 2], "{}", dump(&pair));
    eprintln!("exact stream of {records} records");
    let _ = std::fs::remove_dir_all(&d);
}

/// Migrates in a thread; returns its outcome.
fn migrate_in_background(
    pair: &Pair,
    to: &str,
    max_downtime_ms: u64,
) -> std::thread::JoinHandle<Result<ft::status::MigrationDone, String>> {
    let bin = tandem_bin().clone();
    let sock = pair.dir().join(format!("{}.sock", pair.primary_node()));
    let to = to.to_string();
    std::thread::spawn(move || {
        let out = std::process::Command::new(bin)
            .arg("ctl")
            .arg(sock)
            .args(["migrate", &to, "--max-downtime-ms"])
            .arg(max_downtime_ms.to_string())
            .env("RUST_LOG", "warn")
            .output()
            .map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() {
            serde_json::from_str(stdout.trim()).map_err(|e| format!("{e}: {stdout}"))
        } else {
            Err(format!("{stdout}{stderr}"))
        }
    })
}

/// Waits until the primary's status shows the migration in `phase`.
fn wait_phase(pair: &Pair, phase: &str) -> FtStatus {
    let t0 = Instant::now();
    loop {
        if let Some(ft) = pair.status("primary").and_then(|s| s.ft) {
            if ft.migration.as_ref().is_some_and(|m| m.phase == phase) {
                return ft;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the migration never reached {phase}\n{}",
            dump(pair)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_migration_whose_receiver_dies_leaves_the_vm_running_here_with_an_exact_stream() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // The receiver is killed during the pre-copy, then (another one) while the epochs
    // converge: with a budget of 0 ms they never fit, so the migration stays converging
    // through every throttle step (and well over ten epochs) before it would switch.
    for (case, phase, budget) in [
        ("precopy", "pre-copy", 5u64),
        ("converging", "converging", 0),
    ] {
        let d = dir(case);
        let iters = "40M";
        let mut pair = Pair::start_sink(config(&d, iters, 1024)).expect("sink");
        pair.start_primary_alone().expect("primary");
        wait_output(&pair);
        if case == "precopy" {
            // Nobody at the address: refused at once, with the reason.
            let err = pair
                .migrate("127.0.0.1:1", 5)
                .expect_err("nobody listens there");
            assert!(
                err.contains("cannot reach") && err.contains("runs on here"),
                "{err}"
            );
        }
        let to = pair.new_receiver().expect("receiver");
        let ctl = migrate_in_background(&pair, &to, budget);
        wait_phase(&pair, phase);
        pair.kill_standby();
        let err = ctl
            .join()
            .expect("the ctl thread")
            .expect_err("a migration to a dead receiver must fail");
        eprintln!("{case}: ctl said: {err}");
        assert!(
            err.contains(&format!("migration to {to} failed")) && err.contains("runs on here"),
            "{case}: {err}"
        );
        assert!(
            pair.primary_running(),
            "{case}: the VM stopped\n{}",
            dump(&pair)
        );
        let ft = pair
            .status("primary")
            .and_then(|s| s.ft)
            .expect("the primary's status");
        assert_eq!(ft.protected, Some(false), "{case}");
        assert!(ft.migration.is_none(), "{case}");
        let st = pair
            .wait_primary(Duration::from_secs(120))
            .unwrap_or_else(|| panic!("{case}: the guest did not finish\n{}", dump(&pair)));
        assert!(st.success(), "{case}: {st}\n{}", dump(&pair));
        check_exact(&pair, &reference(iters))
            .unwrap_or_else(|e| panic!("{case}: {e}\n{}", dump(&pair)));
        // Before the receiver held the VM nothing changed hands; after, this side won the
        // next generation (the receiver, dead, could not) and went on as it.
        let want: &[u64] = if case == "precopy" { &[1] } else { &[1, 2] };
        assert_eq!(generations(&pair), want, "{case}\n{}", dump(&pair));
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn a_protected_primary_switches_over_to_its_standby_or_moves_to_another() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let iters = "12M";
    // To its own standby: a switchover, no pre-copy.
    let d = dir("switchover");
    let mut pair = Pair::start_standby(config(&d, iters, 256)).expect("sink and standby");
    pair.start_primary().expect("primary");
    pair.wait_protected(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("never protected\n{}", dump(&pair)));
    wait_output(&pair);
    let to = pair.standby_addr.clone();
    let done = pair
        .migrate(&to, 5)
        .unwrap_or_else(|e| panic!("{e}\n{}", dump(&pair)));
    eprintln!("switchover: {done:?}");
    assert!(done.switchover && done.precopy.is_none(), "{done:?}");
    assert_eq!(done.generation, 2);
    check_moved(&mut pair, &to, 2);
    finish_exact(&mut pair, iters);
    assert_eq!(generations(&pair), [1, 2]);
    let _ = std::fs::remove_dir_all(&d);

    // To another standby: the standby is told goodbye (it does not take over), the receiver
    // gets a pre-copy, then the switch.
    let d = dir("elsewhere");
    let mut pair = Pair::start_standby(config(&d, iters, 256)).expect("sink and standby");
    pair.start_primary().expect("primary");
    pair.wait_protected(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("never protected\n{}", dump(&pair)));
    wait_output(&pair);
    let to = pair.new_receiver().expect("receiver");
    let done = pair
        .migrate(&to, 5)
        .unwrap_or_else(|e| panic!("{e}\n{}", dump(&pair)));
    eprintln!("elsewhere: {done:?}");
    assert!(!done.switchover && done.precopy.is_some(), "{done:?}");
    let old = pair
        .wait_retired(Duration::from_secs(30))
        .expect("the old standby exits");
    assert!(
        old.success(),
        "the old standby exited {old}\n{}",
        dump(&pair)
    );
    let old_end: ft::status::EndReport = {
        let t = std::fs::read_to_string(d.join("standby.out")).unwrap();
        serde_json::from_str(&t[t.find('{').unwrap()..]).unwrap()
    };
    assert_eq!(old_end.took_over, Some(false), "{old_end}");
    check_moved(&mut pair, &to, 2);
    finish_exact(&mut pair, iters);
    assert_eq!(generations(&pair), [1, 2]);
    let _ = std::fs::remove_dir_all(&d);
}
