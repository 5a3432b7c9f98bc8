//! `tandem`: run, checkpoint and protect KVM virtual machines.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vmx::{GuestSpec, OutputTarget, RunConfig};
use workloads::Workload;

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
}

#[derive(clap::Args)]
struct RunArgs {
    /// Built-in workload guest: counter (pure compute) or dirty (writes memory).
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "image",
        required_unless_present = "image"
    )]
    guest: Option<String>,
    /// A flat 64-bit binary to run instead of a built-in guest.
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// Guest-physical address to load --image at (0x200000 .. 0x400000).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr, default_value = "0x200000", requires = "image")]
    load_addr: u64,
    /// Entry point of --image (defaults to the load address).
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
    /// Also write every record as a text line (`vcpu seq kind value aux`) to FILE, or - for stdout.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Give up if the guest has not finished after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout_secs: Option<u64>,
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

fn run(args: RunArgs) -> Result<(), vmx::Error> {
    let guest = match (&args.guest, &args.image) {
        (Some(name), _) => GuestSpec::Workload(Workload::parse(name, &args.guest_args)?),
        (None, Some(path)) => {
            if !args.guest_args.is_empty() {
                return Err(vmx::Error::Usage(
                    "--guest-arg goes with --guest, not --image".into(),
                ));
            }
            GuestSpec::Image {
                path: path.clone(),
                load_addr: args.load_addr,
                entry: args.entry.unwrap_or(args.load_addr),
            }
        }
        (None, None) => {
            return Err(vmx::Error::Usage(
                "give --guest NAME or --image FILE".into(),
            ))
        }
    };
    let output = match &args.output {
        None => OutputTarget::None,
        Some(p) if p.as_os_str() == "-" => OutputTarget::Stdout,
        Some(p) => OutputTarget::File(p.clone()),
    };
    let cfg = RunConfig {
        guest,
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        output,
        timeout: args.timeout_secs.map(Duration::from_secs),
    };
    let report = vmx::run::run(&cfg)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serialises")
        );
    } else {
        println!("{report}");
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
