//! The call to one service port, through its resilience stack, caller to endpoint:
//! request timeout (the whole call; sets the [`Deadline`]) -> retry (budget, backoff,
//! idempotency guard, replayable body) -> per-try timeout -> balanced endpoint (each attempt
//! picks again, avoiding endpoints already tried).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use ferrymesh_resilience::replay::ReplayBody;
use ferrymesh_resilience::retry::{
    self, Attempt, Backoff, Classifier, Deadline, Retry, RetryBudget, RetryEvent, Strategy,
};
use ferrymesh_resilience::timeout::{TimeoutError, TimeoutLayer};
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Layer as _, ServiceExt as _};

use super::logical::{CallTimeouts, Logical, send};
use crate::app::Context;
use crate::http::{Body, FERRYMESH_ERROR, boxed, proxy_response};
use crate::policy::resilience::{BackoffStrategy, RetryOn};
use crate::policy::{ClientPolicy, RetryPolicy};

/// The retry machinery of one client policy, kept while the policy does not change (the
/// budget counts across requests).
#[derive(Clone)]
pub struct RetryState {
    for_policy: Arc<ClientPolicy>,
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

/// The cache of a logical target's retry state.
#[derive(Debug, Default)]
pub struct RetryCache(Mutex<Option<RetryState>>);

impl RetryCache {
    fn get(&self, policy: &Arc<ClientPolicy>) -> Option<RetryState> {
        let r = policy.retry.as_ref()?;
        let mut cached = self.0.lock().expect("retry cache lock poisoned");
        if let Some(state) = cached.as_ref()
            && Arc::ptr_eq(&state.for_policy, policy)
        {
            return Some(state.clone());
        }
        let state = RetryState {
            for_policy: policy.clone(),
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
        };
        *cached = Some(state.clone());
        Some(state)
    }
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

/// One attempt: a balanced endpoint and the per-try timeout.
#[derive(Clone)]
struct Attempter {
    ctx: Arc<Context>,
    logical: Arc<Logical>,
    authority: Authority,
    timeouts: CallTimeouts,
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
            let tried = req.extensions().get::<Attempt>().map(|a| a.tried.clone());
            let avoid = tried
                .as_ref()
                .map(|t| t.lock().expect("tried lock poisoned").clone())
                .unwrap_or_default();
            let Some(pick) = this.logical.balancer.pick_excluding(&avoid) else {
                return Ok(proxy_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-endpoints",
                    &this.logical.name,
                ));
            };
            let addr = pick.endpoint().addr;
            if let Some(t) = tried {
                t.lock().expect("tried lock poisoned").push(addr);
            }
            let rsp = send(
                &this.ctx.pool,
                addr,
                &this.authority,
                req.map(boxed),
                this.timeouts,
            )
            .await;
            if rsp.headers().contains_key(&FERRYMESH_ERROR) && rsp.status().is_server_error() {
                drop(pick); // released without a latency sample: errors are not fast responses
            } else {
                pick.complete();
            }
            Ok(rsp)
        })
    }
}

/// Calls `logical` with its policy's resilience stack.
// NOTE: a named boxed future: rustc cannot prove `Send` for the tower futures over the body's
// `dyn Error` for every lifetime when the future's type is inferred by the caller.
pub fn call(
    ctx: Arc<Context>,
    logical: Arc<Logical>,
    authority: Authority,
    req: Request<Body>,
    policy: Option<Arc<ClientPolicy>>,
    service: String,
) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
    Box::pin(call_inner(ctx, logical, authority, req, policy, service))
}

async fn call_inner(
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
    let per_try = policy
        .as_ref()
        .and_then(|p| p.per_try_timeout)
        .filter(|d| !d.is_zero());
    let connect = policy
        .as_ref()
        .and_then(|p| p.connect_timeout)
        .unwrap_or(defaults.connect_timeout);
    if let Some(t) = request {
        req.extensions_mut().insert(Deadline(Instant::now() + t));
    }
    let retry = policy.as_ref().and_then(|p| logical.retries.get(p));
    let attempter = Attempter {
        ctx: ctx.clone(),
        logical,
        authority,
        timeouts: CallTimeouts {
            request: per_try,
            connect,
        },
    };
    let timeout = TimeoutLayer::new(request); // outermost: the whole call, retries and backoff included
    let result = if let Some(state) = retry {
        let observe: retry::Observer = Arc::new(move |event: &RetryEvent| match event {
            RetryEvent::Retry { reason, .. } => ctx.metrics.retry(&service, reason),
            RetryEvent::Skipped { skip, .. } => ctx.metrics.retry_skipped(&service, skip.as_str()),
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
