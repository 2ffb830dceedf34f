//! `ferryctl stat` against a real mesh: its figures are the traffic the test sent.
#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::process::Command;

use ferrymesh_test_support::mesh::yaml::service;
use ferrymesh_test_support::mesh::{Mesh, ProxySpec, client_proxy, proxied};
use ferrymesh_test_support::process::bin;
use ferrymesh_test_support::upstream::HttpEcho;
use serde_json::Value;

fn stat(state: &std::path::Path, args: &[&str]) -> Value {
    let out = Command::new(bin("ferryctl"))
        .env("RUST_BACKTRACE", "0")
        .arg("--state-dir")
        .arg(state)
        .arg("stat")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (requests, successes) of `shop/echo` since the proxies started.
fn echo_totals(state: &std::path::Path) -> (f64, f64) {
    let rows = stat(state, &["echo", "--total", "--json"]);
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "shop/echo")
        .cloned()
        .unwrap_or(Value::Null);
    let requests = row["requests"].as_f64().unwrap_or(0.0);
    (requests, requests * row["success"].as_f64().unwrap_or(0.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_reports_the_traffic_that_was_sent() {
    let mesh = Mesh::start(&[("echo.yaml", &service("echo"))]);
    let echo = HttpEcho::start("echo-1").await;
    let _server = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let client = client_proxy(&mesh, "echo.shop", 1).await;
    let state = tempfile::tempdir().unwrap();
    mesh.write_ferryctl_state(state.path());
    let (requests, ok) = echo_totals(state.path());
    let http = proxied(client.addr("outbound"));
    for i in 0..40 {
        let path = if i % 4 == 0 { "/status/500" } else { "/slow/2" };
        http.get(format!("http://echo.shop{path}"))
            .send()
            .await
            .unwrap();
    }
    let (requests_after, ok_after) = echo_totals(state.path());
    assert!(
        (requests_after - requests - 40.0).abs() < 1e-9,
        "{requests} then {requests_after}"
    );
    assert!((ok_after - ok - 30.0).abs() < 1e-6, "{ok} then {ok_after}");
    // The window form: a rate, and percentiles in the right range for /slow/2.
    let rows = stat(state.path(), &["--total", "--json"]);
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "shop/echo")
        .unwrap();
    let p50 = row["p50_ms"].as_f64().unwrap();
    assert!((1.0..=10.0).contains(&p50), "{row}");
    let windowed = stat(state.path(), &["echo", "--window", "1s", "--json"]);
    assert_eq!(
        windowed[0]["requests"].as_f64(),
        Some(0.0),
        "no traffic in this window: {windowed}"
    );
}
