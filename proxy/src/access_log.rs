//! The access log: one JSON line per request on stdout (where `kubectl logs` and `ferryctl up`'s
//! log files find it), switched on and sampled per workload (`accessLog.sample` in the
//! ProxyConfig). The fields are documented in docs/access-log.md.

use std::io::Write as _;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use serde::Serialize;

/// One request.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// Milliseconds since the Unix epoch, when the request arrived.
    pub start_ms: u64,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The mesh service (`namespace/name`) or `passthrough`.
    pub service: &'a str,
    /// Method.
    pub method: &'a str,
    /// Authority as the caller named it.
    pub authority: &'a str,
    /// Path (the normalised one, inbound).
    pub path: &'a str,
    /// Response status.
    pub status: u16,
    /// Until the response head, in milliseconds.
    pub duration_ms: f64,
    /// `ferrymesh-error` when the proxy answered itself.
    pub error: Option<&'a str>,
    /// The endpoint of the last attempt (outbound).
    pub upstream: Option<String>,
    /// Attempts made (outbound).
    pub attempts: usize,
    /// Every decision, as `ferrymesh-explain` tells them (retries, ejections, breaker, fallback,
    /// cache, faults, route).
    pub decisions: Vec<String>,
    /// The W3C trace id, when the request carried a valid `traceparent`.
    pub trace_id: Option<&'a str>,
    /// The caller's SPIFFE id (inbound, over mTLS).
    pub peer: Option<&'a str>,
}

/// Whether this request is logged at `ratio` (0..=1).
pub fn sampled(ratio: f64) -> bool {
    ratio >= 1.0 || (ratio > 0.0 && rand::random::<f64>() < ratio)
}

/// The trace id of a valid W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, not all zeros).
pub fn trace_id(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = v.split('-');
    let (Some(version), Some(trace), Some(span), Some(_flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(span, 16)
        && trace.bytes().any(|b| b != b'0'))
    .then_some(trace)
}

/// The endpoint and the number of attempts, read off the decisions (`attempt N <addr> ...`).
pub fn attempts(decisions: &[String]) -> (Option<String>, usize) {
    let attempts: Vec<&String> = decisions
        .iter()
        .filter(|d| d.starts_with("attempt "))
        .collect();
    let upstream = attempts
        .last()
        .and_then(|d| d.split_whitespace().nth(2))
        .filter(|a| a.parse::<std::net::SocketAddr>().is_ok())
        .map(str::to_owned);
    (upstream, attempts.len())
}

/// Milliseconds since the epoch of `at`.
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Milliseconds, with microseconds.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1_000.0
}

/// Live subscribers to this proxy's requests (`/tap` on the admin listener): each gets every
/// request's entry as a JSON line while it listens.
/// It also keeps the last entries of traced requests (those with a `traceparent`), so the path
/// of one request can be looked up afterwards by its trace id (`/recent`).
#[derive(Debug)]
pub struct Tap {
    live: tokio::sync::broadcast::Sender<std::sync::Arc<str>>,
    recent: std::sync::Mutex<std::collections::VecDeque<(String, std::sync::Arc<str>)>>,
}

/// Traced entries kept per proxy.
const RECENT: usize = 1_000;

impl Default for Tap {
    fn default() -> Self {
        Self {
            live: tokio::sync::broadcast::channel(1024).0,
            recent: std::sync::Mutex::default(),
        }
    }
}

impl Tap {
    /// The kept entries of the request with trace id `trace`.
    pub fn traced(&self, trace: &str) -> Vec<std::sync::Arc<str>> {
        self.recent
            .lock()
            .expect("tap lock poisoned")
            .iter()
            .filter(|(t, _)| t == trace)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// True while someone listens (only then are entries built for the tap).
    pub fn active(&self) -> bool {
        self.live.receiver_count() > 0
    }

    /// A new listener.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<std::sync::Arc<str>> {
        self.live.subscribe()
    }
}

/// Writes one entry: a line on stdout when `logged`, and to the tap's listeners.
pub fn emit(entry: &Entry<'_>, logged: bool, tap: &Tap) {
    let Ok(line) = serde_json::to_string(entry) else {
        return;
    };
    if logged {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    let line: std::sync::Arc<str> = line.into();
    if let Some(trace) = entry.trace_id {
        let mut recent = tap.recent.lock().expect("tap lock poisoned");
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back((trace.to_owned(), line.clone()));
    }
    if tap.active() {
        let _ = tap.live.send(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_come_only_from_valid_traceparents() {
        let mut h = HeaderMap::new();
        assert_eq!(trace_id(&h), None);
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(trace_id(&h), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f35-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            h.insert("traceparent", bad.parse().unwrap());
            assert_eq!(trace_id(&h), None, "{bad}");
        }
    }

    #[test]
    fn the_last_attempt_names_the_upstream() {
        let d = vec![
            "attempt 1 127.0.0.1:4000 503 1ms".to_owned(),
            "retry on 5xx after 5ms (budget: 9 left)".to_owned(),
            "attempt 2 127.0.0.1:4001 200 1ms".to_owned(),
        ];
        assert_eq!(attempts(&d), (Some("127.0.0.1:4001".into()), 2));
        assert_eq!(attempts(&[]), (None, 0));
    }

    #[test]
    fn sampling_is_all_none_or_some() {
        assert!((0..100).all(|_| sampled(1.0)));
        assert!((0..100).all(|_| !sampled(0.0)));
        let hits = (0..10_000).filter(|_| sampled(0.25)).count();
        assert!((2_000..3_000).contains(&hits), "{hits}");
    }
}
