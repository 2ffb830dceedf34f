//! What the mesh tells about each request, through real proxies: the JSON access log.
#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::time::Duration;

use ferrymesh_test_support::mesh::yaml::service;
use ferrymesh_test_support::mesh::{Mesh, ProxySpec, client_proxy_with, eventually, proxied};
use ferrymesh_test_support::process::Spawned;
use ferrymesh_test_support::upstream::HttpEcho;
use serde_json::Value;

/// The fields every access-log line has (docs/access-log.md).
const FIELDS: &[&str] = &[
    "start_ms",
    "direction",
    "service",
    "method",
    "authority",
    "path",
    "status",
    "duration_ms",
    "error",
    "upstream",
    "attempts",
    "decisions",
    "trace_id",
    "peer",
];

/// Every access-log line a proxy printed so far, each checked to be a JSON object with every
/// documented field.
fn log_lines(proxy: &Spawned, seen: &mut Vec<Value>) {
    for line in proxy.stdout_lines() {
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {e}: {line}"));
        for f in FIELDS {
            assert!(v.get(*f).is_some(), "{f} missing: {line}");
        }
        seen.push(v);
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_one_json_line_on_each_side() {
    let mesh = Mesh::start_secure(&[("echo.yaml", &service("echo"))], &[]);
    let echo = HttpEcho::start("echo-1").await;
    let server = mesh.proxy(&ProxySpec {
        access_log: Some(1.0),
        ..ProxySpec::app("echo-1", "echo", echo.addr)
    });
    let client = client_proxy_with(
        &mesh,
        ProxySpec {
            access_log: Some(1.0),
            ..ProxySpec::client("client")
        },
        "echo.shop",
        1,
    )
    .await;
    let quiet = client_proxy_with(
        &mesh,
        ProxySpec {
            access_log: Some(0.0),
            ..ProxySpec::client("quiet")
        },
        "echo.shop",
        1,
    )
    .await;
    let http = proxied(client.addr("outbound"));
    for _ in 0..5 {
        let rsp = http
            .get("http://echo.shop/logged")
            .header("traceparent", format!("00-{TRACE}-00f067aa0ba902b7-01"))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
    }
    let rsp = proxied(quiet.addr("outbound"))
        .get("http://echo.shop/unlogged")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    let (mut out, mut inb) = (Vec::new(), Vec::new());
    eventually(Duration::from_secs(5), || {
        log_lines(&client, &mut out);
        log_lines(&server, &mut inb);
        let n = |v: &Vec<Value>| v.iter().filter(|l| l["path"] == "/logged").count();
        let done = n(&out) == 5 && n(&inb) == 5;
        async move { done }
    })
    .await
    .expect("5 lines on each side");
    let o = out.iter().find(|l| l["path"] == "/logged").unwrap();
    assert_eq!(o["direction"], "outbound");
    assert_eq!(o["service"], "shop/echo");
    assert_eq!(o["method"], "GET");
    assert_eq!(o["authority"], "echo.shop");
    assert_eq!(o["status"], 200);
    assert_eq!(o["trace_id"], TRACE);
    assert_eq!(o["attempts"], 1);
    assert_eq!(o["upstream"], server.addr("inbound").to_string());
    assert!(
        o["decisions"][0]
            .as_str()
            .unwrap()
            .starts_with("attempt 1 "),
        "{o}"
    );
    let i = inb.iter().find(|l| l["path"] == "/logged").unwrap();
    assert_eq!(i["direction"], "inbound");
    assert_eq!(i["peer"], "spiffe://cluster.local/ns/shop/sa/client");
    assert_eq!(i["trace_id"], TRACE);
    let mut quiet_lines = Vec::new();
    log_lines(&quiet, &mut quiet_lines);
    assert!(quiet_lines.is_empty(), "sample 0: no line: {quiet_lines:?}");
}

/// The proxy's metrics, parsed with a Prometheus text parser (which fails on bad syntax).
async fn scrape(proxy: &Spawned) -> prometheus_parse::Scrape {
    let (status, text) = ferrymesh_test_support::mesh::get(proxy.addr("health"), "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_count_exactly_and_stay_bounded_under_many_paths() {
    let mesh = Mesh::start(&[("echo.yaml", &service("echo"))]);
    let echo = HttpEcho::start("echo-1").await;
    let server = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let client = client_proxy_with(&mesh, ProxySpec::client("client"), "echo.shop", 1).await;
    let http = proxied(client.addr("outbound"));
    let ok = [
        ("direction", "outbound"),
        ("service", "shop/echo"),
        ("status_class", "2xx"),
    ];
    let before = scrape(&client).await;
    let sent = 37;
    for i in 0..sent {
        let rsp = http
            .get(format!("http://echo.shop/n/{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
    }
    let after = scrape(&client).await;
    let counted = value(&after, "ferrymesh_proxy_requests_total", &ok)
        - value(&before, "ferrymesh_proxy_requests_total", &ok);
    let sent_f = f64::from(sent);
    assert!(
        (counted - sent_f).abs() < f64::EPSILON,
        "{counted} counted for {sent} sent"
    );
    let inbound = [
        ("direction", "inbound"),
        ("service", "shop/echo"),
        ("status_class", "2xx"),
    ];
    let server_after = scrape(&server).await;
    assert!(value(&server_after, "ferrymesh_proxy_requests_total", &inbound) >= sent_f);
    // A thousand distinct paths add no series: no label carries a path.
    let series = after.samples.len();
    for i in 0..1_000 {
        let rsp = http
            .get(format!("http://echo.shop/unique/{i}/{}", i * 7919))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
    }
    let later = scrape(&client).await;
    assert_eq!(later.samples.len(), series, "the series count did not grow");
    assert!(
        later
            .samples
            .iter()
            .all(|s| s.labels.values().all(|v| !v.contains("unique"))),
        "no path in any label"
    );
}
