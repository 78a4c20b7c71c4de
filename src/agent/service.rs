//! The gRPC services, kept thin: decode and check the request, hand it to the
//! agent, map the answer to a status an operator can act on.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

use super::Agent;
use crate::features::{Faults, faults};
use crate::host::{PeerCall, PeerResponse, Refusal};
use crate::proto::{self, console_server, peer_server};
use crate::protocol::bounds::{self, IdKind};
use crate::protocol::record::mode_from_proto;
use crate::protocol::{RunOn, Stage};

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
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(console)
        .add_service(peer)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop.await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!("gRPC server of {}: {e}", agent.name);
    }
}

struct PeerService(Arc<Agent>);

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
        }
    }
}

/// Hand a Peer call to the core and take out the answer it must be.
macro_rules! peer_call {
    ($agent:expr, $call:ident, $request:expr) => {
        match $agent.peer(PeerCall::$call($request.into_inner())).await? {
            PeerResponse::$call(reply) => Ok(Response::new(reply)),
            other => Err(Status::internal(format!(
                "the host core answered {} with {other:?}",
                stringify!($call)
            ))),
        }
    };
}

#[tonic::async_trait]
impl peer_server::Peer for PeerService {
    async fn prepare(
        &self,
        request: Request<proto::PrepareRequest>,
    ) -> Result<Response<proto::PrepareReply>, Status> {
        peer_call!(self.0, Prepare, request)
    }

    async fn finish(
        &self,
        request: Request<proto::FinishRequest>,
    ) -> Result<Response<proto::FinishReply>, Status> {
        peer_call!(self.0, Finish, request)
    }

    async fn abort(
        &self,
        request: Request<proto::PeerAbortRequest>,
    ) -> Result<Response<proto::PeerAbortReply>, Status> {
        let r = request.get_ref();
        tracing::warn!(attempt = %r.attempt_id, from = %r.from_host, "peer abort: {}", r.reason);
        peer_call!(self.0, Abort, request)
    }

    async fn resolve(
        &self,
        request: Request<proto::ResolveRequest>,
    ) -> Result<Response<proto::ResolveReply>, Status> {
        peer_call!(self.0, Resolve, request)
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        peer_call!(self.0, Heartbeat, request)
    }

    async fn capacity(
        &self,
        request: Request<proto::CapacityRequest>,
    ) -> Result<Response<proto::CapacityReply>, Status> {
        peer_call!(self.0, Capacity, request)
    }
}

struct ConsoleService(Arc<Agent>);

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
        _: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
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
        let request = request.into_inner();
        let mode = mode(request.mode)?.unwrap_or(crate::protocol::Mode::Safe);
        let record = self
            .0
            .start_migration(&request.vm, &request.destination, mode)
            .await?;
        Ok(Response::new((&record).into()))
    }

    async fn wait_migration(
        &self,
        request: Request<proto::MigrationRef>,
    ) -> Result<Response<proto::MigrationRecord>, Status> {
        let record = self.0.wait_migration(&request.into_inner().id).await?;
        Ok(Response::new((&record).into()))
    }

    async fn get_migration(
        &self,
        request: Request<proto::MigrationRef>,
    ) -> Result<Response<proto::MigrationRecord>, Status> {
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
        let record = self.0.abort(&request.into_inner().id).await?;
        Ok(Response::new((&record).into()))
    }

    async fn retry(
        &self,
        request: Request<proto::RetryRequest>,
    ) -> Result<Response<proto::MigrationRecord>, Status> {
        let request = request.into_inner();
        let destination = (!request.destination.is_empty()).then_some(request.destination.as_str());
        let record = self
            .0
            .retry(&request.id, destination, mode(request.mode)?)
            .await?;
        Ok(Response::new((&record).into()))
    }

    async fn rollback(
        &self,
        request: Request<proto::MigrationRef>,
    ) -> Result<Response<proto::RollbackReply>, Status> {
        let (done, still) = self.0.run_pending(&request.into_inner().id).await?;
        Ok(Response::new(proto::RollbackReply {
            done: done.into_iter().map(super::pending_to_proto).collect(),
            still_pending: still.into_iter().map(super::pending_to_proto).collect(),
        }))
    }

    async fn forget(
        &self,
        request: Request<proto::MigrationRef>,
    ) -> Result<Response<proto::RollbackReply>, Status> {
        let (done, still) = self.0.forget_pending(&request.into_inner().id).await?;
        Ok(Response::new(proto::RollbackReply {
            done: done.into_iter().map(super::pending_to_proto).collect(),
            still_pending: still.into_iter().map(super::pending_to_proto).collect(),
        }))
    }

    async fn resolve(
        &self,
        request: Request<proto::ForceResolveRequest>,
    ) -> Result<Response<proto::MigrationRecord>, Status> {
        let request = request.into_inner();
        let run_on = match proto::RunOn::try_from(request.run_on) {
            Ok(proto::RunOn::Source) => RunOn::Source,
            Ok(proto::RunOn::Destination) => RunOn::Destination,
            _ => {
                return Err(Status::invalid_argument(
                    "run_on must be source or destination",
                ));
            }
        };
        let record = self.0.force_resolve(&request.id, run_on).await?;
        Ok(Response::new((&record).into()))
    }

    async fn evacuate(
        &self,
        request: Request<proto::EvacuateRequest>,
    ) -> Result<Response<proto::EvacuationRecord>, Status> {
        let request = request.into_inner();
        let job = self
            .0
            .evacuate(crate::host::EvacuationRequest {
                mode: mode(request.mode)?.unwrap_or(crate::protocol::Mode::Safe),
                concurrency: request.concurrency,
                max_attempts: request.max_attempts,
                exclude: request.exclude,
            })
            .await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn control_evacuation(
        &self,
        request: Request<proto::ControlEvacuationRequest>,
    ) -> Result<Response<proto::EvacuationRecord>, Status> {
        use crate::host::Control;
        let request = request.into_inner();
        let control = match proto::EvacuationControl::try_from(request.control) {
            Ok(proto::EvacuationControl::Pause) => Control::Pause,
            Ok(proto::EvacuationControl::Resume) => Control::Resume,
            Ok(proto::EvacuationControl::Cancel) => Control::Cancel,
            Ok(proto::EvacuationControl::CancelAbort) => Control::CancelAbort,
            _ => {
                return Err(Status::invalid_argument(
                    "control must be pause, resume, cancel or cancel-abort",
                ));
            }
        };
        let job = self.0.control_evacuation(&request.id, control).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn get_evacuation(
        &self,
        request: Request<proto::EvacuationRef>,
    ) -> Result<Response<proto::EvacuationRecord>, Status> {
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
        let job = self.0.wait_evacuation(&request.into_inner().id).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn undrain(
        &self,
        _: Request<proto::UndrainRequest>,
    ) -> Result<Response<proto::Host>, Status> {
        Ok(Response::new(self.0.undrain().await?))
    }

    async fn list_vms(
        &self,
        request: Request<proto::ListVmsRequest>,
    ) -> Result<Response<proto::ListVmsReply>, Status> {
        let r = request.into_inner();
        let (vms, next_page_token) = self.0.vms_page(r.page_size, &r.page_token).await?;
        Ok(Response::new(proto::ListVmsReply {
            vms,
            next_page_token,
        }))
    }

    async fn get_host(
        &self,
        _: Request<proto::GetHostRequest>,
    ) -> Result<Response<proto::Host>, Status> {
        Ok(Response::new(self.0.host_info().await))
    }

    async fn set_faults(
        &self,
        request: Request<proto::SetFaultsRequest>,
    ) -> Result<Response<proto::Host>, Status> {
        let settings = request
            .into_inner()
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
