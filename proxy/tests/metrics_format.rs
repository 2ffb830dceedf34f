//! `/metrics` in the format the scraper asks for, on a proxy and on the controller: OpenMetrics
//! when `Accept` names it (as Prometheus does), the Prometheus text format otherwise; the text
//! format passes Prometheus' own linter (`promtool check metrics`), counters included.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use ferrymesh_test_support::mesh::{Mesh, ProxySpec, proxied};
use ferrymesh_test_support::upstream::HttpEcho;

const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n";

/// promtool, or why the check cannot run here (a failure under CI).
fn promtool() -> Option<()> {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if found {
        return Some(());
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "promtool is missing (scripts/test-deps.sh installs it as root)"
    );
    eprintln!("SKIPPED promtool checks: promtool is not installed");
    None
}

async fn scrape(addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut req = reqwest::Client::new().get(format!("http://{addr}/metrics"));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let rsp = req.send().await.unwrap();
    let ct = rsp.headers()["content-type"].to_str().unwrap().to_owned();
    (ct, rsp.text().await.unwrap())
}

fn lint(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_as_asked_and_pass_promtool() {
    let mesh = Mesh::start(&[("services.yaml", SERVICES)]);
    let echo = HttpEcho::start("echo-1").await;
    let _server = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let client = ferrymesh_test_support::mesh::client_proxy(&mesh, "echo.shop", 1).await;
    let http = proxied(client.addr("outbound"));
    for _ in 0..3 {
        assert_eq!(
            http.get("http://echo.shop/").send().await.unwrap().status(),
            200
        );
    }
    let prometheus_accept =
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    for (what, addr) in [
        ("proxy", client.addr("health")),
        ("controller", mesh.controller.addr("admin")),
    ] {
        let (ct, om) = scrape(addr, Some(prometheus_accept)).await;
        assert!(
            ct.starts_with("application/openmetrics-text"),
            "{what}: {ct}"
        );
        assert!(om.ends_with("# EOF\n"), "{what}");
        let (ct, text) = scrape(addr, None).await;
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{what}: {ct}");
        assert!(!text.contains("# EOF"), "{what}");
        if what == "proxy" {
            assert!(
                text.contains("# TYPE ferrymesh_proxy_requests_total counter"),
                "{text}"
            );
        }
        if promtool().is_some() {
            let (ok, out) = lint(&text);
            assert!(ok && out.trim().is_empty(), "{what}: promtool: {out}");
        }
    }
}
