//! `AuthenticationPolicy` (API.md 2.a): the mTLS mode of the targets' inbound ports, and JWT
//! providers. JWT validation is not in the mesh yet: the schema is the API's, and the
//! controller refuses a policy that sets `jwt` (Accepted=False with the reason) rather than
//! ignore it.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::PolicyStatus;
use super::resilience::DURATION;
use crate::model::TargetRef;

/// A JWS algorithm name (RFC 7518 3.1, and RFC 8037's EdDSA).
pub const ALGORITHM: &str = "^((HS|RS|PS|ES)(256|384|512)|EdDSA)$";

/// How callers of the targets authenticate.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "policy.ferrymesh.io",
    version = "v1alpha1",
    kind = "AuthenticationPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "authn",
    category = "ferrymesh",
    doc = "mTLS mode (Strict or Permissive) and JWT providers for the targets' inbound ports",
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
pub struct AuthenticationPolicySpec {
    /// Namespaces or Services, 1 to 16.
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Vec<TargetRef>,
    /// Mutual TLS.
    pub mtls: Option<Mtls>,
    /// JWT bearer tokens.
    pub jwt: Option<Jwt>,
}

/// The mTLS mode.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    /// Strict (mesh certificates only) | Permissive (plaintext accepted too).
    #[schemars(extend("enum" = ["Strict", "Permissive"]))]
    pub mode: String,
}

/// JWT authentication.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Jwt {
    /// Required (a missing token is a 401) | Optional (a missing one is fine, a bad one not).
    #[schemars(extend("enum" = ["Required", "Optional"]))]
    pub requirement: Option<String>,
    /// Paths that need no token.
    #[serde(default)]
    pub exclude_paths: Vec<super::authz::Path>,
    /// 1 to 8 token issuers.
    #[schemars(length(min = 1, max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub providers: Vec<Provider>,
}

/// A token issuer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.algorithms.exists(a, a.startsWith('HS')) || has(self.jwks.secretRef)").message("HS* algorithms need jwks.secretRef"))]
pub struct Provider {
    /// Unique name.
    pub name: String,
    /// `iss`.
    pub issuer: String,
    /// Accepted `aud` values, at most 16.
    #[serde(default)]
    #[schemars(length(max = 16), inner(length(max = 253)))]
    pub audiences: Vec<String>,
    /// Accepted JWS algorithms (RFC 7518 names: HS256, RS256, PS256, ES256, EdDSA, ...), at
    /// most 12. Bounded so the CEL rule over them fits the API server's cost budget.
    #[serde(default)]
    #[schemars(length(max = 12), inner(length(max = 5), regex(pattern = ALGORITHM)))]
    pub algorithms: Vec<String>,
    /// Where the keys come from.
    pub jwks: Jwks,
    /// Where the token is read.
    pub from: Option<TokenFrom>,
    /// Allowed clock difference.
    #[schemars(regex(pattern = DURATION))]
    pub clock_skew: Option<String>,
    /// Pass the token on to the app.
    pub forward_token: Option<bool>,
    /// Claims copied into request headers.
    #[serde(default)]
    pub claim_to_headers: Vec<ClaimToHeader>,
}

/// Keys: exactly one source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.remote), has(self.inline), has(self.secretRef)].filter(x, x).size() == 1").message("exactly one of jwks.remote, jwks.inline, jwks.secretRef"))]
pub struct Jwks {
    /// Fetched by the controller.
    pub remote: Option<RemoteJwks>,
    /// A JWKS document.
    pub inline: Option<String>,
    /// A key in a Secret (HMAC).
    pub secret_ref: Option<SecretKeyRef>,
}

/// A JWKS URL.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.uri.startsWith('https://') || (has(self.allowInsecure) && self.allowInsecure)").message("remote.uri is https (http only with allowInsecure: true)"))]
pub struct RemoteJwks {
    /// URL.
    pub uri: String,
    /// How often it is fetched again.
    #[schemars(regex(pattern = DURATION))]
    pub refresh_interval: Option<String>,
    /// Per fetch.
    #[schemars(regex(pattern = DURATION))]
    pub fetch_timeout: Option<String>,
    /// Allow http:// (local demos only).
    pub allow_insecure: Option<bool>,
}

/// A key of a Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Secret name (same namespace).
    pub name: String,
    /// Key.
    pub key: String,
}

/// Where the token is read.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenFrom {
    /// Headers and their prefixes.
    #[serde(default)]
    pub headers: Vec<TokenHeader>,
    /// Query parameters.
    #[serde(default)]
    pub params: Vec<String>,
}

/// A token header.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenHeader {
    /// Header name.
    pub name: String,
    /// Text before the token, e.g. `Bearer `.
    pub prefix: Option<String>,
}

/// A claim copied to a header.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    /// Claim name.
    pub claim: String,
    /// Header name.
    pub header: String,
}
