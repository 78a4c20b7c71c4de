//! Unit tests of the host core, driven input by input: what it asks for and
//! in which order (journal before acting, durable before answering), and
//! the decisions that used to live in the agent.

use prost::Message;

use super::*;
use crate::hypervisor::{Guest, GuestState};
use crate::protocol::bounds;
use crate::protocol::cookies;
use crate::protocol::destination;
use crate::protocol::{FeatureSpec, Mode, Outcome, VmSpec};

const A: &str = "hv-a";
const B: &str = "hv-b";

fn config(name: &str) -> Config {
    Config {
        name: name.into(),
        hosts: vec![A.into(), B.into(), "hv-c".into()],
        migration_hosts: [A, B, "hv-c"]
            .into_iter()
            .map(|h| (h.to_string(), h.to_string()))
            .collect(),
        features: [("port-profile".to_string(), "port-profile".to_string())]
            .into_iter()
            .collect(),
        verifying: Default::default(),
        capacity: HostCapacity {
            memory_mib: 65_536,
            vcpus: 64,
        },
        timing: Timing::default(),
        deadlines: Deadlines::default(),
        max_outgoing: 2,
        max_incoming: 2,
        rollback_retry_ms: 1_000,
        id_salt: 7,
        retention: Retention::default(),
        postcopy: Ok(()),
    }
}

fn vm(name: &str, features: &[(&str, bool)]) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_mib: 1024,
        vcpus: 1,
        dirty_rate_mib_s: 0,
        features: features
            .iter()
            .map(|(f, required)| FeatureSpec {
                name: f.to_string(),
                driver: String::new(),
                required: *required,
            })
            .collect(),
        qemu: None,
    }
}

fn running(spec: &VmSpec) -> Guest {
    Guest {
        spec: spec.clone(),
        state: GuestState::Running,
    }
}

/// One host core and what it said, with the clock in the test's hands.
struct Host {
    core: HostCore,
    now: Millis,
    next_req: ReqId,
    log: Vec<Action>,
}

impl Host {
    fn new(name: &str) -> Host {
        Host::with(config(name))
    }

    fn with(config: Config) -> Host {
        let mut core = HostCore::new(config);
        let log = core.recover(1_000, JournalImage::default());
        Host {
            core,
            now: 1_000,
            next_req: 0,
            log,
        }
    }

    fn input(&mut self, input: Input) -> Vec<Action> {
        let actions = self.core.handle(self.now, input);
        self.log.extend(actions.clone());
        actions
    }

    fn request(&mut self, request: Request) -> (ReqId, Vec<Action>) {
        self.next_req += 1;
        let req = self.next_req;
        (req, self.input(Input::Request { req, request }))
    }

    fn at(&mut self, ms: Millis) -> &mut Host {
        self.now = ms;
        self
    }

    fn timer(&mut self) -> Vec<Action> {
        self.input(Input::Timer)
    }

    fn op_done(&mut self, op: OpId, result: Result<OpOutput, OpError>) -> Vec<Action> {
        self.input(Input::OpDone { op, result })
    }

    /// The destination attempt as this host last journaled it.
    fn last_journaled_destination(&self) -> crate::protocol::destination::DestinationAttempt {
        self.log
            .iter()
            .rev()
            .find_map(|x| match x {
                Action::Journal {
                    entry: Entry::Destination(d),
                    ..
                } => Some((**d).clone()),
                _ => None,
            })
            .expect("a destination attempt is journaled")
    }
}

/// The op the actions ask for that matches.
fn op_of(actions: &[Action], matches: impl Fn(&Op) -> bool) -> Option<OpId> {
    actions.iter().find_map(|a| match a {
        Action::Run { op, what } if matches(what) => Some(*op),
        _ => None,
    })
}

fn reply_to(actions: &[Action], req: ReqId) -> Option<&Reply> {
    actions.iter().find_map(|a| match a {
        Action::Reply { req: r, reply } if *r == req => Some(reply),
        _ => None,
    })
}

fn position(actions: &[Action], matches: impl Fn(&Action) -> bool) -> Option<usize> {
    actions.iter().position(matches)
}

fn prepare_call(spec: &VmSpec, attempt: &str, mode: Mode) -> Request {
    let (migration, _) = attempt.split_once('.').expect("an attempt id");
    let c1 = cookies::cookie1(attempt, migration, A, spec, mode);
    Request::Peer {
        call: PeerCall::Prepare(proto::PrepareRequest {
            cookie1: c1.encode_to_vec(),
        }),
        guests: Vec::new(),
        from: Some(A.into()),
    }
}

fn abort_call(attempt: &str) -> Request {
    Request::Peer {
        call: PeerCall::Abort(proto::PeerAbortRequest {
            attempt_id: attempt.into(),
            reason: "aborted by the operator".into(),
            from_host: A.into(),
            cookie4: Vec::new(),
            cause: String::new(),
        }),
        guests: Vec::new(),
        from: Some(A.into()),
    }
}

fn resolve_call(attempt: &str) -> Request {
    Request::Peer {
        call: PeerCall::Resolve(proto::ResolveRequest {
            attempt_id: attempt.into(),
        }),
        guests: Vec::new(),
        from: Some(A.into()),
    }
}

fn heartbeat_call(attempt: &str) -> Request {
    Request::Peer {
        call: PeerCall::Heartbeat(proto::HeartbeatRequest {
            from_host: A.into(),
            attempt_ids: vec![attempt.into()],
        }),
        guests: Vec::new(),
        from: Some(A.into()),
    }
}

fn finish_call(attempt: &str) -> Request {
    let c3 = proto::Cookie3 {
        protocol_version: crate::protocol::PROTOCOL_VERSION,
        attempt_id: attempt.into(),
        status: proto::TransferStatus::Completed as i32,
        stats: None,
    };
    Request::Peer {
        call: PeerCall::Finish(proto::FinishRequest {
            cookie3: c3.encode_to_vec(),
        }),
        guests: Vec::new(),
        from: Some(A.into()),
    }
}

/// A destination with attempt `m-1.1` of a VM without features prepared:
/// (host, the Prepare request's id).
fn prepared_destination() -> (Host, ReqId) {
    let mut b = Host::new(B);
    let spec = vm("web-01", &[]);
    let (req, actions) = b.request(prepare_call(&spec, "m-000000000001.1", Mode::Safe));
    let start = op_of(&actions, |o| matches!(o, Op::StartIncoming { .. })).expect("a start");
    let actions = b.op_done(start, Ok(OpOutput::Address("sim://hv-b/m-1.1".into())));
    assert!(
        matches!(
            reply_to(&actions, req),
            Some(Ok(Response::Peer(PeerResponse::Prepare(_))))
        ),
        "C2 once the guest started: {actions:?}"
    );
    (b, req)
}

/// Drive a prepared destination through Finish up to its commit: the
/// actions of the last step (the resume is asked for) and Finish's request id.
fn finishing(b: &mut Host) -> (ReqId, Vec<Action>) {
    let (req, actions) = b.request(finish_call("m-000000000001.1"));
    let complete = op_of(&actions, |o| matches!(o, Op::CompleteIncoming { .. }))
        .expect("waits for the transfer");
    let actions = b.op_done(complete, Ok(OpOutput::Done));
    (req, actions)
}

#[test]
fn an_abort_right_after_prepare_finds_the_attempt_registered() {
    let mut b = Host::new(B);
    let spec = vm("web-01", &[]);
    // Prepare was admitted and registered in the same step: no gap where
    // an abort would be answered "not known here" and then be too late.
    let (_, _) = b.request(prepare_call(&spec, "m-000000000001.1", Mode::Safe));
    let (req, actions) = b.request(abort_call("m-000000000001.1"));
    assert!(
        !matches!(reply_to(&actions, req), Some(Ok(Response::Peer(PeerResponse::Abort(r)))) if r.detail == "not known here"),
        "{actions:?}"
    );
    assert!(
        b.core.is_live("m-000000000001.1"),
        "it rolls back once the start answers"
    );
}

#[test]
fn heartbeats_heard_while_the_incoming_guest_starts_keep_the_source_alive() {
    let mut b = Host::new(B);
    let spec = vm("web-01", &[]);
    let (_, actions) = b.request(prepare_call(&spec, "m-000000000001.1", Mode::Safe));
    let start = op_of(&actions, |o| matches!(o, Op::StartIncoming { .. })).expect("a start");
    // QEMU takes 15 s to start; the source heartbeats every second.
    for t in (2_000..=16_000).step_by(1_000) {
        b.at(t).request(heartbeat_call("m-000000000001.1"));
        let actions = b.timer();
        assert!(
            !actions.iter().any(|a| matches!(
                a,
                Action::Call {
                    request: PeerCall::Abort(_),
                    ..
                }
            )),
            "declared the source lost at {t} ms although it heard from it: {actions:?}"
        );
    }
    b.at(16_500)
        .op_done(start, Ok(OpOutput::Address("sim://hv-b/m-1.1".into())));
    assert!(b.core.is_live("m-000000000001.1"));
    assert_eq!(
        b.core.answer("m-000000000001.1"),
        Some(destination::Answer::Pending)
    );
}

#[test]
fn a_silent_source_is_declared_lost_after_the_peer_timeout() {
    let (mut b, _) = prepared_destination();
    let actions = b.at(1_000 + 5_000 - 1).timer();
    assert!(actions.is_empty(), "not before the timeout: {actions:?}");
    let actions = b.at(1_000 + 5_000).timer();
    let kill = op_of(&actions, |o| matches!(o, Op::Kill { .. })).expect("the incoming guest goes");
    let actions = b.op_done(kill, Ok(OpOutput::Done));
    assert!(
        actions.iter().any(
            |a| matches!(a, Action::Call { request: PeerCall::Abort(_), peer, .. } if peer == A)
        ),
        "the source is told the destination gave up: {actions:?}"
    );
}

#[test]
fn the_commit_is_durable_before_the_resume_and_answered_only_after_it() {
    let (mut b, _) = prepared_destination();
    let (finish, actions) = finishing(&mut b);
    let commit = position(&actions, |a| {
        matches!(a, Action::Journal { entry: Entry::Destination(d), durable: true } if d.is_committed())
    })
    .expect("the commit is journaled durably");
    let resume = position(&actions, |a| {
        matches!(
            a,
            Action::Run {
                what: Op::Resume { .. },
                ..
            }
        )
    })
    .expect("then the guest is resumed");
    assert!(commit < resume, "{actions:?}");
    assert!(
        reply_to(&actions, finish).is_none(),
        "nobody hears \"committed\" before the CPUs run: {actions:?}"
    );
    assert_eq!(
        b.core.answer("m-000000000001.1"),
        Some(destination::Answer::Pending)
    );
    let op = op_of(&actions, |o| matches!(o, Op::Resume { .. })).expect("a resume");
    let actions = b.op_done(op, Ok(OpOutput::Done));
    let Some(Ok(Response::Peer(PeerResponse::Finish(r)))) = reply_to(&actions, finish) else {
        panic!("Finish answered once the guest runs: {actions:?}");
    };
    let c4 = cookies::decode::<proto::Cookie4>("C4", &r.cookie4).expect("a C4");
    assert!(c4.committed && !c4.lost);
}

#[test]
fn a_failed_resume_at_the_commit_kills_the_copy_and_answers_not_committed() {
    let (mut b, _) = prepared_destination();
    let (finish, actions) = finishing(&mut b);
    let op = op_of(&actions, |o| matches!(o, Op::Resume { .. })).expect("a resume");
    let actions = b.op_done(op, Err(OpError::Failed("QEMU: cont failed".into())));
    assert!(
        reply_to(&actions, finish).is_none(),
        "not before the copy is gone"
    );
    let kill = op_of(&actions, |o| matches!(o, Op::Kill { .. })).expect("the copy is killed");
    let actions = b.op_done(kill, Ok(OpOutput::Done));
    let never = position(&actions, |a| {
        matches!(a, Action::Journal { entry: Entry::Destination(d), durable: true } if d.decided_not_to_commit())
    })
    .expect("\"never commits\" is journaled durably");
    let answer = position(
        &actions,
        |a| matches!(a, Action::Reply { req, .. } if *req == finish),
    )
    .expect("then Finish is answered");
    assert!(never < answer, "{actions:?}");
    let Some(Ok(Response::Peer(PeerResponse::Finish(r)))) = reply_to(&actions, finish) else {
        unreachable!()
    };
    let c4 = cookies::decode::<proto::Cookie4>("C4", &r.cookie4).expect("a C4");
    assert!(!c4.committed, "the source must resume its own copy");
    assert!(c4.error.contains("cont failed"), "{}", c4.error);
}

#[test]
fn a_resume_that_never_answers_ends_in_a_decision_at_its_deadline() {
    let (mut b, _) = prepared_destination();
    let (finish, actions) = finishing(&mut b);
    let resume = op_of(&actions, |o| matches!(o, Op::Resume { .. })).expect("a resume");
    let deadline = b.core.poll_timeout().expect("the resume has a deadline");
    assert!(deadline <= b.now + Deadlines::default().guest_op_ms);
    let actions = b.at(deadline).timer();
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Cancel { op } if *op == resume)),
        "the call is given up on: {actions:?}"
    );
    let status = op_of(&actions, |o| matches!(o, Op::Status { .. })).expect("asks whether it runs");
    let actions = b.op_done(status, Ok(OpOutput::Status(Some(GuestState::Incoming))));
    let kill = op_of(&actions, |o| matches!(o, Op::Kill { .. })).expect("a stopped copy is killed");
    let actions = b.op_done(kill, Ok(OpOutput::Done));
    assert!(matches!(
        reply_to(&actions, finish),
        Some(Ok(Response::Peer(PeerResponse::Finish(_))))
    ));
    assert_eq!(
        b.core.answer("m-000000000001.1"),
        Some(destination::Answer::NotCommitted)
    );
    // A late answer to the call given up on changes nothing.
    assert!(b.op_done(resume, Ok(OpOutput::Done)).is_empty());
}

#[test]
fn a_commit_whose_guest_is_gone_is_lost_not_committed() {
    let (mut b, _) = prepared_destination();
    let (_, actions) = finishing(&mut b);
    let deadline = b.core.poll_timeout().expect("a deadline");
    let _ = actions;
    let actions = b.at(deadline).timer();
    let status = op_of(&actions, |o| matches!(o, Op::Status { .. })).expect("a status");
    b.op_done(status, Ok(OpOutput::Status(None)));
    assert_eq!(
        b.core.answer("m-000000000001.1"),
        Some(destination::Answer::Lost)
    );
}

#[test]
fn not_committed_leaves_only_after_the_decision_is_durable() {
    let (mut b, _) = prepared_destination();
    let (req, actions) = b.request(resolve_call("m-000000000001.1"));
    let durable = position(&actions, |a| {
        matches!(a, Action::Journal { durable: true, .. })
    })
    .expect("the decision is journaled durably");
    let answer = position(
        &actions,
        |a| matches!(a, Action::Reply { req: r, .. } if *r == req),
    )
    .expect("then answered");
    assert!(durable < answer, "{actions:?}");
}

#[test]
fn an_unknown_attempt_is_tombstoned_durably_before_the_answer() {
    let mut b = Host::new(B);
    let (req, actions) = b.request(resolve_call("m-000000000009.1"));
    let tombstone = position(&actions, |a| {
        matches!(a, Action::Journal { entry: Entry::Tombstone(id), durable: true } if id == "m-000000000009.1")
    })
    .expect("a durable tombstone");
    let answer = position(
        &actions,
        |a| matches!(a, Action::Reply { req: r, .. } if *r == req),
    )
    .expect("an answer");
    assert!(tombstone < answer);
    // And the late Prepare of it is refused.
    let (req, actions) = b.request(prepare_call(
        &vm("web-01", &[]),
        "m-000000000009.1",
        Mode::Safe,
    ));
    assert!(
        matches!(reply_to(&actions, req), Some(Err(Refusal::FailedPrecondition(m))) if m.contains("aborted")),
        "{actions:?}"
    );
}

#[test]
fn a_destination_at_its_limit_refuses_as_busy() {
    let mut b = Host::new(B);
    for i in 0..2 {
        let spec = vm(&format!("web-0{i}"), &[]);
        b.request(prepare_call(&spec, &format!("m-{i:012x}.1"), Mode::Safe));
    }
    let (req, actions) = b.request(prepare_call(
        &vm("web-09", &[]),
        "m-000000000009.1",
        Mode::Safe,
    ));
    assert!(
        matches!(reply_to(&actions, req), Some(Err(Refusal::Busy(m))) if m.contains("max_incoming = 2")),
        "{actions:?}"
    );
}

#[test]
fn a_stage_that_never_answers_fails_at_its_deadline_and_is_undone() {
    // A stage deadline shorter than the peer timeout, so it fires first.
    let mut b = Host::with(Config {
        deadlines: Deadlines {
            stage_ms: 2_000,
            ..Deadlines::default()
        },
        ..config(B)
    });
    let spec = vm("web-01", &[("port-profile", true)]);
    let (req, actions) = b.request(prepare_call(&spec, "m-000000000001.1", Mode::Safe));
    let start = op_of(&actions, |o| matches!(o, Op::StartIncoming { .. })).expect("a start");
    let actions = b.op_done(start, Ok(OpOutput::Address("sim://hv-b/m-1.1".into())));
    let stage = op_of(
        &actions,
        |o| matches!(o, Op::Stage(c) if c.stage == Stage::Prepare),
    )
    .expect("the prepare stage");
    let deadline = b.core.poll_timeout().expect("the stage has a deadline");
    let actions = b.at(deadline).timer();
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Cancel { op } if *op == stage))
    );
    let kill = op_of(&actions, |o| matches!(o, Op::Kill { .. })).expect("the guest goes");
    let actions = b.op_done(kill, Ok(OpOutput::Done));
    assert!(
        op_of(
            &actions,
            |o| matches!(o, Op::Stage(c) if c.stage == Stage::Rollback)
        )
        .is_some(),
        "the stage whose effect is unknown is undone: {actions:?}"
    );
    let _ = req;
}

/// The NICs of the rollback stage the actions run, if they run one.
fn rollback_nics(actions: &[Action]) -> Option<Vec<String>> {
    actions.iter().find_map(|a| match a {
        Action::Run {
            what: Op::Stage(ctx),
            ..
        } if ctx.stage == Stage::Rollback => Some(ctx.nics.iter().map(|n| n.mac.clone()).collect()),
        _ => None,
    })
}

/// A rollback left pending is retried with the NICs its attempt carried
/// (a vdp driver withdraws their VSIs by them), and so after a restart,
/// from the journaled attempt — not with none, as it was.
#[test]
fn a_pending_rollback_is_retried_with_its_attempts_nics_before_and_after_a_restart() {
    let mut b = Host::with(Config {
        deadlines: Deadlines {
            stage_ms: 2_000,
            ..Deadlines::default()
        },
        ..config(B)
    });
    let mut spec = vm("web-01", &[("port-profile", true)]);
    spec.qemu = Some(crate::protocol::QemuMachine {
        kernel: "tern-guest.elf".into(),
        nics: vec![crate::protocol::machine::Nic {
            mac: "52:54:00:12:34:56".into(),
            network: "lan".into(),
            vlan: None,
            vsi: None,
        }],
        ..Default::default()
    });
    let (_, actions) = b.request(prepare_call(&spec, "m-000000000001.1", Mode::Safe));
    let start = op_of(&actions, |o| matches!(o, Op::StartIncoming { .. }))
        .unwrap_or_else(|| panic!("{actions:?}"));
    b.op_done(start, Ok(OpOutput::Address("sim://hv-b/m-1.1".into())));
    // The prepare stage never answers: it is undone, and its rollback fails.
    let deadline = b.core.poll_timeout().expect("the stage has a deadline");
    let actions = b.at(deadline).timer();
    let kill = op_of(&actions, |o| matches!(o, Op::Kill { .. })).expect("the guest goes");
    let actions = b.op_done(kill, Ok(OpOutput::Done));
    assert_eq!(
        rollback_nics(&actions).as_deref(),
        Some(&["52:54:00:12:34:56".to_string()][..])
    );
    let rollback = op_of(
        &actions,
        |o| matches!(o, Op::Stage(c) if c.stage == Stage::Rollback),
    )
    .unwrap();
    b.op_done(
        rollback,
        Err(OpError::Failed("lldpad did not answer".into())),
    );
    let pending = b.core.pending().next().cloned().expect("left pending");
    // Retried here: with the NICs.
    let retry_at = pending.next_try_ms;
    let actions = b.at(retry_at).timer();
    assert_eq!(
        rollback_nics(&actions).as_deref(),
        Some(&["52:54:00:12:34:56".to_string()][..]),
        "{actions:?}"
    );
    // After a restart, from what the journal holds.
    let attempt = b.last_journaled_destination();
    let mut core = HostCore::new(config(B));
    core.recover(
        retry_at,
        JournalImage {
            destinations: vec![attempt],
            pending: vec![pending],
            ..Default::default()
        },
    );
    let actions = core.handle(retry_at + 60_000, Input::Timer);
    assert_eq!(
        rollback_nics(&actions).as_deref(),
        Some(&["52:54:00:12:34:56".to_string()][..]),
        "{actions:?}"
    );
}

/// A source with `spec` migrating to hv-b, driven up to Finish sent:
/// (host, Finish's call, the attempt id). hv-b accepts and prepares nothing.
fn source_past_finish(spec: &VmSpec, mode: Mode) -> (Host, CallId, String) {
    let mut a = Host::new(A);
    let (_, actions) = a.request(Request::StartMigration {
        vm: spec.name.clone(),
        destination: B.into(),
        mode,
        completion: Default::default(),
        guests: vec![running(spec)],
    });
    let prepare = call_of(&actions, |r| matches!(r, PeerCall::Prepare(_))).expect("Prepare");
    let attempt = a.core.migrations().next().unwrap().attempt_id.clone();
    let c2 = proto::Cookie2 {
        protocol_version: crate::protocol::PROTOCOL_VERSION,
        attempt_id: attempt.clone(),
        incoming_address: "sim://hv-b/x".into(),
        accepted: true,
        ..Default::default()
    };
    let actions = a.input(Input::PeerReplied {
        call: prepare,
        reply: Ok(PeerResponse::Prepare(proto::PrepareReply {
            cookie2: c2.encode_to_vec(),
        })),
    });
    let transfer = op_of(&actions, |o| matches!(o, Op::TransferOut { .. })).expect("a transfer");
    let actions = a.op_done(transfer, Ok(OpOutput::Transferred(Default::default())));
    let finish = call_of(&actions, |r| matches!(r, PeerCall::Finish(_))).expect("Finish");
    (a, finish, attempt)
}

/// hv-b's answer to Finish: it committed.
fn committed(a: &mut Host, finish: CallId, attempt: &str) -> Vec<Action> {
    let c4 = proto::Cookie4 {
        protocol_version: crate::protocol::PROTOCOL_VERSION,
        attempt_id: attempt.into(),
        committed: true,
        ..Default::default()
    };
    a.input(Input::PeerReplied {
        call: finish,
        reply: Ok(PeerResponse::Finish(proto::FinishReply {
            cookie4: c4.encode_to_vec(),
        })),
    })
}

/// The call the actions make that matches.
fn call_of(actions: &[Action], matches: impl Fn(&PeerCall) -> bool) -> Option<CallId> {
    actions.iter().find_map(|a| match a {
        Action::Call { call, request, .. } if matches(request) => Some(*call),
        _ => None,
    })
}

#[test]
fn a_release_with_no_driver_here_has_nothing_to_undo() {
    // Fast mode: nothing is mandatory, so hv-b took a VM with a feature
    // neither host has a driver for.
    let (mut a, finish, attempt) =
        source_past_finish(&vm("web-01", &[("vtpm", false)]), Mode::Fast);
    let actions = committed(&mut a, finish, &attempt);
    let kill = op_of(&actions, |o| matches!(o, Op::Kill { .. })).expect("the old copy goes");
    let actions = a.op_done(kill, Ok(OpOutput::Done));
    assert!(
        op_of(&actions, |o| matches!(o, Op::Stage(_))).is_none(),
        "no driver is asked: {actions:?}"
    );
    assert_eq!(a.core.pending().count(), 0, "nothing is left pending");
    let record = a.core.migrations().next().unwrap();
    assert!(record.outcome.is_some(), "{record:?}");
}

#[test]
fn begin_refuses_a_vm_still_arriving_here() {
    let (mut b, _) = prepared_destination();
    let spec = vm("web-01", &[]);
    let (req, actions) = b.request(Request::StartMigration {
        vm: "web-01".into(),
        destination: "hv-c".into(),
        mode: Mode::Safe,
        completion: Default::default(),
        // Even if the hypervisor already shows it running.
        guests: vec![running(&spec)],
    });
    assert!(
        matches!(reply_to(&actions, req), Some(Err(Refusal::FailedPrecondition(m))) if m.contains("arriving")),
        "{actions:?}"
    );
}

#[test]
fn a_pending_kill_of_an_old_copy_keeps_the_vm_from_arriving_again() {
    let mut b = Host::new(B);
    b.core.pending.insert(
        ("m-000000000000.1".into(), String::new(), "kill".into()),
        Pending {
            attempt_id: "m-000000000000.1".into(),
            migration_id: "m-000000000000".into(),
            vm: "web-01".into(),
            feature: String::new(),
            work: Work::Kill,
            error: "QEMU did not quit".into(),
            tries: 1,
            next_try_ms: 99_999,
            since_ms: 0,
        },
    );
    let (req, actions) = b.request(prepare_call(
        &vm("web-01", &[]),
        "m-000000000001.1",
        Mode::Safe,
    ));
    assert!(
        matches!(reply_to(&actions, req), Some(Err(Refusal::Busy(m))) if m.contains("pending kill")),
        "{actions:?}"
    );
}

#[test]
fn stop_waits_for_an_attempt_past_finish_then_exits() {
    let (mut a, finish, attempt) = source_past_finish(&vm("web-01", &[]), Mode::Safe);
    // SIGTERM with Finish sent: nothing to abort, but not a reason to leave.
    let actions = a.input(Input::Stop);
    assert!(
        !actions.iter().any(|x| matches!(x, Action::Exit)),
        "{actions:?}"
    );
    let actions = committed(&mut a, finish, &attempt);
    assert!(
        !actions.iter().any(|x| matches!(x, Action::Exit)),
        "the kill is not done yet"
    );
    let kill = op_of(&actions, |o| matches!(o, Op::Kill { .. })).unwrap();
    let actions = a.op_done(kill, Ok(OpOutput::Done));
    let done = position(
        &actions,
        |x| matches!(x, Action::Journal { entry: Entry::Source(s), .. } if s.is_done()),
    )
    .expect("Confirm is journaled done");
    let exit = position(&actions, |x| matches!(x, Action::Exit)).expect("then it exits");
    assert!(done < exit);
}

#[test]
fn stop_exits_at_its_deadline_with_what_is_open_journaled() {
    let (mut b, _) = prepared_destination();
    let (_, _) = finishing(&mut b); // the resume never answers
    let actions = b.input(Input::Stop);
    assert!(!actions.iter().any(|x| matches!(x, Action::Exit)));
    let grace = b.now + Deadlines::default().stop_grace_ms;
    let actions = b.at(grace).timer();
    assert!(
        actions.iter().any(|x| matches!(x, Action::Exit)),
        "{actions:?}"
    );
}

#[test]
fn the_outgoing_limit_holds_and_unresolved_attempts_do_not_count() {
    let mut a = Host::new(A);
    let specs: Vec<VmSpec> = (0..3).map(|i| vm(&format!("web-0{i}"), &[])).collect();
    let guests: Vec<Guest> = specs.iter().map(running).collect();
    for i in 0..2 {
        let (req, actions) = a.request(Request::StartMigration {
            vm: format!("web-0{i}"),
            destination: B.into(),
            mode: Mode::Safe,
            completion: Default::default(),
            guests: guests.clone(),
        });
        assert!(matches!(reply_to(&actions, req), Some(Ok(_))));
    }
    let (req, actions) = a.request(Request::StartMigration {
        vm: "web-02".into(),
        destination: B.into(),
        mode: Mode::Safe,
        completion: Default::default(),
        guests,
    });
    assert!(
        matches!(reply_to(&actions, req), Some(Err(Refusal::ResourceExhausted(m))) if m.contains("max_outgoing = 2")),
        "{actions:?}"
    );
}

#[test]
fn ids_differ_between_hosts_and_restarts() {
    let mut ids = std::collections::BTreeSet::new();
    for salt in [1u64, 2, 3] {
        let mut core = HostCore::new(Config {
            id_salt: salt,
            ..config(A)
        });
        for _ in 0..100 {
            let id = core.new_id(IdKind::Migration, |_| false);
            // Every id a host makes passes the rule requests are checked by.
            bounds::check_id("id", &id, IdKind::Migration).unwrap();
            assert!(ids.insert(id));
        }
        let id = core.new_id(IdKind::Evacuation, |_| false);
        bounds::check_id("id", &id, IdKind::Evacuation).unwrap();
    }
}

/// Retention that keeps one closed record of each kind.
fn keep_one() -> Retention {
    Retention {
        closed: 1,
        max_age_ms: retention::DAY_MS,
    }
}

fn pruned(actions: &[Action]) -> Option<&Pruned> {
    actions.iter().find_map(|a| match a {
        Action::Journal {
            entry: Entry::Prune(p),
            ..
        } => Some(&**p),
        _ => None,
    })
}

/// A migration of `vm` from hv-a to hv-b, committed, killed and released:
/// its id.
fn a_migration_ends(a: &mut Host, vm_name: &str) -> String {
    let spec = vm(vm_name, &[]);
    let (_, actions) = a.request(Request::StartMigration {
        vm: vm_name.into(),
        destination: B.into(),
        mode: Mode::Safe,
        completion: Default::default(),
        guests: vec![running(&spec)],
    });
    let prepare = call_of(&actions, |r| matches!(r, PeerCall::Prepare(_))).expect("Prepare");
    let (id, attempt) = actions
        .iter()
        .find_map(|a| match a {
            Action::Journal {
                entry: Entry::Source(s),
                ..
            } => Some((s.migration_id.clone(), s.attempt_id.clone())),
            _ => None,
        })
        .expect("Begin journals the attempt");
    let c2 = proto::Cookie2 {
        protocol_version: crate::protocol::PROTOCOL_VERSION,
        attempt_id: attempt.clone(),
        incoming_address: "sim://hv-b/x".into(),
        accepted: true,
        ..Default::default()
    };
    let actions = a.input(Input::PeerReplied {
        call: prepare,
        reply: Ok(PeerResponse::Prepare(proto::PrepareReply {
            cookie2: c2.encode_to_vec(),
        })),
    });
    let transfer = op_of(&actions, |o| matches!(o, Op::TransferOut { .. })).expect("a transfer");
    let actions = a.op_done(transfer, Ok(OpOutput::Transferred(Default::default())));
    let finish = call_of(&actions, |r| matches!(r, PeerCall::Finish(_))).expect("Finish");
    let actions = committed(a, finish, &attempt);
    let kill = op_of(&actions, |o| matches!(o, Op::Kill { .. })).expect("the old copy goes");
    a.op_done(kill, Ok(OpOutput::Done));
    assert!(!a.core.is_live(&attempt), "{id} ended");
    id
}

#[test]
fn retention_forgets_the_oldest_closed_migrations_here_and_in_the_journal() {
    let mut a = Host::with(Config {
        retention: keep_one(),
        postcopy: Ok(()),
        ..config(A)
    });
    let first = a.at(2_000).a_migration_ends_now("web-01");
    let second = a.at(3_000).a_migration_ends_now("web-02");
    assert_eq!(
        a.core.migrations().count(),
        2,
        "nothing is pruned before asked"
    );
    let actions = a.input(Input::Prune);
    let p = pruned(&actions).expect("a prune is journaled");
    assert_eq!(p.migrations, std::slice::from_ref(&first));
    assert!(a.core.migration(&first).is_none());
    assert!(a.core.migration(&second).is_some(), "the newest is kept");
    // The kept one is past the age limit a day later.
    let actions = a.at(3_000 + retention::DAY_MS + 1).input(Input::Prune);
    assert_eq!(
        pruned(&actions).expect("pruned by age").migrations,
        [second]
    );
    // Nothing left to forget: nothing is written.
    assert!(pruned(&a.input(Input::Prune)).is_none());
}

impl Host {
    fn a_migration_ends_now(&mut self, vm_name: &str) -> String {
        a_migration_ends(self, vm_name)
    }
}

#[test]
fn a_forgotten_commit_is_still_answered_committed_and_never_prepared_again() {
    let (mut b, _) = prepared_destination();
    let (_, actions) = finishing(&mut b);
    let op = op_of(&actions, |o| matches!(o, Op::Resume { .. })).expect("a resume");
    b.op_done(op, Ok(OpOutput::Done));
    let id = "m-000000000001.1";
    assert_eq!(b.core.answer(id), Some(destination::Answer::Committed));
    b.core.cfg.retention = Retention {
        closed: 0,
        max_age_ms: retention::DAY_MS,
    };
    let actions = b.input(Input::Prune);
    let p = pruned(&actions).expect("pruned");
    assert_eq!(
        (p.committed.as_slice(), p.rolled_back.len()),
        ([id.to_string()].as_slice(), 0)
    );
    assert_eq!(b.core.answer(id), None, "the record is gone");

    let (req, actions) = b.request(resolve_call(id));
    let Some(Ok(Response::Peer(PeerResponse::Resolve(r)))) = reply_to(&actions, req) else {
        panic!("{actions:?}");
    };
    assert_eq!(r.resolution, proto::Resolution::Committed as i32);
    assert!(
        !actions.iter().any(|a| matches!(
            a,
            Action::Journal {
                entry: Entry::Tombstone(_),
                ..
            }
        )),
        "a commit is never tombstoned: {actions:?}"
    );
    let (req, actions) = b.request(abort_call(id));
    let Some(Ok(Response::Peer(PeerResponse::Abort(r)))) = reply_to(&actions, req) else {
        panic!("{actions:?}");
    };
    assert!(!r.aborted && r.committed, "{r:?}");
    let (req, actions) = b.request(finish_call(id));
    let Some(Ok(Response::Peer(PeerResponse::Finish(r)))) = reply_to(&actions, req) else {
        panic!("{actions:?}");
    };
    let c4 = cookies::decode::<proto::Cookie4>("C4", &r.cookie4).expect("a C4");
    assert!(c4.committed);
    let (req, actions) = b.request(prepare_call(&vm("web-01", &[]), id, Mode::Safe));
    assert!(
        matches!(reply_to(&actions, req), Some(Err(Refusal::AlreadyExists(m))) if m.contains(id)),
        "{actions:?}"
    );
}

#[test]
fn a_forgotten_rollback_becomes_a_tombstone() {
    let (mut b, _) = prepared_destination();
    let id = "m-000000000001.1";
    let (_, actions) = b.request(abort_call(id));
    let kill = op_of(&actions, |o| matches!(o, Op::Kill { .. })).expect("the copy goes");
    let actions = b.op_done(kill, Ok(OpOutput::Done));
    assert!(!b.core.is_live(id), "rolled back: {actions:?}");
    b.core.cfg.retention = Retention {
        closed: 0,
        max_age_ms: retention::DAY_MS,
    };
    let p = pruned(&b.input(Input::Prune)).expect("pruned").clone();
    assert_eq!(p.rolled_back, [id.to_string()]);
    let (req, actions) = b.request(resolve_call(id));
    let Some(Ok(Response::Peer(PeerResponse::Resolve(r)))) = reply_to(&actions, req) else {
        panic!("{actions:?}");
    };
    assert_eq!(r.resolution, proto::Resolution::NotCommitted as i32);
    let (req, actions) = b.request(prepare_call(&vm("web-01", &[]), id, Mode::Safe));
    assert!(
        matches!(
            reply_to(&actions, req),
            Some(Err(Refusal::FailedPrecondition(_)))
        ),
        "{actions:?}"
    );
}

#[test]
fn rollback_of_a_migration_never_seen_here_is_not_found() {
    let (mut b, _) = prepared_destination();
    let (req, actions) = b.request(Request::RunPending {
        migration_id: "m-00000000beef".into(),
    });
    assert!(
        matches!(reply_to(&actions, req), Some(Err(Refusal::NotFound(m))) if m.contains("m-00000000beef")),
        "{actions:?}"
    );
    // One this host knows, with nothing pending: an empty answer.
    let (req, actions) = b.request(Request::RunPending {
        migration_id: "m-000000000001".into(),
    });
    assert!(
        matches!(reply_to(&actions, req), Some(Ok(Response::Pending { done, still })) if done.is_empty() && still.is_empty()),
        "{actions:?}"
    );
}

#[test]
fn ids_and_names_outside_the_rules_are_refused_before_anything_happens() {
    let mut a = Host::new(A);
    for request in [
        Request::Abort {
            id: "m-1; rm -rf /".into(),
        },
        Request::RunPending {
            migration_id: "m-0123456789ab.1".into(),
        },
        Request::StartMigration {
            vm: "web\u{1b}[2J".into(),
            destination: B.into(),
            mode: Mode::Safe,
            completion: Default::default(),
            guests: vec![running(&vm("web\u{1b}[2J", &[]))],
        },
    ] {
        let (req, actions) = a.request(request);
        assert!(
            matches!(
                reply_to(&actions, req),
                Some(Err(Refusal::InvalidArgument(_)))
            ),
            "{actions:?}"
        );
        assert_eq!(actions.len(), 1, "nothing but the refusal: {actions:?}");
    }
}

#[test]
fn a_prepare_from_itself_an_unknown_host_or_of_its_own_migration_is_refused() {
    let mut a = Host::new(A);
    let id = a.a_migration_ends_now("web-01");
    let attempt = format!("{id}.1");
    let c1 = |attempt: &str, source: &str| {
        let (migration, _) = attempt.split_once('.').unwrap();
        let c1 = cookies::cookie1(attempt, migration, source, &vm("db-01", &[]), Mode::Safe);
        Request::Peer {
            call: PeerCall::Prepare(proto::PrepareRequest {
                cookie1: c1.encode_to_vec(),
            }),
            guests: Vec::new(),
            // Plaintext: what is checked here is the C1 itself.
            from: None,
        }
    };
    for (request, expected) in [
        (c1(&attempt, B), "which hv-a sources"),
        (c1("m-00000000000f.1", A), "C1.source is hv-a itself"),
        (
            c1("m-00000000000f.1", "hv-zz"),
            "C1.source: no host named hv-zz",
        ),
    ] {
        let (req, actions) = a.request(request);
        let Some(Err(refusal)) = reply_to(&actions, req) else {
            panic!("{actions:?}");
        };
        assert!(refusal.to_string().contains(expected), "{refusal}");
        assert_eq!(actions.len(), 1, "nothing but the refusal: {actions:?}");
    }
}

// ---- peers bound to their attempts -------------------------------------------

/// `request` as another host's certificate would make it.
fn from(mut request: Request, host: &str) -> Request {
    if let Request::Peer { from, .. } = &mut request {
        *from = Some(host.into());
    }
    request
}

fn denied(actions: &[Action], req: ReqId) -> String {
    match reply_to(actions, req) {
        Some(Err(Refusal::PermissionDenied(m))) => m.clone(),
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
}

#[test]
fn a_host_may_not_prepare_a_migration_another_host_sources() {
    let mut b = Host::new(B);
    let spec = vm("web-01", &[]);
    // C1 names hv-a as the source; the certificate says hv-c.
    let (req, actions) = b.request(from(
        prepare_call(&spec, "m-000000000001.1", Mode::Safe),
        "hv-c",
    ));
    let why = denied(&actions, req);
    assert!(
        why.contains("hv-c may not prepare attempt m-000000000001.1 for source hv-a"),
        "{why}"
    );
    assert!(!b.core.is_live("m-000000000001.1"), "nothing was admitted");
    assert!(
        op_of(&actions, |o| matches!(o, Op::StartIncoming { .. })).is_none(),
        "no guest started: {actions:?}"
    );
}

#[test]
fn only_the_source_of_an_arriving_attempt_may_finish_abort_resolve_or_heartbeat_it() {
    let (mut b, _) = prepared_destination();
    for call in [
        finish_call("m-000000000001.1"),
        abort_call("m-000000000001.1"),
        resolve_call("m-000000000001.1"),
        heartbeat_call("m-000000000001.1"),
    ] {
        let name = match &call {
            Request::Peer { call, .. } => call.name(),
            _ => unreachable!(),
        };
        let (req, actions) = b.request(from(call, "hv-c"));
        let why = denied(&actions, req);
        assert!(
            why.contains("hv-c") && (why.contains("hv-a") || why.contains("certificate")),
            "{name}: {why}"
        );
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::Run { .. } | Action::Call { .. })),
            "{name} from hv-c changed nothing: {actions:?}"
        );
        assert!(b.core.is_live("m-000000000001.1"), "{name}: still live");
    }
    // Its own source still may.
    let (req, actions) = b.request(heartbeat_call("m-000000000001.1"));
    assert!(
        matches!(
            reply_to(&actions, req),
            Some(Ok(Response::Peer(PeerResponse::Heartbeat(r)))) if r.gone.is_empty()
        ),
        "{actions:?}"
    );
}

#[test]
fn a_host_naming_another_in_its_call_is_refused() {
    let (mut b, _) = prepared_destination();
    // hv-c's certificate, "from hv-a" in the request: a forgery.
    let mut forged = abort_call("m-000000000001.1");
    if let Request::Peer { from, .. } = &mut forged {
        *from = Some("hv-c".into());
    }
    let (req, actions) = b.request(forged);
    let why = denied(&actions, req);
    assert!(why.contains("says it is from \"hv-a\""), "{why}");
    assert!(b.core.is_live("m-000000000001.1"));
}

#[test]
fn only_its_destination_may_abort_an_attempt_a_source_runs() {
    let spec = vm("web-01", &[]);
    let (mut a, _, attempt) = source_past_finish(&spec, Mode::Safe);
    let abort = |host: &str| {
        from(
            Request::Peer {
                call: PeerCall::Abort(proto::PeerAbortRequest {
                    attempt_id: attempt.clone(),
                    reason: "forged".into(),
                    from_host: host.into(),
                    cookie4: Vec::new(),
                    cause: String::new(),
                }),
                guests: Vec::new(),
                from: None,
            },
            host,
        )
    };
    let (req, actions) = a.request(abort("hv-c"));
    let why = denied(&actions, req);
    assert!(why.contains("goes to hv-b: hv-c may not abort it"), "{why}");
    assert!(
        !actions.iter().any(|x| matches!(
            x,
            Action::Run {
                what: Op::Resume { .. },
                ..
            }
        )),
        "the source did not resume its copy on a forged abort: {actions:?}"
    );
}

#[test]
fn a_plaintext_peer_is_taken_as_before_identities() {
    let (mut b, _) = prepared_destination();
    let mut call = heartbeat_call("m-000000000001.1");
    if let Request::Peer { from, .. } = &mut call {
        *from = None;
    }
    let (req, actions) = b.request(call);
    assert!(
        matches!(
            reply_to(&actions, req),
            Some(Ok(Response::Peer(PeerResponse::Heartbeat(_))))
        ),
        "{actions:?}"
    );
}

#[test]
fn begin_refuses_a_vm_whose_machine_predates_typed_machines() {
    let mut a = Host::new(A);
    let mut spec = vm("web-01", &[]);
    spec.qemu = Some(crate::protocol::QemuMachine {
        kernel: "/tmp/tern-guest.elf".into(),
        legacy_args: vec!["-drive".into(), "file=/x.img".into()],
        ..Default::default()
    });
    let (req, actions) = a.request(Request::StartMigration {
        vm: "web-01".into(),
        destination: B.into(),
        mode: Mode::Safe,
        completion: Default::default(),
        guests: vec![running(&spec)],
    });
    match reply_to(&actions, req) {
        Some(Err(Refusal::FailedPrecondition(m))) => {
            assert!(
                m.starts_with("VM web-01 cannot migrate as it is defined on hv-a: qemu.args"),
                "{m}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(actions.len(), 1, "nothing but the answer: {actions:?}");
}

#[test]
fn prepare_refuses_a_malformed_machine_before_anything_starts() {
    let mut b = Host::new(B);
    let mut spec = vm("web-01", &[]);
    spec.qemu = Some(crate::protocol::QemuMachine {
        kernel: "../../etc/shadow".into(),
        ..Default::default()
    });
    let (req, actions) = b.request(prepare_call(&spec, "m-000000000001.1", Mode::Safe));
    match reply_to(&actions, req) {
        Some(Err(Refusal::InvalidArgument(m))) => {
            assert!(
                m.starts_with("vm web-01: qemu.kernel \"../../etc/shadow\" is a path"),
                "{m}"
            );
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    // No journal write, no start, no attempt.
    assert_eq!(actions.len(), 1, "nothing but the answer: {actions:?}");
    assert!(!b.core.is_live("m-000000000001.1"));
}

/// hv-a with hv-b's migration address at 10.0.0.2, after it asked hv-b to
/// prepare `web-01`: (host, the Prepare call, the attempt id).
fn source_waiting_for_c2_from_10_0_0_2() -> (Host, CallId, String) {
    let mut cfg = config(A);
    cfg.migration_hosts.insert(B.into(), "10.0.0.2".into());
    let mut a = Host::with(cfg);
    let spec = vm("web-01", &[]);
    let (_, actions) = a.request(Request::StartMigration {
        vm: spec.name.clone(),
        destination: B.into(),
        mode: Mode::Safe,
        completion: Default::default(),
        guests: vec![running(&spec)],
    });
    let prepare = call_of(&actions, |r| matches!(r, PeerCall::Prepare(_))).expect("Prepare");
    let attempt = a.core.migrations().next().unwrap().attempt_id.clone();
    (a, prepare, attempt)
}

/// hv-b's answer to `call`, Prepare: accepted, incoming at `address`.
fn c2_reply(call: CallId, attempt: &str, address: &str) -> Input {
    let c2 = proto::Cookie2 {
        protocol_version: crate::protocol::PROTOCOL_VERSION,
        attempt_id: attempt.into(),
        incoming_address: address.into(),
        accepted: true,
        ..Default::default()
    };
    Input::PeerReplied {
        call,
        reply: Ok(PeerResponse::Prepare(proto::PrepareReply {
            cookie2: c2.encode_to_vec(),
        })),
    }
}

#[test]
fn a_c2_naming_another_hosts_address_is_refused_before_any_transfer() {
    let (mut a, prepare, attempt) = source_waiting_for_c2_from_10_0_0_2();
    let actions = a.input(c2_reply(prepare, &attempt, "tcp:10.0.0.9:49152"));
    assert!(
        op_of(&actions, |o| matches!(o, Op::TransferOut { .. })).is_none(),
        "nothing is sent: {actions:?}"
    );
    let abort = actions.iter().find_map(|a| match a {
        Action::Call {
            request: PeerCall::Abort(r),
            ..
        } => Some(r.clone()),
        _ => None,
    });
    let abort = abort.expect("hv-b is told to abort");
    assert_eq!(abort.attempt_id, attempt);
    assert!(op_of(&actions, |o| matches!(o, Op::Resume { .. })).is_some());
    let record = a.core.migrations().next().unwrap().clone();
    assert_eq!(record.outcome, Some(crate::protocol::Outcome::Failed));
    let error = record.error.unwrap_or_default();
    assert!(
        error.contains("tcp:10.0.0.9:49152") && error.contains("10.0.0.2"),
        "{error}"
    );
    assert_eq!(abort.reason, error);
}

#[test]
fn a_c2_naming_the_destinations_own_address_starts_the_transfer_to_it() {
    let (mut a, prepare, attempt) = source_waiting_for_c2_from_10_0_0_2();
    let actions = a.input(c2_reply(prepare, &attempt, "tcp:10.0.0.2:49152"));
    let transfer = actions.iter().find_map(|a| match a {
        Action::Run {
            what:
                Op::TransferOut {
                    destination,
                    address,
                    ..
                },
            ..
        } => Some((destination.clone(), address.clone())),
        _ => None,
    });
    assert_eq!(
        transfer,
        Some((B.to_string(), "tcp:10.0.0.2:49152".to_string()))
    );
}

#[test]
fn a_destination_without_a_known_migration_address_is_refused_at_begin() {
    let mut cfg = config(A);
    cfg.migration_hosts.remove(B);
    let mut a = Host::with(cfg);
    let spec = vm("web-01", &[]);
    let (req, actions) = a.request(Request::StartMigration {
        vm: spec.name.clone(),
        destination: B.into(),
        mode: Mode::Safe,
        completion: Default::default(),
        guests: vec![running(&spec)],
    });
    let reply = reply_to(&actions, req).expect("an answer");
    assert!(
        matches!(reply, Err(Refusal::FailedPrecondition(why)) if why.contains("no migration address for hv-b")),
        "{reply:?}"
    );
    assert!(call_of(&actions, |r| matches!(r, PeerCall::Prepare(_))).is_none());
}

// ---- admission: what `tern check` shows is what Begin and Prepare apply ----

/// Begin's answer to `vm` → `destination`, and its check list now.
fn begin_and_check(
    a: &mut Host,
    vm: &str,
    destination: &str,
    guests: Vec<Guest>,
) -> (Reply, Vec<admission::Check>) {
    let (checks, _) = a
        .core
        .check_source(vm, destination, Mode::Safe, false, &guests)
        .expect("a VM of this host, a host of the inventory");
    let (req, actions) = a.request(Request::StartMigration {
        vm: vm.into(),
        destination: destination.into(),
        mode: Mode::Safe,
        completion: Default::default(),
        guests,
    });
    let reply = reply_to(&actions, req).expect("an answer").clone();
    (reply, checks)
}

fn refused(reply: &Reply) -> Option<Refusal> {
    reply.as_ref().err().cloned()
}

fn failed_checks(checks: &[admission::Check]) -> Vec<&'static str> {
    checks
        .iter()
        .filter(|c| c.verdict.is_err())
        .map(|c| c.name)
        .collect()
}

#[test]
fn begin_refuses_with_the_first_check_that_fails_and_a_check_holds_nothing() {
    let web = vm("web-01", &[("port-profile", true)]);
    let mut a = Host::new(A);
    // All pass: checking takes no lock and no slot, so Begin goes on, twice
    // over (max_outgoing = 2).
    for _ in 0..3 {
        let (checks, _) = a
            .core
            .check_source("web-01", B, Mode::Safe, false, &[running(&web)])
            .unwrap();
        assert!(failed_checks(&checks).is_empty(), "{checks:?}");
    }
    assert_eq!(a.core.outgoing(), 0);
    let (reply, _) = begin_and_check(&mut a, "web-01", B, vec![running(&web)]);
    assert!(reply.is_ok(), "{reply:?}");
    // Now locked: the check and Begin say the same.
    let (reply, checks) = begin_and_check(&mut a, "web-01", B, vec![running(&web)]);
    assert_eq!(failed_checks(&checks), ["lock"]);
    assert_eq!(admission::first_refusal(&checks), refused(&reply));

    // A paused guest, to the VM's own host: two checks fail, and Begin
    // refuses with the first.
    let db = vm("db-01", &[]);
    let paused = Guest {
        spec: db.clone(),
        state: GuestState::Paused,
    };
    let (reply, checks) = begin_and_check(&mut a, "db-01", A, vec![paused.clone()]);
    assert_eq!(failed_checks(&checks), ["destination", "vm state"]);
    let refusal = admission::first_refusal(&checks).unwrap();
    assert_eq!(Some(refusal.clone()), refused(&reply));
    assert!(
        refusal.to_string().contains("already runs on hv-a"),
        "{refusal}"
    );
    let (reply, checks) = begin_and_check(&mut a, "db-01", B, vec![paused]);
    assert_eq!(failed_checks(&checks), ["vm state"]);
    assert!(
        matches!(&reply, Err(Refusal::FailedPrecondition(m)) if m.contains("db-01 is paused on hv-a")),
        "{reply:?}"
    );

    // An unknown VM or host is the request's fault, not a check's.
    let none = a.core.check_source("nope-01", B, Mode::Safe, false, &[]);
    assert!(matches!(none, Err(Refusal::NotFound(_))), "{none:?}");
    let none = a
        .core
        .check_source("web-01", "hv-z", Mode::Safe, false, &[running(&web)]);
    assert!(matches!(none, Err(Refusal::NotFound(_))), "{none:?}");
}

#[test]
fn a_host_without_a_migration_address_or_shutting_down_fails_its_checks_as_begin_does() {
    let web = vm("web-01", &[]);
    let mut cfg = config(A);
    cfg.migration_hosts.remove("hv-c");
    let mut a = Host::with(cfg);
    let (reply, checks) = begin_and_check(&mut a, "web-01", "hv-c", vec![running(&web)]);
    assert_eq!(failed_checks(&checks), ["destination"]);
    assert_eq!(admission::first_refusal(&checks), refused(&reply));
    assert!(
        matches!(&reply, Err(Refusal::FailedPrecondition(m)) if m.contains("no migration address for hv-c")),
        "{reply:?}"
    );

    a.input(Input::Stop);
    let (reply, checks) = begin_and_check(&mut a, "web-01", B, vec![running(&web)]);
    assert_eq!(failed_checks(&checks), ["agent"]);
    assert!(matches!(&reply, Err(Refusal::Unavailable(m)) if m.contains("shutting down")));
    assert_eq!(admission::first_refusal(&checks), refused(&reply));
    // Prepare's checks on a stopping host say it first too.
    let c1 = cookies::cookie1(
        admission::CHECK_ATTEMPT_ID,
        admission::CHECK_MIGRATION_ID,
        B,
        &web,
        Mode::Safe,
    );
    let checks = a
        .core
        .check_prepare(&c1.encode_to_vec(), &[], None, Ok(String::new()))
        .unwrap();
    assert_eq!(failed_checks(&checks), ["agent"]);
}

#[test]
fn prepare_refuses_with_the_first_of_the_checks_a_check_shows() {
    // hv-b runs db-01 already and is asked for web-01 needing more memory
    // than it has and a mandatory feature it lacks.
    let mut cfg = config(B);
    cfg.capacity.memory_mib = 512;
    let mut b = Host::with(cfg);
    let mut web = vm("web-01", &[("vdp", true)]);
    web.memory_mib = 1024;
    let c1 = cookies::cookie1(
        admission::CHECK_ATTEMPT_ID,
        admission::CHECK_MIGRATION_ID,
        A,
        &web,
        Mode::Safe,
    );
    let checks = b
        .core
        .check_prepare(&c1.encode_to_vec(), &[], Some(A), Ok(String::new()))
        .unwrap();
    assert_eq!(failed_checks(&checks), ["features", "capacity"]);
    let (req, actions) = b.request(prepare_call(&web, "m-00000000000a.1", Mode::Safe));
    let reply = reply_to(&actions, req).unwrap();
    assert_eq!(admission::first_refusal(&checks), refused(reply));
    // Fast mode makes no feature mandatory: capacity is what is left.
    let fast = cookies::cookie1(
        admission::CHECK_ATTEMPT_ID,
        admission::CHECK_MIGRATION_ID,
        A,
        &web,
        Mode::Fast,
    );
    let checks = b
        .core
        .check_prepare(&fast.encode_to_vec(), &[], Some(A), Ok(String::new()))
        .unwrap();
    assert_eq!(failed_checks(&checks), ["capacity"]);
    // Another host may not ask for a C1 of A's.
    let forged = b
        .core
        .check_prepare(&c1.encode_to_vec(), &[], Some("hv-c"), Ok(String::new()));
    assert!(
        matches!(forged, Err(Refusal::PermissionDenied(_))),
        "{forged:?}"
    );
    // Nothing was registered by any of the checks.
    assert_eq!(b.core.incoming(), 0);
}

/// hv-a's record of a fast migration of web-01 to hv-b whose ASSOCIATE
/// failed there: degraded, the VM on hv-b.
fn degraded_on_b() -> (Host, String) {
    let spec = vm("web-01", &[("port-profile", true)]);
    let (mut a, finish, attempt) = source_past_finish(&spec, Mode::Fast);
    let c4 = proto::Cookie4 {
        protocol_version: crate::protocol::PROTOCOL_VERSION,
        attempt_id: attempt.clone(),
        committed: true,
        finish: vec![proto::StageResult {
            feature: "port-profile".into(),
            status: proto::StepStatus::Failed as i32,
            detail: "finish: ASSOCIATE web-01 rejected".into(),
        }],
        ..Default::default()
    };
    let actions = a.input(Input::PeerReplied {
        call: finish,
        reply: Ok(PeerResponse::Finish(proto::FinishReply {
            cookie4: c4.encode_to_vec(),
        })),
    });
    let kill = op_of(&actions, |o| matches!(o, Op::Kill { .. })).expect("the old copy goes");
    let actions = a.op_done(kill, Ok(OpOutput::Done));
    let release = op_of(&actions, |o| matches!(o, Op::Stage(_))).expect("release");
    a.op_done(release, Ok(OpOutput::Stage("DISASSOCIATE ok".into())));
    let record = a.core.migrations().next().unwrap().clone();
    assert_eq!(record.outcome, Some(Outcome::Degraded), "{record:?}");
    (a, attempt)
}

fn repair_request(feature: Option<&str>) -> Request {
    Request::Repair {
        vm: "web-01".into(),
        feature: feature.map(str::to_string),
        who: "ana (operator)".into(),
    }
}

#[test]
fn a_repair_journals_its_intent_durably_before_it_asks_the_host_the_vm_runs_on() {
    use crate::protocol::repair::RepairResult;
    let (mut a, _) = degraded_on_b();
    let (req, actions) = a.request(repair_request(None));
    let journaled = position(&actions, |x| {
        matches!(x, Action::Journal { entry: Entry::Source(s), durable: true }
            if s.record.repairs.iter().any(|r| r.result == RepairResult::Running))
    })
    .expect("the intent is journaled durably");
    let asked = position(&actions, |x| {
        matches!(x, Action::Call { peer, request: PeerCall::Repair(r), .. }
            if peer == B && r.features.len() == 1 && r.features[0].stages == ["finish", "verify"])
    })
    .expect("hv-b is asked to re-run port-profile finish");
    assert!(journaled < asked, "{actions:?}");
    assert!(reply_to(&actions, req).is_none(), "answered once hv-b has");
    let call = call_of(&actions, |r| matches!(r, PeerCall::Repair(_))).unwrap();
    let actions = a.input(Input::PeerReplied {
        call,
        reply: Ok(PeerResponse::Repair(proto::PeerRepairReply {
            results: vec![proto::RepairStageResult {
                feature: "port-profile".into(),
                stage: "finish".into(),
                ok: true,
                detail: "ASSOCIATE ok".into(),
            }],
        })),
    });
    let journaled = position(&actions, |x| {
        matches!(x, Action::Journal { entry: Entry::Source(s), .. }
            if s.record.outcome == Some(Outcome::Succeeded))
    })
    .expect("the result is journaled");
    let answered = position(
        &actions,
        |x| matches!(x, Action::Reply { req: r, .. } if *r == req),
    )
    .expect("answered");
    assert!(journaled < answered);
    let Some(Ok(Response::Migration(record))) = reply_to(&actions, req) else {
        panic!("{actions:?}")
    };
    assert_eq!(record.repairs[0].result, RepairResult::Ok);
    assert!(
        actions
            .iter()
            .any(|x| matches!(x, Action::Emit(Event::Migration(r)) if r.outcome == Some(Outcome::Succeeded))),
        "watchers hear the repaired record"
    );
}

#[test]
fn a_repair_journaled_as_running_is_interrupted_by_a_restart_and_may_be_asked_again() {
    use crate::protocol::repair::RepairResult;
    let (mut a, _) = degraded_on_b();
    let (_, actions) = a.request(repair_request(Some("port-profile")));
    let source = actions
        .iter()
        .rev()
        .find_map(|x| match x {
            Action::Journal {
                entry: Entry::Source(s),
                ..
            } => Some((**s).clone()),
            _ => None,
        })
        .expect("journaled");
    // The agent dies before hv-b answers; it restarts from its journal.
    let mut restarted = HostCore::new(config(A));
    restarted.recover(
        2_000,
        JournalImage {
            sources: vec![source],
            ..Default::default()
        },
    );
    let record = restarted.migrations().next().unwrap();
    assert_eq!(record.repairs[0].result, RepairResult::Interrupted);
    assert_eq!(record.outcome, Some(Outcome::Degraded));
    // Not stuck as running: a new repair may start.
    let actions = restarted.handle(
        2_100,
        Input::Request {
            req: 1,
            request: repair_request(None),
        },
    );
    assert!(call_of(&actions, |r| matches!(r, PeerCall::Repair(_))).is_some());
}

#[test]
fn the_host_a_vm_runs_on_runs_the_stages_in_order_and_refuses_a_vm_it_does_not_run() {
    let mut b = Host::new(B);
    let spec = vm("web-01", &[("port-profile", true)]);
    let call = |guests: Vec<Guest>| Request::Peer {
        call: PeerCall::Repair(proto::PeerRepairRequest {
            attempt_id: "m-000000000001.1".into(),
            migration_id: "m-000000000001".into(),
            vm: "web-01".into(),
            features: vec![proto::RepairStages {
                feature: "port-profile".into(),
                stages: vec!["prepare".into(), "finish".into()],
            }],
        }),
        guests,
        from: None,
    };
    let (req, actions) = b.request(call(Vec::new()));
    assert!(
        matches!(reply_to(&actions, req), Some(Err(Refusal::FailedPrecondition(m))) if m.contains("web-01 does not run on hv-b")),
        "{actions:?}"
    );
    let (req, actions) = b.request(call(vec![running(&spec)]));
    let prepare = op_of(
        &actions,
        |o| matches!(o, Op::Stage(c) if c.stage == Stage::Prepare),
    )
    .expect("prepare first");
    // While it runs, the VM does not leave (a stage landing after it left
    // would leave its state here), and a second repair waits.
    let (begin, actions) = b.request(Request::StartMigration {
        vm: "web-01".into(),
        destination: A.into(),
        mode: Mode::Safe,
        completion: Default::default(),
        guests: vec![running(&spec)],
    });
    assert!(
        matches!(reply_to(&actions, begin), Some(Err(Refusal::Busy(m))) if m.contains("being repaired")),
        "{actions:?}"
    );
    let (second, actions) = b.request(call(vec![running(&spec)]));
    assert!(matches!(
        reply_to(&actions, second),
        Some(Err(Refusal::AlreadyExists(_)))
    ));
    let actions = b.op_done(prepare, Err(OpError::Failed("switch says no".into())));
    // A failed prepare leaves its finish nothing to build on.
    assert!(op_of(&actions, |o| matches!(o, Op::Stage(_))).is_none());
    let Some(Ok(Response::Peer(PeerResponse::Repair(reply)))) = reply_to(&actions, req) else {
        panic!("{actions:?}")
    };
    assert_eq!(reply.results.len(), 1);
    assert!(!reply.results[0].ok && reply.results[0].detail == "switch says no");
}

#[test]
fn recovery_counts_until_the_attempts_the_journal_left_open_have_ended() {
    let (b, _) = prepared_destination();
    let journaled = b.last_journaled_destination();
    // Nothing open: recovered at once.
    assert!(!Host::new(B).core.recovering());
    // The restarted destination rolls its prepared attempt back.
    let mut core = HostCore::new(config(B));
    let mut actions = core.recover(
        2_000,
        JournalImage {
            destinations: vec![journaled],
            ..Default::default()
        },
    );
    assert!(core.recovering(), "the kill of the incoming guest runs");
    let mut now = 2_000;
    while let Some(op) = op_of(&actions, |_| true) {
        assert!(core.recovering(), "{actions:?}");
        now += 10;
        actions = core.handle(
            now,
            Input::OpDone {
                op,
                result: Ok(OpOutput::Done),
            },
        );
    }
    assert!(!core.recovering(), "{actions:?}");
}
