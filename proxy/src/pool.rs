//! Client connections to endpoints (and, on the inbound side, to the app), pooled per address:
//! several HTTP/1.1 connections each carrying one request at a time, or one multiplexed HTTP/2
//! connection. hyper's own legacy client keys its pool by the request URI, which would put the
//! endpoint's address in `:authority`; with our own pool the caller's authority is kept as sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::http::Body;

/// Idle HTTP/1.1 connections kept per address.
const MAX_IDLE_H1: usize = 64;

/// How long an unused pooled connection is kept when no policy says (Istio, Kuma: 1h).
pub const DEFAULT_IDLE: Duration = Duration::from_hours(1);

/// `idle: 0s` ("no timeout"): ten years.
pub const NO_IDLE_TIMEOUT: Duration = Duration::from_hours(24 * 365 * 10);

/// How often idle connections are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Which HTTP version to speak to an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.1, one request per connection at a time.
    Http1,
    /// HTTP/2 prior knowledge (h2c), multiplexed.
    Http2,
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// TCP connect failed (refused, unreachable).
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// TCP connect took longer than the connect timeout.
    #[error("connecting to {addr}: timed out after {timeout:?}")]
    ConnectTimeout {
        /// The address.
        addr: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
    /// The TLS handshake failed (the peer's certificate, or ours, was refused).
    #[error("TLS with {addr}: {source}")]
    Tls {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The HTTP exchange failed (reset, protocol error, closed mid-response).
    #[error("HTTP exchange with {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: hyper::Error,
    },
}

/// Connection timeouts of one call.
#[derive(Debug, Clone, Copy)]
pub struct ConnTimeouts {
    /// TCP connect.
    pub connect: Duration,
    /// A connection unused for this long is closed.
    pub idle: Duration,
}

/// A pooled connection and when it expires unless used.
#[derive(Debug)]
struct Pooled<S> {
    sender: S,
    expires: Instant,
    idle: Duration,
    /// A TLS connection is not used past its certificates (ours or the peer's).
    valid_until: Option<Instant>,
}

impl<S> Pooled<S> {
    fn new(sender: S, idle: Duration, valid_until: Option<Instant>) -> Self {
        let mut p = Self {
            sender,
            expires: Instant::now(),
            idle,
            valid_until,
        };
        p.touch(Instant::now());
        p
    }

    /// Used at `now`: the idle clock restarts, the certificates' end stays.
    fn touch(&mut self, now: Instant) {
        let idle_end = now + self.idle;
        self.expires = self.valid_until.map_or(idle_end, |v| idle_end.min(v));
    }
}

/// Pooled connections, by address.
#[derive(Debug, Default)]
pub struct Pool {
    h1: Mutex<HashMap<Key, Vec<Pooled<http1::SendRequest<Body>>>>>,
    h2: Mutex<HashMap<Key, Pooled<http2::SendRequest<Body>>>>,
    /// Whether each local app speaks HTTP/2 (h2c), and since when it is known (asked again
    /// after a minute).
    speaks_h2: Mutex<HashMap<SocketAddr, (bool, Instant)>>,
    /// Outbound TLS handshakes, counted into the proxy's metrics.
    pub handshakes: crate::metrics::Handshakes,
}

/// Connections are pooled by address and by the peer identity they were verified for (none:
/// plaintext), so a TLS connection is never reused for another identity or for plaintext.
type Key = (SocketAddr, Option<Arc<str>>);

/// TLS to a meshed peer: the client config (our certificate, the peer's expected SPIFFE id).
#[derive(Debug, Clone)]
pub struct Tls {
    /// The config to connect with.
    pub config: Arc<rustls::ClientConfig>,
    /// The SPIFFE id the peer must present.
    pub identity: Arc<str>,
    /// When our own certificate expires.
    pub own_not_after: Option<std::time::SystemTime>,
}

impl Pool {
    /// A pool that counts its TLS handshakes into `handshakes`.
    pub fn counting(handshakes: crate::metrics::Handshakes) -> Pool {
        Pool {
            handshakes,
            ..Pool::default()
        }
    }
}

/// How long an app's answer to the HTTP/2 question is kept.
const PROTOCOL_PROBE_TTL: Duration = Duration::from_mins(1);

impl Pool {
    /// Whether the plaintext app at `addr` speaks HTTP/2 with prior knowledge (h2c): asked
    /// once a minute with a connection of its own that sends the HTTP/2 preface and SETTINGS.
    /// An HTTP/2 server answers with SETTINGS; an HTTP/1.1-only server answers `HTTP/1.1 4xx`
    /// or closes. When the app cannot be asked (no connection, no answer in time), the answer
    /// is yes, and the request goes as it came.
    pub async fn speaks_h2(&self, addr: SocketAddr) -> bool {
        if let Some((h2, since)) = self
            .speaks_h2
            .lock()
            .expect("pool lock poisoned")
            .get(&addr)
            && since.elapsed() < PROTOCOL_PROBE_TTL
        {
            return *h2;
        }
        // NOTE: two requests may both ask at the first call; the answer is the same.
        let h2 = !probe_h1_only(addr).await;
        if !h2 {
            tracing::info!(app = %addr, "the app speaks HTTP/1.1 only: HTTP/2 requests to it are downgraded");
        }
        self.speaks_h2
            .lock()
            .expect("pool lock poisoned")
            .insert(addr, (h2, Instant::now()));
        h2
    }

    /// Sends `req` to `addr`. For HTTP/1.1 the URI should be in origin form; for HTTP/2 it must
    /// carry a scheme and the authority to send as `:authority`.
    ///
    /// # Errors
    /// [`PoolError`] when connecting or the exchange fails.
    pub async fn send(
        &self,
        addr: SocketAddr,
        version: Version,
        req: Request<Body>,
        timeouts: ConnTimeouts,
        tls: Option<Tls>,
    ) -> Result<Response<Incoming>, PoolError> {
        match version {
            Version::Http1 => self.send_h1(addr, req, timeouts, tls).await,
            Version::Http2 => self.send_h2(addr, req, timeouts, tls).await,
        }
    }

    /// Keeps closing the connections left unused for longer than their idle timeout, for as
    /// long as the pool lives.
    pub fn start_sweeping(self: &std::sync::Arc<Self>) {
        let pool = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SWEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep(Instant::now());
            }
        });
    }

    /// Drops (and so closes) the connections that expired by `now`. An HTTP/2 connection with
    /// streams still open finishes them first.
    fn sweep(&self, now: Instant) {
        let mut closed = 0;
        {
            let mut pools = self.h1.lock().expect("pool lock poisoned");
            for list in pools.values_mut() {
                let before = list.len();
                list.retain(|p| p.expires > now && !p.sender.is_closed());
                closed += before - list.len();
            }
            pools.retain(|_, list| !list.is_empty());
        }
        {
            let mut pools = self.h2.lock().expect("pool lock poisoned");
            let before = pools.len();
            pools.retain(|_, p| p.expires > now && !p.sender.is_closed());
            closed += before - pools.len();
        }
        if closed > 0 {
            tracing::debug!(closed, "idle pooled connections closed");
        }
    }

    async fn send_h1(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
        timeouts: ConnTimeouts,
        tls: Option<Tls>,
    ) -> Result<Response<Incoming>, PoolError> {
        let mut req = req;
        let key: Key = (addr, tls.as_ref().map(|t| t.identity.clone()));
        if let Some((mut sender, valid_until)) = self.idle_h1(&key) {
            match sender.try_send_request(req).await {
                Ok(rsp) => {
                    self.put_h1(key, sender, timeouts.idle, valid_until);
                    return Ok(rsp);
                }
                // NOTE: a pooled connection the server closed while idle fails before the
                // request is written; hyper hands the request back, and it is safe to send it
                // once more on a fresh connection.
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => {
                        return Err(PoolError::Http {
                            addr,
                            source: e.into_error(),
                        });
                    }
                },
            }
        }
        let (io, valid_until) =
            connect_tls(addr, timeouts.connect, tls.as_ref(), &self.handshakes).await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|source| PoolError::Http { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "HTTP/1.1 client connection ended");
            }
        });
        let rsp = sender
            .send_request(req)
            .await
            .map_err(|source| PoolError::Http { addr, source })?;
        self.put_h1(key, sender, timeouts.idle, valid_until);
        Ok(rsp)
    }

    fn idle_h1(&self, key: &Key) -> Option<(http1::SendRequest<Body>, Option<Instant>)> {
        let now = Instant::now();
        let mut pools = self.h1.lock().expect("pool lock poisoned");
        let list = pools.get_mut(key)?;
        list.retain(|p| p.expires > now && !p.sender.is_closed());
        let i = list.iter().position(|p| p.sender.is_ready())?;
        let p = list.swap_remove(i);
        Some((p.sender, p.valid_until))
    }

    fn put_h1(
        &self,
        key: Key,
        sender: http1::SendRequest<Body>,
        idle: Duration,
        valid_until: Option<Instant>,
    ) {
        let mut pools = self.h1.lock().expect("pool lock poisoned");
        let list = pools.entry(key).or_default();
        if list.len() < MAX_IDLE_H1 {
            list.push(Pooled::new(sender, idle, valid_until));
        }
    }

    async fn send_h2(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
        timeouts: ConnTimeouts,
        tls: Option<Tls>,
    ) -> Result<Response<Incoming>, PoolError> {
        let key: Key = (addr, tls.as_ref().map(|t| t.identity.clone()));
        let existing = {
            let now = Instant::now();
            let mut pools = self.h2.lock().expect("pool lock poisoned");
            pools
                .get_mut(&key)
                .filter(|p| p.expires > now && !p.sender.is_closed())
                .map(|p| {
                    // NOTE: an HTTP/2 connection counts as used when a stream starts on it;
                    // the longest idle timeout asked for wins.
                    p.idle = p.idle.max(timeouts.idle);
                    p.touch(now);
                    p.sender.clone()
                })
        };
        let mut sender = if let Some(s) = existing {
            s
        } else {
            {
                let (io, valid_until) =
                    connect_tls(addr, timeouts.connect, tls.as_ref(), &self.handshakes).await?;
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .handshake(io)
                    .await
                    .map_err(|source| PoolError::Http { addr, source })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%addr, error = %e, "HTTP/2 client connection ended");
                    }
                });
                self.h2
                    .lock()
                    .expect("pool lock poisoned")
                    .insert(key, Pooled::new(sender.clone(), timeouts.idle, valid_until));
                sender
            }
        };
        sender
            .ready()
            .await
            .map_err(|source| PoolError::Http { addr, source })?;
        sender
            .send_request(req)
            .await
            .map_err(|source| PoolError::Http { addr, source })
    }
}

/// A connection to an endpoint: plaintext, or TLS to a meshed peer.
pub type EndpointIo =
    tokio_util::either::Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// Connects, with TLS when `tls` is set; the handshake counts in the connect timeout. Returns
/// the connection and, for TLS, when the first of the two certificates (ours, the peer's)
/// expires: the connection is not used past it.
///
/// # Errors
/// [`PoolError::Connect`], [`PoolError::ConnectTimeout`] or [`PoolError::Tls`].
pub async fn connect_tls(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&Tls>,
    handshakes: &crate::metrics::Handshakes,
) -> Result<(TokioIo<EndpointIo>, Option<Instant>), PoolError> {
    let started = Instant::now();
    let tcp = connect(addr, timeout).await?.into_inner();
    let Some(tls) = tls else {
        return Ok((TokioIo::new(tokio_util::either::Either::Left(tcp)), None));
    };
    // NOTE: the peer is checked by its SPIFFE id; the name below is neither sent (no SNI) nor
    // checked.
    let name = rustls::pki_types::ServerName::try_from("ferrymesh.peer").expect("a valid name");
    let left = timeout.saturating_sub(started.elapsed());
    let count = |result: &'static str| {
        handshakes
            .get_or_create(&crate::metrics::HandshakeLabels {
                direction: crate::metrics::Direction::outbound,
                result,
            })
            .inc();
    };
    let stream = tokio::time::timeout(
        left,
        tokio_rustls::TlsConnector::from(tls.config.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| {
        count("timeout");
        PoolError::ConnectTimeout { addr, timeout }
    })?
    .map_err(|source| {
        count("failed");
        PoolError::Tls { addr, source }
    })?;
    count("ok");
    let peer_end = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| crate::identity::not_after(leaf));
    let end = match (peer_end, tls.own_not_after) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let valid_until = end.map(|t| {
        Instant::now()
            + t.duration_since(std::time::SystemTime::now())
                .unwrap_or_default()
    });
    Ok((
        TokioIo::new(tokio_util::either::Either::Right(stream)),
        valid_until,
    ))
}

/// Opens a TCP connection with a timeout and no Nagle delay.
///
/// # Errors
/// [`PoolError::Connect`] or [`PoolError::ConnectTimeout`].
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TokioIo<TcpStream>, PoolError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| PoolError::ConnectTimeout { addr, timeout })?
        .map_err(|source| PoolError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    Ok(TokioIo::new(stream))
}

/// True when `addr` refuses HTTP/2 prior knowledge as an HTTP/1.1 server does.
async fn probe_h1_only(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let wait = Duration::from_secs(1);
    let Ok(Ok(mut tcp)) = tokio::time::timeout(wait, tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    if tcp.write_all(PREFACE).await.is_err() {
        return false;
    }
    let mut head = [0u8; 9];
    match tokio::time::timeout(wait, tcp.read(&mut head)).await {
        // An HTTP/1.x status line, or closed at once.
        Ok(Ok(n)) => n == 0 || head.starts_with(b"HTTP/"),
        _ => false,
    }
}
