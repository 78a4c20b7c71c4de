//! The `vdp` driver against real lldpads: a station-role lldpad that the
//! driver talks to, and a bridge-role lldpad at the other end of a veth
//! that answers over ECP (tests/common/lldpad.rs). Skipped without root or
//! lldpad, unless TERN_REQUIRE_NETNS=1.

mod common;

use common::lldpad::{STATION_IF, VdpLink};
use tern::features::vdp::Vdp;
use tern::features::{Feature, NicPort, StageContext, run_stage};
use tern::protocol::machine::Vsi;
use tern::protocol::{FeatureSpec, Stage};

const UUID: &str = "6b3a1c2e-0000-4000-8000-0000000000a1";

fn driver(timeout_ms: u64) -> Vdp {
    let settings: toml::Table = format!(
        "driver = \"vdp\"\nuplinks = {{ prod = \"{STATION_IF}\" }}\ntimeout_ms = {timeout_ms}"
    )
    .parse()
    .unwrap();
    Vdp::from_settings("vdp", "hv-b", &settings).unwrap()
}

fn nic(instance: &str, vlan: Option<u16>) -> NicPort {
    NicPort {
        index: 0,
        mac: "52:54:00:12:34:56".into(),
        network: "prod".into(),
        vlan,
        vsi: Some(Vsi {
            manager_id: 0,
            type_id: 5,
            type_version: 1,
            instance: instance.into(),
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
            driver: "vdp".into(),
            required: true,
        },
        stage,
        attempt_id: "a-1".into(),
        migration_id: "m-1".into(),
        nics,
        guest: None,
    }
}

/// The bridge-role lldpad logged receiving VSI `uuid` in VDP mode `mode`
/// (1 PREASSOCIATE, 3 ASSOCIATE, 4 DISASSOCIATE).
fn bridge_saw(link: &VdpLink, uuid: &str, mode: u8) -> bool {
    link.log("bridge")
        .lines()
        .any(|l| l.contains(uuid) && l.contains(&format!("vsi_mode:{mode},")))
}

#[test]
fn preassociate_and_associate_are_accepted_by_the_bridge_verified_and_disassociated_twice() {
    let Some(link) = VdpLink::start() else { return };
    let (prepared, finished, verified, held, released, again, verify_after) =
        link.in_station(|| async {
            let vdp = driver(10_000);
            let nics = vec![nic(UUID, None)];
            let prepared = run_stage(&vdp, &ctx(Stage::Prepare, nics.clone())).await;
            let finished = run_stage(&vdp, &ctx(Stage::Finish, nics.clone())).await;
            let verified = run_stage(&vdp, &ctx(Stage::Verify, nics.clone())).await;
            let held = vdp.held_state();
            let released = run_stage(&vdp, &ctx(Stage::Release, nics.clone())).await;
            let again = run_stage(&vdp, &ctx(Stage::Release, nics.clone())).await;
            let verify_after = run_stage(&vdp, &ctx(Stage::Verify, nics)).await;
            (
                prepared,
                finished,
                verified,
                held,
                released,
                again,
                verify_after,
            )
        });
    let what = format!("of web-01's 52:54:00:12:34:56 (VSI {UUID}) on eth1");
    assert_eq!(prepared.unwrap(), format!("PREASSOCIATE {what}: ok"));
    assert_eq!(finished.unwrap(), format!("ASSOCIATE {what}: ok"));
    assert!(
        bridge_saw(&link, UUID, 1),
        "the bridge got the PREASSOCIATE"
    );
    assert!(bridge_saw(&link, UUID, 3), "the bridge got the ASSOCIATE");
    assert_eq!(
        verified.unwrap(),
        format!("web-01's 52:54:00:12:34:56 (VSI {UUID}) on eth1: associated")
    );
    assert_eq!(held.len(), 1);
    assert_eq!(
        held[0].state,
        format!("associated VSI {UUID} (52:54:00:12:34:56 on eth1)")
    );
    assert_eq!(released.unwrap(), format!("DISASSOCIATE {what}: ok"));
    assert!(
        bridge_saw(&link, UUID, 4),
        "the bridge got the DISASSOCIATE"
    );
    assert_eq!(
        again.unwrap(),
        format!("DISASSOCIATE {what}: nothing associated")
    );
    let err = verify_after.unwrap_err();
    assert!(
        err.ends_with("is not associated: lldpad does not know it"),
        "{err}"
    );
    // The station's lldpad agrees, as vdptool shows it.
    let shown = link.station_vdptool(&[
        "-i",
        STATION_IF,
        "-t",
        "-V",
        "assoc",
        "-c",
        &format!("uuid={UUID}"),
    ]);
    assert!(!shown.contains(UUID), "{shown}");
}

#[test]
fn adopt_associates_a_booting_vm_and_a_tagged_nic() {
    let Some(link) = VdpLink::start() else { return };
    let uuid = "6b3a1c2e-0000-4000-8000-0000000000a2";
    let (adopted, held) = link.in_station(move || async move {
        let vdp = driver(10_000);
        let adopted = vdp.adopt("web-01", &[nic(uuid, Some(42))]).await;
        (adopted, vdp.held_state())
    });
    adopted.unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    let shown = link.station_vdptool(&[
        "-i",
        STATION_IF,
        "-t",
        "-V",
        "assoc",
        "-c",
        &format!("uuid={uuid}"),
    ]);
    assert!(shown.contains("mode = assoc"), "{shown}");
    assert!(shown.contains("filter = 42-52:54:00:12:34:56"), "{shown}");
    assert!(bridge_saw(&link, uuid, 3));
}

#[test]
fn an_associate_nobody_acknowledges_fails_with_lldpads_reason() {
    let Some(mut link) = VdpLink::start() else {
        return;
    };
    link.stop_bridge();
    let uuid = "6b3a1c2e-0000-4000-8000-0000000000a3";
    let (finished, held) = link.in_station(move || async move {
        let vdp = driver(10_000);
        let finished = run_stage(&vdp, &ctx(Stage::Finish, vec![nic(uuid, None)])).await;
        (finished, vdp.held_state())
    });
    let err = finished.unwrap_err();
    // Either lldpad gives up on ECP (its ACK timeout, code 0x2ff) or the
    // driver's own wait ends first: both fail the stage, named.
    assert!(
        err.starts_with(&format!(
            "lldpad on hv-b: ASSOCIATE of web-01's 52:54:00:12:34:56 (VSI {uuid}) on eth1"
        )) && (err.contains(
            "rejected: reason 767 (no response from the bridge; no acknowledgement from the bridge)"
        ) || err.contains("no answer from the bridge within 10000 ms")),
        "{err}"
    );
    assert!(held.is_empty(), "{held:?}");
}

#[test]
fn a_request_lldpad_itself_refuses_names_its_status() {
    let Some(link) = VdpLink::start() else { return };
    let uuid = "6b3a1c2e-0000-4000-8000-0000000000a4";
    // lldpad takes VLAN ids 2 to 4094 only (vdp22.c check_vid).
    let prepared = link.in_station(move || async move {
        run_stage(
            &driver(10_000),
            &ctx(Stage::Prepare, vec![nic(uuid, Some(1))]),
        )
        .await
    });
    assert_eq!(
        prepared.unwrap_err(),
        format!(
            "lldpad on hv-b: PREASSOCIATE of web-01's 52:54:00:12:34:56 (VSI {uuid}) on eth1 \
             refused by lldpad: status 5 (invalid parameters)"
        )
    );
    assert!(!bridge_saw(&link, uuid, 1), "never sent to the bridge");
}
