//! Pending rollbacks: a rollback (destination) or release (source) that
//! failed leaves feature state on this host. Each is journaled, shown in
//! status and the console, retried with backoff, and re-run on request. None
//! disappears until a run succeeds.

use std::sync::Arc;
use std::time::Duration;

use super::journal::Pending;
use super::{Agent, now_ms};
use crate::features::StageContext;
use crate::proto;
use crate::protocol::policy::retry_backoff;
use crate::protocol::{FeatureSpec, Stage};

pub fn to_proto(p: Pending) -> proto::PendingRollback {
    proto::PendingRollback {
        attempt_id: p.attempt_id,
        migration_id: p.migration_id,
        vm: p.vm,
        feature: p.feature,
        stage: p.stage,
        error: p.error,
        tries: p.tries,
        next_try_at_ms: p.next_try_ms,
    }
}

pub fn spawn_retry_loop(agent: &Arc<Agent>) {
    let agent = Arc::downgrade(agent);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Some(agent) = agent.upgrade() else { return };
            if agent.is_stopping() {
                return;
            }
            let now = now_ms();
            let due: Vec<Pending> = match agent.journal().pending() {
                Ok(all) => all.into_iter().filter(|p| p.next_try_ms <= now).collect(),
                Err(e) => {
                    tracing::error!("cannot read pending rollbacks: {e}");
                    continue;
                }
            };
            if !due.is_empty() {
                run(&agent, due).await;
            }
        }
    });
}

/// Re-run this host's pending rollbacks of one migration now.
pub async fn run_for_migration(
    agent: &Arc<Agent>,
    migration_id: &str,
) -> (Vec<Pending>, Vec<Pending>) {
    let pending: Vec<Pending> = agent
        .journal()
        .pending()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.migration_id == migration_id)
        .collect();
    run(agent, pending).await
}

/// Run each pending entry once: (succeeded, still pending).
async fn run(agent: &Arc<Agent>, pending: Vec<Pending>) -> (Vec<Pending>, Vec<Pending>) {
    let (mut done, mut still) = (Vec::new(), Vec::new());
    for mut p in pending {
        let Some(stage) = Stage::parse(&p.stage) else {
            continue;
        };
        let Some(driver) = agent.features.get(&p.feature) else {
            p.error = format!(
                "feature {} is no longer configured on {}",
                p.feature, agent.name
            );
            still.push(p);
            continue;
        };
        let ctx = StageContext {
            host: agent.name.clone(),
            vm: p.vm.clone(),
            feature: FeatureSpec {
                name: p.feature.clone(),
                driver: String::new(),
                required: false,
            },
            stage,
            attempt_id: p.attempt_id.clone(),
            migration_id: p.migration_id.clone(),
        };
        match crate::features::run_stage(driver.as_ref(), &ctx).await {
            Ok(detail) => {
                if let Err(e) = agent
                    .journal()
                    .remove_pending(&p.attempt_id, &p.feature, &p.stage)
                {
                    tracing::error!("cannot clear pending rollback: {e}");
                }
                agent.log(
                    "info",
                    &p.migration_id,
                    format!(
                        "pending {} of {} for {} done on {}: {detail}",
                        p.stage, p.feature, p.vm, agent.name
                    ),
                );
                done.push(p);
            }
            Err(error) => {
                p.tries += 1;
                let backoff = retry_backoff(agent.rollback_retry_ms, p.tries);
                p.next_try_ms = now_ms() + backoff;
                p.error = error;
                if let Err(e) = agent.journal().put_pending(&p) {
                    tracing::error!("cannot update pending rollback: {e}");
                }
                still.push(p);
            }
        }
    }
    if !done.is_empty() || !still.is_empty() {
        agent.emit(proto::event::Kind::HostChanged(agent.host_info().await));
    }
    (done, still)
}
