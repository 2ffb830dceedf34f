//! The retry budget shared by every request to one service: over a sliding `window`, retries may
//! add `ratio` of the requests sent, plus a floor of `min_per_second` retries per second so a
//! quiet service can still retry (Linkerd's and Finagle's model). Unlike tower's `TpsBudget` it
//! tells how much is left, for the metrics and `ferrymesh-explain`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Slots the window is cut into: the window slides by a tenth at a time.
const SLOTS: usize = 10;

/// A cheap handle on one budget (clones share it).
#[derive(Debug, Clone)]
pub struct RetryBudget(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    ratio: f64,
    /// The floor's share of one window: `min_per_second x window`.
    reserve: f64,
    slot: Duration,
    start: Instant,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Index (since `start`) of the newest slot.
    newest: u64,
    requests: [u32; SLOTS],
    retries: [u32; SLOTS],
}

impl Counts {
    /// Forgets the slots that fell out of the window by `now_slot`.
    fn slide(&mut self, now_slot: u64) {
        if now_slot <= self.newest {
            return;
        }
        let stale = (now_slot - self.newest).min(SLOTS as u64);
        for i in 1..=stale {
            #[allow(clippy::cast_possible_truncation)] // modulo SLOTS
            let at = ((self.newest + i) % SLOTS as u64) as usize;
            self.requests[at] = 0;
            self.retries[at] = 0;
        }
        self.newest = now_slot;
    }

    fn index(&self) -> usize {
        #[allow(clippy::cast_possible_truncation)] // modulo SLOTS
        let at = (self.newest % SLOTS as u64) as usize;
        at
    }
}

impl RetryBudget {
    /// A budget; `window` is clamped to 1s..=60s and `ratio` to 0..=1.
    pub fn new(ratio: f64, min_per_second: u32, window: Duration) -> Self {
        let window = window.clamp(Duration::from_secs(1), Duration::from_mins(1));
        Self(Arc::new(Inner {
            ratio: ratio.clamp(0.0, 1.0),
            reserve: f64::from(min_per_second) * window.as_secs_f64(),
            slot: window / u32::try_from(SLOTS).expect("few slots"),
            start: Instant::now(),
            counts: Mutex::new(Counts::default()),
        }))
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        let mut counts = self.0.counts.lock().expect("budget lock poisoned");
        let elapsed = self.0.start.elapsed().as_nanos();
        let slot = u64::try_from(elapsed / self.0.slot.as_nanos().max(1)).unwrap_or(u64::MAX);
        counts.slide(slot);
        counts
    }

    fn balance(&self, counts: &Counts) -> f64 {
        let requests: u32 = counts.requests.iter().sum();
        let retries: u32 = counts.retries.iter().sum();
        self.0.reserve + self.0.ratio * f64::from(requests) - f64::from(retries)
    }

    /// Counts one request (its first attempt).
    pub fn deposit(&self) {
        let mut counts = self.counts();
        let at = counts.index();
        counts.requests[at] = counts.requests[at].saturating_add(1);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn withdraw(&self) -> bool {
        let mut counts = self.counts();
        if self.balance(&counts) < 1.0 {
            return false;
        }
        let at = counts.index();
        counts.retries[at] = counts.retries[at].saturating_add(1);
        true
    }

    /// Retries that may be sent now (whole ones).
    pub fn available(&self) -> u64 {
        let counts = self.counts();
        let balance = self.balance(&counts).max(0.0).floor();
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
