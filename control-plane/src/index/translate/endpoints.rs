//! A service port's endpoints: from its EndpointSlices and the workloads registered by local
//! proxies, each with the SPIFFE identity its Pod runs as.

use std::collections::BTreeMap;

use ferrymesh_proto::config::v1 as cfg;

use super::{object_ref, protocol};
use crate::index::Registered;
use crate::model::{Object, ServiceKey, ServicePort};

/// Meshed Pods, by (namespace, name), with their SPIFFE identity.
pub(super) fn pod_identities<'a>(
    objects: &[&'a Object],
    trust_domain: &str,
) -> BTreeMap<(&'a str, &'a str), String> {
    objects
        .iter()
        .filter_map(|o| match o {
            Object::Pod(p) if p.injected => Some((
                (p.meta.namespace.as_str(), p.meta.name.as_str()),
                format!(
                    "spiffe://{trust_domain}/ns/{}/sa/{}",
                    p.meta.namespace, p.service_account
                ),
            )),
            _ => None,
        })
        .collect()
}

pub(super) fn slice_sources(key: &ServiceKey, objects: &[&Object]) -> Vec<cfg::ResourceRef> {
    objects
        .iter()
        .filter_map(|o| match o {
            Object::EndpointSlice(s)
                if s.meta.namespace == key.namespace && s.service == key.name =>
            {
                Some(object_ref("discovery.k8s.io", "EndpointSlice", &s.meta, ""))
            }
            _ => None,
        })
        .collect()
}

pub(super) fn endpoints(
    key: &ServiceKey,
    port: &ServicePort,
    objects: &[&Object],
    identities: &BTreeMap<(&str, &str), String>,
    workloads: &[Registered],
    warnings: &mut Vec<String>,
) -> cfg::ServiceEndpoints {
    let mut endpoints = Vec::new();
    for o in objects {
        let Object::EndpointSlice(slice) = o else {
            continue;
        };
        if slice.meta.namespace != key.namespace || slice.service != key.name {
            continue;
        }
        let Some(&(_, target_port)) = slice.ports.iter().find(|(name, _)| *name == port.name)
        else {
            warnings.push(format!(
                "EndpointSlice {}/{}: no port named {:?} for Service {}/{}",
                slice.meta.namespace, slice.meta.name, port.name, key.namespace, key.name
            ));
            continue;
        };
        for e in &slice.endpoints {
            for ip in &e.addresses {
                endpoints.push(cfg::Endpoint {
                    addr: Some(cfg::SocketAddr {
                        ip: ip.to_string(),
                        port: u32::from(target_port),
                    }),
                    weight: 1,
                    zone: e.zone.clone(),
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    // A meshed Pod answers mTLS with its service account's identity; anything
                    // else is unmeshed and gets plaintext.
                    identity: e
                        .target_pod
                        .as_deref()
                        .and_then(|pod| identities.get(&(slice.meta.namespace.as_str(), pod)))
                        .cloned()
                        .unwrap_or_default(),
                    pod: e.target_pod.as_ref().map(|pod| cfg::ResourceRef {
                        kind: "Pod".into(),
                        namespace: slice.meta.namespace.clone(),
                        name: pod.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
        }
    }
    for w in workloads {
        let Some(local) = &w.node.local_workload else {
            continue;
        };
        let Some(svc) = &local.service else { continue };
        if !w.ready || svc.namespace != key.namespace || svc.name != key.name {
            continue;
        }
        let Some(inbound) = &local.inbound else {
            continue;
        };
        endpoints.push(cfg::Endpoint {
            addr: Some(inbound.clone()),
            weight: 1,
            zone: w.node.zone.clone(),
            identity: local.identity.clone(),
            ready: true,
            serving: true,
            terminating: false,
            proxy_inbound_port: inbound.port,
            metric_labels: [("instance".to_owned(), local.instance.clone())].into(),
            pod: Some(cfg::ResourceRef {
                kind: "Workload".into(),
                namespace: key.namespace.clone(),
                name: local.instance.clone(),
                ..Default::default()
            }),
            node: String::new(),
        });
    }
    // NOTE: sorted so the version (a hash of the bytes) does not depend on registration order.
    endpoints.sort_by(|a, b| {
        let k = |e: &cfg::Endpoint| e.addr.as_ref().map(|a| (a.ip.clone(), a.port));
        k(a).cmp(&k(b))
    });
    endpoints.dedup_by(|a, b| a.addr == b.addr);
    cfg::ServiceEndpoints {
        service: Some(cfg::ServiceRef {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
        }),
        port: u32::from(port.port),
        protocol: protocol(port.protocol).into(),
        endpoints,
    }
}
