//! Prometheus metrics of one agent, served as text on `metrics_listen`
//! (`GET /metrics`, the classic exposition format 0.0.4).
//!
//! Counters and histograms are fed as attempts this host sources end (each
//! attempt once, when its outcome is final) and as the journal is written;
//! gauges are read from the host core at each scrape, so they can never
//! drift from what `tern status` shows.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Agent;
use crate::protocol::Outcome;
use crate::protocol::record::MigrationRecord;

/// How many ended attempts are remembered as counted (a record is
/// published again on every change; each attempt is counted once).
const REMEMBERED: usize = 10_000;

/// The agent's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    attempts: IntCounterVec,
    phase_seconds: HistogramVec,
    downtime_seconds: Histogram,
    transferred_bytes: IntCounter,
    journal_write_seconds: HistogramVec,
    in_flight: IntGaugeVec,
    limit: IntGaugeVec,
    pending_rollbacks: IntGauge,
    oldest_pending: prometheus::Gauge,
    unresolved: IntGauge,
    evacuation_vms: IntGaugeVec,
    watch_subscribers: IntGauge,
    counted: Mutex<(HashSet<String>, VecDeque<String>)>,
    /// When this agent started: the first time of pending work an older
    /// journal kept without one.
    started_s: f64,
}

fn registered<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    registry
        .register(Box::new(c.clone()))
        .expect("every metric has its own name");
    c
}

impl Metrics {
    pub fn new(host: &str) -> Metrics {
        let registry = Registry::new_custom(
            Some("tern".into()),
            Some([("host".to_string(), host.to_string())].into()),
        )
        .expect("a valid prefix and label");
        let r = &registry;
        let seconds = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramOpts::new(name, help).buckets(buckets)
        };
        Metrics {
            attempts: registered(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "migration_attempts_total",
                        "Migration attempts this host sourced that ended, by outcome and cause kind",
                    ),
                    &["outcome", "cause"],
                )
                .unwrap(),
            ),
            phase_seconds: registered(
                r,
                HistogramVec::new(
                    seconds(
                        "migration_phase_duration_seconds",
                        "How long each phase of an ended attempt took",
                        prometheus::exponential_buckets(0.005, 4.0, 10).unwrap(),
                    ),
                    &["phase"],
                )
                .unwrap(),
            ),
            downtime_seconds: registered(
                r,
                Histogram::with_opts(seconds(
                    "migration_downtime_seconds",
                    "How long guests were paused at the switch from source to destination",
                    vec![0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0],
                ))
                .unwrap(),
            ),
            transferred_bytes: registered(
                r,
                IntCounter::new(
                    "migration_transferred_bytes_total",
                    "Guest memory sent by the attempts this host sourced",
                )
                .unwrap(),
            ),
            journal_write_seconds: registered(
                r,
                HistogramVec::new(
                    seconds(
                        "journal_write_seconds",
                        "Journal writes, durable (synced) or not",
                        prometheus::exponential_buckets(0.000_05, 4.0, 9).unwrap(),
                    ),
                    &["durable"],
                )
                .unwrap(),
            ),
            in_flight: registered(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "migrations_in_flight",
                        "Migrations holding one of this host's slots, by direction",
                    ),
                    &["direction"],
                )
                .unwrap(),
            ),
            limit: registered(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "migrations_limit",
                        "max_outgoing and max_incoming, by direction",
                    ),
                    &["direction"],
                )
                .unwrap(),
            ),
            pending_rollbacks: registered(
                r,
                IntGauge::new(
                    "pending_rollbacks",
                    "Rollbacks, releases and kills that failed here and wait for a retry",
                )
                .unwrap(),
            ),
            oldest_pending: registered(
                r,
                prometheus::Gauge::new(
                    "oldest_pending_rollback_timestamp_seconds",
                    "When the oldest pending rollback, release or kill here was first left (Unix time); 0 when none",
                )
                .unwrap(),
            ),
            unresolved: registered(
                r,
                IntGauge::new(
                    "unresolved_attempts",
                    "Attempts this host sourced whose outcome waits for the destination's word",
                )
                .unwrap(),
            ),
            evacuation_vms: registered(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "evacuation_vms",
                        "The VMs of the evacuations this host ran or runs (as long as it keeps them), by evacuation and state",
                    ),
                    &["evacuation", "state"],
                )
                .unwrap(),
            ),
            watch_subscribers: registered(
                r,
                IntGauge::new("watch_subscribers", "Watch streams served now").unwrap(),
            ),
            registry,
            counted: Mutex::new((HashSet::new(), VecDeque::new())),
            started_s: super::now_ms() as f64 / 1000.0,
        }
    }

    /// A record this host sources changed: count its attempt once it ended.
    pub fn record(&self, record: &MigrationRecord) {
        let Some(outcome) = record.outcome else {
            return;
        };
        if outcome == Outcome::Unresolved {
            return;
        }
        {
            let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
            let (seen, order) = &mut *counted;
            if !seen.insert(record.attempt_id.clone()) {
                return;
            }
            order.push_back(record.attempt_id.clone());
            if order.len() > REMEMBERED
                && let Some(old) = order.pop_front()
            {
                seen.remove(&old);
            }
        }
        let cause = record
            .failure()
            .map(|c| c.kind.as_str().to_string())
            .unwrap_or_default();
        self.attempts
            .with_label_values(&[outcome.as_str(), cause.as_str()])
            .inc();
        for phase in &record.phases {
            if phase.duration_ms > 0 {
                let name = format!("{:?}", phase.phase).to_lowercase();
                self.phase_seconds
                    .with_label_values(&[name.as_str()])
                    .observe(phase.duration_ms as f64 / 1000.0);
            }
        }
        if let Some(stats) = &record.transfer {
            self.transferred_bytes.inc_by(stats.bytes_transferred);
            if stats.downtime_ms > 0 {
                self.downtime_seconds
                    .observe(stats.downtime_ms as f64 / 1000.0);
            }
        }
    }

    /// One journal write took `took`.
    pub fn journal_write(&self, durable: bool, took: Duration) {
        self.journal_write_seconds
            .with_label_values(&[if durable { "true" } else { "false" }])
            .observe(took.as_secs_f64());
    }

    /// The text of a scrape: the gauges read from the agent now.
    pub async fn scrape(&self, agent: &Agent) -> String {
        let gauges = agent
            .query(|core| {
                let evacuations: Vec<(String, crate::host::evacuation::job::Counts)> = core
                    .evacuations()
                    .into_iter()
                    .map(|e| (e.id.clone(), e.counts()))
                    .collect();
                (
                    core.outgoing(),
                    core.incoming(),
                    core.pending().count(),
                    core.pending().map(|p| p.since_ms).min(),
                    core.migrations()
                        .filter(|m| m.outcome == Some(Outcome::Unresolved))
                        .count(),
                    evacuations,
                )
            })
            .await;
        if let Some((outgoing, incoming, pending, oldest, unresolved, evacuations)) = gauges {
            self.in_flight
                .with_label_values(&["out"])
                .set(outgoing as i64);
            self.in_flight
                .with_label_values(&["in"])
                .set(incoming as i64);
            self.pending_rollbacks.set(pending as i64);
            self.oldest_pending.set(match oldest {
                None => 0.0,
                Some(0) => self.started_s,
                Some(ms) => ms as f64 / 1000.0,
            });
            self.unresolved.set(unresolved as i64);
            self.evacuation_vms.reset();
            for (id, c) in evacuations {
                for (state, n) in [
                    ("pending", c.pending),
                    ("in_flight", c.in_flight),
                    ("moved", c.moved),
                    ("failed", c.failed),
                    ("cancelled", c.cancelled),
                ] {
                    self.evacuation_vms
                        .with_label_values(&[id.as_str(), state])
                        .set(n as i64);
                }
            }
        }
        self.limit
            .with_label_values(&["out"])
            .set(i64::from(agent.max_outgoing));
        self.limit
            .with_label_values(&["in"])
            .set(i64::from(agent.max_incoming));
        self.watch_subscribers.set(agent.watch_subscribers() as i64);
        let mut text = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut text);
        String::from_utf8(text).unwrap_or_default()
    }
}

/// Serve `GET /metrics` on `addr` until the agent's process ends.
pub async fn serve(agent: Arc<Agent>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            // The request's head, however the client split its writes.
            let mut request = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if read != Ok(true) {
                return;
            }
            let line = String::from_utf8_lossy(&request);
            let line = line.lines().next().unwrap_or_default();
            let (status, body, kind) = match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["GET", "/metrics", ..] => (
                    "200 OK",
                    agent.metrics.scrape(&agent).await,
                    TextEncoder::new().format_type().to_string(),
                ),
                ["GET", ..] => (
                    "404 Not Found",
                    "metrics are at /metrics\n".into(),
                    "text/plain".into(),
                ),
                _ => (
                    "405 Method Not Allowed",
                    "GET /metrics\n".into(),
                    "text/plain".into(),
                ),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Bind `metrics_listen`, naming it when it cannot be.
pub async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("metrics_listen = {addr:?}: {e}"))?;
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))
}
