//! `AuthorizationPolicy` (API.md 2.a): which identities may call what on the targets' inbound
//! ports. Rules are OR-ed; within a rule `from`, `to` and `when` are AND-ed.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::PolicyStatus;
use crate::model::TargetRef;

/// Allow or deny callers by identity, method and path.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "policy.ferrymesh.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "authz",
    category = "ferrymesh",
    doc = "Identity-based authorization at the targets' inbound proxies",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(
        name = "Targets",
        type_ = "string",
        json_path = ".spec.targetRefs[*].name"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Programmed",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    cel
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.targetRefs.all(t, t.group == '' && (t.kind == 'Namespace' || t.kind == 'Service'))").message("targets a Namespace or a Service (its workloads' inbound ports)"))]
pub struct AuthorizationPolicySpec {
    /// Namespaces or Services (their workloads' inbound ports), 1 to 16.
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Vec<TargetRef>,
    /// Allow | Deny.
    #[schemars(extend("enum" = ["Allow", "Deny"]))]
    pub action: String,
    /// 1 to 64 rules; a request matching any rule matches the policy.
    #[schemars(length(min = 1, max = 64))]
    pub rules: Vec<AuthzRule>,
}

/// One rule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// Who calls.
    #[serde(default)]
    pub from: RuleFrom,
    /// What is called.
    #[serde(default)]
    pub to: RuleTo,
    /// JWT claims (refused until JWT authentication exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub when: Option<serde_json::Value>,
}

/// The caller.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleFrom {
    /// SPIFFE ids; a trailing `/*` segment matches any last segment.
    #[serde(default)]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    #[x_kube(validation = Rule::new("self.all(i, i.startsWith('spiffe://') && !i.substring(0, i.size() - 1).contains('*') && (!i.endsWith('*') || i.endsWith('/*')))").message("identities are spiffe:// URIs with at most one trailing * segment"))]
    pub identities: Vec<String>,
    /// Sugar for identities.
    #[serde(default)]
    pub service_accounts: Vec<ServiceAccount>,
    /// Callers from these namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// JWT principals (refused until JWT authentication exists).
    #[serde(default)]
    pub request_principals: Vec<String>,
    /// Peer address CIDRs.
    #[serde(default)]
    pub networks: Vec<String>,
}

/// A service account.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccount {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// The request.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleTo {
    /// HTTP methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Paths (Gateway API path matches), compared after normalisation.
    #[serde(default)]
    pub paths: Vec<Path>,
}

/// A path match.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Path {
    /// Exact | PathPrefix (default).
    #[serde(rename = "type")]
    #[schemars(extend("enum" = ["Exact", "PathPrefix"]))]
    pub kind: Option<String>,
    /// The path.
    pub value: String,
}
