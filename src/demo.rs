//! The embedded demo cluster: real agents serving real gRPC on loopback
//! ports, each with the simulated hypervisor and a simulated switch. The last
//! rack's switch is flaky (a quarter of its ASSOCIATEs and PREASSOCIATEs
//! fail), the last host is being evacuated from the start, and a traffic
//! generator keeps migrations moving so there is always something to watch.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use crate::agent::{self, Agent};
use crate::config::{AgentConfig, Inventory};
use crate::host::{Evacuation, EvacuationRequest};
use crate::protocol::Mode;
use crate::trust::Role;
use crate::trust::ca::{IDENTITY_CA, IDENTITY_CERT, IDENTITY_KEY, IssueRequest};
use crate::trust::tls::IdentityFiles;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub hosts: usize,
    pub vms: usize,
    pub headless: bool,
    /// Start a migration every so often, so the demo is never idle.
    pub traffic: bool,
    /// The same seed gives the same VMs on the same hosts and the same
    /// sequence of moves (their timing still varies); none: a random one.
    pub seed: Option<u64>,
}

/// The most hosts a demo runs (each is an agent in this process).
pub const MAX_HOSTS: usize = 100;
/// The most VMs a demo places per host on average.
pub const MAX_VMS_PER_HOST: usize = 64;
/// A demo host's memory and vCPUs: at least this, and twice what its own
/// VMs take, so each can take guests from the others.
const HOST_MEMORY_MIB: u64 = 65_536;
const HOST_VCPUS: u64 = 64;

/// A running demo cluster.
pub struct Cluster {
    dir: Folder,
    /// The seed this run was made from (`--seed` repeats it).
    pub seed: u64,
    /// The traffic generator's moves, from the seed.
    traffic_rng: StdRng,
    pub inventory_path: PathBuf,
    pub inventory: Inventory,
    /// The operator's identity (an admin of the demo's own CA), as
    /// `--identity` takes it.
    pub identity: PathBuf,
    pub agents: Vec<Arc<Agent>>,
    stops: Vec<mpsc::Sender<()>>,
    servers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

const RACK_SIZE: usize = 2;

/// One demo VM: its config, memory and vCPUs.
fn vm_toml(index: usize, rng: &mut impl Rng) -> (String, u64, u64) {
    let kinds = [
        ("web", 2048, 2, 40),
        ("db", 8192, 4, 200),
        ("cache", 4096, 2, 400),
        ("batch", 1024, 1, 10),
    ];
    let (kind, memory, vcpus, dirty) = kinds[index % kinds.len()];
    let memory = memory / 2 + rng.random_range(0..=memory / 2) / 256 * 256;
    let required = kind != "batch";
    let text = format!(
        "[[vm]]\nname = \"{kind}-{:02}\"\nmemory_mib = {memory}\nvcpus = {vcpus}\ndirty_rate_mib_s = {dirty}\n\
         features = [{{ name = \"port-profile\", required = {required} }}, {{ name = \"hook\", required = false }}]\n\n",
        index / kinds.len() + 1
    );
    (text, memory as u64, vcpus as u64)
}

/// Refuse a demo this process cannot run, saying the limit.
pub fn check_size(options: &DemoOptions) -> anyhow::Result<()> {
    anyhow::ensure!(options.hosts >= 2, "a demo needs at least 2 hosts");
    anyhow::ensure!(
        options.hosts <= MAX_HOSTS,
        "a demo runs at most {MAX_HOSTS} hosts (--hosts {} asked)",
        options.hosts
    );
    let most = options.hosts * MAX_VMS_PER_HOST;
    anyhow::ensure!(
        options.vms <= most,
        "a demo places at most {MAX_VMS_PER_HOST} VMs a host: at most {most} on {} hosts (--vms {} asked)",
        options.hosts,
        options.vms
    );
    Ok(())
}

/// The demo's one guest that pre-copy cannot move: it dirties memory faster
/// than the simulated link carries (1,024 MiB/s), so its migrations show
/// "not converging" at once; fast mode switches it to post-copy, safe mode
/// aborts it when its budget is spent (150 s per GiB).
fn hot_vm_toml() -> String {
    format!(
        "[[vm]]\nname = \"hot-01\"\nmemory_mib = {HOT_VM_MEMORY_MIB}\nvcpus = {HOT_VM_VCPUS}\ndirty_rate_mib_s = 1600\n\
         features = [{{ name = \"port-profile\", required = true }}, {{ name = \"hook\", required = false }}]\n\n"
    )
}

const HOT_VM_MEMORY_MIB: u64 = 1024;
const HOT_VM_VCPUS: u64 = 4;

/// From this many VMs on, one of them (on the first host) is the hot one.
const HOT_FROM_VMS: usize = 8;

/// The demo's folder (journals, CA, keys), removed when dropped: a start
/// that fails half-way, or a test that panics, leaves nothing behind.
struct Folder(PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!("demo: could not remove {}: {e}", self.0.display());
            }
            _ => {}
        }
    }
}

impl Cluster {
    /// The demo's folder, removed when the cluster is dropped or stopped.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Write the inventory and agent configs under a fresh folder and start
    /// every agent in this process.
    pub async fn start(options: &DemoOptions) -> anyhow::Result<Cluster> {
        check_size(options)?;
        // Short enough to read off the header and type back.
        let seed = options
            .seed
            .unwrap_or_else(|| u64::from(rand::random::<u16>()));
        // One folder per cluster, even for several in one process.
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = match n {
            0 => format!("tern-demo-{}", std::process::id()),
            n => format!("tern-demo-{}-{n}", std::process::id()),
        };
        let dir = std::env::temp_dir().join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let folder = Folder(dir.clone());
        // The demo runs on mutual TLS like a real cluster, from a CA made
        // for it alone in its folder.
        let ca_dir = dir.join("ca");
        let identities = dir.join("identities");
        crate::trust::ca::init(&ca_dir).map_err(anyhow::Error::msg)?;
        let issue = |name: &str, role: Role| {
            crate::trust::ca::issue(
                &ca_dir,
                &IssueRequest {
                    name: name.to_string(),
                    role,
                    sans: vec!["127.0.0.1".into()],
                    // Past tern doctor's 30-day warning (D in the console):
                    // the folder, keys and all, goes when the demo ends.
                    days: 90,
                },
                &identities,
            )
            .map_err(anyhow::Error::msg)
        };
        let identity = issue("demo-admin", Role::Admin)?;
        let mut listeners = Vec::new();
        let mut inventory_text = String::new();
        for i in 0..options.hosts {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            inventory_text.push_str(&format!(
                "[[host]]\nname = \"hv-{}\"\naddress = \"https://{addr}\"\n\n",
                host_letter(i)
            ));
            listeners.push((listener, addr));
        }
        let inventory_path = dir.join("cluster.toml");
        std::fs::write(&inventory_path, &inventory_text)?;
        let inventory = Inventory::load(&inventory_path)?;
        let racks = options.hosts.div_ceil(RACK_SIZE);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut agents = Vec::new();
        let mut stops = Vec::new();
        let mut servers = Vec::new();
        for (i, (listener, addr)) in listeners.into_iter().enumerate() {
            let name = format!("hv-{}", host_letter(i));
            let flaky = i / RACK_SIZE == racks - 1;
            let own = issue(&name, Role::Agent)?;
            // Spread the kinds of VM so every host has a mix; the hot one
            // counts among the VMs asked for.
            let hot = options.vms >= HOT_FROM_VMS;
            let regular = options.vms - usize::from(hot);
            let (mut vms_text, mut memory, mut vcpus) = (String::new(), 0, 0);
            for v in (0..regular).filter(|v| (v + v / options.hosts) % options.hosts == i) {
                let (text, m, c) = vm_toml(v, &mut rng);
                vms_text.push_str(&text);
                memory += m;
                vcpus += c;
            }
            if hot && i == 0 {
                vms_text.push_str(&hot_vm_toml());
                memory += HOT_VM_MEMORY_MIB;
                vcpus += HOT_VM_VCPUS;
            }
            // Sized for what it holds: twice its own VMs, so it can take in
            // guests from the others.
            let memory_mib = HOST_MEMORY_MIB.max((2 * memory).div_ceil(1024) * 1024);
            let host_vcpus = HOST_VCPUS.max(2 * vcpus);
            let mut text = format!(
                "name = \"{name}\"\nlisten = \"{addr}\"\nstate_dir = \"{name}\"\ninventory = \"cluster.toml\"\n\
                 heartbeat_interval_ms = 500\npeer_timeout_ms = 3000\nallow_fault_injection = true\n\n\
                 [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
                 [hypervisor]\nkind = \"sim\"\nbandwidth_mib_s = 1024\nspeed = 1.0\nmemory_mib = {memory_mib}\nvcpus = {host_vcpus}\n\n\
                 [features.port-profile]\nswitch = \"sim\"\nlatency_ms = 30\n{}\n\
                 [features.hook]\ndriver = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", \"exit 0\"]\ntimeout_ms = 5000\n\n",
                if flaky { "fail_rate = 0.25\n" } else { "" },
                ca = own.join(IDENTITY_CA).display(),
                cert = own.join(IDENTITY_CERT).display(),
                key = own.join(IDENTITY_KEY).display(),
            );
            text.push_str(&vms_text);
            let config_path = dir.join(format!("{name}.toml"));
            std::fs::write(&config_path, &text)?;
            let config = AgentConfig::load(&config_path)?;
            let agent = Agent::open(&config, inventory.clone()).await?;
            let (stop_tx, stop_rx) = mpsc::channel(1);
            servers.push(tokio::spawn(agent::serve(agent.clone(), listener, stop_rx)));
            agents.push(agent);
            stops.push(stop_tx);
        }
        Ok(Cluster {
            dir: folder,
            seed,
            traffic_rng: StdRng::seed_from_u64(seed.wrapping_add(1)),
            inventory_path,
            inventory,
            identity,
            agents,
            stops,
            servers,
        })
    }

    /// The cluster as a client sees it: the inventory, and the demo
    /// admin's identity.
    pub fn client(&self) -> anyhow::Result<crate::cli::Cluster> {
        Ok(crate::cli::Cluster {
            answer_deadline: crate::cli::client::ANSWER_DEADLINE,
            path: self.inventory_path.clone(),
            inventory: self.inventory.clone(),
            tls: Some(IdentityFiles::load_dir(&self.identity).map_err(anyhow::Error::msg)?),
        })
    }

    /// Evacuate the last host in safe mode, as `tern evacuate` would, so
    /// the console has an evacuation to show from the start. Its VMs go to
    /// the other hosts, some of them on the flaky rack.
    pub async fn evacuate_last_host(&self) -> anyhow::Result<Evacuation> {
        let agent = self
            .agents
            .last()
            .ok_or_else(|| anyhow::anyhow!("the demo cluster has no agents"))?;
        let job = agent
            .evacuate(EvacuationRequest {
                mode: Mode::Safe,
                completion: Default::default(),
                concurrency: 0,
                max_attempts: 0,
                exclude: Vec::new(),
            })
            .await?;
        Ok(job)
    }

    /// Keep migrations moving: every couple of seconds, move a random idle VM
    /// to a random other host in a random mode. Only between hosts that take
    /// it now: a draining host sources and receives nothing here (its
    /// evacuation moves its VMs), and a host at its `max_outgoing` or
    /// `max_incoming` is skipped, so the console is not filled with refusals.
    pub fn spawn_traffic(&self) {
        let agents = self.agents.clone();
        let mut rng = self.traffic_rng.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                if agents.iter().any(|a| a.is_stopping()) {
                    return;
                }
                let Some(step) = next_move(&agents, &mut rng).await else {
                    continue;
                };
                // Left: races with an evacuation or another migration
                // (draining since, at a limit since, VM taken). Expected, and
                // quiet; anything else is worth a line in the log.
                let started = step
                    .source
                    .start_migration(&step.vm, &step.destination, step.mode, Default::default())
                    .await;
                if let Err(e) = started {
                    let status = tonic::Status::from(e);
                    match status.code() {
                        tonic::Code::FailedPrecondition
                        | tonic::Code::ResourceExhausted
                        | tonic::Code::AlreadyExists
                        | tonic::Code::Unavailable => {
                            tracing::debug!("demo traffic: {}", status.message())
                        }
                        _ => tracing::warn!("demo traffic: {}", status.message()),
                    }
                }
            }
        });
    }

    /// The demo is there to show what Tern does when things go wrong, so
    /// within its first seconds: one safe-mode migration fails on a switch
    /// that rejects it (the guest stays where it was, the destination rolls
    /// back) and one fast-mode migration ends degraded (the guest moved
    /// without its port profile). The host before the evacuated one rejects
    /// every ASSOCIATE until both have ended, then goes back to its own
    /// settings. Nothing happens with fewer than 3 hosts (no destination
    /// but the draining one).
    pub fn stage_first_incidents(&self) {
        let n = self.agents.len();
        if n < 3 {
            return;
        }
        let (source, destination) = (self.agents[0].clone(), self.agents[n - 2].clone());
        tokio::spawn(async move {
            if let Err(e) = first_incidents(&source, &destination).await {
                tracing::warn!("demo: the first incidents did not happen: {e}");
            }
        });
    }

    /// Stop every agent the way a signal would, then remove the demo's
    /// folder (its journals, its CA and keys): nothing of it outlives it.
    pub async fn stop(self) {
        for stop in &self.stops {
            let _ = stop.send(()).await;
        }
        for server in self.servers {
            let _ = server.await;
        }
        drop(self.agents);
        drop(self.dir);
    }
}

async fn first_incidents(source: &Agent, destination: &Agent) -> anyhow::Result<()> {
    const FEATURE: &str = "port-profile";
    // Three of the source's guests that need their port profile, the
    // smallest first (the incidents come quickly).
    let mut vms: Vec<(u64, String)> = source
        .vms()
        .await
        .into_iter()
        .filter(|v| v.state == crate::proto::GuestState::Running as i32)
        .filter(|v| {
            ["web-", "cache-", "db-"]
                .iter()
                .any(|k| v.name.starts_with(k))
        })
        .map(|v| (v.memory_mib, v.name))
        .collect();
    vms.sort();
    let [(_, safe_vm), (_, fast_vm), rest @ ..] = vms.as_slice() else {
        anyhow::bail!("{} has fewer than two web, cache or db guests", source.name);
    };
    let saved = destination
        .features
        .faults()
        .into_iter()
        .find(|(name, _)| name == FEATURE)
        .map(|(_, faults)| faults)
        .unwrap_or_default();
    let mut rejecting = saved.clone();
    rejecting.fail.push(crate::protocol::Stage::Finish);
    destination
        .features
        .set_faults(FEATURE, rejecting)
        .map_err(anyhow::Error::msg)?;
    tracing::info!(
        "demo: {}'s switch rejects every ASSOCIATE until the first incidents are on screen",
        destination.name
    );
    let mut started = Vec::new();
    for (vm, mode) in [(safe_vm, Mode::Safe), (fast_vm, Mode::Fast)] {
        match source
            .start_migration(vm, &destination.name, mode, Default::default())
            .await
        {
            Ok(record) => started.push(record.id),
            Err(e) => tracing::warn!("demo: {vm} to {}: {e}", destination.name),
        }
    }
    for id in started {
        let _ = tokio::time::timeout(Duration::from_secs(15), source.wait_migration(&id)).await;
    }
    destination
        .features
        .set_faults(FEATURE, saved.clone())
        .map_err(anyhow::Error::msg)?;
    // Then one that moves, in safe mode, but whose switch does not report
    // its profile active afterwards: degraded by the check, never
    // "succeeded".
    if let Some((_, checked_vm)) = rest.first() {
        // Not flaky for this one: its prepare and finish go through.
        let unconfirmed = crate::features::Faults {
            fail: vec![crate::protocol::Stage::Verify],
            fail_rate: 0.0,
            ..saved.clone()
        };
        destination
            .features
            .set_faults(FEATURE, unconfirmed)
            .map_err(anyhow::Error::msg)?;
        match source
            .start_migration(
                checked_vm,
                &destination.name,
                Mode::Safe,
                Default::default(),
            )
            .await
        {
            Ok(record) => {
                let wait = source.wait_migration(&record.id);
                let _ = tokio::time::timeout(Duration::from_secs(15), wait).await;
            }
            Err(e) => tracing::warn!("demo: {checked_vm} to {}: {e}", destination.name),
        }
        destination
            .features
            .set_faults(FEATURE, saved)
            .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// One migration the traffic generator starts.
struct Move {
    source: Arc<Agent>,
    vm: String,
    destination: String,
    mode: Mode,
}

/// A random idle VM on a host that may source a migration now, to a random
/// host that may receive one now; `None` when no such pair exists.
async fn next_move(agents: &[Arc<Agent>], rng: &mut StdRng) -> Option<Move> {
    let mut traffic = Vec::new();
    for a in agents {
        traffic.push(a.traffic().await);
    }
    let sources: Vec<&Arc<Agent>> = agents
        .iter()
        .zip(&traffic)
        .filter(|(a, t)| !t.draining && t.outgoing < a.max_outgoing as usize)
        .map(|(a, _)| a)
        .collect();
    let source = Arc::clone(sources.choose(rng)?);
    let vms: Vec<String> = source
        .vms()
        .await
        .into_iter()
        .filter(|v| {
            v.migration_id.is_empty() && v.state == crate::proto::GuestState::Running as i32
        })
        .map(|v| v.name)
        .collect();
    let vm = vms.choose(rng)?.clone();
    let destinations: Vec<&Arc<Agent>> = agents
        .iter()
        .zip(&traffic)
        .filter(|(a, t)| {
            a.name != source.name && !t.draining && t.incoming < a.max_incoming as usize
        })
        .map(|(a, _)| a)
        .collect();
    let destination = destinations.choose(rng)?.name.clone();
    let mode = if rng.random_bool(0.5) {
        Mode::Safe
    } else {
        Mode::Fast
    };
    Some(Move {
        source,
        vm,
        destination,
        mode,
    })
}

fn host_letter(i: usize) -> String {
    let letters = b"abcdefghijklmnopqrstuvwxyz";
    if i < letters.len() {
        (letters[i] as char).to_string()
    } else {
        format!("{i}")
    }
}

/// `tern demo --headless`: start the cluster, say where it is, run until
/// interrupted.
/// Run the demo cluster: with the console on it (until the operator quits),
/// or headless until Ctrl-C.
pub async fn run(options: DemoOptions, theme: String, read_only: bool) -> anyhow::Result<()> {
    let cluster = Cluster::start(&options).await?;
    let evacuation = cluster.evacuate_last_host().await;
    if let Err(e) = &evacuation {
        tracing::warn!("demo: could not start the evacuation: {e}");
    }
    cluster.stage_first_incidents();
    if !options.headless {
        if options.traffic {
            cluster.spawn_traffic();
        }
        let result = crate::console::run(crate::console::Options {
            cluster: format!("demo · seed {}", cluster.seed),
            agents: cluster.client()?,
            theme,
            read_only,
            // The demo fails on purpose every few seconds: no bell.
            quiet: true,
        })
        .await;
        cluster.stop().await;
        return result;
    }
    println!(
        "Tern demo cluster: {} agents, {} VMs (seed {}: --seed {} repeats its VMs and moves)",
        cluster.agents.len(),
        options.vms,
        cluster.seed,
        cluster.seed
    );
    for host in &cluster.inventory.host {
        println!("  {:<8} {}", host.name, host.address);
    }
    if let Ok(job) = &evacuation {
        println!(
            "evacuating {} ({} mode, {} VMs) as {}: `tern evacuation pause {}` pauses it",
            job.host,
            job.mode.as_str(),
            job.vms.len(),
            job.id,
            job.id
        );
    }
    println!("inventory: {}", cluster.inventory_path.display());
    println!("identity:  {} (admin)", cluster.identity.display());
    let env = format!(
        "TERN_INVENTORY={} TERN_IDENTITY={}",
        cluster.inventory_path.display(),
        cluster.identity.display()
    );
    println!("try: {env} tern status");
    println!("     {env} tern watch");
    if options.traffic {
        cluster.spawn_traffic();
    }
    println!("Ctrl-C stops the cluster.");
    wait_for_interrupt().await;
    println!("stopping: aborting uncommitted migrations…");
    cluster.stop().await;
    Ok(())
}

async fn wait_for_interrupt() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_demo_has_a_guest_pre_copy_cannot_move_and_fast_mode_moves_it_by_post_copy() {
        let cluster = Cluster::start(&DemoOptions {
            hosts: 2,
            vms: HOT_FROM_VMS,
            headless: true,
            traffic: false,
            seed: None,
        })
        .await
        .expect("the demo cluster starts");
        let first = &cluster.agents[0];
        let vms = first.vms().await;
        assert!(vms.iter().any(|v| v.name == "hot-01"), "hot-01 is on hv-a");
        let total: usize = {
            let mut n = vms.len();
            n += cluster.agents[1].vms().await.len();
            n
        };
        assert_eq!(
            total, HOT_FROM_VMS,
            "the hot guest counts among the VMs asked for"
        );
        let started = first
            .start_migration("hot-01", "hv-b", Mode::Fast, Default::default())
            .await
            .expect("the migration starts");
        let record = first
            .wait_migration(&started.id)
            .await
            .expect("the migration ends");
        // Fast mode: a feature the flaky switch rejects is recorded, not
        // fatal; the guest moved either way.
        assert!(
            matches!(
                record.outcome,
                Some(crate::protocol::Outcome::Succeeded | crate::protocol::Outcome::Degraded)
            ),
            "{record:?}"
        );
        assert_eq!(record.running_on, "hv-b");
        let note = record.completion_note.clone().unwrap_or_default();
        assert!(note.contains("pre-copy cannot converge"), "{note}");
        let verdict = record.convergence.as_ref().map(|c| c.verdict);
        assert_eq!(
            verdict,
            Some(crate::protocol::convergence::Verdict::NotConverging),
            "{record:?}"
        );
        cluster.stop().await;
    }

    fn options(hosts: usize, vms: usize, seed: Option<u64>) -> DemoOptions {
        DemoOptions {
            hosts,
            vms,
            headless: true,
            traffic: false,
            seed,
        }
    }

    #[test]
    fn impossible_sizes_are_refused_with_the_limit() {
        let too_few = check_size(&options(1, 4, None)).unwrap_err().to_string();
        assert_eq!(too_few, "a demo needs at least 2 hosts");
        let too_many = check_size(&options(101, 4, None)).unwrap_err().to_string();
        assert_eq!(
            too_many,
            "a demo runs at most 100 hosts (--hosts 101 asked)"
        );
        let crowded = check_size(&options(10, 641, None)).unwrap_err().to_string();
        assert_eq!(
            crowded,
            "a demo places at most 64 VMs a host: at most 640 on 10 hosts (--vms 641 asked)"
        );
        assert!(check_size(&options(10, 640, None)).is_ok());
        assert!(check_size(&options(100, 3000, None)).is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hosts_are_sized_for_the_vms_asked_and_a_seed_repeats_the_layout() {
        // 60 VMs on 2 hosts: about 90 GiB each, more than the 64 GiB a host
        // had before every host was sized for its VMs.
        let layout = |cluster: &Cluster| {
            let agents = cluster.agents.clone();
            async move {
                let mut all = Vec::new();
                for a in &agents {
                    let host = a.host_info().await;
                    assert!(
                        host.memory_total_mib >= 2 * host.memory_used_mib,
                        "{} holds {} of {} MiB: it cannot take guests in",
                        a.name,
                        host.memory_used_mib,
                        host.memory_total_mib
                    );
                    assert!(host.vcpus_total >= 2 * host.vcpus_used, "{host:?}");
                    let mut vms: Vec<(String, u64)> = a
                        .vms()
                        .await
                        .into_iter()
                        .map(|v| (v.name, v.memory_mib))
                        .collect();
                    vms.sort();
                    all.push((a.name.clone(), host.memory_used_mib, vms));
                }
                all
            }
        };
        let first = Cluster::start(&options(2, 60, Some(99)))
            .await
            .expect("starts");
        let used: u64 = {
            let mut total = 0;
            for a in &first.agents {
                total += a.host_info().await.memory_used_mib;
            }
            total
        };
        assert!(used > 2 * 65_536, "the VMs take {used} MiB in all");
        let a = layout(&first).await;
        first.stop().await;
        let second = Cluster::start(&options(2, 60, Some(99)))
            .await
            .expect("starts");
        assert_eq!(second.seed, 99);
        let b = layout(&second).await;
        second.stop().await;
        assert_eq!(a, b, "the same seed, the same VMs on the same hosts");
    }

    /// A cluster dropped without `stop` (a test that panicked, a console
    /// that failed) leaves no folder behind; one stopped neither.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_demos_folder_goes_with_the_cluster() {
        let dropped = Cluster::start(&options(2, 4, Some(7)))
            .await
            .expect("starts");
        let dir = dropped.dir().to_path_buf();
        assert!(dir.join("cluster.toml").is_file());
        drop(dropped);
        assert!(!dir.exists(), "{} is left", dir.display());
        let stopped = Cluster::start(&options(2, 4, Some(7)))
            .await
            .expect("starts");
        let dir = stopped.dir().to_path_buf();
        stopped.stop().await;
        assert!(!dir.exists(), "{} is left", dir.display());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_safe_mode_failure_and_degraded_vm_come_within_seconds() {
        let cluster = Cluster::start(&options(4, 32, Some(5)))
            .await
            .expect("starts");
        let started = std::time::Instant::now();
        cluster.stage_first_incidents();
        let source = cluster.agents[0].clone();
        let destination = cluster.agents[2].clone();
        let (mut failed, mut degraded, mut unconfirmed) = (None, None, None);
        // About 5 s here; the deadline is generous for a loaded machine (no
        // timing is asserted: they are started at once, not by chance).
        while started.elapsed() < Duration::from_secs(40)
            && (failed.is_none() || degraded.is_none() || unconfirmed.is_none())
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (page, _) = source.migrations_page(100, "").await.expect("a page");
            for m in page
                .iter()
                .map(crate::protocol::record::MigrationRecord::from)
            {
                match m.outcome {
                    Some(crate::protocol::Outcome::Failed) if m.mode == Mode::Safe => {
                        failed.get_or_insert(m)
                    }
                    Some(crate::protocol::Outcome::Degraded)
                        if m.features
                            .iter()
                            .any(|f| f.verify == crate::protocol::StepStatus::Failed) =>
                    {
                        unconfirmed.get_or_insert(m)
                    }
                    Some(crate::protocol::Outcome::Degraded) => degraded.get_or_insert(m),
                    _ => continue,
                };
            }
        }
        let failed = failed.expect("a safe-mode failure");
        let degraded = degraded.expect("a degraded VM");
        // One moved in safe mode whose switch did not confirm its profile.
        let unconfirmed = unconfirmed.expect("a VM degraded by its verification");
        assert_eq!(unconfirmed.mode, Mode::Safe);
        assert_eq!(unconfirmed.running_on, destination.name);
        assert!(
            unconfirmed
                .error
                .as_deref()
                .is_some_and(|e| e.contains("port-profile verify: switch")),
            "{unconfirmed:?}"
        );
        assert_eq!(failed.destination, destination.name);
        assert_eq!(
            failed.running_on, source.name,
            "the guest stayed where it was"
        );
        assert_eq!(degraded.running_on, destination.name, "the guest moved");
        // Its ASSOCIATE rejected, or (the rack is flaky) its PREASSOCIATE.
        assert!(
            degraded
                .error
                .as_deref()
                .is_some_and(|e| e.contains("port-profile")),
            "{degraded:?}"
        );
        // Then the switch goes back to its own settings.
        let rejects = || {
            destination.features.faults().iter().any(|(_, f)| {
                f.fail.contains(&crate::protocol::Stage::Finish)
                    || f.fail.contains(&crate::protocol::Stage::Verify)
            })
        };
        for _ in 0..100 {
            if !rejects() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!rejects(), "{:?}", destination.features.faults());
        cluster.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_demo_evacuates_its_last_host_and_its_traffic_keeps_off_it() {
        let cluster = Cluster::start(&DemoOptions {
            hosts: 3,
            vms: 9,
            headless: true,
            traffic: false,
            seed: None,
        })
        .await
        .expect("the demo cluster starts");
        let job = cluster
            .evacuate_last_host()
            .await
            .expect("the last host takes the evacuation");
        let last = cluster.agents.last().expect("three agents");
        assert_eq!(job.host, last.name);
        assert_eq!(job.mode, Mode::Safe);
        assert_eq!(job.vms.len(), 3);
        assert!(last.traffic().await.draining);
        // Still draining once every agent has settled: nothing reset it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(last.traffic().await.draining);
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            if let Some(step) = next_move(&cluster.agents, &mut rng).await {
                assert_ne!(
                    step.source.name, last.name,
                    "a draining host sources nothing"
                );
                assert_ne!(
                    step.destination, last.name,
                    "a draining host receives nothing"
                );
                assert_ne!(step.source.name, step.destination);
            }
        }
        cluster.stop().await;
    }
}
