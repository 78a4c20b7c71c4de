//! Dialogs drawn over the screen: confirmations, the destination picker,
//! the VM chooser, help and messages.

use ratatui::Frame;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};

use super::super::app::{App, Dialog};
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
    let height = (lines.len() as u16 + 2).min(frame.area().height);
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
