//! Arbitrary bytes as cookies C1–C4 (and a console record), through
//! everything an agent does with one it receives. See `../checks.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::cookie_decode(data));
