//! The `bridge` driver: a guest's NICs as taps on this host's Linux bridges,
//! over rtnetlink ([`super::links`]; no `ip` is run).
//!
//! | stage      | what it does, for each NIC of the VM                           |
//! |------------|----------------------------------------------------------------|
//! | `prepare`  | the tap exists, is a port of its network's bridge, in the NIC's |
//! |            | VLAN, and closed (down): the incoming guest is isolated         |
//! | `finish`   | open the port, and have QEMU announce the guest (gratuitous    |
//! |            | RARP) so that switches learn its MAC on the new port           |
//! | `rollback` | remove the destination's taps                                  |
//! | `release`  | remove the source's old taps                                   |
//! | `verify`   | the tap is up, on the right bridge and VLAN, and the bridge    |
//! |            | learned the guest's MAC on it: the announcement left the port  |
//!
//! Which bridge a network is on this host is `[hypervisor.networks]`; the
//! tap's name is the hypervisor's (QEMU opens it by that name). Every stage
//! is idempotent, and every failure names the NIC, the link and the host.

use std::time::Duration;

use async_trait::async_trait;

use super::links::{LinkError, Links};
use super::settings::{check_known_keys, optional_u64};
use super::{Feature, NicPort, StageContext};
use crate::protocol::StageOutcome;

/// The driver kind, as `driver = "bridge"` names it.
pub const DRIVER: &str = "bridge";

/// Settings of `[features.NAME]` this driver owns, beside `driver`.
const SETTINGS: [&str; 1] = ["verify_timeout_ms"];

/// How long verify waits for the bridge to learn a guest's MAC after it
/// resumed (QEMU's announcement rounds take about half a second).
pub const DEFAULT_VERIFY_TIMEOUT_MS: u64 = 3_000;

/// How often verify looks at the bridge's forwarding table meanwhile.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// One `[features.NAME]` with `driver = "bridge"`.
#[derive(Debug)]
pub struct BridgePorts {
    name: String,
    /// This host, for messages.
    host: String,
    verify_timeout: Duration,
}

impl BridgePorts {
    /// Build the driver from its `[features.NAME]` table.
    pub fn from_settings(
        name: &str,
        host: &str,
        settings: &toml::Table,
    ) -> Result<BridgePorts, String> {
        check_known_keys(settings, &SETTINGS)?;
        if settings
            .keys()
            .any(|k| super::faults::FAULT_KEYS.contains(&k.as_str()))
        {
            return Err(
                "the bridge driver drives real links: fault injection is for simulated drivers"
                    .into(),
            );
        }
        let verify_timeout_ms =
            optional_u64(settings, "verify_timeout_ms")?.unwrap_or(DEFAULT_VERIFY_TIMEOUT_MS);
        if verify_timeout_ms == 0 || verify_timeout_ms > 60_000 {
            return Err(format!(
                "verify_timeout_ms = {verify_timeout_ms}: between 1 and 60000"
            ));
        }
        Ok(BridgePorts {
            name: name.to_string(),
            host: host.to_string(),
            verify_timeout: Duration::from_millis(verify_timeout_ms),
        })
    }
}

/// A NIC this host can plug: its tap and its bridge.
struct Plug<'a> {
    nic: &'a NicPort,
    tap: &'a str,
    bridge: &'a str,
}

impl Plug<'_> {
    /// `web-01's NIC 52:54:00:12:34:56 (qemu.nics[0])`, for messages.
    fn what(&self, vm: &str) -> String {
        format!(
            "{vm}'s NIC {} (qemu.nics[{}])",
            self.nic.mac, self.nic.index
        )
    }
}

/// Each NIC with its tap and bridge here, or why one cannot be plugged.
fn plugs<'a>(ctx: &'a StageContext) -> Result<Vec<Plug<'a>>, String> {
    let host = &ctx.host;
    let vm = &ctx.vm;
    if ctx.nics.is_empty() {
        return Err(format!(
            "{vm} has no NICs (qemu.nics) for feature {} to plug into a bridge",
            ctx.feature.name
        ));
    }
    ctx.nics
        .iter()
        .map(|nic| {
            let bridge = nic.bridge.as_deref().ok_or_else(|| {
                format!(
                    "network {} of {vm}'s NIC {} is not a network of {host} ([hypervisor.networks])",
                    nic.network, nic.mac
                )
            })?;
            let tap = nic.tap.as_deref().ok_or_else(|| {
                format!("{host}'s hypervisor gives {vm} no taps: the bridge driver needs QEMU guests")
            })?;
            Ok(Plug { nic, tap, bridge })
        })
        .collect()
}

fn on_host(host: &str, e: LinkError) -> String {
    format!("{e} on {host}")
}

/// The MAC as six bytes (the spec was checked: it is one).
fn mac_bytes(mac: &str) -> Option<[u8; 6]> {
    let mut bytes = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut bytes {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(bytes)
}

/// The bridge `plug` goes on exists here.
async fn bridge_exists(links: &Links, plug: &Plug<'_>, ctx: &StageContext) -> Result<(), String> {
    let host = &ctx.host;
    match links.index(plug.bridge).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!(
            "bridge {} does not exist on {host} (network {} of {})",
            plug.bridge,
            plug.nic.network,
            plug.what(&ctx.vm)
        )),
        Err(e) => Err(on_host(host, e)),
    }
}

impl BridgePorts {
    /// `tern check`: every NIC's network is one of this host's, and its
    /// bridge exists (the VLAN filtering prepare needs is not checked).
    async fn check_plugs(&self, ctx: &StageContext) -> StageOutcome {
        let plugs = plugs(ctx)?;
        let links = Links::connect().map_err(|e| on_host(&ctx.host, e))?;
        let mut bridges = Vec::new();
        for plug in &plugs {
            bridge_exists(&links, plug, ctx).await?;
            if !bridges.contains(&plug.bridge) {
                bridges.push(plug.bridge);
            }
        }
        Ok(format!(
            "{} on {} for {}'s {} NIC(s)",
            bridges.join(", "),
            ctx.host,
            ctx.vm,
            plugs.len()
        ))
    }

    /// Prepare: each tap on its bridge, in its VLAN, closed.
    async fn plug(&self, ctx: &StageContext, open: bool) -> StageOutcome {
        let host = &ctx.host;
        let plugs = plugs(ctx)?;
        let links = Links::connect().map_err(|e| on_host(host, e))?;
        let mut done = Vec::new();
        for plug in &plugs {
            bridge_exists(&links, plug, ctx).await?;
            links
                .ensure_tap(plug.tap)
                .await
                .map_err(|e| on_host(host, e))?;
            links
                .attach(plug.tap, plug.bridge, plug.nic.vlan)
                .await
                .map_err(|e| format!("{}: {}", plug.what(&ctx.vm), on_host(host, e)))?;
            if open {
                links
                    .set_up(plug.tap, true)
                    .await
                    .map_err(|e| on_host(host, e))?;
            }
            let vlan = plug
                .nic
                .vlan
                .map(|v| format!(" VLAN {v}"))
                .unwrap_or_default();
            let state = if open { "open" } else { "closed" };
            done.push(format!("{} on {}{vlan}, {state}", plug.tap, plug.bridge));
        }
        Ok(done.join("; "))
    }

    /// Finish: open each port, then have the guest announced.
    async fn open(&self, ctx: &StageContext) -> StageOutcome {
        let host = &ctx.host;
        let plugs = plugs(ctx)?;
        let links = Links::connect().map_err(|e| on_host(host, e))?;
        for plug in &plugs {
            let port = links
                .port(plug.tap)
                .await
                .map_err(|e| on_host(host, e))?
                .ok_or_else(|| {
                    format!(
                        "tap {} of {} does not exist on {host}",
                        plug.tap,
                        plug.what(&ctx.vm)
                    )
                })?;
            if port.bridge.as_deref() != Some(plug.bridge) {
                return Err(format!(
                    "tap {} of {} is not a port of {} on {host} (prepare did not run?)",
                    plug.tap,
                    plug.what(&ctx.vm),
                    plug.bridge
                ));
            }
            links
                .set_up(plug.tap, true)
                .await
                .map_err(|e| on_host(host, e))?;
        }
        let taps: Vec<&str> = plugs.iter().map(|p| p.tap).collect();
        match &ctx.guest {
            Some(guest) => {
                guest.0.announce(&ctx.vm).await.map_err(|e| {
                    format!(
                        "ports {} open on {host}, but the guest could not be announced: {e}",
                        taps.join(", ")
                    )
                })?;
                Ok(format!("ports {} open; guest announced", taps.join(", ")))
            }
            None => Ok(format!("ports {} open", taps.join(", "))),
        }
    }

    /// Rollback and release: remove the VM's taps here. Without its NICs
    /// (pending work after a restart) every tap its name may have.
    async fn unplug(&self, ctx: &StageContext) -> StageOutcome {
        let host = &ctx.host;
        let mut taps: Vec<String> = ctx.nics.iter().filter_map(|n| n.tap.clone()).collect();
        if taps.is_empty()
            && let Some(guest) = &ctx.guest
        {
            taps = guest.0.taps(&ctx.vm);
        }
        let links = Links::connect().map_err(|e| on_host(host, e))?;
        let mut removed = Vec::new();
        for tap in &taps {
            if links.remove(tap).await.map_err(|e| on_host(host, e))? {
                removed.push(tap.as_str());
            }
        }
        Ok(if removed.is_empty() {
            format!("no tap of {} left on {host}", ctx.vm)
        } else {
            format!("removed {}", removed.join(", "))
        })
    }

    /// Verify: each port where it should be, open, and its MAC learned.
    async fn check(&self, ctx: &StageContext) -> StageOutcome {
        let host = &ctx.host;
        let plugs = plugs(ctx)?;
        let links = Links::connect().map_err(|e| on_host(host, e))?;
        let mut seen = Vec::new();
        for plug in &plugs {
            let what = plug.what(&ctx.vm);
            let port = links
                .port(plug.tap)
                .await
                .map_err(|e| on_host(host, e))?
                .ok_or_else(|| format!("tap {} of {what} is gone from {host}", plug.tap))?;
            match port.bridge.as_deref() {
                Some(b) if b == plug.bridge => {}
                Some(other) => {
                    return Err(format!(
                        "tap {} of {what} is a port of {other} on {host}, not of {}",
                        plug.tap, plug.bridge
                    ));
                }
                None => {
                    return Err(format!(
                        "tap {} of {what} is on no bridge on {host} (expected {})",
                        plug.tap, plug.bridge
                    ));
                }
            }
            if !port.up {
                return Err(format!("tap {} of {what} is down on {host}", plug.tap));
            }
            if let Some(vlan) = plug.nic.vlan
                && port.pvid != Some(vlan)
            {
                let actual = port
                    .pvid
                    .map(|v| format!("VLAN {v}"))
                    .unwrap_or_else(|| "no VLAN".into());
                return Err(format!(
                    "tap {} of {what} is in {actual} on {}, not VLAN {vlan}",
                    plug.tap, plug.bridge
                ));
            }
            let Some(mac) = mac_bytes(&plug.nic.mac) else {
                return Err(format!("{what}: {} is not a MAC address", plug.nic.mac));
            };
            let deadline = tokio::time::Instant::now() + self.verify_timeout;
            loop {
                if links
                    .learned(plug.tap, mac)
                    .await
                    .map_err(|e| on_host(host, e))?
                {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "{} has not learned {} on {} within {} ms on {host}: the guest's \
                         announcement did not leave its port",
                        plug.bridge,
                        plug.nic.mac,
                        plug.tap,
                        self.verify_timeout.as_millis()
                    ));
                }
                tokio::time::sleep(LOOK_EVERY).await;
            }
            seen.push(format!(
                "{} learned {} on {}",
                plug.bridge, plug.nic.mac, plug.tap
            ));
        }
        Ok(seen.join("; "))
    }
}

#[async_trait]
impl Feature for BridgePorts {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> &str {
        DRIVER
    }

    async fn prepare(&self, ctx: &StageContext) -> StageOutcome {
        self.plug(ctx, false).await
    }

    async fn check(&self, ctx: &StageContext) -> Option<StageOutcome> {
        Some(self.check_plugs(ctx).await)
    }

    async fn finish(&self, ctx: &StageContext) -> StageOutcome {
        self.open(ctx).await
    }

    async fn rollback(&self, ctx: &StageContext) -> StageOutcome {
        self.unplug(ctx).await
    }

    async fn release(&self, ctx: &StageContext) -> StageOutcome {
        self.unplug(ctx).await
    }

    fn verifies(&self) -> bool {
        true
    }

    async fn verify(&self, ctx: &StageContext) -> StageOutcome {
        self.check(ctx).await
    }

    /// A guest that boots here: its taps on their bridges, open.
    async fn adopt(&self, vm: &str, nics: &[NicPort]) -> Result<(), String> {
        if nics.is_empty() {
            return Ok(());
        }
        let ctx = StageContext {
            host: self.host.clone(),
            vm: vm.to_string(),
            feature: crate::protocol::FeatureSpec {
                name: self.name.clone(),
                driver: DRIVER.into(),
                required: false,
            },
            stage: crate::protocol::Stage::Finish,
            attempt_id: String::new(),
            migration_id: String::new(),
            nics: nics.to_vec(),
            guest: None,
        };
        self.plug(&ctx, true).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn settings_are_checked() {
        let d = BridgePorts::from_settings("net", "hv-b", &table("driver = \"bridge\"")).unwrap();
        assert_eq!(
            d.verify_timeout,
            Duration::from_millis(DEFAULT_VERIFY_TIMEOUT_MS)
        );
        let e = BridgePorts::from_settings("net", "hv-b", &table("bridge = \"br0\"")).unwrap_err();
        assert!(e.starts_with("unknown setting \"bridge\""), "{e}");
        let e =
            BridgePorts::from_settings("net", "hv-b", &table("verify_timeout_ms = 0")).unwrap_err();
        assert_eq!(e, "verify_timeout_ms = 0: between 1 and 60000");
        let e =
            BridgePorts::from_settings("net", "hv-b", &table("fail = [\"prepare\"]")).unwrap_err();
        assert!(
            e.contains("fault injection is for simulated drivers"),
            "{e}"
        );
    }

    #[test]
    fn macs_are_read_as_six_bytes() {
        assert_eq!(
            mac_bytes("52:54:00:12:34:5f"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x5f])
        );
        assert_eq!(mac_bytes("52:54:00:12:34"), None);
        assert_eq!(mac_bytes("52:54:00:12:34:56:78"), None);
        assert_eq!(mac_bytes("52:54:00:12:34:zz"), None);
    }

    // ---- the stages on real links, in a network namespace of the test's own

    use crate::features::links::testing::{bridge, in_netns};
    use crate::features::{GuestNet, GuestNetwork};
    use crate::protocol::{FeatureSpec, Stage};
    use std::sync::Arc;

    /// A guest network that knows the VM's taps by name and announces nothing.
    struct Taps(Vec<String>);

    #[async_trait]
    impl GuestNetwork for Taps {
        async fn announce(&self, _vm: &str) -> Result<(), String> {
            Ok(())
        }
        fn taps(&self, _vm: &str) -> Vec<String> {
            self.0.clone()
        }
    }

    fn nic(bridge: Option<&str>, vlan: Option<u16>) -> NicPort {
        NicPort {
            index: 0,
            mac: "52:54:00:12:34:56".into(),
            network: "lan".into(),
            vlan,
            vsi: None,
            bridge: bridge.map(str::to_string),
            tap: Some("tn-web01n0".into()),
        }
    }

    fn ctx(stage: Stage, nics: Vec<NicPort>) -> StageContext {
        StageContext {
            host: "hv-b".into(),
            vm: "web-01".into(),
            feature: FeatureSpec {
                name: "net".into(),
                driver: DRIVER.into(),
                required: true,
            },
            stage,
            attempt_id: "a-1".into(),
            migration_id: "m-1".into(),
            nics,
            guest: Some(GuestNet(Arc::new(Taps(vec!["tn-web01n0".into()])))),
        }
    }

    fn driver() -> BridgePorts {
        BridgePorts::from_settings("net", "hv-b", &table("verify_timeout_ms = 200")).unwrap()
    }

    #[test]
    fn a_missing_bridge_or_network_fails_prepare_by_name_and_makes_no_tap() {
        in_netns(|| async {
            let d = driver();
            let e = d
                .prepare(&ctx(Stage::Prepare, vec![nic(Some("br-vm0"), None)]))
                .await
                .unwrap_err();
            assert_eq!(
                e,
                "bridge br-vm0 does not exist on hv-b (network lan of web-01's NIC \
                 52:54:00:12:34:56 (qemu.nics[0]))"
            );
            let e = d
                .prepare(&ctx(Stage::Prepare, vec![nic(None, None)]))
                .await
                .unwrap_err();
            assert_eq!(
                e,
                "network lan of web-01's NIC 52:54:00:12:34:56 is not a network of hv-b \
                 ([hypervisor.networks])"
            );
            let e = d
                .prepare(&ctx(Stage::Prepare, Vec::new()))
                .await
                .unwrap_err();
            assert_eq!(
                e,
                "web-01 has no NICs (qemu.nics) for feature net to plug into a bridge"
            );
            let links = Links::connect().unwrap();
            assert_eq!(
                links.index("tn-web01n0").await.unwrap(),
                None,
                "no tap made"
            );
        });
    }

    #[test]
    fn prepare_closes_finish_opens_verify_checks_and_rollback_removes_each_twice() {
        in_netns(|| async {
            let links = Links::connect().unwrap();
            bridge(&links, "br-vm0").await;
            let d = driver();
            let nics = vec![nic(Some("br-vm0"), None)];
            for _ in 0..2 {
                let done = d.prepare(&ctx(Stage::Prepare, nics.clone())).await.unwrap();
                assert_eq!(done, "tn-web01n0 on br-vm0, closed");
            }
            let port = links.port("tn-web01n0").await.unwrap().unwrap();
            assert_eq!((port.bridge.as_deref(), port.up), (Some("br-vm0"), false));
            for _ in 0..2 {
                let done = d.finish(&ctx(Stage::Finish, nics.clone())).await.unwrap();
                assert_eq!(done, "ports tn-web01n0 open; guest announced");
            }
            assert!(links.port("tn-web01n0").await.unwrap().unwrap().up);
            // No guest sends on the tap here: nothing is learned on it.
            let e = d
                .verify(&ctx(Stage::Verify, nics.clone()))
                .await
                .unwrap_err();
            assert_eq!(
                e,
                "br-vm0 has not learned 52:54:00:12:34:56 on tn-web01n0 within 200 ms on hv-b: \
                 the guest's announcement did not leave its port"
            );
            // A port closed behind Tern's back is named.
            links.set_up("tn-web01n0", false).await.unwrap();
            let e = d
                .verify(&ctx(Stage::Verify, nics.clone()))
                .await
                .unwrap_err();
            assert_eq!(
                e,
                "tap tn-web01n0 of web-01's NIC 52:54:00:12:34:56 (qemu.nics[0]) is down on hv-b"
            );
            // Pending work after a restart knows no NICs: the VM's taps by name.
            let done = d.rollback(&ctx(Stage::Rollback, Vec::new())).await.unwrap();
            assert_eq!(done, "removed tn-web01n0");
            let done = d.rollback(&ctx(Stage::Rollback, Vec::new())).await.unwrap();
            assert_eq!(done, "no tap of web-01 left on hv-b");
            assert_eq!(links.index("tn-web01n0").await.unwrap(), None);
        });
    }

    #[test]
    fn a_vlan_on_a_bridge_that_cannot_filter_is_refused_and_leaves_the_tap_off_it() {
        in_netns(|| async {
            let links = Links::connect().unwrap();
            if bridge(&links, "br-vm0").await {
                // This kernel filters VLANs: the port takes its PVID.
                let d = driver();
                d.prepare(&ctx(Stage::Prepare, vec![nic(Some("br-vm0"), Some(100))]))
                    .await
                    .unwrap();
                let port = links.port("tn-web01n0").await.unwrap().unwrap();
                assert_eq!(port.pvid, Some(100));
                return;
            }
            let e = driver()
                .prepare(&ctx(Stage::Prepare, vec![nic(Some("br-vm0"), Some(100))]))
                .await
                .unwrap_err();
            assert!(
                e.starts_with(
                    "web-01's NIC 52:54:00:12:34:56 (qemu.nics[0]): cannot put tn-web01n0 in \
                     VLAN 100 on br-vm0: br-vm0 does not filter VLANs"
                ),
                "{e}"
            );
            let port = links.port("tn-web01n0").await.unwrap().unwrap();
            assert_eq!(port.bridge, None, "left off the bridge");
        });
    }
}
