//! Admin and health endpoints. The health listener serves `/live`, `/ready` (only after the
//! first discovery sync) and `/metrics`; the admin listener (loopback) adds `/config_dump`:
//! every resource held with its version and sources, plus each target's balancer, and manual
//! breaker control (`POST /breakers/{namespace}/{service}/{trip|isolate|reset}`) and
//! `/identity` (the workload's SPIFFE id and its certificate's expiry), `/tap` (a live
//! stream of requests) and `/recent?trace_id=` (the kept entries of one traced request).

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use std::sync::Arc;

use crate::access_log::Tap;
use crate::config::Config;
use crate::discovery::Discovery;
use crate::http::{Body, boxed};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::trace::Tracing;

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut rsp = Response::new(boxed(Full::new(Bytes::from(body))));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    rsp
}

/// What the admin and health endpoints read and control.
#[derive(Debug)]
pub struct Admin {
    /// The bootstrap config.
    pub config: Arc<Config>,
    /// The control-plane cache (`/ready`, `/config_dump`).
    pub discovery: Discovery,
    /// Metrics (`/metrics`).
    pub metrics: Arc<Metrics>,
    /// The workload identity (`/identity`, `/ready` waits for its certificate).
    pub identity: Option<Arc<Identity>>,
    /// Spans (`/config_dump`).
    pub tracing: Arc<Tracing>,
    /// Live listeners to the requests (`/tap`, `/recent`).
    pub tap: Arc<Tap>,
    /// The outbound side (targets in `/config_dump`, breaker control).
    pub outbound: Arc<Outbound>,
    /// This workload's service, `namespace/name`.
    pub service_label: String,
}

/// Handles one admin or health request; `full` enables the admin-only paths.
pub fn handle(
    ctx: &Admin,
    req: &Request<Incoming>,
    full: bool,
    drain: &tokio::sync::watch::Receiver<bool>,
) -> Response<Body> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/live" => text(StatusCode::OK, PLAIN, "live\n".into()),
        "/ready" => {
            let certified = ctx.identity.as_ref().is_none_or(|i| i.held().is_some());
            if !certified {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "not ready: waiting for a certificate\n".into(),
                )
            } else if *ctx.discovery.synced().borrow() {
                text(StatusCode::OK, PLAIN, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "not ready: waiting for the first discovery sync\n".into(),
                )
            }
        }
        "/metrics" => {
            // OpenMetrics for scrapers that ask for it, the Prometheus text format otherwise.
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let (content_type, body) =
                ferrymesh_proto::exposition::negotiate(accept, ctx.metrics.encode());
            text(StatusCode::OK, content_type, body)
        }
        "/config_dump" if full => {
            let mut dump = ctx.discovery.dump();
            dump["proxy"] = serde_json::json!({
                "name": ctx.config.name,
                "workload": format!("{}/{}", ctx.config.workload.namespace, ctx.config.workload.name),
                "service": ctx.service_label,
                "ready": ctx.discovery.ready(),
                "version": env!("CARGO_PKG_VERSION"),
            });
            dump["targets"] = ctx.outbound.dump();
            dump["tracing"] = ctx.tracing.dump();
            let body = serde_json::to_string_pretty(&dump).unwrap_or_default();
            text(StatusCode::OK, "application/json", body + "\n")
        }
        "/tap" if full => tap(ctx, req, drain.clone()),
        "/recent" if full => {
            let trace = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("trace_id="))
                .unwrap_or("");
            let entries: Vec<serde_json::Value> = ctx
                .tap
                .traced(trace)
                .iter()
                .filter_map(|e| serde_json::from_str(e).ok())
                .collect();
            text(
                StatusCode::OK,
                "application/json",
                serde_json::Value::from(entries).to_string() + "\n",
            )
        }
        "/identity" if full => {
            let body = match &ctx.identity {
                None => serde_json::json!({ "identity": null }),
                Some(i) => {
                    let held = i.held();
                    let secs = |t: std::time::SystemTime| {
                        t.duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs())
                    };
                    serde_json::json!({
                        "identity": i.spiffe(),
                        "notAfterUnix": held.map(|h| secs(h.not_after)),
                        "validForSeconds": held.map(|h| h
                            .not_after
                            .duration_since(std::time::SystemTime::now())
                            .map_or(0, |d| d.as_secs())),
                    })
                }
            };
            text(StatusCode::OK, "application/json", body.to_string() + "\n")
        }
        path if full && path.starts_with("/breakers/") => breaker_control(ctx, req, path),
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
    }
}

/// `POST /breakers/{namespace}/{service}/{trip|isolate|reset}`: manual control of this proxy's
/// breakers for a service (every port it has called), for labs; answers each target's new state.
fn breaker_control(ctx: &Admin, req: &Request<Incoming>, path: &str) -> Response<Body> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let parts: Vec<&str> = path.trim_start_matches("/breakers/").split('/').collect();
    let [namespace, service, action] = parts.as_slice() else {
        return text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "use POST /breakers/{namespace}/{service}/{trip|isolate|reset}\n".into(),
        );
    };
    if req.method() != http::Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "POST only\n".into());
    }
    let act: fn(&ferrymesh_resilience::breaker::Breaker) = match *action {
        "trip" => ferrymesh_resilience::breaker::Breaker::trip,
        "isolate" => ferrymesh_resilience::breaker::Breaker::isolate,
        "reset" => ferrymesh_resilience::breaker::Breaker::reset,
        other => {
            return text(
                StatusCode::BAD_REQUEST,
                PLAIN,
                format!("unknown action {other:?}: trip, isolate or reset\n"),
            );
        }
    };
    let breakers = ctx.outbound.breakers(namespace, service);
    if breakers.is_empty() {
        return text(
            StatusCode::NOT_FOUND,
            PLAIN,
            format!(
                "no breaker for {namespace}/{service} here: this proxy has not called it, or its \
                 policy has no circuitBreaker section\n"
            ),
        );
    }
    let states: serde_json::Map<String, serde_json::Value> = breakers
        .iter()
        .map(|(target, b)| {
            act(b);
            tracing::info!(%target, action, "breaker changed by hand");
            (target.clone(), b.state().as_str().into())
        })
        .collect();
    let body = serde_json::json!({ "proxy": ctx.config.name, "breakers": states });
    text(StatusCode::OK, "application/json", body.to_string() + "\n")
}

/// `GET /tap[?service=ns/name][&path=/prefix]`: a live stream of this proxy's requests, one
/// JSON line each (the access-log entry), for as long as the caller listens or until the proxy
/// drains (a listener never holds up a shutdown).
fn tap(
    ctx: &Admin,
    req: &Request<Incoming>,
    mut drain: tokio::sync::watch::Receiver<bool>,
) -> Response<Body> {
    use futures::StreamExt as _;
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str| {
        query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| v.replace("%2F", "/").replace("%2f", "/"))
        })
    };
    let (service, path) = (param("service"), param("path"));
    let lines =
        tokio_stream::wrappers::BroadcastStream::new(ctx.tap.subscribe()).filter_map(move |line| {
            let keep = line.ok().filter(|line| {
                let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
                service.as_deref().is_none_or(|s| {
                    v["service"]
                        .as_str()
                        .is_some_and(|x| x == s || x.ends_with(&format!("/{s}")))
                }) && path
                    .as_deref()
                    .is_none_or(|p| v["path"].as_str().is_some_and(|x| x.starts_with(p)))
            });
            std::future::ready(keep.map(|line| {
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(format!(
                    "{line}\n"
                ))))
            }))
        });
    let lines = lines.take_until(async move {
        let _ = drain.wait_for(|d| *d).await;
    });
    let mut rsp = Response::new(boxed(http_body_util::StreamBody::new(lines)));
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    rsp
}
