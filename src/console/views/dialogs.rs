//! Dialogs drawn over the screen: confirmations, the destination picker,
//! the VM chooser, the evacuate form, the cancel question, help and
//! messages.

use ratatui::Frame;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};

use super::super::app::{App, Dialog, Eligibility, EvacuateForm, RetryForm, eligibility_text};
use super::super::completion::{CompletionChoice, base, budget_text};
use super::super::keymap;
use super::super::msg::policy_text;
use super::super::theme::Theme;
use super::hanging;
use super::outlook::fit;
use crate::protocol::Mode;
use crate::protocol::completion::{Completion, Postcopy, WhenSpent};

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let [row] = Layout::vertical([Constraint::Length(height.min(area.height))])
        .flex(Flex::Center)
        .areas(area);
    let [cell] = Layout::horizontal([Constraint::Length(width.min(area.width))])
        .flex(Flex::Center)
        .areas(row);
    cell
}

/// A popup's width on this screen.
fn popup_width(frame: &Frame) -> u16 {
    (frame.area().width * 4 / 5).clamp(40, 110)
}

/// The columns inside a popup, for text fitted to them.
fn popup_inner(frame: &Frame) -> usize {
    usize::from(popup_width(frame).min(frame.area().width).saturating_sub(2))
}

fn popup(frame: &mut Frame, title: &str, lines: Vec<Line>, theme: &Theme, danger: bool) {
    let width = popup_width(frame);
    // As tall as the lines are once wrapped, so none is cut off.
    let inner = usize::from(width.min(frame.area().width).saturating_sub(2).max(1));
    let rows: usize = lines.iter().map(|l| l.width().max(1).div_ceil(inner)).sum();
    let height = (rows as u16 + 2).min(frame.area().height);
    let area = centered(frame.area(), width, height);
    frame.render_widget(Clear, area);
    let style = if danger {
        theme.dialog_danger
    } else {
        theme.dialog
    };
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: false }).block(
            Block::default()
                .borders(Borders::ALL)
                .border_style(style)
                .title(Span::styled(format!(" {title} "), style)),
        ),
        area,
    );
}

pub fn draw(frame: &mut Frame, app: &App, theme: &Theme) {
    let Some(dialog) = &app.dialog else { return };
    match dialog {
        Dialog::Confirm { title, lines, .. } => {
            let mut body: Vec<Line> = lines.iter().map(|l| Line::raw(format!(" {l}"))).collect();
            body.push(Line::default());
            body.push(Line::from(vec![
                Span::styled(" y/enter ", theme.key),
                Span::raw("confirm   "),
                Span::styled(" n/esc ", theme.key),
                Span::raw("cancel"),
            ]));
            popup(frame, title, body, theme, true);
        }
        Dialog::Retry(form) => {
            let body = retry_form(form, theme, popup_inner(frame));
            let title = format!(
                "Retry {} migration(s) on the same host?",
                form.targets.len()
            );
            popup(frame, &title, body, theme, true);
        }
        Dialog::Picker {
            title,
            vm,
            retry,
            choices,
            selected,
            mode,
            completion,
            last,
            ..
        } => {
            // What a host's line has after the cursor, symbol and name.
            let room = popup_inner(frame).saturating_sub(3 + 2 + 12);
            let mut body: Vec<Line> = choices
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let failed = c.failed_here.as_deref();
                    // One line per host, whatever the width: the cause of
                    // an earlier failure goes first when there is no room
                    // for it, then the end of a long reason (enter says it
                    // whole).
                    let said = |first: &str| {
                        let mut wordings = Vec::new();
                        if let Some(failed) = failed {
                            wordings.push(format!("{first} · {failed}"));
                            let cause = failed.split(':').next().unwrap_or(failed);
                            wordings.push(format!("{first} · {cause}"));
                        }
                        if failed.is_none() || first.chars().count() > 24 {
                            wordings.push(first.to_string());
                        }
                        fit(&wordings, room)
                    };
                    // What the VM's source agent answered (`tern check`).
                    let text = eligibility_text(vm, &c.eligibility);
                    let eligible = c.eligibility == Eligibility::Eligible;
                    let (symbol, style) = match (&c.eligibility, failed) {
                        (Eligibility::Eligible, None) => (theme.symbols.done, theme.done),
                        (Eligibility::Eligible, Some(_)) => (theme.symbols.done, theme.warning),
                        (Eligibility::Checking, _) => (theme.symbols.pending, theme.pending),
                        (Eligibility::NoAnswer(_), _) => (theme.symbols.lost, theme.lost),
                        (Eligibility::RunsHere | Eligibility::Refused(_), _) => {
                            (theme.symbols.failed, theme.dim)
                        }
                    };
                    let why = said(&text);
                    // The cursor line is one solid bar: the spans' own
                    // colours would fight its background.
                    if i == *selected {
                        return Line::styled(
                            format!(" {} {symbol} {:<12}{why}", theme.symbols.selected, c.host),
                            theme.selected,
                        );
                    }
                    Line::from(vec![
                        Span::raw("   "),
                        Span::styled(format!("{symbol} {:<12}", c.host), style),
                        Span::styled(
                            why.to_string(),
                            if eligible && failed.is_some() {
                                theme.warning
                            } else {
                                theme.dim
                            },
                        ),
                    ])
                })
                .collect();
            body.push(Line::default());
            let policy = completion.over(base(*mode, *last));
            body.extend(policy_lines(*mode, &policy, theme, popup_inner(frame)));
            body.push(Line::default());
            let host = choices.get(*selected).map_or("?", |c| c.host.as_str());
            let what = match retry {
                Some(id) => format!("retry {id} on {host}"),
                None => format!("migrate {vm} to {host}"),
            };
            body.extend(confirm_lines("enter", &what, *mode, &policy, theme));
            body.push(Line::from(vec![
                Span::styled(" esc     ", theme.key),
                Span::raw("cancel"),
            ]));
            popup(frame, title, body, theme, false);
        }
        Dialog::ChooseVm { vms, selected } => {
            let mut body: Vec<Line> = vms
                .iter()
                .enumerate()
                .map(|(i, (vm, host))| {
                    let line = Line::raw(format!(
                        " {} {vm:<14} on {host}",
                        if i == *selected { "▸" } else { " " }
                    ));
                    if i == *selected {
                        line.style(theme.selected)
                    } else {
                        line
                    }
                })
                .collect();
            body.push(Line::styled(
                " enter: choose the destination   esc: cancel",
                theme.dim,
            ));
            popup(frame, "New migration: which VM?", body, theme, false);
        }
        Dialog::Evacuate(form) => {
            let body = evacuate_form(form, theme, popup_inner(frame));
            popup(frame, &format!("Evacuate {}", form.host), body, theme, true);
        }
        Dialog::CancelEvacuation {
            host,
            id,
            cancelling,
        } => {
            let key = |k: &str| Span::styled(format!(" {k:<8}"), theme.key);
            // As it is now: attempts may have ended since the dialog opened.
            let in_flight = &app.live.evacuations.get(id).map_or(0, |e| e.in_flight());
            let (them, attempts) = match in_flight {
                1 => ("it", "the attempt in flight".to_string()),
                n => ("them", format!("the {n} attempts in flight")),
            };
            let mut body = vec![Line::raw(if *cancelling {
                format!(" {id} is cancelling, letting {attempts} finish.")
            } else if *in_flight == 0 {
                format!(" Nothing is in flight: the VMs left stay on {host}.")
            } else {
                format!(" No new attempts start. What of {attempts}?")
            })];
            body.push(Line::default());
            if !cancelling {
                body.push(Line::from(vec![
                    key("f/enter"),
                    Span::raw(if *in_flight == 0 {
                        "cancel".to_string()
                    } else {
                        format!("let {them} finish, then stop")
                    }),
                ]));
            }
            if *in_flight > 0 {
                body.push(Line::from(vec![
                    key("a"),
                    Span::raw(format!(
                        "abort {them}: a VM not past its commit point stays"
                    )),
                ]));
            }
            body.push(Line::from(vec![key("esc"), Span::raw("keep evacuating")]));
            popup(
                frame,
                &format!("Cancel evacuation {id} of {host}?"),
                body,
                theme,
                true,
            );
        }
        Dialog::Help => {
            let mut body: Vec<Line> = keymap::help(app.read_only)
                .map(|b| {
                    Line::from(vec![
                        Span::styled(format!(" {:<10}", b.shown), theme.key),
                        Span::raw(b.help),
                    ])
                })
                .collect();
            body.push(Line::default());
            body.extend(hanging(
                Span::styled(format!(" {:<10}", "m p b w"), theme.key),
                vec![Span::raw(
                    "in the retry, destination and evacuate dialogs: mode, post-copy, \
                     budget per GiB (or type it), what a spent budget does",
                )],
                popup_inner(frame),
            ));
            body.push(Line::styled(
                format!(" theme {} · logs in {}", app.theme, app.log_path),
                theme.dim,
            ));
            body.push(Line::styled(" esc closes", theme.dim));
            popup(frame, "help", body, theme, false);
        }
        Dialog::Doctor { host, findings } => {
            let body = doctor_lines(host, findings.as_deref(), theme);
            popup(frame, &format!("doctor {host}"), body, theme, false);
        }
        Dialog::Message(text) => popup(
            frame,
            "note",
            vec![
                Line::raw(format!(" {text}")),
                Line::styled(" esc closes", theme.dim),
            ],
            theme,
            false,
        ),
    }
}

/// `tern doctor HOST` as a dialog: errors, then warnings, each with its
/// fix, then what is fine (a small terminal cuts the fine ones first).
fn doctor_lines<'a>(
    host: &str,
    findings: Option<&[crate::cli::doctor::Finding]>,
    theme: &Theme,
) -> Vec<Line<'a>> {
    let Some(findings) = findings else {
        return vec![
            Line::raw(format!(
                " asking {host}'s agent to check itself (it runs a short KVM guest)…"
            )),
            Line::styled(" esc closes", theme.dim),
        ];
    };
    let rank = |verdict: &str| match verdict {
        "error" => 0,
        "warning" => 1,
        _ => 2,
    };
    let mut sorted: Vec<&crate::cli::doctor::Finding> = findings.iter().collect();
    sorted.sort_by_key(|f| rank(f.verdict));
    let width = sorted.iter().map(|f| f.check.len()).max().unwrap_or(0);
    let mut body = Vec::new();
    for f in sorted {
        let style = match f.verdict {
            "error" => theme.error,
            "warning" => theme.warning,
            _ => theme.succeeded,
        };
        body.push(Line::from(vec![
            Span::styled(format!(" {:<7}", f.verdict), style),
            Span::raw(format!(" {:<width$}  {}", f.check, f.detail)),
        ]));
        if !f.fix.is_empty() {
            body.push(Line::styled(
                format!(" {:<7} {:<width$}  fix: {}", "", "", f.fix),
                theme.dim,
            ));
        }
    }
    let errors = findings.iter().filter(|f| f.verdict == "error").count();
    let warnings = findings.iter().filter(|f| f.verdict == "warning").count();
    body.push(Line::styled(
        format!(" {errors} error(s), {warnings} warning(s) · esc closes"),
        theme.dim,
    ));
    body
}

/// The retry dialog: what each attempt retries, the mode and policy with
/// the keys that change them, and the line that says what `y` sends.
fn retry_form<'a>(form: &RetryForm, theme: &Theme, width: usize) -> Vec<Line<'a>> {
    let policies = form.policies();
    // Attempts whose policies differ each name their own.
    let differ = policies.windows(2).any(|w| w[0] != w[1]);
    let mut body: Vec<Line> = form
        .targets
        .iter()
        .zip(&policies)
        .flat_map(|(t, policy)| {
            let error = if t.error.is_empty() { "none" } else { &t.error };
            let mut line = format!(
                "{} {} → {} again (attempt {}); last error: {error}",
                t.vm,
                t.source,
                t.destination,
                t.attempt + 1
            );
            if differ {
                line.push_str(&format!("; {}", policy.describe()));
            }
            hanging(Span::raw(" "), vec![Span::raw(line)], width)
        })
        .collect();
    body.push(Line::default());
    let shown = form.completion.over(form.base());
    body.extend(policy_lines(form.mode, &shown, theme, width));
    body.push(Line::default());
    let what = match &form.targets[..] {
        [one] => format!("retry {}", one.id),
        many => format!("retry {} migrations", many.len()),
    };
    if differ {
        body.push(Line::from(vec![
            Span::styled(" y/enter ", theme.key),
            Span::raw(format!(
                "{what}: {}, each policy as listed",
                form.mode.as_str()
            )),
        ]));
    } else {
        body.extend(confirm_lines("y/enter", &what, form.mode, &shown, theme));
    }
    body.push(Line::from(vec![
        Span::styled(" n/esc   ", theme.key),
        Span::raw("cancel"),
    ]));
    body
}

/// The mode and the completion choices, one line each with its key, as the
/// retry dialog and the picker show them; the notes fitted to `width`.
fn policy_lines<'a>(mode: Mode, policy: &Completion, theme: &Theme, width: usize) -> Vec<Line<'a>> {
    // " m " + " when spent " + value: what is left is the note's.
    const VALUE: usize = 14;
    let room = width.saturating_sub(3 + 12 + VALUE + 1);
    let row = |key: &str, name: &str, value: String, note: &[&str], applies: bool| {
        let note: Vec<String> = note.iter().map(|n| n.to_string()).collect();
        Line::from(vec![
            Span::styled(format!(" {key} "), theme.key),
            Span::raw(format!(" {name:<11}")),
            Span::styled(
                format!("{value:<VALUE$}"),
                if applies { theme.title } else { theme.dim },
            ),
            Span::styled(format!(" {}", fit(&note, room)), theme.dim),
        ])
    };
    let spent = CompletionChoice::when_spent_applies(policy);
    vec![
        row(
            "m",
            "mode",
            mode.as_str().to_string(),
            mode_note(mode),
            true,
        ),
        row(
            "p",
            "post-copy",
            policy.postcopy.as_str().to_string(),
            postcopy_note(policy.postcopy),
            true,
        ),
        row(
            "b",
            "budget",
            budget_text(policy),
            &["b steps, 0-9 types; 0: none", "b or 0-9; 0: none"],
            true,
        ),
        row(
            "w",
            "when spent",
            when_spent_value(policy),
            when_spent_note(policy),
            spent,
        ),
    ]
}

/// What a spent budget does, or a dash where it has nothing to decide.
fn when_spent_value(policy: &Completion) -> String {
    if CompletionChoice::when_spent_applies(policy) {
        policy.when_spent.as_str().to_string()
    } else {
        "–".to_string()
    }
}

// The notes beside each choice, longest wording first (see `fit`).

fn mode_note(mode: Mode) -> &'static [&'static str] {
    match mode {
        Mode::Safe => &[
            "a required feature must work there",
            "required features must work",
        ],
        Mode::Fast => &["no feature failure stops a move", "features never stop it"],
    }
}

fn postcopy_note(postcopy: Postcopy) -> &'static [&'static str] {
    match postcopy {
        Postcopy::Never => &[
            "pre-copy only: the source keeps the guest to the end",
            "pre-copy only",
        ],
        Postcopy::Auto => &[
            "switch when pre-copy cannot finish or the budget is spent",
            "switch if pre-copy cannot finish",
            "switch if stuck",
        ],
        Postcopy::Now => &["switch as soon as the transfer runs", "switch at once"],
    }
}

fn when_spent_note(policy: &Completion) -> &'static [&'static str] {
    if !CompletionChoice::when_spent_applies(policy) {
        return if policy.postcopy == Postcopy::Never {
            &["no budget to spend"]
        } else {
            &[
                "a spent budget switches to post-copy",
                "post-copy takes over",
            ]
        };
    }
    match policy.when_spent {
        WhenSpent::Abort => &[
            "end the attempt: the guest stays on the source",
            "the guest stays on the source",
            "the guest stays",
        ],
        WhenSpent::Continue => &["keep transferring"],
    }
}

/// What the confirming key sends, policy included, on two lines so that
/// neither wraps:
///
/// ```text
///  y/enter retry m-1
///          safe; post-copy never, 150 s/GiB, then abort
/// ```
fn confirm_lines<'a>(
    key: &str,
    what: &str,
    mode: Mode,
    policy: &Completion,
    theme: &Theme,
) -> Vec<Line<'a>> {
    vec![
        Line::from(vec![
            Span::styled(format!(" {key:<7} "), theme.key),
            Span::raw(what.to_string()),
        ]),
        Line::from(vec![
            Span::raw(" ".repeat(9)),
            Span::styled(policy_text(mode, policy), theme.title),
        ]),
    ]
}

/// The evacuate form: one line per choice, the cursor's line one solid bar
/// (as in the picker).
fn evacuate_form<'a>(form: &EvacuateForm, theme: &Theme, width: usize) -> Vec<Line<'a>> {
    let host = &form.host;
    let vms = match form.vms {
        1 => "1 VM".to_string(),
        n => format!("{n} VMs"),
    };
    let mut body = vec![
        Line::raw(format!(
            " Moves {host}'s {vms} to other hosts, as a job of its agent."
        )),
        Line::raw(format!(" {host} takes no migrations until undrained (u).")),
        Line::default(),
    ];
    let concurrency = match (form.concurrency, form.max_outgoing) {
        (0, Some(max)) => format!("= {host}'s max_outgoing: {max} at a time"),
        (0, None) => format!("= {host}'s max_outgoing"),
        _ => "migrations at once".to_string(),
    };
    let policy = form.policy();
    let owned = |notes: &[&str]| notes.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    // In the order of the form's rows (EvacuateForm::MODE, ...).
    let choices = [
        (
            "mode",
            form.mode.as_str().to_string(),
            owned(mode_note(form.mode)),
            true,
        ),
        (
            "post-copy",
            policy.postcopy.as_str().to_string(),
            owned(postcopy_note(policy.postcopy)),
            true,
        ),
        (
            "budget",
            budget_text(&policy),
            owned(&["per GiB of memory; 0: none", "0: none"]),
            true,
        ),
        (
            "when spent",
            when_spent_value(&policy),
            owned(when_spent_note(&policy)),
            CompletionChoice::when_spent_applies(&policy),
        ),
        (
            "concurrency",
            form.concurrency.to_string(),
            vec![concurrency],
            true,
        ),
        (
            "max attempts",
            form.max_attempts.to_string(),
            owned(&["per VM, each on another host", "per VM"]),
            true,
        ),
    ];
    for (row, (name, value, note, applies)) in choices.into_iter().enumerate() {
        let cursor = row == form.row;
        let value = format!("‹ {value} ›");
        // "   " or " ▸ ", the name, the value, two spaces: the note gets the rest.
        let room = width.saturating_sub(3 + 13 + Span::raw(value.as_str()).width() + 2);
        body.push(form_line(
            cursor,
            vec![
                Span::raw(format!("{name:<13}")),
                Span::styled(value, if applies { theme.title } else { theme.dim }),
                Span::styled(format!("  {}", fit(&note, room)), theme.dim),
            ],
            theme,
        ));
    }
    body.push(Line::raw(" leave out (space):"));
    for (i, e) in form.exclude.iter().enumerate() {
        let cursor = EvacuateForm::HOSTS + i == form.row;
        body.push(form_line(
            cursor,
            vec![
                Span::raw(format!(
                    "[{}] {:<10}",
                    if e.excluded { "x" } else { " " },
                    e.host
                )),
                Span::styled(e.note.clone().unwrap_or_default(), theme.dim),
            ],
            theme,
        ));
    }
    body.push(Line::default());
    body.extend(confirm_lines(
        "enter",
        &format!("evacuate {host}"),
        form.mode,
        &policy,
        theme,
    ));
    body.push(Line::from(vec![
        Span::styled(" j/k ", theme.key),
        Span::raw("move  "),
        Span::styled(" ←/→ ", theme.key),
        Span::raw("change  "),
        Span::styled(" 0-9 ", theme.key),
        Span::raw("type  "),
        Span::styled(" esc ", theme.key),
        Span::raw("cancel"),
    ]));
    body
}

fn form_line<'a>(cursor: bool, spans: Vec<Span<'a>>, theme: &Theme) -> Line<'a> {
    if cursor {
        let text: String = spans.iter().map(|s| s.content.as_ref()).collect();
        return Line::styled(
            format!(" {} {text}", theme.symbols.selected),
            theme.selected,
        );
    }
    let mut line = vec![Span::raw("   ")];
    line.extend(spans);
    Line::from(line)
}
