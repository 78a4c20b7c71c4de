//! The completion choices the console's dialogs offer (retry, retry
//! elsewhere, new migration, evacuate): the same as the CLI's flags —
//! post-copy never, auto or now; a budget per GiB of guest memory (0: none);
//! abort or continue once it is spent — over a base policy: the mode's
//! default, or, retrying in the same mode, the last attempt's own (what the
//! agent does with a request that leaves a choice out).
//!
//! What the operator has not touched follows the base, so switching the
//! mode switches the default; what they picked stays. A combination the
//! agent refuses (`continue` with post-copy) is never offered: `continue`
//! cannot be chosen without post-copy `never`, and a policy with it is
//! read as `abort` once post-copy is chosen.

use crate::protocol::Mode;
use crate::protocol::completion::{
    Completion, CompletionRequest, DEFAULT_TIMEOUT_PER_GIB_S, MAX_TIMEOUT_PER_GIB_S, Postcopy,
    WhenSpent,
};

/// What `b` steps through: the default, more patient ones, none, a short one.
const BUDGET_STEPS: [u64; 5] = [DEFAULT_TIMEOUT_PER_GIB_S, 300, 600, 0, 60];
/// Where left and right move the budget on a form's row, none to longest.
const BUDGET_LADDER: [u64; 7] = [0, 30, 60, DEFAULT_TIMEOUT_PER_GIB_S, 300, 600, 1200];

/// Why `continue` is not on offer with post-copy, in the operator's terms.
pub const CONTINUE_NEEDS_NEVER: &str =
    "continue is only for post-copy never; with auto a spent budget switches over";

/// The operator's picks in a dialog; the rest comes from the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompletionChoice {
    pub picked: CompletionRequest,
    /// Digits are being typed into the budget: the next one appends.
    typing: bool,
}

/// The policy a dialog offers when the operator picks nothing: the mode's
/// default, or the last attempt's policy for a retry in the same mode.
pub fn base(mode: Mode, last: Option<(Mode, Completion)>) -> Completion {
    Completion::base(mode, last)
}

impl CompletionChoice {
    /// The policy to send: the picks over `base`, never one the agent
    /// refuses.
    pub fn over(&self, base: Completion) -> Completion {
        let mut policy = self.picked.over(base);
        if policy.postcopy != Postcopy::Never {
            policy.when_spent = WhenSpent::Abort;
        }
        policy
    }

    /// `p`: never → auto → now → never.
    pub fn next_postcopy(&mut self, base: Completion) {
        let next = match self.over(base).postcopy {
            Postcopy::Never => Postcopy::Auto,
            Postcopy::Auto => Postcopy::Now,
            Postcopy::Now => Postcopy::Never,
        };
        self.picked.postcopy = Some(next);
        if next != Postcopy::Never && self.picked.when_spent == Some(WhenSpent::Continue) {
            self.picked.when_spent = None;
        }
        self.typing = false;
    }

    /// `b`: the next of [`BUDGET_STEPS`] (from the default if the budget is
    /// one typed by hand).
    pub fn next_budget(&mut self, base: Completion) {
        let now = self.over(base).timeout_per_gib_s;
        let next = BUDGET_STEPS
            .iter()
            .position(|s| *s == now)
            .map_or(DEFAULT_TIMEOUT_PER_GIB_S, |i| {
                BUDGET_STEPS[(i + 1) % BUDGET_STEPS.len()]
            });
        self.picked.timeout_per_gib_s = Some(next);
        self.typing = false;
    }

    /// Left or right on a form's budget row: the next budget down or up
    /// [`BUDGET_LADDER`] (none at the bottom).
    pub fn step_budget(&mut self, base: Completion, up: bool) {
        let now = self.over(base).timeout_per_gib_s;
        let next = if up {
            BUDGET_LADDER.iter().copied().find(|b| *b > now)
        } else {
            BUDGET_LADDER.iter().rev().copied().find(|b| *b < now)
        };
        self.picked.timeout_per_gib_s = Some(next.unwrap_or(now));
        self.typing = false;
    }

    /// A digit typed into the budget (`None`: backspace). The first digit
    /// replaces it (typing 3 over 150 means 3), the next ones append; at
    /// most what an agent accepts.
    pub fn type_budget(&mut self, base: Completion, digit: Option<u64>) {
        let now = self.over(base).timeout_per_gib_s;
        let next = match digit {
            Some(d) if !self.typing => d,
            Some(d) => now.saturating_mul(10).saturating_add(d),
            None => now / 10,
        };
        self.picked.timeout_per_gib_s = Some(next.min(MAX_TIMEOUT_PER_GIB_S));
        self.typing = true;
    }

    /// A key other than a digit or backspace ends the typing of a budget.
    pub fn stop_typing(&mut self) {
        self.typing = false;
    }

    /// `w`: abort ↔ continue once the budget is spent; refused, with why,
    /// where it means nothing or the agent would refuse it.
    pub fn toggle_when_spent(&mut self, base: Completion) -> Result<(), String> {
        let policy = self.over(base);
        if policy.postcopy != Postcopy::Never {
            return Err(CONTINUE_NEEDS_NEVER.to_string());
        }
        if policy.timeout_per_gib_s == 0 {
            return Err("with no budget there is nothing to run out of (b sets one)".to_string());
        }
        self.picked.when_spent = Some(match policy.when_spent {
            WhenSpent::Abort => WhenSpent::Continue,
            WhenSpent::Continue => WhenSpent::Abort,
        });
        self.typing = false;
        Ok(())
    }

    /// Whether `w` has a choice to offer under this policy.
    pub fn when_spent_applies(policy: &Completion) -> bool {
        policy.postcopy == Postcopy::Never && policy.timeout_per_gib_s > 0
    }
}

/// How a dialog shows the budget: "150 s per GiB", "none".
pub fn budget_text(policy: &Completion) -> String {
    match policy.timeout_per_gib_s {
        0 => "none".to_string(),
        s => format!("{s} s per GiB"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn safe() -> Completion {
        Completion::for_mode(Mode::Safe)
    }

    #[test]
    fn untouched_choices_follow_the_mode_and_picked_ones_stay() {
        let mut choice = CompletionChoice::default();
        assert_eq!(choice.over(base(Mode::Safe, None)), safe());
        assert_eq!(
            choice.over(base(Mode::Fast, None)),
            Completion::for_mode(Mode::Fast)
        );
        choice.next_budget(safe());
        assert_eq!(choice.over(base(Mode::Fast, None)).timeout_per_gib_s, 300);
        assert_eq!(
            choice.over(base(Mode::Fast, None)).postcopy,
            Postcopy::Auto,
            "post-copy still follows the mode"
        );
    }

    #[test]
    fn a_retry_in_the_same_mode_starts_from_the_last_attempts_policy() {
        let last = Completion {
            timeout_per_gib_s: 20,
            postcopy: Postcopy::Now,
            downtime_limit_ms: 500,
            when_spent: WhenSpent::Abort,
        };
        assert_eq!(base(Mode::Safe, Some((Mode::Safe, last))), last);
        assert_eq!(
            base(Mode::Fast, Some((Mode::Safe, last))),
            Completion::for_mode(Mode::Fast)
        );
    }

    #[test]
    fn p_cycles_post_copy_and_b_cycles_the_budget_back_to_the_default() {
        let mut choice = CompletionChoice::default();
        let mut seen = Vec::new();
        for _ in 0..3 {
            choice.next_postcopy(safe());
            seen.push(choice.over(safe()).postcopy);
        }
        assert_eq!(seen, [Postcopy::Auto, Postcopy::Now, Postcopy::Never]);
        let mut budgets = Vec::new();
        for _ in 0..BUDGET_STEPS.len() {
            choice.next_budget(safe());
            budgets.push(choice.over(safe()).timeout_per_gib_s);
        }
        assert_eq!(budgets, [300, 600, 0, 60, 150]);
    }

    #[test]
    fn left_and_right_climb_a_ladder_of_budgets_from_none() {
        let mut choice = CompletionChoice::default();
        choice.step_budget(safe(), true);
        assert_eq!(choice.over(safe()).timeout_per_gib_s, 300);
        for _ in 0..10 {
            choice.step_budget(safe(), false);
        }
        assert_eq!(
            choice.over(safe()).timeout_per_gib_s,
            0,
            "none, and no lower"
        );
        choice.type_budget(safe(), Some(7));
        choice.step_budget(safe(), true);
        assert_eq!(
            choice.over(safe()).timeout_per_gib_s,
            30,
            "from a typed one, the next rung"
        );
    }

    #[test]
    fn digits_type_a_budget_within_what_an_agent_accepts() {
        let mut choice = CompletionChoice::default();
        for d in [4, 5] {
            choice.type_budget(safe(), Some(d));
        }
        assert_eq!(choice.over(safe()).timeout_per_gib_s, 45);
        choice.type_budget(safe(), None);
        assert_eq!(choice.over(safe()).timeout_per_gib_s, 4);
        for _ in 0..9 {
            choice.type_budget(safe(), Some(9));
        }
        assert_eq!(choice.over(safe()).timeout_per_gib_s, MAX_TIMEOUT_PER_GIB_S);
        choice.stop_typing();
        choice.type_budget(safe(), Some(0));
        assert_eq!(choice.over(safe()).timeout_per_gib_s, 0, "0: no budget");
    }

    #[test]
    fn continue_is_offered_only_with_post_copy_never_and_never_sent_with_post_copy() {
        let mut choice = CompletionChoice::default();
        choice
            .toggle_when_spent(safe())
            .expect("never, with a budget");
        assert_eq!(choice.over(safe()).when_spent, WhenSpent::Continue);
        assert_eq!(choice.over(safe()).check(), Ok(()));
        // Post-copy auto: continue goes, and cannot come back.
        choice.next_postcopy(safe());
        assert_eq!(choice.over(safe()).when_spent, WhenSpent::Abort);
        let refusal = choice.toggle_when_spent(safe()).unwrap_err();
        assert!(refusal.contains("post-copy never"), "{refusal}");
        // A mode whose default is auto does not inherit a picked continue.
        let mut picked = CompletionChoice::default();
        picked.toggle_when_spent(safe()).unwrap();
        let fast = picked.over(base(Mode::Fast, None));
        assert_eq!(fast.when_spent, WhenSpent::Abort);
        assert_eq!(fast.check(), Ok(()));
        // No budget: nothing to spend.
        let mut none = CompletionChoice::default();
        none.type_budget(safe(), Some(0));
        assert!(none.toggle_when_spent(safe()).is_err());
    }

    #[test]
    fn every_policy_the_keys_reach_is_one_an_agent_accepts() {
        for mode in [Mode::Safe, Mode::Fast] {
            let mut choice = CompletionChoice::default();
            for step in 0..60 {
                let b = base(mode, None);
                match step % 3 {
                    0 => choice.next_postcopy(b),
                    1 => choice.next_budget(b),
                    _ => {
                        let _ = choice.toggle_when_spent(b);
                    }
                }
                assert_eq!(choice.over(b).check(), Ok(()), "{:?}", choice.over(b));
            }
        }
    }
}
