//! A bounded soak (about 45 s): steady load through two sidecars (a client's and two echo
//! instances') while each instance restarts in turn (SIGTERM to its sidecar, a new one in its
//! place), the controller is killed and started again, and a policy changes twice. With the
//! defaults (drain on SIGTERM, one retry of a refused connection, endpoint sets held over a
//! controller restart) not one request fails.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferrymesh_test_support::mesh::{Mesh, ProxySpec, get, proxied as client};
use ferrymesh_test_support::process::Spawned;
use ferrymesh_test_support::upstream::HttpEcho;

const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n";

fn policy(request_timeout: &str) -> String {
    format!(
        "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: echo, namespace: shop}}\n\
         spec:\n  targetRefs: [{{group: \"\", kind: Service, name: echo}}]\n  timeouts: {{request: {request_timeout}}}\n"
    )
}

fn instance(mesh: &Mesh, name: &str, echo: &HttpEcho) -> Spawned {
    mesh.proxy(&ProxySpec {
        drain_timeout: Some("5s".into()),
        ..ProxySpec::app(name, "echo", echo.addr)
    })
}

async fn ready(proxy: &Spawned) {
    let health = proxy.addr("health");
    ferrymesh_test_support::mesh::eventually(Duration::from_secs(15), || async move {
        get(health, "/ready").await.is_ok_and(|(s, _)| s == 200)
    })
    .await
    .expect("the proxy is ready");
}

/// Stops an instance's sidecar as Kubernetes does (SIGTERM, then the drain) and starts a new
/// one for the same app.
async fn restart(mesh: &Mesh, slot: &mut Spawned, name: &str, echo: &HttpEcho) {
    let new = instance(mesh, name, echo);
    ready(&new).await;
    let mut old = std::mem::replace(slot, new);
    tokio::task::spawn_blocking(move || old.terminate(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_survives_restarts_and_policy_changes_without_a_failure() {
    let mut mesh = Mesh::start(&[("services.yaml", SERVICES), ("policy.yaml", &policy("5s"))]);
    let echoes = [
        HttpEcho::start("echo-1").await,
        HttpEcho::start("echo-2").await,
    ];
    let mut instances = [
        instance(&mesh, "echo-1", &echoes[0]),
        instance(&mesh, "echo-2", &echoes[1]),
    ];
    let client_proxy = mesh.proxy(&ProxySpec::client("client"));
    for p in instances.iter().chain([&client_proxy]) {
        ready(p).await;
    }
    let http = client(client_proxy.addr("outbound"));
    let stop = Arc::new(AtomicBool::new(false));
    // Two callers, each about 40 requests a second.
    let callers: Vec<_> = (0..2)
        .map(|_| {
            let (http, stop) = (http.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut sent, mut failed) = (0usize, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    sent += 1;
                    match http.get("http://echo.shop/soak").send().await {
                        Ok(r) if r.status() == 200 => {}
                        Ok(r) => failed.push(format!(
                            "{} {:?}",
                            r.status(),
                            r.headers().get("ferrymesh-error")
                        )),
                        Err(e) => failed.push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                (sent, failed)
            })
        })
        .collect();
    let pause = |s| tokio::time::sleep(Duration::from_secs(s));
    pause(3).await;
    restart(&mesh, &mut instances[0], "echo-1", &echoes[0]).await;
    pause(3).await;
    restart(&mesh, &mut instances[1], "echo-2", &echoes[1]).await;
    pause(3).await;
    mesh.write("policy.yaml", &policy("4s"));
    pause(3).await;
    // The controller goes away for a while, and comes back knowing nothing of the instances.
    mesh.controller.kill();
    pause(2).await;
    mesh.restart_controller();
    pause(12).await;
    mesh.write("policy.yaml", &policy("3s"));
    pause(3).await;
    restart(&mesh, &mut instances[0], "echo-1", &echoes[0]).await;
    pause(3).await;
    stop.store(true, Ordering::SeqCst);
    let (mut sent, mut failed) = (0, Vec::new());
    for c in callers {
        let (s, f) = c.await.unwrap();
        sent += s;
        failed.extend(f);
    }
    assert!(sent > 1_500, "{sent} requests");
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );
    eprintln!("soak: {sent} requests, none failed");
}
