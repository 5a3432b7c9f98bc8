//! The replication link under attack: every refusal has its own error, none panics.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;

use transport::frame::{Epoch, Fence, FrameHeader, FrameType, Generation};
use transport::handshake::{client, server};
use transport::{pages, Error, Message, Psk, Received};

fn fence(e: u64) -> Fence {
    Fence {
        generation: Generation(1),
        epoch: Epoch(e),
    }
}

fn pair() -> (UnixStream, UnixStream) {
    UnixStream::pair().unwrap()
}

/// Runs the server on a thread; returns its result.
fn serve(s: UnixStream, psk: Option<Psk>) -> thread::JoinHandle<Result<(), Error>> {
    thread::spawn(move || {
        let mut ch = server(s, psk.as_ref())?;
        loop {
            match ch.recv()? {
                Received::Message(Message::Goodbye) | Received::End => return Ok(()),
                Received::Message(m) => ch.send(&Message::Ack {
                    fence: m.fence().unwrap_or_default(),
                })?,
                Received::Pages(rs) => {
                    pages::decode_ranges(rs.clone(), 1 << 30, &|_, _| None)?;
                    ch.send(&Message::Ack { fence: fence(0) })?;
                }
                Received::Cancelled(r) => return Err(Error::Handshake(format!("cancelled: {r}"))),
            }
        }
    })
}

#[test]
fn an_authenticated_session_carries_messages_and_pages() {
    let psk = Psk::generate();
    let (a, b) = pair();
    let srv = serve(b, Some(psk.clone()));
    let mut ch = client(a, Some(&psk)).unwrap();
    assert!(ch.is_sealed());
    ch.send(&Message::EpochBegin {
        fence: fence(7),
        pages: 2,
    })
    .unwrap();
    assert!(
        matches!(ch.recv().unwrap(), Received::Message(Message::Ack { fence }) if fence == fence_eq(7))
    );
    let data = vec![7u8; 8192];
    ch.send_pages(&pages::encode_ranges(&[(0x1000, &data)], &|_, _| None))
        .unwrap();
    assert!(matches!(
        ch.recv().unwrap(),
        Received::Message(Message::Ack { .. })
    ));
    ch.end().unwrap();
    srv.join().unwrap().unwrap();
}

fn fence_eq(e: u64) -> Fence {
    fence(e)
}

#[test]
fn a_wrong_key_is_refused_on_both_sides() {
    let (a, b) = pair();
    let srv = serve(b, Some(Psk::generate()));
    let e = client(a, Some(&Psk::generate())).unwrap_err();
    assert!(
        matches!(e, Error::Auth(m) if m.contains("server's proof")),
        "{e}"
    );
    assert!(srv.join().unwrap().is_err());
}

#[test]
fn no_key_on_one_side_is_refused() {
    let (a, b) = pair();
    let srv = serve(b, Some(Psk::generate()));
    let e = client(a, None).unwrap_err();
    assert!(e.to_string().contains("--insecure-plaintext"), "{e}");
    assert!(matches!(srv.join().unwrap(), Err(Error::PlaintextMismatch)));
}

#[test]
fn a_truncated_handshake_is_refused() {
    let (mut a, b) = pair();
    let srv = serve(b, Some(Psk::generate()));
    let hello = Message::Hello {
        version: 1,
        nonce: [1; 32],
        plaintext: false,
    }
    .encode();
    let h = FrameHeader::new(FrameType::Handshake, 0, hello.len())
        .unwrap()
        .encode();
    a.write_all(&h).unwrap();
    a.write_all(&hello[..10]).unwrap();
    drop(a);
    let e = srv.join().unwrap().unwrap_err();
    assert!(
        matches!(&e, Error::Handshake(m) if m.contains("closed the connection")),
        "{e}"
    );
}

#[test]
fn a_newer_protocol_version_is_refused_with_the_versions_named() {
    let (mut a, b) = pair();
    let srv = serve(b, Some(Psk::generate()));
    let newer = transport::PROTOCOL_VERSION + 1;
    let hello = Message::Hello {
        version: newer,
        nonce: [1; 32],
        plaintext: false,
    }
    .encode();
    a.write_all(
        &FrameHeader::new(FrameType::Handshake, 0, hello.len())
            .unwrap()
            .encode(),
    )
    .unwrap();
    a.write_all(&hello).unwrap();
    let e = srv.join().unwrap().unwrap_err();
    let ours = transport::PROTOCOL_VERSION;
    let oldest = transport::OLDEST_ACCEPTED_VERSION;
    assert_eq!(
        e.to_string(),
        format!(
            "protocol version mismatch: the peer offered v{newer}, this build speaks v{ours} and \
             accepts v{oldest} to v{ours}: run the same Tandem release on both hosts"
        )
    );
    // The client is told why.
    let mut reply = Vec::new();
    a.read_to_end(&mut reply).unwrap();
    assert!(String::from_utf8_lossy(&reply).contains(&format!("offered v{newer}")));
}

/// Records what a client sends in a successful handshake, then replays it to a new server.
#[test]
fn a_replayed_handshake_is_refused() {
    let psk = Psk::generate();
    let (a, b) = pair();
    let (tap_client, tap_server) = pair();
    // A relay that copies client → server bytes into a recording.
    let srv = serve(b, Some(psk.clone()));
    let rec = thread::spawn(move || {
        let mut rec = Vec::new();
        let mut from_client = tap_server;
        let mut to_server = a;
        let mut buf = [0u8; 4096];
        let mut back = to_server.try_clone().unwrap();
        let mut to_client = from_client.try_clone().unwrap();
        let pump = thread::spawn(move || {
            let mut b2 = [0u8; 4096];
            while let Ok(n) = back.read(&mut b2) {
                if n == 0 || to_client.write_all(&b2[..n]).is_err() {
                    break;
                }
            }
        });
        while let Ok(n) = from_client.read(&mut buf) {
            if n == 0 {
                break;
            }
            rec.extend_from_slice(&buf[..n]);
            if to_server.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        drop(to_server);
        let _ = pump.join();
        rec
    });
    let mut ch = client(tap_client, Some(&psk)).unwrap();
    ch.send(&Message::Goodbye).unwrap();
    drop(ch);
    srv.join().unwrap().unwrap();
    let recorded = rec.join().unwrap();
    // Replay the client's bytes (Hello, Auth, Goodbye) to a fresh server.
    let (mut evil, b2) = pair();
    let srv2 = serve(b2, Some(psk));
    evil.write_all(&recorded).unwrap();
    let e = srv2.join().unwrap().unwrap_err();
    assert!(
        matches!(e, Error::Auth(m) if m.contains("client's proof")),
        "{e}"
    );
}

/// Client ↔ relay ↔ server, where the relay passes client frames through `tamper` (frame
/// index, bytes) → frames to deliver. Returns the client channel and the server's first two
/// receive results after its handshake.
fn through_relay(
    tamper: fn(usize, Vec<u8>) -> Vec<Vec<u8>>,
) -> (
    transport::Channel<UnixStream>,
    thread::JoinHandle<Vec<Result<Received, Error>>>,
) {
    let psk = Psk::generate();
    let (c, relay_c) = pair();
    let (relay_s, s) = pair();
    let p2 = psk.clone();
    let srv = thread::spawn(move || {
        let mut ch = server(s, Some(&p2)).unwrap();
        vec![ch.recv(), ch.recv()]
    });
    let (mut back_from, mut back_to) = (relay_s.try_clone().unwrap(), relay_c.try_clone().unwrap());
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = back_from.read(&mut buf) {
            if n == 0 || back_to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    thread::spawn(move || {
        let (mut from, mut to) = (relay_c, relay_s);
        for i in 0.. {
            let mut h = [0u8; 12];
            if from.read_exact(&mut h).is_err() {
                break;
            }
            let len = FrameHeader::decode(&h).unwrap().len as usize;
            let mut body = vec![0u8; len];
            from.read_exact(&mut body).unwrap();
            for f in tamper(i, [h.to_vec(), body].concat()) {
                let _ = to.write_all(&f);
            }
        }
    });
    (client(c, Some(&psk)).unwrap(), srv)
}

#[test]
fn a_replayed_frame_fails_authentication() {
    // Client frames: 0 Hello, 1 Auth, 2 the first sealed frame — delivered twice.
    let (mut ch, srv) = through_relay(|i, f| if i == 2 { vec![f.clone(), f] } else { vec![f] });
    ch.send(&Message::Heartbeat { fence: fence(1) }).unwrap();
    let got = srv.join().unwrap();
    assert!(
        matches!(got[0], Ok(Received::Message(Message::Heartbeat { .. }))),
        "{:?}",
        got[0]
    );
    assert!(
        matches!(got[1], Err(Error::Seal { seq: 1 })),
        "{:?}",
        got[1]
    );
}

#[test]
fn a_flipped_bit_in_an_encrypted_frame_fails_authentication() {
    let (mut ch, srv) = through_relay(|i, mut f| {
        if i == 2 {
            f[12] ^= 0x04; // the first ciphertext byte, right after the header
        }
        vec![f]
    });
    ch.send(&Message::Heartbeat { fence: fence(1) }).unwrap();
    ch.send(&Message::Heartbeat { fence: fence(2) }).unwrap();
    let got = srv.join().unwrap();
    assert!(
        matches!(got[0], Err(Error::Seal { seq: 0 })),
        "{:?}",
        got[0]
    );
}

#[test]
fn an_oversized_length_is_refused_before_allocating() {
    let (mut a, b) = pair();
    let srv = serve(b, Some(Psk::generate()));
    let mut h = FrameHeader::new(FrameType::Handshake, 0, 0)
        .unwrap()
        .encode();
    h[8..12].copy_from_slice(&(1u32 << 31).to_le_bytes());
    a.write_all(&h).unwrap();
    let e = srv.join().unwrap().unwrap_err();
    assert!(
        matches!(e, Error::Frame(transport::FrameError::TooLong { .. })),
        "{e}"
    );
}

/// A batch is the same frames as sending each message in turn: each answered in order, the
/// sequence numbers (AEAD nonces) run on across batches and single sends.
#[test]
fn a_batch_of_messages_arrives_as_the_same_frames_in_order() {
    let psk = Psk::generate();
    let (a, b) = pair();
    let srv = serve(b, Some(psk.clone()));
    let mut ch = client(a, Some(&psk)).unwrap();
    let batch: Vec<Message> = (1..=5)
        .map(|e| Message::Heartbeat { fence: fence(e) })
        .collect();
    ch.send_batch(&batch).unwrap();
    ch.send_batch(&[]).unwrap();
    ch.send(&Message::Heartbeat { fence: fence(6) }).unwrap();
    ch.send_batch(&batch[..2]).unwrap();
    for e in (1..=6).chain(1..=2) {
        match ch.recv().unwrap() {
            Received::Message(Message::Ack { fence: f }) => assert_eq!(f, fence(e)),
            other => panic!("{other:?}"),
        }
    }
    ch.send(&Message::Goodbye).unwrap();
    srv.join().unwrap().unwrap();
}

/// Each side reuses one buffer per direction: frames of every size, one after another, arrive
/// as they were sent — a small frame after a large one carries only its own bytes, and owned
/// and borrowed ranges encode alike.
#[test]
fn frames_of_mixed_sizes_arrive_exactly_through_the_reused_buffers() {
    let psk = Psk::generate();
    let (a, b) = pair();
    let page = |n: usize, seed: u8| -> Vec<u8> {
        (0..n * 4096)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    };
    let big = page(600, 1);
    let small = page(1, 2);
    let mid = page(40, 3);
    let (b1, s1, m1) = (big.clone(), small.clone(), mid.clone());
    let server_psk = psk.clone();
    let srv = thread::spawn(move || -> Result<(), Error> {
        let mut ch = server(b, Some(&server_psk))?;
        // Every page received, in arrival order (a long range comes in pieces).
        let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
        loop {
            match ch.recv()? {
                Received::Pages(rs) => {
                    for (gpa, data) in pages::decode_ranges(rs, 1 << 30, &|_, _| None)? {
                        for (i, p) in data.chunks(4096).enumerate() {
                            got.push((gpa + i as u64 * 4096, p.to_vec()));
                        }
                    }
                }
                Received::Message(Message::Goodbye) => break,
                Received::Message(m) => assert!(matches!(m, Message::Heartbeat { .. })),
                other => panic!("{other:?}"),
            }
        }
        let want: Vec<(u64, Vec<u8>)> = [(0x10000u64, b1), (0x1000, s1), (0x200000, m1)]
            .into_iter()
            .flat_map(|(gpa, d)| {
                d.chunks(4096)
                    .enumerate()
                    .map(|(i, p)| (gpa + i as u64 * 4096, p.to_vec()))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(got.len(), want.len(), "pages received");
        for (g, w) in got.iter().zip(&want) {
            assert!(g == w, "the page at {:#x} differs", w.0);
        }
        assert_eq!(ch.recv_blob()?, b"after".to_vec());
        Ok(())
    });
    let mut ch = client(a, Some(&psk)).unwrap();
    let none = &|_: u64, _: usize| None;
    ch.send_pages(&pages::encode_ranges(&[(0x10000, &big)], none))
        .unwrap();
    ch.send(&Message::Heartbeat { fence: fence(1) }).unwrap();
    let owned = pages::encode_ranges(&[(0x1000, &small)], none);
    ch.send_pages(&owned).unwrap();
    let borrowed_src = pages::encode_ranges(&[(0x200000, &mid)], none);
    let borrowed: Vec<pages::PageRangeRef<'_>> = borrowed_src.iter().map(|r| r.wire()).collect();
    ch.send_page_refs(&borrowed).unwrap();
    ch.send(&Message::Goodbye).unwrap();
    ch.send_blob(b"after").unwrap();
    srv.join().unwrap().unwrap();
}

/// A page batch is not copied out of its frame: its ranges' payloads are slices of the frame
/// they came in. A frame whose ranges are still held is never reused, so they stay exactly as
/// sent while later frames arrive; once they are all dropped, a later frame is read into the
/// same buffer (no fresh buffer to zero or fault in).
#[test]
fn received_ranges_share_their_frame_which_is_reused_only_once_they_are_dropped() {
    let psk = Psk::generate();
    let (a, b) = pair();
    let pages_of = |seed: u8| -> Vec<u8> {
        // 64 pages: a frame larger than malloc's first mmap threshold, so a fresh buffer
        // would not come back at a freed one's address by chance.
        (0..64 * 4096)
            .map(|i| (i as u8).wrapping_mul(131).wrapping_add(seed) ^ (i >> 12) as u8)
            .collect()
    };
    let sent: Vec<Vec<u8>> = (0..3).map(pages_of).collect();
    let to_send = sent.clone();
    let client_psk = psk.clone();
    let cli = thread::spawn(move || -> Result<(), Error> {
        let mut ch = client(a, Some(&client_psk))?;
        for data in &to_send {
            // Two raw ranges per frame.
            let (lo, hi) = data.split_at(32 * 4096);
            ch.send_page_refs(&[
                pages::PageRangeRef::raw(0x10000, lo),
                pages::PageRangeRef::raw(0x40000, hi),
            ])?;
        }
        ch.send(&Message::Goodbye)
    });
    let mut ch = server(b, Some(&psk)).unwrap();
    let mut batch = || match ch.recv().unwrap() {
        Received::Pages(rs) => rs,
        other => panic!("{other:?}"),
    };
    let joined = |rs: &[transport::PageRange]| -> Vec<u8> {
        rs.iter().flat_map(|r| r.payload.iter().copied()).collect()
    };
    let first = batch();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|r| r.codec == pages::Codec::Raw));
    // Both payloads lie in one shared frame (not copies of their own): the second starts just
    // past the first and its range header.
    assert!(first.iter().all(|r| !r.payload.is_unique()));
    let (p0, p1) = (
        first[0].payload.as_ptr() as usize,
        first[1].payload.as_ptr() as usize,
    );
    assert!(p1 > p0 && p1 - p0 < 32 * 4096 + 16, "{p0:#x} {p1:#x}");
    let second = batch();
    assert_eq!(
        joined(&first),
        sent[0],
        "held ranges unchanged by a later frame"
    );
    assert_eq!(joined(&second), sent[1]);
    let held = [p0, second[0].payload.as_ptr() as usize];
    assert_ne!(held[0], held[1], "a held frame's buffer is not reused");
    drop(first);
    drop(second);
    let third = batch();
    assert_eq!(joined(&third), sent[2]);
    assert!(
        held.contains(&(third[0].payload.as_ptr() as usize)),
        "a dropped frame's buffer is reused"
    );
    assert!(matches!(
        ch.recv().unwrap(),
        Received::Message(Message::Goodbye)
    ));
    cli.join().unwrap().unwrap();
}
