//! `tern status`: every host, VM and migration the agents know, as one JSON
//! object or as tables. Also the JSON form of a host and a VM, which `watch`
//! reuses; migrations use the record schema of `protocol::record`.

use futures::future::join_all;
use serde::Serialize;

use super::client::Access;
use super::client::{Agent, Cluster, Link};
use super::output::{state_summary, table};
use super::{CliError, CliResult, exit};
use crate::config::HostEntry;
use crate::host::evacuation::job::Evacuation;
use crate::proto;
use crate::protocol::record::MigrationRecord;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostJson {
    pub name: String,
    pub address: String,
    pub connected: bool,
    pub hypervisor: String,
    pub memory_total_mib: u64,
    pub memory_used_mib: u64,
    pub vcpus_total: u32,
    pub vcpus_used: u32,
    /// Evacuating: no new migrations to it.
    pub draining: bool,
    /// Migrations it sources and receives now, and its limits.
    pub outgoing: u32,
    pub max_outgoing: u32,
    pub incoming: u32,
    pub max_incoming: u32,
    pub features: Vec<String>,
    pub feature_state: Vec<FeatureStateJson>,
    pub pending_rollbacks: Vec<PendingRollbackJson>,
    pub faults: Vec<FaultsJson>,
    /// What the agent wants an operator to know (unreadable journal rows…).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// How callers reach the agent: "tls", "loopback" (plaintext on
    /// loopback) or "insecure" (plaintext on the network); empty when it
    /// could not be asked.
    pub security: String,
    /// Why the agent could not be asked; only when `connected` is false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeatureStateJson {
    pub feature: String,
    pub vm: String,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingRollbackJson {
    pub attempt_id: String,
    pub migration_id: String,
    pub vm: String,
    pub feature: String,
    pub stage: String,
    pub error: String,
    pub tries: u32,
    pub next_try_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultsJson {
    pub feature: String,
    pub fail: Vec<String>,
    pub fail_rate: f64,
    pub latency_ms: u64,
    pub fail_rollback: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmJson {
    pub name: String,
    pub host: String,
    /// "running", "paused", "incoming" or "stopped".
    pub state: &'static str,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub features: Vec<VmFeatureJson>,
    /// The migration holding the VM's lock, if any.
    pub migration_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmFeatureJson {
    pub name: String,
    pub required: bool,
}

/// The whole of `tern status --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusJson {
    pub hosts: Vec<HostJson>,
    pub vms: Vec<VmJson>,
    pub migrations: Vec<MigrationRecord>,
    /// Every evacuation, oldest first.
    pub evacuations: Vec<Evacuation>,
}

impl From<&proto::Host> for HostJson {
    fn from(h: &proto::Host) -> Self {
        HostJson {
            name: h.name.clone(),
            address: h.address.clone(),
            connected: true,
            hypervisor: h.hypervisor.clone(),
            memory_total_mib: h.memory_total_mib,
            memory_used_mib: h.memory_used_mib,
            vcpus_total: h.vcpus_total,
            vcpus_used: h.vcpus_used,
            draining: h.draining,
            outgoing: h.outgoing,
            max_outgoing: h.max_outgoing,
            incoming: h.incoming,
            max_incoming: h.max_incoming,
            features: h.features.clone(),
            feature_state: h
                .feature_state
                .iter()
                .map(|s| FeatureStateJson {
                    feature: s.feature.clone(),
                    vm: s.vm.clone(),
                    state: s.state.clone(),
                })
                .collect(),
            pending_rollbacks: h
                .pending_rollbacks
                .iter()
                .map(|p| PendingRollbackJson {
                    attempt_id: p.attempt_id.clone(),
                    migration_id: p.migration_id.clone(),
                    vm: p.vm.clone(),
                    feature: p.feature.clone(),
                    stage: p.stage.clone(),
                    error: p.error.clone(),
                    tries: p.tries,
                    next_try_at_ms: p.next_try_at_ms,
                })
                .collect(),
            faults: h
                .faults
                .iter()
                .map(|f| FaultsJson {
                    feature: f.feature.clone(),
                    fail: f.fail.clone(),
                    fail_rate: f.fail_rate,
                    latency_ms: f.latency_ms,
                    fail_rollback: f.fail_rollback,
                })
                .collect(),
            warnings: h.warnings.clone(),
            security: h.security.clone(),
            error: None,
        }
    }
}

impl HostJson {
    /// A host whose agent could not be asked: what the inventory says, and why.
    pub fn unreachable(entry: &HostEntry, error: &str) -> Self {
        HostJson {
            name: entry.name.clone(),
            address: entry.address.clone(),
            connected: false,
            hypervisor: String::new(),
            memory_total_mib: 0,
            memory_used_mib: 0,
            vcpus_total: 0,
            vcpus_used: 0,
            draining: false,
            outgoing: 0,
            max_outgoing: 0,
            incoming: 0,
            max_incoming: 0,
            features: Vec::new(),
            feature_state: Vec::new(),
            pending_rollbacks: Vec::new(),
            faults: Vec::new(),
            warnings: Vec::new(),
            security: String::new(),
            error: Some(error.to_string()),
        }
    }
}

pub fn guest_state_name(state: i32) -> &'static str {
    match proto::GuestState::try_from(state) {
        Ok(proto::GuestState::Running) => "running",
        Ok(proto::GuestState::Paused) => "paused",
        Ok(proto::GuestState::Incoming) => "incoming",
        Ok(proto::GuestState::Stopped) | Err(_) => "stopped",
    }
}

impl From<&proto::Vm> for VmJson {
    fn from(v: &proto::Vm) -> Self {
        VmJson {
            name: v.name.clone(),
            host: v.host.clone(),
            state: guest_state_name(v.state),
            memory_mib: v.memory_mib,
            vcpus: v.vcpus,
            features: v
                .features
                .iter()
                .map(|f| VmFeatureJson {
                    name: f.name.clone(),
                    required: f.required,
                })
                .collect(),
            migration_id: (!v.migration_id.is_empty()).then(|| v.migration_id.clone()),
        }
    }
}

/// What one agent answered to GetHost, ListVms and ListMigrations.
#[derive(Debug, Clone, Default)]
pub struct HostAnswer {
    pub host: proto::Host,
    pub vms: Vec<proto::Vm>,
    pub migrations: Vec<proto::MigrationRecord>,
    pub evacuations: Vec<proto::EvacuationRecord>,
}

impl StatusJson {
    /// Assemble the status from each inventory host's answer, in inventory
    /// order. A migration two agents report is listed once, as its source
    /// reports it.
    pub fn from_answers(answers: &[(HostEntry, Result<HostAnswer, CliError>)]) -> StatusJson {
        let mut status = StatusJson {
            hosts: Vec::new(),
            vms: Vec::new(),
            migrations: Vec::new(),
            evacuations: Vec::new(),
        };
        for (entry, answer) in answers {
            match answer {
                Ok(answer) => {
                    let mut host = HostJson::from(&answer.host);
                    // The inventory's names and addresses are the ones an operator types.
                    host.name = entry.name.clone();
                    host.address = entry.address.clone();
                    status.hosts.push(host);
                    status.vms.extend(answer.vms.iter().map(|v| {
                        let mut vm = VmJson::from(v);
                        if vm.host.is_empty() {
                            vm.host = entry.name.clone();
                        }
                        vm
                    }));
                    for m in &answer.migrations {
                        let record = MigrationRecord::from(m);
                        match status.migrations.iter_mut().find(|r| r.id == record.id) {
                            Some(known) if record.source == entry.name => *known = record,
                            Some(_) => {}
                            None => status.migrations.push(record),
                        }
                    }
                    status
                        .evacuations
                        .extend(answer.evacuations.iter().map(Evacuation::from));
                }
                Err(e) => status.hosts.push(HostJson::unreachable(entry, &e.message)),
            }
        }
        status.migrations.sort_by(|a, b| {
            a.started_at_ms
                .cmp(&b.started_at_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        status.evacuations.sort_by(|a, b| {
            a.started_at_ms
                .cmp(&b.started_at_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        status
    }
}

async fn ask(agent: &Agent) -> Result<HostAnswer, CliError> {
    // A host that does not answer this small question in time is named and
    // left out; one that does gets the time its lists take (many pages on a
    // host with a long history).
    let host = agent
        .asked(agent.call(|mut c| async move { c.get_host(proto::GetHostRequest {}).await }))
        .await?;
    let (vms, migrations, evacuations) = tokio::try_join!(
        agent.list_vms(),
        agent.list_migrations(),
        agent.list_evacuations(),
    )?;
    Ok(HostAnswer {
        host,
        vms,
        migrations,
        evacuations,
    })
}

/// Ask every agent at once; unreachable ones are listed as such.
pub async fn gather(links: &[Link]) -> Vec<(HostEntry, Result<HostAnswer, CliError>)> {
    join_all(links.iter().map(|link| async move {
        let answer = match &link.agent {
            Ok(agent) => ask(agent).await,
            Err(e) => Err(e.clone()),
        };
        (link.entry.clone(), answer)
    }))
    .await
}

/// `tern status [--json]`. Exits 0 while any agent answers, 69 when none does.
pub async fn status(access: &Access, json: bool) -> CliResult {
    let cluster = Cluster::load(access)?;
    let links = cluster.connect_all().await;
    let answers = gather(&links).await;
    let status = StatusJson::from_answers(&answers);
    if json {
        let line = serde_json::to_string(&status)
            .map_err(|e| CliError::new(exit::FAILED, format!("cannot encode the status: {e}")))?;
        println!("{line}");
    } else {
        print!("{}", human(&status));
    }
    if status.hosts.iter().all(|h| !h.connected) {
        return Err(CliError::unavailable(format!(
            "no agent in {} answered",
            cluster.path.display()
        )));
    }
    Ok(exit::SUCCEEDED)
}

/// Three tables: hosts, VMs, migrations.
pub fn human(status: &StatusJson) -> String {
    let hosts: Vec<Vec<String>> = status
        .hosts
        .iter()
        .map(|h| {
            if let Some(error) = &h.error {
                return vec![
                    h.name.clone(),
                    h.address.clone(),
                    "unreachable".into(),
                    String::new(),
                    error.clone(),
                ];
            }
            let mut notes = Vec::new();
            if h.draining {
                notes.push("draining".to_string());
            }
            if h.outgoing > 0 || h.incoming > 0 {
                notes.push(format!(
                    "migrations out {}/{}, in {}/{}",
                    h.outgoing, h.max_outgoing, h.incoming, h.max_incoming
                ));
            }
            if !h.pending_rollbacks.is_empty() {
                notes.push(format!("{} pending rollback(s)", h.pending_rollbacks.len()));
            }
            for w in &h.warnings {
                notes.push(format!("WARNING: {w}"));
            }
            vec![
                h.name.clone(),
                h.address.clone(),
                format!("{}/{} MiB", h.memory_used_mib, h.memory_total_mib),
                format!("{}/{}", h.vcpus_used, h.vcpus_total),
                notes.join(", "),
            ]
        })
        .collect();
    let vms: Vec<Vec<String>> = status
        .vms
        .iter()
        .map(|v| {
            let features: Vec<String> = v
                .features
                .iter()
                .map(|f| {
                    if f.required {
                        format!("{}*", f.name)
                    } else {
                        f.name.clone()
                    }
                })
                .collect();
            vec![
                v.name.clone(),
                v.host.clone(),
                v.state.to_string(),
                format!("{} MiB", v.memory_mib),
                v.vcpus.to_string(),
                v.migration_id.clone().unwrap_or_else(|| "-".into()),
                features.join(" "),
            ]
        })
        .collect();
    let migrations: Vec<Vec<String>> = status
        .migrations
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.vm.clone(),
                format!("{} -> {}", m.source, m.destination),
                m.mode.as_str().to_string(),
                m.attempt.to_string(),
                state_summary(m),
                m.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut out = table(&["HOST", "ADDRESS", "MEMORY", "VCPUS", "NOTES"], &hosts);
    out.push('\n');
    if vms.is_empty() {
        out.push_str("no VMs\n");
    } else {
        out.push_str(&table(
            &[
                "VM",
                "HOST",
                "STATE",
                "MEMORY",
                "VCPUS",
                "MIGRATION",
                "FEATURES (* required)",
            ],
            &vms,
        ));
    }
    out.push('\n');
    if migrations.is_empty() {
        out.push_str("no migrations\n");
    } else {
        out.push_str(&table(
            &[
                "MIGRATION",
                "VM",
                "ROUTE",
                "MODE",
                "ATTEMPT",
                "STATE",
                "ERROR",
            ],
            &migrations,
        ));
    }
    // Each migration's latest repair, with its time: the full history is in
    // `tern status --json` and the migration's detail.
    let repairs: Vec<String> = status
        .migrations
        .iter()
        .filter_map(|m| {
            let last = m.repairs.last()?;
            Some(format!(
                "{} {}: repair {} at {} UTC",
                m.id,
                m.vm,
                crate::protocol::repair::describe(last),
                super::audit::clock(last.at_ms)
            ))
        })
        .collect();
    if !repairs.is_empty() {
        out.push('\n');
        for line in repairs {
            out.push_str(&line);
            out.push('\n');
        }
    }
    if !status.evacuations.is_empty() {
        let rows: Vec<Vec<String>> = status
            .evacuations
            .iter()
            .map(|e| {
                let c = e.counts();
                vec![
                    e.id.clone(),
                    e.host.clone(),
                    e.mode.as_str().to_string(),
                    e.state.as_str().to_string(),
                    format!(
                        "{}/{} moved, {} in flight, {} failed, {} pending",
                        c.moved, c.total, c.in_flight, c.failed, c.pending
                    ),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &["EVACUATION", "HOST", "MODE", "STATE", "VMS"],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn entry(name: &str, port: u16) -> HostEntry {
        HostEntry {
            name: name.into(),
            address: format!("http://127.0.0.1:{port}"),
            migration_address: None,
        }
    }

    fn hv_a() -> HostAnswer {
        HostAnswer {
            host: proto::Host {
                name: "hv-a".into(),
                address: "http://127.0.0.1:7701".into(),
                security: "loopback".into(),
                memory_total_mib: 65536,
                memory_used_mib: 2048,
                vcpus_total: 32,
                vcpus_used: 2,
                features: vec!["port-profile".into()],
                feature_state: vec![proto::FeatureState {
                    feature: "port-profile".into(),
                    vm: "web-01".into(),
                    state: "associated".into(),
                }],
                pending_rollbacks: vec![proto::PendingRollback {
                    attempt_id: "a-1".into(),
                    migration_id: "m-1".into(),
                    vm: "db-01".into(),
                    feature: "port-profile".into(),
                    stage: "rollback".into(),
                    error: "switch timed out".into(),
                    tries: 2,
                    next_try_at_ms: 5000,
                }],
                faults: vec![proto::FaultSettings {
                    feature: "port-profile".into(),
                    fail: vec!["finish".into()],
                    fail_rate: 0.0,
                    latency_ms: 20,
                    fail_rollback: false,
                }],
                draining: false,
                hypervisor: "sim".into(),
                ..Default::default()
            },
            vms: vec![proto::Vm {
                name: "web-01".into(),
                host: "hv-a".into(),
                state: proto::GuestState::Running as i32,
                memory_mib: 2048,
                vcpus: 2,
                features: vec![proto::FeatureRef {
                    name: "port-profile".into(),
                    driver: "vdp".into(),
                    required: true,
                }],
                migration_id: String::new(),
            }],
            migrations: vec![proto::MigrationRecord {
                id: "m-1".into(),
                vm: "db-01".into(),
                source: "hv-a".into(),
                destination: "hv-b".into(),
                mode: proto::Mode::Safe as i32,
                attempt: 1,
                outcome: proto::Outcome::Failed as i32,
                running_on: "hv-a".into(),
                error: "port-profile failed to finish on hv-b".into(),
                ..Default::default()
            }],
            evacuations: vec![proto::EvacuationRecord {
                id: "e-1".into(),
                host: "hv-a".into(),
                mode: proto::Mode::Safe as i32,
                state: proto::EvacuationState::Running as i32,
                vms: vec![proto::EvacuationVm {
                    vm: "web-01".into(),
                    state: proto::EvacuationVmState::Pending as i32,
                    waiting: "hv-c draining".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn fixture() -> StatusJson {
        let unreachable = CliError::unavailable(
            "agent hv-b at http://127.0.0.1:7702 is unreachable: connection refused",
        );
        StatusJson::from_answers(&[
            (entry("hv-a", 7701), Ok(hv_a())),
            (entry("hv-b", 7702), Err(unreachable)),
        ])
    }

    #[test]
    fn status_json_lists_a_reachable_host_with_all_its_fields() {
        let value = serde_json::to_value(fixture()).expect("serialize");
        assert_eq!(
            value["hosts"][0],
            json!({
                "name": "hv-a",
                "address": "http://127.0.0.1:7701",
                "security": "loopback",
                "connected": true,
                "hypervisor": "sim",
                "memory_total_mib": 65536,
                "memory_used_mib": 2048,
                "vcpus_total": 32,
                "vcpus_used": 2,
                "draining": false,
                "outgoing": 0,
                "max_outgoing": 0,
                "incoming": 0,
                "max_incoming": 0,
                "features": ["port-profile"],
                "feature_state": [{"feature": "port-profile", "vm": "web-01", "state": "associated"}],
                "pending_rollbacks": [{
                    "attempt_id": "a-1", "migration_id": "m-1", "vm": "db-01", "feature": "port-profile",
                    "stage": "rollback", "error": "switch timed out", "tries": 2, "next_try_at_ms": 5000
                }],
                "faults": [{"feature": "port-profile", "fail": ["finish"], "fail_rate": 0.0, "latency_ms": 20,
                            "fail_rollback": false}]
            })
        );
    }

    #[test]
    fn status_json_lists_evacuations_with_their_vms() {
        let value = serde_json::to_value(fixture()).expect("serialize");
        let e = &value["evacuations"][0];
        assert_eq!(
            (e["id"].as_str(), e["state"].as_str()),
            (Some("e-1"), Some("running"))
        );
        assert_eq!(e["vms"][0]["name"], "web-01");
        assert_eq!(e["vms"][0]["state"], "pending");
        assert_eq!(e["vms"][0]["waiting"], "hv-c draining");
    }

    #[test]
    fn status_json_lists_an_unreachable_host_as_not_connected_with_the_error() {
        let value = serde_json::to_value(fixture()).expect("serialize");
        let host = &value["hosts"][1];
        assert_eq!(host["name"], "hv-b");
        assert_eq!(host["address"], "http://127.0.0.1:7702");
        assert_eq!(host["connected"], false);
        assert_eq!(
            host["error"],
            "agent hv-b at http://127.0.0.1:7702 is unreachable: connection refused"
        );
        assert!(value["hosts"][0].get("error").is_none());
    }

    #[test]
    fn status_json_lists_vms_with_state_names_and_null_migration() {
        let value = serde_json::to_value(fixture()).expect("serialize");
        assert_eq!(
            value["vms"],
            json!([{
                "name": "web-01", "host": "hv-a", "state": "running", "memory_mib": 2048, "vcpus": 2,
                "features": [{"name": "port-profile", "required": true}], "migration_id": null
            }])
        );
    }

    #[test]
    fn status_json_lists_migrations_in_the_record_schema() {
        let value = serde_json::to_value(fixture()).expect("serialize");
        let m = &value["migrations"][0];
        assert_eq!(m["id"], "m-1");
        assert_eq!(m["mode"], "safe");
        assert_eq!(m["outcome"], "failed");
        assert_eq!(m["running_on"], "hv-a");
        assert_eq!(m["phases"].as_array().map(Vec::len), Some(5));
        assert_eq!(
            m["phases"][0],
            json!({"phase": "begin", "status": "pending", "duration_ms": 0})
        );
    }

    #[test]
    fn a_migration_reported_by_two_agents_is_listed_once_as_its_source_reports_it() {
        let mut from_destination = hv_a();
        from_destination.migrations[0].error = "destination view".into();
        from_destination.vms.clear();
        let status = StatusJson::from_answers(&[
            (entry("hv-b", 7702), Ok(from_destination)),
            (entry("hv-a", 7701), Ok(hv_a())),
        ]);
        assert_eq!(status.migrations.len(), 1);
        assert_eq!(
            status.migrations[0].error.as_deref(),
            Some("port-profile failed to finish on hv-b")
        );
    }

    #[test]
    fn guest_states_have_lowercase_names() {
        assert_eq!(guest_state_name(proto::GuestState::Paused as i32), "paused");
        assert_eq!(
            guest_state_name(proto::GuestState::Incoming as i32),
            "incoming"
        );
        assert_eq!(guest_state_name(99), "stopped");
    }

    /// The JSON shape of what issue 14 added to a record, checked once:
    /// `--json` is what scripts read.
    #[test]
    fn status_json_carries_the_policy_outlook_note_stage_and_recovery_of_a_migration() {
        use crate::protocol::completion::Completion;
        use crate::protocol::record::completion_to_proto;
        let mut answer = hv_a();
        let m = &mut answer.migrations[0];
        m.outcome = proto::Outcome::Lost as i32;
        m.completion = Some(completion_to_proto(&Completion::for_mode(
            crate::protocol::Mode::Fast,
        )));
        m.convergence = Some(proto::Convergence {
            verdict: proto::Verdict::NotConverging as i32,
            has_eta: false,
            eta_ms: 0,
            reason: "dirtying 1.4 GiB/s, link 1.1 GiB/s".into(),
            remaining: vec![
                proto::RemainingSample {
                    elapsed_ms: 0,
                    bytes: 100,
                },
                proto::RemainingSample {
                    elapsed_ms: 1000,
                    bytes: 90,
                },
            ],
        });
        m.completion_note = "switched to post-copy after 12.3 s".into();
        m.transfer = Some(proto::TransferStats {
            stage: proto::TransferStage::PostcopyPaused as i32,
            postcopy_requests: 7,
            ..Default::default()
        });
        m.recovery = Some(proto::PostcopyRecovery {
            tries: 2,
            error: "connection refused".into(),
            next_at_ms: 5000,
        });
        let status = StatusJson::from_answers(&[(entry("hv-a", 7701), Ok(answer))]);
        let value = serde_json::to_value(&status).expect("serialize");
        let m = &value["migrations"][0];
        assert_eq!(m["outcome"], "lost");
        assert_eq!(
            m["completion"],
            json!({"timeout_per_gib_s": 150, "postcopy": "auto", "downtime_limit_ms": 0, "when_spent": "abort"})
        );
        assert_eq!(
            m["convergence"],
            json!({"verdict": "not_converging", "reason": "dirtying 1.4 GiB/s, link 1.1 GiB/s",
                   "remaining": [[0, 100], [1000, 90]]}),
            "no eta_ms without an ETA"
        );
        assert_eq!(m["completion_note"], "switched to post-copy after 12.3 s");
        assert_eq!(
            (&m["transfer"]["stage"], &m["transfer"]["postcopy_requests"]),
            (&json!("postcopy_paused"), &json!(7))
        );
        assert_eq!(
            m["recovery"],
            json!({"tries": 2, "error": "connection refused", "next_at_ms": 5000})
        );
        // The table says it as loud as it is.
        let table = human(&status);
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("m-1 ") && l.contains("  LOST  ")),
            "{table}"
        );
    }

    #[test]
    fn human_status_shows_hosts_vms_and_migrations() {
        let text = human(&fixture());
        let expected = "\
HOST  ADDRESS                MEMORY          VCPUS  NOTES
hv-a  http://127.0.0.1:7701  2048/65536 MiB  2/32   1 pending rollback(s)
hv-b  http://127.0.0.1:7702  unreachable            agent hv-b at http://127.0.0.1:7702 is unreachable: connection refused

VM      HOST  STATE    MEMORY    VCPUS  MIGRATION  FEATURES (* required)
web-01  hv-a  running  2048 MiB  2      -          port-profile*

MIGRATION  VM     ROUTE         MODE  ATTEMPT  STATE   ERROR
m-1        db-01  hv-a -> hv-b  safe  1        failed  port-profile failed to finish on hv-b

EVACUATION  HOST  MODE  STATE    VMS
e-1         hv-a  safe  running  0/1 moved, 0 in flight, 0 failed, 1 pending
";
        assert_eq!(text, expected);
    }
}
