//! The Rust guests (`guests/`, embedded by `guest-images`) on real KVM, through the monitor
//! library: ELF loading by `monitor::image`, the `tandem-rt` runtime (ring, doorbell, done,
//! boot-info arguments, clock, heap, panic records) and the reference models.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;
use devices::output::{OutputSink, Record};
use devices::OutputDevice;
use guest_images::{kind, model};
use monitor::layout::LOAD_ADDR;
use monitor::{ModuleTable, UserRpc, Vm, VmConfig};
use tandem_tests::require_kvm;

/// Keeps every record, per vCPU.
struct Collect(Vec<Vec<Record>>);

impl OutputSink for Collect {
    fn records(&mut self, vcpu: u32, records: &[Record]) -> std::io::Result<()> {
        self.0[vcpu as usize].extend_from_slice(records);
        Ok(())
    }
}

struct Run {
    records: Vec<Vec<Record>>,
    tsc_khz: u64,
    wall: Duration,
}

/// Runs `image` with guest arguments `args` until every vCPU reports done.
fn run(image: &[u8], args: &str, vcpus: u32, mem_mib: u64) -> Run {
    require_kvm();
    let mut cfg = VmConfig::new(mem_mib, vcpus);
    cfg.entry = monitor::image::entry_point(image, LOAD_ADDR, None).expect("entry point");
    cfg.boot_args = args.to_string();
    let (tx, rx) = unbounded();
    let vm = Arc::new(Vm::new(&cfg, ModuleTable::standard(vec![]), tx).expect("create VM"));
    let entry = monitor::image::load(vm.memory(), image, LOAD_ADDR, None).expect("load");
    assert_eq!(entry, cfg.entry);
    let rings = (0..vcpus).map(|v| vm.layout().ring(v)).collect();
    let mut dev = OutputDevice::new(vm.memory().clone(), rings);
    let mut sink = Collect(vec![Vec::new(); vcpus as usize]);
    let started = Instant::now();
    vm.start().expect("start");
    let mut done = 0;
    while done < vcpus {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(UserRpc::OutputDoorbell { vcpu }) => {
                dev.drain(vcpu, &mut sink).expect("drain");
            }
            Ok(UserRpc::VcpuDone { vcpu }) => {
                dev.drain(vcpu, &mut sink).expect("drain");
                done += 1;
            }
            Ok(UserRpc::VcpuError { vcpu, error }) => panic!("vCPU {vcpu}: {error}"),
            Ok(_) => {}
            Err(e) => panic!(
                "the guest did not finish: {e}; records so far: {:?}",
                sink.0
            ),
        }
    }
    Run {
        records: sink.0,
        tsc_khz: vm.shared().tsc_khz,
        wall: started.elapsed(),
    }
}

#[test]
fn hello_matches_its_reference_model_across_ring_wraps() {
    // 5000 records: the 1024-slot ring wraps several times, doorbells every 256.
    let r = run(guest_images::HELLO, "n=5000", 2, 64);
    assert_eq!(r.records[0], model::hello_records(5000));
    assert!(r.records[1].is_empty(), "only vCPU 0 runs main");

    // Default n, and a suffixed number.
    let r = run(guest_images::HELLO, "", 1, 32);
    assert_eq!(r.records[0], model::hello_records(1000));
    let r = run(guest_images::HELLO, "x=1 n=2k", 1, 32);
    assert_eq!(r.records[0], model::hello_records(2000));
}

#[test]
fn a_panic_reports_file_line_and_message() {
    let r = run(guest_images::PANIC, "why=because", 1, 32);
    let recs = &r.records[0];
    assert!(recs.len() >= 5, "{recs:?}");
    assert!(recs[..3]
        .iter()
        .enumerate()
        .all(|(i, r)| r.kind == kind::PROGRESS && r.value == i as u64 + 1));
    assert_eq!(recs[3].kind, kind::PANIC);
    let p = model::panic_text(recs).expect("a panic");
    let (file, rest) = p.text.split_once(':').expect("file:line: message");
    let (line, msg) = rest.split_once(": ").expect("line: message");
    assert!(
        file.ends_with("main.rs") && file.contains("panic"),
        "{}",
        p.text
    );
    assert_eq!(line.parse::<u64>().unwrap(), p.line, "{}", p.text);
    assert!(p.line > 0);
    assert_eq!(p.file_hash, model::fnv1a(file.as_bytes()));
    assert_eq!(msg, "on purpose: because");
    // Nothing after the text.
    assert!(recs[4..].iter().all(|r| r.kind == kind::PANIC_TEXT));
}

#[test]
fn an_allocation_failure_and_a_bad_argument_panic_with_a_reason() {
    let r = run(guest_images::PANIC, "oom=1", 1, 32);
    let p = model::panic_text(&r.records[0]).expect("a panic");
    assert!(p.text.contains("memory allocation of"), "{}", p.text);

    let r = run(guest_images::HELLO, "n=lots", 1, 32);
    let p = model::panic_text(&r.records[0]).expect("a panic");
    assert!(
        p.text.ends_with("argument n=lots: not a number"),
        "{}",
        p.text
    );
}

#[test]
fn the_boot_info_has_the_tsc_frequency_and_the_clock_advances() {
    let r = run(
        guest_images::STALL_PROBE,
        "ms=200 threshold_us=200 max=50",
        1,
        32,
    );
    let s = model::stall_run(&r.records[0]).expect("a complete stall-probe run");
    assert!(s.tsc_khz > 0, "no TSC frequency in the boot-info page");
    assert_eq!(
        s.tsc_khz, r.tsc_khz,
        "the guest reads the monitor's TSC kHz"
    );
    assert_eq!(s.threshold_ns, 200_000);
    assert!(s.elapsed_ns >= 200_000_000, "{s:?}");
    // The guest's clock agrees with the host's within 25% + 20 ms of scheduling slack.
    let wall = r.wall.as_nanos() as u64;
    assert!(
        s.elapsed_ns <= wall + wall / 4 + 20_000_000,
        "guest {} ns, host {wall} ns",
        s.elapsed_ns
    );
    assert!(s.iterations > 1000, "{s:?}");
    assert!(s.gaps.len() as u64 == s.over.min(50), "{s:?}");
    assert!(s.gaps.iter().all(|&(gap, _)| gap > 200_000));
    assert!(s.largest_ns >= s.gaps.iter().map(|g| g.0).max().unwrap_or(0));
}

#[test]
fn the_virtio_guests_load_and_stop_cleanly_without_their_device() {
    // No device in the boot-info page yet: each says so in a panic record.
    for (image, want) in [
        (
            guest_images::BLK_CHECK,
            "block device 0: no such virtio-mmio device",
        ),
        (
            guest_images::NET_ECHO,
            "network device 0: no such virtio-mmio device",
        ),
    ] {
        let r = run(image, "", 1, 64);
        let p = model::panic_text(&r.records[0]).expect("a panic");
        assert!(p.text.contains(want), "{}", p.text);
    }
}
