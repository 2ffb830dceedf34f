//! Client connections to endpoints (and, on the inbound side, to the app), pooled per address:
//! several HTTP/1.1 connections each carrying one request at a time, or one multiplexed HTTP/2
//! connection. hyper's own legacy client keys its pool by the request URI, which would put the
//! endpoint's address in `:authority`; with our own pool the caller's authority is kept as sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::http::Body;

/// Idle HTTP/1.1 connections kept per address.
const MAX_IDLE_H1: usize = 64;

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
    /// The HTTP exchange failed (reset, protocol error, closed mid-response).
    #[error("HTTP exchange with {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: hyper::Error,
    },
}

/// Pooled connections, by address.
#[derive(Debug, Default)]
pub struct Pool {
    h1: Mutex<HashMap<SocketAddr, Vec<http1::SendRequest<Body>>>>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
}

impl Pool {
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
        connect_timeout: Duration,
    ) -> Result<Response<Incoming>, PoolError> {
        match version {
            Version::Http1 => self.send_h1(addr, req, connect_timeout).await,
            Version::Http2 => self.send_h2(addr, req, connect_timeout).await,
        }
    }

    async fn send_h1(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, PoolError> {
        let mut req = req;
        if let Some(mut sender) = self.idle_h1(addr) {
            match sender.try_send_request(req).await {
                Ok(rsp) => {
                    self.put_h1(addr, sender);
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
        let io = connect(addr, timeout).await?;
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
        self.put_h1(addr, sender);
        Ok(rsp)
    }

    fn idle_h1(&self, addr: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut pools = self.h1.lock().expect("pool lock poisoned");
        let list = pools.get_mut(&addr)?;
        list.retain(|s| !s.is_closed());
        let i = list.iter().position(http1::SendRequest::is_ready)?;
        Some(list.swap_remove(i))
    }

    fn put_h1(&self, addr: SocketAddr, sender: http1::SendRequest<Body>) {
        let mut pools = self.h1.lock().expect("pool lock poisoned");
        let list = pools.entry(addr).or_default();
        if list.len() < MAX_IDLE_H1 {
            list.push(sender);
        }
    }

    async fn send_h2(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, PoolError> {
        let existing = {
            let pools = self.h2.lock().expect("pool lock poisoned");
            pools.get(&addr).filter(|s| !s.is_closed()).cloned()
        };
        let mut sender = if let Some(s) = existing {
            s
        } else {
            {
                let io = connect(addr, timeout).await?;
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
                    .insert(addr, sender.clone());
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
