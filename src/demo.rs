//! The embedded demo cluster (being written).

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub hosts: usize,
    pub vms: usize,
    pub headless: bool,
}

pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let _ = options;
    anyhow::bail!("demo not written yet")
}
