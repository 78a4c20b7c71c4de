//! The `exec` driver: an administrator's hook command run for every stage,
//! with a timeout, like libvirt's hooks. The hook learns what to do from its
//! environment:
//!
//! | variable         | value                                   |
//! |------------------|-----------------------------------------|
//! | `TERN_VM`        | the VM                                  |
//! | `TERN_STAGE`     | prepare, finish, rollback or release    |
//! | `TERN_ATTEMPT`   | the attempt id                          |
//! | `TERN_MIGRATION` | the migration id                        |
//! | `TERN_HOST`      | this host                               |
//! | `TERN_FEATURE`   | the feature's name                      |
//!
//! Nothing else of the agent's environment is passed on but `PATH`, set to
//! [`HOOK_PATH`]; the values hold only `A-Z a-z 0-9 . _ -`.
//!
//! Exit status 0 is success, and the last line of stdout is the detail shown
//! to the operator; anything else is a failure, explained by the last line of
//! stderr. The hook runs in its own process group, and a hook that overruns
//! its timeout is killed with everything it started.
//!
//! A hook that leaves a background process holding its stdout or stderr is
//! treated as still running until that process exits or the timeout kills it.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::faults::{FaultInjector, faults_from_settings};
use super::settings::{check_known_keys, optional_u64};
use super::{Faults, Feature, StageContext};
use crate::protocol::{Stage, StageOutcome};

/// The driver kind, as `driver = "exec"` names it.
pub const DRIVER: &str = "exec";

/// Settings of `[features.NAME]` this driver owns, beside `driver` and the fault keys.
const SETTINGS: [&str; 2] = ["command", "timeout_ms"];

pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Only the end of a hook's output is kept: the detail is its last line, and a
/// hook stuck printing must not grow the agent's memory until the timeout.
const OUTPUT_TAIL_BYTES: usize = 64 * 1024;

/// One `[features.NAME]` with `driver = "exec"`.
#[derive(Debug)]
pub struct ExecHook {
    name: String,
    /// Program and arguments.
    command: Vec<String>,
    timeout: Duration,
    faults: FaultInjector,
}

impl ExecHook {
    /// Build the driver from its `[features.NAME]` table.
    pub fn from_settings(name: &str, settings: &toml::Table) -> Result<ExecHook, String> {
        check_known_keys(settings, &SETTINGS)?;
        let command = match settings.get("command") {
            None => {
                return Err(
                    "command is missing: set command = [\"/path/to/hook\", \"arg\", ...]".into(),
                );
            }
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Err(format!("command: {other} is not a string")),
                })
                .collect::<Result<Vec<String>, String>>()?,
            Some(other) => {
                return Err(format!(
                    "command = {other}: expected a list, e.g. command = [\"/path/to/hook\"]"
                ));
            }
        };
        match command.first() {
            None => return Err("command = []: name the program to run".into()),
            Some(program) if program.trim().is_empty() => {
                return Err("command: the program is empty".into());
            }
            Some(_) => {}
        }
        let timeout_ms = optional_u64(settings, "timeout_ms")?.unwrap_or(DEFAULT_TIMEOUT_MS);
        if timeout_ms == 0 {
            return Err("timeout_ms = 0: must be at least 1".into());
        }
        let faults = FaultInjector::new(faults_from_settings(settings)?)?;
        Ok(ExecHook {
            name: name.to_string(),
            command,
            timeout: Duration::from_millis(timeout_ms),
            faults,
        })
    }

    /// The hook program, as messages name it.
    fn program(&self) -> &str {
        // from_settings guarantees a program.
        self.command.first().map(String::as_str).unwrap_or_default()
    }

    async fn run(&self, stage: Stage, ctx: &StageContext) -> StageOutcome {
        let program = self.program();
        self.faults
            .inject(stage)
            .await
            .map_err(|fault| format!("hook {program} ({stage}) not run: {fault}"))?;

        let mut command = tokio::process::Command::new(program);
        // Nothing of the agent's environment leaks into the hook (its
        // TERN_* settings, a proxy, LD_PRELOAD): a fixed PATH and the
        // values below, each made of name and id characters only.
        command
            .args(&self.command[1..])
            .env_clear()
            .env("PATH", HOOK_PATH)
            .env("TERN_VM", hook_value(&ctx.vm))
            .env("TERN_STAGE", stage.as_str())
            .env("TERN_ATTEMPT", hook_value(&ctx.attempt_id))
            .env("TERN_MIGRATION", hook_value(&ctx.migration_id))
            .env("TERN_HOST", hook_value(&ctx.host))
            .env("TERN_FEATURE", hook_value(&self.name))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Its own group lets a timeout kill what the hook started, and keeps the
        // terminal's Ctrl-C (meant for the agent) away from the hook.
        #[cfg(unix)]
        command.process_group(0);
        // A hook must not act after its agent died (SIGKILL, crash): a
        // restarted agent rolls back what the dead one started, and a late
        // hook would redo it behind the rollback's back.
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }

        let mut child = command
            .spawn()
            .map_err(|e| format!("hook {program} could not start: {e}"))?;
        // Armed until the hook is known to be done: a timeout, or the stage
        // being cancelled (an abort drops this future), kills the whole group.
        let mut group = GroupKiller(child.id());
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();

        let finished = tokio::time::timeout(self.timeout, async {
            tokio::join!(child.wait(), read_tail(stdout), read_tail(stderr))
        })
        .await;
        let (status, stdout, stderr) = match finished {
            Ok(done) => {
                group.disarm();
                done
            }
            Err(_elapsed) => {
                group.kill();
                // Reap it; after SIGKILL this returns at once.
                let _ = child.kill().await;
                return Err(format!(
                    "hook {program} timed out after {} ms",
                    self.timeout.as_millis()
                ));
            }
        };
        let status = status.map_err(|e| format!("hook {program}: cannot wait for it: {e}"))?;
        if status.success() {
            Ok(last_line(&stdout).unwrap_or_else(|| "hook exited 0".to_string()))
        } else {
            let why = describe_failure(status);
            Err(match last_line(&stderr) {
                Some(line) => format!("hook {program} {why}: {line}"),
                None => format!("hook {program} {why}"),
            })
        }
    }
}

/// The only PATH a hook sees.
pub const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A value for a hook's environment: names and ids are checked by the name
/// and id rules where they come in, and this keeps a hook safe regardless:
/// only `A-Z a-z 0-9 . _ -` (anything else becomes `_`), at most 128 bytes.
fn hook_value(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect()
}

/// Kills the hook's process group when dropped while armed.
struct GroupKiller(Option<u32>);

impl GroupKiller {
    fn disarm(&mut self) {
        self.0 = None;
    }

    fn kill(&mut self) {
        #[cfg(unix)]
        if let Some(pgid) = self.0.take().and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: kill(2) has no memory-safety preconditions. A negative pid
            // addresses the group the hook leads (process_group(0) made its pgid
            // its pid); an error (the group is gone already) needs no handling.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Read a pipe to its end, keeping only the last `OUTPUT_TAIL_BYTES`.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    let mut tail = Vec::new();
    let mut chunk = [0u8; 8192];
    // A read error ends the output like EOF: the exit status still decides.
    while let Ok(n @ 1..) = pipe.read(&mut chunk).await {
        tail.extend_from_slice(&chunk[..n]);
        if tail.len() > OUTPUT_TAIL_BYTES {
            tail.drain(..tail.len() - OUTPUT_TAIL_BYTES);
        }
    }
    tail
}

/// The last non-blank line, trimmed.
fn last_line(output: &[u8]) -> Option<String> {
    String::from_utf8_lossy(output)
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .map(str::to_string)
}

fn describe_failure(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("was killed by signal {signal}");
        }
    }
    format!("failed ({status})")
}

#[async_trait]
impl Feature for ExecHook {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> &str {
        DRIVER
    }

    async fn prepare(&self, ctx: &StageContext) -> StageOutcome {
        self.run(Stage::Prepare, ctx).await
    }

    async fn finish(&self, ctx: &StageContext) -> StageOutcome {
        self.run(Stage::Finish, ctx).await
    }

    async fn rollback(&self, ctx: &StageContext) -> StageOutcome {
        self.run(Stage::Rollback, ctx).await
    }

    async fn release(&self, ctx: &StageContext) -> StageOutcome {
        self.run(Stage::Release, ctx).await
    }

    fn faults(&self) -> Option<Faults> {
        Some(self.faults.get())
    }

    fn set_faults(&self, faults: Faults) -> Result<(), String> {
        self.faults.set(faults)
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    use super::*;
    use crate::features::run_stage;
    use crate::protocol::FeatureSpec;

    fn ctx(stage: Stage) -> StageContext {
        StageContext {
            host: "hv-b".into(),
            vm: "web-01".into(),
            feature: FeatureSpec {
                name: "hook".into(),
                driver: "exec".into(),
                required: false,
            },
            stage,
            attempt_id: "att-7".into(),
            migration_id: "mig-3".into(),
            nics: Vec::new(),
            guest: None,
        }
    }

    /// Write an executable sh script.
    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn hook(command: &[&str], extra: &str) -> ExecHook {
        let settings: toml::Table = format!("driver = \"exec\"\ncommand = {command:?}\n{extra}")
            .parse()
            .unwrap();
        ExecHook::from_settings("hook", &settings).expect("valid settings")
    }

    #[tokio::test]
    async fn exec_hook_sees_vm_stage_and_attempt_in_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let prog = script(
            dir.path(),
            "hook.sh",
            "echo \"$TERN_VM $TERN_STAGE $TERN_ATTEMPT $TERN_MIGRATION $TERN_HOST $TERN_FEATURE $1\" >> \"$2\"\necho starting\necho \"  done $TERN_STAGE  \"",
        );
        let h = hook(&[prog.to_str().unwrap(), "arg1", out.to_str().unwrap()], "");
        let detail = run_stage(&h, &ctx(Stage::Finish)).await.unwrap();
        assert_eq!(detail, "done finish");
        run_stage(&h, &ctx(Stage::Release)).await.unwrap();
        let seen = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            seen,
            "web-01 finish att-7 mig-3 hv-b hook arg1\nweb-01 release att-7 mig-3 hv-b hook arg1\n"
        );
    }

    #[tokio::test]
    async fn a_hook_sees_only_a_fixed_path_and_sanitised_tern_values() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let prog = script(dir.path(), "env.sh", "env > \"$1\"");
        let h = hook(&[prog.to_str().unwrap(), out.to_str().unwrap()], "");
        let mut odd = ctx(Stage::Prepare);
        odd.vm = "web 01;$(reboot)\u{1b}[2J".into();
        // SAFETY: set before the hook starts; no other thread of this test
        // reads the variable.
        unsafe { std::env::set_var("TERN_LEAK_CHECK", "from-the-agent") };
        run_stage(&h, &odd).await.unwrap();
        let seen = std::fs::read_to_string(&out).unwrap();
        let mut names: Vec<&str> = seen
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .filter(|k| *k != "PWD" && *k != "SHLVL" && *k != "_")
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "PATH",
                "TERN_ATTEMPT",
                "TERN_FEATURE",
                "TERN_HOST",
                "TERN_MIGRATION",
                "TERN_STAGE",
                "TERN_VM"
            ],
            "{seen}"
        );
        assert!(seen.contains(&format!("PATH={HOOK_PATH}\n")), "{seen}");
        assert!(seen.contains("TERN_VM=web_01___reboot___2J\n"), "{seen}");
    }

    #[tokio::test]
    async fn silent_hook_reports_exit_zero() {
        let h = hook(&["/bin/true"], "");
        assert_eq!(
            run_stage(&h, &ctx(Stage::Prepare)).await,
            Ok("hook exited 0".to_string())
        );
        assert!(h.held_state().is_empty());
    }

    #[tokio::test]
    async fn failing_hook_reports_exit_code_and_last_stderr_line() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            "fail.sh",
            "echo noise >&2\necho 'no VLAN 12 on hv-b' >&2\nexit 3",
        );
        let h = hook(&[prog.to_str().unwrap()], "");
        let err = run_stage(&h, &ctx(Stage::Prepare)).await.unwrap_err();
        assert_eq!(
            err,
            format!("hook {} exited 3: no VLAN 12 on hv-b", prog.display())
        );
    }

    #[tokio::test]
    async fn exec_hook_times_out_and_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        // A child of the hook, not just the hook itself, must die with it.
        let prog = script(
            dir.path(),
            "slow.sh",
            &format!("sleep 30 &\necho $$ $! > {}\nwait", pids.display()),
        );
        let h = hook(&[prog.to_str().unwrap()], "timeout_ms = 300");
        let started = Instant::now();
        let err = run_stage(&h, &ctx(Stage::Finish)).await.unwrap_err();
        assert_eq!(
            err,
            format!("hook {} timed out after 300 ms", prog.display())
        );
        assert!(started.elapsed() < Duration::from_secs(5));

        let pids = std::fs::read_to_string(&pids).unwrap();
        for pid in pids.split_whitespace() {
            let proc_dir = PathBuf::from(format!("/proc/{pid}"));
            // The background sleep is reaped by init, which may take a moment.
            let deadline = Instant::now() + Duration::from_secs(2);
            while alive(&proc_dir) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(
                !alive(&proc_dir),
                "process {pid} of the hook survived the timeout"
            );
        }
    }

    /// A process exists and is not a zombie waiting for its parent.
    fn alive(proc_dir: &Path) -> bool {
        match std::fs::read_to_string(proc_dir.join("stat")) {
            Ok(stat) => !stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn missing_program_is_reported_with_its_path() {
        let h = hook(&["/nonexistent/tern-hook"], "");
        let err = run_stage(&h, &ctx(Stage::Prepare)).await.unwrap_err();
        assert!(
            err.starts_with("hook /nonexistent/tern-hook could not start: "),
            "{err}"
        );
        assert!(err.contains("No such file"), "{err}");
    }

    #[tokio::test]
    async fn injected_fault_fails_before_the_hook_runs() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let prog = script(
            dir.path(),
            "hook.sh",
            &format!("touch {}", marker.display()),
        );
        let h = hook(&[prog.to_str().unwrap()], "fail = [\"rollback\"]");
        let err = run_stage(&h, &ctx(Stage::Rollback)).await.unwrap_err();
        assert_eq!(
            err,
            format!(
                "hook {} (rollback) not run: injected fault (fail = [rollback])",
                prog.display()
            )
        );
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn set_faults_changes_behaviour_at_run_time() {
        let h = hook(&["/bin/true"], "");
        h.set_faults(Faults {
            fail: vec![Stage::Prepare],
            ..Faults::default()
        })
        .unwrap();
        assert!(run_stage(&h, &ctx(Stage::Prepare)).await.is_err());
        h.set_faults(Faults::default()).unwrap();
        assert!(run_stage(&h, &ctx(Stage::Prepare)).await.is_ok());
    }

    #[test]
    fn bad_command_settings_are_rejected() {
        for (text, expect) in [
            ("", "command is missing"),
            ("command = []", "command = []"),
            ("command = \"/bin/true\"", "expected a list"),
            ("command = [\"/bin/true\", 3]", "3 is not a string"),
            ("command = [\" \"]", "program is empty"),
            (
                "command = [\"/bin/true\"]\ntimeout_ms = 0",
                "timeout_ms = 0",
            ),
            (
                "command = [\"/bin/true\"]\ntimeout_ms = -1",
                "must not be negative",
            ),
            ("command = [\"/bin/true\"]\nfail_rate = 3", "fail_rate = 3"),
        ] {
            let settings: toml::Table = text.parse().unwrap();
            let err = ExecHook::from_settings("hook", &settings).unwrap_err();
            assert!(err.contains(expect), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn unknown_setting_is_rejected() {
        let settings: toml::Table = "command = [\"/bin/true\"]\ntimeout = 5".parse().unwrap();
        let err = ExecHook::from_settings("hook", &settings).unwrap_err();
        assert!(err.starts_with("unknown setting \"timeout\""), "{err}");
    }

    #[test]
    fn timeout_defaults_to_ten_seconds() {
        assert_eq!(
            hook(&["/bin/true"], "").timeout,
            Duration::from_millis(DEFAULT_TIMEOUT_MS)
        );
    }
}
