//! HTTPRoute / GRPCRoute routing on the client side (GAMMA): a request to a service with routes
//! takes the most specific rule it matches (404 `no-route` when none does), then one of the
//! rule's backends by weight; the call goes to that backend with the rule's sections (timeouts,
//! retry, cache, fallback) in place of the backend's own.

use std::future::Future;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use rand::Rng as _;

use super::logical::{Logical, Resolution};
use crate::explain::Explain;
use crate::http::{Body, proxy_response};
use crate::outbound::Outbound;
use crate::policy::ClientPolicy;

/// Where a request goes after routing.
#[derive(Debug)]
pub enum Routed {
    /// Call `logical` with `policy`; metrics under `service`.
    Call {
        /// The backend.
        logical: Arc<Logical>,
        /// The policy in force (with the route's sections).
        policy: Option<Arc<ClientPolicy>>,
        /// The backend's `namespace/name`.
        service: String,
    },
    /// The proxy answers itself.
    Answer(Response<Body>),
}

/// Routes a request for `parent` (whose policy is `policy`).
// NOTE: not `async`: only an owned copy of the head goes into the future, since a reference to
// the request (whose body type is not `Sync`) would make it not `Send`.
pub fn route(
    ctx: &Arc<Outbound>,
    parent: Arc<Logical>,
    service: String,
    policy: Option<Arc<ClientPolicy>>,
    req: &Request<Body>,
) -> impl Future<Output = Routed> + Send + 'static {
    let head = Head {
        method: req.method().clone(),
        uri: req.uri().clone(),
        headers: req.headers().clone(),
        explain: req.extensions().get::<Explain>().cloned(),
    };
    route_head(ctx.clone(), parent, service, policy, head)
}

#[derive(Debug)]
struct Head {
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    explain: Option<Explain>,
}

async fn route_head(
    ctx: Arc<Outbound>,
    parent: Arc<Logical>,
    service: String,
    policy: Option<Arc<ClientPolicy>>,
    head: Head,
) -> Routed {
    let Head {
        method,
        uri,
        headers,
        explain,
    } = head;
    let Some(routes) = policy.as_ref().filter(|p| !p.routes.is_empty()) else {
        return Routed::Call {
            logical: parent,
            policy,
            service,
        };
    };
    let Some(rule) = routes.routes.select(&method, &uri, &headers) else {
        return Routed::Answer(proxy_response(
            StatusCode::NOT_FOUND,
            crate::http::ProxyError::NoRoute,
            &format!("no route of {service} matches {method} {}", uri.path()),
        ));
    };
    let route = &routes.routes.rules[rule];
    let (logical, base, service) = match pick(&route.backends) {
        Some(name) if name != parent.name => {
            let backend = ctx.logical(name);
            match backend.resolve().await {
                Ok(Resolution::Service { endpoints, policy }) => {
                    let service = endpoints.service.clone();
                    (backend, policy, service)
                }
                _ => {
                    return Routed::Answer(proxy_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        crate::http::ProxyError::NoBackend,
                        &format!("route {}: backend {name} is not in the mesh", route.name),
                    ));
                }
            }
        }
        // No backends (the parent itself) or the parent named as one.
        _ => (parent, policy.clone(), service),
    };
    // NOTE: the same empty policy on every request: a fresh one would miss the merged
    // policy's cache, rebuilding the route's stack (and its retry budget) per request.
    let base = base.unwrap_or_else(|| logical.empty_policy(&service));
    if let Some(e) = &explain {
        e.note(format!("route {} -> {service}", route.name));
    }
    let policy = logical.stack.effective(routes, rule, &base);
    Routed::Call {
        logical,
        policy: Some(policy),
        service,
    }
}

/// A backend by weight; `None` when there are none.
fn pick(backends: &[(String, u32)]) -> Option<&str> {
    let total: u64 = backends.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut at = rand::rng().random_range(0..total);
    for (name, weight) in backends {
        let w = u64::from(*weight);
        if at < w {
            return Some(name);
        }
        at -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_are_picked_by_weight() {
        let backends = vec![
            ("a".to_owned(), 9),
            ("b".to_owned(), 1),
            ("c".to_owned(), 0),
        ];
        let mut counts = std::collections::HashMap::new();
        for _ in 0..10_000 {
            *counts.entry(pick(&backends).unwrap()).or_insert(0) += 1;
        }
        assert!(!counts.contains_key("c"), "weight 0 is never picked");
        assert!((8_500..9_500).contains(&counts["a"]), "{counts:?}");
        assert!(pick(&[]).is_none());
    }
}
