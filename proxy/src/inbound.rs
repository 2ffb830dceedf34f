//! The inbound side: connections from peers' outbound proxies (or any client) to the app on
//! loopback. HTTP/1.1 and HTTP/2 are detected and forwarded request by request with the same
//! version; anything else (or every connection, for an opaque port) is forwarded as bytes.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::access_log::Tap;
use crate::client::{CallTimeouts, send};
use crate::config::{Config, Inbound, InboundProtocol};
use crate::detect::{Detected, PrefixedIo, sniff};
use crate::discovery::{State, Value};
use crate::fault;
use crate::http::{Body, ProxyError};
use crate::identity::Identity;
use crate::metrics::{Direction, Metrics, RequestHandles};
use crate::policy::MtlsMode;
use crate::pool::Pool;
use crate::server::{HttpVersion, serve_http};
use crate::trace::Tracing;

/// Protocol detection timeout (Linkerd's default): past it, the connection is opaque.
const DETECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection waits for the port's first inbound policy.
const POLICY_WAIT: Duration = Duration::from_secs(10);

/// The header that tells the app who called: set by this proxy only (from the peer's
/// certificate), removed from whatever arrives.
pub static PEER_IDENTITY: http::HeaderName =
    http::HeaderName::from_static("x-ferrymesh-peer-identity");

/// `X-Forwarded-Client-Cert` (Envoy's format, `By=<this workload>;URI=<the caller>`): set from
/// the verified peer certificate only; a caller's own copy never reaches the app.
pub static FORWARDED_CLIENT_CERT: http::HeaderName =
    http::HeaderName::from_static("x-forwarded-client-cert");

/// What every inbound connection shares: the port's policy, the identity it is served with,
/// metrics, spans and the pool of connections to the app.
#[derive(Debug)]
pub struct Shared {
    /// The bootstrap config (trust domain, access log).
    pub config: Arc<Config>,
    /// This workload's inbound policy (mTLS mode, authorization, server-side faults).
    pub inbound_policy: watch::Receiver<State>,
    /// The workload identity (mTLS), when on.
    pub identity: Option<Arc<Identity>>,
    /// This workload's service, `namespace/name` (metrics label of inbound traffic).
    pub service_label: String,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The request metrics of inbound traffic (resolved once).
    pub inbound_requests: RequestHandles,
    /// Spans, when the controller names a collector.
    pub tracing: Arc<Tracing>,
    /// Live listeners to the requests (`/tap`).
    pub tap: Arc<Tap>,
    /// Connections to the app.
    pub pool: Arc<Pool>,
}

/// Handles one accepted inbound connection: with identity on, mTLS (detected on the first
/// bytes) or, on a Permissive port only, plaintext.
pub async fn serve<I>(
    ctx: Arc<Shared>,
    inbound: Arc<Inbound>,
    io: I,
    drain: watch::Receiver<bool>,
    addr: Option<std::net::SocketAddr>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The port's policy (mTLS mode, authorization, faults) decides everything below: until
    // the controller has answered, a connection waits for it, and is closed if it does not
    // come in time (fail closed, never served without its policy).
    let mut policy = ctx.inbound_policy.clone();
    let known = tokio::time::timeout(POLICY_WAIT, policy.wait_for(State::is_known))
        .await
        .is_ok_and(|r| r.is_ok());
    if !known {
        ctx.metrics.tls_refused("no-policy");
        tracing::warn!("inbound connection closed: no inbound policy from the controller yet");
        return;
    }
    let caller = Caller {
        peer: None,
        addr: addr.map(|a| a.ip()),
    };
    let Some(identity) = ctx.identity.clone() else {
        return serve_plain(ctx, inbound, io, drain, caller).await;
    };
    let mut io = io;
    let Ok((tls, prefix)) = crate::detect::tls(&mut io, DETECT_TIMEOUT).await else {
        return;
    };
    let io = PrefixedIo::new(prefix, io);
    if !tls {
        if mtls_mode(&ctx) == MtlsMode::Strict {
            ctx.metrics.tls_refused("plaintext");
            tracing::debug!("plaintext connection to a Strict port closed");
            return;
        }
        return serve_plain(ctx, inbound, io, drain, caller).await;
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config());
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(stream)) => {
            ctx.metrics.tls_handshake("ok");
            stream
        }
        Ok(Err(e)) => {
            ctx.metrics.tls_handshake("failed");
            ctx.metrics.tls_refused("handshake");
            tracing::info!(error = %e, "mTLS handshake refused");
            return;
        }
        Err(_) => {
            ctx.metrics.tls_handshake("timeout");
            ctx.metrics.tls_refused("timeout");
            return;
        }
    };
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| crate::identity::spiffe_ids(leaf).into_iter().next())
        .map(Arc::<str>::from);
    serve_plain(ctx, inbound, stream, drain, Caller { peer, ..caller }).await;
}

/// Who is calling: the verified SPIFFE id (mTLS) and the address.
#[derive(Debug, Clone)]
struct Caller {
    peer: Option<Arc<str>>,
    addr: Option<std::net::IpAddr>,
}

/// Normalises the path (the app gets the normalised one) and applies the workload's
/// authorization; the proxy's own 400 or 403 when the request may not pass.
#[allow(clippy::result_large_err)] // the error is the response itself, returned at once
fn authorize(
    ctx: &Shared,
    inbound: &Inbound,
    req: &mut Request<Incoming>,
    caller: &Caller,
) -> Result<&'static str, Response<Body>> {
    let path = match crate::authz::normalize(req.uri().path()) {
        Ok(p) => p,
        Err(why) => {
            ctx.metrics.authz("deny", "bad-path");
            return Err(crate::http::proxy_response(
                http::StatusCode::BAD_REQUEST,
                ProxyError::BadRequest,
                &format!("the path cannot be normalised safely: {why:?}"),
            ));
        }
    };
    if path != req.uri().path() {
        let pq = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = pq.parse().ok();
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    let policy = match &*ctx.inbound_policy.borrow() {
        State::Found(held) => match &held.value {
            Value::InboundPolicy(p) => Some(p.clone()),
            _ => None,
        },
        _ => None,
    };
    let (deny, allow, default) = policy.as_ref().map_or(
        (&[][..], &[][..], crate::authz::DefaultInbound::default()),
        |p| (&p.deny[..], &p.allow[..], p.default_policy),
    );
    let default = inbound.default_policy.unwrap_or(default);
    let trust_domain = ctx
        .config
        .identity
        .as_ref()
        .map_or("cluster.local", |i| i.trust_domain.as_str());
    let decision = crate::authz::decide(
        deny,
        allow,
        default,
        trust_domain,
        &crate::authz::Request {
            peer: caller.peer.as_deref(),
            addr: caller.addr,
            method: req.method(),
            path: &path,
        },
    );
    match decision {
        crate::authz::Decision::Allow(why) => {
            ctx.metrics.authz("allow", why);
            Ok(why)
        }
        crate::authz::Decision::Deny(why) => {
            ctx.metrics.authz("deny", "policy");
            tracing::debug!(reason = %why, peer = ?caller.peer, "request forbidden");
            Err(crate::http::proxy_response(
                http::StatusCode::FORBIDDEN,
                ProxyError::Forbidden,
                &why,
            ))
        }
    }
}

fn mtls_mode(ctx: &Shared) -> MtlsMode {
    match &*ctx.inbound_policy.borrow() {
        State::Found(held) => match &held.value {
            Value::InboundPolicy(p) => p.mtls,
            _ => MtlsMode::default(),
        },
        _ => MtlsMode::default(),
    }
}

/// Serves a connection's bytes (plaintext, or what TLS decrypted) for `peer`.
async fn serve_plain<I>(
    ctx: Arc<Shared>,
    inbound: Arc<Inbound>,
    io: I,
    drain: watch::Receiver<bool>,
    caller: Caller,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut io = io;
    let detected = match inbound.protocol {
        InboundProtocol::Opaque => (Detected::Opaque, bytes::Bytes::new()),
        InboundProtocol::Http => match sniff(&mut io, DETECT_TIMEOUT).await {
            Ok(d) => d,
            Err(_) => return,
        },
    };
    let io = PrefixedIo::new(detected.1, io);
    let version = match detected.0 {
        Detected::Http1 => HttpVersion::Http1,
        Detected::Http2 => HttpVersion::Http2,
        Detected::Opaque => return opaque(&ctx, &inbound, io).await,
    };
    serve_http(
        io,
        version,
        move |req| {
            let ctx = ctx.clone();
            let inbound = inbound.clone();
            let caller = caller.clone();
            async move { handle(&ctx, &inbound, req, &caller).await }
        },
        drain,
    )
    .await;
}

async fn opaque<I: AsyncRead + AsyncWrite + Unpin>(ctx: &Shared, inbound: &Inbound, mut io: I) {
    ctx.metrics
        .tcp_connection(Direction::inbound, &ctx.service_label);
    match crate::pool::connect(inbound.app, inbound.connect_timeout).await {
        Ok(mut app) => {
            let _ = tokio::io::copy_bidirectional(&mut io, app.inner_mut()).await;
        }
        Err(e) => tracing::info!(error = %e, "opaque inbound connection: app unavailable"),
    }
}

/// Answers one request (counted, and logged when the access log samples it).
async fn handle(
    ctx: &Shared,
    inbound: &Inbound,
    req: Request<Incoming>,
    caller: &Caller,
) -> Response<Body> {
    let start = Instant::now();
    let logged = ctx
        .config
        .access_log
        .is_some_and(crate::access_log::sampled);
    let traced = crate::access_log::trace_id(req.headers()).is_some();
    let head = (logged || traced || ctx.tap.active()).then(|| {
        let authority = req
            .uri()
            .authority()
            .map(ToString::to_string)
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        (
            req.method().clone(),
            authority,
            crate::authz::normalize(req.uri().path())
                .unwrap_or_else(|_| req.uri().path().to_owned()),
            crate::access_log::trace_id(req.headers()).map(str::to_owned),
            std::time::SystemTime::now(),
        )
    });
    // The server span, under the caller's attempt span (or whatever context the client sent).
    let span = ctx.tracing.start(
        opentelemetry::trace::SpanKind::Server,
        || format!("{} {}", req.method(), req.uri().path()),
        || crate::trace::extract(req.headers()),
        || {
            let mut attrs = crate::trace::request_attributes(&req, None);
            if let Some(peer) = &caller.peer {
                attrs.push(opentelemetry::KeyValue::new(
                    "ferrymesh.peer.identity",
                    peer.clone(),
                ));
            }
            if let Some(addr) = caller.addr {
                attrs.push(opentelemetry::KeyValue::new(
                    "client.address",
                    addr.to_string(),
                ));
            }
            attrs
        },
    );
    let mut decisions = Vec::new();
    let rsp = respond(ctx, inbound, req, caller, span.as_ref(), &mut decisions).await;
    if let Some(cx) = &span {
        let error = ProxyError::of(&rsp).map(ProxyError::label);
        crate::trace::finish(cx, rsp.status(), error, &decisions);
    }
    ctx.inbound_requests.record(rsp.status(), start.elapsed());
    if let Some((method, authority, path, trace, at)) = head {
        let entry = crate::access_log::Entry {
            start_ms: crate::access_log::unix_ms(at),
            direction: "inbound",
            service: &ctx.service_label,
            method: method.as_str(),
            authority: &authority,
            path: &path,
            status: rsp.status().as_u16(),
            duration_ms: crate::access_log::ms(start.elapsed()),
            error: ProxyError::of(&rsp).map(ProxyError::label),
            upstream: Some(inbound.app.to_string()),
            attempts: 1,
            decisions: Vec::new(),
            trace_id: trace.as_deref(),
            peer: caller.peer.as_deref(),
        };
        crate::access_log::emit(&entry, logged, &ctx.tap);
    }
    rsp
}

async fn respond(
    ctx: &Shared,
    inbound: &Inbound,
    mut req: Request<Incoming>,
    caller: &Caller,
    span: Option<&opentelemetry::Context>,
    decisions: &mut Vec<String>,
) -> Response<Body> {
    // Identity headers are ours to set: whatever the caller sent is dropped (Envoy's
    // SANITIZE_SET for X-Forwarded-Client-Cert), then set from the verified peer certificate.
    req.headers_mut().remove(&PEER_IDENTITY);
    req.headers_mut().remove(&FORWARDED_CLIENT_CERT);
    if let Some(peer) = &caller.peer
        && let Ok(v) = http::HeaderValue::from_str(peer)
    {
        req.headers_mut().insert(&PEER_IDENTITY, v);
        let by = ctx
            .identity
            .as_ref()
            .map(|i| format!("By={};", i.spiffe()))
            .unwrap_or_default();
        if let Ok(v) = http::HeaderValue::from_str(&format!("{by}URI={peer}")) {
            req.headers_mut().insert(&FORWARDED_CLIENT_CERT, v);
        }
    }
    match authorize(ctx, inbound, &mut req, caller) {
        Ok(why) => {
            if span.is_some() {
                decisions.push(format!("authorization allowed ({why})"));
            }
        }
        Err(rsp) => {
            if span.is_some() {
                decisions.push(format!(
                    "authorization denied ({})",
                    ProxyError::of(&rsp).map_or("forbidden", ProxyError::label)
                ));
            }
            return rsp;
        }
    }
    let authority = req
        .uri()
        .authority()
        .cloned()
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse().ok())
        })
        .unwrap_or_else(|| http::uri::Authority::from_static("localhost"));
    let held = match &*ctx.inbound_policy.borrow() {
        State::Found(held) if held.fresh() => Some(held.clone()),
        _ => None,
    };
    if let Some(held) = held
        && let Value::InboundPolicy(policy) = &held.value
        && !policy.faults.is_empty()
        && let Some(rsp) = fault::inject(
            &policy.faults,
            req.headers(),
            &ctx.metrics,
            Direction::inbound,
            &ctx.service_label,
        )
        .await
    {
        if span.is_some() {
            decisions.push(format!("fault injected: {}", rsp.status().as_u16()));
        }
        return rsp;
    }
    // The app's own calls become children of this server span.
    if let Some(cx) = span {
        crate::trace::inject(cx, req.headers_mut());
    }
    let timeouts = CallTimeouts {
        request: None,
        connect: inbound.connect_timeout,
        idle: crate::pool::DEFAULT_IDLE,
    };
    // An HTTP/2 request (not gRPC, which needs HTTP/2) for an app that speaks HTTP/1.1 only
    // is sent to it as HTTP/1.1, as Linkerd downgrades.
    if req.version() == http::Version::HTTP_2
        && !is_grpc(req.headers())
        && !ctx.pool.speaks_h2(inbound.app).await
    {
        downgrade(&mut req, &authority);
        if span.is_some() {
            decisions.push("HTTP/2 downgraded to HTTP/1.1 for the app".to_owned());
        }
    }
    send(
        &ctx.pool,
        inbound.app,
        &authority,
        crate::http::from_downstream(req),
        timeouts,
        None,
    )
    .await
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Makes an HTTP/2 request an HTTP/1.1 one: `:authority` becomes `Host`.
fn downgrade<B>(req: &mut Request<B>, authority: &http::uri::Authority) {
    *req.version_mut() = http::Version::HTTP_11;
    if !req.headers().contains_key(http::header::HOST)
        && let Ok(v) = http::HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(http::header::HOST, v);
    }
}
