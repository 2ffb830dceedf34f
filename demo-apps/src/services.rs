//! The shop's services. Each module builds its business routes; `main` adds the chaos knobs,
//! `/healthz`, `/readyz` and the `x-ferry-instance` header every response carries.

pub mod catalog;
pub mod inventory;
pub mod orders;
pub mod payments;
pub mod pricing;
pub mod reviews;
pub mod storefront;

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;

/// How one service reaches the others: plain HTTP to `http://<service>.<namespace>`, through
/// `HTTP_PROXY` (the local sidecar) when it is set. No retries or breakers here: that is the
/// mesh's job (or, later, the in-app resilience mode's).
#[derive(Debug, Clone)]
pub struct Peers {
    client: reqwest::Client,
    namespace: String,
}

/// A failed call to a peer, as reported in responses.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerError {
    /// The HTTP status, when there was a response.
    pub status: Option<u16>,
    /// `ferrymesh-error` of a response the mesh made itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ferrymesh_error: Option<String>,
    /// What went wrong.
    pub message: String,
}

/// The W3C trace context of an incoming request (a new trace when it has none), passed on to
/// every call the service makes, each as a child with its own span id.
#[derive(Debug, Clone)]
pub struct Trace {
    /// 32 hex digits.
    pub trace_id: String,
    flags: String,
    state: Option<String>,
}

impl Trace {
    /// From `traceparent` / `tracestate`, or a fresh sampled trace.
    pub fn from_headers(headers: &axum::http::HeaderMap) -> Trace {
        let parent = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let parts: Vec<&str> = v.split('-').collect();
                let hex =
                    |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
                (parts.len() == 4
                    && hex(parts[0], 2)
                    && hex(parts[1], 32)
                    && hex(parts[2], 16)
                    && hex(parts[3], 2)
                    && parts[1].bytes().any(|b| b != b'0'))
                .then(|| (parts[1].to_owned(), parts[3].to_owned()))
            });
        let (trace_id, flags) =
            parent.unwrap_or_else(|| (format!("{:032x}", rand::random::<u128>() | 1), "01".into()));
        Trace {
            trace_id,
            flags,
            state: headers
                .get("tracestate")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
    }

    /// The headers of one outgoing call: a child span of this trace.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![(
            "traceparent",
            format!(
                "00-{}-{:016x}-{}",
                self.trace_id,
                rand::random::<u64>() | 1,
                self.flags
            ),
        )];
        if let Some(state) = &self.state {
            h.push(("tracestate", state.clone()));
        }
        h
    }
}

impl Peers {
    /// A client for `namespace`, honouring `HTTP_PROXY`.
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(namespace: String) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self { client, namespace })
    }

    /// `http://service.namespace` + path.
    pub fn url(&self, service: &str, path: &str) -> String {
        format!("http://{service}.{}{path}", self.namespace)
    }

    /// GET a JSON document from a peer, in `trace`.
    ///
    /// # Errors
    /// [`PeerError`] for transport errors, non-2xx answers and bad JSON.
    pub async fn get(&self, service: &str, path: &str, trace: &Trace) -> Result<Value, PeerError> {
        let mut req = self.client.get(self.url(service, path));
        for (k, v) in trace.headers() {
            req = req.header(k, v);
        }
        Self::json(req.send().await).await
    }

    /// POST a JSON document to a peer, in `trace`, with extra headers.
    ///
    /// # Errors
    /// As [`Peers::get`].
    pub async fn post(
        &self,
        service: &str,
        path: &str,
        body: &Value,
        headers: &[(&str, String)],
        trace: &Trace,
    ) -> Result<Value, PeerError> {
        let mut req = self.client.post(self.url(service, path)).json(body);
        for (k, v) in headers.iter().cloned().chain(trace.headers()) {
            req = req.header(k, v);
        }
        Self::json(req.send().await).await
    }

    async fn json(sent: reqwest::Result<reqwest::Response>) -> Result<Value, PeerError> {
        let rsp = sent.map_err(|e| PeerError {
            status: None,
            ferrymesh_error: None,
            message: e.to_string(),
        })?;
        let status = rsp.status();
        let mesh = rsp
            .headers()
            .get("ferrymesh-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = rsp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(PeerError {
                status: Some(status.as_u16()),
                ferrymesh_error: mesh,
                message: text.trim().chars().take(200).collect(),
            });
        }
        serde_json::from_str(&text).map_err(|e| PeerError {
            status: Some(status.as_u16()),
            ferrymesh_error: None,
            message: format!("bad JSON: {e}"),
        })
    }
}

/// A JSON error response.
pub fn error(status: StatusCode, message: impl Into<String>) -> (StatusCode, axum::Json<Value>) {
    (
        status,
        axum::Json(serde_json::json!({ "error": message.into() })),
    )
}

/// The shop's products: (id, name, price in cents, stock).
pub const PRODUCTS: &[(u32, &str, u32, u32)] = &[
    (1, "Ferry ticket", 1250, 40),
    (2, "Life vest", 4999, 12),
    (3, "Harbour map", 799, 0),
    (4, "Deck chair", 8900, 5),
    (5, "Captain's hat", 1999, 25),
];
