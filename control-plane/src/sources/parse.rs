//! Multi-document YAML -> typed [`Object`]s. A document of an unknown kind is skipped with a
//! warning; any invalid document rejects the whole file (the caller keeps the last good one),
//! with an error naming the file, the object and the field.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{Meta, Object, Policy, ResilienceSections, TargetRef};

use self::core::{endpoint_slice, namespace, pod, service};
pub use crate::model::{ParseError, Parsed};

const POLICY_KINDS: &[(&str, &str)] = &[
    ("policy.ferrymesh.io", "ResiliencePolicy"),
    ("policy.ferrymesh.io", "AuthenticationPolicy"),
    ("policy.ferrymesh.io", "AuthorizationPolicy"),
    ("policy.ferrymesh.io", "FaultInjection"),
    ("gateway.ferrymesh.io", "Aggregation"),
    ("gateway.networking.k8s.io", "HTTPRoute"),
    ("gateway.networking.k8s.io", "GRPCRoute"),
];

/// Parses every document of one file.
///
/// # Errors
/// The first invalid document, as a [`ParseError`].
pub fn parse_documents(file: &Path, text: &str) -> Result<Parsed, ParseError> {
    let mut parsed = Parsed::default();
    let mut seen = HashSet::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let label = format!("document {}", i + 1);
        let err = |object: &str, field: &str, message: String| ParseError {
            file: file.to_owned(),
            object: object.to_owned(),
            field: field.to_owned(),
            message,
        };
        let value =
            serde_yaml_ng::Value::deserialize(doc).map_err(|e| err(&label, ".", e.to_string()))?;
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        let json = serde_json::to_value(&value).map_err(|e| err(&label, ".", e.to_string()))?;
        let head: Head = from_json(&json).map_err(|(f, m)| err(&label, &f, m))?;
        let (group, version) = match head.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", head.api_version.as_str()),
        };
        let object_label = format!(
            "{} {}/{}",
            head.kind,
            head.metadata.namespace.as_deref().unwrap_or("default"),
            head.metadata.name
        );
        let meta = meta(file, &head.metadata).map_err(|(f, m)| err(&object_label, &f, m))?;
        let object = match (group, head.kind.as_str()) {
            ("", "Service") => service(meta, &json),
            ("discovery.k8s.io", "EndpointSlice") => endpoint_slice(meta, &json),
            ("gateway.networking.k8s.io", k @ ("HTTPRoute" | "GRPCRoute")) => {
                route::route(meta, k, &json)
            }
            (g, k) if POLICY_KINDS.contains(&(g, k)) => policy(meta, g, k, &json),
            ("", "Pod") => pod(meta, &json),
            ("", "Namespace") => namespace(meta, &json),
            ("apps", "Deployment" | "StatefulSet" | "DaemonSet")
            | ("", "ConfigMap" | "ServiceAccount") => {
                // Kubernetes kinds that share the folder (ferryctl reads Deployments) but
                // carry nothing the controller serves.
                tracing::debug!(
                    "{}: {object_label}: not served by the controller",
                    file.display()
                );
                continue;
            }
            _ => {
                parsed.warnings.push(format!(
                    "{}: {object_label}: skipped: unknown kind {}/{}",
                    file.display(),
                    head.api_version,
                    head.kind
                ));
                continue;
            }
        }
        .map_err(|(f, m)| err(&object_label, &f, m))?;
        let _ = version;
        if !seen.insert(object.key()) {
            return Err(err(
                &object_label,
                "metadata.name",
                "defined twice in this file".to_owned(),
            ));
        }
        parsed.objects.push(object);
    }
    Ok(parsed)
}

type FieldError = (String, String);

fn from_json<T: DeserializeOwned>(json: &serde_json::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(json).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // A required field that is missing is named by its own path (`spec.targetRefs`).
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next());
        let path = match (path.as_str(), missing) {
            ("" | ".", Some(field)) => field.to_owned(),
            (_, Some(field)) => format!("{path}.{field}"),
            ("", None) => ".".to_owned(),
            _ => path,
        };
        (path, message)
    })
}

fn field_err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    (field.into(), message.into())
}

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    metadata: RawMeta,
}

#[derive(Deserialize)]
struct RawMeta {
    name: String,
    namespace: Option<String>,
    generation: Option<i64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

fn meta(file: &Path, raw: &RawMeta) -> Result<Meta, FieldError> {
    check_dns_label(&raw.name, 253).map_err(|m| field_err("metadata.name", m))?;
    let namespace = raw
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    check_dns_label(&namespace, 63).map_err(|m| field_err("metadata.namespace", m))?;
    Ok(Meta {
        name: raw.name.clone(),
        namespace,
        generation: raw.generation.unwrap_or(1),
        file: Some(file.to_owned()),
    })
}

/// RFC 1123 label (or subdomain when `max` is 253).
fn check_dns_label(name: &str, max: usize) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (max > 63 && b == b'.')
        })
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name (lowercase letters, digits and '-', at most {max} characters)"
        ))
    }
}

// === policies ===

#[derive(Deserialize)]
struct RawPolicy {
    spec: RawPolicySpec,
}

#[derive(Deserialize)]
struct RawAuthn {
    spec: crate::crd::authn::AuthenticationPolicySpec,
}

#[derive(Deserialize)]
struct RawPolicySpec {
    #[serde(rename = "targetRefs", default)]
    target_refs: Vec<TargetRef>,
}

const TARGET_KINDS: &[(&str, &str)] = &[
    ("", "Namespace"),
    ("", "Service"),
    ("gateway.networking.k8s.io", "HTTPRoute"),
    ("gateway.networking.k8s.io", "GRPCRoute"),
    ("gateway.networking.k8s.io", "Gateway"),
];

fn policy(
    meta: Meta,
    group: &str,
    kind: &str,
    json: &serde_json::Value,
) -> Result<Object, FieldError> {
    let spec = json.get("spec").cloned().unwrap_or(serde_json::Value::Null);
    let mut authorization = None;
    let (target_refs, resilience, fault) = match (group, kind) {
        ("policy.ferrymesh.io", "ResiliencePolicy") => {
            let (refs, sections) = resilience::spec(json)?;
            (refs, Some(sections), None)
        }
        ("policy.ferrymesh.io", "FaultInjection") => {
            let (refs, fault) = fault::spec(json)?;
            (refs, None, Some(fault))
        }
        ("policy.ferrymesh.io", "AuthorizationPolicy") => {
            let (refs, spec) = authz::spec(json)?;
            authorization = Some(spec);
            (refs, None, None)
        }
        ("policy.ferrymesh.io", _) => (from_json::<RawPolicy>(json)?.spec.target_refs, None, None),
        _ => (Vec::new(), None, None),
    };
    if group == "policy.ferrymesh.io" {
        check_target_refs(&meta, &target_refs)?;
    }
    if let Some(r) = &resilience
        && target_refs
            .iter()
            .any(|t| matches!(t.kind.as_str(), "HTTPRoute" | "GRPCRoute"))
    {
        for (set, field) in [
            (r.breaker.is_some(), "circuitBreaker"),
            (r.outlier.is_some(), "outlierDetection"),
            (r.health_check.is_some(), "healthCheck"),
            (r.lb.is_some(), "loadBalancer"),
        ] {
            if set {
                return Err(field_err(
                    format!("spec.{field}"),
                    format!(
                        "{field} is per backend Service: target the Service, not a route (routes take timeouts, retry, cache and fallback)"
                    ),
                ));
            }
        }
    }
    if resilience
        .as_ref()
        .is_some_and(ResilienceSections::is_empty)
    {
        return Err(field_err(
            "spec",
            "at least one section: set one of timeouts, retry, circuitBreaker, outlierDetection, healthCheck, fallback, cache, loadBalancer",
        ));
    }
    let mtls_strict = if kind == "AuthenticationPolicy" {
        let authn: crate::crd::authn::AuthenticationPolicySpec = from_json::<RawAuthn>(json)?.spec;
        if authn.jwt.is_some() {
            return Err(field_err(
                "spec.jwt",
                "JWT authentication is not supported by this version of the mesh; remove jwt (mtls works)",
            ));
        }
        match authn.mtls.map(|m| m.mode) {
            None => None,
            Some(m) if m == "Strict" => Some(true),
            Some(m) if m == "Permissive" => Some(false),
            Some(other) => {
                return Err(field_err(
                    "spec.mtls.mode",
                    format!("mode is Strict | Permissive: got {other:?}"),
                ));
            }
        }
    } else {
        None
    };
    if matches!(kind, "AuthenticationPolicy" | "AuthorizationPolicy") {
        for (i, t) in target_refs.iter().enumerate() {
            if !matches!(t.kind.as_str(), "Namespace" | "Service") {
                return Err(field_err(
                    format!("spec.targetRefs[{i}].kind"),
                    "targets a Namespace or a Service (its workloads' inbound ports)",
                ));
            }
        }
    }
    // Our checks above name the exact element and value; the CRD's own CEL rules run last,
    // so a file is never accepted for what the API server would refuse.
    if let Err(failures) = crate::crd::check_cel(group, kind, json) {
        let (path, message) = failures.into_iter().next().unwrap_or_default();
        return Err(field_err(path, message));
    }
    Ok(Object::Policy(Box::new(Policy {
        meta,
        group: group.to_owned(),
        kind: kind.to_owned(),
        target_refs,
        resilience,
        fault,
        mtls_strict,
        authorization,
        spec,
    })))
}

fn check_target_refs(meta: &Meta, refs: &[TargetRef]) -> Result<(), FieldError> {
    if !(1..=16).contains(&refs.len()) {
        return Err(field_err(
            "spec.targetRefs",
            "targetRefs holds 1 to 16 references",
        ));
    }
    for (i, t) in refs.iter().enumerate() {
        if !TARGET_KINDS.contains(&(t.group.as_str(), t.kind.as_str())) {
            return Err(field_err(
                format!("spec.targetRefs[{i}]"),
                format!(
                    "target kinds are Namespace, Service (group \"\"), HTTPRoute, GRPCRoute, Gateway (group gateway.networking.k8s.io): got group {:?} kind {:?}",
                    t.group, t.kind
                ),
            ));
        }
        if t.kind == "Namespace" && t.name != meta.namespace {
            return Err(field_err(
                format!("spec.targetRefs[{i}].name"),
                "a Namespace target names the policy's own namespace",
            ));
        }
    }
    Ok(())
}

mod authz;
mod core;
mod fault;
mod resilience;
mod route;

#[cfg(test)]
mod tests;
