//! Snapshots of every screen and dialog at 120×40 and 80×24 from the fixture
//! cluster (text; `cargo insta review` or INSTA_UPDATE=always accepts new
//! ones), and the colours of the cells that carry meaning, which text
//! snapshots cannot see.

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::KeyCode;
use ratatui::style::Style;

use super::draw;
use crate::console::app::{App, update};
use crate::console::fixture::*;
use crate::console::msg::Msg;
use crate::console::theme::Theme;

const SIZES: [(u16, u16); 2] = [(120, 40), (80, 24)];

fn render(app: &App, theme: &Theme, (w, h): (u16, u16)) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(w, h)).expect("a test terminal");
    terminal
        .draw(|frame| draw(frame, app, theme))
        .expect("drawn");
    terminal
}

fn app_after(keys: &[Msg]) -> App {
    let mut app = fixture();
    app.live.now_ms = 12_000;
    for k in keys {
        update(&mut app, k.clone());
    }
    app
}

/// Every screen and dialog, by name, and the keys that lead to it.
fn screens() -> Vec<(&'static str, Vec<Msg>)> {
    vec![
        ("overview", vec![]),
        ("detail_failed", vec![key('j'), code(KeyCode::Enter)]),
        (
            "vms",
            vec![key(':'), key('v'), key('m'), key('s'), code(KeyCode::Enter)],
        ),
        (
            "events",
            vec![
                key(':'),
                key('e'),
                key('v'),
                key('e'),
                key('n'),
                key('t'),
                key('s'),
                code(KeyCode::Enter),
            ],
        ),
        ("hosts_focused", vec![code(KeyCode::Tab), key('j')]),
        ("help", vec![key('?')]),
        ("abort_confirm", vec![key('a')]),
        ("retry_confirm", vec![key('j'), key('r')]),
        ("picker", vec![key('j'), key('d')]),
        ("new_migration", vec![key('n')]),
        ("evacuate", vec![code(KeyCode::Tab), key('e')]),
        (
            "evacuate_choices",
            vec![
                code(KeyCode::Tab),
                key('e'),
                key('l'),
                key('j'),
                key('j'),
                key('j'),
                key(' '),
            ],
        ),
        ("evacuations", vec![key('E'), key('j')]),
        (
            "evacuations_list",
            vec![key('E'), code(KeyCode::Tab), key('j')],
        ),
        ("cancel_evacuation", vec![key('E'), key('c')]),
        (
            "filter",
            vec![
                key('/'),
                key('s'),
                key('t'),
                key('a'),
                key('t'),
                key('e'),
                key(':'),
                key('f'),
            ],
        ),
        ("frozen_marked", vec![key('f'), key(' ')]),
    ]
}

#[test]
fn every_screen_and_dialog_at_both_sizes() {
    let theme = Theme::named("default").expect("default theme");
    for (name, keys) in screens() {
        let app = app_after(&keys);
        for size in SIZES {
            let terminal = render(&app, &theme, size);
            insta::assert_snapshot!(format!("{name}_{}x{}", size.0, size.1), terminal.backend());
        }
    }
}

/// The first cell whose symbol starts `text` on a row that contains it.
fn find(buffer: &Buffer, text: &str) -> (u16, u16) {
    find_below(buffer, text, 0)
}

/// The same, from row `first` down (row 0 is the header bar).
fn find_below(buffer: &Buffer, text: &str, first: u16) -> (u16, u16) {
    let area = buffer.area;
    for y in first..area.height {
        let row: String = (0..area.width)
            .map(|x| buffer[(x, y)].symbol().to_string())
            .collect();
        if let Some(byte) = row.find(text) {
            let x = row[..byte].chars().count() as u16;
            return (x, y);
        }
    }
    panic!("{text:?} is not on the screen");
}

fn fg(buffer: &Buffer, at: (u16, u16)) -> Option<ratatui::style::Color> {
    buffer[at].style().fg
}

fn same_colour(buffer: &Buffer, at: (u16, u16), style: Style, what: &str) {
    assert_eq!(fg(buffer, at), style.fg, "{what} at {at:?}");
}

#[test]
fn the_cells_that_carry_meaning_have_their_colours() {
    let theme = Theme::named("default").expect("default theme");
    let app = app_after(&[]);
    let terminal = render(&app, &theme, (120, 40));
    let buffer = terminal.backend().buffer();
    // The failing feature and stage in the failed row, in the failure colour.
    same_colour(
        buffer,
        find(buffer, "port-profile ✗ finish"),
        theme.failed,
        "failing feature",
    );
    // A lost agent, and a connected one.
    same_colour(buffer, find(buffer, "⨯ lost"), theme.lost, "lost agent");
    same_colour(
        buffer,
        find(buffer, "● connected"),
        theme.connected,
        "connected agent",
    );
    // The pending rollback warning on hv-c.
    same_colour(
        buffer,
        find(buffer, "⚠ 1 pending"),
        theme.warning,
        "pending rollback",
    );
    // The draining host.
    same_colour(
        buffer,
        find(buffer, "draining"),
        theme.draining,
        "draining host",
    );
    // The selected row is drawn with the cursor style (modifiers, e.g. reversed).
    let (x, y) = find(buffer, "web-01");
    let selected = buffer[(x, y)].style();
    assert!(
        selected.add_modifier.contains(theme.selected.add_modifier)
            && (theme.selected.bg.is_none() || selected.bg == theme.selected.bg),
        "the cursor row is not drawn in the selected style: {selected:?}"
    );
}

#[test]
fn a_safe_mode_failure_shows_its_cause_and_failed_stage_in_the_detail() {
    let theme = Theme::named("default").expect("default theme");
    let app = app_after(&[key('j'), code(KeyCode::Enter)]);
    let terminal = render(&app, &theme, (120, 40));
    let buffer = terminal.backend().buffer();
    same_colour(
        buffer,
        find(
            buffer,
            "cause: required feature port-profile failed finish on hv-c",
        ),
        theme.error,
        "the cause",
    );
    same_colour(
        buffer,
        find_below(buffer, "✗ failed", 1),
        theme.failed,
        "the outcome",
    );
}

#[test]
fn no_color_leaves_state_readable_by_symbol() {
    let theme = Theme::named("default").expect("default").without_colors();
    let app = app_after(&[]);
    let terminal = render(&app, &theme, (120, 40));
    let buffer = terminal.backend().buffer();
    for y in 0..buffer.area.height {
        for x in 0..buffer.area.width {
            let style = buffer[(x, y)].style();
            assert!(
                style.fg.is_none_or(|c| c == ratatui::style::Color::Reset)
                    && style.bg.is_none_or(|c| c == ratatui::style::Color::Reset),
                "a colour at ({x}, {y}) under NO_COLOR: {style:?}"
            );
        }
    }
    find(buffer, "port-profile ✗ finish");
    find(buffer, "⨯ lost");
}

#[test]
fn an_evacuation_failure_shows_its_feature_and_cause_in_their_colours() {
    let theme = Theme::named("default").expect("default theme");
    // The cursor on the first VM, so the failed one's row keeps its colours.
    let app = app_after(&[key('E')]);
    // And on the failed one (second, largest first), for its story.
    let on_failed = app_after(&[key('E'), key('j')]);
    for size in SIZES {
        let story = render(&on_failed, &theme, size);
        same_colour(
            story.backend().buffer(),
            find(
                story.backend().buffer(),
                "gave up: out of attempts (2 of 2)",
            ),
            theme.error,
            "why it gave up",
        );
        let terminal = render(&app, &theme, size);
        let buffer = terminal.backend().buffer();
        let (x, y) = find(buffer, "✗ failed    db-03");
        same_colour(buffer, (x, y), theme.failed, "the failed VM's state");
        same_colour(
            buffer,
            find_below(buffer, "port-profile", y),
            theme.failed,
            "the failing feature in its row",
        );
        // Each part of the gauge has its glyph and colour.
        for (glyph, style, what) in [
            ("█", theme.succeeded, "moved"),
            ("▓", theme.running, "in flight"),
            ("✗✗", theme.failed, "failed"),
            ("░", theme.pending, "pending"),
        ] {
            same_colour(buffer, find(buffer, glyph), style, what);
        }
        find(
            buffer,
            "2 moved · 1 in flight · 1 failed · 3 pending · 7 VMs",
        );
    }
}

#[test]
fn the_cancel_question_counts_the_attempts_in_flight_as_they_are_now() {
    let theme = Theme::named("default").expect("default theme");
    let mut app = app_after(&[key('E'), key('c')]);
    let terminal = render(&app, &theme, (120, 40));
    find(
        terminal.backend().buffer(),
        "What of the attempt in flight?",
    );
    // The attempt ends while the question is on screen.
    let mut ended = evacuation();
    for vm in &mut ended.vms {
        if vm.state == crate::proto::EvacuationVmState::InFlight as i32 {
            vm.state = crate::proto::EvacuationVmState::Moved as i32;
        }
    }
    app.live
        .evacuations
        .insert(ended.id.clone(), (&ended).into());
    let terminal = render(&app, &theme, (120, 40));
    find(
        terminal.backend().buffer(),
        "Nothing is in flight: the VMs left stay on hv-e.",
    );
}

/// The fixture with one more migration: api-01 hv-d → hv-e, aborted, its
/// guest left paused on hv-d, with `error` as its cause.
fn app_with_paused_guest(error: &str) -> App {
    use crate::console::msg::Msg;
    use crate::proto;
    let mut app = app_after(&[]);
    let mut record = migration(
        "m-paused",
        "api-01",
        "hv-d",
        "hv-e",
        proto::Outcome::Aborted,
    );
    record.running_on = "hv-d".into();
    record.error = error.into();
    record.guest = proto::GuestCondition::Paused as i32;
    update(
        &mut app,
        Msg::Event(proto::Event {
            host: "hv-d".into(),
            kind: Some(proto::event::Kind::Migration(record)),
        }),
    );
    app
}

/// Open the detail of migration `id`.
fn open(app: &mut App, id: &str) {
    let row = app
        .rows()
        .iter()
        .position(|m| m.record.id == id)
        .expect("the row is listed");
    for _ in 0..row {
        update(app, key('j'));
    }
    update(app, code(KeyCode::Enter));
}

#[test]
fn a_long_cause_is_shown_whole_in_the_detail_at_80x24() {
    let cause = "aborted by the operator; could not resume api-01 on hv-d: QEMU: cont failed: \
                 the monitor socket closed while the CPUs were being started (the end)";
    let theme = Theme::named("default").expect("default theme");
    let mut app = app_with_paused_guest(cause);
    open(&mut app, "m-paused");
    let terminal = render(&app, &theme, (80, 24));
    let buffer = terminal.backend().buffer();
    let (_, first) = find(buffer, "cause: aborted by the operator");
    // Its last words wrap onto a line of their own, below, still drawn.
    let (_, last) = find_below(buffer, "(the end)", first);
    assert!(last > first, "the cause wraps onto {last}, after {first}");
    find_below(buffer, "phases", last);
}

#[test]
fn a_guest_left_paused_by_a_failed_resume_is_shown_in_red_in_the_row_and_the_detail() {
    let theme = Theme::named("default").expect("default theme");
    let mut app = app_with_paused_guest(
        "aborted by the operator; could not resume api-01 on hv-d: QEMU: cont failed",
    );
    let terminal = render(&app, &theme, (120, 40));
    let buffer = terminal.backend().buffer();
    same_colour(
        buffer,
        find(buffer, "guest PAUSED on hv-d"),
        theme.error,
        "the paused guest in the migrations table",
    );
    // Its detail says it in the summary, in red too.
    open(&mut app, "m-paused");
    let terminal = render(&app, &theme, (120, 40));
    let buffer = terminal.backend().buffer();
    same_colour(
        buffer,
        find(buffer, "guest PAUSED (resume failed)"),
        theme.error,
        "the paused guest in the detail",
    );
}

#[test]
fn the_detail_says_who_started_and_aborted_a_migration() {
    use crate::console::msg::{Command, Msg};
    use crate::proto;
    let theme = Theme::named("default").expect("default theme");
    let mut app = app_with_paused_guest("aborted by the operator");
    let row = app
        .rows()
        .iter()
        .position(|m| m.record.id == "m-paused")
        .expect("the row is listed");
    for _ in 0..row {
        update(&mut app, key('j'));
    }
    // Opening it asks the source for its trail...
    let commands = update(&mut app, code(KeyCode::Enter));
    assert_eq!(
        commands,
        vec![Command::LoadActions {
            host: "hv-d".into(),
            id: "m-paused".into()
        }]
    );
    let entry = |at_ms: u64, who: &str, action: &str, ok: bool| proto::AuditEntry {
        at_ms,
        host: "hv-d".into(),
        who: who.into(),
        role: "operator".into(),
        action: action.into(),
        target: "m-paused".into(),
        ok,
        result: String::new(),
    };
    // ...and shows who did what; a refused request did nothing and is not
    // shown as done, and the same entry twice (trail and live) once.
    update(
        &mut app,
        Msg::Actions(vec![
            entry(3_723_000, "ana", "migrate", true),
            entry(3_724_000, "vic", "abort", false),
        ]),
    );
    update(
        &mut app,
        Msg::Event(proto::Event {
            host: "hv-d".into(),
            kind: Some(proto::event::Kind::Audit(entry(
                3_725_000, "olga", "abort", true,
            ))),
        }),
    );
    update(
        &mut app,
        Msg::Actions(vec![entry(3_723_000, "ana", "migrate", true)]),
    );
    let terminal = render(&app, &theme, (160, 40));
    let buffer = terminal.backend().buffer();
    find(
        buffer,
        "by: started by ana (operator) at 01:02:03; aborted by olga (operator) at 01:02:05",
    );
    assert!(
        !buffer_text(buffer).contains("vic"),
        "a refused abort is not shown as done"
    );
}

fn buffer_text(buffer: &Buffer) -> String {
    buffer.content().iter().map(|c| c.symbol()).collect()
}
