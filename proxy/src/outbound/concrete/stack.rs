//! The resilience stack of one client policy, assembled once per policy version and shared by
//! every request sent with it: the whole-call timeout, the retry (policy, budget, classifier,
//! observer), the cache, and what each attempt needs (breaker, outlier detection, health checks,
//! balancer choice, per-try timeouts). Per request only the request moves through it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymesh_resilience::breaker::{self, Breaker, FailureClassifier, State as BreakerState};
use ferrymesh_resilience::outlier::Outlier;
use ferrymesh_resilience::retry::{self, Classifier, RetryBudget, RetryEvent};
use http::{Response, StatusCode};

use super::super::cache::ResponseCache;
use super::super::health::HealthChecker;
use super::super::logical::Logical;
use crate::client::CallTimeouts;
use crate::explain::Explain;
use crate::http::{Body, ProxyError};
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::policy::resilience::{FailureOn, RetryOn};
use crate::policy::{BreakerPolicy, ClientPolicy, FallbackPolicy, LoadBalancer, RetryPolicy};

/// The retry machinery of one client policy.
#[derive(Clone)]
pub(super) struct RetryState {
    pub(super) policy: Arc<retry::RetryPolicy>,
    pub(super) budget: RetryBudget,
    pub(super) classify: Classifier<Body>,
    pub(super) observe: retry::Observer,
}

impl std::fmt::Debug for RetryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryState")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// One client policy's stack, built when the policy comes into force and shared by every
/// request sent with it.
pub(super) struct Stack {
    pub(super) ctx: Arc<Outbound>,
    /// The backend's `namespace/name` (metrics and logs).
    pub(super) service: String,
    /// The whole call, retries and backoff included; `None`: no limit. The caller's deadline
    /// may shorten it.
    pub(super) request_timeout: Option<Duration>,
    /// Honour the caller's deadline and write what is left into each attempt.
    pub(super) propagate: bool,
    pub(super) retry: Option<RetryState>,
    pub(super) cache: Option<Arc<ResponseCache>>,
    pub(super) fallback: Option<FallbackPolicy>,
    /// Each attempt's timeouts: per-try, connect, idle.
    pub(super) timeouts: CallTimeouts,
    pub(super) breaker: Option<(Breaker, FailureClassifier<Response<Body>>)>,
    pub(super) outlier: Option<Arc<Outlier<SocketAddr>>>,
    pub(super) health: Option<Arc<HealthChecker>>,
    pub(super) lb: LoadBalancer,
    /// Prefer endpoints in this zone (zone-aware balancing).
    pub(super) zone: Option<String>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("service", &self.service)
            .field("retry", &self.retry)
            .field("breaker", &self.breaker.as_ref().map(|(b, _)| b))
            .field("outlier", &self.outlier)
            .finish_non_exhaustive()
    }
}

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
    pub(super) fn get(
        &self,
        policy: &Arc<ClientPolicy>,
        ctx: &Arc<Outbound>,
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
        ctx: &Arc<Outbound>,
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
                    let parts = service_parts(&base, ctx, service, logical);
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
                            let state = retry_state(r, &ctx.metrics, service);
                            ctx.metrics
                                .track_budget(service, &route, state.budget.clone());
                            state
                        }),
                        cache: policy.cache.as_ref().map(|c| {
                            Arc::new(ResponseCache::new(c, ctx.metrics.cache_outcomes(service)))
                        }),
                    };
                    cached.insert(route, parts.clone());
                    parts
                }
            }
        };
        let defaults = &ctx.config.outbound;
        let request_timeout = policy
            .request_timeout
            .unwrap_or(defaults.default_request_timeout);
        Stack {
            ctx: ctx.clone(),
            service: service.to_owned(),
            request_timeout: (!request_timeout.is_zero()).then_some(request_timeout),
            propagate: policy.deadline_propagation,
            retry: route_parts.retry,
            cache: route_parts.cache,
            fallback: policy.fallback.clone(),
            timeouts: attempt_timeouts(policy, defaults),
            breaker: service_parts.breaker,
            outlier: service_parts.outlier,
            health: service_parts.health,
            lb: policy.lb.clone(),
            zone: policy
                .prefer_same_zone
                .then(|| ctx.config.workload.zone.clone()),
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
    ctx: &Arc<Outbound>,
    service: &str,
    logical: &Arc<Logical>,
) -> ServiceParts {
    ServiceParts {
        for_policy: policy.clone(),
        breaker: policy
            .breaker
            .as_ref()
            .map(|b| breaker(b, ctx.metrics.clone(), service.to_owned())),
        health: policy.health_check.as_ref().map(|h| {
            Arc::new(HealthChecker::start(
                h.clone(),
                Arc::downgrade(logical),
                ctx.pool.clone(),
                ctx.metrics.clone(),
                service.to_owned(),
            ))
        }),
        outlier: policy
            .outlier
            .as_ref()
            .map(|o| Arc::new(Outlier::new(o.clone()))),
    }
}
fn retry_state(r: &RetryPolicy, metrics: &Arc<Metrics>, service: &str) -> RetryState {
    let budget = RetryBudget::new(
        r.budget.ratio,
        r.budget.min_retries_per_second,
        r.budget.window,
    );
    RetryState {
        policy: Arc::new(r.layer.clone()),
        observe: observer(metrics.clone(), service.to_owned(), budget.clone()),
        budget,
        classify: classifier(Arc::new(r.clone())),
    }
}

/// Every retry decision counted, and noted where the request asks (`ferrymesh-explain`).
fn observer(metrics: Arc<Metrics>, service: String, budget: RetryBudget) -> retry::Observer {
    Arc::new(move |event: &RetryEvent, request: &http::Extensions| {
        if let Some(e) = request.get::<Explain>() {
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
            RetryEvent::Retry { reason, .. } => metrics.retry(&service, reason),
            RetryEvent::Skipped { skip, .. } => {
                metrics.retry_skipped(&service, skip.as_str());
            }
        }
    })
}

fn breaker(
    b: &BreakerPolicy,
    metrics: Arc<Metrics>,
    service: String,
) -> (Breaker, FailureClassifier<Response<Body>>) {
    let config = b.config.clone();
    metrics.breaker_state(&service, BreakerState::Closed.as_str());
    let on_change: breaker::OnChange = Arc::new(move |state: BreakerState| {
        tracing::info!(service = %service, state = state.as_str(), "circuit breaker");
        metrics.breaker_state(&service, state.as_str());
    });
    let failure_on = b.failure_on.clone();
    let failed: FailureClassifier<Response<Body>> = Arc::new(move |rsp: &Response<Body>| {
        let cause = ProxyError::of(rsp);
        // The caller's fault says nothing about the service.
        if cause == Some(ProxyError::ClientAborted) {
            return false;
        }
        failure_on.iter().any(|f| match f {
            FailureOn::ServerError => rsp.status().is_server_error(),
            FailureOn::GatewayError => matches!(rsp.status().as_u16(), 502..=504),
            FailureOn::ConnectFailure => cause == Some(ProxyError::ConnectFailed),
            FailureOn::Timeout => cause == Some(ProxyError::Timeout),
        })
    });
    (Breaker::new(config, Some(on_change)), failed)
}
/// Which failures of an attempt the policy retries, and under what reason label.
fn classifier(policy: Arc<RetryPolicy>) -> Classifier<Body> {
    Arc::new(move |rsp: &Response<Body>| {
        let on = |r: RetryOn| policy.retry_on.contains(&r);
        // The proxy's own answers say what happened.
        match ProxyError::of(rsp) {
            Some(ProxyError::ConnectFailed) => {
                return on(RetryOn::ConnectFailure).then_some("connect-failure");
            }
            Some(ProxyError::UpstreamReset) => {
                return (on(RetryOn::Reset) || on(RetryOn::RefusedStream)).then_some("reset");
            }
            Some(ProxyError::Timeout) => {
                return on(RetryOn::PerTryTimeout).then_some("per-try-timeout");
            }
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
/// The timeouts of each attempt: per-try, connect and idle.
fn attempt_timeouts(policy: &ClientPolicy, defaults: &crate::config::Outbound) -> CallTimeouts {
    let idle = policy.idle_timeout.map_or(crate::pool::DEFAULT_IDLE, |d| {
        if d.is_zero() {
            crate::pool::NO_IDLE_TIMEOUT
        } else {
            d
        }
    });
    CallTimeouts {
        request: policy.per_try_timeout.filter(|d| !d.is_zero()),
        connect: policy.connect_timeout.unwrap_or(defaults.connect_timeout),
        idle,
    }
}
