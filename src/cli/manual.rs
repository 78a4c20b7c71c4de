//! `tern completions` and `tern man`: what a package installs beside the
//! binary, made from the same clap definition that parses the command line,
//! so a flag can never be documented or completed differently from how it
//! parses. `main` owns that definition and hands it in.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;

use super::{CliError, CliResult, exit};

/// The shells `tern completions` writes a script for (the ones the package
/// installs and the tests load).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

impl From<CompletionShell> for Shell {
    fn from(shell: CompletionShell) -> Self {
        match shell {
            CompletionShell::Bash => Shell::Bash,
            CompletionShell::Zsh => Shell::Zsh,
            CompletionShell::Fish => Shell::Fish,
        }
    }
}

/// `tern completions SHELL`: the shell's completion script on stdout.
pub fn completions(mut cmd: Command, shell: CompletionShell) -> CliResult {
    let mut script = Vec::new();
    let name = cmd.get_name().to_owned();
    clap_complete::generate(Shell::from(shell), &mut cmd, name, &mut script);
    print(&script)
}

/// `tern man`: the roff page of `tern` on stdout. `tern man --dir DIR`:
/// one page per command instead (tern.1, tern-migrate.1, tern-ca-issue.1,
/// …), written into DIR, which is made if missing.
pub fn man(cmd: Command, dir: Option<&Path>) -> CliResult {
    match dir {
        None => {
            let mut page = Vec::new();
            render_page(with_full_names(cmd), &mut page).map_err(failed_writing)?;
            print(&page)
        }
        Some(dir) => {
            let written = write_pages(cmd, dir).map_err(|e| {
                // A folder the operator named that cannot be made or written
                // is bad input, like `tern ca init --dir`.
                CliError::usage(format!("man pages into {}: {e}", dir.display()))
            })?;
            for path in written {
                println!("{}", path.display());
            }
            Ok(exit::SUCCEEDED)
        }
    }
}

/// Writes every visible command's page into `dir`, the subcommands' first;
/// returns the files in the order written.
pub fn write_pages(cmd: Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    fn write(cmd: Command, dir: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), dir, written)?;
        }
        let path = dir.join(clap_mangen::Man::new(cmd.clone()).get_filename());
        let mut page = Vec::new();
        render_page(cmd, &mut page)?;
        std::fs::write(&path, page)?;
        written.push(path);
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    write(with_full_names(cmd), dir, &mut written)?;
    Ok(written)
}

/// Built without the `help` subcommand (the page of `tern help` would say
/// nothing the others do not), so that every subcommand knows its full name
/// (`tern-ca-issue`), which is what a page's title and file are called; and
/// with the version propagated, which a page's footer shows.
fn with_full_names(cmd: Command) -> Command {
    let mut cmd = cmd.disable_help_subcommand(true).propagate_version(true);
    cmd.build();
    cmd
}

/// clap_mangen's sections, with EXIT STATUS, ENVIRONMENT and SEE ALSO added
/// before VERSION: the exit codes are what a script calling `tern` needs.
fn render_page(cmd: Command, out: &mut dyn Write) -> io::Result<()> {
    let has_arguments = cmd.get_arguments().any(|a| !a.is_hide_set());
    let has_subcommands = cmd.get_subcommands().any(|s| !s.is_hide_set());
    let has_version = cmd.get_version().or(cmd.get_long_version()).is_some();
    // The footer names the program and its version, `tern 0.1.0`, on every
    // page (clap_mangen would put the subcommand's own name there).
    let program = cmd
        .get_bin_name()
        .and_then(|b| b.split_whitespace().next())
        .unwrap_or(cmd.get_name())
        .to_owned();
    let version = cmd.get_version().unwrap_or_default().to_owned();
    let man = clap_mangen::Man::new(cmd).source(format!("{program} {version}"));
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    if has_arguments {
        man.render_options_section(out)?;
    }
    if has_subcommands {
        man.render_subcommands_section(out)?;
    }
    out.write_all(EXTRA_SECTIONS.as_bytes())?;
    if has_version {
        man.render_version_section(out)?;
    }
    Ok(())
}

/// Roff text; kept in step with `cli::exit` by a test.
const EXTRA_SECTIONS: &str = r#".SH "EXIT STATUS"
.TP
0
The migration succeeded, or the command did what was asked.
.TP
1
The migration failed, was aborted or lost its guest; rollbacks are still pending; or an agent reported an internal error.
.TP
2
The VM moved, but a feature that is not required failed on the destination (degraded).
.TP
3
Unresolved: the source cannot yet learn whether the destination committed.
.TP
64
Bad usage or input: an unknown VM, host or migration, a refused request, a bad inventory, identity or configuration.
.TP
69
An agent could not be reached or did not answer in time.
.TP
77
The identity's role does not allow the request.
.TP
130
Interrupted by Ctrl\-C while waiting.
.SH ENVIRONMENT
.TP
TERN_INVENTORY
The cluster inventory when \fB\-\-inventory\fR is not given (else ./cluster.toml).
.TP
TERN_IDENTITY
The identity folder (ca.pem, cert.pem, key.pem) when \fB\-\-identity\fR is not given.
.TP
RUST_LOG
What is logged to standard error.
.SH "SEE ALSO"
\fBsystemctl\fR(1), \fBqemu\-system\-x86_64\fR(1)
"#;

fn print(bytes: &[u8]) -> CliResult {
    let mut stdout = io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(exit::SUCCEEDED),
        // `tern man | head`: the reader had what it wanted.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(exit::SUCCEEDED),
        Err(e) => Err(failed_writing(e)),
    }
}

fn failed_writing(e: io::Error) -> CliError {
    CliError::new(exit::FAILED, format!("writing to stdout: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> Command {
        Command::new("tern")
            .version("0.1.0")
            .about("Live migration")
            .arg(clap::Arg::new("inventory").long("inventory"))
            .subcommand(Command::new("migrate").about("Start a migration"))
            .subcommand(
                Command::new("ca")
                    .about("The cluster CA")
                    .subcommand(Command::new("issue").about("Issue an identity")),
            )
    }

    #[test]
    fn man_dir_writes_one_page_per_command_named_by_its_full_name() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_pages(cli(), dir.path()).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["tern-migrate.1", "tern-ca-issue.1", "tern-ca.1", "tern.1"]
        );
        let issue = std::fs::read_to_string(dir.path().join("tern-ca-issue.1")).unwrap();
        assert!(issue.starts_with(".ie") && issue.contains(".TH tern-ca-issue 1"));
    }

    #[test]
    fn every_page_names_the_exit_codes_of_cli_exit() {
        let mut page = Vec::new();
        render_page(with_full_names(cli()), &mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        for code in [
            exit::SUCCEEDED,
            exit::FAILED,
            exit::DEGRADED,
            exit::UNRESOLVED,
            exit::USAGE,
            exit::UNAVAILABLE,
            exit::NOPERM,
            exit::INTERRUPTED,
        ] {
            assert!(page.contains(&format!(".TP\n{code}\n")), "exit {code}");
        }
        let sections: Vec<_> = page.lines().filter(|l| l.starts_with(".SH")).collect();
        assert_eq!(
            sections,
            [
                ".SH NAME",
                ".SH SYNOPSIS",
                ".SH DESCRIPTION",
                ".SH OPTIONS",
                ".SH SUBCOMMANDS",
                ".SH \"EXIT STATUS\"",
                ".SH ENVIRONMENT",
                ".SH \"SEE ALSO\"",
                ".SH VERSION"
            ]
        );
    }
}
