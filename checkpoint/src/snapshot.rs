//! The snapshot state file.
//!
//! ```text
//!  offset  size  field
//!  0       8     magic "TANDEMCK"
//!  8       4     format version (u32 LE)              ─┐
//!  12      4     flags (u32 LE, must be 0 in v1)        │ header
//!  16      4     section count (u32 LE, ≤ 4096)         │
//!  20      4     reserved (0)                          ─┘
//!  24      …     sections, each:
//!                  name length u8 (1..=64) │ name (UTF-8) │ version u32 │ length u32 (≤ 64 MiB) │ payload
//!  end-40  8     CRC-64/XZ of bytes [0, end-40)
//!  end-32  32    SHA-256 of bytes [0, end-40)
//! ```
//!
//! A section is one group's (vmx) or module's (monitor) saved state, a postcard-encoded struct
//! whose layout the `version` names. The reader bounds every count and length before using it,
//! checks the CRC and the hash before parsing anything, and refuses duplicate names, so a
//! damaged or hostile file yields a clear error and nothing else.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

/// File magic.
pub const MAGIC: [u8; 8] = *b"TANDEMCK";
/// Format version this build writes.
pub const FORMAT_VERSION: u32 = 1;
/// Oldest format version this build reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Most sections one file may hold.
pub const MAX_SECTIONS: u32 = 4096;
/// Longest section name.
pub const MAX_NAME: usize = 64;
/// Largest section payload.
pub const MAX_SECTION: u32 = 64 << 20;
/// Largest state file.
pub const MAX_FILE: u64 = 256 << 20;
const HEADER: usize = 24;
const TRAILER: usize = 8 + 32;

/// CRC-64 used for the file and for memory chunks.
pub const CRC64: crc::Crc<u64, crc::Table<16>> =
    crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_XZ);

/// One saved component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// Group or module name.
    pub name: String,
    /// Version of the payload's layout.
    pub version: u32,
    /// The payload.
    pub data: Vec<u8>,
}

impl Section {
    /// A section holding `value` encoded with postcard.
    pub fn encode<T: Serialize>(name: &str, version: u32, value: &T) -> Result<Self, Error> {
        let data = postcard::to_stdvec(value).map_err(|e| Error::Encode {
            section: name.to_string(),
            msg: e.to_string(),
        })?;
        Ok(Section {
            name: name.to_string(),
            version,
            data,
        })
    }

    /// Decodes the payload (the caller has checked `version`).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        postcard::from_bytes(&self.data).map_err(|e| {
            Error::Corrupt(format!(
                "section {:?} (v{}) does not decode: {e}",
                self.name, self.version
            ))
        })
    }
}

/// The sections of a snapshot, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    sections: BTreeMap<String, Section>,
    order: Vec<String>,
}

impl Snapshot {
    /// Adds a section; a second section of the same name is an error.
    pub fn push(&mut self, s: Section) -> Result<(), Error> {
        if s.name.is_empty() || s.name.len() > MAX_NAME {
            return Err(Error::Encode {
                section: s.name,
                msg: format!("name must be 1..={MAX_NAME} bytes"),
            });
        }
        if s.data.len() > MAX_SECTION as usize {
            return Err(Error::Encode {
                section: s.name.clone(),
                msg: format!(
                    "{} bytes is over the {MAX_SECTION}-byte section limit",
                    s.data.len()
                ),
            });
        }
        if self.sections.contains_key(&s.name) {
            return Err(Error::Corrupt(format!(
                "section {:?} appears twice",
                s.name
            )));
        }
        if self.order.len() >= MAX_SECTIONS as usize {
            return Err(Error::Encode {
                section: s.name,
                msg: format!("more than {MAX_SECTIONS} sections"),
            });
        }
        self.order.push(s.name.clone());
        self.sections.insert(s.name.clone(), s);
        Ok(())
    }

    /// The section called `name`.
    pub fn get(&self, name: &str) -> Option<&Section> {
        self.sections.get(name)
    }

    /// Removes and returns the section called `name`.
    pub fn take(&mut self, name: &str) -> Option<Section> {
        self.order.retain(|n| n != name);
        self.sections.remove(name)
    }

    /// Section names in file order.
    pub fn names(&self) -> &[String] {
        &self.order
    }

    /// Sections in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Section> {
        self.order.iter().filter_map(|n| self.sections.get(n))
    }

    /// The file bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER + TRAILER + self.iter().map(|s| s.data.len() + 80).sum::<usize>(),
        );
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.order.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for s in self.iter() {
            out.push(s.name.len() as u8);
            out.extend_from_slice(s.name.as_bytes());
            out.extend_from_slice(&s.version.to_le_bytes());
            out.extend_from_slice(&(s.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&s.data);
        }
        let crc = CRC64.checksum(&out);
        let sha = Sha256::digest(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&sha);
        out
    }

    /// Parses and checks file bytes.
    pub fn from_bytes(b: &[u8]) -> Result<Self, Error> {
        if b.len() < HEADER + TRAILER {
            return Err(Error::Corrupt(format!(
                "the file is {} bytes, shorter than the smallest snapshot ({} bytes): truncated?",
                b.len(),
                HEADER + TRAILER
            )));
        }
        if b[0..8] != MAGIC {
            return Err(Error::Corrupt("not a Tandem snapshot (bad magic)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let version = u32_at(8);
        if version > FORMAT_VERSION {
            return Err(Error::Version(format!(
                "snapshot format v{version} is newer than this build, v{FORMAT_VERSION}: use a newer tandem"
            )));
        }
        if version < OLDEST_FORMAT_VERSION {
            return Err(Error::Version(format!(
                "snapshot format v{version} is older than this build reads (v{OLDEST_FORMAT_VERSION}..=v{FORMAT_VERSION})"
            )));
        }
        let body_end = b.len() - TRAILER;
        let crc = u64::from_le_bytes(b[body_end..body_end + 8].try_into().expect("8 bytes"));
        if crc != CRC64.checksum(&b[..body_end]) {
            return Err(Error::Corrupt(
                "checksum mismatch: the file is damaged or truncated".into(),
            ));
        }
        if b[body_end + 8..] != Sha256::digest(&b[..body_end])[..] {
            return Err(Error::Corrupt(
                "SHA-256 mismatch: the file was altered".into(),
            ));
        }
        if u32_at(12) != 0 || u32_at(20) != 0 {
            return Err(Error::Corrupt(
                "unknown flags or reserved bits set in the header".into(),
            ));
        }
        let count = u32_at(16);
        if count > MAX_SECTIONS {
            return Err(Error::Corrupt(format!(
                "{count} sections declared, limit {MAX_SECTIONS}"
            )));
        }
        let mut snap = Snapshot::default();
        let mut at = HEADER;
        for i in 0..count {
            let need = |at: usize, n: usize| -> Result<(), Error> {
                if at.checked_add(n).is_none_or(|e| e > body_end) {
                    Err(Error::Corrupt(format!(
                        "section {i} runs past the end of the file"
                    )))
                } else {
                    Ok(())
                }
            };
            need(at, 1)?;
            let name_len = b[at] as usize;
            if name_len == 0 || name_len > MAX_NAME {
                return Err(Error::Corrupt(format!(
                    "section {i} has a name of {name_len} bytes"
                )));
            }
            at += 1;
            need(at, name_len + 8)?;
            let name = std::str::from_utf8(&b[at..at + name_len])
                .map_err(|_| Error::Corrupt(format!("section {i}'s name is not UTF-8")))?
                .to_string();
            at += name_len;
            let sversion = u32_at(at);
            let len = u32_at(at + 4);
            at += 8;
            if len > MAX_SECTION {
                return Err(Error::Corrupt(format!(
                    "section {name:?} declares {len} bytes, limit {MAX_SECTION}"
                )));
            }
            need(at, len as usize)?;
            snap.push(Section {
                name,
                version: sversion,
                data: b[at..at + len as usize].to_vec(),
            })?;
            at += len as usize;
        }
        if at != body_end {
            return Err(Error::Corrupt(format!(
                "{} stray bytes after the last section",
                body_end - at
            )));
        }
        Ok(snap)
    }

    /// Writes the file atomically: a temporary file in the same directory, fsync'd, renamed
    /// into place. A failed save leaves no file that looks valid.
    pub fn write_file(&self, path: &Path) -> Result<(), Error> {
        write_atomic(path, &self.to_bytes())
    }

    /// Reads and checks a state file.
    pub fn read_file(path: &Path) -> Result<Self, Error> {
        let io = |e| Error::io(path, e);
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.len() > MAX_FILE {
            return Err(Error::Corrupt(format!(
                "{} is {} bytes, more than a state file may hold ({MAX_FILE})",
                path.display(),
                meta.len()
            )));
        }
        let bytes = std::fs::read(path).map_err(io)?;
        Snapshot::from_bytes(&bytes)
    }
}

/// Writes `bytes` to `path` through a temporary file (fsynced) and a rename, then fsyncs the
/// directory: `path` holds either its old bytes or all of the new ones, even after a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = tmp_path(path);
    let io = |e| Error::io(path, e);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        crate::files::sync_dir(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// The temporary name used while writing `path`.
pub fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sample() -> Snapshot {
        let mut s = Snapshot::default();
        s.push(Section::encode("CPU", 1, &vec![1u64, 2, 3]).unwrap())
            .unwrap();
        s.push(Section::encode("output", 2, &("hello".to_string(), 7u32)).unwrap())
            .unwrap();
        s
    }

    #[test]
    fn round_trips_and_keeps_order() {
        let s = sample();
        let back = Snapshot::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.names(), ["CPU", "output"]);
        let v: Vec<u64> = back.get("CPU").unwrap().decode().unwrap();
        assert_eq!(v, [1, 2, 3]);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_a_clear_error() {
        let bytes = sample().to_bytes();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let cut = rng.gen_range(0..bytes.len());
            let e = Snapshot::from_bytes(&bytes[..cut]).unwrap_err().to_string();
            assert!(
                e.contains("truncated") || e.contains("damaged") || e.contains("magic"),
                "{e}"
            );
        }
        for _ in 0..500 {
            let mut b = bytes.clone();
            let i = rng.gen_range(0..b.len());
            b[i] ^= 1 << rng.gen_range(0..8);
            assert!(Snapshot::from_bytes(&b).is_err());
        }
    }

    #[test]
    fn newer_format_says_so() {
        let mut b = sample().to_bytes();
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        let e = Snapshot::from_bytes(&b).unwrap_err().to_string();
        assert!(e.contains("format v3 is newer than this build, v1"), "{e}");
    }

    #[test]
    fn hostile_but_well_checksummed_files_are_refused() {
        // Re-seal a tampered body with valid CRC and hash: the structural checks must hold.
        let seal = |mut body: Vec<u8>| {
            let crc = CRC64.checksum(&body);
            let sha = Sha256::digest(&body);
            body.extend_from_slice(&crc.to_le_bytes());
            body.extend_from_slice(&sha);
            body
        };
        let good = sample().to_bytes();
        let body = good[..good.len() - TRAILER].to_vec();
        let mut b = body.clone();
        b[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Snapshot::from_bytes(&seal(b))
            .unwrap_err()
            .to_string()
            .contains("limit"));
        let mut b = body.clone();
        b[16..20].copy_from_slice(&3u32.to_le_bytes());
        assert!(Snapshot::from_bytes(&seal(b))
            .unwrap_err()
            .to_string()
            .contains("past the end"));
        let mut b = body.clone();
        b[24] = 0;
        assert!(Snapshot::from_bytes(&seal(b)).is_err());
        let mut b = body.clone();
        let len_at = 24 + 1 + 3 + 4;
        b[len_at..len_at + 4].copy_from_slice(&(MAX_SECTION + 1).to_le_bytes());
        assert!(Snapshot::from_bytes(&seal(b))
            .unwrap_err()
            .to_string()
            .contains("limit"));
        let mut b = body;
        b.push(0);
        assert!(Snapshot::from_bytes(&seal(b))
            .unwrap_err()
            .to_string()
            .contains("stray"));
        let mut dup = Snapshot::default();
        dup.push(Section {
            name: "a".into(),
            version: 1,
            data: vec![],
        })
        .unwrap();
        assert!(dup
            .push(Section {
                name: "a".into(),
                version: 1,
                data: vec![]
            })
            .is_err());
    }

    #[test]
    fn atomic_write_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("snap");
        sample().write_file(&p).unwrap();
        assert_eq!(Snapshot::read_file(&p).unwrap(), sample());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let missing = Snapshot::read_file(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope"), "{missing}");
    }
}
