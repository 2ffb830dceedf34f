//! Faults injected on purpose (delays and aborts), for trainers and chaos tests.

use std::time::Duration;

use ferrymesh_proto::config::v1 as cfg;
use http::HeaderName;
use serde::Serialize;

use super::{duration, status};
use crate::policy::InvalidPolicy;

/// What a fault's abort answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FaultAbort {
    /// This HTTP status.
    Http(u16),
    /// HTTP 200 with this `grpc-status`.
    Grpc(u32),
}

/// A fault to inject.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultPolicy {
    /// Every header must match (lowercase name, exact value).
    pub headers: Vec<(String, String)>,
    /// Added delay and the share of matching requests delayed (0..=100).
    pub delay: Option<(Duration, f64)>,
    /// Abort and the share of matching requests aborted (0..=100).
    pub abort: Option<(FaultAbort, f64)>,
    /// The fault ends here, whatever happens.
    #[serde(serialize_with = "system_time")]
    pub expires_at: std::time::SystemTime,
    /// `FaultInjection namespace/name`.
    pub source: String,
}

fn system_time<S: serde::Serializer>(t: &std::time::SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

pub(in crate::policy) fn fault(f: cfg::Fault) -> Result<FaultPolicy, InvalidPolicy> {
    let pct = |v: f64, field: &'static str| {
        if (0.0..=100.0).contains(&v) {
            Ok(v)
        } else {
            Err(InvalidPolicy::Range(field, v.to_string()))
        }
    };
    for h in &f.headers {
        HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| InvalidPolicy::Range("fault.headers", h.name.clone()))?;
    }
    let delay = match duration(f.delay, "fault.delay")? {
        Some(d) => Some((d, pct(f.delay_percentage, "fault.delay.percentage")?)),
        None => None,
    };
    let abort = match (f.abort_http_status, f.abort_grpc_status) {
        (0, None) => None,
        (code, None) => Some(FaultAbort::Http(
            status(code, "fault.abort.httpStatus")?.as_u16(),
        )),
        (0, Some(code)) if code <= 16 => Some(FaultAbort::Grpc(code)),
        _ => {
            return Err(InvalidPolicy::Range(
                "fault.abort",
                "exactly one of httpStatus, grpcStatus".into(),
            ));
        }
    }
    .map(|a| pct(f.abort_percentage, "fault.abort.percentage").map(|p| (a, p)))
    .transpose()?;
    let expires = f
        .expires_at
        .ok_or(InvalidPolicy::Missing("fault.expiresAt"))?;
    let expires_at = std::time::SystemTime::try_from(expires)
        .map_err(|_| InvalidPolicy::Range("fault.expiresAt", "out of range".into()))?;
    let source = f
        .source
        .map(|s| format!("{} {}/{}", s.kind, s.namespace, s.name))
        .unwrap_or_default();
    Ok(FaultPolicy {
        headers: f
            .headers
            .into_iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value))
            .collect(),
        delay,
        abort,
        expires_at,
        source,
    })
}
