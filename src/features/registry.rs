//! The features a host offers: one driver instance per `[features.NAME]` of
//! the agent config, looked up by name when a stage has to run.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::bridge::{self, BridgePorts};
use super::exec::{self, ExecHook};
use super::port_profile::{self, PortProfile};
use super::settings::{DRIVER_KEY, optional_str};
use super::vdp::{self, Vdp};
use super::{Faults, Feature, HeldState};

/// The drivers this build ships, sorted.
pub const KNOWN_DRIVERS: [&str; 4] = [
    bridge::DRIVER,
    exec::DRIVER,
    port_profile::DRIVER,
    vdp::DRIVER,
];

/// This host's features by name. Cloning shares the drivers (and so their
/// state and faults).
#[derive(Clone, Default)]
pub struct FeatureRegistry {
    features: Arc<BTreeMap<String, Arc<dyn Feature>>>,
}

impl std::fmt::Debug for FeatureRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let drivers: BTreeMap<&str, &str> = self
            .features
            .iter()
            .map(|(n, d)| (n.as_str(), d.driver()))
            .collect();
        f.debug_struct("FeatureRegistry")
            .field("features", &drivers)
            .finish()
    }
}

impl FeatureRegistry {
    /// Build every `[features.NAME]` of an agent config on `host`. The driver
    /// is the table's `driver` key, else NAME itself, so `[features.port-profile]`
    /// needs no `driver` line. Errors name the offending section.
    pub fn from_config(
        host: &str,
        features: &BTreeMap<String, toml::Table>,
    ) -> Result<FeatureRegistry, String> {
        let mut built: BTreeMap<String, Arc<dyn Feature>> = BTreeMap::new();
        for (name, settings) in features {
            let in_section = |e: String| format!("[features.{name}]: {e}");
            let driver = optional_str(settings, DRIVER_KEY)
                .map_err(in_section)?
                .unwrap_or(name.as_str());
            let feature: Arc<dyn Feature> = match driver {
                port_profile::DRIVER => {
                    Arc::new(PortProfile::from_settings(name, host, settings).map_err(in_section)?)
                }
                bridge::DRIVER => {
                    Arc::new(BridgePorts::from_settings(name, host, settings).map_err(in_section)?)
                }
                exec::DRIVER => {
                    Arc::new(ExecHook::from_settings(name, settings).map_err(in_section)?)
                }
                vdp::DRIVER => {
                    Arc::new(Vdp::from_settings(name, host, settings).map_err(in_section)?)
                }
                other => {
                    return Err(in_section(format!(
                        "unknown driver {other:?} (known: {})",
                        KNOWN_DRIVERS.join(", ")
                    )));
                }
            };
            built.insert(name.clone(), feature);
        }
        Ok(FeatureRegistry {
            features: Arc::new(built),
        })
    }

    /// A registry of ready-made drivers, e.g. test doubles. A later driver
    /// with the same name replaces an earlier one.
    pub fn from_features(features: impl IntoIterator<Item = Arc<dyn Feature>>) -> FeatureRegistry {
        let features = features
            .into_iter()
            .map(|f| (f.name().to_string(), f))
            .collect();
        FeatureRegistry {
            features: Arc::new(features),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Feature>> {
        self.features.get(name).cloned()
    }

    /// Feature names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.features.keys().cloned().collect()
    }

    pub fn knows(&self, name: &str) -> bool {
        self.features.contains_key(name)
    }

    /// State held on this host through every feature, ordered by feature name.
    pub fn held_state(&self) -> Vec<HeldState> {
        self.features
            .values()
            .flat_map(|f| f.held_state())
            .collect()
    }

    /// The faults in force, for features that support fault injection.
    pub fn faults(&self) -> Vec<(String, Faults)> {
        self.features
            .iter()
            .filter_map(|(name, f)| f.faults().map(|faults| (name.clone(), faults)))
            .collect()
    }

    /// Replace one feature's faults.
    pub fn set_faults(&self, name: &str, faults: Faults) -> Result<(), String> {
        match self.features.get(name) {
            Some(feature) => feature.set_faults(faults),
            None if self.features.is_empty() => {
                Err(format!("no feature {name:?} on this host (it has none)"))
            }
            None => Err(format!(
                "no feature {name:?} on this host (features: {})",
                self.names().join(", ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{StageContext, run_stage};
    use crate::protocol::{FeatureSpec, Stage};

    fn config(text: &str) -> BTreeMap<String, toml::Table> {
        let mut doc: toml::Table = text.parse().expect("test config is valid TOML");
        match doc.remove("features") {
            Some(toml::Value::Table(features)) => features
                .into_iter()
                .map(|(name, v)| match v {
                    toml::Value::Table(t) => (name, t),
                    other => panic!("[features.{name}] is {other}"),
                })
                .collect(),
            _ => BTreeMap::new(),
        }
    }

    fn ctx(feature: &str, stage: Stage) -> StageContext {
        StageContext {
            host: "hv-a".into(),
            vm: "web-01".into(),
            feature: FeatureSpec {
                name: feature.into(),
                driver: String::new(),
                required: true,
            },
            stage,
            attempt_id: "a".into(),
            migration_id: "m".into(),
            nics: Vec::new(),
            guest: None,
        }
    }

    const TWO_FEATURES: &str = r#"
        [features.port-profile]
        switch = "sim"
        fail = ["finish"]

        [features.audit-hook]
        driver = "exec"
        command = ["/bin/true"]
    "#;

    #[test]
    fn driver_defaults_to_the_feature_name() {
        let registry = FeatureRegistry::from_config("hv-a", &config(TWO_FEATURES)).unwrap();
        assert_eq!(registry.names(), ["audit-hook", "port-profile"]);
        assert_eq!(
            registry
                .get("port-profile")
                .map(|f| f.driver().to_string())
                .as_deref(),
            Some("port-profile")
        );
        assert_eq!(
            registry
                .get("audit-hook")
                .map(|f| f.driver().to_string())
                .as_deref(),
            Some("exec")
        );
        assert!(registry.knows("audit-hook"));
        assert!(!registry.knows("tap"));
        assert!(registry.get("tap").is_none());
    }

    #[test]
    fn unknown_driver_is_rejected_with_its_name() {
        let err = FeatureRegistry::from_config("hv-a", &config("[features.tap0]\n")).unwrap_err();
        assert_eq!(
            err,
            "[features.tap0]: unknown driver \"tap0\" (known: bridge, exec, port-profile, vdp)"
        );
        let err = FeatureRegistry::from_config("hv-a", &config("[features.net]\ndriver = \"vpd\""))
            .unwrap_err();
        assert_eq!(
            err,
            "[features.net]: unknown driver \"vpd\" (known: bridge, exec, port-profile, vdp)"
        );
        let err = FeatureRegistry::from_config("hv-a", &config("[features.net]\ndriver = 1"))
            .unwrap_err();
        assert_eq!(err, "[features.net]: driver = 1: expected a string");
    }

    #[test]
    fn driver_errors_name_the_section() {
        let err = FeatureRegistry::from_config(
            "hv-a",
            &config("[features.port-profile]\nswitch = \"sim\"\nvlan = 3"),
        )
        .unwrap_err();
        assert!(
            err.starts_with("[features.port-profile]: unknown setting \"vlan\""),
            "{err}"
        );
        let err = FeatureRegistry::from_config("hv-a", &config("[features.h]\ndriver = \"exec\""))
            .unwrap_err();
        assert!(err.starts_with("[features.h]: command is missing"), "{err}");
    }

    #[test]
    fn empty_config_gives_an_empty_registry() {
        let registry = FeatureRegistry::from_config("hv-a", &BTreeMap::new()).unwrap();
        assert!(registry.names().is_empty());
        assert!(registry.held_state().is_empty());
        let err = registry
            .set_faults("port-profile", Faults::default())
            .unwrap_err();
        assert!(err.contains("it has none"), "{err}");
    }

    #[tokio::test]
    async fn held_state_covers_every_feature_and_clones_share_it() {
        let registry = FeatureRegistry::from_config("hv-a", &config(TWO_FEATURES)).unwrap();
        let clone = registry.clone();
        clone
            .get("port-profile")
            .unwrap()
            .adopt("web-01", &[])
            .await
            .unwrap();
        clone
            .get("audit-hook")
            .unwrap()
            .adopt("web-01", &[])
            .await
            .unwrap();
        assert_eq!(
            registry.held_state(),
            [HeldState {
                feature: "port-profile".into(),
                vm: "web-01".into(),
                state: "associated".into()
            }]
        );
    }

    #[test]
    fn faults_lists_each_feature_with_its_faults() {
        let registry = FeatureRegistry::from_config("hv-a", &config(TWO_FEATURES)).unwrap();
        let faults = registry.faults();
        assert_eq!(
            faults,
            [
                ("audit-hook".to_string(), Faults::default()),
                (
                    "port-profile".to_string(),
                    Faults {
                        fail: vec![Stage::Finish],
                        ..Faults::default()
                    }
                ),
            ]
        );
    }

    #[tokio::test]
    async fn set_faults_changes_behaviour_at_run_time() {
        let registry = FeatureRegistry::from_config("hv-a", &config(TWO_FEATURES)).unwrap();
        let pp = registry.get("port-profile").unwrap();
        run_stage(pp.as_ref(), &ctx("port-profile", Stage::Prepare))
            .await
            .unwrap();
        assert!(
            run_stage(pp.as_ref(), &ctx("port-profile", Stage::Finish))
                .await
                .is_err()
        );
        registry
            .set_faults("port-profile", Faults::default())
            .unwrap();
        assert!(
            run_stage(pp.as_ref(), &ctx("port-profile", Stage::Finish))
                .await
                .is_ok()
        );
    }

    #[test]
    fn set_faults_on_unknown_feature_lists_the_known_ones() {
        let registry = FeatureRegistry::from_config("hv-a", &config(TWO_FEATURES)).unwrap();
        let err = registry.set_faults("tap", Faults::default()).unwrap_err();
        assert_eq!(
            err,
            "no feature \"tap\" on this host (features: audit-hook, port-profile)"
        );
    }

    #[test]
    fn set_faults_passes_on_the_driver_refusal() {
        let registry = FeatureRegistry::from_config("hv-a", &config(TWO_FEATURES)).unwrap();
        let err = registry
            .set_faults(
                "audit-hook",
                Faults {
                    fail_rate: -1.0,
                    ..Faults::default()
                },
            )
            .unwrap_err();
        assert!(err.contains("fail_rate"), "{err}");
    }

    #[test]
    fn registry_is_send_and_sync() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<FeatureRegistry>();
    }

    #[test]
    fn from_features_indexes_ready_made_drivers_by_name() {
        let pp: Arc<dyn Feature> = Arc::new(
            PortProfile::from_settings("uplink", "hv-a", &"switch = \"sim\"".parse().unwrap())
                .unwrap(),
        );
        let registry = FeatureRegistry::from_features([pp]);
        assert_eq!(registry.names(), ["uplink"]);
    }
}
