//! FaultInjections in force: resolved to the service they target, with their end time (first
//! seen + duration; files have no creationTimestamp, so the controller's first sighting stands
//! in for it), dropped once ended. Server-side faults go into the inbound policy of each
//! selected workload; client-side ones into the client policy of the service. Resources that
//! carry a fault get a TTL, so a dead controller cannot leave chaos running.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use ferrymesh_proto::config::v1 as cfg;
use ferrymesh_proto::discovery::v1 as pb;

use crate::model::ServiceKey;
use crate::model::{FaultAbort, FaultSide, Object, ObjectKey};

/// A fault in force.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveFault {
    /// The service it targets.
    pub service: ServiceKey,
    /// Server or client side.
    pub side: FaultSide,
    /// Workload labels it selects (server side).
    pub selector: BTreeMap<String, String>,
    /// A route target (kind, name, rule name): the fault applies to that route's requests.
    pub route: Option<(String, String, Option<String>)>,
    /// What the proxies get.
    pub fault: cfg::Fault,
    /// When it ends.
    pub expires_at: SystemTime,
}

/// The faults in force at `now`, from the FaultInjection objects.
pub(super) fn active<'a>(
    objects: impl Iterator<Item = &'a Object>,
    first_seen: &BTreeMap<ObjectKey, SystemTime>,
    now: SystemTime,
) -> Vec<ActiveFault> {
    let mut out = Vec::new();
    for o in objects {
        let Object::Policy(p) = o else { continue };
        let Some(spec) = &p.fault else { continue };
        let Some(created) = first_seen.get(&o.key()) else {
            continue;
        };
        let expires_at = *created + spec.duration;
        if now >= expires_at {
            continue;
        }
        let (abort_http_status, abort_grpc_status, abort_percentage) = match spec.abort {
            Some((FaultAbort::Http(code), pct)) => (u32::from(code), None, pct),
            Some((FaultAbort::Grpc(code), pct)) => (0, Some(code), pct),
            None => (0, None, 0.0),
        };
        let fault = cfg::Fault {
            headers: spec
                .headers
                .iter()
                .map(|(name, value)| cfg::HeaderMatch {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            delay: spec
                .delay
                .map(|(d, _)| prost_types::Duration::try_from(d).expect("fault delays fit")),
            delay_percentage: spec.delay.map_or(0.0, |(_, pct)| pct),
            abort_http_status,
            abort_grpc_status,
            abort_percentage,
            expires_at: Some(prost_types::Timestamp::from(expires_at)),
            source: Some(super::translate::object_ref(&p.group, &p.kind, &p.meta, "")),
        };
        for t in &p.target_refs {
            let (service, route) = if t.kind == "Service" {
                (t.name.clone(), None)
            } else {
                (
                    String::new(),
                    Some((t.kind.clone(), t.name.clone(), t.section_name.clone())),
                )
            };
            out.push(ActiveFault {
                service: ServiceKey {
                    namespace: p.meta.namespace.clone(),
                    name: service,
                },
                side: spec.side,
                selector: spec.selector.clone(),
                route,
                fault: fault.clone(),
                expires_at,
            });
        }
    }
    out
}

/// The server-side faults that select the workload of `node`.
pub(super) fn for_workload<'a>(faults: &'a [ActiveFault], node: &pb::Node) -> Vec<&'a ActiveFault> {
    let Some(local) = &node.local_workload else {
        return Vec::new();
    };
    let Some(svc) = &local.service else {
        return Vec::new();
    };
    faults
        .iter()
        .filter(|f| {
            f.side == FaultSide::Server
                && f.service.namespace == svc.namespace
                && f.service.name == svc.name
        })
        .filter(|f| {
            f.selector
                .iter()
                .all(|(k, v)| local.labels.get(k) == Some(v))
        })
        .collect()
}

/// The TTL of a resource carrying `faults`: the controller's TTL, or less when a fault ends
/// sooner.
pub(super) fn ttl<'a>(
    faults: impl Iterator<Item = &'a ActiveFault>,
    max: Duration,
    now: SystemTime,
) -> Option<prost_types::Duration> {
    faults
        .map(|f| {
            f.expires_at
                .duration_since(now)
                .unwrap_or_default()
                .min(max)
        })
        .min()
        .map(|d| prost_types::Duration::try_from(d).expect("TTLs fit"))
}
