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
        ("picker_checked", picker_answered()),
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

/// The picker once db-01's source (hv-b) has answered for every host but
/// hv-a: hv-c can take it (db-01 failed there before), hv-d did not answer,
/// hv-e is draining.
fn picker_answered() -> Vec<Msg> {
    let check = |host: &str, name: &str, ok: bool, detail: &str| crate::proto::AdmissionCheck {
        name: name.into(),
        host: host.into(),
        ok,
        detail: detail.into(),
    };
    let answer = |destination: &str, failing: Option<crate::proto::AdmissionCheck>| {
        let mut checks = vec![
            check("hv-b", "lock", true, "db-01 is not migrating"),
            check(
                destination,
                "capacity",
                true,
                "62.0 GiB and 30 vCPUs free, needs 2.0 GiB and 2",
            ),
        ];
        checks.extend(failing);
        Msg::Checked {
            source: "hv-b".into(),
            vm: "db-01".into(),
            destination: destination.into(),
            mode: crate::protocol::Mode::Safe,
            answer: Ok(crate::proto::CheckReply {
                vm: "db-01".into(),
                source: "hv-b".into(),
                destination: destination.into(),
                mode: crate::proto::Mode::Safe as i32,
                checks,
            }),
        }
    };
    vec![
        key('j'),
        key('d'),
        answer("hv-c", None),
        answer(
            "hv-d",
            Some(check(
                "hv-d",
                "reachable",
                false,
                "hv-d did not answer within 1000 ms",
            )),
        ),
        answer(
            "hv-e",
            Some(check(
                "hv-e",
                "drain",
                false,
                "hv-e is draining and accepts no incoming migrations (`tern undrain hv-e` ends that)",
            )),
        ),
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

#[test]
fn the_repair_and_move_back_confirmations_and_a_repaired_detail_at_both_sizes() {
    let theme = Theme::named("default").expect("default theme");
    let screens: [(&str, Vec<Msg>); 3] = [
        ("repair_confirm", vec![key('R')]),
        ("move_back_confirm", vec![key('B')]),
        ("detail_repaired", vec![code(KeyCode::Enter)]),
    ];
    for (name, keys) in screens {
        let mut app = crate::console::fixture::fixture_with_degraded();
        app.live.now_ms = 12_000;
        if name == "detail_repaired" {
            let mut record = degraded_migration("m-deg", "app-02", "hv-a", "hv-c");
            record.repairs = vec![
                crate::proto::RepairRecord {
                    at_ms: 3_000,
                    feature: "port-profile".into(),
                    stages: vec!["finish".into()],
                    host: "hv-c".into(),
                    result: "failed".into(),
                    error: "finish: ASSOCIATE app-02 rejected by switch tor-hv-c: port busy".into(),
                    who: "ana (operator)".into(),
                },
                crate::proto::RepairRecord {
                    at_ms: 9_000,
                    feature: "port-profile".into(),
                    stages: vec!["finish".into()],
                    host: "hv-c".into(),
                    result: "ok".into(),
                    error: String::new(),
                    who: "ana (operator)".into(),
                },
            ];
            record.outcome = crate::proto::Outcome::Succeeded as i32;
            record.features[0].finish = crate::proto::StepStatus::Ok as i32;
            record.features[0].error.clear();
            record.error.clear();
            update(
                &mut app,
                Msg::Event(crate::proto::Event {
                    host: "hv-a".into(),
                    kind: Some(crate::proto::event::Kind::Migration(record)),
                }),
            );
        }
        for k in keys {
            update(&mut app, k);
        }
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
    // The structured cause first (kind, host, side, feature and stage),
    // then the agent's text.
    let (_, cause) = find(
        buffer,
        "cause: feature on hv-c (destination): port-profile ✗ finish",
    );
    same_colour(
        buffer,
        find_below(
            buffer,
            "error: required feature port-profile failed finish on hv-c",
            cause,
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
fn the_picker_colours_each_hosts_answer_by_what_it_means() {
    let theme = Theme::named("default").expect("default theme");
    // The cursor on hv-b (runs here): its bar would hide a line's colours.
    let mut keys = picker_answered();
    keys.push(key('j'));
    let app = app_after(&keys);
    let terminal = render(&app, &theme, (120, 40));
    let buffer = terminal.backend().buffer();
    // The symbol two cells before the host's name.
    let symbol_at = |text: &str| {
        let (x, y) = find(buffer, text);
        (x - 2, y)
    };
    same_colour(
        buffer,
        symbol_at("hv-a        checking…"),
        theme.pending,
        "checking",
    );
    same_colour(
        buffer,
        symbol_at("hv-c        eligible"),
        theme.warning,
        "eligible, failed before",
    );
    same_colour(
        buffer,
        find(buffer, "eligible · failed here"),
        theme.warning,
        "the failed-here line",
    );
    same_colour(
        buffer,
        symbol_at("hv-d        no answer"),
        theme.lost,
        "no answer",
    );
    same_colour(
        buffer,
        symbol_at("hv-e        drain:"),
        theme.dim,
        "refused",
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
    record.cause = proto::Cause::Operator as i32;
    let record = crate::console::fixture::with_failure(record);
    update(
        &mut app,
        Msg::Event(proto::Event {
            host: "hv-d".into(),
            kind: Some(proto::event::Kind::Migration(record)),
        }),
    );
    app
}

/// Open the detail of migration `id`, by keys from the top row.
fn open(app: &mut App, id: &str) {
    app.select_row(0);
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
    let (_, kind) = find(buffer, "cause: operator");
    let (_, first) = find_below(buffer, "error: aborted by the operator", kind);
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
        vec![
            Command::LoadLogs {
                id: "m-paused".into(),
                hosts: vec!["hv-d".into(), "hv-e".into()],
            },
            Command::LoadActions {
                host: "hv-d".into(),
                id: "m-paused".into()
            }
        ]
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

/// The fixture with a migration for each way a transfer can go
/// (`fixture::transfers`).
fn transfers_app() -> App {
    let mut app = fixture_with_transfers();
    app.live.now_ms = 12_000;
    // The cursor on the last row (app-01, succeeded), so the rows that
    // carry meaning keep their own colours.
    app.select_row(app.rows().len() - 1);
    app
}

/// Every line of the screen, as text.
fn screen_lines(buffer: &Buffer) -> Vec<String> {
    (0..buffer.area.height)
        .map(|y| {
            (0..buffer.area.width)
                .map(|x| buffer[(x, y)].symbol().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn every_way_a_transfer_can_go_at_both_sizes() {
    let theme = Theme::named("default").expect("default theme");
    for size in SIZES {
        let app = transfers_app();
        let terminal = render(&app, &theme, size);
        insta::assert_snapshot!(
            format!("transfers_{}x{}", size.0, size.1),
            terminal.backend()
        );
        for id in ["m-run", "m-pc", "m-rec", "m-lost"] {
            let mut app = transfers_app();
            open(&mut app, id);
            let terminal = render(&app, &theme, size);
            insta::assert_snapshot!(
                format!("detail_{id}_{}x{}", size.0, size.1),
                terminal.backend()
            );
        }
    }
}

#[test]
fn a_running_row_shows_its_verdict_eta_or_post_copy_coloured_by_severity() {
    let theme = Theme::named("default").expect("default theme");
    let app = transfers_app();
    let terminal = render(&app, &theme, (200, 50));
    let buffer = terminal.backend().buffer();
    for (text, style, what) in [
        (
            "converging · 12s",
            theme.done,
            "a converging transfer and its ETA",
        ),
        (
            "NOT CONVERGING",
            theme.error,
            "a transfer that cannot converge",
        ),
        ("stalled", theme.error, "a stalled transfer"),
        (
            "post-copy · 312.0 MiB to pull",
            theme.warning,
            "post-copy, with what is left to pull",
        ),
        (
            "post-copy paused — recovering, try 3",
            theme.error,
            "a paused post-copy being recovered",
        ),
    ] {
        same_colour(buffer, find(buffer, text), style, what);
    }
    // The verdict shows only while Perform runs: the phase after it.
    let mut later = transfers_app();
    let run = later.live.migrations.get_mut("m-slow").unwrap();
    run.record.phases = phases(3, false);
    let terminal = render(&later, &theme, (200, 50));
    let text = buffer_text(terminal.backend().buffer());
    assert!(
        !text.contains("NOT CONVERGING"),
        "a stale verdict after Perform"
    );
}

#[test]
fn at_80x24_the_rows_keep_what_matters_and_cut_no_word() {
    let theme = Theme::named("default").expect("default theme");
    let app = transfers_app();
    let terminal = render(&app, &theme, (80, 24));
    let buffer = terminal.backend().buffer();
    let lines = screen_lines(buffer);
    // The recovering row in its shortest wording (the DONE column takes
    // room here too), still red.
    same_colour(
        buffer,
        find(buffer, "recovering, try 3"),
        theme.error,
        "the recovering row at 80 columns",
    );
    for m in app.rows() {
        let r = &m.record;
        let route = format!("{} → {}", r.source, r.destination);
        let Some(line) = lines
            .iter()
            .find(|l| l.contains(&format!(" {} ", r.vm)) && l.contains(&route))
        else {
            continue; // below the fold
        };
        let (features, _) = super::tables::feature_summary(r);
        assert!(
            line.contains(&features),
            "{} lost its features: {line}",
            r.id
        );
        // The state column: whatever follows the features.
        let after = line.split(&features).nth(1).unwrap_or_default();
        let state = after.trim_end_matches('│').trim();
        // What each row may say, longest first.
        let wordings: &[&str] = match r.id.as_str() {
            "m-run" => &["converging · 12s"],
            "m-fail" => &["feature·hv-c ASSOCIATE db-01 rejected by switch tor-hv-c: port busy"],
            "m-slow" => &["NOT CONVERGING"],
            "m-stall" => &["stalled"],
            "m-pc" => &[
                "post-copy · 312.0 MiB to pull",
                "post-copy · 312.0 MiB",
                "post-copy",
            ],
            "m-rec" => &[
                "post-copy paused — recovering, try 3",
                "post-copy paused, try 3",
                "recovering, try 3",
            ],
            "m-lost" => &[
                "LOST the guest is gone: hv-c stopped answering during post-copy",
                "LOST the guest is gone",
            ],
            _ => &[""],
        };
        let whole = wordings.contains(&state);
        let cut_at_a_space = state.strip_suffix('…').is_some_and(|kept| {
            wordings
                .iter()
                .any(|w| w.starts_with(kept) && w[kept.len()..].starts_with(' '))
        });
        assert!(
            whole || cut_at_a_space,
            "{}: {state:?} is none of {wordings:?} nor cut between words",
            r.id
        );
    }
}

#[test]
fn a_lost_guest_is_shown_loudest_and_never_like_a_failure_in_every_theme() {
    use ratatui::style::Modifier;
    for theme in crate::console::theme::builtin_names()
        .iter()
        .map(|n| Theme::named(n).unwrap())
        .flat_map(|t| [t.clone(), t.without_colors()])
    {
        let app = transfers_app();
        let terminal = render(&app, &theme, (120, 40));
        let buffer = terminal.backend().buffer();
        let (x, y) = find(buffer, "LOST the guest is gone");
        let lost = buffer[(x, y)].style();
        assert!(
            lost.add_modifier.contains(Modifier::REVERSED) || lost.bg.is_some(),
            "{}: LOST is not loud: {lost:?}",
            theme.name
        );
        // Its row's glyph is lost's own, in the same loud style; the
        // failed row's is another glyph in another style.
        let row: String = (0..buffer.area.width)
            .map(|x| buffer[(x, y)].symbol().to_string())
            .collect();
        assert!(
            row.contains(theme.symbols.guest_lost),
            "{}: {row}",
            theme.name
        );
        let glyph = find_below(buffer, theme.symbols.guest_lost, y);
        assert_eq!(buffer[glyph].style(), lost, "{}", theme.name);
        let failed = find_below(buffer, &format!("{}  db-01", theme.symbols.failed), 1);
        assert_ne!(buffer[failed].style(), lost, "{}", theme.name);
        assert_ne!(buffer[failed].symbol(), buffer[glyph].symbol());
        // The header counts it, loud too.
        let (hx, hy) = find(buffer, "LOST 1");
        assert_eq!(hy, 0, "{}: not in the header", theme.name);
        assert!(
            buffer[(hx, hy)]
                .style()
                .add_modifier
                .contains(Modifier::REVERSED),
            "{}",
            theme.name
        );
    }
}

#[test]
fn the_detail_shows_the_policy_the_outlook_with_its_reason_and_the_remaining_chart() {
    let theme = Theme::named("default").expect("default theme");
    for size in SIZES {
        let mut app = transfers_app();
        open(&mut app, "m-run");
        let terminal = render(&app, &theme, size);
        let buffer = terminal.backend().buffer();
        let completion = block_text(buffer, "completion");
        assert!(
            completion.contains("policy post-copy never, 150 s/GiB, then abort"),
            "the policy at {size:?}: {completion}"
        );
        same_colour(
            buffer,
            find(buffer, "converging · 12s"),
            theme.done,
            "the verdict and its ETA",
        );
        // The reason, wrapped as it may be.
        assert!(
            completion.contains(&format!("converging · 12s: {CONVERGING}")),
            "the reason at {size:?}: {completion}"
        );
        // The chart: its maximum and current value above, bars, then the
        // start and the newest instant below.
        let (x, top) = find(buffer, "remaining, max 2.0 GiB, now 800.0 MiB");
        let bars: String = (x..x + 20)
            .map(|cx| buffer[(cx, top + 1)].symbol().to_string())
            .collect();
        assert!(
            bars.chars().any(|c| "▁▂▃▄▅▆▇█".contains(c)),
            "no bars under the chart's title at {size:?}: {bars:?}"
        );
        let axis = &screen_lines(buffer)[usize::from(top) + 3];
        // The left pane only.
        let axis = axis
            .split(['│', '└', '┌'])
            .next()
            .unwrap_or_default()
            .trim();
        assert!(
            axis.starts_with("0s") && axis.ends_with("45s"),
            "the time axis at {size:?}: {axis:?}"
        );
    }
}

#[test]
fn the_detail_shows_post_copy_and_a_recovery_in_red() {
    let theme = Theme::named("default").expect("default theme");
    let mut app = transfers_app();
    open(&mut app, "m-rec");
    let terminal = render(&app, &theme, (120, 40));
    let buffer = terminal.backend().buffer();
    same_colour(
        buffer,
        find(buffer, "post-copy paused — recovering, try 3:"),
        theme.error,
        "the recovery",
    );
    let completion = block_text(buffer, "completion");
    assert!(
        completion.contains("2 tries failed, the last: connection refused; next try in 3s"),
        "{completion}"
    );
    same_colour(
        buffer,
        find(buffer, "stage: post-copy paused, 40 pages requested"),
        theme.error,
        "the paused stage",
    );
    // Two failed tries: too early to suggest giving up.
    assert!(!completion.contains("--lost"), "{completion}");
    // Three: the way out if hv-c never comes back.
    let mut app = transfers_app();
    if let Some(m) = app.live.migrations.get_mut("m-rec")
        && let Some(r) = m.record.recovery.as_mut()
    {
        r.tries = 3;
    }
    open(&mut app, "m-rec");
    let terminal = render(&app, &theme, (120, 40));
    let completion = block_text(terminal.backend().buffer(), "completion");
    assert!(
        completion.contains("if hv-c is gone for good: tern resolve m-rec --lost"),
        "{completion}"
    );
    let mut app = transfers_app();
    open(&mut app, "m-pc");
    let terminal = render(&app, &theme, (120, 40));
    let buffer = terminal.backend().buffer();
    find(buffer, "post-copy auto, 150 s/GiB");
    same_colour(
        buffer,
        find(buffer, "stage: post-copy, 1234 pages requested"),
        theme.warning,
        "post-copy",
    );
    same_colour(
        buffer,
        find(buffer, "switched to post-copy after 12.3 s"),
        theme.warning,
        "the completion note",
    );
    let mut app = transfers_app();
    open(&mut app, "m-lost");
    let terminal = render(&app, &theme, (120, 40));
    let buffer = terminal.backend().buffer();
    let (x, y) = find(
        buffer,
        "LOST: the destination hv-c died during post-copy; no host holds the whole guest",
    );
    let style = buffer[(x, y)].style();
    let lost = theme.outcome(crate::protocol::Outcome::Lost);
    assert_eq!(
        (style.fg, style.add_modifier),
        (lost.fg, lost.add_modifier),
        "the lost line in the detail"
    );
}

#[test]
fn the_retry_dialog_names_the_policy_it_sends_and_follows_the_keys() {
    let theme = Theme::named("default").expect("default theme");
    let mut app = app_after(&[key('j'), key('r')]);
    for size in SIZES {
        let terminal = render(&app, &theme, size);
        find(
            terminal.backend().buffer(),
            "safe; post-copy never, 150 s/GiB, then abort",
        );
    }
    update(&mut app, key('p'));
    update(&mut app, key('b'));
    let terminal = render(&app, &theme, (80, 24));
    let buffer = terminal.backend().buffer();
    find(buffer, "safe; post-copy auto, 300 s/GiB");
    // With post-copy, "when spent" has nothing to choose: a dash, dimmed.
    let (x, y) = find(buffer, "when spent");
    let dash = find_below(buffer, "–", y);
    assert_eq!(dash.1, y);
    assert!(dash.0 > x);
    same_colour(buffer, dash, theme.dim, "when spent without a choice");
}

/// The words inside the bordered block titled `title` (to the right edge
/// of the screen), its wrapped lines joined.
fn block_text(buffer: &Buffer, title: &str) -> String {
    let (x, top) = find(buffer, &format!("┌ {title} "));
    let mut words = Vec::new();
    for y in top + 1..buffer.area.height {
        if buffer[(x, y)].symbol() == "└" {
            break;
        }
        let line: String = (x + 1..buffer.area.width - 1)
            .map(|cx| buffer[(cx, y)].symbol().to_string())
            .collect();
        words.extend(line.split_whitespace().map(str::to_string));
    }
    words.join(" ")
}

#[test]
fn the_pulse_line_follows_the_cluster_within_a_second() {
    use crate::proto;
    let theme = Theme::named("default").expect("default theme");
    let mut app = fixture();
    let pulse =
        |app: &App| screen_lines(render(app, &theme, (120, 40)).backend().buffer())[1].clone();
    assert!(pulse(&app).contains("failed: feature 1"), "{}", pulse(&app));
    // A new attempt: the figures are computed again at once.
    let mut failed = migration("m-new", "db-02", "hv-a", "hv-c", proto::Outcome::Failed);
    failed.cause = proto::Cause::PeerLost as i32;
    failed.updated_at_ms = app.live.now_ms;
    update(
        &mut app,
        Msg::Event(proto::Event {
            host: "hv-a".into(),
            kind: Some(proto::event::Kind::Migration(failed.clone())),
        }),
    );
    assert!(pulse(&app).contains("peer lost 1"), "{}", pulse(&app));
    // An attempt that changes outcome without a new one: within a second.
    failed.outcome = proto::Outcome::Succeeded as i32;
    update(
        &mut app,
        Msg::Event(proto::Event {
            host: "hv-a".into(),
            kind: Some(proto::event::Kind::Migration(failed)),
        }),
    );
    let now = app.live.now_ms;
    update(
        &mut app,
        Msg::Tick {
            now_ms: now + 1_000,
        },
    );
    assert!(!pulse(&app).contains("peer lost"), "{}", pulse(&app));
}

#[test]
fn a_host_that_stops_answering_is_named_in_its_row_the_status_line_and_the_log() {
    let theme = Theme::named("default").expect("default theme");
    let mut app = fixture();
    let now = app.live.now_ms;
    update(
        &mut app,
        Msg::Silent {
            host: "hv-b".into(),
            since_ms: now.saturating_sub(1_000),
            deadline_ms: 1_000,
        },
    );
    update(
        &mut app,
        Msg::Tick {
            now_ms: now + 2_000,
        },
    );
    let terminal = render(&app, &theme, (120, 40));
    let buffer = terminal.backend().buffer();
    same_colour(
        buffer,
        find(buffer, "⨯ no answer"),
        theme.lost,
        "the hung host in the hosts table",
    );
    find(
        buffer,
        "hv-b: no answer in 1 s: connected, but its agent does not answer",
    );
    // It answers again: connected, nothing left of it in its row.
    update(
        &mut app,
        Msg::Connected {
            host: "hv-b".into(),
        },
    );
    let terminal = render(&app, &theme, (120, 40));
    let lines = screen_lines(terminal.backend().buffer());
    assert!(
        !lines.iter().any(|l| l.contains("⨯ no answer")),
        "{}",
        lines.join("\n")
    );
}

/// The failed migration's detail (m-fail, hv-b → hv-c) with its hosts' log
/// lines as the agents answer them; `missing`: hosts that did not answer.
fn detail_with_logs(missing: &[&str]) -> App {
    use crate::proto;
    let mut app = app_after(&[key('j'), code(KeyCode::Enter)]);
    let line = |at_ms: u64, host: &str, level: &str, text: &str| proto::AttemptLogLine {
        at_ms,
        level: level.into(),
        host: host.into(),
        attempt_id: "m-fail.1".into(),
        text: text.into(),
    };
    let mut lines = vec![
        line(3_723_001, "hv-b", "INFO", "source: Preparing"),
        line(
            3_723_002,
            "hv-b",
            "INFO",
            "db-01 hv-b -> hv-c (safe, attempt 1)",
        ),
        line(3_723_010, "hv-c", "INFO", "destination: Prepared"),
        line(3_723_020, "hv-b", "INFO", "source: Transferring"),
        line(3_726_500, "hv-b", "INFO", "source: FinishSent"),
        line(3_726_510, "hv-c", "INFO", "destination: Finishing"),
        line(
            3_726_530,
            "hv-c",
            "WARN",
            "port-profile finish failed on hv-c for db-01: ASSOCIATE db-01 rejected by switch tor-hv-c: injected fault (fail = [finish])",
        ),
        line(3_726_540, "hv-c", "INFO", "destination: RolledBack"),
        line(3_726_560, "hv-b", "INFO", "source: Done"),
        line(
            3_726_561,
            "hv-b",
            "ERROR",
            "db-01 hv-b -> hv-c failed: required feature port-profile failed finish on hv-c",
        ),
    ];
    lines.retain(|l| !missing.contains(&l.host.as_str()));
    update(
        &mut app,
        Msg::Logs {
            id: "m-fail".into(),
            lines,
            missing: missing
                .iter()
                .map(|h| format!("{h}: no answer in 1 s"))
                .collect(),
        },
    );
    app
}

#[test]
fn the_detail_shows_both_hosts_log_lines_in_time_order_at_both_sizes() {
    let theme = Theme::named("default").expect("default theme");
    for (name, missing) in [
        ("detail_logs", vec![]),
        ("detail_logs_no_answer", vec!["hv-c"]),
    ] {
        let app = detail_with_logs(&missing);
        for size in SIZES {
            let terminal = render(&app, &theme, size);
            insta::assert_snapshot!(format!("{name}_{}x{}", size.0, size.1), terminal.backend());
        }
    }
}

#[test]
fn the_logs_panel_colours_warnings_errors_and_a_host_that_did_not_answer() {
    let theme = Theme::named("default").expect("default theme");
    let app = detail_with_logs(&[]);
    let terminal = render(&app, &theme, (120, 40));
    let buffer = terminal.backend().buffer();
    let (_, top) = find(buffer, "logs of hv-b, hv-c");
    same_colour(
        buffer,
        find_below(buffer, "port-profile finish failed on hv-c", top),
        theme.warning,
        "the destination's failing stage",
    );
    same_colour(
        buffer,
        find_below(buffer, "db-01 hv-b -> hv-c failed", top),
        theme.error,
        "the source's error",
    );
    let app = detail_with_logs(&["hv-c"]);
    let terminal = render(&app, &theme, (80, 24));
    let buffer = terminal.backend().buffer();
    let (_, top) = find(buffer, "logs of hv-b, hv-c");
    same_colour(
        buffer,
        find_below(buffer, "hv-c: no answer in 1 s", top),
        theme.error,
        "the host that did not answer",
    );
    // The source's newest line is still there.
    find_below(buffer, "db-01 hv-b -> hv-c failed", top);
}

#[test]
fn an_open_detail_asks_for_its_logs_again_every_few_seconds_one_fetch_at_a_time() {
    use crate::console::app::LOGS_REFRESH_MS;
    use crate::console::msg::Command;
    let mut app = fixture();
    app.live.now_ms = 12_000;
    update(&mut app, key('j'));
    let opened = update(&mut app, code(KeyCode::Enter));
    assert!(
        opened.contains(&Command::LoadLogs {
            id: "m-fail".into(),
            hosts: vec!["hv-b".into(), "hv-c".into()],
        }),
        "{opened:?}"
    );
    // While that fetch is out, ticks ask for nothing.
    let tick = |app: &mut App, now_ms: u64| update(app, Msg::Tick { now_ms });
    assert!(tick(&mut app, 20_000).is_empty());
    update(
        &mut app,
        Msg::Logs {
            id: "m-fail".into(),
            lines: Vec::new(),
            missing: Vec::new(),
        },
    );
    assert!(tick(&mut app, 20_000 + LOGS_REFRESH_MS - 1).is_empty());
    let again = tick(&mut app, 20_000 + LOGS_REFRESH_MS);
    assert!(matches!(again.as_slice(), [Command::LoadLogs { id, .. }] if id == "m-fail"));
    // Back out of the detail: no more fetches, and a late answer is dropped.
    update(&mut app, code(KeyCode::Esc));
    assert!(tick(&mut app, 60_000).is_empty());
    update(
        &mut app,
        Msg::Logs {
            id: "m-fail".into(),
            lines: Vec::new(),
            missing: Vec::new(),
        },
    );
    assert!(app.logs.is_none());
}

#[test]
fn the_row_a_key_would_act_on_is_marked_in_the_table_without_focus_too() {
    use ratatui::style::Modifier;
    let theme = Theme::named("default").expect("default theme");
    let underlined = |buffer: &Buffer, at: (u16, u16)| {
        buffer[at]
            .style()
            .add_modifier
            .contains(Modifier::UNDERLINED)
    };
    // The migrations table has the focus: its cursor is highlighted, the
    // hosts table's underlined.
    let app = fixture();
    let terminal = render(&app, &theme, (120, 40));
    let buffer = terminal.backend().buffer();
    let host = find(buffer, "hv-a         ");
    assert!(underlined(buffer, host), "the hosts cursor without focus");
    let row = find(buffer, "web-01 hv-a → hv-b");
    assert!(!underlined(buffer, row));
    // Tab: the other way round; the migration enter or `a` would act on
    // stays marked.
    let mut app = fixture();
    update(&mut app, code(KeyCode::Tab));
    let terminal = render(&app, &theme, (120, 40));
    let buffer = terminal.backend().buffer();
    let row = find(buffer, "web-01 hv-a → hv-b");
    assert!(
        underlined(buffer, row),
        "the migrations cursor without focus"
    );
    let other = find(buffer, "db-01  hv-b → hv-c");
    assert!(!underlined(buffer, other));
}

#[test]
fn on_a_short_screen_the_newest_error_keeps_the_log_rows_there_are() {
    let theme = Theme::named("default").expect("default theme");
    let app = detail_with_logs(&[]);
    // However few rows the logs get, the source's error line (two rows
    // whole) is what they show, cut if it must be, not an INFO line.
    let mut one_row = false;
    for height in 18..=24 {
        let terminal = render(&app, &theme, (80, height));
        let buffer = terminal.backend().buffer();
        let lines = screen_lines(buffer);
        let Some(top) = lines.iter().position(|l| l.contains("logs of hv-b, hv-c")) else {
            continue;
        };
        let rows = lines[top + 1..]
            .iter()
            .take_while(|l| !l.starts_with('└'))
            .count();
        one_row |= rows == 1;
        same_colour(
            buffer,
            find_below(buffer, "db-01 hv-b -> hv-c failed", top as u16),
            theme.error,
            &format!("the source's error at 80x{height}"),
        );
    }
    assert!(one_row, "no height gave the logs a single row");
}

/// `D` on a host: the dialog says it is asking, then shows the agent's
/// findings, errors and warnings first with their fixes (a small terminal
/// cuts the fine ones, not the ones that matter).
#[test]
fn the_doctor_dialog_asks_then_puts_errors_and_warnings_first_at_both_sizes() {
    use crate::cli::doctor::Finding;
    use crate::console::msg::Command;
    let theme = Theme::named("default").expect("default theme");
    let mut app = fixture();
    update(&mut app, code(KeyCode::Tab));
    let commands = update(&mut app, key('D'));
    assert_eq!(
        commands,
        vec![Command::Doctor {
            host: "hv-a".into()
        }]
    );
    for size in SIZES {
        let terminal = render(&app, &theme, size);
        insta::assert_snapshot!(
            format!("doctor_asking_{}x{}", size.0, size.1),
            terminal.backend()
        );
    }
    let finding = |check: &str, verdict: &'static str, detail: &str, fix: &str| Finding {
        host: "hv-a".into(),
        check: check.into(),
        verdict,
        detail: detail.into(),
        fix: fix.into(),
        mib_s: None,
        skew_ms: None,
    };
    let findings = vec![
        finding("reachable", "ok", "answered in 3 ms", ""),
        finding("clock", "ok", "its clock is +2 ms from this one's", ""),
        finding(
            "qemu",
            "ok",
            "qemu-system-x86_64: QEMU emulator version 7.2.22",
            "",
        ),
        finding(
            "kvm",
            "warning",
            "a guest exit takes 8.3 µs (bare metal: 1 to 2) and a first touch of guest memory 5.4 µs a page; this host is itself a virtual machine (KVM runs nested)",
            "run the agent on bare metal, or on an outer hypervisor with nested paging (EPT/NPT) enabled",
        ),
        finding(
            "disk",
            "error",
            "310 MiB free of 252.0 GiB under /var/lib/tern",
            "make room under /var/lib/tern: the journal cannot be written when it is full",
        ),
        finding(
            "journal",
            "ok",
            "/var/lib/tern/journal.db: quick_check ok",
            "",
        ),
    ];
    // An answer for another host leaves the dialog as it is.
    update(
        &mut app,
        Msg::Doctor {
            host: "hv-b".into(),
            findings: findings.clone(),
        },
    );
    let terminal = render(&app, &theme, SIZES[0]);
    find(terminal.backend().buffer(), "asking hv-a's agent");
    update(
        &mut app,
        Msg::Doctor {
            host: "hv-a".into(),
            findings,
        },
    );
    for size in SIZES {
        let terminal = render(&app, &theme, size);
        let buffer = terminal.backend().buffer();
        let (_, error) = find(buffer, "error   disk");
        let (_, warning) = find(buffer, "warning kvm");
        let (_, fine) = find(buffer, "ok      reachable");
        assert!(error < warning && warning < fine, "{size:?}");
        insta::assert_snapshot!(format!("doctor_{}x{}", size.0, size.1), terminal.backend());
    }
    // Any key closes it, and nothing was sent on the way.
    assert!(update(&mut app, code(KeyCode::Esc)).is_empty());
    assert!(app.dialog.is_none());
}
