//! `cargo xtask`: Tandem's developer commands.
//!
//! * `cargo xtask bench stun`  — stun/unstun latency for 1, 2 and 4 vCPUs
//! * `cargo xtask bench guest` — `counter` in a 1-vCPU guest against the same loop on the host
//! * `cargo xtask bench ft`    — the fault-tolerant pair: slowdown, pauses, failover
//! * `cargo xtask bench io`    — virtio-blk and virtio-net against the host doing the same I/O
//! * `cargo xtask bench first-sync` — what a 1 GiB guest sees when protection starts
//! * `cargo xtask bench migrate` — planned migration: downtime and total time per hot set
//! * `cargo xtask bench`       — all of them
//! * `cargo xtask run-pair`    — a protected pair with a live status line and a verdict
//! * `cargo xtask modgraph`    — every crate's module import graph; fails on a cycle
//!
//! Every bench prints its table and appends it, with the command, to BENCHMARKS.md.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use monitor::{ModuleTable, Vm, VmConfig};

mod bench_io;
mod bench_kv;
mod bench_migrate;
mod bench_stall;
mod bench_tracking;
mod floor;
mod fuzz;
mod modgraph;
mod pair;
mod pair_kv;
mod transport_bench;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Tandem's developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every cargo-fuzz target for N seconds (needs a nightly toolchain and cargo-fuzz;
    /// says so and succeeds when they are missing). Seeds the corpora from real encoders.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Run a protected pair on this machine: an output sink, a standby and a primary on
    /// loopback with a fresh key, a live status line, and a summary with the sink's verdict.
    RunPair(pair::RunPairArgs),
    /// SIGKILL the primary at random moments, again and again, with a fresh standby joining
    /// the survivor after every kill; every cycle must end protected and every stream exact.
    Soak {
        /// Kill + rejoin cycles.
        #[arg(long, default_value_t = 50)]
        cycles: u32,
        /// Guest iterations per pair (a new pair starts when a guest finishes).
        #[arg(long, default_value = "30M")]
        iters: String,
    },
    /// Print every crate's module import graph; fail when a crate's modules import each other
    /// in a cycle.
    Modgraph,
    /// Measure, print, and append the results to BENCHMARKS.md.
    Bench {
        /// Which benchmark (all when left out).
        which: Option<Bench>,
        /// Stuns per vCPU count.
        #[arg(long, default_value_t = 2000)]
        stuns: usize,
        /// Do not write BENCHMARKS.md.
        #[arg(long)]
        no_record: bool,
        /// `stall`: the hot sets to run, MiB (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [1u64, 16])]
        hot_mib: Vec<u64>,
        /// `stall`: the epoch rates to run, Hz (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [10u64, 20, 40])]
        hz: Vec<u64>,
        /// `stall`: the vCPU policy of every run (`tandem run --vcpu-sched`; tandem's default
        /// when left out).
        #[arg(long, value_name = "POLICY")]
        vcpu_sched: Option<String>,
        /// `stall`: rounds of every row (each round an unprotected run, then the protected
        /// ones); rows show the median and the range over rounds.
        #[arg(long, default_value_t = 1)]
        reps: usize,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Bench {
    /// Stun and unstun latency.
    Stun,
    /// Guest vs native throughput of the counter loop.
    Guest,
    /// Snapshot save throughput and restore-to-running latency.
    Snapshot,
    /// Page codecs and the sealed link over loopback TCP.
    Transport,
    /// The fault-tolerant pair: guest slowdown, epoch pauses, failover time; then what a
    /// protected guest sees (the `stall` table: 1 and 16 MiB hot sets at 10, 20, 40 Hz).
    Ft,
    /// Re-protection of a running 256 MiB and 1 GiB guest by a new standby.
    Reprotect,
    /// Network faults and partitions between two netns hosts (needs root and nftables).
    Faults,
    /// What a protected guest sees: its throughput kept and its stalls, per hot set and rate.
    Stall,
    /// What a 1 GiB guest sees when `tandem primary` starts protecting it.
    FirstSync,
    /// Planned migration of a 1 GiB guest with 1, 16 and 64 MiB hot sets: downtime, total.
    Migrate,
    /// The kv guest under redis-benchmark, unprotected and protected, against a host
    /// redis-server; the client-visible outage per failover (needs root and redis-tools).
    Kv,
    /// virtio-blk and virtio-net against the host doing the same I/O (needs root).
    Io,
    /// Dirty tracking as the guest sees it: bitmap, dirty ring, copy-on-write (uffd-wp).
    Tracking,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// A VM running `counter` forever (it is dropped, not finished).
fn endless_counter(vcpus: u32) -> Result<(Arc<Vm>, std::thread::JoinHandle<()>), String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let vm = Vm::new(&VmConfig::new(32, vcpus), ModuleTable::standard(vec![]), tx)
        .map_err(|e| e.to_string())?;
    let w = workloads::Workload::parse(
        "counter",
        &[
            ("iters".into(), (1u64 << 46).to_string()),
            ("record_every".into(), "10M".into()),
        ],
    )
    .map_err(|e| e.to_string())?;
    let at = monitor::layout::LOAD_ADDR;
    vm.load_image(at, &w.code(at).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let vm = Arc::new(vm);
    let rings = (0..vcpus).map(|v| vm.layout().ring(v)).collect();
    let mut dev = devices::OutputDevice::new(vm.memory().clone(), rings);
    let drainer = std::thread::spawn(move || {
        let mut sink = devices::DigestSink::new(vcpus);
        for rpc in rx.iter() {
            if let monitor::UserRpc::OutputDoorbell { vcpu } = rpc {
                let _ = dev.drain(vcpu, &mut sink);
            }
        }
    });
    vm.start().map_err(|e| e.to_string())?;
    Ok((vm, drainer))
}

fn bench_stun(stuns: usize, out: &mut String) -> Result<(), String> {
    writeln!(out, "### Stun latency\n").unwrap();
    writeln!(
        out,
        "`cargo xtask bench stun --stuns {stuns}`: a `counter` guest runs on every vCPU; the \
         controller stuns (cross-call + kick, waits for every vCPU's ack) and unstuns {stuns} \
         times, 1 ms apart. *stun*: post to last ack. *release*: posting the unstun. *all \
         running*: unstun to the last vCPU's own resume stamp (with more vCPUs than host CPUs \
         this includes waiting for a free CPU). Host: {} CPUs.\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
    .unwrap();
    let head = "| vCPUs | stun p50 µs | stun p99 µs | stun max µs | release p50 µs | all running p50 µs | all running p99 µs |";
    println!("{head}");
    writeln!(out, "{head}\n|---|---|---|---|---|---|---|").unwrap();
    for vcpus in [1u32, 2, 4] {
        let (vm, drainer) = endless_counter(vcpus)?;
        std::thread::sleep(Duration::from_millis(50));
        let (mut stun, mut release, mut running) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..stuns {
            let g = vm.stun().map_err(|e| e.to_string())?;
            stun.push(g.report().latency);
            let r = g.unstun().map_err(|e| e.to_string())?;
            release.push(r.latency);
            std::thread::sleep(Duration::from_millis(1));
            let last = (0..vcpus)
                .map(|v| {
                    vm.vcpu_stats(v)
                        .resumed_ns
                        .load(std::sync::atomic::Ordering::Acquire)
                })
                .max()
                .unwrap_or(0);
            running.push(Duration::from_nanos(last.saturating_sub(r.at_ns)));
        }
        drop(vm);
        drainer.join().map_err(|_| "drain thread panicked")?;
        stun.sort();
        release.sort();
        running.sort();
        let row = format!(
            "| {vcpus} | {} | {} | {} | {} | {} | {} |",
            us(percentile(&stun, 0.5)),
            us(percentile(&stun, 0.99)),
            us(*stun.last().unwrap()),
            us(percentile(&release, 0.5)),
            us(percentile(&running, 0.5)),
            us(percentile(&running, 0.99)),
        );
        println!("{row}");
        writeln!(out, "{row}").unwrap();
    }
    writeln!(out).unwrap();
    Ok(())
}

fn bench_guest(out: &mut String) -> Result<(), String> {
    let iters: u64 = 1_000_000_000;
    let w = workloads::Workload::parse(
        "counter",
        &[
            ("iters".into(), iters.to_string()),
            ("record_every".into(), "1M".into()),
        ],
    )
    .map_err(|e| e.to_string())?;
    let cfg = vmx::RunConfig {
        guest: vmx::GuestSpec::Workload(w),
        vcpus: 1,
        mem_mib: 32,
        output: vmx::OutputTarget::None,
        timeout: Some(Duration::from_secs(300)),
    };
    let report = vmx::run::run(&cfg).map_err(|e| e.to_string())?;
    let guest_rate = iters as f64 / (report.vcpus[0].run_ms / 1e3);
    let progress = std::sync::atomic::AtomicU64::new(0);
    let t = Instant::now();
    let acc = workloads::native_counter(0, std::hint::black_box(iters), &progress);
    let native_rate = iters as f64 / t.elapsed().as_secs_f64();
    let guest_acc = report.digest.vcpus[0].2.map(|r| r.value).unwrap_or(0);
    if acc != guest_acc {
        return Err(format!(
            "guest and host disagree on the checksum ({guest_acc:#x} vs {acc:#x})"
        ));
    }
    let text = format!(
        "### Guest throughput\n\n`cargo xtask bench guest`: the `counter` loop, {iters} iterations, \
         in a 1-vCPU CPL3 guest and as a native host thread (same checksum {acc:#018x}).\n\n\
         | where | iterations/s |\n|---|---|\n| guest (1 vCPU) | {:.3e} |\n| native thread | {:.3e} |\n| guest / native | {:.1} % |\n",
        guest_rate,
        native_rate,
        100.0 * guest_rate / native_rate
    );
    print!("{text}");
    writeln!(out, "{text}").unwrap();
    Ok(())
}

/// One snapshot measurement: save a `mem_mib` guest with `ws` MiB of its memory written,
/// restore it to running, then power the snapshot on again and save it once more (the page
/// cache dropped first, when this process may: a restored VM's memory is its snapshot's
/// file). Returns (save ms, used bytes, restore-to-running ms, save-of-the-restored-VM ms).
fn snapshot_once(
    dir: &std::path::Path,
    mem_mib: u64,
    ws: u64,
) -> Result<(f64, u64, f64, f64), String> {
    let w = workloads::Workload::parse(
        "dirty",
        &[
            ("iters".into(), (1u64 << 40).to_string()),
            ("ws_mib".into(), ws.to_string()),
            ("pages".into(), "1024".into()),
            ("record_every".into(), "100".into()),
        ],
    )
    .map_err(|e| e.to_string())?;
    let sock = dir.join(format!("ctl-{mem_mib}"));
    let snap = dir.join(format!("snap-{mem_mib}"));
    let opts = vmx::Options {
        control: Some(sock.clone()),
        ..vmx::Options::default()
    };
    let boot = vmx::Boot::Fresh {
        guest: vmx::GuestSpec::Workload(w),
        vcpus: 1,
        mem_mib,
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let vmx = vmx::power_on(boot, &opts).map_err(|e| e.to_string())?;
    // Records come every 100 iterations of 1024 pages: wait until the whole working set
    // (ws MiB = ws * 256 pages) has been written at least once.
    let needed = (ws * 256).div_ceil(1024 * 100) + 1;
    let save_ms = save_through_socket(vmx, &sock, &snap, needed)?;
    let v = vmx::machine::verify(&snap).map_err(|e| e.to_string())?;
    let used = v.memory_used_bytes;
    let t = Instant::now();
    let restored = vmx::power_on(
        vmx::Boot::Restore {
            path: snap.clone(),
            verify: false,
        },
        &vmx::Options::default(),
    )
    .map_err(|e| e.to_string())?;
    let restore_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(restored);
    // The restored VM's memory pages come from the file: without the page cache, as after a
    // reboot (root only; otherwise the cache of the save above is measured too).
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let again = dir.join(format!("snap-{mem_mib}-again"));
    let restored = vmx::power_on(
        vmx::Boot::Restore {
            path: snap.clone(),
            verify: false,
        },
        &opts,
    )
    .map_err(|e| e.to_string())?;
    let resave_ms = save_through_socket(restored, &sock, &again, 0)?;
    checkpoint::files::remove_snapshot(&again);
    checkpoint::files::remove_snapshot(&snap);
    Ok((save_ms, used, restore_ms, resave_ms))
}

/// Runs `vmx` until a `snapshot --stop` to `snap`, asked through its control socket `sock`
/// once the guest has sent `records` records. Returns the save's ms.
fn save_through_socket(
    vmx: vmx::Vmx,
    sock: &std::path::Path,
    snap: &std::path::Path,
    records: u64,
) -> Result<f64, String> {
    use vmx::control::{self, Request};
    let (sock, snap) = (sock.to_path_buf(), snap.to_path_buf());
    let asker = std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let s: control::VmStatus =
                control::request_as(&sock, &Request::Status, Duration::from_secs(10))?;
            if s.records >= records {
                break;
            }
        }
        control::request_as::<control::SnapshotDone>(
            &sock,
            &Request::Snapshot {
                path: snap,
                stop: true,
                compress: false,
            },
            Duration::from_secs(120),
        )
    });
    vmx.run().map_err(|e| e.to_string())?;
    let reply = asker
        .join()
        .map_err(|_| "control thread panicked")?
        .map_err(|e| format!("snapshot failed: {e}"))?;
    Ok(reply.ms)
}

fn bench_snapshot(out: &mut String) -> Result<(), String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-snapshot");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut text = String::from(
        "### Snapshot\n\n`cargo xtask bench snapshot`: a 1-vCPU `dirty` guest writes part of its RAM \
         (half, or 64 MiB of 4 GiB), then `snapshot --stop` through the control socket (stun, all \
         checkpoint steps, sparse memory file written on both cores with a CRC-64 per 2 MiB \
         chunk, pages never touched left unread, fsync, rename). \
         Restore-to-running: `power_on` from the snapshot until the vCPUs are started (memory \
         mapped privately, pages load lazily). Save of the restored VM: the snapshot powered on \
         again, page cache dropped first (as root), and saved once more (its memory is the \
         snapshot's file: the holes are not read). Median of 3.\n\n\
         | guest RAM | written | save ms | save GB/s of guest RAM | restore-to-running ms | save of the restored VM ms |\n|---|---|---|---|---|---|\n",
    );
    for (mem_mib, ws) in [(256u64, 128u64), (1024, 512), (4096, 64)] {
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(snapshot_once(&dir, mem_mib, ws)?);
        }
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (save, used, _, _) = runs[1];
        let mid = |f: fn(&(f64, u64, f64, f64)) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[1]
        };
        let row = format!(
            "| {mem_mib} MiB | {} MiB | {save:.1} | {:.2} | {:.2} | {:.1} |\n",
            used >> 20,
            (mem_mib << 20) as f64 / (save / 1e3) / 1e9,
            mid(|r| r.2),
            mid(|r| r.3)
        );
        print!("{row}");
        text.push_str(&row);
    }
    writeln!(out, "{text}").unwrap();
    Ok(())
}

fn record(section: &str) -> std::io::Result<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let path = root.join("BENCHMARKS.md");
    let new = !path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    if new {
        writeln!(
            f,
            "# Tandem benchmarks\n\nWritten by `cargo xtask bench`; newest runs last.\n"
        )?;
    }
    let host = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let when = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    writeln!(f, "## Run of {when} on {host}\n\n{section}")?;
    Ok(path)
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Fuzz { secs, target } => fuzz::run(secs, target.as_deref()),
        Cmd::RunPair(args) if args.guest == "kv" => pair_kv::run(&args),
        Cmd::RunPair(args) => pair::run_pair(args),
        Cmd::Soak { cycles, iters } => pair::soak(cycles, &iters),
        Cmd::Modgraph => modgraph::run(&pair::root()),
        Cmd::Bench {
            which,
            stuns,
            no_record,
            hot_mib,
            hz,
            vcpu_sched,
            reps,
        } => {
            let plan = bench_stall::Plan {
                hot_mib,
                hz,
                vcpu_sched,
                reps,
            };
            let mut out = String::new();
            let all = which.is_none();
            let mut r = Ok(());
            if all || which == Some(Bench::Stun) {
                r = r.and_then(|_| bench_stun(stuns, &mut out));
            }
            if all || which == Some(Bench::Guest) {
                r = r.and_then(|_| bench_guest(&mut out));
            }
            if all || which == Some(Bench::Snapshot) {
                r = r.and_then(|_| bench_snapshot(&mut out));
            }
            if all || which == Some(Bench::Transport) {
                r = r.and_then(|_| transport_bench::bench(&mut out));
            }
            if all || which == Some(Bench::Ft) {
                r = r.and_then(|_| pair::bench(&mut out));
                if !all {
                    r = r.and_then(|_| bench_stall::bench(&plan, &mut out));
                }
            }
            if all || which == Some(Bench::Reprotect) {
                r = r.and_then(|_| pair::bench_reprotect(&mut out));
            }
            if all || which == Some(Bench::Faults) {
                r = r.and_then(|_| pair::bench_faults(&mut out));
            }
            if all || which == Some(Bench::Stall) {
                r = r.and_then(|_| bench_stall::bench(&plan, &mut out));
            }
            if all || which == Some(Bench::FirstSync) {
                r = r.and_then(|_| bench_stall::bench_first_sync(&mut out));
            }
            if all || which == Some(Bench::Migrate) {
                r = r.and_then(|_| bench_migrate::bench(&mut out));
            }
            if all || which == Some(Bench::Kv) {
                r = r.and_then(|_| bench_kv::bench(&mut out));
            }
            if which == Some(Bench::Tracking) {
                r = r.and_then(|_| bench_tracking::bench(&mut out));
            }
            if all || which == Some(Bench::Io) {
                r = r.and_then(|_| bench_io::bench(&mut out));
            }
            r.and_then(|_| {
                if !no_record {
                    let p = record(&out).map_err(|e| format!("cannot write BENCHMARKS.md: {e}"))?;
                    println!("appended to {}", p.display());
                }
                Ok(())
            })
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: {e}");
        std::process::exit(1);
    }
}
