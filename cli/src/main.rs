//! `ferryctl`: bring the Ferrymesh mesh up locally, see its state, break it on purpose.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use ferryctl::{breaker, chaos, check, explain, inject, stat, status, tap, up};

#[derive(Debug, Parser)]
#[command(name = "ferryctl", version, about = "Ferrymesh command line")]
struct Cli {
    /// The local mesh's state folder (ProxyConfigs, logs, controller address).
    #[arg(
        long,
        global = true,
        default_value = ".ferrymesh",
        env = "FERRYMESH_STATE_DIR"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the controller, the demo shop with a sidecar per instance, and the storefront entry.
    Up(up::UpArgs),
    /// Services, instances, endpoints, versions and every proxy's listeners.
    Status {
        /// The controller's status document as JSON (stable; see docs/status.md).
        #[arg(long)]
        json: bool,
    },
    /// Set chaos knobs on a service's instances.
    Chaos(chaos::ChaosArgs),
    /// Validate a folder of mesh YAML offline and lint its resilience policies.
    Check(check::CheckArgs),
    /// Add the sidecar to every pod in a YAML file, as the admission webhook would.
    Inject(inject::InjectArgs),
    /// Trip, isolate or reset the circuit breakers the proxies hold for a service (labs).
    Breaker(breaker::BreakerArgs),
    /// Golden metrics per service: rps, success rate, p50/p95/p99, retries.
    Stat(stat::StatArgs),
    /// Every request to or from a service, live, with the mesh's decisions.
    Tap(tap::TapArgs),
    /// One traced request, hop by hop, with what each proxy decided.
    Explain(explain::ExplainArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRYMESH_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match &cli.command {
        Cmd::Up(args) => up::run(&cli.state_dir, args).await,
        Cmd::Status { json } => status::run(&cli.state_dir, *json).await,
        Cmd::Chaos(args) => chaos::run(&cli.state_dir, args).await,
        Cmd::Check(args) => check::run(args).await,
        Cmd::Inject(args) => inject::run(args),
        Cmd::Breaker(args) => breaker::run(&cli.state_dir, args).await,
        Cmd::Stat(args) => stat::run(&cli.state_dir, args).await,
        Cmd::Tap(args) => tap::run(&cli.state_dir, args).await,
        Cmd::Explain(args) => explain::run(&cli.state_dir, args).await,
    }
}
