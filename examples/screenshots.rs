//! `cargo run --example screenshots`: the console's screenshots, taken from a
//! real demo cluster.
//!
//! It starts the embedded demo (4 agents, 32 VMs, the last host being
//! evacuated, random migrations) on loopback, feeds a console [`App`] from the agents' Watch streams exactly
//! as `tern console` does, drives it by key presses to chosen moments, and
//! draws each moment at 120×40 on ratatui's `TestBackend`. The buffer becomes
//! an SVG (a rectangle per run of cell background, each glyph at its cell)
//! that resvg rasterises with DejaVu Sans Mono (Debian's `fonts-dejavu-core`)
//! into `screenshots/*.png`:
//!
//! - `evacuation.png`: the evacuations view (`E`) while the demo's last host
//!   is evacuated, on a VM whose attempt failed if one has (else one in
//!   flight);
//! - `overview.png`: hosts and migrations, some of them in Perform;
//! - `safe-failure.png`: the detail of a safe-mode migration that failed on
//!   the flaky switch of the demo's last rack: its cause, feature matrix
//!   and both hosts' log lines;
//! - `picker.png`: `d` on that failed migration (retry on another host);
//! - `help.png`: `?`;
//! - `light.png`: the overview in the light theme;
//! - `repair.png`: `R` on a migration the flaky rack left degraded;
//! - `doctor.png`: `D` on a host: its agent's checks, as `tern doctor`.
//!
//! The cluster is random, so every run's pictures differ in detail.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::{Color, Modifier};
use resvg::{tiny_skia, usvg};
use tokio::sync::mpsc::UnboundedReceiver;

use tern::console::app::{self, App, Dialog, View};
use tern::console::state::ClusterState;
use tern::console::theme::Theme;
use tern::console::{Msg, client, views};
use tern::demo::{Cluster, DemoOptions};
use tern::host::evacuation::job::{Evacuation, VmState};
use tern::proto;
use tern::protocol::Outcome;

const COLS: u16 = 120;
const ROWS: u16 = 40;
const OUT: &str = "screenshots";
/// How long to wait for the demo to reach a moment before giving up.
const PATIENCE: Duration = Duration::from_secs(240);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    // Before the cluster: a missing font is the likeliest failure.
    let svg_options = font_options().unwrap_or_else(|e| {
        eprintln!("screenshots: {e}");
        std::process::exit(1)
    });
    // The demo's agents keep their own log files, as in `tern`: the
    // failure's detail shows its hosts' lines from them.
    {
        use tracing_subscriber::prelude::*;
        let _ = tracing_subscriber::registry()
            .with(
                tern::agent::logs::layer()
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            )
            .try_init();
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join(OUT);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let cluster = Cluster::start(&DemoOptions {
        hosts: 4,
        vms: 32,
        headless: true,
        traffic: true,
        // The same VMs and moves each time the pictures are made.
        seed: Some(1),
    })
    .await?;
    let evacuation = cluster.evacuate_last_host().await?;
    cluster.spawn_traffic();
    println!(
        "demo cluster: {} agents, 32 VMs, random migrations; evacuating {} ({})",
        cluster.agents.len(),
        evacuation.host,
        evacuation.id
    );

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let agents = cluster.client()?;
    let watchers = client::spawn_watchers(&agents, tx);
    let hosts: Vec<String> = cluster
        .inventory
        .host
        .iter()
        .map(|h| h.name.clone())
        .collect();
    let mut app = App::new(ClusterState::new("demo", &hosts), false, "default");
    // As the console shows it: who it is to the agents.
    app.identity = agents.tls.as_ref().map(|t| t.identity.to_string());
    app.page_rows = usize::from(ROWS - 12);

    let shots = Shots {
        out,
        svg_options,
        dark: Theme::named("default")?,
        light: Theme::named("light")?,
    };
    // Ctrl-C still stops the agents and removes the demo's folder.
    let result = tokio::select! {
        result = take_all(&mut app, &mut rx, &shots, &agents) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };

    for w in watchers {
        w.abort();
    }
    cluster.stop().await;
    result?;
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

struct Shots {
    out: PathBuf,
    svg_options: usvg::Options<'static>,
    dark: Theme,
    light: Theme,
}

impl Shots {
    fn take(&self, app: &App, theme: &Theme, name: &str) -> anyhow::Result<()> {
        let buffer = draw(app, theme)?;
        let path = self.out.join(format!("{name}.png"));
        let png = png(&buffer, &self.svg_options)?;
        std::fs::write(&path, &png).with_context(|| format!("writing {}", path.display()))?;
        println!("  {} ({} KB)", path.display(), png.len().div_ceil(1024));
        Ok(())
    }
}

async fn take_all(
    app: &mut App,
    rx: &mut UnboundedReceiver<Msg>,
    shots: &Shots,
    agents: &tern::cli::Cluster,
) -> anyhow::Result<()> {
    // The demo's evacuation, while some VMs have moved and others are on
    // their way: first, before it is over.
    println!("waiting for the evacuation to be under way…");
    pump(app, rx, "an evacuation with VMs moved and moving", |app| {
        evacuation_under_way(app)
    })
    .await?;
    keys(app, "E");
    anyhow::ensure!(
        app.view == View::Evacuations,
        "E did not open the evacuations view"
    );
    let row = telling_vm(app).unwrap_or(0);
    for _ in 0..row {
        keys(app, "j");
    }
    shots.take(app, &shots.dark, "evacuation")?;
    press(app, KeyCode::Esc);

    // A safe-mode failure on the flaky rack, while others are in Perform:
    // the overview then shows both at once.
    println!("waiting for a safe-mode failure and migrations in Perform…");
    pump(app, rx, "a failed safe-mode migration", |app| {
        safe_failure(app).is_some()
    })
    .await?;
    pump(app, rx, "two migrations in Perform", |app| {
        in_perform(app) >= 2
    })
    .await?;
    shots.take(app, &shots.dark, "overview")?;
    shots.take(app, &shots.light, "light")?;

    // The failure's detail, reached by keys: filter, select, enter.
    let failed = safe_failure(app).expect("seen above");
    keys(app, "/state:failed mode:safe");
    press(app, KeyCode::Enter);
    let row = app
        .rows()
        .iter()
        .position(|m| m.record.id == failed)
        .context("the failed migration is not in the filtered table")?;
    for _ in 0..row {
        keys(app, "j");
    }
    let reads = press(app, KeyCode::Enter);
    anyhow::ensure!(
        app.view == View::Detail(failed.clone()),
        "enter did not open {failed}: {:?}",
        app.view
    );
    // Its hosts' log lines and who acted on it, read as the console does.
    for command in reads {
        let answer = client::execute(agents, command).await;
        app::update(app, answer);
    }
    settle(app, rx).await;
    shots.take(app, &shots.dark, "safe-failure")?;

    // Back to the table, still filtered, and `d` on the same row.
    press(app, KeyCode::Esc);
    settle(app, rx).await;
    // The demo's own operator may have retried it meanwhile: then it left
    // the filtered view (the status line says so) and the picker is shown
    // on the failure the cursor moved to.
    if app.selected_migration().map(|m| &m.record.id) != Some(&failed) {
        println!("  ({})", app.status.as_ref().map_or("", |s| s.0.as_str()));
    }
    anyhow::ensure!(
        app.selected_migration()
            .is_some_and(|m| outcome(&m.record) == proto::Outcome::Failed),
        "no failed migration is selected: {:?}",
        app.status
    );
    // The picker asks the VM's source about each host: its answers, as
    // the console would fold them.
    let asked = keys(app, "d");
    anyhow::ensure!(
        matches!(app.dialog, Some(Dialog::Picker { .. })),
        "d did not open the destination picker: {:?}",
        app.status
    );
    for command in asked {
        let answer = client::execute(agents, command).await;
        app::update(app, answer);
    }
    shots.take(app, &shots.dark, "picker")?;

    // Close the picker, clear the filter, and open help over the overview.
    press(app, KeyCode::Esc);
    press(app, KeyCode::Esc);
    settle(app, rx).await;
    keys(app, "?");
    anyhow::ensure!(
        matches!(app.dialog, Some(Dialog::Help)),
        "? did not open help"
    );
    shots.take(app, &shots.dark, "help")?;
    press(app, KeyCode::Esc);

    // A fast move the flaky rack left degraded, and `R` on it: what the
    // repair will re-run, and where.
    println!("waiting for a degraded migration…");
    pump(app, rx, "a degraded migration", |app| {
        degraded(app).is_some()
    })
    .await?;
    let degraded = degraded(app).expect("seen above");
    keys(app, "/state:degraded");
    press(app, KeyCode::Enter);
    let row = app
        .rows()
        .iter()
        .position(|m| m.record.id == degraded)
        .context("the degraded migration is not in the filtered table")?;
    app.select_row(row);
    keys(app, "R");
    anyhow::ensure!(
        app.dialog.is_some(),
        "R did not ask to repair {degraded}: {:?}",
        app.status
    );
    shots.take(app, &shots.dark, "repair")?;
    press(app, KeyCode::Esc);
    press(app, KeyCode::Esc);

    // `D` on the flaky rack's host: what its agent finds, as tern doctor.
    press(app, KeyCode::Tab);
    let flaky = app.live.hosts.len().saturating_sub(2);
    app.host_row = flaky;
    let asked = keys(app, "D");
    anyhow::ensure!(
        matches!(app.dialog, Some(Dialog::Doctor { .. })),
        "D did not open the doctor dialog: {:?}",
        app.status
    );
    for command in asked {
        let answer = client::execute(agents, command).await;
        app::update(app, answer);
    }
    shots.take(app, &shots.dark, "doctor")?;
    Ok(())
}

/// The newest migration that ended degraded.
fn degraded(app: &App) -> Option<String> {
    app.live
        .ordered_migrations()
        .into_iter()
        .find(|m| outcome(&m.record) == proto::Outcome::Degraded)
        .map(|m| m.record.id.clone())
}

/// Fold the agents' events into the app until `done` holds.
async fn pump(
    app: &mut App,
    rx: &mut UnboundedReceiver<Msg>,
    what: &str,
    done: impl Fn(&App) -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        drain(app, rx)?;
        if done(app) {
            return Ok(());
        }
        if start.elapsed() > PATIENCE {
            bail!(
                "the demo cluster did not produce {what} within {} s",
                PATIENCE.as_secs()
            );
        }
        match tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            Ok(Some(msg)) => {
                app::update(app, msg);
            }
            Ok(None) => bail!("every agent watcher stopped"),
            Err(_) => {}
        }
    }
}

/// Give the watchers a moment, then fold whatever arrived.
async fn settle(app: &mut App, rx: &mut UnboundedReceiver<Msg>) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = drain(app, rx);
}

fn drain(app: &mut App, rx: &mut UnboundedReceiver<Msg>) -> anyhow::Result<()> {
    loop {
        match rx.try_recv() {
            Ok(msg) => {
                app::update(app, msg);
            }
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                return Err(anyhow!("every agent watcher stopped"));
            }
        }
    }
    app::update(
        app,
        Msg::Tick {
            now_ms: tern::agent::now_ms(),
        },
    );
    Ok(())
}

/// Key presses go through `update` like the terminal's; their commands
/// (RPCs) are not carried out: every screenshot stops before a confirm, and
/// reads (who acted on a migration, for its detail) are left out.
/// A key press; what it asks of the agents (nothing that changes anything).
fn press(app: &mut App, code: KeyCode) -> Vec<tern::console::msg::Command> {
    let commands = app::update(app, Msg::Key(KeyEvent::new(code, KeyModifiers::NONE)));
    assert!(
        !commands.iter().any(|c| c.changes_anything()),
        "a screenshot key asked for {commands:?}"
    );
    commands
}

fn keys(app: &mut App, text: &str) -> Vec<tern::console::msg::Command> {
    text.chars()
        .flat_map(|c| press(app, KeyCode::Char(c)))
        .collect()
}

fn outcome(r: &proto::MigrationRecord) -> proto::Outcome {
    proto::Outcome::try_from(r.outcome).unwrap_or(proto::Outcome::None)
}

fn in_perform(app: &App) -> usize {
    app.live
        .migrations
        .values()
        .filter(|m| {
            outcome(&m.record) == proto::Outcome::None && app::current_phase(&m.record) == "perform"
        })
        .count()
}

/// The newest safe-mode migration that failed on a feature.
fn safe_failure(app: &App) -> Option<String> {
    app.live
        .ordered_migrations()
        .into_iter()
        .find(|m| {
            let r = &m.record;
            let failed = proto::StepStatus::Failed as i32;
            outcome(r) == proto::Outcome::Failed
                && r.mode == proto::Mode::Safe as i32
                && r.features
                    .iter()
                    .any(|f| f.prepare == failed || f.finish == failed)
        })
        .map(|m| m.record.id.clone())
}

fn evacuation(app: &App) -> Option<&Evacuation> {
    app.live.evacuations.values().next()
}

/// Some of the evacuation's VMs moved and another is in flight.
fn evacuation_under_way(app: &App) -> bool {
    evacuation(app).is_some_and(|e| {
        let c = e.counts();
        c.moved >= 2 && c.in_flight >= 1
    })
}

/// The row of the VM whose story tells most: one with a failed attempt,
/// else one in flight.
fn telling_vm(app: &App) -> Option<usize> {
    let vms = &evacuation(app)?.vms;
    vms.iter()
        .position(|v| {
            v.attempts
                .iter()
                .any(|a| a.outcome == Some(Outcome::Failed))
        })
        .or_else(|| vms.iter().position(|v| v.state == VmState::InFlight))
}

fn draw(app: &App, theme: &Theme) -> anyhow::Result<Buffer> {
    let mut terminal = Terminal::new(TestBackend::new(COLS, ROWS))?;
    terminal.draw(|frame| views::draw(frame, app, theme))?;
    Ok(terminal.backend().buffer().clone())
}

// ---- Buffer → SVG → PNG ---------------------------------------------------

const FONT_DIR: &str = "/usr/share/fonts/truetype/dejavu";
const FACES: [&str; 4] = [
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
];
const FAMILY: &str = "DejaVu Sans Mono";

/// DejaVu Sans Mono's metrics (font units): every glyph advances 1233 of
/// 2048; a line is ascender 1901 + descender 483, with no line gap.
const FONT_SIZE: f64 = 14.0;
const CELL_W: f64 = FONT_SIZE * 1233.0 / 2048.0;
const CELL_H: f64 = FONT_SIZE * (1901.0 + 483.0) / 2048.0;
const BASELINE: f64 = FONT_SIZE * 1901.0 / 2048.0;

/// The terminal the pictures pretend to be: a dark one.
const DEFAULT_FG: Rgb = Rgb(0xd0, 0xd0, 0xd0);
const DEFAULT_BG: Rgb = Rgb(0x12, 0x12, 0x12);

/// usvg options with only the four DejaVu Sans Mono faces (regular, bold,
/// oblique, bold oblique), so bold and italic cells get their own face.
fn font_options() -> Result<usvg::Options<'static>, String> {
    let mut options = usvg::Options {
        font_family: FAMILY.to_string(),
        ..usvg::Options::default()
    };
    let db = options.fontdb_mut();
    for face in FACES {
        let path = Path::new(FONT_DIR).join(face);
        let data = std::fs::read(&path).map_err(|e| {
            format!(
                "cannot read {}: {e}\nThe screenshots are drawn with DejaVu Sans Mono: \
                 install Debian's fonts-dejavu-core (apt-get install fonts-dejavu-core)",
                path.display()
            )
        })?;
        db.load_font_data(data);
    }
    Ok(options)
}

fn png(buffer: &Buffer, options: &usvg::Options) -> anyhow::Result<Vec<u8>> {
    let svg = svg(buffer);
    let tree = usvg::Tree::from_str(&svg, options).context("parsing the generated SVG")?;
    let size = tree.size().to_int_size();
    let mut pixmap =
        tiny_skia::Pixmap::new(size.width(), size.height()).context("an empty picture")?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.encode_png().context("encoding the PNG")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rgb(u8, u8, u8);

impl std::fmt::Display for Rgb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }
}

/// How one cell looks once reverse, dim and the defaults are resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Look {
    fg: Rgb,
    bg: Rgb,
    bold: bool,
    italic: bool,
    underline: Option<Rgb>,
    crossed: bool,
    hidden: bool,
}

fn look(cell: &ratatui::buffer::Cell) -> Look {
    let m = cell.modifier;
    let mut fg = rgb(cell.fg, DEFAULT_FG);
    let mut bg = rgb(cell.bg, DEFAULT_BG);
    if m.contains(Modifier::REVERSED) {
        std::mem::swap(&mut fg, &mut bg);
    }
    if m.contains(Modifier::DIM) {
        fg = mix(fg, bg, 0.6);
    }
    let underline = m
        .contains(Modifier::UNDERLINED)
        .then(|| match cell.underline_color {
            Color::Reset => fg,
            c => rgb(c, fg),
        });
    Look {
        fg,
        bg,
        bold: m.contains(Modifier::BOLD),
        italic: m.contains(Modifier::ITALIC),
        underline,
        crossed: m.contains(Modifier::CROSSED_OUT),
        hidden: m.contains(Modifier::HIDDEN),
    }
}

fn mix(a: Rgb, b: Rgb, a_part: f64) -> Rgb {
    let c = |x: u8, y: u8| (f64::from(x) * a_part + f64::from(y) * (1.0 - a_part)).round() as u8;
    Rgb(c(a.0, b.0), c(a.1, b.1), c(a.2, b.2))
}

/// Named colours as xterm draws them; indexed ones from xterm's 256.
fn rgb(color: Color, default: Rgb) -> Rgb {
    match color {
        Color::Reset => default,
        Color::Black => Rgb(0x00, 0x00, 0x00),
        Color::Red => Rgb(0xcd, 0x00, 0x00),
        Color::Green => Rgb(0x00, 0xcd, 0x00),
        Color::Yellow => Rgb(0xcd, 0xcd, 0x00),
        Color::Blue => Rgb(0x00, 0x00, 0xee),
        Color::Magenta => Rgb(0xcd, 0x00, 0xcd),
        Color::Cyan => Rgb(0x00, 0xcd, 0xcd),
        Color::Gray => Rgb(0xe5, 0xe5, 0xe5),
        Color::DarkGray => Rgb(0x7f, 0x7f, 0x7f),
        Color::LightRed => Rgb(0xff, 0x00, 0x00),
        Color::LightGreen => Rgb(0x00, 0xff, 0x00),
        Color::LightYellow => Rgb(0xff, 0xff, 0x00),
        Color::LightBlue => Rgb(0x5c, 0x5c, 0xff),
        Color::LightMagenta => Rgb(0xff, 0x00, 0xff),
        Color::LightCyan => Rgb(0x00, 0xff, 0xff),
        Color::White => Rgb(0xff, 0xff, 0xff),
        Color::Rgb(r, g, b) => Rgb(r, g, b),
        Color::Indexed(i) => indexed(i),
    }
}

fn indexed(i: u8) -> Rgb {
    const NAMED: [Color; 16] = [
        Color::Black,
        Color::Red,
        Color::Green,
        Color::Yellow,
        Color::Blue,
        Color::Magenta,
        Color::Cyan,
        Color::Gray,
        Color::DarkGray,
        Color::LightRed,
        Color::LightGreen,
        Color::LightYellow,
        Color::LightBlue,
        Color::LightMagenta,
        Color::LightCyan,
        Color::White,
    ];
    match i {
        0..=15 => rgb(NAMED[usize::from(i)], DEFAULT_FG),
        16..=231 => {
            let level = |v: u8| if v == 0 { 0 } else { 55 + 40 * v };
            let i = i - 16;
            Rgb(level(i / 36), level(i / 6 % 6), level(i % 6))
        }
        _ => {
            let v = 8 + 10 * (i - 232);
            Rgb(v, v, v)
        }
    }
}

fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
}

/// The buffer as an SVG: the default background, then a rectangle for each
/// run of same-background cells (crisp, so neighbours leave no seam), then
/// one `<text>` per run of same-style glyphs, each glyph placed at its own
/// cell (`x` lists one position per character), then underlines.
fn svg(buffer: &Buffer) -> String {
    let area = buffer.area;
    let width = (f64::from(area.width) * CELL_W).ceil();
    let height = (f64::from(area.height) * CELL_H).ceil();
    let mut backgrounds = String::new();
    let mut texts = String::new();
    let mut lines = String::new();
    for y in 0..area.height {
        let top = f64::from(y) * CELL_H;
        let looks: Vec<(Look, &str)> = (0..area.width)
            .map(|x| {
                let cell = &buffer[(area.x + x, area.y + y)];
                (look(cell), cell.symbol())
            })
            .collect();

        // Backgrounds, by runs.
        let mut x = 0;
        while x < looks.len() {
            let bg = looks[x].0.bg;
            let run = looks[x..].iter().take_while(|(l, _)| l.bg == bg).count();
            if bg != DEFAULT_BG {
                let _ = writeln!(
                    backgrounds,
                    r#"<rect x="{:.2}" y="{top:.2}" width="{:.2}" height="{CELL_H:.2}" fill="{bg}"/>"#,
                    x as f64 * CELL_W,
                    run as f64 * CELL_W,
                );
            }
            x += run;
        }

        // Glyphs: runs of one foreground and face, blanks left out.
        let mut x = 0;
        while x < looks.len() {
            let (l, _) = looks[x];
            let run = looks[x..]
                .iter()
                .take_while(|(o, _)| o.fg == l.fg && o.bold == l.bold && o.italic == l.italic)
                .count();
            let mut positions = String::new();
            let mut glyphs = String::new();
            for (i, (cell, symbol)) in looks[x..x + run].iter().enumerate() {
                if cell.hidden || symbol.trim().is_empty() {
                    continue;
                }
                // A grapheme of several characters (a combining mark) sits
                // in one cell: give every character the cell's position.
                for _ in symbol.chars() {
                    let _ = write!(positions, "{:.2} ", (x + i) as f64 * CELL_W);
                }
                escape(symbol, &mut glyphs);
            }
            if !glyphs.is_empty() {
                let _ = write!(
                    texts,
                    r#"<text x="{}" y="{:.2}" fill="{}""#,
                    positions.trim_end(),
                    top + BASELINE,
                    l.fg
                );
                if l.bold {
                    texts.push_str(r#" font-weight="bold""#);
                }
                if l.italic {
                    texts.push_str(r#" font-style="italic""#);
                }
                texts.push('>');
                texts.push_str(&glyphs);
                texts.push_str("</text>\n");
            }
            x += run;
        }

        // Underlines and strike-through, cell by cell.
        for (i, (l, _)) in looks.iter().enumerate() {
            let left = i as f64 * CELL_W;
            if let Some(color) = l.underline {
                let _ = writeln!(
                    lines,
                    r#"<rect x="{left:.2}" y="{:.2}" width="{CELL_W:.2}" height="1" fill="{color}"/>"#,
                    top + BASELINE + 1.5
                );
            }
            if l.crossed {
                let _ = writeln!(
                    lines,
                    r#"<rect x="{left:.2}" y="{:.2}" width="{CELL_W:.2}" height="1" fill="{}"/>"#,
                    top + BASELINE - FONT_SIZE * 0.3,
                    l.fg
                );
            }
        }
    }
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">
<rect width="{width}" height="{height}" fill="{DEFAULT_BG}"/>
<g shape-rendering="crispEdges">
{backgrounds}</g>
<g font-family="{FAMILY}" font-size="{FONT_SIZE}" xml:space="preserve">
{texts}</g>
<g shape-rendering="crispEdges">
{lines}</g>
</svg>
"#
    )
}
