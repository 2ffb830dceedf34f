//! Retries: a failed attempt (as the caller's classifier sees it) is sent again, at most
//! `attempts` more times, with backoff, only for idempotent requests (listed methods; POST only
//! with `Idempotency-Key`), only while the body can be replayed (see [`crate::replay`]), only
//! within the retry budget, and never when the wait would overrun the call's [`Deadline`].
//! Each attempt goes through the inner service again, so a balancer below picks anew (and can
//! avoid the endpoints in [`Attempt::tried`]). Every decision is reported to an observer.
//!
//! The inner service reports failures as responses (the proxy's own 502/503/504 carry
//! `ferrymesh-error`), so one classifier over responses covers connect failures, resets,
//! timeouts and status codes alike.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response};
use rand::Rng as _;
use tokio::time::Instant;
use tower::{Service, ServiceExt as _};

pub use crate::budget::RetryBudget;
use crate::replay::ReplayBody;

/// How long to wait between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Strategy {
    /// Always `base`.
    Constant,
    /// `base x 2^(n-1)`, capped at `max`.
    Exponential,
    /// Uniform in `[0, min(max, base x 2^(n-1))]`.
    ExponentialFullJitter,
    /// Uniform in `[base, min(max, previous x 3)]`.
    DecorrelatedJitter,
}

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Backoff {
    /// Strategy.
    pub strategy: Strategy,
    /// First step.
    pub base: Duration,
    /// Cap.
    pub max: Duration,
}

impl Backoff {
    /// The wait before retry number `n` (1-based), given the previous wait.
    pub fn delay(&self, n: u32, previous: Duration) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX))
            .min(self.max);
        let mut rng = rand::rng();
        match self.strategy {
            Strategy::Constant => self.base,
            Strategy::Exponential => exp,
            Strategy::ExponentialFullJitter => rng.random_range(Duration::ZERO..=exp),
            Strategy::DecorrelatedJitter => {
                let upper = previous
                    .max(self.base)
                    .saturating_mul(3)
                    .min(self.max)
                    .max(self.base);
                rng.random_range(self.base..=upper)
            }
        }
    }
}

/// What the retry layer does (no knowledge of where it came from).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RetryPolicy {
    /// Extra attempts.
    pub attempts: u32,
    /// Backoff.
    pub backoff: Backoff,
    /// Methods that may be retried (POST only with `Idempotency-Key`).
    #[serde(serialize_with = "method_names")]
    pub methods: Vec<Method>,
    /// Wait as long as `Retry-After` asks when it is longer than the backoff.
    pub respect_retry_after: bool,
    /// Larger bodies are never retried.
    pub max_request_body_bytes: usize,
}

fn method_names<S: serde::Serializer>(v: &[Method], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(Method::as_str))
}

/// Why a retry did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The method may not be retried (or POST without `Idempotency-Key`).
    NotIdempotent,
    /// The request body passed the replay cap.
    BodyTooLarge,
    /// The retry budget is spent.
    BudgetExhausted,
    /// The wait plus an attempt would not fit in the time left.
    Deadline,
    /// All attempts are used.
    AttemptsExhausted,
}

impl Skip {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NotIdempotent => "not-idempotent",
            Skip::BodyTooLarge => "body-too-large",
            Skip::BudgetExhausted => "budget-exhausted",
            Skip::Deadline => "deadline",
            Skip::AttemptsExhausted => "attempts-exhausted",
        }
    }
}

/// A decision, for metrics, logs and `ferrymesh-explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryEvent {
    /// Attempt `attempt` (1-based) will be retried after `delay` because of `reason`.
    Retry {
        /// The attempt that failed.
        attempt: u32,
        /// The classifier's reason.
        reason: &'static str,
        /// The wait before the next attempt.
        delay: Duration,
    },
    /// A retryable failure was not retried.
    Skipped {
        /// The classifier's reason for the failure.
        reason: &'static str,
        /// Why no retry.
        skip: Skip,
    },
}

/// Decides whether a response may be retried: `Some(reason)` when it is a retryable failure.
pub type Classifier<B> = Arc<dyn Fn(&Response<B>) -> Option<&'static str> + Send + Sync>;

/// Receives every decision, with the extensions of the caller's request (so one observer,
/// built with the stack, can note the decision where that request asks for it).
pub type Observer = Arc<dyn Fn(&RetryEvent, &http::Extensions) + Send + Sync>;

/// The time by which the whole call must be done (set by the caller's request timeout).
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Instant);

/// Set on every attempt's request: its number (1-based) and the endpoints earlier attempts used,
/// so a balancer can pick another one when it can.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    /// Endpoints used so far (the balancer below records them).
    pub tried: Arc<Mutex<Vec<SocketAddr>>>,
}

/// The retry middleware; `RB` is the response body type the classifier reads.
pub struct Retry<S, RB> {
    inner: S,
    policy: Arc<RetryPolicy>,
    budget: RetryBudget,
    classify: Classifier<RB>,
    observe: Observer,
}

impl<S: Clone, RB> Clone for Retry<S, RB> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
            budget: self.budget.clone(),
            classify: self.classify.clone(),
            observe: self.observe.clone(),
        }
    }
}

impl<S: std::fmt::Debug, RB> std::fmt::Debug for Retry<S, RB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<S, RB> Retry<S, RB> {
    /// Wraps `inner`.
    pub fn new(
        inner: S,
        policy: Arc<RetryPolicy>,
        budget: RetryBudget,
        classify: Classifier<RB>,
        observe: Observer,
    ) -> Self {
        Self {
            inner,
            policy,
            budget,
            classify,
            observe,
        }
    }
}

fn idempotent(policy: &RetryPolicy, method: &Method, headers: &http::HeaderMap) -> bool {
    if *method == Method::POST {
        // NOTE: POST is retried only with an Idempotency-Key, listed or not: the key is the
        // caller's promise that a second delivery is safe.
        return headers.contains_key("idempotency-key");
    }
    policy.methods.contains(method)
}

/// `Retry-After` as a duration: delta-seconds or an HTTP-date.
fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let text = value?.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(text).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

impl<S, B, RB> Service<Request<B>> for Retry<S, RB>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // NOTE: the ready clone serves the first attempt; later attempts wait for readiness
        // again (the breaker or balancer below may have changed its mind).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (policy, budget, classify, observe) = (
            self.policy.clone(),
            self.budget.clone(),
            self.classify.clone(),
            self.observe.clone(),
        );
        Box::pin(async move {
            budget.deposit();
            let may_retry = policy.attempts > 0 && idempotent(&policy, req.method(), req.headers());
            if !may_retry {
                // Nothing can be sent twice: one attempt, no copy of the head, no buffer.
                let extensions = req.extensions().clone();
                // NOTE: no `Attempt` either: below, a request without one is the first and only.
                let mut rsp = inner.call(req.map(ReplayBody::once)).await?;
                if let Some(reason) = classify(&rsp)
                    && policy.attempts > 0
                {
                    let skip = Skip::NotIdempotent;
                    observe(&RetryEvent::Skipped { reason, skip }, &extensions);
                    rsp.extensions_mut().insert(skip);
                }
                return Ok(rsp);
            }
            let (parts, body) = req.into_parts();
            let deadline = parts.extensions.get::<Deadline>().copied();
            let body = ReplayBody::new(body, policy.max_request_body_bytes);
            let tried = Arc::new(Mutex::new(Vec::new()));
            let mut previous_delay = Duration::ZERO;
            let mut number = 1;
            loop {
                let mut attempt = Request::new(body.replay());
                *attempt.method_mut() = parts.method.clone();
                *attempt.uri_mut() = parts.uri.clone();
                *attempt.version_mut() = parts.version;
                *attempt.headers_mut() = parts.headers.clone();
                // Every attempt carries the caller's extensions (deadline, explain, ...).
                *attempt.extensions_mut() = parts.extensions.clone();
                attempt.extensions_mut().insert(Attempt {
                    number,
                    tried: tried.clone(),
                });
                let started = Instant::now();
                let rsp = if number == 1 {
                    inner.call(attempt).await?
                } else {
                    inner.ready().await?.call(attempt).await?
                };
                let Some(reason) = classify(&rsp) else {
                    return Ok(rsp);
                };
                let decision = if number > policy.attempts {
                    Err(Skip::AttemptsExhausted)
                } else if !body.is_replayable() {
                    Err(Skip::BodyTooLarge)
                } else {
                    let mut delay = policy.backoff.delay(number, previous_delay);
                    if policy.respect_retry_after
                        && let Some(after) =
                            retry_after(rsp.headers().get(http::header::RETRY_AFTER))
                    {
                        delay = delay.max(after);
                    }
                    // NOTE: an attempt is assumed to take as long as the last one did: a retry
                    // that cannot finish before the deadline is not started.
                    match deadline {
                        Some(Deadline(at)) if Instant::now() + delay + started.elapsed() >= at => {
                            Err(Skip::Deadline)
                        }
                        _ if !budget.withdraw() => Err(Skip::BudgetExhausted),
                        _ => Ok(delay),
                    }
                };
                let delay = match decision {
                    Ok(delay) => delay,
                    Err(skip) => {
                        observe(&RetryEvent::Skipped { reason, skip }, &parts.extensions);
                        // NOTE: the caller (fallback, explain) can see why it was not retried.
                        let mut rsp = rsp;
                        rsp.extensions_mut().insert(skip);
                        return Ok(rsp);
                    }
                };
                observe(
                    &RetryEvent::Retry {
                        attempt: number,
                        reason,
                        delay,
                    },
                    &parts.extensions,
                );
                drop(rsp);
                previous_delay = delay;
                tokio::time::sleep(delay).await;
                number += 1;
            }
        })
    }
}

#[cfg(test)]
mod tests;
