//! Domain types for what the controller pushes, converted (and validated) from protobuf. A
//! resource that does not convert is NACKed and the last good value stays in use.

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
}

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
    /// Connect timeout; `None`: the proxy default.
    pub connect_timeout: Option<Duration>,
    /// Load balancer.
    pub lb: LoadBalancer,
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LoadBalancer {
    /// Power of two choices over peak-EWMA latency (the default).
    PeakEwma,
}

fn duration(
    d: Option<prost_types::Duration>,
    field: &'static str,
) -> Result<Option<Duration>, InvalidPolicy> {
    d.map(|d| Duration::try_from(d).map_err(|_| InvalidPolicy::Duration(field)))
        .transpose()
}

impl TryFrom<cfg::ClientPolicy> for ClientPolicy {
    type Error = InvalidPolicy;

    fn try_from(pb: cfg::ClientPolicy) -> Result<Self, InvalidPolicy> {
        let service = pb.service.ok_or(InvalidPolicy::Missing("service"))?;
        let t = pb.timeouts.unwrap_or_default();
        Ok(ClientPolicy {
            service: format!("{}/{}", service.namespace, service.name),
            request_timeout: duration(t.request, "timeouts.request")?,
            connect_timeout: duration(t.connect, "timeouts.connect")?,
            // Every algorithm but PeakEWMA arrives with the resilience work; until then the
            // default is used for all.
            lb: LoadBalancer::PeakEwma,
        })
    }
}

/// What the inbound side applies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InboundPolicy {
    /// Port (0: all).
    pub port: u16,
}

impl TryFrom<cfg::InboundPolicy> for InboundPolicy {
    type Error = InvalidPolicy;

    fn try_from(pb: cfg::InboundPolicy) -> Result<Self, InvalidPolicy> {
        Ok(InboundPolicy {
            port: u16::try_from(pb.port).map_err(|_| InvalidPolicy::Port(pb.port))?,
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
