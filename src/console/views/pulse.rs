//! The pulse line above the tables: whether tonight is normal, at a glance.
//! Over the last hour: migrations ended per minute, the share that moved
//! their guest (succeeded or degraded), the median duration, and the
//! failures by kind of cause.

use ratatui::text::{Line, Span};

use super::super::state::ClusterState;
use super::super::theme::Theme;
use super::outlook::fit;
use crate::cli::output::seconds_text;
use crate::proto;
use crate::protocol::Cause;
use crate::protocol::record::cause_from_proto;

/// An hour, in ms.
const WINDOW_MS: u64 = 3_600_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Pulse {
    /// Attempts that ended in the window.
    pub ended: usize,
    /// Of those, the ones whose guest moved (succeeded or degraded).
    pub moved: usize,
    /// Ended per minute, over the part of the window they span (at least a
    /// minute, so a fresh console does not claim hundreds a minute).
    pub per_minute: f64,
    pub p50_ms: Option<u64>,
    /// Failed, aborted, lost or unresolved, by kind of cause, most first.
    pub failures: Vec<(String, usize)>,
}

/// One pass over every attempt the console knows (it runs every frame):
/// counts by outcome and cause, the durations, and the median by selection.
pub fn pulse(state: &ClusterState) -> Pulse {
    use proto::Outcome as O;
    let now = state.now_ms;
    let since = now.saturating_sub(WINDOW_MS);
    let (mut moved, mut first) = (0, now);
    let mut durations: Vec<u64> = Vec::new();
    let mut by_cause = [0usize; Cause::ALL.len()];
    let mut other = 0;
    for r in state
        .migrations
        .values()
        .flat_map(|m| m.history.iter().chain(std::iter::once(&m.record)))
        .filter(|r| r.outcome != O::None as i32 && r.updated_at_ms >= since)
    {
        durations.push(r.updated_at_ms.saturating_sub(r.started_at_ms));
        first = first.min(r.started_at_ms);
        match O::try_from(r.outcome) {
            Ok(O::Succeeded | O::Degraded) => moved += 1,
            Ok(O::Failed | O::Aborted | O::Lost | O::Unresolved) => {
                let kind = cause_from_proto(r.cause);
                match Cause::ALL.iter().position(|c| Some(*c) == kind) {
                    Some(i) => by_cause[i] += 1,
                    None => other += 1,
                }
            }
            _ => {}
        }
    }
    let ended = durations.len();
    let p50_ms = (ended > 0).then(|| *durations.select_nth_unstable(ended / 2).1);
    let mut failures: Vec<(String, usize)> = by_cause
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, n)| (Cause::ALL[i].label().to_string(), *n))
        .collect();
    if other > 0 {
        failures.push(("other".to_string(), other));
    }
    failures.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let minutes = (now.saturating_sub(first) as f64 / 60_000.0).max(1.0);
    Pulse {
        ended,
        moved,
        per_minute: ended as f64 / minutes,
        p50_ms,
        failures,
    }
}

/// The line, fitted to `width`: what goes first on a narrow terminal is the
/// breakdown of failures, then the median.
pub fn line<'a>(p: &Pulse, theme: &Theme, width: usize) -> Line<'a> {
    if p.ended == 0 {
        return Line::styled(" last hour: no migration has ended", theme.dim);
    }
    let ok = p.moved * 100 / p.ended;
    let rate = format!(" last hour: {:.1}/min, {ok}% moved", p.per_minute);
    let p50 = p
        .p50_ms
        .map(|ms| format!(", p50 {}", seconds_text(ms)))
        .unwrap_or_default();
    let failed = if p.failures.is_empty() {
        String::new()
    } else {
        let kinds: Vec<String> = p.failures.iter().map(|(k, n)| format!("{k} {n}")).collect();
        format!(" · failed: {}", kinds.join(", "))
    };
    let text = fit(
        &[
            format!("{rate}{p50}{failed}"),
            format!("{rate}{failed}"),
            format!("{rate}{p50}"),
            rate.clone(),
        ],
        width,
    );
    let style = if p.failures.is_empty() {
        theme.done
    } else {
        theme.warning
    };
    Line::from(vec![Span::styled(text, style)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::fixture::*;

    /// The line's text, without its styles.
    fn text(line: Line) -> String {
        line.spans.iter().map(|s| s.content.to_string()).collect()
    }

    #[test]
    fn the_pulse_counts_the_last_hour_only() {
        let mut state = ClusterState::new("test", &["hv-a".to_string()]);
        state.now_ms = 2 * WINDOW_MS;
        let ended =
            |id: &str, outcome: proto::Outcome, cause: proto::Cause, start: u64, end: u64| {
                let mut r = migration(id, "web-01", "hv-a", "hv-b", outcome);
                r.cause = cause as i32;
                r.started_at_ms = start;
                r.updated_at_ms = end;
                r
            };
        let now = state.now_ms;
        for r in [
            // An hour and more ago: not counted.
            ended(
                "m-old",
                proto::Outcome::Failed,
                proto::Cause::Feature,
                0,
                now - WINDOW_MS - 1,
            ),
            ended(
                "m-1",
                proto::Outcome::Succeeded,
                proto::Cause::None,
                now - 600_000,
                now - 598_000,
            ),
            ended(
                "m-2",
                proto::Outcome::Degraded,
                proto::Cause::None,
                now - 500_000,
                now - 496_000,
            ),
            ended(
                "m-3",
                proto::Outcome::Failed,
                proto::Cause::Feature,
                now - 400_000,
                now - 399_000,
            ),
            ended(
                "m-4",
                proto::Outcome::Failed,
                proto::Cause::Feature,
                now - 300_000,
                now - 290_000,
            ),
            ended(
                "m-5",
                proto::Outcome::Aborted,
                proto::Cause::Operator,
                now - 200_000,
                now - 197_000,
            ),
        ] {
            state.apply(proto::Event {
                host: "hv-a".into(),
                kind: Some(proto::event::Kind::Migration(r)),
            });
        }
        let p = pulse(&state);
        assert_eq!(p.ended, 5);
        assert_eq!(p.moved, 2);
        // Five in the ten minutes since the first of them started.
        assert!((p.per_minute - 0.5).abs() < 1e-9, "{}", p.per_minute);
        // Durations 1, 2, 3, 4, 10 s: the median is 3 s.
        assert_eq!(p.p50_ms, Some(3_000));
        assert_eq!(
            p.failures,
            vec![("feature".to_string(), 2), ("operator".to_string(), 1)]
        );
        let theme = Theme::named("default").expect("theme");
        let wide = text(line(&p, &theme, 120));
        assert_eq!(
            wide,
            " last hour: 0.5/min, 40% moved, p50 3 s · failed: feature 2, operator 1"
        );
        // Narrow: the failures stay, the median goes first.
        let narrow = text(line(&p, &theme, 64));
        assert_eq!(
            narrow,
            " last hour: 0.5/min, 40% moved · failed: feature 2, operator 1"
        );
    }

    #[test]
    fn a_quiet_hour_says_so() {
        let state = ClusterState::new("test", &["hv-a".to_string()]);
        let theme = Theme::named("default").expect("theme");
        let said = text(line(&pulse(&state), &theme, 80));
        assert_eq!(said, " last hour: no migration has ended");
    }
}
