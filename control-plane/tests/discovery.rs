//! The Discovery protocol against the real server (in-process, over loopback) with a tonic
//! client: node first, lazy subscriptions answered with the resource or `not_found`, deltas
//! with only what changed, `removed`, `initial_versions`, and NACKed versions never resent.

#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferrymesh_controller::grpc::DiscoveryService;
use ferrymesh_controller::index::IndexHandle;
use ferrymesh_controller::metrics::Metrics;
use ferrymesh_controller::sources::parse_documents;
use ferrymesh_proto::discovery::v1 as pb;
use ferrymesh_proto::google::rpc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n---\n\
                        apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n";

struct Server {
    index: IndexHandle,
    client: pb::discovery_client::DiscoveryClient<tonic::transport::Channel>,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

async fn server() -> Server {
    server_held(None).await
}

/// [`server`], holding endpoint sets reconnecting proxies hold until `release` turns true.
async fn server_held(release: Option<tokio::sync::watch::Receiver<bool>>) -> Server {
    let index = IndexHandle::new();
    let file = Path::new("services.yaml");
    index.apply_file(file, parse_documents(file, SERVICES));
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let mut service = DiscoveryService::new(index.clone(), Arc::new(Metrics::new()), rx);
    if let Some(release) = release {
        service = service.hold_endpoints_until(release);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = pb::discovery_client::DiscoveryClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Server {
        index,
        client,
        _shutdown: shutdown,
    }
}

struct Stream {
    tx: mpsc::Sender<pb::DiscoveryRequest>,
    rx: tonic::Streaming<pb::DiscoveryResponse>,
}

impl Stream {
    /// Announces `node`; a workload subscribes to its inbound policy, as proxies do (it is an
    /// endpoint only once that was sent), and the answer is taken here.
    async fn open(server: &mut Server, node: pb::Node) -> Stream {
        let (tx, rx) = mpsc::channel(16);
        let workload = node.local_workload.is_some();
        tx.send(pb::DiscoveryRequest {
            node: Some(node),
            ..Default::default()
        })
        .await
        .unwrap();
        let rx = server
            .client
            .stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut stream = Stream { tx, rx };
        if workload {
            stream
                .send(pb::DiscoveryRequest {
                    r#type: pb::ResourceType::InboundPolicy.into(),
                    subscribe: vec!["*".into()],
                    ..Default::default()
                })
                .await;
            let answer = stream.next().await;
            assert_eq!(answer.r#type, i32::from(pb::ResourceType::InboundPolicy));
        }
        stream
    }

    /// A stream of a proxy with no workload (a client only).
    async fn client(server: &mut Server, workload: &str) -> Stream {
        let node = pb::Node {
            workload: workload.into(),
            ..Default::default()
        };
        Self::open(server, node).await
    }

    async fn send(&self, req: pb::DiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn next(&mut self) -> pb::DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a response in time")
            .unwrap()
            .unwrap()
    }

    async fn nothing_for(&mut self, d: Duration) {
        if let Ok(m) = tokio::time::timeout(d, self.rx.message()).await {
            panic!("unexpected response: {m:?}");
        }
    }
}

fn subscribe(names: &[&str]) -> pb::DiscoveryRequest {
    pb::DiscoveryRequest {
        r#type: pb::ResourceType::Endpoints.into(),
        subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

fn workload(instance: &str, service: &str, port: u32) -> pb::Node {
    ferrymesh_test_support::nodes::local(instance, service, port, true)
}

fn ports(r: &pb::Resource) -> Vec<u32> {
    let Some(pb::resource::Body::Endpoints(e)) = &r.body else {
        panic!("not endpoints")
    };
    e.endpoints
        .iter()
        .map(|e| e.addr.as_ref().unwrap().port)
        .collect()
}

const A: &str = "a.shop.svc.cluster.local:80";
const B: &str = "b.shop.svc.cluster.local:80";

#[tokio::test]
async fn the_first_request_must_carry_the_node() {
    let mut server = server().await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(subscribe(&[A])).await.unwrap();
    let mut responses = server
        .client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let status = responses.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn subscriptions_get_the_resource_or_not_found_then_only_deltas() {
    let mut server = server().await;
    let mut s = Stream::client(&mut server, "shop/client").await;
    s.send(subscribe(&[A, "nope.shop.svc.cluster.local:80"]))
        .await;
    let first = s.next().await;
    assert_eq!(first.resources.len(), 1);
    assert_eq!(first.resources[0].name, A);
    assert!(ports(&first.resources[0]).is_empty());
    assert_eq!(first.not_found, ["nope.shop.svc.cluster.local:80"]);
    s.send(pb::DiscoveryRequest {
        r#type: first.r#type,
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await;

    // A workload of `b` registers: nothing is pushed for `a`.
    let mut b1 = Stream::open(&mut server, workload("b-1", "b", 7001)).await;
    s.nothing_for(Duration::from_millis(300)).await;
    // A workload of `a` registers: only `a` is pushed, with the new endpoint.
    let _a1 = Stream::open(&mut server, workload("a-1", "a", 7002)).await;
    let delta = s.next().await;
    assert_eq!(delta.resources.len(), 1);
    assert_eq!(ports(&delta.resources[0]), [7002]);
    assert_ne!(delta.resources[0].version, first.resources[0].version);
    assert_ne!(delta.nonce, first.nonce);

    // Subscribing `b` later (lazily) answers at once.
    s.send(subscribe(&[B])).await;
    let b = s.next().await;
    assert_eq!(ports(&b.resources[0]), [7001]);
    // The b-1 stream ends: b-1 leaves the endpoints at once.
    b1.tx = mpsc::channel(1).0;
    drop(b1);
    let gone = s.next().await;
    assert_eq!(gone.resources[0].name, B);
    assert!(ports(&gone.resources[0]).is_empty());

    // The Services are deleted: `b` (no workload left) is removed; `a` stays as an implicit
    // service of its registered workload, now built from no Service object.
    server.index.remove_file(Path::new("services.yaml"));
    let mut changed = s.next().await;
    if changed.removed.is_empty() || changed.resources.is_empty() {
        let more = s.next().await; // the two may come in one response or two
        changed.removed.extend(more.removed);
        changed.resources.extend(more.resources);
    }
    assert_eq!(changed.removed, [B]);
    assert_eq!(changed.resources.len(), 1);
    assert_eq!(ports(&changed.resources[0]), [7002]);
    assert!(
        changed.resources[0].sources.is_empty(),
        "{:?}",
        changed.resources[0].sources
    );
}

#[tokio::test]
async fn initial_versions_resend_nothing_unchanged_but_still_answer() {
    let mut server = server().await;
    let mut s = Stream::client(&mut server, "shop/c").await;
    s.send(subscribe(&[A])).await;
    let version = s.next().await.resources[0].version.clone();

    // Reconnect with the version held: the answer is empty (the proxy's "synced" signal).
    let mut again = Stream::client(&mut server, "shop/c").await;
    let mut req = subscribe(&[A]);
    req.initial_versions.insert(A.to_owned(), version);
    again.send(req).await;
    let answer = again.next().await;
    assert!(
        answer.resources.is_empty() && answer.not_found.is_empty() && answer.removed.is_empty(),
        "{answer:?}"
    );

    // With a stale version, the current one is sent.
    let mut stale = Stream::client(&mut server, "shop/c").await;
    let mut req = subscribe(&[A]);
    req.initial_versions
        .insert(A.to_owned(), "stale".to_owned());
    stale.send(req).await;
    assert_eq!(stale.next().await.resources.len(), 1);
}

#[tokio::test]
async fn a_nacked_version_is_never_resent_but_a_newer_one_is() {
    let mut server = server().await;
    let mut s = Stream::client(&mut server, "shop/c").await;
    s.send(subscribe(&[A, B])).await;
    let _ = s.next().await;
    let _a1 = Stream::open(&mut server, workload("a-1", "a", 7002)).await;
    let pushed = s.next().await;
    let bad_version = pushed.resources[0].version.clone();
    s.send(pb::DiscoveryRequest {
        r#type: pushed.r#type,
        response_nonce: pushed.nonce.clone(),
        error_detail: Some(rpc::Status {
            code: 3,
            message: "rejected".into(),
            details: vec![],
        }),
        rejected: vec![pb::Rejection {
            name: A.into(),
            version: bad_version.clone(),
            reason: "test".into(),
        }],
        ..Default::default()
    })
    .await;
    // A change elsewhere pushes `b` only: the NACKed version of `a` is not sent again.
    let _b1 = Stream::open(&mut server, workload("b-1", "b", 7001)).await;
    let next = s.next().await;
    assert_eq!(
        next.resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        [B]
    );
    // A newer version of `a` is sent.
    let _a2 = Stream::open(&mut server, workload("a-2", "a", 7003)).await;
    let newer = s.next().await;
    assert_eq!(newer.resources[0].name, A);
    assert_ne!(newer.resources[0].version, bad_version);
    assert_eq!(ports(&newer.resources[0]), [7002, 7003]);
}

#[tokio::test]
async fn fetch_answers_a_snapshot() {
    let mut server = server().await;
    let rsp = server
        .client
        .fetch(pb::FetchRequest {
            r#type: pb::ResourceType::Endpoints.into(),
            names: vec![A.into(), "x.shop:80".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rsp.resources.len(), 1);
    assert_eq!(rsp.not_found, ["x.shop:80"]);
    let err = server
        .client
        .fetch(pb::FetchRequest {
            r#type: 0,
            names: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

/// Whether each endpoint of an ENDPOINTS resource is ready, by port.
fn readiness(r: &pb::Resource) -> Vec<(u32, bool)> {
    let Some(pb::resource::Body::Endpoints(e)) = &r.body else {
        panic!("not endpoints")
    };
    e.endpoints
        .iter()
        .map(|e| (e.addr.as_ref().unwrap().port, e.ready))
        .collect()
}

#[tokio::test]
async fn a_workload_takes_traffic_only_once_sent_its_inbound_policy() {
    let mut server = server().await;
    let mut s = Stream::client(&mut server, "shop/client").await;
    s.send(subscribe(&[A])).await;
    assert!(ports(&s.next().await.resources[0]).is_empty());
    // Announced ready, but its proxy has no inbound policy yet: not an endpoint.
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::DiscoveryRequest {
        node: Some(workload("a-1", "a", 7002)),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut a1 = server
        .client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    s.nothing_for(Duration::from_millis(300)).await;
    // Its inbound policy sent: ready.
    tx.send(pb::DiscoveryRequest {
        r#type: pb::ResourceType::InboundPolicy.into(),
        subscribe: vec!["*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let policy = a1.message().await.unwrap().unwrap();
    assert_eq!(policy.r#type, i32::from(pb::ResourceType::InboundPolicy));
    let ready = s.next().await;
    assert_eq!(readiness(&ready.resources[0]), [(7002, true)]);
}

#[tokio::test]
async fn after_a_restart_a_held_endpoint_set_is_kept_until_release() {
    // A restarted controller does not yet know every workload: a reconnecting proxy keeps the
    // set it holds until the sources have synced and registrations had their grace.
    let (release, held) = tokio::sync::watch::channel(false);
    let mut server = server_held(Some(held)).await;
    let mut s = Stream::client(&mut server, "shop/c").await;
    let mut req = subscribe(&[A]);
    req.initial_versions
        .insert(A.to_owned(), "from-before-the-restart".to_owned());
    s.send(req).await;
    let answer = s.next().await;
    assert!(answer.resources.is_empty(), "held: {answer:?}");
    // A new proxy (nothing held) gets the current set at once.
    let mut fresh = Stream::client(&mut server, "shop/d").await;
    fresh.send(subscribe(&[A])).await;
    assert_eq!(fresh.next().await.resources.len(), 1);
    // Released: the current set replaces the held one.
    release.send(true).unwrap();
    let answer = s.next().await;
    assert_eq!(answer.resources.len(), 1, "{answer:?}");
    assert_eq!(answer.resources[0].name, A);
}

#[tokio::test]
async fn an_oversized_message_ends_the_stream_with_resource_exhausted() {
    let mut server = server().await;
    let mut s = Stream::client(&mut server, "shop/c").await;
    s.send(subscribe(&[&"x".repeat(5 * 1024 * 1024)])).await;
    let status = tokio::time::timeout(Duration::from_secs(5), s.rx.message())
        .await
        .expect("an answer in time")
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
}
