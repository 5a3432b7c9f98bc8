//! The primary's replication protocol as a pure state machine: [`Machine::on`] takes an
//! [`Event`] and returns the [`Action`]s to take, in order. It does no I/O (it only logs odd
//! events through `log`); [`super::Protector`] executes the actions against the VM, the link,
//! the sink and the arbiter, and feeds their answers back as events.
//!
//! ```text
//!                 Connected (the standby of the start), Joined (a later one) or
//!                 Migrate (a receiver): pre-copy
//!   ┌─────────────┐ ────────▶ ┌───────────┐  LinkUp   ┌──────────────┐  Ack(E)   ┌──────────────┐
//!   │ Unprotected │           │ Resyncing │ ────────▶ │ Completing   │ ────────▶ │ Protected    │
//!   │  {reason}   │ ◀──────── │  {peer,   │           │  {peer, why, │  Synced   │ {in_flight,  │
//!   └─────────────┘  failed   │   why,    │           │   E, due}    │           │  late, thr.} │
//!      ▲      ▲               │   step}   │           └──────────────┘           └──────────────┘
//!      │      │               └───────────┘             │          │ why = Migrate  │ Switchover
//!      │      │                                         │          ▼                ▼
//!      │      │                                         │    ┌──────────────┐ Assessed(last)
//!      │      │                                         │    │ Switching    │ ───────────┐
//!      │      │                                         │    │ {peer, E,    │ ◀─┐        ▼
//!      │      │                                         │    │  throttled}  │ ──┘  ┌────────────┐
//!      │      │                                         │    └──────────────┘      │ Handing    │
//!      │      │                                         │ LinkLost  │   Ack, Assess, │ {peer, F,  │
//!      │      │ Won              with an arbiter        ├───────────┘   Capture     │  sent}     │
//!      │  ┌──────────┐ ◀────────────────────────────────┤   (also from Protected,   └────────────┘
//!      │  │ Claiming │                                  │    Finishing, Handing)      │ Switched
//!      │  │ {g+1,    │ ── Lost ──▶ Fenced, or Moved     │                             ▼
//!      │  │  moving} │    when moving to a receiver     │                       ┌───────────┐
//!      │  └──────────┘                                  │                       │ Moved     │
//!      └────────── without an arbiter ──────────────────┘                       │ {to, g+1} │
//!                                                                               └───────────┘
//!   Protected ── GuestFinished ──▶ Finishing {E, last} ── Ack(last) ──▶ Done
//!   Still(not newest), from Unprotected, Resyncing or Done ──▶ Fenced
//! ```
//!
//! Within `Protected`: a tick with nothing in flight captures and sends the next epoch; a tick
//! with epoch E in flight makes E late (the guest runs on; the next epoch is captured at E's
//! Ack, so it grows by the wait); a second tick with E still in flight stuns the guest
//! (throttled); Ack(E) releases E's output and, if E was late or the guest stunned, captures
//! the next epoch at once (and lets the guest go). `Completing` is
//! `Protected` with the epoch that completes a pre-copy in flight, except that a tick does not
//! stun the guest: the new standby may take long to commit that epoch (it builds its VM and
//! writes the pre-copied image first), and the guest runs on meanwhile (`due`: the next epoch
//! is captured as soon as the Ack comes). Its Ack makes the new standby the standby (`Synced`).
//! There is no stunned full sync: the standby a primary connects to at start (`Connected`) is
//! synced exactly like one that joins later, by a pre-copy while the guest runs (its output
//! released at once meanwhile, as for any unprotected VM), and the guest's only stop is the
//! completing epoch's capture; from that epoch on output waits for acknowledgements.
//!
//! **Planned migration** (`tandem ctl SOCK migrate ADDR`): the receiver at ADDR (a `tandem
//! standby`) is synced like any new standby (`Migrate`, from `Unprotected`; from `Protected`
//! the current standby is told goodbye first), or, when ADDR is the current standby's own
//! address, it is used as it is (`Switchover`). Then `Switching`: epochs back to back, each
//! with the exact dirty set, each Ack followed by `Assess` (the driver's convergence policy:
//! throttle the guest harder, or say `last`). The last epoch F is captured with the guest
//! frozen (`Freeze`) and stays so (`Handing`); once F is acknowledged its output is released
//! and `Switch` tells the receiver to take over as generation g+1 (through the arbiter, as a
//! failover does); its confirmation (`Switched`) ends this primary (`Moved`). Nothing leaves
//! this VM after the `Switch`. A migration that leaves these states without `Moved` ends with
//! `MigrationFailed` (first in its batch) and the VM runs on here; a link lost during the
//! migration is a lost standby as always (claim g+1), except that losing that claim means the
//! receiver took the VM: `Moved`, not fenced.
//!
//! "unprotect" is: DropLink, WantStandby, StopTimer, Release(in-flight epoch), ReleaseHeld,
//! Resume (if throttled) — the standby is gone, what it would have acknowledged goes out now.
//!
//! | state                         | event                      | actions                                   | next                           |
//! |-------------------------------|----------------------------|-------------------------------------------|--------------------------------|
//! | Unprotected                   | Connected                  | WantStandby(no), StartPreCopy(start)      | Resyncing(PreCopy)             |
//! | Unprotected                   | Joined, guest running      | WantStandby(no), StartPreCopy(rejoin)     | Resyncing(PreCopy)             |
//! | Unprotected                   | Migrate, guest running     | WantStandby(no), StartPreCopy(migrate)    | Resyncing(PreCopy)             |
//! | Protected                     | Migrate, guest running     | Goodbye, \[Release(E)\], ReleaseHeld, \[Resume\], StartPreCopy(migrate) | Resyncing(PreCopy) |
//! | Protected{E}                  | Switchover                 | —                                         | Switching{E}                   |
//! | Protected{None}               | Switchover                 | Capture(switch), Send                     | Switching{E}                   |
//! | any other                     | Migrate, Switchover        | MigrationFailed                           | same                           |
//! | Unprotected, Done             | Joined, guest finished     | Refuse(finished)                          | same                           |
//! | Unprotected, Resyncing, Done  | OutputDrained(pending)     | AskStill (arbiter) / ReleaseHeld          | same                           |
//! | Unprotected, Resyncing, Done  | Still(newest)              | ReleaseHeld                               | same                           |
//! | Unprotected, Resyncing, Done  | Still(not newest)          | Fence(not newest)                         | Fenced                         |
//! | any without a link            | Tick                       | StopTimer                                 | same                           |
//! | Resyncing(PreCopy)            | Joined                     | Refuse(syncing)                           | same                           |
//! | Resyncing(PreCopy)            | PreCopyFailed              | WantStandby(yes)                          | Unprotected                    |
//! | Resyncing(PreCopy)            | PreCopyDone, finished      | —                                         | Unprotected                    |
//! | Resyncing(PreCopy)            | PreCopyDone(pending, arb.) | AskStill                                  | Resyncing(Releasing)           |
//! | Resyncing(PreCopy)            | PreCopyDone (otherwise)    | \[ReleaseHeld\], StartLink                  | Resyncing(Linking)             |
//! | Resyncing(Releasing)          | Still(newest)              | ReleaseHeld, StartLink                    | Resyncing(Linking)             |
//! | Resyncing(Linking)            | LinkFailed                 | WantStandby(yes)                          | Unprotected                    |
//! | Resyncing(Linking)            | LinkUp                     | Capture(completing), Send                 | Completing{E}                  |
//! | Completing{E}                 | Tick                       | StopTimer                                 | Completing{E, due}             |
//! | Completing{E} (start, rejoin) | Ack(E)                     | Release(E), Synced, \[Capture, Send\] (due) | Protected                    |
//! | Completing{E} (migrate)       | Ack(E)                     | Release(E), Synced, Assess(E)             | Switching{None}                |
//! | Protected{None}               | Tick, guest running        | Capture, Send                             | Protected{E}                   |
//! | Protected{E}                  | Tick, guest running        | Late(E)                                   | Protected{E, late}             |
//! | Protected{E, late}, Switching{E} | Tick, guest running     | Stun, StopTimer                           | throttled                      |
//! | Protected{E}, Switching{E}    | Tick, guest paused/finished| StopTimer                                 | same                           |
//! | throttled, Handing            | Tick                       | StopTimer                                 | same                           |
//! | Protected{E}                  | Ack(E)                     | Release(E)                                | Protected{None}                |
//! | Protected{E} throttled        | Ack(E)                     | Release(E), Capture, Send, Resume         | Protected{E+1}                 |
//! | Protected{E, late}            | Ack(E)                     | Release(E), Capture, Send                 | Protected{E+1}                 |
//! | Switching{E}                  | Ack(E)                     | Release(E), Assess(E)                     | Switching{None}                |
//! | Switching{None}               | Assessed(not last)         | Capture(switch), Send, \[Resume\]           | Switching{E+1}                 |
//! | Switching{None}               | Assessed(last)             | Freeze, Capture(final), Send              | Handing{F}                     |
//! | Handing{F}                    | Ack(F)                     | Release(F), Switch(F)                     | Handing{F, sent}               |
//! | Handing{F, sent}              | Switched(g+1)              | Moved                                     | Moved                          |
//! | any                           | Ack(not in flight), Nack   | —                                         | same                           |
//! | Protected, Completing, Switching, Handing, Finishing | LinkLost (arbiter) | Claim(g+1)          | Claiming                       |
//! | Protected, Completing, Switching, Handing, Finishing | LinkLost (no arbiter) | unprotect        | Unprotected{reason}            |
//! | Claiming                      | Won                        | ReconnectSink(g+1), unprotect             | Unprotected{reason}            |
//! | Claiming                      | Lost                       | Fence(lost claim)                         | Fenced                         |
//! | Claiming (moving to R)        | Lost                       | Moved (R holds g+1)                       | Moved                          |
//! | Protected, Completing, Switching, Handing, Finishing | Joined | Refuse(already protected)         | same                           |
//! | Protected{None}, Switching{None} | GuestFinished           | Capture, Send                             | Finishing{E, last}             |
//! | Protected{E}, Completing{E}, Switching{E} | GuestFinished  | —                                         | Finishing{E}                   |
//! | Finishing{E}                  | Ack(E)                     | Release(E), \[Synced\], Capture, Send       | Finishing{E+1, last}           |
//! | Finishing{E} throttled        | Ack(E)                     | Release(E), Capture, Send, Resume         | Finishing{E+1}                 |
//! | Finishing{E, last}            | Ack(E)                     | Release(E), Goodbye                       | Done                           |
//! | Fenced, Moved                 | anything                   | —                                         | same                           |

use std::fmt;

use transport::{Epoch, Fence, Generation};

/// Where the primary stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// No standby: output is released at once (after the arbiter, if any, agrees).
    Unprotected {
        /// Why (None: never protected).
        reason: Option<String>,
    },
    /// A standby is being synced by pre-copy while the guest runs unprotected.
    Resyncing {
        /// Who.
        peer: String,
        /// Why: the standby of the start, a later one, or a migration's receiver.
        why: SyncReason,
        /// Why the VM was unprotected (still the reason until the sync completes).
        reason: Option<String>,
        /// How far.
        step: ResyncStep,
    },
    /// The pre-copy is done and the epoch that completes the sync is in flight.
    Completing {
        /// The new standby.
        peer: String,
        /// Why it is being synced.
        why: SyncReason,
        /// The completing epoch.
        epoch: u64,
        /// The epoch timer fired meanwhile: the next epoch is captured at the Ack (the guest
        /// runs on; it is not stunned for this epoch).
        due: bool,
    },
    /// A standby protects the VM; output waits for the acknowledgement of its epoch.
    Protected {
        /// The epoch sent and not yet acknowledged (one deep).
        in_flight: Option<u64>,
        /// The guest is stunned until `in_flight` is acknowledged (never without one).
        throttled: bool,
        /// The epoch timer fired with `in_flight` unacknowledged: the next epoch is captured
        /// at its Ack while the guest runs on; a second tick before that Ack stuns the guest.
        late: bool,
    },
    /// A migration converges: epochs back to back to the receiver `peer` (which protects the
    /// VM), each with the exact dirty set, until one is small enough for the last.
    Switching {
        /// The receiver.
        peer: String,
        /// The epoch sent and not yet acknowledged.
        in_flight: Option<u64>,
        /// The guest is stunned until the next capture.
        throttled: bool,
    },
    /// The last epoch of a migration is in flight (or acknowledged and the switch sent); the
    /// guest is frozen and nothing more is released here.
    Handing {
        /// The receiver.
        peer: String,
        /// The last epoch.
        epoch: u64,
        /// `epoch` was acknowledged and the receiver told to take over.
        sent: bool,
    },
    /// The guest finished: the epochs in flight and one last one are acknowledged, then goodbye.
    Finishing {
        /// The epoch in flight (there always is one).
        epoch: u64,
        /// `epoch` is the last one.
        last: bool,
        /// The guest is stunned until `epoch` is acknowledged.
        throttled: bool,
        /// `epoch` completes the sync of this new standby.
        completing: Option<(String, SyncReason)>,
    },
    /// The standby was lost; the arbiter is asked for the next generation. Output stays held.
    Claiming {
        /// The generation claimed.
        generation: u64,
        /// Why the standby was lost.
        reason: String,
        /// The epoch that was in flight.
        in_flight: Option<u64>,
        /// The guest was stunned (or frozen).
        throttled: bool,
        /// The standby was a migration's receiver: if it holds the generation, the VM moved.
        moving_to: Option<String>,
    },
    /// Another VM is primary: the guest is stopped and nothing more is released.
    Fenced {
        /// Why.
        why: FenceReason,
    },
    /// The VM moved to the receiver `to`, now its primary as `generation`; this one is done.
    Moved {
        /// The receiver.
        to: String,
        /// Its generation.
        generation: u64,
    },
    /// The guest finished and the standby was told goodbye.
    Done,
}

/// Why a standby is being synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncReason {
    /// The standby this primary connected to at start (its first protection).
    Start,
    /// A standby that joined (or was found by redialling) while the VM ran unprotected.
    Rejoin,
    /// The receiver of a planned migration.
    Migrate,
}

/// Steps of a re-sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncStep {
    /// The pre-copy rounds run on their thread.
    PreCopy,
    /// The rounds are done; the arbiter is asked before output drained so far is released.
    Releasing,
    /// The link to the new standby is being started.
    Linking,
}

/// Why a primary fenced itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceReason {
    /// It lost its standby and then the claim of `generation`.
    LostClaim {
        /// Why the standby was lost.
        reason: String,
        /// The generation another VM claimed first.
        generation: u64,
    },
    /// The arbiter says `generation` (this VM's) is no longer the newest.
    NotNewest {
        /// This VM's generation.
        generation: u64,
    },
}

/// Why a joining standby is turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A standby protects the VM already.
    AlreadyProtected,
    /// Another standby is being synced.
    Syncing,
    /// The guest has finished.
    Finished,
    /// This VM is fenced.
    Fenced,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::AlreadyProtected => "this VM is already protected",
            Refusal::Syncing => "another standby is being synced",
            Refusal::Finished => "the guest has finished",
            Refusal::Fenced => "this VM is fenced",
        })
    }
}

/// What the guest is doing (the facts a tick depends on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Guest {
    /// Paused (by the user, or still paused at boot).
    pub paused: bool,
    /// Every vCPU is done.
    pub finished: bool,
}

/// An arbiter's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The claimed generation is ours.
    Won,
    /// Another VM claimed it first.
    Lost,
    /// Whether our generation is still the newest.
    Still {
        /// It is.
        newest: bool,
    },
}

/// What happens to the primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The standby of the start answered: protect the VM by a pre-copy while it runs.
    Connected {
        /// Who.
        peer: String,
    },
    /// The epoch timer fired.
    Tick {
        /// The guest's state.
        guest: Guest,
    },
    /// The standby committed `epoch`.
    Ack {
        /// The epoch.
        epoch: u64,
    },
    /// The standby refused `epoch` (the link sends it again; too many refusals end the link).
    Nack {
        /// The epoch.
        epoch: u64,
    },
    /// The link to the standby is gone.
    LinkLost {
        /// Why.
        reason: String,
    },
    /// A standby joined (or was found by redialling).
    Joined {
        /// Who.
        peer: String,
        /// Every vCPU is done.
        guest_finished: bool,
    },
    /// A migration's receiver answered at `peer` (`tandem ctl SOCK migrate ADDR`).
    Migrate {
        /// The receiver.
        peer: String,
        /// Every vCPU is done.
        guest_finished: bool,
    },
    /// A migration to this VM's own standby, at `peer` (a switchover).
    Switchover {
        /// The standby.
        peer: String,
    },
    /// The answer to [`Action::Assess`].
    Assessed {
        /// The next capture is the last (the guest stays frozen for it).
        last: bool,
    },
    /// The receiver took over as `generation` (the answer to [`Action::Switch`]).
    Switched {
        /// Its generation.
        generation: u64,
    },
    /// The pre-copy rounds to the joiner are done.
    PreCopyDone {
        /// Every vCPU is done.
        guest_finished: bool,
        /// Drained output waits for release.
        pending_output: bool,
    },
    /// The pre-copy failed (or could not start).
    PreCopyFailed {
        /// Why.
        reason: String,
    },
    /// The link to the joiner runs.
    LinkUp,
    /// The link to the joiner could not start.
    LinkFailed {
        /// Why.
        reason: String,
    },
    /// The vCPUs drained output.
    OutputDrained {
        /// Drained output waits for release (only looked at while no standby protects).
        pending: bool,
    },
    /// Every vCPU is done.
    GuestFinished,
    /// The arbiter answered a [`Action::Claim`] or [`Action::AskStill`].
    Arbiter(Answer),
}

/// What kind of epoch a capture is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureKind {
    /// The epoch that completes a pre-copy (the pages dirtied during its last round).
    Completing,
    /// An ordinary epoch: the dirty pages.
    Epoch,
    /// An epoch of a converging migration: exactly the pages written since the last capture
    /// (no page is left writable between epochs, so the set shrinks as the guest slows).
    Switch,
    /// A migration's last epoch: as [`CaptureKind::Switch`], with the guest frozen.
    Final,
}

/// What the driver does, in order. An action with an answer ([`Action::Claim`],
/// [`Action::AskStill`], [`Action::StartLink`], [`Action::Assess`], and
/// [`Action::StartPreCopy`] when the thread cannot start) is always the last of its batch;
/// the answer is the next event. [`Action::Switch`] is answered later, by the link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Capture epoch `epoch` (stun, copy, unstun) with the held output; arm the epoch timer.
    Capture {
        /// The epoch.
        epoch: u64,
        /// Completing, ordinary, or a migration's.
        kind: CaptureKind,
    },
    /// The epoch timer fired with `epoch` unacknowledged: the next capture waits for its
    /// Ack, the guest running on; count a late epoch and arm the timer for one more interval.
    Late {
        /// The epoch in flight.
        epoch: u64,
    },
    /// Hand the captured epoch to the link.
    Send {
        /// The epoch.
        epoch: u64,
    },
    /// Release the output records of epoch `epoch`.
    Release {
        /// The epoch.
        epoch: u64,
        /// Because the standby acknowledged it (count it), not because the standby is gone.
        acked: bool,
    },
    /// Release the output drained and held so far.
    ReleaseHeld,
    /// Stun the guest until the standby catches up.
    Stun,
    /// Let the stunned guest run again.
    Resume,
    /// Disarm the epoch timer (until the next capture).
    StopTimer,
    /// Claim `generation` at the arbiter; answer [`Answer::Won`] or [`Answer::Lost`].
    Claim {
        /// The generation.
        generation: u64,
    },
    /// Ask the arbiter whether `generation` is still the newest; answer [`Answer::Still`].
    AskStill {
        /// The generation.
        generation: u64,
    },
    /// Reconnect to the sink as `generation`.
    ReconnectSink {
        /// The generation.
        generation: u64,
    },
    /// The standby is gone: drop the link; the VM runs unprotected.
    DropLink {
        /// Why.
        reason: String,
    },
    /// Stop the guest and release nothing: another VM is primary. Ends the run.
    Fence {
        /// Why.
        why: FenceReason,
    },
    /// Whether the redial thread should look for a standby.
    WantStandby(bool),
    /// Start the pre-copy to the joiner; [`Event::PreCopyFailed`] if it cannot start.
    StartPreCopy {
        /// Who.
        peer: String,
        /// Why.
        why: SyncReason,
        /// Generation and the epoch that will complete the sync.
        fence: Fence,
    },
    /// Turn the joiner away.
    Refuse {
        /// Who.
        peer: String,
        /// Why.
        why: Refusal,
        /// The primary's generation and next epoch.
        fence: Fence,
    },
    /// Start the link over the pre-copied joiner's channel; answer [`Event::LinkUp`] or
    /// [`Event::LinkFailed`].
    StartLink {
        /// Who.
        peer: String,
    },
    /// The new standby committed the completing epoch: it protects the VM.
    Synced {
        /// Who.
        peer: String,
        /// The completing epoch.
        epoch: u64,
        /// Why it was synced.
        why: SyncReason,
    },
    /// A converging epoch of a migration was acknowledged: decide (and throttle the guest
    /// accordingly); answer [`Event::Assessed`].
    Assess {
        /// The epoch.
        epoch: u64,
    },
    /// Stop the guest for the last epoch of a migration; it runs here again only if the
    /// migration fails ([`Action::Resume`]).
    Freeze,
    /// Tell the receiver, which committed `epoch`, to take over; the link answers with
    /// [`Event::Switched`] or [`Event::LinkLost`].
    Switch {
        /// The receiver.
        peer: String,
        /// The last epoch.
        epoch: u64,
    },
    /// The VM runs at `to` as `generation`: this primary ends.
    Moved {
        /// The receiver.
        to: String,
        /// Its generation.
        generation: u64,
    },
    /// The migration to `to` ended without moving the VM; it runs on here.
    MigrationFailed {
        /// The receiver.
        to: String,
        /// Why.
        why: String,
    },
    /// Tell the standby goodbye (the guest finished, or it is being replaced by a migration's
    /// receiver) and drop its link.
    Goodbye,
}

/// The primary's protocol state.
#[derive(Clone, Debug)]
pub struct Machine {
    state: State,
    generation: u64,
    next_epoch: u64,
    last_ack: u64,
    arbiter: bool,
    /// The receiver of the migration under way.
    migrating: Option<String>,
}

impl Machine {
    /// An unprotected primary of `generation`; `arbiter`: role changes are arbitrated.
    pub fn new(generation: u64, arbiter: bool) -> Self {
        Machine {
            state: State::Unprotected { reason: None },
            generation,
            next_epoch: 1,
            last_ack: 0,
            arbiter,
            migrating: None,
        }
    }

    /// Whether role changes are arbitrated.
    pub fn set_arbiter(&mut self, on: bool) {
        self.arbiter = on;
    }

    /// The state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The next epoch to capture.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// The last epoch acknowledged.
    pub fn last_ack(&self) -> u64 {
        self.last_ack
    }

    /// Whether a standby protects the VM.
    pub fn protected(&self) -> bool {
        matches!(
            self.state,
            State::Protected { .. }
                | State::Completing { .. }
                | State::Switching { .. }
                | State::Handing { .. }
                | State::Finishing { .. }
                | State::Claiming { .. }
        )
    }

    /// Why the VM is unprotected (None while protected, or never protected).
    pub fn unprotected_because(&self) -> Option<&str> {
        match &self.state {
            State::Unprotected { reason } | State::Resyncing { reason, .. } => reason.as_deref(),
            _ => None,
        }
    }

    /// The epoch sent and not acknowledged.
    pub fn in_flight(&self) -> Option<u64> {
        match &self.state {
            State::Protected { in_flight, .. }
            | State::Claiming { in_flight, .. }
            | State::Switching { in_flight, .. } => *in_flight,
            State::Completing { epoch, .. } | State::Finishing { epoch, .. } => Some(*epoch),
            State::Handing { epoch, sent, .. } => (!sent).then_some(*epoch),
            _ => None,
        }
    }

    /// The joiner being pre-copied.
    pub fn resyncing(&self) -> Option<&str> {
        match &self.state {
            State::Resyncing { peer, .. } => Some(peer),
            _ => None,
        }
    }

    /// The joiner and the epoch that completes its sync, while in flight.
    pub fn completing(&self) -> Option<(&str, u64)> {
        match &self.state {
            State::Completing { peer, epoch, .. } => Some((peer, *epoch)),
            State::Finishing {
                completing: Some((peer, _)),
                epoch,
                ..
            } => Some((peer, *epoch)),
            _ => None,
        }
    }

    /// The receiver of the migration under way.
    pub fn migrating(&self) -> Option<&str> {
        self.migrating.as_deref()
    }

    /// Whether the guest is frozen for the last epoch of a migration.
    pub fn handing(&self) -> bool {
        matches!(self.state, State::Handing { .. })
    }

    /// Where the VM moved, and as which generation.
    pub fn moved(&self) -> Option<(&str, u64)> {
        match &self.state {
            State::Moved { to, generation } => Some((to, *generation)),
            _ => None,
        }
    }

    /// Whether drained output goes out at once (no standby would acknowledge it).
    pub fn releases_at_once(&self) -> bool {
        matches!(
            self.state,
            State::Unprotected { .. } | State::Resyncing { .. } | State::Done
        )
    }

    /// Whether the last epochs are still awaited after the guest finished.
    pub fn finishing(&self) -> bool {
        matches!(self.state, State::Finishing { .. })
    }

    /// Whether the VM fenced itself.
    pub fn fenced(&self) -> bool {
        matches!(self.state, State::Fenced { .. })
    }

    fn fence_at(&self, epoch: u64) -> Fence {
        Fence {
            generation: Generation(self.generation),
            epoch: Epoch(epoch),
        }
    }

    fn capture(&mut self, kind: CaptureKind, acts: &mut Vec<Action>) -> u64 {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        acts.push(Action::Capture { epoch, kind });
        acts.push(Action::Send { epoch });
        epoch
    }

    /// The standby is gone (and, with an arbiter, the next generation is ours).
    fn unprotect(
        &mut self,
        reason: String,
        in_flight: Option<u64>,
        throttled: bool,
        acts: &mut Vec<Action>,
    ) -> State {
        acts.push(Action::DropLink {
            reason: reason.clone(),
        });
        acts.push(Action::WantStandby(true));
        release_everything(in_flight, throttled, acts);
        State::Unprotected {
            reason: Some(reason),
        }
    }

    /// The standby is gone: claim the next generation first, if arbitrated.
    fn lost(
        &mut self,
        reason: String,
        in_flight: Option<u64>,
        throttled: bool,
        acts: &mut Vec<Action>,
    ) -> State {
        if self.arbiter {
            let generation = self.generation + 1;
            acts.push(Action::Claim { generation });
            State::Claiming {
                generation,
                reason,
                in_flight,
                throttled,
                moving_to: self.migrating.clone(),
            }
        } else {
            self.unprotect(reason, in_flight, throttled, acts)
        }
    }

    /// Epoch `epoch` was acknowledged while `throttled`: capture the next one, then let the
    /// guest go.
    fn acked(&mut self, epoch: u64, throttled: bool, acts: &mut Vec<Action>) -> Option<u64> {
        self.last_ack = epoch;
        acts.push(Action::Release { epoch, acked: true });
        throttled.then(|| {
            let e = self.capture(CaptureKind::Epoch, acts);
            acts.push(Action::Resume);
            e
        })
    }

    /// Handles `ev`; returns what to do, in order.
    pub fn on(&mut self, ev: Event) -> Vec<Action> {
        let state = std::mem::replace(&mut self.state, State::Done);
        let cause = match (&state, &ev) {
            (State::Claiming { reason, .. }, Event::Arbiter(Answer::Won)) => {
                format!(
                    "the link to the receiver broke ({reason}) and this VM won the next generation"
                )
            }
            (_, ev) => describe(ev),
        };
        let mut acts = Vec::new();
        let next = self.step(state, ev, &mut acts);
        // A migration that leaves its states without moving the VM has failed.
        if !migration_state(&next) {
            if let Some(to) = self.migrating.take() {
                acts.insert(0, Action::MigrationFailed { to, why: cause });
            }
        }
        self.state = next;
        acts
    }

    fn step(&mut self, state: State, ev: Event, acts: &mut Vec<Action>) -> State {
        use State as S;
        match (state, ev) {
            (S::Fenced { why }, ev) => {
                log::debug!("fenced: ignoring {ev:?}");
                S::Fenced { why }
            }
            (s @ S::Moved { .. }, ev) => {
                log::debug!("moved: ignoring {ev:?}");
                s
            }

            // Protection at start: the same pre-copy as a joiner's, while the guest runs.
            (S::Unprotected { reason }, Event::Connected { peer }) => {
                self.start_precopy(peer, reason, SyncReason::Start, acts)
            }

            // Migration requests.
            (
                S::Unprotected { reason },
                Event::Migrate {
                    peer,
                    guest_finished: false,
                },
            ) => {
                self.migrating = Some(peer.clone());
                self.start_precopy(peer, reason, SyncReason::Migrate, acts)
            }
            (
                S::Protected {
                    in_flight,
                    throttled,
                    ..
                },
                Event::Migrate {
                    peer,
                    guest_finished: false,
                },
            ) => {
                // The current standby is not the receiver: it is told goodbye (it does not
                // take over), and the VM is unprotected until the receiver has its sync.
                acts.push(Action::Goodbye);
                release_everything(in_flight, throttled, acts);
                self.migrating = Some(peer.clone());
                let reason = Some(format!("moving to {peer}"));
                self.start_precopy(peer, reason, SyncReason::Migrate, acts)
            }
            (
                S::Protected {
                    in_flight,
                    throttled,
                    ..
                },
                Event::Switchover { peer },
            ) => {
                self.migrating = Some(peer.clone());
                let in_flight = in_flight.or_else(|| Some(self.capture(CaptureKind::Switch, acts)));
                S::Switching {
                    peer,
                    in_flight,
                    throttled,
                }
            }
            (s, ev @ (Event::Migrate { .. } | Event::Switchover { .. })) => {
                let (peer, finished) = match ev {
                    Event::Migrate {
                        peer,
                        guest_finished,
                    } => (peer, guest_finished),
                    Event::Switchover { peer } => (peer, false),
                    _ => unreachable!("matched above"),
                };
                let why = match &s {
                    S::Done => "the guest has finished".to_string(),
                    _ if finished => "the guest has finished".to_string(),
                    S::Unprotected { .. } | S::Protected { .. } => {
                        "this VM has no standby to switch to".to_string()
                    }
                    S::Resyncing { peer: p, .. } | S::Completing { peer: p, .. } => {
                        format!("a standby ({p}) is being synced; try again when it protects")
                    }
                    S::Switching { peer: p, .. } | S::Handing { peer: p, .. } => {
                        format!("a migration to {p} is under way")
                    }
                    S::Finishing { .. } => "the guest is finishing".to_string(),
                    S::Claiming { .. } => {
                        "the standby was lost and the arbiter is being asked".to_string()
                    }
                    S::Fenced { .. } | S::Moved { .. } => "this VM is done".to_string(),
                };
                acts.push(Action::MigrationFailed { to: peer, why });
                s
            }

            // The epoch timer.
            (
                S::Protected {
                    in_flight: None, ..
                },
                Event::Tick { guest },
            ) if !guest.finished => {
                let e = self.capture(CaptureKind::Epoch, acts);
                S::Protected {
                    in_flight: Some(e),
                    throttled: false,
                    late: false,
                }
            }
            (
                S::Protected {
                    in_flight: Some(e),
                    throttled: false,
                    late,
                },
                Event::Tick { guest },
            ) if !guest.finished && !guest.paused => {
                if late {
                    // A whole interval behind: stop the guest until the standby catches up.
                    acts.push(Action::Stun);
                    acts.push(Action::StopTimer);
                } else {
                    // A little behind: this epoch grows until its Ack.
                    acts.push(Action::Late { epoch: e });
                }
                S::Protected {
                    in_flight: Some(e),
                    throttled: late,
                    late: !late,
                }
            }
            (
                S::Switching {
                    peer,
                    in_flight: Some(e),
                    throttled: false,
                },
                Event::Tick { guest },
            ) if !guest.finished && !guest.paused => {
                acts.push(Action::Stun);
                acts.push(Action::StopTimer);
                S::Switching {
                    peer,
                    in_flight: Some(e),
                    throttled: true,
                }
            }
            (
                S::Completing {
                    peer, why, epoch, ..
                },
                Event::Tick { .. },
            ) => {
                // The new standby may take long over this epoch (it builds its VM and writes
                // the pre-copied image first): the guest runs on, the next epoch waits.
                acts.push(Action::StopTimer);
                S::Completing {
                    peer,
                    why,
                    epoch,
                    due: true,
                }
            }
            (s, Event::Tick { .. }) => {
                acts.push(Action::StopTimer);
                s
            }

            // Acknowledgements.
            (
                S::Protected {
                    in_flight: Some(e),
                    throttled,
                    late,
                },
                Event::Ack { epoch },
            ) if e == epoch => {
                let mut in_flight = self.acked(epoch, throttled, acts);
                if late && in_flight.is_none() {
                    in_flight = Some(self.capture(CaptureKind::Epoch, acts));
                }
                S::Protected {
                    in_flight,
                    throttled: false,
                    late: false,
                }
            }
            (
                S::Completing {
                    peer,
                    why,
                    epoch: e,
                    due,
                },
                Event::Ack { epoch },
            ) if e == epoch => {
                self.last_ack = epoch;
                acts.push(Action::Release { epoch, acked: true });
                acts.push(Action::Synced {
                    peer: peer.clone(),
                    epoch,
                    why,
                });
                if why == SyncReason::Migrate {
                    acts.push(Action::Assess { epoch });
                    return S::Switching {
                        peer,
                        in_flight: None,
                        throttled: false,
                    };
                }
                let in_flight = due.then(|| self.capture(CaptureKind::Epoch, acts));
                S::Protected {
                    in_flight,
                    throttled: false,
                    late: false,
                }
            }
            (
                S::Switching {
                    peer,
                    in_flight: Some(e),
                    throttled,
                },
                Event::Ack { epoch },
            ) if e == epoch => {
                self.last_ack = epoch;
                acts.push(Action::Release { epoch, acked: true });
                acts.push(Action::Assess { epoch });
                S::Switching {
                    peer,
                    in_flight: None,
                    throttled,
                }
            }
            (
                S::Handing {
                    peer,
                    epoch: e,
                    sent: false,
                },
                Event::Ack { epoch },
            ) if e == epoch => {
                // The receiver holds the last epoch: its output goes out now, the last thing
                // this VM releases; then the receiver takes over.
                self.last_ack = epoch;
                acts.push(Action::Release { epoch, acked: true });
                acts.push(Action::Switch {
                    peer: peer.clone(),
                    epoch,
                });
                S::Handing {
                    peer,
                    epoch,
                    sent: true,
                }
            }
            (
                S::Finishing {
                    epoch: e,
                    last,
                    throttled,
                    completing,
                },
                Event::Ack { epoch },
            ) if e == epoch => {
                self.last_ack = epoch;
                acts.push(Action::Release { epoch, acked: true });
                if let Some((peer, why)) = completing {
                    acts.push(Action::Synced { peer, epoch, why });
                }
                if throttled {
                    let e = self.capture(CaptureKind::Epoch, acts);
                    acts.push(Action::Resume);
                    S::Finishing {
                        epoch: e,
                        last,
                        throttled: false,
                        completing: None,
                    }
                } else if last {
                    acts.push(Action::Goodbye);
                    S::Done
                } else {
                    let e = self.capture(CaptureKind::Epoch, acts);
                    S::Finishing {
                        epoch: e,
                        last: true,
                        throttled: false,
                        completing: None,
                    }
                }
            }
            (s, Event::Ack { epoch }) => {
                log::warn!("acknowledgement of epoch {epoch}, which is not in flight");
                s
            }
            (s, Event::Nack { epoch }) => {
                // The link sends the epoch again; a stale or fourth refusal arrives as LinkLost.
                log::debug!("standby refused epoch {epoch}; the link sends it again");
                s
            }

            // A migration converges, then switches.
            (
                S::Switching {
                    peer,
                    in_flight: None,
                    throttled,
                },
                Event::Assessed { last: false },
            ) => {
                let e = self.capture(CaptureKind::Switch, acts);
                if throttled {
                    acts.push(Action::Resume);
                }
                S::Switching {
                    peer,
                    in_flight: Some(e),
                    throttled: false,
                }
            }
            (
                S::Switching {
                    peer,
                    in_flight: None,
                    ..
                },
                Event::Assessed { last: true },
            ) => {
                acts.push(Action::Freeze);
                let epoch = self.capture(CaptureKind::Final, acts);
                S::Handing {
                    peer,
                    epoch,
                    sent: false,
                }
            }
            (
                S::Handing {
                    peer, sent: true, ..
                },
                Event::Switched { generation },
            ) => {
                self.migrating = None;
                acts.push(Action::Moved {
                    to: peer.clone(),
                    generation,
                });
                S::Moved {
                    to: peer,
                    generation,
                }
            }

            // Losing the standby.
            (
                S::Protected {
                    in_flight,
                    throttled,
                    ..
                }
                | S::Switching {
                    in_flight,
                    throttled,
                    ..
                },
                Event::LinkLost { reason },
            ) => self.lost(reason, in_flight, throttled, acts),
            (
                S::Completing { epoch, .. }
                | S::Finishing {
                    epoch,
                    throttled: false,
                    ..
                },
                Event::LinkLost { reason },
            ) => self.lost(reason, Some(epoch), false, acts),
            (
                S::Finishing {
                    epoch,
                    throttled: true,
                    ..
                },
                Event::LinkLost { reason },
            ) => self.lost(reason, Some(epoch), true, acts),
            (S::Handing { epoch, sent, .. }, Event::LinkLost { reason }) => {
                // The guest is frozen: it runs on here unless the receiver took it.
                let in_flight = (!sent).then_some(epoch);
                self.lost(reason, in_flight, true, acts)
            }
            (
                S::Claiming {
                    generation,
                    reason,
                    in_flight,
                    throttled,
                    ..
                },
                Event::Arbiter(Answer::Won),
            ) => {
                self.generation = generation;
                acts.push(Action::ReconnectSink { generation });
                self.unprotect(reason, in_flight, throttled, acts)
            }
            (
                S::Claiming {
                    generation,
                    moving_to: Some(to),
                    ..
                },
                Event::Arbiter(Answer::Lost),
            ) => {
                // The receiver won the generation: it runs the VM.
                self.migrating = None;
                acts.push(Action::Moved {
                    to: to.clone(),
                    generation,
                });
                S::Moved { to, generation }
            }
            (
                S::Claiming {
                    generation, reason, ..
                },
                Event::Arbiter(Answer::Lost),
            ) => {
                let why = FenceReason::LostClaim { reason, generation };
                acts.push(Action::Fence { why: why.clone() });
                S::Fenced { why }
            }
            (s, Event::LinkLost { reason }) => {
                log::debug!("link lost ({reason}) with no link in {s:?}");
                s
            }

            // Joiners.
            (
                s @ (S::Protected { .. }
                | S::Completing { .. }
                | S::Switching { .. }
                | S::Handing { .. }
                | S::Finishing { .. }
                | S::Claiming { .. }),
                Event::Joined { peer, .. },
            ) => {
                self.refuse(peer, Refusal::AlreadyProtected, acts);
                s
            }
            (s @ S::Resyncing { .. }, Event::Joined { peer, .. }) => {
                self.refuse(peer, Refusal::Syncing, acts);
                s
            }
            (
                S::Unprotected { reason },
                Event::Joined {
                    peer,
                    guest_finished: false,
                },
            ) => self.start_precopy(peer, reason, SyncReason::Rejoin, acts),
            (s, Event::Joined { peer, .. }) => {
                self.refuse(peer, Refusal::Finished, acts);
                s
            }

            // Re-protection.
            (
                S::Resyncing {
                    step: ResyncStep::PreCopy,
                    reason,
                    ..
                },
                Event::PreCopyFailed { .. },
            ) => {
                acts.push(Action::WantStandby(true));
                S::Unprotected { reason }
            }
            (
                S::Resyncing {
                    step: ResyncStep::PreCopy,
                    reason,
                    ..
                },
                Event::PreCopyDone {
                    guest_finished: true,
                    ..
                },
            ) => S::Unprotected { reason },
            (
                S::Resyncing {
                    peer,
                    why,
                    reason,
                    step: ResyncStep::PreCopy,
                },
                Event::PreCopyDone { pending_output, .. },
            ) => {
                // Output drained so far belongs to the unprotected past: release it; from the
                // completing epoch on, output waits for the standby again.
                let step = if pending_output && self.arbiter {
                    acts.push(Action::AskStill {
                        generation: self.generation,
                    });
                    ResyncStep::Releasing
                } else {
                    if pending_output {
                        acts.push(Action::ReleaseHeld);
                    }
                    acts.push(Action::StartLink { peer: peer.clone() });
                    ResyncStep::Linking
                };
                S::Resyncing {
                    peer,
                    why,
                    reason,
                    step,
                }
            }
            (
                S::Resyncing {
                    peer,
                    why,
                    reason,
                    step: ResyncStep::Releasing,
                },
                Event::Arbiter(Answer::Still { newest: true }),
            ) => {
                acts.push(Action::ReleaseHeld);
                acts.push(Action::StartLink { peer: peer.clone() });
                S::Resyncing {
                    peer,
                    why,
                    reason,
                    step: ResyncStep::Linking,
                }
            }
            (
                S::Resyncing {
                    step: ResyncStep::Linking,
                    reason,
                    ..
                },
                Event::LinkFailed { .. },
            ) => {
                acts.push(Action::WantStandby(true));
                S::Unprotected { reason }
            }
            (
                S::Resyncing {
                    peer,
                    why,
                    step: ResyncStep::Linking,
                    ..
                },
                Event::LinkUp,
            ) => {
                let epoch = self.capture(CaptureKind::Completing, acts);
                S::Completing {
                    peer,
                    why,
                    epoch,
                    due: false,
                }
            }

            // Output while no standby protects: released at once, if the arbiter agrees.
            (s, Event::OutputDrained { pending: true })
                if matches!(
                    s,
                    S::Unprotected { .. }
                        | S::Done
                        | S::Resyncing {
                            step: ResyncStep::PreCopy,
                            ..
                        }
                ) =>
            {
                if self.arbiter {
                    acts.push(Action::AskStill {
                        generation: self.generation,
                    });
                } else {
                    acts.push(Action::ReleaseHeld);
                }
                s
            }
            (
                s @ (S::Unprotected { .. }
                | S::Done
                | S::Resyncing {
                    step: ResyncStep::PreCopy,
                    ..
                }),
                Event::Arbiter(Answer::Still { newest: true }),
            ) => {
                acts.push(Action::ReleaseHeld);
                s
            }
            (
                S::Unprotected { .. } | S::Done | S::Resyncing { .. },
                Event::Arbiter(Answer::Still { newest: false }),
            ) => {
                let why = FenceReason::NotNewest {
                    generation: self.generation,
                };
                acts.push(Action::Fence { why: why.clone() });
                S::Fenced { why }
            }

            // The guest finished.
            (
                S::Protected {
                    in_flight,
                    throttled,
                    ..
                }
                | S::Switching {
                    in_flight,
                    throttled,
                    ..
                },
                Event::GuestFinished,
            ) => match in_flight {
                Some(epoch) => S::Finishing {
                    epoch,
                    last: false,
                    throttled,
                    completing: None,
                },
                None => {
                    let epoch = self.capture(CaptureKind::Epoch, acts);
                    if throttled {
                        acts.push(Action::Resume);
                    }
                    S::Finishing {
                        epoch,
                        last: true,
                        throttled: false,
                        completing: None,
                    }
                }
            },
            (
                S::Completing {
                    peer, why, epoch, ..
                },
                Event::GuestFinished,
            ) => S::Finishing {
                epoch,
                last: false,
                throttled: false,
                completing: Some((peer, why)),
            },

            (s, ev) => {
                log::debug!("primary: {ev:?} changes nothing in {s:?}");
                s
            }
        }
    }

    /// Starts the pre-copy of a new standby (the one of the start, a joiner, or a receiver).
    fn start_precopy(
        &mut self,
        peer: String,
        reason: Option<String>,
        why: SyncReason,
        acts: &mut Vec<Action>,
    ) -> State {
        acts.push(Action::WantStandby(false));
        acts.push(Action::StartPreCopy {
            peer: peer.clone(),
            why,
            fence: self.fence_at(self.next_epoch),
        });
        State::Resyncing {
            peer,
            why,
            reason,
            step: ResyncStep::PreCopy,
        }
    }

    fn refuse(&self, peer: String, why: Refusal, acts: &mut Vec<Action>) {
        acts.push(Action::Refuse {
            peer,
            why,
            fence: self.fence_at(self.next_epoch),
        });
    }
}

/// Whether a migration goes on in `s`.
fn migration_state(s: &State) -> bool {
    matches!(
        s,
        State::Resyncing {
            why: SyncReason::Migrate,
            ..
        } | State::Completing {
            why: SyncReason::Migrate,
            ..
        } | State::Switching { .. }
            | State::Handing { .. }
            | State::Claiming {
                moving_to: Some(_),
                ..
            }
            | State::Moved { .. }
    )
}

/// What an event says, as the reason a migration failed.
fn describe(ev: &Event) -> String {
    match ev {
        Event::LinkLost { reason } => format!("the link to the receiver broke: {reason}"),
        Event::PreCopyFailed { reason } => format!("the pre-copy failed: {reason}"),
        Event::LinkFailed { reason } => format!("the link to the receiver did not start: {reason}"),
        Event::GuestFinished
        | Event::PreCopyDone {
            guest_finished: true,
            ..
        } => "the guest finished".into(),
        Event::Arbiter(Answer::Still { newest: false }) => {
            "the arbiter says another VM is primary".into()
        }
        other => format!("{other:?}"),
    }
}

/// No standby will acknowledge anything any more: stop the epoch timer, release the epoch in
/// flight (un-acked) and everything held, and let a throttled guest run.
fn release_everything(in_flight: Option<u64>, throttled: bool, acts: &mut Vec<Action>) {
    acts.push(Action::StopTimer);
    if let Some(epoch) = in_flight {
        acts.push(Action::Release {
            epoch,
            acked: false,
        });
    }
    acts.push(Action::ReleaseHeld);
    if throttled {
        acts.push(Action::Resume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNNING: Guest = Guest {
        paused: false,
        finished: false,
    };

    fn tick() -> Event {
        Event::Tick { guest: RUNNING }
    }

    fn ack(epoch: u64) -> Event {
        Event::Ack { epoch }
    }

    fn lost() -> Event {
        Event::LinkLost {
            reason: "gone".into(),
        }
    }

    fn cap(epoch: u64, kind: CaptureKind) -> [Action; 2] {
        [Action::Capture { epoch, kind }, Action::Send { epoch }]
    }

    fn fence(g: u64, e: u64) -> Fence {
        Fence {
            generation: Generation(g),
            epoch: Epoch(e),
        }
    }

    /// Synced with the standby of the start ("s"), up to its link: the completing epoch (1)
    /// is next.
    fn linked(arbiter: bool) -> Machine {
        let mut m = Machine::new(1, arbiter);
        m.on(Event::Connected { peer: "s".into() });
        m.on(Event::PreCopyDone {
            guest_finished: false,
            pending_output: false,
        });
        m
    }

    /// Protected, epoch 1 (the one completing the first sync) acknowledged, nothing in flight.
    fn protected(arbiter: bool) -> Machine {
        let mut m = linked(arbiter);
        m.on(Event::LinkUp);
        m.on(ack(1));
        assert_eq!(
            m.state(),
            &State::Protected {
                in_flight: None,
                throttled: false,
                late: false
            }
        );
        m
    }

    /// What an Ack of `acked` does when the next epoch is captured at once: release it, then
    /// capture and send `next`.
    fn released_then_captured(acked: u64, next: u64) -> Vec<Action> {
        let mut want = vec![Action::Release {
            epoch: acked,
            acked: true,
        }];
        want.extend(cap(next, CaptureKind::Epoch));
        want
    }

    fn with_in_flight(arbiter: bool) -> Machine {
        let mut m = protected(arbiter);
        m.on(tick());
        m
    }

    fn unprotected(arbiter: bool) -> Machine {
        let mut m = protected(arbiter);
        m.on(lost());
        if arbiter {
            m.on(Event::Arbiter(Answer::Won));
        }
        m
    }

    fn resyncing(arbiter: bool) -> Machine {
        let mut m = unprotected(arbiter);
        m.on(Event::Joined {
            peer: "b".into(),
            guest_finished: false,
        });
        m
    }

    fn completing() -> Machine {
        let mut m = resyncing(false);
        m.on(Event::PreCopyDone {
            guest_finished: false,
            pending_output: false,
        });
        m.on(Event::LinkUp);
        m
    }

    #[test]
    fn connected_starts_a_pre_copy_while_the_guest_runs() {
        let mut m = Machine::new(1, false);
        assert_eq!(
            m.on(Event::Connected { peer: "s".into() }),
            vec![
                Action::WantStandby(false),
                Action::StartPreCopy {
                    peer: "s".into(),
                    why: SyncReason::Start,
                    fence: fence(1, 1)
                },
            ]
        );
        assert_eq!(m.resyncing(), Some("s"));
        // Not protected yet: output goes out at once, as before any standby.
        assert!(!m.protected());
        assert!(m.releases_at_once());
        assert_eq!(m.unprotected_because(), None);
        assert_eq!(
            m.on(Event::OutputDrained { pending: true }),
            vec![Action::ReleaseHeld]
        );
    }

    #[test]
    fn connected_while_protected_changes_nothing() {
        let mut m = with_in_flight(false);
        let before = m.state().clone();
        assert_eq!(m.on(Event::Connected { peer: "s".into() }), vec![]);
        assert_eq!(m.state(), &before);
    }

    #[test]
    fn the_first_completing_epoch_holds_output_and_its_ack_protects() {
        let mut m = linked(false);
        // The only stop of the guest: the completing epoch's capture; output is held from it.
        assert_eq!(
            m.on(Event::LinkUp).as_slice(),
            cap(1, CaptureKind::Completing)
        );
        assert!(m.protected());
        assert!(!m.releases_at_once());
        assert_eq!(m.on(Event::OutputDrained { pending: true }), vec![]);
        assert_eq!(
            m.on(ack(1)),
            vec![
                Action::Release {
                    epoch: 1,
                    acked: true
                },
                Action::Synced {
                    peer: "s".into(),
                    epoch: 1,
                    why: SyncReason::Start
                },
            ]
        );
        assert_eq!(m.last_ack(), 1);
        assert_eq!(m.in_flight(), None);
    }

    #[test]
    fn a_failed_first_sync_leaves_the_vm_unprotected_and_redialling() {
        let mut m = Machine::new(1, false);
        m.on(Event::Connected { peer: "s".into() });
        assert_eq!(
            m.on(Event::PreCopyFailed {
                reason: "eof".into()
            }),
            vec![Action::WantStandby(true)]
        );
        assert_eq!(m.state(), &State::Unprotected { reason: None });
    }

    #[test]
    fn tick_with_nothing_in_flight_captures_and_sends() {
        let mut m = protected(false);
        assert_eq!(m.on(tick()).as_slice(), cap(2, CaptureKind::Epoch));
        assert_eq!(m.in_flight(), Some(2));
        assert_eq!(m.next_epoch(), 3);
    }

    #[test]
    fn tick_with_an_epoch_in_flight_makes_it_late_and_the_guest_runs_on() {
        let mut m = with_in_flight(false);
        assert_eq!(m.on(tick()), vec![Action::Late { epoch: 2 }]);
        assert_eq!(
            m.state(),
            &State::Protected {
                in_flight: Some(2),
                throttled: false,
                late: true
            }
        );
        assert_eq!(m.next_epoch(), 3, "nothing is captured before the Ack");
    }

    #[test]
    fn second_tick_with_the_same_epoch_in_flight_stuns_the_guest() {
        let mut m = with_in_flight(false);
        m.on(tick());
        assert_eq!(m.on(tick()), vec![Action::Stun, Action::StopTimer]);
        assert_eq!(
            m.state(),
            &State::Protected {
                in_flight: Some(2),
                throttled: true,
                late: false
            }
        );
    }

    #[test]
    fn ack_of_a_late_epoch_captures_the_next_at_once_without_a_resume() {
        let mut m = with_in_flight(false);
        m.on(tick());
        let want = released_then_captured(2, 3);
        assert_eq!(m.on(ack(2)), want);
        assert_eq!(
            m.state(),
            &State::Protected {
                in_flight: Some(3),
                throttled: false,
                late: false
            }
        );
        // The next tick finds epoch 3 in flight: late again, not a throttle.
        assert_eq!(m.on(tick()), vec![Action::Late { epoch: 3 }]);
    }

    #[test]
    fn tick_while_throttled_only_stops_the_timer() {
        let mut m = with_in_flight(false);
        m.on(tick());
        m.on(tick());
        let before = m.state().clone();
        assert_eq!(m.on(tick()), vec![Action::StopTimer]);
        assert_eq!(m.state(), &before);
    }

    #[test]
    fn tick_while_the_user_paused_the_guest_does_not_throttle() {
        let mut m = with_in_flight(false);
        let paused = Guest {
            paused: true,
            finished: false,
        };
        assert_eq!(m.on(Event::Tick { guest: paused }), vec![Action::StopTimer]);
        assert_eq!(
            m.state(),
            &State::Protected {
                in_flight: Some(2),
                throttled: false,
                late: false
            }
        );
    }

    #[test]
    fn tick_after_the_guest_finished_captures_nothing() {
        let mut m = protected(false);
        let done = Guest {
            paused: false,
            finished: true,
        };
        assert_eq!(m.on(Event::Tick { guest: done }), vec![Action::StopTimer]);
        assert_eq!(m.in_flight(), None);
    }

    #[test]
    fn tick_while_unprotected_only_stops_the_timer() {
        let mut m = unprotected(false);
        assert_eq!(m.on(tick()), vec![Action::StopTimer]);
        assert!(!m.protected());
    }

    #[test]
    fn ack_releases_the_epoch_in_flight() {
        let mut m = with_in_flight(false);
        assert_eq!(
            m.on(ack(2)),
            vec![Action::Release {
                epoch: 2,
                acked: true
            }]
        );
        assert_eq!(m.last_ack(), 2);
        assert_eq!(m.in_flight(), None);
    }

    #[test]
    fn ack_while_throttled_captures_the_next_epoch_then_resumes() {
        let mut m = with_in_flight(false);
        m.on(tick());
        m.on(tick());
        let mut want = released_then_captured(2, 3);
        want.push(Action::Resume);
        assert_eq!(m.on(ack(2)), want);
        assert_eq!(
            m.state(),
            &State::Protected {
                in_flight: Some(3),
                throttled: false,
                late: false
            }
        );
    }

    #[test]
    fn ack_of_an_epoch_not_in_flight_is_ignored() {
        let mut m = with_in_flight(false);
        assert_eq!(m.on(ack(7)), vec![]);
        assert_eq!(m.in_flight(), Some(2));
        assert_eq!(m.last_ack(), 1);
        let mut m = protected(false);
        assert_eq!(m.on(ack(1)), vec![]);
        let mut m = unprotected(false);
        assert_eq!(m.on(ack(2)), vec![]);
    }

    #[test]
    fn nack_changes_nothing() {
        let mut m = with_in_flight(false);
        let before = m.state().clone();
        assert_eq!(m.on(Event::Nack { epoch: 2 }), vec![]);
        assert_eq!(m.state(), &before);
    }

    #[test]
    fn loss_without_arbiter_releases_what_was_held() {
        let mut m = with_in_flight(false);
        m.on(tick()); // late
        m.on(tick()); // throttled
        assert_eq!(
            m.on(lost()),
            vec![
                Action::DropLink {
                    reason: "gone".into()
                },
                Action::WantStandby(true),
                Action::StopTimer,
                Action::Release {
                    epoch: 2,
                    acked: false
                },
                Action::ReleaseHeld,
                Action::Resume,
            ]
        );
        assert_eq!(
            m.state(),
            &State::Unprotected {
                reason: Some("gone".into())
            }
        );
        assert_eq!(m.unprotected_because(), Some("gone"));
        assert_eq!(m.generation(), 1);
    }

    #[test]
    fn loss_with_arbiter_claims_the_next_generation_first() {
        let mut m = with_in_flight(true);
        assert_eq!(m.on(lost()), vec![Action::Claim { generation: 2 }]);
        assert!(matches!(m.state(), State::Claiming { generation: 2, .. }));
        assert_eq!(m.generation(), 1);
    }

    #[test]
    fn claim_won_reconnects_the_sink_and_runs_unprotected() {
        let mut m = with_in_flight(true);
        m.on(lost());
        assert_eq!(
            m.on(Event::Arbiter(Answer::Won)),
            vec![
                Action::ReconnectSink { generation: 2 },
                Action::DropLink {
                    reason: "gone".into()
                },
                Action::WantStandby(true),
                Action::StopTimer,
                Action::Release {
                    epoch: 2,
                    acked: false
                },
                Action::ReleaseHeld,
            ]
        );
        assert_eq!(m.generation(), 2);
        assert!(m.releases_at_once());
    }

    #[test]
    fn claim_lost_fences() {
        let mut m = with_in_flight(true);
        m.on(lost());
        let why = FenceReason::LostClaim {
            reason: "gone".into(),
            generation: 2,
        };
        assert_eq!(
            m.on(Event::Arbiter(Answer::Lost)),
            vec![Action::Fence { why: why.clone() }]
        );
        assert_eq!(m.state(), &State::Fenced { why });
        assert_eq!(m.generation(), 1);
    }

    #[test]
    fn fenced_does_nothing_more() {
        let mut m = with_in_flight(true);
        m.on(lost());
        m.on(Event::Arbiter(Answer::Lost));
        for ev in [
            tick(),
            ack(2),
            Event::OutputDrained { pending: true },
            Event::GuestFinished,
            Event::Arbiter(Answer::Won),
        ] {
            assert_eq!(m.on(ev), vec![]);
            assert!(m.fenced());
        }
        assert!(!m.releases_at_once());
    }

    #[test]
    fn loss_while_unprotected_is_ignored() {
        let mut m = unprotected(false);
        assert_eq!(m.on(lost()), vec![]);
    }

    #[test]
    fn output_while_protected_waits_for_the_ack() {
        let mut m = with_in_flight(true);
        assert_eq!(m.on(Event::OutputDrained { pending: true }), vec![]);
        assert!(!m.releases_at_once());
    }

    #[test]
    fn output_while_unprotected_is_released_at_once() {
        let mut m = unprotected(false);
        assert_eq!(
            m.on(Event::OutputDrained { pending: true }),
            vec![Action::ReleaseHeld]
        );
        assert_eq!(m.on(Event::OutputDrained { pending: false }), vec![]);
    }

    #[test]
    fn output_while_unprotected_asks_the_arbiter_first() {
        let mut m = unprotected(true);
        assert_eq!(
            m.on(Event::OutputDrained { pending: true }),
            vec![Action::AskStill { generation: 2 }]
        );
        assert_eq!(
            m.on(Event::Arbiter(Answer::Still { newest: true })),
            vec![Action::ReleaseHeld]
        );
        assert!(matches!(m.state(), State::Unprotected { .. }));
    }

    #[test]
    fn arbiter_says_no_longer_newest_fences() {
        let mut m = unprotected(true);
        m.on(Event::OutputDrained { pending: true });
        let why = FenceReason::NotNewest { generation: 2 };
        assert_eq!(
            m.on(Event::Arbiter(Answer::Still { newest: false })),
            vec![Action::Fence { why: why.clone() }]
        );
        assert_eq!(m.state(), &State::Fenced { why });
    }

    #[test]
    fn joiner_while_protected_is_refused() {
        let mut m = with_in_flight(false);
        assert_eq!(
            m.on(Event::Joined {
                peer: "b".into(),
                guest_finished: false
            }),
            vec![Action::Refuse {
                peer: "b".into(),
                why: Refusal::AlreadyProtected,
                fence: fence(1, 3),
            }]
        );
        assert!(matches!(m.state(), State::Protected { .. }));
    }

    #[test]
    fn joiner_while_unprotected_starts_a_pre_copy() {
        let mut m = unprotected(false);
        assert_eq!(
            m.on(Event::Joined {
                peer: "b".into(),
                guest_finished: false
            }),
            vec![
                Action::WantStandby(false),
                Action::StartPreCopy {
                    peer: "b".into(),
                    why: SyncReason::Rejoin,
                    fence: fence(1, 2)
                },
            ]
        );
        assert_eq!(m.resyncing(), Some("b"));
        // Still unprotected, for the same reason.
        assert!(!m.protected());
        assert_eq!(m.unprotected_because(), Some("gone"));
    }

    #[test]
    fn joiner_after_the_guest_finished_is_refused() {
        let mut m = unprotected(false);
        let acts = m.on(Event::Joined {
            peer: "b".into(),
            guest_finished: true,
        });
        assert!(matches!(
            acts.as_slice(),
            [Action::Refuse {
                why: Refusal::Finished,
                ..
            }]
        ));
        assert!(matches!(m.state(), State::Unprotected { .. }));
    }

    #[test]
    fn second_joiner_while_resyncing_is_refused() {
        let mut m = resyncing(false);
        let acts = m.on(Event::Joined {
            peer: "c".into(),
            guest_finished: false,
        });
        assert!(matches!(
            acts.as_slice(),
            [Action::Refuse {
                why: Refusal::Syncing,
                ..
            }]
        ));
        assert_eq!(m.resyncing(), Some("b"));
    }

    #[test]
    fn pre_copy_failure_goes_back_to_unprotected() {
        let mut m = resyncing(false);
        assert_eq!(
            m.on(Event::PreCopyFailed {
                reason: "eof".into()
            }),
            vec![Action::WantStandby(true)]
        );
        assert_eq!(
            m.state(),
            &State::Unprotected {
                reason: Some("gone".into())
            }
        );
    }

    #[test]
    fn pre_copy_done_after_the_guest_finished_links_nothing() {
        let mut m = resyncing(false);
        assert_eq!(
            m.on(Event::PreCopyDone {
                guest_finished: true,
                pending_output: true
            }),
            vec![]
        );
        assert!(matches!(m.state(), State::Unprotected { .. }));
    }

    #[test]
    fn pre_copy_done_releases_output_then_starts_the_link() {
        let mut m = resyncing(false);
        assert_eq!(
            m.on(Event::PreCopyDone {
                guest_finished: false,
                pending_output: true
            }),
            vec![Action::ReleaseHeld, Action::StartLink { peer: "b".into() }]
        );
        let mut m = resyncing(false);
        assert_eq!(
            m.on(Event::PreCopyDone {
                guest_finished: false,
                pending_output: false
            }),
            vec![Action::StartLink { peer: "b".into() }]
        );
    }

    #[test]
    fn pre_copy_done_with_arbiter_asks_before_releasing() {
        let mut m = resyncing(true);
        assert_eq!(
            m.on(Event::PreCopyDone {
                guest_finished: false,
                pending_output: true
            }),
            vec![Action::AskStill { generation: 2 }]
        );
        assert_eq!(
            m.on(Event::Arbiter(Answer::Still { newest: true })),
            vec![Action::ReleaseHeld, Action::StartLink { peer: "b".into() }]
        );
        let mut m = resyncing(true);
        m.on(Event::PreCopyDone {
            guest_finished: false,
            pending_output: true,
        });
        assert!(matches!(
            m.on(Event::Arbiter(Answer::Still { newest: false }))
                .as_slice(),
            [Action::Fence { .. }]
        ));
        assert!(m.fenced());
    }

    #[test]
    fn output_during_the_pre_copy_is_released_at_once() {
        let mut m = resyncing(false);
        assert_eq!(
            m.on(Event::OutputDrained { pending: true }),
            vec![Action::ReleaseHeld]
        );
        assert_eq!(m.resyncing(), Some("b"));
    }

    #[test]
    fn link_failure_after_the_pre_copy_goes_back_to_unprotected() {
        let mut m = resyncing(false);
        m.on(Event::PreCopyDone {
            guest_finished: false,
            pending_output: false,
        });
        assert_eq!(
            m.on(Event::LinkFailed {
                reason: "no".into()
            }),
            vec![Action::WantStandby(true)]
        );
        assert!(matches!(m.state(), State::Unprotected { .. }));
    }

    #[test]
    fn link_up_sends_the_completing_epoch() {
        let mut m = resyncing(false);
        m.on(Event::PreCopyDone {
            guest_finished: false,
            pending_output: false,
        });
        assert_eq!(
            m.on(Event::LinkUp).as_slice(),
            cap(2, CaptureKind::Completing)
        );
        assert_eq!(
            m.state(),
            &State::Completing {
                peer: "b".into(),
                why: SyncReason::Rejoin,
                epoch: 2,
                due: false
            }
        );
        assert!(m.protected());
        assert_eq!(m.unprotected_because(), None);
        assert_eq!(m.completing(), Some(("b", 2)));
    }

    #[test]
    fn ack_of_the_completing_epoch_reprotects() {
        let mut m = completing();
        assert_eq!(
            m.on(ack(2)),
            vec![
                Action::Release {
                    epoch: 2,
                    acked: true
                },
                Action::Synced {
                    peer: "b".into(),
                    epoch: 2,
                    why: SyncReason::Rejoin
                },
            ]
        );
        assert_eq!(
            m.state(),
            &State::Protected {
                in_flight: None,
                throttled: false,
                late: false
            }
        );
    }

    #[test]
    fn a_tick_while_completing_lets_the_guest_run_and_the_ack_captures_the_next_epoch() {
        let mut m = completing();
        // The new standby may take long to build its VM: the guest is not stunned for it.
        assert_eq!(m.on(tick()), vec![Action::StopTimer]);
        let acts = m.on(ack(2));
        assert!(!acts.contains(&Action::Resume), "{acts:?}");
        assert_eq!(
            &acts[acts.len() - 2..],
            cap(3, CaptureKind::Epoch).as_slice()
        );
        assert_eq!(m.in_flight(), Some(3));
        // Without the tick, the Ack only releases; the timer captures later.
        let mut m = completing();
        let acts = m.on(ack(2));
        assert!(!acts.iter().any(|a| matches!(a, Action::Capture { .. })));
    }

    #[test]
    fn loss_while_completing_a_resync_unprotects() {
        let mut m = completing();
        let acts = m.on(lost());
        assert!(acts.contains(&Action::Release {
            epoch: 2,
            acked: false
        }));
        assert!(!acts.iter().any(|a| matches!(a, Action::Synced { .. })));
        assert_eq!(
            m.state(),
            &State::Unprotected {
                reason: Some("gone".into())
            }
        );
        assert_eq!(m.completing(), None);
    }

    #[test]
    fn loss_while_completing_with_arbiter_claims() {
        let mut m = resyncing(true);
        m.on(Event::PreCopyDone {
            guest_finished: false,
            pending_output: false,
        });
        m.on(Event::LinkUp);
        assert_eq!(m.on(lost()), vec![Action::Claim { generation: 3 }]);
    }

    #[test]
    fn joiner_while_completing_is_refused() {
        let mut m = completing();
        assert!(matches!(
            m.on(Event::Joined {
                peer: "c".into(),
                guest_finished: false
            })
            .as_slice(),
            [Action::Refuse {
                why: Refusal::AlreadyProtected,
                ..
            }]
        ));
    }

    #[test]
    fn guest_finished_with_nothing_in_flight_sends_the_last_epoch() {
        let mut m = protected(false);
        assert_eq!(
            m.on(Event::GuestFinished).as_slice(),
            cap(2, CaptureKind::Epoch)
        );
        assert!(m.finishing());
        assert_eq!(
            m.on(ack(2)),
            vec![
                Action::Release {
                    epoch: 2,
                    acked: true
                },
                Action::Goodbye
            ]
        );
        assert_eq!(m.state(), &State::Done);
        assert!(!m.protected());
        assert_eq!(m.unprotected_because(), None);
    }

    #[test]
    fn guest_finished_with_an_epoch_in_flight_waits_then_sends_one_more() {
        let mut m = with_in_flight(false);
        assert_eq!(m.on(Event::GuestFinished), vec![]);
        let want = released_then_captured(2, 3);
        assert_eq!(m.on(ack(2)), want);
        assert_eq!(
            m.on(ack(3)),
            vec![
                Action::Release {
                    epoch: 3,
                    acked: true
                },
                Action::Goodbye
            ]
        );
        assert_eq!(m.state(), &State::Done);
    }

    #[test]
    fn guest_finished_while_completing_still_reprotects() {
        let mut m = completing();
        m.on(Event::GuestFinished);
        let acts = m.on(ack(2));
        assert!(acts.contains(&Action::Synced {
            peer: "b".into(),
            epoch: 2,
            why: SyncReason::Rejoin
        }));
        assert!(m.finishing());
    }

    #[test]
    fn loss_while_finishing_unprotects() {
        let mut m = with_in_flight(false);
        m.on(Event::GuestFinished);
        m.on(lost());
        assert!(!m.finishing());
        assert!(m.releases_at_once());
    }

    #[test]
    fn guest_finished_while_unprotected_changes_nothing() {
        let mut m = unprotected(false);
        assert_eq!(m.on(Event::GuestFinished), vec![]);
        assert!(matches!(m.state(), State::Unprotected { .. }));
    }

    #[test]
    fn output_after_goodbye_is_released_at_once() {
        let mut m = protected(false);
        m.on(Event::GuestFinished);
        m.on(ack(2));
        assert_eq!(
            m.on(Event::OutputDrained { pending: true }),
            vec![Action::ReleaseHeld]
        );
    }

    #[test]
    fn stray_events_change_nothing() {
        let mut m = with_in_flight(false);
        let before = m.state().clone();
        for ev in [
            Event::LinkUp,
            Event::LinkFailed { reason: "x".into() },
            Event::PreCopyFailed { reason: "x".into() },
            Event::PreCopyDone {
                guest_finished: false,
                pending_output: false,
            },
            Event::Arbiter(Answer::Won),
            Event::Arbiter(Answer::Still { newest: false }),
        ] {
            assert_eq!(m.on(ev), vec![]);
            assert_eq!(m.state(), &before);
        }
    }

    // Planned migration.

    fn migrate(peer: &str) -> Event {
        Event::Migrate {
            peer: peer.into(),
            guest_finished: false,
        }
    }

    /// Unprotected (generation 1, or 2 with an arbiter), a migration to "r" synced and
    /// converging: Switching with nothing in flight after the completing epoch 2's Ack.
    fn switching(arbiter: bool) -> Machine {
        let mut m = unprotected(arbiter);
        m.on(migrate("r"));
        m.on(Event::PreCopyDone {
            guest_finished: false,
            pending_output: false,
        });
        m.on(Event::LinkUp);
        m.on(ack(2));
        m
    }

    /// Switching, then the last epoch (3) captured with the guest frozen.
    fn handing(arbiter: bool) -> Machine {
        let mut m = switching(arbiter);
        m.on(Event::Assessed { last: true });
        m
    }

    #[test]
    fn a_migration_syncs_the_receiver_converges_and_switches() {
        let mut m = unprotected(false);
        assert_eq!(
            m.on(migrate("r")),
            vec![
                Action::WantStandby(false),
                Action::StartPreCopy {
                    peer: "r".into(),
                    why: SyncReason::Migrate,
                    fence: fence(1, 2)
                },
            ]
        );
        assert_eq!(m.migrating(), Some("r"));
        m.on(Event::PreCopyDone {
            guest_finished: false,
            pending_output: false,
        });
        assert_eq!(
            m.on(Event::LinkUp).as_slice(),
            cap(2, CaptureKind::Completing)
        );
        // The receiver protects the VM: converging epochs start at once.
        assert_eq!(
            m.on(ack(2)),
            vec![
                Action::Release {
                    epoch: 2,
                    acked: true
                },
                Action::Synced {
                    peer: "r".into(),
                    epoch: 2,
                    why: SyncReason::Migrate
                },
                Action::Assess { epoch: 2 },
            ]
        );
        assert!(m.protected());
        assert_eq!(
            m.on(Event::Assessed { last: false }).as_slice(),
            cap(3, CaptureKind::Switch)
        );
        assert_eq!(
            m.on(ack(3)),
            vec![
                Action::Release {
                    epoch: 3,
                    acked: true
                },
                Action::Assess { epoch: 3 },
            ]
        );
        // The last epoch: the guest stops and stays stopped.
        assert_eq!(
            m.on(Event::Assessed { last: true }),
            vec![
                Action::Freeze,
                Action::Capture {
                    epoch: 4,
                    kind: CaptureKind::Final
                },
                Action::Send { epoch: 4 },
            ]
        );
        assert!(m.handing());
        // Output is held, ticks capture nothing more.
        assert_eq!(m.on(Event::OutputDrained { pending: true }), vec![]);
        assert_eq!(m.on(tick()), vec![Action::StopTimer]);
        // Its Ack: its output is the last released here, then the receiver takes over.
        assert_eq!(
            m.on(ack(4)),
            vec![
                Action::Release {
                    epoch: 4,
                    acked: true
                },
                Action::Switch {
                    peer: "r".into(),
                    epoch: 4
                },
            ]
        );
        assert_eq!(
            m.on(Event::Switched { generation: 2 }),
            vec![Action::Moved {
                to: "r".into(),
                generation: 2
            }]
        );
        assert_eq!(m.moved(), Some(("r", 2)));
        assert_eq!(m.migrating(), None);
        // Nothing more happens here.
        for ev in [
            tick(),
            Event::OutputDrained { pending: true },
            lost(),
            Event::GuestFinished,
        ] {
            assert_eq!(m.on(ev), vec![]);
        }
        assert!(!m.releases_at_once());
    }

    #[test]
    fn a_switchover_converges_on_the_standby_already_there() {
        let mut m = protected(false);
        assert_eq!(
            m.on(Event::Switchover { peer: "s".into() }).as_slice(),
            cap(2, CaptureKind::Switch)
        );
        assert_eq!(m.migrating(), Some("s"));
        // With an epoch in flight, its Ack is the first assessed.
        let mut m = with_in_flight(false);
        assert_eq!(m.on(Event::Switchover { peer: "s".into() }), vec![]);
        assert_eq!(
            m.on(ack(2)),
            vec![
                Action::Release {
                    epoch: 2,
                    acked: true
                },
                Action::Assess { epoch: 2 },
            ]
        );
    }

    #[test]
    fn a_migration_of_a_protected_vm_tells_its_standby_goodbye_first() {
        let mut m = with_in_flight(false);
        assert_eq!(
            m.on(migrate("r")),
            vec![
                Action::Goodbye,
                Action::StopTimer,
                Action::Release {
                    epoch: 2,
                    acked: false
                },
                Action::ReleaseHeld,
                Action::WantStandby(false),
                Action::StartPreCopy {
                    peer: "r".into(),
                    why: SyncReason::Migrate,
                    fence: fence(1, 3)
                },
            ]
        );
        assert!(!m.protected());
        assert!(m.releases_at_once());
        assert_eq!(m.unprotected_because(), Some("moving to r"));
    }

    #[test]
    fn a_tick_while_converging_stuns_and_the_next_capture_lets_the_guest_go() {
        let mut m = switching(false);
        m.on(Event::Assessed { last: false });
        assert_eq!(m.on(tick()), vec![Action::Stun, Action::StopTimer]);
        m.on(ack(3));
        let acts = m.on(Event::Assessed { last: false });
        assert_eq!(acts.last(), Some(&Action::Resume));
        assert_eq!(m.in_flight(), Some(4));
    }

    #[test]
    fn a_failed_pre_copy_fails_the_migration_and_the_vm_runs_on_unprotected() {
        let mut m = unprotected(false);
        m.on(migrate("r"));
        assert_eq!(
            m.on(Event::PreCopyFailed {
                reason: "eof".into()
            }),
            vec![
                Action::MigrationFailed {
                    to: "r".into(),
                    why: "the pre-copy failed: eof".into()
                },
                Action::WantStandby(true),
            ]
        );
        assert_eq!(m.migrating(), None);
        assert!(matches!(m.state(), State::Unprotected { .. }));
    }

    #[test]
    fn losing_the_receiver_while_frozen_lets_the_guest_run_here_again() {
        let mut m = handing(false);
        let acts = m.on(lost());
        assert!(matches!(
            acts.first(),
            Some(Action::MigrationFailed { to, .. }) if to == "r"
        ));
        // Epoch 3, the last, was never acknowledged: it is this VM's output, released now.
        assert!(acts.contains(&Action::Release {
            epoch: 3,
            acked: false
        }));
        assert_eq!(acts.last(), Some(&Action::Resume));
        assert!(matches!(m.state(), State::Unprotected { .. }));
    }

    #[test]
    fn with_an_arbiter_the_claim_after_a_broken_switch_decides_where_the_vm_is() {
        // The receiver won the generation: the VM moved, this side is not fenced.
        let mut m = handing(true);
        m.on(ack(3));
        assert_eq!(m.on(lost()), vec![Action::Claim { generation: 3 }]);
        assert_eq!(
            m.on(Event::Arbiter(Answer::Lost)),
            vec![Action::Moved {
                to: "r".into(),
                generation: 3
            }]
        );
        assert!(!m.fenced());
        // This side won it: the receiver stands down, the guest runs on here as 3.
        let mut m = handing(true);
        m.on(ack(3));
        m.on(lost());
        let acts = m.on(Event::Arbiter(Answer::Won));
        assert!(
            matches!(acts[0], Action::MigrationFailed { .. }),
            "{acts:?}"
        );
        assert!(acts.contains(&Action::ReconnectSink { generation: 3 }));
        assert_eq!(acts.last(), Some(&Action::Resume));
        assert_eq!(m.generation(), 3);
        // A plain lost standby still fences when the claim is lost.
        let mut m = with_in_flight(true);
        m.on(lost());
        assert!(matches!(
            m.on(Event::Arbiter(Answer::Lost)).as_slice(),
            [Action::Fence { .. }]
        ));
    }

    #[test]
    fn migrations_that_cannot_start_are_refused_and_change_nothing() {
        for (mut m, why) in [
            (resyncing(false), "being synced"),
            (completing(), "being synced"),
            (switching(false), "under way"),
        ] {
            let before = m.state().clone();
            let acts = m.on(migrate("x"));
            match acts.as_slice() {
                [Action::MigrationFailed { to, why: w }] => {
                    assert_eq!(to, "x");
                    assert!(w.contains(why), "{w}");
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(m.state(), &before);
        }
        let mut m = unprotected(false);
        assert!(matches!(
            m.on(Event::Migrate {
                peer: "x".into(),
                guest_finished: true
            })
            .as_slice(),
            [Action::MigrationFailed { why, .. }] if why.contains("finished")
        ));
        assert!(matches!(
            m.on(Event::Switchover { peer: "x".into() }).as_slice(),
            [Action::MigrationFailed { why, .. }] if why.contains("no standby")
        ));
        assert_eq!(m.migrating(), None);
    }

    #[test]
    fn a_guest_that_finishes_while_converging_ends_the_migration() {
        let mut m = switching(false);
        m.on(Event::Assessed { last: false });
        let acts = m.on(Event::GuestFinished);
        assert!(
            matches!(acts.as_slice(), [Action::MigrationFailed { why, .. }] if why == "the guest finished")
        );
        assert!(m.finishing());
    }

    #[test]
    fn joiners_are_refused_while_a_migration_converges_or_switches() {
        for mut m in [switching(false), handing(false)] {
            assert!(matches!(
                m.on(Event::Joined {
                    peer: "j".into(),
                    guest_finished: false
                })
                .as_slice(),
                [Action::Refuse {
                    why: Refusal::AlreadyProtected,
                    ..
                }]
            ));
        }
    }
}
