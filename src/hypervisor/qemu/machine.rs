//! A guest's devices on this host: the typed machine of its spec resolved
//! against this host's own config, and the QEMU arguments that follow. The
//! spec only names things; this host says what they are. A kernel is a file
//! of `kernel_dir`, a disk a file under its storage's root (symlinks
//! followed, and still under it), a NIC a tap the agent makes on the bridge
//! of its network. Whatever the config does not allow is refused naming the
//! field, before any QEMU starts; what QEMU is given is this host's paths
//! and names, with JSON for the devices, so nothing from the spec is read
//! as QEMU option syntax.

use std::path::PathBuf;

use serde_json::json;

use crate::config::MachineAllowList;
use crate::features::links;
use crate::protocol::VmSpec;
use crate::protocol::machine::{DiskFormat, MachineError};

/// A machine resolved on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The spec's machine type, or this host's `[hypervisor] machine`.
    pub machine_type: String,
    pub kernel: Option<PathBuf>,
    pub append: String,
    pub disks: Vec<ResolvedDisk>,
    pub nics: Vec<ResolvedNic>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedDisk {
    /// Canonical: no symlink left in it.
    pub file: PathBuf,
    pub format: DiskFormat,
    pub readonly: bool,
    /// A block device rather than a file.
    pub device: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedNic {
    pub mac: String,
    pub network: String,
    pub bridge: String,
    /// The tap the agent makes for it (see [`tap_name`]).
    pub tap: String,
}

/// Resolve `spec`'s machine on this host: the allow-list first
/// ([`MachineAllowList::check`]), then the files it names. `tap_seed`
/// tells this host's taps from another agent's on the same machine.
pub fn resolve(
    allowed: &MachineAllowList,
    default_machine: &str,
    tap_seed: &str,
    spec: &VmSpec,
) -> Result<Resolved, MachineError> {
    let Some(machine) = &spec.qemu else {
        return Ok(Resolved {
            machine_type: default_machine.to_string(),
            kernel: None,
            append: String::new(),
            disks: Vec::new(),
            nics: Vec::new(),
        });
    };
    allowed.check(machine)?;
    let host = &allowed.host;
    let kernel = match (&allowed.kernel_dir, machine.kernel.as_str()) {
        (Some(dir), name) if !name.is_empty() => {
            let refuse = |problem: String| MachineError::new("qemu.kernel", name, problem);
            let root = dir.canonicalize().map_err(|e| {
                refuse(format!(
                    "cannot be read: the kernel_dir of {host} ({}) cannot be opened: {e}",
                    dir.display()
                ))
            })?;
            let file = root
                .join(name)
                .canonicalize()
                .map_err(|e| refuse(format!("is not a kernel of {host}: {e}")))?;
            if !file.starts_with(&root) {
                return Err(refuse(format!(
                    "leads out of the kernel_dir of {host} (a symlink)"
                )));
            }
            if !file.is_file() {
                return Err(refuse(format!("is not a file in the kernel_dir of {host}")));
            }
            Some(file)
        }
        _ => None,
    };
    let mut disks: Vec<ResolvedDisk> = Vec::new();
    for (i, disk) in machine.disks.iter().enumerate() {
        let field = format!("qemu.disks[{i}].path");
        let refuse = |problem: String| MachineError::new(&field, &disk.path, problem);
        let storage = &disk.storage;
        let root = allowed.storage[storage].canonicalize().map_err(|e| {
            refuse(format!(
                "cannot be read: the root of storage {storage} of {host} ({}) cannot be opened: {e}",
                allowed.storage[storage].display()
            ))
        })?;
        let file = root.join(&disk.path).canonicalize().map_err(|e| {
            refuse(format!(
                "is not an image in storage {storage} of {host}: {e}"
            ))
        })?;
        if !file.starts_with(&root) {
            return Err(refuse(format!(
                "leads out of storage {storage} of {host} (a symlink)"
            )));
        }
        let kind = std::fs::metadata(&file)
            .map_err(|e| refuse(format!("cannot be read on {host}: {e}")))?
            .file_type();
        let device = std::os::unix::fs::FileTypeExt::is_block_device(&kind);
        if !kind.is_file() && !device {
            return Err(refuse(format!(
                "is neither an image file nor a block device in storage {storage} of {host}"
            )));
        }
        if let Some(same) = disks.iter().position(|d| d.file == file) {
            return Err(refuse(format!(
                "is the image of qemu.disks[{same}] too: two devices on one image corrupt it"
            )));
        }
        disks.push(ResolvedDisk {
            file,
            format: disk.format,
            readonly: disk.readonly,
            device,
        });
    }
    let nics = machine
        .nics
        .iter()
        .enumerate()
        .map(|(i, nic)| ResolvedNic {
            mac: nic.mac.to_ascii_lowercase(),
            network: nic.network.clone(),
            bridge: allowed.networks[&nic.network].clone(),
            tap: tap_name(tap_seed, &spec.name, i),
        })
        .collect();
    Ok(Resolved {
        machine_type: if machine.machine.is_empty() {
            default_machine.to_string()
        } else {
            machine.machine.clone()
        },
        kernel,
        append: machine.append.clone(),
        disks,
        nics,
    })
}

impl Resolved {
    /// The arguments for what the guest boots and its devices, in the
    /// spec's order, so that both ends of a migration lay them out alike.
    pub fn arguments(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(kernel) = &self.kernel {
            args.extend(["-kernel".into(), kernel.display().to_string()]);
            if !self.append.is_empty() {
                args.extend(["-append".into(), self.append.clone()]);
            }
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let node = format!("disk{i}");
            let blockdev = json!({
                "node-name": node,
                "driver": disk.format.as_str(),
                "read-only": disk.readonly,
                "file": {
                    "driver": if disk.device { "host_device" } else { "file" },
                    "filename": disk.file.display().to_string(),
                },
            });
            let device = json!({"driver": "virtio-blk-pci", "id": node, "drive": node});
            args.extend([
                "-blockdev".into(),
                blockdev.to_string(),
                "-device".into(),
                device.to_string(),
            ]);
        }
        for (i, nic) in self.nics.iter().enumerate() {
            let id = format!("net{i}");
            // QEMU runs no script (the sandbox forbids it): the agent made
            // the tap and attached it to its bridge.
            let netdev = format!("tap,id={id},ifname={},script=no,downscript=no", nic.tap);
            let device =
                json!({"driver": "virtio-net-pci", "id": id, "netdev": id, "mac": nic.mac});
            args.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                device.to_string(),
            ]);
        }
        args
    }

    /// The taps of its NICs.
    pub fn taps(&self) -> Vec<String> {
        self.nics.iter().map(|n| n.tap.clone()).collect()
    }
}

/// The tap of a guest's `index`-th NIC on the host whose guests live in
/// `seed`: `tn` and a hash, short enough for a Linux interface name (15
/// bytes), stable across restarts and builds (FNV-1a, not std's hasher).
pub fn tap_name(seed: &str, vm: &str, index: usize) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in seed.bytes().chain([0]).chain(vm.bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("tn{hash:08x}n{index}")
}

/// Make the taps of `nics` (persistent, on no bridge, down: the `bridge`
/// driver puts each on its network's bridge and opens it when the guest
/// runs here). On failure the ones made are removed again.
pub fn create_taps(nics: &[ResolvedNic]) -> Result<(), String> {
    for (i, nic) in nics.iter().enumerate() {
        if let Err(e) = links::make_tap(&nic.tap) {
            remove_taps(nics[..i].iter().map(|n| n.tap.as_str()));
            return Err(format!(
                "cannot make tap {} for qemu.nics[{i}]: {e}",
                nic.tap
            ));
        }
    }
    Ok(())
}

/// Remove taps; one already gone is not an error.
pub fn remove_taps<'a>(taps: impl IntoIterator<Item = &'a str>) {
    for tap in taps {
        if let Err(e) = links::remove_tap(tap) {
            tracing::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::protocol::machine::{Disk, Nic, QemuMachine};

    /// A host with `kernels/`, storage `images` (with web-01/root.img) and
    /// `iso`, and network `lan` on br0, under a temporary folder.
    struct Host {
        dir: tempfile::TempDir,
        allowed: MachineAllowList,
    }

    fn host() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for folder in ["kernels", "images/web-01", "iso"] {
            std::fs::create_dir_all(root.join(folder)).unwrap();
        }
        std::fs::write(root.join("kernels/vmlinuz"), b"kernel").unwrap();
        std::fs::write(root.join("images/web-01/root.img"), b"disk").unwrap();
        std::fs::write(root.join("iso/debian.iso"), b"iso").unwrap();
        let allowed = MachineAllowList {
            host: "hv-b".into(),
            kernel_dir: Some(root.join("kernels")),
            storage: BTreeMap::from([
                ("images".into(), root.join("images")),
                ("iso".into(), root.join("iso")),
            ]),
            networks: BTreeMap::from([("lan".into(), "br0".into())]),
        };
        Host { dir, allowed }
    }

    impl Host {
        fn root(&self) -> PathBuf {
            self.dir.path().canonicalize().unwrap()
        }

        fn resolve(&self, machine: QemuMachine) -> Result<Resolved, String> {
            let spec = VmSpec {
                name: "web-01".into(),
                memory_mib: 64,
                vcpus: 1,
                dirty_rate_mib_s: 0,
                features: vec![],
                qemu: Some(machine),
            };
            resolve(&self.allowed, "pc", "/state/qemu", &spec).map_err(|e| e.to_string())
        }
    }

    fn disk(storage: &str, path: &str) -> Disk {
        Disk {
            storage: storage.into(),
            path: path.into(),
            format: DiskFormat::Raw,
            readonly: false,
        }
    }

    fn machine() -> QemuMachine {
        QemuMachine {
            kernel: "vmlinuz".into(),
            append: "console=ttyS0 ws=8".into(),
            disks: vec![disk("images", "web-01/root.img"), {
                let mut iso = disk("iso", "debian.iso");
                iso.readonly = true;
                iso
            }],
            nics: vec![Nic {
                mac: "52:54:00:AB:CD:EF".into(),
                network: "lan".into(),
                vlan: None,
                vsi: None,
            }],
            ..QemuMachine::default()
        }
    }

    #[test]
    fn a_machine_resolves_to_this_hosts_files_and_bridge() {
        let h = host();
        let r = h.resolve(machine()).unwrap();
        assert_eq!(r.machine_type, "pc", "the host's machine type by default");
        assert_eq!(r.kernel, Some(h.root().join("kernels/vmlinuz")));
        assert_eq!(r.disks[0].file, h.root().join("images/web-01/root.img"));
        assert_eq!((r.disks[1].readonly, r.disks[1].device), (true, false));
        assert_eq!(r.nics[0].bridge, "br0");
        assert_eq!(r.nics[0].mac, "52:54:00:ab:cd:ef");
        assert_eq!(r.nics[0].tap, tap_name("/state/qemu", "web-01", 0));
        let q35 = h
            .resolve(QemuMachine {
                machine: "q35".into(),
                ..machine()
            })
            .unwrap();
        assert_eq!(q35.machine_type, "q35");
    }

    #[test]
    fn the_arguments_are_this_hosts_paths_in_json_and_a_scriptless_tap() {
        let h = host();
        let args = h.resolve(machine()).unwrap().arguments();
        let root = h.root().display().to_string();
        let kernel = format!("{root}/kernels/vmlinuz");
        assert_eq!(
            args[..4],
            ["-kernel", kernel.as_str(), "-append", "console=ttyS0 ws=8"]
        );
        let blockdev: serde_json::Value = serde_json::from_str(&args[5]).unwrap();
        assert_eq!(args[4], "-blockdev");
        assert_eq!(
            blockdev,
            json!({"node-name": "disk0", "driver": "raw", "read-only": false,
                   "file": {"driver": "file", "filename": format!("{root}/images/web-01/root.img")}})
        );
        assert_eq!(args[6], "-device");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&args[7]).unwrap(),
            json!({"driver": "virtio-blk-pci", "id": "disk0", "drive": "disk0"})
        );
        let iso: serde_json::Value = serde_json::from_str(&args[9]).unwrap();
        assert_eq!(iso["read-only"], true);
        let tap = tap_name("/state/qemu", "web-01", 0);
        assert_eq!(
            args[12..14],
            [
                "-netdev".to_string(),
                format!("tap,id=net0,ifname={tap},script=no,downscript=no")
            ]
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&args[15]).unwrap(),
            json!({"driver": "virtio-net-pci", "id": "net0", "netdev": "net0", "mac": "52:54:00:ab:cd:ef"})
        );
        assert_eq!(args.len(), 16, "{args:?}");
    }

    #[test]
    fn a_path_with_commas_stays_one_json_string() {
        let h = host();
        std::fs::write(h.root().join("images/a,snapshot=on.img"), b"disk").unwrap();
        let r = h
            .resolve(QemuMachine {
                disks: vec![disk("images", "a,snapshot=on.img")],
                ..QemuMachine::default()
            })
            .unwrap();
        let blockdev: serde_json::Value = serde_json::from_str(&r.arguments()[1]).unwrap();
        assert!(
            blockdev["file"]["filename"]
                .as_str()
                .unwrap()
                .ends_with("/images/a,snapshot=on.img")
        );
        assert!(blockdev.get("snapshot").is_none());
    }

    #[test]
    fn what_the_host_does_not_allow_is_refused_by_field() {
        let h = host();
        let cases: Vec<(QemuMachine, &str)> = vec![
            (
                QemuMachine {
                    disks: vec![disk("images", "web-01/root.img"), disk("scratch", "x.img")],
                    ..QemuMachine::default()
                },
                "qemu.disks[1].storage \"scratch\" is not a storage of hv-b (it has: images, iso)",
            ),
            (
                QemuMachine {
                    nics: vec![Nic {
                        mac: "52:54:00:00:00:01".into(),
                        network: "dmz".into(),
                        vlan: None,
                        vsi: None,
                    }],
                    ..QemuMachine::default()
                },
                "qemu.nics[0].network \"dmz\" is not a network of hv-b (it has: lan)",
            ),
            (
                QemuMachine {
                    kernel: "../../etc/shadow".into(),
                    ..QemuMachine::default()
                },
                "qemu.kernel \"../../etc/shadow\" is a path",
            ),
            (
                QemuMachine {
                    kernel: "bzImage".into(),
                    ..QemuMachine::default()
                },
                "qemu.kernel \"bzImage\" is not a kernel of hv-b: No such file",
            ),
            (
                QemuMachine {
                    disks: vec![disk("images", "/etc/shadow")],
                    ..QemuMachine::default()
                },
                "qemu.disks[0].path \"/etc/shadow\" is absolute",
            ),
            (
                QemuMachine {
                    disks: vec![disk("images", "../iso/debian.iso")],
                    ..QemuMachine::default()
                },
                "qemu.disks[0].path \"../iso/debian.iso\" leaves its storage",
            ),
            (
                QemuMachine {
                    disks: vec![disk("images", "web-01/missing.img")],
                    ..QemuMachine::default()
                },
                "qemu.disks[0].path \"web-01/missing.img\" is not an image in storage images of hv-b",
            ),
            (
                QemuMachine {
                    disks: vec![disk("images", "web-01")],
                    ..QemuMachine::default()
                },
                "qemu.disks[0].path \"web-01\" is neither an image file nor a block device",
            ),
        ];
        for (machine, expected) in cases {
            let err = h.resolve(machine).unwrap_err();
            assert!(
                err.starts_with(expected),
                "expected {expected:?}, got {err:?}"
            );
        }
    }

    #[test]
    fn a_symlink_out_of_its_root_is_refused() {
        let h = host();
        let root = h.root();
        let outside = root.join("secret.img");
        std::fs::write(&outside, b"not yours").unwrap();
        symlink(&outside, root.join("images/escape.img")).unwrap();
        symlink("../secret.img", root.join("kernels/escape")).unwrap();
        // A folder link is followed too.
        symlink(root.join("iso"), root.join("images/iso-link")).unwrap();
        let err = h
            .resolve(QemuMachine {
                disks: vec![disk("images", "escape.img")],
                ..QemuMachine::default()
            })
            .unwrap_err();
        assert_eq!(
            err,
            "qemu.disks[0].path \"escape.img\" leads out of storage images of hv-b (a symlink)"
        );
        let err = h
            .resolve(QemuMachine {
                disks: vec![disk("images", "iso-link/debian.iso")],
                ..QemuMachine::default()
            })
            .unwrap_err();
        assert!(err.contains("leads out of storage images"), "{err}");
        let err = h
            .resolve(QemuMachine {
                kernel: "escape".into(),
                ..QemuMachine::default()
            })
            .unwrap_err();
        assert_eq!(
            err,
            "qemu.kernel \"escape\" leads out of the kernel_dir of hv-b (a symlink)"
        );
        // A link that stays inside is followed, and QEMU gets the real file.
        symlink("web-01/root.img", root.join("images/current.img")).unwrap();
        let r = h
            .resolve(QemuMachine {
                disks: vec![disk("images", "current.img")],
                ..QemuMachine::default()
            })
            .unwrap();
        assert_eq!(r.disks[0].file, root.join("images/web-01/root.img"));
        // ... but not as a second device on the same image.
        let err = h
            .resolve(QemuMachine {
                disks: vec![
                    disk("images", "web-01/root.img"),
                    disk("images", "current.img"),
                ],
                ..QemuMachine::default()
            })
            .unwrap_err();
        assert!(err.contains("is the image of qemu.disks[0] too"), "{err}");
    }

    #[test]
    fn tap_names_fit_linux_and_differ_by_host_guest_and_nic() {
        let names = [
            tap_name("/var/lib/tern/hv-a/qemu", "web-01", 0),
            tap_name("/var/lib/tern/hv-a/qemu", "web-01", 1),
            tap_name("/var/lib/tern/hv-a/qemu", "web-02", 0),
            tap_name("/var/lib/tern/hv-b/qemu", "web-01", 0),
        ];
        for name in &names {
            assert!(name.len() <= 15, "{name}");
        }
        let distinct: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
        // Stable: a restarted agent finds its taps again.
        assert_eq!(tap_name("/var/lib/tern/hv-a/qemu", "web-01", 0), names[0]);
        assert_eq!(tap_name("s", "g", 15), "tnb62ca0d3n15");
    }

    #[test]
    fn a_spec_without_a_machine_gets_the_hosts_machine_type_only() {
        let h = host();
        let spec = VmSpec {
            name: "g".into(),
            memory_mib: 64,
            vcpus: 1,
            dirty_rate_mib_s: 0,
            features: vec![],
            qemu: None,
        };
        let r = resolve(&h.allowed, "q35", "s", &spec).unwrap();
        assert_eq!(r.machine_type, "q35");
        assert!(r.arguments().is_empty());
    }
}
