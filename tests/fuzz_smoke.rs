//! A short, deterministic run of the fuzz targets on stable, for CI: every
//! file of `fuzz/corpus/<target>/` and a few thousand seeded mutations of them
//! go through the same checks libFuzzer runs (`fuzz/checks.rs`). Inputs the
//! fuzzer found crashing are pinned at the end as regression tests.
//!
//! A failure prints the input as a Rust byte string, ready to become a
//! regression test here. Run the real fuzzers with `cargo +nightly fuzz run`
//! (see fuzz/README.md).

#[path = "../fuzz/checks.rs"]
mod checks;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Mutated inputs per target, sized so each test takes about a second in a
/// debug build (a config input costs about three cookies: three TOML parses).
const COOKIE_MUTATIONS: usize = 3000;
const CONFIG_MUTATIONS: usize = 2500;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The corpus files of `target`, by name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a corpus entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&path).expect("a readable corpus file");
            (name, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
}

/// Run `check` on `input`; a panic fails the test with the input spelled out.
fn run_one(target: &str, what: &str, input: &[u8], check: fn(&[u8])) {
    if catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
        panic!(
            "{target} failed on {what} ({} bytes); the panic is above. Input:\nb\"{}\"",
            input.len(),
            input.escape_ascii()
        );
    }
}

/// Tokens worth inserting: protobuf field headers and varints for cookies,
/// TOML syntax and edge values for configs.
const TOKENS: &[&[u8]] = &[
    b"\x08\x01",
    b"\x08\x02",
    b"\x12\x04m1.1",
    b"\x2a\x00",
    b"\x30\x02",
    b"\x10\x03",
    b"\x18\x01",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x80\x80\x80\x80\x10",
    b"\x22\xff\xff\xff\xff\x0f",
    b"[[vm]]\n",
    b"[[host]]\n",
    b"[features.x]\n",
    b"[hypervisor]\n",
    b" = ",
    b"\"",
    b"'''",
    b"\n",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b".",
    b"18446744073709551615",
    b"9223372036854775807",
    b"-1",
    b"0",
    b"nan",
    b"inf",
    b"1e400",
    b"5e-324",
    b"true",
    b"\"\"",
    b"\\u0000",
    b"1979-05-27T07:32:00Z",
    b"heartbeat_interval_ms",
    b"peer_timeout_ms",
    b"speed",
    b"fail_rate",
    b"driver = \"exec\"",
    b"command = []",
];

/// A seeded mutation of one corpus file (sometimes spliced with another).
fn mutate(rng: &mut StdRng, corpus: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut data = corpus[rng.random_range(0..corpus.len())].1.clone();
    for _ in 0..rng.random_range(1..=4) {
        let len = data.len();
        let at = if len == 0 {
            0
        } else {
            rng.random_range(0..len)
        };
        match rng.random_range(0..8) {
            0 if len > 0 => data[at] ^= 1 << rng.random_range(0..8),
            1 if len > 0 => data[at] = [0, 0x7f, 0x80, 0xff, rng.random()][rng.random_range(0..5)],
            2 => {
                let bytes: Vec<u8> = (0..rng.random_range(1..8)).map(|_| rng.random()).collect();
                data.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let end = rng.random_range(at..=len.min(at + 16));
                data.drain(at..end);
            }
            4 => data.truncate(at),
            5 if len > 0 => {
                let end = rng.random_range(at..=len.min(at + 32));
                let copy = data[at..end].to_vec();
                let to = rng.random_range(0..=len);
                data.splice(to..to, copy);
            }
            6 => {
                let other = &corpus[rng.random_range(0..corpus.len())].1;
                let from = rng.random_range(0..=other.len());
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            _ => {
                let token = TOKENS[rng.random_range(0..TOKENS.len())];
                data.splice(at..at, token.iter().copied());
            }
        }
    }
    data
}

/// The corpus, then `mutations` seeded mutations of it, through `check`.
fn smoke(target: &str, seed: u64, mutations: usize, check: fn(&[u8])) {
    let corpus = corpus(target);
    for (name, bytes) in &corpus {
        run_one(target, &format!("corpus file {name}"), bytes, check);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..mutations {
        let input = mutate(&mut rng, &corpus);
        run_one(
            target,
            &format!("mutation {i} (seed {seed})"),
            &input,
            check,
        );
    }
}

#[test]
fn cookie_decode_survives_corpus_and_mutations() {
    smoke(
        "cookie_decode",
        0xC00C1E,
        COOKIE_MUTATIONS,
        checks::cookie_decode,
    );
}

#[test]
fn config_parse_survives_corpus_and_mutations() {
    smoke(
        "config_parse",
        0xC0F16,
        CONFIG_MUTATIONS,
        checks::config_parse,
    );
}

#[test]
fn corpus_stays_small() {
    let total: usize = ["cookie_decode", "config_parse"]
        .iter()
        .map(|t| corpus(t).len())
        .sum();
    assert!(
        total <= 50,
        "{total} corpus files: keep the committed seeds few"
    );
}

/// The structured variant edits valid configs: they must stay valid, or
/// every edit only explores the first error.
#[test]
fn structured_variant_starts_from_valid_configs() {
    let path = Path::new("fuzz.toml");
    tern::config::AgentConfig::parse(path, checks::AGENT_CONFIG).expect("AGENT_CONFIG is valid");
    tern::config::Inventory::parse(path, checks::INVENTORY).expect("INVENTORY is valid");
    // No edits: both files, unchanged.
    let (agent, inventory) = checks::edited_configs(&[]);
    assert_eq!(agent.as_deref(), Some(checks::AGENT_CONFIG));
    assert_eq!(inventory.as_deref(), Some(checks::INVENTORY));
}

/// The cookie seeds still decode as the current protocol's cookies, so the
/// fuzzer starts past the version check (regenerate them if this fails).
#[test]
fn cookie_seeds_match_the_protocol() {
    use tern::proto;
    use tern::protocol::cookies::decode;
    let files = corpus("cookie_decode");
    let decoding = |prefix: &str, ok: &dyn Fn(&[u8]) -> bool| {
        let seeds: Vec<_> = files
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .collect();
        assert!(!seeds.is_empty(), "no {prefix}* seed");
        assert!(
            seeds.iter().any(|(_, b)| ok(b)),
            "no {prefix}* seed decodes: regenerate with `cargo test --test fuzz_smoke -- --ignored write_cookie_seeds`"
        );
    };
    decoding("c1-", &|b| decode::<proto::Cookie1>("C1", b).is_ok());
    decoding("c2-", &|b| decode::<proto::Cookie2>("C2", b).is_ok());
    decoding("c3-", &|b| decode::<proto::Cookie3>("C3", b).is_ok());
    decoding("c4-", &|b| decode::<proto::Cookie4>("C4", b).is_ok());
}

/// Writes the binary cookie seeds of `fuzz/corpus/cookie_decode/`. Run it by
/// hand after a cookie changes: `cargo test --test fuzz_smoke -- --ignored write_cookie_seeds`.
#[test]
#[ignore = "writes the committed seed corpus"]
fn write_cookie_seeds() {
    use prost::Message;
    use tern::proto;
    use tern::protocol::cookies;
    use tern::protocol::machine::{Disk, DiskFormat, Nic, QemuMachine, Vsi};
    use tern::protocol::{Mode, PROTOCOL_VERSION, StepStatus, VmSpec};

    let c1 = cookies::cookie1(
        checks::ATTEMPT_ID,
        checks::MIGRATION_ID,
        checks::SOURCE,
        &checks::sample_vm(),
        Mode::Safe,
    );
    let c1_unknown = proto::Cookie1 {
        mode: proto::Mode::Fast as i32,
        mandatory_features: vec!["port-profile".into(), "vtpm".into()],
        ..c1.clone()
    };
    let c1_qemu = cookies::cookie1(
        checks::ATTEMPT_ID,
        checks::MIGRATION_ID,
        checks::SOURCE,
        &VmSpec {
            qemu: Some(QemuMachine {
                machine: "q35".into(),
                kernel: "vmlinuz".into(),
                append: "console=ttyS0".into(),
                disks: vec![Disk {
                    storage: "images".into(),
                    path: "web-01/root.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    readonly: false,
                }],
                nics: vec![Nic {
                    mac: "52:54:00:12:34:56".into(),
                    network: "lan".into(),
                    vlan: Some(100),
                    vsi: Some(Vsi {
                        manager_id: 0,
                        type_id: 5,
                        type_version: 1,
                        instance: "6b3a0f2c-2d1e-4c55-9a3b-0e7d2f8c1a44".into(),
                    }),
                }],
                legacy_args: Vec::new(),
            }),
            ..checks::sample_vm()
        },
        Mode::Safe,
    );
    let c1_other_version = proto::Cookie1 {
        protocol_version: PROTOCOL_VERSION + 1,
        ..c1.clone()
    };
    let c2_refused = proto::Cookie2 {
        accepted: false,
        error: "prepare of port-profile failed: ASSOCIATE rejected".into(),
        prepare: vec![
            cookies::stage_result("port-profile", StepStatus::Failed, "prepare: rejected"),
            cookies::stage_result("audit-hook", StepStatus::Ok, "prepared"),
        ],
        rollback: vec![cookies::stage_result(
            "audit-hook",
            StepStatus::Ok,
            "rolled back",
        )],
        ..checks::c2_accepted()
    };
    let c3_failed = proto::Cookie3 {
        status: proto::TransferStatus::Failed as i32,
        stats: None,
        ..checks::c3_completed(checks::ATTEMPT_ID)
    };
    let c4_not_committed = proto::Cookie4 {
        committed: false,
        finish: vec![cookies::stage_result(
            "port-profile",
            StepStatus::Failed,
            "finish: ASSOCIATE rejected by switch tor-b",
        )],
        rollback: vec![
            cookies::stage_result("port-profile", StepStatus::Ok, "rolled back"),
            proto::StageResult {
                feature: "audit-hook".into(),
                status: 99,
                detail: String::new(),
            },
        ],
        error: "required feature port-profile failed".into(),
        ..checks::c4_committed()
    };
    let record = proto::MigrationRecord {
        cause: 0,
        failure: None,
        guest: 0,
        completion: None,
        convergence: None,
        completion_note: String::new(),
        recovery: None,
        repairs: Vec::new(),
        id: checks::MIGRATION_ID.into(),
        vm: "web-01".into(),
        source: checks::SOURCE.into(),
        destination: checks::DESTINATION.into(),
        mode: proto::Mode::Safe as i32,
        attempt: 2,
        outcome: proto::Outcome::Degraded as i32,
        running_on: checks::DESTINATION.into(),
        error: "audit-hook finish: exit 1".into(),
        phases: (0..5)
            .map(|phase| proto::PhaseRecord {
                phase,
                status: proto::StepStatus::Ok as i32,
                duration_ms: 40,
            })
            .collect(),
        features: vec![proto::FeatureRecord {
            name: "audit-hook".into(),
            required: false,
            prepare: proto::StepStatus::Ok as i32,
            finish: proto::StepStatus::Failed as i32,
            rollback: proto::StepStatus::Skipped as i32,
            release: proto::StepStatus::Ok as i32,
            verify: proto::StepStatus::Skipped as i32,
            error: "finish: exit 1".into(),
            detail: String::new(),
        }],
        transfer: checks::c3_completed(checks::ATTEMPT_ID).stats,
        attempt_id: "m-0000000000a1.2".into(),
        started_at_ms: 1_700_000_000_000,
        updated_at_ms: 1_700_000_002_000,
        committed: true,
        cookies: vec![
            proto::CookieRecord::from(&cookies::describe(&c1)),
            proto::CookieRecord::from(&cookies::describe(&c4_not_committed)),
        ],
    };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("c1-safe.bin", c1.encode_to_vec()),
        ("c1-fast-unknown-mandatory.bin", c1_unknown.encode_to_vec()),
        ("c1-qemu-machine.bin", c1_qemu.encode_to_vec()),
        ("c1-other-version.bin", c1_other_version.encode_to_vec()),
        ("c2-accepted.bin", checks::c2_accepted().encode_to_vec()),
        ("c2-refused.bin", c2_refused.encode_to_vec()),
        (
            "c3-completed.bin",
            checks::c3_completed(checks::ATTEMPT_ID).encode_to_vec(),
        ),
        ("c3-failed.bin", c3_failed.encode_to_vec()),
        ("c4-committed.bin", checks::c4_committed().encode_to_vec()),
        ("c4-not-committed.bin", c4_not_committed.encode_to_vec()),
        ("record-degraded.bin", record.encode_to_vec()),
        ("empty.bin", Vec::new()),
        ("garbage.bin", vec![0xff, 0xff, 0xff]),
    ];
    let dir = corpus_dir("cookie_decode");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

// ---- regression tests: inputs the fuzzers found ------------------------------

/// `text` with the line `key = …` set to `key = value`.
fn with_setting(text: &str, key: &str, value: u64) -> String {
    let prefix = format!("{key} =");
    text.lines()
        .map(|line| {
            if line.starts_with(&prefix) {
                format!("{key} = {value}")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Found by `config_parse` (structured variant): an agent config with
/// `rollback_retry_ms = 9223372036854775807` was accepted, and the agent adds
/// it to the clock (`now_ms() + rollback_retry_ms`), which overflows; the same
/// held for the other timers (`peer_timeout_ms * 2`, `now + stall_timeout_ms`,
/// `now + heartbeat_interval_ms`). Timers are now refused above one day.
#[test]
fn huge_timer_in_agent_config_is_refused() {
    let path = Path::new("hv-a.toml");
    let parse = |text: &str| tern::config::AgentConfig::parse(path, text);
    for key in ["peer_timeout_ms", "stall_timeout_ms", "rollback_retry_ms"] {
        for value in [86_400_001, i64::MAX as u64] {
            let err = parse(&with_setting(checks::AGENT_CONFIG, key, value))
                .expect_err("a timer over a day is refused")
                .to_string();
            assert!(err.starts_with("hv-a.toml is not valid: "), "{err}");
            assert!(
                err.contains(&format!("{key} = {value}: must be at most 86400000")),
                "{err}"
            );
        }
    }
    // The heartbeat must stay below the peer timeout, so it is checked with
    // a peer timeout that is too long too: the heartbeat is named first.
    let text = with_setting(checks::AGENT_CONFIG, "heartbeat_interval_ms", 86_400_001);
    let text = with_setting(&text, "peer_timeout_ms", i64::MAX as u64);
    let err = parse(&text).expect_err("refused").to_string();
    assert!(err.contains("heartbeat_interval_ms = 86400001"), "{err}");
    // One day itself is accepted.
    let text = with_setting(checks::AGENT_CONFIG, "heartbeat_interval_ms", 1000);
    let text = with_setting(&text, "peer_timeout_ms", 86_400_000);
    let text = with_setting(&text, "stall_timeout_ms", 86_400_000);
    let text = with_setting(&text, "rollback_retry_ms", 86_400_000);
    parse(&text).expect("one day is a valid timer");
}

/// The input `config_parse` found it with (after `cargo fuzz tmin`): edits
/// that set `rollback_retry_ms` to i64::MAX in `checks::AGENT_CONFIG`.
#[test]
fn huge_timer_fuzzer_input_is_refused() {
    let input = b"\x01+\"xxxx";
    let (agent, _) = checks::edited_configs(input);
    let agent = agent.expect("the edits give an agent config");
    assert!(
        agent.contains("rollback_retry_ms = 9223372036854775807"),
        "checks.rs's edit encoding changed: re-derive this input\n{agent}"
    );
    checks::config_parse(input);
}

/// Read in review after the fuzzing: a near-zero `speed` made the simulated
/// hypervisor's sleep overflow, and guest sizes near 2^64 overflowed the
/// capacity sums. Both are refused at parse time, naming the bound.
#[test]
fn absurd_speed_and_sizes_in_agent_config_are_refused() {
    let path = Path::new("hv-a.toml");
    let parse = |text: &str| tern::config::AgentConfig::parse(path, text);
    for (from, to, what) in [
        (
            "speed = 1.0",
            "speed = 1e-30",
            "speed = 0.000000000000000000000000000001: must be between 0.001",
        ),
        (
            "speed = 1.0",
            "speed = 1e300",
            "must be between 0.001 and 1000000",
        ),
        (
            "memory_mib = 2048",
            "memory_mib = 9223372036854775807",
            "at most 16777216 MiB",
        ),
        (
            "memory_mib = 65536",
            "memory_mib = 9223372036854775807",
            "offers at most 16777216 MiB",
        ),
    ] {
        assert!(checks::AGENT_CONFIG.contains(from), "{from}");
        let text = checks::AGENT_CONFIG.replacen(from, to, 1);
        let err = parse(&text).expect_err(to).to_string();
        assert!(err.contains(what), "{to}: {err}");
    }
    parse(&checks::AGENT_CONFIG.replacen("speed = 1.0", "speed = 0.001", 1))
        .expect("the slowest allowed speed");
}
