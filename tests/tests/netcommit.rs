//! Output commit of network frames: a protected primary holds every frame its guest sends
//! during epoch E until the standby acknowledged E. Seen from outside with the `net-echo`
//! guest behind a TAP and 200 ms epochs: every echo comes back intact, but none sooner than
//! the end of the epoch that produced it (so the round trips are tens of ms, where an
//! unprotected run answers in well under one).

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use tandem_tests::tap::{unavailable as tap_unavailable, Tap};
use tandem_tests::{require_kvm, tandem_bin};
use testkit::pair::{Pair, PairConfig};

fn tap(name: &str, cidr: &str) -> Option<Tap> {
    if let Some(why) = tap_unavailable() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    Some(Tap::new(name, cidr).unwrap_or_else(|e| panic!("{e}")))
}

fn echo_rtts(sock: &UdpSocket, to: &str, n: usize) -> Vec<Duration> {
    let mut rtts = Vec::with_capacity(n);
    let mut buf = [0u8; 2048];
    for i in 0..n {
        let msg = format!("datagram {i} held until its epoch is safe");
        let t0 = Instant::now();
        sock.send_to(msg.as_bytes(), to).expect("send");
        let (len, _) = sock
            .recv_from(&mut buf)
            .expect("an echo within the timeout");
        assert_eq!(&buf[..len], msg.as_bytes(), "echo {i} intact");
        rtts.push(t0.elapsed());
    }
    rtts
}

#[test]
fn a_protected_guest_s_frames_leave_only_after_their_epoch_is_acknowledged() {
    require_kvm();
    let name = format!("tnc{}", std::process::id() % 10000);
    let Some(_tap) = tap(&name, "10.78.1.1/24") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("tandem-netcommit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("net-echo.elf");
    std::fs::write(&image, guest_images::NET_ECHO).unwrap();
    let cfg = PairConfig {
        bin: tandem_bin().clone(),
        dir: dir.clone(),
        guest: vec![
            "--image".into(),
            image.display().to_string(),
            "--vcpus".into(),
            "1".into(),
            "--mem-mib".into(),
            "64".into(),
            "--net".into(),
            format!("tap={name}"),
            "--guest-arg".into(),
            "ip=10.78.1.2/24".into(),
            "--guest-arg".into(),
            "every=10".into(),
        ],
        interval_ms: 200,
        primary_env: vec![],
        log: "info".into(),
        hosts: Default::default(),
    };
    let mut pair = Pair::start_standby(cfg).expect("sink and standby");
    pair.start_primary().expect("primary");
    assert!(
        pair.wait_protected(Duration::from_secs(30)).is_some(),
        "the primary was not protected: {}",
        pair.log("primary")
    );
    let sock = UdpSocket::bind("10.78.1.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The first echo also waits for ARP (itself held and released by epoch).
    echo_rtts(&sock, "10.78.1.2:7", 1);
    let mut rtts = echo_rtts(&sock, "10.78.1.2:7", 40);
    rtts.sort();
    let p50 = rtts[rtts.len() / 2];
    eprintln!(
        "protected, 200 ms epochs: echo round trip min {:?}, p50 {p50:?}, max {:?}",
        rtts[0],
        rtts[rtts.len() - 1]
    );
    // A reply leaves at the ack of the epoch it was sent in: on average half an epoch plus
    // the capture and the acknowledgement later. Unprotected, net-echo answers in < 1 ms.
    assert!(
        p50 >= Duration::from_millis(30),
        "echo p50 {p50:?}: frames left before their epoch was acknowledged"
    );
    let status = pair.status("primary").expect("the primary's status");
    let ft = status.ft.expect("the replication status");
    assert_eq!(ft.protected, Some(true), "still protected: {ft:?}");
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
}
