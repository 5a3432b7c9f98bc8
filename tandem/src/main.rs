//! `tandem`: run, checkpoint and protect KVM virtual machines.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vmx::control::Request;
use vmx::{Boot, GuestSpec, Options, Outcome, OutputTarget};
use workloads::Workload;

/// Every command's error: fault tolerance's, which carries vmx's, the sink's and the link's
/// with their kinds (exit code 2 for usage, 3 for a fenced primary, 1 otherwise).
type Error = ft::Error;

/// Faults to inject, from `TANDEM_TEST_*`: only in a binary whose `ft` is built with its
/// `fault-injection` feature (`--features fault-injection`, or the end-to-end tests' build);
/// a production build reads no such variable.
fn fault_hooks() -> ft::link::TestHooks {
    ft::link::TestHooks::from_env()
}

fn usage(msg: String) -> Error {
    vmx::Error::Usage(msg).into()
}

/// Tandem runs KVM virtual machines and checkpoints them.
///
/// Guests start directly in 64-bit long mode at CPL3. See README.md for the guest ABI
/// (memory layout, output ring, doorbell port, register state at entry).
#[derive(Parser)]
#[command(name = "tandem", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest to completion and print the digest of its output records.
    ///
    /// Same arguments give the same digest on every run and every machine.
    Run(RunArgs),
    /// Power on from a snapshot (FILE and FILE.mem) and run to completion.
    ///
    /// The digest printed at the end covers the whole output stream, from the original boot.
    Restore(RestoreArgs),
    /// Send a command to a running tandem's control socket and print the JSON reply.
    Ctl(CtlArgs),
    /// Check a snapshot: the state file's checksums and every memory chunk's.
    Verify {
        /// The snapshot state file.
        file: PathBuf,
    },
    /// Run a guest protected by a hot standby (`tandem standby`): every interval the dirty
    /// pages and the vCPU and device state go to the standby, and the guest's output is
    /// released to the sink only once the standby has committed the epoch that produced it.
    Primary(PrimaryArgs),
    /// Wait for a primary, keep a committed replica of it in memory, and take over when it
    /// dies (connection lost, or 4 × interval without a frame).
    Standby(StandbyArgs),
    /// The outside world of a protected guest: receives released output records, refuses
    /// stale generations, and reports gaps and duplicates.
    Sink(SinkArgs),
    /// Write a fresh random 32-byte replication key (hex) to FILE (mode 0600).
    Keygen {
        /// Where the key goes.
        file: PathBuf,
    },
}

/// How the replication link is secured.
#[derive(clap::Args)]
struct LinkArgs {
    /// The shared replication key (`tandem keygen FILE`); both sides need the same one.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "insecure_plaintext"
    )]
    key_file: Option<PathBuf>,
    /// Use a key file that group or others may read (refused otherwise, as ssh does); warns.
    #[arg(long)]
    allow_open_key_file: bool,
    /// The output sink's key (`tandem sink --key-file`): the link to the sink is authenticated
    /// and sealed with it. Without it the sink must run --insecure-plaintext.
    #[arg(long, value_name = "FILE")]
    sink_key_file: Option<PathBuf>,
    /// Run the link without authentication or encryption (testing only; both sides must say so).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Epoch interval in ms (the standby declares the primary dead after 4 × this of silence).
    #[arg(long, default_value_t = 50, value_name = "MS", value_parser = clap::value_parser!(u64).range(5..=10_000))]
    interval_ms: u64,
    /// The output sink (`tandem sink`) to release guest output to.
    #[arg(long, value_name = "ADDR")]
    sink: Option<String>,
    /// Where role changes are arbitrated: a standby resumes, and a primary that lost its
    /// standby goes on, only after winning the next generation there; the loser fences itself.
    /// Either DIR, a directory both hosts share (file arbiter; see ft::arbiter for the file
    /// systems where it is safe), or etcd://HOST:PORT[,HOST:PORT…]/PREFIX[?ttl=SECS], an etcd
    /// 3.4+ cluster's client endpoints and a key prefix of this VM's own (e.g.
    /// etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379/tandem/vm1). With etcd, the winner
    /// holds a lease of SECS seconds (default 5); a primary whose lease expired or went
    /// unrenewed that long fences itself before releasing anything more. Without --arbiter
    /// nothing prevents two primaries after a network partition.
    #[arg(long, value_name = "DIR|etcd://HOST:PORT[,…]/PREFIX")]
    arbiter: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT; text format 0.0.4):
    /// role, generation, epochs committed, bytes sent, throttles, replication lag, a histogram
    /// of the guest-visible pause per epoch, failovers, re-protections. They are read from
    /// the same status `tandem ctl SOCKET status` shows. Bind to a private address: the
    /// endpoint has no authentication.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

impl LinkArgs {
    /// Serves `--metrics` for a process starting in `role` (before anything else starts, so
    /// that a busy port stops it at once).
    fn metrics(&self, role: ft::status::Role) -> Result<Option<ft::metrics::Metrics>, Error> {
        let Some(addr) = &self.metrics else {
            return Ok(None);
        };
        let m = ft::metrics::Metrics::new(role);
        match m.serve(addr) {
            Ok(_) => Ok(Some(m)),
            Err(Error::Io { path, source }) => Err(Error::Io {
                path: format!("--metrics {path}"),
                source,
            }),
            Err(e) => Err(e),
        }
    }

    fn arbiter(&self) -> Result<Option<std::sync::Arc<dyn ft::arbiter::Arbiter>>, Error> {
        self.arbiter
            .as_deref()
            .map(ft::arbiter::from_arg)
            .transpose()
    }

    /// The sink key, if one was given.
    fn sink_key(&self) -> Result<Option<transport::Psk>, Error> {
        match &self.sink_key_file {
            Some(f) => Ok(Some(transport::Psk::from_file_with(
                f,
                self.allow_open_key_file,
            )?)),
            None => Ok(None),
        }
    }

    fn psk(&self) -> Result<Option<transport::Psk>, Error> {
        match (&self.key_file, self.insecure_plaintext) {
            (Some(_), true) => Err(usage(
                "--key-file and --insecure-plaintext exclude each other".into(),
            )),
            (Some(f), false) => Ok(Some(transport::Psk::from_file_with(
                f,
                self.allow_open_key_file,
            )?)),
            (None, _) => Ok(None),
        }
    }
}

#[derive(clap::Args)]
struct PrimaryArgs {
    /// The standby's address (HOST:PORT). Without it (and without --listen) the guest runs
    /// unprotected. Whenever the VM is unprotected (standby lost, or not up yet) the primary
    /// dials this address again every 0.5 s and re-protects the VM with whatever standby
    /// answers there (full sync by pre-copy while the guest runs).
    #[arg(long, value_name = "ADDR")]
    peer: Option<String>,
    /// Also accept standbys that join this primary (`tandem standby --join ADDR`) here
    /// (HOST:PORT). A joiner is synced whenever the VM is unprotected.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Power on from this snapshot instead of booting --guest/--image.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["guest", "image"])]
    restore: Option<PathBuf>,
    #[command(flatten)]
    link: LinkArgs,
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args)]
struct StandbyArgs {
    /// Where to listen for the primary (HOST:PORT; port 0 picks one). The address is printed
    /// as the first line on stdout: `listening on ADDR`. With --join, this is where the
    /// standby, once it has taken over, accepts standbys that join it.
    #[arg(long, value_name = "ADDR", required_unless_present = "join")]
    listen: Option<String>,
    /// Join the running primary at ADDR (its --listen, or the address a former standby that
    /// took over listened on) instead of waiting for a primary: it syncs this standby by
    /// pre-copy while its guest runs, then protects itself with it.
    #[arg(long, value_name = "ADDR")]
    join: Option<String>,
    /// This host's image for the primary's disk, repeatable, in the primary's order (default:
    /// the primary's paths). The guest continues on it after a takeover; disk contents are
    /// not replicated yet, so it must hold what the primary's held.
    #[arg(long = "disk", value_name = "FILE[,readonly]", value_parser = parse_disk)]
    disks: Vec<vmx::virtio::BlockConfig>,
    /// This host's TAP for the primary's network card, repeatable, in the primary's order
    /// (default: the primary's TAP names). The guest keeps its MAC; after a takeover each card
    /// is announced from here (three RARP broadcasts, as QEMU's announce-self) so bridges
    /// learn the new port. Put it on the same L2 segment as the primary's.
    #[arg(long = "net", value_name = "tap=NAME", value_parser = parse_net)]
    nets: Vec<vmx::virtio::NetConfig>,
    #[command(flatten)]
    link: LinkArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args)]
struct SinkArgs {
    /// Where to listen (HOST:PORT; port 0 picks one). Printed first on stdout:
    /// `listening on ADDR`.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Accepted records go here, one line each: `generation vcpu seq kind value(hex) aux`.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The sink's counters (received, accepted, gaps, duplicates, stale rejections, refused
    /// connections), as JSON, rewritten after every batch.
    #[arg(long, value_name = "FILE")]
    report: PathBuf,
    /// The sink key (`tandem keygen FILE`): releasers must prove it (primaries and standbys
    /// get it as --sink-key-file). Keep it apart from the replication key.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "insecure_plaintext"
    )]
    key_file: Option<PathBuf>,
    /// Use a key file that group or others may read (refused otherwise); warns.
    #[arg(long, requires = "key_file")]
    allow_open_key_file: bool,
    /// Hear anyone who reaches the port, unauthenticated (testing only).
    #[arg(long, conflicts_with = "key_file")]
    insecure_plaintext: bool,
    /// Refuse a releaser whose generation this arbiter never granted: the primaries' and
    /// standbys' --arbiter, DIR or etcd://HOST:PORT[,HOST:PORT…]/PREFIX (the sink only reads
    /// it; it claims nothing and holds no lease).
    #[arg(long, value_name = "DIR|etcd://HOST:PORT[,…]/PREFIX")]
    arbiter: Option<String>,
}

/// Options shared by `run` and `restore`.
#[derive(clap::Args)]
struct Common {
    /// Also write every record as a text line (`vcpu seq kind value aux`) to FILE, or - for stdout.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Give up if the guest has not finished after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout_secs: Option<u64>,
    /// Serve a JSON-lines control socket here (see `tandem ctl`).
    #[arg(long, value_name = "SOCKET")]
    control: Option<PathBuf>,
    /// Stay paused after power-on until `tandem ctl SOCKET resume`.
    #[arg(long, requires = "control")]
    paused: bool,
    /// Write the checkpoint trace (state, side, step) as JSON to FILE after each checkpoint.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Host scheduling of vCPU threads: `nice:10` (default) makes them ordinary threads at
    /// nice 10, so that tandem's control path (stun, replication, devices) takes most of a
    /// contended CPU; `nice` or `nice:N` sets nice 19 or N (1..=19); `normal` makes them
    /// ordinary threads at the host's default weight (the guest competes evenly with the
    /// replication); `idle` (SCHED_IDLE) gives guests only the cycles nobody else wants.
    #[arg(long, value_name = "POLICY", default_value = "nice:10", value_parser = parse_sched)]
    vcpu_sched: vmx::VcpuSched,
}

fn parse_sched(s: &str) -> Result<vmx::VcpuSched, String> {
    match s {
        "idle" => Ok(vmx::VcpuSched::Idle),
        "normal" => Ok(vmx::VcpuSched::Normal),
        "nice" => Ok(vmx::VcpuSched::Nice(19)),
        _ => match s.strip_prefix("nice:").map(str::parse::<i32>) {
            Some(Ok(n)) if (1..=19).contains(&n) => Ok(vmx::VcpuSched::Nice(n)),
            _ => Err(format!(
                "{s:?}: use idle, normal, nice (nice 19) or nice:N (N in 1..=19)"
            )),
        },
    }
}

impl Common {
    fn options(&self) -> Options {
        Options {
            output: match &self.output {
                None => OutputTarget::None,
                Some(p) if p.as_os_str() == "-" => OutputTarget::Stdout,
                Some(p) => OutputTarget::File(p.clone()),
            },
            control: self.control.clone(),
            paused: self.paused,
            timeout: self.timeout_secs.map(Duration::from_secs),
            trace: self.trace.clone(),
            vcpu_sched: self.vcpu_sched,
        }
    }
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The snapshot state file (its memory is FILE.mem).
    file: PathBuf,
    /// Check every memory chunk's checksum before running (otherwise pages load lazily).
    #[arg(long)]
    verify: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args)]
struct CtlArgs {
    /// The control socket of a running `tandem run|restore --control SOCKET`.
    socket: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Stop every vCPU until `resume`.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// Print state and counters.
    Status,
    /// Save a snapshot to FILE and FILE.mem.
    Snapshot {
        /// Where the state file goes.
        file: PathBuf,
        /// Power the VM off after saving (suspend).
        #[arg(long)]
        stop: bool,
        /// Put memory into the state file as zstd chunks (for archiving and shipping) instead
        /// of a sparse FILE.mem (fast, lazily loaded on restore).
        #[arg(long)]
        compress: bool,
    },
    /// Move the VM of this `tandem primary` to the `tandem standby --listen ADDR` at ADDR
    /// (planned migration): a pre-copy while the guest runs, epochs that converge (the guest
    /// is throttled harder while they do not shrink), a last epoch with the guest stopped,
    /// then the standby takes over as the next generation through the arbiter and this
    /// primary exits 0 ("moved to ADDR"). Waits for the outcome and prints it; a migration
    /// that fails leaves the VM running here and says why (exit 1). When ADDR is this
    /// primary's own standby it is a switchover (no pre-copy); another standby of this
    /// primary is told goodbye first (the VM is unprotected until the receiver has its sync).
    Migrate {
        /// The receiver: a `tandem standby --listen ADDR` with the same key, sink and arbiter.
        addr: String,
        /// The longest the guest may stay stopped for the switch, in ms.
        #[arg(long, default_value_t = 5, value_name = "MS")]
        max_downtime_ms: u64,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    common: Common,
}

/// What the guest is.
#[derive(clap::Args)]
struct GuestArgs {
    /// Built-in workload guest: counter (pure compute) or dirty (writes memory).
    #[arg(long, value_name = "NAME", conflicts_with = "image")]
    guest: Option<String>,
    /// A guest image to run instead of a built-in guest: an ELF64 x86-64 executable (PT_LOAD
    /// segments inside 0x200000..0x400000, entry from its header), or a flat 64-bit binary
    /// loaded at --load-addr. --guest-arg KEY=VALUE words reach it through the boot-info page.
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// Guest-physical address to load a flat --image at (0x200000 .. 0x400000; an ELF image
    /// says where its segments go).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr, default_value = "0x200000", requires = "image")]
    load_addr: u64,
    /// Entry point of --image (default: the ELF header's, or the load address of a flat one).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr, requires = "image")]
    entry: Option<u64>,
    /// Number of vCPUs (1-16, and no more than KVM allows).
    #[arg(long, default_value_t = 1, value_name = "N")]
    vcpus: u32,
    /// Guest RAM in MiB (even, 16 to 16384).
    #[arg(long, default_value_t = 128, value_name = "MIB")]
    mem_mib: u64,
    /// Workload parameter, repeatable: counter takes iters, record_every, batch; dirty also
    /// ws_mib (working set per vCPU) and pages (pages written per iteration). Numbers take
    /// k/M/G suffixes and _ separators.
    #[arg(long = "guest-arg", value_name = "KEY=VALUE", value_parser = parse_kv)]
    guest_args: Vec<(String, String)>,
    /// A virtio-blk disk on a raw image FILE (read-write; `,readonly` refuses the guest's
    /// writes). Repeatable: disks take device windows 0, 1, ... (window i at 0x400000000 +
    /// i*0x1000, GSI 5+i), before any --net. A snapshot copies each writable disk to
    /// `SNAPFILE.disk<i>` (reflink where the file system can, else a sparse copy), and a
    /// restore puts that copy back at FILE.
    #[arg(long = "disk", value_name = "FILE[,readonly]", value_parser = parse_disk)]
    disks: Vec<vmx::virtio::BlockConfig>,
    /// A virtio-net card on the TAP interface NAME (create it first: `ip tuntap add NAME mode
    /// tap`; opening it needs CAP_NET_ADMIN), with MAC (default: derived from NAME, locally
    /// administered). Repeatable: cards take the device windows after the disks.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    nets: Vec<vmx::virtio::NetConfig>,
}

fn parse_disk(s: &str) -> Result<vmx::virtio::BlockConfig, String> {
    vmx::virtio::BlockConfig::parse(s).map_err(|e| e.to_string())
}

fn parse_net(s: &str) -> Result<vmx::virtio::NetConfig, String> {
    vmx::virtio::NetConfig::parse(s).map_err(|e| e.to_string())
}

fn parse_addr(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not an address (use decimal or 0x-hex)"))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn fresh(args: &GuestArgs) -> Result<Boot, Error> {
    let guest = match (&args.guest, &args.image) {
        (Some(name), _) => {
            GuestSpec::Workload(Workload::parse(name, &args.guest_args).map_err(vmx::Error::from)?)
        }
        (None, Some(path)) => GuestSpec::Image {
            path: path.clone(),
            load_addr: args.load_addr,
            entry: args.entry,
            args: args
                .guest_args
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
        },
        (None, None) => return Err(usage("give --guest NAME or --image FILE".into())),
    };
    Ok(Boot::Fresh {
        guest,
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        disks: args.disks.clone(),
        nets: args.nets.clone(),
    })
}

fn run(args: RunArgs) -> Result<(), Error> {
    let boot = fresh(&args.guest)?;
    finish(
        vmx::power_on(boot, &args.common.options())?.run()?,
        args.common.json,
    )
}

fn primary(args: PrimaryArgs) -> Result<(), Error> {
    let metrics = args.link.metrics(ft::status::Role::Primary)?;
    let boot = match &args.restore {
        Some(path) => Boot::Restore {
            path: path.clone(),
            verify: false,
        },
        None => fresh(&args.guest)?,
    };
    let cfg = ft::PrimaryConfig {
        boot,
        opts: args.common.options(),
        peer: args.peer.clone(),
        listen: args.listen.clone(),
        psk: args.link.psk()?,
        interval: Duration::from_millis(args.link.interval_ms),
        sink: args.link.sink.clone(),
        arbiter: args.link.arbiter()?,
        connect_patience: Duration::from_secs(10),
        hooks: fault_hooks(),
        sink_key: args.link.sink_key()?,
        metrics,
    };
    let (outcome, ft) = ft::run_primary(cfg)?;
    if let Outcome::Moved { to, generation, .. } = &outcome {
        println!(
            "moved to {to}: the VM runs there now, as generation {generation}; this primary \
             stopped"
        );
    }
    if args.common.json {
        let end = match outcome {
            Outcome::Finished(report) => vmx::RunEnd::Finished(report),
            Outcome::Moved {
                to,
                generation,
                report,
            } => vmx::RunEnd::Moved {
                moved_to: to,
                generation,
                report: Some(report),
            },
            suspended @ Outcome::Suspended { .. } => return finish(suspended, true),
        };
        let end = ft::status::EndReport {
            report: Some(end),
            ..ft::status::EndReport::primary_status(ft)
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&end).expect("serialises")
        );
        return Ok(());
    }
    println!("replication: {ft}");
    finish(outcome, false)
}

fn standby(args: StandbyArgs) -> Result<(), Error> {
    use std::io::Write;
    let metrics = args.link.metrics(ft::status::Role::Standby)?;
    let cfg = ft::standby::StandbyConfig {
        psk: args.link.psk()?,
        interval: Duration::from_millis(args.link.interval_ms),
        sink: args.link.sink.clone(),
        opts: args.common.options(),
        arbiter: args.link.arbiter()?,
        sink_key: args.link.sink_key()?,
        disks: args.disks.clone(),
        nets: args.nets.clone(),
        metrics,
    };
    let sb = match (&args.join, &args.listen) {
        (Some(primary), listen) => ft::standby::Standby::join(primary, listen.as_deref(), cfg)?,
        (None, Some(listen)) => ft::standby::Standby::bind(listen, cfg)?,
        (None, None) => unreachable!("clap requires --listen or --join"),
    };
    match sb.addr() {
        Some(a) => println!("listening on {a}"),
        None => println!("joining {}", args.join.as_deref().unwrap_or_default()),
    }
    let _ = std::io::stdout().flush();
    let end = sb.run()?.end_report();
    println!(
        "{}",
        serde_json::to_string_pretty(&end).expect("serialises")
    );
    Ok(())
}

fn sink(args: SinkArgs) -> Result<(), Error> {
    use std::io::Write;
    let key = match &args.key_file {
        Some(f) => Some(transport::Psk::from_file_with(f, args.allow_open_key_file)?),
        None => None,
    };
    let granted: Option<sink::GenerationCheck> = match &args.arbiter {
        Some(arg) => {
            let arb = ft::arbiter::from_arg(arg)?;
            Some(std::sync::Arc::new(move |g| {
                arb.granted(g).map_err(|e| e.to_string())
            }))
        }
        None => None,
    };
    let s = sink::Sink::bind(
        &args.listen,
        &args.out,
        &args.report,
        sink::SinkAuth { key, granted },
    )?;
    println!("listening on {}", s.addr());
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn keygen(file: PathBuf) -> Result<(), Error> {
    transport::Psk::generate().write_file(&file)?;
    println!("wrote a new replication key to {}", file.display());
    Ok(())
}

fn finish(outcome: Outcome, json: bool) -> Result<(), Error> {
    match outcome {
        Outcome::Finished(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serialises")
                );
            } else {
                println!("{report}");
            }
        }
        Outcome::Suspended { path, report } => {
            if json {
                let end = vmx::RunEnd::Suspended {
                    suspended: path,
                    report: Some(report),
                };
                println!(
                    "{}",
                    serde_json::to_string_pretty(&end).expect("report serialises")
                );
            } else {
                println!("suspended to {}\n{report}", path.display());
            }
        }
        Outcome::Moved {
            to,
            generation,
            report,
        } => {
            if json {
                let end = vmx::RunEnd::Moved {
                    moved_to: to,
                    generation,
                    report: Some(report),
                };
                println!(
                    "{}",
                    serde_json::to_string_pretty(&end).expect("report serialises")
                );
            } else {
                println!("moved to {to} (generation {generation}); output here:\n{report}");
            }
        }
    }
    Ok(())
}

fn restore(args: RestoreArgs) -> Result<(), Error> {
    let boot = Boot::Restore {
        path: args.file,
        verify: args.verify,
    };
    finish(
        vmx::power_on(boot, &args.common.options())?.run()?,
        args.common.json,
    )
}

fn ctl(args: CtlArgs) -> Result<(), Error> {
    let req = match args.command {
        CtlCommand::Pause => Request::Pause,
        CtlCommand::Resume => Request::Resume,
        CtlCommand::Status => Request::Status,
        CtlCommand::Snapshot {
            file,
            stop,
            compress,
        } => {
            let file = std::path::absolute(&file).unwrap_or(file);
            Request::Snapshot {
                path: file,
                stop,
                compress,
            }
        }
        CtlCommand::Migrate {
            addr,
            max_downtime_ms,
        } => Request::Migrate {
            addr,
            max_downtime_ms: Some(max_downtime_ms),
        },
    };
    // A migration of a large VM over a slow link takes long; everything else is quick.
    let patience = match req {
        Request::Migrate { .. } => Duration::from_secs(3600),
        _ => Duration::from_secs(300),
    };
    let reply = vmx::control::request(&args.socket, &req, patience)?;
    println!("{reply}");
    let head: vmx::control::Answer = serde_json::from_value(reply)
        .map_err(|e| Error::Vmx(vmx::Error::Usage(format!("bad reply: {e}"))))?;
    if head.ok {
        Ok(())
    } else {
        Err(Error::Vmx(vmx::Error::Refused(
            head.error.unwrap_or_else(|| "no reason given".into()),
        )))
    }
}

fn verify(file: PathBuf) -> Result<(), Error> {
    let v = vmx::machine::verify(&file)?;
    println!("{}", serde_json::to_string_pretty(&v).expect("serialises"));
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    // Epoch buffers are reused rather than mapped afresh every epoch (monitor::alloc).
    if !vmx::tune_allocator() {
        log::debug!("the allocator did not take the buffer thresholds; running with its own");
    }
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => restore(args),
        Command::Ctl(args) => ctl(args),
        Command::Verify { file } => verify(file),
        Command::Primary(args) => primary(args),
        Command::Standby(args) => standby(args),
        Command::Sink(args) => sink(args),
        Command::Keygen { file } => keygen(file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
