//! What a host accepts from outside, in one place: the name rule, the id
//! rule, and the size of every string, list and number that comes in
//! (config files, operators' requests, peers' cookies). A check names the
//! field and shows the value escaped and shortened, so a 4 MiB string or a
//! terminal escape in a request comes back as a short, printable error.
//!
//! Like the rest of `protocol`, pure functions: no IO.

/// The longest name (host, VM, feature, driver).
pub const MAX_NAME_LEN: usize = 64;
/// The longest free text a peer or an operator sends (an error, a stage's
/// detail, an abort's reason). Our own texts are clipped to it ([`clip`])
/// before they leave the host.
pub const MAX_TEXT_LEN: usize = 4096;
/// The longest address (C2's incoming address, an inventory address).
pub const MAX_ADDRESS_LEN: usize = 256;
/// The most features one VM may have.
pub const MAX_FEATURES: usize = 64;
/// The largest `qemu` part of a VM spec, encoded (kernel, append, args).
pub const MAX_QEMU_BYTES: usize = 16 * 1024;
/// The most attempt ids one heartbeat may carry (a host sources at most
/// `max_outgoing` <= 256 attempts at once).
pub const MAX_HEARTBEAT_IDS: usize = 1024;
/// The most repairs a migration record keeps (the newest): repairing a VM
/// again and again must not grow its record without end.
pub const MAX_REPAIRS: usize = 32;
/// The most hosts an evacuation may exclude.
pub const MAX_EXCLUDED_HOSTS: usize = 1024;
/// The largest guest or host: 16 TiB and 4,096 vCPUs (capacity is summed
/// over guests: an absurd size would overflow).
pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;
pub const MAX_VCPUS: u32 = 4096;

/// The largest gRPC message an agent accepts (a request to its Console or
/// Peer service, or a peer's reply). The largest legitimate one is an Abort
/// carrying a C4 with every feature's stage results at their caps:
/// 64 features x 2 stages x 4 KiB = 512 KiB, far below.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// The largest gRPC message an agent sends and a console or the CLI accepts.
/// Replies that could grow with a host's history are bounded below it by
/// construction: a page of a list or a Watch snapshot stops at
/// [`MAX_PAGE_BYTES`].
pub const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;
/// Where an agent stops filling a page of a list, or the closed migrations
/// of a Watch snapshot: half of the 4 MiB a gRPC client accepts by default,
/// leaving room for the open migrations, the VMs and the host a snapshot
/// always carries, so clients other than ours need no larger limit.
pub const MAX_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// A value from outside that breaks a rule: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {problem}")]
pub struct BoundsError {
    pub field: String,
    pub problem: String,
}

fn refuse(field: &str, problem: String) -> BoundsError {
    BoundsError {
        field: field.to_string(),
        problem,
    }
}

/// A value as an error message shows it: escaped (`{:?}`: quotes, control
/// characters as `\u{1b}`), and only its start when it is long.
pub fn shown(value: &str) -> String {
    const SHOWN: usize = 64;
    if value.len() <= SHOWN {
        return format!("{value:?}");
    }
    let cut = floor_char_boundary(value, SHOWN);
    format!("{:?}... ({} bytes)", &value[..cut], value.len())
}

fn floor_char_boundary(s: &str, mut at: usize) -> usize {
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The name rule, for hosts, VMs, features and drivers everywhere (config,
/// inventory, requests, cookies): `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`. Names
/// end up in file names, QEMU arguments, hook environments and terminals.
pub fn check_name(field: &str, value: &str) -> Result<(), BoundsError> {
    let rule = "must be 1 to 64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit";
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if value.len() > MAX_NAME_LEN || !first_ok || !rest_ok {
        return Err(refuse(field, format!("{} {rule}", shown(value))));
    }
    Ok(())
}

/// The kinds of id a host makes. Migration and evacuation ids are a prefix
/// and a fixed number of lowercase hex digits (`m-0123456789ab`,
/// `e-01234567`); an attempt id is its migration's id and its number
/// (`m-0123456789ab.2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Migration,
    Attempt,
    Evacuation,
}

impl IdKind {
    /// The prefix and hex digit count of the ids a host makes of this kind
    /// (an attempt id is made from its migration's).
    pub fn format(self) -> (&'static str, usize) {
        match self {
            IdKind::Migration | IdKind::Attempt => ("m", 12),
            IdKind::Evacuation => ("e", 8),
        }
    }

    fn example(self) -> &'static str {
        match self {
            IdKind::Migration => "a migration id (m- and 12 hex digits, e.g. m-0123456789ab)",
            IdKind::Attempt => {
                "an attempt id (a migration id, a dot and the attempt number, e.g. m-0123456789ab.1)"
            }
            IdKind::Evacuation => "an evacuation id (e- and 8 hex digits, e.g. e-01234567)",
        }
    }
}

/// The id rule: `value` is an id of `kind` as a host makes them.
pub fn check_id(field: &str, value: &str, kind: IdKind) -> Result<(), BoundsError> {
    let hex_id = |s: &str, kind: IdKind| {
        let (prefix, digits) = kind.format();
        s.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|hex| {
                hex.len() == digits && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            })
    };
    let ok = match kind {
        IdKind::Migration | IdKind::Evacuation => hex_id(value, kind),
        IdKind::Attempt => value.split_once('.').is_some_and(|(migration, n)| {
            hex_id(migration, IdKind::Migration)
                && n.parse::<u32>().is_ok_and(|n| {
                    n >= 1 && n.to_string().len() == value.len() - migration.len() - 1
                })
        }),
    };
    if !ok {
        return Err(refuse(
            field,
            format!("{} is not {}", shown(value), kind.example()),
        ));
    }
    Ok(())
}

/// A free text of at most `max` bytes.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), BoundsError> {
    if value.len() > max {
        return Err(refuse(
            field,
            format!(
                "is {} bytes ({}); at most {max} are accepted",
                value.len(),
                shown(value)
            ),
        ));
    }
    Ok(())
}

/// A list of at most `max` entries.
pub fn check_count(field: &str, len: usize, max: usize) -> Result<(), BoundsError> {
    if len > max {
        return Err(refuse(
            field,
            format!("has {len} entries; at most {max} are accepted"),
        ));
    }
    Ok(())
}

/// A guest's size: at least 1 MiB and 1 vCPU, at most [`MAX_MEMORY_MIB`]
/// and [`MAX_VCPUS`]. `field` names the VM (e.g. `C1.vm`).
pub fn check_guest_size(field: &str, memory_mib: u64, vcpus: u32) -> Result<(), BoundsError> {
    if memory_mib == 0 {
        return Err(refuse(
            &format!("{field}.memory_mib"),
            "is 0: a guest needs at least 1 MiB".into(),
        ));
    }
    if vcpus == 0 {
        return Err(refuse(
            &format!("{field}.vcpus"),
            "is 0: a guest needs at least 1 vCPU".into(),
        ));
    }
    if memory_mib > MAX_MEMORY_MIB {
        return Err(refuse(
            &format!("{field}.memory_mib"),
            format!("is {memory_mib}: at most {MAX_MEMORY_MIB} MiB"),
        ));
    }
    if vcpus > MAX_VCPUS {
        return Err(refuse(
            &format!("{field}.vcpus"),
            format!("is {vcpus}: at most {MAX_VCPUS}"),
        ));
    }
    Ok(())
}

/// `text` cut to at most `max` bytes (at a character boundary, marked with
/// an ellipsis), for our own texts that travel to a peer, which checks them
/// against the same cap.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    const MORE: &str = "…";
    let cut = floor_char_boundary(text, max.saturating_sub(MORE.len()));
    format!("{}{MORE}", &text[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for good in ["a", "web-01", "hv-a", "A.b_c-9", "0", &"x".repeat(64)] {
            assert!(check_name("vm", good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "-web",
            ".hidden",
            "_x",
            "web 01",
            "web/01",
            "wéb",
            "web\u{1b}[31m",
            &"x".repeat(65),
        ] {
            assert!(check_name("vm", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_name_error_names_the_field_and_escapes_the_value() {
        let err = check_name("StartMigrationRequest.vm", "web\u{1b}[2J").unwrap_err();
        assert_eq!(err.field, "StartMigrationRequest.vm");
        let text = err.to_string();
        assert!(
            text.starts_with("StartMigrationRequest.vm \"web\\u{1b}[2J\" must be"),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'), "{text}");
    }

    #[test]
    fn a_huge_value_is_shown_by_its_start_and_its_size() {
        let huge = "a".repeat(4 << 20);
        let text = check_name("vm", &huge).unwrap_err().to_string();
        assert!(text.len() < 300, "{} bytes", text.len());
        assert!(text.contains("(4194304 bytes)"), "{text}");
        let text = check_text("reason", &huge, MAX_TEXT_LEN)
            .unwrap_err()
            .to_string();
        assert!(text.starts_with("reason is 4194304 bytes"), "{text}");
        assert!(text.len() < 300);
    }

    #[test]
    fn ids_follow_the_format_hosts_make_them_in() {
        assert!(check_id("id", "m-0123456789ab", IdKind::Migration).is_ok());
        assert!(check_id("id", "m-0123456789ab.1", IdKind::Attempt).is_ok());
        assert!(check_id("id", "m-0123456789ab.4294967295", IdKind::Attempt).is_ok());
        assert!(check_id("id", "e-01234567", IdKind::Evacuation).is_ok());
        for (bad, kind) in [
            ("", IdKind::Migration),
            ("m-0123456789a", IdKind::Migration),
            ("m-0123456789abc", IdKind::Migration),
            ("m-0123456789AB", IdKind::Migration),
            ("x-0123456789ab", IdKind::Migration),
            ("m-0123456789ab.1", IdKind::Migration),
            ("m-0123456789ab", IdKind::Attempt),
            ("m-0123456789ab.0", IdKind::Attempt),
            ("m-0123456789ab.01", IdKind::Attempt),
            ("m-0123456789ab.+1", IdKind::Attempt),
            ("m-0123456789ab.4294967296", IdKind::Attempt),
            ("m-0123456789ab.1.1", IdKind::Attempt),
            ("e-0123456", IdKind::Evacuation),
            ("m-01234567", IdKind::Evacuation),
        ] {
            let err = check_id("MigrationRef.id", bad, kind).unwrap_err();
            assert!(
                err.to_string().starts_with("MigrationRef.id "),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn zero_and_absurd_sizes_are_refused_by_field() {
        assert!(check_guest_size("vm", 1, 1).is_ok());
        let err = check_guest_size("C1.vm", 0, 2).unwrap_err();
        assert_eq!(err.field, "C1.vm.memory_mib");
        let err = check_guest_size("C1.vm", 256, 0).unwrap_err();
        assert_eq!(err.field, "C1.vm.vcpus");
        assert!(check_guest_size("vm", MAX_MEMORY_MIB + 1, 1).is_err());
        assert!(check_guest_size("vm", 1, MAX_VCPUS + 1).is_err());
    }

    #[test]
    fn clipping_keeps_whole_characters_and_fits_the_cap() {
        assert_eq!(clip("short", 10), "short");
        let long = "é".repeat(100);
        let clipped = clip(&long, 51);
        assert!(clipped.len() <= 51, "{}", clipped.len());
        assert!(clipped.ends_with('…'));
        assert!(check_text("detail", &clipped, 51).is_ok());
    }
}
