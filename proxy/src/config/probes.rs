//! The app's original probes (`FERRYMESH_APP_PROBES`), as the injector hands them over; the
//! health listener runs them (`crate::probes`).

use std::collections::BTreeMap;

use serde::Deserialize;

/// One original probe, in the Kubernetes field names.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    /// `httpGet`.
    pub http_get: Option<HttpGet>,
    /// `tcpSocket`.
    pub tcp_socket: Option<PortOnly>,
    /// `grpc`.
    pub grpc: Option<Grpc>,
    /// Seconds before the probe fails (Kubernetes default 1).
    pub timeout_seconds: Option<u64>,
}

/// `httpGet` (HTTP only: the injector leaves HTTPS probes alone and skips their ports).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGet {
    /// Path, default `/`.
    pub path: Option<String>,
    /// The app's port (a number: the injector resolves named ports).
    pub port: u16,
    /// `Host` header value; default the app's address.
    pub host: Option<String>,
    /// `HTTP` only.
    pub scheme: Option<String>,
    /// Extra request headers.
    #[serde(default)]
    pub http_headers: Vec<Header>,
}

/// A request header.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Header {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// `tcpSocket`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortOnly {
    /// The app's port.
    pub port: u16,
}

/// `grpc`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grpc {
    /// The app's port.
    pub port: u16,
    /// The health service name, default empty (the whole server).
    pub service: Option<String>,
}

/// Every rewritten path and its original probe.
pub type Probes = BTreeMap<String, Probe>;

/// Parses `FERRYMESH_APP_PROBES` and checks each probe has exactly one action.
///
/// # Errors
/// Not JSON of that shape, a path outside `/app-health/`, or a probe with no or two actions.
pub fn parse(json: &str) -> Result<Probes, String> {
    let probes: Probes = serde_json::from_str(json).map_err(|e| format!("app probes: {e}"))?;
    for (path, p) in &probes {
        if !path.starts_with("/app-health/") {
            return Err(format!("app probes: {path:?} is not under /app-health/"));
        }
        let actions = usize::from(p.http_get.is_some())
            + usize::from(p.tcp_socket.is_some())
            + usize::from(p.grpc.is_some());
        if actions != 1 {
            return Err(format!(
                "app probes: {path:?}: exactly one of httpGet, tcpSocket, grpc"
            ));
        }
        if let Some(h) = &p.http_get
            && h.scheme
                .as_deref()
                .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
        {
            return Err(format!(
                "app probes: {path:?}: only HTTP probes are proxied"
            ));
        }
    }
    Ok(probes)
}
