//! One attempt of a call: the breaker (and bulkhead), a balanced endpoint that earlier attempts
//! did not use, the per-try timeout, and the outcome fed back to the breaker, outlier detection,
//! the balancer, the attempt's span and `ferrymesh-explain`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use ferrymesh_resilience::breaker::{self, BreakerError};
use ferrymesh_resilience::outlier::{Outcome, Outlier};
use ferrymesh_resilience::replay::ReplayBody;
use ferrymesh_resilience::retry::{Attempt, Deadline};
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use tokio::time::Instant;

use super::super::logical::Logical;
use super::stack::Stack;
use crate::balance::{Lb, hash_key};
use crate::client::{Peer, send};
use crate::deadline;
use crate::explain::Explain;
use crate::http::{Body, ProxyError, boxed, proxy_response};
use crate::outbound::Outbound;
use crate::policy::LoadBalancer;

/// How long a call waits for the proxy's first certificate before trying without.
const FIRST_CERTIFICATE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// One attempt: the policy's stack, the target and the authority the request names.
#[derive(Clone)]
pub(super) struct Attempter {
    pub(super) stack: Arc<Stack>,
    pub(super) logical: Arc<Logical>,
    pub(super) authority: Authority,
}

impl Attempter {
    /// Asks the breaker and bulkhead; the fail-fast answer when they say no.
    #[allow(clippy::result_large_err)] // the error is the response itself, returned at once
    fn admit(
        &self,
        number: u32,
        explain: Option<&Explain>,
    ) -> Result<Option<breaker::Permit>, Response<Body>> {
        let Some((breaker, _)) = &self.stack.breaker else {
            return Ok(None);
        };
        match breaker.try_acquire() {
            Ok(p) => Ok(Some(p)),
            Err(BreakerError::Open) => {
                if let Some(e) = explain {
                    e.note(format!("attempt {number}: circuit open, failed fast"));
                }
                Err(proxy_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ProxyError::CircuitOpen,
                    &self.logical.name,
                ))
            }
            Err(BreakerError::Full) => Err(proxy_response(
                StatusCode::SERVICE_UNAVAILABLE,
                ProxyError::Overloaded,
                "too many requests in flight",
            )),
        }
    }

    /// Feeds the endpoint's outcome to outlier detection.
    fn record_outlier(
        &self,
        outlier: &Outlier<SocketAddr>,
        addr: SocketAddr,
        rsp: &Response<Body>,
        explain: Option<&Explain>,
    ) {
        let outcome = match (rsp.status().as_u16(), ProxyError::of(rsp)) {
            // The caller's fault says nothing about the endpoint.
            (_, Some(ProxyError::ClientAborted)) => return,
            (_, Some(e)) if e.retryable() => Outcome::GatewayError,
            (502..=504, _) => Outcome::GatewayError,
            (500..=599, _) => Outcome::Error,
            _ => Outcome::Success,
        };
        let total = self.logical.balancer.ready_count();
        if let Some(time) = outlier.record(&addr, outcome, total) {
            let service = &self.stack.service;
            tracing::info!(service = %service, endpoint = %addr, ?time, "endpoint ejected");
            self.stack.ctx.metrics.ejection(service);
            if let Some(e) = explain {
                e.note(format!("{addr} ejected for {}s", time.as_secs()));
            }
        }
    }
}

// NOTE: one concrete request type (not generic over the body): rustc cannot prove `Send` for a
// generic body whose error converts into `BoxError` for every lifetime.
impl tower::Service<Request<ReplayBody<Body>>> for Attempter {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody<Body>>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let explain = req.extensions().get::<Explain>().cloned();
            let number = req.extensions().get::<Attempt>().map_or(1, |a| a.number);
            // Breaker and bulkhead first: an open circuit costs nothing downstream.
            let permit = match this.admit(number, explain.as_ref()) {
                Ok(permit) => permit,
                Err(rsp) => return Ok(rsp),
            };
            let mut req = req;
            if this.stack.propagate
                && let Some(Deadline(at)) = req.extensions().get::<Deadline>().copied()
            {
                deadline::write(
                    req.headers_mut(),
                    at.saturating_duration_since(Instant::now()),
                );
            }
            let tried = req.extensions().get::<Attempt>().map(|a| a.tried.clone());
            let avoid = tried
                .as_ref()
                .map(|t| t.lock().expect("tried lock poisoned").clone())
                .unwrap_or_default();
            let outlier = this.stack.outlier.as_deref();
            let health = this.stack.health.as_deref();
            let Some(pick) = this.logical.balancer.pick_excluding(
                lb_for(&this.stack.lb, &req),
                &avoid,
                this.stack.zone.as_deref(),
                |a| {
                    outlier.is_some_and(|o| o.is_ejected(a))
                        || health.is_some_and(|h| h.is_unhealthy(a))
                },
            ) else {
                return Ok(proxy_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ProxyError::NoEndpoints,
                    &this.logical.name,
                ));
            };
            let addr = pick.endpoint().addr;
            let started = Instant::now();
            if let Some(t) = tried {
                t.lock().expect("tried lock poisoned").push(addr);
            }
            // A meshed endpoint is called over mTLS whenever we have an identity: never in
            // plaintext, whatever happens to our certificate.
            let peer = this
                .stack
                .ctx
                .identity
                .as_ref()
                .zip(pick.endpoint().identity.clone())
                .map(|(identity, expected)| Peer {
                    identity: identity.clone(),
                    expected,
                });
            // Just after start the certificate may be on its way: wait for it a little (as
            // for a first discovery answer) rather than fail a handshake that cannot succeed.
            if let Some(p) = &peer
                && p.identity.held().is_none()
            {
                let mut held = p.identity.watch();
                let _ =
                    tokio::time::timeout(FIRST_CERTIFICATE_WAIT, held.wait_for(Option::is_some))
                        .await;
            }
            let mut req = req;
            let span = attempt_span(&this.stack.ctx, &mut req, number, addr);
            let rsp = send(
                &this.stack.ctx.pool,
                addr,
                &this.authority,
                req.map(boxed),
                this.stack.timeouts,
                peer.as_ref(),
            )
            .await;
            let failed_here = ProxyError::of(&rsp).is_some();
            if failed_here && rsp.status().is_server_error() {
                drop(pick); // released without a latency sample: errors are not fast responses
            } else {
                pick.complete();
            }
            let attempt = (number, addr, started.elapsed());
            finish_attempt(span.as_ref(), explain.as_ref(), attempt, &rsp);
            if let (Some(permit), Some((_, failed))) = (permit, &this.stack.breaker) {
                permit.record(failed(&rsp));
            }
            if let Some(outlier) = outlier {
                this.record_outlier(outlier, addr, &rsp, explain.as_ref());
            }
            Ok(rsp)
        })
    }
}
/// Ends an attempt (number, endpoint, time taken): its span gets the outcome, and the explain
/// note reads `attempt 2 10.0.0.7:8080 503 (connect-failed) 3ms`.
pub(in crate::outbound) fn finish_attempt(
    span: Option<&opentelemetry::Context>,
    explain: Option<&Explain>,
    (number, addr, elapsed): (u32, std::net::SocketAddr, std::time::Duration),
    rsp: &Response<Body>,
) {
    let proxy_error = ProxyError::of(rsp).map(ProxyError::label);
    if let Some(cx) = span {
        crate::trace::finish(cx, rsp.status(), proxy_error, &[]);
    }
    if let Some(e) = explain {
        let cause = proxy_error.map(|c| format!(" ({c})")).unwrap_or_default();
        let ms = elapsed.as_millis();
        e.note(format!(
            "attempt {number} {addr} {}{cause} {ms}ms",
            rsp.status().as_u16()
        ));
    }
}

/// A child span of the request's client span for one attempt; the next hop gets its context.
pub(in crate::outbound) fn attempt_span<B>(
    ctx: &Outbound,
    req: &mut Request<B>,
    number: u32,
    addr: std::net::SocketAddr,
) -> Option<opentelemetry::Context> {
    let parent = req.extensions().get::<crate::trace::TraceCx>()?;
    let cx = ctx.tracing.start(
        opentelemetry::trace::SpanKind::Client,
        || format!("attempt {number}"),
        || parent.0.clone(),
        || {
            vec![
                opentelemetry::KeyValue::new("network.peer.address", addr.ip().to_string()),
                opentelemetry::KeyValue::new("network.peer.port", i64::from(addr.port())),
                opentelemetry::KeyValue::new("http.request.resend_count", i64::from(number) - 1),
            ]
        },
    )?;
    crate::trace::inject(&cx, req.headers_mut());
    Some(cx)
}

/// The balancer's way of picking for this request.
fn lb_for<B>(lb: &LoadBalancer, req: &Request<B>) -> Lb {
    match lb {
        LoadBalancer::PeakEwma => Lb::PeakEwma,
        LoadBalancer::RoundRobin => Lb::RoundRobin,
        LoadBalancer::LeastRequest => Lb::LeastRequest,
        LoadBalancer::Random => Lb::Random,
        // Without the header there is nothing to hash: any endpoint will do.
        LoadBalancer::ConsistentHash { header } => req
            .headers()
            .get(header.as_str())
            .map_or(Lb::Random, |v| Lb::Hash(hash_key(v.as_bytes()))),
    }
}
