//! `tern`: argument parsing and dispatch. The commands live in the library:
//! `tern::agent`, `tern::demo`, and the client commands in `tern::cli`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tern::cli::{self, CliError, CliResult, Report, exit};
use tern::config::AgentConfig;
use tern::demo::DemoOptions;
use tern::protocol::completion::{CompletionRequest, Postcopy, WhenSpent};
use tern::protocol::{Mode, RunOn};

/// Live migration of QEMU guests between hosts.
#[derive(Debug, Parser)]
#[command(name = "tern", version, about)]
struct Cli {
    /// The cluster inventory: every host and its agent's address.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "TERN_INVENTORY",
        default_value = "cluster.toml"
    )]
    inventory: PathBuf,

    /// Who you are to the agents of an `https://` inventory: a folder
    /// `tern ca issue` wrote (ca.pem, cert.pem, key.pem).
    #[arg(long, global = true, value_name = "DIR", env = "TERN_IDENTITY")]
    identity: Option<PathBuf>,

    /// How long a command that asks every agent (status, finding a VM or a
    /// migration) waits for each before it goes on and names the ones that
    /// did not answer.
    #[arg(
        long,
        global = true,
        value_name = "MS",
        env = "TERN_ANSWER_DEADLINE_MS",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(100..=60_000)
    )]
    answer_deadline_ms: u64,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, clap::Args)]
struct ConsoleArgs {
    /// A built-in theme (default, light, high-contrast, deuteranopia) or a
    /// TOML file overriding some of default's keys. NO_COLOR is honoured.
    #[arg(long, value_name = "NAME|FILE", default_value = "default")]
    theme: String,
    /// No key that changes anything on an agent.
    #[arg(long)]
    read_only: bool,
    /// No terminal bell when a migration fails, is unresolved or loses its
    /// guest (the demo never rings).
    #[arg(long)]
    quiet: bool,
}

/// The format of the log lines written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a host agent.
    Agent {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// How log lines are written to stderr: `text` for people, `json`
        /// (one object a line) for log shippers. The files in
        /// state_dir/logs are JSON lines either way.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// An embedded cluster of simulated hosts, with the console on it.
    Demo {
        #[arg(long, default_value_t = 4)]
        hosts: usize,
        #[arg(long, default_value_t = 32)]
        vms: usize,
        /// Repeat a run: the same VMs on the same hosts and the same moves
        /// (the demo prints its seed).
        #[arg(long)]
        seed: Option<u64>,
        /// No console: run the cluster only.
        #[arg(long)]
        headless: bool,
        #[command(flatten)]
        console: ConsoleArgs,
    },
    /// The operations console on the inventory's agents.
    Console {
        #[command(flatten)]
        console: ConsoleArgs,
    },
    /// Start a migration and, by default, wait for its outcome.
    Migrate {
        vm: String,
        /// The destination host.
        #[arg(long, value_name = "HOST")]
        to: String,
        #[arg(long, value_enum, default_value_t = ModeArg::Safe)]
        mode: ModeArg,
        #[command(flatten)]
        completion: CompletionArgs,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Every admission check of Begin and Prepare for moving a VM, on both
    /// agents, without starting anything: exit 0 when all pass, 1 when one
    /// does not.
    Check {
        vm: String,
        /// The destination host.
        #[arg(long, value_name = "HOST")]
        to: String,
        #[arg(long, value_enum, default_value_t = ModeArg::Safe)]
        mode: ModeArg,
        /// One JSON object: the checks, each with host, ok and detail.
        #[arg(long)]
        json: bool,
    },
    /// Move every VM off a host, retrying failed ones elsewhere; the host is
    /// marked draining. By default wait until the evacuation has ended.
    Evacuate {
        host: String,
        #[arg(long, value_enum, default_value_t = ModeArg::Safe)]
        mode: ModeArg,
        /// Migrations at once; the host's max_outgoing when omitted.
        #[arg(long)]
        concurrency: Option<u32>,
        /// Attempts per VM, each on another host (a busy host's refusal
        /// does not count).
        #[arg(long, default_value_t = 3)]
        max_attempts: u32,
        /// Hosts that must not receive any of the VMs.
        #[arg(long, value_delimiter = ',', value_name = "HOST,...")]
        exclude: Vec<String>,
        #[command(flatten)]
        completion: CompletionArgs,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Pause, resume or cancel an evacuation.
    Evacuation {
        #[arg(value_enum)]
        action: EvacuationAction,
        id: String,
        /// With cancel: abort the attempts in flight that have not committed
        /// (by default they finish).
        #[arg(long)]
        abort: bool,
    },
    /// Let a drained host receive migrations again.
    Undrain { host: String },
    /// Abort a migration before its commit point.
    Abort { id: String },
    /// Start a new attempt of a failed or aborted migration.
    Retry {
        id: String,
        /// Another destination; the same host when omitted.
        #[arg(long, value_name = "HOST")]
        to: Option<String>,
        /// The same mode as the last attempt when omitted.
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// Left out: the last attempt's (the new mode's default if the mode changes).
        #[command(flatten)]
        completion: CompletionArgs,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Re-run a migration's pending work (rollbacks, releases, a resume or a
    /// kill of its guest, telling a destination) on every host now.
    Rollback {
        id: String,
        /// Drop the pending work instead of running it: what it would have
        /// undone stays as it is. Asks for the VM name unless --yes.
        #[arg(long)]
        forget: bool,
        /// With --forget: do not ask for the VM name as confirmation.
        #[arg(long, requires = "forget")]
        yes: bool,
    },
    /// Force where an unresolved migration's guest runs (--run-on), or declare
    /// a post-copy migration's guest lost when its destination is gone for
    /// good (--lost). A wrong choice can run the guest on two hosts at once.
    Resolve {
        id: String,
        #[arg(long, value_enum, required_unless_present = "lost")]
        run_on: Option<RunOnArg>,
        /// The post-copy cannot finish (its destination is gone for good):
        /// kill the stale copy on the source and end the migration `lost`.
        #[arg(long, conflicts_with = "run_on")]
        lost: bool,
        /// Do not ask for the VM name as confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Re-run the failed feature stages of a degraded VM where it runs now
    /// (after a fast migration that left it without, say, its network).
    Repair {
        vm: String,
        /// Only this feature; every feature with a failed stage when omitted.
        #[arg(long, value_name = "NAME")]
        feature: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Hosts, VMs and migrations.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Every agent's events, one per line, until Ctrl-C.
    Watch {
        #[arg(long)]
        json: bool,
    },
    /// Who asked the agents for what: every changing request, refusals
    /// included, across the cluster, oldest first.
    Audit {
        /// Only entries this recent: 30s, 10m, 2h, 7d.
        #[arg(long, value_name = "DURATION", value_parser = parse_since)]
        since: Option<u64>,
        /// Only this host's agent.
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// What each host needs to take part in migrations, checked now: its
    /// agent answers, its clock, QEMU and its machine types, KVM and how
    /// fast it is, userfaultfd, free disk, the journal, its certificate,
    /// pending work, the other hosts reached; between the hosts named, the
    /// migration link's throughput. Exit 0 when nothing is an error, 1 when
    /// something is.
    Doctor {
        /// The hosts to examine (default: every host of the inventory).
        /// With two or more named, the migration link between each ordered
        /// pair is measured too: a bounded transfer at full speed, one pair
        /// at a time (it competes with migrations in flight).
        hosts: Vec<String>,
        /// How long each link measurement sends, in seconds.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=10))]
        link_seconds: u32,
        /// A JSON array of findings: host, check, verdict, detail, fix.
        #[arg(long)]
        json: bool,
    },
    /// A migration's log lines from every host it touched (its source and
    /// destinations), merged in time order: `HH:MM:SS.mmm HOST LEVEL
    /// ATTEMPT TEXT`, times in UTC.
    Logs {
        /// A migration id (every attempt), or an attempt id (m-….N).
        id: String,
        /// One JSON object a line: at_ms, host, level, attempt_id, text.
        #[arg(long)]
        json: bool,
    },
    /// The cluster's certificate authority and the identities it issues.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Set the fault injection of a simulated feature driver on one host
    /// (demo, drills): the settings given replace the ones in force.
    Fault {
        host: String,
        /// The feature, e.g. port-profile.
        feature: String,
        /// Stages that fail: prepare, finish, rollback, release.
        #[arg(long, value_delimiter = ',', value_name = "STAGE,...")]
        fail: Vec<String>,
        /// Probability (0 to 1) that a prepare or finish stage fails.
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
        /// Added to every stage.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Rollbacks and releases fail too.
        #[arg(long)]
        fail_rollback: bool,
    },
    /// Print the shell's completion script, e.g. `source <(tern completions
    /// bash)`; packages install it where the shell looks.
    Completions {
        #[arg(value_enum)]
        shell: cli::manual::CompletionShell,
    },
    /// Print this manual page (roff), e.g. `tern man | man -l -`.
    Man {
        /// Write one page per command into DIR instead (tern.1,
        /// tern-migrate.1, …), for a package's man1 folder.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Make a cluster CA (ca.pem, and ca-key.pem readable by you alone).
    Init {
        #[arg(long, value_name = "DIR", default_value = "tern-ca")]
        dir: PathBuf,
    },
    /// Issue an identity: OUT/NAME/{ca.pem,cert.pem,key.pem}, mode 0600.
    /// The role and the name live in the certificate.
    Issue {
        /// The CA's folder.
        #[arg(long, value_name = "DIR", default_value = "tern-ca")]
        dir: PathBuf,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// A person's name, or for an agent its host's inventory name.
        name: String,
        /// More host names or IP addresses the certificate is valid for
        /// (an agent's listen address).
        #[arg(long, value_delimiter = ',', value_name = "NAME,IP,...")]
        san: Vec<String>,
        /// Where the identity's folder is made; the CA's folder if omitted.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = tern::trust::ca::DEFAULT_DAYS)]
        days: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoleArg {
    /// Watch, list, status, audit.
    Viewer,
    /// Also migrate, abort, retry, rollback, evacuate, undrain.
    Operator,
    /// Also force an unresolved attempt, forget pending work, fault injection.
    Admin,
    /// A host agent: the Peer service, as the host its name says.
    Agent,
}

impl From<RoleArg> for tern::trust::Role {
    fn from(role: RoleArg) -> Self {
        use tern::trust::Role;
        match role {
            RoleArg::Viewer => Role::Viewer,
            RoleArg::Operator => Role::Operator,
            RoleArg::Admin => Role::Admin,
            RoleArg::Agent => Role::Agent,
        }
    }
}

fn parse_since(text: &str) -> Result<u64, String> {
    cli::audit::parse_duration(text)
}

/// How a migration is made to finish (`migrate`, `retry`, `evacuate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::Args)]
struct CompletionArgs {
    /// Seconds of transfer per GiB of guest memory before the policy acts;
    /// 0 for no budget [default: 150]
    #[arg(long, value_name = "S")]
    completion_timeout_per_gib: Option<u64>,
    /// When to switch to post-copy: never; auto, when pre-copy cannot
    /// converge or the budget is spent; now [default: auto in fast mode,
    /// never in safe mode]
    #[arg(long, value_enum)]
    postcopy: Option<PostcopyArg>,
    /// The longest pause of the final pre-copy pass [default: the source
    /// host's downtime_limit_ms]
    #[arg(long, value_name = "MS")]
    downtime_limit_ms: Option<u64>,
    /// What a spent budget does without post-copy: abort (the guest keeps
    /// running on the source) or continue [default: abort]
    #[arg(long, value_enum, value_name = "ACTION")]
    when_budget_spent: Option<WhenSpentArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PostcopyArg {
    Never,
    Auto,
    Now,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WhenSpentArg {
    Abort,
    Continue,
}

impl From<CompletionArgs> for CompletionRequest {
    fn from(args: CompletionArgs) -> Self {
        CompletionRequest {
            timeout_per_gib_s: args.completion_timeout_per_gib,
            postcopy: args.postcopy.map(|p| match p {
                PostcopyArg::Never => Postcopy::Never,
                PostcopyArg::Auto => Postcopy::Auto,
                PostcopyArg::Now => Postcopy::Now,
            }),
            downtime_limit_ms: args.downtime_limit_ms,
            when_spent: args.when_budget_spent.map(|w| match w {
                WhenSpentArg::Abort => WhenSpent::Abort,
                WhenSpentArg::Continue => WhenSpent::Continue,
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
struct ReportArgs {
    /// Print the record as soon as the agent accepted, and exit 0.
    #[arg(long)]
    no_wait: bool,
    /// Print the migration record as one JSON line on stdout.
    #[arg(long)]
    json: bool,
}

impl From<ReportArgs> for Report {
    fn from(args: ReportArgs) -> Self {
        Report {
            wait: !args.no_wait,
            json: args.json,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// Nothing a feature does can fail the migration.
    Fast,
    /// A required feature that fails on the destination fails the migration.
    Safe,
}

impl From<ModeArg> for Mode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::Fast => Mode::Fast,
            ModeArg::Safe => Mode::Safe,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EvacuationAction {
    Pause,
    Resume,
    Cancel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RunOnArg {
    Source,
    Destination,
}

impl From<RunOnArg> for RunOn {
    fn from(run_on: RunOnArg) -> Self {
        match run_on {
            RunOnArg::Source => RunOn::Source,
            RunOnArg::Destination => RunOn::Destination,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap exits 2 on bad usage, which is "degraded" here.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::SUCCEEDED
            });
        }
    };
    let command = cli.command.unwrap_or(Command::Demo {
        hosts: 4,
        vms: 32,
        seed: None,
        headless: false,
        console: ConsoleArgs {
            theme: "default".into(),
            read_only: false,
            quiet: false,
        },
    });
    // The console draws on the terminal: its logs go to a file.
    let _log_guard = match &command {
        Command::Console { .. }
        | Command::Demo {
            headless: false, ..
        } => tern::console::init_logging(),
        _ => {
            let format = match &command {
                Command::Agent { log_format, .. } => *log_format,
                _ => LogFormat::Text,
            };
            init_logging(
                matches!(command, Command::Agent { .. } | Command::Demo { .. }),
                format,
            );
            None
        }
    };
    // A command's output piped into `head` ends quietly when the pipe
    // closes, as other Unix tools do: Rust ignores SIGPIPE (which must stay
    // so: a TLS peer closing mid-handshake would kill the process), and a
    // print to a closed pipe panics — that panic exits with 141 (128 +
    // SIGPIPE) and says nothing.
    if !matches!(command, Command::Agent { .. }) {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let said = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or_default();
            if said.starts_with("failed printing to stdout") && said.contains("Broken pipe") {
                std::process::exit(141);
            }
            default(info);
        }));
    }
    let mut access = cli::Access::new(cli.inventory, cli.identity);
    access.answer_deadline = Some(std::time::Duration::from_millis(cli.answer_deadline_ms));
    match run(&access, command).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tern: {e}");
            ExitCode::from(e.code)
        }
    }
}

/// Logs go to stderr, filtered by RUST_LOG; daemons say more by default.
/// Each agent's lines (INFO and worse, whatever RUST_LOG says) also go to
/// its own files in its state_dir/logs.
fn init_logging(daemon: bool, format: LogFormat) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let stderr = match format {
        LogFormat::Text => stderr.with_filter(filter).boxed(),
        // Flattened: `message` and the event's fields at the top level,
        // next to `level`, `timestamp`, `target` and the spans (host,
        // attempt), which is what log shippers index.
        LogFormat::Json => stderr
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(tern::agent::logs::layer().with_filter(tracing_subscriber::filter::LevelFilter::INFO))
        .init();
}

async fn run(access: &cli::Access, command: Command) -> CliResult {
    match command {
        Command::Agent { config, .. } => {
            let config = AgentConfig::load(&config).map_err(|e| CliError::usage(e.to_string()))?;
            tern::agent::run(config).await.map_err(failed)?;
            Ok(exit::SUCCEEDED)
        }
        Command::Demo {
            hosts,
            vms,
            seed,
            headless,
            console,
        } => {
            tern::demo::run(
                DemoOptions {
                    hosts,
                    vms,
                    headless,
                    traffic: true,
                    seed,
                },
                console.theme,
                console.read_only,
            )
            .await
            .map_err(failed)?;
            Ok(exit::SUCCEEDED)
        }
        Command::Console { console } => {
            let agents = cli::Cluster::load(access)?;
            let cluster = access
                .inventory
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "cluster".into());
            tern::console::run(tern::console::Options {
                cluster,
                agents,
                theme: console.theme,
                read_only: console.read_only,
                quiet: console.quiet,
            })
            .await
            .map_err(failed)?;
            Ok(exit::SUCCEEDED)
        }
        Command::Migrate {
            vm,
            to,
            mode,
            completion,
            report,
        } => {
            cli::migrate(
                access,
                &vm,
                &to,
                mode.into(),
                completion.into(),
                report.into(),
            )
            .await
        }
        Command::Check { vm, to, mode, json } => {
            cli::check::check(access, &vm, &to, mode.into(), json).await
        }
        Command::Evacuate {
            host,
            mode,
            concurrency,
            max_attempts,
            exclude,
            completion,
            report,
        } => {
            let report = Report::from(report);
            cli::evacuate::evacuate(
                access,
                cli::evacuate::EvacuateArgs {
                    host,
                    mode: mode.into(),
                    completion: completion.into(),
                    concurrency,
                    max_attempts,
                    exclude,
                    wait: report.wait,
                    json: report.json,
                },
            )
            .await
        }
        Command::Evacuation { action, id, abort } => {
            use tern::host::Control;
            let control = match (action, abort) {
                (EvacuationAction::Pause, false) => Control::Pause,
                (EvacuationAction::Resume, false) => Control::Resume,
                (EvacuationAction::Cancel, false) => Control::Cancel,
                (EvacuationAction::Cancel, true) => Control::CancelAbort,
                (_, true) => {
                    return Err(CliError::usage("--abort goes with cancel only"));
                }
            };
            cli::evacuate::control(access, &id, control).await
        }
        Command::Undrain { host } => cli::evacuate::undrain(access, &host).await,
        Command::Repair { vm, feature, json } => {
            cli::repair(access, &vm, feature.as_deref(), json).await
        }
        Command::Abort { id } => cli::abort(access, &id).await,
        Command::Retry {
            id,
            to,
            mode,
            completion,
            report,
        } => {
            cli::retry(
                access,
                &id,
                to.as_deref(),
                mode.map(Mode::from),
                completion.into(),
                report.into(),
            )
            .await
        }
        Command::Rollback {
            id, forget: false, ..
        } => cli::rollback(access, &id).await,
        Command::Rollback {
            id,
            forget: true,
            yes,
        } => cli::forget(access, &id, yes).await,
        Command::Resolve {
            id,
            run_on,
            lost,
            yes,
        } => {
            let run_on = match run_on {
                Some(run_on) if !lost => run_on.into(),
                _ => RunOn::Nowhere,
            };
            cli::resolve(access, &id, run_on, yes).await
        }
        Command::Status { json } => cli::status(access, json).await,
        Command::Watch { json } => cli::watch(access, json).await,
        Command::Audit { since, host, json } => {
            let args = cli::audit::AuditArgs {
                since_ms: since,
                host,
                json,
            };
            cli::audit::audit(access, args).await
        }
        Command::Logs { id, json } => cli::logs::logs(access, &id, json).await,
        Command::Doctor {
            hosts,
            link_seconds,
            json,
        } => cli::doctor::doctor(access, &hosts, link_seconds, json).await,
        Command::Ca { command } => ca(command),
        Command::Fault {
            host,
            feature,
            fail,
            fail_rate,
            latency_ms,
            fail_rollback,
        } => {
            let faults = tern::proto::FaultSettings {
                feature,
                fail,
                fail_rate,
                latency_ms,
                fail_rollback,
            };
            cli::fault(access, &host, faults).await
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            cli::manual::completions(Cli::command(), shell)
        }
        Command::Man { dir } => {
            use clap::CommandFactory;
            cli::manual::man(Cli::command(), dir.as_deref())
        }
    }
}

/// `tern ca init` and `tern ca issue`: files only, no agent is asked.
fn ca(command: CaCommand) -> CliResult {
    match command {
        CaCommand::Init { dir } => {
            let cert = tern::trust::ca::init(&dir).map_err(CliError::usage)?;
            println!(
                "cluster CA: {} (its key beside it, mode 0600)",
                cert.display()
            );
        }
        CaCommand::Issue {
            dir,
            role,
            name,
            san,
            out,
            days,
        } => {
            let request = tern::trust::ca::IssueRequest {
                name,
                role: role.into(),
                sans: san,
                days,
            };
            let out = out.unwrap_or_else(|| dir.clone());
            let folder = tern::trust::ca::issue(&dir, &request, &out).map_err(CliError::usage)?;
            println!("{} ({}) : {}", request.name, request.role, folder.display());
        }
    }
    Ok(exit::SUCCEEDED)
}

fn failed(e: anyhow::Error) -> CliError {
    CliError::new(exit::FAILED, format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("tern").chain(args.iter().copied()))
            .expect("valid arguments")
    }

    fn parse_error(args: &[&str]) -> ErrorKind {
        Cli::try_parse_from(std::iter::once("tern").chain(args.iter().copied()))
            .expect_err("invalid arguments")
            .kind()
    }

    #[test]
    fn the_clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn no_subcommand_parses_to_none_and_runs_the_demo_with_its_console() {
        assert!(parse(&[]).command.is_none());
    }

    #[test]
    fn the_inventory_is_global_and_defaults_to_cluster_toml() {
        // SAFETY-free: only read here; the env var is not set in tests.
        if std::env::var_os("TERN_INVENTORY").is_none() {
            assert_eq!(parse(&["status"]).inventory, PathBuf::from("cluster.toml"));
        }
        assert_eq!(
            parse(&["status", "--inventory", "lab.toml"]).inventory,
            PathBuf::from("lab.toml")
        );
        assert_eq!(
            parse(&["--inventory", "lab.toml", "abort", "m-1"]).inventory,
            PathBuf::from("lab.toml")
        );
    }

    #[test]
    fn agent_needs_a_config_file() {
        assert!(matches!(parse(&["agent", "--config", "hv-a.toml"]).command,
            Some(Command::Agent { config, log_format: LogFormat::Text }) if config == std::path::Path::new("hv-a.toml")));
        assert_eq!(parse_error(&["agent"]), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn an_agent_logs_text_by_default_json_on_request_and_nothing_else() {
        assert!(matches!(
            parse(&["agent", "--config", "a.toml", "--log-format", "json"]).command,
            Some(Command::Agent {
                log_format: LogFormat::Json,
                ..
            })
        ));
        assert_eq!(
            parse_error(&["agent", "--config", "a.toml", "--log-format", "yaml"]),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn demo_defaults_to_four_hosts_and_thirty_two_vms() {
        assert!(matches!(
            parse(&["demo"]).command,
            Some(Command::Demo {
                hosts: 4,
                vms: 32,
                headless: false,
                ..
            })
        ));
        assert!(matches!(
            parse(&["demo", "--hosts", "2", "--vms", "5", "--headless"]).command,
            Some(Command::Demo {
                hosts: 2,
                vms: 5,
                headless: true,
                ..
            })
        ));
        assert_eq!(
            parse_error(&["demo", "--hosts", "many"]),
            ErrorKind::ValueValidation
        );
        assert!(matches!(
            parse(&["demo", "--seed", "42"]).command,
            Some(Command::Demo { seed: Some(42), .. })
        ));
    }

    #[test]
    fn migrate_defaults_to_safe_mode_and_waiting_for_the_outcome() {
        let Some(Command::Migrate {
            vm,
            to,
            mode,
            completion,
            report,
        }) = parse(&["migrate", "web-01", "--to", "hv-b"]).command
        else {
            panic!("not migrate");
        };
        assert!(
            CompletionRequest::from(completion).is_empty(),
            "the mode's policy unless asked"
        );
        assert_eq!(
            (vm.as_str(), to.as_str(), mode),
            ("web-01", "hv-b", ModeArg::Safe)
        );
        assert_eq!(
            Report::from(report),
            Report {
                wait: true,
                json: false
            }
        );
    }

    #[test]
    fn migrate_takes_a_completion_policy() {
        let Some(Command::Migrate { completion, .. }) = parse(&[
            "migrate",
            "web-01",
            "--to",
            "hv-b",
            "--postcopy",
            "never",
            "--completion-timeout-per-gib",
            "20",
            "--downtime-limit-ms",
            "500",
            "--when-budget-spent",
            "continue",
        ])
        .command
        else {
            panic!("not migrate");
        };
        assert_eq!(
            CompletionRequest::from(completion),
            CompletionRequest {
                timeout_per_gib_s: Some(20),
                postcopy: Some(Postcopy::Never),
                downtime_limit_ms: Some(500),
                when_spent: Some(WhenSpent::Continue),
            }
        );
        assert_eq!(
            parse_error(&["migrate", "web-01", "--to", "hv-b", "--postcopy", "maybe"]),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn migrate_accepts_fast_mode_no_wait_and_json() {
        let Some(Command::Migrate { mode, report, .. }) = parse(&[
            "migrate",
            "web-01",
            "--to",
            "hv-b",
            "--mode",
            "fast",
            "--no-wait",
            "--json",
        ])
        .command
        else {
            panic!("not migrate");
        };
        assert_eq!(Mode::from(mode), Mode::Fast);
        assert_eq!(
            Report::from(report),
            Report {
                wait: false,
                json: true
            }
        );
    }

    #[test]
    fn migrate_without_a_destination_or_with_an_unknown_mode_is_bad_usage() {
        assert_eq!(
            parse_error(&["migrate", "web-01"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            parse_error(&["migrate", "web-01", "--to", "hv-b", "--mode", "turbo"]),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            parse_error(&["migrate", "--to", "hv-b"]),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn repair_takes_a_vm_and_optionally_one_feature() {
        assert!(matches!(
            parse(&["repair", "web-01"]).command,
            Some(Command::Repair { vm, feature: None, json: false }) if vm == "web-01"
        ));
        assert!(matches!(
            parse(&["repair", "web-01", "--feature", "port-profile", "--json"]).command,
            Some(Command::Repair { feature: Some(f), json: true, .. }) if f == "port-profile"
        ));
        assert_eq!(parse_error(&["repair"]), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn abort_and_rollback_take_a_migration_id() {
        assert!(
            matches!(parse(&["abort", "m-1"]).command, Some(Command::Abort { id }) if id == "m-1")
        );
        assert!(
            matches!(parse(&["rollback", "m-1"]).command, Some(Command::Rollback { id, forget: false, .. }) if id == "m-1")
        );
        assert_eq!(parse_error(&["abort"]), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn logs_takes_an_id_and_json() {
        assert!(matches!(
            parse(&["logs", "m-0123456789ab"]).command,
            Some(Command::Logs { id, json: false }) if id == "m-0123456789ab"
        ));
        assert!(matches!(
            parse(&["logs", "m-0123456789ab.2", "--json"]).command,
            Some(Command::Logs { id, json: true }) if id == "m-0123456789ab.2"
        ));
        assert_eq!(parse_error(&["logs"]), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn retry_keeps_host_and_mode_unless_given() {
        let Some(Command::Retry {
            id,
            to,
            mode,
            report,
            ..
        }) = parse(&["retry", "m-1"]).command
        else {
            panic!("not retry");
        };
        assert_eq!((id.as_str(), to, mode), ("m-1", None, None));
        assert_eq!(
            Report::from(report),
            Report {
                wait: true,
                json: false
            }
        );
        let Some(Command::Retry {
            to, mode, report, ..
        }) = parse(&[
            "retry",
            "m-1",
            "--to",
            "hv-c",
            "--mode",
            "fast",
            "--no-wait",
            "--json",
        ])
        .command
        else {
            panic!("not retry");
        };
        assert_eq!((to.as_deref(), mode), (Some("hv-c"), Some(ModeArg::Fast)));
        assert_eq!(
            Report::from(report),
            Report {
                wait: false,
                json: true
            }
        );
    }

    #[test]
    fn resolve_requires_run_on_source_or_destination() {
        assert!(matches!(
            parse(&["resolve", "m-1", "--run-on", "destination", "--yes"]).command,
            Some(Command::Resolve {
                run_on: Some(RunOnArg::Destination),
                lost: false,
                yes: true,
                ..
            })
        ));
        assert!(matches!(
            parse(&["resolve", "m-1", "--run-on", "source"]).command,
            Some(Command::Resolve {
                run_on: Some(RunOnArg::Source),
                yes: false,
                ..
            })
        ));
        assert!(matches!(
            parse(&["resolve", "m-1", "--lost", "--yes"]).command,
            Some(Command::Resolve {
                run_on: None,
                lost: true,
                yes: true,
                ..
            })
        ));
        assert_eq!(
            parse_error(&["resolve", "m-1", "--lost", "--run-on", "source"]),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            parse_error(&["resolve", "m-1"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            parse_error(&["resolve", "m-1", "--run-on", "both"]),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn status_and_watch_take_json() {
        assert!(matches!(
            parse(&["status"]).command,
            Some(Command::Status { json: false })
        ));
        assert!(matches!(
            parse(&["status", "--json"]).command,
            Some(Command::Status { json: true })
        ));
        assert!(matches!(
            parse(&["watch", "--json"]).command,
            Some(Command::Watch { json: true })
        ));
    }

    #[test]
    fn completions_take_bash_zsh_or_fish_and_man_an_optional_dir() {
        use cli::manual::CompletionShell;
        assert!(matches!(
            parse(&["completions", "zsh"]).command,
            Some(Command::Completions {
                shell: CompletionShell::Zsh
            })
        ));
        assert_eq!(
            parse_error(&["completions", "tcsh"]),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            parse_error(&["completions"]),
            ErrorKind::MissingRequiredArgument
        );
        assert!(matches!(
            parse(&["man"]).command,
            Some(Command::Man { dir: None })
        ));
        assert!(matches!(
            parse(&["man", "--dir", "out/man1"]).command,
            Some(Command::Man { dir: Some(d) }) if d == std::path::Path::new("out/man1")
        ));
    }

    #[test]
    fn an_unknown_subcommand_or_flag_is_bad_usage() {
        assert_eq!(parse_error(&["teleport"]), ErrorKind::InvalidSubcommand);
        assert_eq!(
            parse_error(&["status", "--yaml"]),
            ErrorKind::UnknownArgument
        );
    }

    #[test]
    fn evacuate_takes_the_issue_s_choices() {
        let Some(Command::Evacuate {
            host,
            mode,
            concurrency,
            max_attempts,
            exclude,
            report,
            ..
        }) = parse(&[
            "evacuate",
            "hv-a",
            "--mode",
            "fast",
            "--concurrency",
            "4",
            "--max-attempts",
            "5",
            "--exclude",
            "hv-b,hv-c",
            "--exclude",
            "hv-d",
            "--json",
        ])
        .command
        else {
            panic!("not evacuate");
        };
        assert_eq!(host, "hv-a");
        assert_eq!(mode, ModeArg::Fast);
        assert_eq!((concurrency, max_attempts), (Some(4), 5));
        assert_eq!(exclude, ["hv-b", "hv-c", "hv-d"]);
        assert!(report.json && !report.no_wait);
        // Defaults: safe, the host's limit, 3 attempts, nothing excluded.
        let Some(Command::Evacuate {
            mode,
            concurrency,
            max_attempts,
            exclude,
            ..
        }) = parse(&["evacuate", "hv-a"]).command
        else {
            panic!("not evacuate");
        };
        assert_eq!((mode, concurrency, max_attempts), (ModeArg::Safe, None, 3));
        assert!(exclude.is_empty());
        assert!(matches!(
            parse(&["evacuation", "cancel", "e-1", "--abort"]).command,
            Some(Command::Evacuation {
                action: EvacuationAction::Cancel,
                abort: true,
                ..
            })
        ));
        assert!(matches!(
            parse(&["undrain", "hv-a"]).command,
            Some(Command::Undrain { .. })
        ));
        assert_eq!(
            parse_error(&["evacuation", "stop", "e-1"]),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            parse_error(&["evacuate", "hv-a", "--concurrency", "-1"]),
            ErrorKind::UnknownArgument
        );
    }
}
