//! Reading a driver's `[features.NAME]` table. Drivers parse their own keys;
//! this owns the checks every driver shares, so that a typo in any driver's
//! settings is reported the same way instead of being silently ignored.

/// The key the registry reads to pick a driver; every driver accepts and ignores it.
pub const DRIVER_KEY: &str = "driver";

/// Reject any key that is neither in `driver_keys`, a fault key nor `driver`,
/// naming the key and what is accepted.
pub fn check_known_keys(table: &toml::Table, driver_keys: &[&str]) -> Result<(), String> {
    let mut known: Vec<&str> = driver_keys
        .iter()
        .chain(super::faults::FAULT_KEYS.iter())
        .copied()
        .chain([DRIVER_KEY])
        .collect();
    known.sort_unstable();
    known.dedup();
    match table.keys().find(|key| !known.contains(&key.as_str())) {
        Some(key) => Err(format!(
            "unknown setting {key:?} (known: {})",
            known.join(", ")
        )),
        None => Ok(()),
    }
}

/// An optional string setting.
pub fn optional_str<'a>(table: &'a toml::Table, key: &str) -> Result<Option<&'a str>, String> {
    match table.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("{key} = {other}: expected a string")),
    }
}

/// An optional non-negative integer setting.
pub fn optional_u64(table: &toml::Table, key: &str) -> Result<Option<u64>, String> {
    match table.get(key) {
        None => Ok(None),
        Some(toml::Value::Integer(i)) => u64::try_from(*i)
            .map(Some)
            .map_err(|_| format!("{key} = {i}: must not be negative")),
        Some(other) => Err(format!("{key} = {other}: expected a whole number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().expect("test table is valid TOML")
    }

    #[test]
    fn unknown_key_is_named_with_the_known_ones() {
        let err = check_known_keys(&table("swtich = \"sim\""), &["switch"]).unwrap_err();
        assert!(err.contains("\"swtich\""), "{err}");
        assert!(
            err.contains("known: driver, fail, fail_rate, fail_rollback, latency_ms, switch"),
            "{err}"
        );
    }

    #[test]
    fn driver_and_fault_keys_are_always_accepted() {
        let t = table(
            "driver = \"x\"\nfail = []\nfail_rate = 0.0\nlatency_ms = 1\nfail_rollback = false",
        );
        assert_eq!(check_known_keys(&t, &[]), Ok(()));
    }

    #[test]
    fn negative_number_is_rejected() {
        let err = optional_u64(&table("timeout_ms = -5"), "timeout_ms").unwrap_err();
        assert!(err.contains("must not be negative"), "{err}");
    }

    #[test]
    fn wrong_type_is_rejected_with_the_value() {
        let err = optional_str(&table("switch = 3"), "switch").unwrap_err();
        assert_eq!(err, "switch = 3: expected a string");
        let err = optional_u64(&table("timeout_ms = \"10s\""), "timeout_ms").unwrap_err();
        assert_eq!(err, "timeout_ms = \"10s\": expected a whole number");
    }
}
