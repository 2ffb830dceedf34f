//! `ferry-shop SERVICE`: the demo shop, one subcommand per service.
//!
//! Every instance serves its business routes behind the chaos knobs, plus `/healthz`
//! (liveness), `/readyz` (readiness) and `GET/PUT /chaos`, and tags every response with
//! `x-ferry-instance`. Calls to other services go through `HTTP_PROXY` (the local sidecar).

use std::net::SocketAddr;

use axum::Router;
use axum::http::HeaderValue;
use axum::routing::get;
use clap::{Parser, ValueEnum};
use ferry_shop::{chaos, services};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Service {
    Storefront,
    Catalog,
    Pricing,
    Inventory,
    Reviews,
    Orders,
    Payments,
}

#[derive(Debug, Parser)]
#[command(name = "ferry-shop", version, about = "The Ferrymesh demo shop")]
struct Cli {
    /// Which service to run.
    #[arg(value_enum)]
    service: Service,
    /// Address to listen on (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:8080", env = "FERRY_LISTEN")]
    listen: SocketAddr,
    /// Instance name, reported in `x-ferry-instance`. Default: the service name.
    #[arg(long, env = "FERRY_INSTANCE")]
    instance: Option<String>,
    /// Namespace of the other services (`http://<service>.<namespace>`).
    #[arg(long, default_value = "shop", env = "FERRY_NAMESPACE")]
    namespace: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let name = cli
        .service
        .to_possible_value()
        .expect("every service has a name")
        .get_name()
        .to_owned();
    let instance = cli.instance.clone().unwrap_or_else(|| name.clone());
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .map(|s| s.parse::<u64>())
        .transpose()
        .map_err(|e| anyhow::anyhow!("CHAOS_SEED: {e}"))?;
    let knobs = chaos::Knobs::new(chaos::Chaos::from_env(|k| std::env::var(k).ok())?, seed);
    let peers = services::Peers::new(cli.namespace.clone())?;
    let business: Router = match cli.service {
        Service::Storefront => services::storefront::routes(peers),
        Service::Catalog => services::catalog::routes(),
        Service::Pricing => services::pricing::routes(),
        Service::Inventory => services::inventory::routes(),
        Service::Reviews => services::reviews::routes(),
        Service::Orders => services::orders::routes(peers),
        Service::Payments => services::payments::routes(),
    };
    let business = business.layer(axum::middleware::from_fn_with_state(
        knobs.clone(),
        chaos::inject,
    ));
    let tag = HeaderValue::from_str(&instance)?;
    let app = Router::new()
        .route("/healthz", get(chaos::healthz))
        .route("/readyz", get(chaos::readyz))
        .route("/chaos", get(chaos::get).put(chaos::put))
        .with_state(knobs)
        .merge(business)
        .layer(axum::middleware::map_response(
            move |mut rsp: axum::response::Response| {
                let tag = tag.clone();
                async move {
                    rsp.headers_mut().insert("x-ferry-instance", tag);
                    rsp
                }
            },
        ));
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let addr = listener.local_addr()?;
    println!("FERRYMESH_LISTENING {}", serde_json::json!({ "app": addr }));
    tracing::info!(service = %name, %instance, %addr, "listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}
