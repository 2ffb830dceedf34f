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

use crate::app::Context;
use crate::config::{Inbound, InboundProtocol};
use crate::detect::{Detected, PrefixedIo, sniff};
use crate::discovery::{State, Value};
use crate::fault;
use crate::http::{Body, boxed};
use crate::metrics::Direction;
use crate::outbound::logical::{CallTimeouts, send};
use crate::server::{HttpVersion, serve_http};

/// Protocol detection timeout (Linkerd's default): past it, the connection is opaque.
const DETECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Handles one accepted inbound connection.
pub async fn serve<I>(ctx: Arc<Context>, inbound: Arc<Inbound>, io: I, drain: watch::Receiver<bool>)
where
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
            async move { handle(&ctx, &inbound, req).await }
        },
        drain,
    )
    .await;
}

async fn opaque<I: AsyncRead + AsyncWrite + Unpin>(ctx: &Context, inbound: &Inbound, mut io: I) {
    ctx.metrics
        .tcp_connection(Direction::inbound, &ctx.service_label);
    match crate::pool::connect(inbound.app, inbound.connect_timeout).await {
        Ok(mut app) => {
            let _ = tokio::io::copy_bidirectional(&mut io, app.inner_mut()).await;
        }
        Err(e) => tracing::info!(error = %e, "opaque inbound connection: app unavailable"),
    }
}

async fn handle(ctx: &Context, inbound: &Inbound, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
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
        ctx.metrics.request(
            Direction::inbound,
            &ctx.service_label,
            rsp.status(),
            start.elapsed(),
        );
        return rsp;
    }
    let timeouts = CallTimeouts {
        request: None,
        connect: inbound.connect_timeout,
        idle: crate::pool::DEFAULT_IDLE,
    };
    let rsp = send(&ctx.pool, inbound.app, &authority, req.map(boxed), timeouts).await;
    ctx.metrics.request(
        Direction::inbound,
        &ctx.service_label,
        rsp.status(),
        start.elapsed(),
    );
    rsp
}
