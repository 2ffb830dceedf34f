//! One request to one address over the shared pool: the innermost call of every path (routed
//! attempts, the inbound hop to the app, health checks, the app's probes, readiness). It knows
//! nothing of services, policies or listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferrymesh_resilience::timeout::{TimeoutError, TimeoutLayer};
use http::{Request, Response, StatusCode, Uri};
use tower::{Layer as _, ServiceExt as _};

use crate::http::{Body, boxed, proxy_response, strip_hop_by_hop};
use crate::pool::{ConnTimeouts, Pool, PoolError, Tls, Version};

/// Timeouts in force for one call.
#[derive(Debug, Clone, Copy)]
pub struct CallTimeouts {
    /// Until response headers; `None`: none.
    pub request: Option<Duration>,
    /// TCP connect.
    pub connect: Duration,
    /// Pooled connections unused for this long are closed.
    pub idle: Duration,
}

/// A meshed peer: TLS with our identity, and the SPIFFE id it must present.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Our identity.
    pub identity: Arc<crate::identity::Identity>,
    /// The peer's expected SPIFFE id.
    pub expected: Arc<str>,
}

/// Sends `req` to `addr` keeping `authority` as the request's authority; over mTLS when `peer`
/// is set (never in plaintext then).
pub async fn send(
    pool: &Pool,
    addr: SocketAddr,
    authority: &http::uri::Authority,
    req: Request<Body>,
    timeouts: CallTimeouts,
    peer: Option<&Peer>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let version = if parts.version == http::Version::HTTP_2 {
        Version::Http2
    } else {
        Version::Http1
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str)
        .to_owned();
    parts.uri = match version {
        Version::Http1 => {
            if !parts.headers.contains_key(http::header::HOST)
                && let Ok(v) = http::HeaderValue::from_str(authority.as_str())
            {
                parts.headers.insert(http::header::HOST, v);
            }
            Uri::builder().path_and_query(path).build()
        }
        Version::Http2 => Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query(path)
            .build(),
    }
    .expect("a path and an authority taken from a valid URI form a valid URI");
    let req = Request::from_parts(parts, body);
    // The request timeout covers connecting and waiting for response headers.
    let endpoint = Endpoint {
        pool,
        addr,
        version,
        conn: ConnTimeouts {
            connect: timeouts.connect,
            idle: timeouts.idle,
        },
        tls: peer.map(|p| Tls {
            config: p
                .identity
                .client_config(&p.expected, version == Version::Http2),
            identity: p.expected.clone(),
            own_not_after: p.identity.held().map(|h| h.not_after),
        }),
    };
    // NOTE: boxed with a concrete lifetime: rustc cannot prove `Send` for the tower future
    // over the body's `dyn Error` for every lifetime otherwise (a known higher-ranked limit).
    let client_fault = req
        .extensions()
        .get::<crate::http::ClientFault>()
        .cloned()
        .unwrap_or_default();
    let call: std::pin::Pin<Box<dyn Future<Output = _> + Send + '_>> = Box::pin(
        TimeoutLayer::new(timeouts.request)
            .layer(endpoint)
            .oneshot(req),
    );
    let result = call.await;
    match result {
        Ok(rsp) => {
            let (mut parts, body) = rsp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let mut rsp = Response::from_parts(parts, boxed(body));
            crate::error::from_upstream(&mut rsp);
            rsp
        }
        Err(TimeoutError::Elapsed(t)) => proxy_response(
            StatusCode::GATEWAY_TIMEOUT,
            crate::http::ProxyError::Timeout,
            &format!("no response within {t:?}"),
        ),
        Err(TimeoutError::Inner(
            e @ (PoolError::Connect { .. } | PoolError::ConnectTimeout { .. }),
        )) => proxy_response(
            StatusCode::BAD_GATEWAY,
            crate::http::ProxyError::ConnectFailed,
            &e.to_string(),
        ),
        Err(TimeoutError::Inner(e @ PoolError::Tls { .. })) => {
            // NOTE: a refused handshake is a failure to connect (retried as one), never a
            // reason to try plaintext.
            proxy_response(
                StatusCode::BAD_GATEWAY,
                crate::http::ProxyError::ConnectFailed,
                &e.to_string(),
            )
        }
        Err(TimeoutError::Inner(e @ PoolError::Http { .. })) if client_fault.is_set() => {
            // The caller's body broke off (aborted upload, bad framing): its fault, answered
            // as one, and no failure of the upstream's (breaker, outlier detection, retries).
            proxy_response(
                StatusCode::BAD_REQUEST,
                crate::http::ProxyError::ClientAborted,
                &format!("the request body failed: {e}"),
            )
        }
        Err(TimeoutError::Inner(e @ PoolError::Http { .. })) => proxy_response(
            StatusCode::BAD_GATEWAY,
            crate::http::ProxyError::UpstreamReset,
            &e.to_string(),
        ),
    }
}

/// One HTTP exchange with one address, as a tower service (the innermost layer of a call).
struct Endpoint<'a> {
    pool: &'a Pool,
    addr: SocketAddr,
    version: Version,
    conn: ConnTimeouts,
    tls: Option<Tls>,
}

impl<'a> tower::Service<Request<Body>> for Endpoint<'a> {
    type Response = Response<hyper::body::Incoming>;
    type Error = PoolError;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, PoolError>> + Send + 'a>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), PoolError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (pool, addr, version, conn) = (self.pool, self.addr, self.version, self.conn);
        let tls = self.tls.clone();
        Box::pin(async move { pool.send(addr, version, req, conn, tls).await })
    }
}

/// A gRPC health check (`grpc.health.v1.Health/Check`): true when `service` is SERVING.
pub async fn grpc_serving(addr: SocketAddr, service: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return false;
    };
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let req = tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    };
    client.check(req).await.is_ok_and(|r| {
        r.into_inner().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    })
}
