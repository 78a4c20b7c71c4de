//! The machine a QEMU guest is, as its VM spec carries it: the machine type,
//! a kernel and its command line, disks and NICs, each by a name that the
//! host running the guest looks up in its own config. It travels in C1 with
//! the rest of the spec, and none of its text reaches a QEMU command line as
//! it came (DESIGN §6: no command-line text crosses the network).
//!
//! [`QemuMachine::check`] is its shape, the same on every host: names are
//! names, a disk's path stays relative and below its storage's root, the
//! kernel's command line is one bounded line. What one host allows (its
//! kernels, storage and networks) is that host's own check
//! (`config::MachineAllowList`), and where a path really leads, symlinks
//! followed, is read from its disk (`hypervisor::qemu::machine`).

use serde::{Deserialize, Serialize};

/// The longest kernel command line: Linux's COMMAND_LINE_SIZE on x86.
pub const MAX_APPEND: usize = 2048;
/// The most disks, and the most NICs, one machine may have.
pub const MAX_DEVICES: usize = 16;
/// The longest machine type, storage id or network name.
pub const MAX_NAME: usize = 64;
/// The longest kernel file name (a Linux file name).
const MAX_FILE_NAME: usize = 255;
/// The longest disk path (Linux's PATH_MAX).
const MAX_PATH: usize = 4096;
/// How much of a refused value an error quotes.
const QUOTED: usize = 80;

/// What a QEMU guest boots and which devices it has beyond memory and
/// vCPUs, in names each host resolves in its own `[hypervisor]` config.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuMachine {
    /// The machine type for `-machine`; empty: the host's `[hypervisor] machine`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub machine: String,
    /// A kernel's file name in the host's `[hypervisor] kernel_dir`; empty:
    /// none (the guest boots from its disks).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel: String,
    /// The kernel's command line, given to QEMU as one argument.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub append: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// Free QEMU arguments of a spec written before machines were typed (a
    /// journal row, `guests.json`): read so those still load, never sent in
    /// C1 and never run. [`QemuMachine::check`] refuses a machine with any.
    #[serde(default, rename = "args", skip_serializing_if = "Vec::is_empty")]
    pub legacy_args: Vec<String>,
}

/// A disk image: a path inside one of the host's storage roots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// A storage id of the host's `[hypervisor.storage]`.
    pub storage: String,
    /// The image's path relative to that storage's root.
    pub path: String,
    #[serde(default)]
    pub format: DiskFormat,
    #[serde(default)]
    pub readonly: bool,
}

/// How an image is laid out. Always given to QEMU, never probed: a guest
/// that writes a qcow2 header into a raw image must not get it read back as
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// QEMU's name of the format driver.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A network card: its MAC address and the host network it is plugged into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub mac: String,
    /// A network of the host's `[hypervisor.networks]`.
    pub network: String,
    /// The VLAN its port is in (1 to 4094), on the bridge driver's bridge
    /// and in the vdp driver's filter; none: untagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// Its 802.1Qbg virtual station interface, for the vdp driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsi: Option<Vsi>,
}

/// One NIC of a VM as the host running a feature stage sees it: what the
/// VM spec says (MAC, network, VLAN, VSI) and what this host makes of it
/// (the bridge its network is here, the tap QEMU opens for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicPort {
    /// Its place in the spec's list, for messages (`qemu.nics[0]`).
    pub index: usize,
    /// Lowercase, `52:54:00:12:34:56`.
    pub mac: String,
    pub network: String,
    pub vlan: Option<u16>,
    pub vsi: Option<Vsi>,
    /// The bridge this host's config gives its network; none where the
    /// network is not one of this host's, or the hypervisor has no bridges.
    pub bridge: Option<String>,
    /// The tap the guest's QEMU opens for it; none for a simulated guest.
    pub tap: Option<String>,
}

impl NicPort {
    /// The NICs of `spec`, before a host placed them.
    pub fn of(spec: &super::VmSpec) -> Vec<NicPort> {
        let Some(machine) = &spec.qemu else {
            return Vec::new();
        };
        machine
            .nics
            .iter()
            .enumerate()
            .map(|(index, nic)| NicPort {
                index,
                mac: nic.mac.to_ascii_lowercase(),
                network: nic.network.clone(),
                vlan: nic.vlan,
                vsi: nic.vsi.clone(),
                bridge: None,
                tap: None,
            })
            .collect()
    }
}

/// An 802.1Qbg VSI: what the adjacent switch looks the port's profile up
/// by (libvirt's `<virtualport type='802.1Qbg'>` parameters). The instance
/// stays the same wherever the VM runs: it names this port of this VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsi {
    /// VSI manager id (0 to 255).
    #[serde(default)]
    pub manager_id: u8,
    /// VSI type id (0 to 16777215).
    pub type_id: u32,
    /// VSI type version (0 to 255).
    #[serde(default)]
    pub type_version: u8,
    /// VSI instance id, a UUID.
    pub instance: String,
}

/// The largest VSI type id: 24 bits.
pub const MAX_VSI_TYPE_ID: u32 = 0x00ff_ffff;

/// A field of a machine that is refused, and why, in the words of the
/// config: `qemu.disks[1].storage "scratch" is not a storage of hv-b (it
/// has: images, iso)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}{} {problem}", quoted(.value))]
pub struct MachineError {
    /// The field as a config names it: `qemu.disks[1].storage`.
    pub field: String,
    /// The refused value, shortened; none when the field as a whole is.
    pub value: Option<String>,
    /// What is wrong, and what would be right.
    pub problem: String,
}

fn quoted(value: &Option<String>) -> String {
    value
        .as_ref()
        .map(|v| format!(" {v:?}"))
        .unwrap_or_default()
}

impl MachineError {
    pub fn new(field: impl Into<String>, value: &str, problem: impl Into<String>) -> MachineError {
        let value = match value.char_indices().nth(QUOTED) {
            Some((end, _)) => format!("{}…", &value[..end]),
            None => value.to_string(),
        };
        MachineError {
            field: field.into(),
            value: Some(value),
            problem: problem.into(),
        }
    }

    fn whole(field: impl Into<String>, problem: impl Into<String>) -> MachineError {
        MachineError {
            field: field.into(),
            value: None,
            problem: problem.into(),
        }
    }
}

impl QemuMachine {
    /// Its shape, the same on every host. The first field that is wrong is
    /// named.
    pub fn check(&self) -> Result<(), MachineError> {
        if !self.legacy_args.is_empty() {
            return Err(MachineError::new(
                "qemu.args",
                &self.legacy_args.join(" "),
                "are free QEMU arguments, which no host runs: describe disks in qemu.disks \
                 and NICs in qemu.nics",
            ));
        }
        if !self.machine.is_empty() {
            check_name("qemu.machine", &self.machine, "a machine type")?;
        }
        if !self.kernel.is_empty() {
            check_kernel(&self.kernel)?;
        }
        check_append(&self.append, !self.kernel.is_empty())?;
        if self.disks.len() > MAX_DEVICES {
            return Err(MachineError::whole(
                "qemu.disks",
                format!("lists {} disks: at most {MAX_DEVICES}", self.disks.len()),
            ));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            check_name(
                format!("qemu.disks[{i}].storage"),
                &disk.storage,
                "a storage id",
            )?;
            check_disk_path(&format!("qemu.disks[{i}].path"), &disk.path)?;
            if self.disks[..i]
                .iter()
                .any(|d| d.storage == disk.storage && d.path == disk.path)
            {
                return Err(MachineError::new(
                    format!("qemu.disks[{i}].path"),
                    &disk.path,
                    format!(
                        "is listed twice in storage {}: two devices on one image corrupt it",
                        disk.storage
                    ),
                ));
            }
        }
        if self.nics.len() > MAX_DEVICES {
            return Err(MachineError::whole(
                "qemu.nics",
                format!("lists {} NICs: at most {MAX_DEVICES}", self.nics.len()),
            ));
        }
        for (i, nic) in self.nics.iter().enumerate() {
            let field = format!("qemu.nics[{i}].mac");
            let mac = parse_mac(&nic.mac).ok_or_else(|| {
                MachineError::new(
                    &field,
                    &nic.mac,
                    "is not a MAC address like 52:54:00:12:34:56",
                )
            })?;
            if mac[0] & 1 == 1 {
                return Err(MachineError::new(
                    &field,
                    &nic.mac,
                    "is a multicast address: a NIC needs a unicast one",
                ));
            }
            if self.nics[..i]
                .iter()
                .any(|n| parse_mac(&n.mac) == Some(mac))
            {
                return Err(MachineError::new(&field, &nic.mac, "is listed twice"));
            }
            check_name(
                format!("qemu.nics[{i}].network"),
                &nic.network,
                "a network name",
            )?;
            if let Some(vlan) = nic.vlan
                && !(1..=4094).contains(&vlan)
            {
                return Err(MachineError::new(
                    format!("qemu.nics[{i}].vlan"),
                    &vlan.to_string(),
                    "is not a VLAN id (1 to 4094)",
                ));
            }
            if let Some(vsi) = &nic.vsi {
                if vsi.type_id > MAX_VSI_TYPE_ID {
                    return Err(MachineError::new(
                        format!("qemu.nics[{i}].vsi.type_id"),
                        &vsi.type_id.to_string(),
                        "is not a VSI type id (0 to 16777215)",
                    ));
                }
                if !is_uuid(&vsi.instance) {
                    return Err(MachineError::new(
                        format!("qemu.nics[{i}].vsi.instance"),
                        &vsi.instance,
                        "is not a UUID like 6b3a0f2c-2d1e-4c55-9a3b-0e7d2f8c1a44",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `8-4-4-4-12` hexadecimal digits.
fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// A machine type, storage id or network name: letters, digits, '.', '_'
/// and '-' (nothing QEMU's option syntax or a shell would read).
fn check_name(field: impl Into<String>, value: &str, what: &str) -> Result<(), MachineError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(MachineError::new(
            field,
            value,
            format!("is not {what}: 1 to {MAX_NAME} letters, digits, '.', '_' or '-'"),
        ))
    }
}

fn check_kernel(kernel: &str) -> Result<(), MachineError> {
    let refuse = |problem: &str| Err(MachineError::new("qemu.kernel", kernel, problem));
    if kernel.contains('/') {
        return refuse(
            "is a path: a kernel is named by its file name in the host's [hypervisor] kernel_dir",
        );
    }
    if kernel.starts_with('.') {
        return refuse("is not a kernel's file name: it must not start with '.'");
    }
    if kernel.chars().any(char::is_control) {
        return refuse("contains a control character");
    }
    if kernel.len() > MAX_FILE_NAME {
        return refuse("is longer than a file name (255 bytes)");
    }
    Ok(())
}

fn check_append(append: &str, has_kernel: bool) -> Result<(), MachineError> {
    let refuse = |problem: String| Err(MachineError::new("qemu.append", append, problem));
    if append.is_empty() {
        return Ok(());
    }
    if !has_kernel {
        return refuse("is a kernel's command line, and qemu.kernel names no kernel".into());
    }
    if append.len() > MAX_APPEND {
        return refuse(format!("is longer than {MAX_APPEND} bytes"));
    }
    if append.chars().any(char::is_control) {
        return refuse("contains a control character: it is one line".into());
    }
    Ok(())
}

/// A path relative to a storage's root, in its one spelling: no leading
/// '/', no '..', '.' or empty parts, no trailing '/'.
fn check_disk_path(field: &str, path: &str) -> Result<(), MachineError> {
    let refuse = |problem: &str| Err(MachineError::new(field, path, problem));
    if path.is_empty() {
        return refuse("is empty: give the image's path inside its storage");
    }
    if path.starts_with('/') {
        return refuse("is absolute: a disk's path is relative to the root of its storage");
    }
    if path.split('/').any(|part| part == "..") {
        return refuse("leaves its storage: a disk's path has no '..'");
    }
    if path.split('/').any(|part| part.is_empty() || part == ".") {
        return refuse("is not normalised: no '.', '//' or trailing '/'");
    }
    if path.chars().any(char::is_control) {
        return refuse("contains a control character");
    }
    if path.len() > MAX_PATH {
        return refuse("is longer than a path (4096 bytes)");
    }
    Ok(())
}

/// Six hex octets separated by ':'.
fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut octets = [0u8; 6];
    let mut parts = mac.split(':');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *octet = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(octets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> QemuMachine {
        QemuMachine {
            kernel: "vmlinuz-6.1".into(),
            append: "console=ttyS0 root=/dev/vda".into(),
            disks: vec![
                Disk {
                    storage: "images".into(),
                    path: "web-01/root.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    readonly: false,
                },
                Disk {
                    storage: "iso".into(),
                    path: "debian.iso".into(),
                    format: DiskFormat::Raw,
                    readonly: true,
                },
            ],
            nics: vec![Nic {
                mac: "52:54:00:12:34:56".into(),
                network: "lan".into(),
                vlan: None,
                vsi: None,
            }],
            ..QemuMachine::default()
        }
    }

    /// The error of `machine()` changed by `edit`, as text.
    fn refused(edit: impl FnOnce(&mut QemuMachine)) -> String {
        let mut m = machine();
        edit(&mut m);
        m.check().expect_err("refused").to_string()
    }

    #[test]
    fn a_well_formed_machine_and_an_empty_one_pass() {
        assert_eq!(machine().check(), Ok(()));
        assert_eq!(QemuMachine::default().check(), Ok(()));
    }

    #[test]
    fn a_kernel_is_a_file_name_never_a_path() {
        for (kernel, problem) in [
            ("../../etc/shadow", "is a path"),
            ("/boot/vmlinuz", "is a path"),
            ("boot/vmlinuz", "is a path"),
            ("..", "must not start with '.'"),
            (".hidden", "must not start with '.'"),
            ("vm\nlinuz", "control character"),
        ] {
            let err = refused(|m| m.kernel = kernel.into());
            assert!(
                err.starts_with(&format!("qemu.kernel {kernel:?} ")),
                "{err}"
            );
            assert!(err.contains(problem), "{kernel:?}: {err}");
        }
        let err = refused(|m| m.kernel = "k".repeat(256));
        assert!(err.contains("longer than a file name"), "{err}");
    }

    #[test]
    fn a_disk_path_stays_relative_and_inside_its_storage() {
        for (path, problem) in [
            ("/etc/shadow", "is absolute"),
            ("../other/x.img", "leaves its storage"),
            ("web-01/../../x.img", "leaves its storage"),
            ("web-01/./root.img", "is not normalised"),
            ("web-01//root.img", "is not normalised"),
            ("web-01/", "is not normalised"),
            ("", "is empty"),
            ("root\0.img", "control character"),
        ] {
            let err = refused(|m| m.disks[1].path = path.into());
            assert!(
                err.starts_with(&format!("qemu.disks[1].path {path:?} ")),
                "{err}"
            );
            assert!(err.contains(problem), "{path:?}: {err}");
        }
    }

    #[test]
    fn names_are_plain_words() {
        let err = refused(|m| m.disks[0].storage = "images,x".into());
        assert!(
            err.starts_with("qemu.disks[0].storage \"images,x\" is not a storage id"),
            "{err}"
        );
        let err = refused(|m| m.nics[0].network = String::new());
        assert!(
            err.starts_with("qemu.nics[0].network \"\" is not a network name"),
            "{err}"
        );
        // A machine type cannot smuggle QEMU options after a comma.
        let err = refused(|m| m.machine = "pc,memory-backend=m".into());
        assert!(
            err.starts_with("qemu.machine \"pc,memory-backend=m\""),
            "{err}"
        );
        assert_eq!(
            QemuMachine {
                machine: "pc-i440fx-7.2".into(),
                ..machine()
            }
            .check(),
            Ok(())
        );
    }

    #[test]
    fn the_kernel_command_line_is_one_bounded_line_for_a_kernel() {
        let err = refused(|m| m.append = "quiet\ninit=/bin/sh".into());
        assert!(err.starts_with("qemu.append "), "{err}");
        assert!(err.contains("one line"), "{err}");
        let err = refused(|m| m.append = "x".repeat(MAX_APPEND + 1));
        assert!(err.contains("longer than 2048 bytes"), "{err}");
        // The quoted value is shortened.
        assert!(err.len() < 200, "{err}");
        let err = refused(|m| m.kernel = String::new());
        assert!(err.contains("qemu.kernel names no kernel"), "{err}");
    }

    #[test]
    fn nics_have_unicast_macs_once_each() {
        for (mac, problem) in [
            ("52:54:00:12:34", "is not a MAC address"),
            ("52-54-00-12-34-56", "is not a MAC address"),
            ("52:54:00:12:34:zz", "is not a MAC address"),
            ("01:00:5e:00:00:01", "multicast"),
        ] {
            let err = refused(|m| m.nics[0].mac = mac.into());
            assert!(
                err.starts_with(&format!("qemu.nics[0].mac {mac:?} ")),
                "{err}"
            );
            assert!(err.contains(problem), "{mac:?}: {err}");
        }
        let err = refused(|m| {
            m.nics.push(Nic {
                mac: "52:54:00:12:34:56".to_uppercase(),
                network: "lan".into(),
                vlan: None,
                vsi: None,
            })
        });
        assert!(err.starts_with("qemu.nics[1].mac"), "{err}");
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn one_image_is_one_disk_and_the_counts_are_capped() {
        let err = refused(|m| m.disks[1] = m.disks[0].clone());
        assert!(err.starts_with("qemu.disks[1].path"), "{err}");
        assert!(err.contains("listed twice"), "{err}");
        let err = refused(|m| {
            m.disks = (0..=MAX_DEVICES)
                .map(|i| Disk {
                    storage: "images".into(),
                    path: format!("{i}.img"),
                    format: DiskFormat::Raw,
                    readonly: false,
                })
                .collect()
        });
        assert_eq!(err, "qemu.disks lists 17 disks: at most 16");
    }

    #[test]
    fn free_qemu_arguments_of_an_old_spec_are_read_and_refused() {
        // A journal row or guests.json written before machines were typed.
        let old: QemuMachine = serde_json::from_str(
            r#"{"kernel": "/tmp/tern-guest.elf", "append": "ws=32", "args": ["-drive", "file=/dev/sda"]}"#,
        )
        .unwrap();
        assert_eq!(old.legacy_args, ["-drive", "file=/dev/sda"]);
        let err = old.check().unwrap_err().to_string();
        assert!(
            err.starts_with("qemu.args \"-drive file=/dev/sda\" are free QEMU arguments"),
            "{err}"
        );
        // An old row without arguments loads too; its kernel path is refused.
        let old: QemuMachine = serde_json::from_str(
            r#"{"kernel": "/tmp/tern-guest.elf", "append": "ws=32", "args": []}"#,
        )
        .unwrap();
        assert!(old.check().unwrap_err().to_string().contains("is a path"));
        // And nothing of the legacy field is written back.
        assert!(!serde_json::to_string(&machine()).unwrap().contains("args"));
    }
}
