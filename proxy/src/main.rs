//! `ferrymesh-proxy`: the Ferrymesh sidecar.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ferrymesh_proxy::app::App;
use ferrymesh_proxy::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "ferrymesh-proxy",
    version,
    about = "Ferrymesh data-plane proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// A ProxyConfig YAML file.
        #[arg(long)]
        config: PathBuf,
        /// Validate the config and exit.
        #[arg(long)]
        check_config: bool,
    },
}

/// Printed on stdout once every listener is bound: `FERRYMESH_LISTENING {json}`.
const LISTENING_PREFIX: &str = "FERRYMESH_LISTENING ";

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRYMESH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Run {
        config,
        check_config,
    } = Cli::parse().command;
    let config =
        Config::load(&config, |k| std::env::var(k).ok()).context("loading the proxy config")?;
    if check_config {
        println!("config ok");
        return Ok(());
    }
    let runtime = if config.workers.get() == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers.get())
            .enable_all()
            .build()?
    };
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let app = App::build(config).await?;
    println!(
        "{LISTENING_PREFIX}{}",
        serde_json::to_string(app.addresses())?
    );
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = tx.send(true);
    });
    app.run(rx).await
}
