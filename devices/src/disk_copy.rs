//! Copies of disk images for snapshots: a reflink where the file system shares extents,
//! otherwise a sparse copy.
//!
//! ```text
//!  copy_disk(src, dst):  dst.tmp-<pid> ─ FICLONE(src)            ok → Reflink   (btrfs, XFS:
//!                                       │                                    constant time)
//!                                       └ else SEEK_DATA/SEEK_HOLE over src, copy_file_range
//!                                         of each data extent, holes left   → SparseCopy
//!                        fsync, rename to dst, fsync dst's directory (a reader never sees
//!                        half a disk)
//! ```

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// How a disk was copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMethod {
    /// `FICLONE`: the copy shares the source's extents (constant time, no data moved).
    Reflink,
    /// The data extents were copied (`copy_file_range`), holes kept as holes.
    SparseCopy,
}

/// `FICLONE` = `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Copies `src` to `dst` through a temporary file beside `dst` that is fsynced and renamed
/// over it: a reflink if the file system can, otherwise a sparse copy. Returns how, and the
/// size of `src` in bytes. `dst` keeps its permissions if it existed (else gets `src`'s).
pub fn copy_disk(src: &Path, dst: &Path) -> io::Result<(CopyMethod, u64)> {
    let mut name = dst
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dst.with_file_name(name);
    let r = (|| {
        let from = File::open(src)?;
        let len = from.metadata()?.len();
        let to = File::create(&tmp)?;
        if let Ok(meta) = std::fs::metadata(dst).or_else(|_| from.metadata()) {
            let _ = to.set_permissions(meta.permissions());
        }
        // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
        let method = if unsafe { libc::ioctl(to.as_raw_fd(), FICLONE, from.as_raw_fd()) } == 0 {
            CopyMethod::Reflink
        } else {
            sparse_copy(&from, &to, len)?;
            CopyMethod::SparseCopy
        };
        to.sync_all()?;
        std::fs::rename(&tmp, dst)?;
        // The rename is on disk before anything that names `dst` is written.
        let dir = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
        Ok((method, len))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Next data (`SEEK_DATA`) or hole (`SEEK_HOLE`) at or after `at`; `None` past the last data.
fn seek(f: &File, whence: libc::c_int, at: u64) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an open fd; it touches no memory.
    let r = unsafe { libc::lseek(f.as_raw_fd(), at as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

fn sparse_copy(from: &File, to: &File, len: u64) -> io::Result<()> {
    to.set_len(len)?;
    let mut at = 0u64;
    while at < len {
        let Some(data) = seek(from, libc::SEEK_DATA, at)? else {
            break;
        };
        if data >= len {
            break;
        }
        let end = seek(from, libc::SEEK_HOLE, data)?.unwrap_or(len).min(len);
        let (mut off_in, mut off_out) = (data as libc::loff_t, data as libc::loff_t);
        while (off_in as u64) < end {
            let want = (end - off_in as u64).min(1 << 30) as usize;
            // SAFETY: two open fds and pointers to two live offsets.
            let n = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    &mut off_in,
                    to.as_raw_fd(),
                    &mut off_out,
                    want,
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the disk image shrank while it was copied",
                ));
            }
        }
        at = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn copies_keep_contents_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("a.img"), d.path().join("b.img"));
        let f = File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[0xab; 4096], 0).unwrap();
        f.write_all_at(&[0xcd; 8192], 5 << 20).unwrap();
        std::fs::write(&dst, b"old").unwrap();
        let (_, n) = copy_disk(&src, &dst).unwrap();
        assert_eq!(n, 8 << 20);
        assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
        // Sparse: far fewer blocks than 8 MiB (512-byte units).
        assert!(
            std::fs::metadata(&dst).unwrap().blocks() < 2048,
            "holes were filled"
        );
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            2,
            "no temporary left"
        );
    }
}
