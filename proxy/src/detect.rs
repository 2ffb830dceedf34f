//! Protocol detection on a connection's first bytes: the HTTP/2 preface, an HTTP/1.x request
//! line, or anything else (opaque). The bytes read are replayed to whoever handles the
//! connection next through [`PrefixedIo`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest method token we wait for before deciding (`OPTIONS`, `CONNECT`, extensions).
const MAX_METHOD: usize = 16;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface (prior knowledge, h2c or gRPC).
    Http2,
    /// Anything else, or nothing within the timeout (server-speaks-first protocols).
    Opaque,
}

/// Reads just enough of `io` to decide, within `timeout`. Returns the bytes read.
///
/// # Errors
/// Reading fails.
pub async fn sniff<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> io::Result<(Detected, Bytes)> {
    let mut buf = BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = decide(&buf) {
            return Ok((d, buf.freeze()));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            // Silence until the deadline, or EOF: nothing says HTTP.
            Err(_) | Ok(Ok(0)) => return Ok((Detected::Opaque, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Reads the first bytes of `io` (within `timeout`) and says whether they open a TLS
/// handshake (a handshake record, 0x16). Returns the bytes read.
///
/// # Errors
/// Reading fails.
pub async fn tls<I: AsyncRead + Unpin>(io: &mut I, timeout: Duration) -> io::Result<(bool, Bytes)> {
    let mut buf = BytesMut::with_capacity(64);
    match tokio::time::timeout(timeout, io.read_buf(&mut buf)).await {
        Err(_) | Ok(Ok(0)) => Ok((false, buf.freeze())),
        Ok(Ok(_)) => Ok((buf[0] == 0x16, buf.freeze())),
        Ok(Err(e)) => Err(e),
    }
}

/// Decides from the bytes so far, `None` when more are needed (pure: the fuzz target `detect`
/// drives it with any bytes).
pub fn decide(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Detected::Http2)
        } else {
            None
        };
    }
    for (i, &b) in buf.iter().enumerate().take(MAX_METHOD + 1) {
        match b {
            b'A'..=b'Z' | b'-' | b'_' => {}
            b' ' if i > 0 => return Some(Detected::Http1),
            _ => return Some(Detected::Opaque),
        }
    }
    if buf.len() > MAX_METHOD {
        Some(Detected::Opaque)
    } else {
        None
    }
}

pin_project_lite::pin_project! {
    /// An IO that first yields `prefix`, then reads from `inner`; writes go to `inner`.
    #[derive(Debug)]
    pub struct PrefixedIo<I> {
        prefix: Bytes,
        #[pin]
        inner: I,
    }
}

impl<I> PrefixedIo<I> {
    /// Replays `prefix` before `inner`.
    pub fn new(prefix: Bytes, inner: I) -> Self {
        Self { prefix, inner }
    }
}

impl<I: AsyncRead> AsyncRead for PrefixedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for PrefixedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    #[test]
    fn decides_on_the_first_bytes() {
        assert_eq!(decide(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(decide(b"CONNECT a:1 HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(decide(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(decide(&H2_PREFACE[..10]), None);
        assert_eq!(decide(b"PRI * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(
            decide(b"\x16\x03\x01"),
            Some(Detected::Opaque),
            "TLS ClientHello"
        );
        assert_eq!(decide(b"GE"), None);
        assert_eq!(decide(b"ABCDEFGHIJKLMNOPQRS"), Some(Detected::Opaque));
        assert_eq!(decide(b" GET"), Some(Detected::Opaque));
    }

    #[tokio::test]
    async fn sniffed_bytes_are_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PING hello").await.unwrap();
        let (d, prefix) = sniff(&mut server, Duration::from_secs(1)).await.unwrap();
        assert_eq!(d, Detected::Http1);
        let mut io = PrefixedIo::new(prefix, server);
        drop(client);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"PING hello");
    }

    #[tokio::test(start_paused = true)]
    async fn silence_is_opaque() {
        let (_client, mut server) = tokio::io::duplex(64);
        let (d, prefix) = sniff(&mut server, Duration::from_secs(10)).await.unwrap();
        assert_eq!(d, Detected::Opaque);
        assert!(prefix.is_empty());
    }
}
