//! Domain types for what the controller pushes, converted (and validated) from protobuf. A
//! resource that does not convert is NACKed and the last good value stays in use.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ferrymesh_proto::config::v1 as cfg;
use serde::Serialize;

/// Why a pushed resource was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPolicy {
    /// A required field is missing.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// An address does not parse.
    #[error("endpoint address {0:?} is not an ip:port")]
    Address(String),
    /// A duration is negative or out of range.
    #[error("{0} is not a valid duration")]
    Duration(&'static str),
    /// A port is out of range.
    #[error("port {0} is out of range")]
    Port(u32),
    /// A value is out of its range or not allowed.
    #[error("{0}: {1} is not allowed")]
    Range(&'static str, String),
    /// An enum value this proxy does not know (a newer controller?).
    #[error("{0}: unknown value {1}")]
    Enum(&'static str, i32),
}

pub mod authz;
pub mod resilience;
pub mod routes;

use resilience::duration;
pub use resilience::{
    BreakerPolicy, CachePolicy, FallbackPolicy, FaultPolicy, HealthCheckPolicy, OutlierPolicy,
    RetryPolicy,
};

/// The protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2, detected.
    Http,
    /// HTTP/2.
    Http2,
    /// gRPC.
    Grpc,
    /// Opaque TCP.
    Opaque,
}

impl From<i32> for Protocol {
    fn from(raw: i32) -> Self {
        match cfg::Protocol::try_from(raw).unwrap_or(cfg::Protocol::Http) {
            cfg::Protocol::Unspecified | cfg::Protocol::Http => Protocol::Http,
            cfg::Protocol::Http2 => Protocol::Http2,
            cfg::Protocol::Grpc => Protocol::Grpc,
            cfg::Protocol::Opaque => Protocol::Opaque,
        }
    }
}

/// The endpoints of one service port.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Endpoints {
    /// `namespace/name`.
    pub service: String,
    /// Service port.
    pub port: u16,
    /// How calls are made.
    pub protocol: Protocol,
    /// Every endpoint, ready or not.
    pub endpoints: Vec<Endpoint>,
}

/// One endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative weight (>= 1).
    pub weight: u32,
    /// Ready condition: only ready endpoints get traffic.
    pub ready: bool,
    /// Zone.
    pub zone: String,
    /// True when a Ferrymesh proxy fronts it.
    pub meshed: bool,
    /// The instance (local mode), for metrics and explain.
    pub instance: String,
    /// The SPIFFE id it must present (mTLS); `None`: plaintext.
    pub identity: Option<std::sync::Arc<str>>,
}

impl TryFrom<cfg::ServiceEndpoints> for Endpoints {
    type Error = InvalidPolicy;

    fn try_from(pb: cfg::ServiceEndpoints) -> Result<Self, InvalidPolicy> {
        let service = pb.service.ok_or(InvalidPolicy::Missing("service"))?;
        let port = u16::try_from(pb.port).map_err(|_| InvalidPolicy::Port(pb.port))?;
        let endpoints = pb
            .endpoints
            .into_iter()
            .map(|e| {
                let a = e.addr.ok_or(InvalidPolicy::Missing("endpoint.addr"))?;
                let ip: IpAddr =
                    a.ip.parse()
                        .map_err(|_| InvalidPolicy::Address(format!("{}:{}", a.ip, a.port)))?;
                let port = u16::try_from(a.port).map_err(|_| InvalidPolicy::Port(a.port))?;
                Ok(Endpoint {
                    addr: SocketAddr::new(ip, port),
                    weight: e.weight.max(1),
                    ready: e.ready,
                    zone: e.zone,
                    meshed: e.proxy_inbound_port != 0,
                    instance: e.metric_labels.get("instance").cloned().unwrap_or_default(),
                    identity: (!e.identity.is_empty()).then(|| e.identity.as_str().into()),
                })
            })
            .collect::<Result<_, InvalidPolicy>>()?;
        Ok(Endpoints {
            service: format!("{}/{}", service.namespace, service.name),
            port,
            protocol: Protocol::from(pb.protocol),
            endpoints,
        })
    }
}

/// What a client proxy applies to calls to one service port.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientPolicy {
    /// `namespace/name`.
    pub service: String,
    /// Whole-call timeout; `None`: the proxy default; zero: disabled.
    pub request_timeout: Option<Duration>,
    /// One attempt; `None`: the request timeout.
    pub per_try_timeout: Option<Duration>,
    /// Connect timeout; `None`: the proxy default.
    pub connect_timeout: Option<Duration>,
    /// Idle pooled connections; `None`: the proxy default.
    pub idle_timeout: Option<Duration>,
    /// Honour and rewrite `grpc-timeout` / `ferrymesh-timeout`.
    pub deadline_propagation: bool,
    /// Retries (with their budget).
    pub retry: Option<RetryPolicy>,
    /// Circuit breaker and bulkhead.
    pub breaker: Option<BreakerPolicy>,
    /// Per-endpoint ejection.
    pub outlier: Option<OutlierPolicy>,
    /// Active health checks.
    pub health_check: Option<HealthCheckPolicy>,
    /// Fallback.
    pub fallback: Option<FallbackPolicy>,
    /// Response cache.
    pub cache: Option<CachePolicy>,
    /// Load balancer.
    pub lb: LoadBalancer,
    /// Prefer endpoints in the proxy's own zone.
    pub prefer_same_zone: bool,
    /// Section -> the policy object it came from (`Kind namespace/name@generation`).
    pub sections: BTreeMap<String, String>,
    /// A client-side fault (applied before retries).
    pub fault: Option<FaultPolicy>,
    /// HTTPRoute / GRPCRoute rules attached to the service (none: every request goes to it).
    pub routes: routes::Routes,
    /// For a route's merged policy: the backend's own policy (its breaker, outlier detection
    /// and health checks are the backend's, whatever the route).
    #[serde(skip)]
    pub base: Option<std::sync::Arc<ClientPolicy>>,
    /// For a route's merged policy: the rule's name.
    pub route: Option<String>,
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum LoadBalancer {
    /// Power of two choices over peak-EWMA latency (the default).
    PeakEwma,
    /// In turn.
    RoundRobin,
    /// Power of two choices over in-flight requests.
    LeastRequest,
    /// Uniform.
    Random,
    /// The same header value goes to the same endpoint (ring hash).
    ConsistentHash {
        /// Header hashed.
        header: String,
    },
}

impl TryFrom<cfg::ClientPolicy> for ClientPolicy {
    type Error = InvalidPolicy;

    fn try_from(pb: cfg::ClientPolicy) -> Result<Self, InvalidPolicy> {
        use cfg::load_balancer::Algorithm;
        let service = pb.service.ok_or(InvalidPolicy::Missing("service"))?;
        // Deadline propagation is on unless a timeouts section turns it off.
        let deadline_propagation = pb.timeouts.as_ref().is_none_or(|t| t.deadline_propagation);
        let t = pb.timeouts.unwrap_or_default();
        let request_timeout = duration(t.request, "timeouts.request")?;
        let per_try_timeout = duration(t.per_try, "timeouts.perTry")?;
        if let (Some(r), Some(p)) = (request_timeout, per_try_timeout)
            && !r.is_zero()
            && p > r
        {
            return Err(InvalidPolicy::Range(
                "timeouts.perTry",
                format!("{p:?} > request {r:?}"),
            ));
        }
        let l = pb.lb.unwrap_or_default();
        let lb = match Algorithm::try_from(l.algorithm) {
            Ok(Algorithm::PeakEwma | Algorithm::Unspecified) => LoadBalancer::PeakEwma,
            Ok(Algorithm::RoundRobin) => LoadBalancer::RoundRobin,
            Ok(Algorithm::LeastRequest) => LoadBalancer::LeastRequest,
            Ok(Algorithm::Random) => LoadBalancer::Random,
            Ok(Algorithm::ConsistentHash) => {
                http::HeaderName::from_bytes(l.hash_header.as_bytes()).map_err(|_| {
                    InvalidPolicy::Range("loadBalancer.hashOn.header", l.hash_header.clone())
                })?;
                LoadBalancer::ConsistentHash {
                    header: l.hash_header,
                }
            }
            Err(_) => return Err(InvalidPolicy::Enum("loadBalancer.algorithm", l.algorithm)),
        };
        let sections = pb
            .section_sources
            .into_iter()
            .map(|(section, r)| {
                (
                    section,
                    format!("{} {}/{}@{}", r.kind, r.namespace, r.name, r.generation),
                )
            })
            .collect();
        Ok(ClientPolicy {
            service: format!("{}/{}", service.namespace, service.name),
            request_timeout,
            per_try_timeout,
            connect_timeout: duration(t.connect, "timeouts.connect")?,
            idle_timeout: duration(t.idle, "timeouts.idle")?,
            deadline_propagation,
            // No retry section: connection failures and refused streams are retried once.
            retry: Some(match pb.retry {
                Some(r) => resilience::retry(r, pb.budget)?,
                None => RetryPolicy::connect_failures(),
            }),
            breaker: pb.breaker.as_ref().map(resilience::breaker).transpose()?,
            outlier: pb.outlier.map(resilience::outlier).transpose()?,
            health_check: pb.health_check.map(resilience::health_check).transpose()?,
            fallback: pb.fallback.map(resilience::fallback).transpose()?,
            cache: pb.cache.map(resilience::cache).transpose()?,
            lb,
            prefer_same_zone: l.prefer_same_zone,
            sections,
            fault: pb.fault.map(resilience::fault).transpose()?,
            routes: routes::Routes::from_pb(pb.routes)?,
            base: None,
            route: None,
        })
    }
}

/// What the inbound side applies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InboundPolicy {
    /// Port (0: all).
    pub port: u16,
    /// Server-side faults selecting this workload.
    pub faults: Vec<FaultPolicy>,
    /// Whether plaintext connections are still accepted (with identity on).
    pub mtls: MtlsMode,
    /// Deny rules (any match: 403).
    pub deny: Vec<authz::AuthzRule>,
    /// Allow rules (when any: only a match passes).
    pub allow: Vec<authz::AuthzRule>,
    /// What passes when there is no allow rule.
    pub default_policy: authz::DefaultInbound,
}

/// The inbound side's mTLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum MtlsMode {
    /// mTLS and plaintext (detected on the first bytes).
    #[default]
    Permissive,
    /// mTLS only: plaintext connections are closed before any byte reaches the app.
    Strict,
}

impl TryFrom<cfg::InboundPolicy> for InboundPolicy {
    type Error = InvalidPolicy;

    fn try_from(pb: cfg::InboundPolicy) -> Result<Self, InvalidPolicy> {
        Ok(InboundPolicy {
            port: u16::try_from(pb.port).map_err(|_| InvalidPolicy::Port(pb.port))?,
            faults: pb
                .faults
                .into_iter()
                .map(resilience::fault)
                .collect::<Result<_, _>>()?,
            mtls: match cfg::MtlsMode::try_from(pb.mtls) {
                Ok(cfg::MtlsMode::Strict) => MtlsMode::Strict,
                Ok(cfg::MtlsMode::Permissive | cfg::MtlsMode::Unspecified) => MtlsMode::Permissive,
                Err(_) => return Err(InvalidPolicy::Enum("mtls", pb.mtls)),
            },
            deny: pb
                .deny
                .into_iter()
                .map(authz::AuthzRule::from_pb)
                .collect::<Result<_, _>>()?,
            allow: pb
                .allow
                .into_iter()
                .map(authz::AuthzRule::from_pb)
                .collect::<Result<_, _>>()?,
            default_policy: authz::DefaultInbound::from_pb(pb.default_policy)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(ip: &str, port: u32) -> cfg::Endpoint {
        cfg::Endpoint {
            addr: Some(cfg::SocketAddr {
                ip: ip.into(),
                port,
            }),
            ready: true,
            ..Default::default()
        }
    }

    fn endpoints(list: Vec<cfg::Endpoint>) -> cfg::ServiceEndpoints {
        cfg::ServiceEndpoints {
            service: Some(cfg::ServiceRef {
                name: "a".into(),
                namespace: "b".into(),
            }),
            port: 80,
            endpoints: list,
            ..Default::default()
        }
    }

    #[test]
    fn endpoints_convert_and_bad_addresses_are_refused() {
        let ok = Endpoints::try_from(endpoints(vec![
            endpoint("127.0.0.1", 81),
            endpoint("::1", 82),
        ]))
        .unwrap();
        assert_eq!(ok.service, "b/a");
        assert_eq!(ok.endpoints[1].addr, "[::1]:82".parse().unwrap());
        assert_eq!(
            Endpoints::try_from(endpoints(vec![endpoint("nope", 1)])),
            Err(InvalidPolicy::Address("nope:1".into()))
        );
        assert_eq!(
            Endpoints::try_from(endpoints(vec![endpoint("127.0.0.1", 70000)])),
            Err(InvalidPolicy::Port(70000))
        );
    }

    #[test]
    fn bad_sections_are_refused_with_their_field() {
        let base = || cfg::ClientPolicy {
            service: Some(cfg::ServiceRef::default()),
            ..Default::default()
        };
        let d = |s| {
            Some(prost_types::Duration {
                seconds: s,
                nanos: 0,
            })
        };
        let cases: Vec<(cfg::ClientPolicy, InvalidPolicy)> = vec![
            (
                cfg::ClientPolicy {
                    timeouts: Some(cfg::Timeouts {
                        request: d(1),
                        per_try: d(2),
                        ..Default::default()
                    }),
                    ..base()
                },
                InvalidPolicy::Range("timeouts.perTry", "2s > request 1s".into()),
            ),
            (
                cfg::ClientPolicy {
                    retry: Some(cfg::Retry {
                        attempts: 11,
                        ..Default::default()
                    }),
                    ..base()
                },
                InvalidPolicy::Range("retry.attempts", "11".into()),
            ),
            (
                cfg::ClientPolicy {
                    retry: Some(cfg::Retry {
                        retry_on: vec![99],
                        ..Default::default()
                    }),
                    ..base()
                },
                InvalidPolicy::Enum("retry.retryOn", 99),
            ),
            (
                cfg::ClientPolicy {
                    retry: Some(cfg::Retry::default()),
                    budget: Some(cfg::RetryBudget {
                        ratio: 1.5,
                        min_retries_per_second: 1,
                        window: d(1),
                    }),
                    ..base()
                },
                InvalidPolicy::Range("retry.budget.ratio", "1.5".into()),
            ),
            (
                cfg::ClientPolicy {
                    fallback: Some(cfg::Fallback::default()),
                    ..base()
                },
                InvalidPolicy::Missing("fallback.backendRef|staticResponse"),
            ),
            (
                cfg::ClientPolicy {
                    health_check: Some(cfg::HealthCheck::default()),
                    ..base()
                },
                InvalidPolicy::Missing("healthCheck.http|tcp|grpc"),
            ),
            (
                cfg::ClientPolicy {
                    lb: Some(cfg::LoadBalancer {
                        algorithm: 42,
                        ..Default::default()
                    }),
                    ..base()
                },
                InvalidPolicy::Enum("loadBalancer.algorithm", 42),
            ),
            (
                cfg::ClientPolicy {
                    cache: Some(cfg::Cache {
                        methods: vec!["POST".into()],
                        max_entries: 1,
                        max_ttl: d(1),
                        ..Default::default()
                    }),
                    ..base()
                },
                InvalidPolicy::Range("cache.methods", "POST".into()),
            ),
        ];
        for (pb, expected) in cases {
            assert_eq!(ClientPolicy::try_from(pb), Err(expected));
        }
    }

    #[test]
    fn bulkhead_limits_the_proxy_does_not_enforce_are_refused() {
        let base = || cfg::ClientPolicy {
            service: Some(cfg::ServiceRef::default()),
            ..Default::default()
        };
        let cases: Vec<(cfg::ClientPolicy, InvalidPolicy)> = vec![
            (
                cfg::ClientPolicy {
                    breaker: Some(cfg::CircuitBreaker {
                        max_connections: 10,
                        ..Default::default()
                    }),
                    ..base()
                },
                InvalidPolicy::Range(
                    "circuitBreaker.limits.maxConnections",
                    "not enforced".into(),
                ),
            ),
            (
                cfg::ClientPolicy {
                    breaker: Some(cfg::CircuitBreaker {
                        max_pending_requests: 10,
                        ..Default::default()
                    }),
                    ..base()
                },
                InvalidPolicy::Range(
                    "circuitBreaker.limits.maxPendingRequests",
                    "not enforced".into(),
                ),
            ),
        ];
        for (pb, expected) in cases {
            assert_eq!(ClientPolicy::try_from(pb), Err(expected));
        }
    }

    #[test]
    fn negative_timeouts_are_refused() {
        let pb = cfg::ClientPolicy {
            service: Some(cfg::ServiceRef::default()),
            timeouts: Some(cfg::Timeouts {
                request: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            ClientPolicy::try_from(pb),
            Err(InvalidPolicy::Duration("timeouts.request"))
        );
    }
}
