//! The machine type and CPU model a guest runs as, and whether another
//! host's QEMU can receive it. A QEMU guest migrates only into the same
//! versioned machine type (`pc` is an alias QEMU resolves to its newest
//! `pc-i440fx-X.Y`, so two QEMU versions resolve it differently) and a CPU
//! model the destination's QEMU has. Tern starts every guest without
//! `-cpu`, so x86 QEMU gives it [`DEFAULT_CPU_MODEL`]. What a QEMU binary
//! offers is read from `-machine help` and `-cpu help`; the parsing and
//! the comparison are pure, so they are tested without a QEMU.

use crate::hypervisor::Platform;

/// The CPU model x86 QEMU gives a guest started without `-cpu`.
pub const DEFAULT_CPU_MODEL: &str = "qemu64";

/// One line of `-machine help`: a machine type, and what it is an alias of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineType {
    pub name: String,
    pub alias_of: Option<String>,
}

/// What one QEMU binary offers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Offered {
    pub machines: Vec<MachineType>,
    pub cpus: Vec<String>,
}

/// `-machine help`: "NAME   DESCRIPTION (alias of VERSIONED)" lines after
/// a header.
pub fn parse_machines(text: &str) -> Vec<MachineType> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("Supported machines"))
        .filter_map(|l| {
            let name = l.split_whitespace().next()?.to_string();
            let alias_of = l
                .rsplit_once("(alias of ")
                .and_then(|(_, rest)| rest.split(')').next())
                .map(str::to_string);
            Some(MachineType { name, alias_of })
        })
        .collect()
}

/// `-cpu help`: "x86 NAME   DESCRIPTION" lines up to the CPUID flags.
pub fn parse_cpus(text: &str) -> Vec<String> {
    text.lines()
        .take_while(|l| !l.starts_with("Recognized CPUID flags"))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next()) {
                (Some("x86"), Some(name)) => Some(name.to_string()),
                _ => None,
            }
        })
        .collect()
}

impl Offered {
    /// The platform a guest asking for `machine_type` and `cpu_model`
    /// gets from this QEMU: the machine type's versioned name.
    pub fn platform(&self, machine_type: &str, cpu_model: &str) -> Result<Platform, String> {
        let Some(machine) = self.machines.iter().find(|m| m.name == machine_type) else {
            return Err(format!(
                "its QEMU has no machine type {machine_type:?} (`-machine help` lists {} types)",
                self.machines.len()
            ));
        };
        if !self.cpus.iter().any(|c| c == cpu_model) {
            return Err(format!("its QEMU has no CPU model {cpu_model:?}"));
        }
        Ok(Platform {
            machine_type: machine
                .alias_of
                .clone()
                .unwrap_or_else(|| machine.name.clone()),
            cpu_model: cpu_model.to_string(),
        })
    }
}

/// Whether a guest running as `source` on `source_host` can be received
/// as `here` on `host`: the same versioned machine type and CPU model.
/// Ok: what both run; Err: why not, with the fix.
pub fn compare(
    vm: &str,
    source_host: &str,
    source: &Platform,
    host: &str,
    here: &Platform,
) -> Result<String, String> {
    if source.machine_type != here.machine_type {
        return Err(format!(
            "{vm} runs as machine type {} on {source_host}, and {host}'s QEMU would start it as {}: \
             a guest migrates only into its own machine type (give the VM `qemu.machine = \"{}\"` \
             if {host}'s QEMU has it, or run the same QEMU version on both)",
            source.machine_type, here.machine_type, source.machine_type
        ));
    }
    if source.cpu_model != here.cpu_model {
        return Err(format!(
            "{vm} runs with CPU model {} on {source_host}, and {host} would give it {}",
            source.cpu_model, here.cpu_model
        ));
    }
    Ok(format!(
        "machine type {} and CPU model {} on both",
        here.machine_type, here.cpu_model
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What QEMU 7.2 (Debian 12) answers, cut short.
    const MACHINES_7_2: &str = "Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
pc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
isapc                ISA-only PC
none                 empty machine
";
    const CPUS_7_2: &str = "Available CPUs:
x86 486                   (alias configured by machine type)
x86 Broadwell-IBRS        (alias of Broadwell-v3)
x86 qemu64                (alias configured by machine type)
x86 qemu64-v1             QEMU Virtual CPU version 2.5+

Recognized CPUID flags:
  3dnow 3dnowext 3dnowprefetch abm ace2 ace2-en acpi adx aes amd-no-ssb
";

    fn offered(machines: &str) -> Offered {
        Offered {
            machines: parse_machines(machines),
            cpus: parse_cpus(CPUS_7_2),
        }
    }

    #[test]
    fn machine_types_are_read_with_what_each_alias_stands_for() {
        let machines = parse_machines(MACHINES_7_2);
        assert_eq!(machines.len(), 8);
        assert_eq!(
            machines[1],
            MachineType {
                name: "pc".into(),
                alias_of: Some("pc-i440fx-7.2".into())
            }
        );
        assert_eq!(machines[2].alias_of, None, "(default) is no alias");
        assert_eq!(
            parse_cpus(CPUS_7_2),
            ["486", "Broadwell-IBRS", "qemu64", "qemu64-v1"]
        );
    }

    #[test]
    fn an_alias_resolves_to_its_versioned_machine_type() {
        let p = offered(MACHINES_7_2)
            .platform("q35", DEFAULT_CPU_MODEL)
            .unwrap();
        assert_eq!(p.machine_type, "pc-q35-7.2");
        assert_eq!(p.cpu_model, "qemu64");
        let p = offered(MACHINES_7_2)
            .platform("pc-i440fx-7.1", "qemu64")
            .unwrap();
        assert_eq!(p.machine_type, "pc-i440fx-7.1");
    }

    #[test]
    fn an_unknown_machine_type_or_cpu_model_is_refused_by_name() {
        let e = offered(MACHINES_7_2)
            .platform("virt", "qemu64")
            .unwrap_err();
        assert!(e.contains("no machine type \"virt\""), "{e}");
        let e = offered(MACHINES_7_2)
            .platform("pc", "EPYC-Genoa")
            .unwrap_err();
        assert!(e.contains("no CPU model \"EPYC-Genoa\""), "{e}");
    }

    #[test]
    fn pc_on_two_qemu_versions_is_two_machine_types_and_is_refused_with_the_fix() {
        let newer = MACHINES_7_2.replace("alias of pc-i440fx-7.2", "alias of pc-i440fx-8.0")
            + "pc-i440fx-8.0        Standard PC (i440FX + PIIX, 1996)\n";
        let source = offered(MACHINES_7_2).platform("pc", "qemu64").unwrap();
        let here = offered(&newer).platform("pc", "qemu64").unwrap();
        let e = compare("web-01", "hv-a", &source, "hv-b", &here).unwrap_err();
        assert!(
            e.contains("runs as machine type pc-i440fx-7.2 on hv-a")
                && e.contains("would start it as pc-i440fx-8.0")
                && e.contains("qemu.machine = \"pc-i440fx-7.2\""),
            "{e}"
        );
        // The same QEMU on both: the same platform.
        let same = offered(MACHINES_7_2).platform("pc", "qemu64").unwrap();
        assert_eq!(
            compare("web-01", "hv-a", &source, "hv-b", &same).unwrap(),
            "machine type pc-i440fx-7.2 and CPU model qemu64 on both"
        );
    }

    #[test]
    fn another_cpu_model_is_refused() {
        let source = Platform {
            machine_type: "pc-q35-7.2".into(),
            cpu_model: "qemu64".into(),
        };
        let here = Platform {
            cpu_model: "Broadwell-IBRS".into(),
            ..source.clone()
        };
        let e = compare("web-01", "hv-a", &source, "hv-b", &here).unwrap_err();
        assert!(e.contains("CPU model qemu64 on hv-a"), "{e}");
    }
}
