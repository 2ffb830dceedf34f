//! A sliding window of two counters (requests and retries, calls and failures), cut into ten
//! slots so it slides by a tenth at a time: constant memory and constant time per event,
//! whatever the traffic.

use std::time::Duration;

use tokio::time::Instant;

/// Slots the window is cut into.
const SLOTS: usize = 10;

/// Two counters over the last `window`.
#[derive(Debug)]
pub(crate) struct Window {
    slot: Duration,
    start: Instant,
    /// Index (since `start`) of the newest slot.
    newest: u64,
    counts: [(u32, u32); SLOTS],
}

impl Window {
    /// An empty window of `window` (at least a nanosecond per slot).
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            slot: (window / u32::try_from(SLOTS).expect("few slots")).max(Duration::from_nanos(1)),
            start: Instant::now(),
            newest: 0,
            counts: [(0, 0); SLOTS],
        }
    }

    /// Forgets the slots that fell out of the window by `now`; the index of the current slot.
    fn slide(&mut self, now: Instant) -> usize {
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        let current = u64::try_from(elapsed / self.slot.as_nanos()).unwrap_or(u64::MAX);
        if current > self.newest {
            let stale = (current - self.newest).min(SLOTS as u64);
            for i in 1..=stale {
                self.counts[Self::at(self.newest + i)] = (0, 0);
            }
            self.newest = current;
        }
        Self::at(self.newest)
    }

    fn at(index: u64) -> usize {
        #[allow(clippy::cast_possible_truncation)] // modulo SLOTS
        let at = (index % SLOTS as u64) as usize;
        at
    }

    /// Adds to both counters at `now`.
    pub(crate) fn add(&mut self, now: Instant, a: u32, b: u32) {
        let at = self.slide(now);
        let slot = &mut self.counts[at];
        slot.0 = slot.0.saturating_add(a);
        slot.1 = slot.1.saturating_add(b);
    }

    /// Both counters over the window at `now`.
    pub(crate) fn totals(&mut self, now: Instant) -> (u32, u32) {
        self.slide(now);
        self.counts.iter().fold((0, 0), |(a, b), (x, y)| {
            (a.saturating_add(*x), b.saturating_add(*y))
        })
    }

    /// Forgets everything.
    pub(crate) fn clear(&mut self) {
        self.counts = [(0, 0); SLOTS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_leave_the_window_a_tenth_at_a_time() {
        let mut w = Window::new(Duration::from_secs(10));
        let t0 = Instant::now();
        w.add(t0, 3, 1);
        w.add(t0 + Duration::from_secs(5), 2, 2);
        assert_eq!(w.totals(t0 + Duration::from_secs(9)), (5, 3));
        assert_eq!(
            w.totals(t0 + Duration::from_millis(10_500)),
            (2, 2),
            "the first slot left"
        );
        assert_eq!(w.totals(t0 + Duration::from_mins(1)), (0, 0));
        w.add(t0 + Duration::from_secs(61), 1, 0);
        w.clear();
        assert_eq!(w.totals(t0 + Duration::from_secs(61)), (0, 0));
    }
}
