//! The sections that answer instead of the upstream: `fallback` and `cache`.

use std::time::Duration;

use ferrymesh_proto::config::v1 as cfg;

use super::{Section, http_header_name_invalid, pb};
use crate::crd::resilience::{Cache as RawCache, Fallback as RawFallback};
use crate::sources::parse::{FieldError, field_err};

const TRIGGERS: &[(&str, cfg::FallbackTrigger)] = &[
    ("circuit-open", cfg::FallbackTrigger::FallbackCircuitOpen),
    ("no-endpoints", cfg::FallbackTrigger::FallbackNoEndpoints),
    ("timeout", cfg::FallbackTrigger::FallbackTimeout),
    ("5xx", cfg::FallbackTrigger::FallbackServerError),
    (
        "budget-exhausted",
        cfg::FallbackTrigger::FallbackBudgetExhausted,
    ),
];

pub(super) fn fallback(f: &RawFallback) -> Result<cfg::Fallback, FieldError> {
    let s = Section { prefix: "fallback" };
    let mut triggers = Vec::new();
    let default_triggers = ["circuit-open", "no-endpoints", "timeout", "5xx"]
        .map(str::to_owned)
        .to_vec();
    for (i, item) in f
        .triggers
        .as_ref()
        .unwrap_or(&default_triggers)
        .iter()
        .enumerate()
    {
        let Some((_, v)) = TRIGGERS.iter().find(|(n, _)| n == item) else {
            let names: Vec<_> = TRIGGERS.iter().map(|(n, _)| *n).collect();
            return Err(field_err(
                format!("{}[{i}]", s.path("triggers")),
                format!("triggers are {}: got {item:?}", names.join(", ")),
            ));
        };
        triggers.push(i32::from(*v));
    }
    let target = match (&f.backend_ref, &f.static_response) {
        (Some(b), None) => {
            if b.port == 0 {
                return Err(field_err(s.path("backendRef.port"), "port 1..65535"));
            }
            cfg::fallback::Target::Backend(cfg::BackendRef {
                service: Some(cfg::ServiceRef {
                    name: b.name.clone(),
                    namespace: b.namespace.clone().unwrap_or_default(),
                }),
                port: u32::from(b.port),
            })
        }
        (None, Some(r)) => {
            if !(200..=599).contains(&r.status) {
                return Err(field_err(
                    s.path("staticResponse.status"),
                    format!("status 200..599: got {}", r.status),
                ));
            }
            for name in r.headers.keys() {
                if http_header_name_invalid(name) {
                    return Err(field_err(
                        s.path("staticResponse.headers"),
                        format!("header names are tokens: {name:?}"),
                    ));
                }
            }
            cfg::fallback::Target::StaticResponse(cfg::StaticResponse {
                status: u32::from(r.status),
                headers: r.headers.clone(),
                body: r.body.clone().into_bytes(),
            })
        }
        _ => {
            return Err(field_err(
                s.path("backendRef"),
                "exactly one of backendRef, staticResponse",
            ));
        }
    };
    Ok(cfg::Fallback {
        triggers,
        target: Some(target),
    })
}

pub(super) fn cache(c: &RawCache) -> Result<cfg::Cache, FieldError> {
    let s = Section { prefix: "cache" };
    let methods = c
        .methods
        .clone()
        .unwrap_or_else(|| vec!["GET".into(), "HEAD".into()]);
    for (i, m) in methods.iter().enumerate() {
        if m != "GET" && m != "HEAD" {
            return Err(field_err(
                format!("{}[{i}]", s.path("methods")),
                format!("methods subset of GET, HEAD: got {m:?}"),
            ));
        }
    }
    let max_ttl = s.duration("maxTTL", c.max_ttl.as_ref(), Duration::from_mins(5))?;
    let default_ttl = s.duration("defaultTTL", c.default_ttl.as_ref(), Duration::ZERO)?;
    if default_ttl > max_ttl {
        return Err(field_err(s.path("defaultTTL"), "defaultTTL <= maxTTL"));
    }
    let max_entries = c.max_entries.unwrap_or(1000);
    if max_entries < 1 {
        return Err(field_err(s.path("maxEntries"), "maxEntries >= 1"));
    }
    Ok(cfg::Cache {
        methods,
        default_ttl: Some(pb(default_ttl)),
        max_ttl: Some(pb(max_ttl)),
        max_entries,
        max_body_bytes: c.max_body_bytes.unwrap_or(1_048_576),
        vary_headers: c
            .vary_headers
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        serve_stale_on_error: Some(pb(s.duration(
            "serveStaleOnError",
            c.serve_stale_on_error.as_ref(),
            Duration::ZERO,
        )?)),
    })
}
