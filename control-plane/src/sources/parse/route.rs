//! Gateway API `HTTPRoute` and `GRPCRoute` as the mesh serves them (GAMMA: a Service parent):
//! matches (path Exact / PathPrefix, method, headers and query parameters by exact value; gRPC
//! service and method), weighted Service backends, and HTTPRoute `timeouts` (GEP-1742) and
//! `retry` (GEP-1731). What the mesh cannot do is refused with the field and the reason, never
//! silently ignored.

use std::time::Duration;

use ferrymesh_proto::config::v1 as cfg;
use serde::Deserialize;

use super::{FieldError, field_err, from_json};
use crate::sources::{Meta, Object, Route, RouteParent, RouteRule};

#[derive(Deserialize)]
struct Raw {
    spec: RawSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    #[serde(default)]
    parent_refs: Vec<RawParent>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawParent {
    /// Gateway API's default is `gateway.networking.k8s.io`.
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u16>,
    section_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRule {
    name: Option<String>,
    #[serde(default)]
    matches: Vec<serde_json::Value>,
    #[serde(default)]
    filters: Vec<serde_json::Value>,
    #[serde(default)]
    backend_refs: Vec<RawBackend>,
    timeouts: Option<RawTimeouts>,
    retry: Option<RawRetry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBackend {
    #[serde(default)]
    group: String,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u16>,
    weight: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTimeouts {
    request: Option<String>,
    backend_request: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Option<u32>,
    #[serde(default)]
    codes: Vec<u16>,
    backoff: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpMatch {
    path: Option<RawPath>,
    method: Option<String>,
    #[serde(default)]
    headers: Vec<RawValueMatch>,
    #[serde(default, rename = "queryParams")]
    query_params: Vec<RawValueMatch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPath {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawValueMatch {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpcMatch {
    method: Option<RawGrpcMethod>,
    #[serde(default)]
    headers: Vec<RawValueMatch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpcMethod {
    #[serde(rename = "type")]
    kind: Option<String>,
    service: Option<String>,
    method: Option<String>,
}

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).expect("GEP-2257 durations fit a protobuf Duration")
}

fn duration(field: String, text: &str) -> Result<Duration, FieldError> {
    ferrymesh_proto::duration::parse(text)
        .map_err(|e| field_err(field, format!("duration format (GEP-2257): {e}")))
}

/// Parses and validates an HTTPRoute or GRPCRoute.
pub(super) fn route(
    meta: Meta,
    kind: &str,
    json: &serde_json::Value,
) -> Result<Object, FieldError> {
    let raw: Raw = from_json(json)?;
    let spec = raw.spec;
    if !(1..=32).contains(&spec.parent_refs.len()) {
        return Err(field_err(
            "spec.parentRefs",
            "parentRefs holds 1 to 32 references",
        ));
    }
    let mut parents = Vec::new();
    let mut gateway_parents = false;
    for (i, p) in spec.parent_refs.iter().enumerate() {
        let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
        match (group, p.kind.as_deref().unwrap_or("Gateway")) {
            ("", "Service") => parents.push(RouteParent {
                name: p.name.clone(),
                namespace: p
                    .namespace
                    .clone()
                    .unwrap_or_else(|| meta.namespace.clone()),
                port: p.port,
                section_name: p.section_name.clone(),
            }),
            ("gateway.networking.k8s.io", "Gateway") => gateway_parents = true,
            (g, k) => {
                return Err(field_err(
                    format!("spec.parentRefs[{i}]"),
                    format!(
                        "a parent is a Service (group \"\", kind Service) or a Gateway: got group {g:?} kind {k:?}"
                    ),
                ));
            }
        }
    }
    if !(1..=16).contains(&spec.rules.len()) {
        return Err(field_err("spec.rules", "rules holds 1 to 16 rules"));
    }
    let mut names = std::collections::HashSet::new();
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if let Some(name) = &r.name
            && !names.insert(name.clone())
        {
            return Err(field_err(format!("{at}.name"), "rule names are unique"));
        }
        // Gateway routes may carry filters (the gateway's Aggregation hook); the mesh has none.
        if !parents.is_empty() && !r.filters.is_empty() {
            return Err(field_err(
                format!("{at}.filters"),
                "filters are not supported on mesh routes (a Service parent)",
            ));
        }
        rules.push(rule(&at, kind, &meta.namespace, r)?);
    }
    Ok(Object::Route(Box::new(Route {
        meta,
        kind: kind.to_owned(),
        parents,
        gateway_parents,
        rules,
    })))
}

fn rule(at: &str, kind: &str, namespace: &str, r: &RawRule) -> Result<RouteRule, FieldError> {
    let mut matches = Vec::new();
    for (j, m) in r.matches.iter().enumerate() {
        let at = format!("{at}.matches[{j}]");
        matches.push(if kind == "GRPCRoute" {
            grpc_match(&at, m)?
        } else {
            http_match(&at, m)?
        });
    }
    if matches.is_empty() {
        matches.push(cfg::RouteMatch {
            path: Some(cfg::PathMatch {
                kind: cfg::path_match::Kind::Prefix.into(),
                value: "/".into(),
            }),
            ..Default::default()
        });
    }
    let mut backends = Vec::new();
    for (j, b) in r.backend_refs.iter().enumerate() {
        let at = format!("{at}.backendRefs[{j}]");
        if !b.group.is_empty() || b.kind.as_deref().is_some_and(|k| k != "Service") {
            return Err(field_err(
                at,
                "a backend is a Service (group \"\", kind Service)",
            ));
        }
        let Some(port) = b.port else {
            return Err(field_err(
                format!("{at}.port"),
                "a Service backend names its port",
            ));
        };
        let weight = b.weight.unwrap_or(1);
        if weight > 1_000_000 {
            return Err(field_err(format!("{at}.weight"), "weight 0..1000000"));
        }
        backends.push(cfg::WeightedBackend {
            service: Some(cfg::ServiceRef {
                name: b.name.clone(),
                namespace: b.namespace.clone().unwrap_or_else(|| namespace.to_owned()),
            }),
            port: u32::from(port),
            weight,
        });
    }
    if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
        return Err(field_err(
            format!("{at}.backendRefs"),
            "at least one backend has a weight above 0",
        ));
    }
    Ok(RouteRule {
        name: r.name.clone(),
        matches,
        backends,
        timeouts: r.timeouts.as_ref().map(|t| timeouts(at, t)).transpose()?,
        retry: r.retry.as_ref().map(|t| retry(at, t)).transpose()?,
    })
}

fn value_matches(
    at: &str,
    list: &[RawValueMatch],
    what: &str,
) -> Result<Vec<cfg::ExactMatch>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(k, h)| {
            if h.kind.as_deref().is_some_and(|t| t != "Exact") {
                return Err(field_err(
                    format!("{at}.{what}[{k}].type"),
                    "only Exact matches are supported (RegularExpression is implementation-specific)",
                ));
            }
            let name = if what == "headers" {
                http::HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| field_err(format!("{at}.{what}[{k}].name"), "a header name"))?
                    .as_str()
                    .to_owned()
            } else {
                h.name.clone()
            };
            Ok(cfg::ExactMatch {
                name,
                value: h.value.clone(),
            })
        })
        .collect()
}

fn http_match(at: &str, json: &serde_json::Value) -> Result<cfg::RouteMatch, FieldError> {
    let m: RawHttpMatch = from_json(json).map_err(|(f, e)| (format!("{at}.{f}"), e))?;
    let path = match &m.path {
        None => ("PathPrefix", "/".to_owned()),
        Some(p) => (
            p.kind.as_deref().unwrap_or("PathPrefix"),
            p.value.clone().unwrap_or_else(|| "/".into()),
        ),
    };
    let kind = match path.0 {
        "Exact" => cfg::path_match::Kind::Exact,
        "PathPrefix" => cfg::path_match::Kind::Prefix,
        other => {
            return Err(field_err(
                format!("{at}.path.type"),
                format!(
                    "path type is Exact | PathPrefix (RegularExpression is implementation-specific and not supported): got {other:?}"
                ),
            ));
        }
    };
    if !path.1.starts_with('/') {
        return Err(field_err(
            format!("{at}.path.value"),
            "a path starts with /",
        ));
    }
    if let Some(method) = &m.method
        && !METHODS.contains(&method.as_str())
    {
        return Err(field_err(
            format!("{at}.method"),
            format!("method is one of {}: got {method:?}", METHODS.join(", ")),
        ));
    }
    Ok(cfg::RouteMatch {
        path: Some(cfg::PathMatch {
            kind: kind.into(),
            value: path.1,
        }),
        method: m.method.clone().unwrap_or_default(),
        headers: value_matches(at, &m.headers, "headers")?,
        query_params: value_matches(at, &m.query_params, "queryParams")?,
    })
}

fn grpc_match(at: &str, json: &serde_json::Value) -> Result<cfg::RouteMatch, FieldError> {
    let m: RawGrpcMatch = from_json(json).map_err(|(f, e)| (format!("{at}.{f}"), e))?;
    let path = match &m.method {
        None => cfg::PathMatch {
            kind: cfg::path_match::Kind::Prefix.into(),
            value: "/".into(),
        },
        Some(g) => {
            if g.kind.as_deref().is_some_and(|t| t != "Exact") {
                return Err(field_err(
                    format!("{at}.method.type"),
                    "only Exact method matches are supported",
                ));
            }
            match (&g.service, &g.method) {
                (Some(s), Some(m)) => cfg::PathMatch {
                    kind: cfg::path_match::Kind::Exact.into(),
                    value: format!("/{s}/{m}"),
                },
                (Some(s), None) => cfg::PathMatch {
                    kind: cfg::path_match::Kind::Prefix.into(),
                    value: format!("/{s}/"),
                },
                (None, _) => {
                    return Err(field_err(
                        format!("{at}.method.service"),
                        "a method match names at least the service",
                    ));
                }
            }
        }
    };
    Ok(cfg::RouteMatch {
        path: Some(path),
        method: String::new(),
        headers: value_matches(at, &m.headers, "headers")?,
        query_params: Vec::new(),
    })
}

fn timeouts(at: &str, t: &RawTimeouts) -> Result<cfg::Timeouts, FieldError> {
    let request = t
        .request
        .as_deref()
        .map(|v| duration(format!("{at}.timeouts.request"), v))
        .transpose()?;
    let backend = t
        .backend_request
        .as_deref()
        .map(|v| duration(format!("{at}.timeouts.backendRequest"), v))
        .transpose()?;
    if let (Some(r), Some(b)) = (request, backend)
        && !r.is_zero()
        && b > r
    {
        return Err(field_err(
            format!("{at}.timeouts.backendRequest"),
            "backendRequest <= request (GEP-1742)",
        ));
    }
    Ok(cfg::Timeouts {
        request: request.map(pb),
        per_try: backend.map(pb),
        connect: None,
        idle: None,
        deadline_propagation: true,
    })
}

fn retry(at: &str, r: &RawRetry) -> Result<(cfg::Retry, cfg::RetryBudget), FieldError> {
    let attempts = r.attempts.unwrap_or(1);
    if attempts > 10 {
        return Err(field_err(format!("{at}.retry.attempts"), "attempts 0..10"));
    }
    for (k, c) in r.codes.iter().enumerate() {
        if !(400..=599).contains(c) {
            return Err(field_err(
                format!("{at}.retry.codes[{k}]"),
                format!("codes are 400..599: got {c}"),
            ));
        }
    }
    let base = r
        .backoff
        .as_deref()
        .map(|v| duration(format!("{at}.retry.backoff"), v))
        .transpose()?
        .unwrap_or(Duration::from_millis(25));
    // GEP-1731: `backoff` is the least wait; later waits grow exponentially up to 10x it.
    Ok((
        cfg::Retry {
            attempts,
            retry_on: Vec::new(),
            retry_on_status: r.codes.iter().map(|c| u32::from(*c)).collect(),
            grpc_retry_on: Vec::new(),
            methods: ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]
                .map(str::to_owned)
                .to_vec(),
            backoff: Some(cfg::Backoff {
                strategy: cfg::backoff::Strategy::Exponential.into(),
                base: Some(pb(base)),
                max: Some(pb(base * 10)),
            }),
            respect_retry_after: true,
            max_request_body_bytes: 65_536,
        },
        cfg::RetryBudget {
            ratio: 0.2,
            min_retries_per_second: 10,
            window: Some(pb(Duration::from_secs(10))),
        },
    ))
}
