//! Outlier detection, the "multi-server circuit breaker": each endpoint of a service has its
//! own run of errors; one that fails `consecutive_errors` times in a row (5xx and connect
//! failures), or `consecutive_gateway_errors` times (502/503/504), is ejected from load
//! balancing for `base_ejection_time x ejections` (capped at `max_ejection_time`), then comes
//! back. The ejection count decays by one per `interval` without a new ejection.
//!
//! Caps, as in Envoy: at most `max_ejection_percent` of the endpoints are ejected at once (at
//! least one may always be), and never so many that fewer than `min_ready_endpoints` remain.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Outlier detection settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutlierConfig {
    /// 5xx and connect failures in a row to eject (0: off).
    pub consecutive_errors: u32,
    /// 502/503/504 in a row to eject (0: off).
    pub consecutive_gateway_errors: u32,
    /// The ejection count decays by one per interval without an ejection.
    pub interval: Duration,
    /// Ejection time per ejection.
    pub base_ejection_time: Duration,
    /// Longest ejection.
    pub max_ejection_time: Duration,
    /// At most this share ejected at once (at least one may be).
    pub max_ejection_percent: u32,
    /// Never eject below this many available endpoints.
    pub min_ready_endpoints: u32,
}

/// What one call to an endpoint said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A success (any status below 500).
    Success,
    /// A 5xx other than 502/503/504.
    Error,
    /// 502, 503, 504, or a connect failure.
    GatewayError,
}

#[derive(Debug)]
struct Endpoint {
    consecutive: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    /// Decay runs from here: the end of the last ejection, moved on per interval forgiven.
    decay_from: Option<Instant>,
}

/// Per-endpoint error runs and ejections for one service.
#[derive(Debug)]
pub struct Outlier<K> {
    config: OutlierConfig,
    endpoints: Mutex<HashMap<K, Endpoint>>,
}

impl<K: Eq + Hash + Clone> Outlier<K> {
    /// A detector with no history.
    pub fn new(config: OutlierConfig) -> Self {
        Self {
            config,
            endpoints: Mutex::new(HashMap::new()),
        }
    }

    /// True while `key` is ejected.
    pub fn is_ejected(&self, key: &K) -> bool {
        let now = Instant::now();
        let endpoints = self.endpoints.lock().expect("outlier lock poisoned");
        endpoints
            .get(key)
            .and_then(|e| e.ejected_until)
            .is_some_and(|until| now < until)
    }

    /// How many endpoints are ejected now.
    pub fn ejected(&self) -> usize {
        let now = Instant::now();
        let endpoints = self.endpoints.lock().expect("outlier lock poisoned");
        endpoints
            .values()
            .filter(|e| e.ejected_until.is_some_and(|u| now < u))
            .count()
    }

    /// Records a call's outcome on `key`, one of `total` endpoints. Returns the ejection time
    /// when this outcome ejected it.
    pub fn record(&self, key: &K, outcome: Outcome, total: usize) -> Option<Duration> {
        let now = Instant::now();
        let c = &self.config;
        let mut endpoints = self.endpoints.lock().expect("outlier lock poisoned");
        let ejected_now = endpoints
            .values()
            .filter(|e| e.ejected_until.is_some_and(|u| now < u))
            .count();
        let e = endpoints.entry(key.clone()).or_insert(Endpoint {
            consecutive: 0,
            consecutive_gateway: 0,
            ejections: 0,
            ejected_until: None,
            decay_from: None,
        });
        if e.ejected_until.is_some_and(|u| now < u) {
            return None; // an answer that was in flight when it was ejected
        }
        // Decay: one ejection forgiven per whole interval back in rotation.
        if let Some(from) = e.decay_from
            && !c.interval.is_zero()
            && now > from
        {
            let intervals =
                u32::try_from(now.duration_since(from).as_nanos() / c.interval.as_nanos())
                    .unwrap_or(u32::MAX);
            e.ejections = e.ejections.saturating_sub(intervals);
            e.decay_from = Some(from + c.interval.saturating_mul(intervals));
        }
        match outcome {
            Outcome::Success => {
                e.consecutive = 0;
                e.consecutive_gateway = 0;
            }
            Outcome::Error => {
                e.consecutive += 1;
                e.consecutive_gateway = 0;
            }
            Outcome::GatewayError => {
                e.consecutive += 1;
                e.consecutive_gateway += 1;
            }
        }
        let by_errors = c.consecutive_errors > 0 && e.consecutive >= c.consecutive_errors;
        let by_gateway = c.consecutive_gateway_errors > 0
            && e.consecutive_gateway >= c.consecutive_gateway_errors;
        if !(by_errors || by_gateway) {
            return None;
        }
        let max_ejected = (total * c.max_ejection_percent as usize / 100).max(1);
        let available_after = total.saturating_sub(ejected_now + 1);
        if ejected_now + 1 > max_ejected || available_after < c.min_ready_endpoints as usize {
            return None; // caps: keep it in rotation, its run goes on
        }
        e.ejections += 1;
        let time = c
            .base_ejection_time
            .saturating_mul(e.ejections)
            .min(c.max_ejection_time);
        e.ejected_until = Some(now + time);
        e.decay_from = Some(now + time);
        e.consecutive = 0;
        e.consecutive_gateway = 0;
        Some(time)
    }

    /// Forgets endpoints no longer in the set.
    pub fn retain(&self, keep: impl Fn(&K) -> bool) {
        self.endpoints
            .lock()
            .expect("outlier lock poisoned")
            .retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive_errors: 5,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_mins(5),
            max_ejection_percent: 10,
            min_ready_endpoints: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn five_errors_in_a_row_eject_for_the_base_time() {
        let o = Outlier::new(config());
        for _ in 0..4 {
            assert_eq!(o.record(&"a", Outcome::GatewayError, 3), None);
        }
        o.record(&"a", Outcome::Success, 3); // the run is broken
        for _ in 0..4 {
            assert_eq!(o.record(&"a", Outcome::Error, 3), None);
        }
        assert_eq!(
            o.record(&"a", Outcome::Error, 3),
            Some(Duration::from_secs(30))
        );
        assert!(o.is_ejected(&"a"));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!o.is_ejected(&"a"), "back after the ejection time");
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_grows_with_ejections_up_to_the_max_and_decays() {
        let o = Outlier::new(OutlierConfig {
            max_ejection_time: Duration::from_secs(70),
            ..config()
        });
        let eject = |o: &Outlier<&str>| (0..5).find_map(|_| o.record(&"a", Outcome::Error, 3));
        assert_eq!(eject(&o), Some(Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(eject(&o), Some(Duration::from_mins(1)));
        tokio::time::advance(Duration::from_mins(1)).await;
        assert_eq!(eject(&o), Some(Duration::from_secs(70)), "capped");
        // Long healthy: the count decays back.
        tokio::time::advance(Duration::from_secs(70 + 300)).await;
        assert_eq!(eject(&o), Some(Duration::from_secs(30)));
    }

    #[tokio::test(start_paused = true)]
    async fn caps_keep_enough_endpoints() {
        let o = Outlier::new(config());
        let eject = |o: &Outlier<&str>, k| (0..5).find_map(|_| o.record(&k, Outcome::Error, 3));
        // 10% of 3 rounds to 0, but one may always be ejected.
        assert!(eject(&o, "a").is_some());
        assert!(eject(&o, "b").is_none(), "a second would pass 10%");
        let o = Outlier::new(OutlierConfig {
            max_ejection_percent: 100,
            min_ready_endpoints: 2,
            ..config()
        });
        assert!(eject(&o, "a").is_some());
        assert!(eject(&o, "b").is_none(), "would leave 1 < 2 ready");
    }

    #[tokio::test(start_paused = true)]
    async fn gateway_errors_have_their_own_run() {
        let o = Outlier::new(OutlierConfig {
            consecutive_errors: 0,
            consecutive_gateway_errors: 2,
            ..config()
        });
        assert_eq!(o.record(&"a", Outcome::Error, 3), None);
        assert_eq!(o.record(&"a", Outcome::GatewayError, 3), None);
        assert!(o.record(&"a", Outcome::GatewayError, 3).is_some());
    }
}
