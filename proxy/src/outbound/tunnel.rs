//! Byte streams: opaque connections (forwarded with no protocol detection) and `CONNECT`
//! tunnels (inside which HTTP is detected again).

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::{Outbound, PASSTHROUGH, Route, Target, route, serve_detected};
use crate::http::{Body, ProxyError, empty, proxy_response};
use crate::metrics::Direction;

/// Forwards an opaque connection to an endpoint of `target` (or passes it through), with no
/// protocol detection: for server-speaks-first protocols on opaque ports.
pub async fn serve_opaque<I>(ctx: Arc<Outbound>, io: I, target: Target)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    opaque(ctx, io, target).await;
}

/// Forwards an opaque connection to an endpoint of `target` (or passes it through).
pub(super) async fn opaque<I>(ctx: Arc<Outbound>, mut io: I, target: Target)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (addr, service, expected) = match route(&ctx, &target).await {
        Route::Service(logical, endpoints, _) => {
            let Some(pick) = logical.balancer.pick() else {
                tracing::info!(target = %target.authority, "opaque connection: no endpoints");
                return;
            };
            let e = pick.endpoint();
            (e.addr, endpoints.service.clone(), e.identity.clone())
        }
        Route::Passthrough(addr) => (addr, PASSTHROUGH.to_owned(), None),
        Route::Error(rsp) => {
            tracing::info!(target = %target.authority, status = %rsp.status(), "opaque connection refused");
            return;
        }
    };
    ctx.metrics.tcp_connection(Direction::outbound, &service);
    // A meshed endpoint gets the bytes over mTLS too, never in plaintext.
    let tls = ctx
        .identity
        .as_ref()
        .zip(expected)
        .map(|(identity, expected)| crate::pool::Tls {
            config: identity.client_config(&expected, false),
            identity: expected,
            own_not_after: identity.held().map(|h| h.not_after),
        });
    let upstream = crate::pool::connect_tls(
        addr,
        ctx.config.outbound.connect_timeout,
        tls.as_ref(),
        &ctx.pool.handshakes,
    )
    .await;
    let Ok((mut upstream, _)) = upstream else {
        tracing::info!(%addr, "opaque connection: connect failed");
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut io, upstream.inner_mut()).await;
}

/// `CONNECT host:port`: decides the route first (so an unknown host can still get a 502), then
/// answers 200 and serves the tunnel.
pub(super) async fn connect(
    ctx: Arc<Outbound>,
    req: Request<Incoming>,
    drain: watch::Receiver<bool>,
) -> Response<Body> {
    let namespace = ctx.config.workload.namespace.as_str();
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| Target::parse(a.as_str(), namespace))
    else {
        return proxy_response(
            StatusCode::BAD_REQUEST,
            ProxyError::BadRequest,
            "CONNECT needs host:port",
        );
    };
    if let Route::Error(rsp) = route(&ctx, &target).await {
        return rsp;
    }
    tokio::spawn(tunnel(ctx, req, target, drain));
    Response::new(empty())
}

/// The tunnel behind an answered CONNECT.
// NOTE: a named boxed future breaks the type cycle serve_detected -> handle -> connect -> tunnel.
fn tunnel(
    ctx: Arc<Outbound>,
    req: Request<Incoming>,
    target: Target,
    drain: watch::Receiver<bool>,
) -> futures::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => serve_detected(ctx, TokioIo::new(upgraded), Some(target), drain).await,
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    })
}
