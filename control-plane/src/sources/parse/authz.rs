//! `AuthorizationPolicy` spec (API.md 2.a): an `Allow` or `Deny` action and 1..64 rules, each
//! with `from` (identities with at most one trailing `*` segment, serviceAccounts, namespaces,
//! networks), `to` (methods, paths as Gateway API path matches) and `when`. Request principals
//! and claims need JWT authentication, which the mesh does not do yet: they are refused by
//! field rather than ignored.

use ferrymesh_proto::config::v1 as cfg;
use serde::Deserialize;

use super::{FieldError, field_err, from_json};
use crate::crd::authz::AuthorizationPolicySpec as RawSpec;
use crate::model::{AuthzSpec, TargetRef};

#[derive(Deserialize)]
struct Raw {
    spec: RawSpec,
}

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn identity_ok(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let stars = segments.iter().filter(|s| s.contains('*')).count();
    segments.len() >= 2
        && segments.iter().all(|s| !s.is_empty())
        && (stars == 0 || (stars == 1 && segments.last() == Some(&"*")))
}

/// Parses and validates an AuthorizationPolicy's spec.
pub(super) fn spec(json: &serde_json::Value) -> Result<(Vec<TargetRef>, AuthzSpec), FieldError> {
    let s = from_json::<Raw>(json)?.spec;
    let deny = match s.action.as_str() {
        "Allow" => false,
        "Deny" => true,
        other => {
            return Err(field_err(
                "spec.action",
                format!("action is Allow | Deny: got {other:?}"),
            ));
        }
    };
    if !(1..=64).contains(&s.rules.len()) {
        return Err(field_err("spec.rules", "rules holds 1 to 64 rules"));
    }
    let mut rules = Vec::new();
    for (i, r) in s.rules.into_iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        for (j, id) in r.from.identities.iter().enumerate() {
            if !identity_ok(id) {
                return Err(field_err(
                    format!("{at}.from.identities[{j}]"),
                    format!(
                        "identities are spiffe:// URIs with at most one trailing * segment: got {id:?}"
                    ),
                ));
            }
        }
        if !r.from.request_principals.is_empty() || r.when.is_some() {
            let field = if r.when.is_some() {
                format!("{at}.when")
            } else {
                format!("{at}.from.requestPrincipals")
            };
            return Err(field_err(
                field,
                "request principals and claims come from JWT authentication, which this mesh does not do yet",
            ));
        }
        for (j, n) in r.from.networks.iter().enumerate() {
            let ok = n.split_once('/').is_some_and(|(ip, len)| {
                ip.parse::<std::net::IpAddr>().is_ok_and(|ip| {
                    len.parse::<u8>()
                        .is_ok_and(|l| l <= if ip.is_ipv4() { 32 } else { 128 })
                })
            });
            if !ok {
                return Err(field_err(
                    format!("{at}.from.networks[{j}]"),
                    format!("networks are CIDRs like 10.0.0.0/8: got {n:?}"),
                ));
            }
        }
        for (j, m) in r.to.methods.iter().enumerate() {
            if !METHODS.contains(&m.as_str()) {
                return Err(field_err(
                    format!("{at}.to.methods[{j}]"),
                    format!("methods are HTTP methods in capitals: got {m:?}"),
                ));
            }
        }
        let mut paths = Vec::new();
        for (j, p) in r.to.paths.iter().enumerate() {
            let kind = match p.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" => cfg::path_match::Kind::Exact,
                "PathPrefix" => cfg::path_match::Kind::Prefix,
                other => {
                    return Err(field_err(
                        format!("{at}.to.paths[{j}].type"),
                        format!("path type is Exact | PathPrefix: got {other:?}"),
                    ));
                }
            };
            if !p.value.starts_with('/') {
                return Err(field_err(
                    format!("{at}.to.paths[{j}].value"),
                    "a path starts with /",
                ));
            }
            paths.push(cfg::PathMatch {
                kind: kind.into(),
                value: p.value.clone(),
            });
        }
        rules.push(cfg::AuthzRule {
            identities: r.from.identities,
            namespaces: r.from.namespaces,
            networks: r.from.networks,
            methods: r.to.methods,
            paths,
            source: None,
            service_accounts: r
                .from
                .service_accounts
                .into_iter()
                .map(|sa| format!("{}/{}", sa.namespace, sa.name))
                .collect(),
        });
    }
    Ok((s.target_refs, AuthzSpec { deny, rules }))
}
