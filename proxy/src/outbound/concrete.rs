//! The call to one service port, through its resilience stack, caller to endpoint:
//! request timeout (the whole call; sets the [`Deadline`]) -> retry (budget, backoff,
//! idempotency guard, replayable body) -> per-try timeout -> balanced endpoint (each attempt
//! picks again, avoiding endpoints already tried).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use ferrymesh_resilience::breaker::{
    self, Breaker, BreakerConfig, BreakerError, FailureClassifier, State as BreakerState,
};
use ferrymesh_resilience::outlier::{Outcome, Outlier, OutlierConfig};
use ferrymesh_resilience::replay::{MAX_BUFFERED_BYTES, ReplayBody};
use ferrymesh_resilience::retry::{
    self, Attempt, Backoff, Classifier, Deadline, Retry, RetryBudget, RetryEvent, Strategy,
};
use ferrymesh_resilience::timeout::{TimeoutError, TimeoutLayer};
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Layer as _, ServiceExt as _};

use super::cache::{self, ResponseCache};
use super::logical::{CallTimeouts, Logical, Peer, send};
use crate::app::Context;
use crate::balance::{Lb, hash_key};
use crate::deadline;
use crate::explain::Explain;
use crate::health::HealthChecker;
use crate::http::{Body, FERRYMESH_ERROR, boxed, proxy_response};
use crate::policy::resilience::{
    BackoffStrategy, FailureOn, FallbackTarget, FallbackTrigger, RetryOn,
};
use crate::policy::{BreakerPolicy, ClientPolicy, FallbackPolicy, LoadBalancer, RetryPolicy};

/// The retry machinery of one client policy.
#[derive(Clone)]
pub struct RetryState {
    policy: Arc<retry::RetryPolicy>,
    budget: RetryBudget,
    classify: Classifier<Body>,
}

impl std::fmt::Debug for RetryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryState")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// What one client policy's stack keeps across requests (the retry budget, the breaker).
#[derive(Clone)]
pub struct Stack {
    retry: Option<RetryState>,
    breaker: Option<(Breaker, FailureClassifier<Response<Body>>)>,
    outlier: Option<Arc<Outlier<SocketAddr>>>,
    health: Option<Arc<HealthChecker>>,
    cache: Option<Arc<ResponseCache>>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("retry", &self.retry)
            .field("breaker", &self.breaker.as_ref().map(|(b, _)| b))
            .field("outlier", &self.outlier)
            .finish_non_exhaustive()
    }
}

/// How long a call waits for the proxy's first certificate before trying without.
const FIRST_CERTIFICATE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The stack state of a logical target, kept across requests: the per-backend parts (breaker,
/// outlier detection, health checks) built from the service's own policy, and per route the
/// retry (with its budget) and cache of the policy in force for that route. Each part is
/// rebuilt when the policy it came from changes.
#[derive(Debug, Default)]
pub struct StackCache {
    service: Mutex<Option<ServiceParts>>,
    routes: Mutex<HashMap<String, RouteParts>>,
    merged: Mutex<HashMap<String, Merged>>,
    /// The assembled stack of each policy in use, found by pointer: a request takes one lock
    /// and clones one `Arc`; the parts above are only consulted when a policy changes.
    built: Mutex<Vec<(Arc<ClientPolicy>, Arc<Stack>)>>,
    /// How many stacks were assembled (once per policy version in force).
    assembled: std::sync::atomic::AtomicU64,
}

#[derive(Clone)]
struct ServiceParts {
    for_policy: Arc<ClientPolicy>,
    breaker: Option<(Breaker, FailureClassifier<Response<Body>>)>,
    outlier: Option<Arc<Outlier<SocketAddr>>>,
    health: Option<Arc<HealthChecker>>,
}

impl std::fmt::Debug for ServiceParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceParts")
            .field("breaker", &self.breaker.as_ref().map(|(b, _)| b))
            .field("outlier", &self.outlier)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
struct RouteParts {
    for_policy: Arc<ClientPolicy>,
    retry: Option<RetryState>,
    cache: Option<Arc<ResponseCache>>,
}

/// A route's sections merged over a backend's policy, remembered while both stay the same.
#[derive(Debug)]
struct Merged {
    parent: Arc<ClientPolicy>,
    base: Arc<ClientPolicy>,
    policy: Arc<ClientPolicy>,
}

impl StackCache {
    /// The policy in force for rule `rule` of `parent`'s routes when it sends to this target
    /// (whose own policy is `base`): the same `Arc` while neither changes, so the route's
    /// retry budget and cache live on.
    pub fn effective(
        &self,
        parent: &Arc<ClientPolicy>,
        rule: usize,
        base: &Arc<ClientPolicy>,
    ) -> Arc<ClientPolicy> {
        let route = &parent.routes.rules[rule];
        let mut merged = self.merged.lock().expect("stack cache lock poisoned");
        if let Some(m) = merged.get(&route.name)
            && Arc::ptr_eq(&m.parent, parent)
            && Arc::ptr_eq(&m.base, base)
        {
            return m.policy.clone();
        }
        let policy = Arc::new(ClientPolicy::with_route(base, route));
        merged.insert(
            route.name.clone(),
            Merged {
                parent: parent.clone(),
                base: base.clone(),
                policy: policy.clone(),
            },
        );
        policy
    }

    /// The stack of `policy`, built on its first request and reused while it is in force.
    fn get(
        &self,
        policy: &Arc<ClientPolicy>,
        ctx: &Arc<Context>,
        service: &str,
        logical: &Arc<Logical>,
    ) -> Arc<Stack> {
        let mut built = self.built.lock().expect("stack cache lock poisoned");
        if let Some((_, stack)) = built.iter().find(|(p, _)| Arc::ptr_eq(p, policy)) {
            return stack.clone();
        }
        let stack = Arc::new(self.assemble(policy, ctx, service, logical));
        self.assembled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Policies nobody else holds any more (replaced by the controller) are let go.
        built.retain(|(p, _)| Arc::strong_count(p) > 1);
        built.push((policy.clone(), stack.clone()));
        stack
    }

    /// How many stacks were assembled so far (`/config_dump`: one per policy version).
    pub fn assembled(&self) -> u64 {
        self.assembled.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn assemble(
        &self,
        policy: &Arc<ClientPolicy>,
        metrics: &Arc<Context>,
        service: &str,
        logical: &Arc<Logical>,
    ) -> Stack {
        let base = policy.base.clone().unwrap_or_else(|| policy.clone());
        let route = policy.route.clone().unwrap_or_else(|| "default".to_owned());
        let service_parts = {
            let mut cached = self.service.lock().expect("stack cache lock poisoned");
            match cached.as_ref() {
                Some(parts) if Arc::ptr_eq(&parts.for_policy, &base) => parts.clone(),
                _ => {
                    let parts = service_parts(&base, metrics, service, logical);
                    *cached = Some(parts.clone());
                    parts
                }
            }
        };
        let route_parts = {
            let mut cached = self.routes.lock().expect("stack cache lock poisoned");
            match cached.get(&route) {
                Some(parts) if Arc::ptr_eq(&parts.for_policy, policy) => parts.clone(),
                _ => {
                    let parts = RouteParts {
                        for_policy: policy.clone(),
                        retry: policy.retry.as_ref().map(|r| {
                            let state = retry_state(r);
                            metrics
                                .metrics
                                .track_budget(service, &route, state.budget.clone());
                            state
                        }),
                        cache: policy
                            .cache
                            .as_ref()
                            .map(|c| Arc::new(ResponseCache::new(c))),
                    };
                    cached.insert(route, parts.clone());
                    parts
                }
            }
        };
        Stack {
            retry: route_parts.retry,
            cache: route_parts.cache,
            breaker: service_parts.breaker,
            outlier: service_parts.outlier,
            health: service_parts.health,
        }
    }

    /// The current policy's breaker, if it has one and the stack was built (first request).
    pub fn breaker(&self) -> Option<Breaker> {
        let cached = self.service.lock().expect("stack cache lock poisoned");
        cached.as_ref()?.breaker.as_ref().map(|(b, _)| b.clone())
    }

    /// The breaker's state, for `/config_dump`.
    pub fn breaker_state(&self) -> Option<&'static str> {
        self.breaker().map(|b| b.state().as_str())
    }
}

fn service_parts(
    policy: &Arc<ClientPolicy>,
    metrics: &Arc<Context>,
    service: &str,
    logical: &Arc<Logical>,
) -> ServiceParts {
    ServiceParts {
        for_policy: policy.clone(),
        breaker: policy
            .breaker
            .as_ref()
            .map(|b| breaker(b, metrics.clone(), service.to_owned())),
        health: policy.health_check.as_ref().map(|h| {
            Arc::new(HealthChecker::start(
                h.clone(),
                Arc::downgrade(logical),
                metrics.clone(),
                service.to_owned(),
            ))
        }),
        outlier: policy.outlier.as_ref().map(|o| {
            Arc::new(Outlier::new(OutlierConfig {
                consecutive_errors: o.consecutive_errors,
                consecutive_gateway_errors: o.consecutive_gateway_errors,
                interval: o.interval,
                base_ejection_time: o.base_ejection_time,
                max_ejection_time: o.max_ejection_time,
                max_ejection_percent: o.max_ejection_percent,
                min_ready_endpoints: o.min_ready_endpoints,
            }))
        }),
    }
}

fn retry_state(r: &RetryPolicy) -> RetryState {
    RetryState {
        policy: Arc::new(retry::RetryPolicy {
            attempts: r.attempts,
            backoff: Backoff {
                strategy: match r.backoff {
                    BackoffStrategy::Constant => Strategy::Constant,
                    BackoffStrategy::Exponential => Strategy::Exponential,
                    BackoffStrategy::ExponentialFullJitter => Strategy::ExponentialFullJitter,
                    BackoffStrategy::DecorrelatedJitter => Strategy::DecorrelatedJitter,
                },
                base: r.backoff_base,
                max: r.backoff_max,
            },
            methods: r.methods.clone(),
            respect_retry_after: r.respect_retry_after,
            max_request_body_bytes: r.max_request_body_bytes as usize,
        }),
        budget: RetryBudget::new(
            r.budget.ratio,
            r.budget.min_retries_per_second,
            r.budget.window,
        ),
        classify: classifier(Arc::new(r.clone())),
    }
}

fn breaker(
    b: &BreakerPolicy,
    ctx: Arc<Context>,
    service: String,
) -> (Breaker, FailureClassifier<Response<Body>>) {
    let config = BreakerConfig {
        max_requests: b.max_requests as usize,
        consecutive_failures: b.consecutive_failures,
        failure_ratio: b.failure_ratio,
        minimum_requests: b.minimum_requests,
        window: b.window,
        open_base: b.open_base,
        open_max: b.open_max,
        open_jitter: b.open_jitter,
        half_open_probes: b.half_open_probes,
    };
    ctx.metrics
        .breaker_state(&service, BreakerState::Closed.as_str());
    let on_change: breaker::OnChange = Arc::new(move |state: BreakerState| {
        tracing::info!(service = %service, state = state.as_str(), "circuit breaker");
        ctx.metrics.breaker_state(&service, state.as_str());
    });
    let failure_on = b.failure_on.clone();
    let failed: FailureClassifier<Response<Body>> = Arc::new(move |rsp: &Response<Body>| {
        let cause = rsp
            .headers()
            .get(&FERRYMESH_ERROR)
            .and_then(|v| v.to_str().ok());
        failure_on.iter().any(|f| match f {
            FailureOn::ServerError => rsp.status().is_server_error(),
            FailureOn::GatewayError => matches!(rsp.status().as_u16(), 502..=504),
            FailureOn::ConnectFailure => cause == Some("connect-failed"),
            FailureOn::Timeout => cause == Some("timeout"),
        })
    });
    (Breaker::new(config, Some(on_change)), failed)
}

/// Which failures of an attempt the policy retries, and under what reason label.
fn classifier(policy: Arc<RetryPolicy>) -> Classifier<Body> {
    Arc::new(move |rsp: &Response<Body>| {
        let on = |r: RetryOn| policy.retry_on.contains(&r);
        // The proxy's own answers say what happened.
        match rsp
            .headers()
            .get(&FERRYMESH_ERROR)
            .and_then(|v| v.to_str().ok())
        {
            Some("connect-failed") => {
                return on(RetryOn::ConnectFailure).then_some("connect-failure");
            }
            Some("upstream-reset") => {
                return (on(RetryOn::Reset) || on(RetryOn::RefusedStream)).then_some("reset");
            }
            Some("timeout") => return on(RetryOn::PerTryTimeout).then_some("per-try-timeout"),
            Some(_) => return None, // no-endpoints and friends: another attempt cannot help
            None => {}
        }
        let status = rsp.status();
        if policy.retry_on_status.contains(&status) {
            return Some("status-code");
        }
        if matches!(status.as_u16(), 502..=504) && on(RetryOn::GatewayError) {
            return Some("gateway-error");
        }
        if status.is_server_error() && on(RetryOn::ServerError) {
            return Some("5xx");
        }
        if status == StatusCode::CONFLICT && on(RetryOn::Retriable4xx) {
            return Some("retriable-4xx");
        }
        // gRPC failures that end the call at once come as headers (trailers-only responses).
        let grpc = rsp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
        match grpc {
            Some(code) if code != 0 && policy.grpc_retry_on.contains(&code) => Some("grpc-status"),
            _ => None,
        }
    })
}

/// One attempt: the breaker, a balanced endpoint and the per-try timeout.
#[derive(Clone)]
struct Attempter {
    ctx: Arc<Context>,
    logical: Arc<Logical>,
    authority: Authority,
    timeouts: CallTimeouts,
    breaker: Option<(Breaker, FailureClassifier<Response<Body>>)>,
    outlier: Option<Arc<Outlier<SocketAddr>>>,
    health: Option<Arc<HealthChecker>>,
    service: String,
    lb: LoadBalancer,
    /// Prefer endpoints in this zone (zone-aware balancing).
    zone: Option<String>,
    /// Write the time left into each attempt.
    propagate: bool,
}

impl Attempter {
    /// Asks the breaker and bulkhead; the fail-fast answer when they say no.
    #[allow(clippy::result_large_err)] // the error is the response itself, returned at once
    fn admit(
        &self,
        number: u32,
        explain: Option<&Explain>,
    ) -> Result<Option<breaker::Permit>, Response<Body>> {
        let Some((breaker, _)) = &self.breaker else {
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
                    "circuit-open",
                    &self.logical.name,
                ))
            }
            Err(BreakerError::Full) => Err(proxy_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
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
        let cause = rsp
            .headers()
            .get(&FERRYMESH_ERROR)
            .and_then(|v| v.to_str().ok());
        let outcome = match (rsp.status().as_u16(), cause) {
            // The caller's fault says nothing about the endpoint.
            (_, Some("client-aborted")) => return,
            (_, Some("connect-failed" | "timeout" | "upstream-reset")) | (502..=504, _) => {
                Outcome::GatewayError
            }
            (500..=599, _) => Outcome::Error,
            _ => Outcome::Success,
        };
        let total = self.logical.balancer.ready_count();
        if let Some(time) = outlier.record(&addr, outcome, total) {
            tracing::info!(service = %self.service, endpoint = %addr, ?time, "endpoint ejected");
            self.ctx.metrics.ejection(&self.service);
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
            if this.propagate
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
            let outlier = this.outlier.as_deref();
            let health = this.health.as_deref();
            let Some(pick) = this.logical.balancer.pick_excluding(
                lb_for(&this.lb, &req),
                &avoid,
                this.zone.as_deref(),
                |a| {
                    outlier.is_some_and(|o| o.is_ejected(a))
                        || health.is_some_and(|h| h.is_unhealthy(a))
                },
            ) else {
                return Ok(proxy_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-endpoints",
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
            let span = attempt_span(&this.ctx, &mut req, number, addr);
            let rsp = send(
                &this.ctx.pool,
                addr,
                &this.authority,
                req.map(boxed),
                this.timeouts,
                peer.as_ref(),
            )
            .await;
            let failed_here = rsp.headers().contains_key(&FERRYMESH_ERROR);
            if failed_here && rsp.status().is_server_error() {
                drop(pick); // released without a latency sample: errors are not fast responses
            } else {
                pick.complete();
            }
            let attempt = (number, addr, started.elapsed());
            finish_attempt(span.as_ref(), explain.as_ref(), attempt, &rsp);
            if let (Some(permit), Some((_, failed))) = (permit, &this.breaker) {
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
pub(super) fn finish_attempt(
    span: Option<&opentelemetry::Context>,
    explain: Option<&Explain>,
    (number, addr, elapsed): (u32, std::net::SocketAddr, std::time::Duration),
    rsp: &Response<Body>,
) {
    let proxy_error = rsp
        .headers()
        .get(&FERRYMESH_ERROR)
        .and_then(|v| v.to_str().ok());
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
pub(super) fn attempt_span<B>(
    ctx: &Context,
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

/// Calls `logical` with its policy's resilience stack.
// NOTE: a named boxed future: rustc cannot prove `Send` for the tower futures over the body's
// `dyn Error` for every lifetime when the future's type is inferred by the caller.
pub fn call(
    ctx: Arc<Context>,
    logical: Arc<Logical>,
    authority: Authority,
    mut req: Request<Body>,
    policy: Option<Arc<ClientPolicy>>,
    service: String,
) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
    // The outbound side may have set one up already (asked for, or for the access log).
    let explain = Explain::from_request(req.headers_mut())
        .or_else(|| req.extensions().get::<Explain>().cloned());
    if let Some(e) = &explain {
        req.extensions_mut().insert(e.clone());
    }
    Box::pin(async move {
        // A client-side fault comes before the stack: no retry hides it (as in Istio).
        if let Some(fault) = policy.as_ref().and_then(|p| p.fault.as_ref())
            && let Some(mut rsp) = crate::fault::inject(
                std::slice::from_ref(fault),
                req.headers(),
                &ctx.metrics,
                crate::metrics::Direction::outbound,
                &service,
            )
            .await
        {
            if let Some(e) = explain {
                e.note(format!("fault injected by {}", fault.source));
                e.write(rsp.headers_mut());
            }
            return rsp;
        }
        let stack_of = logical.clone();
        let mut rsp = call_with_fallback(ctx, logical, authority, req, policy, service, true).await;
        if let Some(e) = explain {
            if let Some(state) = stack_of.stack.breaker_state() {
                e.note(format!("breaker {state}"));
            }
            e.write(rsp.headers_mut());
        }
        rsp
    })
}

/// Which fallback trigger a final answer meets, if any.
fn triggered(fallback: &FallbackPolicy, rsp: &Response<Body>) -> Option<&'static str> {
    let cause = rsp
        .headers()
        .get(&FERRYMESH_ERROR)
        .and_then(|v| v.to_str().ok());
    fallback.triggers.iter().find_map(|t| {
        let hit = match t {
            FallbackTrigger::CircuitOpen => cause == Some("circuit-open"),
            FallbackTrigger::NoEndpoints => cause == Some("no-endpoints"),
            FallbackTrigger::Timeout => cause == Some("timeout"),
            FallbackTrigger::ServerError => rsp.status().is_server_error(),
            FallbackTrigger::BudgetExhausted => {
                rsp.extensions().get::<retry::Skip>() == Some(&retry::Skip::BudgetExhausted)
            }
        };
        hit.then_some(match t {
            FallbackTrigger::CircuitOpen => "circuit-open",
            FallbackTrigger::NoEndpoints => "no-endpoints",
            FallbackTrigger::Timeout => "timeout",
            FallbackTrigger::ServerError => "5xx",
            FallbackTrigger::BudgetExhausted => "budget-exhausted",
        })
    })
}

fn copy_head(req: &http::request::Parts) -> http::request::Builder {
    let mut b = Request::builder()
        .method(req.method.clone())
        .uri(req.uri.clone())
        .version(req.version);
    if let Some(h) = b.headers_mut() {
        h.clone_from(&req.headers);
    }
    // The caller's extensions (deadline, explain, client fault) go with every copy.
    if let Some(e) = b.extensions_mut() {
        e.clone_from(&req.extensions);
    }
    b
}

/// The stack, then the policy's fallback when the answer meets one of its triggers. A backend
/// fallback is called with its own policy but no fallback of its own.
async fn call_with_fallback(
    ctx: Arc<Context>,
    logical: Arc<Logical>,
    authority: Authority,
    req: Request<Body>,
    policy: Option<Arc<ClientPolicy>>,
    service: String,
    allow_fallback: bool,
) -> Response<Body> {
    let fallback = policy
        .as_ref()
        .and_then(|p| p.fallback.clone())
        .filter(|_| allow_fallback);
    let Some(fallback) = fallback else {
        return call_inner(ctx, logical, authority, req, policy, service).await;
    };
    if let FallbackTarget::StaticResponse { .. } = &fallback.target {
        // The request is not sent again: no copy of its body.
        let rsp = call_inner(
            ctx.clone(),
            logical,
            authority,
            req,
            policy,
            service.clone(),
        )
        .await;
        let Some(trigger) = triggered(&fallback, &rsp) else {
            return rsp;
        };
        ctx.metrics.fallback(&service, trigger);
        return static_fallback(&fallback.target, trigger).unwrap_or(rsp);
    }
    // A backend fallback needs the request again: keep a replayable copy of the body.
    let (parts, body) = req.into_parts();
    let replay = ReplayBody::new(body, MAX_BUFFERED_BYTES);
    let first = copy_head(&parts)
        .body(boxed(replay.replay()))
        .expect("parts of a valid request");
    let rsp = call_inner(
        ctx.clone(),
        logical,
        authority,
        first,
        policy,
        service.clone(),
    )
    .await;
    let Some(trigger) = triggered(&fallback, &rsp) else {
        return rsp;
    };
    ctx.metrics.fallback(&service, trigger);
    let mut served = match &fallback.target {
        FallbackTarget::StaticResponse { .. } => return rsp, // answered above
        FallbackTarget::Backend(name) => {
            let Some(target) = super::Target::parse(name, &ctx.config.workload.namespace) else {
                return rsp;
            };
            let Some(backend_name) = target.name.clone() else {
                return rsp;
            };
            if !replay.is_replayable() {
                return rsp; // the body was too large to send twice
            }
            let backend = ctx.outbound.logical(&ctx, &backend_name);
            let Ok(super::logical::Resolution::Service { endpoints, policy }) =
                backend.resolve().await
            else {
                return rsp;
            };
            let req = copy_head(&parts)
                .body(boxed(replay.replay()))
                .expect("parts of a valid request");
            let mut r = Box::pin(call_with_fallback(
                ctx.clone(),
                backend,
                target.authority.clone(),
                req,
                policy,
                endpoints.service.clone(),
                false,
            ))
            .await;
            r.headers_mut().insert(
                "ferrymesh-fallback",
                http::HeaderValue::from_static("backend"),
            );
            r
        }
    };
    served.headers_mut().insert(
        "ferrymesh-fallback-cause",
        http::HeaderValue::from_static(trigger),
    );
    served
}

/// The static answer of a fallback that was triggered by `trigger`.
fn static_fallback(target: &FallbackTarget, trigger: &'static str) -> Option<Response<Body>> {
    let FallbackTarget::StaticResponse {
        status,
        headers,
        body,
    } = target
    else {
        return None;
    };
    let mut r = Response::new(boxed(http_body_util::Full::new(bytes::Bytes::from(
        body.clone(),
    ))));
    *r.status_mut() = *status;
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            r.headers_mut().insert(k, v);
        }
    }
    r.headers_mut().insert(
        "ferrymesh-fallback",
        http::HeaderValue::from_static("static"),
    );
    r.headers_mut().insert(
        "ferrymesh-fallback-cause",
        http::HeaderValue::from_static(trigger),
    );
    Some(r)
}

async fn call_inner(
    ctx: Arc<Context>,
    logical: Arc<Logical>,
    authority: Authority,
    req: Request<Body>,
    policy: Option<Arc<ClientPolicy>>,
    service: String,
) -> Response<Body> {
    // The cache stands before retries: a hit costs no attempt at all.
    let cache = policy
        .as_ref()
        .and_then(|p| logical.stack.get(p, &ctx, &service, &logical).cache.clone());
    match cache {
        Some(cache) => {
            let (ctx2, service2) = (ctx.clone(), service.clone());
            let key = authority.as_str().to_owned();
            cache::through(&cache, &key, req, &ctx2.metrics, &service2, move |req| {
                call_stack(ctx, logical, authority, req, policy, service)
            })
            .await
        }
        None => call_stack(ctx, logical, authority, req, policy, service).await,
    }
}

/// The timeouts of each attempt: per-try, connect and idle.
fn attempt_timeouts(
    policy: Option<&ClientPolicy>,
    defaults: &crate::config::Outbound,
) -> CallTimeouts {
    let idle = policy
        .and_then(|p| p.idle_timeout)
        .map_or(crate::pool::DEFAULT_IDLE, |d| {
            if d.is_zero() {
                crate::pool::NO_IDLE_TIMEOUT
            } else {
                d
            }
        });
    CallTimeouts {
        request: policy
            .and_then(|p| p.per_try_timeout)
            .filter(|d| !d.is_zero()),
        connect: policy
            .and_then(|p| p.connect_timeout)
            .unwrap_or(defaults.connect_timeout),
        idle,
    }
}

async fn call_stack(
    ctx: Arc<Context>,
    logical: Arc<Logical>,
    authority: Authority,
    mut req: Request<Body>,
    policy: Option<Arc<ClientPolicy>>,
    service: String,
) -> Response<Body> {
    let defaults = &ctx.config.outbound;
    let request = policy
        .as_ref()
        .and_then(|p| p.request_timeout)
        .unwrap_or(defaults.default_request_timeout);
    let request = (!request.is_zero()).then_some(request);
    // The caller's own deadline shortens ours; every attempt then carries what is left.
    let propagate = policy.as_ref().is_none_or(|p| p.deadline_propagation);
    let request = match (
        request,
        deadline::incoming(req.headers()).filter(|_| propagate),
    ) {
        (Some(ours), Some(theirs)) => Some(ours.min(theirs)),
        (ours, theirs) => ours.or(theirs),
    };
    if let Some(t) = request {
        req.extensions_mut().insert(Deadline(Instant::now() + t));
    }
    let stack = policy
        .as_ref()
        .map(|p| logical.stack.get(p, &ctx, &service, &logical));
    let retry = stack.as_ref().and_then(|s| s.retry.clone());
    let breaker = stack.as_ref().and_then(|s| s.breaker.clone());
    let attempter = Attempter {
        breaker,
        outlier: stack.as_ref().and_then(|s| s.outlier.clone()),
        health: stack.as_ref().and_then(|s| s.health.clone()),
        service: service.clone(),
        lb: policy
            .as_ref()
            .map_or(LoadBalancer::PeakEwma, |p| p.lb.clone()),
        zone: policy
            .as_ref()
            .filter(|p| p.prefer_same_zone)
            .map(|_| ctx.config.workload.zone.clone()),
        propagate,
        ctx: ctx.clone(),
        logical,
        authority,
        timeouts: attempt_timeouts(policy.as_deref(), defaults),
    };
    let timeout = TimeoutLayer::new(request); // outermost: the whole call, retries and backoff included
    let result = if let Some(state) = retry {
        let explain = req.extensions().get::<Explain>().cloned();
        let budget = state.budget.clone();
        let observe: retry::Observer = Arc::new(move |event: &RetryEvent| {
            if let Some(e) = &explain {
                match event {
                    RetryEvent::Retry { reason, delay, .. } => {
                        e.note(format!(
                            "retry on {reason} after {}ms (budget: {} left)",
                            delay.as_millis(),
                            budget.available()
                        ));
                    }
                    RetryEvent::Skipped { reason, skip } => {
                        e.note(format!("no retry on {reason}: {}", skip.as_str()));
                    }
                }
            }
            match event {
                RetryEvent::Retry { reason, .. } => ctx.metrics.retry(&service, reason),
                RetryEvent::Skipped { skip, .. } => {
                    ctx.metrics.retry_skipped(&service, skip.as_str());
                }
            }
        });
        let retry = Retry::new(
            attempter,
            state.policy,
            state.budget,
            state.classify,
            observe,
        );
        timeout.layer(retry).oneshot(req).await
    } else {
        // No retries: nothing is copied (cap 0), the body just passes through.
        let req = req.map(|b| ReplayBody::new(b, 0));
        timeout.layer(attempter).oneshot(req).await
    };
    match result {
        Ok(rsp) => rsp,
        Err(TimeoutError::Elapsed(t)) => proxy_response(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            &format!("no response within {t:?}"),
        ),
        Err(TimeoutError::Inner(never)) => match never {},
    }
}
