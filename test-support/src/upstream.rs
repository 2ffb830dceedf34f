//! In-process apps for tests, on 127.0.0.1 port 0.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;

use crate::echo_pb::{self, EchoReply, EchoRequest};

/// An HTTP server (HTTP/1.1 and h2c on one port) that describes every request it gets:
/// `{"instance", "method", "path", "version", "authority", "body"}`. `/status/<code>` answers
/// with that status. Stops when dropped.
#[derive(Debug)]
pub struct HttpEcho {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its name, in every answer and the `x-instance` header.
    pub instance: String,
    /// Requests served.
    pub hits: Arc<AtomicUsize>,
    /// Connections accepted.
    pub conns: Arc<AtomicUsize>,
    /// Connections the client closed.
    pub closed: Arc<AtomicUsize>,
    /// While true, every answer is 503.
    pub failing: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl HttpEcho {
    /// Starts one.
    ///
    /// # Panics
    /// When 127.0.0.1:0 cannot be bound.
    pub async fn start(instance: &str) -> HttpEcho {
        Self::start_on("127.0.0.1:0".parse().expect("valid"), instance).await
    }

    /// Starts one on a given address (to bring an instance back on the same port).
    ///
    /// # Panics
    /// When the address cannot be bound.
    pub async fn start_on(addr: SocketAddr, instance: &str) -> HttpEcho {
        let listener = TcpListener::bind(addr)
            .await
            .expect("binding the echo server");
        let addr = listener.local_addr().expect("bound");
        let hits = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(AtomicUsize::new(0));
        let accepted = conns.clone();
        let closed = Arc::new(AtomicUsize::new(0));
        let ended = closed.clone();
        let name: Arc<str> = instance.into();
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (h, n, f) = (hits.clone(), name.clone(), failing.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (h, n, f, ended) = (h.clone(), n.clone(), f.clone(), ended.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (h, n, f) = (h.clone(), n.clone(), f.clone());
                        async move { Ok::<_, Infallible>(on_the_wire(echo(req, &n, &h, &f).await)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        HttpEcho {
            addr,
            instance: instance.to_owned(),
            hits,
            conns,
            closed,
            failing,
            task,
        }
    }
}

impl Drop for HttpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(
    req: Request<Incoming>,
    instance: &str,
    hits: &AtomicUsize,
    failing: &std::sync::atomic::AtomicBool,
) -> Response<Full<Bytes>> {
    hits.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let authority = parts.uri.authority().map(ToString::to_string).or_else(|| {
        parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    });
    let status = parts
        .uri
        .path()
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    if let Some(ms) = parts
        .uri
        .path()
        .strip_prefix("/slow/")
        .and_then(|m| m.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let doc = serde_json::json!({
        "instance": instance,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(ToString::to_string),
        "version": format!("{:?}", parts.version),
        "authority": authority,
        "body": String::from_utf8_lossy(&body),
        "headers": parts.headers.iter().map(|(k, v)| (k.as_str().to_owned(), serde_json::Value::from(v.to_str().unwrap_or("")))).collect::<serde_json::Map<_, _>>(),
    });
    let path = parts.uri.path();
    let mut rsp = Response::builder()
        .status(status)
        .header("x-instance", instance)
        .header("content-type", "application/json");
    // Cache tests: `/cc/<cache-control>`, `/vary/<cache-control>` (Vary: accept-encoding),
    // `/modified/<cache-control>` (Last-Modified; a matching If-Modified-Since gets 304, Age: 3600),
    // `/chunked/<cache-control>` (the body in chunks, no length),
    // `/etag/<cache-control>` (ETag "v1"; If-None-Match "v1" gets 304) and `/aged/<cache-control>`;
    // the last two answer with Age: 3600, so a max-age below it arrives already stale and no
    // test has to wait for time to pass.
    for (prefix, vary, etag) in [
        ("/cc/", false, false),
        ("/badage/", false, false),
        ("/vary/", true, false),
        ("/etag/", false, true),
        ("/aged/", false, false),
        ("/modified/", false, false),
        ("/chunked/", false, false),
    ] {
        if let Some(cc) = path.strip_prefix(prefix) {
            rsp = rsp.header("cache-control", cc);
            if prefix == "/aged/" || prefix == "/etag/" || prefix == "/modified/" {
                rsp = rsp.header("age", "3600");
            }
            if prefix == "/badage/" {
                // A list where RFC 9111 5.1 wants one number: the first member counts.
                rsp = rsp.header("age", "7200, 0");
            }
            if prefix == "/chunked/" {
                rsp = rsp.header(CHUNKED, "1");
            }
            if prefix == "/modified/" {
                rsp = rsp.header("last-modified", LAST_MODIFIED);
                if parts
                    .headers
                    .get("if-modified-since")
                    .is_some_and(|v| v == LAST_MODIFIED)
                {
                    return rsp
                        .status(StatusCode::NOT_MODIFIED)
                        .body(Full::new(Bytes::new()))
                        .expect("a valid response");
                }
            }
            if vary {
                rsp = rsp.header("vary", "accept-encoding");
            }
            if etag {
                rsp = rsp.header("etag", "\"v1\"");
                if parts
                    .headers
                    .get("if-none-match")
                    .is_some_and(|v| v == "\"v1\"")
                {
                    return rsp
                        .status(StatusCode::NOT_MODIFIED)
                        .body(Full::new(Bytes::new()))
                        .expect("a valid response");
                }
            }
        }
    }
    if failing.load(Ordering::SeqCst) {
        rsp = rsp.status(StatusCode::SERVICE_UNAVAILABLE);
    }
    ranged(rsp, &parts.headers, Bytes::from(doc.to_string()))
}

/// `Range: bytes=a-b`: 206 with those bytes (RFC 9110 14); otherwise the whole body.
fn ranged(
    rsp: http::response::Builder,
    request: &http::HeaderMap,
    body: Bytes,
) -> Response<Full<Bytes>> {
    if let Some((a, b)) = request
        .get(http::header::RANGE)
        .and_then(|r| r.to_str().ok()?.strip_prefix("bytes=")?.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .filter(|(a, b)| a <= b && *b < body.len())
    {
        return rsp
            .status(StatusCode::PARTIAL_CONTENT)
            .header("content-range", format!("bytes {a}-{b}/{}", body.len()))
            .body(Full::new(body.slice(a..=b)))
            .expect("a valid response");
    }
    rsp.body(Full::new(body)).expect("a valid response")
}

/// A TCP server on loopback that sends back every byte it gets (no HTTP), for opaque-TCP
/// tests; it runs until the test's runtime ends.
///
/// # Panics
/// When 127.0.0.1:0 cannot be bound.
pub async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the TCP echo server");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// The `Last-Modified` of `/modified/` answers.
const LAST_MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";

/// An internal marker: send this answer's body in chunks, with no length.
const CHUNKED: &str = "x-echo-chunked";

type EchoBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The answer as sent: in two chunks with no length when it carries the [`CHUNKED`] marker.
fn on_the_wire(rsp: Response<Full<Bytes>>) -> Response<EchoBody> {
    let (mut parts, body) = rsp.into_parts();
    if parts.headers.remove(CHUNKED).is_none() {
        return Response::from_parts(parts, body.boxed());
    }
    let whole = futures::executor::block_on(body.collect())
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let half = whole.len() / 2;
    let frames = [whole.slice(..half), whole.slice(half..)]
        .into_iter()
        .map(|b| Ok::<_, Infallible>(hyper::body::Frame::data(b)));
    let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
    Response::from_parts(parts, body.boxed())
}

/// The test gRPC service, answering as `instance`.
#[derive(Debug, Clone)]
pub struct GrpcEcho {
    instance: String,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl echo_pb::echo_server::Echo for GrpcEcho {
    type ServerStreamStream = ReplyStream;
    type ChatStream = ReplyStream;

    async fn unary(
        &self,
        req: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let r = req.into_inner();
        if r.message == "fail" {
            return Err(tonic::Status::unavailable("asked to fail"));
        }
        Ok(tonic::Response::new(EchoReply {
            message: r.message,
            instance: self.instance.clone(),
            index: 0,
        }))
    }

    async fn server_stream(
        &self,
        req: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let r = req.into_inner();
        let instance = self.instance.clone();
        let replies = (0..r.count).map(move |i| {
            Ok(EchoReply {
                message: r.message.clone(),
                instance: instance.clone(),
                index: i,
            })
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(replies))))
    }

    async fn chat(
        &self,
        req: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let instance = self.instance.clone();
        let mut index = 0;
        let replies = req.into_inner().map(move |m| {
            index += 1;
            m.map(|m| EchoReply {
                message: m.message,
                instance: instance.clone(),
                index,
            })
        });
        Ok(tonic::Response::new(Box::pin(replies)))
    }
}

/// A running gRPC echo server with the standard health service; stops when dropped.
pub struct GrpcServer {
    /// Where it listens.
    pub addr: SocketAddr,
    health: tonic_health::server::HealthReporter,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl GrpcServer {
    /// Starts one on 127.0.0.1, port 0.
    ///
    /// # Panics
    /// When it cannot bind.
    pub async fn start(instance: &str) -> GrpcServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the gRPC echo server");
        let addr = listener.local_addr().expect("bound");
        let service = echo_pb::echo_server::EchoServer::new(GrpcEcho {
            instance: instance.to_owned(),
        });
        let (health, health_service) = tonic_health::server::health_reporter();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        GrpcServer { addr, health, task }
    }

    /// Sets what `grpc.health.v1.Health/Check` answers for the whole server ("").
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.health.set_service_status("", status).await;
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
