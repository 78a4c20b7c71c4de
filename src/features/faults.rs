//! Fault injection for the simulated drivers: the `fail`, `fail_rate`,
//! `latency_ms` and `fail_rollback` keys of `[features.NAME]`, and the
//! run-time switch behind `Feature::set_faults`.
//!
//! Faults are decided before a driver touches anything, so an injected failure
//! leaves no state behind: the invariant checks can then tell a lost rollback
//! from a stage that never did anything.

use std::sync::RwLock;
use std::time::Duration;

use super::Faults;
use crate::protocol::Stage;

/// The settings keys fault injection owns in `[features.NAME]`.
pub const FAULT_KEYS: [&str; 4] = ["fail", "fail_rate", "latency_ms", "fail_rollback"];

/// Why a stage failed on purpose. Displays as "injected fault (fail = [finish])",
/// for a driver to prefix with what it was doing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("injected fault ({0})")]
pub struct InjectedFault(String);

/// The longest latency fault injection adds to a stage: a minute, the
/// default stage deadline. `SetFaults` clamps to it; a config beyond it is
/// refused.
pub const MAX_LATENCY_MS: u64 = 60_000;

/// Check faults an operator or a config asked for.
pub fn validate(faults: &Faults) -> Result<(), String> {
    if faults.latency_ms > MAX_LATENCY_MS {
        return Err(format!(
            "latency_ms = {}: must be at most {MAX_LATENCY_MS}",
            faults.latency_ms
        ));
    }
    // `contains` is false for NaN, which must be rejected too.
    if !(0.0..=1.0).contains(&faults.fail_rate) {
        return Err(format!(
            "fail_rate = {}: must be between 0 and 1",
            faults.fail_rate
        ));
    }
    Ok(())
}

/// Read the fault keys of a `[features.NAME]` table; other keys are left to the driver.
pub fn faults_from_settings(table: &toml::Table) -> Result<Faults, String> {
    let mut faults = Faults::default();
    if let Some(value) = table.get("fail") {
        let items = value.as_array().ok_or_else(|| {
            format!("fail = {value}: expected a list of stages, e.g. fail = [\"finish\"]")
        })?;
        for item in items {
            let name = item
                .as_str()
                .ok_or_else(|| format!("fail = {value}: {item} is not a stage name"))?;
            let stage = Stage::parse(name).ok_or_else(|| {
                format!("fail = {value}: unknown stage {name:?} (stages: prepare, finish, rollback, release)")
            })?;
            if !faults.fail.contains(&stage) {
                faults.fail.push(stage);
            }
        }
    }
    faults.fail_rate = match table.get("fail_rate") {
        None => 0.0,
        Some(toml::Value::Float(f)) => *f,
        // `fail_rate = 1` is as natural to write as `1.0`.
        Some(toml::Value::Integer(i)) => *i as f64,
        Some(other) => {
            return Err(format!(
                "fail_rate = {other}: expected a number between 0 and 1"
            ));
        }
    };
    faults.latency_ms = super::settings::optional_u64(table, "latency_ms")?.unwrap_or(0);
    faults.fail_rollback = match table.get("fail_rollback") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(other) => return Err(format!("fail_rollback = {other}: expected true or false")),
    };
    validate(&faults)?;
    Ok(faults)
}

/// Decide whether `stage` fails under `faults`. `roll` is a uniform sample in
/// [0, 1) for `fail_rate`; passing it in keeps the decision testable.
pub fn decide(faults: &Faults, stage: Stage, roll: f64) -> Result<(), InjectedFault> {
    if faults.fail.contains(&stage) {
        let stages: Vec<&str> = faults.fail.iter().map(|s| s.as_str()).collect();
        return Err(InjectedFault(format!("fail = [{}]", stages.join(", "))));
    }
    let undo = matches!(stage, Stage::Rollback | Stage::Release);
    if undo && faults.fail_rollback {
        return Err(InjectedFault("fail_rollback = true".into()));
    }
    // Only the forward stages are flaky: a flaky rollback would make every
    // demo run leave pending rollbacks, which `fail_rollback` asks for explicitly.
    let forward = matches!(stage, Stage::Prepare | Stage::Finish);
    if forward && roll < faults.fail_rate {
        return Err(InjectedFault(format!("fail_rate = {}", faults.fail_rate)));
    }
    Ok(())
}

/// The faults in force for one feature, changeable while stages run.
#[derive(Debug, Default)]
pub struct FaultInjector {
    faults: RwLock<Faults>,
}

impl FaultInjector {
    pub fn new(faults: Faults) -> Result<FaultInjector, String> {
        validate(&faults)?;
        Ok(FaultInjector {
            faults: RwLock::new(faults),
        })
    }

    pub fn get(&self) -> Faults {
        // Faults is plain data, so a writer that panicked cannot have left it half-updated.
        self.faults
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replace the faults; invalid ones are refused and the old ones stay.
    pub fn set(&self, faults: Faults) -> Result<(), String> {
        validate(&faults)?;
        *self
            .faults
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = faults;
        Ok(())
    }

    /// Wait the injected latency, then fail the stage if the faults say so.
    /// Call it before the driver changes anything.
    pub async fn inject(&self, stage: Stage) -> Result<(), InjectedFault> {
        let faults = self.get();
        if faults.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
        }
        decide(&faults, stage, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn latency_beyond_a_minute_is_refused_in_config() {
        let table: toml::Table = "latency_ms = 60001".parse().unwrap();
        let err = faults_from_settings(&table).unwrap_err();
        assert_eq!(err, "latency_ms = 60001: must be at most 60000");
        let table: toml::Table = "latency_ms = 60000".parse().unwrap();
        assert_eq!(faults_from_settings(&table).unwrap().latency_ms, 60_000);
    }

    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().expect("test table is valid TOML")
    }

    #[test]
    fn listed_stage_fails_with_the_setting_in_the_message() {
        let faults = Faults {
            fail: vec![Stage::Finish],
            ..Faults::default()
        };
        let err = decide(&faults, Stage::Finish, 0.99).unwrap_err();
        assert_eq!(err.to_string(), "injected fault (fail = [finish])");
        assert_eq!(decide(&faults, Stage::Prepare, 0.99), Ok(()));
    }

    #[test]
    fn fail_rollback_fails_rollback_and_release_only() {
        let faults = Faults {
            fail_rollback: true,
            ..Faults::default()
        };
        assert!(decide(&faults, Stage::Rollback, 0.5).is_err());
        assert!(decide(&faults, Stage::Release, 0.5).is_err());
        assert_eq!(decide(&faults, Stage::Prepare, 0.5), Ok(()));
        assert_eq!(decide(&faults, Stage::Finish, 0.5), Ok(()));
    }

    #[test]
    fn fail_rate_applies_to_prepare_and_finish_only() {
        let faults = Faults {
            fail_rate: 0.5,
            ..Faults::default()
        };
        assert!(decide(&faults, Stage::Prepare, 0.2).is_err());
        assert!(decide(&faults, Stage::Finish, 0.2).is_err());
        assert_eq!(decide(&faults, Stage::Prepare, 0.7), Ok(()));
        assert_eq!(decide(&faults, Stage::Rollback, 0.0), Ok(()));
        assert_eq!(decide(&faults, Stage::Release, 0.0), Ok(()));
    }

    #[tokio::test]
    async fn fail_rate_one_always_fails_prepare() {
        let injector = FaultInjector::new(Faults {
            fail_rate: 1.0,
            ..Faults::default()
        })
        .unwrap();
        for _ in 0..200 {
            assert!(injector.inject(Stage::Prepare).await.is_err());
        }
    }

    #[tokio::test]
    async fn fail_rate_zero_never_fails() {
        let injector = FaultInjector::default();
        for stage in [
            Stage::Prepare,
            Stage::Finish,
            Stage::Rollback,
            Stage::Release,
        ] {
            assert_eq!(injector.inject(stage).await, Ok(()));
        }
    }

    #[tokio::test]
    async fn latency_delays_the_stage() {
        let injector = FaultInjector::new(Faults {
            latency_ms: 40,
            ..Faults::default()
        })
        .unwrap();
        let started = std::time::Instant::now();
        injector.inject(Stage::Release).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(40));
    }

    #[test]
    fn fail_rate_outside_zero_to_one_is_rejected() {
        for rate in [-0.1, 1.5, f64::NAN] {
            let faults = Faults {
                fail_rate: rate,
                ..Faults::default()
            };
            assert!(
                FaultInjector::new(faults.clone()).is_err(),
                "{rate} accepted"
            );
            let injector = FaultInjector::default();
            assert!(injector.set(faults).is_err());
            assert_eq!(
                injector.get(),
                Faults::default(),
                "a refused set must keep the old faults"
            );
        }
    }

    #[test]
    fn settings_are_read_from_the_table() {
        let faults = faults_from_settings(&table(
            "fail = [\"finish\", \"prepare\", \"finish\"]\nfail_rate = 1\nlatency_ms = 20\nfail_rollback = true",
        ))
        .unwrap();
        assert_eq!(
            faults,
            Faults {
                fail: vec![Stage::Finish, Stage::Prepare],
                fail_rate: 1.0,
                latency_ms: 20,
                fail_rollback: true
            }
        );
        assert_eq!(
            faults_from_settings(&toml::Table::new()).unwrap(),
            Faults::default()
        );
    }

    #[test]
    fn unknown_stage_in_fail_is_rejected_with_its_name() {
        let err = faults_from_settings(&table("fail = [\"commit\"]")).unwrap_err();
        assert!(err.contains("unknown stage \"commit\""), "{err}");
    }

    #[test]
    fn badly_typed_fault_settings_are_rejected() {
        for text in [
            "fail = \"finish\"",
            "fail = [1]",
            "fail_rate = \"often\"",
            "fail_rate = 2.0",
            "latency_ms = -1",
            "latency_ms = 1.5",
            "fail_rollback = \"yes\"",
        ] {
            assert!(
                faults_from_settings(&table(text)).is_err(),
                "{text} accepted"
            );
        }
    }
}
