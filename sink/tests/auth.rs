//! Attacks on the output sink: a client without the key changes nothing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_abi::Record;
use sink::{Sink, SinkAuth, SinkClient, SinkMsg};
use transport::Psk;

fn rec(vcpu: u32, seq: u64) -> Record {
    Record {
        vcpu,
        kind: 1,
        seq,
        value: seq * 7,
        aux: seq,
    }
}

fn sink(auth: SinkAuth) -> (Sink, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let s = Sink::bind(
        "127.0.0.1:0",
        &dir.path().join("out"),
        &dir.path().join("report.json"),
        auth,
    )
    .unwrap();
    (s, dir)
}

fn keyed(key: &Psk) -> SinkAuth {
    SinkAuth {
        key: Some(key.clone()),
        granted: None,
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A plaintext sink frame, as an attacker without the key would send it.
fn plain_frame(m: &SinkMsg) -> Vec<u8> {
    let mut ch = transport::Channel::plain(std::io::Cursor::new(Vec::new()));
    ch.send_blob(&postcard::to_stdvec(m).unwrap()).unwrap();
    ch.get_ref().get_ref().clone()
}

#[test]
fn a_forged_hello_without_the_key_changes_nothing() {
    let key = Psk::generate();
    let (s, _d) = sink(keyed(&key));
    let addr = s.addr().to_string();
    // Plaintext Hello of a huge generation, then records.
    let mut c = TcpStream::connect(&addr).unwrap();
    let _ = c.write_all(&plain_frame(&SinkMsg::Hello {
        generation: u64::MAX,
        vcpus: 1,
    }));
    let _ = c.write_all(&plain_frame(&SinkMsg::Records {
        generation: u64::MAX,
        vcpu: 0,
        records: vec![rec(0, 0)],
    }));
    // The wrong key.
    let wrong = SinkClient::connect(&addr, Some(&Psk::generate()), 1 << 40, 1, Duration::ZERO);
    assert!(wrong.is_err());
    // No key at all against a keyed sink.
    assert!(SinkClient::connect(&addr, None, 1 << 40, 1, Duration::ZERO).is_err());
    wait_for("three refusals", || s.report().unauthenticated >= 3);
    let r = s.report();
    assert_eq!(
        (r.generation, r.connections, r.received),
        (0, 0, 0),
        "{r:?}"
    );
    // The real primary of generation 1 is heard, and its records count.
    let mut real = SinkClient::connect(&addr, Some(&key), 1, 1, Duration::from_secs(5)).unwrap();
    real.release(0, &[rec(0, 0), rec(0, 1)]).unwrap();
    wait_for("two records", || s.report().accepted == 2);
    assert_eq!(s.report().generation, 1);
}

#[test]
fn a_replayed_real_session_is_refused() {
    let key = Psk::generate();
    let (s, _d) = sink(keyed(&key));
    let target = s.addr().to_string();
    // A recording relay between a real client and the sink.
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap().to_string();
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let rec2 = recorded.clone();
    std::thread::spawn(move || {
        let (mut a, _) = relay.accept().unwrap();
        let mut b = TcpStream::connect(&target).unwrap();
        let mut b2 = b.try_clone().unwrap();
        let mut a2 = a.try_clone().unwrap();
        std::thread::spawn(move || std::io::copy(&mut b2, &mut a2));
        let mut buf = [0u8; 4096];
        loop {
            match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    rec2.lock().unwrap().extend_from_slice(&buf[..n]);
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut real =
        SinkClient::connect(&relay_addr, Some(&key), 3, 1, Duration::from_secs(5)).unwrap();
    real.release(0, &[rec(0, 0)]).unwrap();
    wait_for("the real record", || s.report().accepted == 1);
    drop(real);
    let before = s.report();
    // Replay every byte the real client sent, on a fresh connection.
    let bytes = recorded.lock().unwrap().clone();
    assert!(bytes.len() > 64);
    let mut c = TcpStream::connect(s.addr()).unwrap();
    let _ = c.write_all(&bytes);
    drop(c);
    wait_for("the replay refused", || {
        s.report().unauthenticated > before.unauthenticated
    });
    let after = s.report();
    assert_eq!(after.accepted, before.accepted);
    assert_eq!(after.received, before.received);
    assert_eq!(after.connections, before.connections);
}

#[test]
fn records_of_a_generation_the_arbiter_did_not_grant_are_refused() {
    let key = Psk::generate();
    let granted: sink::GenerationCheck = Arc::new(|g| Ok(g <= 2));
    let (s, _d) = sink(SinkAuth {
        key: Some(key.clone()),
        granted: Some(granted),
    });
    let addr = s.addr().to_string();
    // A key holder that made up generation 9 (never claimed) is refused and changes nothing.
    let e = SinkClient::connect(&addr, Some(&key), 9, 1, Duration::ZERO)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("not granted"), "{e}");
    assert_eq!(s.report().generation, 0);
    assert_eq!(s.report().ungranted, 1);
    let mut ok = SinkClient::connect(&addr, Some(&key), 2, 1, Duration::ZERO).unwrap();
    ok.release(0, &[rec(0, 0)]).unwrap();
    wait_for("a granted record", || s.report().accepted == 1);
}

#[test]
fn a_flood_of_idle_connections_does_not_lock_the_real_primary_out() {
    let key = Psk::generate();
    let (s, _d) = sink(keyed(&key));
    let idle: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(s.addr()).ok())
        .collect();
    assert!(idle.len() > sink::MAX_PENDING_HANDSHAKES);
    let t0 = Instant::now();
    let mut real = SinkClient::connect(
        &s.addr().to_string(),
        Some(&key),
        1,
        1,
        Duration::from_secs(20),
    )
    .unwrap();
    real.release(0, &[rec(0, 0)]).unwrap();
    wait_for("the real record", || s.report().accepted == 1);
    eprintln!(
        "real primary heard {:?} after a flood of {} idle connections",
        t0.elapsed(),
        idle.len()
    );
    drop(idle);
}
