//! Runs a whole protected pair as processes on this machine: an output sink, a standby and a
//! primary, on loopback with a fresh key. Used by `cargo xtask run-pair`, the benchmarks and
//! the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use devices::Record;
use serde_json::Value;

use super::sink::{parse_line, SinkReport};
use super::unix_ms;

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
}

/// The three processes.
pub struct Pair {
    cfg: PairConfig,
    sink: Child,
    standby: Option<Child>,
    primary: Option<Child>,
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

    fn spawn(cfg: &PairConfig, name: &str, args: &[String]) -> std::io::Result<Child> {
        let out = std::fs::File::create(cfg.dir.join(format!("{name}.out")))?;
        let err = std::fs::File::create(cfg.dir.join(format!("{name}.log")))?;
        Command::new(&cfg.bin)
            .args(args)
            .env("RUST_LOG", &cfg.log)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
    }

    /// Starts the sink and the standby and waits until both listen.
    pub fn start_standby(cfg: PairConfig) -> std::io::Result<Pair> {
        std::fs::create_dir_all(&cfg.dir)?;
        let key = cfg.dir.join("key");
        transport::Psk::generate()
            .write_file(&key)
            .map_err(std::io::Error::other)?;
        let s = |p: PathBuf| p.display().to_string();
        let mut sink = Self::spawn(
            &cfg,
            "sink",
            &[
                "sink".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--out".into(),
                s(cfg.dir.join("sink.txt")),
                "--report".into(),
                s(cfg.dir.join("sink.json")),
            ],
        )?;
        let sink_addr = first_line(&cfg.dir.join("sink.out"), &mut sink, "the sink")?;
        let mut pair = Pair {
            cfg,
            sink,
            standby: None,
            primary: None,
            sink_addr,
            standby_addr: String::new(),
            primary_name: "primary".into(),
            standby_name: "standby".into(),
            nodes: 1,
        };
        pair.new_standby()?;
        Ok(pair)
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
            "--arbiter".into(),
            s(self.file("arbiter")),
            "--control".into(),
            s(self.file(&format!("{role}.sock"))),
        ]
    }

    /// The node now in role `which` ("primary" or "standby"; anything else is a node name).
    pub fn node(&self, which: &str) -> String {
        match which {
            "primary" => self.primary_name.clone(),
            "standby" => self.standby_name.clone(),
            other => other.to_string(),
        }
    }

    fn spawn_standby(&mut self, name: &str, args: Vec<String>) -> std::io::Result<()> {
        let mut args = args;
        args.extend(self.role_args(name));
        let mut sb = Self::spawn(&self.cfg, name, &args)?;
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
        let args = vec!["standby".into(), "--listen".into(), "127.0.0.1:0".into()];
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
            "127.0.0.1:0".into(),
        ];
        self.spawn_standby(&name, args)
    }

    /// Waits until the primary's `status` says it is protected (no sync under way).
    pub fn wait_protected(&self, timeout: Duration) -> Option<Value> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(st) = self.status("primary") {
                if st["ft"]["protected"] == true && st["ft"]["sync"].is_null() {
                    return Some(st);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Starts the primary (it connects to the standby and begins with a full sync).
    pub fn start_primary(&mut self) -> std::io::Result<()> {
        let mut args: Vec<String> =
            vec!["primary".into(), "--peer".into(), self.standby_addr.clone()];
        let name = self.primary_name.clone();
        args.extend(self.role_args(&name));
        args.push("--json".into());
        args.extend(self.cfg.guest.iter().cloned());
        let mut cmd = Command::new(&self.cfg.bin);
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

    /// The JSON a process printed at its end (`primary` or `standby`).
    pub fn result(&self, which: &str) -> Option<Value> {
        let t = std::fs::read_to_string(self.file(&format!("{}.out", self.node(which)))).ok()?;
        let start = t.find('{')?;
        serde_json::from_str(&t[start..]).ok()
    }

    /// A process's log (`primary`, `standby`, `sink`).
    pub fn log(&self, which: &str) -> String {
        std::fs::read_to_string(self.file(&format!("{}.log", self.node(which)))).unwrap_or_default()
    }

    /// `status` from a process's control socket (`primary` or `standby`).
    pub fn status(&self, which: &str) -> Option<Value> {
        crate::control::request(
            &self.file(&format!("{}.sock", self.node(which))),
            &crate::control::Request::Status,
            Duration::from_millis(500),
        )
        .ok()
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
        for (g, v, r) in text.lines().filter_map(parse_line) {
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
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
