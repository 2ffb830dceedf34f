//! Distributed tracing: the proxy joins the trace a request carries (W3C `traceparent` /
//! `tracestate`, or B3 single or multi headers) and adds its own spans: a server span for each
//! inbound request, a client span for each outbound request and a child span per attempt, with
//! OpenTelemetry HTTP semantic-convention attributes and one event per resilience decision
//! (retries and their reasons, breaker, ejections, fallback, cache, faults, authorization). The
//! next hop gets the W3C context of the span that called it.
//!
//! Where spans go and how many traces are started is the controller's (TELEMETRY `*`): an OTLP
//! gRPC collector and a ratio for new traces (parent-based: a request with a context follows its
//! parent's decision). With no collector nothing is built: no span costs a thing.

use std::borrow::Cow;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context as Cx, KeyValue};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter,
};

/// The trace context of a request (its client or server span), a request extension.
#[derive(Debug, Clone)]
pub struct TraceCx(pub Cx);

struct Active {
    endpoint: String,
    ratio: f64,
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    runtime: Arc<tokio::runtime::Runtime>,
}

/// The proxy's tracer: off until the controller names a collector.
pub struct Tracing {
    service: String,
    attributes: Vec<KeyValue>,
    /// A ratio of the workload's own (`FERRYMESH_TRACE_SAMPLING`) over the controller's.
    ratio_override: Option<f64>,
    state: RwLock<Option<Active>>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.read().expect("tracing lock poisoned");
        f.debug_struct("Tracing")
            .field("service", &self.service)
            .field("endpoint", &state.as_ref().map(|a| a.endpoint.clone()))
            .finish_non_exhaustive()
    }
}

/// Runs the OTLP exporter on a runtime of its own: the SDK's batch processor exports from its
/// own thread, where tonic would find no Tokio reactor.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        match self
            .runtime
            .spawn(async move { inner.export(batch).await })
            .await
        {
            Ok(result) => result,
            Err(e) => Err(OTelSdkError::InternalFailure(e.to_string())),
        }
    }
}

impl Tracing {
    /// A tracer for `service` (`namespace/name`), with resource `attributes`.
    pub fn new(service: String, attributes: Vec<KeyValue>, ratio_override: Option<f64>) -> Self {
        Self {
            service,
            attributes,
            ratio_override,
            state: RwLock::new(None),
        }
    }

    /// Exports to `endpoint` (empty: tracing off), starting `ratio` of new traces.
    pub fn apply(&self, endpoint: &str, ratio: f64) {
        let ratio = self.ratio_override.unwrap_or(ratio).clamp(0.0, 1.0);
        let same = self
            .state
            .read()
            .expect("tracing lock poisoned")
            .as_ref()
            .map(|a| (a.endpoint.clone(), a.ratio))
            == (!endpoint.is_empty()).then(|| (endpoint.to_owned(), ratio));
        if same {
            return;
        }
        let next = if endpoint.is_empty() {
            None
        } else {
            match self.build(endpoint, ratio) {
                Ok(active) => Some(active),
                Err(e) => {
                    tracing::warn!(endpoint, error = %format!("{e:#}"), "span export not set up");
                    None
                }
            }
        };
        tracing::info!(endpoint, ratio, on = next.is_some(), "tracing configured");
        let old = std::mem::replace(
            &mut *self.state.write().expect("tracing lock poisoned"),
            next,
        );
        if let Some(old) = old {
            // Flushing blocks, and a runtime may not be dropped inside another: off thread.
            std::thread::spawn(move || {
                let _ = old.provider.shutdown();
                drop(old);
            });
        }
    }

    fn build(&self, endpoint: &str, ratio: f64) -> anyhow::Result<Active> {
        use opentelemetry_otlp::WithExportConfig as _;
        let runtime = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("ferrymesh-otlp")
                .enable_all()
                .build()?,
        );
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(self.service.clone())
            .with_attributes(self.attributes.clone())
            .build();
        let mut exporter = {
            let _entered = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(Duration::from_secs(5))
                .build()?
        };
        // The wrapper below shares the exporter: it gets its resource now.
        exporter.set_resource(&resource);
        let exporter = OnRuntime {
            inner: Arc::new(exporter),
            runtime: runtime.handle().clone(),
        };
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(Duration::from_millis(500))
                    .with_max_queue_size(8192)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("ferrymesh-proxy");
        Ok(Active {
            endpoint: endpoint.to_owned(),
            ratio,
            provider,
            tracer,
            runtime,
        })
    }

    /// Where spans go and the ratio of new traces sampled, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        match &*self.state.read().expect("tracing lock poisoned") {
            Some(a) => serde_json::json!({"otlpEndpoint": a.endpoint, "sampling": a.ratio}),
            None => serde_json::json!({"otlpEndpoint": null}),
        }
    }

    /// Whether spans are built at all.
    pub fn on(&self) -> bool {
        self.state.read().expect("tracing lock poisoned").is_some()
    }

    /// Starts a span under `parent`; `None` when tracing is off. Its name, parent and
    /// attributes are only built when tracing is on: off, a request pays one read lock.
    pub fn start(
        &self,
        kind: SpanKind,
        name: impl FnOnce() -> String,
        parent: impl FnOnce() -> Cx,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Cx> {
        let state = self.state.read().expect("tracing lock poisoned");
        let active = state.as_ref()?;
        let _ = &active.runtime;
        let parent = parent();
        let span = active
            .tracer
            .span_builder(name())
            .with_kind(kind)
            .with_attributes(attributes())
            .start_with_context(&active.tracer, &parent);
        Some(parent.with_span(span))
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The context a request carries: W3C first, else B3 (single `b3` or the `X-B3-*` headers).
pub fn extract(headers: &HeaderMap) -> Cx {
    let w3c = TraceContextPropagator::new().extract(&Headers(headers));
    if w3c.span().span_context().is_valid() {
        return w3c;
    }
    b3(headers).map_or(w3c, |sc| Cx::new().with_remote_span_context(sc))
}

/// B3: `b3: {trace}-{span}[-{sampled}[-{parent}]]`, or `X-B3-TraceId`, `X-B3-SpanId`,
/// `X-B3-Sampled` (`1`/`0`, `d` for debug = sampled).
fn b3(headers: &HeaderMap) -> Option<SpanContext> {
    let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    let (trace, span, sampled) = if let Some(single) = get("b3") {
        let mut parts = single.split('-');
        (parts.next()?, parts.next()?, parts.next())
    } else {
        (
            get("x-b3-traceid")?,
            get("x-b3-spanid")?,
            get("x-b3-sampled"),
        )
    };
    // A 64-bit trace id is the low half of a 128-bit one.
    let trace = if trace.len() == 16 {
        Cow::Owned(format!("{trace:0>32}"))
    } else {
        Cow::Borrowed(trace)
    };
    let trace_id = TraceId::from_hex(&trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    // `1`, `d` (debug), `true`, or no decision at all (ours then): sampled.
    let flags = match sampled {
        Some("0" | "false") => TraceFlags::default(),
        _ => TraceFlags::SAMPLED,
    };
    let sc = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    sc.is_valid().then_some(sc)
}

/// Writes `cx` as the W3C context of the next hop.
pub fn inject(cx: &Cx, headers: &mut HeaderMap) {
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, &mut HeadersMut(headers));
    }
}

/// Whether this span is recorded (sampled): decisions are only collected for those.
pub fn recording(cx: &Cx) -> bool {
    cx.span().is_recording()
}

/// Ends a span with the response: its status code, an error status for 5xx or the proxy's own
/// error, and one event per decision (`retry`, `attempt`, `breaker`, ...) in order.
pub fn finish(cx: &Cx, status: http::StatusCode, proxy_error: Option<&str>, decisions: &[String]) {
    let span = cx.span();
    if !span.is_recording() {
        return;
    }
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status.as_u16()),
    ));
    for d in decisions {
        let kind = d.split_whitespace().next().unwrap_or("decision");
        let name = match kind {
            "retry" | "no" => "retry",
            "attempt" => "attempt",
            "breaker" | "circuit" => "breaker",
            "ejected" | "outlier" => "ejection",
            "fallback" => "fallback",
            "cache" => "cache",
            "fault" => "fault",
            "route" => "route",
            "authorization" | "forbidden" => "authorization",
            _ => "decision",
        };
        span.add_event(
            name.to_owned(),
            vec![KeyValue::new("ferrymesh.decision", d.clone())],
        );
    }
    if let Some(e) = proxy_error {
        span.set_attribute(KeyValue::new("error.type", e.to_owned()));
        span.set_status(Status::error(e.to_owned()));
    } else if status.is_server_error() {
        span.set_attribute(KeyValue::new("error.type", status.as_u16().to_string()));
        span.set_status(Status::error(status.as_u16().to_string()));
    }
    span.end();
}

/// The HTTP semantic-convention attributes of a request.
pub fn request_attributes<B>(req: &http::Request<B>, authority: Option<&str>) -> Vec<KeyValue> {
    let version = match req.version() {
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_10 => "1.0",
        _ => "1.1",
    };
    let mut attrs = vec![
        KeyValue::new("http.request.method", req.method().as_str().to_owned()),
        KeyValue::new("url.path", req.uri().path().to_owned()),
        KeyValue::new("network.protocol.version", version),
    ];
    if let Some(a) = authority {
        let (host, port) = a
            .rsplit_once(':')
            .map_or((a, None), |(h, p)| (h, p.parse::<i64>().ok()));
        attrs.push(KeyValue::new("server.address", host.to_owned()));
        if let Some(p) = port {
            attrs.push(KeyValue::new("server.port", p));
        }
    }
    attrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w3c_then_b3_single_then_b3_multi() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        let sc = extract(&h).span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert!(sc.is_sampled());

        let mut h = HeaderMap::new();
        h.insert(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"
                .parse()
                .unwrap(),
        );
        let sc = extract(&h).span().span_context().clone();
        assert_eq!(sc.span_id().to_string(), "e457b5a2e4d86bd1");
        assert!(!sc.is_sampled());

        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", "a3ce929d0e0e4736".parse().unwrap());
        h.insert("x-b3-spanid", "00f067aa0ba902b7".parse().unwrap());
        h.insert("x-b3-sampled", "1".parse().unwrap());
        let sc = extract(&h).span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert!(sc.is_sampled() && sc.is_remote());

        assert!(!extract(&HeaderMap::new()).span().span_context().is_valid());
    }

    #[test]
    fn tracing_is_off_without_a_collector() {
        let t = Tracing::new("shop/a".into(), Vec::new(), None);
        t.apply("", 1.0);
        assert!(!t.on());
        assert!(
            t.start(SpanKind::Client, || "x".into(), Cx::new, Vec::new)
                .is_none()
        );
    }
}
