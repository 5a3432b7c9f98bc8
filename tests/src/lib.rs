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
            "-p",
            "tandem",
            "--bin",
            "tandem",
            "--features",
            "fault-injection",
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
