//! Helpers for Tandem's end-to-end tests: the `tandem` binary, and a harness that runs a
//! workload VM through the monitor library while a thread drains its output.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver};
use devices::{DigestReport, DigestSink, OutputDevice};
use monitor::{ModuleTable, UserRpc, Vm, VmConfig};
use workloads::Workload;

/// Panics with a clear message when /dev/kvm cannot be used: these tests need KVM.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests need /dev/kvm (read/write): {e}");
    }
}

/// Path to the `tandem` binary of this build profile, building it first if needed.
///
/// It is built as part of the same build as these tests (`--workspace --tests`, which turns
/// on the same features, `ft/fault-injection` among them through this crate's
/// dev-dependency), so after `cargo test --workspace` only the binary itself is linked; a
/// narrower `cargo build -p tandem` would resolve other features and recompile a dozen
/// crates first.
pub fn tandem_bin() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(|d| d.parent())
            .expect("target/<profile>");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--workspace",
            "--tests",
            "--bin",
            "tandem",
        ]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build of tandem failed");
        profile_dir.join("tandem")
    })
}

/// Runs `tandem` with `args`.
pub fn tandem(args: &[&str]) -> Output {
    Command::new(tandem_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tandem")
}

/// Runs `tandem` with `args` and fails the test, showing stderr, unless it succeeds.
pub fn tandem_ok(args: &[&str]) -> Output {
    let out = tandem(args);
    assert!(
        out.status.success(),
        "tandem {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `total: ... digest X` value of a `tandem run` report.
pub fn total_digest(stdout: &[u8]) -> String {
    let text = String::from_utf8_lossy(stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("total: ")
                .and_then(|r| r.split("digest ").nth(1))
        })
        .unwrap_or_else(|| panic!("no total digest in output:\n{text}"))
        .trim()
        .to_string()
}

/// Parses guest arguments.
pub fn workload(name: &str, args: &[(&str, &str)]) -> Workload {
    let a: Vec<_> = args
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Workload::parse(name, &a).expect("workload parameters")
}

/// A workload VM driven through the monitor library, with a thread that drains output.
pub struct Harness {
    /// The VM.
    pub vm: Arc<Vm>,
    /// The channel the VM reports on (for a `Monitor`).
    pub rpc: crossbeam_channel::Sender<UserRpc>,
    drainer: Option<JoinHandle<Result<DigestReport, String>>>,
}

impl Harness {
    /// Builds the VM with `extra` monitor modules after MainMem and CPU, loads `w`, and starts
    /// the drain thread. The vCPUs are not started.
    pub fn new(w: &Workload, vcpus: u32, mem_mib: u64) -> Harness {
        require_kvm();
        let (tx, rx) = unbounded();
        let vm = Arc::new(
            Vm::new(
                &VmConfig::new(mem_mib, vcpus),
                ModuleTable::standard(vec![]),
                tx.clone(),
            )
            .expect("create VM"),
        );
        w.check_fits(vm.layout()).expect("workload fits");
        let at = monitor::layout::LOAD_ADDR;
        vm.load_image(at, &w.code(at).expect("assemble"))
            .expect("load");
        let rings = (0..vcpus).map(|v| vm.layout().ring(v)).collect();
        let dev = OutputDevice::new(vm.memory().clone(), rings);
        let drainer = std::thread::spawn(move || drain(dev, rx, vcpus));
        Harness {
            vm,
            rpc: tx,
            drainer: Some(drainer),
        }
    }

    /// Waits for every vCPU to finish and returns the digest of the output.
    pub fn finish(mut self) -> DigestReport {
        let r = self
            .drainer
            .take()
            .expect("drainer")
            .join()
            .expect("drain thread");
        r.unwrap_or_else(|e| panic!("{e}"))
    }
}

fn drain(
    mut dev: OutputDevice<monitor::GuestMem>,
    rx: Receiver<UserRpc>,
    vcpus: u32,
) -> Result<DigestReport, String> {
    let mut sink = DigestSink::new(vcpus);
    let mut done = 0;
    while done < vcpus {
        match rx.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(UserRpc::OutputDoorbell { vcpu }) => {
                dev.drain(vcpu, &mut sink).map_err(|e| e.to_string())?;
            }
            Ok(UserRpc::VcpuDone { vcpu }) => {
                dev.drain(vcpu, &mut sink).map_err(|e| e.to_string())?;
                done += 1;
            }
            Ok(UserRpc::VcpuError { vcpu, error }) => return Err(format!("vCPU {vcpu}: {error}")),
            Ok(UserRpc::PortWrite { .. }) | Ok(UserRpc::StepDone { .. }) => {}
            Err(e) => return Err(format!("guest did not finish: {e}")),
        }
    }
    Ok(sink.report())
}

/// TAP interfaces for the tests that put a guest on a network (root only).
pub mod tap {
    use std::path::Path;
    use std::process::Command;

    /// Runs `ip ARGS`; the error says what failed.
    pub fn ip(args: &[&str]) -> Result<(), String> {
        let o = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if o.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {args:?}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
    }

    /// Why TAP tests cannot run here, if they cannot.
    pub fn unavailable() -> Option<String> {
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|u| u.split_whitespace().nth(1).map(|u| u == "0"))
            })
            .unwrap_or(false);
        if !root {
            return Some("not root (creating a TAP needs CAP_NET_ADMIN)".into());
        }
        if !Path::new("/dev/net/tun").exists() {
            return Some("no /dev/net/tun".into());
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Some("no `ip` command (iproute2)".into());
        }
        None
    }

    /// A persistent TAP with an address on this host, deleted on drop.
    pub struct Tap {
        /// Its name.
        pub name: String,
    }

    impl Tap {
        /// Creates `name` (replacing a leftover of that name) with `host_cidr` on it, up.
        pub fn new(name: &str, host_cidr: &str) -> Result<Tap, String> {
            let _ = ip(&["link", "del", name]);
            ip(&["tuntap", "add", "name", name, "mode", "tap"])?;
            let tap = Tap {
                name: name.to_string(),
            };
            ip(&["addr", "add", host_cidr, "dev", name])?;
            ip(&["link", "set", name, "up"])?;
            Ok(tap)
        }
    }

    impl Drop for Tap {
        fn drop(&mut self) {
            let _ = ip(&["link", "del", &self.name]);
        }
    }
}

/// A real etcd cluster on loopback for the etcd arbiter's tests (Debian's `etcd-server`).
pub mod etcd {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::Value;

    /// Why the etcd tests cannot run here, if they cannot.
    pub fn unavailable() -> Option<String> {
        match Command::new("etcd").arg("--version").output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "`etcd --version` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Some(format!(
                "no etcd ({e}): install Debian's etcd-server (etcd 3.4 or later)"
            )),
        }
    }

    /// One member.
    pub struct Member {
        /// Its name (`m0`, `m1`, …).
        pub name: String,
        /// Its client endpoint, `127.0.0.1:PORT`.
        pub client: String,
        /// Its peer endpoint.
        pub peer: String,
        child: Option<Child>,
    }

    /// A cluster of members on loopback ports, each with a data directory of its own; every
    /// member is killed and the directories removed on drop.
    pub struct Cluster {
        /// The members, in the order of `--initial-cluster`.
        pub members: Vec<Member>,
        dir: PathBuf,
    }

    /// Free loopback ports (bound and let go: another process could take one meanwhile, which
    /// a member then reports by exiting).
    fn free_ports(n: usize) -> Vec<u16> {
        let ls: Vec<_> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
            .collect();
        ls.iter()
            .map(|l| l.local_addr().expect("local address").port())
            .collect()
    }

    impl Cluster {
        /// Starts `n` members (heartbeat 50 ms, election timeout 500 ms) and waits until the
        /// cluster has a leader and every member answers a linearizable read.
        pub fn start(tag: &str, n: usize) -> Result<Cluster, String> {
            let dir =
                std::env::temp_dir().join(format!("tandem-etcd-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let ports = free_ports(2 * n);
            let mut members: Vec<Member> = (0..n)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client: format!("127.0.0.1:{}", ports[2 * i]),
                    peer: format!("127.0.0.1:{}", ports[2 * i + 1]),
                    child: None,
                })
                .collect();
            let initial = members
                .iter()
                .map(|m| format!("{}=http://{}", m.name, m.peer))
                .collect::<Vec<_>>()
                .join(",");
            let token = format!("tandem-{}-{tag}", std::process::id());
            for m in &mut members {
                let log = std::fs::File::create(dir.join(format!("{}.log", m.name)))
                    .map_err(|e| format!("etcd log: {e}"))?;
                let child = Command::new("etcd")
                    .args(["--name", &m.name])
                    .arg("--data-dir")
                    .arg(dir.join(&m.name))
                    .args(["--listen-client-urls", &format!("http://{}", m.client)])
                    .args(["--advertise-client-urls", &format!("http://{}", m.client)])
                    .args(["--listen-peer-urls", &format!("http://{}", m.peer)])
                    .args([
                        "--initial-advertise-peer-urls",
                        &format!("http://{}", m.peer),
                    ])
                    .args(["--initial-cluster", &initial])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--initial-cluster-token", &token])
                    .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                    .args(["--logger", "zap", "--log-level", "warn"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .map_err(|e| format!("cannot start etcd: {e}"))?;
                m.child = Some(child);
            }
            let mut c = Cluster { members, dir };
            let t0 = Instant::now();
            for i in 0..n {
                loop {
                    let ready = c.post(i, "/v3/kv/range", r#"{"key":"AA=="}"#).is_ok();
                    if ready {
                        break;
                    }
                    if let Some(st) = c.members[i]
                        .child
                        .as_mut()
                        .and_then(|ch| ch.try_wait().ok().flatten())
                    {
                        return Err(format!(
                            "etcd {} exited: {st}\n{}",
                            c.members[i].name,
                            c.log(i)
                        ));
                    }
                    if t0.elapsed() > Duration::from_secs(30) {
                        return Err(format!(
                            "etcd {} never served reads\n{}",
                            c.members[i].name,
                            c.log(i)
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Ok(c)
        }

        /// Member `i`'s log.
        pub fn log(&self, i: usize) -> String {
            std::fs::read_to_string(self.dir.join(format!("{}.log", self.members[i].name)))
                .unwrap_or_default()
        }

        /// `--arbiter` for the members `which` (in that order), key prefix `prefix`, lease
        /// TTL `ttl` seconds.
        pub fn url(&self, which: &[usize], prefix: &str, ttl: u64) -> String {
            let eps: Vec<_> = which
                .iter()
                .map(|&i| self.members[i].client.as_str())
                .collect();
            format!(
                "etcd://{}/{}?ttl={ttl}",
                eps.join(","),
                prefix.trim_start_matches('/')
            )
        }

        /// `url` with every member, in order.
        pub fn url_all(&self, prefix: &str, ttl: u64) -> String {
            let all: Vec<_> = (0..self.members.len()).collect();
            self.url(&all, prefix, ttl)
        }

        /// SIGKILLs member `i`.
        pub fn kill(&mut self, i: usize) {
            if let Some(mut c) = self.members[i].child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        /// Sends `sig` ("STOP", "CONT") to member `i`.
        pub fn signal(&self, i: usize, sig: &str) {
            if let Some(c) = &self.members[i].child {
                let _ = Command::new("kill")
                    .args([format!("-{sig}"), c.id().to_string()])
                    .status();
            }
        }

        /// The leader's index, as the first member that answers says.
        pub fn leader(&self) -> Option<usize> {
            let ids: Vec<Option<String>> = (0..self.members.len())
                .map(|i| {
                    let v = self.post(i, "/v3/maintenance/status", "{}").ok()?;
                    Some(v["header"]["member_id"].as_str()?.to_string())
                })
                .collect();
            let leader = (0..self.members.len()).find_map(|i| {
                let v = self.post(i, "/v3/maintenance/status", "{}").ok()?;
                Some(v["leader"].as_str()?.to_string())
            })?;
            ids.iter()
                .position(|id| id.as_deref() == Some(leader.as_str()))
        }

        /// POSTs `body` to member `i`'s JSON gateway; the reply as JSON (HTTP/1.0, 2 s).
        pub fn post(&self, i: usize, path: &str, body: &str) -> Result<Value, String> {
            let addr = &self.members[i].client;
            let sa = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
            let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(2))
                .map_err(|e| format!("{addr}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            write!(
                s,
                "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .map_err(|e| format!("{addr}: {e}"))?;
            let mut reply = Vec::new();
            s.take(1 << 20)
                .read_to_end(&mut reply)
                .map_err(|e| format!("{addr}: {e}"))?;
            let text = String::from_utf8_lossy(&reply);
            let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP reply")?;
            if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
                return Err(format!("{addr}: {}", head.lines().next().unwrap_or("")));
            }
            serde_json::from_str(body).map_err(|e| format!("{addr}: {e}: {body}"))
        }
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            for i in 0..self.members.len() {
                self.kill(i);
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
