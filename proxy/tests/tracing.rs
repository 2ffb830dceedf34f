//! Traces through real proxies to an in-test OTLP collector (the OpenTelemetry trace service
//! from the published protos): a request through three hops (client sidecar -> front's sidecar
//! -> front app -> front's sidecar -> back's sidecar -> back) yields one trace whose spans link
//! parent to child hop by hop: the client span, one child span per attempt, the server span of
//! the next proxy under the attempt that reached it, and the app's own call under that server
//! span. The back end fails once: the retry is an event with its reason on the client span.
//! Collector and sampling come from the controller.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use ferrymesh_test_support::mesh::yaml::{policy, service};
use ferrymesh_test_support::mesh::{Mesh, ProxySpec, client_proxy, eventually, proxied};
use ferrymesh_test_support::otlp::{Collector, Received};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Serves `answer` for every request on a fresh loopback port.
async fn app<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = answer.clone();
                    async move { Ok::<_, Infallible>(answer(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn status(code: u16) -> http::Response<Full<Bytes>> {
    let mut r = http::Response::new(Full::new(Bytes::from_static(b"ok")));
    *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
    r
}

fn hex(id: &[u8]) -> String {
    use std::fmt::Write as _;
    id.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_three_hops_is_one_trace_with_its_retry() {
    let collector = Collector::start().await;
    let files = service("front")
        + &service("back")
        + &policy(
            "back",
            "  retry: {attempts: 2, retryOn: [5xx], backoff: {base: 5ms, max: 10ms}}\n",
        );
    let endpoint = collector.endpoint();
    let mesh = Mesh::start_with(
        &[("shop.yaml", &files)],
        &["--otlp-endpoint", &endpoint, "--trace-sampling", "1"],
    );

    // back: fails its first request, then answers.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let back = app(move |_req| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move { status(if n == 0 { 503 } else { 200 }) }
    })
    .await;
    // front: calls back through its own sidecar, passing the trace context on (as apps do).
    let front_outbound: Arc<OnceLock<SocketAddr>> = Arc::new(OnceLock::new());
    let outbound = front_outbound.clone();
    let front = app(move |req| {
        let outbound = outbound.clone();
        async move {
            if req.uri().path() != "/page" {
                return status(200); // readiness checks and warm-ups stay here
            }
            let http = proxied(*outbound.get().unwrap());
            let mut call = http.get("http://back.shop/stock");
            for h in ["traceparent", "tracestate"] {
                if let Some(v) = req.headers().get(h) {
                    call = call.header(h, v.to_str().unwrap());
                }
            }
            status(call.send().await.map_or(502, |r| r.status().as_u16()))
        }
    })
    .await;
    let back_proxy = mesh.proxy(&ProxySpec::app("back-1", "back", back));
    let front_proxy = mesh.proxy(&ProxySpec::app("front-1", "front", front));
    front_outbound.set(front_proxy.addr("outbound")).unwrap();
    let client = client_proxy(&mesh, "front.shop", 1).await;

    // Every proxy exports to the collector the controller named.
    for proxy in [&client, &front_proxy, &back_proxy] {
        let admin = proxy.addr("admin");
        let expected = endpoint.clone();
        eventually(Duration::from_secs(10), || {
            let expected = expected.clone();
            async move {
                let dump = ferrymesh_test_support::mesh::get_json(admin, "/config_dump").await;
                dump["tracing"]["otlpEndpoint"] == expected.as_str()
                    && dump["tracing"]["sampling"] == 1.0
            }
        })
        .await
        .expect("tracing configured from the controller");
    }
    let rsp = proxied(client.addr("outbound"))
        .get("http://front.shop/page")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);

    // client (1) + its attempt (1) + front server (1) + front client (1) + its attempts (2)
    // + back servers (2).
    eventually(Duration::from_secs(10), || {
        let n = collector
            .spans()
            .iter()
            .filter(|s| s.span.name != "GET /healthz")
            .count();
        async move { n >= 8 }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", collector.spans()));
    check(collector.spans());
}

/// A call to a host outside the mesh (passthrough) is traced too: the client span, one attempt
/// under it, and the unmeshed server receives the attempt's context, so its own spans join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_call_has_its_attempt_span_and_passes_the_context_on() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let mesh = Mesh::start_with(
        &[("shop.yaml", &service("front"))],
        &["--otlp-endpoint", &endpoint, "--trace-sampling", "1"],
    );
    let received: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let got = received.clone();
    let outside = app(move |req| {
        if let Some(v) = req.headers().get("traceparent") {
            got.lock().unwrap().push(v.to_str().unwrap().to_owned());
        }
        async { status(200) }
    })
    .await;
    let client = mesh.proxy(&ProxySpec::client("client"));
    let admin = client.addr("admin");
    eventually(Duration::from_secs(10), || async move {
        let dump = ferrymesh_test_support::mesh::get_json(admin, "/config_dump").await;
        dump["tracing"]["sampling"] == 1.0
    })
    .await
    .expect("tracing configured from the controller");
    let rsp = proxied(client.addr("outbound"))
        .get(format!("http://{outside}/outside"))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);

    let name = format!("GET {outside}");
    eventually(Duration::from_secs(10), || {
        let n = collector
            .spans()
            .iter()
            .filter(|s| s.span.name == name || s.span.name == "attempt 1")
            .count();
        async move { n >= 2 }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", collector.spans()));
    let spans = collector.spans();
    let call = spans.iter().find(|s| s.span.name == name).unwrap();
    assert_eq!(
        call.attr("ferrymesh.service").as_deref(),
        Some("passthrough")
    );
    let attempt = spans.iter().find(|s| s.span.name == "attempt 1").unwrap();
    assert_eq!(attempt.span.parent_span_id, call.span.span_id);
    assert_eq!(attempt.span.trace_id, call.span.trace_id);
    assert_eq!(
        attempt.attr("network.peer.port").as_deref(),
        Some(outside.port().to_string().as_str())
    );
    // traceparent: 00-<trace id>-<parent span id>-<flags>
    let headers = received.lock().unwrap().clone();
    assert_eq!(
        headers,
        vec![format!(
            "00-{}-{}-01",
            hex(&call.span.trace_id),
            hex(&attempt.span.span_id)
        )]
    );
}

/// The links and events of the traced request's spans.
fn check(all: Vec<Received>) {
    print_summary(&all);
    let page = all
        .iter()
        .find(|s| s.span.name == "GET /page")
        .expect("the front server span");
    let trace = page.span.trace_id.clone();
    let spans: Vec<Received> = all
        .into_iter()
        .filter(|s| s.span.trace_id == trace)
        .collect();

    let find = |service: &str, name: &str| -> Vec<&Received> {
        spans
            .iter()
            .filter(|s| s.service == service && s.span.name.starts_with(name))
            .collect()
    };
    let one = |service: &str, name: &str| -> &Received {
        let v = find(service, name);
        assert_eq!(v.len(), 1, "{service} {name}: {spans:#?}");
        v[0]
    };
    let client_span = one("shop/client", "GET front.shop");
    assert!(
        client_span.span.parent_span_id.is_empty(),
        "the first proxy starts the trace"
    );
    assert_eq!(
        client_span.attr("http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(
        client_span.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    let client_attempt = one("shop/client", "attempt 1");
    assert_eq!(client_attempt.span.parent_span_id, client_span.span.span_id);

    let front_server = one("shop/front", "GET /page");
    assert_eq!(
        front_server.span.parent_span_id, client_attempt.span.span_id,
        "server under the attempt that reached it"
    );
    // The authorization decision, as an event of the server span.
    let authz = event(front_server, "authorization");
    assert!(authz.contains("authorization allowed (default)"), "{authz}");
    let front_client = one("shop/front", "GET back.shop");
    assert_eq!(
        front_client.span.parent_span_id, front_server.span.span_id,
        "the app's call under its server span"
    );
    let mut attempts = find("shop/front", "attempt ");
    attempts.sort_by_key(|s| s.span.name.clone());
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    assert!(
        attempts
            .iter()
            .all(|a| a.span.parent_span_id == front_client.span.span_id)
    );
    assert_eq!(
        attempts[0].attr("http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(
        attempts[1].attr("http.response.status_code").as_deref(),
        Some("200")
    );

    let back_servers = find("shop/back", "GET /stock");
    assert_eq!(back_servers.len(), 2, "{spans:#?}");
    let mut parents: Vec<String> = back_servers
        .iter()
        .map(|s| hex(&s.span.parent_span_id))
        .collect();
    let mut expected: Vec<String> = attempts.iter().map(|a| hex(&a.span.span_id)).collect();
    parents.sort();
    expected.sort();
    assert_eq!(
        parents, expected,
        "each back server span under the attempt that reached it"
    );

    // The retry and its reason, as an event of the client span.
    let retry = event(front_client, "retry");
    assert!(retry.contains("5xx"), "{retry}");
}

/// The attributes of a span's event by name, printed for matching.
fn event(r: &Received, name: &str) -> String {
    let e = r
        .span
        .events
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no {name} event on {:?}: {:#?}", r.span.name, r.span.events));
    format!("{:?}", e.attributes)
}

fn print_summary(all: &[Received]) {
    let summary: Vec<String> = all
        .iter()
        .map(|s| {
            format!(
                "{} {:?} trace={} span={} parent={}",
                s.service,
                s.span.name,
                hex(&s.span.trace_id),
                hex(&s.span.span_id),
                hex(&s.span.parent_span_id)
            )
        })
        .collect();
    eprintln!("SPANS:\n{}", summary.join("\n"));
}
