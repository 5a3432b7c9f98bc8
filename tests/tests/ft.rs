//! The fault-tolerant pair, end to end: real `tandem sink`, `tandem standby` and
//! `tandem primary` processes on loopback. Every check is on the sink's record stream (what
//! the outside world saw) against the workload's reference model.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use tandem_tests::{require_kvm, tandem_bin, workload};
use testkit::pair::{Pair, PairConfig};

/// The pair tests take both cores; run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn config(dir: &std::path::Path, guest: &[&str], env: &[(&str, &str)]) -> PairConfig {
    PairConfig {
        bin: tandem_bin().clone(),
        dir: dir.to_path_buf(),
        guest: guest.iter().map(|s| s.to_string()).collect(),
        interval_ms: 50,
        primary_env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        log: "info".into(),
        hosts: Default::default(),
    }
}

/// The guest as `(name, args)` and its vCPU count, from `--guest`-style arguments.
fn reference(name: &str, args: &[(&str, &str)], vcpus: u32) -> Vec<Vec<devices::Record>> {
    workload(name, args).reference_all(vcpus)
}

fn guest_args(name: &str, args: &[(&str, &str)], vcpus: u32) -> Vec<String> {
    let mut v = vec![
        "--guest".to_string(),
        name.to_string(),
        "--vcpus".into(),
        vcpus.to_string(),
    ];
    for (k, val) in args {
        v.push("--guest-arg".into());
        v.push(format!("{k}={val}"));
    }
    v
}

/// Checks the sink's stream record by record against the reference; returns the
/// generations seen (sorted; within each vCPU's stream they never go back).
fn check_stream(pair: &Pair, want: &[Vec<devices::Record>], what: &str) -> Vec<u64> {
    let report = pair.sink_report();
    assert_eq!(
        report.gaps, 0,
        "{what}: gaps in the sink's stream: {report:?}"
    );
    assert_eq!(report.duplicates, 0, "{what}: duplicates: {report:?}");
    let got = pair.sink_stream();
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: streams of {} vCPUs",
        got.len()
    );
    let mut gens = Vec::new();
    for (v, (g, w)) in got.iter().zip(want).enumerate() {
        let recs: Vec<_> = g.iter().map(|(_, r)| *r).collect();
        assert_eq!(
            recs.len(),
            w.len(),
            "{what}: vCPU {v} has {} records, the uninterrupted run {}",
            recs.len(),
            w.len()
        );
        if let Some(i) = recs.iter().zip(w).position(|(a, b)| a != b) {
            panic!(
                "{what}: vCPU {v} record {i} differs: {:?} vs {:?}",
                recs[i], w[i]
            );
        }
        let mut last = 0;
        for (gen, _) in g {
            assert!(*gen >= last, "{what}: generation went back on vCPU {v}");
            last = *gen;
            if !gens.contains(gen) {
                gens.push(*gen);
            }
        }
    }
    gens.sort_unstable();
    gens
}

/// Waits until the standby acknowledged `acks` epochs and the sink has some output.
fn wait_protected_with_output(pair: &Pair, acks: u64) {
    let t0 = Instant::now();
    while pair
        .status("primary")
        .and_then(|s| s.ft?.last_ack)
        .unwrap_or(0)
        < acks
        || pair.sink_report().accepted == 0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never protected\n{}",
            dump(pair)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn dump(pair: &Pair) -> String {
    format!(
        "--- primary log ---\n{}\n--- standby log ---\n{}\n--- sink log ---\n{}",
        pair.log("primary"),
        pair.log("standby"),
        pair.log("sink")
    )
}

#[test]
fn twenty_sigkills_of_the_primary_keep_the_stream_exact() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let guests: [(&str, &[(&str, &str)]); 2] = [
        ("counter", &[("iters", "700M")]),
        ("dirty", &[("iters", "3M")]),
    ];
    let mut rng = rand::thread_rng();
    let mut mid_transfer = 0;
    let mut failover_ms = Vec::new();
    for i in 0..20 {
        let (name, args) = guests[i % 2];
        let vcpus = 2;
        let dir = tempfile_dir(&format!("kill{i}"));
        // Every other kill runs with a delay inside each epoch's transfer, so that the kill
        // often lands in the middle of one.
        let delayed = i % 4 >= 2;
        let env: &[(&str, &str)] = if delayed {
            &[("TANDEM_TEST_SEND_DELAY_MS", "25")]
        } else {
            &[]
        };
        let mut cfg = config(&dir, &[], env);
        cfg.guest = guest_args(name, args, vcpus);
        let mut pair = Pair::start_standby(cfg).expect("sink and standby");
        pair.start_primary().expect("primary");
        // Wait for protection, then kill at a random moment of the run.
        let t0 = Instant::now();
        while pair
            .status("primary")
            .and_then(|s| s.ft?.last_ack)
            .unwrap_or(0)
            < 1
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "never protected\n{}",
                dump(&pair)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..500)));
        assert!(
            pair.primary_running(),
            "the primary finished before the kill; lengthen the guest"
        );
        let killed = pair.kill_primary();
        let st = pair
            .wait_standby(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("standby did not finish\n{}", dump(&pair)));
        assert!(st.success(), "standby failed: {st}\n{}", dump(&pair));
        let res = pair.result("standby").expect("standby result");
        assert_eq!(res.took_over, Some(true), "{res}\n{}", dump(&pair));
        let resumed = res.failover.as_ref().unwrap().resumed_unix_ms;
        failover_ms.push(resumed - killed);
        let replication = res.replication.as_ref();
        if replication
            .and_then(|r| r.standby_counters())
            .map(|c| c.partial_epochs_discarded)
            > Some(0)
        {
            mid_transfer += 1;
        }
        let gens = check_stream(
            &pair,
            &reference(name, args, vcpus),
            &format!("kill {i} ({name})"),
        );
        assert!(gens.contains(&2), "kill {i}: the standby released nothing");
        let _ = std::fs::remove_dir_all(&dir);
    }
    eprintln!(
        "20 kills: {mid_transfer} in the middle of an epoch transfer; failover ms: {failover_ms:.1?}"
    );
    assert!(
        mid_transfer >= 1,
        "no kill landed in the middle of a transfer"
    );
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tandem-ft-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn sigkill_of_the_standby_leaves_the_primary_running_unprotected() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile_dir("standby-kill");
    let args: &[(&str, &str)] = &[("iters", "4M")];
    let mut cfg = config(&dir, &[], &[]);
    cfg.guest = guest_args("dirty", args, 2);
    let mut pair = Pair::start_standby(cfg).expect("sink and standby");
    pair.start_primary().expect("primary");
    wait_protected_with_output(&pair, 3);
    pair.kill_standby();
    let at_kill = pair.sink_report().accepted;
    // The primary notices, says so in status, and keeps releasing output.
    let t1 = Instant::now();
    loop {
        let s = pair.status("primary");
        let ft = s.and_then(|s| s.ft);
        if ft.as_ref().is_some_and(|ft| ft.protected == Some(false)) {
            assert!(ft.unwrap().unprotected_because.is_some());
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(10) && pair.primary_running(),
            "the primary never reported itself unprotected\n{}",
            dump(&pair)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = pair
        .wait_primary(Duration::from_secs(60))
        .expect("primary ends");
    assert!(st.success(), "primary failed\n{}", dump(&pair));
    let res = pair.result("primary").expect("primary result");
    assert_eq!(res.ft.as_ref().and_then(|ft| ft.protected), Some(false));
    assert!(pair.log("primary").contains("STANDBY LOST"));
    assert!(
        pair.sink_report().accepted > at_kill,
        "no output after the standby died"
    );
    let gens = check_stream(&pair, &reference("dirty", args, 2), "standby killed");
    // Protected output went out as generation 1; after losing its standby the primary won
    // generation 2 at the arbiter and went on as that.
    assert_eq!(gens, vec![1, 2]);
    assert!(pair.log("primary").contains("won generation 2"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn damaged_epochs_are_refused_and_replication_recovers() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let args: &[(&str, &str)] = &[("iters", "3M")];
    let want = reference("dirty", args, 2);
    for fault in ["digest", "truncate", "outside"] {
        for kill in [false, true] {
            let dir = tempfile_dir(&format!("bad-{fault}-{kill}"));
            let hook = format!("3:{fault}");
            let mut cfg = config(&dir, &[], &[("TANDEM_TEST_BAD_EPOCH", &hook)]);
            cfg.guest = guest_args("dirty", args, 2);
            let mut pair = Pair::start_standby(cfg).expect("sink and standby");
            pair.start_primary().expect("primary");
            if kill {
                // Kill after the refused epoch was resent and more were committed: the
                // standby must take over from an intact image.
                let t0 = Instant::now();
                while pair
                    .status("primary")
                    .and_then(|s| s.ft?.last_ack)
                    .unwrap_or(0)
                    < 5
                {
                    assert!(t0.elapsed() < Duration::from_secs(30), "{}", dump(&pair));
                    std::thread::sleep(Duration::from_millis(5));
                }
                pair.kill_primary();
            }
            let st = pair
                .wait_standby(Duration::from_secs(60))
                .expect("standby ends");
            assert!(st.success(), "{fault}: standby failed\n{}", dump(&pair));
            let res = pair.result("standby").expect("standby result");
            let counters = if kill { &res.replication } else { &res.stats }
                .as_ref()
                .and_then(|st| st.standby_counters())
                .unwrap_or_else(|| panic!("{fault}: no standby counters in {res}"));
            assert_eq!(counters.nacks, 1, "{fault}: {res}\n{}", dump(&pair));
            assert!(counters.commits >= 4, "{fault}: {res}");
            assert_eq!(res.took_over, Some(kill));
            if !kill {
                pair.wait_primary(Duration::from_secs(30));
                let p = pair.result("primary").expect("primary result");
                let nacks =
                    p.ft.as_ref()
                        .and_then(|ft| ft.primary_counters())
                        .map(|c| c.nacks);
                assert_eq!(nacks, Some(1), "{p}");
            }
            check_stream(&pair, &want, &format!("bad epoch ({fault}, kill {kill})"));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[test]
fn a_stopped_primary_is_replaced_and_fences_itself_when_it_wakes() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile_dir("sigstop");
    let args: &[(&str, &str)] = &[("iters", "6M")];
    let mut cfg = config(&dir, &[], &[]);
    cfg.guest = guest_args("dirty", args, 2);
    let mut pair = Pair::start_standby(cfg).expect("sink and standby");
    pair.start_primary().expect("primary");
    wait_protected_with_output(&pair, 3);
    pair.signal_primary("STOP");
    // The standby takes over after 4 × interval of silence, as generation 2.
    let t1 = Instant::now();
    loop {
        let g = pair.status("standby").and_then(|s| s.ft?.generation);
        if g == Some(2) {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(10),
            "no takeover\n{}",
            dump(&pair)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t1.elapsed();
    let accepted_then = pair.sink_report().accepted;
    pair.signal_primary("CONT");
    let st = pair
        .wait_primary(Duration::from_secs(30))
        .expect("old primary exits");
    assert_eq!(
        st.code(),
        Some(3),
        "the old primary did not fence itself\n{}",
        dump(&pair)
    );
    assert!(pair.log("primary").contains("FENCED"), "{}", dump(&pair));
    let st = pair
        .wait_standby(Duration::from_secs(60))
        .expect("standby ends");
    assert!(st.success(), "{}", dump(&pair));
    let res = pair.result("standby").unwrap();
    assert_eq!(res.took_over, Some(true));
    assert!(pair.sink_report().accepted > accepted_then);
    let gens = check_stream(&pair, &reference("dirty", args, 2), "SIGSTOP");
    assert_eq!(gens, vec![1, 2], "the sink heard generation {gens:?}");
    eprintln!("SIGSTOP: the standby ran as generation 2 {took:?} after the stop");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kills the standby, starts a new one where the primary redials, and times the pre-copy
/// re-protection; then kills the primary, so the new standby must take over from what the
/// pre-copy and the epochs after it built.
#[test]
fn a_new_standby_reprotects_a_running_primary_and_can_take_over() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile_dir("rejoin-redial");
    let args: &[(&str, &str)] = &[("iters", "12M")];
    let mut cfg = config(&dir, &[], &[]);
    cfg.guest = guest_args("dirty", args, 2);
    cfg.guest.extend(["--mem-mib".into(), "256".into()]);
    let mut pair = Pair::start_standby(cfg).expect("sink and standby");
    pair.start_primary().expect("primary");
    wait_protected_with_output(&pair, 3);
    pair.kill_standby();
    let t1 = Instant::now();
    while pair
        .status("primary")
        .is_none_or(|s| s.ft.is_some_and(|ft| ft.protected == Some(true)))
    {
        assert!(t1.elapsed() < Duration::from_secs(10), "{}", dump(&pair));
        std::thread::sleep(Duration::from_millis(10));
    }
    // A fresh standby on the old address: the primary dials it within 0.5 s and syncs it.
    let started = Instant::now();
    pair.restart_standby().expect("new standby");
    let st = pair
        .wait_protected(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("never protected again\n{}", dump(&pair)));
    let took = started.elapsed();
    let ft = st.ft.as_ref().expect("a replication status");
    let sync = ft.last_sync.as_ref().expect("a completed re-sync");
    let rounds = sync.precopy.as_ref().map_or(&[][..], |p| &p.rounds[..]);
    eprintln!(
        "re-protected {took:?} after the new standby started; primary says {} ms from join; \
         rounds {rounds:?}",
        sync.joined_to_protected_ms
    );
    assert!(
        took < Duration::from_secs(2),
        "re-protection of a 256 MiB guest took {took:?}\n{}",
        dump(&pair)
    );
    assert!(rounds.len() >= 2);
    assert_eq!(ft.reprotections, Some(1));
    // Let a few epochs commit on the new standby, then kill the primary.
    let acked = ft.last_ack.unwrap();
    let t2 = Instant::now();
    while pair
        .status("primary")
        .and_then(|s| s.ft?.last_ack)
        .unwrap_or(0)
        < acked + 3
    {
        assert!(t2.elapsed() < Duration::from_secs(10), "{}", dump(&pair));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(pair.primary_running(), "guest too short for the test");
    pair.kill_primary();
    let st = pair
        .wait_standby(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("new standby did not finish\n{}", dump(&pair)));
    assert!(st.success(), "{}", dump(&pair));
    let res = pair.result("standby").expect("standby result");
    assert_eq!(res.took_over, Some(true), "{res}");
    let gens = check_stream(&pair, &reference("dirty", args, 2), "rejoin + kill");
    // 1: protected by the first standby; 2: won after losing it; 3: the new standby.
    assert_eq!(gens, vec![1, 2, 3]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The soak's short variant (`cargo xtask soak` runs 50 cycles): SIGKILL the primary at
/// random moments, a fresh standby joins the survivor after each kill; every cycle ends
/// protected and every pair's stream is exact.
#[test]
fn kills_with_rejoin_between_them_end_protected_with_an_exact_stream() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile_dir("soak");
    let args: &[(&str, &str)] = &[("iters", "10M")];
    let mut cfg = config(&dir, &[], &[]);
    cfg.guest = guest_args("dirty", args, 2);
    let rep = testkit::pair::soak(&cfg, &reference("dirty", args, 2), 5, |i, c| {
        eprintln!("cycle {i}: {c:?}")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rep.cycles.len(), 5);
    // Each kill made a new generation; the last pair's survivors went 2, 3, …
    assert!(rep.generations >= 2);
    assert!(rep.records > 0);
    let _ = std::fs::remove_dir_all(&dir);
}
