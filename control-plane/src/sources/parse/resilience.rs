//! `ResiliencePolicy` spec: every section of API.md 2.a, checked with every validation rule
//! (the same rules the CRD's OpenAPI + CEL schema states), then turned into the protobuf
//! sections the proxies get. Messages start with the rule they break.

use std::time::Duration;

use ferrymesh_proto::config::v1 as cfg;
use serde::Deserialize;

use super::{FieldError, field_err, from_json};
use crate::crd::resilience::{
    Backoff as RawBackoff, Breaker as RawBreaker, Budget as RawBudget,
    HealthCheck as RawHealthCheck, LoadBalancer as RawLoadBalancer, Outlier as RawOutlier, Ratio,
    ResiliencePolicySpec as RawSpec, Retry as RawRetry, Timeouts as RawTimeouts,
};
use crate::sources::{ResilienceSections, TargetRef};

mod answers;
use answers::{cache, fallback};

#[derive(Deserialize)]
struct Raw {
    spec: RawSpec,
}

/// Reads durations and ratios of one section, naming fields under `prefix`.
struct Section<'a> {
    prefix: &'a str,
}

impl Section<'_> {
    fn path(&self, field: &str) -> String {
        format!("spec.{}.{field}", self.prefix)
    }

    fn duration(
        &self,
        field: &str,
        v: Option<&String>,
        default: Duration,
    ) -> Result<Duration, FieldError> {
        match v {
            None => Ok(default),
            Some(t) => ferrymesh_proto::duration::parse(t).map_err(|e| {
                field_err(self.path(field), format!("duration format (GEP-2257): {e}"))
            }),
        }
    }

    fn ratio(&self, field: &str, v: Option<&Ratio>, default: f64) -> Result<f64, FieldError> {
        let value = match v {
            None => return Ok(default),
            Some(Ratio::Number(n)) => *n,
            Some(Ratio::Text(t)) => t.trim().parse::<f64>().map_err(|_| {
                field_err(
                    self.path(field),
                    format!("ratio is a decimal 0..1: {t:?} is not a number"),
                )
            })?,
        };
        if (0.0..=1.0).contains(&value) {
            Ok(value)
        } else {
            Err(field_err(
                self.path(field),
                format!("ratio is a decimal 0..1: got {value}"),
            ))
        }
    }
}

fn pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).expect("GEP-2257 durations fit a protobuf Duration")
}

/// Parses and validates a ResiliencePolicy's spec.
pub(super) fn spec(
    json: &serde_json::Value,
) -> Result<(Vec<TargetRef>, ResilienceSections), FieldError> {
    let raw: Raw = from_json(json)?;
    let s = raw.spec;
    let mut out = ResilienceSections::default();
    if let Some(t) = &s.timeouts {
        out.timeouts = Some(timeouts(t)?);
    }
    if let Some(r) = &s.retry {
        let (retry, budget) = retry(r)?;
        out.retry = Some(retry);
        out.budget = Some(budget);
    }
    if let Some(b) = &s.circuit_breaker {
        out.breaker = Some(breaker(b)?);
    }
    if let Some(o) = &s.outlier_detection {
        out.outlier = Some(outlier(o)?);
    }
    if let Some(h) = &s.health_check {
        out.health_check = Some(health_check(h)?);
    }
    if let Some(f) = &s.fallback {
        out.fallback = Some(fallback(f)?);
    }
    if let Some(c) = &s.cache {
        out.cache = Some(cache(c)?);
    }
    if let Some(l) = &s.load_balancer {
        out.lb = Some(load_balancer(l)?);
    }
    Ok((s.target_refs, out))
}

fn timeouts(t: &RawTimeouts) -> Result<cfg::Timeouts, FieldError> {
    let s = Section { prefix: "timeouts" };
    let opt = |field: &str, v: Option<&String>| -> Result<Option<Duration>, FieldError> {
        v.map(|v| s.duration(field, Some(v), Duration::ZERO))
            .transpose()
    };
    let request = opt("request", t.request.as_ref())?;
    let per_try = opt("perTry", t.per_try.as_ref())?;
    if let (Some(r), Some(p)) = (request, per_try)
        && !r.is_zero()
        && !p.is_zero()
        && p > r
    {
        return Err(field_err(
            s.path("perTry"),
            format!(
                "perTry <= request: perTry {} exceeds request {}",
                ferrymesh_proto::duration::format(p),
                ferrymesh_proto::duration::format(r)
            ),
        ));
    }
    let deadline_propagation = match t.deadline_propagation.as_deref() {
        None | Some("Enabled") => true,
        Some("Disabled") => false,
        Some(other) => {
            return Err(field_err(
                s.path("deadlinePropagation"),
                format!("enum Enabled | Disabled: got {other:?}"),
            ));
        }
    };
    Ok(cfg::Timeouts {
        request: request.map(pb),
        per_try: per_try.map(pb),
        connect: opt("connect", t.connect.as_ref())?.map(pb),
        idle: opt("idle", t.idle.as_ref())?.map(pb),
        deadline_propagation,
    })
}

const RETRY_ON: &[(&str, cfg::RetryOn)] = &[
    ("connect-failure", cfg::RetryOn::ConnectFailure),
    ("refused-stream", cfg::RetryOn::RefusedStream),
    ("reset", cfg::RetryOn::Reset),
    ("gateway-error", cfg::RetryOn::GatewayError),
    ("5xx", cfg::RetryOn::ServerError),
    ("per-try-timeout", cfg::RetryOn::PerTryTimeout),
    ("retriable-4xx", cfg::RetryOn::Retriable4xx),
];

/// gRPC codes by their Envoy-style names.
const GRPC_CODES: &[(&str, u32)] = &[
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];

const METHODS: &[&str] = &[
    "GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH", "TRACE",
];

fn retry(r: &RawRetry) -> Result<(cfg::Retry, cfg::RetryBudget), FieldError> {
    let s = Section { prefix: "retry" };
    let attempts = r.attempts.unwrap_or(2);
    if attempts > 10 {
        return Err(field_err(
            s.path("attempts"),
            format!("attempts 0..10: got {attempts}"),
        ));
    }
    let (retry_on, retry_on_status) = retry_on(&s, r.retry_on.as_deref())?;
    let mut grpc_retry_on = Vec::new();
    let default_grpc = vec!["unavailable".to_owned()];
    for (i, item) in r
        .grpc_retry_on
        .as_ref()
        .unwrap_or(&default_grpc)
        .iter()
        .enumerate()
    {
        let Some((_, code)) = GRPC_CODES.iter().find(|(n, _)| n == item) else {
            let names: Vec<_> = GRPC_CODES.iter().map(|(n, _)| *n).collect();
            return Err(field_err(
                format!("{}[{i}]", s.path("grpcRetryOn")),
                format!("grpcRetryOn is one of {}: got {item:?}", names.join(", ")),
            ));
        };
        grpc_retry_on.push(*code);
    }
    let default_methods = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]
        .map(str::to_owned)
        .to_vec();
    let methods = r.methods.clone().unwrap_or(default_methods);
    for (i, m) in methods.iter().enumerate() {
        if !METHODS.contains(&m.as_str()) {
            return Err(field_err(
                format!("{}[{i}]", s.path("methods")),
                format!(
                    "methods are HTTP methods in capitals ({}): got {m:?}",
                    METHODS.join(", ")
                ),
            ));
        }
    }
    Ok((
        cfg::Retry {
            attempts,
            retry_on,
            retry_on_status,
            grpc_retry_on,
            methods,
            backoff: Some(backoff(r.backoff.as_ref())?),
            respect_retry_after: r.respect_retry_after.unwrap_or(true),
            max_request_body_bytes: r.max_request_body_bytes.unwrap_or(65_536),
        },
        budget(r.budget.as_ref())?,
    ))
}

fn retry_on(s: &Section<'_>, items: Option<&[String]>) -> Result<(Vec<i32>, Vec<u32>), FieldError> {
    let mut retry_on = Vec::new();
    let mut retry_on_status = Vec::new();
    let default_on = ["connect-failure", "refused-stream", "reset"].map(str::to_owned);
    for (i, item) in items.unwrap_or(&default_on).iter().enumerate() {
        if let Some((_, v)) = RETRY_ON.iter().find(|(n, _)| n == item) {
            retry_on.push(i32::from(*v));
        } else if item.len() == 3
            && let Ok(code) = item.parse::<u32>()
            && (100..=599).contains(&code)
        {
            retry_on_status.push(code);
        } else {
            let names: Vec<_> = RETRY_ON.iter().map(|(n, _)| *n).collect();
            return Err(field_err(
                format!("{}[{i}]", s.path("retryOn")),
                format!(
                    "retryOn is one of {} or a status code 100..599: got {item:?}",
                    names.join(", ")
                ),
            ));
        }
    }
    Ok((retry_on, retry_on_status))
}

fn backoff(raw: Option<&RawBackoff>) -> Result<cfg::Backoff, FieldError> {
    let b = Section {
        prefix: "retry.backoff",
    };
    let strategy = match raw.and_then(|b| b.strategy.as_deref()) {
        None | Some("ExponentialFullJitter") => cfg::backoff::Strategy::ExponentialFullJitter,
        Some("Constant") => cfg::backoff::Strategy::Constant,
        Some("Exponential") => cfg::backoff::Strategy::Exponential,
        Some("DecorrelatedJitter") => cfg::backoff::Strategy::DecorrelatedJitter,
        Some(other) => {
            return Err(field_err(
                b.path("strategy"),
                format!(
                    "strategy is Constant | Exponential | ExponentialFullJitter | DecorrelatedJitter: got {other:?}"
                ),
            ));
        }
    };
    let base = b.duration(
        "base",
        raw.and_then(|b| b.base.as_ref()),
        Duration::from_millis(25),
    )?;
    let max = b.duration(
        "max",
        raw.and_then(|b| b.max.as_ref()),
        Duration::from_millis(250).max(base),
    )?;
    if base > max {
        return Err(field_err(
            b.path("base"),
            format!(
                "base <= max: base {} exceeds max {}",
                ferrymesh_proto::duration::format(base),
                ferrymesh_proto::duration::format(max)
            ),
        ));
    }
    Ok(cfg::Backoff {
        strategy: strategy.into(),
        base: Some(pb(base)),
        max: Some(pb(max)),
    })
}

fn budget(raw: Option<&RawBudget>) -> Result<cfg::RetryBudget, FieldError> {
    let g = Section {
        prefix: "retry.budget",
    };
    let window = g.duration(
        "window",
        raw.and_then(|b| b.window.as_ref()),
        Duration::from_secs(10),
    )?;
    if window.is_zero() {
        return Err(field_err(g.path("window"), "window > 0s"));
    }
    Ok(cfg::RetryBudget {
        ratio: g.ratio("ratio", raw.and_then(|b| b.ratio.as_ref()), 0.2)?,
        min_retries_per_second: raw.and_then(|b| b.min_retries_per_second).unwrap_or(10),
        window: Some(pb(window)),
    })
}

const FAILURE_ON: &[(&str, cfg::FailureOn)] = &[
    ("5xx", cfg::FailureOn::FailureServerError),
    ("connect-failure", cfg::FailureOn::FailureConnectFailure),
    ("timeout", cfg::FailureOn::FailureTimeout),
    ("gateway-error", cfg::FailureOn::FailureGatewayError),
];

fn breaker(b: &RawBreaker) -> Result<cfg::CircuitBreaker, FieldError> {
    let s = Section {
        prefix: "circuitBreaker",
    };
    let limits = b.limits.as_ref();
    // Refused, as the CRD's schema refuses them: not enforced by the proxy.
    let lim = Section {
        prefix: "circuitBreaker.limits",
    };
    if limits.is_some_and(|l| l.max_connections.is_some()) {
        return Err(field_err(
            lim.path("maxConnections"),
            crate::crd::resilience::MAX_CONNECTIONS_REFUSED,
        ));
    }
    if limits.is_some_and(|l| l.max_pending_requests.is_some()) {
        return Err(field_err(
            lim.path("maxPendingRequests"),
            crate::crd::resilience::MAX_PENDING_REFUSED,
        ));
    }
    let trip = b.trip_when.as_ref();
    let t = Section {
        prefix: "circuitBreaker.tripWhen",
    };
    let minimum_requests = trip.and_then(|t| t.minimum_requests).unwrap_or(20);
    if minimum_requests < 1 {
        return Err(field_err(t.path("minimumRequests"), "minimumRequests >= 1"));
    }
    let mut failure_on = Vec::new();
    let default_on = ["5xx", "connect-failure", "timeout"]
        .map(str::to_owned)
        .to_vec();
    for (i, item) in b
        .failure_on
        .as_ref()
        .unwrap_or(&default_on)
        .iter()
        .enumerate()
    {
        let Some((_, v)) = FAILURE_ON.iter().find(|(n, _)| n == item) else {
            return Err(field_err(
                format!("{}[{i}]", s.path("failureOn")),
                format!(
                    "failureOn is one of 5xx, connect-failure, timeout, gateway-error: got {item:?}"
                ),
            ));
        };
        failure_on.push(i32::from(*v));
    }
    let o = Section {
        prefix: "circuitBreaker.open",
    };
    let open = b.open.as_ref();
    let open_base = o.duration(
        "base",
        open.and_then(|o| o.base.as_ref()),
        Duration::from_secs(5),
    )?;
    let open_max = o.duration(
        "max",
        open.and_then(|o| o.max.as_ref()),
        Duration::from_mins(1).max(open_base),
    )?;
    if open_base > open_max {
        return Err(field_err(o.path("base"), "base <= max"));
    }
    let half_open_probes = b.half_open_probes.unwrap_or(3);
    if half_open_probes < 1 {
        return Err(field_err(s.path("halfOpenProbes"), "halfOpenProbes >= 1"));
    }
    let limit = |v: Option<u32>| v.unwrap_or(1024);
    Ok(cfg::CircuitBreaker {
        // Refused above: nothing enforces them, and a proxy refuses a policy that sets them.
        max_connections: 0,
        max_pending_requests: 0,
        max_requests: limit(limits.and_then(|l| l.max_requests)),
        consecutive_failures: trip.and_then(|t| t.consecutive_failures).unwrap_or(7),
        failure_ratio: t.ratio(
            "failureRatio",
            trip.and_then(|t| t.failure_ratio.as_ref()),
            0.5,
        )?,
        minimum_requests,
        window: Some(pb(t.duration(
            "window",
            trip.and_then(|t| t.window.as_ref()),
            Duration::from_secs(10),
        )?)),
        failure_on,
        open_base: Some(pb(open_base)),
        open_max: Some(pb(open_max)),
        open_jitter: o.ratio("jitter", open.and_then(|o| o.jitter.as_ref()), 0.5)?,
        half_open_probes,
    })
}

fn outlier(o: &RawOutlier) -> Result<cfg::OutlierDetection, FieldError> {
    let s = Section {
        prefix: "outlierDetection",
    };
    let percent = o.max_ejection_percent.unwrap_or(10);
    if percent > 100 {
        return Err(field_err(
            s.path("maxEjectionPercent"),
            format!("percentage 0..100: got {percent}"),
        ));
    }
    let base = s.duration(
        "baseEjectionTime",
        o.base_ejection_time.as_ref(),
        Duration::from_secs(30),
    )?;
    let max = s.duration(
        "maxEjectionTime",
        o.max_ejection_time.as_ref(),
        Duration::from_mins(5).max(base),
    )?;
    if base > max {
        return Err(field_err(
            s.path("baseEjectionTime"),
            "baseEjectionTime <= maxEjectionTime",
        ));
    }
    Ok(cfg::OutlierDetection {
        consecutive_errors: o.consecutive_errors.unwrap_or(5),
        consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
        interval: Some(pb(s.duration(
            "interval",
            o.interval.as_ref(),
            Duration::from_secs(10),
        )?)),
        base_ejection_time: Some(pb(base)),
        max_ejection_time: Some(pb(max)),
        max_ejection_percent: percent,
        min_ready_endpoints: o.min_ready_endpoints.unwrap_or(1),
    })
}

fn health_check(h: &RawHealthCheck) -> Result<cfg::HealthCheck, FieldError> {
    let s = Section {
        prefix: "healthCheck",
    };
    let check = match (&h.http, &h.tcp, &h.grpc) {
        (Some(http), None, None) => {
            if !http.path.starts_with('/') {
                return Err(field_err(s.path("http.path"), "path starts with /"));
            }
            let statuses = http.expected_statuses.clone().unwrap_or_else(|| vec![200]);
            if let Some(bad) = statuses.iter().find(|c| !(100..=599).contains(*c)) {
                return Err(field_err(
                    s.path("http.expectedStatuses"),
                    format!("status codes 100..599: got {bad}"),
                ));
            }
            cfg::health_check::Check::Http(cfg::HttpCheck {
                path: http.path.clone(),
                expected_statuses: statuses.into_iter().map(u32::from).collect(),
            })
        }
        (None, Some(_), None) => cfg::health_check::Check::Tcp(cfg::TcpCheck {}),
        (None, None, Some(g)) => cfg::health_check::Check::Grpc(cfg::GrpcCheck {
            service: g.service.clone(),
        }),
        _ => return Err(field_err(s.path("http"), "exactly one of http, tcp, grpc")),
    };
    let interval = s.duration("interval", h.interval.as_ref(), Duration::from_secs(3))?;
    let timeout = s.duration("timeout", h.timeout.as_ref(), Duration::from_secs(1))?;
    if interval.is_zero() || timeout.is_zero() {
        return Err(field_err(s.path("interval"), "interval and timeout > 0s"));
    }
    let unhealthy = h.unhealthy_threshold.unwrap_or(3);
    let healthy = h.healthy_threshold.unwrap_or(1);
    if unhealthy < 1 || healthy < 1 {
        return Err(field_err(s.path("unhealthyThreshold"), "thresholds >= 1"));
    }
    Ok(cfg::HealthCheck {
        check: Some(check),
        port: u32::from(h.port.unwrap_or(0)),
        interval: Some(pb(interval)),
        timeout: Some(pb(timeout)),
        unhealthy_threshold: unhealthy,
        healthy_threshold: healthy,
        initial_jitter: Some(pb(s.duration(
            "initialJitter",
            h.initial_jitter.as_ref(),
            Duration::from_secs(1),
        )?)),
    })
}

fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn load_balancer(l: &RawLoadBalancer) -> Result<cfg::LoadBalancer, FieldError> {
    use cfg::load_balancer::Algorithm;
    let s = Section {
        prefix: "loadBalancer",
    };
    let algorithm = match l.algorithm.as_deref() {
        None | Some("PeakEWMA") => Algorithm::PeakEwma,
        Some("RoundRobin") => Algorithm::RoundRobin,
        Some("LeastRequest") => Algorithm::LeastRequest,
        Some("Random") => Algorithm::Random,
        Some("ConsistentHash") => Algorithm::ConsistentHash,
        Some(other) => {
            return Err(field_err(
                s.path("algorithm"),
                format!(
                    "algorithm is RoundRobin | LeastRequest | PeakEWMA | Random | ConsistentHash: got {other:?}"
                ),
            ));
        }
    };
    let hash_header = match (algorithm, &l.hash_on) {
        (Algorithm::ConsistentHash, Some(h)) if !http_header_name_invalid(&h.header) => {
            h.header.to_ascii_lowercase()
        }
        (Algorithm::ConsistentHash, Some(h)) => {
            return Err(field_err(
                s.path("hashOn.header"),
                format!("header names are tokens: {:?}", h.header),
            ));
        }
        (Algorithm::ConsistentHash, None) => {
            return Err(field_err(
                s.path("hashOn"),
                "hashOn is required iff algorithm is ConsistentHash: missing",
            ));
        }
        (_, Some(_)) => {
            return Err(field_err(
                s.path("hashOn"),
                "hashOn is required iff algorithm is ConsistentHash: set without it",
            ));
        }
        (_, None) => String::new(),
    };
    let prefer_same_zone = match l.zone_aware.as_deref() {
        None | Some("Off") => false,
        Some("PreferSameZone") => true,
        Some(other) => {
            return Err(field_err(
                s.path("zoneAware"),
                format!("zoneAware is Off | PreferSameZone: got {other:?}"),
            ));
        }
    };
    Ok(cfg::LoadBalancer {
        algorithm: algorithm.into(),
        hash_header,
        prefer_same_zone,
    })
}
