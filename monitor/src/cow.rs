//! Copy-on-write epochs with userfaultfd write-protect — an opt-in experiment (issue 15),
//! measured against the stop-and-copy epoch by `cargo xtask bench tracking`.
//!
//! ```text
//!  stun ─ take the dirty set (bitmap) ─ protect(): UFFDIO_WRITEPROTECT each dirty run ─ unstun
//!                                                   │
//!     copier (copy()): for each chunk of a run:     │   handler thread (reads the uffd):
//!       claim PENDING pages → COPYING, copy them,   │     a guest (or host) write to a
//!       mark DONE, un-protect the DONE pages        │     protected page blocks its thread
//!       of the chunk (wakes a blocked writer)       │     and queues a WP fault: claim the
//!     then wait until every page is DONE            │     page, copy it, DONE, un-protect it
//!                                                   │     (wakes the writer); a page the
//!                                                   │     copier holds is woken by its unprotect
//! ```
//!
//! A page is copied exactly once, by whoever claims it (a compare-and-swap on its state), and
//! un-protected only once it is copied, so the copy of every page equals memory at the stun
//! however the guest writes meanwhile. A guest write reaches the uffd through KVM: the
//! write-protect changes the host PTEs, the MMU notifier makes KVM drop its mappings of those
//! pages, and KVM's next write fault resolves the page through `get_user_pages(FOLL_WRITE)`,
//! which sees the uffd-wp bit and blocks the vCPU thread until the page is un-protected.
//!
//! Guest RAM must be one anonymous private (or shmem) mapping; the uffd is opened without
//! `UFFD_USER_MODE_ONLY` (KVM's faults are kernel-mode faults), which needs
//! `CAP_SYS_PTRACE` or `vm.unprivileged_userfaultfd = 1`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::dirty::PageRun;
use crate::layout::PAGE_SIZE;
use crate::shared::GuestMem;
use crate::{Error, Result};

/// The userfaultfd ABI (linux/userfaultfd.h); libc has only the syscall number.
mod uffd {
    #![allow(missing_docs)]
    pub const UFFD_API: u64 = 0xaa;
    pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
    pub const REGISTER_MODE_WP: u64 = 1 << 1;
    pub const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
    pub const EVENT_PAGEFAULT: u8 = 0x12;
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

    #[repr(C)]
    #[derive(Default)]
    pub struct Api {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    pub struct Range {
        pub start: u64,
        pub len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    pub struct Register {
        pub range: Range,
        pub mode: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    pub struct WriteProtect {
        pub range: Range,
        pub mode: u64,
    }
    /// `struct uffd_msg` (32 bytes, packed) as the page-fault variant.
    #[repr(C, packed)]
    #[derive(Default, Clone, Copy)]
    pub struct Msg {
        pub event: u8,
        pub reserved1: u8,
        pub reserved2: u16,
        pub reserved3: u32,
        pub flags: u64,
        pub address: u64,
        pub ptid: u32,
        pub pad: u32,
    }
    const _: () = assert!(std::mem::size_of::<Msg>() == 32);

    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, 0xaa, 0x3f, Api);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_REGISTER, 0xaa, 0x00, Register);
    vmm_sys_util::ioctl_ior_nr!(UFFDIO_WAKE, 0xaa, 0x02, Range);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, 0xaa, 0x06, WriteProtect);
}

/// Page states during an epoch.
const IDLE: u8 = 0;
const PENDING: u8 = 1;
const COPYING: u8 = 2;
const DONE: u8 = 3;

/// Pages the copier claims, copies and un-protects at a time.
pub const CHUNK_PAGES: u64 = 64;

/// Counters of the copy-on-write tracker (over its whole life).
#[derive(Debug, Default)]
pub struct CowStats {
    /// Write-protect faults read from the uffd.
    pub faults: AtomicU64,
    /// Pages the fault handler copied (the rest the copier did).
    pub handler_copies: AtomicU64,
    /// Faults on pages already copied or being copied by the copier (woken by its unprotect).
    pub late_faults: AtomicU64,
    /// UFFDIO_WRITEPROTECT calls (protect and unprotect).
    pub wp_calls: AtomicU64,
    /// Nanoseconds the handler spent serving faults (copy + unprotect).
    pub handler_ns: AtomicU64,
}

/// What one epoch's copy did.
#[derive(Clone, Copy, Debug, Default)]
pub struct CowEpochReport {
    /// Pages in the epoch.
    pub pages: u64,
    /// Write-protect faults during the epoch (from protect to the end of the copy).
    pub faults: u64,
    /// Pages the fault handler copied.
    pub handler_copies: u64,
    /// From the end of `protect` to every page copied.
    pub copy_time: Duration,
    /// How long `protect` took (inside the stun).
    pub protect_time: Duration,
}

/// The pages of one epoch being copied, shared by the copier and the fault handler.
struct EpochCopy {
    /// (first page, pages), ascending.
    runs: Vec<(u64, u64)>,
    /// One buffer per run; written through `ptrs` only, one page by one claimant.
    bufs: Vec<Vec<u8>>,
    ptrs: Vec<*mut u8>,
}

// SAFETY: the raw pointers point into `bufs`, which is neither moved nor resized while the
// epoch is shared; each page of them is written by the one thread that claimed the page
// (compare-and-swap PENDING → COPYING), and read only after every page is DONE (acquire).
unsafe impl Send for EpochCopy {}
// SAFETY: as for Send.
unsafe impl Sync for EpochCopy {}

impl EpochCopy {
    /// The destination of page `page`, if the epoch holds it.
    fn dst(&self, page: u64) -> Option<*mut u8> {
        let i = self
            .runs
            .partition_point(|&(f, _)| f <= page)
            .checked_sub(1)?;
        let (first, n) = self.runs[i];
        // SAFETY: page - first < n, and buffer i holds n pages.
        (page < first + n)
            .then(|| unsafe { self.ptrs[i].add(((page - first) * PAGE_SIZE) as usize) })
    }
}

struct Inner {
    uffd: OwnedFd,
    mem: GuestMem,
    host_base: u64,
    pages: u64,
    state: Vec<AtomicU8>,
    epoch: Mutex<Option<Arc<EpochCopy>>>,
    stop: AtomicBool,
    stats: CowStats,
}

/// Copy-on-write epochs over a VM's RAM (see the module doc).
pub struct CowTracker {
    inner: Arc<Inner>,
    handler: Option<JoinHandle<()>>,
}

fn io_err(what: &str) -> Error {
    Error::Host(format!("{what}: {}", std::io::Error::last_os_error()))
}

fn open_uffd(features: u64) -> Result<(OwnedFd, u64)> {
    // SAFETY: the userfaultfd syscall takes flags only and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io_err("userfaultfd"));
    }
    // SAFETY: `fd` is a fresh fd this process owns and nothing else closes.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = uffd::Api {
        api: uffd::UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes `api`, a valid uffdio_api.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&fd, uffd::UFFDIO_API(), &mut api) };
    if ret < 0 {
        return Err(io_err("UFFDIO_API"));
    }
    Ok((fd, api.features))
}

impl Inner {
    fn writeprotect(&self, first: u64, n: u64, protect: bool) -> Result<()> {
        self.stats.wp_calls.fetch_add(1, Ordering::Relaxed);
        let mut wp = uffd::WriteProtect {
            range: uffd::Range {
                start: self.host_base + first * PAGE_SIZE,
                len: n * PAGE_SIZE,
            },
            mode: if protect {
                uffd::WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads `wp`; the range lies in the registered guest RAM.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                &self.uffd,
                uffd::UFFDIO_WRITEPROTECT(),
                &mut wp,
            )
        };
        if ret < 0 {
            return Err(io_err("UFFDIO_WRITEPROTECT"));
        }
        Ok(())
    }

    fn wake(&self, page: u64) {
        let r = uffd::Range {
            start: self.host_base + page * PAGE_SIZE,
            len: PAGE_SIZE,
        };
        // SAFETY: UFFDIO_WAKE reads `r`, a range of the registered guest RAM.
        unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.uffd, uffd::UFFDIO_WAKE(), &r) };
    }

    /// Copies page `page` (claimed by the caller) from guest memory into the epoch's buffer.
    fn copy_page(&self, epoch: &EpochCopy, page: u64) -> Result<()> {
        let dst = epoch
            .dst(page)
            .ok_or_else(|| Error::Memory(format!("page {page} is not in the epoch")))?;
        // SAFETY: `dst` is one page inside a live buffer of `epoch`, which only this thread
        // writes (it claimed the page).
        let buf = unsafe { std::slice::from_raw_parts_mut(dst, PAGE_SIZE as usize) };
        self.mem
            .read_slice(buf, GuestAddress(page * PAGE_SIZE))
            .map_err(|e| Error::Memory(e.to_string()))
    }

    fn handle_fault(&self, addr: u64) {
        let t = Instant::now();
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        let page = addr.wrapping_sub(self.host_base) / PAGE_SIZE;
        if page >= self.pages {
            return;
        }
        let st = &self.state[page as usize];
        if st
            .compare_exchange(PENDING, COPYING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let epoch = self.epoch.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(e) = epoch {
                if let Err(err) = self.copy_page(&e, page) {
                    log::error!("copy-on-write: {err}");
                }
            }
            st.store(DONE, Ordering::Release);
            if let Err(e) = self.writeprotect(page, 1, false) {
                log::error!("copy-on-write: {e}");
            }
            self.stats.handler_copies.fetch_add(1, Ordering::Relaxed);
        } else {
            // The copier holds it (its unprotect wakes the writer) or it is done already (the
            // writer may have queued before the unprotect): a wake is harmless either way.
            self.stats.late_faults.fetch_add(1, Ordering::Relaxed);
            if st.load(Ordering::Acquire) != COPYING {
                self.wake(page);
            }
        }
        self.stats
            .handler_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn handler_loop(&self) {
        let mut msgs = [uffd::Msg::default(); 64];
        while !self.stop.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, 20) };
            if r <= 0 {
                continue;
            }
            // SAFETY: reads whole uffd_msg structs into `msgs`, which has room for 64.
            let n = unsafe {
                libc::read(
                    self.uffd.as_raw_fd(),
                    msgs.as_mut_ptr().cast(),
                    std::mem::size_of_val(&msgs),
                )
            };
            if n <= 0 {
                continue;
            }
            for m in &msgs[..n as usize / std::mem::size_of::<uffd::Msg>()] {
                let (event, flags, address) = (m.event, m.flags, m.address);
                if event == uffd::EVENT_PAGEFAULT && flags & uffd::PAGEFAULT_FLAG_WP != 0 {
                    self.handle_fault(address);
                }
            }
        }
    }
}

impl CowTracker {
    /// Registers `mem` (one region, from guest address 0) for write-protect faults and starts
    /// the fault handler thread.
    pub fn new(mem: &GuestMem) -> Result<CowTracker> {
        let mut regions = mem.iter();
        let region = regions
            .next()
            .ok_or_else(|| Error::Memory("no guest memory".into()))?;
        if regions.next().is_some() || region.start_addr().0 != 0 {
            return Err(Error::Config(
                "copy-on-write epochs need guest RAM as one region from 0".into(),
            ));
        }
        let host_base = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))? as u64;
        let len = region.len();
        let want = uffd::FEATURE_PAGEFAULT_FLAG_WP | uffd::FEATURE_WP_UNPOPULATED;
        let (fd, features) =
            open_uffd(want).or_else(|_| open_uffd(uffd::FEATURE_PAGEFAULT_FLAG_WP))?;
        if features & uffd::FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(Error::Host(
                "userfaultfd offers no write-protect here".into(),
            ));
        }
        let mut reg = uffd::Register {
            range: uffd::Range {
                start: host_base,
                len,
            },
            mode: uffd::REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes `reg`; the range is guest RAM, mapped for
        // as long as `mem` (which the tracker keeps) lives.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(&fd, uffd::UFFDIO_REGISTER(), &mut reg)
        };
        if ret < 0 {
            return Err(io_err("UFFDIO_REGISTER (write-protect mode)"));
        }
        let pages = len / PAGE_SIZE;
        let inner = Arc::new(Inner {
            uffd: fd,
            mem: mem.clone(),
            host_base,
            pages,
            state: (0..pages).map(|_| AtomicU8::new(IDLE)).collect(),
            epoch: Mutex::new(None),
            stop: AtomicBool::new(false),
            stats: CowStats::default(),
        });
        let i2 = inner.clone();
        let handler = std::thread::Builder::new()
            .name("cow-faults".into())
            .spawn(move || i2.handler_loop())
            .map_err(Error::Thread)?;
        log::debug!("copy-on-write epochs: uffd features {features:#x}");
        Ok(CowTracker {
            inner,
            handler: Some(handler),
        })
    }

    /// Counters.
    pub fn stats(&self) -> &CowStats {
        &self.inner.stats
    }

    /// While the VM is stunned: write-protects `runs` (first page, pages; ascending, as
    /// [`crate::DirtyPages::runs`] gives them) and sets up their copy. Unstun next, then
    /// [`CowTracker::copy`].
    pub fn protect(&self, runs: &[(u64, u64)]) -> Result<CowEpoch> {
        let t = Instant::now();
        let inner = &self.inner;
        let mut bufs: Vec<Vec<u8>> = runs
            .iter()
            .map(|&(_, n)| vec![0u8; (n * PAGE_SIZE) as usize])
            .collect();
        let ptrs = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        for &(first, n) in runs {
            for p in first..first + n {
                inner.state[p as usize].store(PENDING, Ordering::Release);
            }
        }
        *inner.epoch.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(EpochCopy {
            runs: runs.to_vec(),
            bufs: std::mem::take(&mut bufs),
            ptrs,
        }));
        for &(first, n) in runs {
            if let Err(e) = inner.writeprotect(first, n, true) {
                self.abandon();
                return Err(e);
            }
        }
        Ok(CowEpoch {
            protect_time: t.elapsed(),
            protected_at: Instant::now(),
            faults_before: inner.stats.faults.load(Ordering::Relaxed),
            handler_before: inner.stats.handler_copies.load(Ordering::Relaxed),
            pages: runs.iter().map(|r| r.1).sum(),
        })
    }

    /// After the unstun: copies every page of the epoch the fault handler has not, un-protecting
    /// as it goes, and waits for the handler's; returns the pages as they were at
    /// [`CowTracker::protect`].
    pub fn copy(&self, epoch: CowEpoch) -> Result<(Vec<PageRun>, CowEpochReport)> {
        let r = self.copy_inner(epoch);
        if r.is_err() {
            self.abandon();
        }
        r
    }

    /// After a failure: un-protects every page of the epoch (so that no writer stays blocked)
    /// and forgets it. Its copy is lost.
    fn abandon(&self) {
        let inner = &self.inner;
        let e = inner.epoch.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(e) = e {
            for &(first, n) in &e.runs {
                if let Err(err) = inner.writeprotect(first, n, false) {
                    log::error!("copy-on-write: cannot un-protect pages {first}+{n}: {err}");
                }
                for p in first..first + n {
                    inner.state[p as usize].store(IDLE, Ordering::Release);
                }
            }
        }
    }

    fn copy_inner(&self, epoch: CowEpoch) -> Result<(Vec<PageRun>, CowEpochReport)> {
        let inner = &self.inner;
        let e = inner
            .epoch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Error::BadState {
                action: "copy a copy-on-write epoch",
                why: "none is protected".into(),
            })?;
        for &(first, n) in &e.runs {
            let mut c = first;
            while c < first + n {
                let end = (c + CHUNK_PAGES).min(first + n);
                for p in c..end {
                    let st = &inner.state[p as usize];
                    if st
                        .compare_exchange(PENDING, COPYING, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        inner.copy_page(&e, p)?;
                        st.store(DONE, Ordering::Release);
                    }
                }
                // Un-protect the DONE pages of the chunk (a page the handler is still copying
                // stays protected; the handler un-protects it).
                let mut p = c;
                while p < end {
                    if inner.state[p as usize].load(Ordering::Acquire) != DONE {
                        p += 1;
                        continue;
                    }
                    let s = p;
                    while p < end && inner.state[p as usize].load(Ordering::Acquire) == DONE {
                        p += 1;
                    }
                    inner.writeprotect(s, p - s, false)?;
                }
                c = end;
            }
        }
        // Wait for pages the handler is still copying.
        for &(first, n) in &e.runs {
            for p in first..first + n {
                while inner.state[p as usize].load(Ordering::Acquire) != DONE {
                    std::thread::yield_now();
                }
            }
        }
        let copy_time = epoch.protected_at.elapsed();
        drop(e);
        let e = inner
            .epoch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("the epoch taken above");
        // The handler may hold a clone for a moment (a fault it is finishing).
        let mut e = e;
        let e = loop {
            match Arc::try_unwrap(e) {
                Ok(e) => break e,
                Err(back) => {
                    e = back;
                    std::thread::yield_now();
                }
            }
        };
        for &(first, n) in &e.runs {
            for p in first..first + n {
                inner.state[p as usize].store(IDLE, Ordering::Release);
            }
        }
        let runs = e
            .runs
            .iter()
            .zip(e.bufs)
            .map(|(&(first, _), data)| PageRun {
                gpa: first * PAGE_SIZE,
                data,
            })
            .collect();
        let report = CowEpochReport {
            pages: epoch.pages,
            faults: inner.stats.faults.load(Ordering::Relaxed) - epoch.faults_before,
            handler_copies: inner.stats.handler_copies.load(Ordering::Relaxed)
                - epoch.handler_before,
            copy_time,
            protect_time: epoch.protect_time,
        };
        Ok((runs, report))
    }
}

/// An epoch between [`CowTracker::protect`] and [`CowTracker::copy`].
#[must_use = "an epoch's pages stay write-protected until it is copied"]
pub struct CowEpoch {
    protect_time: Duration,
    protected_at: Instant,
    faults_before: u64,
    handler_before: u64,
    pages: u64,
}

impl Drop for CowTracker {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        // Closing the uffd (with the last Arc) un-registers the range and wakes every waiter.
    }
}
