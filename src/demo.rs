//! The embedded demo cluster: real agents serving real gRPC on loopback
//! ports, each with the simulated hypervisor and a simulated switch. The last
//! rack's switch is flaky (a quarter of its ASSOCIATEs and PREASSOCIATEs
//! fail), the last host is being evacuated from the start, and a traffic
//! generator keeps migrations moving so there is always something to watch.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rand::seq::IndexedRandom;
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
}

/// A running demo cluster.
pub struct Cluster {
    pub dir: PathBuf,
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

fn vm_toml(index: usize, rng: &mut impl Rng) -> String {
    let kinds = [
        ("web", 2048, 2, 40),
        ("db", 8192, 4, 200),
        ("cache", 4096, 2, 400),
        ("batch", 1024, 1, 10),
    ];
    let (kind, memory, vcpus, dirty) = kinds[index % kinds.len()];
    let memory = memory / 2 + rng.random_range(0..=memory / 2) / 256 * 256;
    let required = kind != "batch";
    format!(
        "[[vm]]\nname = \"{kind}-{:02}\"\nmemory_mib = {memory}\nvcpus = {vcpus}\ndirty_rate_mib_s = {dirty}\n\
         features = [{{ name = \"port-profile\", required = {required} }}, {{ name = \"hook\", required = false }}]\n\n",
        index / kinds.len() + 1
    )
}

/// The demo's one guest that pre-copy cannot move: it dirties memory faster
/// than the simulated link carries (1,024 MiB/s), so its migrations show
/// "not converging" at once; fast mode switches it to post-copy, safe mode
/// aborts it when its budget is spent (150 s per GiB).
const HOT_VM: &str = "[[vm]]\nname = \"hot-01\"\nmemory_mib = 1024\nvcpus = 4\ndirty_rate_mib_s = 1600\n\
     features = [{ name = \"port-profile\", required = true }, { name = \"hook\", required = false }]\n\n";

/// From this many VMs on, one of them (on the first host) is [`HOT_VM`].
const HOT_FROM_VMS: usize = 8;

impl Cluster {
    /// Write the inventory and agent configs under a fresh folder and start
    /// every agent in this process.
    pub async fn start(options: &DemoOptions) -> anyhow::Result<Cluster> {
        anyhow::ensure!(options.hosts >= 2, "a demo needs at least 2 hosts");
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
                    days: 2,
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
        let mut rng = rand::rng();
        let mut agents = Vec::new();
        let mut stops = Vec::new();
        let mut servers = Vec::new();
        for (i, (listener, addr)) in listeners.into_iter().enumerate() {
            let name = format!("hv-{}", host_letter(i));
            let flaky = i / RACK_SIZE == racks - 1;
            let own = issue(&name, Role::Agent)?;
            let mut text = format!(
                "name = \"{name}\"\nlisten = \"{addr}\"\nstate_dir = \"{name}\"\ninventory = \"cluster.toml\"\n\
                 heartbeat_interval_ms = 500\npeer_timeout_ms = 3000\nallow_fault_injection = true\n\n\
                 [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
                 [hypervisor]\nkind = \"sim\"\nbandwidth_mib_s = 1024\nspeed = 1.0\nmemory_mib = 65536\nvcpus = 64\n\n\
                 [features.port-profile]\nswitch = \"sim\"\nlatency_ms = 30\n{}\n\
                 [features.hook]\ndriver = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", \"exit 0\"]\ntimeout_ms = 5000\n\n",
                if flaky { "fail_rate = 0.25\n" } else { "" },
                ca = own.join(IDENTITY_CA).display(),
                cert = own.join(IDENTITY_CERT).display(),
                key = own.join(IDENTITY_KEY).display(),
            );
            // Spread the kinds of VM so every host has a mix; the hot one
            // counts among the VMs asked for.
            let hot = options.vms >= HOT_FROM_VMS;
            let regular = options.vms - usize::from(hot);
            for v in (0..regular).filter(|v| (v + v / options.hosts) % options.hosts == i) {
                text.push_str(&vm_toml(v, &mut rng));
            }
            if hot && i == 0 {
                text.push_str(HOT_VM);
            }
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
            dir,
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
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                if agents.iter().any(|a| a.is_stopping()) {
                    return;
                }
                let Some(step) = next_move(&agents).await else {
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
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("demo: could not remove {}: {e}", self.dir.display());
        }
    }
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
async fn next_move(agents: &[Arc<Agent>]) -> Option<Move> {
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
    let source = {
        let mut rng = rand::rng();
        Arc::clone(sources.choose(&mut rng)?)
    };
    let vms: Vec<String> = source
        .vms()
        .await
        .into_iter()
        .filter(|v| {
            v.migration_id.is_empty() && v.state == crate::proto::GuestState::Running as i32
        })
        .map(|v| v.name)
        .collect();
    let mut rng = rand::rng();
    let vm = vms.choose(&mut rng)?.clone();
    let destinations: Vec<&Arc<Agent>> = agents
        .iter()
        .zip(&traffic)
        .filter(|(a, t)| {
            a.name != source.name && !t.draining && t.incoming < a.max_incoming as usize
        })
        .map(|(a, _)| a)
        .collect();
    let destination = destinations.choose(&mut rng)?.name.clone();
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
    if !options.headless {
        if options.traffic {
            cluster.spawn_traffic();
        }
        let result = crate::console::run(crate::console::Options {
            cluster: "demo".into(),
            agents: cluster.client()?,
            theme,
            read_only,
        })
        .await;
        cluster.stop().await;
        return result;
    }
    println!(
        "Tern demo cluster: {} agents, {} VMs",
        cluster.agents.len(),
        options.vms
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_demo_evacuates_its_last_host_and_its_traffic_keeps_off_it() {
        let cluster = Cluster::start(&DemoOptions {
            hosts: 3,
            vms: 9,
            headless: true,
            traffic: false,
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
        for _ in 0..200 {
            if let Some(step) = next_move(&cluster.agents).await {
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
