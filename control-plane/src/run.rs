//! The controller process: binds its ports, loads the source, serves until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, Addresses};
use crate::grpc::DiscoveryService;
use crate::identity::Ca;
use crate::index::IndexHandle;
use crate::metrics::Metrics;
use crate::sources::files::FileSource;

mod identity;
use identity::{bind_identity, discovery_tls, spawn_identity};

/// Where the controller reads objects from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// A folder of YAML (local mode).
    Files,
    /// The Kubernetes API (in a cluster, or wherever KUBECONFIG points).
    Kubernetes,
}

/// `ferrymesh-controller run` options.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Where objects come from.
    #[arg(long, value_enum, default_value = "files")]
    pub source: SourceKind,
    /// With `--source kubernetes`: a kubeconfig file (default: in-cluster config, or
    /// `KUBECONFIG`).
    #[arg(long, env = "FERRYMESH_CONTROLLER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// With `--source files`: the folder of YAML to load and watch.
    #[arg(long, env = "FERRYMESH_CONTROLLER_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// Discovery gRPC address (port 0: any free port, printed at start).
    #[arg(
        long,
        default_value = "127.0.0.1:9091",
        env = "FERRYMESH_CONTROLLER_DISCOVERY_LISTEN"
    )]
    pub discovery_listen: SocketAddr,
    /// Health, metrics and `/status` address.
    #[arg(
        long,
        default_value = "127.0.0.1:9990",
        env = "FERRYMESH_CONTROLLER_ADMIN_LISTEN"
    )]
    pub admin_listen: SocketAddr,
    /// TTL of resources that carry faults: proxies drop a fault not refreshed within it (the
    /// controller refreshes every third of it), so chaos stops when the controller is gone.
    #[arg(long, default_value = "60s", value_parser = parse_duration, env = "FERRYMESH_CONTROLLER_FAULT_TTL")]
    pub fault_ttl: Duration,
    /// How long a connection to Discovery, Identity or the webhook may take to finish its TLS
    /// handshake (plaintext: to send its first bytes) before it is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "FERRYMESH_CONTROLLER_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Duration,
    /// File source: after a start, how long endpoint sets that reconnecting proxies already
    /// hold are kept as they are (their workloads may not have registered again yet; a proxy
    /// reconnects within 10 s); `0s`: not at all. On Kubernetes they are kept until the
    /// Service, EndpointSlice and Pod watches have listed.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "FERRYMESH_CONTROLLER_RECONNECT_GRACE")]
    pub reconnect_grace: Duration,
    /// The CA's folder (`ca.pem`, `ca.key.pem`; created on first start). Without it the mesh
    /// has no identity: proxies talk plaintext.
    #[arg(long, env = "FERRYMESH_CONTROLLER_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Kubernetes source: the Secret (`namespace/name`) that keeps the CA; created with a new
    /// CA on first start, loaded into `--ca-dir` on every start.
    #[arg(long, env = "FERRYMESH_CONTROLLER_CA_SECRET")]
    pub ca_secret: Option<String>,
    /// Bootstrap tokens (local mode): `<dir>/<namespace>/<service account>`.
    #[arg(long, env = "FERRYMESH_CONTROLLER_TOKEN_DIR")]
    pub token_dir: Option<PathBuf>,
    /// Identity (Certify, TLS) address.
    #[arg(
        long,
        default_value = "127.0.0.1:9090",
        env = "FERRYMESH_CONTROLLER_IDENTITY_LISTEN"
    )]
    pub identity_listen: SocketAddr,
    /// The SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local", env = "FERRYMESH_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// What a workload port with no Allow rule admits: all-unauthenticated (the course
    /// default), all-authenticated, cluster-authenticated or deny.
    #[arg(long, default_value = "all-unauthenticated", value_parser = parse_default_inbound, env = "FERRYMESH_DEFAULT_INBOUND_POLICY")]
    pub default_inbound_policy: ferrymesh_proto::config::v1::DefaultPolicy,
    /// Where proxies send spans (OTLP/gRPC, e.g. `http://127.0.0.1:4317`); unset: no export.
    #[arg(long, default_value = "", env = "FERRYMESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: String,
    /// Share of new traces proxies sample (0..1); requests with a trace context follow it.
    #[arg(long, default_value_t = 1.0, value_parser = parse_ratio, env = "FERRYMESH_TRACE_SAMPLING")]
    pub trace_sampling: f64,
    /// The injection webhook's HTTPS address (needs the CA); off when unset.
    #[arg(long, env = "FERRYMESH_CONTROLLER_WEBHOOK_LISTEN")]
    pub webhook_listen: Option<SocketAddr>,
    /// The MutatingWebhookConfiguration whose caBundle the controller keeps (Kubernetes source).
    #[arg(long, default_value = crate::webhook::CONFIGURATION, env = "FERRYMESH_CONTROLLER_WEBHOOK_CONFIGURATION")]
    pub webhook_configuration: String,
    /// The proxy image the injector puts into pods.
    #[arg(long, env = "FERRYMESH_PROXY_IMAGE")]
    pub proxy_image: Option<String>,
    /// Lifetime of workload certificates.
    #[arg(long, default_value = "24h", value_parser = parse_duration, env = "FERRYMESH_CONTROLLER_CERT_LIFETIME")]
    pub cert_lifetime: Duration,
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| format!("{text:?}: a ratio 0..1"))
}

/// Linkerd's names for the default inbound policy.
pub fn parse_default_inbound(
    text: &str,
) -> Result<ferrymesh_proto::config::v1::DefaultPolicy, String> {
    use ferrymesh_proto::config::v1::DefaultPolicy as D;
    match text {
        "all-unauthenticated" => Ok(D::AllUnauthenticated),
        "all-authenticated" => Ok(D::AllAuthenticated),
        "cluster-authenticated" => Ok(D::ClusterAuthenticated),
        "deny" => Ok(D::Deny),
        other => Err(format!(
            "{other:?}: all-unauthenticated | all-authenticated | cluster-authenticated | deny"
        )),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    ferrymesh_proto::duration::parse(text).map_err(|e| e.to_string())
}

/// The line printed on stdout once every port is bound: `FERRYMESH_LISTENING {json}`.
pub const LISTENING_PREFIX: &str = "FERRYMESH_LISTENING ";

/// Serves the injection webhook; with the Kubernetes source, first patches the CA into the
/// webhook configuration's caBundle (retrying until the configuration exists).
async fn run_webhook(
    args: RunArgs,
    ca: Arc<Ca>,
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let client = match args.source {
        SourceKind::Kubernetes => kube_client(args.kubeconfig.as_deref()).await.ok(),
        SourceKind::Files => None,
    };
    if let Some(client) = client.clone() {
        let (configuration, pem) = (
            args.webhook_configuration.clone(),
            ca.anchor_pem().to_owned(),
        );
        tokio::spawn(async move {
            while let Err(e) = crate::webhook::patch_ca_bundle(&client, &configuration, &pem).await
            {
                tracing::warn!(error = %format!("{e:#}"), "caBundle not patched yet; retrying in 5s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }
    let mut settings = crate::inject::Settings::default();
    if let Some(image) = &args.proxy_image {
        settings.image.clone_from(image);
    }
    // The cluster's default inbound policy reaches proxies on Discovery; only a pod's own
    // annotation is frozen into it.
    let hook = crate::webhook::Webhook { settings, client };
    let served = match ca.server_identity() {
        Ok((cert, key)) => {
            let limits = crate::guard::Limits::with_handshake(args.handshake_timeout);
            crate::webhook::serve(hook, listener, &cert, &key, limits, metrics, shutdown).await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = served {
        tracing::error!(error = %format!("{e:#}"), "the injection webhook stopped");
    }
}

/// A client from `kubeconfig`, else the in-cluster config or `KUBECONFIG`.
///
/// # Errors
/// No usable configuration.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes config (in-cluster service account or KUBECONFIG)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

fn config_dir(args: &RunArgs) -> anyhow::Result<PathBuf> {
    args.config_dir
        .clone()
        .context("--config-dir is required with --source files")
}

/// Loads the source (files: every file now; Kubernetes: the client), and returns the task
/// that keeps following it until shutdown.
async fn start_source(
    args: &RunArgs,
    index: &IndexHandle,
    metrics: &Arc<Metrics>,
    watches: &crate::sources::kubernetes::watches::Watches,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>>
{
    match args.source {
        SourceKind::Files => {
            let mut source = FileSource::new(config_dir(args)?, index.clone());
            let rejected = source.load()?;
            if rejected > 0 {
                tracing::warn!(
                    rejected,
                    "some config files were rejected at start; serving the others"
                );
            }
            Ok(Box::pin(source.watch(shutdown)))
        }
        SourceKind::Kubernetes => {
            use crate::sources::kubernetes;
            let client = kube_client(args.kubeconfig.as_deref()).await?;
            let seen = kubernetes::Seen::default();
            let mut tasks = tokio::task::JoinSet::new();
            for kind in kubernetes::KINDS {
                tasks.spawn(kubernetes::watch_when_installed(
                    client.clone(),
                    *kind,
                    kubernetes::Sinks {
                        index: index.clone(),
                        seen: seen.clone(),
                        metrics: metrics.clone(),
                        watches: watches.clone(),
                    },
                ));
            }
            tasks.spawn(kubernetes::status::run(
                client,
                seen,
                index.subscribe(),
                metrics.clone(),
                watches.clone(),
            ));
            Ok(Box::pin(async move {
                let _ = shutdown.wait_for(|s| *s).await;
                tasks.shutdown().await;
                Ok(())
            }))
        }
    }
}

/// Runs the controller until `shutdown` turns true.
///
/// # Errors
/// A port cannot be bound or the source cannot be read at start.
pub async fn run(args: RunArgs, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    crate::guard::raise_fd_limit();
    let index = IndexHandle::with_fault_ttl(args.fault_ttl);
    index.set_default_inbound(args.default_inbound_policy);
    index.set_trust_domain(&args.trust_domain);
    index.set_telemetry(&args.otlp_endpoint, args.trace_sampling);
    let metrics = Arc::new(Metrics::new());
    let watches = crate::sources::kubernetes::watches::Watches::default();
    let source = start_source(&args, &index, &metrics, &watches, shutdown.clone()).await?;

    let discovery = TcpListener::bind(args.discovery_listen)
        .await
        .with_context(|| {
            format!(
                "binding the Discovery listener on {}",
                args.discovery_listen
            )
        })?;
    let admin_listener = TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener on {}", args.admin_listen))?;
    let identity = bind_identity(&args).await?;
    let webhook = match (args.webhook_listen, &identity) {
        (Some(addr), Some((ca, _))) => Some((crate::webhook::bind(addr).await?, ca.clone())),
        (Some(_), None) => anyhow::bail!("--webhook-listen needs the CA (--ca-dir)"),
        (None, _) => None,
    };
    let addrs = Addresses {
        discovery: discovery.local_addr()?,
        admin: admin_listener.local_addr()?,
        identity: identity.as_ref().map(|(_, l)| l.local_addr()).transpose()?,
        webhook: webhook.as_ref().map(|(l, _)| l.local_addr()).transpose()?,
    };
    if let Some((listener, ca)) = webhook {
        tokio::spawn(run_webhook(
            args.clone(),
            ca,
            listener,
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    println!("{LISTENING_PREFIX}{}", serde_json::to_string(&addrs)?);
    tracing::info!(discovery = %addrs.discovery, admin = %addrs.admin, "controller listening");

    let watch_task = tokio::spawn(source);
    // Faults end on time even when nothing else changes.
    let expiry_index = index.clone();
    let mut expiry_shutdown = shutdown.clone();
    let expiry_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => expiry_index.expire_faults(),
                _ = expiry_shutdown.wait_for(|s| *s) => return,
            }
        }
    });
    let admin_app = admin::router(
        index.clone(),
        metrics.clone(),
        addrs.clone(),
        watches.clone(),
    );
    let mut admin_shutdown = shutdown.clone();
    let admin_task = tokio::spawn(async move {
        axum::serve(admin_listener, admin_app)
            .with_graceful_shutdown(async move {
                let _ = admin_shutdown.wait_for(|s| *s).await;
            })
            .await
    });
    // With the CA on, Discovery is mTLS: the controller's server certificate, and the proxies'
    // mesh certificates checked against the node each announces.
    let discovery_tls = identity
        .as_ref()
        .map(|(ca, _)| discovery_tls(ca))
        .transpose()?;
    let identity_task = spawn_identity(&args, identity, &index, &metrics, &shutdown).await?;
    let mut service = DiscoveryService::new(index, metrics.clone(), shutdown.clone())
        .hold_endpoints_until(release_endpoints(&args, &watches));
    if discovery_tls.is_some() {
        service = service.require_mtls(&args.trust_domain);
    }
    serve_discovery(
        discovery,
        discovery_tls,
        service,
        crate::guard::Limits::with_handshake(args.handshake_timeout),
        metrics,
        shutdown.clone(),
    )
    .await
    .context("serving Discovery")?;
    admin_task
        .await
        .context("admin task")?
        .context("serving admin")?;
    if let Some(task) = identity_task {
        task.await.context("identity task")??;
    }
    watch_task.await.context("watch task")??;
    expiry_task.await.context("fault expiry task")?;
    Ok(())
}

/// Serves Discovery until shutdown. Connections reach the server only once through their TLS
/// handshake (or, in plaintext, once their first bytes arrived), within per-source and total
/// caps.
async fn serve_discovery(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    service: DiscoveryService,
    limits: crate::guard::Limits,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let mut grpc_shutdown = shutdown.clone();
    let signal = async move {
        let _ = grpc_shutdown.wait_for(|s| *s).await;
    };
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(3)))
        .add_service(service.into_server());
    if let Some(acceptor) = tls {
        let handshake = crate::guard::tls(acceptor);
        let incoming =
            crate::guard::incoming(listener, "discovery", limits, metrics, handshake, shutdown);
        router.serve_with_incoming_shutdown(incoming, signal).await
    } else {
        let incoming = crate::guard::incoming(
            listener,
            "discovery",
            limits,
            metrics,
            crate::guard::first_bytes,
            shutdown,
        );
        router.serve_with_incoming_shutdown(incoming, signal).await
    }
}

/// When endpoint sets may replace what reconnecting proxies hold: with files, once
/// `--reconnect-grace` has passed (local workloads register again on their proxies' streams,
/// each reconnecting within its backoff); on Kubernetes, once the Service, EndpointSlice and
/// Pod watches have listed (endpoints come from the API, not from registrations).
fn release_endpoints(
    args: &RunArgs,
    watches: &crate::sources::kubernetes::watches::Watches,
) -> watch::Receiver<bool> {
    use crate::sources::kubernetes::watches::WatchState;
    let (tx, rx) = watch::channel(args.reconnect_grace.is_zero());
    let grace = args.reconnect_grace;
    match args.source {
        SourceKind::Files => {
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                let _ = tx.send(true);
            });
        }
        SourceKind::Kubernetes => {
            let watches = watches.clone();
            tokio::spawn(async move {
                let synced = |kind: &str| {
                    watches
                        .all()
                        .iter()
                        .any(|w| w.kind == kind && w.state == WatchState::Synced)
                };
                while !["Service", "EndpointSlice", "Pod"]
                    .iter()
                    .all(|k| synced(k))
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = tx.send(true);
            });
        }
    }
    rx
}
