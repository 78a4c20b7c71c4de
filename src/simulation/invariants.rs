//! The invariants of DESIGN.md §2, and the evacuations', checked by the
//! simulator after every step and once the cluster has settled.
//!
//! 1. A guest's CPUs run on at most one host at any instant; after settling
//!    on exactly one. A copy is never resumed once another copy of the VM
//!    ran after it was made (checked when a guest resumes, in world.rs):
//!    that is how a guest ends up running twice against one disk.
//! 2. After settling, no feature state is left on a host where the VM does
//!    not run unless it is listed as pending work there; and none of a
//!    VM's features was silently lost where it runs.
//! 3. Every attempt ends with an outcome or is visibly `unresolved` (one that
//!    did not simply succeed says why: a cause kind and the host), and a
//!    destination never commits after answering "not committed" (checked
//!    at its journal write, in world.rs).
//!    A verification that failed on the destination makes the outcome
//!    degraded, never succeeded.
//! 4. Source and destination journals agree on every attempt, and the guest
//!    runs where the latest attempt's record says.
//!
//! Evacuations: no host ever sources more than `max_outgoing` or receives
//! more than `max_incoming` migrations at once; no VM is placed on a host
//! the operator excluded, one that already failed it, or one whose last
//! `Capacity` answer said it drains (or that never answered); every
//! evacuation of a host that is still there ends, with every VM moved,
//! listed as failed, or cancelled.

use std::collections::BTreeMap;

use super::world::{GuestState, World};
use crate::host::evacuation::job::VmState;
use crate::protocol::destination::DestinationState;
use crate::protocol::repair::RepairResult;
use crate::protocol::{Mode, Outcome, Phase, Stage, StepStatus};

impl World {
    /// After every step: never two running copies, never a host over its limits.
    pub(super) fn check_step(&mut self) {
        let mut running: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for host in &self.hosts {
            for (vm, g) in &host.guests {
                if g.state == GuestState::Running {
                    running.entry(vm).or_default().push(&host.name);
                }
            }
        }
        let mut found: Vec<String> = running
            .into_iter()
            .filter(|(_, hosts)| hosts.len() > 1)
            .map(|(vm, hosts)| format!("{vm} runs on {} at once", hosts.join(" and ")))
            .collect();
        let (out, inc) = (self.scenario.max_outgoing, self.scenario.max_incoming);
        for host in &self.hosts {
            let Some(core) = &host.core else { continue };
            // Counted from what the operator sees, not by the core's own
            // count: a migration holds one of its source's slots until its
            // guest's fate is decided (Confirm starts, it ends, or it is
            // unresolved, guest paused, waiting for its peer), and one of
            // its destination's until the guest runs there or the
            // destination rolls back. A freed slot is never taken back.
            let sourcing = core
                .migrations()
                .filter(|r| {
                    r.source == host.name
                        && r.outcome.is_none()
                        && r.phase(Phase::Confirm).status == StepStatus::Pending
                })
                .count();
            if sourcing > out as usize {
                found.push(format!(
                    "{} sources {sourcing} migrations at once (max_outgoing = {out})",
                    host.name
                ));
            }
            let receiving = core
                .arriving()
                .filter_map(|(id, _)| core.destination_attempt(id))
                .filter(|d| {
                    !matches!(
                        d.state,
                        DestinationState::Committed
                            | DestinationState::RollingBack { .. }
                            | DestinationState::RolledBack
                    )
                })
                .count();
            if receiving > inc as usize {
                found.push(format!(
                    "{} receives {receiving} migrations at once (max_incoming = {inc})",
                    host.name
                ));
            }
        }
        for v in found {
            // Report each once.
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
        if self.hosts.iter().any(|h| h.core.is_none() && !h.lost) {
            found.push("an agent is still down after the chaos window".to_string());
        }
        let views: Vec<_> = self.hosts.iter().map(|h| h.disk.view()).collect();

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
                [] if self.lost_vms.contains(vm) => {} // died with its host
                [] => found.push(format!("{vm} runs nowhere")),
                _ => {} // reported by check_step
            }
            for (h, host) in self.hosts.iter().enumerate() {
                // A commit that lost its guest keeps what is left of it for
                // the operator to decide (its source cannot, being gone).
                let kept_for_the_operator = self.lost_vms.contains(vm)
                    && views[h]
                        .destinations
                        .values()
                        .any(|d| &d.vm.name == vm && d.lost().is_some());
                if let Some(g) = host.guests.get(vm)
                    && g.state != GuestState::Running
                    && runs_on.get(vm) != Some(&h)
                    && !kept_for_the_operator
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
                if runs_on.get(vm) == Some(&h) || self.lost_vms.contains(vm) {
                    continue;
                }
                let pending = views[h]
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
                .find_map(|(_, _, id)| views[h].destinations.get(id))
                .filter(|d| d.guest_runs());
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
                    None => self.hosts[h].spec.knows.contains(&f.name.as_str()),
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
        let lost = |name: &str| self.hosts.iter().any(|h| h.name == name && h.lost);
        for (h, host) in self.hosts.iter().enumerate().filter(|(_, h)| !h.lost) {
            for a in views[h].sources.values() {
                match a.record.outcome {
                    None => found.push(format!(
                        "{} on {} has no outcome ({:?})",
                        a.attempt_id, host.name, a.state
                    )),
                    Some(Outcome::Unresolved) => found.push(format!(
                        "{} on {} is still unresolved after every agent is back",
                        a.attempt_id, host.name
                    )),
                    // Only a guest that really died is reported lost.
                    Some(Outcome::Lost) if !self.lost_vms.contains(&a.vm.name) => {
                        found.push(format!(
                            "{} on {} reports {} lost, but it is not",
                            a.attempt_id, host.name, a.vm.name
                        ))
                    }
                    Some(_) if !a.is_done() => found.push(format!(
                        "{} on {} has an outcome but is not done ({:?})",
                        a.attempt_id, host.name, a.state
                    )),
                    // An operator reads why it did not simply succeed.
                    Some(outcome)
                        if outcome != Outcome::Succeeded
                            && a.record.failure().is_none_or(|c| c.side.is_none()) =>
                    {
                        found.push(format!(
                            "{} on {} ended {outcome:?} with no cause and side ({:?}; error {:?}; features {:?})",
                            a.attempt_id, host.name, a.record.failure(), a.record.error, a.record.features
                        ))
                    }
                    Some(_) => {}
                }
            }
            for a in views[h].destinations.values() {
                if !a.is_finished() {
                    found.push(format!(
                        "{} on {} never finished ({:?})",
                        a.attempt_id, host.name, a.state
                    ));
                }
            }
        }

        // (3b) a failed verification is never read as "succeeded": where a
        // destination's final record has one, its source's says degraded
        // (or lost), until a repair verified the feature again.
        for (h, host) in self.hosts.iter().enumerate().filter(|(_, h)| !h.lost) {
            for d in views[h].destinations.values() {
                let Some(failed) = d.features.iter().find(|f| f.verify == StepStatus::Failed)
                else {
                    continue;
                };
                let source = self
                    .hosts
                    .iter()
                    .position(|x| x.name == d.source && !x.lost);
                let record = source.and_then(|s| views[s].sources.get(&d.attempt_id));
                // A repair that verified again since may have made it so.
                let verified_since = |a: &crate::protocol::source::SourceAttempt| {
                    a.record.repairs.iter().any(|r| {
                        r.feature == failed.name
                            && r.result == RepairResult::Ok
                            && r.stages.contains(&Stage::Verify)
                    })
                };
                if let Some(a) = record
                    && a.record.outcome == Some(Outcome::Succeeded)
                    && !verified_since(a)
                {
                    found.push(format!(
                        "{} succeeded on {} although {}'s verification of {} failed on {} ({:?})",
                        d.attempt_id, d.source, failed.name, d.vm.name, host.name, failed.error
                    ));
                }
            }
        }

        // (4) the journals agree, with each other and with the guests.
        for (h, host) in self.hosts.iter().enumerate().filter(|(_, h)| !h.lost) {
            for d in views[h].destinations.values() {
                if lost(&d.source) {
                    continue;
                }
                let source = self.hosts.iter().position(|x| x.name == d.source);
                let Some(s) = source.and_then(|s| views[s].sources.get(&d.attempt_id)) else {
                    // A source that lost its power may have lost the
                    // attempt's unsynced record with its guest.
                    if !source.is_some_and(|s| self.hosts[s].powered_off) {
                        found.push(format!(
                            "{} is journaled on {} but not on its source {}",
                            d.attempt_id, host.name, d.source
                        ));
                    }
                    continue;
                };
                let committed = d.state == DestinationState::Committed;
                // Lost after a commit: it moved, then died there.
                let moved = matches!(
                    s.record.outcome,
                    Some(Outcome::Succeeded | Outcome::Degraded | Outcome::Lost)
                );
                let forced = s.forced().is_some();
                if !forced && (committed != moved || committed != s.record.committed) {
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
            for s in views[h].sources.values() {
                if lost(&s.destination) || s.forced().is_some() {
                    continue;
                }
                // Lost after a commit: it moved, then died there.
                let moved = matches!(
                    s.record.outcome,
                    Some(Outcome::Succeeded | Outcome::Degraded | Outcome::Lost)
                );
                let destination = self.hosts.iter().position(|x| x.name == s.destination);
                let committed = destination
                    .and_then(|d| views[d].destinations.get(&s.attempt_id))
                    .is_some_and(|d| d.state == DestinationState::Committed);
                let forgot = destination.is_some_and(|d| self.hosts[d].powered_off);
                if moved && !committed && !forgot {
                    found.push(format!(
                        "{} ended {:?} on {} but {} has no commit",
                        s.attempt_id, s.record.outcome, host.name, s.destination
                    ));
                }
            }
        }
        for vm in &vms {
            // The latest attempt that reached the journal.
            let latest = self
                .begun
                .iter()
                .rev()
                .filter(|(_, v, _)| v == vm)
                .find_map(|(h, _, id)| views[*h].sources.get(id));
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

        // Evacuations: where VMs were placed, and how every job ended.
        for (h, host) in self.hosts.iter().enumerate().filter(|(_, h)| !h.lost) {
            for job in views[h].evacuations.values() {
                if !job.state.is_over() {
                    found.push(format!(
                        "evacuation {} of {} never ended ({})",
                        job.id,
                        host.name,
                        job.state.as_str()
                    ));
                }
                for vm in &job.vms {
                    if !matches!(
                        vm.state,
                        VmState::Moved | VmState::Failed | VmState::Cancelled
                    ) && job.state.is_over()
                    {
                        found.push(format!(
                            "evacuation {} ended with {} {}",
                            job.id,
                            vm.name,
                            vm.state.as_str()
                        ));
                    }
                    for (k, a) in vm.attempts.iter().enumerate() {
                        if a.adopted {
                            continue;
                        }
                        if job.exclude.contains(&a.destination) {
                            found.push(format!(
                                "evacuation {} placed {} on {}, which the operator excluded",
                                job.id, vm.name, a.destination
                            ));
                        }
                        let failed_before = vm.attempts[..k].iter().any(|b| {
                            b.destination == a.destination
                                && b.counts()
                                && matches!(b.outcome, Some(Outcome::Failed | Outcome::Aborted))
                        });
                        if failed_before {
                            found.push(format!(
                                "evacuation {} placed {} on {} again, after it failed there",
                                job.id, vm.name, a.destination
                            ));
                        }
                        // What the destination last told this host.
                        let d = self.hosts.iter().position(|x| x.name == a.destination);
                        let told = self
                            .capacity_answers
                            .iter()
                            .rev()
                            .find(|&&(asker, host, at, _)| {
                                asker == h && Some(host) == d && at <= a.started_at_ms
                            })
                            .map(|&(_, _, _, draining)| draining);
                        match told {
                            Some(false) => {}
                            Some(true) => found.push(format!(
                                "evacuation {} placed {} on {}, which said it was draining",
                                job.id, vm.name, a.destination
                            )),
                            None => found.push(format!(
                                "evacuation {} placed {} on {}, which never answered Capacity",
                                job.id, vm.name, a.destination
                            )),
                        }
                    }
                }
            }
        }
        for v in found {
            self.violation(v);
        }
    }
}
