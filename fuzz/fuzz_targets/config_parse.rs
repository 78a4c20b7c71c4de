//! Arbitrary bytes as an agent config and an inventory: as text, and as
//! edits to a valid config. See `../checks.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::config_parse(data));
