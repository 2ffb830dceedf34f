//! The load: an upstream that answers every request with 64 bytes, and two generators over
//! keep-alive HTTP/1.1 connections.
//!
//! - [`fixed_rate`]: an open model. Request `i` is due at `start + i / rate`; its latency is
//!   measured from that due time, not from when it was sent, so a stalled proxy cannot hide its
//!   queueing (no coordinated omission).
//! - [`max_throughput`]: a closed model, `concurrency` connections each sending as fast as
//!   answers come back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const BODY: &[u8; 64] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Starts the upstream on 127.0.0.1, port 0.
pub async fn upstream() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(BODY))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn one(sender: &mut SendRequest<Empty<Bytes>>) -> anyhow::Result<()> {
    sender.ready().await?;
    let req = http::Request::get("/ping")
        .header(http::header::HOST, "upstream.bench")
        .body(Empty::new())?;
    let rsp = sender.send_request(req).await?;
    let ok = rsp.status().is_success();
    let body = rsp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(ok && body.len() == BODY.len(), "bad answer");
    Ok(())
}

/// Result of a fixed-rate run.
#[derive(Debug)]
pub struct FixedRate {
    /// Latency from due time to full response, in microseconds.
    pub latency: Histogram<u64>,
    /// Requests that failed.
    pub errors: u64,
    /// Requests sent.
    pub sent: u64,
}

/// Sends `rate` requests per second for `duration` to `addr`.
pub async fn fixed_rate(
    addr: SocketAddr,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<FixedRate> {
    let idle: Arc<Mutex<Vec<SendRequest<Empty<Bytes>>>>> = Arc::default();
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let errors = Arc::new(Mutex::new(0u64));
    let interval = Duration::from_secs(1) / rate;
    let total = u64::from(rate) * duration.as_secs();
    let start = Instant::now() + Duration::from_millis(50);
    // NOTE: the schedule runs on its own thread with nanosleep: tokio's timer has a 1 ms
    // resolution, which would add up to 1 ms of lateness to every request of every variant.
    let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel();
    let scheduler = std::thread::spawn(move || {
        for i in 0..total {
            let due = start + interval * u32::try_from(i).expect("request counts fit in u32");
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if due_tx.send(due).is_err() {
                return;
            }
        }
    });
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(due) = due_rx.recv().await {
        let (idle, histogram, errors) = (idle.clone(), histogram.clone(), errors.clone());
        tasks.spawn(async move {
            let pooled = idle.lock().expect("pool lock").pop();
            let sender = match pooled {
                Some(s) => Ok(s),
                None => connect(addr).await,
            };
            let result = match sender {
                Ok(mut s) => one(&mut s).await.map(|()| s),
                Err(e) => Err(e),
            };
            let micros = u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
            match result {
                Ok(s) => {
                    histogram
                        .lock()
                        .expect("histogram lock")
                        .saturating_record(micros);
                    idle.lock().expect("pool lock").push(s);
                }
                Err(_) => *errors.lock().expect("errors lock") += 1,
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    let _ = scheduler.join();
    while tasks.join_next().await.is_some() {}
    let latency = histogram.lock().expect("histogram lock").clone();
    let errors = *errors.lock().expect("errors lock");
    Ok(FixedRate {
        latency,
        errors,
        sent: total,
    })
}

/// Sends as fast as possible on `concurrency` connections for `duration`; returns requests
/// completed per second and the number of errors.
pub async fn max_throughput(
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<(f64, u64)> {
    let deadline = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        tasks.spawn(async move {
            let (mut done, mut errors) = (0u64, 0u64);
            let mut sender = connect(addr).await?;
            while Instant::now() < deadline {
                if one(&mut sender).await.is_ok() {
                    done += 1;
                } else {
                    errors += 1;
                    sender = connect(addr).await?;
                }
            }
            Ok::<_, anyhow::Error>((done, errors))
        });
    }
    let (mut done, mut errors) = (0u64, 0u64);
    while let Some(r) = tasks.join_next().await {
        let (d, e) = r??;
        done += d;
        errors += e;
    }
    #[allow(clippy::cast_precision_loss)] // request counts are far below 2^52
    Ok((done as f64 / duration.as_secs_f64(), errors))
}
