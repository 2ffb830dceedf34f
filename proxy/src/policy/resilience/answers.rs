//! Answers other than the upstream's: the fallback when a call fails, and the response cache.

use std::collections::BTreeMap;
use std::time::Duration;

use ferrymesh_proto::config::v1 as cfg;
use http::{HeaderName, Method, StatusCode};
use serde::Serialize;

use super::{duration, methods, required, status};
use crate::policy::InvalidPolicy;

/// When the fallback is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FallbackTrigger {
    /// The breaker is open.
    CircuitOpen,
    /// No endpoint is ready.
    NoEndpoints,
    /// The request timed out.
    Timeout,
    /// A 5xx after retries.
    #[serde(rename = "5xx")]
    ServerError,
    /// The retry budget is exhausted.
    BudgetExhausted,
}

/// What the fallback serves.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FallbackTarget {
    /// Another service port: `service.namespace:port`.
    Backend(String),
    /// A fixed response.
    StaticResponse {
        /// Status.
        #[serde(serialize_with = "code")]
        status: StatusCode,
        /// Headers.
        headers: BTreeMap<String, String>,
        /// Body.
        body: String,
    },
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's serialize_with signature
fn code<S: serde::Serializer>(v: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(v.as_u16())
}

/// The fallback section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FallbackPolicy {
    /// Triggers.
    pub triggers: Vec<FallbackTrigger>,
    /// Target.
    pub target: FallbackTarget,
}

pub(in crate::policy) fn fallback(f: cfg::Fallback) -> Result<FallbackPolicy, InvalidPolicy> {
    let triggers = f
        .triggers
        .iter()
        .map(|v| match cfg::FallbackTrigger::try_from(*v) {
            Ok(cfg::FallbackTrigger::FallbackCircuitOpen) => Ok(FallbackTrigger::CircuitOpen),
            Ok(cfg::FallbackTrigger::FallbackNoEndpoints) => Ok(FallbackTrigger::NoEndpoints),
            Ok(cfg::FallbackTrigger::FallbackTimeout) => Ok(FallbackTrigger::Timeout),
            Ok(cfg::FallbackTrigger::FallbackServerError) => Ok(FallbackTrigger::ServerError),
            Ok(cfg::FallbackTrigger::FallbackBudgetExhausted) => {
                Ok(FallbackTrigger::BudgetExhausted)
            }
            Ok(cfg::FallbackTrigger::Unspecified) | Err(_) => {
                Err(InvalidPolicy::Enum("fallback.triggers", *v))
            }
        })
        .collect::<Result<_, _>>()?;
    let target = match f
        .target
        .ok_or(InvalidPolicy::Missing("fallback.backendRef|staticResponse"))?
    {
        cfg::fallback::Target::Backend(b) => {
            let svc = b
                .service
                .ok_or(InvalidPolicy::Missing("fallback.backendRef.name"))?;
            let port = u16::try_from(b.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or(InvalidPolicy::Port(b.port))?;
            FallbackTarget::Backend(format!("{}.{}:{port}", svc.name, svc.namespace))
        }
        cfg::fallback::Target::StaticResponse(r) => {
            for name in r.headers.keys() {
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    InvalidPolicy::Range("fallback.staticResponse.headers", name.clone())
                })?;
            }
            FallbackTarget::StaticResponse {
                status: status(r.status, "fallback.staticResponse.status")?,
                headers: r.headers,
                body: String::from_utf8(r.body).map_err(|_| {
                    InvalidPolicy::Range("fallback.staticResponse.body", "not UTF-8".into())
                })?,
            }
        }
    };
    Ok(FallbackPolicy { triggers, target })
}

/// The response cache section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CachePolicy {
    /// GET and/or HEAD.
    #[serde(serialize_with = "methods")]
    pub methods: Vec<Method>,
    /// TTL for 200s without freshness information (zero: not cached).
    pub default_ttl: Duration,
    /// Longest freshness honoured.
    pub max_ttl: Duration,
    /// Entries kept.
    pub max_entries: u32,
    /// Largest body stored.
    pub max_body_bytes: u32,
    /// Request headers that are always part of the key.
    pub vary_headers: Vec<String>,
    /// A stale entry may answer an upstream error for this long past its freshness.
    pub serve_stale_on_error: Duration,
}

pub(in crate::policy) fn cache(c: cfg::Cache) -> Result<CachePolicy, InvalidPolicy> {
    let methods: Vec<Method> = c
        .methods
        .iter()
        .map(|m| match m.as_str() {
            "GET" => Ok(Method::GET),
            "HEAD" => Ok(Method::HEAD),
            other => Err(InvalidPolicy::Range("cache.methods", other.to_owned())),
        })
        .collect::<Result<_, _>>()?;
    for h in &c.vary_headers {
        HeaderName::from_bytes(h.as_bytes())
            .map_err(|_| InvalidPolicy::Range("cache.varyHeaders", h.clone()))?;
    }
    if c.max_entries == 0 {
        return Err(InvalidPolicy::Range("cache.maxEntries", "0".into()));
    }
    Ok(CachePolicy {
        methods,
        default_ttl: duration(c.default_ttl, "cache.defaultTTL")?.unwrap_or_default(),
        max_ttl: required(c.max_ttl, "cache.maxTTL")?,
        max_entries: c.max_entries,
        max_body_bytes: c.max_body_bytes,
        vary_headers: c.vary_headers,
        serve_stale_on_error: duration(c.serve_stale_on_error, "cache.serveStaleOnError")?
            .unwrap_or_default(),
    })
}
