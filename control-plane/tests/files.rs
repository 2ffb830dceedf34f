//! The file source end to end: edits to the config folder reach proxies within a second; an
//! invalid file is rejected with file, object and field, and the last good config stays.
#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::time::Duration;

use ferrymesh_test_support::mesh::{Mesh, ProxySpec, eventually, get, get_json};
use ferrymesh_test_support::upstream::HttpEcho;
use serde_json::Value;

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n";

fn policy(request: &str) -> String {
    format!(
        "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: echo, namespace: shop}}\n\
         spec:\n  targetRefs: [{{group: \"\", kind: Service, name: echo}}]\n  timeouts: {{request: {request}}}\n"
    )
}

/// The client policy the proxy holds for echo: (version, request timeout in seconds).
async fn held_policy(admin: std::net::SocketAddr) -> Option<(String, Value)> {
    let dump = get_json(admin, "/config_dump").await;
    dump["resources"]
        .as_array()?
        .iter()
        .find(|r| r["type"] == "CLIENT_POLICY" && r["state"] == "found")
        .map(|r| {
            (
                r["version"].as_str().unwrap_or_default().to_owned(),
                r["value"]["request_timeout"]["secs"].clone(),
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_reach_proxies_and_invalid_files_keep_the_last_good_config() {
    let mesh = Mesh::start(&[("echo.yaml", SERVICE), ("policy.yaml", &policy("5s"))]);
    let echo = HttpEcho::start("echo-1").await;
    let _echo_proxy = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let client = mesh.proxy(&ProxySpec::client("client"));
    let admin = client.addr("admin");
    let http = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{}", client.addr("outbound"))).unwrap())
        .build()
        .unwrap();
    // The echo's sidecar registers on its own schedule: poll until it serves.
    eventually(Duration::from_secs(5), || async {
        http.get("http://echo.shop/")
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await
    .expect("echo is served through both sidecars");
    eventually(Duration::from_secs(5), || async move {
        held_policy(admin).await.is_some_and(|(_, t)| t == 5)
    })
    .await
    .expect("the proxy holds the 5s policy");
    let dump = get_json(admin, "/config_dump").await;
    let sources = dump["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "CLIENT_POLICY")
        .unwrap()["sources"]
        .to_string();
    assert!(
        sources.contains("ResiliencePolicy shop/echo") && sources.contains("policy.yaml"),
        "{sources}"
    );

    // An edit reaches the proxy within a second.
    mesh.write("policy.yaml", &policy("2s"));
    let took = eventually(Duration::from_secs(1), || async move {
        held_policy(admin).await.is_some_and(|(_, t)| t == 2)
    })
    .await
    .expect("the edit reached the proxy within 1s");
    eprintln!("edit seen by the proxy after {took:?}");
    let (good_version, _) = held_policy(admin).await.unwrap();

    // An invalid edit is rejected, named, and changes nothing.
    mesh.write("policy.yaml", &policy("2 seconds"));
    let status = eventually(Duration::from_secs(3), || async {
        !mesh.status().await["fileErrors"]
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
    status.expect("the controller reports the rejected file");
    let s = mesh.status().await;
    let err = &s["fileErrors"][0];
    assert!(
        err["file"].as_str().unwrap().ends_with("policy.yaml"),
        "{err}"
    );
    assert_eq!(err["object"], "ResiliencePolicy shop/echo");
    assert_eq!(err["field"], "spec.timeouts.request");
    let metrics = get(mesh.controller.addr("admin"), "/metrics")
        .await
        .unwrap()
        .1;
    assert!(
        metrics.contains("ferrymesh_controller_config_file_errors 1"),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        held_policy(admin).await.unwrap().0,
        good_version,
        "the proxy keeps the last good policy"
    );
    assert!(
        mesh.controller.log_text().contains("spec.timeouts.request"),
        "the controller log names the field"
    );

    // Fixing the file clears the error; deleting it drops the policy.
    mesh.write("policy.yaml", &policy("3s"));
    eventually(Duration::from_secs(2), || async move {
        held_policy(admin).await.is_some_and(|(_, t)| t == 3)
    })
    .await
    .unwrap();
    assert!(
        mesh.status().await["fileErrors"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    std::fs::remove_file(mesh.config_dir().join("policy.yaml")).unwrap();
    eventually(Duration::from_secs(2), || async move {
        held_policy(admin).await.is_some_and(|(_, t)| t.is_null())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_service_file_turns_not_found_into_endpoints() {
    let mesh = Mesh::start(&[]);
    let client = mesh.proxy(&ProxySpec {
        unknown_hosts: Some("Reject".into()),
        ..ProxySpec::client("client")
    });
    let http = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{}", client.addr("outbound"))).unwrap())
        .build()
        .unwrap();
    let rsp = http.get("http://legacy.shop/").send().await.unwrap();
    assert_eq!(rsp.headers()["ferrymesh-error"], "unknown-host");

    // A static EndpointSlice for an unmeshed backend.
    let legacy = HttpEcho::start("legacy").await;
    mesh.write(
        "legacy.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: legacy, namespace: shop}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: legacy-1, namespace: shop, labels: {{kubernetes.io/service-name: legacy}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [\"127.0.0.1\"]}}]\n",
            legacy.addr.port()
        ),
    );
    eventually(Duration::from_secs(2), || async {
        http.get("http://legacy.shop/")
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await
    .expect("the new service is served");
    let rsp = http.get("http://legacy.shop/x").send().await.unwrap();
    assert_eq!(rsp.headers()["x-instance"], "legacy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_policy_reaches_the_proxy_with_every_section_and_its_source() {
    let full = r#"
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: echo-full, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: echo}]
  timeouts: {request: 3s, perTry: 800ms}
  retry: {attempts: 4, retryOn: [5xx], budget: {ratio: "0.5"}}
  circuitBreaker: {tripWhen: {consecutiveFailures: 5}}
  outlierDetection: {consecutiveErrors: 5}
  healthCheck: {http: {path: /healthz}}
  fallback: {staticResponse: {status: 200, body: "{}"}}
  cache: {maxEntries: 10}
  loadBalancer: {algorithm: RoundRobin}
---
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: shop-wide, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Namespace, name: shop}]
  timeouts: {request: 9s}
"#;
    let mesh = Mesh::start(&[("echo.yaml", SERVICE), ("policy.yaml", full)]);
    let client = mesh.proxy(&ProxySpec::client("client"));
    let admin = client.addr("admin");
    let http = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{}", client.addr("outbound"))).unwrap())
        .build()
        .unwrap();
    let _ = http.get("http://echo.shop/").send().await.unwrap(); // subscribes
    let policy = || async move {
        let dump = get_json(admin, "/config_dump").await;
        dump["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == "CLIENT_POLICY" && r["state"] == "found")
            .map(|r| r["value"].clone())
    };
    eventually(Duration::from_secs(5), || async {
        policy().await.is_some()
    })
    .await
    .unwrap();
    let p = policy().await.unwrap();
    assert_eq!(
        p["request_timeout"]["secs"], 3,
        "the Service policy's timeouts win over the Namespace's: {p}"
    );
    assert_eq!(p["retry"]["attempts"], 4);
    assert_eq!(p["retry"]["retry_on"], serde_json::json!(["server-error"]));
    assert_eq!(p["retry"]["budget"]["ratio"], 0.5);
    assert_eq!(p["breaker"]["consecutive_failures"], 5);
    assert_eq!(p["outlier"]["consecutive_errors"], 5);
    assert_eq!(p["health_check"]["check"]["http"]["path"], "/healthz");
    assert_eq!(p["fallback"]["target"]["staticResponse"]["status"], 200);
    assert_eq!(p["cache"]["max_entries"], 10);
    assert_eq!(p["lb"], "RoundRobin");
    for section in [
        "timeouts",
        "retry",
        "circuitBreaker",
        "outlierDetection",
        "healthCheck",
        "fallback",
        "cache",
        "loadBalancer",
    ] {
        assert_eq!(
            p["sections"][section], "ResiliencePolicy shop/echo-full@1",
            "{section}: {p}"
        );
    }
}
