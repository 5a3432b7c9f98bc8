//! The etcd arbiter against a real etcd: a 3-member cluster on loopback (Debian's
//! `etcd-server`), claim races, a protected pair failing over through it, a primary cut off
//! from it fencing itself, a paused primary waking fenced, and a member lost under a running
//! pair; and, without etcd, the errors of a bad or unreachable `--arbiter etcd://…`. Tests that
//! need etcd skip, saying why, where `etcd` is not installed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ft::arbiter::{Arbiter, EtcdArbiter};
use tandem_tests::etcd::{unavailable, Cluster};
use tandem_tests::{require_kvm, tandem, tandem_bin, workload};
use testkit::pair::{check_exact, Hosts, Pair, PairConfig};

/// The pair tests take both cores, and etcd wants some too: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The lease TTL of these tests (s). The test clusters elect a leader in about 0.5 s.
const TTL: u64 = 2;

fn skip() -> bool {
    match unavailable() {
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            true
        }
        None => false,
    }
}

fn cluster(tag: &str) -> Cluster {
    Cluster::start(tag, 3).unwrap_or_else(|e| panic!("etcd cluster: {e}"))
}

fn arbiter(url: &str) -> EtcdArbiter {
    EtcdArbiter::new(url.parse().expect("etcd URL"))
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tandem-etcd-pair-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The `dirty` guest of `iters` iterations on 2 vCPUs: its pair config and reference stream.
fn pair_config(
    dir: &std::path::Path,
    iters: &str,
    hosts: Hosts,
) -> (PairConfig, Vec<Vec<devices::Record>>) {
    let cfg = PairConfig {
        bin: tandem_bin().clone(),
        dir: dir.to_path_buf(),
        guest: ["--guest", "dirty", "--vcpus", "2", "--guest-arg"]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("iters={iters}")])
            .collect(),
        interval_ms: 50,
        primary_env: vec![],
        log: "info".into(),
        hosts,
    };
    (cfg, workload("dirty", &[("iters", iters)]).reference_all(2))
}

fn dump(pair: &Pair) -> String {
    format!(
        "--- primary log ---\n{}\n--- standby log ---\n{}\n--- sink log ---\n{}",
        pair.log("primary"),
        pair.log("standby"),
        pair.log("sink")
    )
}

/// Waits until the standby acknowledged a few epochs and the sink has output.
fn wait_protected_with_output(pair: &Pair) {
    let t0 = Instant::now();
    while pair
        .status("primary")
        .and_then(|s| s.ft?.last_ack)
        .unwrap_or(0)
        < 3
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

/// The generations in the sink's stream, sorted.
fn generations(pair: &Pair) -> Vec<u64> {
    let mut g: Vec<u64> = pair
        .sink_stream()
        .iter()
        .flatten()
        .map(|(g, _)| *g)
        .collect();
    g.sort_unstable();
    g.dedup();
    g
}

/// Records of generation `g` in the sink's stream.
fn records_of(pair: &Pair, g: u64) -> usize {
    pair.sink_stream()
        .iter()
        .flatten()
        .filter(|(gen, _)| *gen == g)
        .count()
}

/// `claimants` threads, each with an arbiter of its own (as separate hosts would have) whose
/// endpoint list starts at a different member, claim `generation`; returns the winners'
/// (thread, token).
fn race(c: &Cluster, prefix: &str, generation: u64, claimants: usize) -> Vec<(usize, i64)> {
    let n = c.members.len();
    let urls: Vec<String> = (0..claimants)
        .map(|t| {
            let order: Vec<usize> = (0..n).map(|k| (t + k) % n).collect();
            c.url(&order, prefix, TTL)
        })
        .collect();
    let barrier = std::sync::Barrier::new(claimants);
    std::thread::scope(|s| {
        let hs: Vec<_> = urls
            .iter()
            .enumerate()
            .map(|(t, url)| {
                let barrier = &barrier;
                s.spawn(move || {
                    let a = arbiter(url);
                    barrier.wait();
                    let won = a
                        .claim(generation, &format!("thread {t}"))
                        .unwrap_or_else(|e| panic!("thread {t}: {e}"));
                    assert_eq!(won, a.token().is_some(), "thread {t}: a token iff won");
                    won.then(|| (t, a.token().unwrap()))
                })
            })
            .collect();
        hs.into_iter().filter_map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn eight_claimants_race_for_each_generation_and_exactly_one_wins() {
    if skip() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster("race");
    let prefix = "tandem/race";
    let mut last_token = 0;
    let t0 = Instant::now();
    for g in 1..=10 {
        let winners = race(&c, prefix, g, 8);
        assert_eq!(winners.len(), 1, "generation {g}: winners {winners:?}");
        let (_, token) = winners[0];
        assert!(
            token > last_token,
            "generation {g}: token {token} after {last_token}"
        );
        last_token = token;
    }
    let took = t0.elapsed();
    let a = arbiter(&c.url_all(prefix, TTL));
    assert_eq!(a.current().unwrap(), 10);
    assert!(a.granted(3).unwrap() && a.granted(10).unwrap());
    assert!(!a.granted(11).unwrap() && !a.granted(0).unwrap());
    assert!(!a.still(9).unwrap());
    // A generation older than the newest is worthless even to its only claimant.
    assert!(!a.claim(7, "late").unwrap());
    // Generation keys stay (no lease); holder keys go with their leases (revoked on drop).
    let holders = c
        .post(
            0,
            "/v3/kv/range",
            &format!(
                r#"{{"key":"{}","range_end":"{}","count_only":true}}"#,
                b64("/tandem/race/holder/"),
                b64("/tandem/race/holder0")
            ),
        )
        .unwrap();
    eprintln!(
        "10 generations × 8 claimants: one winner each, tokens rising to {last_token}, \
         {:.0} ms a race; holder keys left: {}",
        took.as_secs_f64() * 1e3 / 10.0,
        holders["count"].as_str().unwrap_or("0")
    );
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn a_protected_pair_fails_over_through_etcd_with_an_exact_stream() {
    require_kvm();
    if skip() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster("takeover");
    let url = c.url_all("tandem/takeover", TTL);
    let dir = tempdir("takeover");
    let hosts = Hosts {
        arbiter: Some(url.clone()),
        ..Hosts::default()
    };
    let (cfg, want) = pair_config(&dir, "6M", hosts);
    let mut pair = Pair::start_standby(cfg).expect("sink and standby");
    pair.start_primary().expect("primary");
    wait_protected_with_output(&pair);
    std::thread::sleep(Duration::from_millis(300));
    assert!(pair.primary_running(), "the guest finished too soon");
    let killed = pair.kill_primary();
    let st = pair
        .wait_standby(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the standby did not finish\n{}", dump(&pair)));
    assert!(st.success(), "standby failed: {st}\n{}", dump(&pair));
    let res = pair.result("standby").expect("standby result");
    assert_eq!(res.took_over, Some(true), "{res}\n{}", dump(&pair));
    let failover_ms = res.failover.as_ref().unwrap().resumed_unix_ms - killed;
    let records = check_exact(&pair, &want).unwrap_or_else(|e| panic!("{e}\n{}", dump(&pair)));
    assert_eq!(generations(&pair), [1, 2]);
    let a = arbiter(&url);
    assert_eq!(a.current().unwrap(), 2);
    assert!(a.granted(1).unwrap() && a.granted(2).unwrap());
    let log = pair.log("standby");
    assert!(
        log.contains("won generation 2 at the etcd arbiter") && log.contains("fencing token"),
        "{log}"
    );
    eprintln!(
        "takeover through etcd: {records} records exact, generations [1, 2], failover \
         {failover_ms:.0} ms"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_primary_cut_off_from_etcd_fences_itself_within_the_ttl() {
    require_kvm();
    if skip() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster("cutoff");
    // The primary knows member 0 only; the standby and the sink know 1 and 2. Stopping
    // member 0 cuts the primary off from etcd, which goes on with a majority.
    let prefix = "tandem/cutoff";
    let dir = tempdir("cutoff");
    let hosts = Hosts {
        arbiter: Some(c.url(&[1, 2], prefix, TTL)),
        primary_arbiter: Some(c.url(&[0], prefix, TTL)),
        ..Hosts::default()
    };
    // The guest must outlive the lease by seconds: 24M iterations run 5-8 s here (8M, with
    // nice-10 vCPUs, finished before the lease ran out).
    let (cfg, want) = pair_config(&dir, "24M", hosts);
    let mut pair = Pair::start_standby(cfg).expect("sink and standby");
    pair.start_primary().expect("primary");
    wait_protected_with_output(&pair);
    let cut = Instant::now();
    c.signal(0, "STOP");
    let st = pair
        .wait_primary(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the primary never stopped\n{}", dump(&pair)));
    let fenced_after = cut.elapsed();
    let gen1_at_fence = records_of(&pair, 1);
    assert_eq!(
        st.code(),
        Some(3),
        "the primary did not fence itself\n{}",
        dump(&pair)
    );
    let plog = pair.log("primary");
    assert!(
        plog.contains("FENCED") && plog.contains("the etcd lease of generation 1"),
        "{plog}"
    );
    // The lease was last renewed before the cut; a TTL after that renewal, one last try
    // (≤ 0.5 s) and the fence. The rest is slack for a loaded machine.
    assert!(
        fenced_after < Duration::from_secs(TTL + 2),
        "the primary went on {fenced_after:?} after losing etcd\n{plog}"
    );
    // The standby takes over through the members it reaches and finishes the guest.
    let st = pair
        .wait_standby(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the standby did not finish\n{}", dump(&pair)));
    assert!(st.success(), "standby failed: {st}\n{}", dump(&pair));
    assert_eq!(pair.result("standby").unwrap().took_over, Some(true));
    c.signal(0, "CONT");
    // Nothing of generation 1 reached the sink after the fence, and the stream is exact:
    // what the fenced primary held was released once, by generation 2.
    assert_eq!(
        records_of(&pair, 1),
        gen1_at_fence,
        "stale output after the fence"
    );
    let records = check_exact(&pair, &want).unwrap_or_else(|e| panic!("{e}\n{}", dump(&pair)));
    assert_eq!(generations(&pair), [1, 2]);
    eprintln!(
        "cut off from etcd: fenced {:.0} ms after the cut (TTL {TTL} s); {records} records \
         exact, {gen1_at_fence} of generation 1\n{}",
        fenced_after.as_secs_f64() * 1e3,
        plog.lines()
            .filter(|l| l.contains("lease") || l.contains("FENCED"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn with_one_member_of_three_killed_claims_and_takeover_still_work() {
    require_kvm();
    if skip() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = cluster("minority");
    // The leader goes, and it is the first endpoint everyone asks.
    let leader = c.leader().expect("a leader");
    let order: Vec<usize> = (0..3).map(|k| (leader + k) % 3).collect();
    let url = c.url(&order, "tandem/minority", TTL);
    let dir = tempdir("minority");
    let hosts = Hosts {
        arbiter: Some(url.clone()),
        ..Hosts::default()
    };
    // Long enough to outlive two TTLs and a claim race while protected (12M iterations
    // finished 4 s after protection once the link got faster).
    let (cfg, want) = pair_config(&dir, "40M", hosts);
    let mut pair = Pair::start_standby(cfg).expect("sink and standby");
    pair.start_primary().expect("primary");
    wait_protected_with_output(&pair);
    c.kill(leader);
    // Two TTLs later the primary still runs, protected: it renewed its lease elsewhere.
    std::thread::sleep(Duration::from_secs(2 * TTL));
    assert!(
        pair.primary_running(),
        "the primary stopped after one etcd member died\n{}",
        dump(&pair)
    );
    assert!(pair.wait_protected(Duration::from_secs(5)).is_some());
    let new_leader = c.leader();
    // Claims still work: 8 claimants, one winner.
    let winners = race(&c, "tandem/minority-race", 1, 8);
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert!(pair.primary_running(), "the guest finished too soon");
    let killed = pair.kill_primary();
    let st = pair
        .wait_standby(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the standby did not finish\n{}", dump(&pair)));
    assert!(st.success(), "standby failed: {st}\n{}", dump(&pair));
    let res = pair.result("standby").expect("standby result");
    assert_eq!(res.took_over, Some(true), "{res}\n{}", dump(&pair));
    let failover_ms = res.failover.as_ref().unwrap().resumed_unix_ms - killed;
    let records = check_exact(&pair, &want).unwrap_or_else(|e| panic!("{e}\n{}", dump(&pair)));
    assert_eq!(generations(&pair), [1, 2]);
    assert_eq!(arbiter(&url).current().unwrap(), 2);
    eprintln!(
        "leader m{leader} killed (new leader {new_leader:?}): primary kept its lease, a race \
         had one winner, takeover {failover_ms:.0} ms, {records} records exact"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The split brain the arbiter exists for: the primary is paused (SIGSTOP) for longer than
/// its lease, the standby wins generation 2 through etcd and runs; the old primary wakes with
/// output it had held and must release none of it.
#[test]
fn a_paused_primary_is_replaced_and_wakes_fenced() {
    require_kvm();
    if skip() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster("paused");
    let url = c.url_all("tandem/paused", TTL);
    let dir = tempdir("paused");
    let hosts = Hosts {
        arbiter: Some(url.clone()),
        ..Hosts::default()
    };
    let (cfg, want) = pair_config(&dir, "8M", hosts);
    let mut pair = Pair::start_standby(cfg).expect("sink and standby");
    pair.start_primary().expect("primary");
    wait_protected_with_output(&pair);
    pair.signal_primary("STOP");
    let t0 = Instant::now();
    while pair.status("standby").and_then(|s| s.ft?.generation) != Some(2) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no takeover\n{}",
            dump(&pair)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t0.elapsed();
    // Past the old primary's lease, then wake it.
    std::thread::sleep(Duration::from_secs(TTL + 1));
    let gen1 = records_of(&pair, 1);
    pair.signal_primary("CONT");
    let st = pair
        .wait_primary(Duration::from_secs(30))
        .expect("the old primary exits");
    assert_eq!(st.code(), Some(3), "not fenced\n{}", dump(&pair));
    let plog = pair.log("primary");
    let fenced = plog
        .lines()
        .find(|l| l.contains("FENCED"))
        .unwrap_or_else(|| panic!("{plog}"))
        .to_string();
    let st = pair
        .wait_standby(Duration::from_secs(60))
        .expect("standby ends");
    assert!(st.success(), "{}", dump(&pair));
    assert_eq!(
        records_of(&pair, 1),
        gen1,
        "the woken primary released output"
    );
    let records = check_exact(&pair, &want).unwrap_or_else(|e| panic!("{e}\n{}", dump(&pair)));
    assert_eq!(generations(&pair), [1, 2]);
    eprintln!(
        "paused primary: the standby ran as generation 2 {took:?} after the stop; the old one \
         woke {TTL}+1 s later and fenced; {records} records exact\n{fenced}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// No etcd needed: a bad `--arbiter` is a usage error (exit 2) saying what is wrong, and an
/// etcd that does not answer stops a primary before its VM starts, within the TTL, saying
/// which endpoints did not answer.
#[test]
fn bad_or_unreachable_etcd_arbiters_get_clear_errors() {
    let dir = tempdir("cli");
    let out = dir.join("sink.txt").display().to_string();
    let report = dir.join("sink.json").display().to_string();
    for (arg, says) in [
        ("etcd://127.0.0.1/vm", "has no port"),
        ("etcd://127.0.0.1:2379", "no key prefix"),
        ("etcd://127.0.0.1:2379/vm?ttl=0", "1 to 600 seconds"),
        ("zk://127.0.0.1:2181/vm", "zk:// is no arbiter"),
    ] {
        let o = tandem(&[
            "sink",
            "--listen",
            "127.0.0.1:0",
            "--out",
            &out,
            "--report",
            &report,
            "--insecure-plaintext",
            "--arbiter",
            arg,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{arg}: {err}");
        assert!(
            err.contains(says) && err.contains("etcd://HOST:PORT"),
            "{arg}: {err}"
        );
    }
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let t0 = Instant::now();
    let o = tandem(&[
        "primary",
        "--insecure-plaintext",
        "--arbiter",
        &format!("etcd://{closed}/tandem/none?ttl=1"),
        "--guest",
        "counter",
    ]);
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("etcd at {closed} did not answer"))
            && err.contains("is etcd running"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    eprintln!(
        "unreachable etcd: the primary gave up after {took:?}: {}",
        err.trim()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
