//! Admission: every check Begin (on the source) and Prepare (on the
//! destination) apply before they start anything, each named and with its
//! verdict. Begin and Prepare refuse at the first check that fails;
//! `tern check` and the console's picker show them all. Both read the same
//! lists, so a check and the phase it stands for cannot disagree, and
//! computing a list changes nothing: no lock, no slot, no journal write.

use super::{HostCore, Refusal};
use crate::hypervisor::{Guest, GuestState};
use crate::proto;
use crate::protocol::cookies::{self, CookieError, Incoming};
use crate::protocol::destination::{
    self, FreeCapacity, Known, Leftover, PrepareRefusal, busy_with, check_new_attempt,
};
use crate::protocol::{Mode, PROTOCOL_VERSION, VmSpec, policy};

/// The ids a checked C1 carries. Nothing is ever started or registered
/// under them (a check only reads), and hosts make their ids by hashing a
/// salt and a counter into 48 bits, so a real attempt with the all-zero id
/// is not to be expected.
pub const CHECK_MIGRATION_ID: &str = "m-000000000000";
pub const CHECK_ATTEMPT_ID: &str = "m-000000000000.1";

/// One admission check and its verdict: what was found, or the refusal
/// the phase would answer with.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: &'static str,
    pub host: String,
    pub verdict: Result<String, Refusal>,
}

impl Check {
    pub fn new(name: &'static str, host: &str, verdict: Result<String, Refusal>) -> Check {
        Check {
            name,
            host: host.to_string(),
            verdict,
        }
    }

    pub fn to_proto(&self) -> proto::AdmissionCheck {
        proto::AdmissionCheck {
            name: self.name.to_string(),
            host: self.host.clone(),
            ok: self.verdict.is_ok(),
            detail: match &self.verdict {
                Ok(found) => found.clone(),
                Err(refusal) => refusal.to_string(),
            },
        }
    }
}

/// The refusal of the first check that failed: what the phase answers.
pub fn first_refusal(checks: &[Check]) -> Option<Refusal> {
    checks.iter().find_map(|c| c.verdict.clone().err())
}

/// Begin's checks, and what Begin goes on with when all pass.
pub(super) struct SourceAdmission<'g> {
    pub checks: Vec<Check>,
    pub guest: &'g Guest,
    /// Where the destination's migration stream listens (empty when the
    /// destination check failed).
    pub incoming_host: String,
}

/// Prepare's checks, and what Prepare goes on with when all pass.
pub(super) struct PrepareAdmission {
    pub checks: Vec<Check>,
    /// `None` when C1 could not be read far enough (another protocol
    /// version, an unwellformed machine): a check then says why.
    pub ready: Option<Ready>,
}

pub(super) struct Ready {
    pub incoming: Incoming,
    pub free: FreeCapacity,
    pub already_here: bool,
    pub busy: Option<String>,
}

impl HostCore {
    /// `tern check` on the source: Begin's checks of moving `vm` to
    /// `destination` in `mode`, and the C1 Begin would send for it, for the
    /// destination's checks (none when Begin's own checks found no guest
    /// to send). Reads the core; changes nothing.
    pub fn check_source(
        &self,
        vm: &str,
        destination: &str,
        mode: Mode,
        postcopy: bool,
        guests: &[Guest],
    ) -> Result<(Vec<Check>, proto::Cookie1), Refusal> {
        let admission = self.source_admission(vm, destination, guests)?;
        let c1 = self.check_cookie1(&admission.guest.spec, mode, postcopy);
        Ok((admission.checks, c1))
    }

    /// `tern check` on the destination: Prepare's checks of `cookie1`.
    /// Reads the core; changes nothing.
    pub fn check_prepare(
        &self,
        cookie1: &[u8],
        guests: &[Guest],
        from: Option<&str>,
        machine: Result<String, Refusal>,
    ) -> Result<Vec<Check>, Refusal> {
        self.prepare_admission(cookie1, guests, from, Some(machine))
            .map(|a| a.checks)
    }

    /// Every check Begin applies to moving `vm` from here to
    /// `destination`, in Begin's order. `Err`: the request itself is
    /// wrong (no VM named, an unknown destination, a VM not on this host),
    /// whatever this host's state.
    pub(super) fn source_admission<'g>(
        &self,
        vm: &str,
        destination: &str,
        guests: &'g [Guest],
    ) -> Result<SourceAdmission<'g>, Refusal> {
        let name = self.cfg.name.clone();
        if vm.is_empty() {
            return Err(Refusal::InvalidArgument(
                "no VM named in the request".into(),
            ));
        }
        if !self.cfg.hosts.iter().any(|h| h == destination) {
            return Err(Refusal::NotFound(format!(
                "no host named {destination:?} in the inventory (hosts: {})",
                self.cfg.hosts.join(", ")
            )));
        }
        let Some(guest) = guests.iter().find(|g| g.spec.name == vm) else {
            return Err(Refusal::NotFound(format!("no VM named {vm} on {name}")));
        };
        let check = |check: &'static str, verdict| Check::new(check, &name, verdict);
        let mut checks = Vec::new();
        checks.push(check("agent", self.agent_check()));
        let incoming_host = self.cfg.migration_hosts.get(destination).cloned();
        checks.push(check(
            "destination",
            if destination == name {
                Err(Refusal::InvalidArgument(format!(
                    "VM {vm} already runs on {destination}"
                )))
            } else {
                match &incoming_host {
                    Some(at) => Ok(format!("{destination} receives migration streams at {at}")),
                    None => Err(Refusal::FailedPrecondition(format!(
                        "{name} knows no migration address for {destination}"
                    ))),
                }
            },
        ));
        checks.push(check("vm state", self.guest_check(guest)));
        // A machine from before machines were typed (free QEMU arguments, a
        // kernel's path) would reach the destination without what it named.
        checks.push(check(
            "definition",
            match guest.spec.qemu.as_ref().map(|m| m.check()) {
                Some(Err(e)) => Err(Refusal::FailedPrecondition(format!(
                    "VM {vm} cannot migrate as it is defined on {name}: {e}"
                ))),
                Some(Ok(())) => Ok(format!("{vm} has a typed QEMU machine")),
                None => Ok(format!("{vm} needs no QEMU machine")),
            },
        ));
        checks.push(check(
            "lock",
            match self.locks.get(vm) {
                Some(holder) => {
                    let phase = self
                        .sources
                        .get(holder)
                        .map(|s| format!("{:?}", s.attempt.record.current_phase()).to_lowercase())
                        .unwrap_or_default();
                    Err(Refusal::AlreadyExists(format!(
                        "VM {vm} is already migrating (migration {holder}, in {phase}); abort it or wait for its outcome"
                    )))
                }
                None => Ok(format!("{vm} is not migrating")),
            },
        ));
        // A repair's stage landing after the VM left would leave its
        // feature state behind here.
        checks.push(check(
            "repair",
            if self.is_repairing(vm) {
                Err(Refusal::Busy(format!(
                    "VM {vm} is being repaired on {name}; migrate it once the repair has ended"
                )))
            } else {
                Ok(format!("{vm} is not being repaired"))
            },
        ));
        let outgoing = self.outgoing();
        let max = self.cfg.max_outgoing;
        checks.push(check(
            "limits",
            if outgoing >= max as usize {
                Err(Refusal::ResourceExhausted(format!(
                    "{name} already sources {outgoing} migrations (max_outgoing = {max}); wait for one to end"
                )))
            } else {
                Ok(format!(
                    "{name} sources {outgoing} migrations (max_outgoing = {max})"
                ))
            },
        ));
        Ok(SourceAdmission {
            checks,
            guest,
            incoming_host: incoming_host.unwrap_or_default(),
        })
    }

    fn agent_check(&self) -> Result<String, Refusal> {
        let name = &self.cfg.name;
        match self.stopping {
            Some(_) => Err(Refusal::Unavailable(format!(
                "agent {name} is shutting down"
            ))),
            None => Ok(format!("agent {name} is up")),
        }
    }

    /// Whether `guest` is this host's to move now: running here, not
    /// arriving, not a copy that must not run.
    fn guest_check(&self, guest: &Guest) -> Result<String, Refusal> {
        let name = &self.cfg.name;
        let vm = &guest.spec.name;
        // Arriving: until its attempt here has ended (the guest seen to run,
        // or rolled back), the guest is not this host's to move.
        let arriving = self
            .destinations
            .values()
            .find(|d| &d.attempt.vm.name == vm)
            .map(|d| d.attempt.attempt_id.clone());
        if guest.state == GuestState::Incoming || arriving.is_some() {
            return Err(Refusal::FailedPrecondition(format!(
                "VM {vm} is arriving on {name} (attempt {}), not running here yet",
                arriving.unwrap_or_default()
            )));
        }
        // A copy that must not run (its kill failed), or a guest left
        // paused by a failed resume: moving it would move the wrong thing.
        if let Some(p) = self
            .pending
            .values()
            .find(|p| &p.vm == vm && matches!(p.work, super::Work::Kill | super::Work::Resume))
        {
            let what = match p.work {
                super::Work::Kill => "a stale copy that must be killed",
                _ => "paused after a failed resume",
            };
            return Err(Refusal::FailedPrecondition(format!(
                "VM {vm} on {name} is {what} (pending {} from migration {}: {}); \
                 `tern rollback {}` runs it now",
                p.work.as_str(),
                p.migration_id,
                p.error,
                p.migration_id
            )));
        }
        if guest.state != GuestState::Running {
            return Err(Refusal::FailedPrecondition(format!(
                "VM {vm} is paused on {name}; only a running guest is migrated"
            )));
        }
        Ok(format!("{vm} runs on {name}"))
    }

    /// The C1 Begin would send for `spec` (its features' drivers as this
    /// host names them) in `mode`, under the placeholder ids a check uses.
    fn check_cookie1(&self, spec: &VmSpec, mode: Mode, postcopy: bool) -> proto::Cookie1 {
        let spec = self.with_drivers(spec);
        let mut c1 = cookies::cookie1(
            CHECK_ATTEMPT_ID,
            CHECK_MIGRATION_ID,
            &self.cfg.name,
            &spec,
            mode,
        );
        c1.postcopy = postcopy;
        c1
    }

    /// `spec` with each feature's driver as this host configures it: what
    /// Begin snapshots into C1.
    pub(super) fn with_drivers(&self, spec: &VmSpec) -> VmSpec {
        let mut spec = spec.clone();
        for feature in &mut spec.features {
            if let Some(driver) = self.cfg.features.get(&feature.name) {
                feature.driver = driver.clone();
            }
        }
        spec
    }

    /// Every check Prepare applies to `cookie1`, in Prepare's order.
    /// `machine`: this host's verdict on C1's machine, which the agent
    /// reads from its hypervisor before the core is asked (it needs IO);
    /// `None` when it was already applied. `Err`: a C1 Prepare refuses
    /// whatever this host's state (malformed, from a host that may not
    /// send it, naming ids it must not).
    pub(super) fn prepare_admission(
        &self,
        cookie1: &[u8],
        guests: &[Guest],
        from: Option<&str>,
        machine: Option<Result<String, Refusal>>,
    ) -> Result<PrepareAdmission, Refusal> {
        let name = self.cfg.name.clone();
        let check = |check: &'static str, verdict| Check::new(check, &name, verdict);
        let mut checks = vec![check("agent", self.agent_check())];
        checks.push(check(
            "drain",
            match self.draining {
                true => Err(Refusal::FailedPrecondition(format!(
                    "{name} is draining and accepts no incoming migrations (`tern undrain {name}` ends that)"
                ))),
                false => Ok(format!("{name} is not draining")),
            },
        ));
        let c1: proto::Cookie1 = match cookies::decode("C1", cookie1) {
            Ok(c1) => c1,
            Err(e @ CookieError::IncompatibleVersion { .. }) => {
                checks.push(check("protocol version", Err(cookie_refusal(e))));
                return Ok(PrepareAdmission {
                    checks,
                    ready: None,
                });
            }
            Err(e) => return Err(cookie_refusal(e)),
        };
        checks.push(check(
            "protocol version",
            Ok(format!("version {PROTOCOL_VERSION} on both hosts")),
        ));
        let features = &self.cfg.features;
        let knows = |f: &str| features.contains_key(f);
        let incoming = match cookies::check_cookie1(&c1, knows) {
            Ok(incoming) => {
                checks.push(check("features", Ok(self.features_found(&incoming))));
                incoming
            }
            Err(e @ CookieError::UnknownMandatoryFeature(_)) => {
                checks.push(check("features", Err(cookie_refusal(e))));
                // The rest of the checks still have something to say.
                match cookies::check_cookie1(&c1, |_| true) {
                    Ok(incoming) => incoming,
                    Err(e) => return self.unreadable_machine(checks, e),
                }
            }
            Err(e) => return self.unreadable_machine(checks, e),
        };
        if let Some(machine) = machine {
            checks.push(check("machine", machine));
        }
        let incoming = match &self.cfg.postcopy {
            Err(why) => incoming.without_postcopy(why.clone()),
            Ok(()) => incoming,
        };
        if let Some(from) = from
            && from != incoming.source
        {
            return Err(Refusal::PermissionDenied(format!(
                "{from} may not prepare attempt {} for source {}: a host prepares only its own migrations",
                incoming.attempt_id, incoming.source
            )));
        }
        if incoming.source == name {
            return Err(Refusal::InvalidArgument(format!(
                "C1.source is {name} itself: a host never receives its own migration"
            )));
        }
        if !self.cfg.hosts.contains(&incoming.source) {
            return Err(Refusal::InvalidArgument(format!(
                "C1.source: no host named {} in the inventory of {name} (hosts: {})",
                incoming.source,
                self.cfg.hosts.join(", ")
            )));
        }
        // An id of a migration this host sources: only a confused or
        // forged C1 names it, and preparing it would give this host both
        // sides of one attempt.
        if let Some(s) = self.sources.get(&incoming.migration_id) {
            return Err(Refusal::AlreadyExists(format!(
                "attempt {} belongs to migration {}, which {name} sources (its attempt {} is {name}'s); \
                 a host never receives its own migration",
                incoming.attempt_id, incoming.migration_id, s.attempt.attempt_id
            )));
        }
        let known = Known {
            aborted: self.tombstones.contains(&incoming.attempt_id),
            running: self.destinations.contains_key(&incoming.attempt_id),
            journaled: self.ended.contains_key(&incoming.attempt_id)
                || self.committed.contains(&incoming.attempt_id),
        };
        check_new_attempt(&incoming.attempt_id, &name, known).map_err(prepare_refusal)?;
        let vm = incoming.vm.name.clone();
        // What an earlier attempt of the VM still has here. Pending work on a
        // feature without a driver here holds nothing that could clash.
        let releasing = self
            .locks
            .get(&vm)
            .and_then(|m| self.sources.get(m))
            .filter(|s| s.live)
            .map(|s| s.attempt.attempt_id.clone());
        let running: Vec<String> = self
            .destinations
            .values()
            .filter(|d| d.attempt.vm.name == vm)
            .map(|d| d.attempt.attempt_id.clone())
            .chain(releasing)
            .collect();
        let leftovers: Vec<Leftover> = self
            .pending
            .values()
            .filter(|p| p.vm == vm && p.holds_state(&self.cfg.features))
            .map(|p| match p.work.stage() {
                Some(stage) => Leftover::Pending {
                    attempt_id: &p.attempt_id,
                    feature: &p.feature,
                    stage,
                },
                None => Leftover::Guest {
                    attempt_id: &p.attempt_id,
                    work: p.work.as_str(),
                },
            })
            .chain(
                running
                    .iter()
                    .map(|id| Leftover::Running { attempt_id: id }),
            )
            .collect();
        let busy = busy_with(&vm, &name, &leftovers);
        let load = self.load(guests);
        let free = FreeCapacity {
            memory_mib: self
                .cfg
                .capacity
                .memory_mib
                .saturating_sub(load.memory_used_mib),
            vcpus: self.cfg.capacity.vcpus.saturating_sub(load.vcpus_used),
        };
        let already_here = guests.iter().any(|g| g.spec.name == vm);
        let [pending, guest, capacity] =
            destination::admission(&incoming.vm, &name, free, already_here, busy.as_deref());
        let arriving = self.incoming();
        let max = self.cfg.max_incoming;
        // An earlier attempt of the VM still here is the reason to give
        // (it counts as arriving, and ends by itself).
        let limits = if busy.is_none() && arriving >= max as usize {
            Err(Refusal::Busy(format!(
                "destination busy: {name} already receives {arriving} migrations (max_incoming = {max})"
            )))
        } else {
            Ok(format!(
                "{name} receives {arriving} migrations (max_incoming = {max})"
            ))
        };
        let verdict = |(check_name, v): (&'static str, Result<String, PrepareRefusal>)| {
            check(check_name, v.map_err(prepare_refusal))
        };
        checks.push(verdict(pending));
        checks.push(check("limits", limits));
        checks.push(verdict(guest));
        checks.push(verdict(capacity));
        Ok(PrepareAdmission {
            checks,
            ready: Some(Ready {
                incoming,
                free,
                already_here,
                busy,
            }),
        })
    }

    /// C1's features as this host has them: the drivers of those it knows,
    /// and what fast mode does without the others.
    fn features_found(&self, incoming: &Incoming) -> String {
        let name = &self.cfg.name;
        if incoming.vm.features.is_empty() {
            return format!("{} needs no features", incoming.vm.name);
        }
        incoming
            .vm
            .features
            .iter()
            .map(|f| match self.cfg.features.get(&f.name) {
                Some(driver) => format!("{} (driver {driver})", f.name),
                None if policy::is_blocking(incoming.mode, f.required) => {
                    format!("{} missing", f.name)
                }
                None => format!(
                    "{} has no driver on {name}: {} mode goes on without it, degraded",
                    f.name,
                    incoming.mode.as_str()
                ),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// C1's machine is not well formed (whatever host it goes to): the
    /// machine check says so, and nothing after it can be checked.
    fn unreadable_machine(
        &self,
        mut checks: Vec<Check>,
        e: CookieError,
    ) -> Result<PrepareAdmission, Refusal> {
        match e {
            CookieError::Machine { .. } => {
                checks.push(Check::new(
                    "machine",
                    &self.cfg.name,
                    Err(cookie_refusal(e)),
                ));
                Ok(PrepareAdmission {
                    checks,
                    ready: None,
                })
            }
            e => Err(cookie_refusal(e)),
        }
    }
}

pub(super) fn prepare_refusal(r: PrepareRefusal) -> Refusal {
    match r {
        PrepareRefusal::NoCapacity(m) => Refusal::ResourceExhausted(m),
        PrepareRefusal::AlreadyHere(m) => Refusal::AlreadyExists(m),
        PrepareRefusal::Aborted(m) => Refusal::FailedPrecondition(m),
        PrepareRefusal::Busy(m) => Refusal::Busy(m),
    }
}

pub(super) fn cookie_refusal(e: CookieError) -> Refusal {
    match e {
        CookieError::IncompatibleVersion { .. } => Refusal::FailedPrecondition(e.to_string()),
        _ => Refusal::InvalidArgument(e.to_string()),
    }
}
