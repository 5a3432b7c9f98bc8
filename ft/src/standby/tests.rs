//! One test per transition of the standby machine (and the illegal ones), through the
//! harness, which also checks the invariants at every step.

use transport::message::NackCode;
use transport::Message;

use super::harness::{
    decode_script, digest, encode_script, epoch_ops, fence, full_sync, pages_ops, round_ops, seeds,
    Harness, Op,
};
use super::machine::{Action, Ending, Event, Machine, PreCopy, Receiving, State};

fn page(b: u8) -> Vec<(u64, Vec<u8>)> {
    vec![(0x3000, vec![b; 4096])]
}

/// Runs `ops`, returns the actions they caused.
fn run(h: &mut Harness, ops: Vec<Op>) -> Vec<String> {
    let n = h.log.len();
    h.run(ops);
    h.log[n..].to_vec()
}

fn msg(m: Message) -> Op {
    Op::Message(m)
}

/// A harness protecting epoch 1 of generation 1 (1 MiB, 1 vCPU).
fn protecting() -> Harness {
    let mut h = Harness::default();
    run(&mut h, vec![full_sync(fence(1, 1), 1, 1)]);
    assert_eq!(
        run(&mut h, epoch_ops(fence(1, 1), &page(1), 1, None)),
        ["commit 1", "ack 1"]
    );
    h
}

fn syncing() -> Harness {
    let mut h = Harness::default();
    assert!(run(&mut h, vec![full_sync(fence(1, 1), 1, 1)]).is_empty());
    assert!(matches!(h.machine.state(), State::Syncing { .. }));
    h
}

fn nack_reason(h: &mut Harness, ops: Vec<Op>) -> (NackCode, String) {
    let mut last = None;
    for op in ops {
        let event = match op {
            Op::Message(m) => Event::Message(m),
            Op::Pages(b) => Event::Pages(b),
            _ => continue,
        };
        {
            for a in h.machine.on(event) {
                if let Action::Nack { code, message, .. } = a {
                    last = Some((code, message));
                }
            }
        }
    }
    last.expect("a nack")
}

fn refused(h: &Harness) -> Option<String> {
    match h.machine.state() {
        State::AwaitingFullSync { refused } => refused.clone(),
        State::Syncing { sync } | State::Protecting { sync, .. } => match &sync.precopy {
            PreCopy::Refused(w) => Some(w.clone()),
            _ => None,
        },
        _ => None,
    }
}

// ---- AwaitingFullSync ----

#[test]
fn awaiting_full_sync_that_fits_starts_syncing() {
    let h = syncing();
    assert_eq!(h.machine.status().generation, Some(1));
    assert_eq!(
        h.machine.status().phase.as_deref(),
        Some("waiting for the full sync")
    );
}

#[test]
fn awaiting_full_sync_that_does_not_fit_is_refused_until_one_fits() {
    for (mem, vcpus) in [
        (0, 1),
        (1 << 20, 0),
        ((1 << 20) + 4096, 1),
        (2 << 40, 1),
        (1 << 20, 257),
    ] {
        let mut h = Harness::default();
        run(
            &mut h,
            vec![msg(Message::FullSync {
                fence: fence(1, 1),
                mem_bytes: mem,
                vcpus,
            })],
        );
        assert!(matches!(
            h.machine.state(),
            State::AwaitingFullSync { refused: Some(_) }
        ));
        assert_eq!(
            run(&mut h, epoch_ops(fence(1, 1), &page(1), 1, None)),
            ["nack 1 Malformed"]
        );
        assert!(h.log.is_empty() || h.replica.is_none());
        // A FullSync that fits clears the refusal.
        run(&mut h, vec![full_sync(fence(1, 1), 1, 1)]);
        assert_eq!(
            run(&mut h, epoch_ops(fence(1, 1), &page(1), 1, None)),
            ["commit 1", "ack 1"]
        );
    }
}

#[test]
fn awaiting_epoch_before_the_full_sync_is_nacked_and_its_pages_dropped() {
    let mut h = Harness::default();
    let (code, why) = nack_reason(&mut h, epoch_ops(fence(1, 1), &page(1), 1, None));
    assert_eq!(
        (code, why.as_str()),
        (NackCode::Malformed, "an epoch before the full sync")
    );
    assert!(matches!(h.machine.receiving(), Receiving::Idle));
}

#[test]
fn awaiting_pre_copy_and_its_end_are_refused() {
    let mut h = Harness::default();
    run(&mut h, round_ops(fence(1, 1), 0, &page(1)));
    assert_eq!(refused(&h).as_deref(), Some("pre-copy without a full sync"));
    let mut h = Harness::default();
    run(
        &mut h,
        vec![msg(Message::PreCopyEnd {
            fence: fence(1, 1),
            round: 0,
            ranges: 0,
            digest: [0; 32],
        })],
    );
    assert_eq!(
        refused(&h).as_deref(),
        Some("a pre-copy end without its round")
    );
}

#[test]
fn epoch_end_without_its_beginning_is_out_of_order() {
    for mut h in [Harness::default(), syncing(), protecting()] {
        let acts = run(
            &mut h,
            vec![msg(Message::EpochEnd {
                fence: fence(1, 2),
                ranges: 0,
                digest: [0; 32],
            })],
        );
        assert_eq!(acts, ["nack 2 OutOfOrder"]);
    }
}

#[test]
fn awaiting_or_syncing_primary_lost_or_silent_fails_with_nothing_to_take_over() {
    for op in [Op::Lost, Op::Silence] {
        for mut h in [Harness::default(), syncing()] {
            assert_eq!(run(&mut h, vec![op.clone()]), ["fail"]);
            assert!(matches!(h.machine.state(), State::Done(Ending::Failed)));
        }
    }
}

#[test]
fn goodbye_end_or_cancel_finishes_in_every_live_state() {
    for op in [msg(Message::Goodbye), Op::End, Op::Cancelled] {
        for mut h in [Harness::default(), syncing(), protecting()] {
            assert_eq!(run(&mut h, vec![op.clone()]), ["finish"]);
            assert!(matches!(h.machine.state(), State::Done(Ending::Finished)));
        }
    }
}

#[test]
fn heartbeats_and_unexpected_messages_do_nothing() {
    for mut h in [Harness::default(), syncing(), protecting()] {
        let ops = vec![
            msg(Message::Heartbeat { fence: fence(1, 1) }),
            msg(Message::Hello {
                version: 1,
                nonce: [0; 32],
                plaintext: false,
            }),
            msg(Message::Auth { proof: [0; 32] }),
            msg(Message::Ack { fence: fence(1, 1) }),
            msg(Message::Intent {
                intent: transport::Intent::Join,
            }),
        ];
        assert!(run(&mut h, ops).is_empty());
        assert!(h.machine.is_live());
    }
}

#[test]
fn pages_outside_an_epoch_are_ignored() {
    let mut h = syncing();
    assert!(run(&mut h, pages_ops(&page(1))).is_empty());
    assert_eq!(h.machine.counters().frames, 2);
}

// ---- Syncing ----

#[test]
fn syncing_verified_epoch_commits_acks_and_protects() {
    let h = protecting();
    assert!(
        matches!(h.machine.state(), State::Protecting { committed, .. } if *committed == fence(1, 1))
    );
    assert_eq!(h.machine.status().phase.as_deref(), Some("protecting"));
    assert_eq!(h.machine.status().committed_epoch, Some(1));
}

#[test]
fn syncing_damaged_epochs_are_nacked_and_change_nothing() {
    let mut h = syncing();
    // Wrong digest.
    let mut ops = epoch_ops(fence(1, 1), &page(1), 1, None);
    if let Some(Op::Message(Message::EpochEnd { digest, .. })) = ops.last_mut() {
        digest[3] ^= 1;
    }
    assert!(nack_reason(&mut h, ops).1.contains("digest"));
    // Truncated: the end promises a range that never came.
    let mut ops = epoch_ops(fence(1, 1), &page(1), 1, None);
    if let Some(Op::Message(Message::EpochEnd { ranges, .. })) = ops.last_mut() {
        *ranges += 1;
    }
    assert!(nack_reason(&mut h, ops).1.contains("truncated"));
    // Missing vCPU state (2 vCPUs would be needed: a second sync of 1 vCPU keeps the shape).
    let mut ops = epoch_ops(fence(1, 1), &page(1), 1, None);
    ops.retain(|o| !matches!(o, Op::Message(Message::DeviceState { name, .. }) if name.starts_with("vcpu/")));
    assert!(nack_reason(&mut h, ops).1.contains("no state for vCPU 0"));
    // The end of another epoch than began.
    let mut ops = epoch_ops(fence(1, 1), &page(1), 1, None);
    if let Some(Op::Message(Message::EpochEnd { fence: f, .. })) = ops.last_mut() {
        *f = fence(1, 2);
    }
    assert!(nack_reason(&mut h, ops).1.contains("began with"));
    assert_eq!(h.machine.counters().nacks, 4);
    assert!(h.machine.committed().is_none());
    assert!(matches!(h.machine.state(), State::Syncing { .. }));
}

#[test]
fn syncing_bad_pages_poison_the_epoch_and_later_frames_of_it_are_dropped() {
    let mut h = syncing();
    let outside = vec![(1u64 << 20, vec![1u8; 4096])];
    let mut ops = vec![msg(Message::EpochBegin {
        fence: fence(1, 1),
        pages: 2,
    })];
    ops.extend(pages_ops(&outside));
    ops.extend(pages_ops(&page(1)));
    run(&mut h, ops);
    assert!(matches!(h.machine.receiving(), Receiving::Poisoned { .. }));
    let acts = run(
        &mut h,
        vec![msg(Message::EpochEnd {
            fence: fence(1, 1),
            ranges: 2,
            digest: [0; 32],
        })],
    );
    assert_eq!(acts, ["nack 1 Malformed"]);
    // More pages than declared, and a broken records section, poison too.
    let mut ops = vec![msg(Message::EpochBegin {
        fence: fence(1, 1),
        pages: 0,
    })];
    ops.extend(pages_ops(&page(1)));
    run(&mut h, ops);
    assert!(matches!(h.machine.receiving(), Receiving::Poisoned { .. }));
    run(
        &mut h,
        vec![
            msg(Message::EpochBegin {
                fence: fence(1, 1),
                pages: 0,
            }),
            msg(Message::DeviceState {
                fence: fence(1, 1),
                name: "records/x".into(),
                version: 1,
                data: vec![],
            }),
        ],
    );
    assert!(matches!(h.machine.receiving(), Receiving::Poisoned { .. }));
    // An epoch declaring more pages than memory has is poisoned at its beginning.
    run(
        &mut h,
        vec![msg(Message::EpochBegin {
            fence: fence(1, 1),
            pages: 257,
        })],
    );
    assert!(matches!(h.machine.receiving(), Receiving::Poisoned { .. }));
}

#[test]
fn syncing_commit_refused_when_the_vm_cannot_be_built_keeps_the_pre_copy_image() {
    let mut h = syncing();
    run(&mut h, round_ops(fence(1, 1), 0, &page(9)));
    run(
        &mut h,
        vec![Op::Settings {
            lose_claims: false,
            fail_builds: true,
        }],
    );
    assert_eq!(
        run(&mut h, epoch_ops(fence(1, 1), &[], 1, None)),
        ["commit 1", "nack 1 Internal"]
    );
    assert!(
        matches!(h.machine.state(), State::Syncing { sync } if matches!(sync.precopy, PreCopy::Open(_)))
    );
    run(
        &mut h,
        vec![Op::Settings {
            lose_claims: false,
            fail_builds: false,
        }],
    );
    assert_eq!(
        run(&mut h, epoch_ops(fence(1, 1), &[], 1, None)),
        ["commit 1", "ack 1"]
    );
    // The pre-copied page went in with the commit.
    let mut b = [0u8; 4096];
    use vm_memory::Bytes;
    h.replica_mem()
        .read_slice(&mut b, vm_memory::GuestAddress(0x3000))
        .unwrap();
    assert_eq!(b, [9u8; 4096]);
}

#[test]
fn a_broken_replica_nacks_and_ends() {
    let mut m = Machine::new(None);
    m.on(Event::Message(Message::FullSync {
        fence: fence(1, 1),
        mem_bytes: 1 << 20,
        vcpus: 1,
    }));
    let mut acts = Vec::new();
    for op in epoch_ops(fence(1, 1), &[], 1, None) {
        if let Op::Message(msg) = op {
            acts.extend(m.on(Event::Message(msg)));
        }
    }
    assert!(matches!(acts.as_slice(), [Action::Commit { .. }]));
    let acts = m.on(Event::ReplicaFailed {
        fence: fence(1, 1),
        why: "boom".into(),
    });
    assert!(matches!(
        acts.as_slice(),
        [Action::Nack {
            code: NackCode::Internal,
            ..
        }]
    ));
    assert!(matches!(m.state(), State::Done(Ending::Failed)));
}

#[test]
fn commit_answers_that_were_not_asked_for_are_ignored() {
    let mut h = protecting();
    let m = &mut h.machine;
    assert!(m.on(Event::Committed { fence: fence(1, 2) }).is_empty());
    assert!(m
        .on(Event::CommitRefused {
            fence: fence(1, 2),
            why: "x".into(),
            base: None
        })
        .is_empty());
    assert!(m
        .on(Event::ReplicaFailed {
            fence: fence(1, 2),
            why: "x".into()
        })
        .is_empty());
    assert!(m
        .on(Event::Claimed {
            generation: 2,
            won: true
        })
        .is_empty());
    assert_eq!(m.committed(), Some(fence(1, 1)));
}

#[test]
fn syncing_pre_copy_rounds_verify_into_the_base_and_count() {
    let mut h = syncing();
    // Each verified round's end is sent back (the primary waits for the last one).
    assert_eq!(
        run(&mut h, round_ops(fence(1, 1), 0, &page(1))),
        ["round 0 done"]
    );
    assert_eq!(
        run(&mut h, round_ops(fence(1, 1), 1, &page(2))),
        ["round 1 done"]
    );
    assert_eq!(h.machine.counters().precopy_rounds, 2);
    assert_eq!(h.machine.counters().precopy_pages, 2);
    assert!(h
        .machine
        .status()
        .phase
        .unwrap()
        .contains("2 pre-copy rounds"));
    assert_eq!(
        run(&mut h, epoch_ops(fence(1, 1), &[], 1, None)),
        ["commit 1", "ack 1"]
    );
    use vm_memory::Bytes;
    let mut b = [0u8; 4096];
    h.replica_mem()
        .read_slice(&mut b, vm_memory::GuestAddress(0x3000))
        .unwrap();
    assert_eq!(b, [2u8; 4096]);
}

#[test]
fn syncing_pre_copy_round_out_of_order_breaks_the_sync() {
    let mut h = syncing();
    // A broken round's end is refused, with the reason.
    assert_eq!(
        run(&mut h, round_ops(fence(1, 1), 1, &page(1))),
        ["nack 1 Malformed"]
    );
    assert_eq!(refused(&h).as_deref(), Some("pre-copy round 1, expected 0"));
    let (code, why) = nack_reason(&mut h, epoch_ops(fence(1, 1), &[], 1, None));
    assert_eq!(
        (code, why.as_str()),
        (NackCode::Malformed, "pre-copy round 1, expected 0")
    );
}

#[test]
fn syncing_damaged_or_mismatched_pre_copy_end_breaks_the_sync() {
    let mut h = syncing();
    let mut ops = round_ops(fence(1, 1), 0, &page(1));
    if let Some(Op::Message(Message::PreCopyEnd { digest, .. })) = ops.last_mut() {
        digest[0] ^= 1;
    }
    run(&mut h, ops);
    assert!(refused(&h).unwrap().contains("digest"));
    assert_eq!(h.machine.counters().precopy_rounds, 0);

    let mut h = syncing();
    let mut ops = round_ops(fence(1, 1), 0, &page(1));
    if let Some(Op::Message(Message::PreCopyEnd { round, .. })) = ops.last_mut() {
        *round = 3;
    }
    run(&mut h, ops);
    assert_eq!(
        refused(&h).as_deref(),
        Some("pre-copy: epoch refused: pre-copy round 3 ends round 0")
    );
}

#[test]
fn syncing_state_inside_a_pre_copy_round_breaks_the_sync() {
    let mut h = syncing();
    let mut ops = round_ops(fence(1, 1), 0, &page(1));
    ops.insert(
        1,
        msg(Message::DeviceState {
            fence: fence(1, 1),
            name: "vcpu/0".into(),
            version: 1,
            data: vec![1],
        }),
    );
    run(&mut h, ops);
    assert!(refused(&h)
        .unwrap()
        .contains("state inside a pre-copy round"));
    assert_eq!(
        nack_reason(&mut h, epoch_ops(fence(1, 1), &[], 1, None)).0,
        NackCode::Malformed
    );
}

#[test]
fn syncing_epoch_inside_a_pre_copy_round_is_refused() {
    let mut h = syncing();
    let mut ops = round_ops(fence(1, 1), 0, &page(1));
    ops.pop();
    run(&mut h, ops);
    let (_, why) = nack_reason(&mut h, epoch_ops(fence(1, 1), &[], 1, None));
    assert_eq!(why, "an epoch began inside pre-copy round 0");
    assert!(h.machine.committed().is_none());
}

#[test]
fn pre_copy_inside_an_epoch_discards_the_epoch() {
    let mut h = syncing();
    let mut ops = epoch_ops(fence(1, 1), &page(1), 1, None);
    ops.truncate(2);
    run(&mut h, ops);
    run(&mut h, round_ops(fence(1, 1), 0, &page(2)));
    assert_eq!(h.machine.counters().partial_epochs_discarded, 1);
    assert_eq!(h.machine.counters().precopy_rounds, 1);
}

#[test]
fn a_new_epoch_begin_discards_the_partial_one() {
    let mut h = syncing();
    let mut ops = epoch_ops(fence(1, 1), &page(1), 1, None);
    ops.truncate(2);
    run(&mut h, ops);
    assert_eq!(
        run(&mut h, epoch_ops(fence(1, 1), &page(2), 1, None)),
        ["commit 1", "ack 1"]
    );
    assert_eq!(h.machine.counters().partial_epochs_discarded, 1);
}

#[test]
fn stale_generation_fences_are_nacked_stale_and_not_counted() {
    let mut h = Harness::default();
    run(&mut h, vec![full_sync(fence(3, 1), 1, 1)]);
    for m in [
        Message::EpochBegin {
            fence: fence(2, 1),
            pages: 0,
        },
        Message::Heartbeat { fence: fence(2, 1) },
        Message::FullSync {
            fence: fence(2, 1),
            mem_bytes: 1 << 20,
            vcpus: 1,
        },
        Message::PreCopy {
            fence: fence(2, 1),
            round: 0,
            pages: 0,
        },
    ] {
        assert_eq!(run(&mut h, vec![msg(m)]), ["nack 1 Stale"]);
    }
    assert_eq!(h.machine.counters().nacks, 0);
    assert!(matches!(h.machine.receiving(), Receiving::Idle));
    // Newer generations are fine.
    assert_eq!(
        run(&mut h, epoch_ops(fence(4, 1), &page(1), 1, None)),
        ["commit 1", "ack 1"]
    );
    // In Protecting too.
    assert_eq!(
        run(&mut h, vec![msg(Message::Heartbeat { fence: fence(1, 2) })]),
        ["nack 2 Stale"]
    );
}

#[test]
fn full_sync_of_another_shape_is_refused_in_syncing_and_protecting() {
    for mut h in [syncing(), protecting()] {
        run(&mut h, vec![full_sync(fence(1, 1), 2, 1)]);
        assert!(refused(&h).unwrap().contains("does not fit"));
        let next = h.machine.committed().map_or(1, |f| f.epoch.0 + 1);
        assert_eq!(
            nack_reason(&mut h, epoch_ops(fence(1, next), &[], 1, None)).0,
            NackCode::Malformed
        );
    }
}

#[test]
fn full_sync_again_with_the_same_shape_restarts_the_image() {
    let mut h = syncing();
    run(&mut h, round_ops(fence(1, 1), 0, &page(1)));
    run(&mut h, vec![full_sync(fence(2, 1), 1, 1)]);
    assert!(
        matches!(h.machine.state(), State::Syncing { sync } if sync.generation == 2
        && matches!(&sync.precopy, PreCopy::Open(b) if b.rounds == 0))
    );
    // Protecting: a re-sync by pre-copy onto the replica.
    let mut h = protecting();
    run(&mut h, vec![full_sync(fence(1, 1), 1, 1)]);
    run(&mut h, round_ops(fence(1, 2), 0, &page(5)));
    assert_eq!(
        run(&mut h, epoch_ops(fence(1, 2), &[], 1, None)),
        ["commit 2", "ack 2"]
    );
}

#[test]
fn connection_lost_mid_epoch_discards_it() {
    let mut h = protecting();
    let mut ops = epoch_ops(fence(1, 2), &page(1), 1, None);
    ops.truncate(3);
    run(&mut h, ops);
    assert_eq!(run(&mut h, vec![Op::Lost]), ["claim 2", "take over 2"]);
    assert_eq!(h.machine.counters().partial_epochs_discarded, 1);
    assert_eq!(h.replica.as_ref().unwrap().fence, fence(1, 1));
}

#[test]
fn silence_limit_is_patient_before_the_first_commit() {
    let i = std::time::Duration::from_millis(50);
    assert_eq!(
        syncing().machine.silence_limit(i),
        super::machine::FIRST_SYNC_PATIENCE
    );
    assert_eq!(protecting().machine.silence_limit(i), i * 4);
}

// ---- Protecting ----

#[test]
fn protecting_next_epoch_commits_with_its_output() {
    let mut h = protecting();
    let rec = postcard::to_stdvec(&vec![guest_abi::Record {
        seq: 1,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(
        run(&mut h, epoch_ops(fence(1, 2), &page(2), 1, Some(rec))),
        ["commit 2", "ack 2"]
    );
    assert_eq!(h.replica.as_ref().unwrap().inherited_output(1)[0].len(), 1);
}

#[test]
fn protecting_out_of_order_epochs_are_nacked() {
    let mut h = protecting();
    for e in [1, 3, 0] {
        let (code, why) = nack_reason(&mut h, epoch_ops(fence(1, e), &page(2), 1, None));
        assert_eq!(code, NackCode::Malformed);
        assert_eq!(why, format!("epoch {e} out of order (expected 2)"));
    }
    assert_eq!(h.machine.committed(), Some(fence(1, 1)));
}

#[test]
fn protecting_lost_claims_and_takes_over_or_stands_down() {
    let mut h = protecting();
    assert_eq!(run(&mut h, vec![Op::Lost]), ["claim 2", "take over 2"]);
    assert!(matches!(
        h.machine.state(),
        State::Done(Ending::TookOver { generation: 2 })
    ));

    let mut h = protecting();
    run(
        &mut h,
        vec![Op::Settings {
            lose_claims: true,
            fail_builds: false,
        }],
    );
    assert_eq!(run(&mut h, vec![Op::Silence]), ["claim 2", "stand down"]);
    assert!(matches!(h.machine.state(), State::Done(Ending::StoodDown)));
}

#[test]
fn protecting_without_an_arbiter_takes_over_at_once() {
    let mut h = Harness::new(None);
    run(&mut h, vec![full_sync(fence(5, 1), 1, 1)]);
    run(&mut h, epoch_ops(fence(5, 1), &page(1), 1, None));
    assert_eq!(run(&mut h, vec![Op::Silence]), ["take over 6"]);
}

#[test]
fn protecting_pre_copy_after_the_image_was_spent_breaks_the_sync() {
    let mut h = protecting();
    run(&mut h, round_ops(fence(1, 2), 0, &page(1)));
    assert_eq!(refused(&h).as_deref(), Some("pre-copy without a full sync"));
    assert_eq!(
        nack_reason(&mut h, epoch_ops(fence(1, 2), &[], 1, None)).0,
        NackCode::Malformed
    );
}

#[test]
fn protecting_switch_at_the_committed_epoch_claims_confirms_and_takes_over() {
    let mut h = protecting();
    let switch = msg(Message::Switch { fence: fence(1, 1) });
    assert_eq!(
        run(&mut h, vec![switch]),
        ["claim 2", "confirm switch 1 as 2", "take over 2"]
    );
    assert!(matches!(
        h.machine.state(),
        State::Done(Ending::TookOver { generation: 2 })
    ));
    // Without an arbiter the confirmation comes at once.
    let mut h = Harness::new(None);
    run(&mut h, vec![full_sync(fence(5, 1), 1, 1)]);
    run(&mut h, epoch_ops(fence(5, 1), &page(1), 1, None));
    assert_eq!(
        run(&mut h, vec![msg(Message::Switch { fence: fence(5, 1) })]),
        ["confirm switch 1 as 6", "take over 6"]
    );
}

#[test]
fn protecting_switch_whose_claim_is_lost_is_refused_and_stands_down() {
    let mut h = protecting();
    run(
        &mut h,
        vec![Op::Settings {
            lose_claims: true,
            fail_builds: false,
        }],
    );
    assert_eq!(
        run(&mut h, vec![msg(Message::Switch { fence: fence(1, 1) })]),
        ["claim 2", "nack 1 Stale", "stand down"]
    );
}

#[test]
fn a_switch_elsewhere_than_the_committed_epoch_is_refused_and_changes_nothing() {
    // Before any commit, at another epoch, inside an epoch being received.
    let mut h = syncing();
    assert_eq!(
        nack_reason(&mut h, vec![msg(Message::Switch { fence: fence(1, 1) })]).0,
        NackCode::OutOfOrder
    );
    let mut h = protecting();
    let (code, why) = nack_reason(&mut h, vec![msg(Message::Switch { fence: fence(1, 2) })]);
    assert_eq!(code, NackCode::OutOfOrder);
    assert!(why.contains("committed epoch 1"), "{why}");
    let mut h = protecting();
    run(
        &mut h,
        vec![msg(Message::EpochBegin {
            fence: fence(1, 2),
            pages: 1,
        })],
    );
    assert_eq!(
        nack_reason(&mut h, vec![msg(Message::Switch { fence: fence(1, 1) })]).0,
        NackCode::OutOfOrder
    );
    assert!(matches!(h.machine.state(), State::Protecting { .. }));
    assert_eq!(h.machine.committed(), Some(fence(1, 1)));
}

// ---- Claiming, Done ----

#[test]
fn claiming_ignores_frames_and_answers_for_other_generations() {
    let mut h2 = protecting();
    let acts = h2.machine.on(Event::Lost("x".into()));
    assert!(matches!(acts.as_slice(), [Action::Claim { generation: 2 }]));
    assert!(matches!(
        h2.machine.state(),
        State::Claiming { generation: 2, .. }
    ));
    assert!(h2.machine.on(Event::Message(Message::Goodbye)).is_empty());
    assert!(h2.machine.on(Event::Silence { ms: 1 }).is_empty());
    assert!(h2
        .machine
        .on(Event::Claimed {
            generation: 3,
            won: true
        })
        .is_empty());
    let acts = h2.machine.on(Event::Claimed {
        generation: 2,
        won: true,
    });
    assert!(matches!(
        acts.as_slice(),
        [Action::TakeOver { generation: 2, .. }]
    ));
}

#[test]
fn messages_after_goodbye_or_takeover_do_nothing() {
    for end in [msg(Message::Goodbye), Op::Lost] {
        let mut h = protecting();
        run(&mut h, vec![end]);
        assert!(!h.machine.is_live());
        let frames = h.machine.counters().frames;
        let mut ops = vec![full_sync(fence(1, 1), 1, 1)];
        ops.extend(epoch_ops(fence(1, 2), &page(3), 1, None));
        ops.extend([Op::Lost, Op::Silence, Op::End, msg(Message::Goodbye)]);
        assert!(run(&mut h, ops).is_empty());
        assert_eq!(h.machine.counters().frames, frames);
        assert_eq!(h.machine.committed(), Some(fence(1, 1)));
    }
}

// ---- Scripts ----

#[test]
fn scripts_round_trip_and_seeds_run_to_their_ends() {
    for (name, ops) in seeds() {
        let bytes = encode_script(&ops);
        assert_eq!(decode_script(&bytes).len(), ops.len(), "{name}");
        let mut h = Harness::default();
        h.run(decode_script(&bytes));
        let want = match name {
            "protect" => Ending::Finished,
            "failover" | "sealed" => Ending::TookOver { generation: 2 },
            "stand-down" => Ending::StoodDown,
            "precopy" => Ending::Finished,
            "refused-then-good" => Ending::Finished,
            "stale-and-early" => Ending::Failed,
            other => panic!("no expectation for {other}"),
        };
        assert!(
            matches!(h.machine.state(), State::Done(e) if *e == want),
            "{name}: {:?}",
            h.machine.state()
        );
        super::harness::fuzz(&bytes);
    }
    assert_eq!(digest(&[]), checkpoint::digest::pages_digest(&[]));
}

#[test]
fn fuzz_garbage_never_panics() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let seeds: Vec<Vec<u8>> = seeds()
        .into_iter()
        .map(|(_, o)| encode_script(&o))
        .collect();
    for i in 0..3000 {
        let mut b = seeds[i % seeds.len()].clone();
        for _ in 0..rng.gen_range(1..8) {
            let at = rng.gen_range(0..b.len());
            match rng.gen_range(0..3) {
                0 => b[at] = rng.gen(),
                1 => {
                    b.remove(at);
                }
                _ => b.insert(at, rng.gen()),
            }
        }
        super::harness::fuzz(&b);
    }
}

/// Prints a fuzz artifact's script: `SCRIPT=path cargo test -p ft --lib print_script --
/// --ignored --nocapture`.
#[test]
#[ignore]
fn print_script() {
    let b = std::fs::read(std::env::var("SCRIPT").unwrap()).unwrap();
    for op in decode_script(&b) {
        let s = format!("{op:?}");
        println!("{}", &s[..s.len().min(300)]);
    }
}

/// What `tandem standby` prints at its end keeps the keys of the old `json!` output, for every
/// way a standby ends, and reads back as the same [`EndReport`].
#[test]
fn end_reports_keep_their_layouts_and_read_back() {
    use super::{FailoverReport, StandbyOutcome};
    use crate::status::{EndReport, Role};
    use std::collections::BTreeSet;

    let keys = |e: &EndReport| -> BTreeSet<String> {
        let v = serde_json::to_value(e).unwrap();
        v.as_object().unwrap().keys().cloned().collect()
    };
    let set = |k: &[&str]| -> BTreeSet<String> { k.iter().map(|s| s.to_string()).collect() };
    let stats = protecting().machine.status();
    let report = vmx::RunReport {
        digest: devices::DigestReport {
            vcpus: vec![(3, "ab".into(), None)],
            total: "cd".into(),
        },
        wall_ms: 12.5,
        vcpus: vec![],
        heartbeat: Default::default(),
    };
    let failover = FailoverReport {
        reason: "silence".into(),
        silence_ms: 200.0,
        activation_ms: 4.5,
        resumed_unix_ms: 1.0e12,
        generation: 2,
        from_epoch: 1,
        inherited_released: 7,
        ..Default::default()
    };
    let cases = [
        (
            StandbyOutcome::PrimaryFinished {
                commits: 1,
                stats: stats.clone(),
            },
            set(&["role", "took_over", "commits", "stats"]),
        ),
        (
            StandbyOutcome::StoodDown {
                reason: "the primary won generation 2".into(),
                stats: stats.clone(),
            },
            set(&["role", "took_over", "stood_down", "stats"]),
        ),
        (
            StandbyOutcome::TookOver {
                failover: failover.clone(),
                outcome: Box::new(vmx::Outcome::Finished(report.clone())),
                stats: Box::new(stats.clone()),
                primary: Box::new(stats.clone()),
            },
            set(&[
                "role",
                "took_over",
                "failover",
                "replication",
                "ft",
                "report",
            ]),
        ),
        (
            StandbyOutcome::TookOver {
                failover,
                outcome: Box::new(vmx::Outcome::Suspended {
                    path: "/tmp/s".into(),
                    report,
                }),
                stats: Box::new(stats.clone()),
                primary: Box::new(stats),
            },
            set(&[
                "role",
                "took_over",
                "failover",
                "replication",
                "ft",
                "report",
            ]),
        ),
    ];
    for (outcome, want) in cases {
        let e = outcome.end_report();
        assert_eq!(e.role, Role::Standby);
        assert_eq!(keys(&e), want, "{e}");
        let text = serde_json::to_string_pretty(&e).unwrap();
        let back: EndReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, e);
        assert_eq!(
            back.took_over,
            Some(matches!(outcome, StandbyOutcome::TookOver { .. }))
        );
        if let StandbyOutcome::TookOver { outcome: o, .. } = &outcome {
            let v = serde_json::to_value(&e).unwrap();
            match o.as_ref() {
                // A finished takeover's report is the run report; a suspended one says where.
                vmx::Outcome::Finished(_) => {
                    assert_eq!(back.run_report().unwrap().digest.total, "cd");
                    assert!(v["report"].get("digest").is_some());
                }
                vmx::Outcome::Suspended { .. } => {
                    assert!(back.run_report().is_none());
                    assert_eq!(v["report"], serde_json::json!({"suspended": "/tmp/s"}));
                }
                vmx::Outcome::Moved { .. } => unreachable!("no such case here"),
            }
        }
    }
}
