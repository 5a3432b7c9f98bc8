//! The same command script against a real `redis-server` (Debian's `redis-server` package)
//! and against `kvstore::Store`: every reply must be byte-identical. Skips, saying why, where
//! `redis-server` is not installed.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvstore::resp::{encode_request, split_args};
use kvstore::{ServerInfo, Store};

/// A redis-server of this test, stopped on drop. The tests of this file take turns (the
/// guard): each starts its own server on a free port, and two servers started at once could be
/// handed the same port, the second then exiting while its test talks to the first.
struct Server(
    Child,
    #[allow(dead_code)] std::sync::MutexGuard<'static, ()>,
);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn start_redis() -> Option<(Server, TcpStream)> {
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            // kv has one database, as this server then has.
            "--databases",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => Server(c, turn),
        Err(e) => {
            eprintln!("SKIP: cannot start redis-server ({e}); install Debian's redis-server");
            return None;
        }
    };
    let t0 = Instant::now();
    loop {
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!("redis-server on port {port} exited at start ({st}): is the port taken?");
        }
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            return Some((child, s));
        }
        if t0.elapsed() > Duration::from_secs(10) {
            panic!("redis-server did not listen on port {port} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads one whole RESP2 reply.
fn read_reply(r: &mut impl Read, out: &mut Vec<u8>) {
    let mut b = [0u8; 1];
    while kvstore::resp::reply_len(out)
        .expect("a RESP2 reply")
        .is_none()
    {
        r.read_exact(&mut b).expect("more of the reply");
        out.push(b[0]);
    }
}

#[test]
fn every_reply_is_byte_identical_to_redis_server() {
    let Some((_server, stream)) = start_redis() else {
        return;
    };
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut store = Store::new(64 << 20);
    let info = ServerInfo::default();
    let mut differ = Vec::new();
    for line in kvstore::compat::SCRIPT {
        let args = split_args(line.as_bytes()).expect("script lines parse");
        let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
        let mut req = Vec::new();
        encode_request(&refs, &mut req);
        w.write_all(&req).unwrap();
        let mut want = Vec::new();
        read_reply(&mut r, &mut want);
        let mut got = Vec::new();
        store.execute(&args, &info, &mut got);
        if got != want {
            differ.push(format!(
                "{line}\n  redis-server: {:?}\n  kv:           {:?}",
                String::from_utf8_lossy(&want),
                String::from_utf8_lossy(&got)
            ));
        }
    }
    assert!(differ.is_empty(), "replies differ:\n{}", differ.join("\n"));
}

#[test]
fn protocol_errors_match_redis_server() {
    // Each hostile request on its own connection: Redis answers and closes.
    let cases: &[&[u8]] = &[
        b"*x\r\n",
        b"*1\r\n$-5\r\n",
        b"*1\r\n:1\r\n",
        b"*1\r\n$99999999999\r\n",
        b"GET \"unbalanced\r\n",
    ];
    let Some((server, first)) = start_redis() else {
        return;
    };
    let port = first.peer_addr().unwrap().port();
    drop(first);
    for case in cases {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(case).unwrap();
        let mut want = Vec::new();
        let _ = s.read_to_end(&mut want);
        let got = match kvstore::parse(case) {
            kvstore::Parsed::Error(why) => format!("-ERR Protocol error: {why}\r\n").into_bytes(),
            other => panic!(
                "{:?}: kv did not refuse it: {other:?}",
                String::from_utf8_lossy(case)
            ),
        };
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "request {:?}",
            String::from_utf8_lossy(case)
        );
    }
    drop(server);
}
