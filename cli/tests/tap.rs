//! `ferryctl tap` against a real mesh: a request shows up, with its decisions, within a second.
#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::time::{Duration, SystemTime};

use ferrymesh_test_support::mesh::yaml::service;
use ferrymesh_test_support::mesh::{Mesh, ProxySpec, client_proxy, proxied};
use ferrymesh_test_support::process::bin;
use ferrymesh_test_support::upstream::HttpEcho;
use tokio::io::AsyncBufReadExt as _;

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_shows_a_request_within_a_second() {
    let mesh = Mesh::start(&[("echo.yaml", &service("echo"))]);
    let echo = HttpEcho::start("echo-1").await;
    let _server = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let client = client_proxy(&mesh, "echo.shop", 1).await;
    let state = tempfile::tempdir().unwrap();
    mesh.write_ferryctl_state(state.path());
    let mut tap = tokio::process::Command::new(bin("ferryctl"))
        .arg("--state-dir")
        .arg(state.path())
        .args(["tap", "echo", "--path", "/tapped", "--count", "2", "--json"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(tap.stdout.take().unwrap()).lines();
    let http = proxied(client.addr("outbound"));
    // Requests go out every 100 ms until the tap has attached and shown one.
    let sender = tokio::spawn(async move {
        for i in 0..100 {
            let _ = http
                .get(format!("http://echo.shop/tapped/{i}"))
                .send()
                .await;
            let _ = http.get("http://echo.shop/other").send().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("a request shows up")
        .unwrap()
        .unwrap();
    let seen_at = now_ms();
    sender.abort();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["service"], "shop/echo", "{v}");
    assert!(v["path"].as_str().unwrap().starts_with("/tapped/"), "{v}");
    let lag = seen_at.saturating_sub(v["start_ms"].as_u64().unwrap());
    assert!(lag < 1_000, "shown {lag} ms after the request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_tells_a_traced_requests_hops_and_decisions() {
    let spec = "  retry: {attempts: 2, retryOn: [5xx], backoff: {strategy: Constant, base: 1ms, max: 1ms}}\n";
    let files = service("echo") + &ferrymesh_test_support::mesh::yaml::policy("echo", spec);
    let mesh = Mesh::start(&[("echo.yaml", &files)]);
    let echo = HttpEcho::start("echo-1").await;
    let _server = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let client = client_proxy(&mesh, "echo.shop", 1).await;
    let state = tempfile::tempdir().unwrap();
    mesh.write_ferryctl_state(state.path());
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let rsp = proxied(client.addr("outbound"))
        .get("http://echo.shop/status/503")
        .header("traceparent", format!("00-{trace}-b7ad6b7169203331-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 503);
    let out = std::process::Command::new(bin("ferryctl"))
        .arg("--state-dir")
        .arg(state.path())
        .args(["explain", trace, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hops: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    // The caller's proxy (one call, three attempts) and the server's (three requests).
    assert_eq!(hops[0]["direction"], "outbound", "{hops:?}");
    assert_eq!(hops[0]["attempts"], 3);
    let decisions = hops[0]["decisions"].to_string();
    assert!(decisions.contains("retry on 5xx"), "{decisions}");
    assert_eq!(
        hops.iter().filter(|h| h["direction"] == "inbound").count(),
        3
    );
    assert!(hops.iter().all(|h| h["trace_id"] == trace));
    let human = std::process::Command::new(bin("ferryctl"))
        .arg("--state-dir")
        .arg(state.path())
        .args(["explain", trace])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.starts_with("1. outbound at shop/client"), "{text}");
    let missing = std::process::Command::new(bin("ferryctl"))
        .arg("--state-dir")
        .arg(state.path())
        .args(["explain", "00000000000000000000000000000001"])
        .output()
        .unwrap();
    assert!(!missing.status.success(), "an unknown trace is an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_tap_does_not_hold_up_a_proxys_shutdown() {
    let mesh = Mesh::start(&[("echo.yaml", &service("echo"))]);
    let echo = HttpEcho::start("echo-1").await;
    let mut server = mesh.proxy(&ProxySpec {
        drain_timeout: Some("20s".into()),
        ..ProxySpec::app("echo-1", "echo", echo.addr)
    });
    // A tap stream held open on the proxy's admin listener.
    let mut tap = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{}/tap", server.addr("admin")))
        .send()
        .await
        .unwrap();
    assert_eq!(tap.status(), 200);
    let started = tokio::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || server.terminate(Duration::from_secs(15)))
        .await
        .unwrap()
        .expect("the proxy exits");
    assert!(status.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited after {:?}, not at its 20s drain deadline",
        started.elapsed()
    );
    // The stream ended with the proxy.
    let end = tokio::time::timeout(Duration::from_secs(5), tap.chunk()).await;
    assert!(matches!(end, Ok(Ok(None) | Err(_))), "{end:?}");
}
