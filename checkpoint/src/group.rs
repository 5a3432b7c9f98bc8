//! Checkpoint groups: one per device or vmx module.
//!
//! A group implements the callbacks of the seed's `CptFunctions`; each has a default body, so
//! a group implements what it needs. Saved state goes in a section named `group/<name>`, and a
//! manifest section (`groups`) lists every saved group with its version and whether it is
//! optional, so that a load can tell a group missing from the checkpoint from one missing in
//! the VM and name it.

use serde::{Deserialize, Serialize};

use crate::snapshot::{Section, Snapshot};
use crate::Error;

/// Name of the manifest section.
pub const MANIFEST: &str = "groups";

/// A checkpoint group.
pub trait Group: Send {
    /// The group's name (unique in a VM).
    fn name(&self) -> &'static str;
    /// The version of the state this build writes.
    fn version(&self) -> u32;
    /// Whether a load may go on when this group is absent from the checkpoint or the VM.
    fn optional(&self) -> bool {
        false
    }
    /// Saves the group's state (SAVE).
    fn checkpoint(&mut self) -> Result<Vec<u8>, Error>;
    /// Loads state of `version` (any version this build still reads) (RESTORE).
    fn restore(&mut self, version: u32, data: &[u8]) -> Result<(), Error>;
    /// Brings the group to a consistent point (SAVE_SYNC, CONTINUE_SYNC, RESTORE_SYNC).
    /// Returns what it did, for the trace (`None`: nothing to do, and nothing is traced).
    fn sync(&mut self) -> Result<Option<String>, Error> {
        Ok(None)
    }
    /// Stops whatever changes guest memory or device state outside a vCPU exit (QUIESCE;
    /// the vCPUs are stunned already), so that SAVE sees one consistent point. The group's
    /// next `sync` (CONTINUE_SYNC, RESTORE_SYNC) or `error` lets it go on again; after a
    /// power-off nothing does. Returns what it stopped, for the trace (`None`: nothing).
    fn quiesce(&mut self) -> Result<Option<String>, Error> {
        Ok(None)
    }
    /// The checkpoint failed; undo anything half-done (including a quiesce).
    fn error(&mut self, _error: &Error) {}
    /// An optional group absent from the checkpoint: reset to a fresh state.
    fn missing(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// One manifest entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Group name.
    pub name: String,
    /// Saved version.
    pub version: u32,
    /// Declared optional when saved.
    pub optional: bool,
}

/// The section name of group `name`.
pub fn section_name(name: &str) -> String {
    crate::SectionId::Group(name).name()
}

/// Syncs every group; returns, per group that did something, its name and what it did.
pub fn sync_groups(groups: &mut [&mut dyn Group]) -> Result<Vec<(String, String)>, Error> {
    let mut done = Vec::new();
    for g in groups.iter_mut() {
        if let Some(what) = g.sync()? {
            done.push((g.name().to_string(), what));
        }
    }
    Ok(done)
}

/// Quiesces every group; returns, per group that stopped something, its name and what.
pub fn quiesce_groups(groups: &mut [&mut dyn Group]) -> Result<Vec<(String, String)>, Error> {
    let mut done = Vec::new();
    for g in groups.iter_mut() {
        if let Some(what) = g.quiesce()? {
            done.push((g.name().to_string(), what));
        }
    }
    Ok(done)
}

/// Saves every group into `snap`, with the manifest.
pub fn save_groups(
    groups: &mut [&mut dyn Group],
    snap: &mut Snapshot,
) -> Result<Vec<String>, Error> {
    let mut manifest = Vec::new();
    let mut saved = Vec::new();
    for g in groups.iter_mut() {
        let data = g.checkpoint()?;
        snap.push(Section {
            name: section_name(g.name()),
            version: g.version(),
            data,
        })?;
        manifest.push(ManifestEntry {
            name: g.name().into(),
            version: g.version(),
            optional: g.optional(),
        });
        saved.push(g.name().to_string());
    }
    snap.push(Section::encode(MANIFEST, 1, &manifest)?)?;
    Ok(saved)
}

/// Restores every group from `snap` (vmx's half of RESTORE). A group missing on either side
/// fails the load by name unless it is optional; nothing is restored when the check fails.
pub fn restore_groups(
    groups: &mut [&mut dyn Group],
    snap: &Snapshot,
) -> Result<Vec<String>, Error> {
    let manifest: Vec<ManifestEntry> = snap
        .get(MANIFEST)
        .ok_or_else(|| Error::Corrupt("the snapshot has no group manifest".into()))?
        .decode()?;
    for e in &manifest {
        let present = groups.iter().any(|g| g.name() == e.name);
        if !present && !e.optional {
            return Err(Error::MissingGroup {
                name: e.name.clone(),
                missing_in: "this VM",
            });
        }
        if snap.get(&section_name(&e.name)).is_none() {
            return Err(Error::Corrupt(format!(
                "group {:?} is in the manifest but has no section",
                e.name
            )));
        }
    }
    for g in groups.iter() {
        if !manifest.iter().any(|e| e.name == g.name()) && !g.optional() {
            return Err(Error::MissingGroup {
                name: g.name().into(),
                missing_in: "the checkpoint",
            });
        }
    }
    let mut done = Vec::new();
    for g in groups.iter_mut() {
        match manifest.iter().find(|e| e.name == g.name()) {
            Some(e) => {
                let s = snap.get(&section_name(&e.name)).expect("checked above");
                g.restore(s.version, &s.data)?;
                done.push(g.name().to_string());
            }
            None => g.missing()?,
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct G {
        name: &'static str,
        optional: bool,
        state: u32,
    }

    impl Group for G {
        fn name(&self) -> &'static str {
            self.name
        }
        fn version(&self) -> u32 {
            1
        }
        fn optional(&self) -> bool {
            self.optional
        }
        fn checkpoint(&mut self) -> Result<Vec<u8>, Error> {
            Ok(self.state.to_le_bytes().to_vec())
        }
        fn restore(&mut self, _: u32, data: &[u8]) -> Result<(), Error> {
            self.state =
                u32::from_le_bytes(data.try_into().map_err(|_| Error::Corrupt("len".into()))?);
            Ok(())
        }
        fn missing(&mut self) -> Result<(), Error> {
            self.state = 0;
            Ok(())
        }
        fn sync(&mut self) -> Result<Option<String>, Error> {
            // "optional" groups of this test sync nothing; the others bump their state.
            if self.optional {
                return Ok(None);
            }
            self.state += 1;
            Ok(Some(format!("state {}", self.state)))
        }
    }

    fn g(name: &'static str, optional: bool, state: u32) -> G {
        G {
            name,
            optional,
            state,
        }
    }

    #[test]
    fn missing_groups_are_named_unless_optional() {
        let mut snap = Snapshot::default();
        let (mut a, mut b) = (g("output", false, 5), g("heartbeat", true, 6));
        save_groups(&mut [&mut a, &mut b], &mut snap).unwrap();

        let mut out = g("output", false, 0);
        restore_groups(&mut [&mut out], &snap).expect("an optional group may be missing in the VM");
        assert_eq!(out.state, 5);
        let mut hb = g("heartbeat", true, 0);
        let e = restore_groups(&mut [&mut hb], &snap).unwrap_err();
        assert_eq!(
            e.to_string(),
            "missing group \"output\": it is in the checkpoint but not in this VM"
        );
        let mut disk = g("disk", false, 0);
        let e = restore_groups(&mut [&mut out, &mut disk], &snap).unwrap_err();
        assert!(e.to_string().contains("missing group \"disk\""), "{e}");
        let mut serial = g("serial", true, 9);
        restore_groups(&mut [&mut out, &mut serial], &snap).unwrap();
        assert_eq!(
            serial.state, 0,
            "an optional group missing from the checkpoint is reset"
        );
    }

    #[test]
    fn only_groups_whose_sync_did_something_are_reported() {
        let mut a = G {
            name: "a",
            optional: false,
            state: 0,
        };
        let mut b = G {
            name: "b",
            optional: true,
            state: 0,
        };
        let done = sync_groups(&mut [&mut a, &mut b]).unwrap();
        // Every reported step had an effect, and no step without one is reported.
        assert_eq!(done, vec![("a".to_string(), "state 1".to_string())]);
        assert_eq!((a.state, b.state), (1, 0));
    }
}
