//! The retry budget shared by every request to one service: over a sliding `window`, retries may
//! add `ratio` of the requests sent, plus a floor of `min_per_second` retries per second so a
//! quiet service can still retry (Linkerd's and Finagle's model). Unlike tower's `TpsBudget` it
//! tells how much is left, for the metrics and `ferrymesh-explain`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::window::Window;

/// A cheap handle on one budget (clones share it).
#[derive(Debug, Clone)]
pub struct RetryBudget(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    ratio: f64,
    /// The floor's share of one window: `min_per_second x window`.
    reserve: f64,
    /// (requests, retries).
    counts: Mutex<Window>,
}

impl RetryBudget {
    /// A budget; `window` is clamped to 1s..=60s and `ratio` to 0..=1.
    pub fn new(ratio: f64, min_per_second: u32, window: Duration) -> Self {
        let window = window.clamp(Duration::from_secs(1), Duration::from_mins(1));
        Self(Arc::new(Inner {
            ratio: ratio.clamp(0.0, 1.0),
            reserve: f64::from(min_per_second) * window.as_secs_f64(),
            counts: Mutex::new(Window::new(window)),
        }))
    }

    fn balance(&self, requests: u32, retries: u32) -> f64 {
        self.0.reserve + self.0.ratio * f64::from(requests) - f64::from(retries)
    }

    /// Counts one request (its first attempt).
    pub fn deposit(&self) {
        let mut w = self.0.counts.lock().expect("budget lock poisoned");
        w.add(Instant::now(), 1, 0);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn withdraw(&self) -> bool {
        let now = Instant::now();
        let mut w = self.0.counts.lock().expect("budget lock poisoned");
        let (requests, retries) = w.totals(now);
        if self.balance(requests, retries) < 1.0 {
            return false;
        }
        w.add(now, 0, 1);
        true
    }

    /// Retries that may be sent now (whole ones).
    pub fn available(&self) -> u64 {
        let (requests, retries) = self
            .0
            .counts
            .lock()
            .expect("budget lock poisoned")
            .totals(Instant::now());
        let balance = self.balance(requests, retries).max(0.0).floor();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // >= 0, small
        let whole = balance as u64;
        whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_ratio_of_requests_plus_the_floor() {
        let budget = RetryBudget::new(0.2, 1, Duration::from_secs(10));
        // The floor alone: 1/s over a 10s window.
        assert_eq!(budget.available(), 10);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 30, "10 + 0.2 x 100");
        let taken = (0..100).take_while(|_| budget.withdraw()).count();
        assert_eq!(taken, 30);
        assert!(!budget.withdraw(), "spent");
        assert_eq!(budget.available(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides_and_old_traffic_is_forgotten() {
        let budget = RetryBudget::new(0.5, 0, Duration::from_secs(10));
        for _ in 0..20 {
            budget.deposit();
        }
        assert!(budget.withdraw());
        assert_eq!(budget.available(), 9);
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 14, "0.5 x 30 - 1");
        // The first 20 requests and the retry leave the window; the last 10 stay.
        tokio::time::advance(Duration::from_millis(5_500)).await;
        assert_eq!(budget.available(), 5);
        // Long idle: everything is forgotten.
        tokio::time::advance(Duration::from_mins(1)).await;
        assert_eq!(budget.available(), 0);
        assert!(!budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn window_and_ratio_are_clamped() {
        let budget = RetryBudget::new(3.0, 2, Duration::from_millis(10));
        assert_eq!(budget.available(), 2, "a window of at least 1s");
        budget.deposit();
        assert_eq!(budget.available(), 3, "a ratio of at most 1");
    }
}
