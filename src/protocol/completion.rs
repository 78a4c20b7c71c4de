//! How a migration is made to finish: its completion policy, chosen per
//! migration or evacuation, and the judgment the source makes from it on
//! every progress sample. Sans-IO, like the rest of the protocol.
//!
//! A transfer gets a budget of `timeout_per_gib_s` seconds per GiB of guest
//! memory (150 by default, as KubeVirt). With post-copy `auto`, the source
//! switches over as soon as the convergence model says pre-copy cannot
//! finish, or when the budget is spent; with `now`, at once; with `never`,
//! a spent budget aborts the attempt (the guest keeps running on the
//! source), or, if asked, the transfer just goes on.

use serde::{Deserialize, Serialize};

use super::convergence::{Outlook, Verdict};
use super::{Millis, Mode};

/// The budget per GiB of guest memory when none is given.
pub const DEFAULT_TIMEOUT_PER_GIB_S: u64 = 150;

/// The largest budget per GiB an agent accepts: a day.
pub const MAX_TIMEOUT_PER_GIB_S: u64 = 86_400;
/// The longest final-pass pause an agent accepts.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 60_000;
/// The pause the convergence model assumes when the policy leaves it to
/// the host (QEMU's default `downtime-limit`).
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;

/// `auto` switches on a "not converging" verdict only once the transfer
/// has run this long: a verdict from the first instants is too thin.
pub const MIN_OBSERVATION_MS: Millis = 2_000;

/// When the transfer may switch to post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Postcopy {
    /// Pre-copy only.
    Never,
    /// Switch when pre-copy cannot converge or the budget is spent.
    Auto,
    /// Switch as soon as the transfer runs.
    Now,
}

impl Postcopy {
    pub fn as_str(self) -> &'static str {
        match self {
            Postcopy::Never => "never",
            Postcopy::Auto => "auto",
            Postcopy::Now => "now",
        }
    }

    pub fn parse(s: &str) -> Option<Postcopy> {
        match s {
            "never" => Some(Postcopy::Never),
            "auto" => Some(Postcopy::Auto),
            "now" => Some(Postcopy::Now),
            _ => None,
        }
    }
}

/// What a spent budget does to a transfer that may not switch to post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenSpent {
    /// End the attempt; the guest keeps running on the source.
    Abort,
    /// Keep transferring.
    Continue,
}

impl WhenSpent {
    pub fn as_str(self) -> &'static str {
        match self {
            WhenSpent::Abort => "abort",
            WhenSpent::Continue => "continue",
        }
    }

    pub fn parse(s: &str) -> Option<WhenSpent> {
        match s {
            "abort" => Some(WhenSpent::Abort),
            "continue" => Some(WhenSpent::Continue),
            _ => None,
        }
    }
}

/// A migration's completion policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Completion {
    /// Seconds of transfer per GiB of guest memory; 0: no budget.
    pub timeout_per_gib_s: u64,
    pub postcopy: Postcopy,
    /// The longest pause of the final pre-copy pass; 0: the source host's
    /// configured limit.
    #[serde(default)]
    pub downtime_limit_ms: u64,
    pub when_spent: WhenSpent,
}

impl Default for Completion {
    /// Safe mode's: nothing switches to post-copy unless asked.
    fn default() -> Self {
        Completion::for_mode(Mode::Safe)
    }
}

impl Completion {
    /// The defaults of a mode: fast finishes the move (post-copy `auto`),
    /// safe never gives up the source's copy unless asked (`never`).
    pub fn for_mode(mode: Mode) -> Completion {
        Completion {
            timeout_per_gib_s: DEFAULT_TIMEOUT_PER_GIB_S,
            postcopy: match mode {
                Mode::Fast => Postcopy::Auto,
                Mode::Safe => Postcopy::Never,
            },
            downtime_limit_ms: 0,
            when_spent: WhenSpent::Abort,
        }
    }

    /// A policy an agent accepts: the budget and the pause within bounds,
    /// and `continue` only where there is no post-copy to switch to.
    pub fn check(&self) -> Result<(), String> {
        if self.timeout_per_gib_s > MAX_TIMEOUT_PER_GIB_S {
            return Err(format!(
                "completion timeout {} s per GiB: must be at most {MAX_TIMEOUT_PER_GIB_S} (a day)",
                self.timeout_per_gib_s
            ));
        }
        if self.downtime_limit_ms > MAX_DOWNTIME_LIMIT_MS {
            return Err(format!(
                "downtime limit {} ms: must be at most {MAX_DOWNTIME_LIMIT_MS} ms",
                self.downtime_limit_ms
            ));
        }
        if self.when_spent == WhenSpent::Continue && self.postcopy != Postcopy::Never {
            return Err(format!(
                "keep going once the budget is spent applies only without post-copy (post-copy never), \
                 not with post-copy {}: with auto a spent budget switches to post-copy",
                self.postcopy.as_str()
            ));
        }
        Ok(())
    }

    /// What an attempt runs under when its request leaves the policy out:
    /// a retry in the same mode keeps the last attempt's policy, anything
    /// else gets `mode`'s default.
    pub fn base(mode: Mode, last: Option<(Mode, Completion)>) -> Completion {
        match last {
            Some((last_mode, policy)) if last_mode == mode => policy,
            _ => Completion::for_mode(mode),
        }
    }

    /// The transfer's budget for a guest of `memory_mib`; `None`: unlimited.
    pub fn budget_ms(&self, memory_mib: u64) -> Option<Millis> {
        (self.timeout_per_gib_s > 0).then(|| {
            (self.timeout_per_gib_s.saturating_mul(1000))
                .saturating_mul(memory_mib.max(1))
                .div_ceil(1024)
        })
    }

    /// "post-copy auto, 150 s/GiB, then abort" — for the record and the console.
    pub fn describe(&self) -> String {
        let budget = if self.timeout_per_gib_s == 0 {
            "no budget".to_string()
        } else {
            format!("{} s/GiB", self.timeout_per_gib_s)
        };
        let mut text = format!("post-copy {}, {budget}", self.postcopy.as_str());
        if self.postcopy == Postcopy::Never && self.timeout_per_gib_s > 0 {
            text.push_str(match self.when_spent {
                WhenSpent::Abort => ", then abort",
                WhenSpent::Continue => ", then continue",
            });
        }
        if self.downtime_limit_ms > 0 {
            text.push_str(&format!(", downtime ≤ {} ms", self.downtime_limit_ms));
        }
        text
    }
}

/// A policy as asked for: what it leaves out comes from a base policy
/// (the mode's default, or a retried attempt's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// `Some(0)`: no budget.
    pub timeout_per_gib_s: Option<u64>,
    pub postcopy: Option<Postcopy>,
    pub downtime_limit_ms: Option<u64>,
    pub when_spent: Option<WhenSpent>,
}

impl CompletionRequest {
    pub fn is_empty(&self) -> bool {
        *self == CompletionRequest::default()
    }

    pub fn over(&self, base: Completion) -> Completion {
        Completion {
            timeout_per_gib_s: self.timeout_per_gib_s.unwrap_or(base.timeout_per_gib_s),
            postcopy: self.postcopy.unwrap_or(base.postcopy),
            downtime_limit_ms: self.downtime_limit_ms.unwrap_or(base.downtime_limit_ms),
            when_spent: self.when_spent.unwrap_or(base.when_spent),
        }
    }
}

/// What the source should do with a transfer in pre-copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Keep going.
    Keep,
    /// Switch to post-copy, for this reason.
    Switch(String),
    /// End the attempt, for this reason.
    GiveUp(String),
    /// The budget is spent and the policy says go on: say so once.
    Overrun(String),
}

/// Judge a transfer in pre-copy that has run for `elapsed_ms` (since it
/// started sending), given the newest outlook. `overrun_noted`: the
/// source already said the budget is spent.
pub fn judge(
    policy: &Completion,
    memory_mib: u64,
    elapsed_ms: Millis,
    outlook: Option<&Outlook>,
    overrun_noted: bool,
) -> Step {
    if policy.postcopy == Postcopy::Now {
        return Step::Switch("post-copy was asked for from the start".into());
    }
    let budget = policy.budget_ms(memory_mib);
    let spent = budget.is_some_and(|b| elapsed_ms >= b);
    let why_spent = || {
        format!(
            "not done within its budget of {} ({} s per GiB of {} MiB)",
            seconds(budget.unwrap_or(0)),
            policy.timeout_per_gib_s,
            memory_mib
        )
    };
    let verdict = outlook.map(|o| o.verdict);
    match policy.postcopy {
        Postcopy::Auto
            if verdict == Some(Verdict::NotConverging) && elapsed_ms >= MIN_OBSERVATION_MS =>
        {
            Step::Switch(format!(
                "pre-copy cannot converge: {}",
                outlook.map(|o| o.reason.as_str()).unwrap_or_default()
            ))
        }
        Postcopy::Auto if spent => Step::Switch(why_spent()),
        Postcopy::Never if spent => match policy.when_spent {
            WhenSpent::Abort => {
                let mut why = why_spent();
                if let Some(o) = outlook {
                    why.push_str(&format!("; {}: {}", o.verdict.as_str(), o.reason));
                }
                Step::GiveUp(why)
            }
            WhenSpent::Continue if !overrun_noted => {
                Step::Overrun(format!("{}; going on as asked", why_spent()))
            }
            WhenSpent::Continue => Step::Keep,
        },
        _ => Step::Keep,
    }
}

fn seconds(ms: Millis) -> String {
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlook(verdict: Verdict) -> Outlook {
        Outlook {
            verdict,
            eta_ms: None,
            reason: "dirtying 1.4 GiB/s, link 1.1 GiB/s".into(),
        }
    }

    fn policy(postcopy: Postcopy, when_spent: WhenSpent) -> Completion {
        Completion {
            timeout_per_gib_s: 150,
            postcopy,
            downtime_limit_ms: 0,
            when_spent,
        }
    }

    #[test]
    fn the_budget_is_per_gib_of_guest_memory() {
        let p = policy(Postcopy::Never, WhenSpent::Abort);
        assert_eq!(p.budget_ms(1024), Some(150_000));
        assert_eq!(p.budget_ms(64 * 1024), Some(64 * 150_000));
        assert_eq!(p.budget_ms(512), Some(75_000));
        let unlimited = Completion {
            timeout_per_gib_s: 0,
            ..p
        };
        assert_eq!(unlimited.budget_ms(1024), None);
    }

    #[test]
    fn modes_default_to_auto_and_never() {
        assert_eq!(Completion::for_mode(Mode::Fast).postcopy, Postcopy::Auto);
        assert_eq!(Completion::for_mode(Mode::Safe).postcopy, Postcopy::Never);
        assert_eq!(
            Completion::for_mode(Mode::Safe).when_spent,
            WhenSpent::Abort
        );
    }

    #[test]
    fn auto_switches_when_pre_copy_cannot_converge_with_the_reason() {
        let p = policy(Postcopy::Auto, WhenSpent::Abort);
        assert_eq!(
            judge(
                &p,
                1024,
                1_999,
                Some(&outlook(Verdict::NotConverging)),
                false
            ),
            Step::Keep,
            "a verdict from the first instants is too thin"
        );
        let step = judge(
            &p,
            1024,
            5_000,
            Some(&outlook(Verdict::NotConverging)),
            false,
        );
        assert_eq!(
            step,
            Step::Switch("pre-copy cannot converge: dirtying 1.4 GiB/s, link 1.1 GiB/s".into())
        );
        assert_eq!(
            judge(&p, 1024, 5_000, Some(&outlook(Verdict::Converging)), false),
            Step::Keep
        );
        assert_eq!(judge(&p, 1024, 5_000, None, false), Step::Keep);
    }

    #[test]
    fn auto_switches_when_the_budget_is_spent_even_if_converging() {
        let p = policy(Postcopy::Auto, WhenSpent::Abort);
        let step = judge(&p, 1024, 150_000, Some(&outlook(Verdict::Slow)), false);
        assert_eq!(
            step,
            Step::Switch("not done within its budget of 150 s (150 s per GiB of 1024 MiB)".into())
        );
    }

    #[test]
    fn never_aborts_when_the_budget_is_spent_and_never_before() {
        let p = policy(Postcopy::Never, WhenSpent::Abort);
        assert_eq!(
            judge(
                &p,
                512,
                74_999,
                Some(&outlook(Verdict::NotConverging)),
                false
            ),
            Step::Keep,
            "not converging is no reason to give up before the budget is spent"
        );
        let Step::GiveUp(why) = judge(
            &p,
            512,
            75_000,
            Some(&outlook(Verdict::NotConverging)),
            false,
        ) else {
            panic!("a spent budget gives up");
        };
        assert!(why.contains("75 s"), "{why}");
        assert!(why.contains("not converging"), "{why}");
    }

    #[test]
    fn continue_says_so_once_and_goes_on() {
        let p = policy(Postcopy::Never, WhenSpent::Continue);
        assert!(matches!(
            judge(&p, 1024, 200_000, None, false),
            Step::Overrun(_)
        ));
        assert_eq!(judge(&p, 1024, 200_000, None, true), Step::Keep);
    }

    #[test]
    fn now_switches_at_once() {
        let p = policy(Postcopy::Now, WhenSpent::Abort);
        assert!(matches!(judge(&p, 1024, 0, None, false), Step::Switch(_)));
    }

    #[test]
    fn no_budget_never_gives_up() {
        let p = Completion {
            timeout_per_gib_s: 0,
            ..policy(Postcopy::Never, WhenSpent::Abort)
        };
        assert_eq!(judge(&p, 1024, u64::MAX / 2, None, false), Step::Keep);
    }

    #[test]
    fn policies_read_as_an_operator_says_them() {
        assert_eq!(
            Completion::for_mode(Mode::Safe).describe(),
            "post-copy never, 150 s/GiB, then abort"
        );
        assert_eq!(
            Completion::for_mode(Mode::Fast).describe(),
            "post-copy auto, 150 s/GiB"
        );
        assert_eq!(Postcopy::parse("auto"), Some(Postcopy::Auto));
        assert_eq!(Postcopy::parse("sometimes"), None);
        assert_eq!(WhenSpent::parse("continue"), Some(WhenSpent::Continue));
    }
}
