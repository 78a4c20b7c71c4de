//! The checks the fuzz targets run, shared by libFuzzer (`fuzz_targets/*.rs`,
//! nightly) and by the stable smoke test (`tests/fuzz_smoke.rs`), which feeds
//! the committed corpus and seeded mutations of it through the same functions.
//!
//! Each entry point takes arbitrary bytes and panics only when tern misbehaves:
//! a panic inside tern, or an invariant below that does not hold.
//!
//! - [`cookie_decode`]: the bytes as each cookie C1–C4 as an agent receives it
//!   (`cookies::decode`, `check_cookie1`), then what the agent does with a
//!   decoded cookie: the conversions of `cookies.rs`/`record.rs`, the protocol
//!   state machines fed the cookie (with hypervisor answers to their guest
//!   calls that fail, go unanswered or find the guest gone, as the bytes
//!   say), and the journal's JSON of their snapshots; and the bytes as a
//!   console `MigrationRecord` converted and rendered.
//! - [`config_parse`]: the bytes as TOML text (lossy UTF-8) given to
//!   `AgentConfig::parse` and `Inventory::parse`, and as a list of edits to a
//!   valid agent config and inventory (structured fuzzing: every edit keeps
//!   the text TOML, so the semantic checks are reached, not only the parser).
//!   An accepted config must satisfy what `config.rs` promises; a refused one
//!   must be an `Invalid` error naming the file.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::fmt::Debug;
use std::path::Path;
use std::sync::OnceLock;

use prost::Message;
use tern::cli::output::{record_summary, started_line, state_summary};
use tern::config::{AgentConfig, ConfigError, Inventory};
use tern::features::FeatureRegistry;
use tern::proto;
use tern::protocol::cookies::{self, Bounded, CookieError, Incoming, Versioned};
use tern::protocol::destination::{
    Answer, DestinationAction, DestinationAttempt, DestinationInput, DestinationState, FreeCapacity,
};
use tern::protocol::record::{self, MigrationRecord, stats_from_proto, stats_to_proto};
use tern::protocol::source::{
    AbortAnswer, AttemptParams, Resolution, SourceAction, SourceAttempt, SourceInput, SourceState,
};
use tern::protocol::{
    Cause, FeatureSpec, GuestOpError, GuestOpResult, GuestProbe, Millis, Mode, PROTOCOL_VERSION,
    PeerError, PendingWork, Stage, StepStatus, Timing, VmSpec,
};

// ===========================================================================
// Cookies
// ===========================================================================

/// Fixed ids of the attempts the state machines run; seeds use them, so a
/// fuzzed cookie can match the attempt it is delivered to.
pub const MIGRATION_ID: &str = "m-0000000000a1";
pub const ATTEMPT_ID: &str = "m-0000000000a1.1";
pub const SOURCE: &str = "hv-a";
pub const DESTINATION: &str = "hv-b";
const START: Millis = 1_000_000;
/// Far more steps than any attempt takes; more means it never settles.
const MAX_STEPS: usize = 10_000;

/// The VM the state machines migrate when the fuzzed cookie is not C1.
pub fn sample_vm() -> VmSpec {
    VmSpec {
        name: "web-01".into(),
        memory_mib: 2048,
        vcpus: 2,
        dirty_rate_mib_s: 50,
        features: vec![
            FeatureSpec {
                name: "port-profile".into(),
                driver: String::new(),
                required: true,
            },
            FeatureSpec {
                name: "audit-hook".into(),
                driver: "exec".into(),
                required: false,
            },
        ],
        qemu: None,
    }
}

/// Which feature stages fail when a state machine runs them: bit `i` of the
/// mask fails the `i`-th stage run (taken from the input, so the fuzzer
/// reaches failure and rollback paths too).
#[derive(Debug, Clone, Copy)]
struct Stages {
    fail_mask: u32,
    run: u32,
}

impl Stages {
    fn new(data: &[u8]) -> Self {
        let fail_mask = data
            .iter()
            .fold(0u32, |h, &b| h.rotate_left(5) ^ u32::from(b));
        Stages { fail_mask, run: 0 }
    }

    fn outcome(&mut self, stage: Stage) -> Result<String, String> {
        let fail = self.fail_mask & (1 << (self.run % 32)) != 0;
        self.run += 1;
        if fail {
            Err(format!("{stage}: injected by the fuzzer"))
        } else {
            Ok(format!("{stage}: done"))
        }
    }
}

/// How the hypervisor answers the guest calls a state machine makes (start,
/// resume, kill, query): mostly as asked, and, as the input's bits say,
/// with a failure, no answer or a guest that is gone, so the fuzzer reaches
/// what each machine does at the commit point when a call goes wrong.
#[derive(Debug, Clone, Copy)]
struct Hypervisor {
    mask: u64,
    calls: u32,
}

impl Hypervisor {
    fn new(data: &[u8]) -> Self {
        // Another hash than `Stages`', so stage and guest faults vary apart.
        let mask = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Hypervisor { mask, calls: 0 }
    }

    /// Three bits per call: five in eight answers are "done".
    fn next(&mut self) -> u64 {
        let pick = (self.mask >> (3 * (self.calls % 21))) & 7;
        self.calls += 1;
        pick
    }

    fn call(&mut self) -> GuestOpResult {
        match self.next() {
            5 => Err(GuestOpError::Failed("fuzz: the hypervisor refused".into())),
            6 => Err(GuestOpError::Unknown("fuzz: no answer".into())),
            7 => Err(GuestOpError::Gone("fuzz: no such guest".into())),
            _ => Ok(()),
        }
    }

    fn start(&mut self, address: String) -> Result<String, GuestOpError> {
        self.call().map(|()| address)
    }

    fn probe(&mut self) -> GuestProbe {
        match self.next() {
            0..=3 => GuestProbe::Running,
            4 | 5 => GuestProbe::Stopped,
            6 => GuestProbe::Gone,
            _ => GuestProbe::Unknown("fuzz: QMP did not answer".into()),
        }
    }
}

/// The whole cookie check: `data` as each of C1–C4, and as a console record.
pub fn cookie_decode(data: &[u8]) {
    cookie1(data);
    cookie2(data);
    cookie3(data);
    cookie4(data);
    console_record(data);
}

/// `cookies::decode` agrees with prost and with the version check; a decoded
/// cookie re-encodes to one that decodes the same; errors display.
fn decoded<T>(label: &'static str, data: &[u8]) -> Option<T>
where
    T: Message + Default + Versioned + Bounded + PartialEq + Debug,
{
    let result = cookies::decode::<T>(label, data);
    if let Err(e) = &result {
        assert!(!e.to_string().is_empty());
    }
    match (&result, T::decode(data)) {
        (Ok(cookie), Ok(raw)) => {
            assert_eq!(cookie, &raw, "{label}: decode changed the message");
            assert_eq!(cookie.protocol_version(), PROTOCOL_VERSION);
        }
        (Err(CookieError::Malformed { cookie, .. }), Err(_)) => {
            assert_eq!(*cookie, label, "the error names another cookie");
        }
        (Err(CookieError::IncompatibleVersion { theirs, ours }), Ok(raw)) => {
            assert_eq!(*theirs, raw.protocol_version());
            assert_eq!(*ours, PROTOCOL_VERSION);
            assert_ne!(theirs, ours, "{label}: our own version refused");
        }
        (Err(CookieError::OutOfBounds(e)), Ok(raw)) => {
            assert_eq!(raw.protocol_version(), PROTOCOL_VERSION);
            assert_eq!(raw.check_bounds(), Err(e.clone()), "{label}: bounds differ");
            assert!(
                e.field.starts_with(label),
                "{label}: the error names {}",
                e.field
            );
        }
        (result, raw) => panic!("{label}: decode gave {result:?} but prost gave {raw:?}"),
    }
    let cookie = result.ok()?;
    let again = cookies::decode::<T>(label, &cookie.encode_to_vec())
        .unwrap_or_else(|e| panic!("{label}: a re-encoded cookie does not decode: {e}"));
    assert_eq!(again, cookie, "{label}: re-encoding changed the cookie");
    Some(cookie)
}

/// A cookie an agent built decodes as the cookie it is.
fn sent<T>(label: &'static str, cookie: &T)
where
    T: Message + Default + Versioned + Bounded + PartialEq + Debug,
{
    let back = cookies::decode::<T>(label, &cookie.encode_to_vec())
        .unwrap_or_else(|e| panic!("{label} built by an agent does not decode: {e}"));
    assert_eq!(&back, cookie, "{label} changed on the wire");
}

fn check_stage_results(results: &[proto::StageResult]) {
    for r in results {
        let (status, detail) = cookies::read_stage_result(r);
        assert_eq!(detail, r.detail);
        // A known status survives the round trip; an unknown one reads as pending.
        if proto::StepStatus::try_from(r.status).is_ok() {
            let rebuilt = cookies::stage_result(&r.feature, status, detail);
            assert_eq!(&rebuilt, r, "a stage result changed on a round trip");
        } else {
            assert_eq!(status, StepStatus::Pending);
        }
    }
}

/// The feature names a destination may know, to vary `check_cookie1`'s answer.
fn knows_sample(name: &str) -> bool {
    matches!(name, "port-profile" | "audit-hook")
}

fn cookie1(data: &[u8]) {
    let Some(c1) = decoded::<proto::Cookie1>("C1", data) else {
        return;
    };
    if let Some(vm) = &c1.vm
        && let Ok(spec) = cookies::vm_from_proto(vm)
    {
        // The spec round-trips, up to the driver that defaults to the name.
        let again = cookies::vm_from_proto(&cookies::vm_to_proto(&spec))
            .expect("a spec read from C1 is written back readable");
        assert_eq!(again.qemu, spec.qemu, "the machine changed on its way");
        assert_eq!(
            (
                &again.name,
                again.memory_mib,
                again.vcpus,
                again.dirty_rate_mib_s
            ),
            (
                &spec.name,
                spec.memory_mib,
                spec.vcpus,
                spec.dirty_rate_mib_s
            )
        );
        assert_eq!(again.features.len(), spec.features.len());
        for (a, b) in again.features.iter().zip(&spec.features) {
            assert_eq!(
                (&a.name, a.driver(), a.required),
                (&b.name, b.driver(), b.required)
            );
        }
    }
    let knows: [&dyn Fn(&str) -> bool; 3] = [&|_| true, &|_| false, &knows_sample];
    for knows in knows {
        match cookies::check_cookie1(&c1, knows) {
            Ok(incoming) => {
                let vm = c1.vm.as_ref().expect("accepted C1 without a VM");
                assert!(!incoming.vm.name.is_empty(), "accepted a VM with no name");
                assert!(!incoming.attempt_id.is_empty() && !incoming.migration_id.is_empty());
                assert!(record::mode_from_proto(c1.mode).is_some());
                assert!(c1.mandatory_features.iter().all(|f| knows(f)));
                let mode = record::mode_from_proto(c1.mode).expect("a mode");
                assert!(
                    vm.features
                        .iter()
                        .filter(|f| mode == Mode::Safe && f.required)
                        .all(|f| knows(&f.name)),
                    "accepted a safe-mode VM whose required feature is not known"
                );
                assert_eq!(Ok(&incoming.vm), cookies::vm_from_proto(vm).as_ref());
                if let Some(machine) = &incoming.vm.qemu {
                    assert_eq!(machine.check(), Ok(()), "accepted a malformed machine");
                }
                assert_eq!(incoming.attempt_id, c1.attempt_id);
                run_destination(incoming.clone(), &c3_completed(&incoming.attempt_id), data);
            }
            Err(CookieError::Malformed { cookie, reason }) => {
                assert_eq!(cookie, "C1");
                assert!(!reason.is_empty());
            }
            Err(CookieError::Machine { vm, error }) => {
                assert_eq!(Some(&vm), c1.vm.as_ref().map(|v| &v.name));
                assert!(error.field.starts_with("qemu."), "{error}");
            }
            Err(CookieError::UnknownMandatoryFeature(name)) => {
                assert!(!knows(&name), "{name:?} is known but was refused");
                let required_here = c1.mode == proto::Mode::Safe as i32
                    && c1
                        .vm
                        .as_ref()
                        .is_some_and(|vm| vm.features.iter().any(|f| f.name == name && f.required));
                assert!(c1.mandatory_features.contains(&name) || required_here);
            }
            Err(e @ CookieError::OutOfBounds(_)) => {
                panic!("check_cookie1 re-checked the bounds decode checked: {e}")
            }
            Err(e @ CookieError::IncompatibleVersion { .. }) => {
                panic!("check_cookie1 re-checked the version: {e}")
            }
        }
    }
}

fn cookie2(data: &[u8]) {
    let Some(c2) = decoded::<proto::Cookie2>("C2", data) else {
        return;
    };
    check_stage_results(&c2.prepare);
    check_stage_results(&c2.rollback);
    for mode in [Mode::Safe, Mode::Fast] {
        run_source(mode, &c2, &Finish::Direct(c4_committed()), data);
    }
}

fn cookie3(data: &[u8]) {
    let Some(c3) = decoded::<proto::Cookie3>("C3", data) else {
        return;
    };
    if let Some(stats) = &c3.stats {
        assert_eq!(&stats_to_proto(&stats_from_proto(stats)), stats);
    }
    let incoming = Incoming {
        attempt_id: ATTEMPT_ID.into(),
        migration_id: MIGRATION_ID.into(),
        source: SOURCE.into(),
        vm: sample_vm(),
        mode: Mode::Safe,
        postcopy: false,
        postcopy_unavailable: None,
    };
    run_destination(incoming.clone(), &c3, data);
    run_destination(
        Incoming {
            mode: Mode::Fast,
            ..incoming
        },
        &c3,
        data,
    );
}

fn cookie4(data: &[u8]) {
    let Some(c4) = decoded::<proto::Cookie4>("C4", data) else {
        return;
    };
    check_stage_results(&c4.finish);
    check_stage_results(&c4.rollback);
    let c2 = c2_accepted();
    for mode in [Mode::Safe, Mode::Fast] {
        // Finish answered, and Finish lost then answered by Resolve.
        run_source(mode, &c2, &Finish::Direct(c4.clone()), data);
        run_source(mode, &c2, &Finish::Resolved(c4.clone()), data);
    }
    // The destination's report of a rollback after an abort.
    let (mut attempt, _) = SourceAttempt::begin(source_params(Mode::Safe), START);
    attempt
        .abort(START + 1, "fuzz", Cause::Operator)
        .expect("an attempt in Prepare can be aborted");
    attempt.apply_peer_rollback(&c4);
    journal_round_trip(&attempt);
}

/// C3 as a source sends it when the transfer completed.
pub fn c3_completed(attempt_id: &str) -> proto::Cookie3 {
    proto::Cookie3 {
        protocol_version: PROTOCOL_VERSION,
        attempt_id: attempt_id.into(),
        status: proto::TransferStatus::Completed as i32,
        stats: Some(proto::TransferStats {
            bytes_total: 2 << 30,
            bytes_transferred: 2 << 30,
            iteration: 3,
            expected_downtime_ms: 120,
            elapsed_ms: 2100,
            ..Default::default()
        }),
    }
}

/// C2 of a destination that prepared both features of [`sample_vm`].
pub fn c2_accepted() -> proto::Cookie2 {
    proto::Cookie2 {
        protocol_version: PROTOCOL_VERSION,
        attempt_id: ATTEMPT_ID.into(),
        incoming_address: "sim://hv-b/web-01".into(),
        prepare: ["port-profile", "audit-hook"]
            .iter()
            .map(|f| cookies::stage_result(f, StepStatus::Ok, "prepared"))
            .collect(),
        accepted: true,
        error: String::new(),
        rollback: Vec::new(),
        postcopy: false,
        postcopy_unavailable: String::new(),
    }
}

/// C4 of a destination that committed with both features of [`sample_vm`].
pub fn c4_committed() -> proto::Cookie4 {
    proto::Cookie4 {
        protocol_version: PROTOCOL_VERSION,
        attempt_id: ATTEMPT_ID.into(),
        committed: true,
        finish: ["port-profile", "audit-hook"]
            .iter()
            .map(|f| cookies::stage_result(f, StepStatus::Ok, "finished"))
            .collect(),
        rollback: Vec::new(),
        error: String::new(),
        lost: false,
        ready_for_switchover: false,
        verify: Vec::new(),
    }
}

/// The journal stores snapshots as JSON and reads them back after a crash:
/// that must work for whatever strings a cookie brought in.
fn journal_round_trip<T>(snapshot: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let json = serde_json::to_string(snapshot).expect("a journal snapshot serializes");
    let back: T = serde_json::from_str(&json).expect("a journal snapshot reads back");
    let again = serde_json::to_string(&back).expect("a journal snapshot serializes");
    assert_eq!(json, again, "a journal snapshot changed on a round trip");
}

/// Run a destination attempt for `incoming` the way an agent does: start the
/// guest, run the prepare stages, answer with C2, take `c3` as Finish, run
/// the finish stages, resume the guest (or kill it) and roll back as the
/// hypervisor's answers make it, answer with C4. Nothing may panic, every
/// cookie it builds must decode, it must settle, and once settled its
/// answer to Resolve must agree with where it ended.
fn run_destination(incoming: Incoming, c3: &proto::Cookie3, data: &[u8]) {
    let vm = incoming.vm.clone();
    // Too little room is refused, not a panic.
    let tight = FreeCapacity {
        memory_mib: vm.memory_mib.saturating_sub(1),
        vcpus: vm.vcpus,
    };
    let refused = DestinationAttempt::prepare(
        incoming.clone(),
        DESTINATION,
        tight,
        false,
        None,
        Timing::default(),
        START,
    );
    assert_eq!(refused.is_err(), vm.memory_mib > 0, "capacity check");
    let roomy = FreeCapacity {
        memory_mib: u64::MAX,
        vcpus: u32::MAX,
    };
    let (mut attempt, actions) = DestinationAttempt::prepare(
        incoming,
        DESTINATION,
        roomy,
        false,
        None,
        Timing::default(),
        START,
    )
    .expect("prepare with room to spare");
    let mut stages = Stages::new(data);
    let mut hypervisor = Hypervisor::new(data);
    let mut queue: VecDeque<DestinationAction> = actions.into();
    let mut now = START;
    let mut finish_sent = false;
    for _ in 0..MAX_STEPS {
        let Some(action) = queue.pop_front() else {
            break;
        };
        now += 1;
        let input = match action {
            DestinationAction::Journal(snapshot) => {
                journal_round_trip(&*snapshot);
                None
            }
            DestinationAction::StartIncoming => Some(DestinationInput::IncomingStarted(
                hypervisor.start(format!("sim://{DESTINATION}/{}", vm.name)),
            )),
            DestinationAction::CompleteIncoming(_) => {
                Some(DestinationInput::IncomingCompleted(Ok(())))
            }
            DestinationAction::AwaitSwitchover => {
                Some(DestinationInput::SwitchoverArrived(Ok(true)))
            }
            DestinationAction::RunStage { feature, stage } => {
                assert!(
                    feature < vm.features.len(),
                    "stage of feature {feature} run"
                );
                Some(DestinationInput::StageDone {
                    feature,
                    stage,
                    result: stages.outcome(stage),
                })
            }
            DestinationAction::ReplyPrepare(c2) => {
                sent("C2", &c2);
                check_stage_results(&c2.prepare);
                (c2.accepted && !finish_sent).then(|| {
                    finish_sent = true;
                    DestinationInput::Finish(c3.clone())
                })
            }
            DestinationAction::ReplyFinish(c4) => {
                sent("C4", &c4);
                None
            }
            DestinationAction::RecordPending { work, .. } => {
                match work {
                    PendingWork::Stage { feature, stage } => {
                        assert!(feature < vm.features.len());
                        assert_eq!(stage, Stage::Rollback, "a destination only undoes");
                    }
                    PendingWork::Kill => {}
                    other => panic!("a destination recorded a pending {other:?}"),
                }
                None
            }
            DestinationAction::ResumeGuest => {
                Some(DestinationInput::GuestResumed(hypervisor.call()))
            }
            DestinationAction::KillGuest => Some(DestinationInput::GuestKilled(hypervisor.call())),
            DestinationAction::QueryGuest => {
                Some(DestinationInput::GuestStatus(hypervisor.probe()))
            }
            DestinationAction::GuestLost { reason } => {
                assert!(
                    attempt.lost().is_some() && attempt.is_committed(),
                    "{reason}"
                );
                None
            }
            DestinationAction::NotifySource { .. } | DestinationAction::Finished { .. } => None,
        };
        if let Some(input) = input {
            queue.extend(attempt.handle(now, input));
        }
    }
    assert!(queue.is_empty(), "the destination attempt never settles");
    if attempt.is_finished() {
        // What it answers Resolve, and the C4 it would send, say where it ended.
        let expected = if attempt.lost().is_some() {
            Answer::Lost
        } else if attempt.guest_runs() {
            Answer::Committed
        } else {
            assert_eq!(attempt.state, DestinationState::RolledBack);
            Answer::NotCommitted
        };
        assert_eq!(attempt.answer(), expected);
        let c4 = attempt.cookie4();
        assert_eq!(c4.committed, attempt.is_committed());
        assert_eq!(c4.lost, attempt.lost().is_some());
    } else {
        // Waiting for a Finish that will not come: the source is lost.
        let deadline = attempt
            .poll_timeout()
            .expect("an unfinished destination attempt waits for something");
        let actions = attempt.handle(deadline.max(now), DestinationInput::Timer);
        for action in actions {
            if let DestinationAction::Journal(snapshot) = action {
                journal_round_trip(&*snapshot);
            }
        }
    }
    sent("C4", &attempt.cookie4());
    let _ = attempt.resolve(now + 1);
}

fn source_params(mode: Mode) -> AttemptParams {
    AttemptParams {
        migration_id: MIGRATION_ID.into(),
        attempt: 1,
        host: SOURCE.into(),
        destination: DESTINATION.into(),
        incoming_host: DESTINATION.into(),
        vm: sample_vm(),
        mode,
        completion: Default::default(),
        timing: Timing::default(),
        started_at_ms: START,
    }
}

/// How the destination answers Finish in [`run_source`].
enum Finish {
    /// It answers with this C4.
    Direct(proto::Cookie4),
    /// The answer is lost; Resolve then brings this C4 (committed or not, as it says).
    Resolved(proto::Cookie4),
}

/// Resolve rounds after which a source that no answer can decide has shown
/// it keeps asking (the real one asks for ever, with backoff).
const RESOLVE_ROUNDS: usize = 8;

/// Run a source attempt the way an agent does, with `c2` as the answer to
/// Prepare and `finish` as the answer to Finish, and the hypervisor's
/// answers to its cancel, resume and kill calls. Nothing may panic and
/// every journal snapshot must read back. The attempt must end, unless the
/// destination's answer cannot decide it (a C4 of another attempt, or a
/// commit the destination lost): then it must stay unresolved, keep asking,
/// and never resume or kill its guest on its own.
fn run_source(mode: Mode, c2: &proto::Cookie2, finish: &Finish, data: &[u8]) {
    let (mut attempt, actions) = SourceAttempt::begin(source_params(mode), START);
    let features = attempt.vm.features.len();
    let mut stages = Stages::new(data);
    let mut hypervisor = Hypervisor::new(data);
    let mut queue: VecDeque<SourceAction> = actions.into();
    let mut now = START;
    let mut finish_sent = false;
    let mut guest_calls_after_finish = 0;
    let mut resolves = 0;
    for _ in 0..MAX_STEPS {
        let Some(action) = queue.pop_front() else {
            if attempt.is_done() || resolves > RESOLVE_ROUNDS {
                break;
            }
            // Nothing in flight: let the timers run (heartbeats, Resolve).
            let Some(due) = attempt.poll_timeout() else {
                break;
            };
            now = now.max(due);
            queue.extend(attempt.handle(now, SourceInput::Timer));
            continue;
        };
        now += 1;
        let input = match action {
            SourceAction::Journal(snapshot) => {
                journal_round_trip(&*snapshot);
                let record = &snapshot.record;
                let _ = (record_summary(record), state_summary(record));
                None
            }
            SourceAction::SendPrepare(c1) => {
                sent("C1", &c1);
                cookies::check_cookie1(&c1, |_| true).expect("our own C1 is well formed");
                Some(SourceInput::PrepareReplied(Ok(c2.clone())))
            }
            SourceAction::StartTransfer { .. } => Some(SourceInput::TransferDone(Ok(
                tern::protocol::TransferStats {
                    bytes_total: 1 << 31,
                    bytes_transferred: 1 << 31,
                    ..Default::default()
                },
            ))),
            SourceAction::CancelTransfer => Some(SourceInput::TransferStopped { completed: false }),
            SourceAction::StartPostcopy => Some(SourceInput::PostcopyStarted(Ok(()))),
            SourceAction::WatchTransfer
            | SourceAction::SendRecover
            | SourceAction::PausePostcopy
            | SourceAction::ResumePostcopy { .. } => None,
            SourceAction::SendFinish(c3) => {
                sent("C3", &c3);
                finish_sent = true;
                Some(SourceInput::FinishReplied(match finish {
                    Finish::Direct(c4) => Ok(c4.clone()),
                    Finish::Resolved(_) => Err(PeerError::Unreachable("fuzz: reply lost".into())),
                }))
            }
            SourceAction::SendResolve => {
                resolves += 1;
                Some(SourceInput::ResolveReplied(Ok(match finish {
                    Finish::Resolved(c4) if c4.lost => Resolution::Lost(c4.clone()),
                    Finish::Resolved(c4) if c4.committed => Resolution::Committed(c4.clone()),
                    Finish::Resolved(c4) => Resolution::NotCommitted(c4.clone()),
                    Finish::Direct(_) => Resolution::Pending,
                })))
            }
            SourceAction::SendAbort { reason } => {
                assert!(!reason.is_empty(), "an abort says why");
                Some(SourceInput::AbortReplied(Ok(AbortAnswer {
                    aborted: true,
                    committed: false,
                    detail: String::new(),
                    c4: None,
                })))
            }
            SourceAction::SendHeartbeat => Some(SourceInput::HeartbeatReplied(Ok(true))),
            SourceAction::ResumeGuest => {
                guest_calls_after_finish += usize::from(finish_sent);
                Some(SourceInput::GuestResumed(hypervisor.call()))
            }
            SourceAction::KillGuest => {
                guest_calls_after_finish += usize::from(finish_sent);
                Some(SourceInput::GuestKilled(hypervisor.call()))
            }
            SourceAction::RunStage { feature, stage } => {
                assert!(feature < features, "stage of feature {feature} run");
                assert_eq!(stage, Stage::Release, "a source only releases");
                Some(SourceInput::StageDone {
                    feature,
                    stage,
                    result: stages.outcome(stage),
                })
            }
            SourceAction::RecordPending { work, .. } => {
                match work {
                    PendingWork::Stage { feature, stage } => {
                        assert!(feature < features);
                        assert_eq!(stage, Stage::Release);
                    }
                    PendingWork::Resume | PendingWork::Kill => {}
                    PendingWork::Notify => panic!("a pending notify without a forced decision"),
                }
                None
            }
            SourceAction::Finished(outcome) => {
                assert_eq!(attempt.record.outcome, Some(outcome));
                None
            }
        };
        if let Some(input) = input {
            queue.extend(attempt.handle(now, input));
        }
    }
    let answer = match finish {
        Finish::Direct(c4) | Finish::Resolved(c4) => c4,
    };
    let decides = answer.attempt_id == ATTEMPT_ID && !answer.lost;
    if finish_sent && !decides {
        assert_eq!(
            attempt.state,
            SourceState::Unresolved,
            "an answer that decides nothing moved the attempt"
        );
        assert!(resolves > RESOLVE_ROUNDS, "the source stopped asking");
        assert_eq!(guest_calls_after_finish, 0, "the source acted on its own");
    } else {
        assert!(
            attempt.is_done(),
            "the source attempt never ends: {:?}",
            attempt.state
        );
    }
    let record = &attempt.record;
    assert!(record.outcome.is_some());
    let _ = (
        record_summary(record),
        state_summary(record),
        started_line(record),
    );
    // What the console sends is stable through the CLI's conversion.
    let wire = proto::MigrationRecord::from(record);
    assert_eq!(
        proto::MigrationRecord::from(&MigrationRecord::from(&wire)),
        wire
    );
}

/// The bytes as a console `MigrationRecord`: converted as `tern status` and
/// `tern watch` do, rendered, and back to protobuf.
fn console_record(data: &[u8]) {
    let Ok(wire) = proto::MigrationRecord::decode(data) else {
        return;
    };
    let record = MigrationRecord::from(&wire);
    assert_eq!(record.phases.len(), 5);
    let _ = (
        record_summary(&record),
        state_summary(&record),
        started_line(&record),
    );
    let _ = record.current_phase();
    let _ = record.running_phase();
    let json = serde_json::to_string(&record).expect("a record serializes");
    let _: MigrationRecord = serde_json::from_str(&json).expect("`--json` output reads back");
    let again = MigrationRecord::from(&proto::MigrationRecord::from(&record));
    assert_eq!(again, record, "a record changed on a round trip");
}

// ===========================================================================
// Config
// ===========================================================================

/// The path the parsers are told the text came from; errors must name it.
pub const CONFIG_PATH: &str = "fuzz/agent.toml";
pub const INVENTORY_PATH: &str = "fuzz/cluster.toml";

/// A valid agent config using every section (the structured variant's start).
pub const AGENT_CONFIG: &str = r#"
name = "hv-a"
listen = "127.0.0.1:7701"
state_dir = "state/hv-a"
inventory = "cluster.toml"
heartbeat_interval_ms = 1000
peer_timeout_ms = 5000
stall_timeout_ms = 10000
rollback_retry_ms = 2000

[hypervisor]
kind = "sim"
bandwidth_mib_s = 1024
speed = 1.0
downtime_limit_ms = 300
memory_mib = 65536
vcpus = 64

[[vm]]
name = "web-01"
memory_mib = 2048
vcpus = 2
dirty_rate_mib_s = 50
features = [{ name = "port-profile", required = true }, { name = "audit-hook", required = false }]

[[vm]]
name = "db-01"
memory_mib = 8192
vcpus = 4
features = [{ name = "port-profile", driver = "port-profile", required = true }]

[features.port-profile]
switch = "sim"
switch_name = "tor-a"
latency_ms = 20
fail = ["finish"]
fail_rate = 0.25
fail_rollback = false

[features.audit-hook]
driver = "exec"
command = ["hooks/log-stage.sh", "--verbose"]
timeout_ms = 5000
"#;

/// A valid inventory (the structured variant's start).
pub const INVENTORY: &str = r#"
[[host]]
name = "hv-a"
address = "http://127.0.0.1:7701"

[[host]]
name = "hv-b"
address = "https://hv-b.example:7702"
"#;

/// The whole config check: `data` as text, and as edits to a valid config.
pub fn config_parse(data: &[u8]) {
    config_text(&String::from_utf8_lossy(data));
    let (agent, inventory) = edited_configs(data);
    if let Some(text) = agent {
        check_agent_config(&text);
    }
    if let Some(text) = inventory {
        check_inventory(&text);
    }
}

/// `text` as an agent config and as an inventory.
pub fn config_text(text: &str) {
    check_agent_config(text);
    check_inventory(text);
}

fn check_error(path: &str, error: ConfigError) {
    match &error {
        ConfigError::Invalid {
            path: named,
            message,
        } => {
            assert_eq!(named, Path::new(path));
            assert!(!message.trim().is_empty(), "an error without a message");
        }
        ConfigError::Read { .. } => panic!("parsing text read a file: {error}"),
    }
    let shown = error.to_string();
    assert!(
        shown.starts_with(path),
        "the error does not name the file: {shown}"
    );
}

/// Parse `text` as an agent config; an accepted one keeps config.rs's promises.
pub fn check_agent_config(text: &str) {
    let config = match AgentConfig::parse(Path::new(CONFIG_PATH), text) {
        Ok(config) => config,
        Err(e) => return check_error(CONFIG_PATH, e),
    };
    assert!(!config.name.trim().is_empty(), "accepted an empty name");
    assert!(
        config.listen.parse::<std::net::SocketAddr>().is_ok(),
        "accepted listen = {:?}",
        config.listen
    );
    assert!(config.heartbeat_interval_ms > 0);
    assert!(config.peer_timeout_ms > config.heartbeat_interval_ms);
    let hv = &config.hypervisor;
    assert_eq!(hv.kind, "sim");
    assert!(hv.bandwidth_mib_s > 0);
    assert!(
        hv.speed > 0.0 && hv.speed.is_finite(),
        "accepted speed = {}",
        hv.speed
    );
    let registry = FeatureRegistry::from_config(&config.name, &config.features)
        .expect("an accepted config's features build");
    for (name, faults) in registry.faults() {
        assert!(
            (0.0..=1.0).contains(&faults.fail_rate),
            "[features.{name}] accepted fail_rate = {}",
            faults.fail_rate
        );
    }
    let mut names = std::collections::HashSet::new();
    for vm in &config.vm {
        assert!(!vm.name.trim().is_empty(), "accepted a [[vm]] with no name");
        assert!(vm.vcpus > 0, "accepted [[vm]] {} with no vCPU", vm.name);
        assert!(names.insert(&vm.name), "accepted [[vm]] {} twice", vm.name);
        if let Some(machine) = &vm.qemu {
            assert_eq!(
                machine.check(),
                Ok(()),
                "accepted [[vm]] {} with a malformed machine",
                vm.name
            );
        }
        let mut features = std::collections::HashSet::new();
        for f in &vm.features {
            assert!(
                registry.knows(&f.name),
                "[[vm]] {} needs unknown {}",
                vm.name,
                f.name
            );
            assert!(
                features.insert(&f.name),
                "[[vm]] {} lists {} twice",
                vm.name,
                f.name
            );
        }
    }
    check_timing_fits(&config);
}

/// The agent adds its timers to the clock (unix milliseconds) and doubles the
/// peer timeout: an accepted config must leave room for that until far in
/// the future instead of overflowing at run time.
fn check_timing_fits(config: &AgentConfig) {
    const YEAR_3000_MS: u64 = 32_503_680_000_000;
    let timing = config.timing();
    for (key, value) in [
        ("heartbeat_interval_ms", timing.heartbeat_interval_ms),
        ("peer_timeout_ms", timing.peer_timeout_ms),
        ("stall_timeout_ms", timing.stall_timeout_ms),
        ("rollback_retry_ms", config.rollback_retry_ms),
    ] {
        assert!(
            value
                .checked_mul(2)
                .and_then(|v| v.checked_add(YEAR_3000_MS))
                .is_some(),
            "accepted {key} = {value}, which overflows the agent's clock arithmetic"
        );
    }
}

/// Parse `text` as an inventory; an accepted one keeps config.rs's promises.
pub fn check_inventory(text: &str) {
    let inventory = match Inventory::parse(Path::new(INVENTORY_PATH), text) {
        Ok(inventory) => inventory,
        Err(e) => return check_error(INVENTORY_PATH, e),
    };
    assert!(
        !inventory.host.is_empty(),
        "accepted an inventory without hosts"
    );
    let mut names = std::collections::HashSet::new();
    for host in &inventory.host {
        assert!(!host.name.trim().is_empty(), "accepted a host with no name");
        assert!(
            names.insert(&host.name),
            "accepted host {} twice",
            host.name
        );
        assert!(
            host.address.starts_with("http://") || host.address.starts_with("https://"),
            "accepted address {:?}",
            host.address
        );
        assert_eq!(
            inventory.host(&host.name).map(|h| &h.address),
            Some(&host.address)
        );
    }
}

// ---- structured variant: edits to a valid config ---------------------------

/// Keys the edits insert or rename to: every key config.rs and the drivers
/// know, plus a few they do not.
const KEYS: &[&str] = &[
    "name",
    "listen",
    "state_dir",
    "inventory",
    "heartbeat_interval_ms",
    "peer_timeout_ms",
    "stall_timeout_ms",
    "rollback_retry_ms",
    "hypervisor",
    "vm",
    "features",
    "kind",
    "bandwidth_mib_s",
    "speed",
    "downtime_limit_ms",
    "memory_mib",
    "vcpus",
    "dirty_rate_mib_s",
    "driver",
    "required",
    "switch",
    "switch_name",
    "fail",
    "fail_rate",
    "latency_ms",
    "fail_rollback",
    "command",
    "timeout_ms",
    "host",
    "address",
    "port-profile",
    "audit-hook",
    "exec",
    "",
    "bogus",
    "ünïcødé",
];

/// Values the edits put in: edges of every type the configs use.
fn interesting_value(pick: u8) -> toml::Value {
    static VALUES: OnceLock<Vec<toml::Value>> = OnceLock::new();
    let values = VALUES.get_or_init(interesting_values);
    values[usize::from(pick) % values.len()].clone()
}

fn interesting_values() -> Vec<toml::Value> {
    use toml::Value as V;
    let table = |text: &str| V::Table(text.parse().expect("built-in table is valid TOML"));
    vec![
        V::Integer(0),
        V::Integer(1),
        V::Integer(-1),
        V::Integer(2),
        V::Integer(i64::MAX),
        V::Integer(i64::MAX / 2),
        V::Integer(1 << 62),
        V::Integer(i64::MIN),
        V::Integer(i64::from(u32::MAX)),
        V::Integer(i64::from(u32::MAX) + 1),
        V::Integer(1 << 53),
        V::Float(0.0),
        V::Float(-0.0),
        V::Float(0.5),
        V::Float(1.0),
        V::Float(1.5),
        V::Float(-1.0),
        V::Float(f64::NAN),
        V::Float(f64::INFINITY),
        V::Float(f64::NEG_INFINITY),
        V::Float(f64::MAX),
        V::Float(f64::MIN_POSITIVE),
        V::Float(5e-324),
        V::Float(1e-30),
        V::Boolean(true),
        V::Boolean(false),
        V::String(String::new()),
        V::String(" ".into()),
        V::String("sim".into()),
        V::String("qemu".into()),
        V::String("exec".into()),
        V::String("port-profile".into()),
        V::String("audit-hook".into()),
        V::String("finish".into()),
        V::String("hv-a".into()),
        V::String("127.0.0.1:0".into()),
        V::String("[::1]:7701".into()),
        V::String("localhost:7701".into()),
        V::String("http://".into()),
        V::String("https://[::1]:1".into()),
        V::String("a\0b".into()),
        V::String("\u{202e}ü\u{1F600}".into()),
        V::String("/".into()),
        V::String("x".repeat(300)),
        V::Array(Vec::new()),
        V::Array(vec![V::String("finish".into())]),
        V::Array(
            ["prepare", "finish", "rollback", "release", "finish"]
                .iter()
                .map(|s| V::String((*s).into()))
                .collect(),
        ),
        V::Array(vec![V::String(String::new())]),
        V::Array(vec![V::Integer(1)]),
        V::Array(vec![V::Array(Vec::new())]),
        V::Table(toml::Table::new()),
        table("name = \"vm-x\"\nmemory_mib = 1\nvcpus = 1"),
        table("name = \"port-profile\"\nrequired = true"),
        table("name = \"audit-hook\""),
        table("switch = \"sim\""),
        table("driver = \"exec\"\ncommand = [\"/bin/true\"]"),
        table("name = \"hv-c\"\naddress = \"http://127.0.0.1:7703\""),
        V::Datetime("1979-05-27T07:32:00Z".parse().expect("a valid datetime")),
    ]
}

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Every value in `value`, as paths from it.
fn paths(value: &toml::Value, path: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table {
                path.push(Seg::Key(key.clone()));
                out.push(path.clone());
                paths(v, path, out);
                path.pop();
            }
        }
        toml::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                out.push(path.clone());
                paths(v, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(mut value: &'a mut toml::Value, path: &[Seg]) -> Option<&'a mut toml::Value> {
    for seg in path {
        value = match (value, seg) {
            (toml::Value::Table(t), Seg::Key(k)) => t.get_mut(k)?,
            (toml::Value::Array(a), Seg::Index(i)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Apply the edits `ops` describes to `base`; `None` when the result cannot
/// be written as TOML (e.g. a value replaced the root).
fn edit(base: &toml::Table, ops: &[u8]) -> Option<String> {
    let mut root = toml::Value::Table(base.clone());
    let mut bytes = ops.iter().copied();
    // A few edits keep most results valid enough to reach the later checks.
    for _ in 0..8 {
        let (Some(op), Some(which)) = (bytes.next(), bytes.next()) else {
            break;
        };
        let mut all = vec![Vec::new()];
        paths(&root, &mut Vec::new(), &mut all);
        let path = &all[usize::from(which) % all.len()];
        let arg = bytes.next().unwrap_or(0);
        match op % 8 {
            // Replace the value.
            0..=2 if !path.is_empty() => *at(&mut root, path)? = interesting_value(arg),
            // Remove it.
            3 if !path.is_empty() => {
                let (last, parent) = path.split_last()?;
                match (at(&mut root, parent)?, last) {
                    (toml::Value::Table(t), Seg::Key(k)) => {
                        t.remove(k);
                    }
                    (toml::Value::Array(a), Seg::Index(i)) => {
                        a.remove(*i);
                    }
                    _ => {}
                }
            }
            // Insert a key, or append to an array.
            4 | 5 => match at(&mut root, path)? {
                toml::Value::Table(t) => {
                    let key = KEYS[usize::from(arg) % KEYS.len()];
                    t.insert(key.into(), interesting_value(bytes.next().unwrap_or(0)));
                }
                toml::Value::Array(a) => a.push(interesting_value(arg)),
                _ => {}
            },
            // Duplicate an array element (a second [[vm]], a repeated feature).
            6 => {
                if let toml::Value::Array(a) = at(&mut root, path)?
                    && !a.is_empty()
                {
                    let copy = a[usize::from(arg) % a.len()].clone();
                    a.push(copy);
                }
            }
            // Rename a key.
            _ => {
                let (Some((Seg::Key(old), parent)), Some(new)) =
                    (path.split_last(), KEYS.get(usize::from(arg) % KEYS.len()))
                else {
                    continue;
                };
                if let toml::Value::Table(t) = at(&mut root, parent)?
                    && let Some(v) = t.remove(old)
                {
                    t.insert((*new).into(), v);
                }
            }
        }
    }
    match root {
        toml::Value::Table(table) => toml::to_string(&table).ok(),
        _ => None,
    }
}

/// The agent config and the inventory after the edits `data` describes; the
/// first byte picks which file the edits go to.
pub fn edited_configs(data: &[u8]) -> (Option<String>, Option<String>) {
    static BASES: OnceLock<(toml::Table, toml::Table)> = OnceLock::new();
    let (agent, inventory) = BASES.get_or_init(|| {
        let parse = |text: &str| text.parse().expect("the base config is valid TOML");
        (parse(AGENT_CONFIG), parse(INVENTORY))
    });
    match data.split_first() {
        None => (Some(AGENT_CONFIG.into()), Some(INVENTORY.into())),
        Some((which, ops)) if which % 4 == 0 => (None, edit(inventory, ops)),
        Some((_, ops)) => (edit(agent, ops), None),
    }
}
