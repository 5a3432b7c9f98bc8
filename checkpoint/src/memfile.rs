//! Guest memory in a snapshot, in one of two forms.
//!
//! ```text
//!  default: FILE.mem-<nonce>, a sparse raw file beside the state file (below), its name
//!           recorded in module/MainMem (see `checkpoint::files` for the names and the order
//!           a save writes them in; a version-1 snapshot's is FILE.mem)
//!  --compress: sections "mem/<chunk>" inside the state file, one per non-zero 2 MiB chunk,
//!              each the zstd frame of the chunk's bytes (decompressed size capped at the
//!              chunk size before decompressing); restore decompresses on every core.
//!
//!  FILE.mem-<nonce>: exactly `size` bytes; byte n = guest-physical byte n.
//!            All-zero pages are holes (never written), so the file takes the space of the
//!            pages the guest actually used, and restore maps it privately: pages load lazily
//!            on first touch.
//!
//!  MemIndex: size, chunk size (2 MiB), and per chunk either Zero or the CRC-64 of its bytes
//!  — checked by `tandem verify` and by `restore --verify`; the file's size is checked by
//!  every restore before anything is mapped.
//!
//!  section module/MainMem (MainMemPersist)
//!    v2: postcard MemState { index: MemIndex, file: Option<String> }  file = the memory
//!        file's name beside the state file (None when compressed)
//!    v1: postcard MemIndex, the memory file is FILE.mem (read, upgraded to v2 with file None)
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::persist::Persist;
use crate::snapshot::{tmp_path, Section, Snapshot, CRC64};
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
    /// The chunks are zstd sections of the state file, not a `.mem` file.
    pub compressed: bool,
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

/// What module/MainMem saves: the memory index and where the memory is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemState {
    /// The index.
    pub index: MemIndex,
    /// The sparse memory file's name, beside the state file. `None`: the memory is compressed
    /// into the state file, or (a version-1 snapshot) it is in [`mem_path`].
    pub file: Option<String>,
}

/// MainMem's saved state as a [`Persist`] component (version 2; reads version 1).
pub struct MainMemPersist;

impl Persist for MainMemPersist {
    const NAME: &'static str = "MainMem";
    const VERSION: u32 = 2;
    type State = MemState;

    fn reads(version: u32) -> bool {
        version == 1 || version == 2
    }

    fn upgrade(version: u32, data: &[u8]) -> Result<MemState, Error> {
        if version != 1 {
            return Err(crate::persist::version_error::<Self>(version));
        }
        let index: MemIndex = postcard::from_bytes(data).map_err(|e| {
            Error::component(Self::NAME, format!("state version 1 does not decode: {e}"))
        })?;
        Ok(MemState { index, file: None })
    }
}

impl MemState {
    /// Decodes module/MainMem of `snap` (any version this build reads) and checks the index.
    pub fn of(snap: &Snapshot) -> Result<MemState, Error> {
        let name = crate::SectionId::Module(MainMemPersist::NAME).name();
        let sec = snap
            .get(&name)
            .ok_or_else(|| Error::Corrupt(format!("no memory index ({name})")))?;
        let state = MainMemPersist::decode(sec.version, &sec.data)?;
        state.index.check()?;
        if state.index.compressed && state.file.is_some() {
            return Err(Error::Corrupt(
                "the memory is compressed but a memory file is named too".into(),
            ));
        }
        Ok(state)
    }

    /// The sparse memory file of the snapshot whose state file is `state` (`None`: the memory
    /// is compressed into the state file).
    pub fn file_path(&self, state: &Path) -> Result<Option<PathBuf>, Error> {
        if self.index.compressed {
            return Ok(None);
        }
        match &self.file {
            Some(name) => crate::files::resolve(state, name).map(Some),
            None => Ok(Some(mem_path(state))),
        }
    }
}

/// The memory file of a version-1 snapshot with state file `state` (`FILE.mem`).
pub fn mem_path(state: &Path) -> PathBuf {
    let mut name = state
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".mem");
    state.with_file_name(name)
}

/// Saves `size` bytes of guest memory into a sparse file at `path` (atomically: temporary file,
/// fsync, rename, fsync of the directory). `read(gpa, buf)` fills `buf` from guest memory;
/// chunks are read,
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
        crate::files::sync_dir(path)?;
        Ok(MemIndex {
            size,
            chunk: CHUNK,
            chunks,
            compressed: false,
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
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Corrupt(format!(
                "the memory file {} is missing: a snapshot is its state file and the files it \
                 names, in one directory (copy or move them together)",
                path.display()
            ))
        } else {
            Error::io(path, e)
        }
    })?;
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

/// The section holding compressed chunk `i`.
pub fn chunk_section(i: usize) -> String {
    format!("mem/{i}")
}

/// zstd level for memory chunks: fast, since a checkpoint stuns the guest.
const ZSTD_LEVEL: i32 = 1;

/// Compresses `size` bytes of guest memory into one section per non-zero chunk (on every
/// core). Returns the index and the sections.
pub fn save_compressed(
    size: u64,
    read: &(dyn Fn(u64, &mut [u8]) -> std::io::Result<()> + Sync),
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(MemIndex, Vec<Section>), Error> {
    let done = AtomicU64::new(0);
    if size == 0 || size > MAX_MEM || size % PAGE as u64 != 0 {
        return Err(Error::Corrupt(format!(
            "cannot save {size} bytes of memory"
        )));
    }
    let io = |e: std::io::Error| Error::Encode {
        section: "mem".into(),
        msg: e.to_string(),
    };
    let done: Vec<(ChunkSum, Option<Section>)> = (0..size.div_ceil(CHUNK) as usize)
        .into_par_iter()
        .map_init(
            || vec![0u8; CHUNK as usize],
            |buf, i| -> Result<(ChunkSum, Option<Section>), Error> {
                let gpa = i as u64 * CHUNK;
                let len = CHUNK.min(size - gpa) as usize;
                let buf = &mut buf[..len];
                read(gpa, buf).map_err(io)?;
                progress(done.fetch_add(len as u64, Ordering::Relaxed) + len as u64);
                if zero_page_all(buf) {
                    return Ok((ChunkSum::Zero, None));
                }
                let data = zstd::bulk::compress(buf, ZSTD_LEVEL).map_err(io)?;
                Ok((
                    ChunkSum::Crc(CRC64.checksum(buf)),
                    Some(Section {
                        name: chunk_section(i),
                        version: 1,
                        data,
                    }),
                ))
            },
        )
        .collect::<Result<_, Error>>()?;
    let (chunks, sections): (Vec<ChunkSum>, Vec<Option<Section>>) = done.into_iter().unzip();
    Ok((
        MemIndex {
            size,
            chunk: CHUNK,
            chunks,
            compressed: true,
        },
        sections.into_iter().flatten().collect(),
    ))
}

/// Decompresses every chunk of a compressed snapshot (on every core), checks its size and
/// checksum, and hands it to `write(gpa, bytes)`. Zero chunks are skipped (fresh guest
/// memory is zero). Nothing is written unless every chunk checks out.
pub fn load_compressed(
    index: &MemIndex,
    snap: &Snapshot,
    write: &(dyn Fn(u64, &[u8]) -> std::io::Result<()> + Sync),
) -> Result<(), Error> {
    let chunks = decompress_all(index, snap)?;
    chunks.into_par_iter().try_for_each(|(gpa, bytes)| {
        write(gpa, &bytes)
            .map_err(|e| Error::Corrupt(format!("cannot load memory at {gpa:#x}: {e}")))
    })
}

/// Checks every chunk of a compressed snapshot.
pub fn verify_compressed(index: &MemIndex, snap: &Snapshot) -> Result<(), Error> {
    decompress_all(index, snap).map(|_| ())
}

fn decompress_all(index: &MemIndex, snap: &Snapshot) -> Result<Vec<(u64, Vec<u8>)>, Error> {
    index.check()?;
    if !index.compressed {
        return Err(Error::Corrupt(
            "the memory index is not of a compressed snapshot".into(),
        ));
    }
    let present = snap
        .names()
        .iter()
        .filter(|n| n.starts_with("mem/"))
        .count();
    let expected = index
        .chunks
        .iter()
        .filter(|c| **c != ChunkSum::Zero)
        .count();
    if present != expected {
        return Err(Error::Corrupt(format!(
            "{present} memory sections for {expected} non-zero chunks"
        )));
    }
    index
        .chunks
        .par_iter()
        .enumerate()
        .filter_map(|(i, c)| match c {
            ChunkSum::Zero => None,
            ChunkSum::Crc(crc) => Some((i, *crc)),
        })
        .map(|(i, crc)| {
            let gpa = i as u64 * CHUNK;
            let len = CHUNK.min(index.size - gpa) as usize;
            let s = snap
                .get(&chunk_section(i))
                .ok_or_else(|| Error::Corrupt(format!("memory chunk {i} is missing")))?;
            // The capacity caps the decompressed size: a bomb fails instead of growing.
            let bytes = zstd::bulk::decompress(&s.data, len)
                .map_err(|e| Error::Corrupt(format!("memory chunk {i} does not decompress: {e}")))?;
            if bytes.len() != len || CRC64.checksum(&bytes) != crc {
                return Err(Error::Corrupt(format!(
                    "memory chunk {i} (guest-physical {gpa:#x}) fails its checksum: the snapshot is damaged"
                )));
            }
            Ok((gpa, bytes))
        })
        .collect()
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
    fn compressed_round_trip_and_damage() {
        let g = guest(3 * CHUNK as usize);
        let read = |gpa: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&g[gpa as usize..gpa as usize + buf.len()]);
            Ok(())
        };
        let (idx, sections) = save_compressed(g.len() as u64, &read, &|_| {}).unwrap();
        assert_eq!(sections.len(), 2, "the all-zero middle chunk is omitted");
        let mut snap = Snapshot::default();
        for s in sections {
            snap.push(s).unwrap();
        }
        let out = std::sync::Mutex::new(vec![0u8; g.len()]);
        let write = |gpa: u64, b: &[u8]| {
            out.lock().unwrap()[gpa as usize..gpa as usize + b.len()].copy_from_slice(b);
            Ok(())
        };
        load_compressed(&idx, &snap, &write).unwrap();
        assert_eq!(*out.lock().unwrap(), g);
        // A bomb: a chunk that decompresses to more than a chunk.
        let mut bomb = snap.clone();
        bomb.take("mem/0").unwrap();
        let big = zstd::bulk::compress(&vec![1u8; 3 * CHUNK as usize], 1).unwrap();
        bomb.push(Section {
            name: "mem/0".into(),
            version: 1,
            data: big,
        })
        .unwrap();
        assert!(verify_compressed(&idx, &bomb)
            .unwrap_err()
            .to_string()
            .contains("chunk 0"));
        // A flipped bit in the compressed data.
        let mut bad = snap.clone();
        let mut s = bad.take("mem/2").unwrap();
        let n = s.data.len();
        s.data[n / 2] ^= 4;
        bad.push(s).unwrap();
        assert!(verify_compressed(&idx, &bad).is_err());
        // A missing chunk.
        let mut gone = snap.clone();
        gone.take("mem/2").unwrap();
        assert!(verify_compressed(&idx, &gone).is_err());
    }

    fn sparse_snapshot(dir: &Path, version: u32) -> (PathBuf, PathBuf, MemIndex) {
        let state = dir.join("snap");
        let g = guest(2 * CHUNK as usize);
        let read = |gpa: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&g[gpa as usize..gpa as usize + buf.len()]);
            Ok(())
        };
        let mem = if version == 1 {
            mem_path(&state)
        } else {
            crate::files::data_path(&state, "mem", &crate::files::new_nonce())
        };
        let index = save_sparse(&mem, g.len() as u64, &read, &|_| {}).unwrap();
        let mut snap = Snapshot::default();
        let data = if version == 1 {
            postcard::to_stdvec(&index).unwrap()
        } else {
            MainMemPersist::encode(&MemState {
                index: index.clone(),
                file: Some(crate::files::name_of(&mem).unwrap()),
            })
            .unwrap()
        };
        snap.push(Section {
            name: "module/MainMem".into(),
            version,
            data,
        })
        .unwrap();
        snap.write_file(&state).unwrap();
        (state, mem, index)
    }

    #[test]
    fn the_state_names_its_memory_file_and_version_1_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        for version in [1, 2] {
            let (state, mem, index) = sparse_snapshot(dir.path(), version);
            let snap = Snapshot::read_file(&state).unwrap();
            let m = MemState::of(&snap).unwrap();
            assert_eq!(m.index, index);
            assert_eq!(m.file_path(&state).unwrap(), Some(mem.clone()));
            verify_sparse(&mem, &index).unwrap();
            std::fs::remove_file(&mem).unwrap();
        }
        // A version this build does not read is named as such.
        let mut snap = Snapshot::default();
        snap.push(Section {
            name: "module/MainMem".into(),
            version: 3,
            data: vec![],
        })
        .unwrap();
        let e = MemState::of(&snap).unwrap_err().to_string();
        assert!(
            e.contains("MainMem") && e.contains("version 3 is newer"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_or_truncated_memory_file_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let (state, mem, index) = sparse_snapshot(dir.path(), 2);
        open_checked(&mem, &index).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
        f.set_len(index.size - 4096).unwrap();
        let e = open_checked(&mem, &index).unwrap_err().to_string();
        assert!(e.contains("wrong or truncated memory file"), "{e}");
        std::fs::remove_file(&mem).unwrap();
        let e = verify_sparse(&mem, &index).unwrap_err().to_string();
        assert!(
            e.contains("is missing") && e.contains(&*mem.to_string_lossy()),
            "{e}"
        );
        // A name that leaves the directory is refused before anything is opened.
        let bad = MemState {
            index,
            file: Some("../etc/passwd".into()),
        };
        assert!(bad.file_path(&state).is_err());
    }

    #[test]
    fn index_checks_its_own_shape() {
        let mut idx = MemIndex {
            size: 4 * CHUNK,
            chunk: CHUNK,
            chunks: vec![ChunkSum::Zero; 4],
            compressed: false,
        };
        idx.check().unwrap();
        idx.chunks.pop();
        assert!(idx.check().is_err());
        idx.size = u64::MAX;
        assert!(idx.check().is_err());
    }
}
