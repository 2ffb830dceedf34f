//! HTTPRoute / GRPCRoute rules as a client proxy applies them: the first rule with a match the
//! request meets, in Gateway API precedence (an Exact path, then the longest prefix, then a
//! method, then the most header matches, then the most query matches; ties keep the
//! controller's order), picks weighted backends and may replace the backend's timeouts, retry,
//! cache and fallback for its requests.

use std::collections::BTreeMap;
use std::time::Duration;

use ferrymesh_proto::config::v1 as cfg;
use http::{HeaderMap, HeaderName, Method, Uri};
use serde::Serialize;

use super::resilience::{self, duration};
use super::{CachePolicy, ClientPolicy, FallbackPolicy, InvalidPolicy, RetryPolicy};

/// One rule of a route.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoutePolicy {
    /// `<route>/<rule>`.
    pub name: String,
    /// Any one of them.
    pub matches: Vec<RouteMatch>,
    /// Backends (discovery names) and weights; empty: the parent service.
    pub backends: Vec<(String, u32)>,
    /// Route-level sections, each replacing the backend's own.
    pub overrides: RouteOverrides,
    /// The route object, `Kind namespace/name@generation`.
    pub source: String,
}

/// Sections a route sets for its requests.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct RouteOverrides {
    /// `timeouts` (request, per try, deadline propagation), when set.
    pub timeouts: Option<(Option<Duration>, Option<Duration>, bool)>,
    /// `retry` with its budget.
    pub retry: Option<RetryPolicy>,
    /// `cache`.
    pub cache: Option<CachePolicy>,
    /// `fallback`.
    pub fallback: Option<FallbackPolicy>,
    /// A client-side fault on the route (replaces the service's).
    pub fault: Option<super::FaultPolicy>,
    /// Section -> source object.
    pub sections: BTreeMap<String, String>,
}

/// All of it must hold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteMatch {
    /// Path condition.
    pub path: PathMatch,
    /// Method, when set.
    #[serde(serialize_with = "method")]
    pub method: Option<Method>,
    /// Exact header values.
    #[serde(serialize_with = "headers")]
    pub headers: Vec<(HeaderName, String)>,
    /// Exact query parameter values.
    pub query: Vec<(String, String)>,
}

#[allow(clippy::ref_option)] // serde's serialize_with passes `&Option<T>`
fn method<S: serde::Serializer>(m: &Option<Method>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_ref().map_or("", Method::as_str))
}

fn headers<S: serde::Serializer>(h: &[(HeaderName, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(h.iter().map(|(k, v)| (k.as_str(), v)))
}

/// A path condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Whole leading segments (`/a` matches `/a` and `/a/b`, not `/ab`).
    Prefix(String),
}

impl PathMatch {
    /// True when `path` meets it.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                let p = p.trim_end_matches('/');
                p.is_empty()
                    || path == p
                    || path
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }
}

impl RouteMatch {
    /// True when the request meets every condition.
    pub fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        if !self.path.matches(uri.path()) {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        if !self.headers.iter().all(|(k, v)| {
            headers
                .get_all(k)
                .iter()
                .any(|h| h.as_bytes() == v.as_bytes())
        }) {
            return false;
        }
        let query = uri.query().unwrap_or("");
        self.query.iter().all(|(k, v)| {
            query.split('&').any(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                name == k && value == v
            })
        })
    }

    /// Gateway API precedence: larger first.
    fn precedence(&self) -> (bool, usize, bool, usize, usize) {
        let (exact, len) = match &self.path {
            PathMatch::Exact(p) => (true, p.len()),
            PathMatch::Prefix(p) => (false, p.trim_end_matches('/').len()),
        };
        (
            exact,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }
}

/// The routes of a client policy and the order their matches are tried in.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Routes {
    /// Rules, as the controller sent them.
    pub rules: Vec<RoutePolicy>,
    /// (rule, match) pairs, most specific first.
    #[serde(skip)]
    order: Vec<(usize, usize)>,
}

impl Routes {
    /// True when no route is attached (every request goes to the service itself).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule a request takes; `None` when routes exist and none matches (404).
    pub fn select(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<usize> {
        self.order
            .iter()
            .find(|(r, m)| self.rules[*r].matches[*m].matches(method, uri, headers))
            .map(|(r, _)| *r)
    }

    /// Builds them from the controller's routes; the implicit "default" route is no route.
    ///
    /// # Errors
    /// A match or section that does not convert.
    pub fn from_pb(routes: Vec<cfg::Route>) -> Result<Routes, InvalidPolicy> {
        let rules: Vec<RoutePolicy> = routes
            .into_iter()
            .filter(|r| !(r.matches.is_empty() && r.backends.is_empty() && r.source.is_none()))
            .map(rule)
            .collect::<Result<_, _>>()?;
        let mut order: Vec<(usize, usize)> = rules
            .iter()
            .enumerate()
            .flat_map(|(r, rule)| (0..rule.matches.len()).map(move |m| (r, m)))
            .collect();
        // A stable sort: ties keep the controller's order.
        order.sort_by(|a, b| {
            let p = |(r, m): &(usize, usize)| rules[*r].matches[*m].precedence();
            p(b).cmp(&p(a))
        });
        Ok(Routes { rules, order })
    }
}

fn rule(r: cfg::Route) -> Result<RoutePolicy, InvalidPolicy> {
    let matches = r
        .matches
        .into_iter()
        .map(|m| {
            let path = m.path.unwrap_or_default();
            let path = match cfg::path_match::Kind::try_from(path.kind) {
                Ok(cfg::path_match::Kind::Exact) => PathMatch::Exact(path.value),
                Ok(cfg::path_match::Kind::Prefix | cfg::path_match::Kind::Unspecified) => {
                    PathMatch::Prefix(if path.value.is_empty() {
                        "/".into()
                    } else {
                        path.value
                    })
                }
                Err(_) => return Err(InvalidPolicy::Enum("route.path.kind", path.kind)),
            };
            let method = (!m.method.is_empty())
                .then(|| Method::from_bytes(m.method.as_bytes()))
                .transpose()
                .map_err(|_| InvalidPolicy::Range("route.method", m.method.clone()))?;
            let headers = m
                .headers
                .into_iter()
                .map(|h| {
                    HeaderName::from_bytes(h.name.as_bytes())
                        .map(|n| (n, h.value))
                        .map_err(|_| InvalidPolicy::Range("route.headers", h.name))
                })
                .collect::<Result<_, _>>()?;
            Ok(RouteMatch {
                path,
                method,
                headers,
                query: m
                    .query_params
                    .into_iter()
                    .map(|q| (q.name, q.value))
                    .collect(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let backends = r
        .backends
        .into_iter()
        .map(|b| {
            let s = b
                .service
                .ok_or(InvalidPolicy::Missing("route.backends.service"))?;
            Ok((
                format!("{}.{}.svc.cluster.local:{}", s.name, s.namespace, b.port),
                b.weight,
            ))
        })
        .collect::<Result<Vec<_>, InvalidPolicy>>()?;
    let timeouts = r
        .timeouts
        .map(|t| {
            Ok::<_, InvalidPolicy>((
                duration(t.request, "route.timeouts.request")?,
                duration(t.per_try, "route.timeouts.perTry")?,
                t.deadline_propagation,
            ))
        })
        .transpose()?;
    let sections = r
        .section_sources
        .into_iter()
        .map(|(section, s)| {
            (
                section,
                format!("{} {}/{}@{}", s.kind, s.namespace, s.name, s.generation),
            )
        })
        .collect();
    Ok(RoutePolicy {
        name: r.name,
        matches,
        backends,
        overrides: RouteOverrides {
            timeouts,
            retry: r
                .retry
                .map(|x| resilience::retry(x, r.budget))
                .transpose()?,
            cache: r.cache.map(resilience::cache).transpose()?,
            fallback: r.fallback.map(resilience::fallback).transpose()?,
            fault: r.fault.map(resilience::fault).transpose()?,
            sections,
        },
        source: r
            .source
            .map(|s| format!("{} {}/{}@{}", s.kind, s.namespace, s.name, s.generation))
            .unwrap_or_default(),
    })
}

impl ClientPolicy {
    /// True when a client-side fault is in it (the service's or a route's).
    pub fn has_faults(&self) -> bool {
        self.fault.is_some()
            || self
                .routes
                .rules
                .iter()
                .any(|r| r.overrides.fault.is_some())
    }

    /// The same policy without its client-side faults (their TTL lapsed).
    #[must_use]
    pub fn without_faults(&self) -> ClientPolicy {
        let mut p = self.clone();
        p.fault = None;
        for r in &mut p.routes.rules {
            r.overrides.fault = None;
        }
        p
    }

    /// No section at all, for a service the controller sent no policy for.
    pub fn empty(service: &str) -> ClientPolicy {
        let (namespace, name) = service.split_once('/').unwrap_or(("", service));
        ClientPolicy::try_from(cfg::ClientPolicy {
            service: Some(cfg::ServiceRef {
                name: name.to_owned(),
                namespace: namespace.to_owned(),
            }),
            ..Default::default()
        })
        .expect("a policy without sections is valid")
    }

    /// A backend's policy with a route's sections in place of its own.
    pub fn with_route(base: &std::sync::Arc<ClientPolicy>, route: &RoutePolicy) -> ClientPolicy {
        let mut p = ClientPolicy::clone(base);
        p.base = Some(base.clone());
        p.route = Some(route.name.clone());
        let o = &route.overrides;
        if let Some((request, per_try, propagate)) = o.timeouts {
            p.request_timeout = request;
            p.per_try_timeout = per_try;
            p.deadline_propagation = propagate;
        }
        if o.retry.is_some() {
            p.retry.clone_from(&o.retry);
        }
        if o.cache.is_some() {
            p.cache.clone_from(&o.cache);
        }
        if o.fallback.is_some() {
            p.fallback.clone_from(&o.fallback);
        }
        if o.fault.is_some() {
            p.fault.clone_from(&o.fault);
        }
        for (section, source) in &o.sections {
            p.sections.insert(section.clone(), source.clone());
        }
        // The backend's own routes do not apply again.
        p.routes = Routes::default();
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(path: PathMatch) -> RouteMatch {
        RouteMatch {
            path,
            method: None,
            headers: vec![],
            query: vec![],
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let p = PathMatch::Prefix("/api/".into());
        for (path, want) in [
            ("/api", true),
            ("/api/x", true),
            ("/apix", false),
            ("/", false),
        ] {
            assert_eq!(p.matches(path), want, "{path}");
        }
        assert!(PathMatch::Prefix("/".into()).matches("/anything"));
        assert!(!PathMatch::Exact("/a".into()).matches("/a/"));
    }

    #[test]
    fn the_most_specific_match_wins_whatever_the_order() {
        let rule = |name: &str, matches: Vec<RouteMatch>| RoutePolicy {
            name: name.into(),
            matches,
            backends: vec![],
            overrides: RouteOverrides::default(),
            source: String::new(),
        };
        let mut with_header = m(PathMatch::Prefix("/api".into()));
        with_header.headers = vec![(HeaderName::from_static("x-canary"), "1".into())];
        let mut with_method = m(PathMatch::Prefix("/api".into()));
        with_method.method = Some(Method::POST);
        let mut with_query = m(PathMatch::Prefix("/api".into()));
        with_query.query = vec![("v".into(), "2".into())];
        let rules = vec![
            rule("all", vec![m(PathMatch::Prefix("/".into()))]),
            rule("api", vec![m(PathMatch::Prefix("/api".into()))]),
            rule("query", vec![with_query]),
            rule("canary", vec![with_header]),
            rule("post", vec![with_method]),
            rule("exact", vec![m(PathMatch::Exact("/api/x".into()))]),
        ];
        let mut routes = Routes {
            rules,
            order: vec![],
        };
        routes.order = (0..routes.rules.len()).map(|r| (r, 0)).collect();
        routes.order.sort_by(|a, b| {
            let p = |(r, m): &(usize, usize)| routes.rules[*r].matches[*m].precedence();
            p(b).cmp(&p(a))
        });
        let pick = |method: Method, uri: &str, header: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = header {
                h.insert("x-canary", v.parse().unwrap());
            }
            let i = routes.select(&method, &uri.parse().unwrap(), &h).unwrap();
            routes.rules[i].name.clone()
        };
        assert_eq!(pick(Method::GET, "/api/x", Some("1")), "exact");
        assert_eq!(
            pick(Method::POST, "/api/y", Some("1")),
            "post",
            "a method beats headers"
        );
        assert_eq!(pick(Method::GET, "/api/y", Some("1")), "canary");
        assert_eq!(pick(Method::GET, "/api/y?v=2", None), "query");
        assert_eq!(pick(Method::GET, "/api/y", Some("0")), "api");
        assert_eq!(pick(Method::GET, "/other", None), "all");
    }
}
