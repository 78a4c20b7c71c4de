//! The host links a bridge driver drives for a guest: its tap, and the tap's
//! port on a Linux bridge (the bridge, the VLAN, up or down). No `ip` is
//! run: the tap is made with the `TUNSETIFF` and `TUNSETPERSIST` ioctls
//! (the kernel creates no tap over rtnetlink: `EOPNOTSUPP`), everything else
//! goes over rtnetlink. Every operation is idempotent, and every failure
//! names the link and the host's answer ("bridge br-vm0 does not exist").
//!
//! The `bridge` driver's stages call these; the QEMU backend makes and
//! removes a guest's taps with [`make_tap`] and [`remove_tap`] (plain
//! ioctls, callable off any runtime).

use std::fmt;
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::{
    AfSpecBridge, BridgeVlanInfoFlags, LinkAttribute, LinkExtentMask, LinkFlags,
};
use rtnetlink::packet_route::neighbour::{NeighbourAttribute, NeighbourState};
use rtnetlink::{Handle, LinkBridgeVlan, LinkUnspec};

/// What went wrong with a link, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkError(pub String);

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LinkError {}

/// A tap's place on its bridge, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// The bridge it is a port of; `None`: it is on no bridge.
    pub bridge: Option<String>,
    /// Administratively up.
    pub up: bool,
    /// The VLAN untagged frames of the port belong to (its PVID).
    pub pvid: Option<u16>,
}

/// The longest interface name Linux takes (IFNAMSIZ less its NUL).
const MAX_NAME: usize = 15;

/// An rtnetlink connection to this host's (this network namespace's)
/// links. Its socket belongs to the namespace of the thread that connects.
pub struct Links {
    handle: Handle,
}

impl Links {
    /// Connect; needs a tokio runtime (the connection runs as a task).
    pub fn connect() -> Result<Links, LinkError> {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| LinkError(format!("cannot open a netlink socket: {e}")))?;
        tokio::spawn(connection);
        Ok(Links { handle })
    }

    /// The index of link `name`, if there is one.
    pub async fn index(&self, name: &str) -> Result<Option<u32>, LinkError> {
        Ok(self.link(name).await?.map(|l| l.header.index))
    }

    /// Link `name` as the kernel reports it, if there is one.
    async fn link(
        &self,
        name: &str,
    ) -> Result<Option<rtnetlink::packet_route::link::LinkMessage>, LinkError> {
        check_name(name)?;
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            // No such device: the kernel answers the by-name query with ENODEV.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(LinkError(format!("cannot look up link {name}: {e}"))),
        }
    }

    /// Make the persistent tap `name` (a guest's NIC), or find it made.
    pub async fn ensure_tap(&self, name: &str) -> Result<u32, LinkError> {
        if let Some(index) = self.index(name).await? {
            return Ok(index);
        }
        make_tap(name)?;
        self.index(name)
            .await?
            .ok_or_else(|| LinkError(format!("tap {name} vanished right after it was made")))
    }

    /// Make tap `name` a port of `bridge`, its untagged frames in `vlan`
    /// (with the bridge's VLAN filtering; `None`: the bridge's default),
    /// and leave it down: the port opens when the guest runs here.
    pub async fn attach(
        &self,
        name: &str,
        bridge: &str,
        vlan: Option<u16>,
    ) -> Result<(), LinkError> {
        if let Some(vlan) = vlan {
            check_vlan(vlan)?;
        }
        let port = self
            .index(name)
            .await?
            .ok_or_else(|| LinkError(format!("tap {name} does not exist")))?;
        let bridge_index = self
            .index(bridge)
            .await?
            .ok_or_else(|| LinkError(format!("bridge {bridge} does not exist")))?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(port)
                    .controller(bridge_index)
                    .down()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| LinkError(format!("cannot make {name} a port of {bridge}: {e}")))?;
        if let Some(vlan) = vlan {
            let message = LinkBridgeVlan::new(port)
                .vlan(
                    vlan,
                    BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged,
                )
                .build();
            if let Err(e) = self.handle.link().set(message).execute().await {
                // Not left half done: off the bridge again.
                let _ = self
                    .handle
                    .link()
                    .set(LinkUnspec::new_with_index(port).nocontroller().build())
                    .execute()
                    .await;
                let why = match &e {
                    rtnetlink::Error::NetlinkError(n) if n.raw_code() == -libc::EOPNOTSUPP => {
                        format!(
                            "{bridge} does not filter VLANs (vlan_filtering off, or a kernel \
                             without CONFIG_BRIDGE_VLAN_FILTERING)"
                        )
                    }
                    e => e.to_string(),
                };
                return Err(LinkError(format!(
                    "cannot put {name} in VLAN {vlan} on {bridge}: {why}"
                )));
            }
        }
        Ok(())
    }

    /// Open (`up`) or close the link.
    pub async fn set_up(&self, name: &str, up: bool) -> Result<(), LinkError> {
        let index = self
            .index(name)
            .await?
            .ok_or_else(|| LinkError(format!("link {name} does not exist")))?;
        let message = if up {
            LinkUnspec::new_with_index(index).up().build()
        } else {
            LinkUnspec::new_with_index(index).down().build()
        };
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|e| {
                let what = if up { "up" } else { "down" };
                LinkError(format!("cannot set {name} {what}: {e}"))
            })
    }

    /// Remove link `name`; `false` when there was none.
    pub async fn remove(&self, name: &str) -> Result<bool, LinkError> {
        let Some(index) = self.index(name).await? else {
            return Ok(false);
        };
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| LinkError(format!("cannot remove {name}: {e}")))?;
        Ok(true)
    }

    /// Where link `name` is: its bridge, whether it is up, its PVID.
    /// `None` when there is no such link.
    pub async fn port(&self, name: &str) -> Result<Option<Port>, LinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(None);
        };
        let up = link.header.flags.contains(LinkFlags::Up);
        let controller = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Controller(index) => Some(*index),
            _ => None,
        });
        let bridge = match controller {
            Some(index) => Some(self.name_of(index).await?),
            None => None,
        };
        let pvid = if bridge.is_some() {
            self.pvid(link.header.index).await?
        } else {
            None
        };
        Ok(Some(Port { bridge, up, pvid }))
    }

    /// Whether the bridge of port `name` has learned `mac` on it (the
    /// forwarding database's dynamic entry: frames from that MAC came in
    /// through the port).
    pub async fn learned(&self, name: &str, mac: [u8; 6]) -> Result<bool, LinkError> {
        let Some(index) = self.index(name).await? else {
            return Ok(false);
        };
        let mut dump = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        while let Some(entry) = dump
            .try_next()
            .await
            .map_err(|e| LinkError(format!("cannot read the bridges' forwarding tables: {e}")))?
        {
            if entry.header.ifindex != index || entry.header.state == NeighbourState::Permanent {
                continue;
            }
            let learned = entry.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::LinkLayerAddress(address) if address[..] == mac[..])
            });
            if learned {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn name_of(&self, index: u32) -> Result<String, LinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links
            .try_next()
            .await
            .map_err(|e| LinkError(format!("cannot read link {index}: {e}")))?
            .ok_or_else(|| LinkError(format!("no link with index {index}")))?;
        Ok(link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name.clone()),
                _ => None,
            })
            .unwrap_or_else(|| format!("#{index}")))
    }

    /// The port's PVID, from the bridge's VLAN table (the kernel filters
    /// no name in such a dump: every bridge port is read).
    async fn pvid(&self, index: u32) -> Result<Option<u16>, LinkError> {
        let mut dump = self
            .handle
            .link()
            .get()
            .set_filter_mask(AddressFamily::Bridge, vec![LinkExtentMask::Brvlan])
            .execute();
        while let Some(link) = dump
            .try_next()
            .await
            .map_err(|e| LinkError(format!("cannot read the bridge VLANs: {e}")))?
        {
            if link.header.index != index {
                continue;
            }
            for attribute in &link.attributes {
                if let LinkAttribute::AfSpecBridge(spec) = attribute {
                    for item in spec {
                        if let AfSpecBridge::VlanInfo(info) = item
                            && info.flags.contains(BridgeVlanInfoFlags::Pvid)
                        {
                            return Ok(Some(info.vid));
                        }
                    }
                }
            }
        }
        Ok(None)
    }
}

pub(crate) fn check_name(name: &str) -> Result<(), LinkError> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || name.contains(['/', ' ', '\0', ':'])
        || name == "."
        || name == ".."
    {
        return Err(LinkError(format!(
            "{name:?} is not an interface name (1 to {MAX_NAME} characters, no '/', ':' or spaces)"
        )));
    }
    Ok(())
}

fn check_vlan(vlan: u16) -> Result<(), LinkError> {
    if !(1..=4094).contains(&vlan) {
        return Err(LinkError(format!("VLAN {vlan} is not between 1 and 4094")));
    }
    Ok(())
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Make `name` a persistent tap: it outlives this file descriptor until it
/// is removed, and QEMU opens it by name (`-netdev tap,ifname=…`). One that
/// exists already is left as it is.
pub fn make_tap(name: &str) -> Result<(), LinkError> {
    check_name(name)?;
    if std::path::Path::new("/sys/class/net").join(name).exists() {
        return Ok(());
    }
    set_persist(name, true)
}

/// Remove the persistent tap `name`: it goes now, or when the last program
/// holding it (a QEMU) closes it. One that does not exist is not an error.
pub fn remove_tap(name: &str) -> Result<(), LinkError> {
    check_name(name)?;
    if !std::path::Path::new("/sys/class/net").join(name).exists() {
        return Ok(());
    }
    set_persist(name, false)
}

/// Attach to tap `name` (creating it if there is none) and set whether it
/// outlives this descriptor.
fn set_persist(name: &str, persist: bool) -> Result<(), LinkError> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| LinkError(format!("cannot open /dev/net/tun to make tap {name}: {e}")))?;
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    let fd = tun.as_raw_fd();
    let what = if persist { "make" } else { "remove" };
    // SAFETY: `request` is a live, properly laid out ifreq for the call.
    if unsafe { libc::ioctl(fd, TUNSETIFF, &mut request as *mut IfReq) } < 0 {
        let e = std::io::Error::last_os_error();
        let why = if e.raw_os_error() == Some(libc::EBUSY) {
            "a program (a QEMU) holds it".to_string()
        } else {
            e.to_string()
        };
        return Err(LinkError(format!("cannot {what} tap {name}: {why}")));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe { libc::ioctl(fd, TUNSETPERSIST, libc::c_ulong::from(persist)) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(LinkError(format!("cannot {what} tap {name}: {e}")));
    }
    Ok(())
}

/// For tests of what drives links (here and in the bridge driver).
#[cfg(test)]
pub(crate) mod testing {
    use super::Links;

    /// Run `test` in a network namespace of its own (a thread unshared from
    /// the host's), on a runtime of that thread: nothing touches the host's
    /// links. Needs root; without it the test is skipped, unless
    /// `TERN_REQUIRE_NETNS=1` (CI) makes that a failure.
    pub(crate) fn in_netns<F, Fut>(test: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let outcome = std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(test());
            Ok(())
        })
        .join()
        .expect("the test thread");
        if let Err(e) = outcome {
            assert!(
                std::env::var("TERN_REQUIRE_NETNS").as_deref() != Ok("1"),
                "a network namespace is needed (TERN_REQUIRE_NETNS=1): {e}"
            );
            eprintln!("skipped: no network namespace ({e})");
        }
    }

    /// A bridge, made over rtnetlink: VLAN-filtering where the kernel can
    /// (`true`), else plain. This machine's kernel has no
    /// CONFIG_BRIDGE_VLAN_FILTERING (nor 802.1Q).
    pub(crate) async fn bridge(links: &Links, name: &str) -> bool {
        let filtering = links
            .handle
            .link()
            .add(
                rtnetlink::LinkBridge::new(name)
                    .vlan_filtering(true)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .is_ok();
        if !filtering {
            links
                .handle
                .link()
                .add(rtnetlink::LinkBridge::new(name).up().build())
                .execute()
                .await
                .unwrap();
        }
        filtering
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{bridge, in_netns};
    use super::*;

    #[test]
    fn a_tap_is_made_put_on_its_bridge_and_vlan_opened_and_removed_each_step_idempotent() {
        in_netns(|| async {
            let links = Links::connect().unwrap();
            let filtering = bridge(&links, "br-vm0").await;
            assert_eq!(links.port("tap-web01").await.unwrap(), None);
            let index = links.ensure_tap("tap-web01").await.unwrap();
            assert_eq!(
                links.ensure_tap("tap-web01").await.unwrap(),
                index,
                "made once"
            );
            let alone = links.port("tap-web01").await.unwrap().unwrap();
            assert_eq!((alone.bridge, alone.pvid), (None, None));

            let vlan = if filtering {
                Some(42)
            } else {
                // Refused, named, and left off the bridge.
                let e = links
                    .attach("tap-web01", "br-vm0", Some(42))
                    .await
                    .unwrap_err();
                assert!(
                    e.to_string().starts_with(
                        "cannot put tap-web01 in VLAN 42 on br-vm0: br-vm0 does not filter VLANs"
                    ),
                    "{e}"
                );
                assert_eq!(links.port("tap-web01").await.unwrap().unwrap().bridge, None);
                None
            };
            links.attach("tap-web01", "br-vm0", vlan).await.unwrap();
            links.attach("tap-web01", "br-vm0", vlan).await.unwrap();
            let port = links.port("tap-web01").await.unwrap().unwrap();
            assert_eq!(port.bridge.as_deref(), Some("br-vm0"), "{port:?}");
            assert!(!port.up, "closed until the guest runs: {port:?}");
            match vlan {
                Some(v) => assert_eq!(port.pvid, Some(v), "{port:?}"),
                // A bridge without filtering keeps no VLAN table.
                None => assert_eq!(port.pvid, None, "{port:?}"),
            }

            links.set_up("tap-web01", true).await.unwrap();
            assert!(links.port("tap-web01").await.unwrap().unwrap().up);
            links.set_up("tap-web01", false).await.unwrap();
            assert!(!links.port("tap-web01").await.unwrap().unwrap().up);

            assert!(links.remove("tap-web01").await.unwrap());
            assert!(!links.remove("tap-web01").await.unwrap(), "nothing left");
            assert_eq!(links.port("tap-web01").await.unwrap(), None);
        });
    }

    #[test]
    fn a_missing_bridge_or_tap_and_bad_names_are_refused_by_name_and_change_nothing() {
        in_netns(|| async {
            let links = Links::connect().unwrap();
            links.ensure_tap("tap-db01").await.unwrap();
            let e = links
                .attach("tap-db01", "br-vm0", Some(10))
                .await
                .unwrap_err();
            assert_eq!(e.to_string(), "bridge br-vm0 does not exist");
            assert_eq!(
                links.port("tap-db01").await.unwrap().unwrap().bridge,
                None,
                "still on no bridge"
            );
            let e = links.attach("tap-none", "br-vm0", None).await.unwrap_err();
            assert_eq!(e.to_string(), "tap tap-none does not exist");
            bridge(&links, "br-vm0").await;
            let e = links
                .attach("tap-db01", "br-vm0", Some(4095))
                .await
                .unwrap_err();
            assert_eq!(e.to_string(), "VLAN 4095 is not between 1 and 4094");
            assert_eq!(links.port("tap-db01").await.unwrap().unwrap().bridge, None);
            for bad in ["", "a-name-far-too-long", "tap/1", "tap 1"] {
                let e = links.ensure_tap(bad).await.unwrap_err();
                assert!(e.to_string().contains("is not an interface name"), "{e}");
                assert_eq!(links.index(bad).await.unwrap_err(), e);
            }
            let e = links.set_up("tap-none", true).await.unwrap_err();
            assert_eq!(e.to_string(), "link tap-none does not exist");
        });
    }
}
