//! The embedded demo cluster: real agents serving real gRPC on loopback
//! ports, each with the simulated hypervisor and a simulated switch. The last
//! rack's switch is flaky (a quarter of its ASSOCIATEs and PREASSOCIATEs
//! fail), and a traffic generator keeps migrations moving so there is always
//! something to watch.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rand::seq::IndexedRandom;
use tokio::sync::mpsc;

use crate::agent::{self, Agent};
use crate::config::{AgentConfig, Inventory};
use crate::protocol::Mode;

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

impl Cluster {
    /// Write the inventory and agent configs under a fresh folder and start
    /// every agent in this process.
    pub async fn start(options: &DemoOptions) -> anyhow::Result<Cluster> {
        anyhow::ensure!(options.hosts >= 2, "a demo needs at least 2 hosts");
        let dir = std::env::temp_dir().join(format!("tern-demo-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let mut listeners = Vec::new();
        let mut inventory_text = String::new();
        for i in 0..options.hosts {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            inventory_text.push_str(&format!(
                "[[host]]\nname = \"hv-{}\"\naddress = \"http://{addr}\"\n\n",
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
            let mut text = format!(
                "name = \"{name}\"\nlisten = \"{addr}\"\nstate_dir = \"{name}\"\ninventory = \"cluster.toml\"\n\
                 heartbeat_interval_ms = 500\npeer_timeout_ms = 3000\n\n\
                 [hypervisor]\nkind = \"sim\"\nbandwidth_mib_s = 1024\nspeed = 1.0\nmemory_mib = 65536\nvcpus = 64\n\n\
                 [features.port-profile]\nswitch = \"sim\"\nlatency_ms = 30\n{}\n\
                 [features.hook]\ndriver = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", \"exit 0\"]\ntimeout_ms = 5000\n\n",
                if flaky { "fail_rate = 0.25\n" } else { "" }
            );
            // Spread the kinds of VM so every host has a mix.
            for v in (0..options.vms).filter(|v| (v + v / options.hosts) % options.hosts == i) {
                text.push_str(&vm_toml(v, &mut rng));
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
            agents,
            stops,
            servers,
        })
    }

    /// Keep migrations moving: every couple of seconds, move a random idle VM
    /// to a random other host in a random mode.
    pub fn spawn_traffic(&self) {
        let agents = self.agents.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let source = {
                    let mut rng = rand::rng();
                    agents.choose(&mut rng).cloned()
                };
                let Some(source) = source else { return };
                if source.is_stopping() {
                    return;
                }
                let vms: Vec<String> = source
                    .vms()
                    .await
                    .into_iter()
                    .filter(|v| {
                        v.migration_id.is_empty()
                            && v.state == crate::proto::GuestState::Running as i32
                    })
                    .map(|v| v.name)
                    .collect();
                let (vm, destination, mode) = {
                    let mut rng = rand::rng();
                    let Some(vm) = vms.choose(&mut rng).cloned() else {
                        continue;
                    };
                    let others: Vec<&Arc<Agent>> =
                        agents.iter().filter(|a| a.name != source.name).collect();
                    let Some(destination) = others.choose(&mut rng).map(|a| a.name.clone()) else {
                        continue;
                    };
                    let mode = if rng.random_bool(0.5) {
                        Mode::Safe
                    } else {
                        Mode::Fast
                    };
                    (vm, destination, mode)
                };
                if let Err(e) = source.start_migration(&vm, &destination, mode, None).await {
                    tracing::debug!("demo traffic: {e}");
                }
            }
        });
    }

    /// Stop every agent the way a signal would.
    pub async fn stop(self) {
        for stop in &self.stops {
            let _ = stop.send(()).await;
        }
        for server in self.servers {
            let _ = server.await;
        }
    }
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
    if !options.headless {
        if options.traffic {
            cluster.spawn_traffic();
        }
        let result = crate::console::run(crate::console::Options {
            cluster: "demo".into(),
            inventory: cluster.inventory.clone(),
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
    println!("inventory: {}", cluster.inventory_path.display());
    println!(
        "try: TERN_INVENTORY={} tern status",
        cluster.inventory_path.display()
    );
    println!(
        "     TERN_INVENTORY={} tern watch",
        cluster.inventory_path.display()
    );
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
