//! The controller's health and admin HTTP port: `/live`, `/ready`, `/metrics` and `/status`
//! (the JSON that `ferryctl status` reads; its shape is documented in docs/status.md).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use ferrymesh_proto::config::v1 as cfg;
use ferrymesh_proto::discovery::v1 as pb;
use serde::Serialize;

use crate::index::{IndexHandle, Snapshot};
use crate::metrics::Metrics;
use crate::sources::kubernetes::watches::{WatchStatus, Watches};

#[derive(Clone, Debug)]
struct AdminState {
    index: IndexHandle,
    metrics: Arc<Metrics>,
    addrs: Addresses,
    watches: Watches,
}

/// Where the controller listens (reported in `/status`).
#[derive(Clone, Debug, Serialize)]
pub struct Addresses {
    /// The Discovery gRPC server.
    pub discovery: SocketAddr,
    /// This admin server.
    pub admin: SocketAddr,
    /// The Identity (CA) gRPC server, when identity is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<SocketAddr>,
    /// The injection webhook (HTTPS), when on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<SocketAddr>,
}

/// The admin router.
pub fn router(
    index: IndexHandle,
    metrics: Arc<Metrics>,
    addrs: Addresses,
    watches: Watches,
) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(|| async { "ready\n" }))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status))
        .with_state(AdminState {
            index,
            metrics,
            addrs,
            watches,
        })
}

async fn metrics_text(
    State(state): State<AdminState>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let snapshot = state.index.snapshot();
    let mut text = state.metrics.encode();
    let text_end = text.rfind("# EOF").unwrap_or(text.len());
    text.truncate(text_end);
    let _ = writeln!(
        text,
        "# HELP ferrymesh_controller_config_file_errors Config files whose last reload was rejected."
    );
    let _ = writeln!(text, "# TYPE ferrymesh_controller_config_file_errors gauge");
    let _ = writeln!(
        text,
        "ferrymesh_controller_config_file_errors {}",
        snapshot.file_errors.len()
    );
    let _ = writeln!(
        text,
        "# HELP ferrymesh_controller_registered_workloads Local workloads registered on Discovery streams."
    );
    let _ = writeln!(
        text,
        "# TYPE ferrymesh_controller_registered_workloads gauge"
    );
    let _ = writeln!(
        text,
        "ferrymesh_controller_registered_workloads {}",
        snapshot.workloads.len()
    );
    text.push_str("# EOF\n");
    // OpenMetrics for scrapers that ask for it, the Prometheus text format otherwise.
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = ferrymesh_proto::exposition::negotiate(accept, text);
    ([(header::CONTENT_TYPE, content_type)], body)
}

async fn status(State(state): State<AdminState>) -> impl IntoResponse {
    let mut status = Status::from_snapshot(
        &state.index.snapshot(),
        &state.index.streams(),
        &state.addrs,
    );
    status.watches = state.watches.all();
    axum::Json(status)
}

/// `/status`: stable JSON for `ferryctl status --json` and scripts.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The controller's own addresses.
    pub controller: Addresses,
    /// Every service with its ports and endpoints.
    pub services: Vec<ServiceStatus>,
    /// Every connected proxy.
    pub proxies: Vec<ProxyStatus>,
    /// Rejected config files (`file: object: field: message`).
    pub file_errors: Vec<crate::sources::ParseError>,
    /// Skipped documents and ignored objects.
    pub warnings: Vec<String>,
    /// The Kubernetes source's watches (none with the file source): synced, failing, or
    /// not watched because the API is not installed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub watches: Vec<WatchStatus>,
}

/// One service.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// True when only implied by a registered workload.
    pub implicit: bool,
    /// Ports, each with its endpoints.
    pub ports: Vec<PortStatus>,
}

/// One service port.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortStatus {
    /// Port name.
    pub name: String,
    /// Port.
    pub port: u16,
    /// `Http`, `Http2`, `Grpc` or `Opaque`.
    pub protocol: crate::sources::PortProtocol,
    /// Version of the ENDPOINTS resource.
    pub endpoints_version: String,
    /// Version of the CLIENT_POLICY resource.
    pub policy_version: String,
    /// Endpoints.
    pub endpoints: Vec<EndpointStatus>,
}

/// One endpoint.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    /// `ip:port`.
    pub address: String,
    /// Ready condition.
    pub ready: bool,
    /// The instance behind it (local mode), empty for static endpoints.
    pub instance: String,
    /// True when a proxy fronts it.
    pub meshed: bool,
}

/// One connected proxy.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    /// `namespace/instance`.
    pub workload: String,
    /// `namespace/service`, empty when the proxy fronts no workload.
    pub service: String,
    /// Instance name.
    pub instance: String,
    /// Readiness as last reported.
    pub ready: bool,
    /// The app behind the proxy.
    pub app: Option<String>,
    /// The proxy's listeners.
    pub listeners: Listeners,
    /// Proxy version.
    pub version: String,
    /// The SPIFFE id it serves with (mTLS); empty: plaintext.
    pub identity: String,
}

/// A proxy's listeners, `ip:port` each.
#[derive(Debug, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Listeners {
    /// Outbound (explicit HTTP proxy).
    pub outbound: Option<String>,
    /// Inbound.
    pub inbound: Option<String>,
    /// Admin (`/config_dump`).
    pub admin: Option<String>,
    /// Health and metrics.
    pub health: Option<String>,
    /// Fixed-target listeners: `{listen, target}`.
    pub fixed: Vec<FixedStatus>,
}

/// A fixed-target listener.
#[derive(Debug, Serialize)]
pub struct FixedStatus {
    /// `ip:port`.
    pub listen: String,
    /// `service.namespace:port`.
    pub target: String,
}

fn addr(a: Option<&cfg::SocketAddr>) -> Option<String> {
    a.map(|a| {
        if a.ip.contains(':') {
            format!("[{}]:{}", a.ip, a.port)
        } else {
            format!("{}:{}", a.ip, a.port)
        }
    })
}

impl Status {
    /// Builds the status document from a snapshot.
    pub fn from_snapshot(
        snapshot: &Snapshot,
        streams: &std::collections::BTreeMap<u64, pb::Node>,
        addrs: &Addresses,
    ) -> Self {
        let services = snapshot
            .services
            .iter()
            .map(|(key, info)| ServiceStatus {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                implicit: info.implicit,
                ports: info
                    .ports
                    .iter()
                    .map(|p| {
                        let rk = (key.clone(), p.port);
                        let eps = snapshot.resources.endpoints.get(&rk);
                        let endpoints = match eps.and_then(|r| r.body.as_ref()) {
                            Some(pb::resource::Body::Endpoints(e)) => e
                                .endpoints
                                .iter()
                                .map(|e| EndpointStatus {
                                    address: addr(e.addr.as_ref()).unwrap_or_default(),
                                    ready: e.ready,
                                    instance: e
                                        .metric_labels
                                        .get("instance")
                                        .cloned()
                                        .unwrap_or_default(),
                                    meshed: e.proxy_inbound_port != 0,
                                })
                                .collect(),
                            _ => Vec::new(),
                        };
                        PortStatus {
                            name: p.name.clone(),
                            port: p.port,
                            protocol: p.protocol,
                            endpoints_version: eps.map(|r| r.version.clone()).unwrap_or_default(),
                            policy_version: snapshot
                                .resources
                                .client_policies
                                .get(&rk)
                                .map(|r| r.version.clone())
                                .unwrap_or_default(),
                            endpoints,
                        }
                    })
                    .collect(),
            })
            .collect();
        let proxies = streams
            .iter()
            .map(|(id, node)| {
                let local = node.local_workload.as_ref();
                let ready = snapshot
                    .workloads
                    .iter()
                    .find(|w| w.stream == *id)
                    .is_some_and(|w| w.ready);
                let l = local.and_then(|l| l.listeners.as_ref());
                ProxyStatus {
                    workload: node.workload.clone(),
                    service: local
                        .and_then(|l| l.service.as_ref())
                        .map(|s| format!("{}/{}", s.namespace, s.name))
                        .unwrap_or_default(),
                    instance: local.map(|l| l.instance.clone()).unwrap_or_default(),
                    ready,
                    app: addr(local.and_then(|l| l.app.as_ref())),
                    listeners: Listeners {
                        outbound: addr(l.and_then(|l| l.outbound.as_ref())),
                        inbound: addr(l.and_then(|l| l.inbound.as_ref())),
                        admin: addr(l.and_then(|l| l.admin.as_ref())),
                        health: addr(l.and_then(|l| l.health.as_ref())),
                        fixed: l
                            .map(|l| {
                                l.fixed
                                    .iter()
                                    .map(|f| FixedStatus {
                                        listen: addr(f.listen.as_ref()).unwrap_or_default(),
                                        target: f.target.clone(),
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    },
                    version: node.proxy_version.clone(),
                    identity: local.map(|l| l.identity.clone()).unwrap_or_default(),
                }
            })
            .collect();
        Self {
            controller: addrs.clone(),
            services,
            proxies,
            file_errors: snapshot.file_errors.clone(),
            warnings: snapshot.warnings.clone(),
            watches: Vec::new(),
        }
    }
}
