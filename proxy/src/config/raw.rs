//! The `ProxyConfig` document as written (API.md "Local mode"), before validation.

use serde::Deserialize;

use super::{InboundProtocol, UnknownHosts};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDoc {
    #[serde(rename = "apiVersion")]
    pub(super) api_version: String,
    pub(super) kind: String,
    pub(super) metadata: RawMeta,
    pub(super) spec: RawSpec,
}

#[derive(Deserialize)]
pub(super) struct RawMeta {
    pub(super) name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSpec {
    pub(super) workload: RawWorkload,
    pub(super) inbound: Option<RawInbound>,
    #[serde(default)]
    pub(super) outbound: RawOutbound,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) identity: RawIdentity,
    pub(super) control_plane: RawControlPlane,
    pub(super) access_log: Option<RawAccessLog>,
    pub(super) drain_timeout: Option<String>,
    pub(super) workers: Option<usize>,
    #[serde(default)]
    pub(super) app_probes: serde_json::Value,
    pub(super) opaque_ports: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawWorkload {
    pub(super) name: String,
    pub(super) namespace: Option<String>,
    pub(super) service_account: Option<String>,
    pub(super) service: Option<String>,
    pub(super) zone: Option<String>,
    #[serde(default)]
    pub(super) labels: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawInbound {
    pub(super) listen: String,
    pub(super) advertise: Option<String>,
    pub(super) app: String,
    pub(super) protocol: Option<InboundProtocol>,
    pub(super) readiness_path: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) default_policy: Option<String>,
    #[serde(default)]
    pub(super) transparent: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawOutbound {
    pub(super) mode: Option<String>,
    pub(super) listen: Option<String>,
    pub(super) listen_v6: Option<String>,
    pub(super) unknown_hosts: Option<UnknownHosts>,
    #[serde(default)]
    pub(super) listeners: Vec<RawFixed>,
    pub(super) connect_timeout: Option<String>,
    pub(super) request_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFixed {
    pub(super) listen: String,
    pub(super) service: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) health_listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawIdentity {
    pub(super) mode: Option<String>,
    pub(super) token_file: Option<String>,
    pub(super) trust_anchors: Option<String>,
    pub(super) trust_domain: Option<String>,
    pub(super) server_name: Option<String>,
    pub(super) lifetime: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccessLog {
    /// Share of requests logged, 0..1 (default 1).
    pub(super) sample: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControlPlane {
    pub(super) discovery: String,
    pub(super) identity: Option<String>,
}
