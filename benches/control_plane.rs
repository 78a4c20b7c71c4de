//! Control-plane benchmarks on loopback, two real agents in this process
//! serving real gRPC:
//!
//! - `five_phase_attempt/plaintext` and `/mtls`: StartMigration → outcome
//!   for a 1 MiB simulated VM on a 1 TiB/s link with one port-profile feature, between
//!   agents on plaintext and on mutual TLS (identities from a CA made for
//!   the run), measured back to back (target p50 < 5 ms either way; the
//!   ratio of the p50s is printed);
//! - `abort_to_running`: from the Abort RPC to the guest running on the
//!   source again, for a VM caught in Perform (target p50 < 100 ms);
//! - `journal_write`: one journal write of a destination attempt's record,
//!   lazy (`synchronous = NORMAL`) and durable (`FULL`, the WAL synced), in
//!   the same run: what each decision the host core marks durable costs. A
//!   five-phase attempt of a VM with one feature makes three durable writes
//!   (the source's Finish sent, the destination's write before its prepare
//!   stage, its commit) of about a dozen.
//!
//! Criterion reports the mean; the p50 and p99 of every measured attempt are
//! printed at the end of each group.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tern::agent::{self, Agent};
use tern::config::{AgentConfig, Inventory};
use tern::proto;
use tern::proto::console_client::ConsoleClient;
use tern::trust::tls::IdentityFiles;
use tokio::runtime::Runtime;
use tonic::transport::Channel;

struct Pair {
    _dir: tempfile::TempDir,
    a: ConsoleClient<Channel>,
    b: ConsoleClient<Channel>,
    _stops: Vec<tokio::sync::mpsc::Sender<()>>,
}

async fn pair(vm_memory_mib: u64, bandwidth_mib_s: u64, tls: bool) -> Pair {
    use tern::trust::{Role, ca};
    let dir = tempfile::tempdir().unwrap();
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (aa, ab) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let scheme = if tls { "https" } else { "http" };
    let inventory = format!(
        "[[host]]\nname = \"hv-a\"\naddress = \"{scheme}://{aa}\"\n[[host]]\nname = \"hv-b\"\naddress = \"{scheme}://{ab}\"\n"
    );
    let ids = dir.path().join("identities");
    let issue = |name: &str, role: Role| {
        let request = ca::IssueRequest {
            name: name.into(),
            role,
            sans: vec!["127.0.0.1".into()],
            days: 1,
        };
        ca::issue(&dir.path().join("ca"), &request, &ids).unwrap()
    };
    if tls {
        ca::init(&dir.path().join("ca")).unwrap();
    }
    std::fs::write(dir.path().join("cluster.toml"), inventory).unwrap();
    let inventory = Inventory::load(&dir.path().join("cluster.toml")).unwrap();
    let mut stops = Vec::new();
    for (name, listener, vm) in [("hv-a", la, true), ("hv-b", lb, false)] {
        let addr = listener.local_addr().unwrap();
        let vm = if vm {
            format!(
                "[[vm]]\nname = \"bench-01\"\nmemory_mib = {vm_memory_mib}\nvcpus = 1\ndirty_rate_mib_s = 0\n\
                 features = [{{ name = \"port-profile\", required = true }}]\n"
            )
        } else {
            String::new()
        };
        let tls_table = if tls {
            let own = issue(name, Role::Agent);
            format!(
                "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\n",
                own.display()
            )
        } else {
            String::new()
        };
        let config = format!(
            "name = \"{name}\"\nlisten = \"{addr}\"\nstate_dir = \"{name}\"\ninventory = \"cluster.toml\"\n\
             {tls_table}[hypervisor]\nkind = \"sim\"\nbandwidth_mib_s = {bandwidth_mib_s}\n\
             [features.port-profile]\nswitch = \"sim\"\n{vm}"
        );
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let config = AgentConfig::load(&path).unwrap();
        let agent: Arc<Agent> = Agent::open(&config, inventory.clone()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(agent::serve(agent, listener, rx));
        stops.push(tx);
    }
    let operator = tls.then(|| IdentityFiles::load_dir(&issue("bench", Role::Operator)).unwrap());
    let connect = |name: &str| {
        let entry = inventory.host(name).unwrap().clone();
        let operator = operator.clone();
        async move {
            let channel = tern::trust::tls::endpoint(&entry, operator.as_ref())
                .unwrap()
                .connect()
                .await
                .unwrap();
            ConsoleClient::new(channel)
        }
    };
    let a = connect("hv-a").await;
    let b = connect("hv-b").await;
    Pair {
        _dir: dir,
        a,
        b,
        _stops: stops,
    }
}

/// Start a migration, retrying while the destination is still cleaning up
/// after the previous iteration.
async fn start(client: &mut ConsoleClient<Channel>, to: &str) -> proto::MigrationRecord {
    loop {
        let request = proto::StartMigrationRequest {
            completion: None,
            vm: "bench-01".into(),
            destination: to.into(),
            mode: proto::Mode::Safe as i32,
        };
        match client.start_migration(request).await {
            Ok(r) => return r.into_inner(),
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Start a migration and wait until its transfer is under way. An attempt
/// that ends before (the destination still cleaning up after the previous
/// iteration) is started again.
async fn perform_running(client: &mut ConsoleClient<Channel>) -> proto::MigrationRecord {
    loop {
        let record = start(client, "hv-b").await;
        loop {
            let r = client
                .get_migration(proto::MigrationRef {
                    id: record.id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            let performing = r.phases.iter().any(|p| {
                p.phase == proto::Phase::Perform as i32
                    && p.status == proto::StepStatus::Running as i32
            });
            if performing {
                return r;
            }
            if r.outcome != proto::Outcome::None as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Print the p50 and p99 of `samples`; returns the p50.
fn percentiles(name: &str, samples: &Mutex<Vec<Duration>>) -> Option<Duration> {
    let mut s = samples.lock().unwrap().clone();
    if s.is_empty() {
        return None;
    }
    s.sort();
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name}: n = {}, p50 = {:.3} ms, p99 = {:.3} ms",
        s.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    );
    Some(at(0.50))
}

fn five_phase_attempt(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let mut group = c.benchmark_group("five_phase_attempt");
    let mut p50 = Vec::new();
    for (name, tls) in [("plaintext", false), ("mtls", true)] {
        p50.push(five_phase(&rt, &mut group, name, tls));
    }
    group.finish();
    if let [Some(plain), Some(mtls)] = p50[..] {
        println!(
            "five_phase_attempt: mtls / plaintext p50 = {:.2}",
            mtls.as_secs_f64() / plain.as_secs_f64()
        );
    }
}

fn five_phase(
    rt: &Runtime,
    group: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    name: &str,
    tls: bool,
) -> Option<Duration> {
    // 1 MiB (a guest of 0 MiB is refused) over a 1 TiB/s link: the
    // transfer takes about a microsecond, the rest is the control plane.
    let mut pair = rt.block_on(pair(1, 1 << 20, tls));
    let samples = Mutex::new(Vec::new());
    let mut on_a = true;
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (client, to) = if on_a {
                        (&mut pair.a, "hv-b")
                    } else {
                        (&mut pair.b, "hv-a")
                    };
                    let t0 = Instant::now();
                    let record = start(client, to).await;
                    let done = client
                        .wait_migration(proto::MigrationRef { id: record.id })
                        .await
                        .unwrap()
                        .into_inner();
                    let took = t0.elapsed();
                    assert_eq!(done.outcome, proto::Outcome::Succeeded as i32, "{done:?}");
                    on_a = !on_a;
                    total += took;
                    samples.lock().unwrap().push(took);
                }
                total
            })
        })
    });
    percentiles(&format!("five_phase_attempt/{name}"), &samples)
}

fn abort_to_running(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    // 64 GiB over 64 MiB/s: Perform lasts far longer than any iteration.
    let pair = rt.block_on(pair(65536, 64, false));
    let mut a = pair.a.clone();
    let samples = Mutex::new(Vec::new());
    let mut group = c.benchmark_group("abort");
    group.sample_size(20);
    group.bench_function("abort_to_running", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let record = perform_running(&mut a).await;
                    let t0 = Instant::now();
                    a.abort(proto::MigrationRef {
                        id: record.id.clone(),
                    })
                    .await
                    .unwrap();
                    loop {
                        let vms = a
                            .list_vms(proto::ListVmsRequest::default())
                            .await
                            .unwrap()
                            .into_inner()
                            .vms;
                        if vms.iter().any(|v| {
                            v.name == "bench-01" && v.state == proto::GuestState::Running as i32
                        }) {
                            break;
                        }
                    }
                    let took = t0.elapsed();
                    total += took;
                    samples.lock().unwrap().push(took);
                }
                total
            })
        })
    });
    group.finish();
    percentiles("abort_to_running", &samples);
}

/// One journal write, lazy or durable, of a realistic record.
fn journal_write(c: &mut Criterion) {
    use tern::agent::journal::Journal;
    use tern::host::Entry;
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(dir.path()).unwrap();
    let vm = tern::protocol::VmSpec {
        name: "bench-01".into(),
        memory_mib: 1024,
        vcpus: 1,
        dirty_rate_mib_s: 0,
        features: vec![tern::protocol::FeatureSpec {
            name: "port-profile".into(),
            driver: "port-profile".into(),
            required: true,
        }],
        qemu: None,
    };
    let c1 =
        tern::protocol::cookies::cookie1("m-1.1", "m-1", "hv-a", &vm, tern::protocol::Mode::Safe);
    let incoming = tern::protocol::cookies::check_cookie1(&c1, |_| true).unwrap();
    let (attempt, _) = tern::protocol::destination::DestinationAttempt::prepare(
        incoming,
        "hv-b",
        tern::protocol::destination::FreeCapacity {
            memory_mib: 65536,
            vcpus: 64,
        },
        false,
        None,
        tern::protocol::Timing::default(),
        0,
    )
    .unwrap();
    let entry = Entry::Destination(Box::new(attempt));
    let mut group = c.benchmark_group("journal_write");
    for (name, durable) in [("lazy", false), ("durable", true)] {
        let samples = Mutex::new(Vec::new());
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t0 = Instant::now();
                    journal.write(&entry, durable).unwrap();
                    let took = t0.elapsed();
                    total += took;
                    samples.lock().unwrap().push(took);
                }
                total
            })
        });
        percentiles(&format!("journal_write/{name}"), &samples);
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
}

criterion_group! { name = benches; config = config(); targets = five_phase_attempt, abort_to_running, journal_write }
criterion_main!(benches);
