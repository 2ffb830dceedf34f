//! What went wrong when the proxy answers a request itself: one typed value carried in the
//! response's extensions from where it happens to the edge, where [`write_header`] writes it once
//! as `ferrymesh-error: <label>`. Classifiers (retry, breaker, outlier detection, fallback, logs)
//! match the type; an upstream proxy's header is read back into the type once, in
//! [`from_upstream`].

use http::{HeaderMap, HeaderName, HeaderValue, Response};

/// The header on every response the proxy itself produces, naming the cause.
pub static FERRYMESH_ERROR: HeaderName = HeaderName::from_static("ferrymesh-error");

/// Why the proxy answered instead of the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyError {
    /// The request itself is unusable (no host, bad URI, unsafe path).
    BadRequest,
    /// `only-if-cached` and nothing fresh is stored.
    CacheMiss,
    /// The circuit breaker is open: failed fast.
    CircuitOpen,
    /// The caller's request body broke off: the caller's fault, never the upstream's.
    ClientAborted,
    /// No connection (refused, unreachable, handshake refused, connect timeout).
    ConnectFailed,
    /// No discovery answer in time.
    DiscoveryTimeout,
    /// A fault injected by policy.
    FaultInjected,
    /// Authorization denied the request.
    Forbidden,
    /// A route's backend is not in the mesh.
    NoBackend,
    /// The service has no endpoint to send to.
    NoEndpoints,
    /// No route rule matches.
    NoRoute,
    /// The bulkhead is full.
    Overloaded,
    /// No response within the request or per-try timeout.
    Timeout,
    /// The host is neither a mesh service nor resolvable.
    UnknownHost,
    /// The upstream reset the stream or broke the connection.
    UpstreamReset,
}

impl ProxyError {
    const ALL: [ProxyError; 15] = [
        Self::BadRequest,
        Self::CacheMiss,
        Self::CircuitOpen,
        Self::ClientAborted,
        Self::ConnectFailed,
        Self::DiscoveryTimeout,
        Self::FaultInjected,
        Self::Forbidden,
        Self::NoBackend,
        Self::NoEndpoints,
        Self::NoRoute,
        Self::Overloaded,
        Self::Timeout,
        Self::UnknownHost,
        Self::UpstreamReset,
    ];

    /// The `ferrymesh-error` label (also in logs, metrics and spans).
    pub const fn label(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::CacheMiss => "cache-miss",
            Self::CircuitOpen => "circuit-open",
            Self::ClientAborted => "client-aborted",
            Self::ConnectFailed => "connect-failed",
            Self::DiscoveryTimeout => "discovery-timeout",
            Self::FaultInjected => "fault-injected",
            Self::Forbidden => "forbidden",
            Self::NoBackend => "no-backend",
            Self::NoEndpoints => "no-endpoints",
            Self::NoRoute => "no-route",
            Self::Overloaded => "overloaded",
            Self::Timeout => "timeout",
            Self::UnknownHost => "unknown-host",
            Self::UpstreamReset => "upstream-reset",
        }
    }

    /// The error a label names.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.label() == label)
    }

    /// Another attempt, on another endpoint, may succeed where this one failed (which of
    /// these a policy retries is its `retryOn`).
    pub const fn retryable(self) -> bool {
        matches!(
            self,
            Self::ConnectFailed | Self::UpstreamReset | Self::Timeout
        )
    }

    /// The error a response carries, if the proxy (this one or an upstream one) made it.
    pub fn of<B>(rsp: &Response<B>) -> Option<Self> {
        rsp.extensions().get::<Self>().copied()
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A response from an upstream: a `ferrymesh-error` header set by the proxy there becomes the
/// typed error here, so an upstream sidecar's `connect-failed` (its app is gone) is retried
/// like our own.
pub fn from_upstream<B>(rsp: &mut Response<B>) {
    if let Some(e) = rsp
        .headers()
        .get(&FERRYMESH_ERROR)
        .and_then(|v| v.to_str().ok())
        .and_then(ProxyError::from_label)
    {
        rsp.extensions_mut().insert(e);
    }
}

/// At the edge, once: the typed error written as the `ferrymesh-error` header.
pub fn write_header<B>(rsp: &mut Response<B>) {
    if let Some(e) = ProxyError::of(rsp) {
        rsp.headers_mut()
            .insert(&FERRYMESH_ERROR, HeaderValue::from_static(e.label()));
    }
}

/// Whether headers carry a proxy error label (for callers that only see headers).
pub fn in_headers(headers: &HeaderMap) -> Option<ProxyError> {
    headers
        .get(&FERRYMESH_ERROR)
        .and_then(|v| v.to_str().ok())
        .and_then(ProxyError::from_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_only_transport_failures_are_retryable() {
        for e in ProxyError::ALL {
            assert_eq!(ProxyError::from_label(e.label()), Some(e));
        }
        assert_eq!(ProxyError::from_label("made-up"), None);
        let retryable: Vec<_> = ProxyError::ALL
            .into_iter()
            .filter(|e| e.retryable())
            .collect();
        assert_eq!(
            retryable,
            [
                ProxyError::ConnectFailed,
                ProxyError::Timeout,
                ProxyError::UpstreamReset
            ]
        );
    }

    #[test]
    fn the_header_is_written_at_the_edge_and_read_back_upstream() {
        let mut rsp = Response::new(());
        rsp.extensions_mut().insert(ProxyError::NoEndpoints);
        assert!(rsp.headers().get(&FERRYMESH_ERROR).is_none());
        write_header(&mut rsp);
        assert_eq!(rsp.headers()[&FERRYMESH_ERROR], "no-endpoints");

        // The next hop sees only the header.
        let mut next = Response::new(());
        *next.headers_mut() = rsp.headers().clone();
        assert_eq!(ProxyError::of(&next), None);
        from_upstream(&mut next);
        assert_eq!(ProxyError::of(&next), Some(ProxyError::NoEndpoints));

        // An app's header that names nothing we know is not taken for ours.
        let mut app = Response::new(());
        app.headers_mut()
            .insert(&FERRYMESH_ERROR, HeaderValue::from_static("whatever"));
        from_upstream(&mut app);
        assert_eq!(ProxyError::of(&app), None);
    }
}
