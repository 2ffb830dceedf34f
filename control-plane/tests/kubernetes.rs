//! The controller on its Kubernetes source, driven through a fake API server with the
//! production kube client: Services, EndpointSlices and policy CRs created, changed and deleted
//! change what a real client proxy holds; a CR the CRD's CEL rules forbid is refused by the API
//! server, one only the controller can judge gets Accepted=False with the reason (and the last
//! good generation keeps being served); status is written with
//! server-side apply and its observedGeneration follows the generation; a watch that expires
//! (410 Gone) relists without losing or duplicating anything.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use ferrymesh_test_support::kube_api::{FakeApi, apply, delete_object, try_apply};
use ferrymesh_test_support::mesh::{Mesh, ProxySpec, eventually, get_json, proxied};
use ferrymesh_test_support::upstream::HttpEcho;
use serde_json::Value;

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: shop}\n\
                       spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 80, targetPort: 8080}]}\n";

/// One EndpointSlice per backend (each listens on its own loopback port).
fn slice(name: &str, addr: SocketAddr, ready: bool) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: echo}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {}}}]\n\
         endpoints: [{{addresses: [\"{}\"], conditions: {{ready: {ready}}}, zone: a}}]\n",
        addr.port(),
        addr.ip()
    )
}

fn policy(timeout: &str) -> String {
    format!(
        "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\n\
         metadata: {{name: echo-timeouts, namespace: shop}}\n\
         spec:\n  targetRefs: [{{group: \"\", kind: Service, name: echo}}]\n  timeouts: {{request: {timeout}}}\n"
    )
}

/// The CLIENT_POLICY a proxy holds for echo, and the number of ready endpoints.
async fn held(admin: SocketAddr) -> (Option<Value>, usize) {
    let dump = get_json(admin, "/config_dump").await;
    let resources = dump["resources"].as_array().cloned().unwrap_or_default();
    let name = "echo.shop.svc.cluster.local:80";
    let policy = resources
        .iter()
        .find(|r| r["type"] == "CLIENT_POLICY" && r["name"] == name)
        .map(|r| r["value"].clone());
    let endpoints = resources
        .iter()
        .find(|r| r["type"] == "ENDPOINTS" && r["name"] == name)
        .and_then(|r| r["value"]["endpoints"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|e| e["ready"] != false)
        .count();
    (policy, endpoints)
}

/// Every endpoint the proxy holds for echo, ready or not.
async fn listed(admin: SocketAddr) -> usize {
    let dump = get_json(admin, "/config_dump").await;
    dump["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "ENDPOINTS" && r["name"] == "echo.shop.svc.cluster.local:80")
        .unwrap()["value"]["endpoints"]
        .as_array()
        .unwrap()
        .len()
}

/// Waits for the proxy to hold 3 ready endpoints for echo, and checks it holds no other
/// (none lost, none twice).
async fn three_endpoints_once(admin: SocketAddr, what: &str) {
    eventually(Duration::from_secs(10), || async move {
        held(admin).await.1 == 3
    })
    .await
    .expect(what);
    assert_eq!(listed(admin).await, 3, "no endpoint lost or duplicated");
}

/// The whole-request timeout the proxy applies, in seconds.
fn request_timeout(policy: Option<&Value>) -> Option<u64> {
    policy?["request_timeout"]["secs"].as_u64()
}

fn status_of(api: &FakeApi, name: &str) -> Value {
    api.get(
        "/apis/policy.ferrymesh.io/v1alpha1",
        "resiliencepolicies",
        "shop",
        name,
    )
    .map_or(Value::Null, |o| o["status"].clone())
}

fn condition<'a>(status: &'a Value, ty: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)
}

struct Setup {
    api: FakeApi,
    client: kube::Client,
    _mesh: Mesh,
    proxy: ferrymesh_test_support::process::Spawned,
    echoes: Vec<HttpEcho>,
}

async fn setup() -> Setup {
    let api = FakeApi::start().await;
    api.install_mesh_crds();
    let client = api.client().await;
    let echoes = vec![
        HttpEcho::start("echo-1").await,
        HttpEcho::start("echo-2").await,
        HttpEcho::start("echo-3").await,
    ];
    apply(&client, SERVICE).await;
    apply(&client, &slice("echo-1", echoes[0].addr, true)).await;
    apply(&client, &slice("echo-2", echoes[1].addr, true)).await;
    let mesh = Mesh::start_kubernetes(&api.kubeconfig(), &[]);
    let proxy = mesh.proxy(&ProxySpec::client("client"));
    // Subscribe, then wait for the two listed endpoints.
    let http = proxied(proxy.addr("outbound"));
    let _ = http.get("http://echo.shop/").send().await;
    let admin = proxy.addr("admin");
    eventually(Duration::from_secs(10), || async move {
        held(admin).await.1 == 2
    })
    .await
    .expect("the listed endpoints reach the proxy");
    Setup {
        api,
        client,
        _mesh: mesh,
        proxy,
        echoes,
    }
}

#[tokio::test]
async fn policies_applied_changed_and_deleted_reach_the_proxies_with_status() {
    let Setup {
        api,
        client,
        _mesh,
        proxy,
        echoes: _echoes,
    } = setup().await;
    let admin = proxy.addr("admin");

    // Applied: the proxy holds the timeout; status says Accepted and Programmed, generation 1.
    apply(&client, &policy("3s")).await;
    eventually(Duration::from_secs(5), || async move {
        request_timeout(held(admin).await.0.as_ref()) == Some(3)
    })
    .await
    .expect("the applied policy reaches the proxy");
    let ok = eventually(Duration::from_secs(5), || async {
        let s = status_of(&api, "echo-timeouts");
        condition(&s, "Accepted")
            .is_some_and(|c| c["status"] == "True" && c["observedGeneration"] == 1)
            && condition(&s, "Programmed").is_some_and(|c| c["status"] == "True")
            && s["ancestors"][0]["ancestorRef"]["name"] == "echo"
            && s["ancestors"][0]["controllerName"] == "ferrymesh.io/controller"
    })
    .await;
    if let Err(e) = ok {
        panic!("{e}: status {}", status_of(&api, "echo-timeouts"));
    }
    // Written with server-side apply by our field manager, on the status subresource.
    let patches = api.status_patches();
    assert!(
        patches
            .iter()
            .any(|(plural, name, manager, ct)| plural == "resiliencepolicies"
                && name == "shop/echo-timeouts"
                && manager == "ferrymesh-controller"
                && ct.starts_with("application/apply-patch")),
        "{patches:?}"
    );

    // Changed: the new timeout replaces the old; observedGeneration follows to 2.
    apply(&client, &policy("7s")).await;
    eventually(Duration::from_secs(5), || async move {
        request_timeout(held(admin).await.0.as_ref()) == Some(7)
    })
    .await
    .expect("the changed policy reaches the proxy");
    eventually(Duration::from_secs(5), || async {
        let s = status_of(&api, "echo-timeouts");
        s["observedGeneration"] == 2
            && condition(&s, "Accepted").is_some_and(|c| c["observedGeneration"] == 2)
    })
    .await
    .expect("observedGeneration follows generation");

    // perTry above request: the CRD's CEL rule, so the API server itself refuses it.
    let refused = policy("7s").replace(
        "timeouts: {request: 7s}",
        "timeouts: {request: 1s, perTry: 2s}",
    );
    let err = try_apply(&client, &refused).await.unwrap_err();
    assert!(err.to_string().contains("perTry <= request"), "{err}");
    // A retry condition the schema cannot judge: accepted by the API server, refused by the
    // controller with the reason; the proxy keeps generation 2.
    let bad = policy("7s").replace("timeouts: {request: 7s}", "retry: {retryOn: [sometimes]}");
    apply(&client, &bad).await;
    let ok = eventually(Duration::from_secs(5), || async {
        let s = status_of(&api, "echo-timeouts");
        condition(&s, "Accepted").is_some_and(|c| {
            c["status"] == "False"
                && c["reason"] == "Invalid"
                && c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("retryOn is one of"))
                && c["observedGeneration"] == 3
        })
    })
    .await;
    if let Err(e) = ok {
        panic!("{e}: status {}", status_of(&api, "echo-timeouts"));
    }
    assert!(
        request_timeout(held(admin).await.0.as_ref()) == Some(7),
        "the last good generation stays"
    );

    // Deleted: the timeout leaves the proxy.
    delete_object(
        &client,
        "policy.ferrymesh.io/v1alpha1",
        "ResiliencePolicy",
        "shop",
        "echo-timeouts",
    )
    .await;
    eventually(Duration::from_secs(5), || async move {
        request_timeout(held(admin).await.0.as_ref()).is_none()
    })
    .await
    .expect("the deleted policy leaves the proxy");
}

/// The controller measured how far behind the API it applied the change.
async fn watch_lag_measured(mesh: &Mesh) {
    let (_, metrics) = ferrymesh_test_support::mesh::get(mesh.controller.addr("admin"), "/metrics")
        .await
        .unwrap();
    let count = metrics
        .lines()
        .find(|l| {
            l.starts_with("ferrymesh_controller_watch_lag_seconds_count{kind=\"EndpointSlice\"}")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(count >= 1, "{metrics}");
    assert!(
        metrics.contains(
            "ferrymesh_controller_watch_lag_seconds_bucket{le=\"2.0\",kind=\"EndpointSlice\"}"
        ) || metrics.contains(
            "ferrymesh_controller_watch_lag_seconds_bucket{kind=\"EndpointSlice\",le=\"2.0\"}"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_service_scaled_from_two_to_three_endpoints_updates_proxies_within_a_second() {
    let Setup {
        api,
        client,
        _mesh: mesh,
        proxy,
        echoes,
    } = setup().await;
    let admin = proxy.addr("admin");
    apply(&client, &slice("echo-3", echoes[2].addr, true)).await;
    let took = eventually(Duration::from_secs(5), || async move {
        held(admin).await.1 == 3
    })
    .await
    .expect("the third endpoint arrives");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    watch_lag_measured(&mesh).await;
    // Traffic reaches the new endpoint (round robin: the default, PeakEWMA, rightly prefers
    // the endpoints whose connections are already warm over a short run).
    apply(
        &client,
        &policy("5s").replace(
            "timeouts: {request: 5s}",
            "loadBalancer: {algorithm: RoundRobin}",
        ),
    )
    .await;
    eventually(Duration::from_secs(5), || async move {
        held(admin).await.0.is_some_and(|p| p["lb"] == "RoundRobin")
    })
    .await
    .expect("the round-robin policy arrives");
    let http = proxied(proxy.addr("outbound"));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let r = http.get("http://echo.shop/who").send().await.unwrap();
        seen.insert(r.headers()["x-instance"].to_str().unwrap().to_owned());
    }
    assert!(seen.contains("echo-3"), "{seen:?}");

    // Not ready: out of the rotation; a terminating endpoint too.
    apply(&client, &slice("echo-3", echoes[2].addr, false)).await;
    eventually(Duration::from_secs(5), || async move {
        held(admin).await.1 == 2
    })
    .await
    .expect("a not-ready endpoint leaves");

    // Every watch expires (410 Gone on the way back): the controller relists and holds the same
    // set, nothing lost, nothing twice; changes made meanwhile arrive too.
    api.expire_watches();
    delete_object(
        &client,
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "shop",
        "echo-3",
    )
    .await;
    apply(&client, &slice("echo-3b", echoes[2].addr, true)).await;
    three_endpoints_once(admin, "the relisted set").await;
    // The relist came from a 410: the controller counted the expired watch and listed again.
    let (_, metrics) = ferrymesh_test_support::mesh::get(mesh.controller.addr("admin"), "/metrics")
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("ferrymesh_controller_watch_errors_total{kind=\"EndpointSlice\"}")),
        "{metrics}"
    );
    let log = mesh.controller.log_text();
    assert!(
        log.lines()
            .filter(|l| l.contains("listed") && l.contains("EndpointSlice"))
            .count()
            >= 2,
        "{log}"
    );
}

/// Status patches written so far for one resiliencepolicy.
fn patches_for(api: &FakeApi, name: &str) -> usize {
    let key = format!("shop/{name}");
    api.status_patches()
        .iter()
        .filter(|(plural, n, _, _)| plural == "resiliencepolicies" && *n == key)
        .count()
}

#[tokio::test]
async fn a_restarted_controller_serves_the_same_state_and_rewrites_no_status() {
    let Setup {
        api,
        client,
        _mesh: mut mesh,
        proxy,
        echoes,
    } = setup().await;
    let admin = proxy.addr("admin");
    apply(&client, &policy("3s")).await;
    eventually(Duration::from_secs(5), || async {
        request_timeout(held(admin).await.0.as_ref()) == Some(3)
            && condition(&status_of(&api, "echo-timeouts"), "Programmed")
                .is_some_and(|c| c["status"] == "True")
    })
    .await
    .expect("the policy is served and programmed");
    let status_before = status_of(&api, "echo-timeouts");
    let writes_before = patches_for(&api, "echo-timeouts");

    // SIGKILL and a new controller on the same address; traffic goes on meanwhile.
    mesh.restart_controller();
    let http = proxied(proxy.addr("outbound"));
    for _ in 0..20 {
        let r = http.get("http://echo.shop/").send().await.unwrap();
        assert_eq!(r.status(), 200, "no request lost to the restart");
    }

    // The new controller has run its status pass once it writes a new policy's status.
    apply(
        &client,
        &policy("2s")
            .replace("echo-timeouts", "ghost-timeouts")
            .replace("name: echo}", "name: ghost}"),
    )
    .await;
    eventually(Duration::from_secs(10), || async {
        condition(&status_of(&api, "ghost-timeouts"), "Accepted")
            .is_some_and(|c| c["reason"] == "TargetNotFound")
    })
    .await
    .expect("the new controller writes statuses");
    assert_eq!(
        status_of(&api, "echo-timeouts"),
        status_before,
        "an unchanged status keeps its transition times"
    );
    assert_eq!(
        patches_for(&api, "echo-timeouts"),
        writes_before,
        "nothing rewritten"
    );

    // The proxy is served by the new controller: a change arrives, and it holds each endpoint
    // once and the policy still.
    apply(&client, &slice("echo-3", echoes[2].addr, true)).await;
    three_endpoints_once(admin, "the new controller streams to the proxy").await;
    assert_eq!(request_timeout(held(admin).await.0.as_ref()), Some(3));
}

/// The slice the EndpointSlice controller leaves when the Service's selector stops matching
/// a pod (or its last pod goes): written with empty lists, served back as `null`.
fn emptied(name: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: echo}}}}\n\
         addressType: IPv4\nports: []\nendpoints: []\n"
    )
}

/// Every endpoint the proxy holds for echo (none when the resource lists none).
async fn held_at_all(admin: SocketAddr) -> usize {
    let dump = get_json(admin, "/config_dump").await;
    dump["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["type"] == "ENDPOINTS" && r["name"] == "echo.shop.svc.cluster.local:80")
        .and_then(|r| r["value"]["endpoints"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[tokio::test]
async fn a_slice_emptied_to_null_takes_its_endpoints_away_within_a_second() {
    let Setup {
        api,
        client,
        _mesh: mesh,
        proxy,
        echoes: _echoes,
    } = setup().await;
    let admin = proxy.addr("admin");
    // The selector no longer matches echo-2's pod.
    apply(&client, &emptied("echo-2")).await;
    let served = api
        .get(
            "/apis/discovery.k8s.io/v1",
            "endpointslices",
            "shop",
            "echo-2",
        )
        .unwrap();
    assert_eq!(served["endpoints"], Value::Null, "{served}");
    assert_eq!(served["ports"], Value::Null, "{served}");
    let took = eventually(Duration::from_secs(5), || async move {
        held_at_all(admin).await == 1
    })
    .await
    .expect("echo-2 leaves");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // The balancer's view in /config_dump is current too, with no request since.
    eventually(Duration::from_secs(2), || async move {
        get_json(admin, "/config_dump").await["targets"]["echo.shop.svc.cluster.local:80"]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 1)
    })
    .await
    .expect("the balancer's endpoints follow without a request");
    // The last pod goes.
    apply(&client, &emptied("echo-1")).await;
    let took = eventually(Duration::from_secs(5), || async move {
        held_at_all(admin).await == 0
    })
    .await
    .expect("echo-1 leaves");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let r = proxied(proxy.addr("outbound"))
        .get("http://echo.shop/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["ferrymesh-error"], "no-endpoints");
    // No slice was refused on the way.
    let log = mesh.controller.log_text();
    assert!(!log.contains("object rejected"), "{log}");
}

/// The controller's watches as `/status` reports them, by kind.
async fn watches(mesh: &Mesh) -> std::collections::BTreeMap<String, Value> {
    get_json(mesh.controller.addr("admin"), "/status").await["watches"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| (w["kind"].as_str().unwrap().to_owned(), w.clone()))
        .collect()
}

#[tokio::test]
async fn gateway_api_is_watched_only_once_installed() {
    let Setup {
        api,
        client,
        _mesh: mesh,
        proxy: _proxy,
        echoes: _echoes,
    } = setup().await;
    // No Gateway API on this cluster: reported, not watched, said once in the log.
    eventually(Duration::from_secs(10), || async {
        let w = watches(&mesh).await;
        w.get("HTTPRoute")
            .is_some_and(|r| r["state"] == "NotInstalled" && r["optional"] == true)
            && w.get("GRPCRoute")
                .is_some_and(|r| r["state"] == "NotInstalled")
            && w.get("ResiliencePolicy")
                .is_some_and(|r| r["state"] == "Synced")
    })
    .await
    .expect("the routes are reported as not installed");
    // Two more lookups while it is missing.
    tokio::time::sleep(2 * ferrymesh_controller::sources::kubernetes::watches::INSTALL_POLL).await;
    let log = mesh.controller.log_text();
    let said = log
        .lines()
        .filter(|l| l.contains("not watching HTTPRoute"))
        .count();
    assert_eq!(said, 1, "{log}");
    assert!(
        log.contains("gateway.networking.k8s.io/v1 is not installed"),
        "{log}"
    );

    // Installed later: watched from then on, and a route applied reaches the index.
    api.install_gateway_api();
    eventually(Duration::from_secs(10), || async {
        watches(&mesh)
            .await
            .get("HTTPRoute")
            .is_some_and(|r| r["state"] == "Synced")
    })
    .await
    .expect("HTTPRoute is watched once installed");
    apply(
        &client,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\n\
         spec: {parentRefs: [{group: \"\", kind: Service, name: nowhere, port: 80}], rules: [{backendRefs: [{name: nowhere, port: 80}]}]}\n",
    )
    .await;
    eventually(Duration::from_secs(5), || async {
        get_json(mesh.controller.addr("admin"), "/status").await["warnings"]
            .as_array()
            .is_some_and(|w| {
                w.iter()
                    .any(|w| w.as_str().is_some_and(|w| w.contains("nowhere")))
            })
    })
    .await
    .expect("the route reaches the controller's index");
    let (_, metrics) = ferrymesh_test_support::mesh::get(mesh.controller.addr("admin"), "/metrics")
        .await
        .unwrap();
    assert!(
        !metrics.lines().any(|l| l
            .starts_with("ferrymesh_controller_watch_errors_total{kind=\"HTTPRoute\"}")
            || l.starts_with("ferrymesh_controller_watch_errors_total{kind=\"GRPCRoute\"}")),
        "no watch ever failed: {metrics}"
    );
}
