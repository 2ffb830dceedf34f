//! The proxy's Prometheus metrics: request totals and latency histograms by direction, service
//! and status class, and opaque TCP connections. Labels are bounded: the service label is a
//! mesh service (`namespace/name`) or `passthrough`, never a raw host or path.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ferrymesh_resilience::budget::RetryBudget;

use http::StatusCode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::http::status_class;

/// Relative to the pod: requests arriving for the app, or leaving it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    /// To the app behind this proxy.
    #[allow(non_camel_case_types)]
    inbound,
    /// From the app behind this proxy.
    #[allow(non_camel_case_types)]
    outbound,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: Direction,
    service: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    service: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    direction: Direction,
    service: String,
}

const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// A new metric, registered.
fn registered<M: Clone + Default + prometheus_client::registry::Metric>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> M {
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

/// Every proxy metric.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    tcp: Family<ServiceLabels, Counter>,
    retries: Family<ReasonLabels, Counter>,
    retries_skipped: Family<ReasonLabels, Counter>,
    breaker: Family<BreakerLabels, prometheus_client::metrics::gauge::Gauge>,
    fallbacks: Family<ReasonLabels, Counter>,
    ejections: Family<ServiceOnly, Counter>,
    faults: Family<FaultLabels, Counter>,
    health_checks: Family<ReasonLabels, Counter>,
    cache: Family<ReasonLabels, Counter>,
    budget: Family<RouteLabels, prometheus_client::metrics::gauge::Gauge>,
    tls_refused: Family<ReasonOnly, Counter>,
    authz: Family<DecisionLabels, Counter>,
    /// The live retry budget of each service and route, read at each scrape.
    budgets: Mutex<HashMap<(String, String), RetryBudget>>,
    registry: Registry,
    /// TLS handshakes (the pool counts the outbound ones into the same family).
    pub tls_handshakes: Handshakes,
    /// Discovery updates (the discovery client counts into it).
    pub config_updates: ConfigUpdates,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    direction: Direction,
    service: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
    reason: &'static str,
}

/// Labels of `ferrymesh_proxy_config_updates_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    /// The resource type, e.g. `CLIENT_POLICY`.
    pub r#type: String,
    /// `applied` or `rejected`.
    pub outcome: &'static str,
}

/// Discovery updates by type and outcome (shared with the discovery client).
pub type ConfigUpdates = Family<ConfigLabels, Counter>;

/// Labels of `ferrymesh_proxy_tls_handshakes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// Inbound (we are the server) or outbound (we are the client).
    pub direction: Direction,
    /// `ok`, `failed` or `timeout`.
    pub result: &'static str,
}

/// TLS handshakes by direction and result (shared with the connection pool).
pub type Handshakes = Family<HandshakeLabels, Counter>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonOnly {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    service: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceOnly {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    service: String,
    state: &'static str,
}

/// The request metrics of one direction and service: a counter and a histogram per status
/// class, each looked up in its family the first time that class is seen, then kept.
#[derive(Clone, Debug)]
pub struct RequestHandles(std::sync::Arc<Handles>);

#[derive(Debug)]
struct Handles {
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    direction: Direction,
    service: String,
    by_class: [std::sync::OnceLock<(Counter, Histogram)>; 5],
}

impl RequestHandles {
    /// The service these metrics are of (`namespace/name` or `passthrough`).
    pub fn service(&self) -> &str {
        &self.0.service
    }

    /// One HTTP request finished with `status` after `elapsed`.
    pub fn record(&self, status: StatusCode, elapsed: Duration) {
        let h = &*self.0;
        let class = status_class(status);
        let index = usize::from(class.as_bytes()[0] - b'1').min(4);
        let (count, latency) = h.by_class[index].get_or_init(|| {
            let labels = RequestLabels {
                direction: h.direction,
                service: h.service.clone(),
                status_class: class,
            };
            (
                h.requests.get_or_create(&labels).clone(),
                h.latency.get_or_create(&labels).clone(),
            )
        });
        count.inc();
        latency.observe(elapsed.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The families the pool and the discovery client count into.
fn connection_metrics(registry: &mut Registry) -> (Handshakes, ConfigUpdates) {
    let handshakes = registered(
        registry,
        "tls_handshakes",
        "mTLS handshakes with peers, by direction (inbound: we serve, outbound: we call) and result (ok, failed, timeout)",
    );
    let updates = registered(
        registry,
        "config_updates",
        "Discovery updates by resource type and outcome (applied, rejected: NACKed, the previous version stays)",
    );
    (handshakes, updates)
}

/// The outcomes of one response cache (`ferrymesh_cache_total`), resolved once.
#[derive(Clone, Debug, Default)]
pub struct CacheOutcomes {
    /// Served from the cache.
    pub hit: Counter,
    /// Not stored (or not storable): sent to the upstream.
    pub miss: Counter,
    /// Stale, and the upstream said it had not changed.
    pub revalidated: Counter,
    /// Stale, served because the upstream failed.
    pub stale: Counter,
}

impl CacheOutcomes {
    /// The counter of `outcome` (one of the four above).
    pub fn of(&self, outcome: &str) -> &Counter {
        match outcome {
            "hit" => &self.hit,
            "revalidated" => &self.revalidated,
            "stale" => &self.stale,
            _ => &self.miss,
        }
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ferrymesh_proxy");
        let requests: Family<RequestLabels, Counter> = registered(
            &mut registry,
            "requests",
            "HTTP requests by direction, service and status class",
        );
        let latency: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        registry.register(
            "request_duration_seconds",
            "Time to response headers, by direction, service and status class",
            latency.clone(),
        );
        let retries: Family<ReasonLabels, Counter> = registered(
            &mut registry,
            "retries",
            "Retries sent, by service and the failure retried",
        );
        let retries_skipped: Family<ReasonLabels, Counter> = registered(
            &mut registry,
            "retries_skipped",
            "Retryable failures not retried, by service and why (not-idempotent, budget-exhausted, deadline, ...)",
        );
        let breaker: Family<BreakerLabels, prometheus_client::metrics::gauge::Gauge> = registered(
            &mut registry,
            "breaker_state",
            "Circuit breaker state per service: 1 for the current state (closed, open, half-open, isolated), 0 for the others",
        );
        let fallbacks: Family<ReasonLabels, Counter> = registered(
            &mut registry,
            "fallbacks",
            "Fallback answers served, by service and trigger",
        );
        let ejections: Family<ServiceOnly, Counter> = registered(
            &mut registry,
            "ejections",
            "Endpoints ejected by outlier detection, by service",
        );
        let faults: Family<FaultLabels, Counter> = registered(
            &mut registry,
            "faults_injected",
            "Faults injected, by direction, service and kind (delay, abort)",
        );
        let health_checks: Family<ReasonLabels, Counter> = registered(
            &mut registry,
            "health_checks",
            "Active health check probes, by service and result (pass, fail)",
        );
        let cache: Family<ReasonLabels, Counter> = registered(
            &mut registry,
            "cache",
            "Response cache outcomes by service (hit, miss, stale, revalidated)",
        );
        let budget: Family<RouteLabels, prometheus_client::metrics::gauge::Gauge> = registered(
            &mut registry,
            "retry_budget_available",
            "Retries the retry budget of a service (per route, default without routes) allows right now",
        );
        let authz = registered(
            &mut registry,
            "authz_decisions",
            "Inbound authorization decisions (allow, deny) and why (allow-rule, default, policy, bad-path)",
        );
        let tls_refused = registered(
            &mut registry,
            "inbound_connections_refused",
            "Inbound connections closed before reaching the app, by reason (plaintext on a Strict port, handshake refused, timeout)",
        );
        let (tls_handshakes, config_updates) = connection_metrics(&mut registry);
        let tcp: Family<ServiceLabels, Counter> = registered(
            &mut registry,
            "tcp_connections",
            "Opaque TCP connections forwarded",
        );
        Self {
            requests,
            latency,
            tcp,
            retries,
            retries_skipped,
            breaker,
            fallbacks,
            ejections,
            faults,
            health_checks,
            cache,
            budget,
            tls_refused,
            tls_handshakes,
            config_updates,
            authz,
            budgets: Mutex::default(),
            registry,
        }
    }

    /// The request counters and latency histograms of `direction` and `service`, resolved
    /// once (per target) so that a request only bumps atomics.
    pub fn request_handles(&self, direction: Direction, service: &str) -> RequestHandles {
        RequestHandles(std::sync::Arc::new(Handles {
            requests: self.requests.clone(),
            latency: self.latency.clone(),
            direction,
            service: service.to_owned(),
            by_class: Default::default(),
        }))
    }

    /// One HTTP request finished with `status` after `elapsed`.
    pub fn request(
        &self,
        direction: Direction,
        service: &str,
        status: StatusCode,
        elapsed: Duration,
    ) {
        let labels = RequestLabels {
            direction,
            service: service.to_owned(),
            status_class: status_class(status),
        };
        self.requests.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// A retry sent because of `reason`.
    pub fn retry(&self, service: &str, reason: &'static str) {
        self.retries
            .get_or_create(&ReasonLabels {
                service: service.to_owned(),
                reason,
            })
            .inc();
    }

    /// A retryable failure not retried, because of `reason`.
    pub fn retry_skipped(&self, service: &str, reason: &'static str) {
        self.retries_skipped
            .get_or_create(&ReasonLabels {
                service: service.to_owned(),
                reason,
            })
            .inc();
    }

    /// The breaker of `service` is now in `state`.
    pub fn breaker_state(&self, service: &str, state: &'static str) {
        for s in ["closed", "open", "half-open", "isolated"] {
            let value = i64::from(s == state);
            self.breaker
                .get_or_create(&BreakerLabels {
                    service: service.to_owned(),
                    state: s,
                })
                .set(value);
        }
    }

    /// A fallback served for `service` because of `trigger`.
    pub fn fallback(&self, service: &str, trigger: &'static str) {
        self.fallbacks
            .get_or_create(&ReasonLabels {
                service: service.to_owned(),
                reason: trigger,
            })
            .inc();
    }

    /// An endpoint of `service` ejected.
    pub fn ejection(&self, service: &str) {
        self.ejections
            .get_or_create(&ServiceOnly {
                service: service.to_owned(),
            })
            .inc();
    }

    /// A fault of `kind` injected.
    pub fn fault(&self, direction: Direction, service: &str, kind: &'static str) {
        self.faults
            .get_or_create(&FaultLabels {
                direction,
                service: service.to_owned(),
                kind,
            })
            .inc();
    }

    /// One active health check probe of `service`.
    pub fn health_check(&self, service: &str, passed: bool) {
        let reason = if passed { "pass" } else { "fail" };
        self.health_checks
            .get_or_create(&ReasonLabels {
                service: service.to_owned(),
                reason,
            })
            .inc();
    }

    /// The response-cache counters of `service`, one per outcome, resolved once (per cache)
    /// so that a request only bumps an atomic.
    pub fn cache_outcomes(&self, service: &str) -> CacheOutcomes {
        let counter = |reason: &'static str| {
            self.cache
                .get_or_create(&ReasonLabels {
                    service: service.to_owned(),
                    reason,
                })
                .clone()
        };
        CacheOutcomes {
            hit: counter("hit"),
            miss: counter("miss"),
            revalidated: counter("revalidated"),
            stale: counter("stale"),
        }
    }

    /// An authorization decision.
    pub fn authz(&self, decision: &'static str, reason: &'static str) {
        self.authz
            .get_or_create(&DecisionLabels { decision, reason })
            .inc();
    }

    /// An inbound TLS handshake ended with `result`.
    pub fn tls_handshake(&self, result: &'static str) {
        self.tls_handshakes
            .get_or_create(&HandshakeLabels {
                direction: Direction::inbound,
                result,
            })
            .inc();
    }

    /// An inbound connection closed before reaching the app, because of `reason`.
    pub fn tls_refused(&self, reason: &'static str) {
        self.tls_refused.get_or_create(&ReasonOnly { reason }).inc();
    }

    /// One opaque TCP connection forwarded.
    pub fn tcp_connection(&self, direction: Direction, service: &str) {
        self.tcp
            .get_or_create(&ServiceLabels {
                direction,
                service: service.to_owned(),
            })
            .inc();
    }

    /// Reports `budget` as the retry budget of `service` on `route` (replacing an older one).
    pub fn track_budget(&self, service: &str, route: &str, budget: RetryBudget) {
        self.budgets
            .lock()
            .expect("budgets lock poisoned")
            .insert((service.to_owned(), route.to_owned()), budget);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        for ((service, route), budget) in self.budgets.lock().expect("budgets lock poisoned").iter()
        {
            self.budget
                .get_or_create(&RouteLabels {
                    service: service.clone(),
                    route: route.clone(),
                })
                .set(i64::try_from(budget.available()).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_and_timed_by_direction_service_and_status_class() {
        let m = Metrics::new();
        m.request(
            Direction::outbound,
            "shop/a",
            StatusCode::OK,
            Duration::from_millis(3),
        );
        m.request(
            Direction::outbound,
            "shop/a",
            StatusCode::OK,
            Duration::from_millis(30),
        );
        m.request(
            Direction::inbound,
            "shop/a",
            StatusCode::BAD_GATEWAY,
            Duration::from_millis(1),
        );
        let text = m.encode();
        assert!(text.contains(r#"ferrymesh_proxy_requests_total{direction="outbound",service="shop/a",status_class="2xx"} 2"#), "{text}");
        assert!(text.contains(r#"ferrymesh_proxy_requests_total{direction="inbound",service="shop/a",status_class="5xx"} 1"#), "{text}");
        assert!(text.contains(r#"ferrymesh_proxy_request_duration_seconds_bucket{le="0.005",direction="outbound",service="shop/a",status_class="2xx"} 1"#), "{text}");
        assert!(text.contains(r#"ferrymesh_proxy_request_duration_seconds_count{direction="outbound",service="shop/a",status_class="2xx"} 2"#), "{text}");
    }
}
