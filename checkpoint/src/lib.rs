//! # checkpoint — the checkpoint engine's state machine
//!
//! ```text
//!   NONE ──stun──▶ SAVE_SYNC ──▶ QUIESCE ──▶ SAVE ──┬──▶ CONTINUE_SYNC ──unstun──▶ NONE
//!                                                   └──▶ (power-off / suspend)
//!
//!   power-on ──▶ RESTORE ──▶ RESTORE_SYNC ──▶ NONE
//! ```
//!
//! One enum of states ([`CptState`]) and one transition table ([`TRANSITIONS`]); an illegal
//! transition is an error, never a silent jump. At every save step the monitor acts first and
//! then vmx; at every restore step vmx acts first and then the monitor ([`CptState::order`]).
//! A [`Trace`] records (state, side, step) so tests can check that order.
#![forbid(unsafe_code)]

pub mod digest;
pub mod files;
pub mod group;
pub mod memfile;
pub mod persist;
pub mod snapshot;

pub use group::Group;
pub use persist::{Persist, SectionId};
pub use snapshot::{Section, Snapshot};

use serde::{Deserialize, Serialize};

/// The checkpoint states of the seed "Checkpoint Internals".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CptState {
    /// No checkpoint in progress; the VM runs.
    None,
    /// Stunned; monitor modules and vmx groups sync.
    SaveSync,
    /// The monitor drains in-flight actions and restricts new ones.
    Quiesce,
    /// vCPU, module and group state is saved.
    Save,
    /// Restrictions lifted, groups and modules sync, the VM continues.
    ContinueSync,
    /// At power-on: groups, then modules and vCPUs, load their state.
    Restore,
    /// After restore: groups sync, unpause, modules sync.
    RestoreSync,
}

/// Which half of Tandem acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    /// The VMM side (`monitor` crate).
    Monitor,
    /// The userland side (`vmx` crate).
    Vmx,
}

/// What ends a save.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SaveEnd {
    /// Keep running (CONTINUE_SYNC).
    Continue,
    /// Power off or suspend after the save.
    PowerOff,
}

/// Every legal transition: (from, to).
pub const TRANSITIONS: &[(CptState, CptState)] = &[
    (CptState::None, CptState::SaveSync),
    (CptState::SaveSync, CptState::Quiesce),
    (CptState::Quiesce, CptState::Save),
    (CptState::Save, CptState::ContinueSync),
    (CptState::Save, CptState::None), // power-off / suspend: the VM stops in SAVE's aftermath
    (CptState::ContinueSync, CptState::None),
    (CptState::None, CptState::Restore), // power-on of a VM that is restoring
    (CptState::Restore, CptState::RestoreSync),
    (CptState::RestoreSync, CptState::None),
];

/// Everything that can go wrong in the checkpoint engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A snapshot file is damaged or hostile (the message names what is wrong).
    #[error("bad snapshot: {0}")]
    Corrupt(String),
    /// A snapshot of a format version this build does not read.
    #[error("{0}")]
    Version(String),
    /// A state could not be encoded.
    #[error("cannot save {section}: {msg}")]
    Encode {
        /// Section name.
        section: String,
        /// What failed.
        msg: String,
    },
    /// A group is in the checkpoint but not the VM, or the reverse.
    #[error("missing group {name:?}: it is in the {} but not in {missing_in}", if *missing_in == "this VM" { "checkpoint" } else { "VM" })]
    MissingGroup {
        /// The group.
        name: String,
        /// "this VM" or "the checkpoint".
        missing_in: &'static str,
    },
    /// A group or module refused its state.
    #[error("{component}: {msg}")]
    Component {
        /// Group or module name.
        component: String,
        /// What is wrong.
        msg: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `from → to` is not in the transition table.
    #[error("illegal checkpoint transition {from:?} → {to:?} (legal from {from:?}: {legal:?})")]
    IllegalTransition {
        /// Current state.
        from: CptState,
        /// Requested state.
        to: CptState,
        /// What `from` may go to.
        legal: Vec<CptState>,
    },
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
    /// A group or module error.
    pub fn component(component: &str, msg: impl std::fmt::Display) -> Self {
        Error::Component {
            component: component.to_string(),
            msg: msg.to_string(),
        }
    }
}

impl CptState {
    /// The states this one may go to.
    pub fn successors(self) -> Vec<CptState> {
        TRANSITIONS
            .iter()
            .filter(|(f, _)| *f == self)
            .map(|(_, t)| *t)
            .collect()
    }

    /// Checks `self → to` against the table.
    pub fn check(self, to: CptState) -> Result<CptState, Error> {
        if TRANSITIONS.contains(&(self, to)) {
            Ok(to)
        } else {
            Err(Error::IllegalTransition {
                from: self,
                to,
                legal: self.successors(),
            })
        }
    }

    /// Whether this state belongs to a restore.
    pub fn is_restore(self) -> bool {
        matches!(self, CptState::Restore | CptState::RestoreSync)
    }

    /// Which side acts first and which second in this state: the monitor first on save,
    /// vmx first on restore.
    pub fn order(self) -> [Side; 2] {
        if self.is_restore() {
            [Side::Vmx, Side::Monitor]
        } else {
            [Side::Monitor, Side::Vmx]
        }
    }
}

/// The state machine: the current state and the checked way to move it.
#[derive(Debug, Clone)]
pub struct Machine {
    state: CptState,
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            state: CptState::None,
        }
    }
}

impl Machine {
    /// The current state.
    pub fn state(&self) -> CptState {
        self.state
    }
    /// Checks that `to` may come next, without moving.
    pub fn check_next(&self, to: CptState) -> Result<(), Error> {
        self.state.check(to).map(|_| ())
    }
    /// Moves to `to` if the table allows it; otherwise changes nothing.
    pub fn advance(&mut self, to: CptState) -> Result<CptState, Error> {
        self.state = self.state.check(to)?;
        Ok(self.state)
    }
    /// The states a whole save passes through, ending as `end` says.
    pub fn save_path(end: SaveEnd) -> Vec<CptState> {
        let mut p = vec![CptState::SaveSync, CptState::Quiesce, CptState::Save];
        if end == SaveEnd::Continue {
            p.push(CptState::ContinueSync);
        }
        p.push(CptState::None);
        p
    }
    /// The states a restore passes through.
    pub fn restore_path() -> Vec<CptState> {
        vec![CptState::Restore, CptState::RestoreSync, CptState::None]
    }
}

/// One recorded step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEntry {
    /// The state the step belongs to.
    pub state: CptState,
    /// Who acted.
    pub side: Side,
    /// What was done (e.g. "modules sync", "group output checkpoint").
    pub step: String,
}

/// The ordered record of checkpoint steps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace(pub Vec<TraceEntry>);

impl Trace {
    /// Records a step.
    pub fn push(&mut self, state: CptState, side: Side, step: impl Into<String>) {
        self.0.push(TraceEntry {
            state,
            side,
            step: step.into(),
        });
    }

    /// Checks that within every state, all of the first side's steps come before any of the
    /// second side's ([`CptState::order`]). Returns the first offending entry.
    pub fn check_order(&self) -> Result<(), TraceEntry> {
        let mut i = 0;
        while i < self.0.len() {
            let state = self.0[i].state;
            let [_, second] = state.order();
            let mut seen_second = false;
            while i < self.0.len() && self.0[i].state == state {
                let e = &self.0[i];
                if e.side == second {
                    seen_second = true;
                } else if seen_second {
                    return Err(e.clone());
                }
                i += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_restore_paths_follow_the_table() {
        for end in [SaveEnd::Continue, SaveEnd::PowerOff] {
            let mut m = Machine::default();
            for s in Machine::save_path(end) {
                m.advance(s).unwrap();
            }
            assert_eq!(m.state(), CptState::None);
        }
        let mut m = Machine::default();
        for s in Machine::restore_path() {
            m.advance(s).unwrap();
        }
    }

    #[test]
    fn illegal_transitions_are_errors_and_change_nothing() {
        let mut m = Machine::default();
        let e = m.advance(CptState::Save).unwrap_err();
        assert!(e.to_string().contains("None → Save"), "{e}");
        assert_eq!(m.state(), CptState::None);
        m.advance(CptState::SaveSync).unwrap();
        assert!(m.advance(CptState::Restore).is_err());
        assert!(m.advance(CptState::SaveSync).is_err());
        assert_eq!(m.state(), CptState::SaveSync);
    }

    #[test]
    fn monitor_first_on_save_vmx_first_on_restore() {
        assert_eq!(CptState::SaveSync.order(), [Side::Monitor, Side::Vmx]);
        assert_eq!(CptState::Restore.order(), [Side::Vmx, Side::Monitor]);
        let mut t = Trace::default();
        t.push(CptState::SaveSync, Side::Monitor, "modules sync");
        t.push(CptState::SaveSync, Side::Vmx, "groups sync");
        t.push(CptState::Restore, Side::Vmx, "groups restore");
        t.push(CptState::Restore, Side::Monitor, "modules restore");
        assert!(t.check_order().is_ok());
        t.push(CptState::Restore, Side::Vmx, "late group");
        assert_eq!(t.check_order().unwrap_err().step, "late group");
    }
}
