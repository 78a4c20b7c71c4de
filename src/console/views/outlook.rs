//! Where a migration's transfer is heading, as its row and its detail say
//! it: the verdict on pre-copy with its ETA, post-copy with what is left to
//! pull, a paused post-copy being recovered; and how a text gives way in a
//! narrow column: a shorter wording first, then whole words and `…` (only a
//! first word longer than the column is cut inside).

use ratatui::style::Style;
use ratatui::text::Span;

use super::super::app::current_phase;
use super::super::theme::Theme;
use super::{bytes, duration};
use crate::cli::output::{recovering_text, verdict_label};
use crate::proto;
use crate::protocol::TransferStage;
use crate::protocol::convergence::{ConvergenceView, Verdict};
use crate::protocol::record::{convergence_from_proto, stats_from_proto};

/// A thing to say, in wordings from the longest to the shortest, and its
/// style.
#[derive(Debug, Clone, PartialEq)]
pub struct Said {
    pub wordings: Vec<String>,
    pub style: Style,
}

impl Said {
    fn new(style: Style, wordings: impl IntoIterator<Item = String>) -> Said {
        Said {
            wordings: wordings.into_iter().collect(),
            style,
        }
    }

    /// The longest wording that fits `width` columns.
    pub fn fit(&self, width: usize) -> String {
        fit(&self.wordings, width)
    }
}

/// The first of `wordings` (longest first) that fits `width` columns; if
/// none does, the last cut after its last whole word that fits, with `…`.
pub fn fit(wordings: &[String], width: usize) -> String {
    if let Some(w) = wordings
        .iter()
        .find(|w| Span::raw(w.as_str()).width() <= width)
    {
        return w.clone();
    }
    let Some(last) = wordings.last() else {
        return String::new();
    };
    if width == 0 {
        return String::new();
    }
    // Whole characters that leave room for the ellipsis.
    let mut cut = String::new();
    for c in last.chars() {
        let mut next = cut.clone();
        next.push(c);
        if Span::raw(next.as_str()).width() > width - 1 {
            break;
        }
        cut = next;
    }
    let fits_whole_word = last[cut.len()..].starts_with(' ');
    if !fits_whole_word && let Some(space) = cut.rfind(' ') {
        cut.truncate(space);
    }
    let cut = cut.trim_end_matches([' ', ',', ';', ':', '·', '—']);
    format!("{cut}…")
}

/// A running migration's state in its row: a paused post-copy being
/// recovered (red), post-copy with what is left to pull, the verdict on
/// pre-copy with its ETA while Perform runs, else the phase.
pub fn running(r: &proto::MigrationRecord, theme: &Theme) -> Said {
    if let Some(recovery) = &r.recovery {
        let next = recovery.tries.saturating_add(1);
        return Said::new(
            theme.error,
            [
                recovering_text(recovery.tries),
                format!("post-copy paused, try {next}"),
                format!("recovering, try {next}"),
            ],
        );
    }
    if let Some(stats) = r.transfer.as_ref().map(stats_from_proto) {
        match stats.stage {
            TransferStage::PostcopyPaused => {
                return Said::new(theme.error, [stats.stage.as_str().to_string()]);
            }
            TransferStage::Postcopy => {
                let left = bytes(stats.bytes_remaining);
                return Said::new(
                    theme.warning,
                    [
                        format!("post-copy · {left} to pull"),
                        format!("post-copy · {left}"),
                        "post-copy".to_string(),
                    ],
                );
            }
            TransferStage::Precopy => {}
        }
    }
    let phase = current_phase(r);
    // The verdict is about a transfer that runs: after Perform it is stale.
    if phase == "perform"
        && let Some(outlook) = convergence(r)
    {
        return verdict(&outlook, theme);
    }
    Said::new(theme.running, [phase.to_string()])
}

/// "converging · 12s", "slow · 3m05s", "NOT CONVERGING", "stalled",
/// coloured by how bad it is.
pub fn verdict(outlook: &ConvergenceView, theme: &Theme) -> Said {
    let label = verdict_label(outlook.verdict).to_string();
    let style = verdict_style(outlook.verdict, theme);
    match (outlook.verdict, outlook.eta_ms) {
        (Verdict::Converging | Verdict::Slow, Some(eta)) => {
            Said::new(style, [format!("{label} · {}", eta_text(eta)), label])
        }
        _ => Said::new(style, [label]),
    }
}

/// An ETA: to the second at best, the model's milliseconds mean nothing.
fn eta_text(ms: u64) -> String {
    if ms < 1_000 {
        "<1s".to_string()
    } else {
        duration(ms)
    }
}

/// Good, worth a look, bad.
pub fn verdict_style(verdict: Verdict, theme: &Theme) -> Style {
    match verdict {
        Verdict::Converging => theme.done,
        Verdict::Slow => theme.warning,
        Verdict::NotConverging | Verdict::Stalled => theme.error,
    }
}

/// A record's outlook, if the source has one.
pub fn convergence(r: &proto::MigrationRecord) -> Option<ConvergenceView> {
    r.convergence.as_ref().and_then(convergence_from_proto)
}

/// Remaining bytes at `columns` evenly spaced instants from the first
/// point to the last, each the newest point at or before it: the x axis
/// of the chart is time, whatever the spacing of the points.
pub fn resample(points: &[[u64; 2]], columns: usize) -> Vec<u64> {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return Vec::new();
    };
    let (t0, t1) = (first[0], last[0]);
    if columns <= 1 || t1 <= t0 {
        return vec![last[1]; columns.max(1)];
    }
    (0..columns)
        .map(|i| {
            let t = t0 + ((u128::from(t1 - t0) * i as u128) / (columns as u128 - 1)) as u64;
            let at = points.partition_point(|p| p[0] <= t);
            points[at.saturating_sub(1)][1]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_text_gives_way_by_wording_then_by_whole_words() {
        let said = words(&[
            "post-copy paused — recovering, try 3",
            "post-copy paused, try 3",
            "recovering, try 3",
        ]);
        assert_eq!(fit(&said, 40), "post-copy paused — recovering, try 3");
        assert_eq!(fit(&said, 30), "post-copy paused, try 3");
        assert_eq!(fit(&said, 17), "recovering, try 3");
        assert_eq!(fit(&said, 14), "recovering…");
        let error = words(&["required feature port-profile failed finish on hv-c"]);
        assert_eq!(fit(&error, 21), "required feature…");
        assert_eq!(fit(&error, 4), "req…", "a first word too long is cut");
        assert_eq!(fit(&words(&["port-profile"]), 8), "port-pr…");
        assert_eq!(fit(&error, 0), "");
    }

    #[test]
    fn an_eta_is_given_to_the_second_at_best() {
        let theme = Theme::default();
        let outlook = |eta_ms| ConvergenceView {
            verdict: Verdict::Converging,
            eta_ms: Some(eta_ms),
            reason: String::new(),
            remaining: Vec::new(),
        };
        assert_eq!(
            verdict(&outlook(761), &theme).wordings[0],
            "converging · <1s"
        );
        assert_eq!(
            verdict(&outlook(12_400), &theme).wordings[0],
            "converging · 12s"
        );
        let stalled = ConvergenceView {
            verdict: Verdict::Stalled,
            eta_ms: Some(5),
            ..outlook(0)
        };
        assert_eq!(verdict(&stalled, &theme).wordings, ["stalled"]);
    }

    #[test]
    fn the_chart_resamples_by_time_not_by_point() {
        let points = [[0, 100], [10_000, 50], [20_000, 0]];
        assert_eq!(resample(&points, 5), [100, 100, 50, 50, 0]);
        // Points crowded at the end do not stretch the end of the chart.
        let uneven = [[0, 100], [18_000, 40], [19_000, 30], [20_000, 20]];
        assert_eq!(resample(&uneven, 5), [100, 100, 100, 100, 20]);
        assert_eq!(resample(&[[5, 7]], 3), [7, 7, 7]);
        assert!(resample(&[], 3).is_empty());
    }
}
