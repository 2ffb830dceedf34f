//! The controller's model of the platform: the typed objects every source produces (services,
//! endpoint slices, pods, routes, policies) and the keys that name them. Sources, the CRD types
//! and the index all build on it; it depends on none of them.

use std::path::PathBuf;

use ferrymesh_proto::config::v1 as cfg;

/// Identity of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ObjectKey {
    /// Kind, e.g. `Service`.
    pub kind: String,
    /// Namespace (`default` when the document leaves it out).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

/// Metadata every object carries.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Meta {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`, `default` when absent.
    pub namespace: String,
    /// `metadata.generation`; 1 when absent (local files have no API server to count).
    pub generation: i64,
    /// Local mode: the file the object came from.
    pub file: Option<PathBuf>,
}

/// One object the controller understands.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A core `v1` Service.
    Service(Service),
    /// A `discovery.k8s.io/v1` EndpointSlice (static endpoints for unmeshed backends).
    EndpointSlice(EndpointSlice),
    /// One of our policy kinds, checked for shape and kept for translation.
    Policy(Box<Policy>),
    /// A Gateway API HTTPRoute or GRPCRoute.
    Route(Box<Route>),
    /// A Pod (Kubernetes source): what the mesh needs to know of an endpoint.
    Pod(Pod),
    /// A Namespace: its annotations (injection opt-in, default inbound policy).
    Namespace(Namespace),
}

/// The part of a Pod the mesh uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Pod {
    /// Metadata.
    pub meta: Meta,
    /// `spec.serviceAccountName` (`default` when absent).
    pub service_account: String,
    /// Carries the sidecar (`ferrymesh.io/injected: "true"`): its endpoints speak mTLS with
    /// the service account's identity.
    pub injected: bool,
}

/// A Namespace's annotations.
#[derive(Clone, Debug, PartialEq)]
pub struct Namespace {
    /// Metadata (the namespace field is empty: namespaces are cluster-scoped).
    pub meta: Meta,
    /// `metadata.annotations`.
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl Object {
    /// The object's metadata.
    pub fn meta(&self) -> &Meta {
        match self {
            Object::Service(s) => &s.meta,
            Object::EndpointSlice(e) => &e.meta,
            Object::Policy(p) => &p.meta,
            Object::Route(r) => &r.meta,
            Object::Pod(p) => &p.meta,
            Object::Namespace(n) => &n.meta,
        }
    }

    /// The object's kind, as written in YAML.
    pub fn kind(&self) -> &str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Policy(p) => p.kind.as_str(),
            Object::Route(r) => r.kind.as_str(),
            Object::Pod(_) => "Pod",
            Object::Namespace(_) => "Namespace",
        }
    }

    /// `kind/namespace/name`.
    pub fn key(&self) -> ObjectKey {
        let meta = self.meta();
        ObjectKey {
            kind: self.kind().to_owned(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
        }
    }
}

/// The protocol of a service port, from `appProtocol` (or the port name's prefix, as Istio does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PortProtocol {
    /// HTTP/1.1 or HTTP/2, detected.
    Http,
    /// HTTP/2 prior knowledge.
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// Bytes as they are.
    Opaque,
}

/// A port of a [`Service`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    /// Port name (`sectionName` in policy targetRefs).
    pub name: String,
    /// Service port.
    pub port: u16,
    /// How proxies treat the bytes.
    pub protocol: PortProtocol,
}

/// A Service: a name and its ports.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    /// Metadata.
    pub meta: Meta,
    /// Ports; at least one.
    pub ports: Vec<ServicePort>,
    /// `spec.clusterIP` and `spec.clusterIPs` (dual stack), when set: transparent
    /// interception resolves them.
    pub cluster_ips: Vec<std::net::IpAddr>,
}

/// Static endpoints of a service.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointSlice {
    /// Metadata.
    pub meta: Meta,
    /// The label `kubernetes.io/service-name`.
    pub service: String,
    /// Ports by name: the endpoint port for each service port name.
    pub ports: Vec<(String, u16)>,
    /// Endpoints.
    pub endpoints: Vec<SliceEndpoint>,
}

/// One endpoint of an [`EndpointSlice`].
#[derive(Clone, Debug, PartialEq)]
pub struct SliceEndpoint {
    /// Addresses (IPs).
    pub addresses: Vec<std::net::IpAddr>,
    /// `conditions.ready` (absent = true).
    pub ready: bool,
    /// `conditions.serving` (absent = ready).
    pub serving: bool,
    /// `conditions.terminating` (absent = false).
    pub terminating: bool,
    /// `zone`.
    pub zone: String,
    /// `targetRef.name` when the endpoint is a Pod (its identity comes from the Pod).
    pub target_pod: Option<String>,
}

/// A Gateway API `HTTPRoute` or `GRPCRoute`, validated. The mesh serves the routes whose parent
/// is a Service (GAMMA); Gateway parents wait for the gateway mode.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// Metadata.
    pub meta: Meta,
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: String,
    /// The Services it attaches to (other parents are kept out).
    pub parents: Vec<RouteParent>,
    /// True when some parent is a Gateway.
    pub gateway_parents: bool,
    /// Rules, in order.
    pub rules: Vec<RouteRule>,
}

/// A Service parent of a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteParent {
    /// Service name.
    pub name: String,
    /// Its namespace (the route's when unset).
    pub namespace: String,
    /// Only this service port, when set.
    pub port: Option<u16>,
    /// Only the service port of this name, when set.
    pub section_name: Option<String>,
}

/// One rule of a route.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteRule {
    /// `rules[].name`, when set (policies target it as `sectionName`).
    pub name: Option<String>,
    /// Any one matches; at least one (a rule without matches matches every request).
    pub matches: Vec<cfg::RouteMatch>,
    /// Weighted backends; empty means the parent Service itself.
    pub backends: Vec<cfg::WeightedBackend>,
    /// HTTPRoute `timeouts` (request, backendRequest as perTry).
    pub timeouts: Option<cfg::Timeouts>,
    /// HTTPRoute `retry` and the budget it gets.
    pub retry: Option<(cfg::Retry, cfg::RetryBudget)>,
}

/// A reference from a policy to what it applies to (GEP-713
/// LocalPolicyTargetReferenceWithSectionName): same namespace as the policy.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct TargetRef {
    /// `""` for core kinds (Namespace, Service), `gateway.networking.k8s.io` for routes and
    /// Gateways.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub group: String,
    /// Namespace, Service, HTTPRoute, GRPCRoute or Gateway.
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    /// Name, same namespace as the policy.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Port name, route rule name or listener name.
    #[serde(
        default,
        rename = "sectionName",
        skip_serializing_if = "Option::is_none"
    )]
    pub section_name: Option<String>,
}

/// One of our policy kinds, checked for shape; ResiliencePolicy fully validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Metadata.
    pub meta: Meta,
    /// API group, e.g. `policy.ferrymesh.io`.
    pub group: String,
    /// Kind, e.g. `ResiliencePolicy`.
    pub kind: String,
    /// `spec.targetRefs`.
    pub target_refs: Vec<TargetRef>,
    /// ResiliencePolicy only: its sections, validated and in the form proxies get.
    pub resilience: Option<ResilienceSections>,
    /// FaultInjection only: the fault, validated.
    pub fault: Option<FaultSpec>,
    /// AuthenticationPolicy only: `mtls.mode` (`Some(true)`: Strict), when set.
    pub mtls_strict: Option<bool>,
    /// AuthorizationPolicy only: its action and rules, validated.
    pub authorization: Option<AuthzSpec>,
    /// The spec as written.
    pub spec: serde_json::Value,
}

/// Which proxies inject a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultSide {
    /// The target's inbound proxies (callers' retries and breakers react as to a real failure).
    Server,
    /// The callers' outbound proxies (before retries, as in Istio).
    Client,
}

/// What an abort answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAbort {
    /// An HTTP status.
    Http(u16),
    /// A gRPC status (HTTP 200 with `grpc-status`).
    Grpc(u32),
}

/// A validated FaultInjection.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultSpec {
    /// Server or client side.
    pub side: FaultSide,
    /// `workloadSelector.matchLabels` (server side).
    pub selector: std::collections::BTreeMap<String, String>,
    /// `match.headers`: (lowercase name, exact value).
    pub headers: Vec<(String, String)>,
    /// Delay and its percentage.
    pub delay: Option<(std::time::Duration, f64)>,
    /// Abort and its percentage.
    pub abort: Option<(FaultAbort, f64)>,
    /// How long after creation the fault ends.
    pub duration: std::time::Duration,
}

/// The sections of a ResiliencePolicy, each taken whole when merging (section-atomic).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ResilienceSections {
    /// `timeouts`.
    pub timeouts: Option<cfg::Timeouts>,
    /// `retry`.
    pub retry: Option<cfg::Retry>,
    /// `retry.budget` (defaults filled in): set whenever `retry` is.
    pub budget: Option<cfg::RetryBudget>,
    /// `circuitBreaker`.
    pub breaker: Option<cfg::CircuitBreaker>,
    /// `outlierDetection`.
    pub outlier: Option<cfg::OutlierDetection>,
    /// `healthCheck`.
    pub health_check: Option<cfg::HealthCheck>,
    /// `fallback`.
    pub fallback: Option<cfg::Fallback>,
    /// `cache`.
    pub cache: Option<cfg::Cache>,
    /// `loadBalancer`.
    pub lb: Option<cfg::LoadBalancer>,
}

impl ResilienceSections {
    /// True when no section is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A service's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// A validated AuthorizationPolicy.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthzSpec {
    /// `Deny` (else `Allow`).
    pub deny: bool,
    /// Its rules (sources filled in by the index).
    pub rules: Vec<cfg::AuthzRule>,
}

/// Why a file was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("{}: {object}: {field}: {message}", file.display())]
pub struct ParseError {
    /// The file.
    pub file: PathBuf,
    /// `Kind namespace/name`, or `document N` before the name is known.
    pub object: String,
    /// Path of the offending field, e.g. `spec.ports[0].port`; `.` for the whole document.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// What a file held: objects, plus warnings for documents that were skipped.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Objects, in file order.
    pub objects: Vec<Object>,
    /// One line per skipped document.
    pub warnings: Vec<String>,
}
