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
