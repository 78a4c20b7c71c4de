//! Dialogs drawn over the screen: confirmations, the destination picker,
//! the VM chooser, the evacuate form, the cancel question, help and
//! messages.

use ratatui::Frame;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};

use super::super::app::{App, Dialog, EvacuateForm};
use super::super::keymap;
use super::super::theme::Theme;

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let [row] = Layout::vertical([Constraint::Length(height.min(area.height))])
        .flex(Flex::Center)
        .areas(area);
    let [cell] = Layout::horizontal([Constraint::Length(width.min(area.width))])
        .flex(Flex::Center)
        .areas(row);
    cell
}

fn popup(frame: &mut Frame, title: &str, lines: Vec<Line>, theme: &Theme, danger: bool) {
    let width = (frame.area().width * 4 / 5).clamp(40, 110);
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
        Dialog::Confirm {
            title, lines, mode, ..
        } => {
            let mut body: Vec<Line> = lines.iter().map(|l| Line::raw(format!(" {l}"))).collect();
            body.push(Line::default());
            if let Some(mode) = mode {
                body.push(Line::from(vec![
                    Span::raw(" mode: "),
                    Span::styled(mode.as_str(), theme.title),
                    Span::styled("  (m switches)", theme.dim),
                ]));
            }
            body.push(Line::from(vec![
                Span::styled(" y/enter ", theme.key),
                Span::raw("confirm   "),
                Span::styled(" n/esc ", theme.key),
                Span::raw("cancel"),
            ]));
            popup(frame, title, body, theme, true);
        }
        Dialog::Picker {
            title,
            choices,
            selected,
            mode,
            ..
        } => {
            let mut body: Vec<Line> = choices
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (symbol, style, why) = match &c.refusal {
                        None => (theme.symbols.done, theme.done, "eligible"),
                        Some(why) => (theme.symbols.failed, theme.dim, why.as_str()),
                    };
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
                        Span::styled(why.to_string(), theme.dim),
                    ])
                })
                .collect();
            body.push(Line::default());
            body.push(Line::from(vec![
                Span::raw(" mode: "),
                Span::styled(mode.as_str(), theme.title),
                Span::styled("  (m switches)   ", theme.dim),
                Span::styled(" enter ", theme.key),
                Span::raw("go   "),
                Span::styled(" esc ", theme.key),
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
            let body = evacuate_form(form, theme);
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
            body.push(Line::styled(
                format!(" theme {} · logs in {}", app.theme, app.log_path),
                theme.dim,
            ));
            body.push(Line::styled(" esc closes", theme.dim));
            popup(frame, "help", body, theme, false);
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

/// The evacuate form: one line per choice, the cursor's line one solid bar
/// (as in the picker).
fn evacuate_form<'a>(form: &EvacuateForm, theme: &Theme) -> Vec<Line<'a>> {
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
    let choices = [
        (
            "mode",
            form.mode.as_str().to_string(),
            match form.mode {
                crate::protocol::Mode::Safe => "a required feature must work there",
                crate::protocol::Mode::Fast => "no feature failure stops a move",
            }
            .to_string(),
        ),
        ("concurrency", form.concurrency.to_string(), concurrency),
        (
            "max attempts",
            form.max_attempts.to_string(),
            "per VM, each on another host".to_string(),
        ),
    ];
    for (row, (name, value, note)) in choices.into_iter().enumerate() {
        let cursor = row == form.row;
        body.push(form_line(
            cursor,
            vec![
                Span::raw(format!("{name:<13}")),
                Span::styled(format!("‹ {value} ›"), theme.title),
                Span::styled(format!("  {note}"), theme.dim),
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
    body.push(Line::from(vec![
        Span::styled(" j/k ", theme.key),
        Span::raw("move  "),
        Span::styled(" ←/→ ", theme.key),
        Span::raw("change  "),
        Span::styled(" 0-9 ", theme.key),
        Span::raw("type  "),
        Span::styled(" enter ", theme.key),
        Span::raw("start  "),
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
