//! A TCP fault proxy for real-process tests: one listener per directed link
//! (say hv-a → hv-b) that forwards to the peer's real port, and a control the
//! test flips while traffic flows.
//!
//! | mode        | new connections           | existing connections                  |
//! |-------------|---------------------------|---------------------------------------|
//! | `Pass`      | forwarded                 | forwarded                             |
//! | `Delay(ms)` | forwarded                 | every chunk held `ms` before it goes  |
//! | `Blackhole` | accepted, nothing forwarded | nothing forwarded (a partition: the bytes wait, as TCP would retransmit them) |
//! | `Refuse`    | reset at once             | reset                                 |
//!
//! [`Proxy::cut`] resets every existing connection of a link and leaves its
//! mode as it was. A connection whose target does not accept (the agent is
//! down) is reset, so the caller sees its peer unreachable.
//!
//! The proxy runs on its own small tokio runtime, so a plain `#[test]` can own it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Hold every chunk this many milliseconds before forwarding it.
    Delay(u64),
    /// Accept, but forward nothing until the mode changes.
    Blackhole,
    /// Reset new and existing connections.
    Refuse,
}

#[derive(Debug, Clone, Copy)]
struct Control {
    mode: Mode,
    /// Bumped by `cut`: connections opened under an older epoch are reset.
    epoch: u64,
}

/// Counters of one link, for the test's report.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub bytes: AtomicU64,
    pub resets: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.connections.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            self.resets.load(Ordering::Relaxed),
        )
    }
}

struct Link {
    control: watch::Sender<Control>,
    stats: Arc<Stats>,
    port: u16,
}

pub struct Proxy {
    runtime: tokio::runtime::Runtime,
    links: BTreeMap<String, Link>,
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy::new()
    }
}

impl Proxy {
    pub fn new() -> Proxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .expect("proxy runtime");
        Proxy {
            runtime,
            links: BTreeMap::new(),
        }
    }

    /// Listen on a free loopback port for link `name`, forwarding to
    /// `127.0.0.1:target`; returns the port to give the connecting side.
    pub fn add_link(&mut self, name: &str, target: u16) -> u16 {
        let listener = self.runtime.block_on(async {
            TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind proxy port")
        });
        let port = listener.local_addr().unwrap().port();
        let (control, _) = watch::channel(Control {
            mode: Mode::Pass,
            epoch: 0,
        });
        let stats = Arc::new(Stats::default());
        let target: SocketAddr = ([127, 0, 0, 1], target).into();
        self.runtime.spawn(accept_loop(
            listener,
            target,
            control.clone(),
            stats.clone(),
        ));
        self.links.insert(
            name.to_string(),
            Link {
                control,
                stats,
                port,
            },
        );
        port
    }

    fn link(&self, name: &str) -> &Link {
        self.links
            .get(name)
            .unwrap_or_else(|| panic!("no proxy link {name}"))
    }

    pub fn names(&self) -> Vec<String> {
        self.links.keys().cloned().collect()
    }

    pub fn port(&self, name: &str) -> u16 {
        self.link(name).port
    }

    pub fn mode(&self, name: &str) -> Mode {
        self.link(name).control.borrow().mode
    }

    pub fn set(&self, name: &str, mode: Mode) {
        self.link(name).control.send_modify(|c| c.mode = mode);
    }

    pub fn set_all(&self, mode: Mode) {
        for name in self.names() {
            self.set(&name, mode);
        }
    }

    /// Reset every connection the link has open now.
    pub fn cut(&self, name: &str) {
        self.link(name).control.send_modify(|c| c.epoch += 1);
    }

    pub fn cut_all(&self) {
        for name in self.names() {
            self.cut(&name);
        }
    }

    pub fn stats(&self, name: &str) -> (u64, u64, u64) {
        self.link(name).stats.snapshot()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Close every connection with the listeners rather than leave them to
        // the runtime's teardown order.
        for link in self.links.values() {
            link.control.send_modify(|c| c.mode = Mode::Refuse);
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    control: watch::Sender<Control>,
    stats: Arc<Stats>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if control.borrow().mode == Mode::Refuse {
            stats.resets.fetch_add(1, Ordering::Relaxed);
            reset(client);
            continue;
        }
        stats.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(forward(client, target, control.subscribe(), stats.clone()));
    }
}

/// Close with RST rather than FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn forward(
    mut client: TcpStream,
    target: SocketAddr,
    control: watch::Receiver<Control>,
    stats: Arc<Stats>,
) {
    let epoch = control.borrow().epoch;
    let _ = client.set_nodelay(true);
    let connected = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await;
    let mut server = match connected {
        Ok(Ok(server)) => server,
        _ => {
            stats.resets.fetch_add(1, Ordering::Relaxed);
            return reset(client);
        }
    };
    let _ = server.set_nodelay(true);
    let result = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        tokio::try_join!(
            pump(client_read, server_write, control.clone(), epoch, &stats),
            pump(server_read, client_write, control.clone(), epoch, &stats),
        )
    };
    if result.is_err() {
        stats.resets.fetch_add(1, Ordering::Relaxed);
        reset(client);
        reset(server);
    }
}

/// Why a pump stopped without a clean end of stream: reset both sides.
struct Reset;

/// Wait while the link is blackholed; `Err` once the connection must be reset.
async fn gate(control: &mut watch::Receiver<Control>, epoch: u64) -> Result<Mode, Reset> {
    loop {
        let c = *control.borrow_and_update();
        if c.epoch != epoch || c.mode == Mode::Refuse {
            return Err(Reset);
        }
        if c.mode != Mode::Blackhole {
            return Ok(c.mode);
        }
        control.changed().await.map_err(|_| Reset)?;
    }
}

/// Resolves once the connection must be reset (or the proxy is gone).
async fn reset_requested(control: &mut watch::Receiver<Control>, epoch: u64) {
    loop {
        if control.changed().await.is_err() {
            return;
        }
        let c = *control.borrow_and_update();
        if c.epoch != epoch || c.mode == Mode::Refuse {
            return;
        }
    }
}

async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut control: watch::Receiver<Control>,
    epoch: u64,
    stats: &Stats,
) -> Result<(), Reset> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = loop {
            gate(&mut control, epoch).await?;
            tokio::select! {
                read = from.read(&mut buf) => break read.map_err(|_| Reset)?,
                changed = control.changed() => changed.map_err(|_| Reset)?,
            }
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        // The mode in force when the chunk arrived decides its delay; a
        // blackhole or reset that comes meanwhile still applies to it.
        if let Mode::Delay(ms) = gate(&mut control, epoch).await? {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(ms)) => {}
                () = reset_requested(&mut control, epoch) => return Err(Reset),
            }
        }
        gate(&mut control, epoch).await?;
        tokio::select! {
            written = to.write_all(&buf[..n]) => written.map_err(|_| Reset)?,
            () = reset_requested(&mut control, epoch) => return Err(Reset),
        }
        stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The name of the link for `from`'s calls to `to`.
pub fn link_name(from: &str, to: &str) -> String {
    format!("{from}->{to}")
}

/// A cluster of agents that reach each other only through `proxy`: `from`'s
/// calls to `to` go through link `from->to`. Each agent reads its own
/// inventory, in which its peers' addresses are the proxy ports of its
/// outgoing links; the CLI's inventory (`cluster.inventory`) names the
/// agents' real ports. `hosts`: each agent's name and the config after its
/// top lines (`timing` and friends).
pub fn cluster_behind(
    proxy: &mut Proxy,
    hosts: &[(&str, String)],
    timing: &str,
) -> crate::common::Cluster {
    let dir = tempfile::tempdir().unwrap();
    // Below the ephemeral range, so the proxy (which binds `…:0`) cannot be
    // handed one of them.
    let ports: BTreeMap<&str, u16> = hosts
        .iter()
        .map(|(h, _)| (*h, crate::common::agent_port()))
        .collect();
    let inventory_text = |entries: Vec<(&str, u16)>| {
        entries
            .into_iter()
            .map(|(name, port)| {
                format!("[[host]]\nname = \"{name}\"\naddress = \"http://127.0.0.1:{port}\"\n\n")
            })
            .collect::<String>()
    };
    let inventory = dir.path().join("cluster.toml");
    std::fs::write(
        &inventory,
        inventory_text(hosts.iter().map(|(h, _)| (*h, ports[h])).collect()),
    )
    .unwrap();
    let mut agents = Vec::new();
    for (name, tail) in hosts {
        let entries = hosts
            .iter()
            .map(|(peer, _)| {
                if peer == name {
                    (*peer, ports[peer])
                } else {
                    (*peer, proxy.add_link(&link_name(name, peer), ports[peer]))
                }
            })
            .collect();
        let peers = format!("peers-{name}.toml");
        std::fs::write(dir.path().join(&peers), inventory_text(entries)).unwrap();
        let config_path = dir.path().join(format!("{name}.toml"));
        let config = format!(
            "name = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{name}-state\"\ninventory = \"{peers}\"\n{timing}\n{tail}",
            port = ports[name],
        );
        std::fs::write(&config_path, config).unwrap();
        agents.push(crate::common::Host {
            name: name.to_string(),
            config_path,
            log_path: dir.path().join(format!("{name}.log")),
            port: ports[name],
            child: None,
            group: false,
            netns: None,
            ip: "127.0.0.1".into(),
        });
    }
    let mut cluster = crate::common::Cluster {
        dir,
        inventory,
        hosts: agents,
        cli_netns: None,
        tls: None,
    };
    for (name, _) in hosts {
        cluster.start_agent(name);
    }
    cluster
}
