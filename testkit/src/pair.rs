//! Runs a whole protected pair as processes on this machine: an output sink, a standby and a
//! primary, on loopback with a fresh key, and a file arbiter in the pair's directory (unless
//! [`Hosts::arbiter`] names another, such as etcd). Used by `cargo xtask run-pair`, the
//! benchmarks and the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use guest_abi::Record;

use ft::status::{EndReport, FtStatus, MigrationDone, Role};
use ft::unix_ms;
use sink::{parse_output, SinkReport};
use vmx::control::VmStatus;

/// A replicated VM's `status`: the control socket's answer with the replication status.
pub type Status = VmStatus<FtStatus>;

/// What to run.
#[derive(Clone, Debug)]
pub struct PairConfig {
    /// The `tandem` binary.
    pub bin: PathBuf,
    /// A directory for keys, sockets, logs and the sink's files.
    pub dir: PathBuf,
    /// Guest arguments for `tandem primary` (`--guest …`, `--vcpus …`, …).
    pub guest: Vec<String>,
    /// Epoch interval.
    pub interval_ms: u64,
    /// Extra environment of the primary (test hooks).
    pub primary_env: Vec<(String, String)>,
    /// RUST_LOG of the processes.
    pub log: String,
    /// Where the processes run: command prefixes for the primary and for standbys (e.g.
    /// `ip netns exec hostA`), and the addresses the sink and standbys listen on.
    pub hosts: Hosts,
}

/// Where a pair's processes run (all on loopback by default).
#[derive(Clone, Debug)]
pub struct Hosts {
    /// Command prefix of the primary.
    pub primary_prefix: Vec<String>,
    /// Command prefix of every standby.
    pub standby_prefix: Vec<String>,
    /// The sink's listen address (the sink runs here, without a prefix).
    pub sink_listen: String,
    /// A standby's listen address.
    pub standby_listen: String,
    /// Extra arguments of every standby (e.g. its own `--net tap=NAME`); `{node}` in them
    /// becomes the standby's node name (`standby`, `standby2`, …), e.g. for a disk replica
    /// of its own: `--disk DIR/{node}.disk`.
    pub standby_args: Vec<String>,
    /// Extra arguments of the first primary (e.g. `--metrics ADDR`).
    pub primary_args: Vec<String>,
    /// The `--arbiter` of the sink and of every standby (e.g. `etcd://HOST:PORT/PREFIX`);
    /// None: a file arbiter in the pair's directory.
    pub arbiter: Option<String>,
    /// The first primary's `--arbiter` when it differs from the others' (e.g. fewer etcd
    /// endpoints, to cut it off from etcd alone); None: the same.
    pub primary_arbiter: Option<String>,
}

impl Default for Hosts {
    fn default() -> Self {
        Hosts {
            primary_prefix: Vec::new(),
            standby_prefix: Vec::new(),
            sink_listen: "127.0.0.1:0".into(),
            standby_listen: "127.0.0.1:0".into(),
            standby_args: Vec::new(),
            primary_args: Vec::new(),
            arbiter: None,
            primary_arbiter: None,
        }
    }
}

/// What one kill + rejoin cycle took.
#[derive(Clone, Debug)]
pub struct Cycle {
    /// Kill → the standby's guest running.
    pub failover_ms: f64,
    /// New standby started → the survivor protected again (process start included).
    pub reprotect_ms: f64,
    /// The survivor's count: join → the standby's commit of the full sync.
    pub join_to_protected_ms: f64,
    /// The survivor's generation.
    pub generation: u64,
}

/// The three processes.
pub struct Pair {
    cfg: PairConfig,
    sink: Child,
    standby: Option<Child>,
    primary: Option<Child>,
    /// Processes no longer in a role that may still run (killed on drop).
    retired: Vec<Child>,
    /// The sink's address.
    pub sink_addr: String,
    /// The standby's address.
    pub standby_addr: String,
    /// The node (process) in each role: its files are `<name>.out`, `.log`, `.sock`.
    primary_name: String,
    standby_name: String,
    nodes: u32,
}

fn first_line(path: &Path, child: &mut Child, what: &str) -> std::io::Result<String> {
    let start = Instant::now();
    loop {
        if let Ok(t) = std::fs::read_to_string(path) {
            if let Some(l) = t.lines().next().filter(|_| t.contains('\n')) {
                return l
                    .strip_prefix("listening on ")
                    .map(str::to_string)
                    .ok_or_else(|| std::io::Error::other(format!("{what} said {l:?}")));
            }
        }
        if let Some(st) = child.try_wait()? {
            return Err(std::io::Error::other(format!("{what} exited early: {st}")));
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(std::io::Error::other(format!("{what} did not start")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Pair {
    fn file(&self, name: &str) -> PathBuf {
        self.cfg.dir.join(name)
    }

    fn command(cfg: &PairConfig, prefix: &[String]) -> Command {
        match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&cfg.bin);
                c
            }
            None => Command::new(&cfg.bin),
        }
    }

    fn spawn(
        cfg: &PairConfig,
        prefix: &[String],
        name: &str,
        args: &[String],
    ) -> std::io::Result<Child> {
        let out = std::fs::File::create(cfg.dir.join(format!("{name}.out")))?;
        let err = std::fs::File::create(cfg.dir.join(format!("{name}.log")))?;
        Self::command(cfg, prefix)
            .args(args)
            .env("RUST_LOG", &cfg.log)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
    }

    /// Starts the sink and the standby and waits until both listen.
    pub fn start_standby(cfg: PairConfig) -> std::io::Result<Pair> {
        let mut pair = Pair::start_sink(cfg)?;
        pair.new_standby()?;
        Ok(pair)
    }

    /// Starts the sink alone (no standby yet) and waits until it listens.
    pub fn start_sink(cfg: PairConfig) -> std::io::Result<Pair> {
        std::fs::create_dir_all(&cfg.dir)?;
        let key = cfg.dir.join("key");
        transport::Psk::generate()
            .write_file(&key)
            .map_err(std::io::Error::other)?;
        let sink_key = cfg.dir.join("sink.key");
        transport::Psk::generate()
            .write_file(&sink_key)
            .map_err(std::io::Error::other)?;
        let s = |p: PathBuf| p.display().to_string();
        let mut sink = Self::spawn(
            &cfg,
            &[],
            "sink",
            &[
                "sink".into(),
                "--listen".into(),
                cfg.hosts.sink_listen.clone(),
                "--out".into(),
                s(cfg.dir.join("sink.txt")),
                "--report".into(),
                s(cfg.dir.join("sink.json")),
                "--key-file".into(),
                s(sink_key.clone()),
                "--arbiter".into(),
                cfg.hosts
                    .arbiter
                    .clone()
                    .unwrap_or_else(|| s(cfg.dir.join("arbiter"))),
            ],
        )?;
        let sink_addr = first_line(&cfg.dir.join("sink.out"), &mut sink, "the sink")?;
        Ok(Pair {
            cfg,
            sink,
            standby: None,
            primary: None,
            retired: Vec::new(),
            sink_addr,
            standby_addr: String::new(),
            primary_name: "primary".into(),
            standby_name: "standby".into(),
            nodes: 1,
        })
    }

    /// The arguments primary and standby share: key, interval, sink, arbiter, control socket.
    fn role_args(&self, role: &str) -> Vec<String> {
        let s = |p: PathBuf| p.display().to_string();
        vec![
            "--key-file".into(),
            s(self.file("key")),
            "--interval-ms".into(),
            self.cfg.interval_ms.to_string(),
            "--sink".into(),
            self.sink_addr.clone(),
            "--sink-key-file".into(),
            s(self.file("sink.key")),
            "--arbiter".into(),
            self.cfg
                .hosts
                .arbiter
                .clone()
                .unwrap_or_else(|| s(self.file("arbiter"))),
            "--control".into(),
            s(self.file(&format!("{role}.sock"))),
        ]
    }

    /// The pair's directory: every node's `<name>.out`, `.log` and `.sock` are in it.
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// The node now in role `which` ("primary" or "standby"; anything else is a node name).
    pub fn node(&self, which: &str) -> String {
        match which {
            "primary" => self.primary_name.clone(),
            "standby" => self.standby_name.clone(),
            other => other.to_string(),
        }
    }

    /// Starts a standby on a fresh port to receive a migration, beside the one the primary
    /// may have (which stays reachable as `node(name)`, and is killed on drop); it becomes
    /// the pair's standby. Returns its address.
    pub fn new_receiver(&mut self) -> std::io::Result<String> {
        if let Some(old) = self.standby.take() {
            self.retired.push(old);
        }
        let name = self.next_name();
        let args = vec![
            "standby".into(),
            "--listen".into(),
            self.cfg.hosts.standby_listen.clone(),
        ];
        self.spawn_standby(&name, args)?;
        Ok(self.standby_addr.clone())
    }

    /// Waits for the process that was the standby before [`Pair::new_receiver`] to exit.
    pub fn wait_retired(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        let c = self.retired.last_mut()?;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `tandem ctl PRIMARY.sock migrate ADDR --max-downtime-ms MS` (the real command line):
    /// the answer when the VM moved, or the command's output when it failed.
    pub fn migrate(&self, addr: &str, max_downtime_ms: u64) -> Result<MigrationDone, String> {
        let sock = self.file(&format!("{}.sock", self.primary_name));
        let out = Command::new(&self.cfg.bin)
            .arg("ctl")
            .arg(&sock)
            .args(["migrate", addr, "--max-downtime-ms"])
            .arg(max_downtime_ms.to_string())
            .env("RUST_LOG", "warn")
            .output()
            .map_err(|e| format!("tandem ctl: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            return Err(format!(
                "tandem ctl migrate exited {}: {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_str(stdout.trim())
            .map_err(|e| format!("tandem ctl migrate printed {stdout:?}: {e}"))
    }

    /// After a migration: the receiver (the pair's standby) is the primary now. Waits for the
    /// old primary to exit and returns its exit status.
    pub fn promote_receiver(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let st = self.wait_primary(timeout)?;
        if let Some(old) = self.primary.take() {
            self.retired.push(old);
        }
        // Its files keep its name; the old primary's stay readable as `node(old)`.
        self.primary = self.standby.take();
        self.primary_name = self.standby_name.clone();
        Some(st)
    }

    fn spawn_standby(&mut self, name: &str, args: Vec<String>) -> std::io::Result<()> {
        let mut args = args;
        args.extend(self.role_args(name));
        args.extend(
            self.cfg
                .hosts
                .standby_args
                .iter()
                .map(|a| a.replace("{node}", name)),
        );
        let mut sb = Self::spawn(&self.cfg, &self.cfg.hosts.standby_prefix, name, &args)?;
        self.standby_addr = first_line(&self.file(&format!("{name}.out")), &mut sb, name)?;
        self.standby = Some(sb);
        self.standby_name = name.to_string();
        Ok(())
    }

    fn next_name(&mut self) -> String {
        self.nodes += 1;
        format!("standby{}", self.nodes)
    }

    /// Starts a (new) standby that waits for the primary on a fresh port.
    pub fn new_standby(&mut self) -> std::io::Result<()> {
        let name = if self.nodes == 1 && self.standby.is_none() {
            "standby".to_string()
        } else {
            self.next_name()
        };
        let args = vec![
            "standby".into(),
            "--listen".into(),
            self.cfg.hosts.standby_listen.clone(),
        ];
        self.spawn_standby(&name, args)
    }

    /// Starts a new standby on the address of the (dead) standby, where the primary redials.
    pub fn restart_standby(&mut self) -> std::io::Result<()> {
        let name = self.next_name();
        let args = vec![
            "standby".into(),
            "--listen".into(),
            self.standby_addr.clone(),
        ];
        self.spawn_standby(&name, args)
    }

    /// After a takeover: the standby that took over becomes the primary, and a fresh standby
    /// joins it (`--join` its address; it listens on a new port for its own joiners later).
    /// Returns when the new standby runs (not yet when it protects).
    pub fn rejoin(&mut self) -> std::io::Result<()> {
        if let Some(mut old) = self.primary.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        self.primary = self.standby.take();
        self.primary_name = self.standby_name.clone();
        let survivor = self.standby_addr.clone();
        let name = self.next_name();
        let args = vec![
            "standby".into(),
            "--join".into(),
            survivor,
            "--listen".into(),
            self.cfg.hosts.standby_listen.clone(),
        ];
        self.spawn_standby(&name, args)
    }

    /// Waits until the primary's `status` says it is protected (no sync under way).
    pub fn wait_protected(&self, timeout: Duration) -> Option<Status> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.status("primary") {
                // Protected: a link, no sync under way, and a first acknowledgement.
                if st.ft.as_ref().is_some_and(|ft| {
                    ft.protected == Some(true) && ft.sync.is_none() && ft.last_ack > Some(0)
                }) {
                    return Some(st);
                }
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the primary (it connects to the standby and syncs it by pre-copy while its
    /// guest runs).
    pub fn start_primary(&mut self) -> std::io::Result<()> {
        let peer = self.standby_addr.clone();
        self.start_primary_via(&peer)
    }

    /// Starts the primary with `peer` as the standby's address (e.g. a relay in front of it).
    pub fn start_primary_via(&mut self, peer: &str) -> std::io::Result<()> {
        self.spawn_primary(Some(peer))
    }

    /// Starts the primary without a standby: it runs unprotected (its output released at
    /// once) until something joins it or it migrates.
    pub fn start_primary_alone(&mut self) -> std::io::Result<()> {
        self.spawn_primary(None)
    }

    fn spawn_primary(&mut self, peer: Option<&str>) -> std::io::Result<()> {
        let mut args: Vec<String> = vec!["primary".into()];
        if let Some(peer) = peer {
            args.extend(["--peer".into(), peer.to_string()]);
        }
        let name = self.primary_name.clone();
        args.extend(self.role_args(&name));
        if let Some(a) = &self.cfg.hosts.primary_arbiter {
            let at = args
                .iter()
                .position(|x| x == "--arbiter")
                .expect("role args")
                + 1;
            args[at] = a.clone();
        }
        args.push("--json".into());
        args.extend(self.cfg.hosts.primary_args.iter().cloned());
        args.extend(self.cfg.guest.iter().cloned());
        let mut cmd = Self::command(&self.cfg, &self.cfg.hosts.primary_prefix);
        cmd.args(&args)
            .env("RUST_LOG", &self.cfg.log)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.file("primary.out"))?)
            .stderr(std::fs::File::create(self.file("primary.log"))?);
        for (k, v) in &self.cfg.primary_env {
            cmd.env(k, v);
        }
        self.primary = Some(cmd.spawn()?);
        Ok(())
    }

    /// The node name of the process that is primary now (`primary`, or the standby that took
    /// over last).
    pub fn primary_node(&self) -> &str {
        &self.primary_name
    }

    /// Waits until the standby has taken over (its `status` says it is the primary).
    pub fn wait_takeover(&self, timeout: Duration) -> Option<Status> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.status("standby") {
                if st.ft.as_ref().is_some_and(|ft| ft.role == Role::Primary) {
                    return Some(st);
                }
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// One cycle of the soak: SIGKILL the (protected) primary, wait for the standby's
    /// takeover, start a fresh standby that joins the survivor, and wait until it protects.
    pub fn kill_and_rejoin(&mut self, timeout: Duration) -> Result<Cycle, String> {
        let killed = self.kill_primary();
        let st = self
            .wait_takeover(timeout)
            .ok_or("the standby did not take over")?;
        let ft = st.ft.as_ref();
        let resumed = ft
            .and_then(FtStatus::failover)
            .map(|f| f.resumed_unix_ms)
            .ok_or("no failover report in the survivor's status")?;
        let generation = ft.and_then(|ft| ft.generation).unwrap_or(0);
        let started = Instant::now();
        self.rejoin()
            .map_err(|e| format!("starting a new standby: {e}"))?;
        let st = self
            .wait_protected(timeout)
            .ok_or("the new standby never protected the survivor")?;
        Ok(Cycle {
            failover_ms: resumed - killed,
            reprotect_ms: started.elapsed().as_secs_f64() * 1e3,
            join_to_protected_ms: st
                .ft
                .and_then(|ft| ft.last_sync)
                .map_or(f64::NAN, |s| s.joined_to_protected_ms),
            generation,
        })
    }

    /// Whether the primary (after [`Pair::rejoin`], the survivor) exited successfully with a
    /// report of the guest's run: the guest finished.
    pub fn survivor_finished_its_guest(&mut self) -> bool {
        Self::wait(&mut self.primary, Duration::from_secs(5)).is_some_and(|s| s.success())
            && self.result("primary").is_some_and(|r| r.report.is_some())
    }

    /// SIGKILLs the primary; returns when (Unix ms).
    pub fn kill_primary(&mut self) -> f64 {
        let at = unix_ms();
        if let Some(p) = &mut self.primary {
            let _ = p.kill();
            let _ = p.wait();
        }
        at
    }

    /// Sends `sig` (e.g. "STOP", "CONT") to the primary.
    pub fn signal_primary(&self, sig: &str) {
        if let Some(p) = &self.primary {
            let _ = Command::new("kill")
                .args([format!("-{sig}"), p.id().to_string()])
                .status();
        }
    }

    /// SIGKILLs the standby.
    pub fn kill_standby(&mut self) {
        if let Some(p) = &mut self.standby {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    fn wait(child: &mut Option<Child>, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        let c = child.as_mut()?;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the primary still runs.
    pub fn primary_running(&mut self) -> bool {
        self.primary
            .as_mut()
            .is_some_and(|p| matches!(p.try_wait(), Ok(None)))
    }

    /// Waits for the primary to exit.
    pub fn wait_primary(&mut self, timeout: Duration) -> Option<ExitStatus> {
        Self::wait(&mut self.primary, timeout)
    }

    /// Waits for the standby to exit.
    pub fn wait_standby(&mut self, timeout: Duration) -> Option<ExitStatus> {
        Self::wait(&mut self.standby, timeout)
    }

    /// What a process printed at its end (`primary` or `standby`).
    pub fn result(&self, which: &str) -> Option<EndReport> {
        let t = std::fs::read_to_string(self.file(&format!("{}.out", self.node(which)))).ok()?;
        let start = t.find('{')?;
        serde_json::from_str(&t[start..]).ok()
    }

    /// A process's log (`primary`, `standby`, `sink`).
    pub fn log(&self, which: &str) -> String {
        std::fs::read_to_string(self.file(&format!("{}.log", self.node(which)))).unwrap_or_default()
    }

    /// `status` from a process's control socket (`primary` or `standby`).
    pub fn status(&self, which: &str) -> Option<Status> {
        vmx::control::request_as(
            &self.file(&format!("{}.sock", self.node(which))),
            &vmx::control::Request::Status,
            Duration::from_millis(500),
        )
        .ok()
    }

    /// `resume` on a process's control socket (a node started `--paused`, or paused).
    pub fn resume(&self, which: &str) -> Result<(), String> {
        vmx::control::request_as::<vmx::control::Answer>(
            &self.file(&format!("{}.sock", self.node(which))),
            &vmx::control::Request::Resume,
            Duration::from_secs(5),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// The sink's counters.
    pub fn sink_report(&self) -> SinkReport {
        std::fs::read_to_string(self.file("sink.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// What the sink accepted: per vCPU, (generation, record) in arrival order.
    pub fn sink_stream(&self) -> Vec<Vec<(u64, Record)>> {
        let text = std::fs::read_to_string(self.file("sink.txt")).unwrap_or_default();
        let mut out: Vec<Vec<(u64, Record)>> = Vec::new();
        for (g, v, r) in parse_output(&text) {
            if out.len() <= v as usize {
                out.resize(v as usize + 1, Vec::new());
            }
            out[v as usize].push((g, r));
        }
        out
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for c in [
            self.primary.as_mut(),
            self.standby.as_mut(),
            Some(&mut self.sink),
        ]
        .into_iter()
        .flatten()
        .chain(self.retired.iter_mut())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What a soak did.
#[derive(Clone, Debug, Default)]
pub struct SoakReport {
    /// Every kill + rejoin cycle, in order.
    pub cycles: Vec<Cycle>,
    /// Pairs started (a new one whenever the guest finished).
    pub pairs: u32,
    /// Records the sink accepted over all pairs, each stream checked exact.
    pub records: u64,
    /// Generations the last pair reached.
    pub generations: u64,
}

/// Checks a pair's sink stream against `want`: same records per vCPU, no gap, no duplicate,
/// and generations never going back (waiting up to 15 s for a sink still writing out the
/// last records). Returns the number of records.
pub fn check_exact(pair: &Pair, want: &[Vec<Record>]) -> Result<u64, String> {
    // A releaser sends its last records and exits without waiting for the sink, whose kernel
    // still holds them: on a loaded host the sink can write them out after the releaser has
    // gone. Give it time to catch up (a stream that is really short fails after the wait).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = pair.sink_stream();
        let short = want
            .iter()
            .enumerate()
            .any(|(v, w)| got.get(v).map_or(0, |g| g.len()) < w.len());
        if !short || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = pair.sink_report();
    if report.gaps != 0 || report.duplicates != 0 {
        return Err(format!("the sink saw gaps or duplicates: {report:?}"));
    }
    let got = pair.sink_stream();
    if got.len() != want.len() {
        return Err(format!(
            "streams of {} vCPUs, want {}",
            got.len(),
            want.len()
        ));
    }
    for (v, (g, w)) in got.iter().zip(want).enumerate() {
        if g.len() != w.len() {
            return Err(format!(
                "vCPU {v}: {} records, the uninterrupted run {}",
                g.len(),
                w.len()
            ));
        }
        if let Some(i) = g.iter().zip(w).position(|((_, a), b)| a != b) {
            return Err(format!("vCPU {v}: record {i} differs"));
        }
        if g.windows(2).any(|p| p[1].0 < p[0].0) {
            return Err(format!("vCPU {v}: the generation went back"));
        }
    }
    Ok(got.iter().map(|g| g.len() as u64).sum())
}

/// SIGKILLs the primary at random moments (after it is protected) `cycles` times; after every
/// kill the standby takes over and a fresh standby joins it. Each cycle must end protected.
/// When the guest finishes, its pair's sink stream must equal `want`, and a new pair (in a
/// subdirectory of `cfg.dir`) carries on until all cycles are done. `progress` hears of each
/// cycle.
pub fn soak(
    cfg: &PairConfig,
    want: &[Vec<Record>],
    cycles: u32,
    mut progress: impl FnMut(u32, &Cycle),
) -> Result<SoakReport, String> {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let mut rep = SoakReport::default();
    let patience = Duration::from_secs(30);
    while (rep.cycles.len() as u32) < cycles {
        rep.pairs += 1;
        let mut c = cfg.clone();
        c.dir = cfg.dir.join(format!("pair{}", rep.pairs));
        let mut pair = Pair::start_standby(c).map_err(|e| format!("starting a pair: {e}"))?;
        pair.start_primary()
            .map_err(|e| format!("starting the primary: {e}"))?;
        pair.wait_protected(patience)
            .ok_or("the first primary was never protected")?;
        let mut in_pair = 0;
        while (rep.cycles.len() as u32) < cycles {
            std::thread::sleep(Duration::from_millis(rng.gen_range(50..700)));
            if !pair.primary_running() {
                break;
            }
            // Kill only a protected primary (each cycle starts where the last one ended).
            if pair.wait_protected(patience).is_none() {
                if !pair.primary_running() {
                    break;
                }
                return Err(format!(
                    "cycle {}: the primary is not protected",
                    rep.cycles.len() + 1
                ));
            }
            match pair.kill_and_rejoin(patience) {
                Ok(cy) => {
                    progress(rep.cycles.len() as u32 + 1, &cy);
                    rep.generations = cy.generation;
                    rep.cycles.push(cy);
                    in_pair += 1;
                }
                // The guest may have finished just before the kill: then nobody takes over.
                Err(_)
                    if pair
                        .result("standby")
                        .is_some_and(|r| r.took_over == Some(false)) =>
                {
                    break
                }
                // Or while the new standby was pre-copying: the survivor ended the guest's run
                // (its report says how) and exited cleanly, so there was nothing to protect.
                // The pair's stream is still checked below.
                Err(_) if pair.survivor_finished_its_guest() => break,
                Err(e) => {
                    return Err(format!(
                        "cycle {} (pair {}): {e}\n--- primary ---\n{}\n--- standby ---\n{}",
                        rep.cycles.len() + 1,
                        rep.pairs,
                        pair.log("primary"),
                        pair.log("standby")
                    ))
                }
            }
        }
        pair.wait_primary(Duration::from_secs(600))
            .ok_or("the guest did not finish")?;
        pair.wait_standby(Duration::from_secs(60))
            .ok_or("the last standby did not finish")?;
        rep.records += check_exact(&pair, want)
            .map_err(|e| format!("pair {} after {in_pair} cycles: {e}", rep.pairs))?;
        let _ = std::fs::remove_dir_all(cfg.dir.join(format!("pair{}", rep.pairs)));
    }
    Ok(rep)
}
