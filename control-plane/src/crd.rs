//! The custom resources of API.md 2.a as Rust types: the controller's Kubernetes source reads
//! them, its file source parses the same types from YAML, and `ferrymesh-controller crds`
//! prints their CustomResourceDefinitions (OpenAPI schema from the types, CEL rules from the
//! `x_kube(validation)` attributes, printer columns, short names). The YAML under
//! `manifests/crds/` is this output (`make crds`), never edited by hand.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResourceExt as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod aggregation;
pub mod authn;
pub mod authz;
pub mod fault;
pub mod resilience;

pub use aggregation::Aggregation;
pub use authn::AuthenticationPolicy;
pub use authz::AuthorizationPolicy;
pub use fault::FaultInjection;
pub use resilience::ResiliencePolicy;

/// The policy group.
pub const POLICY_GROUP: &str = "policy.ferrymesh.io";
/// The gateway extension group.
pub const GATEWAY_GROUP: &str = "gateway.ferrymesh.io";
/// `controllerName` in status ancestors.
pub const CONTROLLER_NAME: &str = "ferrymesh.io/controller";

/// The status every policy kind carries (GEP-713): a rollup for `kubectl wait` and the
/// printer columns, and the same conditions per target.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Accepted, ResolvedRefs and Programmed, over all targets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The same, per target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ancestors: Vec<PolicyAncestorStatus>,
    /// FaultInjection only: when the fault stops being served (creation + duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// One target's conditions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAncestorStatus {
    /// The target.
    pub ancestor_ref: AncestorRef,
    /// Always `ferrymesh.io/controller`.
    pub controller_name: String,
    /// Accepted, ResolvedRefs, Programmed for this target.
    pub conditions: Vec<Condition>,
}

/// A target, with its namespace (Gateway API ParentReference).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AncestorRef {
    /// `""` for core kinds.
    #[serde(default)]
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Port, rule or listener name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// Every CustomResourceDefinition, in a stable order.
pub fn all()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    [
        ResiliencePolicy::crd(),
        AuthenticationPolicy::crd(),
        AuthorizationPolicy::crd(),
        FaultInjection::crd(),
        Aggregation::crd(),
    ]
    .iter()
    .map(with_api_server_formats)
    .collect()
}

/// schemars names Rust's integer widths (`uint16`, `uint32`, ...) as formats; the API server
/// knows only `int32` and `int64` for integers (and warns on any other). The bounds stay in
/// `minimum`/`maximum`, so the width is still enforced.
fn with_api_server_formats(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(f)) = m.get("format") {
                    let known = match f.as_str() {
                        "int8" | "int16" | "uint8" | "uint16" => Some("int32"),
                        "uint32" | "uint64" | "uint" | "int" => Some("int64"),
                        _ => None,
                    };
                    if let Some(k) = known {
                        m.insert("format".into(), k.into());
                    }
                }
                m.values_mut().for_each(walk);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut json = serde_json::to_value(crd).expect("a CRD serialises");
    walk(&mut json);
    serde_json::from_value(json).expect("only formats changed")
}

/// Each CRD as `(file name, YAML)`, as `make crds` writes them under `manifests/crds/`.
///
/// # Panics
/// Never: generated CRDs always serialise.
pub fn files() -> Vec<(String, String)> {
    all()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = serde_yaml_ng::to_string(&crd).expect("a CRD serialises");
            (
                format!("{name}.yaml"),
                format!(
                    "# Generated by `ferrymesh-controller crds` (make crds); do not edit.\n{yaml}"
                ),
            )
        })
        .collect()
}

/// The OpenAPI schema of a policy kind's CRD, by `(group, kind)`.
fn schema(group: &str, kind: &str) -> Option<serde_json::Value> {
    let crd = all()
        .into_iter()
        .find(|c| c.spec.group == group && c.spec.names.kind == kind)?;
    let schema = crd
        .spec
        .versions
        .first()?
        .schema
        .clone()?
        .open_api_v3_schema?;
    serde_json::to_value(schema).ok()
}

/// Runs the CEL rules of the kind's CRD (`x-kubernetes-validations`) on an object, as the API
/// server does on admission, so the file source refuses what a cluster would. Each failure is
/// `(field path, message)`. Kinds without a CRD pass.
pub fn check_cel(
    group: &str,
    kind: &str,
    object: &serde_json::Value,
) -> Result<(), Vec<(String, String)>> {
    let Some(schema) = schema(group, kind) else {
        return Ok(());
    };
    kube::core::cel::Validator::new()
        .validate(&schema, object, None)
        .map_err(|errors| {
            errors
                .into_vec()
                .into_iter()
                .map(|e| (e.field_path, e.message))
                .collect()
        })
}

#[cfg(test)]
mod tests;
