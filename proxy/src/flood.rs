//! HTTP/2 flood limits on every server connection, for the control-frame attacks of the 2019
//! HTTP/2 DoS list that hyper does not bound itself (ping flood, CVE-2019-9512; settings flood,
//! 9515; priority churn, 9513; empty frames, 9518; reset floods are hyper's
//! `max_pending_accept_reset_streams`). The connection's bytes are read frame by frame, headers
//! only, in both directions: inbound PING and SETTINGS without ACK and PRIORITY count as control
//! frames, DATA, HEADERS and CONTINUATION with an empty payload that end nothing count as empty
//! frames, each over a sliding [`Limits::window`]. Past a limit the proxy finishes the frame it is
//! writing, sends GOAWAY with ENHANCE_YOUR_CALM, and closes: what was read past the limit never
//! reaches the HTTP/2 server.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How much a client may send of each.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// PING and SETTINGS (not ACKs) and PRIORITY frames per window.
    pub control: u32,
    /// Frames with an empty payload that end nothing, per window.
    pub empty: u32,
    /// The window.
    pub window: Duration,
}

impl Default for Limits {
    /// Far above what a client needs (a gRPC keepalive pings every few seconds), far below a
    /// flood: 1,000 control frames and 100 empty frames per 10 s.
    fn default() -> Self {
        Self {
            control: 1_000,
            empty: 100,
            window: Duration::from_secs(10),
        }
    }
}

const PREFACE_LEN: usize = 24;
const HEADER_LEN: usize = 9;
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const PRIORITY: u8 = 2;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const CONTINUATION: u8 = 9;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// RFC 9113 7.
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Where a byte stream of frames stands.
#[derive(Debug, Default)]
struct Frames {
    skip: usize,
    header: [u8; HEADER_LEN],
    have: usize,
    payload_left: usize,
}

impl Frames {
    /// Bytes until the end of the current frame (0 at a boundary).
    fn to_boundary(&self) -> usize {
        if self.have == 0 && self.payload_left == 0 && self.skip == 0 {
            0
        } else {
            self.skip + (HEADER_LEN - self.have) % HEADER_LEN + self.payload_left
        }
    }

    /// Walks `bytes`; calls `on_header` for each complete frame header.
    fn walk(&mut self, mut bytes: &[u8], mut on_header: impl FnMut(&[u8; HEADER_LEN])) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (HEADER_LEN - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == HEADER_LEN {
                    self.have = 0;
                    self.payload_left = (usize::from(self.header[0]) << 16)
                        | (usize::from(self.header[1]) << 8)
                        | usize::from(self.header[2]);
                    on_header(&self.header);
                }
            }
        }
    }
}

/// A server-side HTTP/2 connection under flood limits.
#[derive(Debug)]
pub struct FloodGuard<IO> {
    io: IO,
    limits: Limits,
    inbound: Frames,
    outbound: Frames,
    since: Instant,
    control: u32,
    empty: u32,
    last_stream: u32,
    /// Set once over a limit: the GOAWAY and how much of it is written.
    goaway: Option<([u8; 17], usize)>,
    reader: Option<Waker>,
}

impl<IO> FloodGuard<IO> {
    /// Guards `io`, whose first bytes are the client's connection preface.
    pub fn new(io: IO, limits: Limits) -> Self {
        Self {
            io,
            limits,
            inbound: Frames {
                skip: PREFACE_LEN,
                ..Frames::default()
            },
            outbound: Frames::default(),
            since: Instant::now(),
            control: 0,
            empty: 0,
            last_stream: 0,
            goaway: None,
            reader: None,
        }
    }

    /// Counts the inbound bytes just read; true when a limit was passed.
    fn inspect(&mut self, bytes: &[u8]) -> bool {
        let now = Instant::now();
        if now.duration_since(self.since) > self.limits.window {
            self.since = now;
            self.control = 0;
            self.empty = 0;
        }
        let (mut control, mut empty, mut last) = (0u32, 0u32, self.last_stream);
        self.inbound.walk(bytes, |h| {
            let len = (u32::from(h[0]) << 16) | (u32::from(h[1]) << 8) | u32::from(h[2]);
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            match kind {
                PING | SETTINGS if flags & ACK == 0 => control += 1,
                PRIORITY => control += 1,
                DATA if len == 0 && flags & END_STREAM == 0 => empty += 1,
                HEADERS | CONTINUATION if len == 0 && flags & (END_STREAM | END_HEADERS) == 0 => {
                    empty += 1;
                }
                _ => {}
            }
            if kind == HEADERS {
                last = last.max(stream);
            }
        });
        self.last_stream = last;
        self.control = self.control.saturating_add(control);
        self.empty = self.empty.saturating_add(empty);
        self.control > self.limits.control || self.empty > self.limits.empty
    }

    fn trip(&mut self) {
        if self.goaway.is_some() {
            return;
        }
        tracing::warn!(
            control = self.control,
            empty = self.empty,
            "HTTP/2 flood: closing the connection with ENHANCE_YOUR_CALM"
        );
        let mut frame = [0u8; 17];
        // Length 8, type GOAWAY (7), no flags, stream 0; last stream id; error code.
        frame[2] = 8;
        frame[3] = 7;
        frame[9..13].copy_from_slice(&self.last_stream.to_be_bytes());
        frame[13..17].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        self.goaway = Some((frame, 0));
    }
}

impl<IO: AsyncWrite + Unpin> FloodGuard<IO> {
    /// Writes the GOAWAY once the server's own output is at a frame boundary; ready when it
    /// is all written and flushed.
    fn drive_goaway(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let Some((frame, sent)) = self.goaway.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        if self.outbound.to_boundary() > 0 {
            // The server is mid-frame: its next writes finish it first.
            return Poll::Pending;
        }
        while *sent < frame.len() {
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &frame[*sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            *sent += n;
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for FloodGuard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.goaway.is_none() {
            let before = buf.filled().len();
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            if !this.inspect(&buf.filled()[before..]) {
                return Poll::Ready(Ok(()));
            }
            // Nothing past the limit reaches the server.
            buf.set_filled(before);
            this.trip();
        }
        this.reader = Some(cx.waker().clone());
        match this.drive_goaway(cx) {
            // Sent: the connection ends here for the server.
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FloodGuard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let mut buf = buf;
        if this.goaway.is_some() {
            let left = this.outbound.to_boundary();
            if left == 0 {
                let done = std::task::ready!(this.drive_goaway(cx));
                if let Some(w) = this.reader.take() {
                    w.wake();
                }
                done?;
                return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            // Only up to the end of the frame under way.
            buf = &buf[..left.min(buf.len())];
        }
        let n = std::task::ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.outbound.walk(&buf[..n], |_| {});
        if this.goaway.is_some()
            && this.outbound.to_boundary() == 0
            && let Some(w) = this.reader.take()
        {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap();
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    #[tokio::test]
    async fn a_ping_flood_gets_goaway_enhance_your_calm_and_nothing_past_the_limit() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let limits = Limits {
            control: 10,
            ..Limits::default()
        };
        let mut guarded = FloodGuard::new(server, limits);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let mut sent = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        sent.extend(frame(SETTINGS, 0, 0, &[]));
        for _ in 0..50 {
            sent.extend(frame(PING, 0, 0, &[0; 8]));
        }
        client_write.write_all(&sent).await.unwrap();
        // The server writes a frame of its own meanwhile (its SETTINGS).
        guarded
            .write_all(&frame(SETTINGS, 0, 0, &[]))
            .await
            .unwrap();
        let mut read: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = guarded.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            read.extend(&chunk[..n]);
        }
        // The preface, SETTINGS and at most the 10 allowed PINGs (in whole reads) reached the
        // server; the rest did not.
        assert!(read.len() < sent.len(), "{} of {}", read.len(), sent.len());
        // The client got the server's SETTINGS, then GOAWAY(ENHANCE_YOUR_CALM).
        let mut answer = vec![0u8; 9 + 17];
        client_read.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer[9 + 3], 7, "a GOAWAY frame");
        assert_eq!(&answer[9 + 13..], &ENHANCE_YOUR_CALM.to_be_bytes());
        // Nothing more is written after it.
        assert!(guarded.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn normal_traffic_passes_untouched() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let mut guarded = FloodGuard::new(server, Limits::default());
        let (_, mut client_write) = tokio::io::split(client);
        let mut sent = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        sent.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
        sent.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &[0x82, 0x86, 0x84],
        ));
        for _ in 0..5 {
            sent.extend(frame(PING, 0, 0, &[1; 8]));
            sent.extend(frame(PING, ACK, 0, &[1; 8]));
        }
        client_write.write_all(&sent).await.unwrap();
        drop(client_write);
        let mut read = vec![0u8; sent.len()];
        guarded.read_exact(&mut read).await.unwrap();
        assert_eq!(read, sent);
    }
}
