//! The data path end to end: app -> outbound sidecar -> inbound sidecar -> app, with the real
//! controller and proxy binaries on loopback and in-process apps.
#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ferrymesh_test_support::echo_pb::EchoRequest;
use ferrymesh_test_support::echo_pb::echo_client::EchoClient;
use ferrymesh_test_support::mesh::{
    Mesh, ProxySpec, eventually, get, get_json, proxied as client, tunnel,
};
use ferrymesh_test_support::process::Spawned;
use ferrymesh_test_support::upstream::{GrpcServer, HttpEcho};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SERVICES: &str = r"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: shop}
spec: {ports: [{name: grpc, port: 80, appProtocol: grpc}]}
---
apiVersion: v1
kind: Service
metadata: {name: tcp, namespace: shop}
spec: {ports: [{name: tcp, port: 80, appProtocol: tcp}]}
";

/// Waits until `proxy` holds `count` ready endpoints for `name`.
async fn wait_endpoints(
    proxy: &Spawned,
    name: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let admin = proxy.addr("admin");
    eventually(timeout, || async move {
        ready_endpoints(admin, name).await == count
    })
    .await
}

async fn ready_endpoints(admin: SocketAddr, name: &str) -> usize {
    let dump = get_json(admin, "/config_dump").await;
    dump["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "ENDPOINTS" && r["name"] == name)
        .and_then(|r| {
            r["value"]["endpoints"]
                .as_array()
                .map(|e| e.iter().filter(|e| e["ready"] == true).count())
        })
        .unwrap_or(0)
}

async fn wait_ready(proxy: &Spawned) {
    let health = proxy.addr("health");
    eventually(Duration::from_secs(10), || async move {
        get(health, "/ready").await.is_ok_and(|(s, _)| s == 200)
    })
    .await
    .expect("proxy became ready");
}

const ECHO: &str = "echo.shop.svc.cluster.local:80";

/// Sends `batches` x 6 concurrent requests (P2C spreads load by in-flight counts; strictly
/// sequential requests may all go to the endpoint with the best latency estimate).
async fn send_batches(http: &reqwest::Client, batches: usize) {
    for _ in 0..batches {
        let requests = (0..6).map(|_| http.get("http://echo.shop/").send());
        for rsp in futures::future::join_all(requests).await {
            assert_eq!(rsp.unwrap().status(), 200);
        }
    }
}

/// Two apps (HTTP echo, gRPC echo) behind sidecars, and a client-only sidecar with a fixed
/// listener for the gRPC service.
struct TwoHops {
    _mesh: Mesh,
    apps: (HttpEcho, GrpcServer),
    servers: Vec<Spawned>,
    client: Spawned,
}

async fn two_hops() -> TwoHops {
    let mesh = Mesh::start(&[("services.yaml", SERVICES)]);
    let echo = HttpEcho::start("echo-1").await;
    let grpc = GrpcServer::start("grpc-1").await;
    let servers = vec![
        mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr)),
        mesh.proxy(&ProxySpec::app("grpc-1", "grpc", grpc.addr)),
    ];
    let client = mesh.proxy(&ProxySpec {
        fixed: vec!["grpc.shop:80".into()],
        ..ProxySpec::client("client")
    });
    wait_ready(&client).await;
    TwoHops {
        _mesh: mesh,
        apps: (echo, grpc),
        servers,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_crosses_two_sidecars() {
    let t = two_hops().await;
    let client_proxy = &t.client;
    let outbound = client_proxy.addr("outbound");
    // HTTP/1.1, absolute form through the explicit proxy.
    let rsp = client(outbound)
        .post("http://echo.shop/hello?x=1")
        .body("ping")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    let doc: Value = rsp.json().await.unwrap();
    assert_eq!(doc["instance"], "echo-1");
    assert_eq!(doc["version"], "HTTP/1.1");
    assert_eq!(
        doc["authority"], "echo.shop",
        "the app sees the authority the caller used"
    );
    assert_eq!(doc["path"], "/hello?x=1");
    assert_eq!(doc["body"], "ping");

    let rsp = client(outbound)
        .get("http://echo.shop/again")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    let metrics = get(client_proxy.addr("health"), "/metrics")
        .await
        .unwrap()
        .1;
    assert!(
        metrics.contains(r#"ferrymesh_proxy_requests_total{direction="outbound",service="shop/echo",status_class="2xx"} 2"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_crosses_two_sidecars_in_a_tunnel_and_with_prior_knowledge() {
    let t = two_hops().await;
    let outbound = t.client.addr("outbound");
    // h2c inside a CONNECT tunnel.
    let tcp = tunnel(outbound, "echo.shop:80").await;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    for path in ["/a", "/b"] {
        let req = http::Request::get(format!("http://echo.shop{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let rsp = h2.send_request(req).await.unwrap();
        assert_eq!(rsp.status(), 200);
        let doc: Value =
            serde_json::from_slice(&rsp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(doc["version"], "HTTP/2.0");
        assert_eq!(doc["authority"], "echo.shop");
        assert_eq!(doc["path"], path);
    }

    // h2c prior knowledge straight to the explicit proxy listener.
    let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let rsp = h2
        .send_request(
            http::Request::get("http://echo.shop/direct")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    // The server's sidecar asked the app once whether it speaks HTTP/2 (one probe connection)
    // and keeps one HTTP/2 connection to it: not a probe per request.
    let conns = t.apps.0.conns.load(std::sync::atomic::Ordering::SeqCst);
    assert!(conns <= 2, "{conns} connections to the app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_cross_two_sidecars() {
    let t = two_hops().await;
    let client_proxy = &t.client;
    // gRPC through a fixed-target listener: unary (with an error status), server and bidi streaming.
    let fixed: SocketAddr = client_proxy.listening["fixed"][0][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut grpc_client = EchoClient::connect(format!("http://{fixed}"))
        .await
        .unwrap();
    let reply = grpc_client
        .unary(EchoRequest {
            message: "hi".into(),
            count: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.message.as_str(), reply.instance.as_str()),
        ("hi", "grpc-1")
    );
    let status = grpc_client
        .unary(EchoRequest {
            message: "fail".into(),
            count: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "grpc-status travels in trailers"
    );
    let mut stream = grpc_client
        .server_stream(EchoRequest {
            message: "s".into(),
            count: 5,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        got.push(r.index);
    }
    assert_eq!(got, [0, 1, 2, 3, 4]);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = grpc_client
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..3 {
        tx.send(EchoRequest {
            message: format!("m{i}"),
            count: 0,
        })
        .await
        .unwrap();
        let r = replies.message().await.unwrap().unwrap();
        assert_eq!(
            r.message,
            format!("m{i}"),
            "each message is answered before the next is sent"
        );
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());

    let metrics = get(client_proxy.addr("health"), "/metrics")
        .await
        .unwrap()
        .1;
    assert!(metrics.contains(r#"service="shop/grpc""#), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_replicas_and_follow_membership() {
    let mesh = Mesh::start(&[("services.yaml", SERVICES)]);
    let apps = [
        HttpEcho::start("echo-1").await,
        HttpEcho::start("echo-2").await,
        HttpEcho::start("echo-3").await,
    ];
    let mut proxies: Vec<Spawned> = apps
        .iter()
        .map(|a| mesh.proxy(&ProxySpec::app(&a.instance, "echo", a.addr)))
        .collect();
    let client_proxy = mesh.proxy(&ProxySpec::client("client"));
    wait_ready(&client_proxy).await;
    let http = client(client_proxy.addr("outbound"));
    let _ = http.get("http://echo.shop/").send().await.unwrap(); // subscribes
    wait_endpoints(&client_proxy, ECHO, 3, Duration::from_secs(5))
        .await
        .unwrap();

    send_batches(&http, 10).await;
    for a in &apps {
        let hits = a.hits.load(std::sync::atomic::Ordering::SeqCst);
        assert!(hits >= 5, "{} got {hits} of 60 requests", a.instance);
    }

    // A crashed replica leaves the endpoint set within a second; later requests all succeed.
    proxies[1].kill();
    let took = wait_endpoints(&client_proxy, ECHO, 2, Duration::from_secs(1))
        .await
        .expect("removed within 1s");
    eprintln!("replica removal seen by the client proxy after {took:?}");
    for _ in 0..30 {
        let rsp = http.get("http://echo.shop/").send().await.unwrap();
        assert_eq!(rsp.status(), 200);
        assert_ne!(rsp.headers()["x-instance"], "echo-2");
    }

    // A new replica joins and gets traffic.
    let echo4 = HttpEcho::start("echo-4").await;
    proxies.push(mesh.proxy(&ProxySpec::app("echo-4", "echo", echo4.addr)));
    wait_endpoints(&client_proxy, ECHO, 3, Duration::from_secs(5))
        .await
        .expect("the new replica joins");
    send_batches(&http, 5).await;
    assert!(echo4.hits.load(std::sync::atomic::Ordering::SeqCst) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_ready_workloads_are_endpoints() {
    let mesh = Mesh::start(&[("services.yaml", SERVICES)]);
    let ok = HttpEcho::start("ok").await;
    let sick = HttpEcho::start("sick").await;
    let _p1 = mesh.proxy(&ProxySpec {
        readiness_path: Some("/status/200".into()),
        ..ProxySpec::app("ok", "echo", ok.addr)
    });
    let _p2 = mesh.proxy(&ProxySpec {
        readiness_path: Some("/status/503".into()),
        ..ProxySpec::app("sick", "echo", sick.addr)
    });
    let status = eventually(Duration::from_secs(5), || async {
        let s = mesh.status().await;
        s["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["service"] == "shop/echo")
            .count()
            == 2
            && s["services"][0]["ports"][0]["endpoints"]
                .as_array()
                .unwrap()
                .len()
                == 1
    })
    .await;
    status.expect("both proxies connected, one endpoint");
    let s = mesh.status().await;
    let endpoints = s["services"][0]["ports"][0]["endpoints"]
        .as_array()
        .unwrap();
    assert_eq!(endpoints[0]["instance"], "ok");
    // The sick one stays out while it keeps failing its readiness check.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = mesh.status().await;
    assert_eq!(
        s["services"][0]["ports"][0]["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// One echo instance behind its sidecar and a client sidecar, the first call answered.
struct EchoAndClient {
    mesh: Mesh,
    echo: HttpEcho,
    echo_proxy: Spawned,
    client_proxy: Spawned,
    http: reqwest::Client,
}

async fn echo_and_client() -> EchoAndClient {
    let mesh = Mesh::start(&[("services.yaml", SERVICES)]);
    let echo = HttpEcho::start("echo-1").await;
    let echo_proxy = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let client_proxy = mesh.proxy(&ProxySpec::client("client"));
    wait_ready(&client_proxy).await;
    let http = client(client_proxy.addr("outbound"));
    assert_eq!(
        http.get("http://echo.shop/").send().await.unwrap().status(),
        200
    );
    EchoAndClient {
        mesh,
        echo,
        echo_proxy,
        client_proxy,
        http,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_outage_keeps_traffic_and_proxies_resync() {
    let EchoAndClient {
        mut mesh,
        echo: _echo,
        echo_proxy: _echo_proxy,
        client_proxy,
        http,
    } = echo_and_client().await;
    wait_endpoints(&client_proxy, ECHO, 1, Duration::from_secs(5))
        .await
        .unwrap();

    mesh.controller.kill();
    let admin = client_proxy.addr("admin");
    eventually(Duration::from_secs(5), || async move {
        get_json(admin, "/config_dump").await["controlPlane"]["connected"] == false
    })
    .await
    .expect("the client proxy notices the outage");
    for _ in 0..20 {
        assert_eq!(
            http.get("http://echo.shop/").send().await.unwrap().status(),
            200,
            "traffic flows with the controller down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        ready_endpoints(admin, ECHO).await,
        1,
        "the last good endpoints are kept"
    );

    mesh.restart_controller();
    eventually(Duration::from_secs(15), || async move {
        get_json(admin, "/config_dump").await["controlPlane"]["connected"] == true
    })
    .await
    .expect("the client proxy reconnects");
    // Resynced: the echo proxy re-registered, and changes flow again.
    let echo2 = HttpEcho::start("echo-2").await;
    let _echo2_proxy = mesh.proxy(&ProxySpec::app("echo-2", "echo", echo2.addr));
    wait_endpoints(&client_proxy, ECHO, 2, Duration::from_secs(15))
        .await
        .expect("both replicas after the restart");
    assert_eq!(
        http.get("http://echo.shop/").send().await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hosts_pass_through_or_get_502() {
    let mesh = Mesh::start(&[("services.yaml", SERVICES)]);
    let outside = HttpEcho::start("outside").await;
    let pass = mesh.proxy(&ProxySpec::client("pass"));
    let reject = mesh.proxy(&ProxySpec {
        unknown_hosts: Some("Reject".into()),
        ..ProxySpec::client("reject")
    });
    wait_ready(&pass).await;
    wait_ready(&reject).await;

    let url = format!("http://{}/out", outside.addr);
    let rsp = client(pass.addr("outbound"))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["x-instance"], "outside");
    let rsp = client(reject.addr("outbound"))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 502);
    assert_eq!(rsp.headers()["ferrymesh-error"], "unknown-host");
    let rsp = client(reject.addr("outbound"))
        .get("http://nosuch.shop/")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.headers()["ferrymesh-error"], "unknown-host");
    // A known service with no ready endpoint is not an unknown host.
    let rsp = client(reject.addr("outbound"))
        .get("http://echo.shop/")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 503);
    assert_eq!(rsp.headers()["ferrymesh-error"], "no-endpoints");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_crosses_both_sidecars() {
    let mesh = Mesh::start(&[("services.yaml", SERVICES)]);
    // A TCP echo server that speaks no HTTP.
    let tcp_addr = ferrymesh_test_support::upstream::tcp_echo().await;
    let _tcp_proxy = mesh.proxy(&ProxySpec::app("tcp-1", "tcp", tcp_addr));
    // Ready, and holding the tcp endpoint (registered once its proxy has its inbound policy).
    let client_proxy = ferrymesh_test_support::mesh::client_proxy(&mesh, "tcp.shop", 1).await;
    let mut tcp = tunnel(client_proxy.addr("outbound"), "tcp.shop:80").await;
    let payload = b"\x00\x01binary\xffpayload";
    tcp.write_all(payload).await.unwrap();
    let mut back = vec![0; payload.len()];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_leaves_the_endpoints_first() {
    let mesh = Mesh::start(&[("services.yaml", SERVICES)]);
    let echo = HttpEcho::start("echo-1").await;
    let mut echo_proxy = mesh.proxy(&ProxySpec {
        drain_timeout: Some("5s".into()),
        ..ProxySpec::app("echo-1", "echo", echo.addr)
    });
    let client_proxy = mesh.proxy(&ProxySpec::client("client"));
    wait_ready(&client_proxy).await;
    let http = client(client_proxy.addr("outbound"));
    assert_eq!(
        http.get("http://echo.shop/").send().await.unwrap().status(),
        200
    );

    let slow = tokio::spawn({
        let http = http.clone();
        async move {
            let rsp = http.get("http://echo.shop/slow/1000").send().await.unwrap();
            let status = rsp.status();
            (status, rsp.text().await.unwrap())
        }
    });
    // SIGTERM only once the slow request reached the app.
    eventually(Duration::from_secs(5), || async {
        echo.hits.load(std::sync::atomic::Ordering::SeqCst) == 2
    })
    .await
    .expect("the slow request reached the app");
    let pid = echo_proxy.pid();
    let drained = tokio::task::spawn_blocking(move || {
        let status = echo_proxy.terminate(Duration::from_secs(10));
        (status, echo_proxy)
    });
    wait_endpoints(&client_proxy, ECHO, 0, Duration::from_secs(1))
        .await
        .expect("left the endpoints at once");
    let (status, body) = slow.await.unwrap();
    assert_eq!(
        status, 200,
        "the in-flight request finished during the drain: {body}"
    );
    let (status, _p) = drained.await.unwrap();
    assert!(
        status.unwrap().success(),
        "proxy {pid} exited cleanly after draining"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_request_timeout_answers_504() {
    let policy = "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: echo, namespace: shop}\n\
                  spec:\n  targetRefs: [{group: \"\", kind: Service, name: echo}]\n  timeouts: {request: 300ms}\n";
    let mesh = Mesh::start(&[("services.yaml", SERVICES), ("policy.yaml", policy)]);
    let echo = HttpEcho::start("echo-1").await;
    let _echo_proxy = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let client_proxy = mesh.proxy(&ProxySpec::client("client"));
    wait_ready(&client_proxy).await;
    let http = client(client_proxy.addr("outbound"));
    assert_eq!(
        http.get("http://echo.shop/slow/10")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let start = tokio::time::Instant::now();
    let rsp = http.get("http://echo.shop/slow/3000").send().await.unwrap();
    assert_eq!(rsp.status(), 504);
    assert_eq!(rsp.headers()["ferrymesh-error"], "timeout");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "answered at the deadline, not when the app did"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_pooled_on_both_hops() {
    let mesh = Mesh::start(&[("services.yaml", SERVICES)]);
    let echo = HttpEcho::start("echo-1").await;
    let _echo_proxy = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let client_proxy = mesh.proxy(&ProxySpec::client("client"));
    wait_ready(&client_proxy).await;
    let http = client(client_proxy.addr("outbound"));
    for _ in 0..50 {
        assert_eq!(
            http.get("http://echo.shop/").send().await.unwrap().status(),
            200
        );
    }
    let conns = echo.conns.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        conns, 1,
        "50 sequential requests reused one connection to the app"
    );
    let dump = get_json(client_proxy.addr("admin"), "/config_dump").await;
    assert_eq!(dump["targets"][ECHO]["endpoints"][0]["inFlight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_after_the_first_sync_and_reconnects_when_the_controller_appears() {
    let mut mesh = Mesh::start(&[("services.yaml", SERVICES)]);
    mesh.controller.kill();
    let echo = HttpEcho::start("echo-1").await;
    let proxy = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let health = proxy.addr("health");
    assert_eq!(get(health, "/live").await.unwrap().0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        get(health, "/ready").await.unwrap().0,
        503,
        "not ready before any sync"
    );
    mesh.restart_controller();
    wait_ready(&proxy).await;
    let status = mesh.status().await;
    assert_eq!(
        status["services"][0]["ports"][0]["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_deadline_is_honoured_and_passed_on_shrunk() {
    let mesh = Mesh::start(&[("services.yaml", SERVICES)]);
    let echo = HttpEcho::start("echo-1").await;
    let _echo_proxy = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let client_proxy = mesh.proxy(&ProxySpec::client("client"));
    wait_ready(&client_proxy).await;
    let http = client(client_proxy.addr("outbound"));
    // The app sees the budget that is left, never more than the caller gave.
    let rsp = http
        .get("http://echo.shop/")
        .header("ferrymesh-timeout", "800")
        .send()
        .await
        .unwrap();
    let doc: Value = rsp.json().await.unwrap();
    let left: u64 = doc["headers"]["ferrymesh-timeout"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(left <= 800 && left > 500, "{left}");
    // A caller's budget shorter than the upstream's latency: 504 at the caller's deadline.
    let start = tokio::time::Instant::now();
    let rsp = http
        .get("http://echo.shop/slow/3000")
        .header("ferrymesh-timeout", "300")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 504);
    assert_eq!(rsp.headers()["ferrymesh-error"], "timeout");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

/// Sends raw bytes to `addr` and returns the status line's code and the whole answer.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http11_request_without_exactly_one_host_is_refused() {
    let t = two_hops().await;
    let outbound = t.client.addr("outbound");
    // RFC 9112 section 3.2: no Host, or two, is a 400 from the proxy itself; nothing is routed.
    let (code, text) = raw_exchange(
        outbound,
        b"GET http://echo.shop/ HTTP/1.1\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("ferrymesh-error: bad-request"), "{text}");
    let (code, text) = raw_exchange(
        outbound,
        b"GET http://echo.shop/ HTTP/1.1\r\nhost: echo.shop\r\nhost: evil.shop\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("more than one Host header"), "{text}");
    // The inbound side holds the same rule.
    let inbound = t.servers[0].addr("inbound");
    let (code, text) = raw_exchange(inbound, b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n").await;
    assert_eq!(code, 400, "{text}");
    // One Host, and HTTP/1.0 without one, are served.
    let (code, text) = raw_exchange(
        outbound,
        b"GET http://echo.shop/ HTTP/1.1\r\nhost: echo.shop\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 200, "{text}");
    let (code, text) = raw_exchange(outbound, b"GET http://echo.shop/ HTTP/1.0\r\n\r\n").await;
    assert_eq!(code, 200, "{text}");
}

/// The HTTP/2 frames in `bytes` (after none or the server's preface-less start): `(type, payload)`.
fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len =
            (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2]);
        if bytes.len() < 9 + len {
            break;
        }
        out.push((bytes[3], bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_ping_flood_is_cut_off_with_enhance_your_calm() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let t = two_hops().await;
    for (side, addr) in [
        ("outbound", t.client.addr("outbound")),
        ("inbound", t.servers[0].addr("inbound")),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        flood.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
        for _ in 0..5_000 {
            flood.extend([0, 0, 8, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // PING
        }
        // The proxy may close before taking it all.
        let _ = tcp.write_all(&flood).await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "{side}: the connection was closed");
        let got = frames(&answer);
        let goaway = got.iter().find(|(kind, _)| *kind == 7);
        let pongs = got.iter().filter(|(kind, _)| *kind == 6).count();
        assert!(
            goaway.is_some_and(|(_, p)| p[4..8] == [0, 0, 0, 0xb]),
            "{side}: GOAWAY(ENHANCE_YOUR_CALM) expected, got {:?}",
            got.iter().map(|f| f.0).collect::<Vec<_>>()
        );
        assert!(pongs <= 1_001, "{side}: {pongs} PINGs answered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_fails_no_request_while_workloads_re_register() {
    let EchoAndClient {
        mut mesh,
        echo: _echo,
        echo_proxy: _echo_proxy,
        client_proxy,
        http,
    } = echo_and_client().await;
    let admin = client_proxy.addr("admin");
    // Steady traffic (50 rps) through a controller restart and the seconds after it, while
    // the echo's proxy reconnects and registers again.
    let traffic = {
        let http = http.clone();
        tokio::spawn(async move {
            let mut failed = Vec::new();
            for _ in 0..300 {
                let rsp = http.get("http://echo.shop/").send().await.unwrap();
                if rsp.status() != 200 {
                    failed.push(format!(
                        "{} {:?}",
                        rsp.status(),
                        rsp.headers().get("ferrymesh-error")
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            failed
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Down long enough for the proxies' reconnect backoffs to spread (full jitter): one comes
    // back well before the other.
    mesh.controller.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    mesh.restart_controller();
    eventually(Duration::from_secs(15), || async move {
        get_json(admin, "/config_dump").await["controlPlane"]["connected"] == true
    })
    .await
    .expect("the client proxy reconnects");
    let failed = traffic.await.unwrap();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert_eq!(ready_endpoints(admin, ECHO).await, 1);
}

/// An app that speaks HTTP/1.1 only (as nginx does without `http2`): it answers with the
/// version it saw.
async fn http1_only_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let host = req
                            .headers()
                            .get("host")
                            .map(|h| h.to_str().unwrap().to_owned())
                            .unwrap_or_default();
                        let body = format!("{:?} {host}", req.version());
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from(body)),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_call_to_an_http1_only_app_is_downgraded() {
    let mesh = Mesh::start(&[("services.yaml", SERVICES)]);
    let app = http1_only_app().await;
    let _server = mesh.proxy(&ProxySpec::app("echo-1", "echo", app));
    let client_proxy = mesh.proxy(&ProxySpec::client("client"));
    wait_ready(&client_proxy).await;
    // h2c with prior knowledge to the explicit proxy listener, then mTLS h2 between the
    // sidecars, then HTTP/1.1 to the app.
    let tcp = tokio::net::TcpStream::connect(client_proxy.addr("outbound"))
        .await
        .unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    for path in ["/a", "/b"] {
        let rsp = h2
            .send_request(
                http::Request::get(format!("http://echo.shop{path}"))
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(
            rsp.status(),
            200,
            "{:?}",
            rsp.headers().get("ferrymesh-error")
        );
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"HTTP/1.1 echo.shop");
    }
}
