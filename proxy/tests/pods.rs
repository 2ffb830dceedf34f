//! Pods in network namespaces (root): the same iptables rules as the Kubernetes init
//! container, an app that calls a service by its virtual IP (as it would a ClusterIP), and
//! sidecars on mTLS between the pods. Proves transparent interception end to end: the app's
//! plain connection is redirected to its proxy (SO_ORIGINAL_DST names the virtual IP), balanced
//! over two backend pods and delivered through the chosen pod's inbound proxy; the proxy's own
//! connections are not looped back; skipped ports bypass the proxy; rewritten probes reach the
//! app. Without root the tests skip and say why; under CI they must run.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ferrymesh_test_support::mesh::Mesh;
use ferrymesh_test_support::netns::{Network, Pod};
use ferrymesh_test_support::process::{Spawned, bin};

const VIP: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";
const SKIPPED: u16 = 9999;

/// The Service with its virtual IP, balanced round robin so that both pods answer a short run
/// (the default, PeakEWMA, rightly prefers the pod whose connection is already warm).
fn catalog_service() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: catalog, namespace: shop}}\n\
         spec: {{clusterIP: {VIP}, clusterIPs: [{VIP}, \"{VIP6}\"], ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n{}",
        ferrymesh_test_support::mesh::yaml::policy(
            "catalog",
            "  loadBalancer: {algorithm: RoundRobin}\n"
        )
    )
}

/// A sidecar's ProxyConfig in a pod: transparent both ways, mTLS from the mesh's CA.
fn proxy_yaml(mesh: &Mesh, pod: &Pod, service: &str, app: bool) -> String {
    let identity = mesh.identity.unwrap();
    let token = mesh.token(service);
    let inbound = if app {
        format!(
            "  inbound: {{listen: \"0.0.0.0:4343\", advertise: \"{}:8080\", app: \"127.0.0.1:8080\", transparent: true}}\n  \
             appProbes:\n    /app-health/app/livez: {{httpGet: {{path: /healthz, port: 8080}}}}\n    \
             /app-health/app/readyz: {{tcpSocket: {{port: 7777}}}}\n",
            pod.ip
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: config.ferrymesh.io/v1alpha1\nkind: ProxyConfig\nmetadata: {{name: {name}}}\nspec:\n  \
         workload: {{name: {name}, namespace: shop, service: {service}}}\n{inbound}  \
         outbound: {{mode: Transparent, listen: \"127.0.0.1:4340\", listenV6: \"[::1]:4340\"}}\n  \
         admin: {{listen: \"127.0.0.1:4390\", healthListen: \"0.0.0.0:4391\"}}\n  \
         identity: {{mode: ControlPlane, tokenFile: \"{token}\", trustAnchors: \"{anchors}\"}}\n  \
         controlPlane: {{discovery: \"{discovery}\", identity: \"{identity}\"}}\n  \
         accessLog: {{sample: 1}}\n",
        name = pod.name,
        token = token.display(),
        anchors = mesh.identity_dir().join("ca/ca.pem").display(),
        discovery = mesh.discovery,
    )
}

struct Running {
    processes: Vec<Spawned>,
}

/// In `pod`: the nat rules (as the init container), then the app (if `app`) and the sidecar
/// as UID 2340.
fn start_pod(net: &Network, mesh: &Mesh, pod: &Pod, service: &str, app: bool) -> Running {
    let proxy_bin = net.reachable_bin(&bin("ferrymesh-proxy"));
    let out = Network::exec(pod, &proxy_bin)
        .args([
            "init-iptables",
            "--skip-inbound-ports=4390,4391,9999",
            "--skip-outbound-ports=9999",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init-iptables in {}: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut processes = Vec::new();
    if app {
        let mut cmd = Network::exec(pod, &bin("ferrymesh-test-app"));
        cmd.args(["--instance", &pod.name, "--listen", "0.0.0.0:8080"])
            .args(["--listen", &format!("0.0.0.0:{SKIPPED}")]);
        let log = net.dir.path().join(format!("{}.app.log", pod.name));
        processes.push(Spawned::start(&format!("app {}", pod.name), cmd, &log).unwrap());
    }
    let config = net.dir.path().join(format!("{}.proxy.yaml", pod.name));
    std::fs::write(&config, proxy_yaml(mesh, pod, service, app)).unwrap();
    let mut cmd = Network::exec_as_proxy(pod, &proxy_bin);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env("FERRYMESH_LOG", "info,ferrymesh_proxy=debug");
    let log = net.dir.path().join(format!("{}.proxy.log", pod.name));
    processes.push(Spawned::start(&format!("proxy {}", pod.name), cmd, &log).unwrap());
    Running { processes }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

fn log_of(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_default()
}

#[test]
fn an_app_calling_a_virtual_ip_is_intercepted_balanced_and_answered_over_mtls() {
    let Some(mut net) = Network::create("pods::virtual_ip") else {
        return;
    };
    let mesh = Mesh::start_secure_at(
        net.gateway.into(),
        &[("catalog.yaml", &catalog_service())],
        &[],
    );
    let client = net.pod("client");
    let backends = [net.pod("catalog-1"), net.pod("catalog-2")];
    let mut running = vec![start_pod(&net, &mesh, &client, "client", false)];
    for b in &backends {
        running.push(start_pod(&net, &mesh, b, "catalog", true));
    }

    intercepted_and_balanced(&net, &client, &backends, &mut running);
    ipv6_and_skipped_ports(&net, &client, &backends);
    probes_reach_the_app(&net, &backends[0]);
    drop(running);
}

const CALLS: usize = 20;

fn intercepted_and_balanced(
    net: &Network,
    client: &Pod,
    backends: &[Pod; 2],
    running: &mut [Running],
) {
    // Both backends register once certified; until then the service may have fewer endpoints.
    let url = format!("http://{VIP}/items");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = BTreeMap::<String, usize>::new();
    while seen.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both backends never answered: {seen:?}\nclient proxy:\n{}",
            log_of(net.dir.path(), "client.proxy.log")
        );
        let (code, body) = Network::curl(client, &url);
        if code == 200 {
            *seen
                .entry(json(&body)["instance"].as_str().unwrap().to_owned())
                .or_default() += 1;
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Now a measured run: every call answered, by both pods, each through its inbound proxy.
    let mut by = BTreeMap::<String, usize>::new();
    for _ in 0..CALLS {
        let (code, body) = Network::curl(client, &url);
        assert_eq!(code, 200, "{body}");
        let answer = json(&body);
        // The app saw its own proxy (loopback), never the client pod: the inbound redirect.
        assert!(
            answer["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{answer}"
        );
        assert_eq!(answer["local"], "127.0.0.1:8080");
        *by.entry(answer["instance"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        by.values().copied().collect::<Vec<_>>(),
        [CALLS / 2, CALLS / 2],
        "round robin over both pods: {by:?}"
    );

    // The logs prove the path: the client's sidecar took each connection for the virtual IP.
    let client_log = log_of(net.dir.path(), "client.proxy.log");
    let redirected = client_log
        .lines()
        .filter(|l| l.contains("redirected connection") && l.contains(&format!("{VIP}:80")))
        .count();
    assert!(
        redirected >= CALLS,
        "{redirected} redirected connections logged:\n{client_log}"
    );
    // Its own connections to the backends (as UID 2340) were not redirected back to it.
    for b in backends {
        assert!(
            !client_log.contains(&format!("original={}:8080", b.ip)),
            "the proxy's own connection looped back:\n{client_log}"
        );
    }
    // Each backend's sidecar logged the requests, with the client's SPIFFE id from mTLS.
    for (b, r) in backends.iter().zip(&mut running[1..]) {
        let proxy = r.processes.last().unwrap();
        let lines: Vec<serde_json::Value> = proxy
            .stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let inbound: Vec<_> = lines
            .iter()
            .filter(|l| l["direction"] == "inbound" && l["path"] == "/items")
            .collect();
        assert!(
            !inbound.is_empty(),
            "{}: no inbound access-log lines: {lines:?}",
            b.name
        );
        for l in inbound {
            assert_eq!(l["peer"], "spiffe://cluster.local/ns/shop/sa/client", "{l}");
        }
        let app_log = log_of(net.dir.path(), &format!("{}.app.log", b.name));
        assert!(
            app_log.contains("GET /items from 127.0.0.1:"),
            "{}: app log:\n{app_log}",
            b.name
        );
    }
}

fn ipv6_and_skipped_ports(net: &Network, client: &Pod, backends: &[Pod; 2]) {
    // The same over IPv6: ip6tables redirects to [::1]:4340, IP6T_SO_ORIGINAL_DST names the
    // service's IPv6 virtual IP.
    let (code, body) = Network::curl(client, &format!("http://[{VIP6}]/v6"));
    assert_eq!(code, 200, "{body}");
    assert!(
        json(&body)["instance"]
            .as_str()
            .unwrap()
            .starts_with("catalog-")
    );
    let client_log = log_of(net.dir.path(), "client.proxy.log");
    assert!(
        client_log.contains(&format!("original=[{VIP6}]:80")),
        "{client_log}"
    );

    // A skipped port bypasses both proxies: the app sees the client pod itself, and the
    // client's sidecar never saw the connection.
    let (code, body) = Network::curl(client, &format!("http://{}:{SKIPPED}/skip", backends[0].ip));
    assert_eq!(code, 200, "{body}");
    let answer = json(&body);
    assert!(
        answer["peer"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", client.ip)),
        "{answer}"
    );
    let client_log = log_of(net.dir.path(), "client.proxy.log");
    assert!(!client_log.contains(&format!(":{SKIPPED}")), "{client_log}");
}

fn probes_reach_the_app(net: &Network, b: &Pod) {
    // Rewritten probes reach the app (as the kubelet would call them, from outside the pod).
    let (code, body) = curl_root(&format!("http://{}:4391/app-health/app/livez", b.ip));
    assert_eq!(code, 200, "{body}");
    let app_log = log_of(net.dir.path(), "catalog-1.app.log");
    assert!(
        app_log.contains("GET /healthz from 127.0.0.1:"),
        "{app_log}"
    );
    // A tcpSocket probe on a port nothing listens on fails, though the proxy itself is up.
    let (code, body) = curl_root(&format!("http://{}:4391/app-health/app/readyz", b.ip));
    assert_eq!(code, 503, "{body}");
}

/// curl from the root namespace (the kubelet's side of the bridge).
fn curl_root(url: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The nat rules of one pod, as iptables-save prints them (`backend`: nft or legacy).
fn nat_rules(pod: &Pod, backend: &str, family: &str) -> String {
    let tool = format!("{family}-{backend}-save");
    let out = Network::exec(pod, Path::new(&tool))
        .args(["-t", "nat"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn init_iptables_is_idempotent_keeps_other_rules_and_cleans_up() {
    let Some(mut net) = Network::create("pods::init_iptables") else {
        return;
    };
    let proxy_bin = bin("ferrymesh-proxy");
    for backend in ["nft", "legacy"] {
        let pod = net.pod(&format!("rules-{backend}"));
        // Someone else's rule, which must survive both the install and the cleanup.
        let out = Network::exec(&pod, Path::new(&format!("iptables-{backend}")))
            .args([
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "eth0",
                "-j",
                "MASQUERADE",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let init = |extra: &[&str]| {
            let out = Network::exec(&pod, &proxy_bin)
                .args([
                    "init-iptables",
                    &format!("--backend={backend}"),
                    "--skip-subnets=10.0.0.0/8,fd00::/8",
                ])
                .args(extra)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{backend}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        init(&[]);
        init(&[]);
        let v4 = nat_rules(&pod, backend, "iptables");
        assert_eq!(
            v4.matches("-j FERRYMESH_INBOUND").count(),
            1,
            "{backend}, twice: one set\n{v4}"
        );
        assert_eq!(v4.matches("-j FERRYMESH_OUTPUT").count(), 1, "{v4}");
        assert!(v4.contains("--uid-owner 2340 -j RETURN"), "{v4}");
        assert!(
            v4.contains("-d 10.0.0.0/8 -j RETURN") && !v4.contains("fd00::"),
            "{v4}"
        );
        assert!(v4.contains("-j REDIRECT --to-ports 4340"), "{v4}");
        assert!(v4.contains("-A POSTROUTING -o eth0 -j MASQUERADE"), "{v4}");
        let v6 = nat_rules(&pod, backend, "ip6tables");
        assert!(
            v6.contains("-d fd00::/8 -j RETURN") && v6.contains("--to-ports 4343"),
            "{v6}"
        );
        init(&["--cleanup"]);
        let v4 = nat_rules(&pod, backend, "iptables");
        assert!(!v4.contains("FERRYMESH"), "{backend}: cleaned up\n{v4}");
        assert!(v4.contains("-A POSTROUTING -o eth0 -j MASQUERADE"), "{v4}");
        assert!(!nat_rules(&pod, backend, "ip6tables").contains("FERRYMESH"));
    }
}
