//! Authorization rules as the proxy holds them (converted from what the controller sends);
//! the `authz` module decides with them.

use std::net::IpAddr;

use ferrymesh_proto::config::v1 as cfg;
use http::Method;
use serde::Serialize;

use super::InvalidPolicy;
use super::routes::PathMatch;

/// What a workload port admits when no Allow rule covers it (Linkerd's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum DefaultInbound {
    /// Anyone, with or without an identity (the course default).
    #[default]
    AllUnauthenticated,
    /// Callers with any verified identity.
    AllAuthenticated,
    /// Callers with an identity of this trust domain.
    ClusterAuthenticated,
    /// Nobody.
    Deny,
}

impl DefaultInbound {
    /// From the protobuf enum (unset: all-unauthenticated).
    ///
    /// # Errors
    /// An unknown value.
    pub fn from_pb(v: i32) -> Result<Self, InvalidPolicy> {
        Ok(match cfg::DefaultPolicy::try_from(v) {
            Ok(cfg::DefaultPolicy::AllUnauthenticated | cfg::DefaultPolicy::Unspecified) => {
                Self::AllUnauthenticated
            }
            Ok(cfg::DefaultPolicy::AllAuthenticated) => Self::AllAuthenticated,
            Ok(cfg::DefaultPolicy::ClusterAuthenticated) => Self::ClusterAuthenticated,
            Ok(cfg::DefaultPolicy::Deny) => Self::Deny,
            Err(_) => return Err(InvalidPolicy::Enum("default_policy", v)),
        })
    }

    /// From Linkerd's names (the ProxyConfig override).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "all-unauthenticated" => Self::AllUnauthenticated,
            "all-authenticated" => Self::AllAuthenticated,
            "cluster-authenticated" => Self::ClusterAuthenticated,
            "deny" => Self::Deny,
            _ => return None,
        })
    }
}

/// One rule: every set field must match (list items are alternatives).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuthzRule {
    /// SPIFFE ids; a trailing `*` segment matches any last segment.
    pub identities: Vec<String>,
    /// Namespaces of the caller's SPIFFE id.
    pub namespaces: Vec<String>,
    /// `namespace/service account` of the caller's SPIFFE id.
    pub service_accounts: Vec<String>,
    /// Caller address ranges.
    #[serde(skip)]
    pub networks: Vec<(IpAddr, u8)>,
    /// Methods.
    #[serde(serialize_with = "methods")]
    pub methods: Vec<Method>,
    /// Paths (normalised).
    pub paths: Vec<PathMatch>,
    /// `Kind namespace/name@generation`.
    pub source: String,
}

fn methods<S: serde::Serializer>(m: &[Method], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(m.iter().map(Method::as_str))
}

impl AuthzRule {
    /// Converts a rule the controller sent.
    ///
    /// # Errors
    /// A network, method or path that does not parse.
    pub fn from_pb(r: cfg::AuthzRule) -> Result<Self, InvalidPolicy> {
        let networks = r
            .networks
            .iter()
            .map(|n| {
                n.split_once('/')
                    .and_then(|(ip, len)| Some((ip.parse().ok()?, len.parse().ok()?)))
                    .ok_or_else(|| InvalidPolicy::Range("authz.networks", n.clone()))
            })
            .collect::<Result<_, _>>()?;
        let methods = r
            .methods
            .iter()
            .map(|m| {
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| InvalidPolicy::Range("authz.methods", m.clone()))
            })
            .collect::<Result<_, _>>()?;
        let paths = r
            .paths
            .into_iter()
            .map(|p| match cfg::path_match::Kind::try_from(p.kind) {
                Ok(cfg::path_match::Kind::Exact) => Ok(PathMatch::Exact(p.value)),
                Ok(_) => Ok(PathMatch::Prefix(p.value)),
                Err(_) => Err(InvalidPolicy::Enum("authz.paths.kind", p.kind)),
            })
            .collect::<Result<_, _>>()?;
        Ok(AuthzRule {
            identities: r.identities,
            namespaces: r.namespaces,
            service_accounts: r.service_accounts,
            networks,
            methods,
            paths,
            source: r
                .source
                .map(|s| format!("{} {}/{}@{}", s.kind, s.namespace, s.name, s.generation))
                .unwrap_or_default(),
        })
    }
}
