//! The controller with a thousand simulated proxies (real Discovery streams, each on its own
//! connection, subscribing as a sidecar does): every stream comes up and stays up, and a
//! policy edit reaches every proxy that calls the service. `make bench` runs the same fleet
//! at 10,000 and reports the timings; this test checks the behaviour, bounded in size.
#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferrymesh_test_support::mesh::{Mesh, eventually, get_json};
use ferrymesh_test_support::sim::{Fleet, raise_fd_limit};

const SERVICES: usize = 20;
const PROXIES: usize = 1_000;

fn services_yaml() -> String {
    let mut out = String::new();
    for s in 0..SERVICES {
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: sim}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{s}, namespace: sim, labels: {{kubernetes.io/service-name: svc-{s}}}}}\n\
             ports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [\"10.1.{s}.1\"]}}, {{addresses: [\"10.1.{s}.2\"]}}]\n---\n"
        );
    }
    out
}

fn policy(request: &str) -> String {
    format!(
        "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: svc-0, namespace: sim}}\n\
         spec:\n  targetRefs: [{{group: \"\", kind: Service, name: svc-0}}]\n  timeouts: {{request: {request}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_proxies_stay_connected_and_get_an_edit() {
    raise_fd_limit();
    let mesh = Mesh::start(&[
        ("services.yaml", &services_yaml()),
        ("policy.yaml", &policy("5s")),
    ]);
    let names: Vec<String> = (0..SERVICES)
        .map(|s| format!("svc-{s}.sim.svc.cluster.local:80"))
        .collect();
    let fleet = Fleet {
        proxies: PROXIES,
        calls: 2,
        services: names,
        connect_concurrency: 200,
    };
    let running = fleet.start(mesh.discovery);
    let seen = running.seen.clone();
    let took = eventually(Duration::from_mins(1), || {
        let seen = seen.clone();
        async move {
            seen.synced.load(Ordering::Acquire) == PROXIES
                || seen.dropped.load(Ordering::Acquire) > 0
        }
    })
    .await
    .expect("every stream synced");
    assert_eq!(
        seen.dropped.load(Ordering::Acquire),
        0,
        "streams dropped: {:?}",
        seen.errors.lock().unwrap()
    );
    eprintln!("{PROXIES} proxies synced in {took:?}");

    // The controller counts them all.
    let admin = mesh.controller.addr("admin");
    let status = get_json(admin, "/status").await;
    assert_eq!(status["proxies"].as_array().map(Vec::len), Some(PROXIES));

    // An edit of svc-0's policy reaches every proxy that calls svc-0 (each calls 2 of 20).
    let callers = (0..PROXIES)
        .filter(|i| (0..2).any(|c| (i + c) % SERVICES == 0))
        .count();
    seen.watch_for("seconds: 7,");
    mesh.write("policy.yaml", &policy("7s"));
    let took = eventually(Duration::from_secs(10), || {
        let seen = seen.clone();
        async move { seen.arrivals().len() >= callers }
    })
    .await
    .expect("the edit reached every caller");
    assert_eq!(
        seen.arrivals().len(),
        callers,
        "each caller got the edit once"
    );
    eprintln!("the edit reached {callers} proxies {took:?} after the write");

    // Nobody was dropped meanwhile.
    assert_eq!(seen.dropped.load(Ordering::Acquire), 0);
    running.stop().await;
}
