//! The `kv` guest end to end, with the real `tandem` binary on real KVM, a TAP and a raw disk:
//! the conformance script answered byte for byte as `redis-server` answers it, the data set
//! rebuilt from the append-only log after a SIGKILL (and a torn tail cut, never replayed), a
//! hostile client refused while others are served, 64 connections at once, and `redis-cli`
//! (Debian's `redis-tools`) talking to it. Tests skip, saying why, where a TAP cannot be made.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guest_images::kind;
use kvstore::resp::{encode_request, split_args};
use tandem_tests::tap::{ip, unavailable as tap_unavailable, Tap};
use tandem_tests::{require_kvm, tandem_bin};
use testkit::kv::{replay_disk, run_client, History, Progress};

/// A running kv guest: its TAP, disk, process and address.
struct Kv {
    _tap: Tap,
    dir: PathBuf,
    child: Option<Child>,
    addr: SocketAddr,
    tap: String,
    guest_ip: String,
}

impl Kv {
    /// Starts kv on a new TAP (subnet 10.77.`net`.0/24) and a new 16 MiB disk.
    fn start(tag: &str, net: u8) -> Option<Kv> {
        require_kvm();
        if let Some(why) = tap_unavailable() {
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("tandem-kv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kv.elf"), guest_images::KV).unwrap();
        let f = std::fs::File::create(dir.join("disk")).unwrap();
        f.set_len(16 << 20).unwrap();
        let tap = format!("tkv{}{net}", std::process::id() % 1000);
        let t = Tap::new(&tap, &format!("10.77.{net}.1/24")).expect("make a TAP");
        let guest_ip = format!("10.77.{net}.2");
        let mut kv = Kv {
            _tap: t,
            dir,
            child: None,
            addr: SocketAddr::new(guest_ip.parse::<Ipv4Addr>().unwrap().into(), 6379),
            tap,
            guest_ip,
        };
        kv.boot();
        Some(kv)
    }

    /// Starts (or restarts) tandem on the same TAP and disk, and waits until kv answers.
    fn boot(&mut self) {
        let out = self.dir.join("records.txt");
        let _ = std::fs::remove_file(&out);
        let child = Command::new(tandem_bin())
            .args(["run", "--image"])
            .arg(self.dir.join("kv.elf"))
            .args(["--vcpus", "1", "--mem-mib", "256", "--net"])
            .arg(format!("tap={}", self.tap))
            .arg("--disk")
            .arg(self.dir.join("disk"))
            .args([
                "--guest-arg",
                &format!("ip={}/24", self.guest_ip),
                "--guest-arg",
                "stats_ms=100",
                "--output",
            ])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tandem");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if let Ok(s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                if Client::new(s).request("PING") == b"+PONG\r\n" {
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let mut e = String::new();
                let _ = self
                    .child
                    .as_mut()
                    .unwrap()
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut e);
                panic!("tandem exited ({st}) before kv answered: {e}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "kv did not answer on {} within 30 s",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn connect(&self) -> Client {
        let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client::new(s)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The records the guest emitted (as far as the output file holds them).
    fn records(&self) -> Vec<(u32, u64, u64)> {
        std::fs::read_to_string(self.dir.join("records.txt"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let p: Vec<&str> = l.split(' ').collect();
                Some((
                    p.get(2)?.parse().ok()?,
                    u64::from_str_radix(p.get(3)?, 16).ok()?,
                    p.get(4)?.parse().ok()?,
                ))
            })
            .collect()
    }
}

impl Drop for Kv {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client connection whose errors fail the test.
struct Client(testkit::kv::Conn);

impl Client {
    fn new(s: TcpStream) -> Client {
        Client(testkit::kv::Conn::new(s))
    }

    /// Sends one request (inline syntax, sent as RESP2) and reads its whole reply.
    fn request(&mut self, line: &str) -> Vec<u8> {
        self.0
            .request(line)
            .unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    fn reply(&mut self) -> Vec<u8> {
        self.0.reply().unwrap_or_else(|e| panic!("{e}"))
    }
}

#[test]
fn kv_answers_the_conformance_script_byte_for_byte_as_the_reference_does() {
    let Some(kv) = Kv::start("script", 11) else {
        return;
    };
    let mut s = kv.connect();
    // The reference: kvstore's engine, which `kvstore/tests/redis_compat.rs` holds to a real
    // redis-server byte for byte.
    let mut store = kvstore::Store::new(64 << 20);
    let mut differ = Vec::new();
    for line in kvstore::compat::SCRIPT {
        let got = s.request(line);
        let mut want = Vec::new();
        store.execute(
            &split_args(line.as_bytes()).unwrap(),
            &kvstore::ServerInfo::default(),
            &mut want,
        );
        if got != want {
            differ.push(format!(
                "{line}: want {:?}, got {:?}",
                String::from_utf8_lossy(&want),
                String::from_utf8_lossy(&got)
            ));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    // Pipelining: 500 requests in one write, 500 replies in order.
    let mut batch = Vec::new();
    for i in 0..500 {
        encode_request(&[b"RPUSH", b"pipe", i.to_string().as_bytes()], &mut batch);
    }
    s.0.stream().write_all(&batch).unwrap();
    for i in 0..500 {
        assert_eq!(s.reply(), format!(":{}\r\n", i + 1).into_bytes());
    }
    // Inline requests as telnet users type them.
    s.0.stream()
        .write_all(b"LLEN pipe\r\nECHO \"a b\"\n")
        .unwrap();
    assert_eq!(s.reply(), b":500\r\n");
    assert_eq!(s.reply(), b"$3\r\na b\r\n");
}

#[test]
fn a_sigkilled_kv_rebuilds_every_acknowledged_write_from_its_log_and_cuts_a_torn_tail() {
    let Some(mut kv) = Kv::start("log", 12) else {
        return;
    };
    let mut s = kv.connect();
    for i in 0..300 {
        assert_eq!(
            s.request(&format!("RPUSH history v{i}")),
            format!(":{}\r\n", i + 1).into_bytes()
        );
        assert_eq!(
            s.request("INCR counter"),
            format!(":{}\r\n", i + 1).into_bytes()
        );
    }
    assert_eq!(s.request("SET last \"the end\""), b"+OK\r\n");
    drop(s);
    // Every reply above was sent after its write was flushed: SIGKILL loses none of them.
    kv.kill();
    kv.boot();
    let mut s = kv.connect();
    assert_eq!(s.request("LLEN history"), b":300\r\n");
    assert_eq!(s.request("GET counter"), b"$3\r\n300\r\n");
    assert_eq!(s.request("GET last"), b"$7\r\nthe end\r\n");
    let all = s.request("LRANGE history 0 -1");
    let mut want = b"*300\r\n".to_vec();
    for i in 0..300 {
        let v = format!("v{i}");
        want.extend_from_slice(format!("${}\r\n{v}\r\n", v.len()).as_bytes());
    }
    assert_eq!(all, want, "the history, in acknowledgement order");
    drop(s);
    kv.kill();
    let replayed = kv
        .records()
        .iter()
        .find(|r| r.0 == kind::KV_LOG)
        .copied()
        .expect("a KV_LOG record after the restart");
    assert_eq!(replayed.1, 601, "600 writes and one SET replayed");
    let tail = replayed.2 & !(1 << 63);
    // A torn append: half a record header and garbage right after the tail.
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(kv.dir.join("disk"))
        .unwrap();
    disk.write_all_at(&[0x52, 0x4b, 0x40, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef], tail)
        .unwrap();
    drop(disk);
    kv.boot();
    let mut s = kv.connect();
    assert_eq!(s.request("LLEN history"), b":300\r\n");
    assert_eq!(s.request("INCR counter"), b":301\r\n");
    drop(s);
    kv.kill();
    let log = kv
        .records()
        .iter()
        .find(|r| r.0 == kind::KV_LOG)
        .copied()
        .expect("a KV_LOG record");
    assert_eq!(log.1, 601, "the torn record is not replayed");
    assert_ne!(log.2 >> 63, 0, "the torn tail was seen and cut");
}

#[test]
fn a_hostile_client_is_refused_and_closed_while_64_others_are_served() {
    let Some(kv) = Kv::start("hostile", 13) else {
        return;
    };
    let mut clients: Vec<Client> = (0..63).map(|_| kv.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.request(&format!("SET c{i} {i}")), b"+OK\r\n");
    }
    let mut bad = kv.connect().0.into_stream();
    bad.write_all(b"*1\r\n$99999999999\r\n").unwrap();
    let mut got = Vec::new();
    bad.read_to_end(&mut got).expect("kv closes the connection");
    assert_eq!(got, b"-ERR Protocol error: invalid bulk length\r\n");
    drop(bad);
    // Its slot is free again once kv has seen the close: a 64th client gets in while the
    // other 63 are still open.
    let t0 = Instant::now();
    let mut last = loop {
        match TcpStream::connect_timeout(&kv.addr, Duration::from_secs(5)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                break Client::new(s);
            }
            Err(e) if t0.elapsed() < Duration::from_secs(5) => {
                eprintln!("64th client: {e}; retrying");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the hostile client's slot was not freed: {e}"),
        }
    };
    assert_eq!(last.request("DBSIZE"), b":63\r\n");
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.request(&format!("GET c{i}")), {
            let v = i.to_string();
            format!("${}\r\n{v}\r\n", v.len()).into_bytes()
        });
    }
}

#[test]
fn redis_cli_talks_to_kv() {
    if Command::new("redis-cli").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no redis-cli (install Debian's redis-tools)");
        return;
    }
    let Some(kv) = Kv::start("cli", 14) else {
        return;
    };
    let cli = |args: &[&str]| {
        let o = Command::new("redis-cli")
            .args(["-h", &kv.guest_ip])
            .args(args)
            .output()
            .expect("redis-cli");
        assert!(o.status.success(), "redis-cli {args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(cli(&["PING"]), "PONG\n");
    assert_eq!(cli(&["SET", "greeting", "hello world"]), "OK\n");
    assert_eq!(cli(&["GET", "greeting"]), "hello world\n");
    assert_eq!(cli(&["RPUSH", "l", "a", "b"]), "2\n");
    assert_eq!(cli(&["LRANGE", "l", "0", "-1"]), "a\nb\n");
    assert!(cli(&["INFO", "server"]).contains("redis_version:"));
    assert!(cli(&["NOSUCH"]).starts_with("ERR unknown command 'NOSUCH'"));
}

/// A client of [`testkit::kv::run_client`] on a new connection to `addr`.
fn client(
    addr: SocketAddr,
    id: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    progress: std::sync::Arc<Progress>,
) -> History {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    run_client(s, id, &stop, &progress)
}

/// Runs kv protected (20 ms epochs) on `net` (the primary's `--net`), with `standby_args`,
/// starts four clients on `ip`, SIGKILLs the primary after 1.5 s and checks every client's
/// history after 2.5 s more. With `disk`, kv keeps its append-only log on a disk of the
/// primary's, the standby gets its own replica (`--disk`), and after the run the replica,
/// read from the host, must replay to exactly the acknowledged history.
fn failover_with_clients(tag: &str, net: &str, ip: &str, standby_args: Vec<String>, disk: bool) {
    failover_with(tag, net, ip, standby_args, disk, Fault::Kill)
}

/// Starts kv protected (20 ms epochs) from `image` in `dir` on `--net` `net`, with `ip_arg`
/// (`ip=…`), `extra` guest arguments and `hosts`, and waits until the primary is protected.
fn protected_kv(
    dir: &Path,
    image: &Path,
    net: String,
    ip_arg: String,
    extra: Vec<String>,
    hosts: testkit::pair::Hosts,
) -> testkit::pair::Pair {
    let mut guest: Vec<String> = vec![
        "--image".into(),
        image.display().to_string(),
        "--vcpus".into(),
        "1".into(),
        "--mem-mib".into(),
        "128".into(),
        "--net".into(),
        net,
        "--guest-arg".into(),
        ip_arg,
    ];
    guest.extend(extra);
    let cfg = testkit::pair::PairConfig {
        bin: tandem_bin().clone(),
        dir: dir.to_path_buf(),
        guest,
        interval_ms: 20,
        primary_env: vec![],
        log: "info".into(),
        hosts,
    };
    let mut pair = testkit::pair::Pair::start_standby(cfg).expect("sink and standby");
    pair.start_primary().expect("primary");
    assert!(
        pair.wait_protected(Duration::from_secs(30)).is_some(),
        "not protected: {}",
        pair.log("primary")
    );
    pair
}

/// How the primary is made to fail.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL.
    Kill,
    /// SIGSTOP for 2 s (the standby takes over meanwhile), then SIGCONT: the old primary must
    /// fence itself and answer no client.
    Stop,
}

fn failover_with(
    tag: &str,
    net: &str,
    ip: &str,
    mut standby_args: Vec<String>,
    disk: bool,
    fault: Fault,
) {
    let dir = std::env::temp_dir().join(format!("tandem-kv-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("kv.elf");
    std::fs::write(&image, guest_images::KV).unwrap();
    let mut disk_args = vec!["--guest-arg".to_string(), "aof=0".to_string()];
    if disk {
        for name in ["primary.disk", "replica.disk"] {
            let f = std::fs::File::create(dir.join(name)).unwrap();
            f.set_len(16 << 20).unwrap();
        }
        disk_args = vec![
            "--disk".into(),
            dir.join("primary.disk").display().to_string(),
        ];
        standby_args.extend([
            "--disk".to_string(),
            dir.join("replica.disk").display().to_string(),
        ]);
    }
    let hosts = testkit::pair::Hosts {
        standby_args,
        ..Default::default()
    };
    let mut pair = protected_kv(
        &dir,
        &image,
        net.into(),
        format!("ip={ip}/24"),
        disk_args,
        hosts,
    );
    let addr: SocketAddr = format!("{ip}:6379").parse().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|id| {
            let stop = stop.clone();
            std::thread::spawn(move || client(addr, id, stop, Default::default()))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    match fault {
        Fault::Kill => {
            pair.kill_primary();
        }
        Fault::Stop => pair.signal_primary("STOP"),
    }
    assert!(
        pair.wait_takeover(Duration::from_secs(30)).is_some(),
        "no takeover: {}",
        pair.log("standby")
    );
    if fault == Fault::Stop {
        std::thread::sleep(Duration::from_millis(2000));
        pair.signal_primary("CONT");
        let st = pair
            .wait_primary(Duration::from_secs(30))
            .expect("the woken primary exits");
        assert_eq!(
            st.code(),
            Some(3),
            "the woken primary fences itself (exit 3): {}",
            pair.log("primary")
        );
    }
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let histories = join_clients(tag, clients, &pair);
    if disk {
        check_replica(tag, &dir.join("replica.disk"), &histories);
    }
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Joins the clients (each has checked its list itself) and checks that INCR rose by exactly
/// one at each reply, across whatever happened.
fn join_clients(
    tag: &str,
    clients: Vec<std::thread::JoinHandle<History>>,
    pair: &testkit::pair::Pair,
) -> Vec<History> {
    let mut histories = Vec::new();
    for (id, t) in clients.into_iter().enumerate() {
        let h = t.join().expect("a client thread");
        eprintln!(
            "{tag}: client {id}: {} INCRs acknowledged, longest gap between replies {:?}",
            h.counter.len(),
            h.longest_gap
        );
        if let Err(e) = h.check(id) {
            panic!(
                "{tag}: {e}\n--- primary ---\n{}\n--- standby ---\n{}",
                pair.log("primary"),
                pair.log("standby")
            );
        }
        assert!(h.counter.len() > 10, "client {id} made progress");
        histories.push(h);
    }
    histories
}

/// The survivor's disk, read from the host: kv's log on it replays to exactly what the clients
/// were told (every reply was sent after its write was flushed, and nothing else is there).
fn check_replica(tag: &str, path: &Path, histories: &[History]) {
    let records = replay_disk(path, histories).unwrap_or_else(|e| panic!("{tag}: {e}"));
    eprintln!(
        "{tag}: the replica's log replays {records} records to exactly the acknowledged history"
    );
}

#[test]
fn kv_clients_stay_connected_through_a_failover_and_lose_no_acknowledged_write() {
    require_kvm();
    if let Some(why) = tap_unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    // A persistent TAP: the standby opens the same one when it takes over (one host here).
    let name = format!("tkvf{}", std::process::id() % 10000);
    let _tap = Tap::new(&name, "10.77.30.1/24").expect("make a TAP");
    failover_with_clients(
        "same-tap",
        &format!("tap={name}"),
        "10.77.30.2",
        vec![],
        false,
    );
}

/// Two TAPs on one bridge (the primary's host port and the standby's), the client behind the
/// bridge: the standby takes over on its own TAP (`tandem standby --net`) and its own disk
/// replica (`--disk`), announces the guest's MAC there, and kv goes on appending its log to
/// the replica.
#[test]
fn kv_clients_stay_connected_when_the_standby_takes_over_on_its_own_tap_and_disk() {
    require_kvm();
    if let Some(why) = tap_unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let n = std::process::id() % 10000;
    let (br, a, b) = (format!("tbr{n}"), format!("tka{n}"), format!("tkb{n}"));
    let _links = bridge(&br, "10.77.41.1/24", &[&a, &b]);
    failover_with_clients(
        "own-tap",
        &format!("tap={a}"),
        "10.77.41.2",
        vec!["--net".into(), format!("tap={b}")],
        true,
    );
}

#[test]
fn redis_benchmark_completes_against_a_protected_kv_through_a_kill_of_the_primary() {
    require_kvm();
    if Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: no redis-benchmark (install Debian's redis-tools)");
        return;
    }
    if let Some(why) = tap_unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("tandem-kv-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("kv.elf");
    std::fs::write(&image, guest_images::KV).unwrap();
    let name = format!("tkvb{}", std::process::id() % 10000);
    let _tap = Tap::new(&name, "10.77.31.1/24").expect("make a TAP");
    let mut pair = protected_kv(
        &dir,
        &image,
        format!("tap={name}"),
        "ip=10.77.31.2/24".into(),
        vec!["--guest-arg".into(), "aof=0".into()],
        Default::default(),
    );
    let bench = Command::new("redis-benchmark")
        .args([
            "-h",
            "10.77.31.2",
            "-t",
            "set,get,incr,lpush",
            "-n",
            "4000",
            "-c",
            "20",
            "-q",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-benchmark");
    std::thread::sleep(Duration::from_millis(1500));
    pair.kill_primary();
    assert!(
        pair.wait_takeover(Duration::from_secs(30)).is_some(),
        "no takeover: {}",
        pair.log("standby")
    );
    let out = bench.wait_with_output().expect("redis-benchmark ends");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{}",
        text.replace('\r', "\n")
            .lines()
            .filter(|l| l.contains("requests per second"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(out.status.success(), "redis-benchmark failed: {text}");
    assert!(
        !text.contains("Error") && !text.contains("ERR"),
        "redis-benchmark saw errors: {text}"
    );
    for t in ["SET", "GET", "INCR", "LPUSH"] {
        assert!(text.contains(&format!("{t}: ")), "no {t} result: {text}");
    }
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGSTOP of the primary (the standby on its own TAP and disk replica takes over), then
/// SIGCONT: the woken primary fences itself, the clients only ever hear one side (INCR exact,
/// GET returns the SET just acknowledged), and the replica replays to exactly what they were
/// told.
#[test]
fn a_stopped_kv_primary_is_replaced_and_only_one_side_ever_answers() {
    require_kvm();
    if let Some(why) = tap_unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let n = std::process::id() % 10000;
    let (br, a, b) = (format!("tbs{n}"), format!("tsa{n}"), format!("tsb{n}"));
    let _links = bridge(&br, "10.77.42.1/24", &[&a, &b]);
    failover_with(
        "stop",
        &format!("tap={a}"),
        "10.77.42.2",
        vec!["--net".into(), format!("tap={b}")],
        true,
        Fault::Stop,
    );
}

/// A link deleted on drop.
struct Link(String);

impl Drop for Link {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.0]);
    }
}

/// A bridge with an address and TAPs on it.
fn bridge(br: &str, cidr: &str, taps: &[&str]) -> Vec<Link> {
    let _ = ip(&["link", "del", br]);
    ip(&["link", "add", br, "type", "bridge"]).expect("a bridge");
    let mut links = vec![Link(br.to_string())];
    ip(&["addr", "add", cidr, "dev", br]).unwrap();
    ip(&["link", "set", br, "up"]).unwrap();
    for t in taps {
        let _ = ip(&["link", "del", t]);
        ip(&["tuntap", "add", "name", t, "mode", "tap"]).expect("a TAP");
        links.push(Link(t.to_string()));
        ip(&["link", "set", t, "master", br]).unwrap();
        ip(&["link", "set", t, "up"]).unwrap();
    }
    links
}

/// Twenty SIGKILLs of whichever process is primary, each followed by a fresh standby joining
/// the survivor (pre-copy, with its own disk replica), while eight clients issue INCR, RPUSH,
/// SET and GET without pause: every connection stays open through all of them, INCR rises by
/// exactly one each time, every acknowledged RPUSH is in the list in order, every GET returns
/// the SET just acknowledged, and the last survivor's disk, read from the host, replays to
/// exactly the acknowledged history. (One host, one shared TAP.)
#[test]
fn kv_clients_stay_connected_through_twenty_kills_of_the_primary() {
    require_kvm();
    if let Some(why) = tap_unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("tandem-kv-kills-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("kv.elf");
    std::fs::write(&image, guest_images::KV).unwrap();
    let name = format!("tkvk{}", std::process::id() % 10000);
    let _tap = Tap::new(&name, "10.77.32.1/24").expect("make a TAP");
    // A disk for the primary and a replica for every standby that will ever run.
    let mut nodes = vec!["primary".to_string(), "standby".to_string()];
    nodes.extend((2..=22).map(|n| format!("standby{n}")));
    for n in &nodes {
        let f = std::fs::File::create(dir.join(format!("{n}.disk"))).unwrap();
        f.set_len(16 << 20).unwrap();
    }
    let mut pair = protected_kv(
        &dir,
        &image,
        format!("tap={name}"),
        "ip=10.77.32.2/24".into(),
        vec![
            "--disk".into(),
            dir.join("primary.disk").display().to_string(),
        ],
        testkit::pair::Hosts {
            standby_args: vec![
                "--disk".into(),
                dir.join("{node}.disk").display().to_string(),
            ],
            ..Default::default()
        },
    );
    let addr: SocketAddr = "10.77.32.2:6379".parse().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress: Vec<std::sync::Arc<Progress>> = (0..8).map(|_| Default::default()).collect();
    let clients: Vec<_> = (0..8)
        .map(|id| {
            let stop = stop.clone();
            let p = progress[id].clone();
            std::thread::spawn(move || client(addr, id, stop, p))
        })
        .collect();
    let seen = |p: &[std::sync::Arc<Progress>]| -> Vec<u64> {
        p.iter()
            .map(|c| c.rounds.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    };
    let mut at_last_kill = seen(&progress);
    let mut rng_state = u64::from(std::process::id()) | 1;
    let mut kills = Vec::new();
    for cycle in 1..=20 {
        // 200–700 ms of protected running between kills.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        // Each kill comes once every client has been answered since the last one (so a
        // client's retransmission back-off does not pile up across kills), then after
        // 200–700 ms more.
        let t0 = Instant::now();
        while seen(&progress)
            .iter()
            .zip(&at_last_kill)
            .any(|(now, then)| now <= then)
        {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "cycle {cycle}: a client got no reply for 60 s after the last kill"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200 + rng_state % 500));
        at_last_kill = seen(&progress);
        kills.push(Instant::now());
        let c = pair
            .kill_and_rejoin(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
        eprintln!(
            "kill {cycle}: failover {:.1} ms, protected again after {:.0} ms",
            c.failover_ms, c.reprotect_ms
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut histories = Vec::new();
    for (id, t) in clients.into_iter().enumerate() {
        let h = t.join().expect("a client thread");
        eprintln!(
            "client {id}: {} INCRs acknowledged through 20 kills, longest gap between replies {:?}",
            h.counter.len(),
            h.longest_gap
        );
        if let Err(e) = h.check(id) {
            panic!("20 kills: {e}");
        }
        histories.push(h);
    }
    // Client-visible outage of each kill: the longest gap between two replies, over all
    // clients, that spans the kill.
    for (k, at) in kills.iter().enumerate() {
        let outage = testkit::kv::outage_at(&histories, *at);
        eprintln!("kill {}: client-visible outage {outage:?}", k + 1);
    }
    let survivor = pair.primary_node().to_string();
    check_replica(
        "20 kills",
        &dir.join(format!("{survivor}.disk")),
        &histories,
    );
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 3 s partition between the primary's host and the standby's (network namespaces; each
/// host has the VM's TAP bridged onto one segment; the clients in a third namespace; the
/// arbiter and the sink reachable from both): exactly one side goes on answering. The
/// clients' connections stay open and their histories exact (INCR by one, lists exact, GET
/// the SET just acknowledged), the other side fences itself (or stands down), and the
/// survivor's disk replays to exactly what the clients were told.
#[test]
fn a_partition_between_the_hosts_leaves_exactly_one_kv_answering() {
    require_kvm();
    let lab = match testkit::netlab::NetLab::new("tkvp", 65) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIPPED: cannot make test hosts here: {e}");
            return;
        }
    };
    lab.vm_taps("kvtap").expect("the VM's TAP on both hosts");
    let client_host = lab.client().expect("a client host");
    let dir = std::env::temp_dir().join(format!("tandem-kv-part-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("kv.elf");
    std::fs::write(&image, guest_images::KV).unwrap();
    for name in ["primary.disk", "replica.disk"] {
        let f = std::fs::File::create(dir.join(name)).unwrap();
        f.set_len(16 << 20).unwrap();
    }
    let hosts = testkit::pair::Hosts {
        primary_prefix: lab.prefix(&lab.a),
        standby_prefix: lab.prefix(&lab.b),
        sink_listen: format!("{}:0", lab.root_ip),
        standby_listen: format!("{}:0", lab.b_ip),
        standby_args: vec![
            "--net".into(),
            "tap=kvtap".into(),
            "--disk".into(),
            dir.join("replica.disk").display().to_string(),
        ],
        ..Default::default()
    };
    let mut pair = protected_kv(
        &dir,
        &image,
        "tap=kvtap".into(),
        "ip=10.233.65.50/24".into(),
        vec![
            "--disk".into(),
            dir.join("primary.disk").display().to_string(),
        ],
        hosts,
    );
    let addr: SocketAddr = "10.233.65.50:6379".parse().unwrap();
    let streams = client_host
        .enter(|| {
            (0..4)
                .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .expect("the client host")
        .expect("connect to kv from the client host");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(id, s)| {
            let stop = stop.clone();
            std::thread::spawn(move || run_client(s, id, &stop, &Progress::default()))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    lab.set(testkit::netlab::Fault::Partition)
        .expect("partition");
    let t0 = Instant::now();
    let mut took_over = None;
    while t0.elapsed() < Duration::from_secs(3) {
        if took_over.is_none() && pair.wait_takeover(Duration::ZERO).is_some() {
            took_over = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    lab.clear().expect("heal the partition");
    let survivor = match took_over {
        Some(after) => {
            // The standby claimed the next generation: the old primary, cut off from it,
            // must have lost its own claim and fenced (exit 3), releasing nothing.
            let st = pair
                .wait_primary(Duration::from_secs(30))
                .expect("the old primary ends");
            eprintln!(
                "partition: the standby took over {:.0} ms into it; the old primary exited with {st}",
                after.as_secs_f64() * 1e3
            );
            assert_eq!(
                st.code(),
                Some(3),
                "the old primary fences itself: {}",
                pair.log("primary")
            );
            "replica.disk"
        }
        None => {
            // The primary won the next generation: the standby stands down and the guest
            // runs on, unprotected, where it was.
            let st = pair
                .wait_standby(Duration::from_secs(30))
                .expect("the standby stands down");
            eprintln!("partition: the primary kept the VM; the standby exited with {st}");
            assert!(
                pair.wait_primary(Duration::ZERO).is_none(),
                "the primary goes on"
            );
            "primary.disk"
        }
    };
    std::thread::sleep(Duration::from_millis(2000));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let histories = join_clients("partition", clients, &pair);
    check_replica("partition", &dir.join(survivor), &histories);
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
}
