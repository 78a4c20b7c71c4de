//! The invariants of DESIGN.md §2, checked by the simulator after every step
//! and once the cluster has settled.
//!
//! 1. A guest's CPUs run on at most one host at any instant; after settling
//!    on exactly one.
//! 2. After settling, no feature state is left on a host where the VM does
//!    not run unless it is listed as a pending rollback there; and none of a
//!    VM's features was silently lost where it runs.
//! 3. Every attempt ends with an outcome or is visibly `unresolved`; an
//!    unresolved attempt is never resumed on the source without the
//!    destination's answer (checked when the source resumes, in world.rs),
//!    and a destination never commits after answering "not committed".
//! 4. Source and destination journals agree on every attempt, and the guest
//!    runs where the latest attempt's record says.

use std::collections::BTreeMap;

use super::world::{GuestState, World};
use crate::protocol::destination::DestinationState;
use crate::protocol::{Mode, Outcome, StepStatus};

impl World {
    /// After every step: never two running copies.
    pub(super) fn check_step(&mut self) {
        let mut running: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for host in &self.hosts {
            for (vm, g) in &host.guests {
                if g.state == GuestState::Running {
                    running.entry(vm).or_default().push(&host.name);
                }
            }
        }
        let twice: Vec<String> = running
            .into_iter()
            .filter(|(_, hosts)| hosts.len() > 1)
            .map(|(vm, hosts)| format!("{vm} runs on {} at once", hosts.join(" and ")))
            .collect();
        for v in twice {
            // Report each double run once.
            if !self.violations.iter().any(|old| old.ends_with(&v)) {
                self.violation(v);
            }
        }
    }

    /// Once nothing is left to happen.
    pub(super) fn check_settled(&mut self) {
        let mut found = Vec::new();
        // A host lost for good is left out: its guests, its switch and its
        // journal went with it. What the live hosts hold must still add up.
        let up: Vec<bool> = self
            .hosts
            .iter()
            .map(|h| h.agent.is_some() || h.lost)
            .collect();
        if up.iter().any(|u| !u) {
            found.push("an agent is still down after the chaos window".to_string());
        }

        // (1) exactly one running copy of each VM.
        let vms: Vec<String> = self
            .scenario
            .vms
            .iter()
            .map(|(vm, _)| vm.name.clone())
            .collect();
        let mut runs_on: BTreeMap<String, usize> = BTreeMap::new();
        for vm in &vms {
            let running: Vec<usize> = (0..self.hosts.len())
                .filter(|&h| {
                    self.hosts[h]
                        .guests
                        .get(vm)
                        .is_some_and(|g| g.state == GuestState::Running)
                })
                .collect();
            match running.as_slice() {
                [h] => {
                    runs_on.insert(vm.clone(), *h);
                }
                [] if self.lost_vms.contains(vm) => {} // lost with its host
                [] => found.push(format!("{vm} runs nowhere")),
                _ => {} // reported by check_step
            }
            for (h, host) in self.hosts.iter().enumerate() {
                if let Some(g) = host.guests.get(vm)
                    && g.state != GuestState::Running
                    && runs_on.get(vm) != Some(&h)
                {
                    found.push(format!(
                        "a {:?} copy of {vm} is left on {}",
                        g.state, host.name
                    ));
                }
            }
        }

        // (2) feature state only where the VM runs, or listed as pending.
        for (h, host) in self.hosts.iter().enumerate().filter(|(_, h)| !h.lost) {
            for (vm, feature) in &host.switch {
                if runs_on.get(vm) == Some(&h) {
                    continue;
                }
                let pending = host
                    .journal
                    .pending
                    .values()
                    .any(|p| &p.vm == vm && &p.feature == feature);
                if !pending {
                    found.push(format!(
                        "{feature} of {vm} is left on {}'s switch, where {vm} does not run, and is not listed as pending",
                        host.name
                    ));
                }
            }
        }
        // ... and none lost where it runs: every feature the latest attempt
        // that brought the VM here (or the boot) set up is still there.
        for (vm, &h) in &runs_on {
            // The destination's own journal says what it set up: the
            // source's record may never have heard (a source lost for good).
            let arrived = self
                .begun
                .iter()
                .rev()
                .filter(|(_, v, _)| v == vm)
                .find_map(|(_, _, id)| self.hosts[h].journal.destinations.get(id))
                .filter(|d| d.is_committed());
            let spec = &self
                .scenario
                .vms
                .iter()
                .find(|(v, _)| &v.name == vm)
                .expect("a scenario VM")
                .0;
            for (i, f) in spec.features.iter().enumerate() {
                let expected = match arrived {
                    Some(a) => a
                        .features
                        .get(i)
                        .is_some_and(|r| r.finish == StepStatus::Ok),
                    None => true,
                };
                let there = self.hosts[h].switch.contains(&(vm.clone(), f.name.clone()));
                if expected && !there {
                    found.push(format!(
                        "{} of {vm} was set up on {} but is gone, though {vm} runs there{}",
                        f.name,
                        self.hosts[h].name,
                        arrived
                            .map(|a| format!(" (it arrived with {})", a.attempt_id))
                            .unwrap_or_default()
                    ));
                }
            }
        }

        // (3) every attempt has an outcome and is over on both sides.
        for host in self.hosts.iter().filter(|h| !h.lost) {
            for a in host.journal.sources.values() {
                match a.record.outcome {
                    None => found.push(format!(
                        "{} on {} has no outcome ({:?})",
                        a.attempt_id, host.name, a.state
                    )),
                    Some(Outcome::Unresolved) => found.push(format!(
                        "{} on {} is still unresolved after every agent is back",
                        a.attempt_id, host.name
                    )),
                    Some(_) if !a.is_done() => found.push(format!(
                        "{} on {} has an outcome but is not done ({:?})",
                        a.attempt_id, host.name, a.state
                    )),
                    Some(_) => {}
                }
            }
            for a in host.journal.destinations.values() {
                if !a.is_finished() {
                    found.push(format!(
                        "{} on {} never finished ({:?})",
                        a.attempt_id, host.name, a.state
                    ));
                }
            }
        }

        // (4) the journals agree, with each other and with the guests.
        let lost = |name: &str| self.hosts.iter().any(|h| h.name == name && h.lost);
        for host in self.hosts.iter().filter(|h| !h.lost) {
            for d in host.journal.destinations.values() {
                if lost(&d.source) {
                    continue;
                }
                let Some(s) = self
                    .hosts
                    .iter()
                    .find(|x| x.name == d.source)
                    .and_then(|x| x.journal.sources.get(&d.attempt_id))
                else {
                    found.push(format!(
                        "{} is journaled on {} but not on its source {}",
                        d.attempt_id, host.name, d.source
                    ));
                    continue;
                };
                let committed = d.state == DestinationState::Committed;
                let moved = matches!(
                    s.record.outcome,
                    Some(Outcome::Succeeded | Outcome::Degraded)
                );
                if committed != moved || committed != s.record.committed {
                    found.push(format!(
                        "journals disagree on {}: {} says {:?}, {} says {:?} (committed={})",
                        d.attempt_id,
                        host.name,
                        d.state,
                        d.source,
                        s.record.outcome,
                        s.record.committed
                    ));
                }
                // Safe mode never commits past a required feature's failure.
                if committed && d.mode == Mode::Safe {
                    for (spec, f) in d.vm.features.iter().zip(&d.features) {
                        if spec.required
                            && (f.prepare != StepStatus::Ok || f.finish != StepStatus::Ok)
                        {
                            found.push(format!(
                                "{} committed in safe mode although required {} did not succeed",
                                d.attempt_id, spec.name
                            ));
                        }
                    }
                }
            }
            for s in host.journal.sources.values() {
                if lost(&s.destination) {
                    continue;
                }
                let moved = matches!(
                    s.record.outcome,
                    Some(Outcome::Succeeded | Outcome::Degraded)
                );
                let committed = self
                    .hosts
                    .iter()
                    .find(|x| x.name == s.destination)
                    .and_then(|x| x.journal.destinations.get(&s.attempt_id))
                    .is_some_and(|d| d.state == DestinationState::Committed);
                if moved && !committed {
                    found.push(format!(
                        "{} ended {:?} on {} but {} has no commit",
                        s.attempt_id, s.record.outcome, host.name, s.destination
                    ));
                }
            }
        }
        for vm in &vms {
            // The latest attempt that reached the journal (a crash during
            // Begin's write leaves none).
            let latest = self
                .begun
                .iter()
                .rev()
                .filter(|(_, v, _)| v == vm)
                .find_map(|(h, _, id)| self.hosts[*h].journal.sources.get(id));
            let (Some(latest), Some(&h)) = (latest, runs_on.get(vm)) else {
                continue;
            };
            if lost(&latest.host) {
                continue;
            }
            if latest.record.running_on != self.hosts[h].name {
                found.push(format!(
                    "{vm} runs on {} but its latest attempt {} says {}",
                    self.hosts[h].name, latest.attempt_id, latest.record.running_on
                ));
            }
        }
        for v in found {
            self.violation(v);
        }
    }
}
