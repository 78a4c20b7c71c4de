//! The agents a command talks to: the inventory, one Console connection per
//! host, gRPC statuses turned into operator messages, and the two look-ups
//! every command needs (where a VM runs, which agent owns a migration).

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::join_all;
use tonic::transport::Channel;
use tonic::{Code, Response, Status, Streaming};

use super::sanitize::{Sanitize, terminal_safe};
use super::{CliError, error_chain, exit_code_for_status, with_causes};
use crate::config::{HostEntry, Inventory};
use crate::proto;
use crate::proto::console_client::ConsoleClient;
use crate::protocol::bounds;
use crate::trust::tls::{self, IdentityFiles};

/// How long to wait for an agent to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a command that asks every agent waits for each before it goes
/// on without it and names it ("hv-b: no answer in 1 s"): a hung host must
/// not hold up what the others answer.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(1);
/// How long a short request (everything but Watch and WaitMigration) may take.
/// Rollback and Resolve may wait on drivers and on a peer, hence not shorter.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// HTTP/2 pings on long calls, so a host that vanishes without closing its
/// connections is noticed instead of waited on forever.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// What a command is given to reach the agents: the inventory file, and
/// the identity folder (`--identity`, `$TERN_IDENTITY`) for `https://` hosts.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub inventory: PathBuf,
    pub identity: Option<PathBuf>,
    /// Each agent's time to answer a question asked of all ([`ANSWER_DEADLINE`]
    /// when not set).
    pub answer_deadline: Option<Duration>,
}

impl Access {
    pub fn new(inventory: impl Into<PathBuf>, identity: Option<PathBuf>) -> Access {
        Access {
            inventory: inventory.into(),
            identity,
            answer_deadline: None,
        }
    }
}

/// The inventory and the path it was read from (error messages name it),
/// and who this client is to the agents.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub path: PathBuf,
    pub inventory: Inventory,
    pub tls: Option<IdentityFiles>,
    /// Each agent's time to answer a question asked of all.
    pub answer_deadline: Duration,
}

impl Cluster {
    /// Read the inventory and the identity; a missing or invalid file is bad input.
    pub fn load(access: &Access) -> Result<Cluster, CliError> {
        let path = &access.inventory;
        let inventory = Inventory::load(path).map_err(|e| CliError::usage(e.to_string()))?;
        let tls = match &access.identity {
            Some(dir) => Some(
                IdentityFiles::load_dir(dir)
                    .map_err(|e| CliError::usage(format!("identity {}: {e}", dir.display())))?,
            ),
            None => None,
        };
        if tls.is_none()
            && let Some(entry) = inventory
                .host
                .iter()
                .find(|h| h.address.starts_with("https://"))
        {
            return Err(CliError::usage(format!(
                "{} lists {} at {}, which takes an identity: give --identity DIR (or set \
                 TERN_IDENTITY) with a folder `tern ca issue` wrote",
                path.display(),
                entry.name,
                entry.address
            )));
        }
        Ok(Cluster {
            path: path.to_path_buf(),
            inventory,
            tls,
            answer_deadline: access.answer_deadline.unwrap_or(ANSWER_DEADLINE),
        })
    }

    /// Connect to one host's agent.
    pub async fn connect(&self, entry: &HostEntry) -> Result<Agent, CliError> {
        Agent::connect(entry, self.tls.as_ref()).await
    }

    /// [`Cluster::connect`], or "no answer" once `deadline` has passed.
    pub async fn connect_within(
        &self,
        entry: &HostEntry,
        deadline: Duration,
    ) -> Result<Agent, CliError> {
        match tokio::time::timeout(deadline, self.connect(entry)).await {
            Ok(agent) => agent,
            Err(_) => Err(no_answer(&entry.name, deadline)),
        }
    }

    pub fn host_names(&self) -> Vec<&str> {
        self.inventory
            .host
            .iter()
            .map(|h| h.name.as_str())
            .collect()
    }

    /// `name` must be a host of the inventory.
    pub fn check_host(&self, name: &str) -> Result<&HostEntry, CliError> {
        self.inventory.host(name).ok_or_else(|| {
            CliError::usage(format!(
                "no host named {name} in {}; hosts: {}",
                self.path.display(),
                self.host_names().join(", ")
            ))
        })
    }

    /// Connect to every agent at once, in inventory order; one that does
    /// not answer within the answer deadline is left out, named.
    pub async fn connect_all(&self) -> Vec<Link> {
        join_all(self.inventory.host.iter().map(|entry| async move {
            let agent = self.connect_within(entry, self.answer_deadline).await;
            Link {
                entry: entry.clone(),
                agent: agent.map(|a| a.within(self.answer_deadline)),
            }
        }))
        .await
    }
}

/// An agent that did not answer a question asked of all in time.
pub fn no_answer(host: &str, deadline: Duration) -> CliError {
    CliError::unavailable(format!("{host}: no answer in {}", seconds(deadline)))
}

fn seconds(d: Duration) -> String {
    match d.as_millis() {
        ms if ms % 1000 == 0 => format!("{} s", ms / 1000),
        ms => format!("{:.1} s", ms as f64 / 1000.0),
    }
}

/// One inventory host and, if it could be reached, its agent.
#[derive(Debug)]
pub struct Link {
    pub entry: HostEntry,
    pub agent: Result<Agent, CliError>,
}

/// Every agent that could be reached.
pub fn reachable(links: &[Link]) -> impl Iterator<Item = &Agent> {
    links.iter().filter_map(|l| l.agent.as_ref().ok())
}

/// The first connection error, if any agent could not be reached.
pub fn first_unreachable(links: &[Link]) -> Option<&CliError> {
    links.iter().find_map(|l| l.agent.as_ref().err())
}

/// A connected Console client for one host.
#[derive(Debug, Clone)]
pub struct Agent {
    pub name: String,
    pub address: String,
    client: ConsoleClient<Channel>,
    /// How long a question asked of every agent waits for this one
    /// ([`Agent::ask`]); `None`: as long as a short call.
    answer_deadline: Option<Duration>,
}

impl Agent {
    /// Connect to `entry`'s agent within [`CONNECT_TIMEOUT`]. No request
    /// timeout is set on the channel: it would cut Watch and WaitMigration,
    /// so short calls get theirs in [`Agent::call`].
    pub async fn connect(
        entry: &HostEntry,
        tls: Option<&IdentityFiles>,
    ) -> Result<Agent, CliError> {
        let endpoint = tls::endpoint(entry, tls)
            .map_err(CliError::usage)?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEP_ALIVE)
            .keep_alive_timeout(KEEP_ALIVE)
            .keep_alive_while_idle(true);
        let unreachable = |detail: String| {
            CliError::unavailable(format!(
                "agent {} at {} is unreachable: {detail}",
                entry.name, entry.address
            ))
        };
        // The connect timeout bounds the TCP connect; this one the handshake too.
        let channel = match tokio::time::timeout(CONNECT_TIMEOUT * 2, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(unreachable(error_chain(&e))),
            Err(_) => {
                return Err(unreachable(format!(
                    "no connection within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        // Explicit limits: replies may be as large as an agent sends
        // (a page of a list, a Watch snapshot), requests are small.
        let client = ConsoleClient::new(channel)
            .max_decoding_message_size(bounds::MAX_REPLY_BYTES)
            .max_encoding_message_size(bounds::MAX_REQUEST_BYTES);
        Ok(Agent {
            name: entry.name.clone(),
            address: entry.address.clone(),
            client,
            answer_deadline: None,
        })
    }

    /// This agent, answering questions asked of all within `deadline`.
    pub fn within(mut self, deadline: Duration) -> Agent {
        self.answer_deadline = Some(deadline);
        self
    }

    /// Bound a question asked of every agent by the answer deadline, so a
    /// hung host is named ("hv-b: no answer in 1 s") instead of holding up
    /// what the others answered.
    pub async fn asked<T>(
        &self,
        question: impl Future<Output = Result<T, CliError>>,
    ) -> Result<T, CliError> {
        let Some(deadline) = self.answer_deadline else {
            return question.await;
        };
        match tokio::time::timeout(deadline, question).await {
            Ok(answer) => answer,
            Err(_) => Err(no_answer(&self.name, deadline)),
        }
    }

    /// A short call, bounded by [`REQUEST_TIMEOUT`]. The answer's text is
    /// made terminal-safe ([`Sanitize`]), like every answer from an agent.
    pub async fn call<T: Sanitize, F, Fut>(&self, call: F) -> Result<T, CliError>
    where
        F: FnOnce(ConsoleClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.short(call)
            .await
            .map_err(|status| self.status_error(&status))
    }

    /// A call that may take as long as a migration (WaitMigration).
    pub async fn call_long<T: Sanitize, F, Fut>(&self, call: F) -> Result<T, CliError>
    where
        F: FnOnce(ConsoleClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        call(self.client.clone())
            .await
            .map(|r| sanitized(r.into_inner()))
            .map_err(|status| self.status_error(&status))
    }

    /// Open the agent's Watch stream (bounded like a short call; the stream
    /// itself is not). Its events come out terminal-safe.
    pub async fn watch(&self) -> Result<WatchStream, CliError> {
        let stream = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.client.clone().watch(proto::WatchRequest {}),
        )
        .await
        {
            Ok(answer) => answer
                .map(Response::into_inner)
                .map_err(|status| self.status_error(&status))?,
            Err(_) => {
                return Err(self.status_error(&Status::deadline_exceeded(format!(
                    "agent {} at {} did not open its Watch stream within {} s",
                    self.name,
                    self.address,
                    REQUEST_TIMEOUT.as_secs()
                ))));
            }
        };
        Ok(WatchStream(stream))
    }

    /// A short call with the raw status, for callers that treat some codes
    /// as answers. Running out of time is DeadlineExceeded.
    async fn short<T: Sanitize, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: FnOnce(ConsoleClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        match tokio::time::timeout(REQUEST_TIMEOUT, call(self.client.clone())).await {
            Ok(answer) => answer.map(|r| sanitized(r.into_inner())),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "agent {} at {} did not answer within {} s",
                self.name,
                self.address,
                REQUEST_TIMEOUT.as_secs()
            ))),
        }
    }

    pub fn status_error(&self, status: &Status) -> CliError {
        status_error(&self.name, &self.address, status)
    }

    /// GetMigration; `None` when this agent does not know the migration.
    pub async fn get_migration(
        &self,
        id: &str,
    ) -> Result<Option<proto::MigrationRecord>, CliError> {
        let request = proto::MigrationRef { id: id.to_string() };
        match self
            .short(|mut c| async move { c.get_migration(request).await })
            .await
        {
            Ok(record) => Ok(Some(record)),
            Err(status) if is_not_found(&status) => Ok(None),
            Err(status) => Err(self.status_error(&status)),
        }
    }

    /// This agent's log lines of a migration or an attempt (at most
    /// `max_lines`, 0 for the agent's default), each named after this agent
    /// whatever the line says: an agent speaks for its own host only.
    /// This agent's `tern doctor` checks.
    pub async fn doctor(&self) -> Result<proto::DoctorReply, CliError> {
        self.call(|mut c| async move { c.doctor(proto::DoctorRequest {}).await })
            .await
    }

    pub async fn measure_link(
        &self,
        to: &str,
        duration_ms: u32,
    ) -> Result<proto::MeasureLinkReply, CliError> {
        let request = proto::MeasureLinkRequest {
            to: to.to_string(),
            duration_ms,
        };
        self.call(|mut c| async move { c.measure_link(request).await })
            .await
    }

    pub async fn attempt_logs(
        &self,
        id: &str,
        max_lines: u32,
    ) -> Result<proto::AttemptLogsReply, CliError> {
        let request = proto::AttemptLogsRequest {
            id: id.to_string(),
            max_lines,
        };
        let mut reply = self
            .call(|mut c| async move { c.attempt_logs(request).await })
            .await?;
        reply.host = self.name.clone();
        for line in &mut reply.lines {
            line.host = self.name.clone();
        }
        Ok(reply)
    }

    /// Every VM of the host, following ListVms's pages.
    pub async fn list_vms(&self) -> Result<Vec<proto::Vm>, CliError> {
        self.all_pages(|token| async move {
            let request = proto::ListVmsRequest {
                page_size: 0,
                page_token: token,
            };
            let reply = self
                .call(|mut c| async move { c.list_vms(request).await })
                .await?;
            Ok((reply.vms, reply.next_page_token))
        })
        .await
    }

    /// Every migration the host keeps, following ListMigrations's pages.
    pub async fn list_migrations(&self) -> Result<Vec<proto::MigrationRecord>, CliError> {
        self.all_pages(|token| async move {
            let request = proto::ListMigrationsRequest {
                page_size: 0,
                page_token: token,
            };
            let reply = self
                .call(|mut c| async move { c.list_migrations(request).await })
                .await?;
            Ok((reply.migrations, reply.next_page_token))
        })
        .await
    }

    /// Every evacuation the host keeps, following ListEvacuations's pages.
    pub async fn list_evacuations(&self) -> Result<Vec<proto::EvacuationRecord>, CliError> {
        self.all_pages(|token| async move {
            let request = proto::ListEvacuationsRequest {
                page_size: 0,
                page_token: token,
            };
            let reply = self
                .call(|mut c| async move { c.list_evacuations(request).await })
                .await?;
            Ok((reply.evacuations, reply.next_page_token))
        })
        .await
    }

    /// Ask for pages until the agent says there are no more. Tokens are
    /// keys in ascending order: one that does not move on is an agent
    /// error, not a reason to ask for ever.
    async fn all_pages<T, F, Fut>(&self, mut ask: F) -> Result<Vec<T>, CliError>
    where
        F: FnMut(String) -> Fut,
        Fut: Future<Output = Result<(Vec<T>, String), CliError>>,
    {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let (items, next) = ask(token.clone()).await?;
            all.extend(items);
            if next.is_empty() {
                return Ok(all);
            }
            if next <= token {
                return Err(CliError::new(
                    super::exit::FAILED,
                    format!(
                        "agent {} answered page token {next:?} after {token:?}: its pages do not move on",
                        self.name
                    ),
                ));
            }
            token = next;
        }
    }

    /// Rollback; an agent that does not know the migration has nothing to
    /// roll back for it.
    /// Drop this host's pending work of a migration; nothing pending here is
    /// an empty answer.
    pub async fn forget(&self, id: &str) -> Result<proto::RollbackReply, CliError> {
        let request = proto::MigrationRef { id: id.to_string() };
        match self
            .short(|mut c| async move { c.forget(request).await })
            .await
        {
            Ok(reply) => Ok(reply),
            Err(status) if is_not_found(&status) => Ok(proto::RollbackReply::default()),
            Err(status) => Err(self.status_error(&status)),
        }
    }

    pub async fn rollback(&self, id: &str) -> Result<proto::RollbackReply, CliError> {
        let request = proto::MigrationRef { id: id.to_string() };
        match self
            .short(|mut c| async move { c.rollback(request).await })
            .await
        {
            Ok(reply) => Ok(reply),
            Err(status) if is_not_found(&status) => Ok(proto::RollbackReply::default()),
            Err(status) => Err(self.status_error(&status)),
        }
    }
}

fn sanitized<T: Sanitize>(mut answer: T) -> T {
    answer.sanitize();
    answer
}

/// An agent's Watch stream, its events terminal-safe.
pub struct WatchStream(Streaming<proto::Event>);

impl WatchStream {
    /// The next event; `None` when the agent ended the stream.
    pub async fn message(&mut self) -> Result<Option<proto::Event>, Status> {
        Ok(self.0.message().await?.map(sanitized))
    }
}

/// The agent answered NotFound (as opposed to a proxy or transport saying so).
fn is_not_found(status: &Status) -> bool {
    status.code() == Code::NotFound && !is_transport_failure(status)
}

/// The status did not come from the agent but from the connection to it.
/// tonic attaches the underlying error as the source of such statuses, and
/// says "Service was not ready" when the channel could not reconnect.
fn is_transport_failure(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
        || (status.code() == Code::Unknown && status.message().starts_with("Service was not ready"))
}

/// Turn a status from `host`'s agent into an operator message: the agent's
/// own message verbatim (it is written for operators), or for a connection
/// failure, which agent could not be reached and why.
pub fn status_error(host: &str, address: &str, status: &Status) -> CliError {
    if is_transport_failure(status) {
        let detail = with_causes(
            terminal_safe(status.message()).into_owned(),
            std::error::Error::source(status),
        );
        return CliError::unavailable(format!(
            "agent {host} at {address} is unreachable: {detail}"
        ));
    }
    let message = if status.message().is_empty() {
        format!("agent {host} answered {:?} with no message", status.code())
    } else {
        terminal_safe(status.message()).into_owned()
    };
    CliError::new(exit_code_for_status(status.code()), message)
}

/// The agent that owns migration `id` and its record. Every agent is asked;
/// when several know it (a destination may), the source's answer wins.
pub async fn find_migration<'a>(
    links: &'a [Link],
    id: &str,
) -> Result<(&'a Agent, proto::MigrationRecord), CliError> {
    let answers = join_all(
        reachable(links)
            .map(|agent| async move { (agent, agent.asked(agent.get_migration(id)).await) }),
    )
    .await;
    let mut found: Vec<(&Agent, proto::MigrationRecord)> = Vec::new();
    let mut failure: Option<CliError> = None;
    for (agent, answer) in answers {
        match answer {
            Ok(Some(record)) => found.push((agent, record)),
            Ok(None) => {}
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    if let Some(i) = found
        .iter()
        .position(|(agent, record)| agent.name == record.source)
    {
        return Ok(found.swap_remove(i));
    }
    if let Some(first) = found.into_iter().next() {
        return Ok(first);
    }
    if let Some(e) = failure.or_else(|| first_unreachable(links).cloned()) {
        return Err(CliError::new(
            e.code,
            format!(
                "migration {id} not found on the agents that answered, and {}",
                e.message
            ),
        ));
    }
    Err(CliError::usage(format!("no migration {id} on any agent")))
}

/// Where a VM runs, as ListVms answers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmLocation {
    On(String),
    Nowhere,
    /// Running on more than one host (after a wrong forced resolve).
    Several(Vec<String>),
}

/// A running or paused VM counts; an incoming one (the destination's copy
/// during a migration) or a stopped one does not.
pub fn locate_vm(vm: &str, answers: &[(String, Vec<proto::Vm>)]) -> VmLocation {
    let hosts: Vec<String> = answers
        .iter()
        .filter(|(_, vms)| {
            vms.iter().any(|v| {
                v.name == vm
                    && matches!(
                        proto::GuestState::try_from(v.state),
                        Ok(proto::GuestState::Running | proto::GuestState::Paused)
                    )
            })
        })
        .map(|(host, _)| host.clone())
        .collect();
    match hosts.len() {
        0 => VmLocation::Nowhere,
        1 => VmLocation::On(hosts.into_iter().next().unwrap_or_default()),
        _ => VmLocation::Several(hosts),
    }
}

/// The reachable hosts other than `except` where `vm`'s CPUs are running.
pub async fn running_elsewhere(links: &[Link], vm: &str, except: &str) -> Vec<String> {
    let answers = join_all(reachable(links).map(|agent| async move {
        let vms = agent.list_vms().await.ok()?;
        let running = vms.iter().any(|v| {
            v.name == vm && proto::GuestState::try_from(v.state) == Ok(proto::GuestState::Running)
        });
        (running && agent.name != except).then(|| agent.name.clone())
    }))
    .await;
    answers.into_iter().flatten().collect()
}

/// The host `vm` runs on, asking every agent at once.
pub async fn find_vm_host(cluster: &Cluster, links: &[Link], vm: &str) -> Result<String, CliError> {
    let answers = join_all(links.iter().map(|link| async move {
        let agent = link.agent.as_ref().map_err(Clone::clone)?;
        let vms = agent.asked(agent.list_vms()).await?;
        Ok::<_, CliError>((agent.name.clone(), vms))
    }))
    .await;
    let mut listed = Vec::new();
    let mut failure = None;
    for answer in answers {
        match answer {
            Ok(pair) => listed.push(pair),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    match locate_vm(vm, &listed) {
        VmLocation::On(host) => Ok(host),
        VmLocation::Several(hosts) => Err(CliError::usage(format!(
            "VM {vm} runs on several hosts ({}); stop all but one copy before migrating it",
            hosts.join(", ")
        ))),
        VmLocation::Nowhere => match failure {
            // It may run on the host that did not answer.
            Some(e) => Err(CliError::new(
                e.code,
                format!(
                    "no VM named {vm} on the hosts that answered, and {}",
                    e.message
                ),
            )),
            None => Err(CliError::usage(format!(
                "no VM named {vm} on any host in {}",
                cluster.path.display()
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_inventory(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, text).expect("write inventory");
        (dir, path)
    }

    const THREE_HOSTS: &str = r#"
[[host]]
name = "hv-a"
address = "http://127.0.0.1:7701"
[[host]]
name = "hv-b"
address = "http://127.0.0.1:7702"
[[host]]
name = "hv-c"
address = "http://127.0.0.1:7703"
"#;

    #[test]
    fn a_missing_inventory_is_bad_input_naming_the_file() {
        let err = Cluster::load(&Access::new("/nonexistent/cluster.toml", None)).unwrap_err();
        assert_eq!(err.code, 64);
        assert!(
            err.message.contains("/nonexistent/cluster.toml"),
            "{}",
            err.message
        );
    }

    #[test]
    fn an_invalid_inventory_is_bad_input_with_the_parser_message() {
        let (_dir, path) =
            write_inventory("[[host]]\nname = \"hv-a\"\naddress = \"127.0.0.1:7701\"\n");
        let err = Cluster::load(&Access::new(path.clone(), None)).unwrap_err();
        assert_eq!(err.code, 64);
        assert!(
            err.message.contains("must start with http://"),
            "{}",
            err.message
        );
    }

    #[test]
    fn an_unknown_destination_lists_the_inventory_hosts() {
        let (_dir, path) = write_inventory(THREE_HOSTS);
        let cluster = Cluster::load(&Access::new(path.clone(), None)).expect("valid inventory");
        assert!(cluster.check_host("hv-b").is_ok());
        let err = cluster.check_host("hv-z").unwrap_err();
        assert_eq!(err.code, 64);
        assert_eq!(
            err.message,
            format!(
                "no host named hv-z in {}; hosts: hv-a, hv-b, hv-c",
                path.display()
            )
        );
    }

    fn vm(name: &str, state: proto::GuestState) -> proto::Vm {
        proto::Vm {
            name: name.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_vm_is_located_where_it_runs_not_where_it_is_incoming() {
        let answers = vec![
            (
                "hv-a".to_string(),
                vec![vm("web-01", proto::GuestState::Incoming)],
            ),
            (
                "hv-b".to_string(),
                vec![
                    vm("web-01", proto::GuestState::Running),
                    vm("db-01", proto::GuestState::Paused),
                ],
            ),
        ];
        assert_eq!(locate_vm("web-01", &answers), VmLocation::On("hv-b".into()));
        assert_eq!(locate_vm("db-01", &answers), VmLocation::On("hv-b".into()));
        assert_eq!(locate_vm("mail-01", &answers), VmLocation::Nowhere);
    }

    #[test]
    fn a_stopped_vm_is_not_located() {
        let answers = vec![(
            "hv-a".to_string(),
            vec![vm("web-01", proto::GuestState::Stopped)],
        )];
        assert_eq!(locate_vm("web-01", &answers), VmLocation::Nowhere);
    }

    #[test]
    fn a_vm_running_on_two_hosts_is_reported_as_such() {
        let answers = vec![
            (
                "hv-a".to_string(),
                vec![vm("web-01", proto::GuestState::Running)],
            ),
            (
                "hv-b".to_string(),
                vec![vm("web-01", proto::GuestState::Running)],
            ),
        ];
        assert_eq!(
            locate_vm("web-01", &answers),
            VmLocation::Several(vec!["hv-a".into(), "hv-b".into()])
        );
    }

    #[test]
    fn an_agent_status_message_is_passed_on_verbatim() {
        let status = Status::failed_precondition(
            "migration m-1 has passed the commit point; it cannot be aborted",
        );
        let err = status_error("hv-a", "http://127.0.0.1:7701", &status);
        assert_eq!(err.code, 64);
        assert_eq!(
            err.message,
            "migration m-1 has passed the commit point; it cannot be aborted"
        );
    }

    #[test]
    fn an_agent_status_message_loses_its_escape_sequences() {
        let status = Status::not_found("no migration m-1 \u{1b}]0;pwned\u{7}on hv-a\u{1b}[2K");
        let err = status_error("hv-a", "http://127.0.0.1:7701", &status);
        assert_eq!(err.message, "no migration m-1 on hv-a");
    }

    #[test]
    fn an_unavailable_answer_from_the_agent_keeps_its_message() {
        // e.g. the source agent could not reach the destination
        let status = Status::unavailable("destination hv-b did not answer Prepare");
        let err = status_error("hv-a", "http://127.0.0.1:7701", &status);
        assert_eq!(err.code, 69);
        assert_eq!(err.message, "destination hv-b did not answer Prepare");
    }

    #[test]
    fn a_connection_failure_names_the_unreachable_agent() {
        let cause =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let status = Status::from_error(Box::new(cause));
        let err = status_error("hv-b", "http://127.0.0.1:7702", &status);
        assert_eq!(err.code, 69);
        assert!(
            err.message
                .starts_with("agent hv-b at http://127.0.0.1:7702 is unreachable: "),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("connection refused"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn connecting_to_a_closed_port_is_unreachable() {
        // Bind then drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let entry = HostEntry {
            name: "hv-b".into(),
            address: format!("http://127.0.0.1:{port}"),
            migration_address: None,
        };
        let err = Agent::connect(&entry, None).await.unwrap_err();
        assert_eq!(err.code, 69);
        assert!(
            err.message.starts_with(&format!(
                "agent hv-b at http://127.0.0.1:{port} is unreachable: "
            )),
            "{}",
            err.message
        );
    }
}
