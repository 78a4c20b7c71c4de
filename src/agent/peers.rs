//! Calls to other agents' Peer service. Channels are made lazily, one per
//! host, and reused; every call has a deadline so nothing waits on TCP.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::config::Inventory;
use crate::proto::peer_client::PeerClient;
use crate::protocol::PeerError;

pub struct Peers {
    inventory: Inventory,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Peers {
    pub fn new(inventory: Inventory) -> Peers {
        Peers {
            inventory,
            channels: Mutex::new(HashMap::new()),
        }
    }

    pub fn client(&self, host: &str) -> Result<PeerClient<Channel>, PeerError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(host) {
            return Ok(PeerClient::new(channel.clone()));
        }
        let entry = self
            .inventory
            .host(host)
            .ok_or_else(|| PeerError::Refused(format!("no host named {host} in the inventory")))?;
        let channel = Endpoint::from_shared(entry.address.clone())
            .map_err(|e| PeerError::Refused(format!("bad address for {host}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .connect_lazy();
        channels.insert(host.to_string(), channel.clone());
        Ok(PeerClient::new(channel))
    }
}

/// Whether a failed call may have taken effect on the peer: a status the
/// peer's service produced is an answer; a transport failure is not.
pub fn peer_error(host: &str, status: tonic::Status) -> PeerError {
    use tonic::Code::*;
    match status.code() {
        InvalidArgument | NotFound | AlreadyExists | PermissionDenied | FailedPrecondition
        | ResourceExhausted | OutOfRange | Unimplemented | Aborted => {
            PeerError::Refused(status.message().to_string())
        }
        _ => PeerError::Unreachable(format!("{host} unreachable: {}", status.message())),
    }
}

/// Run a peer call with a deadline; a timeout is an unreachable peer.
pub async fn with_deadline<T>(
    host: &str,
    deadline: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, PeerError> {
    match tokio::time::timeout(deadline, call).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(peer_error(host, status)),
        Err(_) => Err(PeerError::Unreachable(format!(
            "{host} did not answer within {} ms",
            deadline.as_millis()
        ))),
    }
}
