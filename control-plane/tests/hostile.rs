//! The controller against connections nobody should be able to exhaust it with: 20,000 silent
//! TCP connections (from four helper processes, each source address its own) to its Discovery
//! and Identity ports. It keeps answering `/status` within a second, a new proxy still gets its
//! certificate and its config and becomes ready, connections over the per-source cap are closed
//! at once and silent ones within their handshake timeout, each counted by reason.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferrymesh_test_support::mesh::{Mesh, ProxySpec, counter, eventually, get};
use ferrymesh_test_support::upstream::HttpEcho;

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n";

/// A helper process holding `count` silent connections to `target`, from `source`; it prints
/// `open N` once they are made and holds them until killed.
fn flood(source: &str, target: SocketAddr, count: usize) -> Child {
    let script = format!(
        "import socket, sys, time\n\
         held = []\n\
         for _ in range({count}):\n\
         \x20   s = socket.socket()\n\
         \x20   s.bind(('{source}', 0))\n\
         \x20   s.settimeout(5)\n\
         \x20   try:\n\
         \x20       s.connect(('{}', {}))\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         \x20   held.append(s)\n\
         print('open', len(held), flush=True)\n\
         time.sleep(120)\n",
        target.ip(),
        target.port()
    );
    Command::new("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The helper processes, killed however the test ends.
struct Floods(Vec<Child>);

impl Drop for Floods {
    fn drop(&mut self) {
        for f in &mut self.0 {
            let _ = f.kill();
            let _ = f.wait();
        }
    }
}

fn wait_open(child: &mut Child) {
    use std::io::BufRead as _;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("open 5000"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_silent_connections_do_not_exhaust_the_controller() {
    let mesh = Mesh::start_secure(&[("svc.yaml", SERVICE)], &["--handshake-timeout", "2s"]);
    let controller = &mesh.controller;
    let (discovery, identity) = (controller.addr("discovery"), controller.addr("identity"));
    let mut floods = Floods(
        [
            ("127.0.0.2", discovery),
            ("127.0.0.3", discovery),
            ("127.0.0.4", identity),
            ("127.0.0.5", identity),
        ]
        .into_iter()
        .map(|(source, target)| flood(source, target, 5000))
        .collect(),
    );
    for f in &mut floods.0 {
        wait_open(f);
    }
    // Still answering, within a second.
    let start = tokio::time::Instant::now();
    let (status, _) = get(controller.addr("admin"), "/status").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    // Still accepting proxies: certified on Identity, configured on Discovery, ready.
    let echo = HttpEcho::start("echo-1").await;
    let proxy = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    eventually(Duration::from_secs(10), || async {
        get(proxy.addr("health"), "/ready")
            .await
            .is_ok_and(|(s, _)| s == 200)
    })
    .await
    .expect("a new proxy becomes ready under the flood");
    // Over the per-source cap: closed at once; the silent rest: at the handshake timeout.
    let refused = |reason: &'static str| {
        counter(
            controller.addr("admin"),
            "ferrymesh_controller_connections_refused_total",
            reason,
        )
    };
    // Every one of the 20,000 is closed by the controller: at once over its source's cap, the
    // others at the handshake timeout.
    eventually(Duration::from_secs(20), || async {
        refused(r#"reason="per-source""#).await + refused(r#"reason="handshake-timeout""#).await
            >= 20_000
    })
    .await
    .expect("every silent connection was closed");
    assert!(refused(r#"reason="per-source""#).await > 0, "the cap held");
    drop(floods);
}
