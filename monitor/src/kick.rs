//! Kicking a vCPU thread out of `KVM_RUN`.
//!
//! The controller sets `kvm_run.immediate_exit` through its own mapping of the vCPU's run
//! area and then signals the thread. Whichever comes first wins: a thread inside `KVM_RUN` is
//! interrupted by the signal (`EINTR`), a thread about to enter it returns at once because of
//! `immediate_exit`. The vCPU thread clears `immediate_exit` *before* it drains its cross-call
//! channel, so a kick is never lost (the same scheme as Firecracker and Cloud Hypervisor).

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Once;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::{Error, Result};

/// Offset of the kick signal above SIGRTMIN.
const KICK_SIGNAL_OFFSET: libc::c_int = 0;

/// The signal number used to kick vCPU threads.
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal's only job is to make KVM_RUN return EINTR.
}

/// Installs the (empty) kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            result = Err(Error::Host(format!(
                "cannot install the vCPU kick signal handler: {e}"
            )));
        }
    });
    result
}

/// A second, shared mapping of one vCPU's `kvm_run` page, owned by the controller side.
///
/// Keeping our own mapping (instead of borrowing the one inside `VcpuFd`) means the pointer
/// stays valid however long the vCPU thread lives: the mapping holds its own reference to the
/// vCPU file.
pub(crate) struct KvmRunMap {
    ptr: NonNull<kvm_run>,
    size: usize,
}

// SAFETY: the mapping is process-wide shared memory; the only field we touch through it is the
// one-byte `immediate_exit`, written with volatile stores that the kernel reads at KVM_RUN entry.
unsafe impl Send for KvmRunMap {}
// SAFETY: see `Send`; concurrent byte stores to `immediate_exit` are benign.
unsafe impl Sync for KvmRunMap {}

impl KvmRunMap {
    pub(crate) fn new(fd: &VcpuFd, size: usize) -> Result<Self> {
        if size < std::mem::size_of::<kvm_run>() {
            return Err(Error::Host(format!(
                "KVM's vCPU mmap size {size} is too small"
            )));
        }
        // SAFETY: we map `size` bytes (KVM_GET_VCPU_MMAP_SIZE) of a valid vCPU fd, shared and
        // read/write, exactly as KVM documents for the kvm_run area; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Host(format!(
                "cannot map the vCPU run area: {}",
                std::io::Error::last_os_error()
            )));
        }
        let ptr = NonNull::new(p.cast::<kvm_run>()).ok_or(Error::Stopped)?;
        Ok(KvmRunMap { ptr, size })
    }

    /// Makes the next (or current) `KVM_RUN` of this vCPU return at once.
    pub(crate) fn request_exit(&self) {
        // SAFETY: `ptr` points to a live kvm_run mapping (unmapped only in Drop); a volatile
        // byte store to `immediate_exit` is what KVM expects from userspace.
        unsafe {
            std::ptr::write_volatile(
                std::ptr::addr_of_mut!((*self.ptr.as_ptr()).immediate_exit),
                1,
            )
        };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for KvmRunMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`size` are exactly what mmap returned and nothing uses them afterwards.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.size) };
    }
}
