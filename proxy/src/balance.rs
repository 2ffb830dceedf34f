//! Power of two choices over peak-EWMA load (Linkerd's default balancer). Each endpoint keeps
//! a latency estimate that jumps to any slower sample at once ("peak") and decays toward faster
//! ones over `DECAY`; its load is that estimate times (in-flight requests + 1). A pick draws
//! two ready endpoints at random and takes the less loaded one, which avoids both herding on one
//! "best" endpoint and the cost of scanning all of them.
//!
//! NOTE: tower's `p2c::Balance` needs a `Discover` stream of ready services and offers only
//! P2C; the mesh needs more algorithms over the same endpoint set (and outlier ejection later),
//! so the balancer is a small data structure here instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng as _;
use tokio::time::Instant;

use crate::policy::Endpoint;

/// Latency assumed for an endpoint with no sample yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Time constant of the decay toward faster samples.
pub const DECAY: Duration = Duration::from_secs(10);

/// An endpoint with its load statistics.
#[derive(Debug)]
pub struct Slot {
    /// The endpoint.
    pub endpoint: Endpoint,
    pending: AtomicUsize,
    ewma: Mutex<Ewma>,
}

#[derive(Debug, Clone, Copy)]
struct Ewma {
    cost_ns: f64,
    stamp: Instant,
}

impl Slot {
    fn new(endpoint: Endpoint, cost_ns: f64, now: Instant) -> Self {
        Self {
            endpoint,
            pending: AtomicUsize::new(0),
            ewma: Mutex::new(Ewma {
                cost_ns,
                stamp: now,
            }),
        }
    }

    /// Current load: decayed latency estimate x (in-flight + 1).
    fn load(&self, now: Instant) -> f64 {
        let e = *self.ewma.lock().expect("ewma lock poisoned");
        let decayed = e.cost_ns * decay(now.saturating_duration_since(e.stamp));
        #[allow(clippy::cast_precision_loss)] // in-flight counts are far below 2^52
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        decayed * (pending + 1.0)
    }

    fn observe(&self, rtt: Duration, now: Instant) {
        let mut e = self.ewma.lock().expect("ewma lock poisoned");
        let sample = duration_ns(rtt);
        if sample > e.cost_ns {
            e.cost_ns = sample; // peak: a slower sample counts at once
        } else {
            let w = decay(now.saturating_duration_since(e.stamp));
            e.cost_ns = e.cost_ns * w + sample * (1.0 - w);
        }
        e.stamp = now;
    }

    /// Requests in flight to this endpoint.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

/// The rendezvous weight of `addr` for `key`.
fn rendezvous(key: u64, addr: std::net::SocketAddr) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    addr.hash(&mut h);
    h.finish()
}

/// A stable hash of a header value, for [`Lb::Hash`].
pub fn hash_key(value: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

fn duration_ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn decay(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

/// A request's hold on an endpoint: counts as in flight until completed or dropped.
#[derive(Debug)]
pub struct Pick {
    slot: Arc<Slot>,
    start: Instant,
    done: bool,
}

impl Pick {
    /// The endpoint picked.
    pub fn endpoint(&self) -> &Endpoint {
        &self.slot.endpoint
    }

    /// Records the latency (to response headers) and releases the endpoint.
    pub fn complete(mut self) {
        let now = Instant::now();
        self.slot.observe(now - self.start, now);
        self.release();
    }

    fn release(&mut self) {
        if !self.done {
            self.done = true;
            self.slot.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.release();
    }
}

/// The endpoint set of one service port, with statistics that survive endpoint updates.
#[derive(Debug, Default)]
pub struct Balancer {
    slots: Mutex<Slots>,
    /// Round-robin position.
    next: AtomicUsize,
}

/// How a pick chooses among the candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lb {
    /// Power of two choices over peak-EWMA load (the default).
    PeakEwma,
    /// In turn.
    RoundRobin,
    /// Power of two choices over requests in flight.
    LeastRequest,
    /// Uniform.
    Random,
    /// Rendezvous hashing of the key: the same key goes to the same endpoint while it is a
    /// candidate, and only the keys of an endpoint that leaves move.
    Hash(u64),
}

#[derive(Debug, Default)]
struct Slots {
    all: Vec<Arc<Slot>>,
    /// The ready ones, kept apart so that a pick allocates nothing.
    ready: Vec<Arc<Slot>>,
}

impl Balancer {
    /// Replaces the endpoint set, keeping the statistics of endpoints that stay.
    pub fn update(&self, endpoints: &[Endpoint]) {
        let now = Instant::now();
        let mut slots = self.slots.lock().expect("balancer lock poisoned");
        // NOTE: a new endpoint starts at the mean estimate of the others (DEFAULT_RTT when there
        // are none). Starting every newcomer at DEFAULT_RTT, as tower's PeakEwma does, starves a
        // scaled-up replica behind fast incumbents until their estimates decay, which is exactly
        // what a student adding a replica does not expect to see.
        #[allow(clippy::cast_precision_loss)] // endpoint counts are far below 2^52
        let start_cost = if slots.all.is_empty() {
            duration_ns(DEFAULT_RTT)
        } else {
            slots
                .all
                .iter()
                .map(|s| s.ewma.lock().expect("ewma lock poisoned").cost_ns)
                .sum::<f64>()
                / slots.all.len() as f64
        };
        let all: Vec<Arc<Slot>> = endpoints
            .iter()
            .map(
                |e| match slots.all.iter().find(|s| s.endpoint.addr == e.addr) {
                    Some(s) if s.endpoint == *e => s.clone(),
                    _ => Arc::new(Slot::new(e.clone(), start_cost, now)),
                },
            )
            .collect();
        let ready = all.iter().filter(|s| s.endpoint.ready).cloned().collect();
        *slots = Slots { all, ready };
    }

    /// Picks a ready endpoint, `None` when there is none.
    pub fn pick(&self) -> Option<Pick> {
        self.pick_excluding(Lb::PeakEwma, &[], None, |_| false)
    }

    /// Picks a ready endpoint that is not `ejected` (outlier detection) and not in `avoid` (a
    /// retry's earlier endpoints) when there is one; else a ready one not ejected; else any
    /// ready one (as Envoy's panic threshold: better a suspect endpoint than none). Among those,
    /// one in `zone` when there is one. `None` when none is ready.
    pub fn pick_excluding(
        &self,
        lb: Lb,
        avoid: &[std::net::SocketAddr],
        zone: Option<&str>,
        ejected: impl Fn(&std::net::SocketAddr) -> bool,
    ) -> Option<Pick> {
        let now = Instant::now();
        let slots = self.slots.lock().expect("balancer lock poisoned");
        let healthy;
        let fresh;
        let mut ready: &[Arc<Slot>] = &slots.ready;
        if ready.iter().any(|s| ejected(&s.endpoint.addr)) {
            healthy = ready
                .iter()
                .filter(|s| !ejected(&s.endpoint.addr))
                .cloned()
                .collect::<Vec<_>>();
            if !healthy.is_empty() {
                ready = &healthy;
            }
        }
        if !avoid.is_empty() {
            fresh = ready
                .iter()
                .filter(|s| !avoid.contains(&s.endpoint.addr))
                .cloned()
                .collect::<Vec<_>>();
            if !fresh.is_empty() {
                ready = &fresh;
            }
        }
        // Zone-aware: the candidates in our zone when there are any, else the others (failover
        // when the local ones are all ejected, unhealthy or already tried).
        let local;
        if let Some(zone) = zone.filter(|z| !z.is_empty())
            && ready.iter().any(|s| s.endpoint.zone != zone)
        {
            local = ready
                .iter()
                .filter(|s| s.endpoint.zone == zone)
                .cloned()
                .collect::<Vec<_>>();
            if !local.is_empty() {
                ready = &local;
            }
        }
        let n = ready.len();
        let slot = match (n, lb) {
            (0, _) => return None,
            (1, _) => ready[0].clone(),
            (_, Lb::RoundRobin) => ready[self.next.fetch_add(1, Ordering::Relaxed) % n].clone(),
            (_, Lb::Random) => ready[rand::rng().random_range(0..n)].clone(),
            (_, Lb::Hash(key)) => ready
                .iter()
                .max_by_key(|s| rendezvous(key, s.endpoint.addr))
                .expect("n > 1 candidates")
                .clone(),
            (_, Lb::PeakEwma | Lb::LeastRequest) => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (&ready[a], &ready[b]);
                let better = if lb == Lb::LeastRequest {
                    a.pending() <= b.pending()
                } else {
                    a.load(now) <= b.load(now)
                };
                if better { a.clone() } else { b.clone() }
            }
        };
        slot.pending.fetch_add(1, Ordering::Relaxed);
        Some(Pick {
            slot,
            start: now,
            done: false,
        })
    }

    /// How many endpoints are ready.
    pub fn ready_count(&self) -> usize {
        self.slots
            .lock()
            .expect("balancer lock poisoned")
            .ready
            .len()
    }

    /// Every endpoint with its statistics (for dumps and tests).
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots
            .lock()
            .expect("balancer lock poisoned")
            .all
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn ep(port: u16, ready: bool) -> Endpoint {
        Endpoint {
            addr: ([127, 0, 0, 1], port).into(),
            weight: 1,
            ready,
            zone: String::new(),
            meshed: true,
            instance: format!("i{port}"),
            identity: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn same_zone_endpoints_first_and_the_others_when_they_are_out() {
        let b = Balancer::default();
        let zoned = |port, zone: &str| Endpoint {
            zone: zone.into(),
            ..ep(port, true)
        };
        b.update(&[zoned(1, "a"), zoned(2, "a"), zoned(3, "b")]);
        let pick = |avoid: &[std::net::SocketAddr], out: &[u16]| {
            b.pick_excluding(Lb::RoundRobin, avoid, Some("a"), |a| {
                out.contains(&a.port())
            })
            .unwrap()
            .endpoint()
            .addr
            .port()
        };
        let ports: std::collections::BTreeSet<u16> = (0..20).map(|_| pick(&[], &[])).collect();
        assert_eq!(ports, [1, 2].into(), "only zone a");
        assert_eq!(pick(&[], &[1]), 2, "the other local one");
        assert_eq!(pick(&[], &[1, 2]), 3, "failover to zone b");
        let tried = [([127, 0, 0, 1], 1).into(), ([127, 0, 0, 1], 2).into()];
        assert_eq!(pick(&tried, &[]), 3, "a retry tries zone b after zone a");
        // No preference: every zone.
        let any: std::collections::BTreeSet<u16> = (0..20)
            .map(|_| {
                b.pick_excluding(Lb::RoundRobin, &[], None, |_| false)
                    .unwrap()
                    .endpoint()
                    .addr
                    .port()
            })
            .collect();
        assert_eq!(any, [1, 2, 3].into());
    }

    #[tokio::test(start_paused = true)]
    async fn only_ready_endpoints_are_picked() {
        let b = Balancer::default();
        assert!(b.pick().is_none());
        b.update(&[ep(1, false), ep(2, true)]);
        for _ in 0..20 {
            assert_eq!(b.pick().unwrap().endpoint().addr.port(), 2);
        }
        b.update(&[ep(1, false)]);
        assert!(b.pick().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn load_spreads_over_equal_endpoints() {
        let b = Balancer::default();
        b.update(&[ep(1, true), ep(2, true), ep(3, true)]);
        let mut counts = HashMap::new();
        let mut held = Vec::new();
        for _ in 0..30 {
            let p = b.pick().unwrap();
            *counts.entry(p.endpoint().addr.port()).or_insert(0) += 1;
            held.push(p); // in flight: raises the endpoint's load
        }
        for port in 1..=3 {
            assert!(counts[&port] >= 5, "{counts:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_endpoint_gets_less_traffic() {
        let b = Balancer::default();
        b.update(&[ep(1, true), ep(2, true)]);
        for _ in 0..50 {
            let p = b.pick().unwrap();
            let slow = p.endpoint().addr.port() == 1;
            tokio::time::advance(if slow {
                Duration::from_millis(500)
            } else {
                Duration::from_millis(5)
            })
            .await;
            p.complete();
        }
        let mut slow_picks = 0;
        for _ in 0..100 {
            let p = b.pick().unwrap();
            if p.endpoint().addr.port() == 1 {
                slow_picks += 1;
            }
            tokio::time::advance(Duration::from_millis(5)).await;
            p.complete();
        }
        assert!(slow_picks < 30, "the slow endpoint got {slow_picks} of 100");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_competes_with_fast_incumbents() {
        let b = Balancer::default();
        b.update(&[ep(1, true), ep(2, true)]);
        for _ in 0..20 {
            let p = b.pick().unwrap();
            tokio::time::advance(Duration::from_millis(1)).await;
            p.complete();
        }
        b.update(&[ep(1, true), ep(2, true), ep(3, true)]);
        // Three requests in flight at a time, as under real load.
        let mut new_picks = 0;
        let mut in_flight = std::collections::VecDeque::new();
        for _ in 0..60 {
            let p = b.pick().unwrap();
            if p.endpoint().addr.port() == 3 {
                new_picks += 1;
            }
            in_flight.push_back(p);
            if in_flight.len() == 3 {
                tokio::time::advance(Duration::from_millis(1)).await;
                in_flight.pop_front().unwrap().complete();
            }
        }
        assert!(new_picks >= 10, "the new endpoint got {new_picks} of 60");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_avoids_the_endpoints_already_tried_when_it_can() {
        let b = Balancer::default();
        b.update(&[ep(1, true), ep(2, true), ep(3, true)]);
        let tried = [ep(1, true).addr, ep(2, true).addr];
        for _ in 0..20 {
            assert_eq!(
                b.pick_excluding(Lb::PeakEwma, &tried, None, |_| false)
                    .unwrap()
                    .endpoint()
                    .addr
                    .port(),
                3
            );
        }
        let three = ep(3, true).addr;
        assert_eq!(
            b.pick_excluding(Lb::PeakEwma, &[], None, |a| *a != three)
                .unwrap()
                .endpoint()
                .addr
                .port(),
            3,
            "ejected endpoints are skipped"
        );
        assert!(
            b.pick_excluding(Lb::PeakEwma, &[], None, |_| true)
                .is_some(),
            "all ejected: any ready endpoint"
        );
        let all = [ep(1, true).addr, ep(2, true).addr, ep(3, true).addr];
        assert!(
            b.pick_excluding(Lb::PeakEwma, &all, None, |_| false)
                .is_some(),
            "all tried: any ready endpoint"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_takes_turns_and_least_request_avoids_the_busy() {
        let b = Balancer::default();
        b.update(&[ep(1, true), ep(2, true), ep(3, true)]);
        let turns: Vec<u16> = (0..6)
            .map(|_| {
                b.pick_excluding(Lb::RoundRobin, &[], None, |_| false)
                    .unwrap()
                    .endpoint()
                    .addr
                    .port()
            })
            .collect();
        assert_eq!(turns[..3], turns[3..]);
        let mut sorted = turns[..3].to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, [1, 2, 3]);
        // Two busy endpoints (a pick forced onto each by marking the others ejected): least-request
        // goes to the idle one whenever it is among the two drawn.
        let busy: Vec<_> = [1, 2]
            .iter()
            .flat_map(|_| {
                [1, 2].map(|port| b.pick_excluding(Lb::Random, &[], None, |a| a.port() != port))
            })
            .collect();
        let mut idle = 0;
        for _ in 0..100 {
            let p = b
                .pick_excluding(Lb::LeastRequest, &[], None, |_| false)
                .unwrap();
            if p.endpoint().addr.port() == 3 {
                idle += 1;
            }
        }
        drop(busy);
        assert!(idle >= 55, "the idle endpoint got {idle} of 100");
    }

    #[tokio::test(start_paused = true)]
    async fn hashing_sends_a_key_to_the_same_endpoint_and_moves_only_the_leavers_keys() {
        let b = Balancer::default();
        b.update(&[ep(1, true), ep(2, true), ep(3, true)]);
        let pick = |k: u64| {
            b.pick_excluding(Lb::Hash(k), &[], None, |_| false)
                .unwrap()
                .endpoint()
                .addr
                .port()
        };
        let before: Vec<u16> = (0..200).map(pick).collect();
        assert_eq!(before, (0..200).map(pick).collect::<Vec<_>>(), "stable");
        for port in 1..=3 {
            assert!(
                before.iter().filter(|p| **p == port).count() > 30,
                "spread: {port}"
            );
        }
        b.update(&[ep(1, true), ep(3, true)]);
        for (k, old) in before.iter().enumerate() {
            let now = pick(k as u64);
            if *old != 2 {
                assert_eq!(now, *old, "key {k} moved although its endpoint stayed");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn statistics_survive_an_update_and_picks_release_on_drop() {
        let b = Balancer::default();
        b.update(&[ep(1, true)]);
        let p = b.pick().unwrap();
        b.update(&[ep(1, true), ep(2, true)]);
        let slot1 = b
            .slots()
            .into_iter()
            .find(|s| s.endpoint.addr.port() == 1)
            .unwrap();
        assert_eq!(slot1.pending(), 1);
        drop(p);
        assert_eq!(slot1.pending(), 0);
    }
}
