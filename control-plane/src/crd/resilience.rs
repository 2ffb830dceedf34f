//! `ResiliencePolicy` (API.md 2.a): the resilience contract of a service, one section per
//! pattern. The OpenAPI schema and the CEL rules here are what the API server enforces; the
//! controller checks the same rules again (`sources::parse::resilience`) for the file source
//! and states the rest (cross-object references) in status.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::PolicyStatus;
use crate::model::TargetRef;

/// GEP-2257 durations: one to four `<number><unit>` parts, e.g. `250ms`, `1h30m`, `0s`.
pub const DURATION: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";

/// The resilience contract of the targets.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "policy.ferrymesh.io",
    version = "v1alpha1",
    kind = "ResiliencePolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "rpol",
    category = "ferrymesh",
    doc = "Timeouts, retries, circuit breaking, outlier detection, health checks, fallback, caching and load balancing for a Service, port, route or rule",
    printcolumn(
        name = "Targets",
        type_ = "string",
        json_path = ".spec.targetRefs[*].name"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Programmed",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    cel
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.timeouts) || has(self.retry) || has(self.circuitBreaker) || has(self.outlierDetection) || has(self.healthCheck) || has(self.fallback) || has(self.cache) || has(self.loadBalancer)").message("at least one section: set one of timeouts, retry, circuitBreaker, outlierDetection, healthCheck, fallback, cache, loadBalancer"))]
#[x_kube(validation = Rule::new("self.targetRefs.all(t, (t.group == '' && (t.kind == 'Namespace' || t.kind == 'Service')) || (t.group == 'gateway.networking.k8s.io' && (t.kind == 'HTTPRoute' || t.kind == 'GRPCRoute' || t.kind == 'Gateway')))").message("target kinds are Namespace, Service (group \"\"), HTTPRoute, GRPCRoute, Gateway (group gateway.networking.k8s.io)"))]
pub struct ResiliencePolicySpec {
    /// What the policy applies to: 1 to 16 references in the policy's namespace.
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Vec<TargetRef>,
    /// Whole-request and per-try timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Retries, backoff and the retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Concurrency limits and the per-service breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<Breaker>,
    /// Per-endpoint ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<Outlier>,
    /// Active health checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// What answers when the service cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// Client-side response cache (RFC 9111 freshness).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
    /// How endpoints are picked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
}

/// Timeouts (GEP-1742 names in brackets).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.request) || !has(self.perTry) || duration(self.request) == duration('0s') || duration(self.perTry) == duration('0s') || duration(self.perTry) <= duration(self.request)").message("perTry <= request").field_path(".perTry"))]
pub struct Timeouts {
    /// The whole call, retries and backoff included (`request`); `0s`: none.
    #[schemars(regex(pattern = DURATION))]
    pub request: Option<String>,
    /// Each attempt (`backendRequest`); at most `request`.
    #[schemars(regex(pattern = DURATION))]
    pub per_try: Option<String>,
    /// TCP (and TLS) connect.
    #[schemars(regex(pattern = DURATION))]
    pub connect: Option<String>,
    /// How long a pooled connection may sit idle; `0s`: forever.
    #[schemars(regex(pattern = DURATION))]
    pub idle: Option<String>,
    /// Honour and rewrite `grpc-timeout` and `ferrymesh-timeout`: Enabled (default) | Disabled.
    #[schemars(extend("enum" = ["Enabled", "Disabled"]))]
    pub deadline_propagation: Option<String>,
}

/// Retries.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retry {
    /// Extra attempts (at most 1 + attempts requests), 0..10.
    #[schemars(range(min = 0, max = 10))]
    pub attempts: Option<u32>,
    /// HTTP conditions (connect-failure, refused-stream, reset, gateway-error, 5xx, retriable-4xx)
    /// or status codes 100..599.
    pub retry_on: Option<Vec<String>>,
    /// gRPC status names (unavailable, resource-exhausted, ...).
    pub grpc_retry_on: Option<Vec<String>>,
    /// Methods retried; idempotent ones unless listed.
    pub methods: Option<Vec<String>>,
    /// Pause between attempts.
    pub backoff: Option<Backoff>,
    /// Wait as long as a 429/503's `Retry-After` asks (within `backoff.max`).
    pub respect_retry_after: Option<bool>,
    /// Larger request bodies are never retried.
    pub max_request_body_bytes: Option<u32>,
    /// At most this many retries over the requests.
    pub budget: Option<Budget>,
}

/// Why `limits.maxConnections` is refused.
pub const MAX_CONNECTIONS_REFUSED: &str = "maxConnections is not supported: the proxy pools and reuses connections per endpoint and does not cap them; bound the load with maxRequests";
/// Why `limits.maxPendingRequests` is refused.
pub const MAX_PENDING_REFUSED: &str = "maxPendingRequests is not supported: requests never queue in the proxy; beyond maxRequests they fail fast with 503 overloaded";

/// Backoff between attempts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
#[x_kube(validation = Rule::new("!has(self.base) || !has(self.max) || duration(self.base) <= duration(self.max)").message("backoff.base <= backoff.max").field_path(".base"))]
pub struct Backoff {
    /// Constant | Exponential | ExponentialFullJitter | DecorrelatedJitter.
    #[schemars(extend("enum" = ["Constant", "Exponential", "ExponentialFullJitter", "DecorrelatedJitter"]))]
    pub strategy: Option<String>,
    /// First pause.
    #[schemars(regex(pattern = DURATION))]
    pub base: Option<String>,
    /// Longest pause.
    #[schemars(regex(pattern = DURATION))]
    pub max: Option<String>,
}

/// The retry budget.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Budget {
    /// Retries as a share of requests, a decimal string 0..1.
    pub ratio: Option<Ratio>,
    /// Retries always allowed per second.
    pub min_retries_per_second: Option<u32>,
    /// The sliding window requests are counted over.
    #[schemars(regex(pattern = DURATION))]
    pub window: Option<String>,
}

/// A ratio, as the API writes it: a decimal string 0..1 (`"0.5"`). The file source takes a
/// plain number too.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum Ratio {
    /// `"0.5"`.
    Text(String),
    /// `0.5` (file source only).
    Number(f64),
}

impl JsonSchema for Ratio {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Ratio".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^(0(\\.[0-9]+)?|1(\\.0+)?|\\.[0-9]+)$",
            "description": "A decimal 0..1, as a string (\"0.5\")",
        })
    }
}

/// The breaker and its bulkhead.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Breaker {
    /// Concurrency limits, always on.
    pub limits: Option<Limits>,
    /// When the breaker opens.
    pub trip_when: Option<Trip>,
    /// What counts as a failure: 5xx, connect-failure, timeout, gateway-error or a code.
    pub failure_on: Option<Vec<String>>,
    /// How long it stays open.
    pub open: Option<Open>,
    /// Successes in half-open before it closes; any failure reopens.
    pub half_open_probes: Option<u32>,
}

/// Bulkhead limits. Only `maxRequests` is enforced; the two connection-pool fields Envoy users
/// know are refused with the reason rather than accepted and ignored.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(clippy::struct_field_names)] // the API's names
#[x_kube(validation = Rule::new("!has(self.maxConnections)").message(MAX_CONNECTIONS_REFUSED).field_path(".maxConnections"))]
#[x_kube(validation = Rule::new("!has(self.maxPendingRequests)").message(MAX_PENDING_REFUSED).field_path(".maxPendingRequests"))]
pub struct Limits {
    /// Not supported: refused (see [`MAX_CONNECTIONS_REFUSED`]).
    pub max_connections: Option<u32>,
    /// Not supported: refused (see [`MAX_PENDING_REFUSED`]).
    pub max_pending_requests: Option<u32>,
    /// Requests in flight.
    pub max_requests: Option<u32>,
}

/// Trip conditions.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Trip {
    /// Failures in a row.
    pub consecutive_failures: Option<u32>,
    /// failures / requests at or above this (a decimal string 0..1) ...
    pub failure_ratio: Option<Ratio>,
    /// ... over at least this many requests ...
    #[schemars(range(min = 1))]
    pub minimum_requests: Option<u32>,
    /// ... in this sliding window.
    #[schemars(regex(pattern = DURATION))]
    pub window: Option<String>,
}

/// Open time, growing per consecutive trip.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Open {
    /// First open time.
    #[schemars(regex(pattern = DURATION))]
    pub base: Option<String>,
    /// Longest open time.
    #[schemars(regex(pattern = DURATION))]
    pub max: Option<String>,
    /// Random spread, a decimal string 0..1.
    pub jitter: Option<Ratio>,
}

/// Outlier detection.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Outlier {
    /// 5xx and connect failures in a row.
    pub consecutive_errors: Option<u32>,
    /// 502/503/504 in a row; 0: off.
    pub consecutive_gateway_errors: Option<u32>,
    /// How often ejections are reconsidered.
    #[schemars(regex(pattern = DURATION))]
    pub interval: Option<String>,
    /// Ejection time, times the number of ejections.
    #[schemars(regex(pattern = DURATION))]
    pub base_ejection_time: Option<String>,
    /// Longest ejection.
    #[schemars(regex(pattern = DURATION))]
    pub max_ejection_time: Option<String>,
    /// At most this share of endpoints ejected, 0..100.
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: Option<u32>,
    /// Never eject below this many ready endpoints.
    pub min_ready_endpoints: Option<u32>,
}

/// Active health checks.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.http), has(self.tcp), has(self.grpc)].filter(x, x).size() == 1").message("exactly one of http, tcp, grpc"))]
pub struct HealthCheck {
    /// GET a path.
    pub http: Option<HttpCheck>,
    /// Connect.
    pub tcp: Option<TcpCheck>,
    /// grpc.health.v1.
    pub grpc: Option<GrpcCheck>,
    /// The port checked (default: the traffic port).
    pub port: Option<u16>,
    /// Between checks.
    #[schemars(regex(pattern = DURATION))]
    pub interval: Option<String>,
    /// Per check.
    #[schemars(regex(pattern = DURATION))]
    pub timeout: Option<String>,
    /// Failures before an endpoint leaves the rotation.
    pub unhealthy_threshold: Option<u32>,
    /// Successes before it comes back.
    pub healthy_threshold: Option<u32>,
    /// Random delay before the first check.
    #[schemars(regex(pattern = DURATION))]
    pub initial_jitter: Option<String>,
}

/// HTTP health check.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpCheck {
    /// Path.
    pub path: String,
    /// Statuses that pass (default 200).
    pub expected_statuses: Option<Vec<u16>>,
}

/// TCP health check (connect only).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {}

/// gRPC health check.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcCheck {
    /// Service name; empty: the whole server.
    #[serde(default)]
    pub service: String,
}

/// Fallback.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.backendRef) != has(self.staticResponse)").message("exactly one of backendRef, staticResponse"))]
pub struct Fallback {
    /// circuit-open, no-endpoints, timeout, 5xx, connect-failure.
    pub triggers: Option<Vec<String>>,
    /// Another service to ask.
    pub backend_ref: Option<BackendRef>,
    /// A fixed answer.
    pub static_response: Option<StaticResponse>,
}

/// A Service port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    /// Service name.
    pub name: String,
    /// Namespace (default: the policy's).
    pub namespace: Option<String>,
    /// Port.
    pub port: u16,
}

/// A fixed answer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticResponse {
    /// Status code.
    #[schemars(range(min = 100, max = 599))]
    pub status: u16,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Body.
    #[serde(default)]
    pub body: String,
}

/// The response cache.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.methods) || self.methods.all(m, m == 'GET' || m == 'HEAD')").message("cache.methods is a subset of GET, HEAD"))]
pub struct Cache {
    /// GET and/or HEAD.
    pub methods: Option<Vec<String>>,
    /// Cache 200s without freshness information this long; `0s`: never.
    #[serde(rename = "defaultTTL")]
    #[schemars(regex(pattern = DURATION))]
    pub default_ttl: Option<String>,
    /// Never keep a response longer.
    #[serde(rename = "maxTTL")]
    #[schemars(regex(pattern = DURATION))]
    pub max_ttl: Option<String>,
    /// Entries kept (least recently used leave first).
    pub max_entries: Option<u32>,
    /// Larger bodies are not stored.
    pub max_body_bytes: Option<u32>,
    /// Request headers that tell cached variants apart.
    pub vary_headers: Option<Vec<String>>,
    /// Serve a stale entry this long when the service fails.
    #[schemars(regex(pattern = DURATION))]
    pub serve_stale_on_error: Option<String>,
}

/// The load balancer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.algorithm) && self.algorithm == 'ConsistentHash') == has(self.hashOn)").message("hashOn is required with ConsistentHash, and only then"))]
pub struct LoadBalancer {
    /// PeakEWMA (default) | RoundRobin | LeastRequest | Random | ConsistentHash.
    #[schemars(extend("enum" = ["PeakEWMA", "RoundRobin", "LeastRequest", "Random", "ConsistentHash"]))]
    pub algorithm: Option<String>,
    /// What ConsistentHash hashes.
    pub hash_on: Option<HashOn>,
    /// Off | PreferSameZone.
    #[schemars(extend("enum" = ["Off", "PreferSameZone"]))]
    pub zone_aware: Option<String>,
}

/// The hash key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HashOn {
    /// A request header.
    pub header: String,
}
