//! `--metrics ADDR`: a protected pair's primary and standby serve Prometheus metrics over
//! HTTP, read by a plain TCP client the way Prometheus scrapes them; after a failover the
//! standby's endpoint shows the new primary.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tandem_tests::{require_kvm, tandem_bin};
use testkit::pair::{Hosts, Pair, PairConfig};

/// A loopback address with a port nobody listens on now.
fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("its address").to_string()
}

/// `GET path` over HTTP/1.1; the status line and the body.
fn get(addr: &str, path: &str) -> std::io::Result<(String, String)> {
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    c.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

/// One scrape of `/metrics`, parsed: `name{labels}` → value.
fn scrape(addr: &str) -> HashMap<String, f64> {
    let (status, body) = get(addr, "/metrics").expect("scrape");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    let mut samples = HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (key, value) = line.rsplit_once(' ').expect("name value");
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        samples.insert(key.to_string(), v);
    }
    samples
}

/// Scrapes until the endpoint answers (the process may still be starting).
fn first_scrape(addr: &str) -> HashMap<String, f64> {
    let t0 = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "nothing serves metrics at {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    scrape(addr)
}

fn value(s: &HashMap<String, f64>, key: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("no {key} among {:?}", s.keys().collect::<Vec<_>>()))
}

#[test]
fn a_protected_pair_serves_prometheus_metrics() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("tandem-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (primary_metrics, standby_metrics) = (free_addr(), free_addr());
    let cfg = PairConfig {
        bin: tandem_bin().clone(),
        dir: dir.clone(),
        guest: [
            "--guest",
            "dirty",
            "--vcpus",
            "2",
            "--guest-arg",
            "iters=30M",
        ]
        .map(String::from)
        .to_vec(),
        interval_ms: 50,
        primary_env: vec![],
        log: "info".into(),
        hosts: Hosts {
            primary_args: vec!["--metrics".into(), primary_metrics.clone()],
            standby_args: vec!["--metrics".into(), standby_metrics.clone()],
            ..Hosts::default()
        },
    };
    let mut pair = Pair::start_standby(cfg).expect("sink and standby");
    pair.start_primary().expect("primary");
    let dump = |pair: &Pair| {
        format!(
            "--- primary log ---\n{}\n--- standby log ---\n{}",
            pair.log("primary"),
            pair.log("standby")
        )
    };
    assert!(
        pair.wait_protected(Duration::from_secs(30)).is_some(),
        "never protected\n{}",
        dump(&pair)
    );

    let first = first_scrape(&primary_metrics);
    std::thread::sleep(Duration::from_millis(400));
    let status = pair.status("primary").expect("the primary's status");
    std::thread::sleep(Duration::from_millis(400));
    let second = scrape(&primary_metrics);

    let ft = status.ft.expect("ft status");
    let epochs = ft.primary_counters().expect("primary counters").epochs as f64;
    let committed = "tandem_epochs_committed_total";
    let pauses = "tandem_epoch_pause_seconds_count";
    assert!(
        value(&first, committed) < epochs && epochs < value(&second, committed),
        "the epoch counter did not go {} < {epochs} (status) < {}",
        value(&first, committed),
        value(&second, committed)
    );
    assert!(
        value(&first, pauses) < value(&second, pauses),
        "no pause observed between the scrapes"
    );
    assert!(value(&first, pauses) > 0.0);
    for s in [&first, &second] {
        assert_eq!(value(s, "tandem_role{role=\"primary\"}"), 1.0);
        assert_eq!(value(s, "tandem_role{role=\"standby\"}"), 0.0);
        assert_eq!(value(s, "tandem_protected"), 1.0);
        assert_eq!(value(s, "tandem_status_fresh"), 1.0);
        assert_eq!(value(s, "tandem_failovers_total"), 0.0);
        assert_eq!(
            value(s, "tandem_epoch_pause_seconds_bucket{le=\"+Inf\"}"),
            value(s, pauses)
        );
    }
    assert_eq!(
        Some(value(&second, "tandem_generation") as u64),
        ft.generation
    );
    assert!(value(&second, "tandem_sent_bytes_total{kind=\"pages\"}") > 0.0);
    assert!(value(&second, "tandem_epoch_interval_seconds") == 0.05);
    let (status_line, _) = get(&primary_metrics, "/").expect("GET /");
    assert!(status_line.contains(" 404 "), "{status_line}");

    let standby = first_scrape(&standby_metrics);
    assert_eq!(value(&standby, "tandem_role{role=\"standby\"}"), 1.0);
    assert_eq!(value(&standby, "tandem_role{role=\"primary\"}"), 0.0);
    assert_eq!(value(&standby, "tandem_protected"), 1.0);
    assert!(value(&standby, committed) > 0.0);
    assert!(value(&standby, "tandem_committed_epoch") > 0.0);

    assert!(
        pair.primary_running(),
        "the guest finished during the test\n{}",
        dump(&pair)
    );

    // The standby takes over: its endpoint now shows a primary, and the failover.
    pair.kill_primary();
    assert!(
        pair.wait_takeover(Duration::from_secs(10)).is_some(),
        "no takeover\n{}",
        dump(&pair)
    );
    let survivor = scrape(&standby_metrics);
    assert_eq!(value(&survivor, "tandem_role{role=\"primary\"}"), 1.0);
    assert_eq!(value(&survivor, "tandem_role{role=\"standby\"}"), 0.0);
    assert_eq!(value(&survivor, "tandem_failovers_total"), 1.0);
    assert_eq!(
        value(&survivor, "tandem_generation"),
        value(&second, "tandem_generation") + 1.0
    );
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
}
