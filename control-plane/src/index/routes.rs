//! The routes of one service port: the rules of every HTTPRoute / GRPCRoute whose parent is the
//! Service (GAMMA), each with its route-level sections (timeouts, retry, cache, fallback) merged
//! section-atomically from, most specific first: the route rule's own `timeouts` / `retry`,
//! ResiliencePolicies targeting the route with `sectionName` = the rule's name, then those
//! targeting the whole route. No route: one catch-all "default" route without sections.

use std::collections::BTreeMap;

use ferrymesh_proto::config::v1 as cfg;

use super::faults::ActiveFault;
use super::translate::object_ref;
use crate::model::ServiceKey;
use crate::model::{Object, Policy, Route, RouteRule, ServicePort};

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// The routes attached to `key`:`port`, in route-name then rule order (the proxy applies the
/// Gateway API match precedence across them).
pub(super) fn for_port(
    key: &ServiceKey,
    port: &ServicePort,
    objects: &[&Object],
    faults: &[ActiveFault],
) -> Vec<cfg::Route> {
    let mut attached: Vec<&Route> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Route(r)
                if r.parents.iter().any(|p| {
                    p.name == key.name
                        && p.namespace == key.namespace
                        && p.port.is_none_or(|n| n == port.port)
                        && p.section_name.as_ref().is_none_or(|s| *s == port.name)
                }) =>
            {
                Some(&**r)
            }
            _ => None,
        })
        .collect();
    if attached.is_empty() {
        return vec![cfg::Route {
            name: "default".into(),
            ..Default::default()
        }];
    }
    // NOTE: local files carry no creationTimestamp: the oldest-first tie-break of Gateway API
    // becomes namespace/name order.
    attached
        .sort_by(|a, b| (&a.meta.namespace, &a.meta.name).cmp(&(&b.meta.namespace, &b.meta.name)));
    let policies: Vec<&Policy> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Policy(p) if p.kind == "ResiliencePolicy" => Some(&**p),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for route in attached {
        for (i, rule) in route.rules.iter().enumerate() {
            let mut r = rule_route(route, i, rule, &policies);
            r.fault = fault_for(route, rule.name.as_deref(), faults);
            out.push(r);
        }
    }
    out
}

/// The client-side fault for a rule: one targeting the rule wins over one targeting the route.
fn fault_for(route: &Route, rule: Option<&str>, faults: &[ActiveFault]) -> Option<cfg::Fault> {
    faults
        .iter()
        .filter_map(|f| {
            let (kind, name, section) = f.route.as_ref()?;
            if *kind != route.kind
                || *name != route.meta.name
                || f.service.namespace != route.meta.namespace
            {
                return None;
            }
            match (section, rule) {
                (None, _) => Some((1, f)),
                (Some(s), Some(r)) if s == r => Some((2, f)),
                _ => None,
            }
        })
        .max_by_key(|(level, _)| *level)
        .map(|(_, f)| f.fault.clone())
}

/// Specificity of a policy target for this rule: 2 for the rule, 1 for the whole route.
fn level(policy: &Policy, route: &Route, rule: Option<&str>) -> Option<u8> {
    if policy.meta.namespace != route.meta.namespace {
        return None;
    }
    policy
        .target_refs
        .iter()
        .filter(|t| t.group == GATEWAY_GROUP && t.kind == route.kind && t.name == route.meta.name)
        .filter_map(|t| match (&t.section_name, rule) {
            (None, _) => Some(1),
            (Some(s), Some(r)) if s == r => Some(2),
            _ => None,
        })
        .max()
}

fn rule_route(route: &Route, index: usize, rule: &RouteRule, policies: &[&Policy]) -> cfg::Route {
    let rule_name = rule.name.clone().unwrap_or_else(|| index.to_string());
    let source = object_ref(GATEWAY_GROUP, &route.kind, &route.meta, &rule_name);
    let mut applicable: Vec<(u8, &Policy)> = policies
        .iter()
        .filter_map(|p| Some((level(p, route, rule.name.as_deref())?, *p)))
        .collect();
    applicable.sort_by(|(la, a), (lb, b)| lb.cmp(la).then_with(|| a.meta.name.cmp(&b.meta.name)));
    let mut sections = BTreeMap::new();
    let from_policy = |p: &Policy| object_ref(&p.group, &p.kind, &p.meta, "");
    // Timeouts and retry: the route's own fields are the most specific source.
    let timeouts = match &rule.timeouts {
        Some(t) => {
            sections.insert("timeouts".to_owned(), source.clone());
            Some(*t)
        }
        None => applicable.iter().find_map(|(_, p)| {
            let t = p.resilience.as_ref()?.timeouts?;
            sections.insert("timeouts".to_owned(), from_policy(p));
            Some(t)
        }),
    };
    let (retry, budget) = match &rule.retry {
        Some((r, b)) => {
            sections.insert("retry".to_owned(), source.clone());
            (Some(r.clone()), Some(*b))
        }
        None => applicable
            .iter()
            .find_map(|(_, p)| {
                let s = p.resilience.as_ref()?;
                let r = s.retry.clone()?;
                sections.insert("retry".to_owned(), from_policy(p));
                Some((Some(r), s.budget))
            })
            .unwrap_or((None, None)),
    };
    let cache = applicable.iter().find_map(|(_, p)| {
        let c = p.resilience.as_ref()?.cache.clone()?;
        sections.insert("cache".to_owned(), from_policy(p));
        Some(c)
    });
    let fallback = applicable.iter().find_map(|(_, p)| {
        let mut f = p.resilience.as_ref()?.fallback.clone()?;
        // A backendRef without a namespace means the policy's namespace.
        if let Some(cfg::fallback::Target::Backend(b)) = &mut f.target
            && let Some(svc) = &mut b.service
            && svc.namespace.is_empty()
        {
            svc.namespace.clone_from(&p.meta.namespace);
        }
        sections.insert("fallback".to_owned(), from_policy(p));
        Some(f)
    });
    cfg::Route {
        fault: None,
        name: format!("{}/{rule_name}", route.meta.name),
        matches: rule.matches.clone(),
        backends: rule.backends.clone(),
        timeouts,
        retry,
        cache,
        fallback,
        source: Some(source),
        budget,
        section_sources: sections,
    }
}
