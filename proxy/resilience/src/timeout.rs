//! Request timeout: the call fails with [`TimeoutError::Elapsed`] when the inner service has not
//! answered within the duration. Unlike `tower::timeout`, the duration is optional (`None`: no
//! deadline, as a policy's `0s` means) and the error says how long was allowed, so the proxy can
//! report it (`ferrymesh-error: timeout`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;

/// Why a call through [`Timeout`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TimeoutError<E> {
    /// No answer within the allowed time.
    #[error("no response within {0:?}")]
    Elapsed(Duration),
    /// The inner service failed.
    #[error(transparent)]
    Inner(E),
}

/// Applies a deadline to every call of `S`.
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    duration: Option<Duration>,
}

/// Wraps services in [`Timeout`].
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    duration: Option<Duration>,
}

impl TimeoutLayer {
    /// A deadline of `duration` per call; `None` for none.
    pub fn new(duration: Option<Duration>) -> Self {
        Self { duration }
    }
}

impl<S> tower::Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            duration: self.duration,
        }
    }
}

impl<S, R> tower::Service<R> for Timeout<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = TimeoutError<S::Error>;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // NOTE: waiting for readiness is not bounded here: a balancer or bulkhead in front
        // decides how long a caller may queue.
        self.inner.poll_ready(cx).map_err(TimeoutError::Inner)
    }

    fn call(&mut self, req: R) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
            sleep: self.duration.map(|d| Box::pin(tokio::time::sleep(d))),
            duration: self.duration.unwrap_or_default(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Timeout`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        sleep: Option<Pin<Box<Sleep>>>,
        duration: Duration,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, TimeoutError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(r) = this.inner.poll(cx) {
            return Poll::Ready(r.map_err(TimeoutError::Inner));
        }
        if let Some(sleep) = this.sleep
            && sleep.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(TimeoutError::Elapsed(*this.duration)));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;
    use tower::{Layer as _, ServiceExt as _};
    use tower_test::{assert_request_eq, mock};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_times_out_after_exactly_the_duration() {
        let (service, mut handle) = mock::pair::<&str, &str>();
        let service = TimeoutLayer::new(Some(Duration::from_millis(250))).layer(service);
        let start = Instant::now();
        let call = tokio::spawn(service.oneshot("hello"));
        let _respond = assert_request_eq!(handle, "hello"); // received, never answered
        let err = call.await.unwrap().unwrap_err();
        assert!(
            matches!(err, TimeoutError::Elapsed(d) if d == Duration::from_millis(250)),
            "{err:?}"
        );
        assert_eq!(start.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_time_passes_through() {
        let (service, mut handle) = mock::pair::<&str, &str>();
        let service = TimeoutLayer::new(Some(Duration::from_secs(1))).layer(service);
        let call = tokio::spawn(service.oneshot("hello"));
        let (_, respond) = handle.next_request().await.unwrap();
        tokio::time::sleep(Duration::from_millis(999)).await;
        respond.send_response("world");
        assert_eq!(call.await.unwrap().unwrap(), "world");
    }

    #[tokio::test(start_paused = true)]
    async fn no_duration_means_no_deadline_and_inner_errors_pass() {
        let (service, mut handle) = mock::pair::<&str, &str>();
        let service = TimeoutLayer::new(None).layer(service);
        let call = tokio::spawn(service.oneshot("hello"));
        let (_, respond) = handle.next_request().await.unwrap();
        tokio::time::sleep(Duration::from_hours(1)).await;
        respond.send_error(std::io::Error::other("boom"));
        let err = call.await.unwrap().unwrap_err();
        assert!(
            matches!(err, TimeoutError::Inner(ref e) if e.to_string() == "boom"),
            "{err:?}"
        );
    }
}
