//! `ferrymesh-proxy`: the Ferrymesh sidecar.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ferrymesh_proxy::app::App;
use ferrymesh_proxy::config::Config;

/// jemalloc, with its background thread returning freed pages to the system (dirty pages
/// after 10 s): after a burst of connections closes, the proxy's memory comes back down
/// (glibc's per-thread arenas keep what they once held).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
        /// A ProxyConfig YAML file (local mode).
        #[arg(long, required_if_eq("mode", "local"))]
        config: Option<PathBuf>,
        /// `local`: from the config file; `sidecar`: injected into a Kubernetes pod, configured
        /// by the environment the injector set.
        #[arg(long, value_enum, default_value = "local")]
        mode: Mode,
        /// Validate the config and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Wait until the proxy on this pod reports ready (`:4391/ready`), at most `--timeout`
    /// (the postStart hook of a classic, non-native, sidecar).
    AwaitReady {
        /// The health address.
        #[arg(long, default_value = "127.0.0.1:4391")]
        health: std::net::SocketAddr,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Install the pod's nat rules that send its TCP traffic through the proxy (the init
    /// container's job; needs NET_ADMIN). Run again, it replaces them.
    InitIptables(InitIptables),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Local,
    Sidecar,
}

#[derive(Debug, clap::Args)]
struct InitIptables {
    /// The proxy's inbound listener port.
    #[arg(long, default_value_t = 4343)]
    inbound_port: u16,
    /// The proxy's transparent outbound listener port.
    #[arg(long, default_value_t = 4340)]
    outbound_port: u16,
    /// The UID the proxy runs as (its connections are not redirected).
    #[arg(long, default_value_t = 2340)]
    proxy_uid: u32,
    /// Inbound ports (and ranges, `8000-8100`) that reach the app directly.
    #[arg(long, default_value = "4390,4391")]
    skip_inbound_ports: String,
    /// Outbound ports that bypass the proxy.
    #[arg(long, default_value = "")]
    skip_outbound_ports: String,
    /// Outbound CIDRs that bypass the proxy.
    #[arg(long, default_value = "")]
    skip_subnets: String,
    /// Which iptables: the distribution's default, nft or legacy.
    #[arg(long, value_enum, default_value = "auto")]
    backend: ferrymesh_proxy::iptables::Backend,
    /// Remove the Ferrymesh rules instead.
    #[arg(long)]
    cleanup: bool,
    /// Print the tables that would be restored; change nothing.
    #[arg(long)]
    dry_run: bool,
}

fn await_ready(health: std::net::SocketAddr, timeout: u64) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let deadline = std::time::Duration::from_secs(timeout);
    let started = tokio::time::Instant::now();
    loop {
        let ready =
            std::net::TcpStream::connect_timeout(&health, std::time::Duration::from_secs(1))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
                    s.write_all(
                        b"GET /ready HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n",
                    )?;
                    let mut head = [0u8; 12];
                    s.read_exact(&mut head)?;
                    Ok(head.ends_with(b"200"))
                })
                .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if started.elapsed() > deadline {
            anyhow::bail!("the proxy at {health} was not ready within {timeout}s");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn init_iptables(a: &InitIptables) -> anyhow::Result<()> {
    use ferrymesh_proxy::iptables;
    let rules = iptables::Rules {
        inbound_port: a.inbound_port,
        outbound_port: a.outbound_port,
        proxy_uid: a.proxy_uid,
        skip_inbound_ports: iptables::parse_ports(&a.skip_inbound_ports)
            .map_err(|e| anyhow::anyhow!("--skip-inbound-ports: {e}"))?,
        skip_outbound_ports: iptables::parse_ports(&a.skip_outbound_ports)
            .map_err(|e| anyhow::anyhow!("--skip-outbound-ports: {e}"))?,
        skip_subnets: iptables::parse_subnets(&a.skip_subnets)
            .map_err(|e| anyhow::anyhow!("--skip-subnets: {e}"))?,
    };
    iptables::apply((!a.cleanup).then_some(&rules), a.backend, a.dry_run)
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (config, mode, check_config) = match Cli::parse().command {
        Command::Run {
            config,
            mode,
            check_config,
        } => (config, mode, check_config),
        Command::InitIptables(args) => return init_iptables(&args),
        Command::AwaitReady { health, timeout } => return await_ready(health, timeout),
    };
    let env = |k: &str| std::env::var(k).ok();
    let config = match (mode, config) {
        (Mode::Sidecar, _) => {
            let ipv6 = std::path::Path::new("/proc/net/if_inet6").exists();
            Config::sidecar(env, ipv6).context("the sidecar's environment")?
        }
        (Mode::Local, Some(file)) => {
            Config::load(&file, env).context("loading the proxy config")?
        }
        (Mode::Local, None) => anyhow::bail!("--config is required in local mode"),
    };
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
