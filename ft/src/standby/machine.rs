//! The standby's protocol logic as a pure state machine: [`Machine::on`] takes an [`Event`]
//! (a frame from the primary, the link's end or silence, the outcome of a commit, the
//! arbiter's answer) and returns the [`Action`]s to carry out. Nothing in here does I/O: the
//! driver ([`super::Standby::run`]) owns the socket, the replica VM, the arbiter and the sink,
//! executes the actions in order and feeds their outcomes back as events. A fuzzer drives the
//! same machine with a plain guest memory ([`super::harness`]).
//!
//! ```text
//!                         bad FullSync / PreCopy… (refusal noted; epochs NACKed with it)
//!                              ┌──────┐
//!                              ▼      │
//!  connect ─▶ ┌──────────────────────────┐  Lost / Silence   ┌──────────────────────────┐
//!             │     AwaitingFullSync     │ ───────────────▶  │ Done(Failed): nothing to │
//!             └────────────┬─────────────┘                   │ take over (error)        │
//!                          │ FullSync that fits              └──────────────────────────┘
//!                          ▼                                               ▲
//!             ┌──────────────────────────┐  Lost / Silence                 │
//!             │ Syncing {shape, gen,     │ ────────────────────────────────┘
//!             │   pre-copy base}         │◀─┐ PreCopy r ─ Pages… ─ PreCopyEnd r:
//!             │                          │ ─┘   verified round → base (nothing committed)
//!             └────────────┬─────────────┘
//!                          │ EpochBegin ─ Pages… ─ state… ─ EpochEnd: verified
//!                          │   ─▶ Commit{staged, base} ─▶ Committed ─▶ Ack
//!                          ▼
//!             ┌──────────────────────────┐◀─┐ epoch committed+1 verified
//!             │ Protecting {committed,   │ ─┘   ─▶ Commit ─▶ Committed ─▶ Ack
//!             │   shape, gen}            │
//!             └──┬──────────────┬────────┘
//!   Goodbye, End │              │ Lost / Silence, or Switch at the committed epoch
//!   (any live    │              ├──── no arbiter ───────────────┐
//!    state)      │              ▼                               ▼
//!                │   ┌────────────────────┐  Claimed won  ┌──────────────────────────┐
//!                │   │ Claiming {gen+1,   │ ────────────▶ │ Done(TookOver): activate │
//!                │   │   switch}          │  (switch:     │ the replica, run on      │
//!                │   └─────────┬──────────┘   Confirm)    └──────────────────────────┘
//!                │             │ Claimed lost (switch: Nack)
//!                ▼             ▼
//!      ┌─────────────────┐  ┌─────────────────┐
//!      │ Done(Finished)  │  │ Done(StoodDown) │     Done: every event is ignored
//!      └─────────────────┘  └─────────────────┘
//! ```
//!
//! Orthogonal to the state is what is being received ([`Receiving`]): nothing, an epoch
//! ([`Staging`]), a poisoned epoch (its pages are dropped; its `EpochEnd` is NACKed), or a
//! pre-copy round. In `Syncing` and `Protecting` the pre-copy image is [`PreCopy::Open`]
//! (rounds may come), [`PreCopy::Spent`] (it went in with a commit) or [`PreCopy::Refused`]
//! (the full sync broke: every epoch is NACKed with the reason until a `FullSync` that fits).
//!
//! Transition table (`G` = the generation of the accepted `FullSync`; a fenced message of a
//! generation below `G` is NACKed `Stale` first, in `Syncing` and `Protecting`):
//!
//! | state              | event                           | actions / next state                             |
//! |--------------------|---------------------------------|--------------------------------------------------|
//! | AwaitingFullSync   | FullSync that fits              | → Syncing (new base)                             |
//! | any live           | FullSync that does not fit      | refusal noted (epochs NACKed `Malformed`)        |
//! | Syncing/Protect.   | FullSync that fits              | G := its generation, new base, refusal cleared   |
//! | Syncing/Protect.   | PreCopy r (base open, r next)   | receive round r (an open epoch is discarded)     |
//! | any live           | PreCopy otherwise               | refusal noted                                    |
//! | any live           | PreCopyEnd r of the open round  | verified: round → base, RoundDone (the end sent  |
//! |                    |                                 | back); else refusal, no base, Nack               |
//! | any live           | PreCopyEnd without its round    | refusal noted, Nack                              |
//! | any live           | EpochBegin                      | receive the epoch (an open epoch is discarded;   |
//! |                    |                                 | an open round is refused), or poison it: before  |
//! |                    |                                 | the full sync, refusal, out of order, too big    |
//! | any live           | Pages / DeviceState             | into the open epoch or round (errors poison)     |
//! | any live           | EpochEnd, poisoned epoch        | Nack `Malformed` (reason)                        |
//! | any live           | EpochEnd without its beginning  | Nack `OutOfOrder`                                |
//! | any live           | EpochEnd, fails verification    | Nack `Malformed`                                 |
//! | Syncing/Protect.   | EpochEnd, verified              | Commit{staged, base}                             |
//! | (commit pending)   | Committed                       | Ack → Protecting{committed}                      |
//! | (commit pending)   | CommitRefused (VM not built)    | Nack `Internal`, base kept                       |
//! | (commit pending)   | ReplicaFailed                   | Nack `Internal` → Done(Failed)                   |
//! | any live           | Heartbeat; Hello, Ack, …        | nothing (the latter logged)                      |
//! | any live           | Goodbye, EndOfStream, Cancel    | Finish → Done(Finished)                          |
//! | Awaiting/Syncing   | Lost, Silence                   | Fail → Done(Failed)                              |
//! | Protecting         | Lost, Silence                   | Claim{gen+1} → Claiming, or (no arbiter)         |
//! |                    |                                 | TakeOver → Done(TookOver)                        |
//! | Protecting         | Switch at the committed epoch,  | Claim{gen+1} → Claiming(switch), or (no arbiter) |
//! |                    | nothing open                    | Confirm, TakeOver → Done(TookOver)               |
//! | any live           | Switch otherwise                | Nack `OutOfOrder` (the primary keeps the VM)     |
//! | Claiming           | Claimed won / lost              | TakeOver → Done(TookOver) / StandDown → Done     |
//! | Claiming(switch)   | Claimed won / lost              | Confirm, TakeOver / Nack `Stale`, StandDown      |
//! | Claiming, Done     | anything else                   | nothing                                          |

use std::time::Duration;

use serde::Serialize;
use transport::message::NackCode;
use transport::{Fence, Message, PageRange};

use crate::epoch::{Base, Staged, Staging};
use crate::status::{Counters as StatusCounters, FtStatus, Role};
use crate::Error;

/// Largest guest memory a standby accepts in a `FullSync`.
pub const MAX_MEM_BYTES: u64 = 1 << 40;
/// Most vCPUs a standby accepts in a `FullSync`.
pub const MAX_VCPUS: u32 = 256;
/// Before the first commit the primary may take a while to copy its memory: the silence limit
/// is at least this long until then.
pub const FIRST_SYNC_PATIENCE: Duration = Duration::from_secs(30);

/// The VM a full sync describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shape {
    /// Guest memory size.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
}

/// What the standby knows after an accepted `FullSync`.
#[derive(Debug)]
pub struct Sync {
    /// The VM.
    pub shape: Shape,
    /// The generation of the `FullSync`: fences below it are stale.
    pub generation: u64,
    /// The pre-copy image.
    pub precopy: PreCopy,
}

/// The pre-copy image of a full sync.
#[derive(Debug)]
pub enum PreCopy {
    /// Rounds may come; the image so far (goes in with the next commit).
    Open(Base),
    /// The image went in with a commit (or is being committed): no rounds until a new
    /// `FullSync`.
    Spent,
    /// The full sync is broken: every epoch is refused with this reason until a `FullSync`
    /// that fits.
    Refused(String),
}

/// The standby's protocol state.
#[derive(Debug)]
pub enum State {
    /// Connected; no `FullSync` that fits yet (a refusal, if one came, is the reason epochs
    /// are NACKed with).
    AwaitingFullSync {
        /// Why the full sync is broken, if it is.
        refused: Option<String>,
    },
    /// A `FullSync` was accepted; nothing committed yet.
    Syncing {
        /// The sync.
        sync: Sync,
    },
    /// At least one epoch committed: the primary is protected.
    Protecting {
        /// The last committed epoch.
        committed: Fence,
        /// The sync.
        sync: Sync,
    },
    /// The primary was declared dead, or handed the VM over (a planned migration's switch);
    /// waiting for the arbiter's answer on `generation`.
    Claiming {
        /// The generation claimed (committed generation + 1).
        generation: u64,
        /// The committed epoch to resume from.
        from: Fence,
        /// Why the primary was declared dead (or that it switched).
        reason: String,
        /// The primary asked for it (`Switch`) and waits for the answer on the link.
        switch: bool,
    },
    /// Out of the protocol.
    Done(Ending),
}

/// How the protocol ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The primary said goodbye or ended the stream.
    Finished,
    /// The primary died (or the replica broke) before anything could be taken over.
    Failed,
    /// The primary died; this standby takes over as `generation`.
    TookOver {
        /// The generation taken.
        generation: u64,
    },
    /// The primary was declared dead but won the next generation: this standby stood down.
    StoodDown,
}

/// What is being received.
#[derive(Debug, Default)]
pub enum Receiving {
    /// Nothing.
    #[default]
    Idle,
    /// An epoch.
    Epoch(Staging),
    /// An epoch already refused: its pages and state are dropped, its end is NACKed.
    Poisoned {
        /// The epoch.
        fence: Fence,
        /// Why.
        why: String,
    },
    /// A pre-copy round.
    Round {
        /// Its number.
        round: u32,
        /// Its pages so far.
        staging: Staging,
    },
}

/// An input of the machine.
#[derive(Debug)]
pub enum Event {
    /// A control message from the primary.
    Message(Message),
    /// A batch of page ranges from the primary.
    Pages(Vec<PageRange>),
    /// The primary ended the stream cleanly.
    EndOfStream,
    /// The primary aborted the stream.
    Cancelled(String),
    /// The connection failed (EOF, reset, a frame that does not decode).
    Lost(String),
    /// Nothing arrived for `ms` (at least [`Machine::silence_limit`]).
    Silence {
        /// How long.
        ms: u64,
    },
    /// The driver committed the epoch of the pending [`Action::Commit`].
    Committed {
        /// The epoch.
        fence: Fence,
    },
    /// The driver could not take the pending commit (the replica VM could not be built);
    /// nothing changed, and the pre-copy image comes back.
    CommitRefused {
        /// The epoch.
        fence: Fence,
        /// Why.
        why: String,
        /// The image of the [`Action::Commit`].
        base: Option<Base>,
    },
    /// Writing the pending commit into the replica failed: the replica is unusable.
    ReplicaFailed {
        /// The epoch.
        fence: Fence,
        /// Why.
        why: String,
    },
    /// The arbiter's answer to [`Action::Claim`].
    Claimed {
        /// The generation claimed.
        generation: u64,
        /// Whether this standby won it.
        won: bool,
    },
}

/// An output of the machine, for the driver to carry out in order.
#[derive(Debug)]
pub enum Action {
    /// Send `Ack{fence}`.
    Ack(Fence),
    /// Send `Ack{fence}` confirming a switch: `fence` is the new generation (the committed
    /// one + 1) and the committed epoch; the link is still open for it.
    Confirm(Fence),
    /// Send the round's `PreCopyEnd` back: the round is verified and in the pre-copy image.
    RoundDone {
        /// As in the round's `PreCopyEnd`.
        fence: Fence,
        /// The round.
        round: u32,
        /// As in the round's `PreCopyEnd`.
        ranges: u64,
        /// As in the round's `PreCopyEnd`.
        digest: [u8; 32],
    },
    /// Send `Nack{fence, code, message}`.
    Nack {
        /// What is refused.
        fence: Fence,
        /// Why, as a code.
        code: NackCode,
        /// Why.
        message: String,
    },
    /// Commit a verified epoch: build the replica VM if there is none (from the epoch's
    /// state, for `shape`), write `base` into its memory, then the epoch; answer with
    /// [`Event::Committed`], [`Event::CommitRefused`] or [`Event::ReplicaFailed`].
    Commit {
        /// The verified epoch.
        staged: Staged,
        /// The pre-copied image it completes.
        base: Option<Base>,
        /// The VM of the full sync.
        shape: Shape,
    },
    /// The primary finished: stop, nothing to take over.
    Finish,
    /// Claim `generation` at the arbiter; answer with [`Event::Claimed`].
    Claim {
        /// The generation.
        generation: u64,
    },
    /// Take over: activate the committed image as the primary of `generation`.
    TakeOver {
        /// The new generation.
        generation: u64,
        /// The committed epoch.
        from: Fence,
        /// Why the primary was declared dead.
        reason: String,
    },
    /// The primary is alive after all: stop without running anything.
    StandDown {
        /// Why.
        reason: String,
    },
    /// Stop with this error.
    Fail(Error),
}

/// What the standby counted.
pub use crate::status::StandbyCounters as Counters;

pub use crate::epoch::XorBase;

/// The standby's state machine.
#[derive(Debug)]
pub struct Machine {
    /// The committed image, for XOR deltas (set by the driver once the replica exists).
    xor_base: Option<XorBase>,
    state: State,
    rx: Receiving,
    counters: Counters,
    /// The arbiter's description, if role changes go through one.
    arbiter: Option<String>,
    /// The epoch of an [`Action::Commit`] not yet answered.
    pending: Option<Fence>,
    /// The last committed epoch (stays known after the protocol ended).
    committed: Option<Fence>,
    /// The generation of the accepted `FullSync` (stays known after the protocol ended).
    generation: Option<u64>,
    /// Frames the primary's guest received that no committed epoch includes yet.
    inputs: crate::inputs::InputLog,
}

fn precopy_refuse(p: &mut PreCopy, why: impl Into<String>) {
    *p = PreCopy::Refused(why.into());
}

impl Machine {
    /// A machine at [`State::AwaitingFullSync`]; `arbiter` describes the arbiter that decides
    /// role changes (None: the standby takes over on detection alone).
    pub fn new(arbiter: Option<String>) -> Self {
        Machine {
            state: State::AwaitingFullSync { refused: None },
            rx: Receiving::Idle,
            counters: Counters::default(),
            arbiter,
            pending: None,
            committed: None,
            generation: None,
            xor_base: None,
            inputs: crate::inputs::InputLog::default(),
        }
    }

    /// The frames the primary's guest received after committed epoch `epoch`, in arrival
    /// order, as (card, frame): what a standby taking over from `epoch` delivers again.
    pub fn take_inputs_after(&mut self, epoch: u64) -> Vec<(u32, Vec<u8>)> {
        self.inputs.take_after(epoch)
    }

    /// Where XOR deltas find their base: the committed image (the replica's memory). Without
    /// one, an XOR range poisons its epoch (NACK) and changes nothing.
    pub fn set_xor_base(&mut self, base: XorBase) {
        self.xor_base = Some(base);
    }

    /// The state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// What is being received.
    pub fn receiving(&self) -> &Receiving {
        &self.rx
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The last committed epoch.
    pub fn committed(&self) -> Option<Fence> {
        self.committed
    }

    /// Whether the machine still takes frames from the primary.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state,
            State::AwaitingFullSync { .. } | State::Syncing { .. } | State::Protecting { .. }
        )
    }

    /// How long the primary may be silent before it is declared dead, for an epoch
    /// interval of `interval` (4 ×, but at least [`FIRST_SYNC_PATIENCE`] before the first
    /// commit).
    pub fn silence_limit(&self, interval: Duration) -> Duration {
        let dead_after = interval * 4;
        if self.committed.is_some() {
            dead_after
        } else {
            dead_after.max(FIRST_SYNC_PATIENCE)
        }
    }

    /// The standby's status (control socket, final stats).
    pub fn status(&self) -> FtStatus {
        let c = &self.counters;
        let phase = if self.committed.is_some() {
            "protecting".to_string()
        } else if c.precopy_rounds > 0 {
            format!(
                "full sync: {} pre-copy rounds received ({} MiB)",
                c.precopy_rounds,
                (c.precopy_pages * 4096) >> 20
            )
        } else {
            "waiting for the full sync".to_string()
        };
        FtStatus {
            role: Role::Standby,
            protected: None,
            unprotected_because: None,
            generation: self.generation,
            phase: Some(phase),
            committed_epoch: self.committed.map(|f| f.epoch.0),
            epoch: None,
            last_ack: None,
            in_flight: None,
            lag_ms: None,
            interval_ms: None,
            pause_ms: None,
            bytes_sent: None,
            counters: StatusCounters::Standby(c.clone()),
            notes: None,
            sync: None,
            last_sync: None,
            reprotections: None,
            migration: None,
        }
    }

    /// Takes one event; returns what to do, in order.
    pub fn on(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Committed { fence } => self.committed_(fence, &mut out),
            Event::CommitRefused { fence, why, base } => {
                if self.pending.take() != Some(fence) {
                    log::warn!("a commit refusal for {fence:?} that was not pending: ignored");
                    return out;
                }
                if let (Some(b), Some(sync)) = (base, self.sync_mut()) {
                    if matches!(sync.precopy, PreCopy::Spent) {
                        sync.precopy = PreCopy::Open(b);
                    }
                }
                self.counters.nacks += 1;
                nack(&mut out, fence, NackCode::Internal, why);
            }
            Event::ReplicaFailed { fence, why } => {
                if self.pending.take() != Some(fence) {
                    log::warn!("a replica failure for {fence:?} that was not pending: ignored");
                    return out;
                }
                nack(&mut out, fence, NackCode::Internal, why);
                self.state = State::Done(Ending::Failed);
            }
            Event::Claimed { generation, won } => self.claimed(generation, won, &mut out),
            _ if !self.is_live() => {}
            Event::Message(m) => {
                self.counters.frames += 1;
                self.message(m, &mut out);
            }
            Event::Pages(batch) => {
                self.counters.frames += 1;
                self.counters.bytes_received +=
                    batch.iter().map(|r| r.payload.len() as u64).sum::<u64>();
                self.pages(batch);
            }
            Event::EndOfStream => {
                self.counters.frames += 1;
                self.finish(&mut out);
            }
            Event::Cancelled(why) => {
                self.counters.frames += 1;
                log::warn!("the primary cancelled the stream: {why}");
                self.finish(&mut out);
            }
            Event::Lost(e) => {
                if matches!(self.rx, Receiving::Epoch(_)) {
                    self.counters.partial_epochs_discarded += 1;
                    log::warn!("the primary vanished in the middle of an epoch: discarded");
                }
                self.failover(format!("connection to the primary lost: {e}"), &mut out);
            }
            Event::Silence { ms } => self.failover(
                format!("nothing from the primary for {ms} ms (4 × interval)"),
                &mut out,
            ),
        }
        out
    }

    fn sync_mut(&mut self) -> Option<&mut Sync> {
        match &mut self.state {
            State::Syncing { sync } | State::Protecting { sync, .. } => Some(sync),
            _ => None,
        }
    }

    /// Notes that the full sync is broken (keeps the first reason).
    fn refuse_if_none(&mut self, why: &str) {
        match &mut self.state {
            State::AwaitingFullSync { refused } => {
                refused.get_or_insert_with(|| why.to_string());
            }
            State::Syncing { sync } | State::Protecting { sync, .. }
                if !matches!(sync.precopy, PreCopy::Refused(_)) =>
            {
                precopy_refuse(&mut sync.precopy, why);
            }
            _ => {}
        }
    }

    /// Drops an open epoch (counted) or round.
    fn drop_open(&mut self) {
        if let Receiving::Epoch(_) = std::mem::take(&mut self.rx) {
            self.counters.partial_epochs_discarded += 1;
        }
    }

    fn pages(&mut self, batch: Vec<PageRange>) {
        match &mut self.rx {
            Receiving::Poisoned { .. } => {}
            Receiving::Epoch(st) => {
                let none = |_: u64, _: &mut [u8]| false;
                let r = match &self.xor_base {
                    Some(b) => st.pages_with(batch, &*b.0),
                    None => st.pages_with(batch, &none),
                };
                if let Err(e) = r {
                    self.rx = Receiving::Poisoned {
                        fence: st.fence(),
                        why: e.to_string(),
                    };
                }
            }
            Receiving::Round { staging, .. } => {
                if let Err(e) = staging.pages(batch) {
                    self.rx = Receiving::Idle;
                    if let Some(sync) = self.sync_mut() {
                        precopy_refuse(&mut sync.precopy, format!("pre-copy: {e}"));
                    }
                }
            }
            Receiving::Idle => log::warn!("pages outside an epoch: ignored"),
        }
    }

    fn section(&mut self, name: &str, version: u32, data: Vec<u8>) {
        match &mut self.rx {
            Receiving::Epoch(st) => {
                if let Err(e) = st.section(name, version, data) {
                    self.rx = Receiving::Poisoned {
                        fence: st.fence(),
                        why: e.to_string(),
                    };
                }
            }
            // A round carries disk writes only: its end refuses any other state.
            Receiving::Round { staging, .. } => {
                if let Err(e) = staging.section(name, version, data) {
                    self.rx = Receiving::Idle;
                    if let Some(sync) = self.sync_mut() {
                        precopy_refuse(&mut sync.precopy, format!("pre-copy: {e}"));
                    }
                }
            }
            Receiving::Idle | Receiving::Poisoned { .. } => {}
        }
    }

    fn message(&mut self, m: Message, out: &mut Vec<Action>) {
        if let (Some(f), Some(g)) = (m.fence(), self.sync_mut().map(|s| s.generation)) {
            if f.generation.0 < g {
                nack(
                    out,
                    f,
                    NackCode::Stale,
                    format!("generation {} is stale", f.generation.0),
                );
                return;
            }
        }
        match m {
            Message::FullSync {
                fence,
                mem_bytes,
                vcpus,
            } => self.full_sync(fence, Shape { mem_bytes, vcpus }),
            Message::PreCopy {
                fence,
                round,
                pages,
            } => self.precopy(fence, round, pages),
            Message::PreCopyEnd {
                fence,
                round,
                ranges,
                digest,
            } => self.precopy_end(fence, round, ranges, digest, out),
            Message::EpochBegin { fence, pages } => self.epoch_begin(fence, pages),
            Message::DeviceState {
                name,
                version,
                data,
                ..
            } => self.section(&name, version, data),
            Message::EpochEnd {
                fence,
                ranges,
                digest,
            } => self.epoch_end(fence, ranges, digest, out),
            Message::Heartbeat { .. } => {}
            Message::Input { fence, card, frame } => {
                // Only the current generation's frames (older ones were refused above).
                if self.generation == Some(fence.generation.0) {
                    self.inputs.keep(fence.epoch.0, card, frame);
                }
            }
            Message::Goodbye => self.finish(out),
            Message::Switch { fence } => self.switch(fence, out),
            other => log::warn!("unexpected {other:?} from the primary: ignored"),
        }
    }

    fn full_sync(&mut self, fence: Fence, shape: Shape) {
        let known = self.sync_mut().map(|s| s.shape);
        let fits = (1..=MAX_VCPUS).contains(&shape.vcpus)
            && shape.mem_bytes % (1 << 20) == 0
            && shape.mem_bytes > 0
            && shape.mem_bytes <= MAX_MEM_BYTES
            && known.is_none_or(|k| k == shape);
        if !fits {
            let why = format!(
                "full sync of {} bytes, {} vCPUs does not fit this standby",
                shape.mem_bytes, shape.vcpus
            );
            match &mut self.state {
                State::AwaitingFullSync { refused } => *refused = Some(why),
                State::Syncing { sync } | State::Protecting { sync, .. } => {
                    precopy_refuse(&mut sync.precopy, why)
                }
                _ => {}
            }
            return;
        }
        // A new full sync starts a new image; an open round of the old one is dropped.
        if matches!(self.rx, Receiving::Round { .. }) {
            self.rx = Receiving::Idle;
        }
        self.generation = Some(fence.generation.0);
        let precopy = PreCopy::Open(Base::new(shape.mem_bytes));
        match &mut self.state {
            State::Syncing { sync } | State::Protecting { sync, .. } => {
                sync.generation = fence.generation.0;
                sync.precopy = precopy;
            }
            _ => {
                self.state = State::Syncing {
                    sync: Sync {
                        shape,
                        generation: fence.generation.0,
                        precopy,
                    },
                }
            }
        }
    }

    fn precopy(&mut self, fence: Fence, round: u32, pages: u64) {
        let open = self.sync_mut().and_then(|s| match &s.precopy {
            PreCopy::Open(b) => Some((b.rounds, s.shape.mem_bytes)),
            _ => None,
        });
        let Some((expected, mem_bytes)) = open else {
            self.refuse_if_none("pre-copy without a full sync");
            return;
        };
        // Whatever was open is abandoned (an epoch counts as discarded).
        self.drop_open();
        let sync = self.sync_mut().expect("checked");
        if round != expected {
            precopy_refuse(
                &mut sync.precopy,
                format!("pre-copy round {round}, expected {expected}"),
            );
            return;
        }
        match Staging::begin(fence, pages, mem_bytes) {
            Ok(staging) => self.rx = Receiving::Round { round, staging },
            Err(e) => precopy_refuse(&mut sync.precopy, format!("pre-copy: {e}")),
        }
    }

    fn precopy_end(
        &mut self,
        fence: Fence,
        round: u32,
        ranges: u64,
        digest: [u8; 32],
        out: &mut Vec<Action>,
    ) {
        self.end_round(fence, round, ranges, digest);
        // Every round's end is answered: the primary waits for its last round's answer before
        // it captures the epoch that completes the sync.
        let broken = match &self.state {
            State::Syncing { sync } | State::Protecting { sync, .. } => match &sync.precopy {
                PreCopy::Open(_) => None,
                PreCopy::Refused(why) => Some(why.clone()),
                PreCopy::Spent => Some("pre-copy after the image was spent".to_string()),
            },
            State::AwaitingFullSync { refused } => Some(
                refused
                    .clone()
                    .unwrap_or_else(|| "pre-copy without a full sync".into()),
            ),
            State::Claiming { .. } | State::Done(_) => return,
        };
        match broken {
            None => out.push(Action::RoundDone {
                fence,
                round,
                ranges,
                digest,
            }),
            Some(why) => nack(out, fence, NackCode::Malformed, why),
        }
    }

    fn end_round(&mut self, fence: Fence, round: u32, ranges: u64, digest: [u8; 32]) {
        if !matches!(self.rx, Receiving::Round { .. }) {
            // An open epoch goes on; the full sync is broken.
            self.refuse_if_none("a pre-copy end without its round");
            return;
        }
        let Receiving::Round {
            round: expect,
            staging,
        } = std::mem::take(&mut self.rx)
        else {
            unreachable!()
        };
        let sync = self.sync_mut().expect("a round needs a full sync");
        let applied = if expect != round {
            Err(Error::Epoch(format!(
                "pre-copy round {round} ends round {expect}"
            )))
        } else {
            staging
                .end_pages(fence, ranges, digest)
                .and_then(|(pages, disks)| {
                    let n = pages.iter().map(|p| p.1.len() as u64 / 4096).sum::<u64>();
                    if let PreCopy::Open(b) = &mut sync.precopy {
                        b.apply(pages)?;
                        b.keep_disks(disks)?;
                    }
                    Ok(n)
                })
        };
        match applied {
            Ok(n) => {
                self.counters.precopy_rounds += 1;
                self.counters.precopy_pages += n;
                log::info!("pre-copy round {round}: {n} pages received and verified");
            }
            Err(e) => {
                log::warn!("pre-copy round {round} refused: {e}");
                precopy_refuse(&mut sync.precopy, format!("pre-copy: {e}"));
            }
        }
    }

    fn epoch_begin(&mut self, fence: Fence, pages: u64) {
        match std::mem::take(&mut self.rx) {
            Receiving::Epoch(_) => self.counters.partial_epochs_discarded += 1,
            Receiving::Round { round, .. } => {
                if let Some(sync) = self.sync_mut() {
                    precopy_refuse(
                        &mut sync.precopy,
                        format!("an epoch began inside pre-copy round {round}"),
                    );
                }
            }
            Receiving::Idle | Receiving::Poisoned { .. } => {}
        }
        let poison = |why: String| Receiving::Poisoned { fence, why };
        self.rx = match &self.state {
            State::AwaitingFullSync { refused } => poison(
                refused
                    .clone()
                    .unwrap_or_else(|| "an epoch before the full sync".into()),
            ),
            State::Syncing { sync } | State::Protecting { sync, .. }
                if matches!(sync.precopy, PreCopy::Refused(_)) =>
            {
                let PreCopy::Refused(why) = &sync.precopy else {
                    unreachable!()
                };
                poison(why.clone())
            }
            State::Protecting { committed, .. } if fence.epoch.0 != committed.epoch.0 + 1 => {
                poison(format!(
                    "epoch {} out of order (expected {})",
                    fence.epoch.0,
                    committed.epoch.0 + 1
                ))
            }
            State::Syncing { sync } | State::Protecting { sync, .. } => {
                match Staging::begin(fence, pages, sync.shape.mem_bytes) {
                    Ok(st) => Receiving::Epoch(st),
                    Err(e) => poison(e.to_string()),
                }
            }
            State::Claiming { .. } | State::Done(_) => Receiving::Idle,
        };
    }

    fn epoch_end(&mut self, fence: Fence, ranges: u64, digest: [u8; 32], out: &mut Vec<Action>) {
        let st = match std::mem::take(&mut self.rx) {
            Receiving::Poisoned { fence: f, why } => {
                self.counters.nacks += 1;
                nack(out, f, NackCode::Malformed, why);
                return;
            }
            Receiving::Epoch(st) => st,
            other => {
                // A round stays open: an epoch end does not belong to it.
                self.rx = other;
                self.counters.nacks += 1;
                nack(
                    out,
                    fence,
                    NackCode::OutOfOrder,
                    "an epoch end without its beginning".into(),
                );
                return;
            }
        };
        let shape = self
            .sync_mut()
            .expect("an epoch is staged only after a full sync")
            .shape;
        let staged = match st.end(fence, ranges, digest, shape.vcpus) {
            Ok(s) => s,
            Err(e) => {
                self.counters.nacks += 1;
                nack(out, fence, NackCode::Malformed, e.to_string());
                return;
            }
        };
        let sync = self.sync_mut().expect("checked");
        let base = match std::mem::replace(&mut sync.precopy, PreCopy::Spent) {
            PreCopy::Open(b) => Some(b),
            other => {
                sync.precopy = other;
                None
            }
        };
        self.pending = Some(fence);
        out.push(Action::Commit {
            staged,
            base,
            shape,
        });
    }

    fn committed_(&mut self, fence: Fence, out: &mut Vec<Action>) {
        if self.pending != Some(fence) {
            log::warn!("a commit of {fence:?} that was not pending: ignored");
            return;
        }
        self.pending = None;
        self.state = match std::mem::replace(&mut self.state, State::Done(Ending::Failed)) {
            State::Syncing { sync } | State::Protecting { sync, .. } => State::Protecting {
                committed: fence,
                sync,
            },
            other => other,
        };
        self.committed = Some(fence);
        self.inputs.committed(fence.epoch.0);
        self.counters.commits += 1;
        out.push(Action::Ack(fence));
        if self.counters.commits == 1 {
            log::info!(
                "full sync committed (epoch {}): the primary is protected",
                fence.epoch.0
            );
        }
    }

    fn finish(&mut self, out: &mut Vec<Action>) {
        log::info!(
            "the primary finished and said goodbye after {} commits; nothing to take over",
            self.counters.commits
        );
        self.state = State::Done(Ending::Finished);
        out.push(Action::Finish);
    }

    fn failover(&mut self, reason: String, out: &mut Vec<Action>) {
        let State::Protecting { committed, .. } = self.state else {
            self.state = State::Done(Ending::Failed);
            out.push(Action::Fail(Error::Epoch(format!(
                "{reason}, before the first full sync was committed: nothing to take over"
            ))));
            return;
        };
        self.claim(committed, reason, false, out);
    }

    /// Claims the next generation (or, without an arbiter, takes over at once).
    fn claim(&mut self, committed: Fence, reason: String, switch: bool, out: &mut Vec<Action>) {
        let generation = committed.generation.0 + 1;
        if self.arbiter.is_some() {
            self.state = State::Claiming {
                generation,
                from: committed,
                reason,
                switch,
            };
            out.push(Action::Claim { generation });
        } else {
            if switch {
                out.push(Action::Confirm(switched(committed)));
            }
            self.take_over(generation, committed, reason, out);
        }
    }

    /// The primary hands the VM over (a planned migration): it stopped its guest at `fence`,
    /// which must be the epoch committed here, with nothing else under way.
    fn switch(&mut self, fence: Fence, out: &mut Vec<Action>) {
        let committed = match &self.state {
            State::Protecting { committed, .. } => Some(*committed),
            _ => None,
        };
        let refuse = match committed {
            None => Some("a switch before the first full sync committed".to_string()),
            Some(c) if c != fence => Some(format!(
                "a switch at epoch {} of generation {}, but this standby committed epoch {} of \
                 generation {}",
                fence.epoch.0, fence.generation.0, c.epoch.0, c.generation.0
            )),
            Some(_) if !matches!(self.rx, Receiving::Idle) => {
                Some("a switch in the middle of an epoch or round".to_string())
            }
            Some(_) => None,
        };
        if let Some(why) = refuse {
            nack(out, fence, NackCode::OutOfOrder, why);
            return;
        }
        log::warn!(
            "SWITCH: the primary handed the VM over at epoch {} (planned migration)",
            fence.epoch.0
        );
        let reason = format!(
            "planned switch: the primary stopped at epoch {} and handed the VM over",
            fence.epoch.0
        );
        self.claim(fence, reason, true, out);
    }

    /// Whether a switch waits for the arbiter (the link stays open for its answer).
    pub fn switching(&self) -> bool {
        matches!(self.state, State::Claiming { switch: true, .. })
    }

    fn claimed(&mut self, generation: u64, won: bool, out: &mut Vec<Action>) {
        let State::Claiming {
            generation: g,
            from,
            ..
        } = self.state
        else {
            log::warn!("an arbiter answer without a claim: ignored");
            return;
        };
        if g != generation {
            log::warn!("the arbiter answered for generation {generation}, not {g}: ignored");
            return;
        }
        let State::Claiming { reason, switch, .. } =
            std::mem::replace(&mut self.state, State::Done(Ending::StoodDown))
        else {
            unreachable!()
        };
        let arbiter = self.arbiter.clone().unwrap_or_else(|| "arbiter".into());
        if !won {
            let why = format!(
                "{reason}, but generation {generation} was claimed first at the {arbiter}: \
                 the primary is alive; standing down"
            );
            log::warn!("{why}");
            if switch {
                nack(out, from, NackCode::Stale, why.clone());
            }
            out.push(Action::StandDown { reason: why });
            return;
        }
        log::info!("won generation {generation} at the {arbiter}");
        if switch {
            out.push(Action::Confirm(switched(from)));
        }
        self.take_over(generation, from, reason, out);
    }

    fn take_over(&mut self, generation: u64, from: Fence, reason: String, out: &mut Vec<Action>) {
        log::warn!(
            "FAILOVER: {reason}. Taking over as primary, generation {generation}, from \
             committed epoch {}",
            from.epoch.0
        );
        self.state = State::Done(Ending::TookOver { generation });
        out.push(Action::TakeOver {
            generation,
            from,
            reason,
        });
    }
}

/// The fence a switch's confirmation carries: the new generation, the committed epoch.
fn switched(committed: Fence) -> Fence {
    Fence {
        generation: transport::Generation(committed.generation.0 + 1),
        epoch: committed.epoch,
    }
}

fn nack(out: &mut Vec<Action>, fence: Fence, code: NackCode, message: String) {
    log::warn!("refusing epoch {fence:?}: {message}");
    out.push(Action::Nack {
        fence,
        code,
        message,
    });
}
