//! `ferryctl breaker` against a real mesh: the proxies' breakers for a service are isolated,
//! reset and tripped by hand, and requests see it at once.
#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::process::Command;

use ferrymesh_test_support::mesh::yaml::{policy, service};
use ferrymesh_test_support::mesh::{Mesh, ProxySpec, client_proxy, proxied};
use ferrymesh_test_support::process::bin;

fn ferryctl(state: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("ferryctl"))
        .env("RUST_BACKTRACE", "0")
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_are_isolated_reset_and_tripped_by_hand() {
    let spec = "  circuitBreaker:\n    tripWhen: {consecutiveFailures: 50}\n    open: {base: 1h, max: 1h, jitter: \"0\"}\n";
    let files = service("pricing") + &policy("pricing", spec);
    let mesh = Mesh::start(&[("pricing.yaml", &files)]);
    let app = mesh.shop("pricing", "pricing-1", &[]);
    let _server = mesh.proxy(&ProxySpec::app("pricing-1", "pricing", app.addr("app")));
    let proxy = client_proxy(&mesh, "pricing.shop", 1).await;
    let http = proxied(proxy.addr("outbound"));
    let call = || async {
        let rsp = http
            .get("http://pricing.shop/prices/1")
            .send()
            .await
            .unwrap();
        let cause = rsp
            .headers()
            .get("ferrymesh-error")
            .map(|v| v.to_str().unwrap().to_owned());
        (rsp.status().as_u16(), cause)
    };
    assert_eq!(
        call().await,
        (200, None),
        "the first call builds the breaker"
    );
    let state = tempfile::tempdir().unwrap();
    mesh.write_ferryctl_state(state.path());

    let (ok, out) = ferryctl(state.path(), &["breaker", "pricing", "--isolate"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("pricing.shop.svc.cluster.local:80: isolated"),
        "{out}"
    );
    let circuit_open = (503, Some("circuit-open".to_owned()));
    assert_eq!(call().await, circuit_open);
    assert_eq!(call().await, circuit_open, "held open");

    let (ok, out) = ferryctl(state.path(), &["breaker", "pricing", "--reset"]);
    assert!(ok && out.contains(": closed"), "{out}");
    assert_eq!(call().await, (200, None));

    // A trip by hand opens it for its open time (an hour here).
    let (ok, out) = ferryctl(state.path(), &["breaker", "pricing", "--trip"]);
    assert!(ok && out.contains(": open"), "{out}");
    assert_eq!(call().await, circuit_open);
    let metrics = ferrymesh_test_support::mesh::counter(
        proxy.addr("health"),
        "ferrymesh_proxy_breaker_state",
        r#"state="open""#,
    )
    .await;
    assert_eq!(metrics, 1, "the state is in the metrics");

    let (ok, out) = ferryctl(state.path(), &["breaker", "catalog", "--trip"]);
    assert!(!ok, "no proxy holds a breaker for catalog");
    assert!(
        out.contains("no proxy holds a breaker for shop/catalog"),
        "{out}"
    );
}
