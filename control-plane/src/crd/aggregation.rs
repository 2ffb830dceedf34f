//! `Aggregation` (API.md 2.a, gateway mode): one gateway request fanned out to several
//! services, answered as one JSON object. The gateway mode that serves it is not built yet;
//! the CRD is installed so routes can reference it and its validation holds.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::PolicyStatus;
use super::resilience::{BackendRef, DURATION};

/// Parts requested in parallel and merged into one response.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.ferrymesh.io",
    version = "v1alpha1",
    kind = "Aggregation",
    namespaced,
    status = "PolicyStatus",
    shortname = "agg",
    category = "ferrymesh",
    doc = "Request aggregation at the gateway, referenced from an HTTPRoute ExtensionRef filter",
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
pub struct AggregationSpec {
    /// 2 to 8 parts, fanned out in parallel.
    #[schemars(length(min = 2, max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub parts: Vec<Part>,
    /// Request headers passed to every part.
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// How the parts become one response.
    pub response: Option<Merge>,
}

/// One part.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.onError) || (has(self.required) && !self.required)").message("onError only on a part with required: false"))]
pub struct Part {
    /// Its key in the merged response.
    pub name: String,
    /// The service asked.
    pub backend_ref: BackendRef,
    /// Path template: `{query.x}`, `{header.x}`, `{path}`.
    pub path: String,
    /// Per part.
    #[schemars(regex(pattern = DURATION))]
    pub timeout: Option<String>,
    /// A failed required part fails the whole response (502).
    pub required: Option<bool>,
    /// What an optional part answers when it fails.
    pub on_error: Option<OnError>,
}

/// A placeholder.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OnError {
    /// The body used instead.
    pub body: String,
}

/// The merge.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Merge {
    /// JsonObject: `{"<part>": <its body>, ...}`.
    #[schemars(extend("enum" = ["JsonObject"]))]
    pub merge: String,
}
