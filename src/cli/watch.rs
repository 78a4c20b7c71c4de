//! `tern watch`: every agent's Watch stream merged into one, one event per
//! line, until Ctrl-C. A stream that ends is reopened with a backoff.
//!
//! JSON lines are `{"host": NAME, "type": TYPE, ...payload}`:
//!
//! | type           | payload                                                        |
//! |----------------|----------------------------------------------------------------|
//! | `snapshot`     | `hosts` (one), `vms`, `migrations`: the shape of `tern status` |
//! | `migration`    | the migration record's fields                                  |
//! | `progress`     | `migration_id`, `attempt_id`, `transfer`                       |
//! | `host`         | the host's fields, as in `tern status`                         |
//! | `vm`           | `vm`: the VM, as in `tern status`                              |
//! | `vm_removed`   | `vm`: its name                                                 |
//! | `log`          | `at_ms`, `level`, `migration_id`, `text`                       |
//! | `disconnected` | `error`, `retry_in_ms`: the stream ended and will be reopened  |

use crate::protocol::convergence::ConvergenceView;
use std::io::Write;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use super::client::{Access, Agent, Cluster};
use super::output::{state_summary, transfer_line};
use super::status::{HostAnswer, HostJson, StatusJson, VmJson};
use super::{CliResult, exit};
use crate::config::HostEntry;
use crate::proto;
use crate::proto::event::Kind;
use crate::protocol::TransferStats;
use crate::protocol::record::{MigrationRecord, stats_from_proto};
use crate::trust::tls::IdentityFiles;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One line of `tern watch`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WatchLine {
    pub host: String,
    #[serde(flatten)]
    pub event: WatchEvent,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchEvent {
    Snapshot(StatusJson),
    Migration(Box<MigrationRecord>),
    Evacuation(Box<crate::host::evacuation::job::Evacuation>),
    Progress {
        migration_id: String,
        attempt_id: String,
        transfer: Option<TransferStats>,
        #[serde(skip_serializing_if = "Option::is_none")]
        convergence: Option<ConvergenceView>,
    },
    Host(HostJson),
    Vm {
        vm: VmJson,
    },
    VmRemoved {
        vm: String,
    },
    Log {
        at_ms: u64,
        level: String,
        migration_id: String,
        text: String,
    },
    Audit(super::audit::AuditJson),
    Disconnected {
        error: String,
        retry_in_ms: u64,
    },
}

impl WatchLine {
    /// The line for an event from `entry`'s agent; `None` for an event with
    /// no payload (a newer agent's kind this build does not know).
    pub fn from_event(entry: &HostEntry, event: &proto::Event) -> Option<WatchLine> {
        let host = if event.host.is_empty() {
            entry.name.clone()
        } else {
            event.host.clone()
        };
        let event = match event.kind.as_ref()? {
            Kind::Snapshot(s) => {
                let answer = HostAnswer {
                    host: s.host.clone().unwrap_or_default(),
                    vms: s.vms.clone(),
                    migrations: s.migrations.clone(),
                    evacuations: s.evacuations.clone(),
                };
                WatchEvent::Snapshot(StatusJson::from_answers(&[(entry.clone(), Ok(answer))]))
            }
            Kind::Migration(m) => WatchEvent::Migration(Box::new(MigrationRecord::from(m))),
            Kind::Evacuation(e) => WatchEvent::Evacuation(Box::new(e.into())),
            Kind::Progress(p) => WatchEvent::Progress {
                migration_id: p.migration_id.clone(),
                attempt_id: p.attempt_id.clone(),
                transfer: p.stats.as_ref().map(stats_from_proto),
                convergence: p
                    .convergence
                    .as_ref()
                    .and_then(crate::protocol::record::convergence_from_proto),
            },
            Kind::HostChanged(h) => WatchEvent::Host(HostJson::from(h)),
            Kind::Vm(v) => {
                let mut vm = VmJson::from(v);
                if vm.host.is_empty() {
                    vm.host = host.clone();
                }
                WatchEvent::Vm { vm }
            }
            Kind::VmRemoved(name) => WatchEvent::VmRemoved { vm: name.clone() },
            Kind::Log(l) => WatchEvent::Log {
                at_ms: l.at_ms,
                level: l.level.clone(),
                migration_id: l.migration_id.clone(),
                text: l.text.clone(),
            },
            Kind::Audit(a) => WatchEvent::Audit(super::audit::AuditJson::from(a)),
        };
        Some(WatchLine { host, event })
    }

    pub fn to_json(&self) -> String {
        // Every field is a string, number, bool or a list of them: this cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// One line for a person, prefixed with the host.
    pub fn to_human(&self) -> String {
        let host = &self.host;
        match &self.event {
            WatchEvent::Snapshot(s) => {
                let pending: usize = s.hosts.iter().map(|h| h.pending_rollbacks.len()).sum();
                format!(
                    "{host}: connected; {} VMs, {} migrations, {pending} pending rollback(s)",
                    s.vms.len(),
                    s.migrations.len()
                )
            }
            WatchEvent::Migration(m) => {
                let mut line = format!(
                    "{host}: migration {} {} {} -> {} ({}) attempt {}: {}",
                    m.id,
                    m.vm,
                    m.source,
                    m.destination,
                    m.mode.as_str(),
                    m.attempt,
                    state_summary(m)
                );
                if let Some(cause) = m.failure() {
                    line.push_str(&format!(" [{}]", cause.brief()));
                }
                if let Some(error) = &m.error {
                    line.push_str(": ");
                    line.push_str(error);
                }
                line
            }
            WatchEvent::Evacuation(e) => format!("{host}: {}", e.headline()),
            WatchEvent::Progress {
                migration_id,
                transfer,
                convergence,
                ..
            } => match transfer {
                Some(stats) => format!(
                    "{host}: migration {migration_id} transfer: {}{}",
                    transfer_line(stats),
                    convergence
                        .as_ref()
                        .map(|c| format!("; {}: {}", c.verdict.as_str(), c.reason))
                        .unwrap_or_default()
                ),
                None => format!("{host}: migration {migration_id} transfer started"),
            },
            WatchEvent::Host(h) => {
                let mut line = format!(
                    "{host}: host {}/{} MiB, {}/{} vcpus, {} pending rollback(s)",
                    h.memory_used_mib,
                    h.memory_total_mib,
                    h.vcpus_used,
                    h.vcpus_total,
                    h.pending_rollbacks.len()
                );
                if h.draining {
                    line.push_str(", draining");
                }
                line
            }
            WatchEvent::Vm { vm } => match &vm.migration_id {
                Some(id) => format!("{host}: vm {} {} (migration {id})", vm.name, vm.state),
                None => format!("{host}: vm {} {}", vm.name, vm.state),
            },
            WatchEvent::VmRemoved { vm } => format!("{host}: vm {vm} removed"),
            WatchEvent::Log {
                level,
                migration_id,
                text,
                ..
            } if migration_id.is_empty() => {
                format!("{host}: {level}: {text}")
            }
            WatchEvent::Log {
                level,
                migration_id,
                text,
                ..
            } => format!("{host}: {level}: [{migration_id}] {text}"),
            WatchEvent::Audit(entry) => format!("{host}: audit: {}", entry.line()),
            WatchEvent::Disconnected { error, retry_in_ms } => {
                format!(
                    "{host}: watch stream lost ({error}); reconnecting in {} s",
                    retry_in_ms.div_ceil(1000)
                )
            }
        }
    }
}

/// `tern watch [--json]`.
pub async fn watch(access: &Access, json: bool) -> CliResult {
    let cluster = Cluster::load(access)?;
    let (tx, mut rx) = mpsc::channel::<WatchLine>(1024);
    let tasks: Vec<_> = cluster
        .inventory
        .host
        .iter()
        .map(|entry| tokio::spawn(follow(entry.clone(), cluster.tls.clone(), tx.clone())))
        .collect();
    drop(tx);
    loop {
        let line = tokio::select! {
            line = rx.recv() => line,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(line) = line else { break };
        let text = if json {
            line.to_json()
        } else {
            line.to_human()
        };
        // A closed pipe (`tern watch | head`) ends the watch quietly.
        if writeln!(std::io::stdout(), "{text}").is_err() {
            break;
        }
    }
    for task in tasks {
        task.abort();
    }
    Ok(exit::SUCCEEDED)
}

/// Follow one agent's stream for ever, reopening it after it ends.
async fn follow(entry: HostEntry, tls: Option<IdentityFiles>, tx: mpsc::Sender<WatchLine>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let error = match Agent::connect(&entry, tls.as_ref()).await {
            Err(e) => e.message,
            Ok(agent) => match agent.watch().await {
                Err(e) => e.message,
                Ok(mut stream) => loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            backoff = FIRST_BACKOFF;
                            if let Some(line) = WatchLine::from_event(&entry, &event)
                                && tx.send(line).await.is_err()
                            {
                                return;
                            }
                        }
                        Ok(None) => break "the agent ended the stream".to_string(),
                        Err(status) => break agent.status_error(&status).message,
                    }
                },
            },
        };
        let notice = WatchEvent::Disconnected {
            error,
            retry_in_ms: backoff.as_millis() as u64,
        };
        if tx
            .send(WatchLine {
                host: entry.name.clone(),
                event: notice,
            })
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn entry() -> HostEntry {
        HostEntry {
            name: "hv-a".into(),
            address: "http://127.0.0.1:7701".into(),
            migration_address: None,
        }
    }

    fn line(kind: Kind) -> WatchLine {
        WatchLine::from_event(
            &entry(),
            &proto::Event {
                host: "hv-a".into(),
                kind: Some(kind),
            },
        )
        .expect("a line")
    }

    fn json_of(line: &WatchLine) -> Value {
        serde_json::from_str(&line.to_json()).expect("valid JSON")
    }

    #[test]
    fn a_migration_event_is_a_flat_record_with_host_and_type() {
        let record = proto::MigrationRecord {
            id: "m-1".into(),
            vm: "web-01".into(),
            source: "hv-a".into(),
            destination: "hv-b".into(),
            mode: proto::Mode::Fast as i32,
            attempt: 2,
            ..Default::default()
        };
        let value = json_of(&line(Kind::Migration(record)));
        assert_eq!(value["host"], "hv-a");
        assert_eq!(value["type"], "migration");
        assert_eq!(value["id"], "m-1");
        assert_eq!(value["mode"], "fast");
        assert_eq!(value["attempt"], 2);
        assert_eq!(value["outcome"], Value::Null);
        assert!(value.get("cause").is_none(), "{value}");
    }

    #[test]
    fn a_failed_migration_event_carries_its_structured_cause_in_both_forms() {
        let record = proto::MigrationRecord {
            id: "m-1".into(),
            vm: "web-01".into(),
            source: "hv-a".into(),
            destination: "hv-b".into(),
            mode: proto::Mode::Safe as i32,
            attempt: 1,
            outcome: proto::Outcome::Failed as i32,
            error: "hv-b refused Prepare: hv-b has 512 MiB and 8 vCPUs free".into(),
            cause: proto::Cause::Capacity as i32,
            failure: Some(proto::FailureCause {
                kind: proto::Cause::Capacity as i32,
                side: proto::Side::Destination as i32,
                host: "hv-b".into(),
                text: "hv-b refused Prepare: hv-b has 512 MiB and 8 vCPUs free".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let l = line(Kind::Migration(record));
        let value = json_of(&l);
        assert_eq!(
            value["cause"],
            json!({"kind": "capacity", "side": "destination", "host": "hv-b",
                   "text": "hv-b refused Prepare: hv-b has 512 MiB and 8 vCPUs free"}),
            "{value}"
        );
        let text = l.to_human();
        assert!(
            text.contains("failed [capacity·hv-b]: hv-b refused Prepare"),
            "{text}"
        );
    }

    #[test]
    fn a_vm_event_nests_the_vm_so_its_host_field_does_not_collide() {
        let vm = proto::Vm {
            name: "web-01".into(),
            host: "hv-a".into(),
            state: proto::GuestState::Incoming as i32,
            migration_id: "m-1".into(),
            ..Default::default()
        };
        let l = line(Kind::Vm(vm));
        let value = json_of(&l);
        assert_eq!(value["type"], "vm");
        assert_eq!(value["vm"]["name"], "web-01");
        assert_eq!(value["vm"]["state"], "incoming");
        assert_eq!(value["vm"]["migration_id"], "m-1");
        assert_eq!(l.to_human(), "hv-a: vm web-01 incoming (migration m-1)");
    }

    #[test]
    fn a_snapshot_event_has_the_shape_of_status() {
        let snapshot = proto::Snapshot {
            host: Some(proto::Host {
                name: "hv-a".into(),
                hypervisor: "sim".into(),
                ..Default::default()
            }),
            vms: vec![proto::Vm {
                name: "web-01".into(),
                state: proto::GuestState::Running as i32,
                ..Default::default()
            }],
            migrations: vec![],
            evacuations: vec![],
        };
        let value = json_of(&line(Kind::Snapshot(snapshot)));
        assert_eq!(value["type"], "snapshot");
        assert_eq!(value["hosts"][0]["name"], "hv-a");
        assert_eq!(value["hosts"][0]["connected"], true);
        assert_eq!(value["vms"][0]["host"], "hv-a");
        assert_eq!(value["migrations"], json!([]));
    }

    #[test]
    fn progress_log_and_removal_events_carry_their_payload() {
        let progress = proto::Progress {
            convergence: None,
            migration_id: "m-1".into(),
            attempt_id: "a-1".into(),
            stats: Some(proto::TransferStats {
                bytes_total: 100,
                bytes_remaining: 40,
                ..Default::default()
            }),
        };
        let value = json_of(&line(Kind::Progress(progress)));
        assert_eq!(value["type"], "progress");
        assert_eq!(value["transfer"]["bytes_remaining"], 40);

        let log = proto::LogLine {
            at_ms: 7,
            level: "warn".into(),
            migration_id: "m-1".into(),
            text: "slow".into(),
        };
        let l = line(Kind::Log(log));
        assert_eq!(
            json_of(&l),
            json!({"host": "hv-a", "type": "log", "at_ms": 7, "level": "warn", "migration_id": "m-1", "text": "slow"})
        );
        assert_eq!(l.to_human(), "hv-a: warn: [m-1] slow");

        let l = line(Kind::VmRemoved("web-01".into()));
        assert_eq!(
            json_of(&l),
            json!({"host": "hv-a", "type": "vm_removed", "vm": "web-01"})
        );
    }

    #[test]
    fn a_lost_stream_says_when_it_reconnects() {
        let l = WatchLine {
            host: "hv-b".into(),
            event: WatchEvent::Disconnected {
                error: "connection refused".into(),
                retry_in_ms: 2000,
            },
        };
        assert_eq!(
            l.to_human(),
            "hv-b: watch stream lost (connection refused); reconnecting in 2 s"
        );
        assert_eq!(
            json_of(&l),
            json!({"host": "hv-b", "type": "disconnected", "error": "connection refused", "retry_in_ms": 2000})
        );
    }

    #[test]
    fn an_event_without_a_kind_is_skipped() {
        assert!(
            WatchLine::from_event(
                &entry(),
                &proto::Event {
                    host: "hv-a".into(),
                    kind: None
                }
            )
            .is_none()
        );
    }
}
