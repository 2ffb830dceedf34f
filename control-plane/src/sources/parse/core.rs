//! The core Kubernetes objects a source reads: Service, EndpointSlice, Pod and Namespace, with
//! the API server's own rules for what it would refuse.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use serde::Deserialize;

use super::{FieldError, RawMeta, field_err, from_json};
use crate::sources::{
    EndpointSlice, Meta, Object, PortProtocol, Service, ServicePort, SliceEndpoint,
};

// === Service ===

#[derive(Deserialize)]
struct RawService {
    spec: RawServiceSpec,
}

/// A list the API server may serve as `null` (Go's nil slice without `omitempty`: an
/// EndpointSlice with no endpoints is `"endpoints": null`), read as empty.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
struct RawServiceSpec {
    #[serde(default, deserialize_with = "null_as_empty")]
    ports: Vec<RawServicePort>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default, deserialize_with = "null_as_empty")]
    cluster_ips: Vec<String>,
}

#[derive(Deserialize)]
struct RawServicePort {
    name: Option<String>,
    port: u16,
    #[serde(rename = "appProtocol")]
    app_protocol: Option<String>,
    protocol: Option<String>,
}

pub(super) fn service(meta: Meta, json: &serde_json::Value) -> Result<Object, FieldError> {
    let raw: RawService = from_json(json)?;
    if raw.spec.ports.is_empty() {
        return Err(field_err("spec.ports", "a Service needs at least one port"));
    }
    let mut names = HashSet::new();
    let mut ports = Vec::new();
    for (i, p) in raw.spec.ports.iter().enumerate() {
        let at = |f: &str| format!("spec.ports[{i}].{f}");
        if p.port == 0 {
            return Err(field_err(at("port"), "must be 1..65535"));
        }
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            return Err(field_err(at("protocol"), "only TCP ports are meshed"));
        }
        let name = match &p.name {
            Some(n) => n.clone(),
            None if raw.spec.ports.len() == 1 => String::new(),
            None => {
                return Err(field_err(
                    at("name"),
                    "required when a Service has several ports",
                ));
            }
        };
        if !names.insert(name.clone()) {
            return Err(field_err(
                at("name"),
                format!("duplicate port name {name:?}"),
            ));
        }
        let protocol = port_protocol(p.app_protocol.as_deref(), &name)
            .map_err(|m| field_err(at("appProtocol"), m))?;
        ports.push(ServicePort {
            name,
            port: p.port,
            protocol,
        });
    }
    // Kubernetes keeps `clusterIP` equal to `clusterIPs[0]`; a dual-stack Service adds the
    // other family's address.
    let mut cluster_ips: Vec<std::net::IpAddr> = Vec::new();
    let listed = raw.spec.cluster_ips.iter().enumerate();
    let given = raw
        .spec
        .cluster_ip
        .iter()
        .map(|ip| ("spec.clusterIP".to_owned(), ip))
        .chain(listed.map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip)));
    for (field, ip) in given {
        if matches!(ip.as_str(), "None" | "") {
            continue;
        }
        let ip: std::net::IpAddr = ip
            .parse()
            .map_err(|_| field_err(&field, format!("{ip:?} is not an IP address")))?;
        if !cluster_ips.contains(&ip) {
            cluster_ips.push(ip);
        }
    }
    Ok(Object::Service(Service {
        meta,
        ports,
        cluster_ips,
    }))
}

pub(super) fn port_protocol(
    app_protocol: Option<&str>,
    port_name: &str,
) -> Result<PortProtocol, String> {
    let known = |p: &str| match p {
        "http" => Some(PortProtocol::Http),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(PortProtocol::Http2),
        "grpc" => Some(PortProtocol::Grpc),
        "tcp" | "opaque" => Some(PortProtocol::Opaque),
        _ => None,
    };
    match app_protocol {
        Some(p) => known(p).ok_or_else(|| {
            format!("unknown appProtocol {p:?} (http, http2, kubernetes.io/h2c, grpc, tcp, opaque)")
        }),
        // Like Istio, a port named `grpc-web` or `tcp-db` says its protocol; anything else is HTTP.
        None => Ok(
            known(port_name.split('-').next().unwrap_or_default()).unwrap_or(PortProtocol::Http)
        ),
    }
}

// === EndpointSlice ===

#[derive(Deserialize)]
struct RawSlice {
    metadata: RawMeta,
    #[serde(rename = "addressType")]
    address_type: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    ports: Vec<RawSlicePort>,
    #[serde(default, deserialize_with = "null_as_empty")]
    endpoints: Vec<RawSliceEndpoint>,
}

#[derive(Deserialize)]
struct RawSlicePort {
    name: Option<String>,
    /// Unset: the slice does not restrict ports (nothing for us to route to by number).
    port: Option<u16>,
}

#[derive(Deserialize)]
struct RawSliceEndpoint {
    #[serde(default, deserialize_with = "null_as_empty")]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: RawConditions,
    zone: Option<String>,
    #[serde(rename = "targetRef")]
    target_ref: Option<RawTargetRef>,
}

#[derive(Deserialize)]
struct RawTargetRef {
    kind: Option<String>,
    name: String,
}

#[derive(Deserialize, Default)]
struct RawConditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

pub(super) fn endpoint_slice(meta: Meta, json: &serde_json::Value) -> Result<Object, FieldError> {
    let raw: RawSlice = from_json(json)?;
    let service = raw
        .metadata
        .labels
        .get("kubernetes.io/service-name")
        .cloned()
        .ok_or_else(|| {
            field_err(
                "metadata.labels",
                "needs the label kubernetes.io/service-name",
            )
        })?;
    if let Some(t) = raw.address_type.as_deref()
        && t != "IPv4"
        && t != "IPv6"
    {
        return Err(field_err(
            "addressType",
            format!("{t:?}: only IPv4 and IPv6 are supported"),
        ));
    }
    let ports = raw
        .ports
        .iter()
        .filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.port?)))
        .collect();
    let mut endpoints = Vec::new();
    for (i, e) in raw.endpoints.iter().enumerate() {
        let mut addresses = Vec::new();
        for (j, a) in e.addresses.iter().enumerate() {
            let ip: IpAddr = a.parse().map_err(|_| {
                field_err(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{a:?} is not an IP address"),
                )
            })?;
            addresses.push(ip);
        }
        let ready = e.conditions.ready.unwrap_or(true);
        endpoints.push(SliceEndpoint {
            addresses,
            ready,
            serving: e.conditions.serving.unwrap_or(ready),
            terminating: e.conditions.terminating.unwrap_or(false),
            zone: e.zone.clone().unwrap_or_default(),
            target_pod: e
                .target_ref
                .as_ref()
                .filter(|t| t.kind.as_deref() == Some("Pod"))
                .map(|t| t.name.clone()),
        });
    }
    Ok(Object::EndpointSlice(EndpointSlice {
        meta,
        service,
        ports,
        endpoints,
    }))
}

// === Pods and Namespaces (Kubernetes source) ===

#[derive(Deserialize)]
struct RawPod {
    #[serde(default)]
    metadata: RawAnnotated,
    #[serde(default)]
    spec: RawPodSpec,
}

#[derive(Deserialize, Default)]
struct RawAnnotated {
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct RawPodSpec {
    #[serde(rename = "serviceAccountName")]
    service_account_name: Option<String>,
}

pub(super) fn pod(meta: Meta, json: &serde_json::Value) -> Result<Object, FieldError> {
    let raw: RawPod = from_json(json)?;
    Ok(Object::Pod(crate::sources::Pod {
        meta,
        service_account: raw
            .spec
            .service_account_name
            .unwrap_or_else(|| "default".to_owned()),
        injected: raw
            .metadata
            .annotations
            .get(crate::inject::INJECTED)
            .is_some_and(|v| v == "true"),
    }))
}

pub(super) fn namespace(meta: Meta, json: &serde_json::Value) -> Result<Object, FieldError> {
    let raw: RawPod = from_json(json)?;
    Ok(Object::Namespace(crate::sources::Namespace {
        meta,
        annotations: raw.metadata.annotations,
    }))
}
