//! Mesh routing with Gateway API HTTPRoutes (GAMMA: the route's parent is a Service) through
//! real proxies: matches pick the rule, weights split the traffic, requests no rule matches get
//! 404, and route-level policies (the route's own `timeouts` / `retry`, and ResiliencePolicies
//! targeting the route or one of its rules) replace the service's for their requests.
#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::sync::atomic::Ordering;
use std::time::Duration;

use ferrymesh_test_support::mesh::yaml::{policy, service, unmeshed};
use ferrymesh_test_support::mesh::{Mesh, client_proxy, get_json, proxied};
use ferrymesh_test_support::upstream::HttpEcho;
use tokio::time::Instant;

fn http_route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: {parent}, port: 80}}]\n  rules:\n{rules}---\n"
    )
}

async fn instance(http: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = http.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let rsp = req.send().await.unwrap();
    let who = rsp
        .headers()
        .get("x-instance")
        .or_else(|| rsp.headers().get("ferrymesh-error"))
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (rsp.status().as_u16(), who)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_pick_the_backend_and_unmatched_requests_get_404() {
    let v1 = HttpEcho::start("v1").await;
    let v2 = HttpEcho::start("v2").await;
    let rules = "  - name: canary\n    matches: [{path: {type: PathPrefix, value: /prices}, headers: [{name: x-canary, value: \"1\"}]}]\n    backendRefs: [{name: pricing-v2, port: 80}]\n\
                 \x20 - name: stable\n    matches: [{path: {type: PathPrefix, value: /prices}}]\n\
                 \x20 - name: flaky\n    matches: [{path: {type: PathPrefix, value: /status}}]\n    retry: {attempts: 2, codes: [503], backoff: 1ms}\n";
    let files = service("pricing")
        + &unmeshed("pricing", v1.addr)
        + &service("pricing-v2")
        + &unmeshed("pricing-v2", v2.addr)
        + &http_route("pricing", "pricing", rules);
    let mesh = Mesh::start(&[("pricing.yaml", &files)]);
    let proxy = client_proxy(&mesh, "pricing.shop", 1).await;
    let http = proxied(proxy.addr("outbound"));
    let url = "http://pricing.shop/prices/1";
    assert_eq!(instance(&http, url, &[]).await, (200, "v1".into()));
    assert_eq!(
        instance(&http, url, &[("x-canary", "1")]).await,
        (200, "v2".into()),
        "the header match sends the canary's traffic to pricing-v2"
    );
    assert_eq!(
        instance(&http, "http://pricing.shop/pricesx", &[]).await,
        (404, "no-route".into()),
        "a prefix matches whole segments only"
    );
    assert_eq!(
        instance(&http, "http://pricing.shop/other", &[]).await,
        (404, "no-route".into())
    );
    // The route's own retry (GEP-1731): 503 is retried twice.
    let before = v1.hits.load(Ordering::SeqCst);
    let (status, _) = instance(&http, "http://pricing.shop/status/503", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(v1.hits.load(Ordering::SeqCst) - before, 3, "1 + 2 attempts");
    let before = v1.hits.load(Ordering::SeqCst);
    let (status, _) = instance(&http, "http://pricing.shop/prices/503", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(v1.hits.load(Ordering::SeqCst) - before, 1);

    // Each route's merged policy and stack are built once, not per request (pricing and
    // pricing-v2 have no policy of their own).
    let stacks = || async {
        let dump = get_json(proxy.addr("admin"), "/config_dump").await;
        let built = |t: &str| dump["targets"][t]["stacksBuilt"].as_u64().unwrap();
        (
            built("pricing.shop.svc.cluster.local:80"),
            built("pricing-v2.shop.svc.cluster.local:80"),
        )
    };
    let before = stacks().await;
    for _ in 0..20 {
        for (url, canary) in [
            (url, "0"),
            (url, "1"),
            ("http://pricing.shop/status/200", "0"),
        ] {
            assert_eq!(instance(&http, url, &[("x-canary", canary)]).await.0, 200);
        }
    }
    assert_eq!(stacks().await, before, "no stack was rebuilt");
    assert!(before.0 >= 2 && before.1 >= 1, "{before:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_the_traffic() {
    let v1 = HttpEcho::start("v1").await;
    let v2 = HttpEcho::start("v2").await;
    let rules = "  - backendRefs: [{name: pricing, port: 80, weight: 3}, {name: pricing-v2, port: 80, weight: 1}]\n";
    let files = service("pricing")
        + &unmeshed("pricing", v1.addr)
        + &service("pricing-v2")
        + &unmeshed("pricing-v2", v2.addr)
        + &http_route("split", "pricing", rules);
    let mesh = Mesh::start(&[("pricing.yaml", &files)]);
    let proxy = client_proxy(&mesh, "pricing.shop", 1).await;
    let http = proxied(proxy.addr("outbound"));
    let n = 400;
    let (a0, b0) = (
        v1.hits.load(Ordering::SeqCst),
        v2.hits.load(Ordering::SeqCst),
    );
    for _ in 0..n {
        let (status, _) = instance(&http, "http://pricing.shop/prices/1", &[]).await;
        assert_eq!(status, 200);
    }
    let (a, b) = (
        v1.hits.load(Ordering::SeqCst) - a0,
        v2.hits.load(Ordering::SeqCst) - b0,
    );
    eprintln!("v1 {a}, v2 {b}");
    assert_eq!(a + b, n);
    // 25% of 400 is 100; 60..140 is more than four standard deviations either way.
    assert!((60..140).contains(&b), "pricing-v2 got {b} of {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_level_timeouts_replace_the_services() {
    let echo = HttpEcho::start("v1").await;
    let rules = "  - name: tight\n    matches: [{path: {type: Exact, value: /slow/1000}}]\n\
                 \x20 - name: own\n    matches: [{path: {type: Exact, value: /slow/900}}]\n    timeouts: {request: 200ms}\n\
                 \x20 - name: rest\n";
    let rule_policy = "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: pricing-tight, namespace: shop}\n\
                       spec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: pricing, sectionName: tight}]\n  timeouts: {request: 300ms}\n---\n";
    let files = service("pricing")
        + &unmeshed("pricing", echo.addr)
        + &http_route("pricing", "pricing", rules)
        + rule_policy
        + &policy("pricing", "  timeouts: {request: 5s}\n");
    let mesh = Mesh::start(&[("pricing.yaml", &files)]);
    let proxy = client_proxy(&mesh, "pricing.shop", 1).await;
    let http = proxied(proxy.addr("outbound"));
    let timed = |path: &'static str| {
        let http = http.clone();
        async move {
            let started = Instant::now();
            let (status, why) = instance(&http, &format!("http://pricing.shop{path}"), &[]).await;
            (status, why, started.elapsed())
        }
    };
    let (status, why, took) = timed("/slow/1000").await;
    assert_eq!(
        (status, why.as_str()),
        (504, "timeout"),
        "the rule's policy: 300ms"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(900),
        "{took:?}"
    );
    let (status, why, took) = timed("/slow/900").await;
    assert_eq!(
        (status, why.as_str()),
        (504, "timeout"),
        "the route's own: 200ms"
    );
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(800),
        "{took:?}"
    );
    let (status, _, _) = timed("/slow/700").await;
    assert_eq!(status, 200, "other requests keep the service's 5s");
    // /config_dump says where each route's sections came from.
    let dump = get_json(proxy.addr("admin"), "/config_dump").await;
    let policy = dump["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "CLIENT_POLICY" && r["name"] == "pricing.shop.svc.cluster.local:80")
        .unwrap()["value"]
        .clone();
    let rules = policy["routes"]["rules"].as_array().unwrap();
    let sections = |name: &str| {
        rules.iter().find(|r| r["name"] == name).unwrap()["overrides"]["sections"]["timeouts"]
            .clone()
    };
    assert_eq!(
        sections("pricing/tight"),
        "ResiliencePolicy shop/pricing-tight@1"
    );
    assert_eq!(sections("pricing/own"), "HTTPRoute shop/pricing@1");
    assert!(sections("pricing/rest").is_null(), "{policy}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_on_a_route_rule_hits_only_that_rules_requests() {
    let echo = HttpEcho::start("v1").await;
    let rules = "  - name: checkout\n    matches: [{path: {type: PathPrefix, value: /checkout}}]\n\
                 \x20 - name: rest\n";
    let fault = "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: FaultInjection\nmetadata: {name: checkout-down, namespace: shop}\n\
                 spec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: shop, sectionName: checkout}]\n\
                 \x20 side: Client\n  abort: {httpStatus: 503, percentage: 100}\n  duration: 10m\n";
    let files =
        service("shop") + &unmeshed("shop", echo.addr) + &http_route("shop", "shop", rules) + fault;
    let mesh = Mesh::start(&[("shop.yaml", &files)]);
    let proxy = client_proxy(&mesh, "shop.shop", 1).await;
    let http = proxied(proxy.addr("outbound"));
    let before = echo.hits.load(Ordering::SeqCst);
    assert_eq!(
        instance(&http, "http://shop.shop/checkout/1", &[]).await,
        (503, "fault-injected".into())
    );
    assert_eq!(
        instance(&http, "http://shop.shop/cart", &[]).await,
        (200, "v1".into()),
        "other rules are untouched"
    );
    assert_eq!(
        echo.hits.load(Ordering::SeqCst) - before,
        1,
        "the fault never left the caller"
    );
}
