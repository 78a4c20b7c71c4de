//! The migration link between two hosts, measured for `tern doctor`: the
//! receiving agent opens a one-time sink on its migration address (the
//! Peer call LinkSink), the sending agent connects to the address the
//! inventory gives that host — where a guest's memory would go — and sends
//! for a bounded time; the sink answers how many bytes arrived. Plain TCP:
//! the raw link, before QEMU's TLS and compression.
//!
//! The sink counts only a connection that first sends the token it gave
//! over the authenticated Peer call, accepts for a few seconds, and closes
//! after one measurement.

use std::net::IpAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout, timeout_at};

/// How long a measurement sends by default, and at most.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(2);
pub const MAX_DURATION: Duration = Duration::from_secs(10);
pub const TOKEN_BYTES: usize = 16;
/// How long a sink waits for its sender to connect.
const ACCEPT_WINDOW: Duration = Duration::from_secs(5);
/// How long either end waits for a step beyond the transfer itself.
const STEP: Duration = Duration::from_secs(5);
const CHUNK: usize = 256 * 1024;

/// A sink ready for one sender.
#[derive(Debug, Clone)]
pub struct Sink {
    pub port: u16,
    pub token: [u8; TOKEN_BYTES],
}

/// Listen on `ip` (this host's migration address), any free port.
pub async fn open_sink(ip: &str) -> Result<Sink, String> {
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("the migration address {ip:?} is not an IP address"))?;
    let listener = TcpListener::bind((ip, 0))
        .await
        .map_err(|e| format!("cannot listen on {ip}: {e}"))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("cannot read the sink's port: {e}"))?
        .port();
    let token: [u8; TOKEN_BYTES] = rand::random();
    tokio::spawn(serve(listener, token));
    Ok(Sink { port, token })
}

/// Accept until a connection brings the token and is counted, or the
/// window closes.
async fn serve(listener: TcpListener, token: [u8; TOKEN_BYTES]) {
    let deadline = Instant::now() + ACCEPT_WINDOW;
    while let Ok(Ok((stream, _))) = timeout_at(deadline, listener.accept()).await {
        if receive(stream, &token).await {
            return;
        }
    }
}

/// Count one sender's bytes and answer the count. False: not the sender
/// (no token, or the wrong one).
async fn receive(mut stream: TcpStream, token: &[u8; TOKEN_BYTES]) -> bool {
    let mut said = [0u8; TOKEN_BYTES];
    match timeout(STEP, stream.read_exact(&mut said)).await {
        Ok(Ok(_)) if said == *token => {}
        _ => return false,
    }
    let end = Instant::now() + MAX_DURATION + STEP;
    let mut buffer = vec![0u8; CHUNK];
    let mut count: u64 = 0;
    loop {
        match timeout_at(end, stream.read(&mut buffer)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => count += n as u64,
            // Gone or too long: nothing to answer.
            _ => return true,
        }
    }
    let _ = stream.write_all(&count.to_be_bytes()).await;
    let _ = stream.shutdown().await;
    true
}

/// What one measurement carried.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub address: String,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Measured {
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / f64::from(1u32 << 20) / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `host`'s port as a socket address (IPv6 in brackets).
pub fn socket_address(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Send to a sink for `duration`, then read how much arrived. The time
/// runs from the first byte to the sink's answer, so what was still in
/// flight when sending stopped is counted in both.
pub async fn send(host: &str, sink: &Sink, duration: Duration) -> Result<Measured, String> {
    let address = socket_address(host, sink.port);
    let mut stream = match timeout(STEP, TcpStream::connect(&address)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(format!("cannot connect to {address}: {e}")),
        Err(_) => {
            return Err(format!(
                "{address} did not accept within {} s",
                STEP.as_secs()
            ));
        }
    };
    let lost = |e: std::io::Error| format!("the transfer to {address} broke off: {e}");
    stream.write_all(&sink.token).await.map_err(lost)?;
    let buffer = vec![0u8; CHUNK];
    let started = Instant::now();
    let mut sent: u64 = 0;
    let sending = async {
        while started.elapsed() < duration {
            stream.write_all(&buffer).await?;
            sent += CHUNK as u64;
        }
        stream.shutdown().await
    };
    match timeout(duration + STEP, sending).await {
        Ok(result) => result.map_err(lost)?,
        Err(_) => return Err(format!("{address} stopped taking bytes")),
    }
    let mut count = [0u8; 8];
    match timeout(STEP, stream.read_exact(&mut count)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("{address} did not say how much arrived: {e}")),
        Err(_) => {
            return Err(format!(
                "{address} did not say how much arrived within {} s",
                STEP.as_secs()
            ));
        }
    }
    let bytes = u64::from_be_bytes(count);
    if bytes != sent {
        return Err(format!(
            "{address} received {bytes} of the {sent} bytes sent"
        ));
    }
    Ok(Measured {
        address,
        bytes,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sink_counts_what_its_sender_sends() {
        let sink = open_sink("127.0.0.1").await.expect("sink");
        let measured = send("127.0.0.1", &sink, Duration::from_millis(200))
            .await
            .expect("send");
        assert!(measured.bytes >= CHUNK as u64, "{measured:?}");
        assert_eq!(measured.bytes % CHUNK as u64, 0, "whole chunks");
        assert!(measured.elapsed >= Duration::from_millis(200));
        assert!(measured.mib_s() > 0.0);
        // One measurement a sink: it no longer listens.
        let again = send("127.0.0.1", &sink, Duration::from_millis(50)).await;
        assert!(again.unwrap_err().contains("cannot connect"), "closed");
    }

    #[tokio::test]
    async fn a_connection_without_the_token_is_not_counted_and_the_sender_still_is() {
        let sink = open_sink("127.0.0.1").await.expect("sink");
        let mut stranger = TcpStream::connect(socket_address("127.0.0.1", sink.port))
            .await
            .expect("connect");
        stranger
            .write_all(&[0u8; TOKEN_BYTES])
            .await
            .expect("write");
        stranger.write_all(b"not measured").await.ok();
        // The sink drops the stranger, answering nothing.
        let mut answer = Vec::new();
        let _ = timeout(STEP, stranger.read_to_end(&mut answer)).await;
        assert!(answer.is_empty(), "a stranger gets no count: {answer:?}");
        let measured = send("127.0.0.1", &sink, Duration::from_millis(100))
            .await
            .expect("the real sender is still counted");
        assert!(measured.bytes > 0);
    }

    #[tokio::test]
    async fn a_sink_on_an_address_that_is_not_an_ip_is_refused() {
        let err = open_sink("hv-b.example").await.unwrap_err();
        assert!(err.contains("is not an IP address"), "{err}");
        let err = send(
            "127.0.0.1",
            &Sink {
                port: 1,
                token: [0; 16],
            },
            DEFAULT_DURATION,
        )
        .await
        .unwrap_err();
        assert!(err.contains("cannot connect to 127.0.0.1:1"), "{err}");
    }

    #[test]
    fn ipv6_hosts_get_brackets() {
        assert_eq!(socket_address("::1", 7), "[::1]:7");
        assert_eq!(socket_address("10.0.0.2", 7), "10.0.0.2:7");
    }
}
