//! Placement: which host receives a VM. Pure: the evacuation gathers each
//! host's answer to `Capacity` and asks here.
//!
//! A host is eligible when it answered, is not draining, is below its
//! incoming limit, has the memory and vCPUs free, and knows every feature
//! the VM requires. Among eligible hosts the one with the most free capacity
//! left after the move wins, less what it is already receiving: free memory
//! and free vCPUs as fractions of the host, minus its incoming migrations as
//! a fraction of its limit (oVirt's scheduler weighs memory and migrations
//! in flight the same way). Ties go to the host listed first.

/// What one host said about itself (or that it did not answer).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    /// `Err(why)` when the host did not answer `Capacity`.
    pub reachable: Result<(), String>,
    pub draining: bool,
    pub memory_total_mib: u64,
    pub memory_free_mib: u64,
    pub vcpus_total: u32,
    pub vcpus_free: u32,
    pub features: Vec<String>,
    pub incoming: u32,
    pub max_incoming: u32,
}

impl Candidate {
    /// Count a migration just started to this host, until it next answers.
    pub fn reserve(&mut self, need: &Need) {
        self.memory_free_mib = self.memory_free_mib.saturating_sub(need.memory_mib);
        self.vcpus_free = self.vcpus_free.saturating_sub(need.vcpus);
        self.incoming += 1;
    }
}

/// What a VM needs from its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub vm: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// Features the destination must have (safe mode).
    pub required: Vec<String>,
    /// Features the destination should have, but may lack (fast mode,
    /// which blocks on nothing): a host that has them wins over any that
    /// does not.
    pub preferred: Vec<String>,
}

impl Need {
    /// In fast mode nothing is required, only preferred.
    pub fn in_mode(mut self, mode: crate::protocol::Mode) -> Need {
        if mode == crate::protocol::Mode::Fast {
            self.preferred.append(&mut self.required);
        }
        self
    }
}

/// Why a host cannot take a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unfit {
    /// Never, for this evacuation: the operator excluded it, it already
    /// failed this VM, it is the source, or it lacks a required feature.
    Never(String),
    /// Not now: unreachable, draining, full, or at its incoming limit.
    NotNow(String),
}

/// No host can take the VM now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoPlace {
    /// True when no host ever could: the VM has nowhere left to go.
    pub never: bool,
    /// One line, host by host.
    pub why: String,
}

/// Whether `host` can take the VM now.
pub fn fit(need: &Need, host: &Candidate, avoid: &[String]) -> Result<(), Unfit> {
    let name = &host.name;
    if avoid.contains(name) {
        return Err(Unfit::Never(format!("{name} excluded")));
    }
    // Before the features: an unreachable host's are unknown.
    if let Err(why) = &host.reachable {
        return Err(Unfit::NotNow(format!("{name} unreachable ({why})")));
    }
    if let Some(missing) = need.required.iter().find(|f| !host.features.contains(f)) {
        return Err(Unfit::Never(format!("{name} has no {missing}")));
    }
    if host.draining {
        return Err(Unfit::NotNow(format!("{name} draining")));
    }
    if host.memory_free_mib < need.memory_mib {
        return Err(Unfit::NotNow(format!(
            "{name} has {} MiB free, needs {}",
            host.memory_free_mib, need.memory_mib
        )));
    }
    if host.vcpus_free < need.vcpus {
        return Err(Unfit::NotNow(format!(
            "{name} has {} vCPUs free, needs {}",
            host.vcpus_free, need.vcpus
        )));
    }
    if host.incoming >= host.max_incoming {
        return Err(Unfit::NotNow(format!(
            "{name} at its incoming limit ({})",
            host.max_incoming
        )));
    }
    Ok(())
}

/// Higher is better: free capacity left after the move, less the
/// migrations already arriving.
fn score(need: &Need, host: &Candidate) -> f64 {
    let fraction = |free: f64, total: f64| if total > 0.0 { free / total } else { 0.0 };
    let memory = fraction(
        (host.memory_free_mib - need.memory_mib) as f64,
        host.memory_total_mib as f64,
    );
    let vcpus = fraction(
        (host.vcpus_free - need.vcpus) as f64,
        host.vcpus_total as f64,
    );
    let busy = fraction(host.incoming as f64, host.max_incoming as f64);
    // Each term above is at most 1: a missing feature outweighs them all.
    let missing = need
        .preferred
        .iter()
        .filter(|f| !host.features.contains(f))
        .count();
    memory + vcpus - busy - 10.0 * missing as f64
}

/// The best host for the VM among `hosts`, never one in `avoid`.
pub fn place(need: &Need, hosts: &[Candidate], avoid: &[String]) -> Result<usize, NoPlace> {
    let mut best: Option<(usize, f64)> = None;
    let mut reasons = Vec::new();
    let mut never = true;
    for (i, host) in hosts.iter().enumerate() {
        match fit(need, host, avoid) {
            Ok(()) => {
                let s = score(need, host);
                if best.is_none_or(|(_, b)| s > b) {
                    best = Some((i, s));
                }
            }
            Err(Unfit::Never(why)) => reasons.push(why),
            Err(Unfit::NotNow(why)) => {
                never = false;
                reasons.push(why);
            }
        }
    }
    match best {
        Some((i, _)) => Ok(i),
        None if reasons.is_empty() => Err(NoPlace {
            never: true,
            why: "no other host in the inventory".into(),
        }),
        None => Err(NoPlace {
            never,
            why: reasons.join("; "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, memory_free_mib: u64, incoming: u32) -> Candidate {
        Candidate {
            name: name.into(),
            reachable: Ok(()),
            draining: false,
            memory_total_mib: 16384,
            memory_free_mib,
            vcpus_total: 32,
            vcpus_free: 32,
            features: vec!["port-profile".into()],
            incoming,
            max_incoming: 2,
        }
    }

    fn need(memory_mib: u64, required: &[&str]) -> Need {
        Need {
            vm: "web-01".into(),
            memory_mib,
            vcpus: 2,
            required: required.iter().map(|s| s.to_string()).collect(),
            preferred: Vec::new(),
        }
    }

    #[test]
    fn fast_mode_prefers_a_host_with_the_feature_but_takes_one_without() {
        let mut bare = host("hv-c", 16000, 0);
        bare.features.clear();
        let has = host("hv-b", 2048, 1);
        let fast = need(1024, &["port-profile"]).in_mode(crate::protocol::Mode::Fast);
        assert_eq!(
            place(&fast, &[bare.clone(), has.clone()], &[]),
            Ok(1),
            "the host with the feature wins however much room the other has"
        );
        assert_eq!(
            place(&fast, &[bare.clone()], &[]),
            Ok(0),
            "fast mode blocks on nothing: a host without the driver still takes the VM"
        );
        let safe = need(1024, &["port-profile"]).in_mode(crate::protocol::Mode::Safe);
        assert!(place(&safe, &[bare], &[]).unwrap_err().never);
    }

    #[test]
    fn the_host_with_most_room_left_wins() {
        let hosts = [host("b", 4096, 0), host("c", 12288, 0), host("d", 8192, 0)];
        assert_eq!(place(&need(2048, &[]), &hosts, &[]), Ok(1));
    }

    #[test]
    fn migrations_in_flight_weigh_against_a_host() {
        // Equal room; c already receives one of its two.
        let hosts = [host("c", 8192, 1), host("d", 8192, 0)];
        assert_eq!(place(&need(1024, &[]), &hosts, &[]), Ok(1));
    }

    #[test]
    fn reserving_spreads_a_burst_of_placements() {
        let mut hosts = vec![host("b", 8192, 0), host("c", 8192, 0)];
        let n = need(2048, &[]);
        let mut chosen = Vec::new();
        for _ in 0..4 {
            let i = place(&n, &hosts, &[]).unwrap();
            hosts[i].reserve(&n);
            chosen.push(hosts[i].name.clone());
        }
        chosen.sort();
        assert_eq!(chosen, ["b", "b", "c", "c"]);
        // Both are now at their incoming limit: nowhere, for now.
        let none = place(&n, &hosts, &[]).unwrap_err();
        assert!(!none.never);
        assert!(
            none.why.contains("b at its incoming limit (2)"),
            "{}",
            none.why
        );
    }

    #[test]
    fn ineligible_hosts_say_why() {
        let mut draining = host("b", 8192, 0);
        draining.draining = true;
        let mut gone = host("c", 8192, 0);
        gone.reachable = Err("connection refused".into());
        let full = host("d", 1024, 0);
        let mut no_feature = host("e", 8192, 0);
        no_feature.features.clear();
        let mut few_cpus = host("f", 8192, 0);
        few_cpus.vcpus_free = 1;
        let hosts = [
            draining,
            gone,
            full,
            no_feature,
            few_cpus,
            host("g", 8192, 0),
        ];
        let none = place(&need(2048, &["port-profile"]), &hosts, &["g".into()]).unwrap_err();
        assert!(!none.never);
        assert_eq!(
            none.why,
            "b draining; c unreachable (connection refused); d has 1024 MiB free, needs 2048; \
             e has no port-profile; f has 1 vCPUs free, needs 2; g excluded"
        );
    }

    #[test]
    fn nowhere_ever_when_every_host_is_excluded_or_lacks_a_feature() {
        let mut bare = host("c", 8192, 0);
        bare.features.clear();
        let hosts = [host("b", 8192, 0), bare];
        let none = place(&need(1024, &["port-profile"]), &hosts, &["b".into()]).unwrap_err();
        assert!(none.never);
        assert_eq!(none.why, "b excluded; c has no port-profile");
        let none = place(&need(1024, &[]), &[], &[]).unwrap_err();
        assert!(none.never);
    }

    #[test]
    fn optional_features_do_not_restrict_placement() {
        let mut bare = host("c", 8192, 0);
        bare.features.clear();
        assert_eq!(place(&need(1024, &[]), &[bare], &[]), Ok(0));
    }
}
