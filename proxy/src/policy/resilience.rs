//! The resilience sections of a client policy as the proxy uses them, converted from protobuf
//! and checked again (the controller validated them, but a proxy never trusts its input: a
//! section that does not convert NACKs the resource and the last good policy stays).

use std::time::Duration;

use ferrymesh_proto::config::v1 as cfg;
use ferrymesh_resilience::breaker::BreakerConfig;
use ferrymesh_resilience::outlier::OutlierConfig;
use ferrymesh_resilience::replay::MAX_BUFFERED_BYTES;
use ferrymesh_resilience::retry::{self, Backoff, Strategy};
use http::{Method, StatusCode};
use serde::Serialize;

use super::InvalidPolicy;

mod answers;
mod fault;

pub use answers::{CachePolicy, FallbackPolicy, FallbackTarget, FallbackTrigger};
pub(super) use answers::{cache, fallback};
pub(super) use fault::fault;
pub use fault::{FaultAbort, FaultPolicy};

pub(super) fn duration(
    d: Option<prost_types::Duration>,
    field: &'static str,
) -> Result<Option<Duration>, InvalidPolicy> {
    d.map(|d| Duration::try_from(d).map_err(|_| InvalidPolicy::Duration(field)))
        .transpose()
}

fn required(
    d: Option<prost_types::Duration>,
    field: &'static str,
) -> Result<Duration, InvalidPolicy> {
    duration(d, field)?.ok_or(InvalidPolicy::Missing(field))
}

fn ratio(v: f64, field: &'static str) -> Result<f64, InvalidPolicy> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(InvalidPolicy::Range(field, v.to_string()))
    }
}

fn status(code: u32, field: &'static str) -> Result<StatusCode, InvalidPolicy> {
    u16::try_from(code)
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| InvalidPolicy::Range(field, code.to_string()))
}

/// When a failed attempt is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The connection could not be made.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM (the server did not process it).
    RefusedStream,
    /// The connection or stream was reset before a response.
    Reset,
    /// 502, 503, 504.
    GatewayError,
    /// Any 5xx.
    ServerError,
    /// The attempt hit the per-try timeout.
    PerTryTimeout,
    /// 409.
    Retriable4xx,
}

/// The retry section: what the retry layer itself takes (attempts, backoff, methods,
/// `Retry-After`, the body cap), what the proxy classifies as retryable, and the budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// The retry layer's own settings.
    #[serde(flatten)]
    pub layer: retry::RetryPolicy,
    /// Failure kinds retried.
    pub retry_on: Vec<RetryOn>,
    /// Status codes retried.
    #[serde(serialize_with = "codes")]
    pub retry_on_status: Vec<StatusCode>,
    /// gRPC codes retried.
    pub grpc_retry_on: Vec<u32>,
    /// The retry budget.
    pub budget: BudgetPolicy,
}

fn codes<S: serde::Serializer>(v: &[StatusCode], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(StatusCode::as_u16))
}

fn methods<S: serde::Serializer>(v: &[Method], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(Method::as_str))
}

/// The retry budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetPolicy {
    /// Retries may add at most this fraction of the requests in the window ...
    pub ratio: f64,
    /// ... plus this many per second.
    pub min_retries_per_second: u32,
    /// The window.
    pub window: Duration,
}

impl RetryPolicy {
    /// What a service without a retry section gets: one more attempt, on another endpoint,
    /// when the connection could not be made or the stream was refused (the request never
    /// reached the app), for idempotent methods only, within the default budget. A rolling
    /// restart then loses nothing; `retry: {attempts: 0}` turns it off.
    pub fn connect_failures() -> RetryPolicy {
        RetryPolicy {
            layer: retry::RetryPolicy {
                attempts: 1,
                backoff: Backoff {
                    strategy: Strategy::ExponentialFullJitter,
                    base: Duration::from_millis(5),
                    max: Duration::from_millis(25),
                },
                methods: [
                    Method::GET,
                    Method::HEAD,
                    Method::OPTIONS,
                    Method::PUT,
                    Method::DELETE,
                ]
                .to_vec(),
                respect_retry_after: false,
                max_request_body_bytes: MAX_BUFFERED_BYTES,
            },
            retry_on: vec![RetryOn::ConnectFailure, RetryOn::RefusedStream],
            retry_on_status: Vec::new(),
            grpc_retry_on: Vec::new(),
            budget: BudgetPolicy::default(),
        }
    }
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_retries_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

pub(super) fn retry(
    r: cfg::Retry,
    budget: Option<cfg::RetryBudget>,
) -> Result<RetryPolicy, InvalidPolicy> {
    if r.attempts > 10 {
        return Err(InvalidPolicy::Range(
            "retry.attempts",
            r.attempts.to_string(),
        ));
    }
    let retry_on = r
        .retry_on
        .iter()
        .map(|v| match cfg::RetryOn::try_from(*v) {
            Ok(cfg::RetryOn::ConnectFailure) => Ok(RetryOn::ConnectFailure),
            Ok(cfg::RetryOn::RefusedStream) => Ok(RetryOn::RefusedStream),
            Ok(cfg::RetryOn::Reset) => Ok(RetryOn::Reset),
            Ok(cfg::RetryOn::GatewayError) => Ok(RetryOn::GatewayError),
            Ok(cfg::RetryOn::ServerError) => Ok(RetryOn::ServerError),
            Ok(cfg::RetryOn::PerTryTimeout) => Ok(RetryOn::PerTryTimeout),
            Ok(cfg::RetryOn::Retriable4xx) => Ok(RetryOn::Retriable4xx),
            Ok(cfg::RetryOn::Unspecified) | Err(_) => Err(InvalidPolicy::Enum("retry.retryOn", *v)),
        })
        .collect::<Result<_, _>>()?;
    let retry_on_status = r
        .retry_on_status
        .iter()
        .map(|c| status(*c, "retry.retryOn"))
        .collect::<Result<_, _>>()?;
    if let Some(bad) = r.grpc_retry_on.iter().find(|c| **c > 16) {
        return Err(InvalidPolicy::Range("retry.grpcRetryOn", bad.to_string()));
    }
    let methods = r
        .methods
        .iter()
        .map(|m| {
            Method::from_bytes(m.as_bytes())
                .map_err(|_| InvalidPolicy::Range("retry.methods", m.clone()))
        })
        .collect::<Result<_, _>>()?;
    let b = r.backoff.unwrap_or_default();
    let strategy = match cfg::backoff::Strategy::try_from(b.strategy) {
        Ok(cfg::backoff::Strategy::Constant) => Strategy::Constant,
        Ok(cfg::backoff::Strategy::Exponential) => Strategy::Exponential,
        Ok(cfg::backoff::Strategy::ExponentialFullJitter | cfg::backoff::Strategy::Unspecified) => {
            Strategy::ExponentialFullJitter
        }
        Ok(cfg::backoff::Strategy::DecorrelatedJitter) => Strategy::DecorrelatedJitter,
        Err(_) => return Err(InvalidPolicy::Enum("retry.backoff.strategy", b.strategy)),
    };
    let base = duration(b.base, "retry.backoff.base")?.unwrap_or(Duration::from_millis(25));
    let max = duration(b.max, "retry.backoff.max")?
        .unwrap_or(Duration::from_millis(250))
        .max(base);
    let budget = match budget {
        None => BudgetPolicy::default(),
        Some(g) => BudgetPolicy {
            ratio: ratio(g.ratio, "retry.budget.ratio")?,
            min_retries_per_second: g.min_retries_per_second,
            window: required(g.window, "retry.budget.window")?,
        },
    };
    if budget.window.is_zero() {
        return Err(InvalidPolicy::Range("retry.budget.window", "0s".into()));
    }
    Ok(RetryPolicy {
        layer: retry::RetryPolicy {
            attempts: r.attempts,
            backoff: Backoff {
                strategy,
                base,
                max,
            },
            methods,
            respect_retry_after: r.respect_retry_after,
            max_request_body_bytes: r.max_request_body_bytes as usize,
        },
        retry_on,
        retry_on_status,
        grpc_retry_on: r.grpc_retry_on,
        budget,
    })
}

/// What counts as a failure for the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureOn {
    /// Any 5xx.
    ServerError,
    /// The connection could not be made.
    ConnectFailure,
    /// A timeout.
    Timeout,
    /// 502, 503, 504.
    GatewayError,
}

/// The circuit breaker section (with its bulkhead of requests in flight): the breaker's own
/// settings and what counts as a failure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerPolicy {
    /// The breaker's settings.
    #[serde(flatten)]
    pub config: BreakerConfig,
    /// What counts as a failure.
    pub failure_on: Vec<FailureOn>,
}

pub(super) fn breaker(b: &cfg::CircuitBreaker) -> Result<BreakerPolicy, InvalidPolicy> {
    // NOTE: the controller refuses these two (nothing enforces them); a proxy refuses them too
    // rather than accept a limit it would ignore.
    if b.max_connections != 0 {
        return Err(InvalidPolicy::Range(
            "circuitBreaker.limits.maxConnections",
            "not enforced".into(),
        ));
    }
    if b.max_pending_requests != 0 {
        return Err(InvalidPolicy::Range(
            "circuitBreaker.limits.maxPendingRequests",
            "not enforced".into(),
        ));
    }
    let failure_on = b
        .failure_on
        .iter()
        .map(|v| match cfg::FailureOn::try_from(*v) {
            Ok(cfg::FailureOn::FailureServerError) => Ok(FailureOn::ServerError),
            Ok(cfg::FailureOn::FailureConnectFailure) => Ok(FailureOn::ConnectFailure),
            Ok(cfg::FailureOn::FailureTimeout) => Ok(FailureOn::Timeout),
            Ok(cfg::FailureOn::FailureGatewayError) => Ok(FailureOn::GatewayError),
            Ok(cfg::FailureOn::Unspecified) | Err(_) => {
                Err(InvalidPolicy::Enum("circuitBreaker.failureOn", *v))
            }
        })
        .collect::<Result<_, _>>()?;
    if b.minimum_requests == 0 {
        return Err(InvalidPolicy::Range(
            "circuitBreaker.tripWhen.minimumRequests",
            "0".into(),
        ));
    }
    if b.half_open_probes == 0 {
        return Err(InvalidPolicy::Range(
            "circuitBreaker.halfOpenProbes",
            "0".into(),
        ));
    }
    let open_base = required(b.open_base, "circuitBreaker.open.base")?;
    let open_max = required(b.open_max, "circuitBreaker.open.max")?;
    if open_base > open_max {
        return Err(InvalidPolicy::Range(
            "circuitBreaker.open.base",
            format!("{open_base:?} > max {open_max:?}"),
        ));
    }
    Ok(BreakerPolicy {
        config: BreakerConfig {
            max_requests: b.max_requests as usize,
            consecutive_failures: b.consecutive_failures,
            failure_ratio: ratio(b.failure_ratio, "circuitBreaker.tripWhen.failureRatio")?,
            minimum_requests: b.minimum_requests,
            window: required(b.window, "circuitBreaker.tripWhen.window")?,
            open_base,
            open_max,
            open_jitter: ratio(b.open_jitter, "circuitBreaker.open.jitter")?,
            half_open_probes: b.half_open_probes,
        },
        failure_on,
    })
}

/// Outlier detection (per-endpoint ejection): the resilience crate's settings as they are.
pub type OutlierPolicy = OutlierConfig;

pub(super) fn outlier(o: cfg::OutlierDetection) -> Result<OutlierPolicy, InvalidPolicy> {
    if o.max_ejection_percent > 100 {
        return Err(InvalidPolicy::Range(
            "outlierDetection.maxEjectionPercent",
            o.max_ejection_percent.to_string(),
        ));
    }
    Ok(OutlierPolicy {
        consecutive_errors: o.consecutive_errors,
        consecutive_gateway_errors: o.consecutive_gateway_errors,
        interval: required(o.interval, "outlierDetection.interval")?,
        base_ejection_time: required(o.base_ejection_time, "outlierDetection.baseEjectionTime")?,
        max_ejection_time: required(o.max_ejection_time, "outlierDetection.maxEjectionTime")?,
        max_ejection_percent: o.max_ejection_percent,
        min_ready_endpoints: o.min_ready_endpoints,
    })
}

/// What an active health check asks.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    /// GET `path`, healthy on one of `statuses`.
    Http {
        /// Path.
        path: String,
        /// Healthy statuses.
        #[serde(serialize_with = "codes")]
        statuses: Vec<StatusCode>,
    },
    /// A TCP connect.
    Tcp,
    /// grpc.health.v1 Check for `service`.
    Grpc {
        /// Service name ("" = the server).
        service: String,
    },
}

/// Active health checking.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthCheckPolicy {
    /// The check.
    pub check: Check,
    /// Port (0: the endpoint's).
    pub port: u16,
    /// Between checks.
    pub interval: Duration,
    /// Per check.
    pub timeout: Duration,
    /// Failures in a row to mark unhealthy.
    pub unhealthy_threshold: u32,
    /// Successes in a row to mark healthy again.
    pub healthy_threshold: u32,
    /// Random delay before the first check.
    pub initial_jitter: Duration,
}

pub(super) fn health_check(h: cfg::HealthCheck) -> Result<HealthCheckPolicy, InvalidPolicy> {
    let check = match h
        .check
        .ok_or(InvalidPolicy::Missing("healthCheck.http|tcp|grpc"))?
    {
        cfg::health_check::Check::Http(c) => Check::Http {
            statuses: c
                .expected_statuses
                .iter()
                .map(|s| status(*s, "healthCheck.http.expectedStatuses"))
                .collect::<Result<_, _>>()?,
            path: c.path,
        },
        cfg::health_check::Check::Tcp(_) => Check::Tcp,
        cfg::health_check::Check::Grpc(g) => Check::Grpc { service: g.service },
    };
    let interval = required(h.interval, "healthCheck.interval")?;
    let timeout = required(h.timeout, "healthCheck.timeout")?;
    if interval.is_zero()
        || timeout.is_zero()
        || h.unhealthy_threshold == 0
        || h.healthy_threshold == 0
    {
        return Err(InvalidPolicy::Range(
            "healthCheck",
            "interval, timeout and thresholds must be > 0".into(),
        ));
    }
    Ok(HealthCheckPolicy {
        check,
        port: u16::try_from(h.port).map_err(|_| InvalidPolicy::Port(h.port))?,
        interval,
        timeout,
        unhealthy_threshold: h.unhealthy_threshold,
        healthy_threshold: h.healthy_threshold,
        initial_jitter: duration(h.initial_jitter, "healthCheck.initialJitter")?
            .unwrap_or_default(),
    })
}
