//! `FaultInjection` (API.md 2.a): chaos for the course, always expiring.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::PolicyStatus;
use super::resilience::DURATION;
use crate::model::TargetRef;

/// Delays and aborts injected into the targets' traffic, for a limited time.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "policy.ferrymesh.io",
    version = "v1alpha1",
    kind = "FaultInjection",
    namespaced,
    status = "PolicyStatus",
    shortname = "fault",
    category = "ferrymesh",
    doc = "Injected delays and aborts that expire on their own",
    printcolumn(
        name = "Targets",
        type_ = "string",
        json_path = ".spec.targetRefs[*].name"
    ),
    printcolumn(
        name = "Delay%",
        type_ = "number",
        json_path = ".spec.delay.percentage"
    ),
    printcolumn(
        name = "Abort%",
        type_ = "number",
        json_path = ".spec.abort.percentage"
    ),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    cel
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.delay) || has(self.abort)").message("at least one of delay, abort"))]
#[x_kube(validation = Rule::new("!has(self.side) || self.side != 'Client' || !has(self.workloadSelector)").message("workloadSelector is for the server side only"))]
#[x_kube(validation = Rule::new("has(self.duration) && duration(self.duration) >= duration('1m') && duration(self.duration) <= duration('24h')").message("duration is required, 1m..24h"))]
pub struct FaultInjectionSpec {
    /// Services (and ports) or routes, 1 to 16.
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Vec<TargetRef>,
    /// Server (default: the target's inbound proxies inject) | Client (callers' proxies).
    #[schemars(extend("enum" = ["Server", "Client"]))]
    pub side: Option<String>,
    /// Server side: only the workloads with these labels.
    pub workload_selector: Option<Selector>,
    /// Only requests with these headers (an opt-in switch).
    #[serde(rename = "match")]
    pub matches: Option<Match>,
    /// A fixed delay for a share of requests.
    pub delay: Option<Delay>,
    /// An error answer for a share of requests.
    pub abort: Option<Abort>,
    /// How long the fault lasts from its creation, 1m..24h.
    #[schemars(regex(pattern = DURATION))]
    pub duration: Option<String>,
}

/// A label selector.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// Labels every selected workload has.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// Request matches.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Headers, all of which must be present with these values.
    #[serde(default)]
    pub headers: Vec<Header>,
}

/// A header and its value.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A delay.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Delay {
    /// How long.
    #[schemars(regex(pattern = DURATION))]
    pub fixed: String,
    /// Share of requests, 0..100 (default 100).
    #[schemars(range(min = 0, max = 100))]
    pub percentage: Option<f64>,
}

/// An abort.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.httpStatus) != has(self.grpcStatus)").message("exactly one of httpStatus, grpcStatus"))]
pub struct Abort {
    /// 200..599.
    #[schemars(range(min = 200, max = 599))]
    pub http_status: Option<u16>,
    /// 0..16.
    #[schemars(range(min = 0, max = 16))]
    pub grpc_status: Option<u32>,
    /// Share of requests, 0..100 (default 100).
    #[schemars(range(min = 0, max = 100))]
    pub percentage: Option<f64>,
}
