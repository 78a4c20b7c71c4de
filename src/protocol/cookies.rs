//! Cookies C1–C4: building them, decoding them, and the checks a receiver
//! makes before acting on one (protocol version, the bounds of every
//! string, list and size in it, mandatory features).

use prost::Message;

use super::bounds::{
    self, BoundsError, IdKind, MAX_ADDRESS_LEN, MAX_FEATURES, MAX_QEMU_BYTES, MAX_TEXT_LEN,
    check_count, check_id, check_name, check_text,
};
use super::machine::{Disk, DiskFormat, MachineError, Nic, QemuMachine, Vsi};
use super::{FeatureSpec, Mode, PROTOCOL_VERSION, StepStatus, VmSpec};
use crate::proto;
use crate::protocol::record::{CookieRecord, mode_from_proto, status_from_proto, status_to_proto};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    #[error("malformed {cookie}: {reason}")]
    Malformed {
        cookie: &'static str,
        reason: String,
    },
    #[error("protocol version {theirs} is not compatible with this agent's version {ours}")]
    IncompatibleVersion { theirs: u32, ours: u32 },
    #[error("mandatory feature {0:?} is not known on this host")]
    UnknownMandatoryFeature(String),
    /// The VM's machine is not well formed, whatever host it goes to.
    #[error("vm {vm}: {error}")]
    Machine { vm: String, error: MachineError },
    /// A string, list or size beyond what a receiver accepts.
    #[error("{0}")]
    OutOfBounds(#[from] BoundsError),
}

/// Decode a cookie, check its protocol version, then the bounds of every
/// string, list and size in it ([`Bounded`]).
pub fn decode<T: Message + Default + Versioned + Bounded>(
    cookie: &'static str,
    bytes: &[u8],
) -> Result<T, CookieError> {
    let message = T::decode(bytes).map_err(|e| CookieError::Malformed {
        cookie,
        reason: e.to_string(),
    })?;
    let theirs = message.protocol_version();
    if theirs != PROTOCOL_VERSION {
        return Err(CookieError::IncompatibleVersion {
            theirs,
            ours: PROTOCOL_VERSION,
        });
    }
    message.check_bounds()?;
    Ok(message)
}

/// A cookie whose strings, lists and sizes can be checked against what a
/// receiver accepts. Each field is named in the error as `C1.vm.name`.
pub trait Bounded {
    fn check_bounds(&self) -> Result<(), BoundsError>;
}

impl Bounded for proto::Cookie1 {
    fn check_bounds(&self) -> Result<(), BoundsError> {
        check_id("C1.migration_id", &self.migration_id, IdKind::Migration)?;
        check_id("C1.attempt_id", &self.attempt_id, IdKind::Attempt)?;
        if self.attempt_id.split_once('.').map(|(m, _)| m) != Some(self.migration_id.as_str()) {
            return Err(BoundsError {
                field: "C1.attempt_id".into(),
                problem: format!(
                    "{} is not an attempt of migration {}",
                    bounds::shown(&self.attempt_id),
                    self.migration_id
                ),
            });
        }
        check_name("C1.source", &self.source)?;
        if let Some(vm) = &self.vm {
            check_vm_spec("C1.vm", vm)?;
        }
        check_count(
            "C1.mandatory_features",
            self.mandatory_features.len(),
            MAX_FEATURES,
        )?;
        for (i, name) in self.mandatory_features.iter().enumerate() {
            check_name(&format!("C1.mandatory_features[{i}]"), name)?;
        }
        Ok(())
    }
}

/// A VM spec from a peer: its name, sizes, features and QEMU part.
fn check_vm_spec(field: &str, vm: &proto::VmSpec) -> Result<(), BoundsError> {
    check_name(&format!("{field}.name"), &vm.name)?;
    bounds::check_guest_size(field, vm.memory_mib, vm.vcpus)?;
    check_count(
        &format!("{field}.features"),
        vm.features.len(),
        MAX_FEATURES,
    )?;
    for (i, f) in vm.features.iter().enumerate() {
        check_name(&format!("{field}.features[{i}].name"), &f.name)?;
        if !f.driver.is_empty() {
            check_name(&format!("{field}.features[{i}].driver"), &f.driver)?;
        }
    }
    if let Some(qemu) = &vm.qemu {
        let len = qemu.encoded_len();
        if len > MAX_QEMU_BYTES {
            return Err(BoundsError {
                field: format!("{field}.qemu"),
                problem: format!("is {len} bytes encoded; at most {MAX_QEMU_BYTES} are accepted"),
            });
        }
    }
    Ok(())
}

/// Stage results from a peer: at most one per feature, each naming a
/// feature and a detail of bounded size.
fn check_stage_results(field: &str, results: &[proto::StageResult]) -> Result<(), BoundsError> {
    check_count(field, results.len(), MAX_FEATURES)?;
    for (i, r) in results.iter().enumerate() {
        check_name(&format!("{field}[{i}].feature"), &r.feature)?;
        check_text(&format!("{field}[{i}].detail"), &r.detail, MAX_TEXT_LEN)?;
    }
    Ok(())
}

impl Bounded for proto::Cookie2 {
    fn check_bounds(&self) -> Result<(), BoundsError> {
        check_id("C2.attempt_id", &self.attempt_id, IdKind::Attempt)?;
        check_text(
            "C2.incoming_address",
            &self.incoming_address,
            MAX_ADDRESS_LEN,
        )?;
        check_stage_results("C2.prepare", &self.prepare)?;
        check_text("C2.error", &self.error, MAX_TEXT_LEN)?;
        check_stage_results("C2.rollback", &self.rollback)
    }
}

impl Bounded for proto::Cookie3 {
    fn check_bounds(&self) -> Result<(), BoundsError> {
        check_id("C3.attempt_id", &self.attempt_id, IdKind::Attempt)
    }
}

impl Bounded for proto::Cookie4 {
    fn check_bounds(&self) -> Result<(), BoundsError> {
        check_id("C4.attempt_id", &self.attempt_id, IdKind::Attempt)?;
        check_stage_results("C4.finish", &self.finish)?;
        check_stage_results("C4.rollback", &self.rollback)?;
        check_text("C4.error", &self.error, MAX_TEXT_LEN)
    }
}

pub trait Versioned {
    fn protocol_version(&self) -> u32;
}

macro_rules! versioned {
    ($($t:ty),*) => {$(
        impl Versioned for $t {
            fn protocol_version(&self) -> u32 {
                self.protocol_version
            }
        }
    )*};
}
versioned!(
    proto::Cookie1,
    proto::Cookie2,
    proto::Cookie3,
    proto::Cookie4
);

/// What a destination needs from C1, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub attempt_id: String,
    pub migration_id: String,
    pub source: String,
    pub vm: VmSpec,
    pub mode: Mode,
    /// The source may switch the transfer to post-copy.
    pub postcopy: bool,
    /// C1 announced post-copy, which this host cannot take part in: why
    /// ([`Incoming::without_postcopy`]).
    pub postcopy_unavailable: Option<String>,
}

impl Incoming {
    /// This host cannot receive by post-copy: the attempt runs by
    /// pre-copy alone, and C2 says why.
    pub fn without_postcopy(mut self, why: String) -> Incoming {
        if self.postcopy {
            self.postcopy = false;
            self.postcopy_unavailable = Some(why);
        }
        self
    }
}

/// Check a decoded C1: a VM spec is present and sane (its machine well
/// formed), the mode is set, and every mandatory feature is one `knows`
/// accepts. The receiver works out which features are mandatory itself,
/// from each feature's `required` and the mode (the rule [`cookie1`]
/// follows): a source that left a required feature out of
/// `mandatory_features` cannot make a destination without its driver accept
/// a VM that must not run without it. What the list names is mandatory too.
pub fn check_cookie1(
    c1: &proto::Cookie1,
    knows: impl Fn(&str) -> bool,
) -> Result<Incoming, CookieError> {
    let malformed = |reason: &str| CookieError::Malformed {
        cookie: "C1",
        reason: reason.to_string(),
    };
    let vm = c1.vm.as_ref().ok_or_else(|| malformed("no VM spec"))?;
    if vm.name.is_empty() {
        return Err(malformed("the VM spec has no name"));
    }
    if c1.attempt_id.is_empty() || c1.migration_id.is_empty() {
        return Err(malformed("no attempt or migration id"));
    }
    let mode = mode_from_proto(c1.mode).ok_or_else(|| malformed("no mode"))?;
    let derived = vm
        .features
        .iter()
        .filter(|f| super::policy::is_blocking(mode, f.required))
        .map(|f| f.name.as_str());
    let listed = c1.mandatory_features.iter().map(String::as_str);
    if let Some(unknown) = derived.chain(listed).find(|f| !knows(f)) {
        return Err(CookieError::UnknownMandatoryFeature(unknown.to_string()));
    }
    let vm = vm_from_proto(vm)?;
    if let Some(machine) = &vm.qemu {
        machine.check().map_err(|error| CookieError::Machine {
            vm: vm.name.clone(),
            error,
        })?;
    }
    Ok(Incoming {
        attempt_id: c1.attempt_id.clone(),
        migration_id: c1.migration_id.clone(),
        source: c1.source.clone(),
        vm,
        mode,
        postcopy: c1.postcopy,
        postcopy_unavailable: None,
    })
}

/// C1 for an attempt. In safe mode required features are mandatory: a
/// destination that does not know one could never honour "this VM must not
/// run without it". Fast mode blocks on nothing (DESIGN §2): an emergency
/// move to a host without the driver goes ahead, and the feature's failed
/// stages make it degraded.
pub fn cookie1(
    attempt_id: &str,
    migration_id: &str,
    source: &str,
    vm: &VmSpec,
    mode: Mode,
) -> proto::Cookie1 {
    proto::Cookie1 {
        protocol_version: PROTOCOL_VERSION,
        attempt_id: attempt_id.to_string(),
        migration_id: migration_id.to_string(),
        source: source.to_string(),
        vm: Some(vm_to_proto(vm)),
        mode: crate::protocol::record::mode_to_proto(mode) as i32,
        mandatory_features: vm
            .features
            .iter()
            .filter(|f| super::policy::is_blocking(mode, f.required))
            .map(|f| f.name.clone())
            .collect(),
        postcopy: false,
    }
}

pub fn vm_to_proto(vm: &VmSpec) -> proto::VmSpec {
    proto::VmSpec {
        name: vm.name.clone(),
        memory_mib: vm.memory_mib,
        vcpus: vm.vcpus,
        dirty_rate_mib_s: vm.dirty_rate_mib_s,
        features: vm
            .features
            .iter()
            .map(|f| proto::FeatureRef {
                name: f.name.clone(),
                driver: f.driver().to_string(),
                required: f.required,
            })
            .collect(),
        qemu: vm.qemu.as_ref().map(machine_to_proto),
    }
}

/// A VM spec from C1. A disk format this build does not know is refused:
/// reading an image in the wrong format would hand the guest garbage.
pub fn vm_from_proto(vm: &proto::VmSpec) -> Result<VmSpec, CookieError> {
    let qemu = match &vm.qemu {
        Some(q) => Some(machine_from_proto(q).map_err(|error| CookieError::Machine {
            vm: vm.name.clone(),
            error,
        })?),
        None => None,
    };
    Ok(VmSpec {
        name: vm.name.clone(),
        memory_mib: vm.memory_mib,
        vcpus: vm.vcpus,
        dirty_rate_mib_s: vm.dirty_rate_mib_s,
        features: vm
            .features
            .iter()
            .map(|f| FeatureSpec {
                name: f.name.clone(),
                driver: f.driver.clone(),
                required: f.required,
            })
            .collect(),
        qemu,
    })
}

/// The machine for C1. Free arguments of an old spec are never sent (Begin
/// refuses such a VM).
fn machine_to_proto(m: &QemuMachine) -> proto::QemuMachine {
    proto::QemuMachine {
        kernel: m.kernel.clone(),
        append: m.append.clone(),
        machine: m.machine.clone(),
        disks: m
            .disks
            .iter()
            .map(|d| proto::Disk {
                storage: d.storage.clone(),
                path: d.path.clone(),
                format: match d.format {
                    DiskFormat::Raw => proto::DiskFormat::Raw,
                    DiskFormat::Qcow2 => proto::DiskFormat::Qcow2,
                } as i32,
                readonly: d.readonly,
            })
            .collect(),
        nics: m
            .nics
            .iter()
            .map(|n| proto::Nic {
                mac: n.mac.clone(),
                network: n.network.clone(),
                vlan: n.vlan.map(u32::from).unwrap_or_default(),
                vsi: n.vsi.as_ref().map(|v| proto::Vsi {
                    manager_id: v.manager_id.into(),
                    type_id: v.type_id,
                    type_version: v.type_version.into(),
                    instance: v.instance.clone(),
                }),
            })
            .collect(),
    }
}

fn machine_from_proto(m: &proto::QemuMachine) -> Result<QemuMachine, MachineError> {
    let disks = m
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let format = match proto::DiskFormat::try_from(d.format) {
                Ok(proto::DiskFormat::Raw) => DiskFormat::Raw,
                Ok(proto::DiskFormat::Qcow2) => DiskFormat::Qcow2,
                _ => {
                    return Err(MachineError::new(
                        format!("qemu.disks[{i}].format"),
                        &d.format.to_string(),
                        "is not a disk format (raw or qcow2)",
                    ));
                }
            };
            Ok(Disk {
                storage: d.storage.clone(),
                path: d.path.clone(),
                format,
                readonly: d.readonly,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(QemuMachine {
        machine: m.machine.clone(),
        kernel: m.kernel.clone(),
        append: m.append.clone(),
        disks,
        nics: m
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| nic_from_proto(i, n))
            .collect::<Result<_, _>>()?,
        legacy_args: Vec::new(),
    })
}

/// A NIC from the wire; numbers too wide for their field are refused
/// rather than cut (QemuMachine::check refuses the rest).
fn nic_from_proto(i: usize, n: &proto::Nic) -> Result<Nic, MachineError> {
    let narrow = |field: &str, value: u32| {
        MachineError::new(
            format!("qemu.nics[{i}].{field}"),
            &value.to_string(),
            "is out of range",
        )
    };
    let vlan = match n.vlan {
        0 => None,
        v => Some(u16::try_from(v).map_err(|_| narrow("vlan", v))?),
    };
    let vsi = match &n.vsi {
        None => None,
        Some(v) => Some(Vsi {
            manager_id: u8::try_from(v.manager_id)
                .map_err(|_| narrow("vsi.manager_id", v.manager_id))?,
            type_id: v.type_id,
            type_version: u8::try_from(v.type_version)
                .map_err(|_| narrow("vsi.type_version", v.type_version))?,
            instance: v.instance.clone(),
        }),
    };
    Ok(Nic {
        mac: n.mac.clone(),
        network: n.network.clone(),
        vlan,
        vsi,
    })
}

/// A cookie decoded for an operator: its name, size and what it says.
pub fn describe<T: Message + Described>(cookie: &T) -> CookieRecord {
    CookieRecord {
        name: T::NAME.to_string(),
        version: cookie.version(),
        bytes: cookie.encoded_len() as u64,
        summary: cookie.summary(),
    }
}

/// A cookie that can say what it carries in one line.
pub trait Described: Versioned {
    const NAME: &'static str;
    fn summary(&self) -> String;
    fn version(&self) -> u32 {
        self.protocol_version()
    }
}

impl Described for proto::Cookie1 {
    const NAME: &'static str = "C1";
    fn summary(&self) -> String {
        let mode = mode_from_proto(self.mode).map_or("no mode", |m| m.as_str());
        let mut out = match &self.vm {
            Some(vm) => format!("{} {} MiB {} vCPU {mode}", vm.name, vm.memory_mib, vm.vcpus),
            None => format!("no VM {mode}"),
        };
        if !self.mandatory_features.is_empty() {
            out.push_str(&format!(
                ", mandatory {}",
                self.mandatory_features.join(" ")
            ));
        }
        out
    }
}

impl Described for proto::Cookie2 {
    const NAME: &'static str = "C2";
    fn summary(&self) -> String {
        let mut out = if self.accepted {
            format!("accepted, incoming {}", self.incoming_address)
        } else if self.error.is_empty() {
            "refused".to_string()
        } else {
            format!("refused: {}", self.error)
        };
        push_stages(&mut out, "prepare", &self.prepare);
        push_stages(&mut out, "rollback", &self.rollback);
        out
    }
}

impl Described for proto::Cookie3 {
    const NAME: &'static str = "C3";
    fn summary(&self) -> String {
        let status = match proto::TransferStatus::try_from(self.status) {
            Ok(proto::TransferStatus::Completed) => "completed",
            Ok(proto::TransferStatus::Failed) => "failed",
            Ok(proto::TransferStatus::Cancelled) => "cancelled",
            Ok(proto::TransferStatus::SwitchoverRequested) => "in pre-copy, switchover requested",
            Ok(proto::TransferStatus::SwitchedOver) => "switched to post-copy",
            _ => "unknown status",
        };
        match &self.stats {
            Some(s) => format!(
                "transfer {status}, {} MiB, {} iterations, expected downtime {} ms",
                s.bytes_transferred >> 20,
                s.iteration,
                s.expected_downtime_ms
            ),
            None => format!("transfer {status}"),
        }
    }
}

impl Described for proto::Cookie4 {
    const NAME: &'static str = "C4";
    fn summary(&self) -> String {
        let mut out = if self.committed {
            "committed".to_string()
        } else if self.ready_for_switchover {
            "ready for the switchover".to_string()
        } else if self.error.is_empty() {
            "not committed".to_string()
        } else {
            format!("not committed: {}", self.error)
        };
        push_stages(&mut out, "finish", &self.finish);
        push_stages(&mut out, "verify", &self.verify);
        push_stages(&mut out, "rollback", &self.rollback);
        out
    }
}

/// ", prepare port-profile ok, tap failed" for a list of stage results.
fn push_stages(out: &mut String, stage: &str, results: &[proto::StageResult]) {
    if results.is_empty() {
        return;
    }
    let each: Vec<String> = results
        .iter()
        .map(|r| format!("{} {}", r.feature, status_from_proto(r.status).as_str()))
        .collect();
    out.push_str(&format!("; {stage} {}", each.join(", ")));
}

/// One stage result for a cookie.
/// The detail is clipped to what a peer accepts ([`MAX_TEXT_LEN`]): a
/// driver's text (a hook's last line) may be longer.
pub fn stage_result(feature: &str, status: StepStatus, detail: &str) -> proto::StageResult {
    proto::StageResult {
        feature: feature.to_string(),
        status: status_to_proto(status) as i32,
        detail: bounds::clip(detail, MAX_TEXT_LEN),
    }
}

/// A stage result from a cookie: status and detail.
pub fn read_stage_result(r: &proto::StageResult) -> (StepStatus, &str) {
    (status_from_proto(r.status), r.detail.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIGRATION: &str = "m-0000000000a1";
    const ATTEMPT: &str = "m-0000000000a1.1";

    fn spec() -> VmSpec {
        VmSpec {
            name: "web-01".into(),
            memory_mib: 2048,
            vcpus: 2,
            dirty_rate_mib_s: 50,
            features: vec![
                FeatureSpec {
                    name: "port-profile".into(),
                    driver: String::new(),
                    required: true,
                },
                FeatureSpec {
                    name: "hook".into(),
                    driver: "exec".into(),
                    required: false,
                },
            ],
            qemu: None,
        }
    }

    #[test]
    fn cookie1_round_trips_through_bytes() {
        let c1 = cookie1(ATTEMPT, MIGRATION, "hv-a", &spec(), Mode::Safe);
        let decoded: proto::Cookie1 = decode("C1", &c1.encode_to_vec()).unwrap();
        let incoming = check_cookie1(&decoded, |_| true).unwrap();
        assert_eq!(incoming.vm.name, "web-01");
        assert_eq!(incoming.mode, Mode::Safe);
        assert_eq!(incoming.vm.features[0].driver, "port-profile");
        assert_eq!(decoded.mandatory_features, vec!["port-profile".to_string()]);
    }

    fn qemu_spec() -> VmSpec {
        VmSpec {
            qemu: Some(QemuMachine {
                machine: "q35".into(),
                kernel: "vmlinuz".into(),
                append: "console=ttyS0".into(),
                disks: vec![Disk {
                    storage: "images".into(),
                    path: "web-01/root.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    readonly: true,
                }],
                nics: vec![Nic {
                    mac: "52:54:00:00:00:01".into(),
                    network: "lan".into(),
                    vlan: None,
                    vsi: None,
                }],
                legacy_args: Vec::new(),
            }),
            ..spec()
        }
    }

    #[test]
    fn a_typed_machine_round_trips_through_c1() {
        let c1 = cookie1(
            "m-000000000001.1",
            "m-000000000001",
            "hv-a",
            &qemu_spec(),
            Mode::Safe,
        );
        let decoded: proto::Cookie1 = decode("C1", &c1.encode_to_vec()).unwrap();
        let incoming = check_cookie1(&decoded, |_| true).unwrap();
        assert_eq!(incoming.vm.qemu, qemu_spec().qemu);
    }

    #[test]
    fn free_arguments_of_an_old_spec_never_cross_the_network() {
        let mut vm = qemu_spec();
        if let Some(q) = &mut vm.qemu {
            q.legacy_args = vec!["-drive".into(), "file=/dev/sda".into()];
        }
        let bytes = cookie1(
            "m-000000000001.1",
            "m-000000000001",
            "hv-a",
            &vm,
            Mode::Safe,
        )
        .encode_to_vec();
        assert!(!String::from_utf8_lossy(&bytes).contains("/dev/sda"));
    }

    #[test]
    fn a_malformed_machine_is_refused_naming_the_field() {
        let mut c1 = cookie1(
            "m-000000000001.1",
            "m-000000000001",
            "hv-a",
            &qemu_spec(),
            Mode::Safe,
        );
        let q = c1.vm.as_mut().unwrap().qemu.as_mut().unwrap();
        q.kernel = "../../etc/shadow".into();
        let err = check_cookie1(&c1, |_| true).unwrap_err();
        assert!(matches!(err, CookieError::Machine { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("vm web-01: qemu.kernel \"../../etc/shadow\" is a path"),
            "{err}"
        );
        // A disk format this build does not know is not read as raw.
        let mut c1 = cookie1(
            "m-000000000001.1",
            "m-000000000001",
            "hv-a",
            &qemu_spec(),
            Mode::Safe,
        );
        c1.vm.as_mut().unwrap().qemu.as_mut().unwrap().disks[0].format = 9;
        let err = check_cookie1(&c1, |_| true).unwrap_err().to_string();
        assert_eq!(
            err,
            "vm web-01: qemu.disks[0].format \"9\" is not a disk format (raw or qcow2)"
        );
    }

    #[test]
    fn unknown_mandatory_feature_is_rejected_by_name() {
        let mut c1 = cookie1(ATTEMPT, MIGRATION, "hv-a", &spec(), Mode::Safe);
        c1.mandatory_features.push("vtpm".into());
        let err = check_cookie1(&c1, |f| f == "port-profile").unwrap_err();
        assert_eq!(err, CookieError::UnknownMandatoryFeature("vtpm".into()));
        assert!(err.to_string().contains("\"vtpm\""));
    }

    #[test]
    fn non_required_features_are_not_mandatory() {
        let c1 = cookie1(ATTEMPT, MIGRATION, "hv-a", &spec(), Mode::Fast);
        assert!(check_cookie1(&c1, |f| f == "port-profile").is_ok());
    }

    #[test]
    fn incompatible_version_is_rejected() {
        let mut c1 = cookie1(ATTEMPT, MIGRATION, "hv-a", &spec(), Mode::Safe);
        c1.protocol_version = PROTOCOL_VERSION + 1;
        let err = decode::<proto::Cookie1>("C1", &c1.encode_to_vec()).unwrap_err();
        assert_eq!(
            err,
            CookieError::IncompatibleVersion {
                theirs: PROTOCOL_VERSION + 1,
                ours: PROTOCOL_VERSION
            }
        );
    }

    #[test]
    fn garbage_bytes_are_malformed() {
        let err = decode::<proto::Cookie1>("C1", &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(err, CookieError::Malformed { cookie: "C1", .. }));
    }

    #[test]
    fn cookie_without_vm_or_mode_is_malformed() {
        let mut c1 = cookie1(ATTEMPT, MIGRATION, "hv-a", &spec(), Mode::Safe);
        c1.mode = 0;
        assert!(matches!(
            check_cookie1(&c1, |_| true),
            Err(CookieError::Malformed { .. })
        ));
        c1.vm = None;
        assert!(matches!(
            check_cookie1(&c1, |_| true),
            Err(CookieError::Malformed { .. })
        ));
    }

    #[test]
    fn a_required_feature_left_out_of_the_mandatory_list_is_still_mandatory() {
        let mut c1 = cookie1(ATTEMPT, MIGRATION, "hv-a", &spec(), Mode::Safe);
        c1.mandatory_features.clear();
        let err = check_cookie1(&c1, |f| f == "hook").unwrap_err();
        assert_eq!(
            err,
            CookieError::UnknownMandatoryFeature("port-profile".into())
        );
        // Fast mode blocks on nothing: the same VM is accepted there.
        let mut c1 = cookie1(ATTEMPT, MIGRATION, "hv-a", &spec(), Mode::Fast);
        c1.mandatory_features.clear();
        assert!(check_cookie1(&c1, |f| f == "hook").is_ok());
    }

    fn bounds_error(c1: &proto::Cookie1) -> String {
        match decode::<proto::Cookie1>("C1", &c1.encode_to_vec()) {
            Err(CookieError::OutOfBounds(e)) => e.to_string(),
            other => panic!("expected a bounds error, got {other:?}"),
        }
    }

    #[test]
    fn every_string_list_and_size_of_c1_is_checked_by_field() {
        let good = cookie1(ATTEMPT, MIGRATION, "hv-a", &spec(), Mode::Safe);
        assert!(decode::<proto::Cookie1>("C1", &good.encode_to_vec()).is_ok());
        type Change = Box<dyn Fn(&mut proto::Cookie1)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|c| c.vm.as_mut().unwrap().name = "web 01".into()),
                "C1.vm.name \"web 01\"",
            ),
            (
                Box::new(|c| c.vm.as_mut().unwrap().memory_mib = 0),
                "C1.vm.memory_mib is 0",
            ),
            (
                Box::new(|c| c.vm.as_mut().unwrap().vcpus = 0),
                "C1.vm.vcpus is 0",
            ),
            (
                Box::new(|c| c.source = "hv-a\u{1b}]0;x\u{7}".into()),
                "C1.source \"hv-a\\u{1b}]0;x\\u{7}\"",
            ),
            (
                Box::new(|c| c.attempt_id = "m-0000000000a1.x".into()),
                "C1.attempt_id",
            ),
            (
                Box::new(|c| c.attempt_id = "m-0000000000b2.1".into()),
                "is not an attempt of migration m-0000000000a1",
            ),
            (
                Box::new(|c| c.migration_id = "../../etc".into()),
                "C1.migration_id",
            ),
            (
                Box::new(|c| c.vm.as_mut().unwrap().features[1].name = "x".repeat(65)),
                "C1.vm.features[1].name",
            ),
            (
                Box::new(|c| {
                    let f = c.vm.as_ref().unwrap().features[0].clone();
                    c.vm.as_mut().unwrap().features = vec![f; MAX_FEATURES + 1];
                }),
                "C1.vm.features has 65 entries; at most 64",
            ),
            (
                Box::new(|c| {
                    c.vm.as_mut().unwrap().qemu = Some(proto::QemuMachine {
                        append: "a".repeat(MAX_QEMU_BYTES),
                        ..Default::default()
                    })
                }),
                "C1.vm.qemu is",
            ),
            (
                Box::new(|c| c.mandatory_features.push("".into())),
                "C1.mandatory_features[1]",
            ),
        ];
        for (change, expected) in cases {
            let mut c1 = good.clone();
            change(&mut c1);
            let err = bounds_error(&c1);
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }

    #[test]
    fn texts_and_lists_in_c2_and_c4_are_capped_and_our_own_are_clipped_to_fit() {
        let long = "x".repeat(MAX_TEXT_LEN + 1);
        let mut c4 = proto::Cookie4 {
            protocol_version: PROTOCOL_VERSION,
            attempt_id: ATTEMPT.into(),
            committed: true,
            finish: vec![stage_result("port-profile", StepStatus::Ok, &long)],
            ..Default::default()
        };
        // Built by stage_result, the detail was clipped: it passes.
        assert!(decode::<proto::Cookie4>("C4", &c4.encode_to_vec()).is_ok());
        c4.finish[0].detail = long.clone();
        let err = decode::<proto::Cookie4>("C4", &c4.encode_to_vec()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("C4.finish[0].detail is 4097 bytes"),
            "{err}"
        );
        let c2 = proto::Cookie2 {
            protocol_version: PROTOCOL_VERSION,
            attempt_id: ATTEMPT.into(),
            error: long,
            ..Default::default()
        };
        let err = decode::<proto::Cookie2>("C2", &c2.encode_to_vec()).unwrap_err();
        assert!(
            err.to_string().starts_with("C2.error is 4097 bytes"),
            "{err}"
        );
    }
}
