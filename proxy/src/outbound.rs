//! The outbound side: requests the app sends. The explicit-proxy listener takes absolute-form
//! HTTP/1.1 (`GET http://pricing.shop/...`), origin-form with `Host`, HTTP/2 prior knowledge,
//! and `CONNECT host:port` tunnels (inside which HTTP/1.1 or h2c is detected and handled at L7
//! for known services, anything else forwarded as opaque TCP). Fixed-target listeners send
//! everything to one service. Each request resolves its authority to a [`logical::Logical`]
//! target and goes to the endpoint the balancer picks; unknown hosts pass through or get 502.

pub mod cache;
pub mod concrete;
pub mod health;
pub mod logical;
pub mod routing;
mod target;
mod tunnel;

pub use target::Target;
pub use tunnel::serve_opaque;
use tunnel::{connect, opaque};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

use self::logical::{Logical, Resolution};
use crate::access_log::Tap;
use crate::client::CallTimeouts;
use crate::config::{Config, UnknownHosts};
use crate::detect::{Detected, PrefixedIo, sniff};
use crate::discovery::Discovery;
use crate::http::{Body, ProxyError, proxy_response};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::metrics::{Direction, RequestHandles};
use crate::pool::Pool;
use crate::server::{HttpVersion, serve_http};
use crate::trace::Tracing;

/// How long the first bytes of a tunnel or fixed-target connection may take to arrive.
const DETECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Label for traffic to hosts outside the mesh.
const PASSTHROUGH: &str = "passthrough";

/// The outbound side: the targets it has resolved and the handles its requests use (nothing
/// else of the proxy is reachable from here).
#[derive(Debug)]
pub struct Outbound {
    /// The bootstrap config.
    pub config: Arc<Config>,
    /// The control-plane cache targets subscribe through.
    pub discovery: Discovery,
    /// Client connections.
    pub pool: Arc<Pool>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Spans, when the controller names a collector.
    pub tracing: Arc<Tracing>,
    /// Live listeners to the requests (`/tap`).
    pub tap: Arc<Tap>,
    /// The workload identity (mTLS to meshed endpoints), when on.
    pub identity: Option<Arc<Identity>>,
    targets: Mutex<HashMap<String, Arc<Logical>>>,
    /// The request metrics of traffic to no mesh service (resolved once).
    passthrough: RequestHandles,
}

impl Outbound {
    /// The outbound side over these handles, with no target resolved yet.
    pub fn new(
        config: Arc<Config>,
        discovery: Discovery,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        tracing: Arc<Tracing>,
        tap: Arc<Tap>,
        identity: Option<Arc<Identity>>,
    ) -> Self {
        let passthrough = metrics.request_handles(Direction::outbound, PASSTHROUGH);
        Self {
            config,
            discovery,
            pool,
            metrics,
            tracing,
            tap,
            identity,
            targets: Mutex::default(),
            passthrough,
        }
    }

    /// The request metrics of traffic to no mesh service.
    fn passthrough_metrics(&self) -> RequestHandles {
        self.passthrough.clone()
    }

    /// The logical target of `name`, created (and subscribed) on first use.
    pub fn logical(&self, name: &str) -> Arc<Logical> {
        let mut targets = self.targets.lock().expect("targets lock poisoned");
        targets
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Logical::new(&self.discovery, name.to_owned())))
            .clone()
    }

    /// The breakers of every port of Service `namespace/name` this proxy has called.
    pub fn breakers(
        &self,
        namespace: &str,
        name: &str,
    ) -> Vec<(String, ferrymesh_resilience::breaker::Breaker)> {
        let prefix = format!("{name}.{namespace}.svc.cluster.local:");
        let targets = self.targets.lock().expect("targets lock poisoned");
        let mut found: Vec<_> = targets
            .iter()
            .filter(|(target, _)| target.starts_with(&prefix))
            .filter_map(|(target, l)| Some((target.clone(), l.stack.breaker()?)))
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    /// Every target with its balancer state, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let targets = self.targets.lock().expect("targets lock poisoned");
        targets
            .iter()
            .map(|(name, l)| {
                l.sync_endpoints();
                let endpoints: Vec<_> = l
                    .balancer
                    .slots()
                    .iter()
                    .map(|s| serde_json::json!({"addr": s.endpoint.addr, "ready": s.endpoint.ready, "inFlight": s.pending()}))
                    .collect();
                let stacks = l.stack.assembled();
                (name.clone(), serde_json::json!({ "endpoints": endpoints, "stacksBuilt": stacks }))
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// Handles one connection on the explicit-proxy listener: HTTP only, each request naming its
/// own target.
pub async fn serve_explicit<I>(ctx: Arc<Outbound>, io: I, drain: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_detected(ctx, io, None, drain).await;
}

/// Handles one connection on a fixed-target listener.
pub async fn serve_fixed<I>(ctx: Arc<Outbound>, io: I, target: Target, drain: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_detected(ctx, io, Some(target), drain).await;
}

/// Serves a connection: HTTP (detected) at L7, routed by each request or by `target`; anything
/// else is forwarded as opaque TCP to `target`, or closed when there is none.
async fn serve_detected<I>(
    ctx: Arc<Outbound>,
    io: I,
    target: Option<Target>,
    drain: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut io = io;
    let Ok((detected, prefix)) = sniff(&mut io, DETECT_TIMEOUT).await else {
        return;
    };
    let io = PrefixedIo::new(prefix, io);
    let version = match (detected, target.clone()) {
        (Detected::Http1, _) => HttpVersion::Http1,
        (Detected::Http2, _) => HttpVersion::Http2,
        (Detected::Opaque, Some(target)) => return opaque(ctx, io, target).await,
        (Detected::Opaque, None) => {
            tracing::debug!("non-HTTP bytes on the explicit proxy listener; closing");
            return;
        }
    };
    let handler_drain = drain.clone();
    serve_http(
        io,
        version,
        move |req| {
            let ctx = ctx.clone();
            let target = target.clone();
            let drain = handler_drain.clone();
            async move { handle(ctx, req, target, drain).await }
        },
        drain,
    )
    .await;
}

enum Route {
    Service(
        Arc<Logical>,
        Arc<crate::policy::Endpoints>,
        Option<Arc<crate::policy::ClientPolicy>>,
    ),
    Passthrough(SocketAddr),
    Error(Response<Body>),
}

async fn route(ctx: &Outbound, target: &Target) -> Route {
    if let Some(name) = &target.name {
        let logical = ctx.logical(name);
        match logical.resolve().await {
            Ok(Resolution::Service { endpoints, policy }) => {
                return Route::Service(logical, endpoints, policy);
            }
            Ok(Resolution::Unknown) => {}
            Err(e) => {
                return Route::Error(proxy_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ProxyError::DiscoveryTimeout,
                    &e.to_string(),
                ));
            }
        }
    }
    if ctx.config.outbound.unknown_hosts == UnknownHosts::Reject {
        return Route::Error(proxy_response(
            StatusCode::BAD_GATEWAY,
            ProxyError::UnknownHost,
            &format!("{} is not a mesh service", target.authority),
        ));
    }
    let host_port = format!(
        "{}:{}",
        target.authority.host(),
        target.authority.port_u16().unwrap_or(80)
    );
    match tokio::net::lookup_host(host_port.as_str())
        .await
        .ok()
        .and_then(|mut a| a.next())
    {
        Some(addr) => Route::Passthrough(addr),
        None => Route::Error(proxy_response(
            StatusCode::BAD_GATEWAY,
            ProxyError::UnknownHost,
            &format!("cannot resolve {host_port}"),
        )),
    }
}

/// Handles one request from the app.
async fn handle(
    ctx: Arc<Outbound>,
    req: Request<Incoming>,
    fixed: Option<Target>,
    drain: watch::Receiver<bool>,
) -> Response<Body> {
    let start = Instant::now();
    let namespace = ctx.config.workload.namespace.as_str();
    if req.method() == Method::CONNECT {
        return connect(ctx, req, drain).await;
    }
    if req
        .uri()
        .scheme()
        .is_some_and(|s| *s != http::uri::Scheme::HTTP)
    {
        return proxy_response(
            StatusCode::BAD_REQUEST,
            ProxyError::BadRequest,
            "only http:// URIs can be proxied; use CONNECT for TLS",
        );
    }
    // The authority the request names (absolute form, `:authority` or `Host`) is what the app
    // sees; the target (a fixed listener's or the CONNECT's) only routes, and may differ by the
    // port, e.g. `echo.shop:80` vs `echo.shop`.
    let named: Option<http::uri::Authority> = req.uri().authority().cloned().or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse().ok())
    });
    let target = fixed.or_else(|| {
        named
            .as_ref()
            .and_then(|a| Target::parse(a.as_str(), namespace))
    });
    let Some(target) = target else {
        return proxy_response(
            StatusCode::BAD_REQUEST,
            ProxyError::BadRequest,
            "the request names no valid host",
        );
    };
    let authority = named.unwrap_or_else(|| target.authority.clone());
    let mut req = crate::http::from_downstream(req);
    // The client span of this call, under the context the app sent (if any).
    let span = ctx.tracing.start(
        opentelemetry::trace::SpanKind::Client,
        || format!("{} {}", req.method(), target.authority),
        || crate::trace::extract(req.headers()),
        || crate::trace::request_attributes(&req, Some(target.authority.as_str())),
    );
    if let Some(cx) = &span {
        req.extensions_mut()
            .insert(crate::trace::TraceCx(cx.clone()));
    }
    // Decisions are collected when the caller asked (`ferrymesh-explain: 1`), for the log, or
    // for the span's events.
    let logged = ctx
        .config
        .access_log
        .is_some_and(crate::access_log::sampled);
    let recorded = logged
        || ctx.tap.active()
        || crate::access_log::trace_id(req.headers()).is_some()
        || span.as_ref().is_some_and(crate::trace::recording);
    let explain = crate::explain::Explain::from_request(req.headers_mut())
        .or_else(|| recorded.then(crate::explain::Explain::silent));
    if let Some(e) = &explain {
        req.extensions_mut().insert(e.clone());
    }
    let head = recorded.then(|| {
        (
            req.method().clone(),
            authority.clone(),
            req.uri().path().to_owned(),
            crate::access_log::trace_id(req.headers()).map(str::to_owned),
            std::time::SystemTime::now(),
        )
    });
    let (rsp, requests) = forward(&ctx, &target, authority, req).await;
    requests.record(rsp.status(), start.elapsed());
    let service = requests.service();
    if let Some(cx) = &span {
        use opentelemetry::trace::TraceContextExt as _;
        cx.span().set_attribute(opentelemetry::KeyValue::new(
            "ferrymesh.service",
            service.to_owned(),
        ));
        let error = ProxyError::of(&rsp).map(ProxyError::label);
        let notes = explain
            .as_ref()
            .map(crate::explain::Explain::notes)
            .unwrap_or_default();
        crate::trace::finish(cx, rsp.status(), error, &notes);
    }
    if let Some(head) = head {
        let entry = (explain.as_ref(), service, &rsp, start.elapsed());
        log(&ctx, logged, head, entry);
    }
    rsp
}

/// Sends a request on its way: to a mesh service (through routes and its resilience stack),
/// through to an unknown host, or the proxy's own answer. Returns the request metrics of the
/// service it went to (which also name it).
async fn forward(
    ctx: &Arc<Outbound>,
    target: &Target,
    authority: http::uri::Authority,
    req: Request<Body>,
) -> (Response<Body>, RequestHandles) {
    let ctx = ctx.clone();
    match route(&ctx, target).await {
        Route::Service(logical, endpoints, policy) => {
            // Most services have no routes: no copy of the request head for them.
            let routed = if policy.as_ref().is_some_and(|p| !p.routes.is_empty()) {
                let service = endpoints.service.clone();
                routing::route(&ctx, logical.clone(), service, policy, &req).await
            } else {
                let rsp = concrete::call(
                    ctx.clone(),
                    logical.clone(),
                    authority,
                    req,
                    policy,
                    &endpoints.service,
                )
                .await;
                return (
                    rsp,
                    logical.request_metrics(&ctx.metrics, &endpoints.service),
                );
            };
            match routed {
                routing::Routed::Call {
                    logical,
                    policy,
                    service,
                } => {
                    let rsp = concrete::call(
                        ctx.clone(),
                        logical.clone(),
                        authority,
                        req,
                        policy,
                        &service,
                    )
                    .await;
                    (rsp, logical.request_metrics(&ctx.metrics, &service))
                }
                routing::Routed::Answer(rsp) => (
                    rsp,
                    logical.request_metrics(&ctx.metrics, &endpoints.service),
                ),
            }
        }
        Route::Passthrough(addr) => {
            let timeouts = CallTimeouts {
                request: Some(ctx.config.outbound.default_request_timeout),
                connect: ctx.config.outbound.connect_timeout,
                idle: crate::pool::DEFAULT_IDLE,
            };
            // One attempt, traced and noted like a mesh call's (the next hop joins the trace
            // under it; the access log names the upstream).
            let mut req = req;
            let span = concrete::attempt_span(&ctx, &mut req, 1, addr);
            let explain = req.extensions().get::<crate::explain::Explain>().cloned();
            let started = tokio::time::Instant::now();
            let rsp = crate::client::send(&ctx.pool, addr, &authority, req, timeouts, None).await;
            let attempt = (1, addr, started.elapsed());
            concrete::finish_attempt(span.as_ref(), explain.as_ref(), attempt, &rsp);
            (rsp, ctx.passthrough_metrics())
        }
        Route::Error(rsp) => (rsp, ctx.passthrough_metrics()),
    }
}

/// What the access log keeps of a request's head.
type LogHead = (
    Method,
    http::uri::Authority,
    String,
    Option<String>,
    std::time::SystemTime,
);

/// Writes the access-log line of an outbound request (and to the tap's listeners).
fn log(
    ctx: &Outbound,
    logged: bool,
    (method, authority, path, trace, at): LogHead,
    (explain, service, rsp, elapsed): (
        Option<&crate::explain::Explain>,
        &str,
        &Response<Body>,
        std::time::Duration,
    ),
) {
    let decisions = explain
        .map(crate::explain::Explain::notes)
        .unwrap_or_default();
    let (upstream, attempts) = crate::access_log::attempts(&decisions);
    let entry = crate::access_log::Entry {
        start_ms: crate::access_log::unix_ms(at),
        direction: "outbound",
        service,
        method: method.as_str(),
        authority: authority.as_str(),
        path: &path,
        status: rsp.status().as_u16(),
        duration_ms: crate::access_log::ms(elapsed),
        error: ProxyError::of(rsp).map(ProxyError::label),
        upstream,
        attempts,
        decisions,
        trace_id: trace.as_deref(),
        peer: None,
    };
    crate::access_log::emit(&entry, logged, &ctx.tap);
}
