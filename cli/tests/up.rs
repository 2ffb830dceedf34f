//! A smoke test of `ferryctl up` on the demo folder: the storefront answers through sidecars,
//! `ferryctl chaos` breaks a part visibly, `status --json` lists everything, and SIGTERM stops
//! every process it started.
#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::process::Command;
use std::time::Duration;

use ferrymesh_test_support::mesh::{eventually, get};
use ferrymesh_test_support::process::{Spawned, bin};
use serde_json::Value;

/// The pids of every live process whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) && fields[0] != "Z" {
            out.push(entry.file_name().to_string_lossy().parse().unwrap());
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

fn ferryctl(state: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("ferryctl"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)] // one scenario, in order: up, use, break, stop
async fn up_serves_the_storefront_and_stops_cleanly() {
    let state = tempfile::tempdir().unwrap();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo-apps/mesh");
    let mut cmd = Command::new(bin("ferryctl"));
    cmd.arg("--state-dir")
        .arg(state.path())
        .args(["up", "--entry", "127.0.0.1:0", "--config-dir"])
        .arg(&demo);
    let mut up = Spawned::start("ferryctl up", cmd, &state.path().join("up.log")).unwrap();
    let entry: std::net::SocketAddr = up.listening["entry"].as_str().unwrap().parse().unwrap();
    let started = children(up.pid());
    assert!(
        started.len() >= 20,
        "controller + 9 apps + 9 sidecars + entry, got {}",
        started.len()
    );

    // The product page composes all four parts through sidecars.
    let page = || async move {
        let (status, body) = get(entry, "/api/product-page?id=1").await.ok()?;
        (status == 200)
            .then(|| serde_json::from_str::<Value>(&body).ok())
            .flatten()
    };
    eventually(Duration::from_secs(10), || async {
        page()
            .await
            .is_some_and(|p| p["failed"].as_array().is_some_and(Vec::is_empty))
    })
    .await
    .expect("the product page is complete");
    let doc = page().await.unwrap();
    assert_eq!(doc["product"]["name"], "Ferry ticket");
    assert_eq!(doc["price"]["currency"], "EUR");
    assert!(doc["stock"]["available"].is_number());
    assert!(doc["reviews"].as_array().is_some_and(|r| !r.is_empty()));
    let (status, html) = get(entry, "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        html.contains("<table>") && html.contains("Ferry ticket"),
        "{html}"
    );

    // status --json lists every service, the 3 catalog replicas, and each proxy's listeners.
    // A replica is an endpoint once its proxy holds its inbound policy: the page can be whole
    // (one catalog replica is enough) a moment before the third is listed.
    let status_json = || {
        let out = ferryctl(state.path(), &["status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let catalog_endpoints = |status: &Value| {
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "catalog")
            .and_then(|c| c["ports"][0]["endpoints"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    eventually(Duration::from_secs(10), || async {
        catalog_endpoints(&status_json()) == 3
    })
    .await
    .expect("the 3 catalog replicas are listed");
    let status = status_json();
    assert!(
        status["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["listeners"]["admin"].is_string())
    );
    // mTLS is on by default: every proxy has its identity and a certificate good for a day.
    for p in status["proxies"].as_array().unwrap() {
        let service = p["service"].as_str().unwrap().rsplit('/').next().unwrap();
        let sa = if service.is_empty() { "entry" } else { service };
        assert_eq!(
            p["identity"],
            format!("spiffe://cluster.local/ns/shop/sa/{sa}"),
            "{p}"
        );
        let left = p["certificate"]["validForSeconds"].as_u64().unwrap_or(0);
        assert!(left > 23 * 3600 && left <= 24 * 3600, "{p}");
    }
    let text = String::from_utf8(ferryctl(state.path(), &["status"]).stdout).unwrap();
    assert!(
        text.contains(
            "identity spiffe://cluster.local/ns/shop/sa/pricing  certificate expires in 2"
        ),
        "{text}"
    );

    // An order through the storefront's sidecar: orders calls inventory and payments.
    let storefront = status["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["service"] == "shop/storefront")
        .unwrap();
    let outbound = storefront["listeners"]["outbound"].as_str().unwrap();
    let http = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{outbound}")).unwrap())
        .build()
        .unwrap();
    let rsp = http
        .post("http://orders.shop/orders")
        .json(&serde_json::json!({"productId": 2, "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 201);
    let order: Value = rsp.json().await.unwrap();
    assert_eq!(order["reservation"]["remaining"], 11);
    assert_eq!(order["payment"]["amount"], 49.99);

    // Chaos on pricing shows in the page, and reset brings it back.
    let out = ferryctl(state.path(), &["chaos", "pricing", "--error-rate", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = page().await.unwrap();
    assert_eq!(doc["failed"], serde_json::json!(["price"]));
    assert_eq!(doc["price"]["error"]["status"], 500);
    let out = ferryctl(state.path(), &["chaos", "pricing", "--reset"]);
    assert!(out.status.success());
    assert_eq!(page().await.unwrap()["failed"], serde_json::json!([]));
    let out = ferryctl(
        state.path(),
        &["chaos", "catalog", "--instance", "9", "--ready", "false"],
    );
    assert!(!out.status.success(), "an out-of-range instance is refused");

    // Readiness off on one catalog replica takes it out of the endpoints; the page still works.
    let out = ferryctl(
        state.path(),
        &["chaos", "catalog", "--instance", "2", "--ready", "false"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let catalog_endpoints = || async {
        let out = ferryctl(state.path(), &["status", "--json"]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        let catalog = status["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "catalog")
            .cloned()
            .unwrap();
        catalog["ports"][0]["endpoints"].as_array().unwrap().len()
    };
    eventually(Duration::from_secs(5), || async {
        catalog_endpoints().await == 2
    })
    .await
    .expect("catalog-2 left the endpoints");
    assert_eq!(page().await.unwrap()["failed"], serde_json::json!([]));

    // SIGTERM stops everything it started.
    let exit = tokio::task::spawn_blocking(move || up.terminate(Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "ferryctl up exited with {exit}");
    let left: Vec<u32> = started.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(!state.path().join("state.json").exists());
}
