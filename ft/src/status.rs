//! The typed `status` of a replicated VM (the `ft` member of `tandem ctl … status`, and the
//! replication status a primary prints when it ends), and [`EndReport`], what a `tandem
//! primary --json` or `tandem standby` process prints when it ends.
//!
//! One type for both roles: what only a primary has (`protected`, `epoch`, `pause_ms`, …) or
//! only a standby has (`phase`, `committed_epoch`) is an `Option`, left out of the JSON when
//! `None`. A primary fills every primary field, so its JSON has exactly the keys the old
//! `json!` status had; `unprotected_because`, `in_flight`, `notes`, `sync` and `last_sync` are
//! written even when empty (as `null`, as before; a standby's status has them too, `null`).
//! Every reader (the control socket's clients, `run-pair`, the tests, the benchmarks)
//! deserializes these types; none reads the JSON by key.
//!
//! ```text
//!  tandem ctl SOCK status   {"ok":true,"state":…,"vcpus":[…],"ft": FtStatus}   (VmStatus)
//!  FtStatus                 {"role":"primary"|"standby","generation":N|null,
//!                            primary: "protected","epoch","last_ack","pause_ms",…
//!                            standby: "phase","committed_epoch",
//!                            "counters": PrimaryCounters | StandbyCounters,
//!                            "notes": {"failover": FailoverReport} | null, …}
//!  primary --json, at end   {"role":"primary","report": RunReport,"ft": FtStatus}
//!                           {"role":"primary","report": {"moved_to": ADDR,"generation": N,
//!                            "report": RunReport},"ft": FtStatus}   (moved by a migration)
//!  ctl migrate, moved       MigrationDone {"ok":true,"to":ADDR,"generation":N,"downtime_ms":…}
//!  standby, at end          {"role":"standby","took_over":false,"commits":N,"stats": FtStatus}
//!                           {"role":"standby","took_over":false,"stood_down":"…","stats":…}
//!                           {"role":"standby","took_over":true,"failover": FailoverReport,
//!                            "replication": FtStatus (as standby),"ft": FtStatus (as primary),
//!                            "report": RunReport | {"suspended": path}}
//! ```

use serde::{Deserialize, Serialize};

/// Which side of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs the guest (protected or not).
    Primary,
    /// Receives epochs.
    Standby,
}

/// The replication status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FtStatus {
    /// Primary or standby.
    pub role: Role,
    /// Primary: whether a standby protects the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected: Option<bool>,
    /// Primary: why not (None while protected, or if it never was).
    #[serde(default)]
    pub unprotected_because: Option<String>,
    /// The generation (a standby may not know one yet).
    #[serde(default)]
    pub generation: Option<u64>,
    /// Standby: what it is doing ("protecting", "waiting for the full sync", …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Standby: the last epoch committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_epoch: Option<u64>,
    /// Primary: the last epoch captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Primary: the last epoch acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ack: Option<u64>,
    /// Primary: the epoch sent and not yet acknowledged.
    #[serde(default)]
    pub in_flight: Option<u64>,
    /// Primary: capture → acknowledgement of the last epoch, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<f64>,
    /// Primary: the epoch interval, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<f64>,
    /// Primary: epoch pauses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<PauseMs>,
    /// Primary: bytes sent to the standby.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<BytesSent>,
    /// Counters of the role.
    pub counters: Counters,
    /// Primary: extra facts (the failover that made this primary), or `null`.
    #[serde(default)]
    pub notes: Option<Notes>,
    /// Primary: the re-sync of a joined standby under way.
    #[serde(default)]
    pub sync: Option<SyncStatus>,
    /// Primary: the last re-sync that completed.
    #[serde(default)]
    pub last_sync: Option<LastSync>,
    /// Primary: times a joined standby completed its full sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprotections: Option<u64>,
    /// Primary: the migration under way (`tandem ctl SOCK migrate ADDR`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
}

/// A migration under way, in a primary's status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// The receiver's address.
    pub to: String,
    /// "connecting", "pre-copy", "converging", "switching".
    pub phase: String,
    /// Converging epochs acknowledged so far.
    pub converging_epochs: u32,
    /// The fraction of time the guest is stunned to slow it down.
    pub throttle: f64,
    /// Since the request, ms.
    pub elapsed_ms: f64,
}

/// The answer to `tandem ctl SOCK migrate ADDR` when the VM moved (a failed migration is
/// refused with the reason, `{"ok":false,"error":…}`, and the VM runs on where it was).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationDone {
    /// Always true.
    pub ok: bool,
    /// Where the VM runs now.
    pub to: String,
    /// Its generation there.
    pub generation: u64,
    /// The guest stopped here for the last epoch → the receiver confirmed it took over, ms
    /// (this side's view; the receiver's failover report has when its guest ran).
    pub downtime_ms: f64,
    /// When the guest stopped here, ms since the Unix epoch.
    pub frozen_unix_ms: f64,
    /// The request → the VM moved, ms.
    pub total_ms: f64,
    /// The receiver was this VM's standby already (no pre-copy).
    pub switchover: bool,
    /// The receiver's pre-copy rounds (none for a switchover).
    pub precopy: Option<PreCopySummary>,
    /// Converging epochs before the last.
    pub converging_epochs: u32,
    /// The last epoch's pages.
    pub last_epoch_pages: u64,
    /// Its capture, ms (the guest stopped from its start).
    pub last_epoch_pause_ms: f64,
    /// Its round trip as predicted from the measured link, ms.
    pub predicted_ms: f64,
    /// It was the last because the throttle reached its end, not because it fitted.
    pub forced: bool,
    /// The hardest throttle used (fraction of time the guest was stunned).
    pub max_throttle: f64,
    /// The budget asked for, ms.
    pub max_downtime_ms: f64,
}

impl FtStatus {
    /// A primary's counters.
    pub fn primary_counters(&self) -> Option<&PrimaryCounters> {
        match &self.counters {
            Counters::Primary(c) => Some(c),
            Counters::Standby(_) => None,
        }
    }

    /// A standby's counters.
    pub fn standby_counters(&self) -> Option<&StandbyCounters> {
        match &self.counters {
            Counters::Standby(c) => Some(c),
            Counters::Primary(_) => None,
        }
    }

    /// The failover that made this primary (a standby that took over).
    pub fn failover(&self) -> Option<&FailoverReport> {
        self.notes.as_ref().and_then(|n| n.failover.as_ref())
    }
}

impl std::fmt::Display for FtStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match serde_json::to_string(self) {
            Ok(s) => f.write_str(&s),
            Err(_) => Err(std::fmt::Error),
        }
    }
}

/// Extra facts in a primary's status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Notes {
    /// The failover that made this primary (it was a standby).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverReport>,
}

/// What a failover took.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FailoverReport {
    /// Why the primary was declared dead.
    pub reason: String,
    /// Time since the last frame from the primary when it was declared dead.
    pub silence_ms: f64,
    /// Declared dead → guest running.
    pub activation_ms: f64,
    /// When the guest ran again (Unix ms).
    pub resumed_unix_ms: f64,
    /// The generation this standby took.
    pub generation: u64,
    /// The epoch it resumed from.
    pub from_epoch: u64,
    /// Output records inherited from the retained epochs and released.
    pub inherited_released: u64,
    /// Of the activation: the claim of the generation at the arbiter, ms.
    #[serde(default)]
    pub claim_ms: f64,
    /// After the guest runs again: connecting to the sink as the new generation, ms (output
    /// waits for it).
    #[serde(default)]
    pub sink_ms: f64,
    /// Of the activation: restoring the committed vCPU and device state (the guest runs), ms.
    #[serde(default)]
    pub restore_ms: f64,
}

/// What a `tandem primary --json` or `tandem standby` process prints when it ends (the
/// layouts are in the module doc). Which members are present depends on the role and on how
/// it ended; absent ones are `None`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndReport {
    /// The role the process started in.
    pub role: Role,
    /// Standby: whether it took over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_over: Option<bool>,
    /// Standby whose primary finished: epochs committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commits: Option<u64>,
    /// Standby that stood down (the primary won the next generation): why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stood_down: Option<String>,
    /// Standby that did not take over: its replication status at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<FtStatus>,
    /// Standby that took over: the failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverReport>,
    /// Standby that took over: its replication status as a standby, before the takeover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<FtStatus>,
    /// The primary's final status (a standby that took over: as the new primary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ft: Option<FtStatus>,
    /// How the guest's run ended (a primary, or a standby that took over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<vmx::RunEnd>,
}

impl EndReport {
    /// A standby's end with nothing filled in but its role and whether it took over.
    pub fn standby(took_over: bool) -> Self {
        EndReport {
            role: Role::Standby,
            took_over: Some(took_over),
            commits: None,
            stood_down: None,
            stats: None,
            failover: None,
            replication: None,
            ft: None,
            report: None,
        }
    }

    /// A primary whose guest finished.
    pub fn primary(report: vmx::RunReport, ft: FtStatus) -> Self {
        EndReport {
            report: Some(vmx::RunEnd::Finished(report)),
            ..EndReport::primary_status(ft)
        }
    }

    /// A primary's end with its final status and no report yet.
    pub fn primary_status(ft: FtStatus) -> Self {
        EndReport {
            role: Role::Primary,
            took_over: None,
            commits: None,
            stood_down: None,
            stats: None,
            failover: None,
            replication: None,
            ft: Some(ft),
            report: None,
        }
    }

    /// The guest's run report, if the run finished or was suspended with one.
    pub fn run_report(&self) -> Option<&vmx::RunReport> {
        self.report.as_ref().and_then(vmx::RunEnd::report)
    }
}

impl std::fmt::Display for EndReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match serde_json::to_string(self) {
            Ok(s) => f.write_str(&s),
            Err(_) => Err(std::fmt::Error),
        }
    }
}

/// Epoch pauses (the guest stunned for a capture), ms, over the last 8,192 epochs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PauseMs {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Longest.
    pub max: f64,
    /// Pauses counted.
    pub count: u64,
    /// Median of the monitor's SAVE step within a pause.
    pub save_step_p50: f64,
    /// Median of each phase of a pause, in order (`vmx::machine::PAUSE_PHASES`): where the
    /// time goes.
    #[serde(default)]
    pub phases_p50: Vec<PhaseMs>,
}

/// One phase of the epoch pause.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseMs {
    /// The phase.
    pub phase: String,
    /// Its median, ms.
    pub ms: f64,
}

/// Bytes a primary sent to its standby.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BytesSent {
    /// Page payload on the wire (after compression).
    pub pages: u64,
    /// vCPU and device state.
    pub state: u64,
    /// Held output.
    pub records: u64,
}

/// Counters of either role.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Counters {
    /// A primary's.
    Primary(PrimaryCounters),
    /// A standby's.
    Standby(StandbyCounters),
}

/// A primary's counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrimaryCounters {
    /// Full syncs sent (the first, and one per re-sync).
    pub full_syncs: u64,
    /// Epochs acknowledged.
    pub epochs: u64,
    /// Dirty bytes captured by epochs.
    pub mem_bytes: u64,
    /// Bytes captured by full syncs.
    pub full_sync_bytes: u64,
    /// State bytes sent.
    pub state_bytes: u64,
    /// NACKs of epochs that were then acknowledged.
    pub nacks: u64,
    /// Times the guest was stunned to wait for the standby.
    pub throttles: u64,
    /// Epochs acknowledged after the next tick: the next epoch was captured at the Ack, the
    /// guest running meanwhile (a second tick without the Ack stuns it: a throttle).
    #[serde(default)]
    pub late_epochs: u64,
    /// Time the guest spent stunned waiting, ms.
    pub throttled_ms: f64,
    /// Records released to the outside.
    pub released_records: u64,
    /// Page ranges sent as XOR deltas against the copy sent before.
    #[serde(default)]
    pub xor_ranges: u64,
    /// Bytes of page copies the primary keeps as XOR bases (bounded).
    #[serde(default)]
    pub xor_cache_bytes: u64,
}

/// A standby's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StandbyCounters {
    /// Epochs committed.
    pub commits: u64,
    /// Epochs refused (`Stale` refusals not counted).
    pub nacks: u64,
    /// Epochs dropped incomplete (the primary died while sending).
    pub partial_epochs_discarded: u64,
    /// Pre-copy rounds verified.
    pub precopy_rounds: u64,
    /// Pages in them.
    pub precopy_pages: u64,
    /// Page payload bytes received.
    pub bytes_received: u64,
    /// Frames received.
    pub frames: u64,
}

/// A re-sync under way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// "pre-copy starting", "pre-copy round N", "completing epoch".
    pub phase: String,
    /// The joined standby.
    pub peer: String,
    /// The completing epoch (phase "completing epoch").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Pages of the current round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_pages: Option<u64>,
    /// Of them, sent so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_pages: Option<u64>,
    /// Since the pre-copy started, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
}

/// The last sync of a new standby that completed (the standby of the start, or a joiner).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastSync {
    /// The standby.
    pub peer: String,
    /// The standby of the start (not a re-protection).
    #[serde(default)]
    pub first: bool,
    /// Join (or connection at start) → commit of the completing epoch, ms.
    pub joined_to_protected_ms: f64,
    /// The completing epoch.
    pub completing_epoch: u64,
    /// Its pages (dirtied during the last pre-copy round).
    pub completing_pages: u64,
    /// How long its capture stopped the guest, ms (the only stop of the sync).
    #[serde(default)]
    pub completing_pause_ms: f64,
    /// Of that, waiting for the vCPUs to stop, ms.
    #[serde(default)]
    pub completing_stun_ms: f64,
    /// The pre-copy rounds.
    pub precopy: Option<PreCopySummary>,
    /// When the standby protected the VM, ms since the Unix epoch.
    pub protected_unix_ms: f64,
}

/// What a pre-copy did (the [`crate::precopy::PreCopyReport`], readable back).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PreCopySummary {
    /// The rounds, in order.
    pub rounds: Vec<RoundSummary>,
    /// Start → last round sent, ms.
    pub ms: f64,
}

/// One pre-copy round.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    /// Pages sent.
    pub pages: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// How long it took, ms.
    pub ms: f64,
}

impl From<&crate::precopy::PreCopyReport> for PreCopySummary {
    fn from(r: &crate::precopy::PreCopyReport) -> Self {
        PreCopySummary {
            rounds: r
                .rounds
                .iter()
                .map(|x| RoundSummary {
                    pages: x.pages,
                    wire_bytes: x.wire_bytes,
                    ms: x.ms,
                })
                .collect(),
            ms: r.ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn primary() -> FtStatus {
        FtStatus {
            role: Role::Primary,
            protected: Some(false),
            unprotected_because: None,
            generation: Some(2),
            phase: None,
            committed_epoch: None,
            epoch: Some(7),
            last_ack: Some(6),
            in_flight: None,
            lag_ms: Some(1.5),
            interval_ms: Some(50.0),
            pause_ms: Some(PauseMs::default()),
            bytes_sent: Some(BytesSent::default()),
            counters: Counters::Primary(PrimaryCounters::default()),
            notes: None,
            sync: None,
            last_sync: None,
            reprotections: Some(0),
            migration: None,
        }
    }

    #[test]
    fn primary_status_has_the_keys_of_the_old_json() {
        let v = serde_json::to_value(primary()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut want = vec![
            "role",
            "protected",
            "unprotected_because",
            "generation",
            "epoch",
            "last_ack",
            "in_flight",
            "lag_ms",
            "interval_ms",
            "pause_ms",
            "bytes_sent",
            "counters",
            "notes",
            "sync",
            "last_sync",
            "reprotections",
        ];
        want.sort();
        assert_eq!(keys, want);
        let mut pause: Vec<&str> = v["pause_ms"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        pause.sort();
        assert_eq!(
            pause,
            ["count", "max", "p50", "p99", "phases_p50", "save_step_p50"]
        );
        assert_eq!(v["counters"].as_object().unwrap().len(), 12);
        assert_eq!(v["role"], "primary");
        let back: FtStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, primary());
    }

    #[test]
    fn a_standby_status_reads_back() {
        // What the standby writes today.
        let v = json!({
            "role": "standby",
            "phase": "protecting",
            "generation": null,
            "committed_epoch": 12,
            "counters": {"commits": 12, "nacks": 1, "partial_epochs_discarded": 0,
                         "precopy_rounds": 0, "precopy_pages": 0, "bytes_received": 99,
                         "frames": 40},
        });
        let s: FtStatus = serde_json::from_value(v).unwrap();
        assert_eq!(s.role, Role::Standby);
        assert_eq!(s.committed_epoch, Some(12));
        assert_eq!(s.protected, None);
        match &s.counters {
            Counters::Standby(c) => assert_eq!((c.commits, c.frames), (12, 40)),
            other => panic!("{other:?}"),
        }
        let again = serde_json::to_value(&s).unwrap();
        assert_eq!(again["phase"], "protecting");
        assert!(again.get("pause_ms").is_none());
    }

    #[test]
    fn a_primary_end_and_its_failover_notes_read_back() {
        let mut ft = primary();
        ft.notes = Some(Notes {
            failover: Some(FailoverReport {
                reason: "the primary's connection closed".into(),
                silence_ms: 1.0,
                activation_ms: 2.0,
                resumed_unix_ms: 3.0,
                generation: 2,
                from_epoch: 9,
                inherited_released: 0,
                ..Default::default()
            }),
        });
        let v = serde_json::to_value(&ft).unwrap();
        assert_eq!(v["notes"]["failover"]["from_epoch"], 9);
        let back: FtStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back.failover().map(|f| f.generation), Some(2));
        assert_eq!(primary().failover(), None);
        assert!(back.primary_counters().is_some() && back.standby_counters().is_none());

        let report = vmx::RunReport {
            digest: devices::DigestReport {
                vcpus: vec![],
                total: "00".into(),
            },
            wall_ms: 1.0,
            vcpus: vec![],
            heartbeat: Default::default(),
        };
        let end = EndReport::primary(report, ft);
        let v = serde_json::to_value(&end).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["ft", "report", "role"]);
        assert_eq!(v["role"], "primary");
        let back: EndReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, end);
        assert_eq!(back.run_report().map(|r| r.wall_ms), Some(1.0));
    }

    #[test]
    fn sync_phases_keep_their_keys() {
        let s = SyncStatus {
            phase: "completing epoch".into(),
            peer: "p".into(),
            epoch: Some(3),
            round_pages: None,
            sent_pages: None,
            elapsed_ms: None,
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"phase": "completing epoch", "peer": "p", "epoch": 3})
        );
    }
}
