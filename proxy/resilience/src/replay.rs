//! A request body that can be sent again. The first attempt streams the original body as it
//! arrives (nothing waits for the whole body, so streaming and bidi calls still work) while a
//! copy is kept, up to a cap (64 KiB by default, as Linkerd does). A later attempt replays the
//! copy and then, if the original is not finished, goes on reading it. Past the cap the copy is
//! dropped and the body can no longer be replayed: such requests are never retried.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// The default cap on the copy.
pub const MAX_BUFFERED_BYTES: usize = 64 * 1024;

#[derive(Debug)]
struct Shared<B> {
    /// The original body, while it is not finished.
    original: Option<B>,
    /// Data frames read so far (while replayable).
    copy: Vec<Bytes>,
    copied: usize,
    trailers: Option<HeaderMap>,
    /// The original ended.
    ended: bool,
    /// The copy passed the cap: no more replays.
    too_big: bool,
    cap: usize,
}

/// A request body as an attempt sends it: either the original passing straight through (a
/// request that is sent once: no copy, no lock), or one attempt's view of a replayable body
/// (take a [`ReplayBody::replay`] for each attempt, after the previous one is done with it).
#[derive(Debug)]
pub struct ReplayBody<B>(Kind<B>);

#[derive(Debug)]
enum Kind<B> {
    Once(B),
    Replay(View<B>),
}

impl<B> ReplayBody<B> {
    /// Wraps `body`, keeping a copy of at most `cap` bytes.
    pub fn new(body: B, cap: usize) -> Self {
        Self(Kind::Replay(View::new(body, cap)))
    }

    /// `body` for a request that is sent once: it passes through untouched.
    pub fn once(body: B) -> Self {
        Self(Kind::Once(body))
    }

    /// True while a new attempt can send the whole body again.
    pub fn is_replayable(&self) -> bool {
        match &self.0 {
            Kind::Once(_) => false,
            Kind::Replay(v) => v.is_replayable(),
        }
    }

    /// A fresh view for the next attempt, from the first byte.
    ///
    /// # Panics
    /// On a body made with [`ReplayBody::once`]: such a body is never sent twice.
    #[must_use]
    pub fn replay(&self) -> Self {
        match &self.0 {
            Kind::Once(_) => panic!("a body sent once cannot be replayed"),
            Kind::Replay(v) => Self(Kind::Replay(v.replay())),
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match &mut self.0 {
            Kind::Once(b) => Pin::new(b).poll_frame(cx),
            Kind::Replay(v) => Pin::new(v).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Once(b) => b.is_end_stream(),
            Kind::Replay(v) => v.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Once(b) => b.size_hint(),
            Kind::Replay(v) => v.size_hint(),
        }
    }
}

/// One attempt's view of a replayable body.
#[derive(Debug)]
struct View<B> {
    shared: Arc<Mutex<Shared<B>>>,
    /// Index of the next frame of `copy` this attempt sends.
    position: usize,
    /// Frames of the current copy slice not yet sent (a copy frame partly consumed).
    pending: VecDeque<Bytes>,
    done: bool,
}

impl<B> View<B> {
    fn new(body: B, cap: usize) -> Self {
        let shared = Shared {
            original: Some(body),
            copy: Vec::new(),
            copied: 0,
            trailers: None,
            ended: false,
            too_big: false,
            cap,
        };
        Self {
            shared: Arc::new(Mutex::new(shared)),
            position: 0,
            pending: VecDeque::new(),
            done: false,
        }
    }

    fn is_replayable(&self) -> bool {
        !self.shared.lock().expect("replay lock poisoned").too_big
    }

    /// NOTE: only one attempt may read at a time; the retry loop guarantees it.
    fn replay(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            position: 0,
            pending: VecDeque::new(),
            done: false,
        }
    }
}

impl<B> Body for View<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(chunk) = this.pending.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let mut shared = this.shared.lock().expect("replay lock poisoned");
        // First what earlier attempts already read.
        if this.position < shared.copy.len() {
            let chunk = shared.copy[this.position].clone();
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if shared.ended {
            this.done = true;
            return Poll::Ready(shared.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        }
        let Some(original) = shared.original.as_mut() else {
            this.done = true;
            return Poll::Ready(None);
        };
        match Pin::new(original).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.ended = true;
                shared.original = None;
                this.done = true;
                Poll::Ready(shared.trailers.clone().map(|t| Ok(Frame::trailers(t))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(mut data) => {
                        let data = data.copy_to_bytes(data.remaining());
                        if !shared.too_big {
                            shared.copied += data.len();
                            if shared.copied > shared.cap {
                                shared.too_big = true;
                                shared.copy.clear();
                            } else {
                                shared.copy.push(data.clone());
                                this.position = shared.copy.len();
                            }
                        }
                        Frame::data(data)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            shared.trailers = Some(trailers.clone());
                            Frame::trailers(trailers)
                        }
                        Err(other) => other,
                    },
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return true;
        }
        let shared = self.shared.lock().expect("replay lock poisoned");
        shared.ended
            && self.position >= shared.copy.len()
            && shared.trailers.is_none()
            && self.pending.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock().expect("replay lock poisoned");
        match &shared.original {
            // NOTE: on a replay, what was copied is sent again, then the rest of the original.
            Some(original) => {
                let copied: u64 = shared.copy[self.position.min(shared.copy.len())..]
                    .iter()
                    .map(|b| b.len() as u64)
                    .sum();
                let rest = original.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + copied);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + copied);
                }
                hint
            }
            None if shared.ended => {
                let left: u64 = shared.copy[self.position.min(shared.copy.len())..]
                    .iter()
                    .map(|b| b.len() as u64)
                    .sum();
                SizeHint::with_exact(left)
            }
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt as _, Full, StreamBody};

    use super::*;

    #[tokio::test]
    async fn a_small_body_is_sent_twice_whole() {
        let body = ReplayBody::new(Full::new(Bytes::from_static(b"hello")), MAX_BUFFERED_BYTES);
        let second = body.replay();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert!(second.is_replayable());
        assert_eq!(second.collect().await.unwrap().to_bytes(), "hello");
    }

    #[tokio::test]
    async fn an_unread_body_is_read_by_the_retry() {
        // The first attempt failed before sending anything (connect failure).
        let first = ReplayBody::new(Full::new(Bytes::from_static(b"hello")), MAX_BUFFERED_BYTES);
        let second = first.replay();
        drop(first);
        assert_eq!(second.collect().await.unwrap().to_bytes(), "hello");
    }

    #[tokio::test]
    async fn a_partly_read_body_is_replayed_then_continued() {
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"cd"))),
        ];
        let mut first = ReplayBody::new(
            StreamBody::new(tokio_stream::iter(chunks)),
            MAX_BUFFERED_BYTES,
        );
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        let second = first.replay();
        drop(first);
        assert_eq!(second.collect().await.unwrap().to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn past_the_cap_the_body_is_not_replayable() {
        let body = ReplayBody::new(Full::new(Bytes::from(vec![7u8; 100])), 64);
        let second = body.replay();
        assert_eq!(
            body.collect().await.unwrap().to_bytes().len(),
            100,
            "the first attempt gets it all"
        );
        assert!(!second.is_replayable());
    }

    #[tokio::test]
    async fn trailers_are_replayed() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = ReplayBody::new(
            StreamBody::new(tokio_stream::iter(frames)),
            MAX_BUFFERED_BYTES,
        );
        let second = body.replay();
        let first = body.collect().await.unwrap();
        assert_eq!(first.trailers().unwrap()["grpc-status"], "0");
        let again = second.collect().await.unwrap();
        assert_eq!(again.trailers().unwrap()["grpc-status"], "0");
    }
}
