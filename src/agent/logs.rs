//! Each agent's own log. Besides stderr, every line an agent writes (INFO
//! and worse) goes to daily files in `state_dir/logs`
//! (`agent.YYYY-MM-DD.jsonl`, UTC days, the newest `log_files` kept, by
//! tracing-appender), one JSON object a line, with the attempt id on every
//! line of an attempt, so the agent can read an attempt's lines back for the
//! AttemptLogs RPC ([`HostLog::read`]).
//!
//! The agents of one process (the demo) each keep their own files: the
//! tracing [`layer`] writes an event to the files of the agent whose `agent`
//! span (field `host`) encloses it, or whose name the event's own `host`
//! field gives, and takes the attempt id from the nearest `attempt` field,
//! on the event or an enclosing span. An event of no agent is written
//! nowhere here.

use std::collections::{HashMap, VecDeque};
use std::fmt::{self, Write as _};
use std::io::{self, BufRead, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber, span};
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::protocol::bounds::MAX_TEXT_LEN;

/// The log files' names: `agent.YYYY-MM-DD.jsonl`.
const FILE_PREFIX: &str = "agent";
const FILE_SUFFIX: &str = "jsonl";
/// The most lines one AttemptLogs answer carries, and what 0 asks for.
pub const MAX_LINES: usize = 2000;
pub const DEFAULT_LINES: usize = 1000;

/// One line of an agent's log file, as written and read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// Milliseconds since the unix epoch.
    #[serde(rename = "t")]
    pub at_ms: u64,
    /// `ERROR`, `WARN`, `INFO` (`DEBUG`, `TRACE` when asked for).
    pub level: String,
    pub host: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub attempt: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub migration: String,
    pub msg: String,
}

impl Line {
    /// The line as written to the file, without its newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A line of a log file; `None` for anything else (a torn last line, a
    /// file edited by hand).
    pub fn parse(text: &str) -> Option<Line> {
        serde_json::from_str(text).ok()
    }

    /// Whether the line belongs to `id`: a migration id (any attempt of it)
    /// or an attempt id.
    pub fn is_of(&self, id: &str) -> bool {
        if id.is_empty() {
            return false;
        }
        self.attempt == id
            || self.migration == id
            || self
                .attempt
                .strip_prefix(id)
                .is_some_and(|rest| rest.starts_with('.'))
    }
}

/// One agent's log files.
pub struct HostLog {
    name: String,
    dir: PathBuf,
    writer: Mutex<RollingFileAppender>,
}

/// The agents of this process whose lines the [`layer`] writes, by name.
static HOSTS: LazyLock<RwLock<HashMap<String, Arc<HostLog>>>> = LazyLock::new(Default::default);

impl HostLog {
    /// Open `dir` (made 0700 if missing) for agent `name`, keeping the
    /// newest `keep` daily files (older ones are removed now and at each
    /// new day; on a restart during a day, `keep - 1`, today's among them:
    /// tracing-appender prunes before it reopens today's file, which is why
    /// the config asks for 2 at least), and route that agent's lines here
    /// from now on.
    pub fn open(name: &str, dir: &Path, keep: u32) -> io::Result<Arc<HostLog>> {
        super::create_state_dir(dir, 0o700)?;
        let writer = RollingFileAppender::builder()
            .rotation(Rotation::DAILY)
            .filename_prefix(FILE_PREFIX)
            .filename_suffix(FILE_SUFFIX)
            .max_log_files(keep.max(2) as usize)
            .build(dir)
            .map_err(io::Error::other)?;
        let log = Arc::new(HostLog {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            writer: Mutex::new(writer),
        });
        if let Ok(mut hosts) = HOSTS.write() {
            hosts.insert(name.to_string(), log.clone());
        }
        Ok(log)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Append one line (its text cut to a detail's bound). A line that
    /// cannot be written is lost, never an error of what logged it.
    pub fn write(&self, line: &Line) {
        let mut text = line.to_json();
        text.push('\n');
        if let Ok(mut writer) = self.writer.lock() {
            let _ = writer.write_all(text.as_bytes());
        }
    }

    /// This agent's lines of `id` (a migration or an attempt id), oldest
    /// first, at most `max` (the newest kept), and whether older ones were
    /// left out.
    pub fn read(&self, id: &str, max: usize) -> io::Result<(Vec<Line>, bool)> {
        read_dir(&self.dir, id, max)
    }
}

/// The log files of `dir`, oldest day first.
fn log_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("{FILE_PREFIX}.")) && n.ends_with(&format!(".{FILE_SUFFIX}"))
            })
        })
        .collect();
    // YYYY-MM-DD in the name: the name's order is the days' order.
    files.sort();
    Ok(files)
}

/// The lines of `id` in the log files of `dir`, oldest first, at most `max`
/// (the newest kept), and whether older ones were left out.
pub fn read_dir(dir: &Path, id: &str, max: usize) -> io::Result<(Vec<Line>, bool)> {
    let mut kept: VecDeque<Line> = VecDeque::new();
    let mut truncated = false;
    if max == 0 || id.is_empty() {
        return Ok((Vec::new(), false));
    }
    for path in log_files(dir)? {
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            // Removed by retention between listing and opening.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for text in io::BufReader::new(file).lines() {
            let Ok(text) = text else { break };
            // Most lines are of other attempts: skip them unparsed.
            if !text.contains(id) {
                continue;
            }
            let Some(line) = Line::parse(&text) else {
                continue;
            };
            if !line.is_of(id) {
                continue;
            }
            if kept.len() == max {
                kept.pop_front();
                truncated = true;
            }
            kept.push_back(line);
        }
    }
    let mut lines: Vec<Line> = kept.into();
    // Written in order, but a clock step back must not reorder the answer.
    lines.sort_by_key(|l| l.at_ms);
    Ok((lines, truncated))
}

/// The tracing layer that writes each agent's lines to its own files.
pub fn layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    FileLayer
}

struct FileLayer;

/// What a span says about where its events belong.
#[derive(Default)]
struct SpanContext {
    host: Option<String>,
    attempt: Option<String>,
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
    host: Option<String>,
    attempt: Option<String>,
    migration: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        match field.name() {
            "message" => self.message = value,
            "host" => self.host = Some(value),
            "attempt" => self.attempt = Some(value).filter(|v| !v.is_empty()),
            "migration" => self.migration = Some(value).filter(|v| !v.is_empty()),
            name => {
                let _ = write!(self.rest, " {name}={value}");
            }
        }
    }
}

impl<S> Layer<S> for FileLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if fields.host.is_none() && fields.attempt.is_none() {
            return;
        }
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanContext {
                host: fields.host,
                attempt: fields.attempt,
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let (mut host, mut attempt) = (fields.host.take(), fields.attempt.take());
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                if host.is_some() && attempt.is_some() {
                    break;
                }
                if let Some(found) = span.extensions().get::<SpanContext>() {
                    host = host.or_else(|| found.host.clone());
                    attempt = attempt.or_else(|| found.attempt.clone());
                }
            }
        }
        let Some(host) = host else { return };
        let Some(log) = HOSTS.read().ok().and_then(|h| h.get(&host).cloned()) else {
            return;
        };
        let attempt = attempt.unwrap_or_default();
        let migration = fields.migration.unwrap_or_else(|| {
            attempt
                .split_once('.')
                .map(|(m, _)| m.to_string())
                .unwrap_or_default()
        });
        let mut msg = fields.message;
        msg.push_str(&fields.rest);
        log.write(&Line {
            at_ms: super::now_ms(),
            level: event.metadata().level().as_str().to_string(),
            host: log.name.clone(),
            attempt,
            migration,
            msg: cut(msg, MAX_TEXT_LEN),
        });
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn line(at_ms: u64, attempt: &str, msg: &str) -> Line {
        Line {
            at_ms,
            level: "INFO".into(),
            host: "hv-a".into(),
            attempt: attempt.into(),
            migration: attempt
                .split_once('.')
                .map(|(m, _)| m.to_string())
                .unwrap_or_default(),
            msg: msg.into(),
        }
    }

    #[test]
    fn a_line_reads_back_as_it_was_written() {
        let written = line(
            1_733_400_000_123,
            "m-0123456789ab.2",
            "a \"quoted\"\nline ✓",
        );
        let text = written.to_json();
        assert!(!text.contains('\n'), "one line: {text}");
        assert_eq!(Line::parse(&text), Some(written));
        assert_eq!(Line::parse("{\"t\":1,\"lev"), None, "a torn line");
        assert_eq!(Line::parse("not json"), None);
    }

    #[test]
    fn a_line_belongs_to_its_attempt_and_its_migration_only() {
        let l = line(1, "m-0123456789ab.1", "x");
        assert!(l.is_of("m-0123456789ab"));
        assert!(l.is_of("m-0123456789ab.1"));
        assert!(!l.is_of("m-0123456789ab.10"));
        assert!(
            !l.is_of("m-0123456789a"),
            "a prefix of the id is not the id"
        );
        assert!(!l.is_of("m-ffffffffffff"));
        assert!(!l.is_of(""));
        let ten = line(1, "m-0123456789ab.10", "x");
        assert!(!ten.is_of("m-0123456789ab.1"));
        // A line about a migration with no attempt known.
        let mut about = line(1, "", "x");
        about.migration = "m-0123456789ab".into();
        assert!(about.is_of("m-0123456789ab"));
        assert!(!about.is_of("m-0123456789ab.1"));
    }

    fn date_name(day: u32) -> String {
        format!("{FILE_PREFIX}.2026-11-{day:02}.{FILE_SUFFIX}")
    }

    #[test]
    fn opening_keeps_only_the_newest_files_of_the_retention_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).expect("mkdir");
        // Ten old days, written in the order the days came.
        for day in 1..=10 {
            std::fs::write(logs.join(date_name(day)), "{}\n").expect("write");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::fs::write(logs.join("notes.txt"), "mine").expect("write");
        let _log = HostLog::open("hv-retention", &logs, 4).expect("open");
        let mut left: Vec<String> = std::fs::read_dir(&logs)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        left.sort();
        // Three old days and today's file: four files of the log; a file
        // that is not one of them is left alone.
        let today = format!(
            "{FILE_PREFIX}.{}.{FILE_SUFFIX}",
            time::OffsetDateTime::now_utc().date()
        );
        let mut expected = vec![
            date_name(8),
            date_name(9),
            date_name(10),
            today,
            "notes.txt".to_string(),
        ];
        expected.sort();
        assert_eq!(left, expected);
    }

    #[test]
    fn lines_are_written_to_todays_file_and_read_back_by_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = dir.path().join("logs");
        let log = HostLog::open("hv-files", &logs, 7).expect("open");
        log.write(&line(3, "m-0123456789ab.1", "third"));
        log.write(&line(1, "m-0123456789ab.1", "first"));
        log.write(&line(2, "m-ffffffffffff.1", "another migration"));
        log.write(&line(4, "m-0123456789ab.2", "retry"));
        let files = log_files(&logs).expect("files");
        assert_eq!(files.len(), 1);
        let today = time::OffsetDateTime::now_utc().date().to_string();
        assert!(
            files[0].to_string_lossy().contains(&today),
            "{files:?} is today's file"
        );
        let (lines, truncated) = log.read("m-0123456789ab", 100).expect("read");
        let texts: Vec<&str> = lines.iter().map(|l| l.msg.as_str()).collect();
        assert_eq!(texts, ["first", "third", "retry"], "in time order");
        assert!(!truncated);
        let (lines, _) = log.read("m-0123456789ab.2", 100).expect("read");
        assert_eq!(lines.len(), 1);
        let (lines, truncated) = log.read("m-0123456789ab", 2).expect("read");
        let texts: Vec<&str> = lines.iter().map(|l| l.msg.as_str()).collect();
        // The newest written are kept (a clock that stepped back does not
        // make a line older), then shown in time order.
        assert_eq!(texts, ["first", "retry"], "the newest kept");
        assert!(truncated);
        let (lines, _) = log.read("m-000000000000", 100).expect("read");
        assert!(lines.is_empty());
    }

    #[test]
    fn reading_spans_the_days_and_skips_what_is_not_a_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let older = line(10, "m-0123456789ab.1", "yesterday");
        let newer = line(20, "m-0123456789ab.1", "today");
        std::fs::write(
            dir.path().join(date_name(2)),
            format!(
                "{}\nm-0123456789ab garbage\n{{\"t\":5,\"le",
                newer.to_json()
            ),
        )
        .expect("write");
        std::fs::write(
            dir.path().join(date_name(1)),
            format!("{}\n", older.to_json()),
        )
        .expect("write");
        let (lines, _) = read_dir(dir.path(), "m-0123456789ab", 10).expect("read");
        assert_eq!(lines, [older, newer]);
    }

    #[test]
    fn the_layer_routes_each_agents_lines_to_its_own_files_with_the_attempt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = HostLog::open("hv-layer-a", &dir.path().join("a"), 7).expect("open");
        let b = HostLog::open("hv-layer-b", &dir.path().join("b"), 7).expect("open");
        let subscriber = tracing_subscriber::registry().with(layer());
        tracing::subscriber::with_default(subscriber, || {
            let host_a = tracing::info_span!("agent", host = "hv-layer-a");
            let host_b = tracing::info_span!("agent", host = "hv-layer-b");
            host_a.in_scope(|| {
                let attempt = tracing::info_span!("attempt", attempt = "m-0123456789ab.1");
                attempt.in_scope(|| tracing::warn!(vm = "web-01", "port-profile finish failed"));
                tracing::info!(attempt = "m-0123456789ab.2", "a field names the attempt");
            });
            host_b.in_scope(|| {
                let attempt = tracing::info_span!("attempt", attempt = "m-0123456789ab.1");
                attempt.in_scope(|| tracing::info!("prepared"));
            });
            tracing::info!(
                host = "hv-layer-b",
                attempt = "m-0123456789ab.1",
                "by field"
            );
            tracing::info!(attempt = "m-0123456789ab.1", "no agent: written nowhere");
        });
        let (lines, _) = a.read("m-0123456789ab", 10).expect("read");
        let got: Vec<(&str, &str, &str, &str)> = lines
            .iter()
            .map(|l| {
                (
                    l.host.as_str(),
                    l.level.as_str(),
                    l.attempt.as_str(),
                    l.msg.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "hv-layer-a",
                    "WARN",
                    "m-0123456789ab.1",
                    "port-profile finish failed vm=web-01"
                ),
                (
                    "hv-layer-a",
                    "INFO",
                    "m-0123456789ab.2",
                    "a field names the attempt"
                )
            ]
        );
        assert_eq!(lines[0].migration, "m-0123456789ab");
        let (lines, _) = b.read("m-0123456789ab.1", 10).expect("read");
        let texts: Vec<&str> = lines.iter().map(|l| l.msg.as_str()).collect();
        assert_eq!(texts, ["prepared", "by field"]);
    }
}
