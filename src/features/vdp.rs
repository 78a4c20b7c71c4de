//! The `vdp` driver: 802.1Qbg VSI associations through this host's lldpad,
//! as libvirt makes them, so the adjacent bridge applies each VM NIC's VSI
//! type (its port profile) wherever the VM runs. Owns the stage-to-request
//! mapping and the VSIs this host associated; the wire format is
//! [`super::lldpad`]'s.
//!
//! | stage      | request per NIC with a `vsi`    |
//! |------------|---------------------------------|
//! | `prepare`  | PREASSOCIATE                    |
//! | `finish`   | ASSOCIATE                       |
//! | `rollback` | DISASSOCIATE                    |
//! | `release`  | DISASSOCIATE                    |
//! | `verify`   | ask lldpad: every VSI associated |
//!
//! ```toml
//! [features.vdp]
//! uplinks = { prod = "eth1" }   # network → interface facing the bridge
//! timeout_ms = 20000            # wait for lldpad and the bridge
//! lldpad_socket = "/com/intel/lldpad"   # lldpad's abstract socket name
//! ```
//!
//! lldpad's socket is per network namespace: the agent must run in the
//! namespace where lldpad runs. DISASSOCIATE of a VSI lldpad does not hold
//! succeeds, so rollback and release can be re-run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::faults::{FaultInjector, faults_from_settings};
use super::links::check_name;
use super::lldpad::{
    self, ClifError, DEFAULT_SOCKET, Lldpad, Mode, VsiRequest, code_meaning, status_meaning,
};
use super::settings::{check_known_keys, optional_str, optional_u64};
use super::{Faults, Feature, HeldState, NicPort, StageContext};
use crate::protocol::{Stage, StageOutcome};

/// The driver kind, as `driver = "vdp"` names it.
pub const DRIVER: &str = "vdp";

/// Settings of `[features.NAME]` this driver owns, beside `driver` and the fault keys.
const SETTINGS: [&str; 3] = ["uplinks", "timeout_ms", "lldpad_socket"];

/// Longer than lldpad 1.1 keeps trying to reach a bridge that does not
/// answer (its ECP retries end after about 16 s with reason 767): the
/// operator then reads lldpad's verdict, not the driver's impatience.
pub const DEFAULT_TIMEOUT_MS: u64 = 20_000;

/// How long a failed stage waits for lldpad to let go of the request it
/// still has in flight before it takes the request back.
const WITHDRAW_WITHIN: Duration = Duration::from_secs(20);

/// lldpad's status for a request it cannot take while one for the same
/// VSI is in flight.
const IN_PROGRESS: u8 = 15;

/// How far a VSI got on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VsiState {
    Preassociated,
    Associated,
}

/// A VSI this host holds for a VM: what DISASSOCIATE needs when the stage
/// no longer knows the VM's NICs (recovery).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    state: VsiState,
    nic: Nic,
}

/// One NIC with a VSI, checked and placed on its uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Nic {
    uplink: String,
    request: VsiRequest,
}

/// One `[features.NAME]` with `driver = "vdp"`.
#[derive(Debug)]
pub struct Vdp {
    name: String,
    host: String,
    /// Network → interface facing the 802.1Qbg bridge.
    uplinks: BTreeMap<String, String>,
    timeout: Duration,
    socket: String,
    faults: FaultInjector,
    /// (vm, VSI instance) → what this host holds.
    held: Mutex<BTreeMap<(String, String), Held>>,
    /// One request at a time: lldpad refuses a second request for a VSI
    /// while one is in flight.
    busy: tokio::sync::Mutex<()>,
}

impl Vdp {
    /// Build the driver from its `[features.NAME]` table on `host`.
    pub fn from_settings(name: &str, host: &str, settings: &toml::Table) -> Result<Vdp, String> {
        check_known_keys(settings, &SETTINGS)?;
        let uplinks = match settings.get("uplinks") {
            None => {
                return Err(
                    "uplinks is missing: set uplinks = { NETWORK = \"IFNAME\" } for each network \
                     whose NICs have a VSI"
                        .into(),
                );
            }
            Some(toml::Value::Table(table)) => table
                .iter()
                .map(|(network, ifname)| match ifname {
                    toml::Value::String(ifname) => check_name(ifname)
                        .map(|()| (network.clone(), ifname.clone()))
                        .map_err(|e| format!("uplinks.{network}: {e}")),
                    other => Err(format!(
                        "uplinks.{network} = {other}: expected an interface name"
                    )),
                })
                .collect::<Result<BTreeMap<String, String>, String>>()?,
            Some(other) => {
                return Err(format!(
                    "uplinks = {other}: expected a table, e.g. uplinks = {{ prod = \"eth1\" }}"
                ));
            }
        };
        if uplinks.is_empty() {
            return Err("uplinks = {}: name the uplink of at least one network".into());
        }
        let timeout_ms = optional_u64(settings, "timeout_ms")?.unwrap_or(DEFAULT_TIMEOUT_MS);
        if timeout_ms == 0 {
            return Err("timeout_ms = 0: must be at least 1".into());
        }
        let socket = optional_str(settings, "lldpad_socket")?.unwrap_or(DEFAULT_SOCKET);
        // An abstract name: at most 107 bytes (sun_path less the leading NUL).
        if socket.is_empty() || socket.len() > 107 || socket.contains('\0') {
            return Err(format!(
                "lldpad_socket = {socket:?}: an abstract socket name of 1 to 107 bytes"
            ));
        }
        let faults = FaultInjector::new(faults_from_settings(settings)?)?;
        Ok(Vdp {
            name: name.to_string(),
            host: host.to_string(),
            uplinks,
            timeout: Duration::from_millis(timeout_ms),
            socket: socket.to_string(),
            faults,
            held: Mutex::new(BTreeMap::new()),
            busy: tokio::sync::Mutex::new(()),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Held>> {
        // Every update is a single insert or remove.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VM's NICs with a VSI, checked, each on its uplink. A NIC without
    /// a VSI is not this driver's.
    fn nics(&self, vm: &str, nics: &[NicPort], mode: Mode) -> Result<Vec<Nic>, String> {
        nics.iter()
            .filter_map(|nic| nic.vsi.as_ref().map(|vsi| (nic, vsi)))
            .map(|(nic, vsi)| {
                let what = format!("{vm}'s NIC {} ({})", nic.index, nic.mac);
                let uplink = self.uplinks.get(&nic.network).ok_or_else(|| {
                    format!(
                        "network {} has no uplink in [features.{}] uplinks on {}",
                        nic.network, self.name, self.host
                    )
                })?;
                let instance =
                    lldpad::check_uuid(&vsi.instance).map_err(|e| format!("{what}: {e}"))?;
                let mac = lldpad::check_mac(&nic.mac).map_err(|e| format!("{what}: {e}"))?;
                if vsi.type_id > 0x00ff_ffff {
                    return Err(format!(
                        "{what}: VSI type id {} is above 16777215",
                        vsi.type_id
                    ));
                }
                let vlan = nic.vlan.unwrap_or(0);
                if vlan > 4094 {
                    return Err(format!("{what}: VLAN {vlan} is above 4094"));
                }
                Ok(Nic {
                    uplink: uplink.clone(),
                    request: VsiRequest {
                        mode,
                        manager_id: vsi.manager_id,
                        type_id: vsi.type_id,
                        type_version: vsi.type_version,
                        instance,
                        mac,
                        vlan,
                    },
                })
            })
            .collect()
    }

    /// "ASSOCIATE of web-01's 52:54:00:12:34:56 (VSI …) on eth1".
    fn describe(vm: &str, nic: &Nic) -> String {
        format!(
            "{} of {vm}'s {} (VSI {}) on {}",
            nic.request.mode.request(),
            nic.request.mac,
            nic.request.instance,
            nic.uplink
        )
    }

    fn explain(&self, what: &str, error: ClifError) -> String {
        let host = &self.host;
        match error {
            ClifError::Unreachable(e) => format!(
                "cannot reach lldpad on {host}: {e} on @{} (is lldpad running?)",
                self.socket
            ),
            ClifError::Refused(status) => format!(
                "lldpad on {host}: {what} refused by lldpad: status {status} ({})",
                status_meaning(status)
            ),
            ClifError::Rejected { asked, vsi } => match vsi.code.filter(|c| *c != 0) {
                Some(code) => format!(
                    "lldpad on {host}: {what} rejected: reason {code} ({}){}",
                    code_meaning(code),
                    if vsi.mode == asked.clif() {
                        String::new()
                    } else {
                        format!(", VSI now {}", vsi.mode)
                    }
                ),
                None => format!(
                    "lldpad on {host}: {what} rejected: the VSI came back {} with no reason code",
                    vsi.mode
                ),
            },
            ClifError::Timeout { accepted: false } => format!(
                "lldpad on {host}: {what}: no answer from lldpad within {} ms",
                self.timeout.as_millis()
            ),
            ClifError::Timeout { accepted: true } => format!(
                "lldpad on {host}: {what}: lldpad sent it, but no answer from the bridge \
                 within {} ms",
                self.timeout.as_millis()
            ),
            ClifError::Other(e) => format!("lldpad on {host}: {what}: {e}"),
        }
    }

    /// Send one NIC's request and wait for its outcome.
    async fn send(&self, vm: &str, nic: &Nic) -> Result<String, ClifError> {
        let what = Self::describe(vm, nic);
        self.send_raw(nic, &what).await
    }

    async fn send_raw(&self, nic: &Nic, what: &str) -> Result<String, ClifError> {
        let deadline = lldpad::deadline(self.timeout);
        let _one_at_a_time = self.busy.lock().await;
        let lldpad = Lldpad::connect(&self.socket, deadline).await?;
        if nic.request.mode == Mode::Disassociate {
            // Nothing held: nothing to do (lldpad refuses to deassociate
            // what it does not know).
            let held = lldpad
                .query(&nic.uplink, &nic.request.instance, deadline)
                .await?;
            if held.is_none() {
                return Ok(format!("{what}: nothing associated"));
            }
        }
        lldpad.exchange(&nic.uplink, &nic.request, deadline).await?;
        Ok(format!("{what}: ok"))
    }

    /// A stage that failed changes nothing: take back from lldpad what it
    /// asked for `nics` (a request lldpad still has in flight for the
    /// bridge included, once lldpad lets go of it).
    async fn withdraw(&self, vm: &str, nics: &[Nic]) -> Result<(), String> {
        let give_up = tokio::time::Instant::now() + WITHDRAW_WITHIN;
        for nic in nics {
            let mut nic = nic.clone();
            nic.request.mode = Mode::Disassociate;
            let what = Self::describe(vm, &nic);
            loop {
                match self.send_raw(&nic, &what).await {
                    Ok(_) => {
                        self.remember(vm, &nic, None);
                        break;
                    }
                    // Still busy with the request that failed here.
                    Err(ClifError::Refused(IN_PROGRESS))
                        if tokio::time::Instant::now() < give_up =>
                    {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => return Err(self.explain(&what, e)),
                }
            }
        }
        Ok(())
    }

    fn remember(&self, vm: &str, nic: &Nic, state: Option<VsiState>) {
        let key = (vm.to_string(), nic.request.instance.clone());
        match state {
            Some(state) => {
                self.held().insert(
                    key,
                    Held {
                        state,
                        nic: nic.clone(),
                    },
                );
            }
            None => {
                self.held().remove(&key);
            }
        }
    }

    /// [`Vdp::nics`], at least one: a VM without a NIC with a VSI has
    /// nothing for this driver to `mode`.
    fn vsi_nics(&self, vm: &str, nics: &[NicPort], mode: Mode) -> Result<Vec<Nic>, String> {
        let nics = self.nics(vm, nics, mode)?;
        if nics.is_empty() {
            return Err(format!(
                "{vm} has no NIC with a vsi: feature {} ({DRIVER}) has nothing to {}",
                self.name,
                mode.request()
            ));
        }
        Ok(nics)
    }

    /// PREASSOCIATE or ASSOCIATE every VSI of the VM, stopping at the first
    /// failure (rollback disassociates what was done).
    async fn associate(&self, vm: &str, nics: &[NicPort], mode: Mode) -> StageOutcome {
        let nics = self.vsi_nics(vm, nics, mode)?;
        let state = match mode {
            Mode::Associate => VsiState::Associated,
            _ => VsiState::Preassociated,
        };
        let mut details = Vec::new();
        for (i, nic) in nics.iter().enumerate() {
            match self.send(vm, nic).await {
                Ok(detail) => {
                    details.push(detail);
                    self.remember(vm, nic, Some(state));
                }
                // Rollback undoes only stages that succeeded: this one
                // takes back what it got before it fails (the NICs before
                // this one), and a request lldpad still has in flight.
                Err(e) => {
                    let in_flight = matches!(e, ClifError::Timeout { accepted: true });
                    let error = self.explain(&Self::describe(vm, nic), e);
                    let undo = &nics[..if in_flight { i + 1 } else { i }];
                    if undo.is_empty() {
                        return Err(error);
                    }
                    return Err(match self.withdraw(vm, undo).await {
                        Ok(()) => format!("{error}; withdrawn"),
                        Err(w) => format!("{error}; withdrawing it failed too: {w}"),
                    });
                }
            }
        }
        Ok(details.join("; "))
    }

    async fn check_lldpad(&self, ctx: &StageContext) -> StageOutcome {
        let vm = &ctx.vm;
        let nics = self.vsi_nics(vm, &ctx.nics, Mode::Preassociate)?;
        let deadline = lldpad::deadline(self.timeout);
        let _one_at_a_time = self.busy.lock().await;
        let lldpad = Lldpad::connect(&self.socket, deadline)
            .await
            .map_err(|e| self.explain("a query", e))?;
        let mut uplinks: Vec<&str> = Vec::new();
        for nic in &nics {
            let what = format!("a query of {vm}'s {} on {}", nic.request.mac, nic.uplink);
            lldpad
                .query(&nic.uplink, &nic.request.instance, deadline)
                .await
                .map_err(|e| self.explain(&what, e))?;
            if !uplinks.contains(&nic.uplink.as_str()) {
                uplinks.push(&nic.uplink);
            }
        }
        Ok(format!(
            "lldpad on {} answers for {vm}'s {} VSI(s) on {}",
            self.host,
            nics.len(),
            uplinks.join(", ")
        ))
    }

    /// DISASSOCIATE every VSI of the VM: those of its NICs, and those this
    /// host remembers for it. Every one is tried; the failures are reported
    /// together.
    async fn disassociate(&self, vm: &str, nics: &[NicPort]) -> StageOutcome {
        let mut todo: Vec<Nic> = self.nics(vm, nics, Mode::Disassociate)?;
        let known: BTreeSet<String> = todo.iter().map(|n| n.request.instance.clone()).collect();
        for ((held_vm, instance), held) in self.held().iter() {
            if held_vm == vm && !known.contains(instance) {
                let mut nic = held.nic.clone();
                nic.request.mode = Mode::Disassociate;
                todo.push(nic);
            }
        }
        if todo.is_empty() {
            return Ok(format!("{vm} holds no VSI on {}", self.host));
        }
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for nic in &todo {
            match self.send(vm, nic).await {
                Ok(detail) => {
                    self.remember(vm, nic, None);
                    done.push(detail);
                }
                Err(e) => failed.push(self.explain(&Self::describe(vm, nic), e)),
            }
        }
        if failed.is_empty() {
            Ok(done.join("; "))
        } else {
            Err(failed.join("; "))
        }
    }

    async fn inject(&self, stage: Stage, vm: &str) -> Result<(), String> {
        self.faults
            .inject(stage)
            .await
            .map_err(|fault| format!("{stage} of {vm} through lldpad on {}: {fault}", self.host))
    }
}

#[async_trait]
impl Feature for Vdp {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> &str {
        DRIVER
    }

    async fn prepare(&self, ctx: &StageContext) -> StageOutcome {
        self.inject(Stage::Prepare, &ctx.vm).await?;
        self.associate(&ctx.vm, &ctx.nics, Mode::Preassociate).await
    }

    async fn finish(&self, ctx: &StageContext) -> StageOutcome {
        self.inject(Stage::Finish, &ctx.vm).await?;
        self.associate(&ctx.vm, &ctx.nics, Mode::Associate).await
    }

    async fn rollback(&self, ctx: &StageContext) -> StageOutcome {
        self.inject(Stage::Rollback, &ctx.vm).await?;
        self.disassociate(&ctx.vm, &ctx.nics).await
    }

    async fn release(&self, ctx: &StageContext) -> StageOutcome {
        self.inject(Stage::Release, &ctx.vm).await?;
        self.disassociate(&ctx.vm, &ctx.nics).await
    }

    fn verifies(&self) -> bool {
        true
    }

    /// `tern check`: every NIC with a VSI has an uplink and sound values,
    /// and lldpad answers a query on each uplink (nothing is asked of the
    /// bridge).
    async fn check(&self, ctx: &StageContext) -> Option<StageOutcome> {
        Some(self.check_lldpad(ctx).await)
    }

    /// Ask lldpad for every VSI of the VM: each must be associated.
    async fn verify(&self, ctx: &StageContext) -> StageOutcome {
        let vm = &ctx.vm;
        let nics = self.nics(vm, &ctx.nics, Mode::Associate)?;
        if nics.is_empty() {
            return Err(format!("{vm} has no NIC with a vsi to verify"));
        }
        let mut details = Vec::new();
        for nic in &nics {
            let what = format!(
                "{vm}'s {} (VSI {}) on {}",
                nic.request.mac, nic.request.instance, nic.uplink
            );
            let deadline = lldpad::deadline(self.timeout);
            let _one_at_a_time = self.busy.lock().await;
            let lldpad = Lldpad::connect(&self.socket, deadline)
                .await
                .map_err(|e| self.explain(&what, e))?;
            match lldpad
                .query(&nic.uplink, &nic.request.instance, deadline)
                .await
                .map_err(|e| self.explain(&what, e))?
            {
                Some(vsi) if vsi.is_associated() => details.push(format!("{what}: associated")),
                Some(vsi) => {
                    let code = vsi
                        .code
                        .map(|c| format!(", reason {c} ({})", code_meaning(c)))
                        .unwrap_or_default();
                    return Err(format!(
                        "lldpad on {}: {what} is not associated: {}{code}",
                        self.host, vsi.mode
                    ));
                }
                None => {
                    return Err(format!(
                        "lldpad on {}: {what} is not associated: lldpad does not know it",
                        self.host
                    ));
                }
            }
        }
        Ok(details.join("; "))
    }

    fn held_state(&self) -> Vec<HeldState> {
        self.held()
            .iter()
            .map(|((vm, instance), held)| HeldState {
                feature: self.name.clone(),
                vm: vm.clone(),
                state: format!(
                    "{} VSI {instance} ({} on {})",
                    match held.state {
                        VsiState::Preassociated => "preassociated",
                        VsiState::Associated => "associated",
                    },
                    held.nic.request.mac,
                    held.nic.uplink
                ),
            })
            .collect()
    }

    /// A VM booting here: ASSOCIATE its VSIs.
    async fn adopt(&self, vm: &str, nics: &[NicPort]) -> Result<(), String> {
        self.associate(vm, nics, Mode::Associate).await.map(|_| ())
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
    use crate::protocol::machine::Vsi;

    fn table(text: &str) -> toml::Table {
        text.parse().expect("test table is valid TOML")
    }

    fn driver(extra: &str) -> Result<Vdp, String> {
        Vdp::from_settings("vdp", "hv-b", &table(extra))
    }

    fn nic(network: &str, vsi: bool) -> NicPort {
        NicPort {
            index: 0,
            mac: "52:54:00:12:34:56".into(),
            network: network.into(),
            vlan: None,
            vsi: vsi.then(|| Vsi {
                manager_id: 0,
                type_id: 5,
                type_version: 1,
                instance: "6b3a1c2e-0000-4000-8000-000000000001".into(),
            }),
            bridge: None,
            tap: None,
        }
    }

    fn ctx(stage: Stage, nics: Vec<NicPort>) -> StageContext {
        StageContext {
            host: "hv-b".into(),
            vm: "web-01".into(),
            feature: FeatureSpec {
                name: "vdp".into(),
                driver: DRIVER.into(),
                required: true,
            },
            stage,
            attempt_id: "a-1".into(),
            migration_id: "m-1".into(),
            nics,
            guest: None,
        }
    }

    #[test]
    fn settings_are_read_with_defaults() {
        let vdp = driver("uplinks = { prod = \"eth1\", dev = \"bond0.7\" }").unwrap();
        assert_eq!(vdp.uplinks.get("prod").map(String::as_str), Some("eth1"));
        assert_eq!(vdp.timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        assert_eq!(vdp.socket, DEFAULT_SOCKET);
        assert!(vdp.verifies());
        let vdp = driver(
            "uplinks = { prod = \"eth1\" }\ntimeout_ms = 500\nlldpad_socket = \"/test/lldpad\"",
        )
        .unwrap();
        assert_eq!(vdp.timeout, Duration::from_millis(500));
        assert_eq!(vdp.socket, "/test/lldpad");
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let cases = [
            ("", "uplinks is missing"),
            ("uplinks = {}", "uplinks = {}: name the uplink"),
            ("uplinks = \"eth1\"", "uplinks = \"eth1\": expected a table"),
            (
                "uplinks = { prod = 3 }",
                "uplinks.prod = 3: expected an interface name",
            ),
            (
                "uplinks = { prod = \"eth1; reboot\" }",
                "uplinks.prod: \"eth1; reboot\" is not an interface name",
            ),
            (
                "uplinks = { prod = \"a-name-far-too-long\" }",
                "is not an interface name",
            ),
            ("uplinks = { prod = \"\" }", "is not an interface name"),
            (
                "uplinks = { prod = \"eth1\" }\ntimeout_ms = 0",
                "timeout_ms = 0",
            ),
            (
                "uplinks = { prod = \"eth1\" }\ntimeout_ms = -1",
                "must not be negative",
            ),
            (
                "uplinks = { prod = \"eth1\" }\nlldpad_socket = \"\"",
                "lldpad_socket",
            ),
            (
                "uplinks = { prod = \"eth1\" }\nuplink = 1",
                "unknown setting \"uplink\"",
            ),
            (
                "uplinks = { prod = \"eth1\" }\nfail_rate = 2.0",
                "fail_rate",
            ),
        ];
        for (settings, expected) in cases {
            let err = driver(settings).unwrap_err();
            assert!(err.contains(expected), "{settings:?}: {err}");
        }
    }

    #[tokio::test]
    async fn a_vm_without_a_vsi_nic_fails_prepare_naming_it() {
        let vdp = driver("uplinks = { prod = \"eth1\" }").unwrap();
        for nics in [Vec::new(), vec![nic("prod", false)]] {
            let err = run_stage(&vdp, &ctx(Stage::Prepare, nics))
                .await
                .unwrap_err();
            assert_eq!(
                err,
                "web-01 has no NIC with a vsi: feature vdp (vdp) has nothing to PREASSOCIATE"
            );
        }
        // Nothing to undo is not an error.
        let done = run_stage(&vdp, &ctx(Stage::Rollback, vec![nic("prod", false)]))
            .await
            .unwrap();
        assert_eq!(done, "web-01 holds no VSI on hv-b");
    }

    /// `tern check` without lldpad: named, with the question to ask.
    #[tokio::test]
    async fn check_names_an_lldpad_that_does_not_answer_and_a_nic_without_a_vsi() {
        let vdp = driver(&format!(
            "uplinks = {{ prod = \"eth1\" }}\nlldpad_socket = \"tern-test-none-{}\"",
            std::process::id()
        ))
        .unwrap();
        let err = vdp
            .check(&ctx(Stage::Prepare, vec![nic("prod", true)]))
            .await
            .expect("the vdp driver checks")
            .unwrap_err();
        assert!(
            err.starts_with("cannot reach lldpad on hv-b: ")
                && err.ends_with("(is lldpad running?)"),
            "{err}"
        );
        let err = vdp
            .check(&ctx(Stage::Prepare, vec![nic("prod", false)]))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(
            err,
            "web-01 has no NIC with a vsi: feature vdp (vdp) has nothing to PREASSOCIATE"
        );
        let err = vdp
            .check(&ctx(Stage::Prepare, vec![nic("dev", true)]))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(
            err,
            "network dev has no uplink in [features.vdp] uplinks on hv-b"
        );
    }

    #[tokio::test]
    async fn a_network_without_an_uplink_is_named() {
        let vdp = driver("uplinks = { prod = \"eth1\" }").unwrap();
        let err = run_stage(&vdp, &ctx(Stage::Finish, vec![nic("dev", true)]))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            "network dev has no uplink in [features.vdp] uplinks on hv-b"
        );
    }

    #[tokio::test]
    async fn bad_vsi_values_are_refused_before_lldpad_is_asked() {
        let vdp = driver("uplinks = { prod = \"eth1\" }\nlldpad_socket = \"/tern/none\"").unwrap();
        let mut bad_uuid = nic("prod", true);
        if let Some(vsi) = bad_uuid.vsi.as_mut() {
            vsi.instance = "6b3a1c2e,mode=deassoc".into();
        }
        let err = run_stage(&vdp, &ctx(Stage::Prepare, vec![bad_uuid]))
            .await
            .unwrap_err();
        assert!(err.contains("is not a UUID"), "{err}");
        let mut big_type = nic("prod", true);
        if let Some(vsi) = big_type.vsi.as_mut() {
            vsi.type_id = 1 << 24;
        }
        let err = run_stage(&vdp, &ctx(Stage::Prepare, vec![big_type]))
            .await
            .unwrap_err();
        assert!(err.contains("above 16777215"), "{err}");
    }

    #[tokio::test]
    async fn no_lldpad_is_said_plainly() {
        // An abstract name nobody listens on.
        let vdp = driver(
            "uplinks = { prod = \"eth1\" }\nlldpad_socket = \"/tern/test/no-lldpad\"\ntimeout_ms = 500",
        )
        .unwrap();
        let err = run_stage(&vdp, &ctx(Stage::Prepare, vec![nic("prod", true)]))
            .await
            .unwrap_err();
        assert!(
            err.starts_with("cannot reach lldpad on hv-b: ")
                && err.ends_with("on @/tern/test/no-lldpad (is lldpad running?)"),
            "{err}"
        );
        assert!(vdp.held_state().is_empty());
    }

    /// A stand-in lldpad on abstract socket `name`: it acknowledges the
    /// attach and every request, answers queries with nothing held, and
    /// answers a set request with `event(uuid)` (or never, for `None`).
    fn fake_lldpad(name: &str, event: Option<fn(&str) -> String>) {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok((n, from)) = socket.recv_from(&mut buffer) {
                let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
                let reply = if message.starts_with('A') {
                    "R00A".to_string()
                } else if message.contains(&format!("C301{:08x}", 0x15)) {
                    // A get: it holds no VSI.
                    "R00C3010000001504eth100000003".to_string()
                } else {
                    "R00C3020000011c04eth10200000003".to_string()
                };
                let _ = socket.send_to_addr(reply.as_bytes(), &from);
                if message.contains("C302")
                    && let Some(event) = event
                {
                    let uuid = "6b3a1c2e-0000-4000-8000-000000000001";
                    let _ = socket.send_to_addr(event(uuid).as_bytes(), &from);
                }
            }
        });
    }

    fn rejection(uuid: &str) -> String {
        // The bridge refused for lack of resources (VDP reason 2) and the
        // VSI stays disassociated.
        let vsi = format!(
            "04mode0007deassoc06mgrid20001006typeid0001509typeidver0001104uuid0024{uuid}05hints0001206filter00130-52:54:00:12:34:56"
        );
        format!("M000080c4E16{:04x}{vsi}", vsi.len())
    }

    /// The error of `stage` of web-01's VSI NIC through the lldpad on
    /// abstract socket `name`, waiting `timeout_ms`; and the driver after.
    async fn failing_stage(name: &str, timeout_ms: u64, stage: Stage) -> (String, Vdp) {
        let vdp = driver(&format!(
            "uplinks = {{ prod = \"eth1\" }}\nlldpad_socket = \"{name}\"\ntimeout_ms = {timeout_ms}"
        ))
        .unwrap();
        let err = run_stage(&vdp, &ctx(stage, vec![nic("prod", true)]))
            .await
            .unwrap_err();
        (err, vdp)
    }

    #[tokio::test]
    async fn a_bridge_rejection_carries_the_reason_code_and_its_meaning() {
        let name = format!("/tern/test/rejecting-{}", std::process::id());
        fake_lldpad(&name, Some(rejection));
        let (err, vdp) = failing_stage(&name, 2000, Stage::Finish).await;
        assert_eq!(
            err,
            "lldpad on hv-b: ASSOCIATE of web-01's 52:54:00:12:34:56 (VSI \
             6b3a1c2e-0000-4000-8000-000000000001) on eth1 rejected: reason 2 (insufficient \
             resources at the bridge), VSI now deassoc"
        );
        assert!(vdp.held_state().is_empty());
    }

    #[tokio::test]
    async fn a_bridge_that_never_answers_fails_the_stage_naming_the_timeout() {
        let name = format!("/tern/test/silent-bridge-{}", std::process::id());
        fake_lldpad(&name, None);
        let (err, _) = failing_stage(&name, 300, Stage::Prepare).await;
        // Taken back: lldpad (here) holds nothing of it afterwards.
        assert!(
            err.ends_with("lldpad sent it, but no answer from the bridge within 300 ms; withdrawn"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_lldpad_that_never_answers_fails_the_stage_naming_the_timeout() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("/tern/test/mute-lldpad-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let _mute = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        let (err, _) = failing_stage(&name, 300, Stage::Prepare).await;
        assert!(
            err.ends_with("no answer from lldpad within 300 ms"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn injected_faults_fail_before_lldpad_is_asked() {
        let vdp = driver("uplinks = { prod = \"eth1\" }\nfail = [\"finish\"]").unwrap();
        let err = run_stage(&vdp, &ctx(Stage::Finish, vec![nic("prod", true)]))
            .await
            .unwrap_err();
        assert!(
            err.starts_with("finish of web-01 through lldpad on hv-b: "),
            "{err}"
        );
    }
}
