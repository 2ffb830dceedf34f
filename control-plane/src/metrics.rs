//! Controller metrics (Prometheus text on the admin port): connected streams, pushes and NACKs
//! by resource type. Gauges derived from the index (file errors, workloads) are rendered at
//! scrape time by the admin module.

use ferrymesh_proto::discovery::v1 as pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: String,
}

/// Every controller metric.
#[derive(Debug)]
pub struct Metrics {
    /// Open Discovery streams.
    pub streams: Gauge,
    pushes: Family<TypeLabel, Counter>,
    nacks: Family<TypeLabel, Counter>,
    watch_errors: Family<KindLabel, Counter>,
    watch_lag: Family<KindLabel, prometheus_client::metrics::histogram::Histogram>,
    status_writes: Family<KindLabel, Counter>,
    refused: Family<RefusedLabels, Counter>,
    registry: Registry,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    port: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ferrymesh_controller");
        let streams = Gauge::default();
        let pushes = Family::<TypeLabel, Counter>::default();
        let nacks = Family::<TypeLabel, Counter>::default();
        registry.register(
            "discovery_streams",
            "Open Discovery streams",
            streams.clone(),
        );
        registry.register(
            "discovery_pushes",
            "Discovery responses sent",
            pushes.clone(),
        );
        registry.register(
            "discovery_nacks",
            "Discovery responses rejected by proxies",
            nacks.clone(),
        );
        let watch_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "watch_errors",
            "Kubernetes watch failures (each is retried with backoff, then relisted)",
            watch_errors.clone(),
        );
        let watch_lag = Family::<KindLabel, prometheus_client::metrics::histogram::Histogram>::new_with_constructor(|| {
            prometheus_client::metrics::histogram::Histogram::new(
                [0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0],
            )
        });
        registry.register(
            "watch_lag_seconds",
            "From an object's last write in the API (its managedFields time, whole seconds) to the controller applying it",
            watch_lag.clone(),
        );
        let status_writes = Family::<KindLabel, Counter>::default();
        registry.register(
            "status_writes",
            "Policy status updates written with server-side apply",
            status_writes.clone(),
        );
        let refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed before their server saw them: over a cap (per-source, total), or a handshake that failed or took too long",
            refused.clone(),
        );
        Self {
            streams,
            pushes,
            nacks,
            watch_errors,
            watch_lag,
            status_writes,
            refused,
            registry,
        }
    }

    /// One response of type `ty` sent.
    pub fn push(&self, ty: pb::ResourceType) {
        self.pushes
            .get_or_create(&TypeLabel {
                r#type: ty.as_str_name().to_owned(),
            })
            .inc();
    }

    /// A connection to `port` was closed before its server saw it, for `reason`.
    pub fn connection_refused(&self, port: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { port, reason })
            .inc();
    }

    /// A watch of `kind` failed.
    pub fn watch_error(&self, kind: &str) {
        self.watch_errors
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// An object of `kind` changed `lag` ago in the API and is applied now.
    pub fn watch_lag(&self, kind: &str, lag: std::time::Duration) {
        self.watch_lag
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .observe(lag.as_secs_f64());
    }

    /// A status of `kind` was written.
    pub fn status_write(&self, kind: &str) {
        self.status_writes
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// One NACK of type `ty` received.
    pub fn nack(&self, ty: pb::ResourceType) {
        self.nacks
            .get_or_create(&TypeLabel {
                r#type: ty.as_str_name().to_owned(),
            })
            .inc();
    }

    /// Prometheus text exposition (without the final `# EOF`, so gauges can be appended).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
