//! The host agent daemon (being written).

use crate::config::AgentConfig;

/// Run an agent until it is told to stop (SIGINT, SIGTERM, SIGHUP).
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let _ = config;
    anyhow::bail!("agent not written yet")
}
