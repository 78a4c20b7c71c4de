//! The test guest for real QEMU migrations: `guest/tern-guest.S`, a multiboot
//! kernel that fills its RAM with non-zero data and keeps rewriting a working
//! set, with a status block at fixed physical addresses that a test reads
//! through QMP (`human-monitor-command` `xp /1gx ADDR`).
//!
//! ```text
//! qemu-system-x86_64 -m 256 -kernel ELF -append "ws=16" -display none -nodefaults
//! ```
//!
//! On its serial port (COM1) the guest prints a line at boot, one when ready,
//! then [`COUNT_LINE_PREFIX`] and the counter about ten times a second while
//! its vCPU runs, for tests whose QMP socket belongs to someone else.
//! Migrate it after it is ready: the initial fill is written once only.
//!
//! Only std, so a test or a benchmark can include it on its own with
//! `#[path = "common/guest.rs"] mod guest;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Pages the guest has rewritten since it became ready (u64). It moves only
/// while a vCPU runs: still after `stop`, and on the source after a migration.
pub const COUNTER_ADDR: u64 = 0x7000;
/// 0 while the guest fills its RAM, 1 once every page holds data (u64).
pub const READY_ADDR: u64 = 0x7008;
/// RAM the guest found, in MiB; equals `-m` while all RAM sits below 4 GiB (u64).
pub const RAM_MIB_ADDR: u64 = 0x7010;
/// Working set the guest rewrites, in MiB, after clamping to its RAM (u64).
pub const WORKING_SET_MIB_ADDR: u64 = 0x7018;
/// Working-set pass in progress: 1, 2, …; 0 until the guest is ready (u64).
pub const PASS_ADDR: u64 = 0x7020;

/// Serial lines `"tern-guest: count N"` carry the counter (decimal).
pub const COUNT_LINE_PREFIX: &str = "tern-guest: count ";

/// Assemble and link the test guest into `dir`, returning the ELF's path.
/// Errors name the tool and its stderr.
pub fn build(dir: &Path) -> Result<PathBuf, String> {
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest");
    let object = dir.join("tern-guest.o");
    let elf = dir.join("tern-guest.elf");
    run(Command::new("as")
        .arg("--32")
        .arg(sources.join("tern-guest.S"))
        .arg("-o")
        .arg(&object))?;
    run(Command::new("ld")
        .args(["-m", "elf_i386", "-T"])
        .arg(sources.join("tern-guest.ld"))
        .arg(&object)
        .arg("-o")
        .arg(&elf))?;
    Ok(elf)
}

fn run(command: &mut Command) -> Result<(), String> {
    let tool = command.get_program().to_string_lossy().into_owned();
    let output = command
        .output()
        .map_err(|e| format!("{tool}: cannot run it: {e} (binutils installed?)"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The `-append` text for a working set of `working_set_mib` MiB.
pub fn cmdline(working_set_mib: u64) -> String {
    format!("ws={working_set_mib}")
}

/// Parse the value out of an HMP `xp /1gx ADDR` reply
/// (`"0000000000007000: 0x000000000000002a"`).
pub fn parse_xp(reply: &str) -> Option<u64> {
    let line = reply.lines().find(|l| !l.trim().is_empty())?;
    let (address, value) = line.split_once(':')?;
    u64::from_str_radix(address.trim(), 16).ok()?;
    let hex = value.trim().strip_prefix("0x")?;
    u64::from_str_radix(hex, 16).ok()
}
