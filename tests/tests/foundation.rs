//! Foundation: workload guests give the reference digest; stun stops every vCPU.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::DigestSink;
use monitor::{Module, ModuleTable, VcpuContext, VcpuState, Vm, VmConfig};
use tandem_tests::{require_kvm, workload, Harness};
use vmx::{GuestSpec, OutputTarget, RunConfig};

/// The vCPU's state once it has taken the last unstun (which is not acknowledged).
fn settled_state(vm: &Vm, v: u32) -> VcpuState {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let s = vm.vcpu_stats(v).state();
        if s != VcpuState::Stunned || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn run_lib(w: &workloads::Workload, vcpus: u32, mem_mib: u64) -> vmx::RunReport {
    require_kvm();
    let cfg = RunConfig {
        guest: GuestSpec::Workload(w.clone()),
        vcpus,
        mem_mib,
        output: OutputTarget::None,
        timeout: Some(Duration::from_secs(120)),
    };
    vmx::run::run(&cfg).expect("run")
}

/// A short `dirty` run: 4 MiB working sets, 8 pages written per iteration.
fn short_dirty() -> workloads::Workload {
    workload(
        "dirty",
        &[
            ("iters", "200k"),
            ("pages", "8"),
            ("ws_mib", "4"),
            ("record_every", "500"),
        ],
    )
}

#[test]
fn counter_matches_the_reference_model_on_1_and_4_vcpus() {
    let w = workload("counter", &[("iters", "40M"), ("record_every", "20k")]);
    for vcpus in [1, 4] {
        let report = run_lib(&w, vcpus, 64);
        let want = DigestSink::of(&w.reference_all(vcpus));
        assert_eq!(report.digest, want, "{vcpus} vCPUs");
        assert_eq!(report.digest.records(), u64::from(vcpus) * 2001);
    }
}

#[test]
fn dirty_matches_the_reference_model_and_reaches_the_dirty_log() {
    let w = short_dirty();
    let report = run_lib(&w, 4, 64);
    assert_eq!(report.digest, DigestSink::of(&w.reference_all(4)));

    // The same guest through the library: every page of every working set is dirty, and so
    // are the ring pages the host wrote (tail), which only vm-memory's bitmap sees.
    let h = Harness::new(&w, 2, 64);
    let vm = h.vm.clone();
    vm.take_dirty_bitmap().unwrap(); // forget the loader's writes
    vm.start().unwrap();
    let digest = h.finish();
    assert_eq!(digest, DigestSink::of(&w.reference_all(2)));
    let bitmap = vm.take_dirty_bitmap().unwrap();
    let dirty = |page: u64| bitmap[(page / 64) as usize] >> (page % 64) & 1 == 1;
    for v in 0..2 {
        let first = vm.layout().data(v) / 4096;
        assert!(
            (first..first + 4 * 256).all(dirty),
            "working set of vCPU {v}"
        );
        assert!(dirty(vm.layout().ring(v) / 4096), "ring of vCPU {v}");
    }
    let again = vm.take_dirty_bitmap().unwrap();
    assert!(
        again.iter().all(|w| *w == 0),
        "the bitmap is reset after a fetch"
    );

    // Both vCPUs now sit in their thread after the done exit, outside KVM_RUN: stun still
    // reaches them, and unstun returns them to Done.
    for _ in 0..10 {
        let g = vm.stun().expect("stun of finished vCPUs");
        assert!((0..2).all(|v| vm.vcpu_stats(v).state() == VcpuState::Stunned));
        g.unstun().unwrap();
    }
    assert!((0..2).all(|v| settled_state(&vm, v) == VcpuState::Done));
}

/// A 64 MiB VM that ran [`short_dirty`] on 2 vCPUs to the reference digest.
fn short_dirty_done() -> Arc<Vm> {
    let w = short_dirty();
    let h = Harness::new(&w, 2, 64);
    let vm = h.vm.clone();
    vm.start().unwrap();
    assert_eq!(h.finish(), DigestSink::of(&w.reference_all(2)));
    vm
}

/// Pre-copy skips the pages nothing ever touched (`DirtyLog::never_touched`): the working
/// sets are not among them, most of a large guest's RAM is, and reading one maps it.
#[test]
fn pages_nothing_touched_are_found_and_reading_one_maps_it() {
    let vm = short_dirty_done();
    let log = vm.dirty_log();
    let untouched = log.never_touched().unwrap();
    for v in 0..2 {
        let first = vm.layout().data(v) / 4096;
        assert!(
            (first..first + 4 * 256).all(|p| !untouched.contains(p)),
            "the working set of vCPU {v} was written"
        );
    }
    let pages = 64 * 256;
    assert!(
        untouched.count() > pages / 2,
        "most of a 64 MiB guest running 8 MiB of working sets is untouched: {} of {pages}",
        untouched.count()
    );
    let p = untouched.runs()[0].0;
    let copy = log.copy_runs(&[(p, 1)]).unwrap();
    assert!(
        copy[0].data.iter().all(|b| *b == 0),
        "an untouched page reads as zeros"
    );
    assert!(
        !log.never_touched().unwrap().contains(p),
        "reading page {p} mapped it"
    );
}

/// A snapshot writes the pages nothing touched as holes without reading them: afterwards
/// they are still unmapped (a guest that runs on pays no copy-on-write fault for them), and
/// the memory file holds guest memory byte for byte.
#[test]
fn a_snapshot_leaves_untouched_pages_unmapped_and_saves_memory_exactly() {
    let vm = short_dirty_done();
    let log = vm.dirty_log();
    let before = log.never_touched().unwrap();
    assert!(
        before.count() > 64 * 256 / 2,
        "most of the guest is untouched"
    );
    let dir = std::env::temp_dir().join(format!("tandem-untouched-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("snap.mem");
    let args = monitor::CptArgs {
        mem_path: Some(path.clone()),
        ..Default::default()
    };
    vm.checkpoint_modules(&args).unwrap();
    assert_eq!(
        log.never_touched().unwrap(),
        before,
        "saving the snapshot mapped pages nothing had touched"
    );
    let file = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(file.len() as u64, vm.layout().mem_bytes);
    // Unaligned reads across touched and untouched pages give the same bytes.
    for v in 0..2u64 {
        let edge = vm.layout().data(v as u32) + 4 * 256 * 4096; // the end of a working set
        assert!(!before.contains(edge / 4096 - 1) && before.contains(edge / 4096));
        for (gpa, len) in [
            (edge - 100, 4096 * 3 + 200),
            (edge - 8192, 8192 + 17),
            (edge + 5, 7),
        ] {
            let mut buf = vec![0xa5u8; len];
            log.read_touched(&before, gpa, &mut buf).unwrap();
            assert!(
                buf == file[gpa as usize..gpa as usize + len],
                "read_touched({gpa:#x}, {len}) differs from the saved memory"
            );
        }
    }
    let mem: Vec<u8> = log
        .copy_runs(&monitor::DirtyPages::all(log.pages()).runs())
        .unwrap()
        .into_iter()
        .flat_map(|r| r.data)
        .collect();
    assert!(file == mem, "the memory file differs from guest memory");
    // Reading guest memory whole (above) mapped every page.
    assert_eq!(log.never_touched().unwrap().count(), 0);
}

/// In memory mapped from a snapshot's sparse file, the untouched pages are the file's holes
/// that nothing has read or written: the file's data pages are not among them, and reading
/// a hole maps it.
#[test]
fn untouched_pages_of_a_memory_file_are_its_holes() {
    use std::os::unix::fs::FileExt;
    require_kvm();
    let dir = std::env::temp_dir().join(format!("tandem-holes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mem");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(&[7u8; 4096], 5 * 4096).unwrap();
    f.write_all_at(&[9u8; 10 * 4096], 100 * 4096).unwrap();
    f.write_all_at(&[3u8; 1], 3000 * 4096 + 17).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut cfg = VmConfig::new(16, 1);
    cfg.memory_file = Some(path);
    cfg.restoring = true;
    let (tx, _rx) = crossbeam_channel::unbounded();
    let vm = Vm::new(&cfg, ModuleTable::standard(vec![]), tx).unwrap();
    let log = vm.dirty_log();
    let untouched = log.never_touched().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let data: Vec<u64> = [5].into_iter().chain(100..110).chain([3000]).collect();
    for &p in &data {
        assert!(!untouched.contains(p), "page {p} holds the file's data");
    }
    for p in [4, 6, 50, 99, 110, 2999, 3001, 4095] {
        assert!(untouched.contains(p), "page {p} is a hole nothing touched");
    }
    assert!(
        untouched.count() > 4096 - 64,
        "{} untouched",
        untouched.count()
    );
    let copy = log.copy_runs(&[(5, 1), (50, 1), (3000, 1)]).unwrap();
    assert!(copy[0].data.iter().all(|&b| b == 7));
    assert!(copy[1].data.iter().all(|&b| b == 0));
    assert_eq!(copy[2].data[17], 3);
    assert!(
        !log.never_touched().unwrap().contains(50),
        "reading the hole at page 50 mapped it"
    );
}

#[test]
fn a_thousand_stuns_stop_every_vcpu_and_the_run_still_completes_exactly() {
    let w = workload(
        "dirty",
        &[
            ("iters", "40M"),
            ("pages", "4"),
            ("ws_mib", "4"),
            ("record_every", "100k"),
        ],
    );
    let h = Harness::new(&w, 4, 64);
    let vm = h.vm.clone();
    vm.start().unwrap();
    let mut moved_between_stuns = 0;
    let mut last = vec![0u64; 4];
    let mut worst = Duration::ZERO;
    for _ in 0..1000 {
        let guard = vm.stun().expect("stun");
        worst = worst.max(guard.report().latency);
        for v in 0..4 {
            let s = vm.vcpu_stats(v).state();
            assert!(
                matches!(s, VcpuState::Stunned),
                "vCPU {v} is {s:?} while stunned"
            );
        }
        let before: Vec<u64> = (0..4).map(|v| vm.progress(v).unwrap()).collect();
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_micros(100) {
            std::hint::spin_loop();
        }
        let after: Vec<u64> = (0..4).map(|v| vm.progress(v).unwrap()).collect();
        assert_eq!(before, after, "a vCPU made progress while stunned");
        if before.iter().zip(&last).any(|(b, l)| b > l) {
            moved_between_stuns += 1;
        }
        last = before.clone();
        guard.unstun().expect("unstun");
        // Give the unstunned guest the chance to run: 200 µs, then up to 20 ms more while no
        // counter has moved (SCHED_IDLE vCPUs wait for a free core while the other tests of
        // this file run their guests on the same two cores). A guest that unstun did not let
        // run never moves, and the count below stays low.
        std::thread::sleep(Duration::from_micros(200));
        let waiting = Instant::now();
        while waiting.elapsed() < Duration::from_millis(20)
            && (0..4).all(|v| vm.progress(v).unwrap() == before[v as usize])
        {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    for v in 0..4 {
        let s = settled_state(&vm, v);
        assert_eq!(
            s,
            VcpuState::Running,
            "vCPU {v} must still be running after 1000 stuns"
        );
    }
    let stuns: u64 = (0..4)
        .map(|v| {
            vm.vcpu_stats(v)
                .stuns
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert_eq!(stuns, 4000);
    let digest = h.finish();
    assert_eq!(digest, DigestSink::of(&w.reference_all(4)));
    assert!(
        moved_between_stuns > 700,
        "the guest must run between stuns (moved {moved_between_stuns} times of 1000)"
    );
    eprintln!("worst stun latency over 1000 stuns: {worst:?}");
}

/// Puts every vCPU at CPL0 on `cli; hlt` so it blocks inside KVM_RUN.
struct HaltAtCpl0;

impl Module for HaltAtCpl0 {
    fn name(&self) -> &'static str {
        "HaltAtCpl0"
    }
    fn init_per_thread(&self, vcpu: &mut VcpuContext) -> monitor::Result<()> {
        let mut sregs = vcpu.fd.get_sregs().unwrap();
        sregs.cs.selector = monitor::layout::KERNEL_CS;
        sregs.cs.dpl = 0;
        for s in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            s.selector = monitor::layout::KERNEL_DS;
            s.dpl = 0;
        }
        vcpu.fd.set_sregs(&sregs).unwrap();
        Ok(())
    }
}

#[test]
fn stun_reaches_vcpus_blocked_in_hlt_and_in_an_exit() {
    require_kvm();
    let (tx, _rx) = crossbeam_channel::unbounded();
    let modules = ModuleTable::standard(vec![Arc::new(HaltAtCpl0)]);
    assert_eq!(modules.names(), ["MainMem", "CPU", "Irqchip", "HaltAtCpl0"]);
    let vm = Vm::new(&VmConfig::new(32, 2), modules, tx).unwrap();
    vm.load_image(monitor::layout::LOAD_ADDR, &[0xfa, 0xf4, 0xeb, 0xfd])
        .unwrap(); // cli; hlt; jmp hlt
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(300)); // let both vCPUs reach the hlt
    for round in 0..20 {
        let g = vm.stun().unwrap_or_else(|e| panic!("round {round}: {e}"));
        for v in 0..2 {
            assert_eq!(vm.vcpu_stats(v).state(), VcpuState::Stunned);
        }
        g.unstun().unwrap();
    }
    for v in 0..2 {
        let s = vm.vcpu_stats(v);
        assert_eq!(
            settled_state(&vm, v),
            VcpuState::Running,
            "still halted, not failed"
        );
        assert!(
            s.kicks.load(std::sync::atomic::Ordering::Relaxed) >= 1,
            "vCPU {v} was kicked"
        );
    }
}

#[test]
fn typed_monitor_actions_pause_continue_and_refuse_out_of_order_steps() {
    let w = workload("counter", &[("iters", "400M"), ("record_every", "1M")]);
    let h = Harness::new(&w, 2, 32);
    let monitor = monitor::Monitor::spawn(h.vm.clone(), h.rpc.clone()).unwrap();
    let refused = monitor.sync_modules().unwrap_err().to_string();
    assert!(refused.contains("must be stunned"), "{refused}");
    assert!(monitor
        .unstun()
        .unwrap_err()
        .to_string()
        .contains("not stunned"));
    monitor.start().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    monitor.stun().unwrap();
    assert!(monitor
        .stun()
        .unwrap_err()
        .to_string()
        .contains("already stunned"));
    let a = monitor.progress().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(a, monitor.progress().unwrap());
    monitor.sync_modules().unwrap();
    monitor.unstun().unwrap();
    drop(monitor);
    assert_eq!(h.finish(), DigestSink::of(&w.reference_all(2)));
}

#[test]
fn the_monitor_refuses_checkpoint_steps_out_of_order() {
    use checkpoint::CptState;
    use monitor::{CptArgs, MonitorAction, UserRpc};
    let w = workload("counter", &[("iters", "400M"), ("record_every", "1M")]);
    let (tx, rx) = crossbeam_channel::unbounded();
    let vm = Arc::new(
        Vm::new(
            &VmConfig::new(32, 2),
            ModuleTable::standard(vec![]),
            tx.clone(),
        )
        .unwrap(),
    );
    vm.load_image(
        monitor::layout::LOAD_ADDR,
        &w.code(monitor::layout::LOAD_ADDR).unwrap(),
    )
    .unwrap();
    let monitor = monitor::Monitor::spawn(vm.clone(), tx).unwrap();
    let step = |state| {
        monitor
            .post(MonitorAction::CptStep {
                state,
                args: CptArgs::default(),
                snapshot: None,
            })
            .unwrap();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)).unwrap() {
                UserRpc::StepDone { state: s, result } => {
                    assert_eq!(s, state);
                    return result;
                }
                _ => continue,
            }
        }
    };
    monitor.stun().unwrap();
    // SAVE straight from NONE skips SAVE_SYNC and QUIESCE.
    let e = step(CptState::Save).unwrap_err();
    // The refusal crosses the monitor queue with its kind.
    assert!(matches!(e, monitor::Error::BadState { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("illegal checkpoint transition None → Save"),
        "{e}"
    );
    // The right order works, and RESTORE in the middle of a save is refused.
    step(CptState::SaveSync).unwrap();
    let e = step(CptState::Restore).unwrap_err().to_string();
    assert!(e.contains("SaveSync → Restore"), "{e}");
    step(CptState::Quiesce).unwrap();
    // While quiesced, actions other than checkpoint steps are refused.
    let e = monitor.unstun().unwrap_err().to_string();
    assert!(e.contains("checkpoint is in progress"), "{e}");
    let out = step(CptState::Save).unwrap();
    assert!(out.sections.iter().any(|s| s.name == "vcpu/1"));
    step(CptState::ContinueSync).unwrap();
    monitor.unstun().unwrap();
}
