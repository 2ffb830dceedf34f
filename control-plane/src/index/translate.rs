//! Objects + registered workloads -> Discovery resources. Pure functions: the same inputs give
//! the same resources and versions (a hash of the canonical bytes) on every replica.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use ferrymesh_proto::config::v1 as cfg;
use ferrymesh_proto::discovery::v1 as pb;
use prost::Message;
use sha2::{Digest, Sha256};

mod endpoints;

use self::endpoints::{endpoints, pod_identities, slice_sources};
use super::{Registered, Snapshot};
use crate::model::{Object, PortProtocol, Service, ServiceKey, ServicePort};

/// What the index knows of a service.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServiceInfo {
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// ClusterIPs, when declared.
    pub cluster_ips: Vec<IpAddr>,
    /// True when no Service object declares it and a registered workload implied it.
    pub implicit: bool,
}

/// Key of a per-service-port resource.
pub type ResourceKey = (ServiceKey, u16);

/// Every resource of a snapshot.
#[derive(Debug, Default)]
pub struct Resources {
    /// ENDPOINTS by service port.
    pub endpoints: BTreeMap<ResourceKey, Arc<pb::Resource>>,
    /// CLIENT_POLICY by service port.
    pub client_policies: BTreeMap<ResourceKey, Arc<pb::Resource>>,
    /// The INBOUND_POLICY every workload gets until authentication policies exist.
    pub inbound: Option<Arc<pb::Resource>>,
    cluster_ips: BTreeMap<IpAddr, ServiceKey>,
}

/// The answer to a subscription.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// The resource, named as subscribed.
    Found(Box<pb::Resource>),
    /// Explicitly absent.
    NotFound,
    /// The name cannot name anything of this type.
    Invalid(String),
}

/// Default port for an implicit service (a local workload with no Service object).
const IMPLICIT_PORT: u16 = 80;

pub(super) fn build<'a>(
    objects: impl Iterator<Item = &'a Object>,
    workloads: &[Registered],
    faults: &[super::faults::ActiveFault],
    fault_ttl: std::time::Duration,
    trust_domain: &str,
    warnings: &mut Vec<String>,
) -> (Resources, BTreeMap<ServiceKey, ServiceInfo>) {
    let now = std::time::SystemTime::now();
    let objects: Vec<&Object> = objects.collect();
    let identities = pod_identities(&objects, trust_domain);
    let mut services: BTreeMap<ServiceKey, (ServiceInfo, Option<&Service>)> = BTreeMap::new();
    for o in &objects {
        if let Object::Service(s) = o {
            let key = ServiceKey {
                namespace: s.meta.namespace.clone(),
                name: s.meta.name.clone(),
            };
            let info = ServiceInfo {
                ports: s.ports.clone(),
                cluster_ips: s.cluster_ips.clone(),
                implicit: false,
            };
            services.insert(key, (info, Some(s)));
        }
    }
    for w in workloads {
        let Some(svc) = w
            .node
            .local_workload
            .as_ref()
            .and_then(|l| l.service.as_ref())
        else {
            continue;
        };
        let key = ServiceKey {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
        };
        services.entry(key).or_insert_with(|| {
            let port = ServicePort {
                name: "http".into(),
                port: IMPLICIT_PORT,
                protocol: PortProtocol::Http,
            };
            (
                ServiceInfo {
                    ports: vec![port],
                    cluster_ips: Vec::new(),
                    implicit: true,
                },
                None,
            )
        });
    }

    unknown_route_services(&objects, &services, warnings);
    let mut resources = Resources::default();
    for (key, (info, declared)) in &services {
        for ip in &info.cluster_ips {
            resources.cluster_ips.insert(*ip, key.clone());
        }
        for port in &info.ports {
            let endpoints = endpoints(key, port, &objects, &identities, workloads, warnings);
            let service_source = declared.map(|s| object_ref("", "Service", &s.meta, &port.name));
            let mut ep_sources: Vec<cfg::ResourceRef> = service_source.iter().cloned().collect();
            ep_sources.extend(slice_sources(key, &objects));
            let body = pb::resource::Body::Endpoints(endpoints);
            resources.endpoints.insert(
                (key.clone(), port.port),
                Arc::new(resource(body, ep_sources)),
            );

            let (mut policy, sources) = client_policy(key, port, &objects, faults);
            let ttl = client_faults(&mut policy, key, faults, fault_ttl, now);
            let mut all_sources: Vec<cfg::ResourceRef> = service_source.into_iter().collect();
            all_sources.extend(sources);
            let body = pb::resource::Body::ClientPolicy(policy);
            let mut r = resource(body, all_sources);
            r.ttl = ttl;
            resources
                .client_policies
                .insert((key.clone(), port.port), Arc::new(r));
        }
    }
    let inbound = cfg::InboundPolicy {
        deny: Vec::new(),
        allow: Vec::new(),
        port: 0,
        protocol: cfg::Protocol::Http.into(),
        mtls: cfg::MtlsMode::Permissive.into(),
        default_policy: cfg::DefaultPolicy::AllUnauthenticated.into(),
        faults: Vec::new(),
    };
    resources.inbound = Some(Arc::new(resource(
        pb::resource::Body::InboundPolicy(inbound),
        Vec::new(),
    )));
    let services = services
        .into_iter()
        .map(|(k, (info, _))| (k, info))
        .collect();
    (resources, services)
}

/// A route that names services the mesh does not know is valid but does nothing: says so.
fn unknown_route_services<V>(
    objects: &[&Object],
    services: &BTreeMap<ServiceKey, V>,
    warnings: &mut Vec<String>,
) {
    for o in objects {
        let Object::Route(r) = o else { continue };
        let backends = r.rules.iter().flat_map(|rule| &rule.backends);
        let named = r
            .parents
            .iter()
            .map(|p| ("parent", p.namespace.clone(), p.name.clone()))
            .chain(backends.filter_map(|b| {
                let s = b.service.as_ref()?;
                Some(("backend", s.namespace.clone(), s.name.clone()))
            }));
        for (role, namespace, name) in named {
            if !services.contains_key(&ServiceKey {
                namespace: namespace.clone(),
                name: name.clone(),
            }) {
                warnings.push(format!(
                    "{} {}/{}: {role} Service {namespace}/{name} does not exist",
                    r.kind, r.meta.namespace, r.meta.name
                ));
            }
        }
    }
}

/// Puts the service's client-side fault into its policy; the TTL the resource needs for it and
/// for the route faults in its routes.
fn client_faults(
    policy: &mut cfg::ClientPolicy,
    key: &ServiceKey,
    faults: &[super::faults::ActiveFault],
    fault_ttl: std::time::Duration,
    now: std::time::SystemTime,
) -> Option<prost_types::Duration> {
    let client_faults: Vec<&super::faults::ActiveFault> = faults
        .iter()
        .filter(|f| f.side == crate::model::FaultSide::Client && f.service == *key)
        .collect();
    policy.fault = client_faults.first().map(|f| f.fault.clone());
    // Route faults travel in the routes; their TTLs bound the resource's too.
    let route_faults = faults.iter().filter(|f| {
        f.route.is_some()
            && policy
                .routes
                .iter()
                .any(|r| r.fault.as_ref().map(|x| &x.source) == Some(&f.fault.source))
    });
    super::faults::ttl(
        client_faults.iter().copied().take(1).chain(route_faults),
        fault_ttl,
        now,
    )
}

fn protocol(p: PortProtocol) -> cfg::Protocol {
    match p {
        PortProtocol::Http => cfg::Protocol::Http,
        PortProtocol::Http2 => cfg::Protocol::Http2,
        PortProtocol::Grpc => cfg::Protocol::Grpc,
        PortProtocol::Opaque => cfg::Protocol::Opaque,
    }
}

pub(super) fn object_ref(
    group: &str,
    kind: &str,
    meta: &crate::model::Meta,
    section: &str,
) -> cfg::ResourceRef {
    cfg::ResourceRef {
        group: group.to_owned(),
        kind: kind.to_owned(),
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        section: section.to_owned(),
        generation: meta.generation,
        file: meta
            .file
            .as_deref()
            .map(|f| f.display().to_string())
            .unwrap_or_default(),
    }
}

/// Specificity of a ResiliencePolicy target for this service port (higher wins), if it applies.
fn specificity(t: &crate::model::TargetRef, key: &ServiceKey, port: &ServicePort) -> Option<u8> {
    match (t.group.as_str(), t.kind.as_str()) {
        ("", "Namespace") if t.name == key.namespace => Some(1),
        ("", "Service") if t.name == key.name => match &t.section_name {
            None => Some(2),
            Some(section) if *section == port.name => Some(3),
            Some(_) => None,
        },
        _ => None,
    }
}

fn client_policy(
    key: &ServiceKey,
    port: &ServicePort,
    objects: &[&Object],
    faults: &[super::faults::ActiveFault],
) -> (cfg::ClientPolicy, Vec<cfg::ResourceRef>) {
    // Every ResiliencePolicy that applies, most specific first; at the same level the first
    // by name wins (objects from files have no creationTimestamp to order by).
    let mut applicable: Vec<(u8, &crate::model::Policy)> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Policy(p)
                if p.kind == "ResiliencePolicy" && p.meta.namespace == key.namespace =>
            {
                let level = p
                    .target_refs
                    .iter()
                    .filter_map(|t| specificity(t, key, port))
                    .max()?;
                Some((level, &**p))
            }
            _ => None,
        })
        .collect();
    applicable.sort_by(|(la, a), (lb, b)| lb.cmp(la).then_with(|| a.meta.name.cmp(&b.meta.name)));
    let sources: Vec<cfg::ResourceRef> = applicable
        .iter()
        .map(|(_, p)| object_ref(&p.group, &p.kind, &p.meta, ""))
        .collect();
    let mut section_sources = BTreeMap::new();
    // Section-atomic merge: each section whole from the first (most specific) policy setting it.
    macro_rules! pick {
        ($field:ident, $name:literal) => {{
            let found = applicable.iter().find_map(|(_, p)| {
                p.resilience
                    .as_ref()?
                    .$field
                    .as_ref()
                    .map(|v| (p, v.clone()))
            });
            found.map(|(p, v)| {
                section_sources
                    .insert($name.to_owned(), object_ref(&p.group, &p.kind, &p.meta, ""));
                v
            })
        }};
    }
    let timeouts = pick!(timeouts, "timeouts");
    let retry = pick!(retry, "retry");
    // The budget belongs to the retry section: it comes from the same policy.
    let budget = retry.as_ref().and_then(|_| {
        applicable
            .iter()
            .find_map(|(_, p)| p.resilience.as_ref().filter(|r| r.retry.is_some())?.budget)
    });
    let breaker = pick!(breaker, "circuitBreaker");
    let outlier = pick!(outlier, "outlierDetection");
    let health_check = pick!(health_check, "healthCheck");
    let fallback = pick!(fallback, "fallback").map(|mut f| {
        // A backendRef without a namespace means the policy's (= the service's) namespace.
        if let Some(cfg::fallback::Target::Backend(b)) = &mut f.target
            && let Some(svc) = &mut b.service
            && svc.namespace.is_empty()
        {
            svc.namespace.clone_from(&key.namespace);
        }
        f
    });
    let cache = pick!(cache, "cache");
    let lb = pick!(lb, "loadBalancer").or(Some(cfg::LoadBalancer {
        algorithm: cfg::load_balancer::Algorithm::PeakEwma.into(),
        ..Default::default()
    }));
    let policy = cfg::ClientPolicy {
        service: Some(cfg::ServiceRef {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
        }),
        port: u32::from(port.port),
        routes: super::routes::for_port(key, port, objects, faults),
        timeouts,
        retry,
        budget,
        breaker,
        outlier,
        health_check,
        fallback,
        cache,
        lb,
        protocol: protocol(port.protocol).into(),
        section_sources,
        fault: None,
    };
    (policy, sources)
}

/// The TELEMETRY resource: the collector and the sampling ratio.
pub(super) fn telemetry(otlp_endpoint: &str, sampling: f64) -> pb::Resource {
    resource(
        pb::resource::Body::Telemetry(cfg::Telemetry {
            otlp_endpoint: otlp_endpoint.to_owned(),
            sampling,
        }),
        Vec::new(),
    )
}

/// The TRUST_BUNDLE resource for `anchors` (DER).
pub fn trust_bundle(trust_domain: &str, anchors: Vec<Vec<u8>>) -> pb::Resource {
    resource(
        pb::resource::Body::TrustBundle(cfg::TrustBundle {
            trust_domain: trust_domain.to_owned(),
            anchors_der: anchors,
        }),
        Vec::new(),
    )
}

fn resource(body: pb::resource::Body, sources: Vec<cfg::ResourceRef>) -> pb::Resource {
    let mut r = pb::Resource {
        name: String::new(),
        version: String::new(),
        ttl: None,
        sources,
        body: Some(body),
    };
    let digest = Sha256::digest(r.encode_to_vec());
    r.version = digest[..8]
        .iter()
        .fold(String::with_capacity(16), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        });
    r
}

/// Parses `host:port` as proxies subscribe with it (authority or original destination).
fn resolve(snapshot: &Snapshot, name: &str) -> Result<Option<ResourceKey>, String> {
    let (host, port) = name
        .rsplit_once(':')
        .ok_or_else(|| format!("{name:?}: expected host:port"))?;
    let port: u16 = port.parse().map_err(|_| format!("{name:?}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(snapshot
            .resources
            .cluster_ips
            .get(&ip)
            .map(|k| (k.clone(), port)));
    }
    let labels: Vec<&str> = host.split('.').collect();
    let (service, namespace) = match labels.as_slice() {
        [s] => (*s, "default"),
        [s, ns] | [s, ns, "svc"] | [s, ns, "svc", "cluster", "local"] => (*s, *ns),
        _ => return Ok(None),
    };
    Ok(Some((
        ServiceKey {
            namespace: namespace.to_owned(),
            name: service.to_owned(),
        },
        port,
    )))
}

/// The version `lookup` would answer for a name of a keyed type (ENDPOINTS, CLIENT_POLICY),
/// TRUST_BUNDLE or TELEMETRY, without copying the resource; `None` when absent. INBOUND_POLICY
/// depends on the subscriber: see [`Snapshot::inbound_inputs_eq`].
pub(super) fn version<'a>(
    snapshot: &'a Snapshot,
    ty: pb::ResourceType,
    name: &str,
) -> Option<&'a str> {
    let table = match ty {
        pb::ResourceType::Endpoints => &snapshot.resources.endpoints,
        pb::ResourceType::ClientPolicy => &snapshot.resources.client_policies,
        pb::ResourceType::Telemetry => {
            return snapshot.telemetry.as_ref().map(|r| r.version.as_str());
        }
        pb::ResourceType::TrustBundle => {
            return snapshot.trust_bundle.as_ref().map(|r| r.version.as_str());
        }
        _ => return None,
    };
    let key = resolve(snapshot, name).ok()??;
    table.get(&key).map(|r| r.version.as_str())
}

pub(super) fn lookup(
    snapshot: &Snapshot,
    ty: pb::ResourceType,
    name: &str,
    node: Option<&pb::Node>,
) -> Lookup {
    let found = |r: &Arc<pb::Resource>| {
        let mut r = Box::new(pb::Resource::clone(r));
        name.clone_into(&mut r.name);
        Lookup::Found(r)
    };
    let table = match ty {
        pb::ResourceType::Endpoints => &snapshot.resources.endpoints,
        pb::ResourceType::ClientPolicy => &snapshot.resources.client_policies,
        pb::ResourceType::InboundPolicy => {
            return if name == "*" || name.parse::<u16>().is_ok() {
                let Some(base) = &snapshot.resources.inbound else {
                    return Lookup::NotFound;
                };
                let selected = node
                    .map(|n| super::faults::for_workload(&snapshot.faults, n))
                    .unwrap_or_default();
                let service = node.and_then(|n| n.local_workload.as_ref()?.service.as_ref());
                let strict = service.is_some_and(|s| {
                    super::MtlsRule::mode_for(&snapshot.mtls, &s.namespace, &s.name)
                });
                let (deny, allow) = service.map_or_else(Default::default, |s| {
                    super::AuthzEntry::rules_for(&snapshot.authz, &s.namespace, &s.name)
                });
                let default = match snapshot.default_inbound {
                    0 => i32::from(cfg::DefaultPolicy::AllUnauthenticated),
                    d => d,
                };
                if selected.is_empty()
                    && !strict
                    && deny.is_empty()
                    && allow.is_empty()
                    && default == i32::from(cfg::DefaultPolicy::AllUnauthenticated)
                {
                    return found(base);
                }
                // This workload's own inbound policy: the base plus its mTLS mode and the
                // faults that select it.
                let Some(pb::resource::Body::InboundPolicy(mut policy)) = base.body.clone() else {
                    return found(base);
                };
                if strict {
                    policy.mtls = cfg::MtlsMode::Strict.into();
                }
                policy.deny = deny;
                policy.allow = allow;
                policy.default_policy = default;
                policy.faults = selected.iter().map(|f| f.fault.clone()).collect();
                let sources = selected
                    .iter()
                    .filter_map(|f| f.fault.source.clone())
                    .collect();
                let mut r = resource(pb::resource::Body::InboundPolicy(policy), sources);
                r.ttl = super::faults::ttl(
                    selected.into_iter(),
                    snapshot.fault_ttl,
                    std::time::SystemTime::now(),
                );
                found(&Arc::new(r))
            } else {
                Lookup::Invalid(format!(
                    "{name:?}: inbound policy names are \"*\" or a port number"
                ))
            };
        }
        pb::ResourceType::Telemetry => {
            return match (&snapshot.telemetry, name) {
                (_, n) if n != "*" => Lookup::Invalid(format!("{n:?}: telemetry is named \"*\"")),
                (Some(t), _) => found(t),
                (None, _) => Lookup::NotFound,
            };
        }
        pb::ResourceType::TrustBundle => {
            return match (&snapshot.trust_bundle, name) {
                (_, n) if n != "*" => {
                    Lookup::Invalid(format!("{n:?}: the trust bundle is named \"*\""))
                }
                (Some(b), _) => found(b),
                (None, _) => Lookup::NotFound,
            };
        }
        other => {
            return Lookup::Invalid(format!(
                "resource type {} is not served yet",
                other.as_str_name()
            ));
        }
    };
    match resolve(snapshot, name) {
        Err(e) => Lookup::Invalid(e),
        Ok(None) => Lookup::NotFound,
        Ok(Some(key)) => table.get(&key).map_or(Lookup::NotFound, found),
    }
}
