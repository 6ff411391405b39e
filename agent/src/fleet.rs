//! The load tool (filled below).

#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    #[arg(long)]
    pub devices: usize,
}

pub async fn run(_args: FleetArgs) -> anyhow::Result<String> {
    anyhow::bail!("not yet")
}
