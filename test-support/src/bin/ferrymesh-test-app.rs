//! `ferrymesh-test-app --instance NAME --listen ADDR...`: the app inside a network-namespace
//! pod. Answers every HTTP request with `{"instance", "path", "peer", "local"}` (who connected,
//! and to which address), and logs one line per request on stderr, so a test can prove which
//! way a request came in: from the pod's inbound proxy (peer 127.0.0.1) or straight from
//! another pod.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut instance = String::from("app");
    let mut listens = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--instance" => instance = args.next().unwrap_or_default(),
            "--listen" => listens.push(args.next().unwrap_or_default().parse::<SocketAddr>()?),
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let mut bound = Vec::new();
    for addr in listens {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        bound.push(listener.local_addr()?.to_string());
        let instance = instance.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let local = stream
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                let instance = instance.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let body = serde_json::json!({
                            "instance": instance,
                            "path": req.uri().path(),
                            "peer": peer.to_string(),
                            "local": local,
                        });
                        eprintln!(
                            "app {instance}: {} {} from {peer} to {local}",
                            req.method(),
                            req.uri().path()
                        );
                        async move {
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                                body.to_string(),
                            ))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    println!(
        "FERRYMESH_LISTENING {}",
        serde_json::json!({ "app": bound })
    );
    std::future::pending::<()>().await;
    Ok(())
}
