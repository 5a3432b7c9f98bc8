//! Network namespaces for tests: [`NetNs`], one namespace with helpers to run code and
//! processes in it; [`NetLab`], two test hosts on one machine, for network faults between
//! primary and standby.
//!
//! ```text
//!   netns <tag>a (primary host)          netns <tag>b (standby host)
//!   10.233.<n>.1 ─ veth ─┐            ┌─ veth ─ 10.233.<n>.2
//!                        └─ bridge ───┘
//!              (root namespace: 10.233.<n>.254 — the sink, the delay relay)
//! ```
//!
//! Faults act between the two hosts only, in each host's nftables output hook: packet loss
//! (`numgen random`), or every packet (a partition). The sink and the arbiter's directory stay
//! reachable from both hosts. Delay uses `tc netem` where the kernel has it; where it does not
//! (`sch_netem` missing), [`Relay`] delays the replication stream in the root namespace.
//! Everything needs root; [`NetLab::new`] says why it cannot run otherwise.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ft::status::EndReport;

/// The two hosts and their bridge; removed on drop.
pub struct NetLab {
    tag: String,
    /// The primary host's namespace.
    pub a: String,
    /// The standby host's namespace.
    pub b: String,
    bridge: String,
    /// The primary host's address.
    pub a_ip: String,
    /// The standby host's address.
    pub b_ip: String,
    /// The root namespace's address on the bridge.
    pub root_ip: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs one nftables command in namespace `ns`.
fn nft(ns: &str, command: &str) -> Result<(), String> {
    run(&["ip", "netns", "exec", ns, "nft", command])
}

/// One network namespace of a test (`ip netns add`), deleted on drop with every interface in
/// it. [`NetNs::enter`] runs code whose sockets live in it; [`NetNs::prefix`] starts
/// processes in it.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates namespace `name` (replacing a stale one of that name) with its loopback up.
    /// Fails with the reason where this process may not (not root, no `ip`, no netns).
    pub fn new(name: &str) -> Result<NetNs, String> {
        run(&["ip", "-V"]).map_err(|e| format!("{e} (install iproute2)"))?;
        let _ = run(&["ip", "netns", "del", name]);
        run(&["ip", "netns", "add", name])?;
        let ns = NetNs {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["ip", "-n", self.name.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// `ip -n <ns> ARGS…`, its standard output.
    pub fn ip_output(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`ip -n {} {}` failed: {}",
                self.name,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip netns exec <ns>`: the command prefix of a process in the namespace.
    pub fn prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// Runs `f` on a new thread that has joined the namespace (setns): sockets it creates
    /// belong to the namespace and stay there, whichever thread uses them afterwards. The
    /// calling thread and the rest of the process stay where they are.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        let path = format!("/var/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&file),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|e| format!("setns into {path}: {e} (needs CAP_SYS_ADMIN)"))?;
                Ok(f())
            })
            .join()
            .map_err(|_| format!("the thread in netns {} panicked", self.name))?
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run(&["ip", "netns", "del", &self.name]) {
            log::warn!("{e}");
        }
    }
}

/// A network fault between the two hosts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Drop this fraction of packets in each direction.
    Loss(f64),
    /// Drop every packet in both directions.
    Partition,
}

impl NetLab {
    /// Creates hosts `<tag>a` and `<tag>b` on subnet 10.233.`n`.0/24 (`tag` at most 8
    /// characters). Fails with the reason when this process may not (not root, no `ip`, no
    /// `nft`, no network namespaces).
    pub fn new(tag: &str, n: u8) -> Result<NetLab, String> {
        if tag.len() > 8 {
            return Err("net lab tag longer than 8 characters".into());
        }
        for tool in [["ip", "-V"], ["nft", "--version"]] {
            run(&tool).map_err(|e| {
                format!("{e} (install iproute2 and nftables to run the network fault tests)")
            })?;
        }
        let lab = NetLab {
            tag: tag.to_string(),
            a: format!("{tag}a"),
            b: format!("{tag}b"),
            bridge: format!("{tag}br"),
            a_ip: format!("10.233.{n}.1"),
            b_ip: format!("10.233.{n}.2"),
            root_ip: format!("10.233.{n}.254"),
        };
        lab.cleanup();
        lab.setup().inspect_err(|_| lab.cleanup())?;
        Ok(lab)
    }

    fn setup(&self) -> Result<(), String> {
        let br = self.bridge.as_str();
        run(&["ip", "link", "add", br, "type", "bridge"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.root_ip),
            "dev",
            br,
        ])?;
        run(&["ip", "link", "set", br, "up"])?;
        for (ns, ip) in [(&self.a, &self.a_ip), (&self.b, &self.b_ip)] {
            let host_end = format!("{ns}h");
            let ns_end = format!("{ns}n");
            run(&["ip", "netns", "add", ns])?;
            run(&[
                "ip", "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ])?;
            run(&["ip", "link", "set", &ns_end, "netns", ns])?;
            run(&["ip", "link", "set", &host_end, "master", br, "up"])?;
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                &ns_end,
            ])?;
            run(&["ip", "-n", ns, "link", "set", &ns_end, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            nft(ns, "add table inet tandem")?;
            nft(
                ns,
                "add chain inet tandem out { type filter hook output priority 0; }",
            )?;
        }
        Ok(())
    }

    fn cleanup(&self) {
        for ns in [&self.a, &self.b] {
            let _ = run(&["ip", "netns", "del", ns]);
            let _ = run(&["ip", "link", "del", &format!("{ns}h")]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }

    /// `ip netns exec <host>`: the command prefix of a process on host a or b.
    pub fn prefix(&self, host: &str) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), host.into()]
    }

    /// Starts `fault` between the hosts (replacing any other).
    pub fn set(&self, fault: Fault) -> Result<(), String> {
        self.clear()?;
        for (ns, other) in [(&self.a, &self.b_ip), (&self.b, &self.a_ip)] {
            let rule = match fault {
                Fault::Loss(p) => {
                    // numgen gives 0..1000; drop when below p × 1000.
                    let below = (p * 1000.0).round() as u32;
                    format!("ip daddr {other} numgen random mod 1000 < {below} drop")
                }
                Fault::Partition => format!("ip daddr {other} drop"),
            };
            nft(ns, &format!("add rule inet tandem out {rule}"))?;
        }
        Ok(())
    }

    /// Sets TCP's minimum retransmission timeout on the route between the hosts (the
    /// kernel's default is 200 ms). A lossy replication link needs it: each lost
    /// retransmission doubles the wait, and those stalls must stay shorter than the standby's
    /// silence rule.
    pub fn set_rto_min(&self, ms: u32) -> Result<(), String> {
        for (ns, other) in [(&self.a, &self.b_ip), (&self.b, &self.a_ip)] {
            run(&[
                "ip",
                "-n",
                ns,
                "route",
                "replace",
                &format!("{other}/32"),
                "dev",
                &format!("{ns}n"),
                "rto_min",
                &format!("{ms}ms"),
            ])?;
        }
        Ok(())
    }

    /// Ends every fault.
    pub fn clear(&self) -> Result<(), String> {
        for ns in [&self.a, &self.b] {
            nft(ns, "flush chain inet tandem out")?;
        }
        Ok(())
    }

    /// Gives each host a TAP named `tap` for a VM, bridged onto the lab's segment (the way a
    /// hypervisor host bridges its VMs onto the LAN): in each host a bridge takes the host's
    /// veth and the TAP, and the host's address moves to that bridge. The same VM's card can
    /// then be brought up on either host, and the partition rules ([`NetLab::set`], which
    /// match host addresses in the output hook) never touch the VM's bridged frames.
    ///
    /// ```text
    ///   host a: [ vbr: <a>n veth + TAP `tap` ]──┐           ┌──[ vbr: <b>n veth + TAP `tap` ] host b
    ///                                            └─ bridge ─┘ (root; clients: NetLab::client)
    /// ```
    pub fn vm_taps(&self, tap: &str) -> Result<(), String> {
        for (ns, ip) in [(&self.a, &self.a_ip), (&self.b, &self.b_ip)] {
            let veth = format!("{ns}n");
            let cidr = format!("{ip}/24");
            run(&["ip", "-n", ns, "tuntap", "add", "name", tap, "mode", "tap"])?;
            run(&["ip", "-n", ns, "link", "add", "vbr", "type", "bridge"])?;
            run(&["ip", "-n", ns, "addr", "del", &cidr, "dev", &veth])?;
            run(&["ip", "-n", ns, "link", "set", &veth, "master", "vbr"])?;
            run(&["ip", "-n", ns, "link", "set", tap, "master", "vbr", "up"])?;
            run(&["ip", "-n", ns, "addr", "add", &cidr, "dev", "vbr"])?;
            run(&["ip", "-n", ns, "link", "set", "vbr", "up"])?;
        }
        Ok(())
    }

    /// A third host on the lab's segment for clients (`<tag>c`, address 10.233.`n`.3), with no
    /// fault rules: [`NetNs::enter`] makes its sockets. Deleted on drop (its veth with it).
    pub fn client(&self) -> Result<NetNs, String> {
        let name = format!("{}c", self.tag);
        let host_end = format!("{name}h");
        let _ = run(&["ip", "link", "del", &host_end]);
        let ns = NetNs::new(&name)?;
        let ip = format!(
            "{}.3/24",
            self.a_ip.rsplit_once('.').map_or("", |(net, _)| net)
        );
        run(&[
            "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ])?;
        run(&["ip", "link", "set", &host_end, "master", &self.bridge, "up"])?;
        ns.ip(&["addr", "add", &ip, "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(ns)
    }

    /// The lab's tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A TCP relay in the root namespace that delays every byte by a fixed time in each
/// direction (stands in for `tc netem delay` on kernels without it). Runs until the process
/// ends.
pub struct Relay {
    /// Where to connect instead of the target.
    pub addr: String,
}

impl Relay {
    /// Listens on `listen` (HOST:0) and forwards each connection to `target`, every chunk
    /// `delay` after it arrived.
    pub fn start(listen: &str, target: &str, delay: Duration) -> std::io::Result<Relay> {
        let l = TcpListener::bind(listen)?;
        let addr = l.local_addr()?.to_string();
        let target = target.to_string();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let Ok(up) = TcpStream::connect(&target) else {
                    continue;
                };
                let _ = conn.set_nodelay(true);
                let _ = up.set_nodelay(true);
                for (from, to) in [
                    (conn.try_clone(), up.try_clone()),
                    (up.try_clone(), conn.try_clone()),
                ] {
                    if let (Ok(from), Ok(to)) = (from, to) {
                        pump(from, to, delay);
                    }
                }
            }
        });
        Ok(Relay { addr })
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = crossbeam_channel::unbounded::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        // Dropping tx ends the writer after the queue drains.
    });
    std::thread::spawn(move || {
        for (due, data) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// What a pair did through a network fault.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FaultRun {
    /// The fault, for people.
    pub fault: String,
    /// Epoch interval.
    pub interval_ms: u64,
    /// Epochs the standby committed while the fault lasted.
    pub acks_during_fault: u64,
    /// The primary's lag (capture → ack) at the end of the fault, ms.
    pub lag_ms: f64,
    /// The standby took over (ms after the fault began).
    pub takeover_after_ms: Option<f64>,
    /// The old primary's exit code (3 = fenced).
    pub primary_exit: Option<i32>,
    /// Processes that ran the guest to its end (must be exactly 1).
    pub finished_primaries: u32,
    /// Generations in the sink's stream.
    pub generations: Vec<u64>,
    /// The sink's stream equals the reference (records), or why not.
    pub exact: Result<u64, String>,
    /// Batches the sink refused for a stale generation.
    pub stale_rejections: u64,
}

/// Runs a pair with the primary on host a and the standby on host b: waits for protection,
/// applies `fault` (and/or a `delay` relay on the replication stream from the start) for
/// `fault_for`, ends it, and lets the guest finish. `base` gives the binary, directory, guest
/// and interval; `want` is the reference stream.
pub fn run_fault(
    lab: &NetLab,
    base: &crate::pair::PairConfig,
    want: &[Vec<guest_abi::Record>],
    fault: Option<Fault>,
    delay: Option<Duration>,
    fault_for: Duration,
) -> Result<FaultRun, String> {
    use crate::pair::{check_exact, Hosts, Pair};
    let mut cfg = base.clone();
    cfg.hosts = Hosts {
        primary_prefix: lab.prefix(&lab.a),
        standby_prefix: lab.prefix(&lab.b),
        sink_listen: format!("{}:0", lab.root_ip),
        standby_listen: format!("{}:0", lab.b_ip),
        standby_args: base.hosts.standby_args.clone(),
        primary_args: base.hosts.primary_args.clone(),
        arbiter: base.hosts.arbiter.clone(),
        primary_arbiter: base.hosts.primary_arbiter.clone(),
    };
    let mut pair = Pair::start_standby(cfg).map_err(|e| format!("starting the pair: {e}"))?;
    let _relay = match delay {
        Some(d) => {
            let r = Relay::start(&format!("{}:0", lab.root_ip), &pair.standby_addr, d)
                .map_err(|e| format!("relay: {e}"))?;
            pair.start_primary_via(&r.addr)
                .map_err(|e| format!("starting the primary: {e}"))?;
            Some(r)
        }
        None => {
            pair.start_primary()
                .map_err(|e| format!("starting the primary: {e}"))?;
            None
        }
    };
    let dump = |pair: &Pair| {
        format!(
            "\n--- primary ---\n{}\n--- standby ---\n{}",
            pair.log("primary"),
            pair.log("standby")
        )
    };
    let st = pair
        .wait_protected(Duration::from_secs(60))
        .ok_or_else(|| format!("never protected{}", dump(&pair)))?;
    // Some output out before the fault, so the sink knows generation 1.
    let t1 = Instant::now();
    while pair.sink_report().accepted == 0 && t1.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let commits = |pair: &Pair| {
        pair.status("standby")
            .and_then(|s| s.ft.and_then(|ft| ft.committed_epoch))
    };
    let acks0 = commits(&pair).unwrap_or(0);
    let mut acks1 = acks0;
    let t0 = Instant::now();
    if let Some(f) = fault {
        lab.set(f)?;
    }
    let mut takeover = None;
    let mut last = st;
    while t0.elapsed() < fault_for {
        if takeover.is_none() && pair.wait_takeover(Duration::ZERO).is_some() {
            takeover = Some(t0.elapsed().as_secs_f64() * 1e3);
        }
        if takeover.is_none() {
            if let Some(c) = commits(&pair) {
                acks1 = c;
            }
        }
        if let Some(s) = pair.status("primary") {
            last = s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    lab.clear()?;
    let primary = pair.wait_primary(Duration::from_secs(300));
    let standby = pair.wait_standby(Duration::from_secs(300));
    if primary.is_none() || standby.is_none() {
        return Err(format!("the pair did not finish{}", dump(&pair)));
    }
    if takeover.is_none()
        && pair
            .result("standby")
            .is_some_and(|r| r.took_over == Some(true))
    {
        takeover = Some(f64::NAN);
    }
    let finished = |r: Option<EndReport>| r.is_some_and(|r| r.report.is_some());
    let finished_primaries = finished(pair.result("primary")) as u32
        + finished(pair.result("standby").filter(|r| r.took_over == Some(true))) as u32;
    let mut generations: Vec<u64> = pair
        .sink_stream()
        .iter()
        .flat_map(|v| v.iter().map(|(g, _)| *g))
        .collect();
    generations.sort_unstable();
    generations.dedup();
    let what = match (fault, delay) {
        (Some(Fault::Loss(p)), _) => format!("{:.0} % loss", p * 100.0),
        (Some(Fault::Partition), _) => format!("partition {:.1} s", fault_for.as_secs_f64()),
        (None, Some(d)) => format!("{} ms added delay each way", d.as_millis()),
        (None, None) => "none".into(),
    };
    Ok(FaultRun {
        fault: what,
        interval_ms: base.interval_ms,
        acks_during_fault: acks1.saturating_sub(acks0),
        lag_ms: last.ft.and_then(|ft| ft.lag_ms).unwrap_or(0.0),
        takeover_after_ms: takeover,
        primary_exit: primary.and_then(|s| s.code()),
        finished_primaries,
        generations,
        exact: check_exact(&pair, want),
        stale_rejections: pair.sink_report().stale_rejections,
    })
}
