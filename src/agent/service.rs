//! The gRPC services, kept thin: decode and check the request, hand it to the
//! agent, map the answer to a status an operator can act on.

use crate::protocol::record::completion_request_from_proto;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use super::Agent;
use crate::features::{Faults, faults};
use crate::host::{PeerCall, PeerResponse, Refusal};
use crate::proto::{self, console_server, peer_server};
use crate::protocol::bounds::{self, IdKind};
use crate::protocol::record::mode_from_proto;
use crate::protocol::{RunOn, Stage};
use crate::trust::{Caller, Identity, Role};

pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    stop: oneshot::Receiver<()>,
) {
    // The builder's tcp_nodelay only applies to listeners it binds itself:
    // without it here, Nagle holds small replies back for a delayed ACK.
    let incoming = TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(stream)
    });
    // Explicit message limits (protocol::bounds says why these values).
    let console = console_server::ConsoleServer::new(ConsoleService(agent.clone()))
        .max_decoding_message_size(bounds::MAX_REQUEST_BYTES)
        .max_encoding_message_size(bounds::MAX_REPLY_BYTES);
    let peer = peer_server::PeerServer::new(PeerService(agent.clone()))
        .max_decoding_message_size(bounds::MAX_REQUEST_BYTES)
        .max_encoding_message_size(bounds::MAX_REQUEST_BYTES);
    let (health, health_service) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(report_health(agent.clone(), health));
    // Both versions: grpcurl asks v1 first, older clients only v1alpha.
    let reflection = match (reflection().build_v1(), reflection().build_v1alpha()) {
        (Ok(v1), Ok(v1alpha)) => (
            InterceptedService::new(v1, ViewersOnly(agent.clone())),
            InterceptedService::new(v1alpha, ViewersOnly(agent.clone())),
        ),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("gRPC server of {}: reflection: {e}", agent.name);
            return;
        }
    };
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(tls) = &agent.tls {
        builder = match builder.tls_config(tls.server()) {
            Ok(builder) => builder,
            Err(e) => {
                tracing::error!("gRPC server of {}: TLS settings refused: {e}", agent.name);
                return;
            }
        };
    }
    let result = builder
        .add_service(console)
        .add_service(peer)
        .add_service(health_service)
        .add_service(reflection.0)
        .add_service(reflection.1)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop.await;
        })
        .await;
    health_task.abort();
    if let Err(e) = result {
        tracing::error!("gRPC server of {}: {e}", agent.name);
    }
}

/// The services `grpc.health.v1.Health` reports on: the whole agent ("")
/// and each of its own services, all with the same status.
const HEALTH_SERVICES: [&str; 3] = [
    "",
    <console_server::ConsoleServer<ConsoleService> as tonic::server::NamedService>::NAME,
    <peer_server::PeerServer<PeerService> as tonic::server::NamedService>::NAME,
];

/// Keep the health service's answer in step with the agent: NOT_SERVING
/// while recovery settles what the journal left open, when the journal
/// failed, and once the agent is stopping; SERVING otherwise. Anyone who
/// can connect may ask (with TLS, any certificate of the cluster CA, of
/// any role: a load balancer's probe holds one), like a TCP probe would
/// learn as much.
async fn report_health(agent: Arc<Agent>, health: tonic_health::server::HealthReporter) {
    use tonic_health::ServingStatus;
    let mut ready = agent.ready.subscribe();
    let mut stopping = agent.stopping.subscribe();
    loop {
        let serving = *ready.borrow_and_update() && !*stopping.borrow_and_update();
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in HEALTH_SERVICES {
            health.set_service_status(service, status).await;
        }
        tokio::select! {
            changed = ready.changed() => if changed.is_err() { return },
            changed = stopping.changed() => if changed.is_err() { return },
        }
    }
}

/// Lets through callers who may read the Console service (the viewer
/// role), for server reflection: it describes what a viewer may call, so
/// with TLS it asks for what Console's reads ask for; a plaintext agent
/// answers anyone, as it does for everything.
#[derive(Clone)]
struct ViewersOnly(Arc<Agent>);

impl tonic::service::Interceptor for ViewersOnly {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        authorize(&self.0, &request, Role::Viewer)?;
        Ok(request)
    }
}

/// Server reflection, for grpcurl and friends: it describes the Console
/// service and health, not the Peer service, which is only for agents.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::CONSOLE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

struct PeerService(Arc<Agent>);

/// Who made `request`: the identity in its verified client certificate,
/// or a plaintext caller on an agent without `[tls]`.
fn caller<T>(agent: &Agent, request: &Request<T>) -> Result<Caller, Status> {
    if agent.tls.is_none() {
        return Ok(Caller::Plaintext);
    }
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    Identity::from_der(leaf)
        .map(Caller::Verified)
        .map_err(Status::unauthenticated)
}

/// The caller of `request`, if it may do what `needed` may.
fn authorize<T>(agent: &Agent, request: &Request<T>, needed: Role) -> Result<Caller, Status> {
    let caller = caller(agent, request)?;
    permit(agent, &caller, needed)?;
    Ok(caller)
}

/// Whether `caller` may do what `needed` may. A Peer call (the agent
/// role) must also come from a certificate naming a host of the inventory.
fn permit(agent: &Agent, caller: &Caller, needed: Role) -> Result<(), Status> {
    caller.check(needed).map_err(Status::permission_denied)?;
    if needed == Role::Agent
        && let Some(host) = caller.host()
        && !agent.hosts.iter().any(|h| h == host)
    {
        return Err(Status::permission_denied(format!(
            "{host} is not a host of {}'s inventory",
            agent.name
        )));
    }
    Ok(())
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        match r {
            Refusal::InvalidArgument(m) => Status::invalid_argument(m),
            Refusal::NotFound(m) => Status::not_found(m),
            Refusal::AlreadyExists(m) => Status::already_exists(m),
            Refusal::FailedPrecondition(m) => Status::failed_precondition(m),
            Refusal::ResourceExhausted(m) => Status::resource_exhausted(m),
            Refusal::Busy(m) => {
                // The kind travels as metadata: a peer must not have to
                // read the text to know it may try again later.
                let mut status = Status::resource_exhausted(m);
                status
                    .metadata_mut()
                    .insert(super::REFUSAL_KEY, super::BUSY.parse().expect("ASCII"));
                status
            }
            Refusal::Unavailable(m) => Status::unavailable(m),
            Refusal::PermissionDenied(m) => Status::permission_denied(m),
        }
    }
}

/// A changing request on its way: who asked, for what, on what. Its end
/// goes into the audit trail, refusals included.
struct Audited<'a> {
    agent: &'a Agent,
    /// Who asked, as far as the request says (a refused TLS caller whose
    /// certificate could not be read is unidentified).
    caller: Option<Caller>,
    who: String,
    role: String,
    action: &'static str,
    target: String,
}

impl<'a> Audited<'a> {
    /// Authorize `request` for `needed`; a refusal is audited here.
    fn begin<T>(
        agent: &'a Agent,
        request: &Request<T>,
        needed: Role,
        action: &'static str,
        target: impl Into<String>,
    ) -> Result<Audited<'a>, Status> {
        // The certificate is read once: who asked, then whether they may.
        let caller = caller(agent, request);
        let checked = match &caller {
            Ok(c) => permit(agent, c, needed),
            Err(status) => Err(status.clone()),
        };
        let caller = caller.ok();
        let (who, role) = caller
            .as_ref()
            .map(|c| c.who())
            .unwrap_or(("(unidentified)", "none"));
        let (who, role) = (who.to_string(), role.to_string());
        let audited = Audited {
            agent,
            caller,
            who,
            role,
            action,
            target: target.into(),
        };
        match checked {
            Ok(_) => Ok(audited),
            Err(status) => Err(audited.refused(status)),
        }
    }

    /// The request turned out to be about `target` (a new migration's id).
    fn about(self, target: String) -> Audited<'a> {
        Audited { target, ..self }
    }

    fn write(&self, ok: bool, result: String) {
        self.agent.record_audit(proto::AuditEntry {
            at_ms: super::now_ms(),
            host: self.agent.name.clone(),
            who: self.who.clone(),
            role: self.role.clone(),
            action: self.action.to_string(),
            target: self.target.clone(),
            ok,
            result,
        });
    }

    fn refused(&self, status: Status) -> Status {
        self.write(false, format!("{:?}: {}", status.code(), status.message()));
        status
    }

    /// Audit the answer and pass it on; `done` says what was done.
    fn end<R>(
        self,
        result: Result<R, Status>,
        done: impl FnOnce(&R) -> String,
    ) -> Result<R, Status> {
        match &result {
            Ok(reply) => self.write(true, done(reply)),
            Err(status) => {
                self.refused(status.clone());
            }
        }
        result
    }
}

fn outcome_text(record: &proto::MigrationRecord) -> String {
    format!("migration {} attempt {}", record.id, record.attempt)
}

/// Hand a Peer call to the core and take out the answer it must be.
/// Every call but Heartbeat and Capacity is audited; those two only when
/// refused (a heartbeat a second per attempt would drown the trail).
macro_rules! peer_call {
    ($agent:expr, $call:ident, $request:expr, $action:expr, $target:expr) => {{
        let audited = Audited::begin(&$agent, &$request, Role::Agent, $action, $target)?;
        let from = audited
            .caller
            .as_ref()
            .and_then(|c| c.host())
            .map(str::to_string);
        let answer = match $agent
            .peer(PeerCall::$call($request.into_inner()), from)
            .await
        {
            Ok(PeerResponse::$call(reply)) => Ok(Response::new(reply)),
            Ok(other) => Err(Status::internal(format!(
                "the host core answered {} with {other:?}",
                stringify!($call)
            ))),
            Err(refusal) => Err(Status::from(refusal)),
        };
        match answer {
            Ok(reply) if matches!(stringify!($call), "Heartbeat" | "Capacity") => Ok(reply),
            answer => audited.end(answer, |_| "done".to_string()),
        }
    }};
}

#[tonic::async_trait]
impl peer_server::Peer for PeerService {
    async fn prepare(
        &self,
        request: Request<proto::PrepareRequest>,
    ) -> Result<Response<proto::PrepareReply>, Status> {
        let target =
            crate::protocol::cookies::decode::<proto::Cookie1>("C1", &request.get_ref().cookie1)
                .map(|c1| c1.attempt_id)
                .unwrap_or_else(|_| "(undecodable C1)".into());
        peer_call!(self.0, Prepare, request, "peer prepare", target)
    }

    async fn finish(
        &self,
        request: Request<proto::FinishRequest>,
    ) -> Result<Response<proto::FinishReply>, Status> {
        let target =
            crate::protocol::cookies::decode::<proto::Cookie3>("C3", &request.get_ref().cookie3)
                .map(|c3| c3.attempt_id)
                .unwrap_or_else(|_| "(undecodable C3)".into());
        peer_call!(self.0, Finish, request, "peer finish", target)
    }

    async fn abort(
        &self,
        request: Request<proto::PeerAbortRequest>,
    ) -> Result<Response<proto::PeerAbortReply>, Status> {
        let r = request.get_ref();
        tracing::warn!(attempt = %r.attempt_id, from = %r.from_host, "peer abort: {}", r.reason);
        let target = r.attempt_id.clone();
        peer_call!(self.0, Abort, request, "peer abort", target)
    }

    async fn resolve(
        &self,
        request: Request<proto::ResolveRequest>,
    ) -> Result<Response<proto::ResolveReply>, Status> {
        let target = request.get_ref().attempt_id.clone();
        peer_call!(self.0, Resolve, request, "peer resolve", target)
    }

    async fn recover(
        &self,
        request: Request<proto::RecoverRequest>,
    ) -> Result<Response<proto::RecoverReply>, Status> {
        let target = request.get_ref().attempt_id.clone();
        peer_call!(self.0, Recover, request, "peer recover", target)
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let target = request.get_ref().attempt_ids.join(",");
        peer_call!(self.0, Heartbeat, request, "peer heartbeat", target)
    }

    async fn capacity(
        &self,
        request: Request<proto::CapacityRequest>,
    ) -> Result<Response<proto::CapacityReply>, Status> {
        peer_call!(self.0, Capacity, request, "peer capacity", "")
    }

    /// A question (nothing changes), so not audited, like Capacity.
    async fn check_prepare(
        &self,
        request: Request<proto::CheckPrepareRequest>,
    ) -> Result<Response<proto::CheckPrepareReply>, Status> {
        let caller = authorize(&self.0, &request, Role::Agent)?;
        let from = caller.host().map(str::to_string);
        let reply = self.0.check_prepare(request.into_inner(), from).await?;
        Ok(Response::new(reply))
    }

    /// Opens a port for a few seconds: audited, like the changing calls.
    async fn link_sink(
        &self,
        request: Request<proto::LinkSinkRequest>,
    ) -> Result<Response<proto::LinkSinkReply>, Status> {
        let audited = Audited::begin(&self.0, &request, Role::Agent, "peer link sink", "")?;
        let sink = super::doctor::open_sink(&self.0)
            .await
            .map_err(Status::failed_precondition);
        audited
            .end(sink, |s| format!("sink open on port {}", s.port))
            .map(|sink| {
                Response::new(proto::LinkSinkReply {
                    port: u32::from(sink.port),
                    token: sink.token.to_vec(),
                })
            })
    }

    async fn repair(
        &self,
        request: Request<proto::PeerRepairRequest>,
    ) -> Result<Response<proto::PeerRepairReply>, Status> {
        let target = request.get_ref().vm.clone();
        peer_call!(self.0, Repair, request, "peer repair", target)
    }
}

struct ConsoleService(Arc<Agent>);

fn doctor_check(c: crate::hypervisor::HostCheck) -> proto::DoctorCheck {
    proto::DoctorCheck {
        name: c.name,
        finding: match c.verdict {
            crate::hypervisor::Verdict::Ok => proto::Finding::Ok,
            crate::hypervisor::Verdict::Warning => proto::Finding::Warning,
            crate::hypervisor::Verdict::Error => proto::Finding::Error,
        } as i32,
        detail: c.detail,
        fix: c.fix,
    }
}

/// How long a check waits for the destination's part by default, and at
/// most (a caller's deadline beyond it is cut to it).
const DEFAULT_CHECK_DEADLINE_MS: u32 = 1_000;
const MAX_CHECK_DEADLINE_MS: u32 = 30_000;

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send>>;

/// An id in a request that is only looked up (the core checks the others).
fn check_id(field: &str, id: &str, kind: IdKind) -> Result<(), Status> {
    bounds::check_id(field, id, kind).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn check_name(field: &str, name: &str) -> Result<(), Status> {
    bounds::check_name(field, name).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn mode(value: i32) -> Result<Option<crate::protocol::Mode>, Status> {
    if value == 0 {
        return Ok(None);
    }
    mode_from_proto(value)
        .map(Some)
        .ok_or_else(|| Status::invalid_argument(format!("unknown mode {value}")))
}

#[tonic::async_trait]
impl console_server::Console for ConsoleService {
    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        authorize(&self.0, &request, Role::Viewer)?;
        let agent = self.0.clone();
        let Some(slot) = agent.watcher_slot() else {
            return Err(Status::resource_exhausted(format!(
                "{} already serves {} Watch streams, the most it serves at once (max_watchers); \
                 close a console or a `tern watch` first",
                agent.name, agent.max_watchers
            )));
        };
        // Subscribe before taking the snapshot so no change falls in between.
        let mut events = agent.subscribe();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            // The slot is free again once this task ends.
            let _slot = slot;
            let snapshot = |agent: Arc<Agent>| async move {
                proto::Event {
                    host: agent.name.clone(),
                    kind: Some(proto::event::Kind::Snapshot(agent.snapshot().await)),
                }
            };
            if tx.send(Ok(snapshot(agent.clone()).await)).await.is_err() {
                return;
            }
            loop {
                // A watcher that went away frees its slot at once, not at
                // the next event.
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    next = events.recv() => next,
                };
                let event = match next {
                    Ok(event) => event,
                    // A slow watcher gets a fresh snapshot instead of a gap.
                    Err(broadcast::error::RecvError::Lagged(_)) => snapshot(agent.clone()).await,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn start_migration(
        &self,
        request: Request<proto::StartMigrationRequest>,
    ) -> Result<Response<proto::MigrationRecord>, Status> {
        let r = request.get_ref();
        let target = format!("{} to {}", r.vm, r.destination);
        let audited = Audited::begin(&self.0, &request, Role::Operator, "migrate", target)?;
        let request = request.into_inner();
        let answer = async {
            let mode = mode(request.mode)?.unwrap_or(crate::protocol::Mode::Safe);
            let record = self
                .0
                .start_migration(
                    &request.vm,
                    &request.destination,
                    mode,
                    completion_request_from_proto(request.completion.as_ref()),
                )
                .await?;
            Ok(Response::new(proto::MigrationRecord::from(&record)))
        }
        .await;
        // Once there is a migration, the trail names it (and says the VM).
        let audited = match &answer {
            Ok(r) => audited.about(r.get_ref().id.clone()),
            Err(_) => audited,
        };
        audited.end(answer, |r| {
            let r = r.get_ref();
            format!(
                "{} from {} to {}: {}",
                r.vm,
                r.source,
                r.destination,
                outcome_text(r)
            )
        })
    }

    async fn wait_migration(
        &self,
        request: Request<proto::MigrationRef>,
    ) -> Result<Response<proto::MigrationRecord>, Status> {
        authorize(&self.0, &request, Role::Viewer)?;
        let record = self.0.wait_migration(&request.into_inner().id).await?;
        Ok(Response::new((&record).into()))
    }

    async fn get_migration(
        &self,
        request: Request<proto::MigrationRef>,
    ) -> Result<Response<proto::MigrationRecord>, Status> {
        authorize(&self.0, &request, Role::Viewer)?;
        let id = request.into_inner().id;
        check_id("MigrationRef.id", &id, IdKind::Migration)?;
        let record =
            self.0.migration(&id).await.ok_or_else(|| {
                Status::not_found(format!("no migration {id} on {}", self.0.name))
            })?;
        Ok(Response::new((&record).into()))
    }

    async fn list_migrations(
        &self,
        request: Request<proto::ListMigrationsRequest>,
    ) -> Result<Response<proto::ListMigrationsReply>, Status> {
        authorize(&self.0, &request, Role::Viewer)?;
        let r = request.into_inner();
        let (migrations, next_page_token) =
            self.0.migrations_page(r.page_size, &r.page_token).await?;
        Ok(Response::new(proto::ListMigrationsReply {
            migrations,
            next_page_token,
        }))
    }

    async fn abort(
        &self,
        request: Request<proto::MigrationRef>,
    ) -> Result<Response<proto::MigrationRecord>, Status> {
        let id = request.get_ref().id.clone();
        let audited = Audited::begin(&self.0, &request, Role::Operator, "abort", &id)?;
        let answer = self.0.abort(&id).await;
        let answer = answer.map(|r| Response::new(proto::MigrationRecord::from(&r)));
        audited.end(answer.map_err(Status::from), |r| outcome_text(r.get_ref()))
    }

    async fn retry(
        &self,
        request: Request<proto::RetryRequest>,
    ) -> Result<Response<proto::MigrationRecord>, Status> {
        let id = request.get_ref().id.clone();
        let audited = Audited::begin(&self.0, &request, Role::Operator, "retry", &id)?;
        let request = request.into_inner();
        let answer = async {
            let destination =
                (!request.destination.is_empty()).then_some(request.destination.as_str());
            let record = self
                .0
                .retry(
                    &request.id,
                    destination,
                    mode(request.mode)?,
                    completion_request_from_proto(request.completion.as_ref()),
                )
                .await?;
            Ok(Response::new(proto::MigrationRecord::from(&record)))
        }
        .await;
        audited.end(answer, |r| {
            let r = r.get_ref();
            format!("{} to {}", outcome_text(r), r.destination)
        })
    }

    async fn rollback(
        &self,
        request: Request<proto::MigrationRef>,
    ) -> Result<Response<proto::RollbackReply>, Status> {
        let id = request.get_ref().id.clone();
        let audited = Audited::begin(&self.0, &request, Role::Operator, "rollback", &id)?;
        let answer = self.0.run_pending(&id).await.map(rollback_reply);
        audited.end(answer.map_err(Status::from), pending_text)
    }

    async fn forget(
        &self,
        request: Request<proto::MigrationRef>,
    ) -> Result<Response<proto::RollbackReply>, Status> {
        // Forgetting asserts the work is not needed, unchecked: an admin's word.
        let id = request.get_ref().id.clone();
        let audited = Audited::begin(&self.0, &request, Role::Admin, "forget", &id)?;
        let answer = self.0.forget_pending(&id).await.map(rollback_reply);
        audited.end(answer.map_err(Status::from), pending_text)
    }

    async fn resolve(
        &self,
        request: Request<proto::ForceResolveRequest>,
    ) -> Result<Response<proto::MigrationRecord>, Status> {
        let id = request.get_ref().id.clone();
        let audited = Audited::begin(&self.0, &request, Role::Admin, "resolve", &id)?;
        let request = request.into_inner();
        let answer = async {
            let run_on = match proto::RunOn::try_from(request.run_on) {
                Ok(proto::RunOn::Source) => RunOn::Source,
                Ok(proto::RunOn::Destination) => RunOn::Destination,
                Ok(proto::RunOn::Nowhere) => RunOn::Nowhere,
                _ => {
                    return Err(Status::invalid_argument(
                        "run_on must be source, destination or nowhere (declare lost)",
                    ));
                }
            };
            let record = self.0.force_resolve(&request.id, run_on).await?;
            Ok(Response::new(proto::MigrationRecord::from(&record)))
        }
        .await;
        audited.end(answer, |r| {
            let r = r.get_ref();
            format!(
                "{}: runs on {}",
                outcome_text(r),
                match proto::RunOn::try_from(request.run_on) {
                    Ok(proto::RunOn::Source) => "the source",
                    Ok(proto::RunOn::Nowhere) => "nowhere (declared lost)",
                    _ => "the destination",
                }
            )
        })
    }

    async fn evacuate(
        &self,
        request: Request<proto::EvacuateRequest>,
    ) -> Result<Response<proto::EvacuationRecord>, Status> {
        let name = self.0.name.clone();
        let audited = Audited::begin(&self.0, &request, Role::Operator, "evacuate", name)?;
        let request = request.into_inner();
        let answer = async {
            let job = self
                .0
                .evacuate(crate::host::EvacuationRequest {
                    mode: mode(request.mode)?.unwrap_or(crate::protocol::Mode::Safe),
                    completion: completion_request_from_proto(request.completion.as_ref()),
                    concurrency: request.concurrency,
                    max_attempts: request.max_attempts,
                    exclude: request.exclude,
                })
                .await?;
            Ok(Response::new(job.to_proto()))
        }
        .await;
        audited.end(answer, |r| format!("evacuation {}", r.get_ref().id))
    }

    async fn control_evacuation(
        &self,
        request: Request<proto::ControlEvacuationRequest>,
    ) -> Result<Response<proto::EvacuationRecord>, Status> {
        use crate::host::Control;
        let control = match proto::EvacuationControl::try_from(request.get_ref().control) {
            Ok(proto::EvacuationControl::Pause) => Some(Control::Pause),
            Ok(proto::EvacuationControl::Resume) => Some(Control::Resume),
            Ok(proto::EvacuationControl::Cancel) => Some(Control::Cancel),
            Ok(proto::EvacuationControl::CancelAbort) => Some(Control::CancelAbort),
            _ => None,
        };
        let action = match control {
            Some(Control::Pause) => "pause evacuation",
            Some(Control::Resume) => "resume evacuation",
            Some(Control::Cancel) => "cancel evacuation",
            Some(Control::CancelAbort) => "cancel evacuation and abort",
            None => "control evacuation",
        };
        let id = request.get_ref().id.clone();
        let audited = Audited::begin(&self.0, &request, Role::Operator, action, &id)?;
        let answer = match control {
            None => Err(Status::invalid_argument(
                "control must be pause, resume, cancel or cancel-abort",
            )),
            Some(control) => self
                .0
                .control_evacuation(&id, control)
                .await
                .map(|job| Response::new(job.to_proto()))
                .map_err(Status::from),
        };
        audited.end(answer, |r| {
            format!("evacuation {} {:?}", r.get_ref().id, r.get_ref().state)
        })
    }

    async fn get_evacuation(
        &self,
        request: Request<proto::EvacuationRef>,
    ) -> Result<Response<proto::EvacuationRecord>, Status> {
        authorize(&self.0, &request, Role::Viewer)?;
        let id = request.into_inner().id;
        check_id("EvacuationRef.id", &id, IdKind::Evacuation)?;
        let job =
            self.0.evacuation(&id).await.ok_or_else(|| {
                Status::not_found(format!("no evacuation {id} on {}", self.0.name))
            })?;
        Ok(Response::new(job.to_proto()))
    }

    async fn list_evacuations(
        &self,
        request: Request<proto::ListEvacuationsRequest>,
    ) -> Result<Response<proto::ListEvacuationsReply>, Status> {
        authorize(&self.0, &request, Role::Viewer)?;
        let r = request.into_inner();
        let (evacuations, next_page_token) =
            self.0.evacuations_page(r.page_size, &r.page_token).await?;
        Ok(Response::new(proto::ListEvacuationsReply {
            evacuations,
            next_page_token,
        }))
    }

    async fn wait_evacuation(
        &self,
        request: Request<proto::EvacuationRef>,
    ) -> Result<Response<proto::EvacuationRecord>, Status> {
        authorize(&self.0, &request, Role::Viewer)?;
        let job = self.0.wait_evacuation(&request.into_inner().id).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn undrain(
        &self,
        request: Request<proto::UndrainRequest>,
    ) -> Result<Response<proto::Host>, Status> {
        let name = self.0.name.clone();
        let audited = Audited::begin(&self.0, &request, Role::Operator, "undrain", name)?;
        let answer = self.0.undrain().await.map(Response::new);
        audited.end(answer.map_err(Status::from), |_| {
            "accepts incoming migrations".into()
        })
    }

    async fn list_vms(
        &self,
        request: Request<proto::ListVmsRequest>,
    ) -> Result<Response<proto::ListVmsReply>, Status> {
        authorize(&self.0, &request, Role::Viewer)?;
        let r = request.into_inner();
        let (vms, next_page_token) = self.0.vms_page(r.page_size, &r.page_token).await?;
        Ok(Response::new(proto::ListVmsReply {
            vms,
            next_page_token,
        }))
    }

    async fn get_host(
        &self,
        request: Request<proto::GetHostRequest>,
    ) -> Result<Response<proto::Host>, Status> {
        authorize(&self.0, &request, Role::Viewer)?;
        Ok(Response::new(self.0.host_info().await))
    }

    async fn set_faults(
        &self,
        request: Request<proto::SetFaultsRequest>,
    ) -> Result<Response<proto::Host>, Status> {
        let feature = request
            .get_ref()
            .faults
            .as_ref()
            .map(|f| f.feature.clone())
            .unwrap_or_default();
        let audited = Audited::begin(&self.0, &request, Role::Admin, "set faults", feature)?;
        if !self.0.allow_fault_injection {
            let refusal = Status::permission_denied(format!(
                "fault injection is off on {}: its config must say allow_fault_injection = true",
                self.0.name
            ));
            return Err(audited.refused(refusal));
        }
        let answer = self.set_faults_now(request.into_inner()).await;
        audited.end(answer, |_| "fault injection changed".into())
    }

    /// `tern check`: an identity that may migrate may ask. Nothing
    /// changes, so nothing is audited.
    async fn check(
        &self,
        request: Request<proto::CheckRequest>,
    ) -> Result<Response<proto::CheckReply>, Status> {
        authorize(&self.0, &request, Role::Operator)?;
        let r = request.into_inner();
        let mode = mode(r.mode)?.unwrap_or(crate::protocol::Mode::Safe);
        let deadline = match r.answer_deadline_ms {
            0 => DEFAULT_CHECK_DEADLINE_MS,
            ms => ms.min(MAX_CHECK_DEADLINE_MS),
        };
        let reply = self
            .0
            .check(
                &r.vm,
                &r.destination,
                mode,
                std::time::Duration::from_millis(u64::from(deadline)),
            )
            .await?;
        Ok(Response::new(reply))
    }

    async fn repair(
        &self,
        request: Request<proto::RepairRequest>,
    ) -> Result<Response<proto::MigrationRecord>, Status> {
        // A repair changes what a running VM holds: the migrate role's.
        let vm = request.get_ref().vm.clone();
        let audited = Audited::begin(&self.0, &request, Role::Operator, "repair", &vm)?;
        let request = request.into_inner();
        let who = match audited.caller {
            Some(Caller::Verified(_)) => format!("{} ({})", audited.who, audited.role),
            _ => audited.who.clone(),
        };
        let feature = (!request.feature.is_empty()).then_some(request.feature.as_str());
        let answer = self
            .0
            .repair(&request.vm, feature, &who)
            .await
            .map(|r| Response::new(proto::MigrationRecord::from(&r)));
        let audited = match &answer {
            Ok(r) => audited.about(r.get_ref().id.clone()),
            Err(_) => audited,
        };
        audited.end(answer.map_err(Status::from), |r| {
            let r = r.get_ref();
            format!(
                "{} repaired on {}: {}",
                r.vm,
                r.running_on,
                if r.outcome == proto::Outcome::Succeeded as i32 {
                    "succeeded"
                } else {
                    "still degraded"
                }
            )
        })
    }

    async fn list_audit(
        &self,
        request: Request<proto::ListAuditRequest>,
    ) -> Result<Response<proto::ListAuditReply>, Status> {
        authorize(&self.0, &request, Role::Viewer)?;
        let r = request.into_inner();
        let agent = &self.0;
        let entries = super::shell::blocking(|| {
            agent
                .audit
                .list(&agent.name, r.since_ms, r.limit, &r.target)
        })
        .map_err(|e| Status::internal(format!("audit trail of {}: {e}", self.0.name)))?;
        Ok(Response::new(proto::ListAuditReply { entries }))
    }

    async fn attempt_logs(
        &self,
        request: Request<proto::AttemptLogsRequest>,
    ) -> Result<Response<proto::AttemptLogsReply>, Status> {
        authorize(&self.0, &request, Role::Viewer)?;
        let r = request.into_inner();
        // Only the lines of one attempt or migration, never the rest of
        // the log: what a viewer reads is what the migration's record says.
        if bounds::check_id("AttemptLogsRequest.id", &r.id, IdKind::Attempt).is_err() {
            check_id("AttemptLogsRequest.id", &r.id, IdKind::Migration).map_err(|_| {
                Status::invalid_argument(format!(
                    "AttemptLogsRequest.id: {} is neither a migration id (m- and 12 hex digits) \
                     nor an attempt id (a migration id, a dot and the attempt number)",
                    bounds::shown(&r.id)
                ))
            })?;
        }
        let max = match r.max_lines as usize {
            0 => super::logs::DEFAULT_LINES,
            n => n.min(super::logs::MAX_LINES),
        };
        let log = self.0.log.clone();
        let id = r.id.clone();
        let (lines, truncated) = tokio::task::spawn_blocking(move || log.read(&id, max))
            .await
            .map_err(|e| Status::internal(format!("reading the log of {}: {e}", self.0.name)))?
            .map_err(|e| {
                Status::internal(format!(
                    "cannot read the log of {} in {}: {e}",
                    self.0.name,
                    self.0.log.dir().display()
                ))
            })?;
        Ok(Response::new(proto::AttemptLogsReply {
            host: self.0.name.clone(),
            lines: lines
                .into_iter()
                .map(|l| proto::AttemptLogLine {
                    at_ms: l.at_ms,
                    level: l.level,
                    host: l.host,
                    attempt_id: l.attempt,
                    text: l.msg,
                })
                .collect(),
            truncated,
        }))
    }

    async fn doctor(
        &self,
        request: Request<proto::DoctorRequest>,
    ) -> Result<Response<proto::DoctorReply>, Status> {
        authorize(&self.0, &request, Role::Viewer)?;
        let checks = super::doctor::examine(&self.0).await;
        Ok(Response::new(proto::DoctorReply {
            host: self.0.name.clone(),
            now_ms: super::now_ms(),
            checks: checks.into_iter().map(doctor_check).collect(),
        }))
    }

    async fn measure_link(
        &self,
        request: Request<proto::MeasureLinkRequest>,
    ) -> Result<Response<proto::MeasureLinkReply>, Status> {
        let to = request.get_ref().to.clone();
        let audited = Audited::begin(&self.0, &request, Role::Operator, "measure link", &to)?;
        let r = request.into_inner();
        let known = self.0.hosts.contains(&r.to);
        let refused = if r.to == self.0.name {
            Some(format!("{} cannot measure a link to itself", r.to))
        } else if !known {
            Some(format!("{:?} is not a host of the inventory", r.to))
        } else {
            None
        };
        if let Some(why) = refused {
            return Err(audited.refused(Status::invalid_argument(why)));
        }
        let duration = match r.duration_ms {
            0 => super::link::DEFAULT_DURATION,
            ms => std::time::Duration::from_millis(u64::from(ms)).min(super::link::MAX_DURATION),
        };
        let (check, measured) = super::doctor::measure_link(&self.0, &r.to, duration).await;
        let reply = proto::MeasureLinkReply {
            check: Some(doctor_check(check)),
            bytes: measured.as_ref().map_or(0, |m| m.bytes),
            elapsed_us: measured
                .as_ref()
                .map_or(0, |m| m.elapsed.as_micros() as u64),
            address: measured.map(|m| m.address).unwrap_or_default(),
        };
        audited
            .end(Ok(reply), |r| {
                r.check
                    .as_ref()
                    .map(|c| c.detail.clone())
                    .unwrap_or_default()
            })
            .map(Response::new)
    }
}

impl ConsoleService {
    async fn set_faults_now(
        &self,
        request: proto::SetFaultsRequest,
    ) -> Result<Response<proto::Host>, Status> {
        let settings = request
            .faults
            .ok_or_else(|| Status::invalid_argument("no fault settings in the request"))?;
        let fail = settings
            .fail
            .iter()
            .map(|s| {
                Stage::parse(s)
                    .ok_or_else(|| Status::invalid_argument(format!("unknown stage {s:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        check_name("SetFaultsRequest.faults.feature", &settings.feature)?;
        let faults = Faults {
            fail,
            fail_rate: settings.fail_rate,
            // Clamped: an hour of latency would hold stages (and the agent's
            // shutdown) far past every deadline. The reply says what holds.
            latency_ms: settings.latency_ms.min(faults::MAX_LATENCY_MS),
            fail_rollback: settings.fail_rollback,
        };
        self.0
            .features
            .set_faults(&settings.feature, faults)
            .map_err(Status::invalid_argument)?;
        let host = self.0.host_info().await;
        self.0.emit(proto::event::Kind::HostChanged(host.clone()));
        Ok(Response::new(host))
    }
}

fn rollback_reply(
    (done, still): (Vec<crate::host::Pending>, Vec<crate::host::Pending>),
) -> Response<proto::RollbackReply> {
    Response::new(proto::RollbackReply {
        done: done.into_iter().map(super::pending_to_proto).collect(),
        still_pending: still.into_iter().map(super::pending_to_proto).collect(),
    })
}

fn pending_text(reply: &Response<proto::RollbackReply>) -> String {
    let r = reply.get_ref();
    format!(
        "{} done, {} still pending",
        r.done.len(),
        r.still_pending.len()
    )
}
