//! `FaultInjection` spec, with every validation rule of API.md 2.a: at least one of delay and
//! abort; percentages 0..100; exactly one of httpStatus (200..599) and grpcStatus (0..16);
//! duration 1m..24h; no workloadSelector on the client side.

use std::time::Duration;

use serde::Deserialize;

use super::{FieldError, field_err, from_json};
use crate::crd::fault::{Abort as RawAbort, FaultInjectionSpec as RawSpec};
use crate::sources::{FaultAbort, FaultSide, FaultSpec, TargetRef};

#[derive(Deserialize)]
struct Raw {
    spec: RawSpec,
}

fn percentage(field: &str, v: Option<f64>) -> Result<f64, FieldError> {
    let v = v.unwrap_or(100.0);
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(field_err(field, format!("percentage 0..100: got {v}")))
    }
}

fn abort(a: &RawAbort) -> Result<(FaultAbort, f64), FieldError> {
    let kind = match (a.http_status, a.grpc_status) {
        (Some(code), None) if (200..=599).contains(&code) => FaultAbort::Http(code),
        (Some(code), None) => {
            return Err(field_err(
                "spec.abort.httpStatus",
                format!("httpStatus 200..599: got {code}"),
            ));
        }
        (None, Some(code)) if code <= 16 => FaultAbort::Grpc(code),
        (None, Some(code)) => {
            return Err(field_err(
                "spec.abort.grpcStatus",
                format!("grpcStatus 0..16: got {code}"),
            ));
        }
        _ => {
            return Err(field_err(
                "spec.abort",
                "exactly one of httpStatus, grpcStatus",
            ));
        }
    };
    Ok((kind, percentage("spec.abort.percentage", a.percentage)?))
}

/// Parses and validates a FaultInjection's spec.
pub(super) fn spec(json: &serde_json::Value) -> Result<(Vec<TargetRef>, FaultSpec), FieldError> {
    let s = from_json::<Raw>(json)?.spec;
    let side = match s.side.as_deref() {
        None | Some("Server") => FaultSide::Server,
        Some("Client") => FaultSide::Client,
        Some(other) => {
            return Err(field_err(
                "spec.side",
                format!("side is Server | Client: got {other:?}"),
            ));
        }
    };
    if side == FaultSide::Client && s.workload_selector.is_some() {
        return Err(field_err(
            "spec.workloadSelector",
            "workloadSelector is forbidden when side is Client",
        ));
    }
    if s.delay.is_none() && s.abort.is_none() {
        return Err(field_err("spec", "at least one of delay, abort"));
    }
    let delay = s
        .delay
        .map(|d| {
            let fixed = ferrymesh_proto::duration::parse(&d.fixed).map_err(|e| {
                field_err(
                    "spec.delay.fixed",
                    format!("duration format (GEP-2257): {e}"),
                )
            })?;
            Ok::<_, FieldError>((fixed, percentage("spec.delay.percentage", d.percentage)?))
        })
        .transpose()?;
    let abort = s.abort.as_ref().map(abort).transpose()?;
    let duration = s.duration.ok_or_else(|| {
        field_err(
            "spec.duration",
            "duration is required (1m..24h): chaos must end by itself",
        )
    })?;
    let duration = ferrymesh_proto::duration::parse(&duration)
        .map_err(|e| field_err("spec.duration", format!("duration format (GEP-2257): {e}")))?;
    if duration < Duration::from_mins(1) || duration > Duration::from_hours(24) {
        return Err(field_err(
            "spec.duration",
            format!(
                "duration 1m..24h: got {}",
                ferrymesh_proto::duration::format(duration)
            ),
        ));
    }
    for (i, t) in s.target_refs.iter().enumerate() {
        match (t.group.as_str(), t.kind.as_str()) {
            ("", "Service") => {}
            ("gateway.networking.k8s.io", "HTTPRoute" | "GRPCRoute") => {
                // Routes are chosen by the caller's proxy: only it can inject per route.
                if side != FaultSide::Client {
                    return Err(field_err(
                        "spec.side",
                        format!(
                            "a FaultInjection on a route (targetRefs[{i}]) injects on the client side: set side: Client"
                        ),
                    ));
                }
            }
            _ => {
                return Err(field_err(
                    format!("spec.targetRefs[{i}]"),
                    "FaultInjection targets a Service, HTTPRoute or GRPCRoute",
                ));
            }
        }
    }
    let headers = s
        .matches
        .map(|m| {
            m.headers
                .into_iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value))
                .collect()
        })
        .unwrap_or_default();
    let selector = s
        .workload_selector
        .map(|w| w.match_labels)
        .unwrap_or_default();
    Ok((
        s.target_refs,
        FaultSpec {
            side,
            selector,
            headers,
            delay,
            abort,
            duration,
        },
    ))
}
