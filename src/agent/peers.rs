//! Calls to other agents' Peer service. Channels are made lazily, one per
//! host, and reused; a call has the deadline the host core gave it, so
//! nothing waits on TCP.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::Channel;

use crate::config::Inventory;
use crate::host::{PeerCall, PeerResponse};
use crate::proto;
use crate::proto::peer_client::PeerClient;
use crate::protocol::PeerError;
use crate::protocol::bounds;
use crate::trust::tls::{self, IdentityFiles};

/// The metadata key a refusal's kind travels in, next to its status code.
pub const REFUSAL_KEY: &str = "tern-refusal";
/// Its value for a "not now" refusal (a destination at its limit, or still
/// undoing an earlier attempt of the VM).
pub const BUSY: &str = "busy";

pub struct Peers {
    inventory: Inventory,
    /// This agent's identity, which peers reached over TLS check.
    tls: Option<IdentityFiles>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Peers {
    pub fn new(inventory: Inventory, tls: Option<IdentityFiles>) -> Peers {
        Peers {
            inventory,
            tls,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, host: &str) -> Result<PeerClient<Channel>, PeerError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(host) {
            return Ok(peer_client(channel.clone()));
        }
        let entry = self
            .inventory
            .host(host)
            .ok_or_else(|| PeerError::Refused(format!("no host named {host} in the inventory")))?;
        let channel = tls::endpoint(entry, self.tls.as_ref())
            .map_err(PeerError::Refused)?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .connect_lazy();
        channels.insert(host.to_string(), channel.clone());
        Ok(peer_client(channel))
    }

    /// Make one call, within `deadline` if there is one.
    pub async fn call(
        &self,
        host: &str,
        request: PeerCall,
        deadline: Option<Duration>,
    ) -> Result<PeerResponse, PeerError> {
        let mut client = self.client(host)?;
        let call = async move {
            Ok::<_, tonic::Status>(match request {
                PeerCall::Prepare(r) => {
                    PeerResponse::Prepare(client.prepare(r).await?.into_inner())
                }
                PeerCall::Finish(r) => PeerResponse::Finish(client.finish(r).await?.into_inner()),
                PeerCall::Abort(r) => PeerResponse::Abort(client.abort(r).await?.into_inner()),
                PeerCall::Resolve(r) => {
                    PeerResponse::Resolve(client.resolve(r).await?.into_inner())
                }
                PeerCall::Heartbeat(r) => {
                    PeerResponse::Heartbeat(client.heartbeat(r).await?.into_inner())
                }
                PeerCall::Capacity(r) => {
                    PeerResponse::Capacity(client.capacity(r).await?.into_inner())
                }
                PeerCall::Recover(r) => {
                    PeerResponse::Recover(client.recover(r).await?.into_inner())
                }
                PeerCall::Repair(r) => PeerResponse::Repair(client.repair(r).await?.into_inner()),
            })
        };
        within(host, deadline, call).await
    }

    /// Ask `host` for Prepare's admission checks of a C1 (`tern check`),
    /// within `deadline`.
    pub async fn check_prepare(
        &self,
        host: &str,
        request: proto::CheckPrepareRequest,
        deadline: Duration,
    ) -> Result<proto::CheckPrepareReply, PeerError> {
        let mut client = self.client(host)?;
        let call = async move { Ok(client.check_prepare(request).await?.into_inner()) };
        within(host, Some(deadline), call).await
    }
}

impl Peers {
    /// Ask `host` to open a link sink (`tern doctor`'s measurement).
    pub async fn link_sink(
        &self,
        host: &str,
        deadline: Duration,
    ) -> Result<proto::LinkSinkReply, PeerError> {
        let mut client = self.client(host)?;
        let call = async move {
            Ok(client
                .link_sink(proto::LinkSinkRequest {})
                .await?
                .into_inner())
        };
        within(host, Some(deadline), call).await
    }
}

/// A call's answer, or `Unreachable` once `deadline` has passed.
async fn within<T>(
    host: &str,
    deadline: Option<Duration>,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, PeerError> {
    let result = match deadline {
        Some(d) => match tokio::time::timeout(d, call).await {
            Ok(result) => result,
            Err(_) => {
                return Err(PeerError::Unreachable(format!(
                    "{host} did not answer within {} ms",
                    d.as_millis()
                )));
            }
        },
        None => call.await,
    };
    result.map_err(|status| peer_error(host, status))
}

/// A Peer client with explicit message limits both ways
/// ([`bounds::MAX_REQUEST_BYTES`]: every Peer message is small).
fn peer_client(channel: Channel) -> PeerClient<Channel> {
    PeerClient::new(channel)
        .max_decoding_message_size(bounds::MAX_REQUEST_BYTES)
        .max_encoding_message_size(bounds::MAX_REQUEST_BYTES)
}

/// Whether a failed call may have taken effect on the peer: a status the
/// peer's service produced is an answer; a transport failure is not.
fn peer_error(host: &str, status: tonic::Status) -> PeerError {
    use tonic::Code::*;
    let busy = status
        .metadata()
        .get(REFUSAL_KEY)
        .is_some_and(|v| v.as_bytes() == BUSY.as_bytes());
    match status.code() {
        ResourceExhausted | FailedPrecondition if busy => {
            PeerError::Busy(status.message().to_string())
        }
        ResourceExhausted => PeerError::Full(status.message().to_string()),
        InvalidArgument | NotFound | AlreadyExists | PermissionDenied | FailedPrecondition
        | OutOfRange | Unimplemented | Aborted => PeerError::Refused(status.message().to_string()),
        _ => PeerError::Unreachable(format!("{host} unreachable: {}", status.message())),
    }
}
