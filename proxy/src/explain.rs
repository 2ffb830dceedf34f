//! `ferrymesh-explain`: a request sent with `ferrymesh-explain: 1` gets a response header of the
//! same name that tells what the proxy did for it: each attempt (endpoint, status, time), each
//! retry and its backoff or why there was none, the breaker, the fallback. Students see why a
//! request was retried, ejected or failed fast without reading logs.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderName, HeaderValue};

/// The request and response header.
pub static FERRYMESH_EXPLAIN: HeaderName = HeaderName::from_static("ferrymesh-explain");

/// Collected decisions of one request (a request extension).
#[derive(Debug, Clone, Default)]
pub struct Explain {
    notes: Arc<Mutex<Vec<String>>>,
    /// Only for the access log: no response header.
    silent: bool,
}

impl Explain {
    /// Takes the request's `ferrymesh-explain` header off; a collector when it asked for one.
    pub fn from_request(headers: &mut HeaderMap) -> Option<Explain> {
        let asked = headers.remove(&FERRYMESH_EXPLAIN)?;
        (asked.as_bytes() != b"0").then(Explain::default)
    }

    /// A collector for the access log only (writes no header).
    pub fn silent() -> Explain {
        Explain {
            notes: Arc::default(),
            silent: true,
        }
    }

    /// The decisions so far.
    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().expect("explain lock poisoned").clone()
    }

    /// Notes one decision.
    pub fn note(&self, line: impl Into<String>) {
        self.notes
            .lock()
            .expect("explain lock poisoned")
            .push(line.into());
    }

    /// Writes the summary into `headers` (`; ` between decisions, visible ASCII only).
    pub fn write(&self, headers: &mut HeaderMap) {
        if self.silent {
            return;
        }
        let lines = self.notes.lock().expect("explain lock poisoned");
        let mut text = String::new();
        for (i, l) in lines.iter().enumerate() {
            if i > 0 {
                text.push_str("; ");
            }
            let _ = write!(text, "{l}");
        }
        let clean: String = text
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&clean) {
            headers.insert(&FERRYMESH_EXPLAIN, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_request_that_asks_gets_a_summary() {
        let mut h = HeaderMap::new();
        assert!(Explain::from_request(&mut h).is_none());
        h.insert(&FERRYMESH_EXPLAIN, HeaderValue::from_static("1"));
        let e = Explain::from_request(&mut h).unwrap();
        assert!(!h.contains_key(&FERRYMESH_EXPLAIN), "not forwarded");
        e.note("attempt 1 127.0.0.1:1 503 2ms");
        e.note("retry 5xx after 25ms\u{e9}");
        let mut out = HeaderMap::new();
        e.write(&mut out);
        assert_eq!(
            out[&FERRYMESH_EXPLAIN],
            "attempt 1 127.0.0.1:1 503 2ms; retry 5xx after 25ms?"
        );
    }
}
