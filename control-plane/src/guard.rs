//! Accepting connections on the controller's ports (Discovery, Identity, the webhook) so that
//! nobody who can reach them can exhaust the controller. A connection is handed to its server
//! only once it has finished its TLS handshake (or, in plaintext, sent its first bytes) within
//! [`Limits::handshake`]; until then it is held by a task of its own, never by the server.
//! Connections are capped per source address and in all, pending and established alike; one
//! over a cap is closed at once, and counted in
//! `ferrymesh_controller_connections_refused_total{port,reason}`. An accept error (out of file
//! descriptors) pauses the loop briefly instead of spinning on it.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics::Metrics;

/// The limits of one port.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a connection may take to finish its TLS handshake (or send its first bytes).
    pub handshake: Duration,
    /// Connections from one address at once (a node's proxies come from many pod addresses).
    pub per_source: usize,
    /// Connections at once, in all.
    pub total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self::with_handshake(Duration::from_secs(10))
    }
}

impl Limits {
    /// The default caps with this handshake timeout.
    pub fn with_handshake(handshake: Duration) -> Self {
        Self {
            handshake,
            per_source: 512,
            total: 16_384,
        }
    }
}

/// Open connections, per source and in all.
#[derive(Debug, Default)]
struct Counts {
    per_source: HashMap<IpAddr, usize>,
    total: usize,
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
struct Slot {
    counts: Arc<Mutex<Counts>>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("counts lock");
        c.total -= 1;
        if let Some(n) = c.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.per_source.remove(&self.source);
            }
        }
    }
}

/// A connection that holds its place under the limits while it lives.
#[derive(Debug)]
pub struct Guarded<IO> {
    io: IO,
    _slot: Slot,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Guarded<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Accepts on `listener` until `shutdown`, runs `handshake` on each connection within the
/// limits, and yields those that complete it in time: the stream a tonic or hyper server serves.
pub fn incoming<IO, H, F>(
    listener: TcpListener,
    port: &'static str,
    limits: Limits,
    metrics: Arc<Metrics>,
    handshake: H,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<Result<Guarded<IO>, std::io::Error>>
where
    IO: Send + 'static,
    H: Fn(TcpStream) -> F + Send + Sync + 'static,
    F: Future<Output = std::io::Result<IO>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(256);
    let counts = Arc::new(Mutex::new(Counts::default()));
    let handshake = Arc::new(handshake);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.wait_for(|s| *s) => return,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: the next accept fails the same way at once.
                    tracing::warn!(port, error = %e, "accept failed; pausing 50 ms");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let source = peer.ip();
            let slot = {
                let mut c = counts.lock().expect("counts lock");
                let from_source = c.per_source.get(&source).copied().unwrap_or(0);
                if c.total >= limits.total {
                    None.ok_or("total")
                } else if from_source >= limits.per_source {
                    None.ok_or("per-source")
                } else {
                    c.total += 1;
                    *c.per_source.entry(source).or_default() += 1;
                    Ok(Slot {
                        counts: counts.clone(),
                        source,
                    })
                }
            };
            let slot = match slot {
                Ok(s) => s,
                Err(reason) => {
                    metrics.connection_refused(port, reason);
                    drop(stream);
                    continue;
                }
            };
            let (tx, handshake, metrics) = (tx.clone(), handshake.clone(), metrics.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake, handshake(stream)).await {
                    Ok(Ok(io)) => {
                        let _ = tx.send(Ok(Guarded { io, _slot: slot })).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(port, %peer, error = %e, "handshake failed");
                        metrics.connection_refused(port, "handshake-failed");
                    }
                    Err(_) => metrics.connection_refused(port, "handshake-timeout"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The TLS handshake, as [`incoming`]'s handshake.
pub fn tls(
    acceptor: tokio_rustls::TlsAcceptor,
) -> impl Fn(
    TcpStream,
) -> Pin<
    Box<dyn Future<Output = std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>> + Send>,
> + Send
+ Sync
+ 'static {
    move |stream| {
        let acceptor = acceptor.clone();
        Box::pin(async move { acceptor.accept(stream).await })
    }
}

/// Plaintext: the connection is handed on once its first bytes have arrived (a silent
/// connection never reaches the server).
pub fn first_bytes(
    stream: TcpStream,
) -> Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>> {
    Box::pin(async move {
        let mut byte = [0u8; 1];
        if stream.peek(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(stream)
    })
}

/// Raises this process's open-file limit to its hard limit: every connection and watch is a
/// file descriptor, and the soft default (often 1024) is far below what a cluster needs.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "open-file limit raised"),
            Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
        }
    }
}
