//! The evacuations view: every evacuation the agents report, newest first;
//! the shown one's state, settings and a gauge of its VMs; a table of its
//! VMs with each attempt's destination and outcome and the feature that
//! failed it; and the selected VM's whole story, so the cause of a failure
//! or a wait reads at a glance.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table, TableState, Wrap};

use super::super::app::{App, current_phase};
use super::super::theme::Theme;
use super::tables::window;
use super::{duration, outcome_look};
use crate::host::evacuation::job::{AttemptEntry, Counts, Evacuation, JobState, JobVm, VmState};
use crate::proto;

/// Below this width the VM table's columns narrow.
const WIDE: u16 = 100;
/// The evacuations list shows at most this many rows at once.
const LIST_ROWS: usize = 3;

pub fn draw(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let state = app.state();
    let all = state.ordered_evacuations();
    let Some(record) = app.selected_evacuation() else {
        frame.render_widget(
            Paragraph::new(vec![
                Line::raw(" No evacuations yet."),
                Line::styled(
                    " Select a host (tab, j/k) and press e to evacuate it; esc goes back.",
                    theme.dim,
                ),
            ])
            .block(super::tables::block(" evacuations ".into(), true, theme)),
            area,
        );
        return;
    };
    let job = record;
    let vm = job
        .vms
        .get(app.evacuation_vm_row.min(job.vms.len().saturating_sub(1)));
    let list_height = all.len().min(LIST_ROWS) as u16 + 2;
    let story = vm.map(|v| story(app, v, job, theme)).unwrap_or_default();
    let story_height = wrapped_height(&story, area.width.saturating_sub(2))
        .clamp(1, 8)
        .min(usize::from(area.height / 3)) as u16
        + 2;
    let [list_area, job_area, story_area] = Layout::vertical([
        Constraint::Length(list_height),
        Constraint::Min(6),
        Constraint::Length(story_height),
    ])
    .areas(area);
    list(frame, list_area, app, &all, &job.id, theme);
    evacuation(frame, job_area, app, job, theme);
    if let Some(vm) = vm {
        let title = match &vm.migration_id {
            Some(id) if state.migrations.contains_key(id) => {
                format!(" {} · migration {id} (enter opens it) ", vm.name)
            }
            Some(id) => format!(" {} · migration {id} ", vm.name),
            None => format!(" {} ", vm.name),
        };
        frame.render_widget(
            Paragraph::new(story)
                .wrap(Wrap { trim: false })
                .block(super::tables::block(title, false, theme)),
            story_area,
        );
    }
}

/// The style, symbol and name of an evacuation's state.
pub fn job_state(theme: &Theme, state: JobState) -> (Style, &'static str) {
    let sym = &theme.symbols;
    match state {
        JobState::Running => (theme.running, sym.running),
        JobState::Paused => (theme.warning, sym.frozen),
        JobState::Cancelling => (theme.warning, sym.aborted),
        JobState::Cancelled => (theme.aborted, sym.aborted),
        JobState::Done => (theme.succeeded, sym.done),
    }
}

/// The style, symbol and name of a VM's state in its evacuation.
fn vm_state(theme: &Theme, vm: &JobVm) -> (Style, &'static str, &'static str) {
    let sym = &theme.symbols;
    match vm.state {
        VmState::Moved if vm.degraded => (theme.degraded, sym.degraded, "degraded"),
        VmState::Moved => (theme.succeeded, sym.succeeded, "moved"),
        VmState::InFlight => (theme.running, sym.running, "in flight"),
        VmState::Failed => (theme.failed, sym.failed, "failed"),
        VmState::Pending => (theme.pending, sym.pending, "pending"),
        VmState::Cancelled => (theme.aborted, sym.aborted, "cancelled"),
    }
}

fn attempt_look(theme: &Theme, a: &AttemptEntry) -> (Style, &'static str, &'static str) {
    match a.outcome {
        None => (theme.running, theme.symbols.running, "running"),
        Some(_) if a.busy => (theme.warning, theme.symbols.pending, "busy"),
        outcome => outcome_look(theme, outcome),
    }
}

/// Attempts that count against max attempts, the running one included.
fn counted(vm: &JobVm) -> usize {
    vm.attempts.iter().filter(|a| a.counts()).count()
}

fn list(frame: &mut Frame, area: Rect, app: &App, all: &[&Evacuation], shown: &str, theme: &Theme) {
    let focused = app.evacuation_list_focused;
    let selected = all.iter().position(|e| e.id == shown).unwrap_or(0);
    let range = window(selected, all.len(), area.height.saturating_sub(2) as usize);
    let now = app.state().now_ms;
    let rows = all[range.clone()].iter().map(|job| {
        let c = job.counts();
        let (style, symbol) = job_state(theme, job.state);
        let mark = if job.id == shown {
            theme.symbols.selected
        } else {
            " "
        };
        let mut progress = format!("{} of {} moved", c.moved, c.total);
        if c.failed > 0 {
            progress.push_str(&format!(", {} failed", c.failed));
        }
        let age = match job.ended_at_ms {
            Some(end) => format!("took {}", duration(end.saturating_sub(job.started_at_ms))),
            None => format!(
                "for {}",
                duration(now.max(job.updated_at_ms).saturating_sub(job.started_at_ms))
            ),
        };
        Row::new(vec![
            Cell::from(Span::styled(
                format!("{mark} {symbol} {}", job.state.as_str()),
                style,
            )),
            Cell::from(job.id.clone()),
            Cell::from(job.host.clone()),
            Cell::from(job.mode.as_str()),
            Cell::from(progress),
            Cell::from(Span::styled(age, theme.dim)),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(14),
            Constraint::Length(12),
            Constraint::Length(8),
            Constraint::Length(5),
            Constraint::Length(24),
            Constraint::Min(8),
        ],
    )
    .block(super::tables::block(
        format!(" evacuations ({}, newest first) ", all.len()),
        focused,
        theme,
    ))
    .row_highlight_style(if focused {
        theme.selected
    } else {
        Style::default()
    });
    let mut table_state = TableState::default();
    if focused {
        table_state.select(Some(selected - range.start));
    }
    frame.render_stateful_widget(table, area, &mut table_state);
}

fn evacuation(frame: &mut Frame, area: Rect, app: &App, job: &Evacuation, theme: &Theme) {
    let focused = !app.evacuation_list_focused;
    let block = super::tables::block(
        format!(" evacuation {} of {} ", job.id, job.host),
        focused,
        theme,
    );
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [summary_area, gauge_area, table_area] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(1),
    ])
    .areas(inner);

    let (style, symbol) = job_state(theme, job.state);
    let mut settings = format!(
        "{} mode · {} at a time · up to {} attempts per VM",
        job.mode.as_str(),
        job.concurrency,
        job.max_attempts
    );
    if !job.exclude.is_empty() {
        settings.push_str(&format!(" · never to {}", job.exclude.join(", ")));
    }
    let mut summary = vec![
        Span::styled(format!(" {symbol} {} ", job.state.as_str()), style),
        Span::raw(format!(" {settings}")),
    ];
    if job.state == JobState::Cancelling {
        summary.push(Span::styled(
            if job.abort_in_flight {
                " · aborting the attempts in flight"
            } else {
                " · letting the attempts in flight finish"
            },
            theme.warning,
        ));
    }
    frame.render_widget(Paragraph::new(Line::from(summary)), summary_area);
    frame.render_widget(
        Paragraph::new(gauge(&job.counts(), gauge_area.width, theme)),
        gauge_area,
    );
    vms(frame, table_area, app, job, theme, focused);
}

/// `█▓✗░` segments (moved, in flight, failed, pending; `–` cancelled) and
/// the counts: readable by glyph without colour.
fn gauge<'a>(c: &Counts, width: u16, theme: &Theme) -> Line<'a> {
    let mut label = format!(
        " {} moved · {} in flight · {} failed · {} pending",
        c.moved, c.in_flight, c.failed, c.pending
    );
    if c.cancelled > 0 {
        label.push_str(&format!(" · {} cancelled", c.cancelled));
    }
    label.push_str(&format!(" · {} VMs", c.total));
    let room = usize::from(width).saturating_sub(label.chars().count() + 3);
    let cells = room.clamp(8, 60);
    let parts = [
        (c.moved, "█", theme.succeeded),
        (c.in_flight, "▓", theme.running),
        (c.failed, "✗", theme.failed),
        (c.cancelled, "–", theme.aborted),
        (c.pending, "░", theme.pending),
    ];
    let mut spans = vec![Span::raw(" ")];
    for ((_, glyph, style), n) in parts.iter().zip(segments(
        &parts.iter().map(|p| p.0).collect::<Vec<_>>(),
        cells,
    )) {
        if n > 0 {
            spans.push(Span::styled(glyph.repeat(n), *style));
        }
    }
    spans.push(Span::raw(label));
    Line::from(spans)
}

/// Split `cells` among `counts` in proportion, every non-zero count getting
/// at least one cell when there is room (a single failure must show).
fn segments(counts: &[usize], cells: usize) -> Vec<usize> {
    let total: usize = counts.iter().sum();
    if total == 0 {
        return counts.iter().map(|_| 0).collect();
    }
    let mut out: Vec<usize> = counts
        .iter()
        .map(|&n| {
            if n == 0 {
                0
            } else {
                (n * cells / total).max(1)
            }
        })
        .collect();
    // Rounding and the minimum of one can miss or overshoot: settle the
    // difference on the largest segment.
    let sum: usize = out.iter().sum();
    if let Some(largest) = (0..out.len()).max_by_key(|&i| (out[i], counts[i])) {
        if sum < cells {
            out[largest] += cells - sum;
        } else {
            let over = sum - cells;
            out[largest] = out[largest].saturating_sub(over).max(1);
        }
    }
    out
}

fn vms(frame: &mut Frame, area: Rect, app: &App, job: &Evacuation, theme: &Theme, focused: bool) {
    let wide = area.width >= WIDE;
    let selected = app.evacuation_vm_row.min(job.vms.len().saturating_sub(1));
    let range = window(
        selected,
        job.vms.len(),
        area.height.saturating_sub(1) as usize,
    );
    let rows = job.vms[range.clone()].iter().map(|vm| {
        let (style, symbol, label) = vm_state(theme, vm);
        let mut attempts = Vec::new();
        for (i, a) in vm.attempts.iter().enumerate() {
            let (style, symbol, _) = attempt_look(theme, a);
            if i > 0 {
                attempts.push(Span::raw(" "));
            }
            attempts.push(Span::raw(a.destination.clone()));
            attempts.push(Span::styled(symbol, style));
        }
        // The last attempt's: an earlier failure shows in ATTEMPTS.
        let feature = vm
            .attempts
            .last()
            .and_then(|a| a.failed_feature.clone())
            .unwrap_or_default();
        let (why, why_style) = reason(app, vm, theme);
        Row::new(vec![
            Cell::from(Span::styled(format!("{symbol} {label}"), style)),
            Cell::from(vm.name.clone()),
            Cell::from(vm.host.clone()),
            Cell::from(format!("{}/{}", counted(vm), job.max_attempts)),
            Cell::from(Line::from(attempts)),
            Cell::from(Span::styled(feature, theme.failed)),
            Cell::from(Span::styled(why, why_style)),
        ])
    });
    let widths = if wide {
        [
            Constraint::Length(11),
            Constraint::Length(10),
            Constraint::Length(7),
            Constraint::Length(5),
            Constraint::Length(22),
            Constraint::Length(13),
            Constraint::Min(10),
        ]
    } else {
        [
            Constraint::Length(11),
            Constraint::Length(8),
            Constraint::Length(5),
            Constraint::Length(5),
            Constraint::Length(11),
            Constraint::Length(12),
            Constraint::Min(8),
        ]
    };
    let table = Table::new(rows, widths)
        .header(
            Row::new([
                "STATE",
                "VM",
                "ON",
                "TRIES",
                "ATTEMPTS",
                "FAILING",
                "WHY / WAITING",
            ])
            .style(theme.header),
        )
        .row_highlight_style(if focused {
            theme.selected
        } else {
            Style::default()
        });
    let mut table_state = TableState::default();
    if focused && !job.vms.is_empty() {
        table_state.select(Some(selected - range.start));
    }
    frame.render_stateful_widget(table, area, &mut table_state);
}

/// Why a VM is where it is, in a cell: what it waits for, what failed it,
/// or where its attempt in flight has got to.
fn reason(app: &App, vm: &JobVm, theme: &Theme) -> (String, Style) {
    let last_error = || {
        vm.attempts
            .iter()
            .rev()
            .find_map(|a| a.error.clone())
            .unwrap_or_default()
    };
    match vm.state {
        VmState::Pending => match &vm.waiting {
            Some(w) => (w.clone(), theme.warning),
            None => ("queued".into(), theme.dim),
        },
        VmState::InFlight => (in_flight(app, vm), theme.running),
        VmState::Failed => (vm.waiting.clone().unwrap_or_else(last_error), theme.error),
        VmState::Moved if vm.degraded => (last_error(), theme.degraded),
        VmState::Moved => (vm.waiting.clone().unwrap_or_default(), theme.dim),
        VmState::Cancelled => (format!("stays on {}", vm.host), theme.dim),
    }
}

/// `→ hv-a, perform 45%`: where the attempt in flight goes and how far it
/// has got.
fn in_flight(app: &App, vm: &JobVm) -> String {
    let destination = vm
        .attempts
        .last()
        .map_or(vm.host.as_str(), |a| a.destination.as_str());
    match progress(app, vm) {
        Some(progress) => format!("→ {destination}, {progress}"),
        None => format!("→ {destination}"),
    }
}

/// `perform 45%`, from the migration the console follows.
fn progress(app: &App, vm: &JobVm) -> Option<String> {
    let m = vm
        .migration_id
        .as_ref()
        .and_then(|id| app.state().migrations.get(id))
        .filter(|m| m.record.outcome == proto::Outcome::None as i32)?;
    let pct = m
        .record
        .transfer
        .and_then(|t| (t.bytes_transferred * 100).checked_div(t.bytes_total))
        .map_or(String::new(), |p| format!(" {p}%"));
    Some(format!("{}{pct}", current_phase(&m.record)))
}

/// The selected VM's story: every attempt, then why it waits, why it gave
/// up, or where it runs now.
fn story<'a>(app: &App, vm: &JobVm, job: &Evacuation, theme: &Theme) -> Vec<Line<'a>> {
    let mut lines: Vec<Line> = vm
        .attempts
        .iter()
        .map(|a| {
            let (style, symbol, label) = attempt_look(theme, a);
            let mut spans = vec![
                Span::raw(format!(
                    " #{} {} {:<6} ",
                    a.attempt, theme.symbols.arrow, a.destination
                )),
                Span::styled(format!("{symbol} {label}"), style),
            ];
            if a.outcome.is_none()
                && let Some(progress) = progress(app, vm)
            {
                spans.push(Span::styled(format!("  {progress}"), theme.dim));
            }
            if a.busy {
                spans.push(Span::styled(
                    "  waited and tried again (not counted)",
                    theme.dim,
                ));
            }
            if a.interrupted {
                spans.push(Span::styled(
                    "  cut short by the source's own stop (not counted)",
                    theme.dim,
                ));
            }
            if let Some(cause) = &a.cause {
                spans.push(Span::styled(format!("  {}", cause.brief()), theme.failed));
            } else if let Some(f) = &a.failed_feature {
                spans.push(Span::styled(format!("  {f}"), theme.failed));
            }
            if let Some(e) = &a.error {
                spans.push(Span::styled(format!(": {e}"), theme.error));
            }
            Line::from(spans)
        })
        .collect();
    let last = match vm.state {
        VmState::Pending => match &vm.waiting {
            Some(w) => Line::styled(format!(" waiting: {w}"), theme.warning),
            None => Line::styled(
                " queued: starts when the evacuation has a free slot",
                theme.dim,
            ),
        },
        VmState::InFlight => return lines,
        VmState::Failed => Line::styled(
            match &vm.waiting {
                Some(w) => format!(" gave up: {w}"),
                None => format!(
                    " gave up: out of attempts ({} of {}){}",
                    counted(vm),
                    job.max_attempts,
                    if vm.host.is_empty() {
                        String::new()
                    } else {
                        format!("; it still runs on {}", vm.host)
                    }
                ),
            },
            theme.error,
        ),
        VmState::Moved => Line::styled(
            format!(
                " runs on {}{}",
                vm.host,
                if vm.degraded {
                    ", degraded: a feature that is not required failed"
                } else {
                    ""
                }
            ),
            if vm.degraded {
                theme.degraded
            } else {
                theme.succeeded
            },
        ),
        VmState::Cancelled => Line::styled(
            format!(" stays on {}: the evacuation was cancelled first", vm.host),
            theme.dim,
        ),
    };
    lines.push(last);
    lines
}

/// Rows `lines` take wrapped at `width`.
fn wrapped_height(lines: &[Line], width: u16) -> usize {
    let width = usize::from(width.max(1));
    lines.iter().map(|l| l.width().max(1).div_ceil(width)).sum()
}

#[cfg(test)]
mod tests {
    use super::segments;

    #[test]
    fn every_state_that_has_a_vm_gets_a_cell_of_the_gauge() {
        assert_eq!(segments(&[2, 1, 1, 0, 3], 20), [5, 2, 2, 0, 11]);
        assert_eq!(segments(&[0, 0, 1, 0, 99], 10), [0, 0, 1, 0, 9]);
        assert_eq!(segments(&[0, 0, 0, 0, 0], 10), [0, 0, 0, 0, 0]);
        for counts in [[1, 1, 1, 1, 1], [7, 0, 0, 0, 0], [3, 2, 1, 0, 40]] {
            assert_eq!(
                segments(&counts, 12).iter().sum::<usize>(),
                12,
                "{counts:?}"
            );
        }
    }
}
