//! A TAP interface: ethernet frames between this process and the host's network stack.
//!
//! ```text
//!  guest ─TX queue─▶ Net ─write(fd)─▶ /dev/net/tun ─▶ interface NAME receives the frame
//!  guest ◀─RX queue─ Net ◀─read(fd)── /dev/net/tun ◀─ interface NAME transmits a frame
//! ```
//!
//! Opened `IFF_TAP | IFF_NO_PI` (no packet-information prefix, no vnet header: the device adds
//! and strips the virtio-net header itself and offers no offloads) and non-blocking. Each
//! `read` returns one whole frame, each `write` sends one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{Error, Result};

/// Longest interface name (IFNAMSIZ − 1).
pub const MAX_NAME_LEN: usize = 15;

/// `struct ifreq` with the `ifr_flags` member of its union (40 bytes on x86-64).
#[repr(C)]
struct IfReqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Like [`Tap::open`], but while the TAP is busy (EBUSY: a process that is dying still
    /// holds it, as when a standby on the same host takes over from a killed primary) tries
    /// again for up to `patience`.
    pub fn open_patiently(name: &str, patience: std::time::Duration) -> Result<Self> {
        let t0 = std::time::Instant::now();
        loop {
            match Self::open(name) {
                Err(Error::Tap { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && t0.elapsed() < patience =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => return r,
            }
        }
    }

    /// Opens (creating it if needed, which takes CAP_NET_ADMIN) the TAP interface `name`;
    /// `name` may contain `%d` for the kernel to pick a number.
    pub fn open(name: &str) -> Result<Self> {
        let err = |source| Error::Tap {
            name: name.to_string(),
            source,
        };
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name
                .bytes()
                .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
        {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "an interface name is 1 to {MAX_NAME_LEN} bytes without '/', NUL or spaces"
                ),
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(err)?;
        let mut ifr = IfReqFlags {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `ifr` is a live, properly
        // sized (40-byte) and aligned `#[repr(C)]` mirror of it with a NUL-terminated name,
        // and `file` is an open /dev/net/tun descriptor.
        let r = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETIFF,
                &mut ifr as *mut IfReqFlags,
            )
        };
        if r < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        let end = ifr
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(ifr.name.len());
        Ok(Tap {
            file,
            name: String::from_utf8_lossy(&ifr.name[..end]).into_owned(),
        })
    }

    /// The interface's name (as the kernel named it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `WouldBlock` when none is waiting. A frame longer than `buf` is cut
    /// to `buf.len()` by the kernel: pass a buffer one byte longer than the longest frame
    /// wanted and treat a full buffer as too long.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Sends one frame.
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<()> {
        let n = (&self.file).write(frame)?;
        if n != frame.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("the TAP took {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
