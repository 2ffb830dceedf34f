//! FaultInjection through real proxies: server-side aborts with header opt-in and workload
//! selection, client-side aborts that never reach the upstream, and TTL: faults kept alive by
//! the controller's heartbeat, dropped when the controller is gone.

#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::time::Duration;

use ferrymesh_test_support::mesh::{Mesh, ProxySpec, counter, eventually, get, proxied as client};
use ferrymesh_test_support::process::Spawned;
use ferrymesh_test_support::upstream::HttpEcho;

const ECHO: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n";

fn fault(spec: &str) -> String {
    format!(
        "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: FaultInjection\nmetadata: {{name: chaos, namespace: shop}}\n\
         spec:\n  targetRefs: [{{group: \"\", kind: Service, name: echo}}]\n  duration: 10m\n{spec}"
    )
}

async fn ready(proxy: &Spawned) {
    let health = proxy.addr("health");
    eventually(Duration::from_secs(10), || async move {
        get(health, "/ready").await.is_ok_and(|(s, _)| s == 200)
    })
    .await
    .unwrap();
}

async fn status(http: &reqwest::Client, chaos: bool) -> (u16, Option<String>, String) {
    let mut req = http.get("http://echo.shop/");
    if chaos {
        req = req.header("x-chaos", "on");
    }
    let rsp = req.send().await.unwrap();
    let cause = rsp
        .headers()
        .get("ferrymesh-error")
        .map(|v| v.to_str().unwrap().to_owned());
    let instance = rsp
        .headers()
        .get("x-instance")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (rsp.status().as_u16(), cause, instance)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_aborts_hit_opted_in_requests_on_selected_workloads() {
    let spec = "  workloadSelector: {matchLabels: {version: v2}}\n  match: {headers: [{name: x-chaos, value: \"on\"}]}\n  abort: {httpStatus: 503, percentage: 100}\n";
    // Round robin: both versions take turns, so the test never depends on how a latency-aware
    // balancer rates an instance whose answers are the proxy's own 503s.
    let lb = ferrymesh_test_support::mesh::yaml::policy(
        "echo",
        "  loadBalancer: {algorithm: RoundRobin}\n",
    );
    let mesh = Mesh::start(&[
        ("echo.yaml", &format!("{ECHO}---\n{lb}")),
        ("fault.yaml", &fault(spec)),
    ]);
    let v1 = HttpEcho::start("echo-v1").await;
    let v2 = HttpEcho::start("echo-v2").await;
    let _p1 = mesh.proxy(&ProxySpec {
        labels: vec![("version".into(), "v1".into())],
        ..ProxySpec::app("echo-v1", "echo", v1.addr)
    });
    let p2 = mesh.proxy(&ProxySpec {
        labels: vec![("version".into(), "v2".into())],
        ..ProxySpec::app("echo-v2", "echo", v2.addr)
    });
    let c = ferrymesh_test_support::mesh::client_proxy(&mesh, "echo.shop", 2).await;
    let http = client(c.addr("outbound"));
    // Wait until the v2 proxy holds the fault.
    let admin = p2.addr("admin");
    eventually(Duration::from_secs(5), || async move {
        ferrymesh_test_support::mesh::get_json(admin, "/config_dump")
            .await
            .to_string()
            .contains("FaultInjection shop/chaos")
    })
    .await
    .unwrap();
    let mut v2_aborts: u64 = 0;
    for _ in 0..20 {
        // Two opted-in requests in a row: round robin sends one to each version.
        for _ in 0..2 {
            let (code, cause, instance) = status(&http, true).await;
            if code == 503 {
                assert_eq!(cause.as_deref(), Some("fault-injected"));
                v2_aborts += 1;
            } else {
                assert_eq!(
                    (code, instance.as_str()),
                    (200, "echo-v1"),
                    "v1 is not selected"
                );
            }
        }
        let (code, _, _) = status(&http, false).await;
        assert_eq!(
            code, 200,
            "requests without the opt-in header are untouched"
        );
    }
    assert!(v2_aborts > 0, "v2 got some of the traffic and aborted it");
    assert_eq!(
        counter(
            p2.addr("health"),
            "ferrymesh_proxy_faults_injected_total",
            r#"kind="abort""#
        )
        .await,
        v2_aborts
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_aborts_never_reach_the_upstream() {
    let spec = "  side: Client\n  abort: {httpStatus: 500, percentage: 100}\n";
    let mesh = Mesh::start(&[("echo.yaml", ECHO), ("fault.yaml", &fault(spec))]);
    let echo = HttpEcho::start("echo-1").await;
    let _p = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let c = mesh.proxy(&ProxySpec::client("client"));
    ready(&c).await;
    let http = client(c.addr("outbound"));
    eventually(Duration::from_secs(5), || async {
        status(&http, false).await.0 == 500
    })
    .await
    .unwrap();
    let hits = echo.hits.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(
            status(&http, false).await,
            (500, Some("fault-injected".into()), String::new())
        );
    }
    assert_eq!(
        echo.hits.load(std::sync::atomic::Ordering::SeqCst),
        hits,
        "the upstream saw none of them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_live_on_the_heartbeat_and_stop_at_their_ttl_without_a_controller() {
    let spec = "  abort: {httpStatus: 503, percentage: 100}\n";
    let mut mesh = Mesh::start_with(
        &[("echo.yaml", ECHO), ("fault.yaml", &fault(spec))],
        &["--fault-ttl", "1s"],
    );
    let echo = HttpEcho::start("echo-1").await;
    let _p = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let c = mesh.proxy(&ProxySpec::client("client"));
    ready(&c).await;
    let http = client(c.addr("outbound"));
    eventually(Duration::from_secs(5), || async {
        status(&http, false).await.0 == 503
    })
    .await
    .unwrap();
    // For three TTLs every request still meets the fault: the controller refreshes it.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        assert_eq!(
            status(&http, false).await.0,
            503,
            "the fault held while refreshed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // No controller, no refresh: the fault stops within its TTL; traffic flows.
    mesh.controller.kill();
    let took = eventually(Duration::from_secs(5), || async {
        status(&http, false).await.0 == 200
    })
    .await
    .expect("the fault lapsed");
    assert!(
        took <= Duration::from_millis(1500),
        "stopped {took:?} after the controller died"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_stops_by_itself_at_the_end_of_its_duration() {
    // The shortest duration the API allows is one minute: this test waits for it.
    let spec = "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: FaultInjection\nmetadata: {name: chaos, namespace: shop}\n\
                spec:\n  targetRefs: [{group: \"\", kind: Service, name: echo}]\n  duration: 1m\n  abort: {httpStatus: 503, percentage: 100}\n";
    let mesh = Mesh::start(&[("echo.yaml", ECHO), ("fault.yaml", spec)]);
    let echo = HttpEcho::start("echo-1").await;
    let echo_proxy = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let c = mesh.proxy(&ProxySpec::client("client"));
    ready(&c).await;
    let http = client(c.addr("outbound"));
    let started = tokio::time::Instant::now();
    eventually(Duration::from_secs(5), || async {
        status(&http, false).await.0 == 503
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(75), || async {
        status(&http, false).await.0 == 200
    })
    .await
    .expect("the fault ended");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(55), "ended too early: {took:?}");
    // The controller stopped serving it too: the workload's inbound policy has no fault left.
    let admin = echo_proxy.addr("admin");
    eventually(Duration::from_secs(5), || async move {
        let dump = ferrymesh_test_support::mesh::get_json(admin, "/config_dump").await;
        dump["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["type"] == "INBOUND_POLICY" && r["value"]["faults"] == serde_json::json!([]))
    })
    .await
    .expect("the controller withdrew the fault");
}
