//! The call to one service port, through its resilience stack, caller to endpoint:
//! client fault -> fallback -> cache -> request timeout (the whole call; sets the [`Deadline`])
//! -> retry (budget, backoff, idempotency guard, replayable body) -> [`attempt`]: breaker,
//! balanced endpoint (each attempt picks again, avoiding endpoints already tried), per-try
//! timeout. The [`stack`] is assembled once per policy version; a request only moves through it.

mod attempt;
mod stack;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ferrymesh_resilience::replay::{MAX_BUFFERED_BYTES, ReplayBody};
use ferrymesh_resilience::retry::{self, Deadline, Retry};
use ferrymesh_resilience::timeout::{TimeoutError, TimeoutLayer};
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Layer as _, ServiceExt as _};

pub(super) use attempt::{attempt_span, finish_attempt};
pub use stack::StackCache;

use super::cache;
use super::logical::Logical;
use crate::deadline;
use crate::explain::Explain;
use crate::http::{Body, ProxyError, boxed, proxy_response};
use crate::outbound::Outbound;
use crate::policy::resilience::{FallbackTarget, FallbackTrigger};
use crate::policy::{ClientPolicy, FallbackPolicy};
use attempt::Attempter;
use stack::Stack;

/// Calls `logical` with its policy's resilience stack (a target the controller sent no policy
/// for gets the empty policy: defaults only).
// NOTE: a named boxed future: rustc cannot prove `Send` for the tower futures over the body's
// `dyn Error` for every lifetime when the future's type is inferred by the caller.
pub fn call(
    ctx: Arc<Outbound>,
    logical: Arc<Logical>,
    authority: Authority,
    mut req: Request<Body>,
    policy: Option<Arc<ClientPolicy>>,
    service: &str,
) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
    // The outbound side may have set one up already (asked for, or for the access log).
    let explain = Explain::from_request(req.headers_mut())
        .or_else(|| req.extensions().get::<Explain>().cloned());
    if let Some(e) = &explain {
        req.extensions_mut().insert(e.clone());
    }
    let policy = policy.unwrap_or_else(|| logical.empty_policy(service));
    let stack = logical.stack.get(&policy, &ctx, service, &logical);
    Box::pin(async move {
        // A client-side fault comes before the stack: no retry hides it (as in Istio).
        if let Some(fault) = &policy.fault
            && let Some(mut rsp) = crate::fault::inject(
                std::slice::from_ref(fault),
                req.headers(),
                &ctx.metrics,
                crate::metrics::Direction::outbound,
                &stack.service,
            )
            .await
        {
            if let Some(e) = explain {
                e.note(format!("fault injected by {}", fault.source));
                e.write(rsp.headers_mut());
            }
            return rsp;
        }
        let mut rsp = call_with_fallback(stack, logical.clone(), authority, req, true).await;
        if let Some(e) = explain {
            if let Some(state) = logical.stack.breaker_state() {
                e.note(format!("breaker {state}"));
            }
            e.write(rsp.headers_mut());
        }
        rsp
    })
}

/// Which fallback trigger a final answer meets, if any.
fn triggered(fallback: &FallbackPolicy, rsp: &Response<Body>) -> Option<&'static str> {
    let cause = ProxyError::of(rsp);
    fallback.triggers.iter().find_map(|t| {
        let hit = match t {
            FallbackTrigger::CircuitOpen => cause == Some(ProxyError::CircuitOpen),
            FallbackTrigger::NoEndpoints => cause == Some(ProxyError::NoEndpoints),
            FallbackTrigger::Timeout => cause == Some(ProxyError::Timeout),
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
    stack: Arc<Stack>,
    logical: Arc<Logical>,
    authority: Authority,
    req: Request<Body>,
    allow_fallback: bool,
) -> Response<Body> {
    if stack.fallback.is_none() || !allow_fallback {
        return call_inner(stack, logical, authority, req).await;
    }
    let held = stack.clone();
    let Some(fallback) = &held.fallback else {
        unreachable!("checked above");
    };
    let (ctx, service) = (&held.ctx, &held.service);
    if let FallbackTarget::StaticResponse { .. } = &fallback.target {
        // The request is not sent again: no copy of its body.
        let rsp = call_inner(stack, logical, authority, req).await;
        let Some(trigger) = triggered(fallback, &rsp) else {
            return rsp;
        };
        ctx.metrics.fallback(service, trigger);
        return static_fallback(&fallback.target, trigger).unwrap_or(rsp);
    }
    // A backend fallback needs the request again: keep a replayable copy of the body.
    let (parts, body) = req.into_parts();
    let replay = ReplayBody::new(body, MAX_BUFFERED_BYTES);
    let first = copy_head(&parts)
        .body(boxed(replay.replay()))
        .expect("parts of a valid request");
    let rsp = call_inner(stack, logical, authority, first).await;
    let Some(trigger) = triggered(fallback, &rsp) else {
        return rsp;
    };
    ctx.metrics.fallback(service, trigger);
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
            let backend = ctx.logical(&backend_name);
            let Ok(super::logical::Resolution::Service { endpoints, policy }) =
                backend.resolve().await
            else {
                return rsp;
            };
            let req = copy_head(&parts)
                .body(boxed(replay.replay()))
                .expect("parts of a valid request");
            let policy = policy.unwrap_or_else(|| backend.empty_policy(&endpoints.service));
            let backend_stack = backend
                .stack
                .get(&policy, ctx, &endpoints.service, &backend);
            let mut r = Box::pin(call_with_fallback(
                backend_stack,
                backend,
                target.authority.clone(),
                req,
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
    stack: Arc<Stack>,
    logical: Arc<Logical>,
    authority: Authority,
    req: Request<Body>,
) -> Response<Body> {
    // The cache stands before retries: a hit costs no attempt at all.
    match stack.cache.clone() {
        Some(cache) => {
            let key = authority.as_str().to_owned();
            cache::through(&cache, &key, req, move |req| {
                call_stack(stack, logical, authority, req)
            })
            .await
        }
        None => call_stack(stack, logical, authority, req).await,
    }
}

/// The request timeout (shortened by the caller's deadline), then the retry over attempts.
async fn call_stack(
    stack: Arc<Stack>,
    logical: Arc<Logical>,
    authority: Authority,
    mut req: Request<Body>,
) -> Response<Body> {
    // The caller's own deadline shortens ours; every attempt then carries what is left.
    let request = match (
        stack.request_timeout,
        deadline::incoming(req.headers()).filter(|_| stack.propagate),
    ) {
        (Some(ours), Some(theirs)) => Some(ours.min(theirs)),
        (ours, theirs) => ours.or(theirs),
    };
    if let Some(t) = request {
        req.extensions_mut().insert(Deadline(Instant::now() + t));
    }
    let retry = stack.retry.clone();
    let attempter = Attempter {
        stack,
        logical,
        authority,
    };
    let timeout = TimeoutLayer::new(request); // outermost: the whole call, retries and backoff included
    let result = match retry {
        Some(r) => {
            let retry = Retry::new(attempter, r.policy, r.budget, r.classify, r.observe);
            timeout.layer(retry).oneshot(req).await
        }
        // No retries: the body passes through as it is.
        None => {
            timeout
                .layer(attempter)
                .oneshot(req.map(ReplayBody::once))
                .await
        }
    };
    match result {
        Ok(rsp) => rsp,
        Err(TimeoutError::Elapsed(t)) => proxy_response(
            StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Timeout,
            &format!("no response within {t:?}"),
        ),
        Err(TimeoutError::Inner(never)) => match never {},
    }
}
