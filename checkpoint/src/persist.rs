//! Saved state, typed: section ids and the `Persist` trait.
//!
//! ```text
//!  section name            SectionId                  written by
//!  "vcpu/<n>"              SectionId::Vcpu(n)         monitor (CPU state of vCPU n)
//!  "module/<name>"         SectionId::Module(name)    monitor modules (MainMem, Irqchip, …)
//!  "group/<name>"          SectionId::Group(name)     vmx checkpoint groups (devices)
//!  "groups"                SectionId::Manifest        the group manifest
//!  "<other>"               SectionId::Other(name)     anything else (e.g. held output)
//! ```
//!
//! A component that saves state implements [`Persist`]: its name, the version it writes, the
//! versions it reads, and its state type. [`Persist::encode`] and [`Persist::decode`] are the
//! only places that check versions, and the error they give names the component, the version
//! found and the versions this build reads.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Error;

/// Which component a snapshot section belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SectionId<'a> {
    /// The CPU state of one vCPU.
    Vcpu(u32),
    /// A monitor module.
    Module(&'a str),
    /// A checkpoint group.
    Group(&'a str),
    /// The group manifest.
    Manifest,
    /// Replication: part `part` of the blocks disk `disk` was written during one epoch
    /// (applied to the standby's replica at the commit, never kept as state).
    DiskWrites {
        /// The disk's device window.
        disk: u32,
        /// The part (a control message holds at most 16 MiB).
        part: u32,
    },
    /// Any other section.
    Other(&'a str),
}

impl<'a> SectionId<'a> {
    /// Parses a section name (the inverse of `to_string`).
    pub fn parse(name: &'a str) -> SectionId<'a> {
        if name == "groups" {
            return SectionId::Manifest;
        }
        if let Some(n) = name.strip_prefix("vcpu/") {
            if let Ok(id) = n.parse::<u32>() {
                if id.to_string() == n {
                    return SectionId::Vcpu(id);
                }
            }
        }
        if let Some((d, p)) = name
            .strip_prefix("disk-writes/")
            .and_then(|n| n.split_once('/'))
        {
            if let (Ok(disk), Ok(part)) = (d.parse::<u32>(), p.parse::<u32>()) {
                if disk.to_string() == d && part.to_string() == p {
                    return SectionId::DiskWrites { disk, part };
                }
            }
        }
        if let Some(m) = name.strip_prefix("module/") {
            return SectionId::Module(m);
        }
        if let Some(g) = name.strip_prefix("group/") {
            return SectionId::Group(g);
        }
        SectionId::Other(name)
    }

    /// The section name.
    pub fn name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SectionId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SectionId::Vcpu(n) => write!(f, "vcpu/{n}"),
            SectionId::Module(m) => write!(f, "module/{m}"),
            SectionId::Group(g) => write!(f, "group/{g}"),
            SectionId::Manifest => write!(f, "groups"),
            SectionId::DiskWrites { disk, part } => write!(f, "disk-writes/{disk}/{part}"),
            SectionId::Other(o) => write!(f, "{o}"),
        }
    }
}

/// A component with versioned saved state (Firecracker's `Persist`, reduced to what the
/// checkpoint engine needs).
pub trait Persist {
    /// The component's name, as errors show it.
    const NAME: &'static str;
    /// The version [`Persist::encode`] writes.
    const VERSION: u32;
    /// The saved state.
    type State: Serialize + DeserializeOwned;

    /// Whether this build reads state of `version` (default: only [`Persist::VERSION`]).
    /// Components that still load an older layout override this and convert in
    /// [`Persist::upgrade`].
    fn reads(version: u32) -> bool {
        version == Self::VERSION
    }

    /// Decodes state of an older `version` this build reads (default: none).
    fn upgrade(version: u32, _data: &[u8]) -> Result<Self::State, Error> {
        Err(version_error::<Self>(version))
    }

    /// The state encoded as [`Persist::VERSION`].
    fn encode(state: &Self::State) -> Result<Vec<u8>, Error> {
        postcard::to_stdvec(state).map_err(|e| Error::Encode {
            section: Self::NAME.to_string(),
            msg: e.to_string(),
        })
    }

    /// Checks `version` and decodes `data`.
    fn decode(version: u32, data: &[u8]) -> Result<Self::State, Error> {
        if !Self::reads(version) {
            return Err(version_error::<Self>(version));
        }
        if version != Self::VERSION {
            return Self::upgrade(version, data);
        }
        postcard::from_bytes(data).map_err(|e| Error::Component {
            component: Self::NAME.to_string(),
            msg: format!("state version {version} does not decode: {e}"),
        })
    }
}

/// The one "wrong version" error: names the component, what was found and what this build
/// reads.
pub fn version_error<P: Persist + ?Sized>(found: u32) -> Error {
    let reads: Vec<String> = (0..=P::VERSION.saturating_add(1))
        .filter(|v| P::reads(*v))
        .map(|v| v.to_string())
        .collect();
    Error::Component {
        component: P::NAME.to_string(),
        msg: format!(
            "state version {found} is {} than this build reads ({}); restore it with the \
             Tandem release that saved it",
            if found > P::VERSION { "newer" } else { "older" },
            reads.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Thing;
    impl Persist for Thing {
        const NAME: &'static str = "thing";
        const VERSION: u32 = 2;
        type State = (u32, String);
        fn reads(v: u32) -> bool {
            v == 1 || v == 2
        }
        fn upgrade(version: u32, data: &[u8]) -> Result<(u32, String), Error> {
            assert_eq!(version, 1);
            let n: u32 = postcard::from_bytes(data).map_err(|e| Error::Corrupt(e.to_string()))?;
            Ok((n, "upgraded".into()))
        }
    }

    #[test]
    fn disk_writes_sections_round_trip_and_near_misses_are_other() {
        let id = SectionId::DiskWrites { disk: 3, part: 12 };
        assert_eq!(id.name(), "disk-writes/3/12");
        assert_eq!(SectionId::parse("disk-writes/3/12"), id);
        for other in [
            "disk-writes/3",
            "disk-writes/03/1",
            "disk-writes/x/1",
            "disk-writes/1/2/3",
        ] {
            assert_eq!(SectionId::parse(other), SectionId::Other(other), "{other}");
        }
    }

    #[test]
    fn versions_are_checked_once_and_named() {
        let data = Thing::encode(&(7, "x".into())).unwrap();
        assert_eq!(Thing::decode(2, &data).unwrap(), (7, "x".into()));
        let v1 = postcard::to_stdvec(&9u32).unwrap();
        assert_eq!(Thing::decode(1, &v1).unwrap(), (9, "upgraded".into()));
        let e = Thing::decode(3, &data).unwrap_err().to_string();
        assert!(
            e.contains("thing") && e.contains("version 3 is newer") && e.contains("(1, 2)"),
            "{e}"
        );
        assert!(Thing::decode(2, &[0xff; 3]).is_err());
    }

    #[test]
    fn section_ids_round_trip() {
        for id in [
            SectionId::Vcpu(3),
            SectionId::Module("MainMem"),
            SectionId::Group("output"),
            SectionId::Manifest,
            SectionId::Other("records/0"),
        ] {
            let name = id.name();
            assert_eq!(SectionId::parse(&name), id);
        }
        assert_eq!(SectionId::parse("vcpu/01"), SectionId::Other("vcpu/01"));
    }
}
