//! Resilience policies through real proxies and real chaos upstreams (`ferry-shop` processes
//! with chaos knobs): retries within a budget, the idempotency guard, per-try timeouts that
//! move on to another replica, and the whole-request timeout.

#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::sync::atomic::Ordering;
use std::time::Duration;

use ferrymesh_test_support::mesh::yaml::{self, policy, service};
use ferrymesh_test_support::mesh::{
    Mesh, ProxySpec, client_proxy, client_proxy_with, counter, eventually, get, proxied as client,
};
use ferrymesh_test_support::process::Spawned;
use ferrymesh_test_support::upstream::HttpEcho;

/// One service with a policy: a chaos instance behind its sidecar, and a client sidecar.
struct One {
    mesh: Mesh,
    app: Spawned,
    server: Spawned,
    proxy: Spawned,
    http: reqwest::Client,
}

impl One {
    async fn start(name: &str, spec: &str, chaos: &[(&str, &str)]) -> One {
        let mesh = Mesh::start(&[(
            &format!("{name}.yaml"),
            &(service(name) + &policy(name, spec)),
        )]);
        let instance = format!("{name}-1");
        let app = mesh.shop(name, &instance, chaos);
        let server = mesh.proxy(&ProxySpec {
            log: Some("warn".into()),
            ..ProxySpec::app(&instance, name, app.addr("app"))
        });
        let proxy = client_proxy(&mesh, &format!("{name}.shop"), 1).await;
        let http = client(proxy.addr("outbound"));
        One {
            mesh,
            app,
            server,
            proxy,
            http,
        }
    }
}

/// A mesh with `service` under the policy `spec`, `n` chaos replicas (`chaos(i)` for
/// instance `i`, 1-based) and a client sidecar that holds all of them.
struct Replicated {
    mesh: Mesh,
    apps: Vec<Spawned>,
    proxies: Vec<Spawned>,
    proxy: Spawned,
    http: reqwest::Client,
}

impl Replicated {
    async fn start(
        service_name: &str,
        spec: &str,
        n: usize,
        chaos: impl Fn(usize) -> Vec<(&'static str, &'static str)>,
    ) -> Replicated {
        let files = service(service_name) + &policy(service_name, spec);
        let mesh = Mesh::start(&[(&format!("{service_name}.yaml"), &files)]);
        let (apps, proxies) = replicas(&mesh, service_name, n, chaos);
        let proxy = client_proxy(&mesh, &format!("{service_name}.shop"), n).await;
        let http = client(proxy.addr("outbound"));
        Replicated {
            mesh,
            apps,
            proxies,
            proxy,
            http,
        }
    }
}

/// `n` chaos instances of `service` (`<service>-1`..), each behind its sidecar.
fn replicas(
    mesh: &Mesh,
    service: &str,
    n: usize,
    chaos: impl Fn(usize) -> Vec<(&'static str, &'static str)>,
) -> (Vec<Spawned>, Vec<Spawned>) {
    let apps: Vec<Spawned> = (1..=n)
        .map(|i| mesh.shop(service, &format!("{service}-{i}"), &chaos(i)))
        .collect();
    let proxies = apps
        .iter()
        .enumerate()
        .map(|(i, a)| {
            mesh.proxy(&ProxySpec {
                log: Some("warn".into()),
                ..ProxySpec::app(&format!("{service}-{}", i + 1), service, a.addr("app"))
            })
        })
        .collect();
    (apps, proxies)
}

/// Sends `n` GETs, `concurrency` at a time; returns how many got a 2xx.
async fn send(http: &reqwest::Client, url: &str, n: usize, concurrency: usize) -> usize {
    let mut ok = 0;
    let mut left = n;
    while left > 0 {
        let batch = left.min(concurrency);
        let calls = (0..batch).map(|_| http.get(url).send());
        ok += futures::future::join_all(calls)
            .await
            .into_iter()
            .filter(|r| r.as_ref().is_ok_and(|r| r.status().is_success()))
            .count();
        left -= batch;
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_mask_a_flaky_upstream_within_the_budget() {
    let spec = "  retry:\n    attempts: 4\n    retryOn: [5xx]\n    backoff: {strategy: Constant, base: 1ms, max: 1ms}\n    budget: {ratio: \"0.5\", minRetriesPerSecond: 10, window: 10s}\n";
    // A seeded chaos: the same 30% of draws fail on every run (reproducible, like a lab).
    let One {
        mesh: _mesh,
        app: _app,
        server,
        proxy,
        http,
    } = One::start(
        "pricing",
        spec,
        &[("CHAOS_ERROR_RATE", "0.3"), ("CHAOS_SEED", "7")],
    )
    .await;
    let inbound = || {
        counter(
            server.addr("health"),
            "ferrymesh_proxy_requests_total",
            r#"direction="inbound""#,
        )
    };
    let before = inbound().await;
    let n = 2000;
    let ok = send(&http, "http://pricing.shop/prices/1", n, 20).await;
    let upstream = inbound().await - before;
    eprintln!("{ok}/{n} succeeded with {upstream} upstream attempts");
    assert!(ok * 1000 >= n * 995, "{ok} of {n} succeeded");
    // 0.5 of the requests plus the floor (10/s over the 10s window).
    assert!(
        upstream <= (n as u64) * 3 / 2 + 100,
        "{upstream} attempts for {n} requests"
    );
    let retries = counter(
        proxy.addr("health"),
        "ferrymesh_proxy_retries_total",
        r#"reason="5xx""#,
    )
    .await;
    assert_eq!(upstream, n as u64 + retries, "every retry is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_endpoint_failing_the_budget_caps_the_load() {
    let spec = "  retry:\n    attempts: 4\n    retryOn: [5xx]\n    backoff: {strategy: Constant, base: 1ms, max: 1ms}\n    budget: {ratio: \"0.2\", minRetriesPerSecond: 10, window: 10s}\n";
    let One {
        mesh: _mesh,
        app: _app,
        server,
        proxy,
        http,
    } = One::start("pricing", spec, &[("CHAOS_ERROR_RATE", "1")]).await;
    let inbound = || {
        counter(
            server.addr("health"),
            "ferrymesh_proxy_requests_total",
            r#"direction="inbound""#,
        )
    };
    let before = inbound().await;
    let n = 1000;
    let ok = send(&http, "http://pricing.shop/prices/1", n, 20).await;
    assert_eq!(ok, 0);
    let upstream = inbound().await - before;
    eprintln!("{upstream} upstream attempts for {n} failing requests");
    assert!(
        upstream <= (n as u64) * 6 / 5 + 100,
        "{upstream} attempts: more than 1.2x plus the floor"
    );
    let skipped = counter(
        proxy.addr("health"),
        "ferrymesh_proxy_retries_skipped_total",
        r#"reason="budget-exhausted""#,
    )
    .await;
    assert!(skipped > 0, "the budget said no, visibly");
    let available = counter(
        proxy.addr("health"),
        "ferrymesh_proxy_retry_budget_available",
        r#"service="shop/pricing""#,
    )
    .await;
    assert_eq!(available, 0, "the budget is spent and the gauge says so");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_retried_only_with_an_idempotency_key_and_charged_once() {
    let spec = "  retry:\n    attempts: 10\n    retryOn: [5xx]\n    backoff: {strategy: Constant, base: 1ms, max: 1ms}\n    budget: {ratio: \"1\", minRetriesPerSecond: 100, window: 10s}\n";
    let files = service("payments") + &policy("payments", spec);
    let mesh = Mesh::start(&[("payments.yaml", &files)]);
    // Seeded chaos: the same draws on every run, so "retried to success" cannot be a 1-in-2000 loss.
    let app = mesh.shop(
        "payments",
        "payments-1",
        &[("CHAOS_ERROR_RATE", "0.5"), ("CHAOS_SEED", "11")],
    );
    let server = mesh.proxy(&ProxySpec {
        log: Some("warn".into()),
        ..ProxySpec::app("payments-1", "payments", app.addr("app"))
    });
    let proxy = client_proxy(&mesh, "payments.shop", 1).await;
    let http = client(proxy.addr("outbound"));
    let health = server.addr("health");
    let inbound = || {
        counter(
            health,
            "ferrymesh_proxy_requests_total",
            r#"direction="inbound""#,
        )
    };

    // Without a key: exactly one attempt per POST, whatever the answer.
    let before = inbound().await;
    for _ in 0..20 {
        let _ = http
            .post("http://payments.shop/payments")
            .json(&serde_json::json!({"amount": 1}))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(
        inbound().await - before,
        20,
        "POST without Idempotency-Key is never retried"
    );
    let skipped = counter(
        proxy.addr("health"),
        "ferrymesh_proxy_retries_skipped_total",
        r#"reason="not-idempotent""#,
    )
    .await;
    assert!(skipped > 0);

    // With a key: retried until it goes through, and charged once per key.
    let before = inbound().await;
    for i in 0..20 {
        let rsp = http
            .post("http://payments.shop/payments")
            .header("idempotency-key", format!("order-{i}"))
            .json(&serde_json::json!({"orderId": i, "amount": 2}))
            .send()
            .await
            .unwrap();
        assert!(
            rsp.status().is_success(),
            "retried to success: {}",
            rsp.status()
        );
    }
    assert!(
        inbound().await - before > 20,
        "some keyed POSTs were retried"
    );
    // GET is idempotent: the policy retries it through the chaos too.
    let charges: serde_json::Value = http
        .get("http://payments.shop/payments")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let keyed: Vec<_> = charges
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["idempotencyKey"].is_string())
        .collect();
    assert_eq!(keyed.len(), 20, "one charge per key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_moves_on_to_another_replica() {
    // Round robin: every other request goes to the slow replica first, whatever the order the
    // two registered in (PeakEWMA would rightly learn to avoid it after one try).
    let spec = "  timeouts: {request: 3s, perTry: 200ms}\n  retry:\n    attempts: 2\n    retryOn: [per-try-timeout]\n    backoff: {strategy: Constant, base: 1ms, max: 1ms}\n  loadBalancer: {algorithm: RoundRobin}\n";
    let mesh = Mesh::start(&[(
        "catalog.yaml",
        &(service("catalog") + &policy("catalog", spec)),
    )]);
    let slow = mesh.shop("catalog", "catalog-slow", &[("CHAOS_LATENCY", "2s")]);
    let fast = mesh.shop("catalog", "catalog-fast", &[]);
    let _p1 = mesh.proxy(&ProxySpec {
        log: Some("warn".into()),
        ..ProxySpec::app("catalog-slow", "catalog", slow.addr("app"))
    });
    let _p2 = mesh.proxy(&ProxySpec {
        log: Some("warn".into()),
        ..ProxySpec::app("catalog-fast", "catalog", fast.addr("app"))
    });
    let proxy = client_proxy(&mesh, "catalog.shop", 2).await;
    let http = client(proxy.addr("outbound"));
    for _ in 0..20 {
        let start = tokio::time::Instant::now();
        let rsp = http
            .get("http://catalog.shop/products/1")
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.headers()["x-ferry-instance"], "catalog-fast");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }
    let retried = counter(
        proxy.addr("health"),
        "ferrymesh_proxy_retries_total",
        r#"reason="per-try-timeout""#,
    )
    .await;
    // At least every other request went to the slow replica first and moved on.
    assert!(
        retried >= 10,
        "some requests went to the slow replica first and were retried ({retried})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_pooled_connection_closes_after_the_idle_timeout() {
    // An unmeshed backend, so the echo server sees the client proxy's own connections.
    let legacy = HttpEcho::start("legacy").await;
    let files = service("legacy")
        + &yaml::unmeshed("legacy", legacy.addr)
        + &policy("legacy", "  timeouts: {idle: 1s}\n");
    let mesh = Mesh::start(&[("legacy.yaml", &files)]);
    let proxy = client_proxy(&mesh, "legacy.shop", 1).await;
    let http = client(proxy.addr("outbound"));
    let (opened, closed) = (legacy.conns.clone(), legacy.closed.clone());
    let baseline = opened.load(Ordering::SeqCst);
    for _ in 0..5 {
        let rsp = http.get("http://legacy.shop/x").send().await.unwrap();
        assert_eq!(rsp.status(), 200);
    }
    assert_eq!(
        opened.load(Ordering::SeqCst) - baseline,
        usize::from(baseline == 0),
        "back-to-back requests share one pooled connection"
    );
    let idle_closed = eventually(Duration::from_secs(5), || {
        let (opened, closed) = (opened.clone(), closed.clone());
        async move { closed.load(Ordering::SeqCst) == opened.load(Ordering::SeqCst) }
    })
    .await
    .expect("the proxy closes its idle connection");
    eprintln!("idle connection closed {idle_closed:?} after the last request");
    let before = opened.load(Ordering::SeqCst);
    let rsp = http.get("http://legacy.shop/x").send().await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        opened.load(Ordering::SeqCst),
        before + 1,
        "a new connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_hangs_fails_at_the_connect_timeout() {
    // A listener whose accept queue is full: the kernel drops further SYNs, so connects hang.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let stuck = socket.listen(0).unwrap();
    let addr = stuck.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(c)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(c);
        }
    }
    assert!(
        !fillers.is_empty(),
        "the queue took at least one connection"
    );
    let files = service("stuck")
        + &yaml::unmeshed("stuck", addr)
        + &policy("stuck", "  timeouts: {request: 5s, connect: 300ms}\n");
    let mesh = Mesh::start(&[("stuck.yaml", &files)]);
    let proxy = client_proxy(&mesh, "stuck.shop", 1).await;
    let http = client(proxy.addr("outbound"));
    let started = tokio::time::Instant::now();
    let rsp = http.get("http://stuck.shop/").send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(rsp.status(), 502);
    assert_eq!(rsp.headers()["ferrymesh-error"], "connect-failed");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "failed after {took:?}, not at the 300ms connect timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_gets_504_at_the_request_timeout() {
    let mesh = Mesh::start(&[(
        "pricing.yaml",
        &(service("pricing") + &policy("pricing", "  timeouts: {request: 500ms}\n")),
    )]);
    let app = mesh.shop("pricing", "pricing-1", &[("CHAOS_LATENCY", "2s")]);
    let _server = mesh.proxy(&ProxySpec::app("pricing-1", "pricing", app.addr("app")));
    let proxy = client_proxy(&mesh, "pricing.shop", 1).await;
    let http = client(proxy.addr("outbound"));
    let start = tokio::time::Instant::now();
    let rsp = http
        .get("http://pricing.shop/prices/1")
        .send()
        .await
        .unwrap();
    let took = start.elapsed();
    assert_eq!(rsp.status(), 504);
    assert_eq!(rsp.headers()["ferrymesh-error"], "timeout");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(650),
        "{took:?}"
    );
    assert_eq!(get(proxy.addr("health"), "/ready").await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_fails_fast_serves_the_fallback_and_closes_after_recovery() {
    let spec = "  circuitBreaker:\n    tripWhen: {consecutiveFailures: 5, failureRatio: \"0\"}\n    failureOn: [5xx]\n    open: {base: 1s, max: 1s, jitter: \"0\"}\n    halfOpenProbes: 1\n  fallback:\n    triggers: [circuit-open]\n    staticResponse: {status: 200, headers: {content-type: application/json}, body: '{\"price\":\"unknown\"}'}\n";
    let One {
        mesh: _mesh,
        app,
        server,
        proxy,
        http,
    } = One::start("pricing", spec, &[("CHAOS_ERROR_RATE", "1")]).await;
    let inbound = || {
        counter(
            server.addr("health"),
            "ferrymesh_proxy_requests_total",
            r#"direction="inbound""#,
        )
    };
    let before = inbound().await;
    for _ in 0..5 {
        assert_eq!(
            http.get("http://pricing.shop/prices/1")
                .send()
                .await
                .unwrap()
                .status(),
            500
        );
    }
    // Open: no upstream call, the static fallback at once.
    for _ in 0..20 {
        let start = tokio::time::Instant::now();
        let rsp = http
            .get("http://pricing.shop/prices/1")
            .send()
            .await
            .unwrap();
        let took = start.elapsed();
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.headers()["ferrymesh-fallback"], "static");
        assert_eq!(rsp.headers()["ferrymesh-fallback-cause"], "circuit-open");
        assert_eq!(rsp.text().await.unwrap(), r#"{"price":"unknown"}"#);
        assert!(took < Duration::from_millis(5), "failed fast: {took:?}");
    }
    assert_eq!(
        inbound().await - before,
        5,
        "nothing reached the upstream while open"
    );
    let health = proxy.addr("health");
    assert_eq!(
        counter(health, "ferrymesh_proxy_breaker_state", r#"state="open""#).await,
        1
    );

    // The upstream recovers; after the open time a probe closes the breaker.
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .put(format!("http://{}/chaos", app.addr("app")))
        .json(&serde_json::json!({"errorRate": 0}))
        .send()
        .await
        .unwrap();
    eventually(Duration::from_secs(5), || async {
        http.get("http://pricing.shop/prices/1")
            .send()
            .await
            .is_ok_and(|r| r.status() == 200 && !r.headers().contains_key("ferrymesh-fallback"))
    })
    .await
    .expect("closed again after recovery");
    assert_eq!(
        counter(health, "ferrymesh_proxy_breaker_state", r#"state="closed""#).await,
        1
    );
    assert!(
        counter(
            health,
            "ferrymesh_proxy_fallbacks_total",
            r#"reason="circuit-open""#
        )
        .await
            >= 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_fallback_serves_when_the_service_has_no_endpoints() {
    let spec = "  fallback:\n    triggers: [no-endpoints]\n    backendRef: {name: pricing-legacy, port: 80}\n";
    let files = service("pricing") + &service("pricing-legacy") + &policy("pricing", spec);
    let mesh = Mesh::start(&[("pricing.yaml", &files)]);
    let legacy = mesh.shop("pricing", "pricing-legacy-1", &[]);
    let _server = mesh.proxy(&ProxySpec {
        log: Some("warn".into()),
        ..ProxySpec::app("pricing-legacy-1", "pricing-legacy", legacy.addr("app"))
    });
    let proxy = client_proxy(&mesh, "pricing.shop", 0).await;
    let http = client(proxy.addr("outbound"));
    let rsp = http
        .get("http://pricing.shop/prices/2")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["ferrymesh-fallback"], "backend");
    assert_eq!(rsp.headers()["ferrymesh-fallback-cause"], "no-endpoints");
    assert_eq!(rsp.headers()["x-ferry-instance"], "pricing-legacy-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_replica_is_ejected_and_comes_back_once_healthy() {
    // Round robin so the bad replica gets every third request: peak-EWMA learns to avoid a
    // failing endpoint and may send it fewer than the five errors that eject it.
    let spec = "  loadBalancer: {algorithm: RoundRobin}\n  outlierDetection:\n    consecutiveErrors: 5\n    interval: 10s\n    baseEjectionTime: 5s\n    maxEjectionTime: 5s\n    maxEjectionPercent: 50\n";
    // Every field bound: the mesh and the sidecars live until the end of the test.
    let Replicated {
        mesh: _mesh,
        apps,
        proxies: _proxies,
        proxy,
        http,
    } = Replicated::start("catalog", spec, 3, |i| {
        if i == 2 {
            vec![("CHAOS_ERROR_RATE", "1")]
        } else {
            vec![]
        }
    })
    .await;
    let mut errors = 0;
    for _ in 0..1000 {
        if !http
            .get("http://catalog.shop/products/1")
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
        {
            errors += 1;
        }
    }
    assert_eq!(
        errors, 5,
        "the bad replica fails five times, then is ejected"
    );
    assert_eq!(
        counter(
            proxy.addr("health"),
            "ferrymesh_proxy_ejections_total",
            "shop/catalog"
        )
        .await,
        1
    );

    // Healthy again: after the ejection time it gets traffic.
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .put(format!("http://{}/chaos", apps[1].addr("app")))
        .json(&serde_json::json!({"errorRate": 0}))
        .send()
        .await
        .unwrap();
    eventually(Duration::from_secs(15), || async {
        let calls = (0..6).map(|_| http.get("http://catalog.shop/products/1").send());
        futures::future::join_all(calls)
            .await
            .into_iter()
            .any(|r| r.is_ok_and(|r| r.headers()["x-ferry-instance"] == "catalog-2"))
    })
    .await
    .expect("catalog-2 is back in rotation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_algorithms_round_robin_and_consistent_hash() {
    let rr = "  loadBalancer: {algorithm: RoundRobin}\n";
    let Replicated {
        mesh,
        apps: _apps,
        proxies: _proxies,
        proxy,
        http,
    } = Replicated::start("catalog", rr, 3, |_| vec![]).await;
    let instance =
        |r: reqwest::Response| r.headers()["x-ferry-instance"].to_str().unwrap().to_owned();
    // Round robin: sequential requests take turns (peak-EWMA would stick to the fastest).
    let mut seen = std::collections::HashMap::new();
    for _ in 0..9 {
        *seen
            .entry(instance(
                http.get("http://catalog.shop/products")
                    .send()
                    .await
                    .unwrap(),
            ))
            .or_insert(0) += 1;
    }
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        [3, 3, 3],
        "{seen:?}"
    );

    // Consistent hash on a header: one user, one replica.
    mesh.write(
        "catalog.yaml",
        &(service("catalog")
            + &policy(
                "catalog",
                "  loadBalancer: {algorithm: ConsistentHash, hashOn: {header: x-user-id}}\n",
            )),
    );
    let admin = proxy.addr("admin");
    eventually(Duration::from_secs(5), || async move {
        ferrymesh_test_support::mesh::get_json(admin, "/config_dump")
            .await
            .to_string()
            .contains("ConsistentHash")
    })
    .await
    .unwrap();
    let mut users = std::collections::HashMap::new();
    for round in 0..5 {
        for user in ["ada", "bob", "cy", "dee", "eve", "fay"] {
            let who = instance(
                http.get("http://catalog.shop/products")
                    .header("x-user-id", user)
                    .send()
                    .await
                    .unwrap(),
            );
            let first = users.entry(user).or_insert_with(|| who.clone());
            assert_eq!(*first, who, "{user} moved in round {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferrymesh_explain_tells_what_happened_to_a_request() {
    let spec = "  retry:\n    attempts: 2\n    retryOn: [5xx]\n    backoff: {strategy: Constant, base: 5ms, max: 5ms}\n  circuitBreaker: {tripWhen: {consecutiveFailures: 100}}\n";
    let One {
        mesh: _mesh,
        app: _app,
        server: _server,
        proxy: _proxy,
        http,
    } = One::start("pricing", spec, &[("CHAOS_ERROR_RATE", "1")]).await;
    let plain = http
        .get("http://pricing.shop/prices/1")
        .send()
        .await
        .unwrap();
    assert!(
        !plain.headers().contains_key("ferrymesh-explain"),
        "only when asked"
    );
    let rsp = http
        .get("http://pricing.shop/prices/1")
        .header("ferrymesh-explain", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 500);
    let explain = rsp.headers()["ferrymesh-explain"]
        .to_str()
        .unwrap()
        .to_owned();
    eprintln!("ferrymesh-explain: {explain}");
    let parts: Vec<&str> = explain.split("; ").collect();
    assert!(
        parts[0].starts_with("attempt 1 127.0.0.1:") && parts[0].contains(" 500 "),
        "{explain}"
    );
    // The default budget: a floor of 10/s over 10s plus 0.2 per request; the plain request above
    // already took two retries.
    assert_eq!(parts[1], "retry on 5xx after 5ms (budget: 97 left)");
    assert!(parts[2].starts_with("attempt 2 "), "{explain}");
    assert_eq!(parts[3], "retry on 5xx after 5ms (budget: 96 left)");
    assert!(parts[4].starts_with("attempt 3 "), "{explain}");
    assert_eq!(parts[5], "no retry on 5xx: attempts-exhausted");
    assert_eq!(parts[6], "breaker closed");
}

/// The instances (`x-instance`, or the status when there is none) that answer 10 GETs of `url`.
async fn instances(http: &reqwest::Client, url: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..10 {
        let rsp = http.get(url).send().await.unwrap();
        seen.push(match rsp.headers().get("x-instance") {
            Some(i) => i.to_str().unwrap().to_owned(),
            None => rsp.status().to_string(),
        });
    }
    seen.sort();
    seen.dedup();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_aware_balancing_stays_in_zone_and_fails_over() {
    let near = HttpEcho::start("near").await;
    let far = HttpEcho::start("far").await;
    let spec = "  loadBalancer: {algorithm: RoundRobin, zoneAware: PreferSameZone}\n  healthCheck:\n    tcp: {}\n    interval: 100ms\n    unhealthyThreshold: 1\n    initialJitter: 0s\n";
    let files = service("legacy")
        + &yaml::unmeshed_in_zone("legacy", near.addr, "zone-a")
        + &yaml::unmeshed_in_zone("legacy", far.addr, "zone-b")
        + &policy("legacy", spec);
    let mesh = Mesh::start(&[("legacy.yaml", &files)]);
    let spec = ProxySpec {
        zone: Some("zone-a".into()),
        ..ProxySpec::client("client")
    };
    let proxy = client_proxy_with(&mesh, spec, "legacy.shop", 2).await;
    let http = client(proxy.addr("outbound"));
    let url = "http://legacy.shop/x";
    assert_eq!(instances(&http, url).await, ["near"], "same zone only");
    drop(near);
    eventually(Duration::from_secs(5), || async {
        instances(&http, url).await == ["far"]
    })
    .await
    .expect("zone b takes over when zone a has no healthy endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_health_check_takes_a_closed_port_out_and_back() {
    // Two unmeshed backends, so the check connects to the servers' own ports.
    let a = HttpEcho::start("a").await;
    let b = HttpEcho::start("b").await;
    let b_addr = b.addr;
    let spec = "  healthCheck:\n    tcp: {}\n    interval: 100ms\n    timeout: 500ms\n    unhealthyThreshold: 1\n    healthyThreshold: 1\n    initialJitter: 0s\n  loadBalancer: {algorithm: RoundRobin}\n";
    let files = service("legacy")
        + &yaml::unmeshed("legacy", a.addr)
        + &yaml::unmeshed("legacy", b.addr)
        + &policy("legacy", spec);
    let mesh = Mesh::start(&[("legacy.yaml", &files)]);
    let proxy = client_proxy(&mesh, "legacy.shop", 2).await;
    let http = client(proxy.addr("outbound"));
    let instances = || instances(&http, "http://legacy.shop/x");
    eventually(Duration::from_secs(5), || async {
        instances().await == ["a", "b"]
    })
    .await
    .expect("both in rotation");
    // b's listener closes (its open connections stay up): only the check can tell.
    drop(b);
    eventually(Duration::from_secs(5), || async {
        counter(
            proxy.addr("health"),
            "ferrymesh_proxy_health_checks_total",
            r#"reason="fail""#,
        )
        .await
            > 0
    })
    .await
    .expect("the check fails on the closed port");
    assert_eq!(
        instances().await,
        ["a"],
        "every request goes to a, none fails"
    );
    let _b = HttpEcho::start_on(b_addr, "b").await;
    eventually(Duration::from_secs(5), || async {
        instances().await == ["a", "b"]
    })
    .await
    .expect("b is back once its port accepts again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_a_failing_endpoint_out_and_back() {
    let spec = "  healthCheck:\n    http: {path: /healthz, expectedStatuses: [200]}\n    interval: 200ms\n    timeout: 1s\n    unhealthyThreshold: 2\n    healthyThreshold: 1\n    initialJitter: 0s\n  loadBalancer: {algorithm: RoundRobin}\n";
    // Every field bound: the mesh and the sidecars live until the end of the test.
    let Replicated {
        mesh: _mesh,
        apps,
        proxies: _proxies,
        proxy,
        http,
    } = Replicated::start("catalog", spec, 2, |i| {
        if i == 2 {
            vec![("CHAOS_LIVE", "false")]
        } else {
            vec![]
        }
    })
    .await;
    let only_one = || async {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..6 {
            let rsp = http
                .get("http://catalog.shop/products")
                .send()
                .await
                .unwrap();
            seen.insert(
                rsp.headers()["x-ferry-instance"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        seen
    };
    // catalog-2 still answers business requests, but its liveness probe fails: out of rotation.
    eventually(Duration::from_secs(5), || async {
        only_one().await == std::collections::HashSet::from(["catalog-1".to_owned()])
    })
    .await
    .expect("the failing endpoint left the rotation");
    assert!(
        counter(
            proxy.addr("health"),
            "ferrymesh_proxy_health_checks_total",
            r#"reason="fail""#
        )
        .await
            >= 2
    );
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .put(format!("http://{}/chaos", apps[1].addr("app")))
        .json(&serde_json::json!({"live": true}))
        .send()
        .await
        .unwrap();
    eventually(Duration::from_secs(5), || async {
        only_one().await.len() == 2
    })
    .await
    .expect("back after passing again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_checks_follow_the_servers_health_service() {
    use ferrymesh_test_support::echo_pb::EchoRequest;
    use ferrymesh_test_support::echo_pb::echo_client::EchoClient;
    use ferrymesh_test_support::upstream::GrpcServer;
    let spec = "  healthCheck:\n    grpc: {}\n    interval: 200ms\n    timeout: 1s\n    unhealthyThreshold: 2\n    healthyThreshold: 1\n    initialJitter: 0s\n  loadBalancer: {algorithm: RoundRobin}\n";
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: grpc, namespace: shop}\nspec: {ports: [{name: grpc, port: 80, appProtocol: grpc}]}\n---\n";
    let mesh = Mesh::start(&[("grpc.yaml", &(svc.to_owned() + &policy("grpc", spec)))]);
    let servers = [
        GrpcServer::start("grpc-1").await,
        GrpcServer::start("grpc-2").await,
    ];
    let _proxies: Vec<Spawned> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            mesh.proxy(&ProxySpec {
                log: Some("warn".into()),
                ..ProxySpec::app(&format!("grpc-{}", i + 1), "grpc", s.addr)
            })
        })
        .collect();
    let proxy = mesh.proxy(&ProxySpec {
        fixed: vec!["grpc.shop:80".into()],
        log: Some("warn".into()),
        ..ProxySpec::client("client")
    });
    let fixed: std::net::SocketAddr = proxy.listening["fixed"][0][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let answered_by = || async move {
        let mut grpc = EchoClient::connect(format!("http://{fixed}"))
            .await
            .unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..6 {
            if let Ok(r) = grpc
                .unary(EchoRequest {
                    message: "hi".into(),
                    count: 0,
                })
                .await
            {
                seen.insert(r.into_inner().instance);
            }
        }
        seen
    };
    eventually(Duration::from_secs(10), || async {
        answered_by().await.len() == 2
    })
    .await
    .expect("both serve");
    servers[1].set_serving(false).await;
    eventually(Duration::from_secs(5), || async {
        answered_by().await == std::collections::HashSet::from(["grpc-1".to_owned()])
    })
    .await
    .expect("grpc-2 left the rotation on NOT_SERVING");
    servers[1].set_serving(true).await;
    eventually(Duration::from_secs(5), || async {
        answered_by().await.len() == 2
    })
    .await
    .expect("grpc-2 is back");
}

/// The cache tests' mesh: an echo server behind its sidecar, and a client sidecar whose policy
/// caches (maxTTL 2h, serveStaleOnError 30s).
struct Cached {
    _mesh: Mesh,
    echo: HttpEcho,
    _server: Spawned,
    proxy: Spawned,
    http: reqwest::Client,
}

impl Cached {
    async fn start() -> Cached {
        let spec = "  cache: {maxEntries: 100, maxTTL: 2h, serveStaleOnError: 30s}\n";
        let mesh = Mesh::start(&[("echo.yaml", &(service("echo") + &policy("echo", spec)))]);
        let echo = HttpEcho::start("echo-1").await;
        let server = mesh.proxy(&ProxySpec {
            log: Some("warn".into()),
            ..ProxySpec::app("echo-1", "echo", echo.addr)
        });
        let proxy = client_proxy(&mesh, "echo.shop", 1).await;
        let http = client(proxy.addr("outbound"));
        Cached {
            _mesh: mesh,
            echo,
            _server: server,
            proxy,
            http,
        }
    }

    fn hits(&self) -> usize {
        self.echo.hits.load(Ordering::SeqCst)
    }

    /// GETs `path` (reading the body); the status and the `ferrymesh-cache` outcome.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut req = self.http.get(format!("http://echo.shop{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let rsp = req.send().await.unwrap();
        let answer = (
            rsp.status().as_u16(),
            rsp.headers()
                .get("ferrymesh-cache")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default(),
        );
        rsp.bytes().await.unwrap();
        answer
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_cache_stores_what_rfc_9111_allows() {
    let c = Cached::start().await;
    // max-age: the second answer comes from the cache.
    let before = c.hits();
    assert_eq!(c.get("/cc/max-age=10", &[]).await, (200, "miss".into()));
    assert_eq!(c.get("/cc/max-age=10", &[]).await, (200, "hit".into()));
    assert_eq!(c.hits() - before, 1, "one upstream call");
    // private, no-store and requests with Authorization are not stored.
    for (path, headers) in [
        ("/cc/private,max-age=10", &[][..]),
        ("/cc/no-store,max-age=10", &[][..]),
        ("/cc/max-age=11", &[("authorization", "Bearer t")][..]),
    ] {
        let before = c.hits();
        c.get(path, headers).await;
        assert_eq!(c.get(path, headers).await.1, "miss", "{path}");
        assert_eq!(c.hits() - before, 2, "{path} is never stored");
    }
    // Vary: another encoding is another entry.
    let before = c.hits();
    assert_eq!(
        c.get("/vary/max-age=10", &[("accept-encoding", "gzip")])
            .await
            .1,
        "miss"
    );
    assert_eq!(
        c.get("/vary/max-age=10", &[("accept-encoding", "gzip")])
            .await
            .1,
        "hit"
    );
    assert_eq!(
        c.get("/vary/max-age=10", &[("accept-encoding", "br")])
            .await
            .1,
        "miss"
    );
    assert_eq!(c.hits() - before, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_cache_revalidates_and_serves_stale_on_error() {
    let c = Cached::start().await;
    // Revalidation: a stale entry with an ETag (3600 s old, max-age 3599) gets a 304 and is
    // served again.
    assert_eq!(c.get("/etag/max-age=3599", &[]).await.1, "miss");
    assert_eq!(
        c.get("/etag/max-age=3599", &[]).await,
        (200, "revalidated".into())
    );
    // Revalidation with Last-Modified: If-Modified-Since, a 304, the stored answer served again.
    assert_eq!(c.get("/modified/max-age=3599", &[]).await.1, "miss");
    let before = c.hits();
    assert_eq!(
        c.get("/modified/max-age=3599", &[]).await,
        (200, "revalidated".into())
    );
    assert_eq!(c.hits() - before, 1, "one conditional request upstream");
    // A chunked answer (no length) is stored once it has ended, with its whole body.
    let fetch = || async {
        let rsp = c
            .http
            .get("http://echo.shop/chunked/max-age=10")
            .send()
            .await
            .unwrap();
        let outcome = rsp.headers()["ferrymesh-cache"]
            .to_str()
            .unwrap()
            .to_owned();
        let length = rsp.headers().get("content-length").cloned();
        let body: serde_json::Value = rsp.json().await.unwrap();
        (outcome, body, length)
    };
    let (outcome, first, length) = fetch().await;
    assert_eq!(outcome, "miss");
    assert_eq!(length, None, "the miss came chunked");
    let before = c.hits();
    let (outcome, second, _) = fetch().await;
    assert_eq!(outcome, "hit");
    assert_eq!(c.hits(), before, "served from the cache");
    assert_eq!(first, second, "the whole body was kept");
    // Stale on error: within serveStaleOnError a stale entry answers an upstream 503. The entry
    // arrives already 3600 s old with max-age=3599 (maxTTL 2h) and a 30 s grace: stale, usable.
    assert_eq!(c.get("/aged/max-age=3599", &[]).await.1, "miss");
    c.echo.failing.store(true, Ordering::SeqCst);
    assert_eq!(
        c.get("/aged/max-age=3599", &[]).await,
        (200, "stale".into())
    );
    assert_eq!(
        c.get("/cc/other", &[]).await.0,
        503,
        "no stale copy: the error goes through"
    );
    let outcomes = |reason: &'static str| {
        counter(
            c.proxy.addr("health"),
            "ferrymesh_proxy_cache_total",
            reason,
        )
    };
    assert_eq!(outcomes(r#"reason="revalidated""#).await, 2);
    assert_eq!(outcomes(r#"reason="stale""#).await, 1);
    assert_eq!(outcomes(r#"reason="hit""#).await, 1, "the chunked answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)] // one cache, RFC 9111's sections in order
async fn the_response_cache_cannot_be_poisoned_and_honours_the_request() {
    let c = Cached::start().await;
    let body = |rsp: reqwest::Response| async move {
        let outcome = rsp
            .headers()
            .get("ferrymesh-cache")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (rsp.status().as_u16(), outcome, rsp.bytes().await.unwrap())
    };
    let get = |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let mut req = c.http.get(format!("http://echo.shop{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send()
    };
    // 3.4: one caller's range is neither stored nor served to the next caller.
    let (status, _, bytes) = body(
        get("/cc/max-age=100", &[("range", "bytes=0-2")])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, bytes.len()), (206, 3));
    let (status, outcome, full) = body(get("/cc/max-age=100", &[]).await.unwrap()).await;
    assert_eq!(
        (status, outcome.as_str()),
        (200, "miss"),
        "the 206 was not stored"
    );
    assert!(full.len() > 3);
    let (status, outcome, again) = body(get("/cc/max-age=100", &[]).await.unwrap()).await;
    assert_eq!((status, outcome.as_str(), &again), (200, "hit", &full));
    let before = c.hits();
    let (status, _, bytes) = body(
        get("/cc/max-age=100", &[("range", "bytes=1-4")])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, &bytes[..]),
        (206, &full[1..=4]),
        "a range is not cut from the full entry"
    );
    assert_eq!(c.hits() - before, 1);

    // 4.4: a successful unsafe request drops what is stored for its URI.
    let rsp = c
        .http
        .post("http://echo.shop/cc/max-age=100")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        body(get("/cc/max-age=100", &[]).await.unwrap()).await.1,
        "miss"
    );

    // 5.2.1: the request's own directives.
    assert_eq!(
        body(get("/cc/max-age=100", &[]).await.unwrap()).await.1,
        "hit"
    );
    for cc in [
        &[("cache-control", "no-cache")][..],
        &[("cache-control", "max-age=0")][..],
    ] {
        let before = c.hits();
        let (_, outcome, _) = body(get("/cc/max-age=100", cc).await.unwrap()).await;
        assert_ne!(outcome, "hit", "{cc:?}");
        assert_eq!(c.hits() - before, 1, "{cc:?} went upstream");
    }
    let rsp = get("/cc/never-stored", &[("cache-control", "only-if-cached")])
        .await
        .unwrap();
    assert_eq!(rsp.status(), 504);
    assert_eq!(rsp.headers()["ferrymesh-error"], "cache-miss");
    let (status, outcome, _) = body(
        get("/cc/max-age=100", &[("cache-control", "only-if-cached")])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, outcome.as_str()), (200, "hit"));

    // 4.3.2: a conditional request a fresh entry satisfies gets 304 from the cache.
    assert_eq!(
        body(get("/etag/max-age=7200", &[]).await.unwrap()).await.1,
        "miss"
    );
    let before = c.hits();
    let (status, outcome, bytes) = body(
        get("/etag/max-age=7200", &[("if-none-match", "\"v1\"")])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, outcome.as_str(), bytes.len()), (304, "hit", 0));
    let (status, outcome, _) = body(
        get("/etag/max-age=7200", &[("if-none-match", "\"v0\"")])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, outcome.as_str()), (200, "hit"));
    assert_eq!(c.hits(), before, "both answered from the cache");

    // 5.1: `Age: 7200, 0` is 7200 s old (the first member), so max-age=3599 is stale on arrival.
    assert_eq!(
        body(get("/badage/max-age=3599", &[]).await.unwrap())
            .await
            .1,
        "miss"
    );
    assert_ne!(
        body(get("/badage/max-age=3599", &[]).await.unwrap())
            .await
            .1,
        "hit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_uploads_are_the_callers_fault_and_never_open_the_breaker() {
    use tokio::io::AsyncWriteExt as _;
    // A breaker that opens after 3 failures of any gateway kind.
    let spec = "  circuitBreaker:\n    tripWhen: {consecutiveFailures: 3, failureRatio: \"0\"}\n    failureOn: [5xx, gateway-error, connect-failure]\n";
    let mesh = Mesh::start(&[("echo.yaml", &(service("echo") + &policy("echo", spec)))]);
    let echo = HttpEcho::start("echo-1").await;
    let _server = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let proxy = client_proxy(&mesh, "echo.shop", 1).await;
    let outbound = proxy.addr("outbound");
    let health = proxy.addr("health");
    let requests = |class: &'static str| {
        counter(
            health,
            "ferrymesh_proxy_requests_total",
            if class == "4xx" {
                r#"status_class="4xx""#
            } else {
                r#"status_class="5xx""#
            },
        )
    };
    // Six uploads that stop after 3 of their 100,000 bytes: the caller goes away.
    for _ in 0..6 {
        let mut tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
        tcp.write_all(
            b"POST http://echo.shop/upload HTTP/1.1\r\nhost: echo.shop\r\ncontent-length: 100000\r\n\r\nabc",
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(tcp);
    }
    eventually(Duration::from_secs(5), || async {
        requests("4xx").await == 6
    })
    .await
    .expect("six requests answered as the caller's fault");
    assert_eq!(requests("5xx").await, 0, "none blamed on the upstream");
    // The service is healthy and its breaker closed: the next caller is served.
    let rsp = client(outbound)
        .get("http://echo.shop/after")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert!(rsp.headers().get("ferrymesh-error").is_none());
    let metrics = get(health, "/metrics").await.unwrap().1;
    let open = metrics
        .lines()
        .find(|l| l.starts_with("ferrymesh_proxy_breaker_state") && l.contains(r#"state="open""#))
        .unwrap_or_else(|| panic!("no breaker state: {metrics}"));
    assert!(open.ends_with(" 0"), "{open}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_once_by_default_and_can_be_turned_off() {
    // Two endpoints, round robin, one of them gone (its port refuses): what a rolling restart
    // looks like in the moment before the endpoint set catches up.
    let live = HttpEcho::start("live").await;
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let files = |spec: &str| {
        service("legacy")
            + &yaml::unmeshed("legacy", live.addr)
            + &yaml::unmeshed("legacy", gone)
            + &policy("legacy", spec)
    };
    let mesh = Mesh::start(&[(
        "legacy.yaml",
        &files("  loadBalancer: {algorithm: RoundRobin}\n"),
    )]);
    let proxy = client_proxy(&mesh, "legacy.shop", 2).await;
    let http = client(proxy.addr("outbound"));
    // No retry section: GETs are retried once on another endpoint; none fails.
    for _ in 0..20 {
        let rsp = http.get("http://legacy.shop/x").send().await.unwrap();
        assert_eq!(rsp.status(), 200);
    }
    let mut explained = String::new();
    for _ in 0..4 {
        let rsp = http
            .get("http://legacy.shop/x")
            .header("ferrymesh-explain", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        explained.push_str(rsp.headers()["ferrymesh-explain"].to_str().unwrap());
    }
    assert!(
        explained.contains("retry on connect-failure"),
        "{explained}"
    );
    // Visible in /config_dump as the policy in force.
    let dump = ferrymesh_test_support::mesh::get_json(proxy.addr("admin"), "/config_dump").await;
    let policy = dump["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "CLIENT_POLICY" && r["name"] == "legacy.shop.svc.cluster.local:80")
        .unwrap()["value"]
        .clone();
    assert_eq!(policy["retry"]["attempts"], 1, "{policy}");
    // A POST without an Idempotency-Key is not retried: some fail.
    let mut failed = 0;
    for _ in 0..10 {
        let rsp = http
            .post("http://legacy.shop/x")
            .body("x")
            .send()
            .await
            .unwrap();
        failed += usize::from(rsp.status() == 502);
    }
    assert!(failed > 0, "POST is never retried without a key");
    // `attempts: 0` turns it off.
    mesh.write(
        "legacy.yaml",
        &files("  loadBalancer: {algorithm: RoundRobin}\n  retry: {attempts: 0}\n"),
    );
    eventually(Duration::from_secs(5), || async {
        let dump =
            ferrymesh_test_support::mesh::get_json(proxy.addr("admin"), "/config_dump").await;
        dump["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["type"] == "CLIENT_POLICY" && r["value"]["retry"]["attempts"] == 0)
    })
    .await
    .expect("the policy without retries arrives");
    let mut failed = 0;
    for _ in 0..10 {
        let rsp = http.get("http://legacy.shop/x").send().await.unwrap();
        failed += usize::from(rsp.status() == 502);
    }
    assert!(
        failed > 0,
        "with attempts: 0 a refused connection fails the request"
    );
}
