//! The copy crew: helper threads, each pinned to one CPU, that share a large page copy with
//! the thread that asked for it (the epoch pause copies on the thread running the SAVE step,
//! while the vCPUs are stunned).
//!
//! ```text
//!   copier (on CPU c)                          helper pinned to CPU k, k ≠ c
//!   ──────────────────                         ─────────────────────────────
//!   queue every run: (index, gpa, buffer)
//!   wake the helpers of CPUs ≠ c  ───────────▶ wakes (≈ 15 µs here)
//!   pop a run, copy it, push it done  ◀─ one queue ─▶ pop a run, copy it, push it done
//!   …until the queue is empty                  …until the queue is empty, then sleeps
//!   wait for runs still being copied
//!   (at most one per helper)
//!   runs in their first order
//! ```
//!
//! A helper that wakes late finds the queue empty and sleeps again: the copier never waits
//! for a helper to wake, only for a run a helper has taken. So the copy is never slower than
//! the copier alone by more than one run.
//!
//! Why helpers pinned to CPUs, and not rayon's pool or a thread spawned for the copy (all
//! measured on this 2-CPU host, 2,060 pages, a helper copying half while the copier copies
//! the other half):
//!
//! - an unpinned thread woken by a copier that keeps running was often placed by the
//!   scheduler on the copier's own CPU (wake-affine) and ran only when the copier was
//!   preempted: p50 1.84–2.39 ms, against 0.94–1.20 ms for the copier alone and 0.80–0.86 ms
//!   with the helper pinned to the other CPU;
//! - rayon's pool avoids that by blocking the caller (two pool threads copy while the SAVE
//!   thread sleeps), but every copy pays the pool's wake-up and the caller's, with a long
//!   tail: at 4 MiB and 8 MiB hot sets the crew cut the pause's p99 from 3.7–5.8 ms to
//!   1.3–2.1 ms (`cargo xtask bench stall --hot-mib 4,8 --hz 20 --reps 3`, BENCHMARKS.md).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vm_memory::{Bytes, GuestAddress};

use crate::{Error, Result};

/// Helpers are started for at most `MAX_HELPERS + 1` CPUs, so a copy wakes at most this many
/// or one more (the copier's own CPU is skipped): memory bandwidth bounds the copy well before.
pub const MAX_HELPERS: usize = 3;

/// One run to copy: its place in the result, where it starts, how many bytes, and the buffer
/// to copy them into (resized by whoever copies it: a fresh buffer's zeroing is shared too).
pub struct Unit {
    /// Its place in the result.
    pub index: usize,
    /// Guest-physical address of its first byte.
    pub gpa: u64,
    /// Bytes to copy.
    pub len: usize,
    /// The buffer to copy into (any length; resized to `len`).
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Unit {
    /// Without the bytes (megabytes of them).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unit")
            .field("index", &self.index)
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("len", &self.len)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// A copy shared between the copier and the helpers it woke, out of any guest memory.
struct Job<M> {
    mem: M,
    /// Units the helpers copied (the crew's running total).
    helped: Arc<AtomicU64>,
    todo: Mutex<Vec<Unit>>,
    done: Mutex<Vec<Result<Unit>>>,
    /// Units not yet done (queued or being copied).
    left: AtomicUsize,
}

/// What a helper is handed: a job, whatever its memory type.
trait Work: Send + Sync {
    /// Copies units until none is left to take; returns how many this thread copied.
    fn work(&self) -> usize;
    /// Counts units a helper copied.
    fn helped(&self, n: usize);
}

impl<M> Work for Job<M>
where
    M: Bytes<GuestAddress> + Send + Sync,
    M::E: std::fmt::Display,
{
    fn helped(&self, n: usize) {
        self.helped.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn work(&self) -> usize {
        let mut n = 0;
        loop {
            let unit = self.todo.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(Unit {
                index,
                gpa,
                len,
                data,
            }) = unit
            else {
                return n;
            };
            let copied = fill(
                &self.mem,
                Unit {
                    index,
                    gpa,
                    len,
                    data,
                },
            );
            self.done
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(copied);
            self.left.fetch_sub(1, Ordering::AcqRel);
            n += 1;
        }
    }
}

/// Copies one unit out of `mem` (the one copy both the crew and a lone caller use).
///
/// The pages are appended to the emptied buffer, which only needs the capacity: making it
/// `len` long first would zero it (a pass as long as the copy's, measured at a fifth of the
/// pause's copy time in `perf` of `run-pair`) just to overwrite it.
pub(crate) fn fill<M>(mem: &M, mut unit: Unit) -> Result<Unit>
where
    M: Bytes<GuestAddress>,
    M::E: std::fmt::Display,
{
    let (len, gpa) = (unit.len, unit.gpa);
    unit.data.clear();
    mem.write_all_volatile_to(GuestAddress(gpa), &mut unit.data, len)
        .map_err(|e| Error::Memory(format!("copying {len} bytes at {gpa:#x}: {e}")))?;
    Ok(unit)
}

struct Helper {
    cpu: usize,
    jobs: Option<Sender<Arc<dyn Work>>>,
    thread: Option<JoinHandle<()>>,
}

/// Helper threads pinned one to each of the first CPUs this process may run on (up to
/// [`MAX_HELPERS`] + 1 CPUs, none on a one-CPU host). They sleep until a copy wakes them.
pub struct Crew {
    helpers: Vec<Helper>,
    helped: Arc<AtomicU64>,
}

impl Crew {
    /// Starts the helpers and waits until each runs pinned, at the normal scheduling policy
    /// whatever the caller's (a vCPU thread may be SCHED_IDLE). A helper that cannot be
    /// pinned stops at once and is not counted: unpinned it would not help (module doc).
    pub fn new() -> Crew {
        let cpus = allowed_cpus();
        if cpus.len() < 2 {
            return Crew {
                helpers: Vec::new(),
                helped: Arc::default(),
            };
        }
        let helpers = cpus
            .into_iter()
            .take(MAX_HELPERS + 1)
            .filter_map(|cpu| {
                let (tx, rx) = channel::<Arc<dyn Work>>();
                let (ready_tx, ready) = channel::<bool>();
                let thread = std::thread::Builder::new()
                    .name(format!("tandem-copy-{cpu}"))
                    .spawn(move || {
                        let pinned = pin_normal(cpu)
                            .map_err(|e| log::debug!("copy helper for CPU {cpu} not pinned: {e}"))
                            .is_ok();
                        let _ = ready_tx.send(pinned);
                        if !pinned {
                            return;
                        }
                        while let Ok(job) = rx.recv() {
                            job.helped(job.work());
                        }
                    })
                    .map_err(|e| log::debug!("no copy helper for CPU {cpu}: {e}"))
                    .ok()?;
                // Only a helper running pinned counts (an unpinned one would not help).
                if ready.recv() != Ok(true) {
                    let _ = thread.join();
                    return None;
                }
                Some(Helper {
                    cpu,
                    jobs: Some(tx),
                    thread: Some(thread),
                })
            })
            .collect();
        Crew {
            helpers,
            helped: Arc::default(),
        }
    }

    /// How many helpers were started.
    pub fn helpers(&self) -> usize {
        self.helpers.len()
    }

    /// Units the helpers have copied so far (the rest were copied by the threads that asked).
    pub fn helped_units(&self) -> u64 {
        self.helped.load(Ordering::Relaxed)
    }

    /// Copies `units` out of `mem` with the helpers of the other CPUs; gives them back with
    /// their data, in `index` order (`index` must run from 0 to `units.len()`, each once), or
    /// the first error (every unit is waited for either way).
    pub fn copy<M>(&self, mem: &M, units: Vec<Unit>) -> Result<Vec<Unit>>
    where
        M: Bytes<GuestAddress> + Clone + Send + Sync + 'static,
        M::E: std::fmt::Display,
    {
        let count = units.len();
        let job = Arc::new(Job {
            mem: mem.clone(),
            helped: self.helped.clone(),
            left: AtomicUsize::new(count),
            todo: Mutex::new(units.into_iter().rev().collect()),
            done: Mutex::new(Vec::with_capacity(count)),
        });
        let here = current_cpu();
        for h in self.helpers.iter().filter(|h| Some(h.cpu) != here) {
            if let Some(tx) = &h.jobs {
                // A helper that has stopped only leaves its share to the others.
                let _ = tx.send(job.clone());
            }
        }
        job.work();
        // Units still being copied by helpers: at most one each.
        let mut spins = 0u32;
        while job.left.load(Ordering::Acquire) > 0 {
            spins += 1;
            if spins % 1024 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let done = std::mem::take(&mut *job.done.lock().unwrap_or_else(|p| p.into_inner()));
        let mut out = done.into_iter().collect::<Result<Vec<Unit>>>()?;
        out.sort_unstable_by_key(|u| u.index);
        Ok(out)
    }
}

impl Default for Crew {
    fn default() -> Self {
        Crew::new()
    }
}

impl Drop for Crew {
    fn drop(&mut self) {
        for h in &mut self.helpers {
            // Closing the channel ends the helper's loop after the job in hand.
            h.jobs = None;
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// The CPUs this thread may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it, and CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// The CPU this thread runs on now, when the kernel says.
fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments and touches no memory of ours.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

/// Pins this thread to `cpu` and gives it the normal policy (SCHED_OTHER; its nice value is
/// the creating thread's).
fn pin_normal(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it (cpu is below
    // CPU_SETSIZE: it came from allowed_cpus), and sched_setaffinity reads exactly
    // size_of::<cpu_set_t>() bytes of it. sched_param is plain data read by the call.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(bytes: usize) -> crate::GuestMem {
        crate::GuestMem::from_ranges(&[(GuestAddress(0), bytes)]).expect("anonymous guest memory")
    }

    #[test]
    fn the_crew_copies_every_run_in_order_whoever_copies_it() {
        let m = mem(64 << 20);
        for p in 0..(64u64 << 20) / 4096 {
            m.write_obj(p ^ 0xabcd, GuestAddress(p * 4096 + 8))
                .expect("in range");
        }
        let crew = Crew::new();
        let runs: Vec<(u64, usize)> = (0..40u64)
            .map(|i| (i * 37 * 4096, 4096 * (1 + i as usize % 9)))
            .collect();
        for _ in 0..20 {
            let units = runs
                .iter()
                .enumerate()
                .map(|(index, &(gpa, len))| Unit {
                    index,
                    gpa,
                    len,
                    data: vec![0xee; len / 2],
                })
                .collect();
            let out = crew.copy(&m, units).expect("in range");
            assert_eq!(out.len(), runs.len());
            for (r, &(gpa, len)) in out.iter().zip(&runs) {
                assert_eq!(r.gpa, gpa);
                let mut want = vec![0u8; len];
                m.read_slice(&mut want, GuestAddress(gpa))
                    .expect("in range");
                assert_eq!(r.data, want);
            }
        }
    }

    #[test]
    fn helpers_on_other_cpus_take_part_in_a_large_copy() {
        if allowed_cpus().len() < 2 {
            eprintln!("skipped: one CPU, no helpers");
            return;
        }
        let m = mem(128 << 20);
        let crew = Crew::new();
        assert!(crew.helpers() >= 2, "a helper per CPU: {}", crew.helpers());
        // 64 units of 2 MiB take milliseconds; a helper wakes in tens of µs. The copier keeps
        // running all along, so a helper placed on its CPU would copy nothing (module doc).
        for _ in 0..5 {
            let units = (0..64u64)
                .map(|i| Unit {
                    index: i as usize,
                    gpa: i << 21,
                    len: 2 << 20,
                    data: Vec::new(),
                })
                .collect();
            crew.copy(&m, units).expect("in range");
            if crew.helped_units() > 0 {
                return;
            }
        }
        panic!("no helper copied anything in 5 copies of 128 MiB");
    }

    #[test]
    fn every_helper_is_pinned_to_its_own_cpu() {
        let crew = Crew::new();
        let mut seen = 0;
        for task in std::fs::read_dir("/proc/self/task").expect("procfs") {
            let dir = task.expect("task").path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let Some(cpu) = comm.trim().strip_prefix("tandem-copy-") else {
                continue;
            };
            let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(str::trim);
            assert_eq!(allowed, Some(cpu), "{comm}");
            seen += 1;
        }
        assert!(seen >= crew.helpers(), "{seen} helper threads found");
    }

    #[test]
    fn a_run_outside_memory_is_an_error_and_the_others_are_still_waited_for() {
        let m = mem(1 << 20);
        let crew = Crew::new();
        let units = (0..8u64)
            .map(|i| Unit {
                index: i as usize,
                gpa: if i == 5 { 2 << 20 } else { i * 4096 },
                len: 4096,
                data: Vec::new(),
            })
            .collect();
        let e = crew
            .copy(&m, units)
            .expect_err("run 5 is outside guest memory");
        assert!(matches!(e, Error::Memory(_)), "{e}");
    }
}
