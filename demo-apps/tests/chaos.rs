//! One shop instance as a real process: its chaos knobs, set by env at start and through
//! `GET/PUT /chaos`, change what its business routes, `/healthz` and `/readyz` answer.

#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::process::Command;
use std::time::Duration;

use ferrymesh_test_support::process::{Spawned, bin};
use serde_json::{Value, json};
use tokio::time::Instant;

fn shop(service: &str, env: &[(&str, &str)], dir: &std::path::Path) -> Spawned {
    let mut cmd = Command::new(bin("ferry-shop"));
    cmd.args([
        service,
        "--listen",
        "127.0.0.1:0",
        "--instance",
        &format!("{service}-1"),
    ]);
    cmd.env_remove("HTTP_PROXY").env_remove("http_proxy");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Spawned::start(service, cmd, &dir.join(format!("{service}.log"))).unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(800))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_knobs_change_answers_at_start_and_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let pricing = shop("pricing", &[("CHAOS_LATENCY", "200ms")], dir.path());
    let base = format!("http://{}", pricing.addr("app"));
    let http = http();

    // Start value from env: every business request takes at least 200ms; probes do not.
    let start = Instant::now();
    let rsp = http.get(format!("{base}/prices/1")).send().await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!(rsp.headers()["x-ferry-instance"], "pricing-1");
    let price: Value = rsp.json().await.unwrap();
    assert_eq!(price["currency"], "EUR");
    let start = Instant::now();
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "probes are not slowed"
    );

    let put = |body: Value| {
        let http = http.clone();
        let url = format!("{base}/chaos");
        async move { http.put(url).json(&body).send().await.unwrap() }
    };
    // Errors.
    assert_eq!(
        put(json!({"errorRate": 1.0, "latency": "0s"}))
            .await
            .status(),
        200
    );
    let rsp = http.get(format!("{base}/prices/1")).send().await.unwrap();
    assert_eq!(rsp.status(), 500);
    // Hangs: no answer at all.
    put(json!({"errorRate": 0.0, "hangRate": 1.0})).await;
    let err = http
        .get(format!("{base}/prices/1"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    // Readiness and liveness flips.
    put(json!({"hangRate": 0.0, "ready": false, "live": false})).await;
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        500
    );
    let knobs: Value = http
        .get(format!("{base}/chaos"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        knobs,
        json!({"errorRate": 0.0, "latency": "0s", "hangRate": 0.0, "ready": false, "live": false})
    );
    // Bad values are refused and change nothing.
    assert_eq!(put(json!({"errorRate": 7})).await.status(), 400);
    assert_eq!(put(json!({"bogus": 1})).await.status(), 422);
    // Reset: back to the start values (from env).
    let reset: Value = put(json!({"reset": true})).await.json().await.unwrap();
    assert_eq!(
        reset,
        json!({"errorRate": 0.0, "latency": "200ms", "hangRate": 0.0, "ready": true, "live": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_honour_idempotency_keys() {
    let dir = tempfile::tempdir().unwrap();
    let payments = shop("payments", &[], dir.path());
    let base = format!("http://{}", payments.addr("app"));
    let http = http();
    for _ in 0..3 {
        let rsp = http
            .post(format!("{base}/payments"))
            .header("idempotency-key", "order-7")
            .json(&json!({"orderId": 7, "amount": 12.5}))
            .send()
            .await
            .unwrap();
        assert!(rsp.status().is_success());
    }
    http.post(format!("{base}/payments"))
        .json(&json!({"orderId": 8, "amount": 1}))
        .send()
        .await
        .unwrap();
    let charges: Value = http
        .get(format!("{base}/payments"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        charges.as_array().unwrap().len(),
        2,
        "one charge per key, one without: {charges}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storefront_passes_the_trace_on_to_every_part() {
    let dir = tempfile::tempdir().unwrap();
    // Every part answers from an echo server standing in for the sidecar (HTTP_PROXY), which
    // shows the headers each call carried.
    let echo = ferrymesh_test_support::upstream::HttpEcho::start("parts").await;
    let proxy = format!("http://{}", echo.addr);
    let storefront = shop(
        "storefront",
        &[
            ("HTTP_PROXY", proxy.as_str()),
            ("http_proxy", proxy.as_str()),
        ],
        dir.path(),
    );
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let doc: Value = http()
        .get(format!(
            "http://{}/api/product-page?id=1",
            storefront.addr("app")
        ))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut spans = std::collections::HashSet::new();
    for part in ["product", "price", "stock", "reviews"] {
        let parent = doc[part]["headers"]["traceparent"]
            .as_str()
            .unwrap_or_default();
        let fields: Vec<&str> = parent.split('-').collect();
        assert_eq!(fields.len(), 4, "{part}: {doc}");
        assert_eq!(fields[1], trace, "{part} is in the caller's trace");
        assert_ne!(fields[2], "00f067aa0ba902b7", "{part} is a child span");
        spans.insert(fields[2].to_owned());
    }
    assert_eq!(spans.len(), 4, "one span per call");
    assert!(
        storefront.log_text().contains(trace),
        "the storefront logs the trace id"
    );
}
