//! `tern console`: the operations dashboard. Agent clients turn each agent's
//! Watch stream into [`Msg`]s on one channel; [`app::update`] folds messages
//! and key presses into the state and returns [`Command`]s; views only draw.

pub mod app;
pub mod client;
pub mod completion;
#[cfg(test)]
mod fixture;
pub mod keymap;
pub mod msg;
pub mod state;
pub mod theme;
pub mod views;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use tokio::sync::mpsc;

pub use msg::{Command, Msg};

use crate::agent::now_ms;

/// At most about 30 frames a second; nothing is drawn while nothing changes.
const FRAME: Duration = Duration::from_millis(33);

pub struct Options {
    pub cluster: String,
    /// The inventory's agents and who the console is to them.
    pub agents: crate::cli::Cluster,
    pub theme: String,
    pub read_only: bool,
    /// No bell when a migration fails, is unresolved or loses its guest.
    pub quiet: bool,
}

/// Where the console logs (never to the terminal it draws on):
/// `$XDG_STATE_HOME/tern/console.log`, else `~/.local/state/tern/console.log`.
pub fn log_path() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("tern").join("console.log")
}

/// Send tracing to the log file. The guard flushes it when dropped.
pub fn init_logging() -> Option<tracing_appender::non_blocking::WorkerGuard> {
    let path = log_path();
    let dir = path.parent()?;
    std::fs::create_dir_all(dir).ok()?;
    let file = tracing_appender::rolling::never(dir, "console.log");
    let (writer, guard) = tracing_appender::non_blocking(file);
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The demo's agents run in this process: each keeps its own log files
    // too (crate::agent::logs).
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false)
                .with_filter(filter),
        )
        .with(
            crate::agent::logs::layer().with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        )
        .try_init();
    Some(guard)
}

/// Run the console until the operator quits.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let mut current_theme = options.theme.clone();
    let no_color = theme::no_color_requested();
    let mut theme = theme::Theme::resolve(Some(&current_theme), no_color)?;
    let hosts: Vec<String> = options
        .agents
        .inventory
        .host
        .iter()
        .map(|h| h.name.clone())
        .collect();
    // The agents refuse what the identity may not do; the console offers
    // only what it may: a viewer's console is read-only.
    let identity = options.agents.tls.as_ref().map(|t| t.identity.clone());
    let viewer = identity
        .as_ref()
        .is_some_and(|id| !id.role.may(crate::trust::Role::Operator));
    let mut app = app::App::new(
        state::ClusterState::new(&options.cluster, &hosts),
        options.read_only || viewer,
        &current_theme,
    );
    app.identity = identity.map(|id| id.to_string());
    app.quiet = options.quiet;
    app.live.now_ms = now_ms();
    app.log_path = log_path().display().to_string();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watchers = client::spawn_watchers(&options.agents, tx.clone());
    spawn_keyboard(tx.clone());
    let stop = spawn_stop_signals(tx.clone());
    let ticks = tx.clone();
    let ticker = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            if ticks.send(Msg::Tick { now_ms: now_ms() }).is_err() {
                return;
            }
        }
    });

    // ratatui::init installs a panic hook that restores the terminal.
    let mut terminal = ratatui::init();
    let mut last_frame = Instant::now() - FRAME;
    let result: anyhow::Result<()> = async {
        loop {
            if app.dirty && last_frame.elapsed() >= FRAME {
                let size = terminal.size()?;
                app.page_rows = size.height.saturating_sub(12) as usize;
                terminal.draw(|frame| views::draw(frame, &app, &theme))?;
                app.dirty = false;
                if std::mem::take(&mut app.bell) {
                    use std::io::Write;
                    let mut out = std::io::stdout();
                    let _ = out.write_all(b"\x07");
                    let _ = out.flush();
                }
                last_frame = Instant::now();
            }
            let wait = if app.dirty {
                FRAME.saturating_sub(last_frame.elapsed())
            } else {
                Duration::from_secs(3600)
            };
            let msg = tokio::select! {
                msg = rx.recv() => msg,
                _ = tokio::time::sleep(wait) => continue,
            };
            let Some(msg) = msg else { break };
            let mut commands = app::update(&mut app, msg);
            // Fold whatever else is queued before drawing again.
            while let Ok(more) = rx.try_recv() {
                commands.extend(app::update(&mut app, more));
            }
            for command in commands {
                if command == Command::Quit {
                    continue;
                }
                let (agents, tx) = (options.agents.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tx.send(client::execute(&agents, command).await);
                });
            }
            if app.quit {
                break;
            }
            // `:theme NAME` changed the name: load it, or keep the old one.
            if app.theme != current_theme {
                match theme::Theme::resolve(Some(&app.theme), no_color) {
                    Ok(t) => {
                        theme = t;
                        current_theme = app.theme.clone();
                    }
                    Err(e) => {
                        app.status = Some((format!("theme: {e}"), true));
                        app.theme = current_theme.clone();
                    }
                }
                app.dirty = true;
            }
        }
        Ok(())
    }
    .await;
    if HUNG_UP.load(std::sync::atomic::Ordering::SeqCst) {
        // The terminal is gone: restoring it fails, and ratatui reports
        // that on stderr (the same closed terminal), which panics before
        // the demo could stop its agents and remove its folder.
        std::mem::forget(terminal);
    } else {
        drop(terminal);
        ratatui::restore();
    }
    ticker.abort();
    stop.abort();
    for w in watchers {
        w.abort();
    }
    result
}

/// The terminal hung up: nothing may be written to it any more.
static HUNG_UP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A hangup (the terminal closed), SIGTERM or SIGINT ends the console as
/// `q` does, so what runs after it still runs: the demo stops its agents
/// and removes its folder instead of dying with them.
fn spawn_stop_signals(tx: mpsc::UnboundedSender<Msg>) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::hangup()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = hup.recv() => HUNG_UP.store(true, std::sync::atomic::Ordering::SeqCst),
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let quit = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        let _ = tx.send(Msg::Key(quit));
    })
}

/// Key presses and resizes come from a blocking read on their own thread.
fn spawn_keyboard(tx: mpsc::UnboundedSender<Msg>) {
    std::thread::spawn(move || {
        loop {
            let msg = match event::read() {
                Ok(Event::Key(key)) if key.kind == KeyEventKind::Press => Msg::Key(key),
                Ok(Event::Resize(..)) => Msg::Resize,
                Ok(_) => continue,
                Err(_) => return,
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
    });
}
