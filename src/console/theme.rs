//! The console's colours and state symbols. A [`Theme`] holds one
//! [`Style`] per named slot (`failed`, `selected`, `header`, …) and the
//! [`Symbols`] that show every state without colour. The four built-in themes
//! live in `themes/*.toml` and are compiled in; a user's TOML file overrides
//! only the keys it sets, on top of `default` or of its `base`. NO_COLOR
//! (<https://no-color.org>) drops every colour but keeps modifiers, so the
//! cursor and unresolved attempts still stand out.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use ratatui::style::{Color, Modifier, Style};

use crate::protocol::{Outcome, StepStatus};

/// The built-in themes, in the order `builtin_names` lists them.
const BUILTINS: [(&str, &str); 4] = [
    ("default", include_str!("../../themes/default.toml")),
    ("light", include_str!("../../themes/light.toml")),
    (
        "high-contrast",
        include_str!("../../themes/high-contrast.toml"),
    ),
    (
        "deuteranopia",
        include_str!("../../themes/deuteranopia.toml"),
    ),
];

/// The names `--theme` and `:theme` accept besides a path.
pub fn builtin_names() -> &'static [&'static str] {
    &["default", "light", "high-contrast", "deuteranopia"]
}

/// Whether the user asked for no colour: `NO_COLOR` set and not empty. The
/// only place the console reads it; everything else takes the flag.
pub fn no_color_requested() -> bool {
    no_color_from(std::env::var_os("NO_COLOR"))
}

fn no_color_from(value: Option<OsString>) -> bool {
    value.is_some_and(|v| !v.is_empty())
}

#[derive(Debug, thiserror::Error)]
pub enum ThemeError {
    #[error(
        "unknown theme {name:?}: the built-in themes are {valid}; anything else must be a path to a .toml file"
    )]
    UnknownTheme { name: String, valid: String },
    #[error("cannot read theme {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("theme {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("theme {path}: unknown key `{key}`; valid keys: {valid}")]
    UnknownKey {
        path: PathBuf,
        key: String,
        valid: String,
    },
    #[error("theme {path}: `{key} = {value}`: {reason}")]
    BadValue {
        path: PathBuf,
        key: String,
        value: String,
        reason: String,
    },
}

/// Declares the style slots once: the struct fields, the `[styles]` keys
/// (the field names) and the code that walks them cannot drift apart.
macro_rules! style_slots {
    ($( $(#[doc = $doc:expr])* $slot:ident, )*) => {
        /// Every style the console draws with, one per meaning. Views take
        /// these and never name a colour themselves.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Theme {
            /// The built-in's name, or the path of the file it came from.
            pub name: String,
            /// The glyphs that show each state whatever the colours.
            pub symbols: Symbols,
            $( $(#[doc = $doc])* pub $slot: Style, )*
        }

        impl Theme {
            /// Every key `[styles]` accepts, in declaration order.
            pub const SLOTS: &'static [&'static str] = &[$(stringify!($slot)),*];

            /// A theme with no style anywhere, for files to be laid on.
            fn blank(name: String) -> Theme {
                Theme {
                    name,
                    symbols: Symbols::UNICODE,
                    $( $slot: Style::new(), )*
                }
            }

            /// The style of the `[styles]` key `key`, if there is one.
            pub fn slot(&self, key: &str) -> Option<Style> {
                match key {
                    $( stringify!($slot) => Some(self.$slot), )*
                    _ => None,
                }
            }

            fn slot_mut(&mut self, key: &str) -> Option<&mut Style> {
                match key {
                    $( stringify!($slot) => Some(&mut self.$slot), )*
                    _ => None,
                }
            }

            fn for_each_slot_mut(&mut self, mut f: impl FnMut(&'static str, &mut Style)) {
                $( f(stringify!($slot), &mut self.$slot); )*
            }
        }
    };
}

style_slots! {
    /// The whole screen, drawn first; empty keeps the terminal's own colours.
    base,
    /// The top bar: cluster, agents, migration counts, mode.
    header,
    /// A pane's or dialog's title.
    title,
    /// The border of a pane without focus.
    border,
    /// The border of the pane that has focus (tab / shift-tab).
    border_focused,
    /// The cursor row; patched over the row's own styles.
    selected,
    /// Rows marked with space for a bulk action, and their `+`.
    marked,
    /// Secondary text: ids, timestamps, units, empty cells.
    dim,
    /// Key names in the hint bar and help (`a`, `enter`).
    key,
    /// What a key does, in the hint bar and help.
    hint,
    /// The `/` filter and `:` command line while typing.
    input,
    /// Error text: a failed command, a feature's error message.
    error,
    /// Warnings: a refused action, an event that needs attention.
    warning,
    /// A dialog's border and text.
    dialog,
    /// A dialog that confirms something destructive (abort, forced resolve).
    dialog_danger,
    /// The header's frozen indicator while `f` holds the view still.
    frozen,
    /// A phase or feature stage that completed (`StepStatus::Ok`).
    done,
    /// A phase or feature stage in progress; also a migration in flight.
    running,
    /// A phase or stage that failed, and the outcome `failed`.
    failed,
    /// A phase or stage not started yet.
    pending,
    /// A phase or stage that will not run (e.g. release after a failure).
    skipped,
    /// Outcome: the VM moved and every feature is in place.
    succeeded,
    /// Outcome: the VM moved but a non-required feature failed (fast mode).
    degraded,
    /// Outcome: the operator or a signal aborted before the commit point.
    aborted,
    /// Outcome: the source cannot yet learn whether the destination committed.
    /// Needs an operator: every built-in shows it in reverse video.
    unresolved,
    /// An agent whose Watch stream is up.
    connected,
    /// An agent the console has not reached yet.
    connecting,
    /// An agent whose stream broke; shown with for how long.
    lost,
    /// A host being evacuated: it takes no new migrations.
    draining,
    /// The transfer-rate sparkline.
    sparkline_rate,
    /// The dirty-page-rate sparkline.
    sparkline_dirty,
    /// The progress gauge of a transfer.
    gauge,
}

impl Default for Theme {
    fn default() -> Theme {
        Theme::named("default").expect("the built-in default theme parses (tested)")
    }
}

impl Theme {
    /// A built-in theme by name (see [`builtin_names`]).
    pub fn named(name: &str) -> Result<Theme, ThemeError> {
        let text = builtin_text(name).ok_or_else(|| unknown_theme(name))?;
        let path = PathBuf::from(format!("themes/{name}.toml"));
        let start = if name == "default" {
            Theme::blank(name.to_string())
        } else {
            Theme::named("default")?
        };
        let mut theme = apply(start, &path, &parse_table(&path, text)?)?;
        theme.name = name.to_string();
        Ok(theme)
    }

    /// `--theme` and `:theme`: a built-in name, or the path of a TOML file
    /// whose keys override `default` (or the built-in its `base` names).
    pub fn load(name_or_path: &str) -> Result<Theme, ThemeError> {
        if builtin_text(name_or_path).is_some() {
            return Theme::named(name_or_path);
        }
        let path = Path::new(name_or_path);
        let looks_like_path = name_or_path.ends_with(".toml")
            || name_or_path.contains(std::path::MAIN_SEPARATOR)
            || name_or_path.contains('/')
            || path.exists();
        if !looks_like_path {
            return Err(unknown_theme(name_or_path));
        }
        let text = std::fs::read_to_string(path).map_err(|source| ThemeError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Theme::parse(path, &text)
    }

    /// A user theme's text; `path` only names it in errors and in `name`.
    pub fn parse(path: &Path, text: &str) -> Result<Theme, ThemeError> {
        let table = parse_table(path, text)?;
        let base = match table.get("base") {
            None => "default",
            Some(toml::Value::String(base)) if builtin_text(base).is_some() => base,
            Some(other) => {
                return Err(bad_value(
                    path,
                    "base",
                    other,
                    format!(
                        "not a built-in theme; use one of {}",
                        builtin_names().join(", ")
                    ),
                ));
            }
        };
        let mut theme = apply(Theme::named(base)?, path, &table)?;
        theme.name = path.display().to_string();
        Ok(theme)
    }

    /// What the console starts with: `--theme` (or `default`), without
    /// colours when `no_color` (pass [`no_color_requested`]).
    pub fn resolve(name: Option<&str>, no_color: bool) -> Result<Theme, ThemeError> {
        let theme = Theme::load(name.unwrap_or("default"))?;
        Ok(if no_color {
            theme.without_colors()
        } else {
            theme
        })
    }

    /// NO_COLOR: every foreground and background colour goes, modifiers
    /// stay. The cursor row and unresolved attempts always go reverse video;
    /// any other slot left with no modifier gets the one that keeps its
    /// meaning (bold for failures, dim for secondary text).
    pub fn without_colors(mut self) -> Theme {
        self.for_each_slot_mut(|slot, style| {
            *style = Style {
                fg: None,
                bg: None,
                ..*style
            };
            if matches!(slot, "selected" | "unresolved") {
                style.add_modifier |= Modifier::REVERSED;
                style.sub_modifier -= Modifier::REVERSED;
            }
            if style.add_modifier.is_empty() {
                style.add_modifier = monochrome_fallback(slot);
            }
        });
        self
    }

    /// The style of a phase or feature stage.
    pub fn step(&self, status: StepStatus) -> Style {
        match status {
            StepStatus::Ok => self.done,
            StepStatus::Running => self.running,
            StepStatus::Failed => self.failed,
            StepStatus::Pending => self.pending,
            StepStatus::Skipped => self.skipped,
        }
    }

    /// The style of a migration's outcome.
    pub fn outcome(&self, outcome: Outcome) -> Style {
        match outcome {
            Outcome::Succeeded => self.succeeded,
            Outcome::Degraded => self.degraded,
            Outcome::Failed => self.failed,
            Outcome::Aborted => self.aborted,
            Outcome::Unresolved => self.unresolved,
            Outcome::Lost => self.guest_lost(),
        }
    }

    /// Outcome `lost`: the destination died during post-copy and no host
    /// holds the whole guest. Loudest of all in every theme: the
    /// `unresolved` style (reverse video in every built-in and under
    /// NO_COLOR), made bold, and reversed even where a user theme gave
    /// `unresolved` only a colour. Derived rather than a slot of its own, so
    /// no theme can make it quieter than an attempt that merely waits.
    pub fn guest_lost(&self) -> Style {
        let loud = if self.unresolved.bg.is_some() {
            // A background already sets it apart; reversing would undo it.
            Modifier::BOLD
        } else {
            Modifier::BOLD | Modifier::REVERSED
        };
        self.unresolved
            .add_modifier(loud)
            .remove_modifier(Modifier::DIM)
    }
}

/// What a slot keeps under NO_COLOR when the theme gave it colour alone.
fn monochrome_fallback(slot: &str) -> Modifier {
    match slot {
        "frozen" | "header" => Modifier::REVERSED,
        "failed" | "lost" | "error" | "dialog_danger" | "marked" | "key" | "title"
        | "border_focused" | "running" | "degraded" => Modifier::BOLD,
        "dim" | "hint" | "pending" | "skipped" => Modifier::DIM,
        _ => Modifier::empty(),
    }
}

/// One glyph per state, so no state is told by colour alone. Every glyph is
/// one cell wide except `arrow` in ASCII (`->`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Symbols {
    /// A phase or stage that completed.
    pub done: &'static str,
    /// A phase or stage in progress; a migration in flight.
    pub running: &'static str,
    /// A phase or stage that failed; the outcome `failed`.
    pub failed: &'static str,
    /// A phase or stage not started yet.
    pub pending: &'static str,
    /// A phase or stage that will not run.
    pub skipped: &'static str,
    /// Outcome succeeded.
    pub succeeded: &'static str,
    /// Outcome degraded.
    pub degraded: &'static str,
    /// Outcome aborted.
    pub aborted: &'static str,
    /// Outcome unresolved.
    pub unresolved: &'static str,
    /// Outcome lost: the guest is gone (not the agent's `lost`).
    pub guest_lost: &'static str,
    /// An agent whose stream is up.
    pub connected: &'static str,
    /// An agent not reached yet.
    pub connecting: &'static str,
    /// An agent whose stream broke.
    pub lost: &'static str,
    /// A draining host.
    pub draining: &'static str,
    /// The cursor row's gutter.
    pub selected: &'static str,
    /// A row marked for a bulk action.
    pub marked: &'static str,
    /// The header's frozen indicator.
    pub frozen: &'static str,
    /// Between source and destination: `hv-a → hv-b`.
    pub arrow: &'static str,
}

impl Symbols {
    pub const UNICODE: Symbols = Symbols {
        done: "✓",
        running: "▶",
        failed: "✗",
        pending: "·",
        skipped: "–",
        succeeded: "✓",
        degraded: "!",
        aborted: "⊘",
        unresolved: "?",
        guest_lost: "‼",
        connected: "●",
        connecting: "○",
        lost: "⨯",
        draining: "↓",
        selected: "▸",
        marked: "+",
        frozen: "‖",
        arrow: "→",
    };

    /// For terminals or fonts without the glyphs above.
    pub const ASCII: Symbols = Symbols {
        done: "+",
        running: ">",
        failed: "x",
        pending: ".",
        skipped: "-",
        succeeded: "+",
        degraded: "!",
        aborted: "/",
        unresolved: "?",
        guest_lost: "#",
        connected: "*",
        connecting: "~",
        lost: "x",
        draining: "v",
        selected: ">",
        marked: "+",
        frozen: "=",
        arrow: "->",
    };

    /// The glyph of a phase or feature stage.
    pub fn step(&self, status: StepStatus) -> &'static str {
        match status {
            StepStatus::Ok => self.done,
            StepStatus::Running => self.running,
            StepStatus::Failed => self.failed,
            StepStatus::Pending => self.pending,
            StepStatus::Skipped => self.skipped,
        }
    }

    /// The glyph of a migration's outcome.
    pub fn outcome(&self, outcome: Outcome) -> &'static str {
        match outcome {
            Outcome::Succeeded => self.succeeded,
            Outcome::Degraded => self.degraded,
            Outcome::Failed => self.failed,
            Outcome::Aborted => self.aborted,
            Outcome::Unresolved => self.unresolved,
            Outcome::Lost => self.guest_lost,
        }
    }
}

fn builtin_text(name: &str) -> Option<&'static str> {
    BUILTINS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}

fn unknown_theme(name: &str) -> ThemeError {
    ThemeError::UnknownTheme {
        name: name.to_string(),
        valid: builtin_names().join(", "),
    }
}

fn bad_value(path: &Path, key: &str, value: &toml::Value, reason: impl Into<String>) -> ThemeError {
    ThemeError::BadValue {
        path: path.to_path_buf(),
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn unknown_key(path: &Path, key: String, valid: &[&str]) -> ThemeError {
    ThemeError::UnknownKey {
        path: path.to_path_buf(),
        key,
        valid: valid.join(", "),
    }
}

fn parse_table(path: &Path, text: &str) -> Result<toml::Table, ThemeError> {
    text.parse::<toml::Table>().map_err(|e| ThemeError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })
}

const TOP_KEYS: [&str; 3] = ["base", "symbols", "styles"];
const STYLE_TABLE_KEYS: [&str; 3] = ["fg", "bg", "modifiers"];

/// Lays a theme file over `theme`: each key it sets replaces that slot's
/// whole style; every other slot keeps what `theme` had. (`base` was already
/// used to choose `theme`.)
fn apply(mut theme: Theme, path: &Path, table: &toml::Table) -> Result<Theme, ThemeError> {
    for (key, value) in table {
        match key.as_str() {
            "base" => {}
            "symbols" => {
                theme.symbols = match value.as_str() {
                    Some("unicode") => Symbols::UNICODE,
                    Some("ascii") => Symbols::ASCII,
                    _ => return Err(bad_value(path, key, value, "use \"unicode\" or \"ascii\"")),
                }
            }
            "styles" => {
                let Some(styles) = value.as_table() else {
                    return Err(bad_value(path, key, value, "must be a table: [styles]"));
                };
                for (slot, spec) in styles {
                    let full_key = format!("styles.{slot}");
                    let style = parse_style(path, &full_key, spec)?;
                    *theme
                        .slot_mut(slot)
                        .ok_or_else(|| unknown_key(path, full_key, Theme::SLOTS))? = style;
                }
            }
            _ => return Err(unknown_key(path, key.clone(), &TOP_KEYS)),
        }
    }
    Ok(theme)
}

/// A style value: `"red bold"`, `"black on cyan"`, or
/// `{ fg = "red", bg = "#202020", modifiers = ["bold"] }`.
fn parse_style(path: &Path, key: &str, value: &toml::Value) -> Result<Style, ThemeError> {
    match value {
        toml::Value::String(words) => {
            parse_words(words).map_err(|reason| bad_value(path, key, value, reason))
        }
        toml::Value::Table(table) => {
            let mut style = Style::new();
            for (field, v) in table {
                let field_key = format!("{key}.{field}");
                let invalid = |reason: String| bad_value(path, &field_key, v, reason);
                match field.as_str() {
                    "fg" => style.fg = Some(color_value(v).map_err(invalid)?),
                    "bg" => style.bg = Some(color_value(v).map_err(invalid)?),
                    "modifiers" => {
                        let words: Vec<&str> = match v {
                            toml::Value::String(s) => s.split_whitespace().collect(),
                            toml::Value::Array(items) => items
                                .iter()
                                .map(|item| item.as_str().ok_or(()))
                                .collect::<Result<_, _>>()
                                .map_err(|()| invalid("must be a list of modifier names".into()))?,
                            _ => return Err(invalid("must be a list of modifier names".into())),
                        };
                        for word in words {
                            style.add_modifier |= modifier(word).ok_or_else(|| {
                                invalid(format!("unknown modifier {word:?}; {MODIFIER_HELP}"))
                            })?;
                        }
                    }
                    _ => return Err(unknown_key(path, field_key, &STYLE_TABLE_KEYS)),
                }
            }
            Ok(style)
        }
        _ => Err(bad_value(
            path,
            key,
            value,
            "a style is a string such as \"red bold\" or a table { fg, bg, modifiers }",
        )),
    }
}

fn color_value(value: &toml::Value) -> Result<Color, String> {
    match value {
        toml::Value::String(s) => color(s),
        toml::Value::Integer(i) => u8::try_from(*i)
            .map(Color::Indexed)
            .map_err(|_| format!("colour index {i} is not within 0-255")),
        _ => Err(format!("a colour is a string; {COLOR_HELP}")),
    }
}

const COLOR_HELP: &str = "use an ANSI name (black, red, green, yellow, blue, magenta, cyan, \
     gray, darkgray, lightred, lightgreen, lightyellow, lightblue, lightmagenta, lightcyan, \
     white, reset), \"#rrggbb\" or an index 0-255";

const MODIFIER_HELP: &str = "modifiers are bold, dim, italic, underlined, slow_blink, \
     rapid_blink, reversed, hidden, crossed_out";

/// The compact form: colours, `on COLOUR` for the background, modifiers.
/// `light red` and `dark gray` may be written as two words.
fn parse_words(spec: &str) -> Result<Style, String> {
    let mut style = Style::new();
    let mut words = spec.split_whitespace();
    while let Some(word) = words.next() {
        if word.eq_ignore_ascii_case("on") {
            let Some(next) = words.next() else {
                return Err("\"on\" must be followed by a background colour".into());
            };
            let name = join_two_word_colour(next, &mut words);
            if style.bg.is_some() {
                return Err(format!("two background colours (second: {name:?})"));
            }
            style.bg = Some(color(&name)?);
        } else if let Some(m) = modifier(word) {
            style.add_modifier |= m;
        } else {
            let name = join_two_word_colour(word, &mut words);
            let Ok(c) = color(&name) else {
                return Err(format!(
                    "{name:?} is neither a colour nor a modifier; {COLOR_HELP}; {MODIFIER_HELP}"
                ));
            };
            if style.fg.is_some() {
                return Err(format!(
                    "two foreground colours (second: {name:?}); put `on` before a background"
                ));
            }
            style.fg = Some(c);
        }
    }
    Ok(style)
}

fn join_two_word_colour<'a>(word: &str, words: &mut impl Iterator<Item = &'a str>) -> String {
    let prefix = ["light", "bright", "dark"]
        .iter()
        .any(|p| word.eq_ignore_ascii_case(p));
    match (prefix, prefix.then(|| words.next()).flatten()) {
        (true, Some(rest)) => format!("{word}{rest}"),
        _ => word.to_string(),
    }
}

fn color(name: &str) -> Result<Color, String> {
    if name.eq_ignore_ascii_case("default") {
        return Ok(Color::Reset);
    }
    // ratatui's parser knows the ANSI names (with spaces, dashes, "grey",
    // "bright"), "#rrggbb" and 0-255.
    name.parse::<Color>()
        .map_err(|_| format!("unknown colour {name:?}; {COLOR_HELP}"))
}

fn modifier(word: &str) -> Option<Modifier> {
    Some(match word.to_ascii_lowercase().replace('-', "_").as_str() {
        "bold" => Modifier::BOLD,
        "dim" => Modifier::DIM,
        "italic" => Modifier::ITALIC,
        "underlined" | "underline" => Modifier::UNDERLINED,
        "slow_blink" | "blink" => Modifier::SLOW_BLINK,
        "rapid_blink" => Modifier::RAPID_BLINK,
        "reversed" | "reverse" => Modifier::REVERSED,
        "hidden" => Modifier::HIDDEN,
        "crossed_out" | "strikethrough" => Modifier::CROSSED_OUT,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::text::Span;

    fn all_builtins() -> Vec<Theme> {
        builtin_names()
            .iter()
            .map(|name| Theme::named(name).unwrap())
            .collect()
    }

    fn user(text: &str) -> Result<Theme, ThemeError> {
        Theme::parse(Path::new("mine.toml"), text)
    }

    fn colours(theme: &Theme) -> Vec<(&'static str, Color)> {
        Theme::SLOTS
            .iter()
            .flat_map(|slot| {
                let style = theme.slot(slot).unwrap();
                [style.fg, style.bg]
                    .into_iter()
                    .flatten()
                    .map(|c| (*slot, c))
            })
            .collect()
    }

    #[test]
    fn builtin_names_match_the_embedded_files() {
        let embedded: Vec<&str> = BUILTINS.iter().map(|(name, _)| *name).collect();
        assert_eq!(builtin_names(), embedded.as_slice());
    }

    #[test]
    fn every_builtin_parses_and_sets_every_slot_itself() {
        for (name, text) in BUILTINS {
            let theme = Theme::named(name).unwrap();
            assert_eq!(theme.name, name);
            let table: toml::Table = text.parse().unwrap();
            let styles = table["styles"].as_table().unwrap();
            for slot in Theme::SLOTS {
                assert!(styles.contains_key(*slot), "{name} does not set {slot}");
            }
        }
    }

    #[test]
    fn builtins_differ_from_each_other() {
        let themes = all_builtins();
        for (i, a) in themes.iter().enumerate() {
            for b in &themes[i + 1..] {
                let differing = Theme::SLOTS
                    .iter()
                    .filter(|slot| a.slot(slot) != b.slot(slot))
                    .count();
                assert!(
                    differing >= 10,
                    "{} and {} differ in only {differing} slots",
                    a.name,
                    b.name
                );
                assert_ne!(a.done, b.done, "{} and {}", a.name, b.name);
            }
        }
    }

    #[test]
    fn default_theme_uses_only_named_ansi_colours() {
        let theme = Theme::default();
        for (slot, c) in colours(&theme) {
            assert!(
                !matches!(c, Color::Rgb(..) | Color::Indexed(_)),
                "default's {slot} uses {c:?}"
            );
        }
    }

    #[test]
    fn light_theme_paints_its_own_light_background() {
        let light = Theme::named("light").unwrap();
        let Some(Color::Rgb(r, g, b)) = light.base.bg else {
            panic!("light base has no rgb background: {:?}", light.base);
        };
        assert!(r > 0xf0 && g > 0xf0 && b > 0xf0);
    }

    #[test]
    fn high_contrast_uses_bold_and_reverse_for_what_needs_action() {
        let hc = Theme::named("high-contrast").unwrap();
        for style in [
            hc.selected,
            hc.failed,
            hc.unresolved,
            hc.lost,
            hc.dialog_danger,
        ] {
            assert!(
                style
                    .add_modifier
                    .contains(Modifier::REVERSED | Modifier::BOLD),
                "{style:?}"
            );
        }
        for slot in Theme::SLOTS {
            assert!(
                !hc.slot(slot).unwrap().add_modifier.contains(Modifier::DIM),
                "{slot} is dim"
            );
        }
    }

    #[test]
    fn unresolved_stands_out_in_every_builtin() {
        for theme in all_builtins() {
            let u = theme.unresolved;
            assert!(
                u.add_modifier.contains(Modifier::REVERSED) || u.bg.is_some(),
                "{}: {u:?}",
                theme.name
            );
            assert_ne!(u, theme.failed, "{}", theme.name);
        }
    }

    #[test]
    fn a_lost_guest_is_loudest_and_never_looks_failed_in_every_theme_and_under_no_color() {
        let user_bg = user("[styles]\nunresolved = \"white on red\"\n").unwrap();
        let user_plain = user("[styles]\nunresolved = \"red\"\n").unwrap();
        for theme in all_builtins()
            .into_iter()
            .chain([user_bg, user_plain])
            .flat_map(|t| [t.clone(), t.without_colors()])
        {
            let lost = theme.outcome(Outcome::Lost);
            assert!(
                lost.add_modifier.contains(Modifier::REVERSED) || lost.bg.is_some(),
                "{}: lost is not in reverse video: {lost:?}",
                theme.name
            );
            assert!(lost.add_modifier.contains(Modifier::BOLD), "{}", theme.name);
            assert_ne!(lost, theme.outcome(Outcome::Failed), "{}", theme.name);
            assert_ne!(
                theme.symbols.outcome(Outcome::Lost),
                theme.symbols.outcome(Outcome::Failed),
                "{}",
                theme.name
            );
        }
        // A background is kept as it is, not reversed away.
        let bg = user("[styles]\nunresolved = \"white on red\"\n").unwrap();
        assert_eq!(bg.outcome(Outcome::Lost).bg, Some(Color::Red));
        assert!(
            !bg.outcome(Outcome::Lost)
                .add_modifier
                .contains(Modifier::REVERSED)
        );
    }

    /// Hue in degrees of an RGB colour, `None` for greys.
    fn hue(r: u8, g: u8, b: u8) -> Option<f64> {
        let (r, g, b) = (r as f64 / 255.0, g as f64 / 255.0, b as f64 / 255.0);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let d = max - min;
        if d < 0.08 {
            return None;
        }
        let h = if max == r {
            60.0 * (((g - b) / d).rem_euclid(6.0))
        } else if max == g {
            60.0 * ((b - r) / d + 2.0)
        } else {
            60.0 * ((r - g) / d + 4.0)
        };
        Some(h)
    }

    /// Where a colour falls on the blue–yellow axis a deuteranope still
    /// sees: simulate with Machado et al. (2009), severity 1, in linear RGB,
    /// and take blue minus the mean of red and green.
    fn blue_yellow(r: u8, g: u8, b: u8) -> f64 {
        let lin = |c: u8| {
            let c = c as f64 / 255.0;
            if c <= 0.04045 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        };
        let (r, g, b) = (lin(r), lin(g), lin(b));
        let sr = 0.367322 * r + 0.860646 * g - 0.227968 * b;
        let sg = 0.280085 * r + 0.672501 * g + 0.047413 * b;
        let sb = -0.011820 * r + 0.042940 * g + 0.968881 * b;
        sb - (sr + sg) / 2.0
    }

    #[test]
    fn deuteranopia_never_tells_good_from_bad_by_red_and_green() {
        let theme = Theme::named("deuteranopia").unwrap();
        for (slot, c) in colours(&theme) {
            match c {
                Color::Red | Color::LightRed | Color::Green | Color::LightGreen => {
                    panic!("deuteranopia's {slot} uses {c:?}")
                }
                Color::Rgb(r, g, b) => {
                    if let Some(h) = hue(r, g, b) {
                        let reddish = !(15.0..=345.0).contains(&h);
                        let greenish = (75.0..=165.0).contains(&h);
                        assert!(
                            !reddish && !greenish,
                            "deuteranopia's {slot} {c:?} has hue {h:.0}"
                        );
                    }
                }
                Color::Indexed(_) => panic!("deuteranopia's {slot} uses an indexed colour"),
                _ => {}
            }
        }
        let axis = |style: Style| match style.fg {
            Some(Color::Rgb(r, g, b)) => blue_yellow(r, g, b),
            other => panic!("expected an rgb colour, got {other:?}"),
        };
        for good in [theme.done, theme.succeeded, theme.connected] {
            for bad in [theme.failed, theme.lost] {
                assert!(axis(good) > 0.1 && axis(bad) < -0.05, "{good:?} vs {bad:?}");
            }
        }
        assert_ne!(theme.symbols.done, theme.symbols.failed);
    }

    #[test]
    fn a_partial_user_theme_keeps_the_rest_of_default() {
        let theme = user("[styles]\nfailed = \"lightred bold\"\n").unwrap();
        let default = Theme::default();
        assert_eq!(
            theme.failed,
            Style::new()
                .fg(Color::LightRed)
                .add_modifier(Modifier::BOLD)
        );
        for slot in Theme::SLOTS.iter().filter(|s| **s != "failed") {
            assert_eq!(theme.slot(slot), default.slot(slot), "{slot}");
        }
        assert_eq!(theme.symbols, Symbols::UNICODE);
        assert_eq!(theme.name, "mine.toml");
    }

    #[test]
    fn a_user_theme_can_start_from_another_builtin_and_choose_ascii() {
        let theme =
            user("base = \"light\"\nsymbols = \"ascii\"\n[styles]\nselected = \"reversed\"\n")
                .unwrap();
        let light = Theme::named("light").unwrap();
        assert_eq!(
            theme.selected,
            Style::new().add_modifier(Modifier::REVERSED)
        );
        assert_eq!(theme.done, light.done);
        assert_eq!(theme.base, light.base);
        assert_eq!(theme.symbols, Symbols::ASCII);
    }

    #[test]
    fn compact_and_table_forms_mean_the_same() {
        let compact = user("[styles]\nheader = \"black on #87afd7 bold underlined\"\n").unwrap();
        let table = user(
            "[styles]\nheader = { fg = \"black\", bg = \"#87AFD7\", modifiers = [\"bold\", \"underlined\"] }\n",
        )
        .unwrap();
        let expected = Style::new()
            .fg(Color::Black)
            .bg(Color::Rgb(0x87, 0xaf, 0xd7))
            .add_modifier(Modifier::BOLD | Modifier::UNDERLINED);
        assert_eq!(compact.header, expected);
        assert_eq!(table.header, expected);
    }

    #[test]
    fn colours_parse_as_ansi_names_hex_and_indices() {
        let cases = [
            ("red", Color::Red),
            ("LightBlue", Color::LightBlue),
            ("light blue", Color::LightBlue),
            ("dark gray", Color::DarkGray),
            ("darkgrey", Color::DarkGray),
            ("reset", Color::Reset),
            ("default", Color::Reset),
            ("white", Color::White),
            ("#ff8800", Color::Rgb(0xff, 0x88, 0x00)),
            ("208", Color::Indexed(208)),
        ];
        for (words, expected) in cases {
            assert_eq!(parse_words(words), Ok(Style::new().fg(expected)), "{words}");
            assert_eq!(
                parse_words(&format!("on {words}")),
                Ok(Style::new().bg(expected)),
                "on {words}"
            );
        }
        assert_eq!(parse_words(""), Ok(Style::new()));
        assert_eq!(
            user("[styles]\ngauge = { fg = 33 }\n").unwrap().gauge,
            Style::new().fg(Color::Indexed(33))
        );
    }

    #[test]
    fn an_unknown_style_key_is_an_error_naming_it_and_the_valid_keys() {
        let err = user("[styles]\nfialed = \"red\"\n").unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(&err, ThemeError::UnknownKey { key, .. } if key == "styles.fialed"),
            "{err:?}"
        );
        assert!(message.contains("mine.toml"), "{message}");
        assert!(message.contains("styles.fialed"), "{message}");
        assert!(
            message.contains("failed") && message.contains("unresolved"),
            "{message}"
        );
    }

    #[test]
    fn unknown_top_level_and_table_keys_are_errors() {
        let err = user("colours = 1\n").unwrap_err().to_string();
        assert!(
            err.contains("`colours`") && err.contains("base, symbols, styles"),
            "{err}"
        );
        let err = user("[styles]\nfailed = { fg = \"red\", bold = true }\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("styles.failed.bold") && err.contains("fg, bg, modifiers"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_colour_error_names_the_key_and_the_value() {
        let err = user("[styles]\nfailed = \"redd bold\"\n").unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(&err, ThemeError::BadValue { key, .. } if key == "styles.failed"),
            "{err:?}"
        );
        assert!(
            message.contains("mine.toml") && message.contains("\"redd\""),
            "{message}"
        );
        assert!(
            message.contains("lightred"),
            "lists the valid names: {message}"
        );

        let err = user("[styles]\nfailed = { bg = \"#12345\" }\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("styles.failed.bg") && err.contains("#12345"),
            "{err}"
        );
        let err = user("[styles]\nfailed = { fg = 256 }\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("styles.failed.fg") && err.contains("256"),
            "{err}"
        );
        let err = user("[styles]\nfailed = \"red on\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("background"), "{err}");
        let err = user("[styles]\nfailed = \"red blue\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("two foreground colours"), "{err}");
        let err = user("[styles]\nfailed = { modifiers = [\"bolt\"] }\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("styles.failed.modifiers") && err.contains("\"bolt\""),
            "{err}"
        );
        let err = user("[styles]\nfailed = 3\n").unwrap_err().to_string();
        assert!(err.contains("styles.failed"), "{err}");
    }

    #[test]
    fn bad_base_symbols_and_syntax_are_errors_naming_the_file() {
        let err = user("base = \"solarized\"\n").unwrap_err().to_string();
        assert!(
            err.contains("base") && err.contains("high-contrast"),
            "{err}"
        );
        let err = user("symbols = \"emoji\"\n").unwrap_err().to_string();
        assert!(err.contains("symbols") && err.contains("ascii"), "{err}");
        let err = user("[styles\n").unwrap_err().to_string();
        assert!(
            err.contains("mine.toml") && err.contains("not valid TOML"),
            "{err}"
        );
    }

    #[test]
    fn load_takes_a_builtin_name_or_a_file_and_lists_the_names_otherwise() {
        assert_eq!(
            Theme::load("light").unwrap(),
            Theme::named("light").unwrap()
        );
        let err = Theme::load("hight-contrast").unwrap_err().to_string();
        for name in builtin_names() {
            assert!(err.contains(name), "{err}");
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.toml");
        std::fs::write(&path, "[styles]\ndone = \"blue\"\n").unwrap();
        let theme = Theme::load(path.to_str().unwrap()).unwrap();
        assert_eq!(theme.done, Style::new().fg(Color::Blue));
        assert_eq!(theme.name, path.display().to_string());

        let missing = dir.path().join("missing.toml");
        let err = Theme::load(missing.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }

    #[test]
    fn no_color_drops_every_colour_but_keeps_the_cursor_and_unresolved_visible() {
        for theme in all_builtins() {
            let name = theme.name.clone();
            let mono = theme.without_colors();
            assert!(colours(&mono).is_empty(), "{name}: {:?}", colours(&mono));
            assert!(
                mono.selected.add_modifier.contains(Modifier::REVERSED),
                "{name}"
            );
            assert!(
                mono.unresolved.add_modifier.contains(Modifier::REVERSED),
                "{name}"
            );
            assert_ne!(mono.unresolved, mono.failed, "{name}");
            assert_ne!(mono.selected, Style::new(), "{name}");
        }
        // A user theme whose cursor is colour alone still gets one.
        let mono = user("[styles]\nselected = \"black on cyan\"\nunresolved = \"red\"\n")
            .unwrap()
            .without_colors();
        assert_eq!(mono.selected, Style::new().add_modifier(Modifier::REVERSED));
        assert!(mono.unresolved.add_modifier.contains(Modifier::REVERSED));
    }

    #[test]
    fn resolve_applies_no_color_only_when_asked() {
        assert_eq!(Theme::resolve(None, false).unwrap(), Theme::default());
        assert_eq!(
            Theme::resolve(Some("light"), true).unwrap(),
            Theme::named("light").unwrap().without_colors()
        );
        assert!(Theme::resolve(Some("nope"), true).is_err());
    }

    #[test]
    fn no_color_counts_only_when_set_and_not_empty() {
        assert!(!no_color_from(None));
        assert!(!no_color_from(Some(OsString::new())));
        assert!(no_color_from(Some(OsString::from("1"))));
        assert!(no_color_from(Some(OsString::from("0"))));
    }

    #[test]
    fn every_state_has_a_distinct_one_cell_symbol() {
        for symbols in [Symbols::UNICODE, Symbols::ASCII] {
            let groups: [&[&str]; 4] = [
                // a phase pipeline cell
                &[
                    symbols.done,
                    symbols.running,
                    symbols.failed,
                    symbols.pending,
                    symbols.skipped,
                ],
                // a migration's state column: in flight or an outcome
                &[
                    symbols.running,
                    symbols.succeeded,
                    symbols.degraded,
                    symbols.failed,
                    symbols.aborted,
                    symbols.unresolved,
                    symbols.guest_lost,
                ],
                // a host's connection
                &[
                    symbols.connected,
                    symbols.connecting,
                    symbols.lost,
                    symbols.draining,
                ],
                // a row's gutter
                &[symbols.selected, symbols.marked],
            ];
            for group in groups {
                for (i, a) in group.iter().enumerate() {
                    assert_eq!(Span::raw(*a).width(), 1, "{a:?}");
                    assert!(
                        !group[i + 1..].contains(a),
                        "{a:?} appears twice in {group:?}"
                    );
                }
            }
            assert_eq!(Span::raw(symbols.frozen).width(), 1);
        }
    }

    #[test]
    fn step_and_outcome_map_to_their_slots_and_symbols() {
        let theme = Theme::default();
        assert_eq!(theme.step(StepStatus::Ok), theme.done);
        assert_eq!(theme.step(StepStatus::Failed), theme.failed);
        assert_eq!(theme.outcome(Outcome::Unresolved), theme.unresolved);
        assert_eq!(theme.symbols.step(StepStatus::Running), "▶");
        assert_eq!(theme.symbols.outcome(Outcome::Unresolved), "?");
        assert_eq!(Symbols::ASCII.step(StepStatus::Failed), "x");
    }
}
