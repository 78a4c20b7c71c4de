//! Loopback ports for test agents.

use std::net::TcpListener;

/// A loopback port for an agent to listen on, below the kernel's ephemeral
/// range (32768–60999): a port from `bind(…:0)` is free only until the agent
/// binds it, and in between any outgoing connection or QEMU's
/// `migrate-incoming tcp:…:0` may be handed the same one ("Address already in
/// use"). Ports are taken in turn from a start that differs per test process,
/// so parallel tests of one binary never pick the same port and a port a
/// previous binary's agents held is reached last.
pub fn agent_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < SPAN,
            "no free loopback port in {FIRST}..{}",
            FIRST + SPAN
        );
        let port = (FIRST + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
