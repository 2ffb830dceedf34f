//! Circuit breaker with a bulkhead, one per (client proxy, service): Closed -> Open ->
//! HalfOpen -> Closed.
//!
//! - Closed: calls pass; the breaker trips on `consecutive_failures` in a row, or when
//!   failures / calls >= `failure_ratio` over at least `minimum_requests` calls in the sliding
//!   `window`.
//! - Open: calls fail at once with [`BreakerError::Open`]. The open time grows with each trip
//!   in a row (`open_base x 2^(trips-1)`, capped at `open_max`, +- `open_jitter`).
//! - HalfOpen: after the open time, one probe at a time passes; `half_open_probes` successes
//!   close the breaker, any failure opens it again for longer.
//! - Bulkhead (always on): at most `max_requests` calls in flight; more fail at once with
//!   [`BreakerError::Full`].
//! - Manual control for labs (Polly's `ManualControl`): [`Breaker::trip`] opens it as a real
//!   trip would, [`Breaker::isolate`] holds it open until [`Breaker::reset`], which closes it
//!   and forgets its history.
//!
//! What counts as a failure is the caller's classifier over responses.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::Rng as _;
use tokio::time::Instant;

use crate::window::Window;

/// Breaker settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BreakerConfig {
    /// Calls in flight at most (bulkhead).
    pub max_requests: usize,
    /// Trip after this many failures in a row (0: off).
    pub consecutive_failures: u32,
    /// Trip at this failure ratio (0: off) ...
    pub failure_ratio: f64,
    /// ... over at least this many calls ...
    pub minimum_requests: u32,
    /// ... in this window.
    pub window: Duration,
    /// First open time.
    pub open_base: Duration,
    /// Longest open time.
    pub open_max: Duration,
    /// Jitter on the open time, a fraction (0.5: +-50%).
    pub open_jitter: f64,
    /// Successes in half-open to close.
    pub half_open_probes: u32,
}

/// The breaker's state, for metrics and `/config_dump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls pass.
    Closed,
    /// Calls fail fast.
    Open,
    /// Probes pass one at a time.
    HalfOpen,
    /// Held open by hand until reset.
    Isolated,
}

impl State {
    /// Label.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
            State::Isolated => "isolated",
        }
    }
}

/// Why a call did not go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BreakerError {
    /// The breaker is open (or half-open with a probe in flight).
    #[error("circuit open")]
    Open,
    /// The bulkhead is full.
    #[error("too many requests in flight")]
    Full,
}

#[derive(Debug)]
enum Mode {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool, successes: u32 },
    Isolated,
}

#[derive(Debug)]
struct Inner {
    mode: Mode,
    /// Trips in a row (reset when the breaker closes).
    trips: u32,
    consecutive: u32,
    /// (calls, failures) in the sliding window.
    recent: Window,
    in_flight: usize,
}

/// Hears every state change (metrics, logs).
pub type OnChange = Arc<dyn Fn(State) + Send + Sync>;

/// A circuit breaker, shared by every call to one service.
#[derive(Clone)]
pub struct Breaker {
    config: Arc<BreakerConfig>,
    inner: Arc<Mutex<Inner>>,
    on_change: Option<OnChange>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("config", &self.config)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// A call admitted by the breaker: report its outcome with [`Permit::record`]; dropping it
/// without recording counts as neither success nor failure (a cancelled call).
#[derive(Debug)]
pub struct Permit {
    breaker: Breaker,
    probe: bool,
    recorded: bool,
}

impl Breaker {
    /// A closed breaker; `on_change` hears every state change.
    pub fn new(config: BreakerConfig, on_change: Option<OnChange>) -> Self {
        let inner = Inner {
            mode: Mode::Closed,
            trips: 0,
            consecutive: 0,
            recent: Window::new(config.window),
            in_flight: 0,
        };
        Self {
            config: Arc::new(config),
            inner: Arc::new(Mutex::new(inner)),
            on_change,
        }
    }

    /// The state now.
    pub fn state(&self) -> State {
        let inner = self.inner.lock().expect("breaker lock poisoned");
        match inner.mode {
            Mode::Closed => State::Closed,
            Mode::Open { until } if Instant::now() < until => State::Open,
            Mode::Open { .. } | Mode::HalfOpen { .. } => State::HalfOpen,
            Mode::Isolated => State::Isolated,
        }
    }

    /// Opens the breaker now, as a trip would (the open time grows with trips in a row).
    pub fn trip(&self) {
        {
            let mut inner = self.inner.lock().expect("breaker lock poisoned");
            inner.trips += 1;
            let until = Instant::now() + self.open_time(inner.trips);
            inner.mode = Mode::Open { until };
        }
        self.changed(State::Open);
    }

    /// Holds the breaker open until [`Breaker::reset`].
    pub fn isolate(&self) {
        self.inner.lock().expect("breaker lock poisoned").mode = Mode::Isolated;
        self.changed(State::Isolated);
    }

    /// Closes the breaker and forgets its trips and recent calls.
    pub fn reset(&self) {
        {
            let mut inner = self.inner.lock().expect("breaker lock poisoned");
            inner.mode = Mode::Closed;
            inner.trips = 0;
            inner.consecutive = 0;
            inner.recent.clear();
        }
        self.changed(State::Closed);
    }

    fn changed(&self, state: State) {
        if let Some(f) = &self.on_change {
            f(state);
        }
    }

    /// Asks to make a call.
    ///
    /// # Errors
    /// [`BreakerError`] when the call must fail fast.
    pub fn try_acquire(&self) -> Result<Permit, BreakerError> {
        let mut changed = None;
        let result = {
            let mut inner = self.inner.lock().expect("breaker lock poisoned");
            if inner.in_flight >= self.config.max_requests {
                return Err(BreakerError::Full);
            }
            let probe = match &mut inner.mode {
                Mode::Closed => Ok(false),
                Mode::Open { until } => {
                    if Instant::now() < *until {
                        Err(BreakerError::Open)
                    } else {
                        inner.mode = Mode::HalfOpen {
                            probing: true,
                            successes: 0,
                        };
                        changed = Some(State::HalfOpen);
                        Ok(true)
                    }
                }
                Mode::HalfOpen { probing, .. } => {
                    if *probing {
                        Err(BreakerError::Open)
                    } else {
                        *probing = true;
                        Ok(true)
                    }
                }
                Mode::Isolated => Err(BreakerError::Open),
            };
            if probe.is_ok() {
                inner.in_flight += 1;
            }
            probe
        };
        if let Some(s) = changed {
            self.changed(s);
        }
        result.map(|probe| Permit {
            breaker: self.clone(),
            probe,
            recorded: false,
        })
    }

    fn open_time(&self, trips: u32) -> Duration {
        let c = &self.config;
        let base = c
            .open_base
            .saturating_mul(
                1u32.checked_shl(trips.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(c.open_max);
        if c.open_jitter <= 0.0 {
            return base;
        }
        let factor = rand::rng().random_range((1.0 - c.open_jitter)..=(1.0 + c.open_jitter));
        base.mul_f64(factor.max(0.0))
    }

    fn record(&self, probe: bool, failed: bool) {
        let now = Instant::now();
        let mut changed = None;
        {
            let mut inner = self.inner.lock().expect("breaker lock poisoned");
            inner.in_flight = inner.in_flight.saturating_sub(1);
            let c = &self.config;
            match &mut inner.mode {
                Mode::HalfOpen { probing, successes } if probe => {
                    *probing = false;
                    if failed {
                        inner.trips += 1;
                        let until = now + self.open_time(inner.trips);
                        inner.mode = Mode::Open { until };
                        changed = Some(State::Open);
                    } else {
                        *successes += 1;
                        if *successes >= c.half_open_probes {
                            inner.mode = Mode::Closed;
                            inner.trips = 0;
                            inner.consecutive = 0;
                            inner.recent.clear();
                            changed = Some(State::Closed);
                        }
                    }
                }
                Mode::Closed => {
                    inner.consecutive = if failed { inner.consecutive + 1 } else { 0 };
                    inner.recent.add(now, 1, u32::from(failed));
                    let (calls, failures) = inner.recent.totals(now);
                    let by_count =
                        c.consecutive_failures > 0 && inner.consecutive >= c.consecutive_failures;
                    let by_ratio = c.failure_ratio > 0.0
                        && calls >= c.minimum_requests
                        && f64::from(failures) / f64::from(calls) >= c.failure_ratio;
                    if by_count || by_ratio {
                        inner.trips += 1;
                        let until = now + self.open_time(inner.trips);
                        inner.mode = Mode::Open { until };
                        changed = Some(State::Open);
                    }
                }
                // A call admitted before the breaker opened: its outcome no longer matters.
                Mode::Open { .. } | Mode::HalfOpen { .. } | Mode::Isolated => {}
            }
        }
        if let Some(s) = changed {
            self.changed(s);
        }
    }
}

impl Permit {
    /// Reports the call's outcome.
    pub fn record(mut self, failed: bool) {
        self.recorded = true;
        self.breaker.record(self.probe, failed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.recorded {
            let mut inner = self.breaker.inner.lock().expect("breaker lock poisoned");
            inner.in_flight = inner.in_flight.saturating_sub(1);
            if self.probe
                && let Mode::HalfOpen { probing, .. } = &mut inner.mode
            {
                *probing = false;
            }
        }
    }
}

/// Decides whether a response is a failure for the breaker.
pub type FailureClassifier<T> = Arc<dyn Fn(&T) -> bool + Send + Sync>;

/// The breaker as tower middleware: calls fail fast with [`BreakerError`], or pass and have
/// their outcome recorded.
#[derive(Clone)]
pub struct BreakerService<S, T> {
    inner: S,
    breaker: Breaker,
    failed: FailureClassifier<T>,
}

impl<S: std::fmt::Debug, T> std::fmt::Debug for BreakerService<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerService")
            .field("inner", &self.inner)
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl<S, T> BreakerService<S, T> {
    /// Wraps `inner`.
    pub fn new(inner: S, breaker: Breaker, failed: FailureClassifier<T>) -> Self {
        Self {
            inner,
            breaker,
            failed,
        }
    }
}

/// The error of [`BreakerService`].
#[derive(Debug, thiserror::Error)]
pub enum BreakerServiceError<E> {
    /// Failed fast.
    #[error(transparent)]
    Rejected(BreakerError),
    /// The inner service failed.
    #[error(transparent)]
    Inner(E),
}

impl<S, R> tower::Service<R> for BreakerService<S, S::Response>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = BreakerServiceError<S::Error>;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(BreakerServiceError::Inner)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let permit = match self.breaker.try_acquire() {
            Ok(p) => p,
            Err(e) => return Box::pin(std::future::ready(Err(BreakerServiceError::Rejected(e)))),
        };
        let call = self.inner.call(req);
        let failed = self.failed.clone();
        Box::pin(async move {
            match call.await {
                Ok(rsp) => {
                    permit.record(failed(&rsp));
                    Ok(rsp)
                }
                Err(e) => {
                    permit.record(true);
                    Err(BreakerServiceError::Inner(e))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
