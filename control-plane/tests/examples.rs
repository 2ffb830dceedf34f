//! The example policies of `demo-apps/policies/` (one per pattern, off by default) work as
//! shipped: each ResiliencePolicy reaches a proxy beside the demo folder with every section it
//! sets attributed to it, and the client-side fault example injects for real.
#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrymesh_test_support::mesh::{Mesh, ProxySpec, client_proxy, eventually, get_json, proxied};
use serde::Deserialize as _;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The demo folder's files plus `extra`, as (name, text).
fn demo_with(extra: &Path) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(repo().join("demo-apps/mesh"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.push((
        extra.file_name().unwrap().to_string_lossy().into_owned(),
        std::fs::read_to_string(extra).unwrap(),
    ));
    files
}

/// Every document of a YAML file, as JSON.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml_ng::Value::deserialize(d).unwrap()).unwrap())
        .collect()
}

fn examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("demo-apps/policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

const SECTIONS: [&str; 8] = [
    "timeouts",
    "retry",
    "circuitBreaker",
    "outlierDetection",
    "healthCheck",
    "fallback",
    "cache",
    "loadBalancer",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_resilience_example_reaches_a_proxy_with_its_sections() {
    let mut checked = 0;
    for example in examples() {
        let policies: Vec<Value> = documents(&example)
            .into_iter()
            .filter(|d| d["kind"] == "ResiliencePolicy")
            .collect();
        if policies.is_empty() {
            continue;
        }
        let files = demo_with(&example);
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        let mesh = Mesh::start(&files);
        let client = mesh.proxy(&ProxySpec::client("client"));
        let http = proxied(client.addr("outbound"));
        let admin = client.addr("admin");
        for p in policies {
            let name = p["metadata"]["name"].as_str().unwrap();
            let service = p["spec"]["targetRefs"][0]["name"].as_str().unwrap();
            let _ = http.get(format!("http://{service}.shop/")).send().await; // subscribes
            let target = format!("{service}.shop.svc.cluster.local:80");
            let source = format!("ResiliencePolicy shop/{name}@1");
            let set: Vec<&str> = SECTIONS
                .into_iter()
                .filter(|s| !p["spec"][*s].is_null())
                .collect();
            assert!(!set.is_empty(), "{name} sets no section");
            let arrived = eventually(Duration::from_secs(5), || {
                let (target, source, set) = (target.clone(), source.clone(), set.clone());
                async move {
                    let dump = get_json(admin, "/config_dump").await;
                    dump["resources"].as_array().unwrap().iter().any(|r| {
                        r["type"] == "CLIENT_POLICY"
                            && r["name"] == target.as_str()
                            && set
                                .iter()
                                .all(|s| r["value"]["sections"][*s] == source.as_str())
                    })
                }
            })
            .await;
            assert!(
                arrived.is_ok(),
                "{}: {name}'s sections {set:?} did not reach the proxy for {target}",
                example.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} example policies found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_side_abort_example_injects_for_opted_in_requests_only() {
    let example = repo().join("demo-apps/policies/fault-abort.yaml");
    let files = demo_with(&example);
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let mesh = Mesh::start(&files);
    let app = mesh.shop("pricing", "pricing-1", &[]);
    let _server = mesh.proxy(&ProxySpec::app("pricing-1", "pricing", app.addr("app")));
    let client = client_proxy(&mesh, "pricing.shop", 1).await;
    let http = proxied(client.addr("outbound"));
    let mut injected = 0;
    for i in 0..40 {
        let mut req = http.get("http://pricing.shop/prices/1");
        if i % 2 == 0 {
            req = req.header("x-chaos", "on");
        }
        let rsp = req.send().await.unwrap();
        let fault = rsp
            .headers()
            .get("ferrymesh-error")
            .is_some_and(|v| v == "fault-injected");
        if fault {
            assert_eq!(rsp.status(), 503);
            assert_eq!(i % 2, 0, "request {i} did not opt in but met the fault");
            injected += 1;
        } else {
            assert_eq!(rsp.status(), 200);
        }
    }
    // 50% of 20 opted-in requests: 0 or 20 would be a one-in-a-million draw.
    assert!((1..20).contains(&injected), "{injected} of 20 injected");
}
