//! Serving accepted connections: HTTP/1.1 (with upgrades, for CONNECT) or HTTP/2 with hardened
//! limits, each connection tracked so that a drain can close idle ones, let in-flight requests
//! finish, and wait for them with a deadline.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::http::Body;

/// How long a client may take to send request headers (slowloris defence).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Which HTTP version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 prior knowledge.
    Http2,
}

/// Serves HTTP on `io` with `handler` until the connection ends; on drain, finishes in-flight
/// requests and closes (HTTP/1.1: after the current response; HTTP/2: GOAWAY).
pub async fn serve_http<I, H, F>(
    io: I,
    version: HttpVersion,
    handler: H,
    drain: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        async move {
            let mut rsp = match refuse_bad_host(&req) {
                Some(rsp) => rsp,
                None => handler(req).await,
            };
            // The edge: the proxy's own error is written as `ferrymesh-error` here, once.
            crate::error::write_header(&mut rsp);
            Ok::<_, Infallible>(rsp)
        }
    });
    let result = match version {
        HttpVersion::Http1 => {
            let io = TokioIo::new(io);
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(io, service)
                .with_upgrades();
            until_drain(conn, drain, http1::UpgradeableConnection::graceful_shutdown).await
        }
        HttpVersion::Http2 => {
            // Control-frame floods (PING, SETTINGS, PRIORITY, empty frames) end the connection
            // with GOAWAY(ENHANCE_YOUR_CALM).
            let io = TokioIo::new(crate::flood::FloodGuard::new(
                io,
                crate::flood::Limits::default(),
            ));
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // NOTE: set both explicitly (Rapid Reset, MadeYouReset): bounded resets per
                // connection before it is closed with GOAWAY.
                .max_pending_accept_reset_streams(Some(20))
                .max_local_error_reset_streams(Some(1024))
                .max_concurrent_streams(1024)
                .serve_connection(io, service);
            until_drain(conn, drain, http2::Connection::graceful_shutdown).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP server connection ended with an error");
    }
}

/// RFC 9112 section 3.2: an HTTP/1.1 request with no `Host`, or with more than one, is answered
/// 400 (a proxy that picked one of two would route differently from the next hop).
fn refuse_bad_host(req: &Request<Incoming>) -> Option<Response<Body>> {
    if req.version() != http::Version::HTTP_11 {
        return None;
    }
    let hosts = req.headers().get_all(http::header::HOST).iter().count();
    (hosts != 1).then(|| {
        crate::http::proxy_response(
            http::StatusCode::BAD_REQUEST,
            crate::http::ProxyError::BadRequest,
            if hosts == 0 {
                "an HTTP/1.1 request needs a Host header"
            } else {
                "more than one Host header"
            },
        )
    })
}

/// Drives `conn` to its end; on drain, asks it to finish gracefully first (`graceful` is the
/// connection type's own `graceful_shutdown`).
async fn until_drain<C, T, E>(
    conn: C,
    mut drain: watch::Receiver<bool>,
    graceful: fn(Pin<&mut C>),
) -> Result<T, E>
where
    C: Future<Output = Result<T, E>>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = async { let _ = drain.wait_for(|d| *d).await; } => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}
