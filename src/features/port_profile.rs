//! The `port-profile` driver: VDP (IEEE 802.1Qbg) associations between a VM's
//! virtual port and this host's top-of-rack switch, so the switch applies the
//! VM's port profile (VLAN, QoS, ACLs) wherever the VM runs. Owns the
//! simulated switch ([`SimSwitch`]) the demo and tests talk to.
//!
//! | stage      | VDP request                      |
//! |------------|----------------------------------|
//! | `prepare`  | PREASSOCIATE on the destination  |
//! | `finish`   | ASSOCIATE on the destination     |
//! | `rollback` | DISASSOCIATE on the destination  |
//! | `release`  | DISASSOCIATE on the source       |
//! | `verify`   | the switch's association state   |
//!
//! A VM's port profile is named after the VM.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::faults::{FaultInjector, faults_from_settings};
use super::settings::{check_known_keys, optional_str};
use super::{Faults, Feature, HeldState, NicPort, StageContext};
use crate::protocol::{Stage, StageOutcome};

/// The driver kind, as `driver = "port-profile"` names it.
pub const DRIVER: &str = "port-profile";

/// Settings of `[features.NAME]` this driver owns, beside `driver` and the fault keys.
const SETTINGS: [&str; 2] = ["switch", "switch_name"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssociationState {
    /// Resources reserved on the switch, traffic not yet forwarded (after Prepare).
    Preassociated,
    /// The profile is active on the port (after Finish, or a VM booted here).
    Associated,
}

impl AssociationState {
    pub fn as_str(self) -> &'static str {
        match self {
            AssociationState::Preassociated => "preassociated",
            AssociationState::Associated => "associated",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Association {
    pub state: AssociationState,
    pub profile: String,
}

/// The association table of this host's switch port(s), keyed by VM name.
#[derive(Debug)]
pub struct SimSwitch {
    name: String,
    table: Mutex<BTreeMap<String, Association>>,
}

impl SimSwitch {
    pub fn new(name: impl Into<String>) -> SimSwitch {
        SimSwitch {
            name: name.into(),
            table: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Association>> {
        // Every update is a single insert or remove, so a panicking holder
        // cannot have left the table half-changed.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserve `profile` for `vm`. An existing association is kept as it is:
    /// downgrading a live association would cut the VM's traffic.
    pub fn preassociate(&self, vm: &str, profile: &str) -> StageOutcome {
        let mut table = self.table();
        let entry = table.entry(vm.to_string()).or_insert_with(|| Association {
            state: AssociationState::Preassociated,
            profile: profile.to_string(),
        });
        let result = match entry.state {
            AssociationState::Preassociated => "ok",
            AssociationState::Associated => "already associated",
        };
        Ok(format!(
            "PREASSOCIATE {vm} profile {} on switch {}: {result}",
            entry.profile, self.name
        ))
    }

    /// Activate the profile reserved for `vm`; the switch refuses a VM it has
    /// no PREASSOCIATE for, as a real one does.
    pub fn associate(&self, vm: &str) -> StageOutcome {
        let mut table = self.table();
        let Some(entry) = table.get_mut(vm) else {
            return Err(format!(
                "ASSOCIATE {vm} rejected by switch {}: no PREASSOCIATE for vm {vm}",
                self.name
            ));
        };
        let result = match entry.state {
            AssociationState::Preassociated => "ok",
            AssociationState::Associated => "already associated",
        };
        entry.state = AssociationState::Associated;
        Ok(format!(
            "ASSOCIATE {vm} profile {} on switch {}: {result}",
            entry.profile, self.name
        ))
    }

    /// Drop whatever `vm` holds; dropping nothing succeeds, so that rollback
    /// and release can be re-run after a crash.
    pub fn disassociate(&self, vm: &str) -> StageOutcome {
        match self.table().remove(vm) {
            Some(old) => Ok(format!(
                "DISASSOCIATE {vm} profile {} on switch {}: ok",
                old.profile, self.name
            )),
            None => Ok(format!(
                "DISASSOCIATE {vm} on switch {}: nothing associated",
                self.name
            )),
        }
    }

    /// Mark `vm` as associated without the two-step handshake: a VM that boots here.
    pub fn adopt(&self, vm: &str, profile: &str) {
        self.table().insert(
            vm.to_string(),
            Association {
                state: AssociationState::Associated,
                profile: profile.to_string(),
            },
        );
    }

    pub fn association(&self, vm: &str) -> Option<Association> {
        self.table().get(vm).cloned()
    }

    /// Every entry, ordered by VM name.
    pub fn associations(&self) -> Vec<(String, Association)> {
        self.table()
            .iter()
            .map(|(vm, a)| (vm.clone(), a.clone()))
            .collect()
    }
}

/// One `[features.NAME]` with `driver = "port-profile"`.
#[derive(Debug)]
pub struct PortProfile {
    name: String,
    switch: SimSwitch,
    faults: FaultInjector,
}

impl PortProfile {
    /// Build the driver from its `[features.NAME]` table on `host`.
    pub fn from_settings(
        name: &str,
        host: &str,
        settings: &toml::Table,
    ) -> Result<PortProfile, String> {
        check_known_keys(settings, &SETTINGS)?;
        match optional_str(settings, "switch")? {
            Some("sim") => {}
            Some(other) => {
                return Err(format!(
                    "switch = {other:?}: only the simulated switch (\"sim\") is available"
                ));
            }
            // No default: silently talking to a simulator instead of the rack's
            // switch is not something an operator should get by omission.
            None => {
                return Err(
                    "switch is missing: set switch = \"sim\" (the only switch available)".into(),
                );
            }
        }
        let switch_name = match optional_str(settings, "switch_name")? {
            Some(s) if s.trim().is_empty() => return Err("switch_name is empty".into()),
            Some(s) => s.to_string(),
            None => format!("tor-{host}"),
        };
        let faults = FaultInjector::new(faults_from_settings(settings)?)?;
        Ok(PortProfile {
            name: name.to_string(),
            switch: SimSwitch::new(switch_name),
            faults,
        })
    }

    /// The switch this host's VMs are associated on.
    pub fn switch(&self) -> &SimSwitch {
        &self.switch
    }

    /// Fail before the switch is touched, so a failed stage changes nothing.
    async fn inject(&self, stage: Stage, request: &str, vm: &str) -> Result<(), String> {
        self.faults.inject(stage).await.map_err(|fault| {
            format!(
                "{request} {vm} rejected by switch {}: {fault}",
                self.switch.name
            )
        })
    }
}

#[async_trait]
impl Feature for PortProfile {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> &str {
        DRIVER
    }

    async fn prepare(&self, ctx: &StageContext) -> StageOutcome {
        self.inject(Stage::Prepare, "PREASSOCIATE", &ctx.vm).await?;
        self.switch.preassociate(&ctx.vm, &ctx.vm)
    }

    async fn finish(&self, ctx: &StageContext) -> StageOutcome {
        self.inject(Stage::Finish, "ASSOCIATE", &ctx.vm).await?;
        self.switch.associate(&ctx.vm)
    }

    async fn rollback(&self, ctx: &StageContext) -> StageOutcome {
        self.inject(Stage::Rollback, "DISASSOCIATE", &ctx.vm)
            .await?;
        self.switch.disassociate(&ctx.vm)
    }

    async fn release(&self, ctx: &StageContext) -> StageOutcome {
        self.inject(Stage::Release, "DISASSOCIATE", &ctx.vm).await?;
        self.switch.disassociate(&ctx.vm)
    }

    fn verifies(&self) -> bool {
        true
    }

    /// The switch's word that the VM's profile is active on its port.
    async fn verify(&self, ctx: &StageContext) -> StageOutcome {
        let vm = &ctx.vm;
        let switch = &self.switch.name;
        self.faults
            .inject(Stage::Verify)
            .await
            .map_err(|fault| format!("switch {switch} reports {vm} not associated: {fault}"))?;
        match self.switch.association(vm) {
            Some(a) if a.state == AssociationState::Associated => Ok(format!(
                "switch {switch} reports {vm} associated, profile {}",
                a.profile
            )),
            Some(a) => Err(format!(
                "switch {switch} reports {vm} {}, not associated",
                a.state.as_str()
            )),
            None => Err(format!("switch {switch} holds no association for {vm}")),
        }
    }

    fn held_state(&self) -> Vec<HeldState> {
        self.switch
            .associations()
            .into_iter()
            .map(|(vm, a)| HeldState {
                feature: self.name.clone(),
                vm,
                state: a.state.as_str().to_string(),
            })
            .collect()
    }

    async fn adopt(&self, vm: &str, _nics: &[NicPort]) -> Result<(), String> {
        self.switch.adopt(vm, vm);
        Ok(())
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
    use super::*;
    use crate::features::run_stage;
    use crate::protocol::FeatureSpec;

    fn table(text: &str) -> toml::Table {
        text.parse().expect("test table is valid TOML")
    }

    fn driver(extra: &str) -> PortProfile {
        PortProfile::from_settings(
            "port-profile",
            "hv-b",
            &table(&format!("switch = \"sim\"\n{extra}")),
        )
        .expect("valid settings")
    }

    fn ctx(vm: &str, stage: Stage) -> StageContext {
        StageContext {
            host: "hv-b".into(),
            vm: vm.into(),
            feature: FeatureSpec {
                name: "port-profile".into(),
                driver: String::new(),
                required: true,
            },
            stage,
            attempt_id: "a-1".into(),
            migration_id: "m-1".into(),
            nics: Vec::new(),
            guest: None,
        }
    }

    async fn run(feature: &PortProfile, vm: &str, stage: Stage) -> StageOutcome {
        run_stage(feature, &ctx(vm, stage)).await
    }

    fn held(feature: &PortProfile) -> Vec<(String, String)> {
        feature
            .held_state()
            .into_iter()
            .map(|h| (h.vm, h.state))
            .collect()
    }

    #[tokio::test]
    async fn prepare_then_finish_associates_the_vm() {
        let pp = driver("");
        let detail = run(&pp, "web-01", Stage::Prepare).await.unwrap();
        assert_eq!(
            detail,
            "PREASSOCIATE web-01 profile web-01 on switch tor-hv-b: ok"
        );
        assert_eq!(
            held(&pp),
            [("web-01".to_string(), "preassociated".to_string())]
        );

        let detail = run(&pp, "web-01", Stage::Finish).await.unwrap();
        assert_eq!(
            detail,
            "ASSOCIATE web-01 profile web-01 on switch tor-hv-b: ok"
        );
        assert_eq!(
            pp.held_state(),
            [HeldState {
                feature: "port-profile".into(),
                vm: "web-01".into(),
                state: "associated".into()
            }]
        );
    }

    #[tokio::test]
    async fn stages_are_idempotent() {
        let pp = driver("");
        run(&pp, "web-01", Stage::Prepare).await.unwrap();
        run(&pp, "web-01", Stage::Prepare).await.unwrap();
        run(&pp, "web-01", Stage::Finish).await.unwrap();
        let again = run(&pp, "web-01", Stage::Finish).await.unwrap();
        assert!(again.ends_with("already associated"), "{again}");
        // A repeated prepare must not downgrade a live association.
        run(&pp, "web-01", Stage::Prepare).await.unwrap();
        assert_eq!(
            held(&pp),
            [("web-01".to_string(), "associated".to_string())]
        );
    }

    #[tokio::test]
    async fn associate_without_preassociate_is_refused() {
        let pp = driver("");
        let err = run(&pp, "web-01", Stage::Finish).await.unwrap_err();
        assert_eq!(
            err,
            "ASSOCIATE web-01 rejected by switch tor-hv-b: no PREASSOCIATE for vm web-01"
        );
        assert!(pp.held_state().is_empty());
    }

    #[tokio::test]
    async fn failed_associate_leaves_switch_table_unchanged() {
        let pp = driver("fail = [\"finish\"]");
        run(&pp, "web-01", Stage::Prepare).await.unwrap();
        let err = run(&pp, "web-01", Stage::Finish).await.unwrap_err();
        assert_eq!(
            err,
            "ASSOCIATE web-01 rejected by switch tor-hv-b: injected fault (fail = [finish])"
        );
        assert_eq!(
            held(&pp),
            [("web-01".to_string(), "preassociated".to_string())]
        );

        run(&pp, "web-01", Stage::Rollback).await.unwrap();
        assert!(
            pp.held_state().is_empty(),
            "no association may be left after rollback"
        );
    }

    #[tokio::test]
    async fn failed_preassociate_holds_nothing() {
        let pp = driver("fail = [\"prepare\"]");
        assert!(run(&pp, "web-01", Stage::Prepare).await.is_err());
        assert!(pp.held_state().is_empty());
    }

    #[tokio::test]
    async fn rollback_of_absent_association_is_ok() {
        let pp = driver("");
        let detail = run(&pp, "web-01", Stage::Rollback).await.unwrap();
        assert_eq!(
            detail,
            "DISASSOCIATE web-01 on switch tor-hv-b: nothing associated"
        );
        let detail = run(&pp, "web-01", Stage::Release).await.unwrap();
        assert!(detail.ends_with("nothing associated"), "{detail}");
    }

    #[tokio::test]
    async fn release_disassociates_the_source_port() {
        let pp = driver("switch_name = \"tor-rack-7\"");
        pp.adopt("db-01", &[]).await.unwrap();
        pp.adopt("web-01", &[]).await.unwrap();
        let detail = run(&pp, "web-01", Stage::Release).await.unwrap();
        assert_eq!(
            detail,
            "DISASSOCIATE web-01 profile web-01 on switch tor-rack-7: ok"
        );
        assert_eq!(held(&pp), [("db-01".to_string(), "associated".to_string())]);
    }

    #[tokio::test]
    async fn fail_rollback_keeps_the_association_for_a_later_retry() {
        let pp = driver("fail_rollback = true");
        pp.adopt("web-01", &[]).await.unwrap();
        let err = run(&pp, "web-01", Stage::Rollback).await.unwrap_err();
        assert_eq!(
            err,
            "DISASSOCIATE web-01 rejected by switch tor-hv-b: injected fault (fail_rollback = true)"
        );
        assert!(run(&pp, "web-01", Stage::Release).await.is_err());
        assert_eq!(
            held(&pp),
            [("web-01".to_string(), "associated".to_string())]
        );

        pp.set_faults(Faults::default()).unwrap();
        run(&pp, "web-01", Stage::Rollback).await.unwrap();
        assert!(pp.held_state().is_empty());
    }

    #[tokio::test]
    async fn set_faults_changes_behaviour_at_run_time() {
        let pp = driver("");
        run(&pp, "web-01", Stage::Prepare).await.unwrap();
        pp.set_faults(Faults {
            fail: vec![Stage::Finish],
            ..Faults::default()
        })
        .unwrap();
        assert_eq!(pp.faults().map(|f| f.fail), Some(vec![Stage::Finish]));
        assert!(run(&pp, "web-01", Stage::Finish).await.is_err());
        pp.set_faults(Faults::default()).unwrap();
        assert!(run(&pp, "web-01", Stage::Finish).await.is_ok());
    }

    #[tokio::test]
    async fn fail_rate_one_always_fails_prepare() {
        let pp = driver("fail_rate = 1.0");
        for _ in 0..50 {
            let err = run(&pp, "web-01", Stage::Prepare).await.unwrap_err();
            assert!(err.ends_with("injected fault (fail_rate = 1)"), "{err}");
        }
        assert!(pp.held_state().is_empty());
    }

    #[test]
    fn settings_name_the_switch_after_the_host_by_default() {
        assert_eq!(driver("").switch().name(), "tor-hv-b");
        assert_eq!(driver("driver = \"port-profile\"").driver(), DRIVER);
    }

    #[test]
    fn only_the_simulated_switch_is_accepted() {
        let err =
            PortProfile::from_settings("pp", "hv-b", &table("switch = \"lldpad\"")).unwrap_err();
        assert_eq!(
            err,
            "switch = \"lldpad\": only the simulated switch (\"sim\") is available"
        );
        let err = PortProfile::from_settings("pp", "hv-b", &table("")).unwrap_err();
        assert!(err.contains("switch is missing"), "{err}");
    }

    #[test]
    fn unknown_setting_is_rejected() {
        let err = PortProfile::from_settings("pp", "hv-b", &table("switch = \"sim\"\nvlan = 12"))
            .unwrap_err();
        assert!(err.starts_with("unknown setting \"vlan\""), "{err}");
    }

    #[test]
    fn bad_fault_settings_are_rejected() {
        for extra in [
            "fail_rate = 1.5",
            "fail = [\"commit\"]",
            "switch_name = \"\"",
            "switch_name = 7",
        ] {
            let settings = table(&format!("switch = \"sim\"\n{extra}"));
            assert!(
                PortProfile::from_settings("pp", "hv-b", &settings).is_err(),
                "{extra} accepted"
            );
        }
    }

    #[test]
    fn set_faults_refuses_an_invalid_fail_rate() {
        let pp = driver("");
        assert!(
            pp.set_faults(Faults {
                fail_rate: 2.0,
                ..Faults::default()
            })
            .is_err()
        );
        assert_eq!(pp.faults(), Some(Faults::default()));
    }
}
