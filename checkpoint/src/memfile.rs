//! Guest memory in a snapshot: a sparse raw file beside the state file.
//!
//! ```text
//!  FILE.mem: exactly `size` bytes; byte n = guest-physical byte n.
//!            All-zero pages are holes (never written), so the file takes the space of the
//!            pages the guest actually used, and restore maps it privately: pages load lazily
//!            on first touch.
//!
//!  MemIndex (a section of the state file): size, chunk size (2 MiB), and per chunk either
//!  Zero or the CRC-64 of its bytes — checked by `tandem verify` and by `restore --verify`.
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::snapshot::{tmp_path, CRC64};
use crate::Error;

/// Bytes per checksummed chunk.
pub const CHUNK: u64 = 2 << 20;
const PAGE: usize = 4096;
/// Largest guest memory a snapshot describes (matches the monitor's limit).
pub const MAX_MEM: u64 = 16 << 30;

/// The checksum of one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkSum {
    /// Every byte is zero (the chunk is a hole in the file).
    Zero,
    /// CRC-64/XZ of the chunk's bytes.
    Crc(u64),
}

/// Index of a memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemIndex {
    /// Guest memory size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk: u64,
    /// One entry per chunk.
    pub chunks: Vec<ChunkSum>,
}

impl MemIndex {
    /// Checks the index's own consistency (sizes, counts) before anyone relies on it.
    pub fn check(&self) -> Result<(), Error> {
        if self.size == 0 || self.size > MAX_MEM || self.size % PAGE as u64 != 0 {
            return Err(Error::Corrupt(format!(
                "memory size {} is not a page multiple in 1..={MAX_MEM}",
                self.size
            )));
        }
        if self.chunk != CHUNK {
            return Err(Error::Corrupt(format!(
                "memory chunk size {} is not {CHUNK}",
                self.chunk
            )));
        }
        if self.chunks.len() as u64 != self.size.div_ceil(CHUNK) {
            return Err(Error::Corrupt(format!(
                "memory index has {} chunks for {} bytes",
                self.chunks.len(),
                self.size
            )));
        }
        Ok(())
    }

    /// Bytes of chunks that are not all zero.
    pub fn used_bytes(&self) -> u64 {
        self.chunks.iter().filter(|c| **c != ChunkSum::Zero).count() as u64 * self.chunk
    }
}

/// The memory file that belongs to state file `state`.
pub fn mem_path(state: &Path) -> PathBuf {
    let mut name = state
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".mem");
    state.with_file_name(name)
}

/// Saves `size` bytes of guest memory into a sparse file at `path` (atomically: temporary file,
/// fsync, rename). `read(gpa, buf)` fills `buf` from guest memory; chunks are read,
/// checksummed and written on every core. `progress` gets the bytes done so far.
pub fn save_sparse(
    path: &Path,
    size: u64,
    read: &(dyn Fn(u64, &mut [u8]) -> std::io::Result<()> + Sync),
    progress: &(dyn Fn(u64) + Sync),
) -> Result<MemIndex, Error> {
    if size == 0 || size > MAX_MEM || size % PAGE as u64 != 0 {
        return Err(Error::Corrupt(format!(
            "cannot save {size} bytes of memory"
        )));
    }
    let tmp = tmp_path(path);
    let io = |e| Error::io(path, e);
    let file = File::create(&tmp).map_err(io)?;
    let result = (|| {
        file.set_len(size)?;
        let done = AtomicU64::new(0);
        let chunks: std::io::Result<Vec<ChunkSum>> = (0..size.div_ceil(CHUNK))
            .into_par_iter()
            .map_init(
                || vec![0u8; CHUNK as usize],
                |buf, i| {
                    let gpa = i * CHUNK;
                    let len = CHUNK.min(size - gpa) as usize;
                    let buf = &mut buf[..len];
                    read(gpa, buf)?;
                    let sum = write_nonzero_pages(&file, gpa, buf)?;
                    progress(done.fetch_add(len as u64, Ordering::Relaxed) + len as u64);
                    Ok(sum)
                },
            )
            .collect();
        let chunks = chunks?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(MemIndex {
            size,
            chunk: CHUNK,
            chunks,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Writes the non-zero pages of one chunk and returns its checksum.
fn write_nonzero_pages(file: &File, gpa: u64, buf: &[u8]) -> std::io::Result<ChunkSum> {
    let mut any = false;
    let mut run: Option<usize> = None; // start of a run of non-zero pages
    let pages = buf.len() / PAGE;
    for p in 0..=pages {
        let zero = p == pages || zero_page(&buf[p * PAGE..(p + 1) * PAGE]);
        match (zero, run) {
            (false, None) => run = Some(p),
            (true, Some(start)) => {
                file.write_all_at(&buf[start * PAGE..p * PAGE], gpa + (start * PAGE) as u64)?;
                any = true;
                run = None;
            }
            _ => {}
        }
    }
    Ok(if any {
        ChunkSum::Crc(CRC64.checksum(buf))
    } else {
        ChunkSum::Zero
    })
}

fn zero_page(p: &[u8]) -> bool {
    // Compare as u64 words; the compiler vectorises this loop.
    p.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
}

/// Opens a memory file for mapping and checks that its size matches the index.
pub fn open_checked(path: &Path, index: &MemIndex) -> Result<File, Error> {
    index.check()?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len != index.size {
        return Err(Error::Corrupt(format!(
            "{} is {len} bytes but the snapshot's memory is {} bytes: wrong or truncated memory file",
            path.display(),
            index.size
        )));
    }
    Ok(file)
}

/// Checks every chunk of a memory file against the index (in parallel). Names the first bad
/// chunk.
pub fn verify_sparse(path: &Path, index: &MemIndex) -> Result<(), Error> {
    let file = open_checked(path, index)?;
    let bad = (0..index.chunks.len())
        .into_par_iter()
        .map_init(
            || vec![0u8; CHUNK as usize],
            |buf, i| -> Result<Option<usize>, Error> {
                let gpa = i as u64 * CHUNK;
                let len = CHUNK.min(index.size - gpa) as usize;
                let buf = &mut buf[..len];
                file.read_exact_at(buf, gpa)
                    .map_err(|e| Error::io(path, e))?;
                let ok = match index.chunks[i] {
                    ChunkSum::Zero => zero_page_all(buf),
                    ChunkSum::Crc(c) => CRC64.checksum(buf) == c,
                };
                Ok((!ok).then_some(i))
            },
        )
        .collect::<Result<Vec<_>, Error>>()?
        .into_iter()
        .flatten()
        .min();
    match bad {
        None => Ok(()),
        Some(i) => Err(Error::Corrupt(format!(
            "memory chunk {i} (guest-physical {:#x}..{:#x}) fails its checksum: the memory file is damaged",
            i as u64 * CHUNK,
            (i as u64 + 1) * CHUNK
        ))),
    }
}

fn zero_page_all(b: &[u8]) -> bool {
    b.chunks(PAGE).all(zero_page)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(size: usize) -> Vec<u8> {
        let mut m = vec![0u8; size];
        for (i, b) in m.iter_mut().enumerate().skip(3 * PAGE).take(PAGE) {
            *b = i as u8 | 1;
        }
        m[size - 1] = 9;
        m
    }

    #[test]
    fn saves_sparse_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.mem");
        let g = guest(5 * CHUNK as usize);
        let read = |gpa: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&g[gpa as usize..gpa as usize + buf.len()]);
            Ok(())
        };
        let idx = save_sparse(&p, g.len() as u64, &read, &|_| {}).unwrap();
        assert_eq!(
            idx.chunks.iter().filter(|c| **c == ChunkSum::Zero).count(),
            3
        );
        assert_eq!(std::fs::read(&p).unwrap(), g);
        verify_sparse(&p, &idx).unwrap();
        // Only two chunks' pages are allocated on disk.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&p).unwrap().blocks() * 512 < 2 * CHUNK);
        // Damage one byte of a hole and of a data chunk: each is named.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[1], CHUNK + 5).unwrap();
        let e = verify_sparse(&p, &idx).unwrap_err().to_string();
        assert!(e.contains("chunk 1 "), "{e}");
        f.set_len(g.len() as u64 - 1).unwrap();
        assert!(verify_sparse(&p, &idx)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }

    #[test]
    fn index_checks_its_own_shape() {
        let mut idx = MemIndex {
            size: 4 * CHUNK,
            chunk: CHUNK,
            chunks: vec![ChunkSum::Zero; 4],
        };
        idx.check().unwrap();
        idx.chunks.pop();
        assert!(idx.check().is_err());
        idx.size = u64::MAX;
        assert!(idx.check().is_err());
    }
}
