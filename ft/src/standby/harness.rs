//! Drives the standby's [`Machine`] (and with it [`crate::epoch::Staging`]) without KVM: a
//! plain `GuestMemoryMmap<AtomicBitmap>` stands in for the replica VM. The `standby_machine`
//! fuzz target feeds it arbitrary bytes; the tests feed it scripts built with the real
//! encoders. Every step checks the machine's invariants and panics if one breaks:
//!
//! * a commit is asked for only with an epoch that ended with a matching fence, range count and
//!   page digest, and whose state describes every vCPU;
//! * the committed epoch changes only through such a commit, and its number only increases;
//! * an `Ack` names the committed epoch; a takeover resumes from it;
//! * once out of the protocol, frames from the primary do nothing.
//!
//! A script is a sequence of records, `tag` (one byte) then for some tags `len` (u16, little
//! endian) and `len` bytes (fewer if the input ends):
//!
//! | tag % 8 | record                                                                    |
//! |---------|---------------------------------------------------------------------------|
//! | 0       | a control message, decoded with [`Message::decode`] (skipped if it fails)  |
//! | 1       | a batch of page ranges, decoded with [`decode_batch`] (skipped if it fails)|
//! | 2, 3    | end of stream; cancelled                                                  |
//! | 4, 5    | connection lost; silence                                                  |
//! | 6       | one byte of settings: bit 0 loses arbiter claims, bit 1 fails VM builds    |
//! | 7       | a "sealed" `EpochEnd`/`PreCopyEnd`: its range count and digest are those of |
//! |         | what the open epoch or round received so far                               |

use transport::pages::{decode_batch, encode_batch};
use transport::{Fence, Message, PageRange};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::machine::{Action, Event, Machine, Receiving};
use crate::epoch::Replica;
use checkpoint::digest::pages_digest;

/// The harness builds a replica only for memories up to this size (larger ones fail to
/// build, as a VM that cannot be built would).
pub const MEM_LIMIT: u64 = 4 << 20;

/// One step of a script.
#[derive(Clone, Debug)]
pub enum Op {
    /// A control message.
    Message(Message),
    /// A batch of page ranges.
    Pages(Vec<PageRange>),
    /// End of stream.
    End,
    /// The primary cancelled the stream.
    Cancelled,
    /// The connection failed.
    Lost,
    /// Silence beyond the limit.
    Silence,
    /// Settings for what follows.
    Settings {
        /// The arbiter says no to claims.
        lose_claims: bool,
        /// Building the replica VM fails.
        fail_builds: bool,
    },
    /// An `EpochEnd` or `PreCopyEnd` whose range count and digest the harness fills in.
    Sealed(Message),
}

/// Encodes a script.
pub fn encode_script(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut record = |tag: u8, payload: Option<Vec<u8>>| {
        out.push(tag);
        if let Some(p) = payload {
            let len = u16::try_from(p.len()).expect("a script record fits in 64 KiB");
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&p);
        }
    };
    for op in ops {
        match op {
            Op::Message(m) => record(0, Some(m.encode())),
            Op::Pages(batch) => record(1, Some(encode_batch(batch))),
            Op::End => record(2, None),
            Op::Cancelled => record(3, None),
            Op::Lost => record(4, None),
            Op::Silence => record(5, None),
            Op::Settings {
                lose_claims,
                fail_builds,
            } => record(
                6,
                Some(vec![*lose_claims as u8 | (*fail_builds as u8) << 1]),
            ),
            Op::Sealed(m) => record(7, Some(m.encode())),
        }
    }
    out
}

/// Decodes a script (never fails: what does not decode is skipped).
pub fn decode_script(mut bytes: &[u8]) -> Vec<Op> {
    let mut ops = Vec::new();
    while let Some((&tag, rest)) = bytes.split_first() {
        bytes = rest;
        let tag = tag % 8;
        let payload = if matches!(tag, 0 | 1 | 6 | 7) {
            let len = match bytes {
                [a, b, ..] => u16::from_le_bytes([*a, *b]) as usize,
                _ => bytes.len(),
            };
            bytes = bytes.get(2..).unwrap_or_default();
            let (p, rest) = bytes.split_at(len.min(bytes.len()));
            bytes = rest;
            p
        } else {
            &[]
        };
        let op = match tag {
            0 => Message::decode(payload).ok().map(Op::Message),
            1 => decode_batch(payload).ok().map(Op::Pages),
            2 => Some(Op::End),
            3 => Some(Op::Cancelled),
            4 => Some(Op::Lost),
            5 => Some(Op::Silence),
            6 => payload.first().map(|b| Op::Settings {
                lose_claims: b & 1 != 0,
                fail_builds: b & 2 != 0,
            }),
            _ => Message::decode(payload).ok().map(Op::Sealed),
        };
        ops.extend(op);
    }
    ops
}

/// The machine, a replica over plain memory, and the invariants.
pub struct Harness {
    /// The machine under test.
    pub machine: Machine,
    /// The replica (built at the first commit).
    pub replica: Option<Replica>,
    lose_claims: bool,
    fail_builds: bool,
    /// The last message fed, if it was an `EpochEnd`: (fence, ranges, digest).
    last_end: Option<(Fence, u64, [u8; 32])>,
    /// The actions of every step, in order (for tests).
    pub log: Vec<String>,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new(Some("test arbiter".into()))
    }
}

impl Harness {
    /// A harness whose machine has `arbiter` (its description) or none.
    pub fn new(arbiter: Option<String>) -> Self {
        Harness {
            machine: Machine::new(arbiter),
            replica: None,
            lose_claims: false,
            fail_builds: false,
            last_end: None,
            log: Vec::new(),
        }
    }

    /// Runs a script.
    pub fn run(&mut self, ops: Vec<Op>) {
        for op in ops {
            self.step(op);
        }
    }

    /// The replica's memory (panics before the first commit).
    pub fn replica_mem(&self) -> &monitor::GuestMem {
        self.replica.as_ref().expect("a replica").memory()
    }

    /// Feeds one step and carries out what the machine asks, checking the invariants.
    pub fn step(&mut self, op: Op) {
        let event = match op {
            Op::Message(m) => {
                self.last_end = match &m {
                    Message::EpochEnd {
                        fence,
                        ranges,
                        digest,
                    } => Some((*fence, *ranges, *digest)),
                    _ => None,
                };
                Event::Message(m)
            }
            Op::Sealed(m) => {
                // What the open epoch or round received so far (nothing open: no pages).
                let (ranges, digest) = match self.machine.receiving() {
                    Receiving::Epoch(st) | Receiving::Round { staging: st, .. } => st.received(),
                    _ => (0, pages_digest(&[])),
                };
                let m = match m {
                    Message::EpochEnd { fence, .. } => Message::EpochEnd {
                        fence,
                        ranges,
                        digest,
                    },
                    Message::PreCopyEnd { fence, round, .. } => Message::PreCopyEnd {
                        fence,
                        round,
                        ranges,
                        digest,
                    },
                    other => other,
                };
                return self.step(Op::Message(m));
            }
            Op::Pages(batch) => {
                self.last_end = None;
                Event::Pages(batch)
            }
            Op::End => Event::EndOfStream,
            Op::Cancelled => Event::Cancelled("fuzz".into()),
            Op::Lost => Event::Lost("fuzz".into()),
            Op::Silence => Event::Silence { ms: 4000 },
            Op::Settings {
                lose_claims,
                fail_builds,
            } => {
                self.lose_claims = lose_claims;
                self.fail_builds = fail_builds;
                return;
            }
        };
        let frame = matches!(
            event,
            Event::Message(_) | Event::Pages(_) | Event::EndOfStream | Event::Cancelled(_)
        );
        let live = self.machine.is_live();
        let before = self.machine.committed();
        let mut committed_now: Option<Fence> = None;
        let mut queue: std::collections::VecDeque<Action> = self.machine.on(event).into();
        if frame && !live {
            assert!(
                queue.is_empty(),
                "a frame after the end did something: {queue:?}"
            );
        }
        while let Some(a) = queue.pop_front() {
            self.log.push(describe(&a));
            match a {
                Action::Ack(f) => {
                    assert_eq!(
                        Some(f),
                        self.machine.committed(),
                        "Ack of an uncommitted epoch"
                    );
                    assert_eq!(self.replica.as_ref().map(|r| r.fence), Some(f));
                }
                Action::RoundDone { .. } => {}
                Action::Confirm(f) => {
                    let c = self.machine.committed().expect("a switch needs a commit");
                    assert_eq!(f.epoch, c.epoch, "a switch confirmed at another epoch");
                    assert_eq!(f.generation.0, c.generation.0 + 1);
                }
                Action::Nack { .. } | Action::Finish | Action::StandDown { .. } => {}
                Action::Commit {
                    staged,
                    base,
                    shape,
                } => {
                    let (fence, ranges, digest) =
                        self.last_end.expect("a commit right after an EpochEnd");
                    assert_eq!(staged.fence, fence, "committing another epoch than ended");
                    assert_eq!(staged.ranges.len() as u64, ranges);
                    let parts: Vec<(u64, &[u8])> = staged
                        .ranges
                        .iter()
                        .map(|r| match r {
                            crate::epoch::StagedRange::Bytes(g, d) => (*g, &d[..]),
                            crate::epoch::StagedRange::Patch(p) => {
                                panic!("a patch at {:#x} staged without a base", p.gpa)
                            }
                        })
                        .collect();
                    assert_eq!(pages_digest(&parts), digest, "an unverified epoch");
                    for v in 0..shape.vcpus {
                        assert!(staged.sections.get(&format!("vcpu/{v}")).is_some());
                    }
                    assert!(staged.sections.get("groups").is_some());
                    if let Some(r) = &self.replica {
                        assert_eq!(
                            staged.fence.epoch.0,
                            r.fence.epoch.0 + 1,
                            "committed epochs must follow each other"
                        );
                    }
                    if self.replica.is_none() {
                        if self.fail_builds || shape.mem_bytes > MEM_LIMIT {
                            queue.extend(self.machine.on(Event::CommitRefused {
                                fence,
                                why: "no VM in the harness".into(),
                                base,
                            }));
                            continue;
                        }
                        let mem = GuestMemoryMmap::from_ranges(&[(
                            GuestAddress(0),
                            shape.mem_bytes as usize,
                        )])
                        .expect("small memory");
                        self.replica = Some(Replica::new(mem));
                    }
                    let r = self.replica.as_mut().expect("built");
                    // As the standby does: disk writes the replica cannot take are refused
                    // before anything is written (this replica has no disks).
                    if let Err(e) = r.check(base.as_ref(), &staged) {
                        queue.extend(self.machine.on(Event::CommitRefused {
                            fence,
                            why: e.to_string(),
                            base,
                        }));
                        continue;
                    }
                    r.complete(base, staged)
                        .expect("a verified epoch always commits into a memory of its shape");
                    committed_now = Some(fence);
                    queue.extend(self.machine.on(Event::Committed { fence }));
                }
                Action::Claim { generation } => {
                    assert!(
                        self.machine.committed().is_some(),
                        "a claim without a commit"
                    );
                    queue.extend(self.machine.on(Event::Claimed {
                        generation,
                        won: !self.lose_claims,
                    }));
                }
                Action::TakeOver {
                    generation, from, ..
                } => {
                    let r = self.replica.as_ref().expect("a takeover needs a replica");
                    assert_eq!(r.fence, from, "takeover from another epoch than committed");
                    assert_eq!(generation, from.generation.0 + 1);
                }
                Action::Fail(_) => {
                    assert!(self.machine.committed().is_none(), "failed with a replica");
                }
            }
        }
        let after = self.machine.committed();
        if after != before {
            assert_eq!(
                after, committed_now,
                "the committed epoch changed without a commit"
            );
            if let (Some(b), Some(a)) = (before, after) {
                assert!(a.epoch.0 > b.epoch.0, "the committed epoch went back");
            }
        }
        assert_eq!(
            self.machine.counters().commits,
            self.replica.as_ref().map_or(0, |r| r.commits)
        );
    }
}

/// A short description of an action (for test assertions).
pub fn describe(a: &Action) -> String {
    match a {
        Action::Ack(f) => format!("ack {}", f.epoch.0),
        Action::Confirm(f) => format!("confirm switch {} as {}", f.epoch.0, f.generation.0),
        Action::RoundDone { round, .. } => format!("round {round} done"),
        Action::Nack { fence, code, .. } => format!("nack {} {code:?}", fence.epoch.0),
        Action::Commit { staged, .. } => format!("commit {}", staged.fence.epoch.0),
        Action::Finish => "finish".into(),
        Action::Claim { generation } => format!("claim {generation}"),
        Action::TakeOver { generation, .. } => format!("take over {generation}"),
        Action::StandDown { .. } => "stand down".into(),
        Action::Fail(_) => "fail".into(),
    }
}

/// Runs arbitrary bytes as a script (the fuzz target's body).
pub fn fuzz(data: &[u8]) {
    let mut h = Harness::new(
        data.first()
            .filter(|b| *b & 0x80 == 0)
            .map(|_| "arbiter".into()),
    );
    h.run(decode_script(data));
}

/// A fence of generation `g`, epoch `e`.
pub fn fence(g: u64, e: u64) -> Fence {
    Fence {
        generation: transport::Generation(g),
        epoch: transport::Epoch(e),
    }
}

/// The ops of a whole, valid epoch: `pages` (gpa, bytes), state for `vcpus` vCPUs, and the
/// held output `records` of vCPU 0 (encoded records, if any).
pub fn epoch_ops(
    f: Fence,
    pages: &[(u64, Vec<u8>)],
    vcpus: u32,
    records: Option<Vec<u8>>,
) -> Vec<Op> {
    let n: u64 = pages.iter().map(|(_, d)| d.len() as u64 / 4096).sum();
    let mut ops = vec![Op::Message(Message::EpochBegin { fence: f, pages: n })];
    ops.extend(pages_ops(pages));
    for v in 0..vcpus {
        ops.push(Op::Message(Message::DeviceState {
            fence: f,
            name: format!("vcpu/{v}"),
            version: 1,
            data: vec![v as u8; 64],
        }));
    }
    for (name, data) in [("groups", vec![1u8, 2]), ("group/config", vec![3u8; 16])] {
        ops.push(Op::Message(Message::DeviceState {
            fence: f,
            name: name.into(),
            version: 1,
            data,
        }));
    }
    if let Some(data) = records {
        ops.push(Op::Message(Message::DeviceState {
            fence: f,
            name: format!("{}0", crate::epoch::RECORDS_PREFIX),
            version: 1,
            data,
        }));
    }
    ops.push(Op::Message(Message::EpochEnd {
        fence: f,
        ranges: pages.len() as u64,
        digest: digest(pages),
    }));
    ops
}

/// The ops of a valid pre-copy round.
pub fn round_ops(f: Fence, round: u32, pages: &[(u64, Vec<u8>)]) -> Vec<Op> {
    let n: u64 = pages.iter().map(|(_, d)| d.len() as u64 / 4096).sum();
    let mut ops = vec![Op::Message(Message::PreCopy {
        fence: f,
        round,
        pages: n,
    })];
    ops.extend(pages_ops(pages));
    ops.push(Op::Message(Message::PreCopyEnd {
        fence: f,
        round,
        ranges: pages.len() as u64,
        digest: digest(pages),
    }));
    ops
}

/// One batch of page ranges, encoded by the primary's encoder.
pub fn pages_ops(pages: &[(u64, Vec<u8>)]) -> Vec<Op> {
    if pages.is_empty() {
        return Vec::new();
    }
    vec![Op::Pages(
        pages
            .iter()
            .map(|(g, d)| transport::pages::encode_range(*g, d, None))
            .collect(),
    )]
}

/// The digest of pages (as the primary computes it).
pub fn digest(pages: &[(u64, Vec<u8>)]) -> [u8; 32] {
    let parts: Vec<(u64, &[u8])> = pages.iter().map(|(g, d)| (*g, d.as_slice())).collect();
    pages_digest(&parts)
}

/// The `FullSync` of a VM of `mem_mib` MiB and `vcpus` vCPUs.
pub fn full_sync(f: Fence, mem_mib: u64, vcpus: u32) -> Op {
    Op::Message(Message::FullSync {
        fence: f,
        mem_bytes: mem_mib << 20,
        vcpus,
    })
}

/// Seed scripts for the fuzzer (name, script), built with the real encoders.
pub fn seeds() -> Vec<(&'static str, Vec<Op>)> {
    let text: Vec<u8> = (0..8192).map(|i| b"standby page "[i % 13]).collect();
    let p1 = vec![(0x1000, text.clone()), (0x8000, vec![0u8; 4096])];
    let p2 = vec![(0x2000, vec![0xabu8; 4096])];
    let p3 = vec![(0x0, vec![7u8; 12288])];
    let rec = postcard::to_stdvec(&vec![guest_abi::Record {
        seq: 3,
        ..Default::default()
    }])
    .expect("records encode");
    let g = |e| fence(1, e);
    let mut seeds = Vec::new();
    let cat = |parts: Vec<Vec<Op>>| parts.concat();
    seeds.push((
        "protect",
        cat(vec![
            vec![full_sync(g(1), 1, 1)],
            epoch_ops(g(1), &p1, 1, None),
            epoch_ops(g(2), &p2, 1, Some(rec.clone())),
            vec![Op::Message(Message::Heartbeat { fence: g(2) })],
            epoch_ops(g(3), &[], 1, None),
            vec![Op::Message(Message::Goodbye)],
        ]),
    ));
    seeds.push((
        "failover",
        cat(vec![
            vec![full_sync(g(1), 1, 2)],
            epoch_ops(g(1), &p1, 2, Some(rec.clone())),
            epoch_ops(g(2), &p3, 2, None),
            vec![Op::Lost],
        ]),
    ));
    seeds.push((
        "stand-down",
        cat(vec![
            vec![
                Op::Settings {
                    lose_claims: true,
                    fail_builds: false,
                },
                full_sync(g(1), 1, 1),
            ],
            epoch_ops(g(1), &p2, 1, None),
            vec![Op::Silence],
        ]),
    ));
    seeds.push((
        "precopy",
        cat(vec![
            vec![full_sync(fence(2, 9), 2, 1)],
            round_ops(fence(2, 9), 0, &p1),
            round_ops(fence(2, 9), 1, &p2),
            epoch_ops(fence(2, 9), &p3, 1, None),
            epoch_ops(fence(2, 10), &p2, 1, None),
            vec![Op::End],
        ]),
    ));
    let mut bad = epoch_ops(g(1), &p1, 1, None);
    if let Some(Op::Message(Message::EpochEnd { digest, .. })) = bad.last_mut() {
        digest[0] ^= 1;
    }
    seeds.push((
        "refused-then-good",
        cat(vec![
            vec![full_sync(g(1), 1, 1)],
            bad,
            vec![full_sync(g(1), 1, 1)],
            epoch_ops(g(1), &p1, 1, None),
            epoch_ops(g(3), &p2, 1, None),
            vec![Op::Cancelled],
        ]),
    ));
    let mut sealed = epoch_ops(g(1), &p1, 1, None);
    sealed.pop();
    sealed.push(Op::Sealed(Message::EpochEnd {
        fence: g(1),
        ranges: 0,
        digest: [0; 32],
    }));
    seeds.push((
        "sealed",
        cat(vec![
            vec![full_sync(g(1), 1, 1)],
            vec![Op::Message(Message::PreCopy {
                fence: g(1),
                round: 0,
                pages: 1,
            })],
            pages_ops(&p2),
            vec![Op::Sealed(Message::PreCopyEnd {
                fence: g(1),
                round: 0,
                ranges: 0,
                digest: [0; 32],
            })],
            sealed,
            vec![Op::Silence],
        ]),
    ));
    seeds.push((
        "stale-and-early",
        cat(vec![
            epoch_ops(fence(3, 1), &p2, 1, None),
            vec![full_sync(fence(3, 1), 1, 1)],
            epoch_ops(fence(2, 1), &p2, 1, None),
            vec![Op::Settings {
                lose_claims: false,
                fail_builds: true,
            }],
            epoch_ops(fence(3, 1), &p2, 1, None),
            vec![Op::Lost],
        ]),
    ));
    seeds
}
