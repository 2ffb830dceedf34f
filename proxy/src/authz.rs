//! Authorization at the inbound side (Istio's order): any matching Deny rule refuses; if the
//! workload has Allow rules, only a request matching one passes; otherwise the default inbound
//! policy decides. Rules see the caller's SPIFFE id (from its mTLS certificate, never from a
//! header), its address, the method and the *normalised* path, which is also the path the app
//! receives, so the decision and the app can never disagree about what was asked.

use std::net::IpAddr;

use http::Method;

pub use crate::policy::authz::{AuthzRule, DefaultInbound};

/// Whether a rule matches a request: every set field must (list items are alternatives).
trait Matches {
    fn matches(&self, req: &Request<'_>) -> bool;
}

impl Matches for AuthzRule {
    fn matches(&self, req: &Request<'_>) -> bool {
        let id = req.peer.map(parse_id);
        let any = |list_empty: bool, hit: bool| list_empty || hit;
        any(
            self.identities.is_empty(),
            req.peer
                .is_some_and(|p| self.identities.iter().any(|i| identity_matches(i, p))),
        ) && any(
            self.namespaces.is_empty(),
            id.flatten()
                .is_some_and(|(ns, _)| self.namespaces.iter().any(|n| n == ns)),
        ) && any(
            self.service_accounts.is_empty(),
            id.flatten().is_some_and(|(ns, sa)| {
                self.service_accounts
                    .iter()
                    .any(|x| x.split_once('/') == Some((ns, sa)))
            }),
        ) && any(
            self.networks.is_empty(),
            req.addr.is_some_and(|a| {
                self.networks
                    .iter()
                    .any(|(net, len)| in_network(a, *net, *len))
            }),
        ) && any(self.methods.is_empty(), self.methods.contains(req.method))
            && any(
                self.paths.is_empty(),
                self.paths.iter().any(|p| p.matches(req.path)),
            )
    }
}

/// `spiffe://td/ns/<ns>/sa/<sa>` -> `(ns, sa)`.
fn parse_id(id: &str) -> Option<(&str, &str)> {
    let rest = id.strip_prefix("spiffe://")?;
    let mut parts = rest.split('/').skip(1);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa)) => Some((ns, sa)),
        _ => None,
    }
}

fn identity_matches(pattern: &str, id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix) && !id[prefix.len()..].contains('/'),
        None => pattern == id,
    }
}

fn in_network(addr: IpAddr, net: IpAddr, len: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// What a decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The caller's verified SPIFFE id.
    pub peer: Option<&'a str>,
    /// The caller's address.
    pub addr: Option<IpAddr>,
    /// Method.
    pub method: &'a Method,
    /// The normalised path.
    pub path: &'a str,
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allow(&'static str),
    /// 403.
    Deny(String),
}

/// Decides a request: deny rules, then allow rules, then the default.
pub fn decide(
    deny: &[AuthzRule],
    allow: &[AuthzRule],
    default: DefaultInbound,
    trust_domain: &str,
    req: &Request<'_>,
) -> Decision {
    if let Some(rule) = deny.iter().find(|r| r.matches(req)) {
        return Decision::Deny(format!("denied by {}", rule.source));
    }
    if !allow.is_empty() {
        return if allow.iter().any(|r| r.matches(req)) {
            Decision::Allow("allow-rule")
        } else {
            Decision::Deny("no allow rule matches".into())
        };
    }
    let in_domain = req.peer.is_some_and(|p| {
        p.strip_prefix("spiffe://")
            .and_then(|rest| rest.split('/').next())
            == Some(trust_domain)
    });
    match default {
        DefaultInbound::AllUnauthenticated => Decision::Allow("default"),
        DefaultInbound::AllAuthenticated if req.peer.is_some() => Decision::Allow("default"),
        DefaultInbound::ClusterAuthenticated if in_domain => Decision::Allow("default"),
        DefaultInbound::Deny => Decision::Deny("the default inbound policy is deny".into()),
        _ => Decision::Deny(format!(
            "the default inbound policy ({default:?}) needs an authenticated caller"
        )),
    }
}

/// Why a path is refused outright (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    /// `%2F` / `%5C`: an encoded separator would mean one path to the policy and another to
    /// the app.
    EncodedSeparator,
    /// `%00` or a malformed escape.
    BadEscape,
    /// A backslash.
    Backslash,
}

/// The path policies and the app both see: percent-decoding of unreserved characters, `//`
/// merged, `.` and `..` segments resolved (RFC 3986 5.2.4); encoded slashes and backslashes,
/// NUL and broken escapes refused.
///
/// # Errors
/// [`BadPath`] for what must get a 400.
pub fn normalize(path: &str) -> Result<String, BadPath> {
    if path.contains('\\') {
        return Err(BadPath::Backslash);
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = path.get(i + 1..i + 3).ok_or(BadPath::BadEscape)?;
            let v = u8::from_str_radix(hex, 16).map_err(|_| BadPath::BadEscape)?;
            match v {
                0 => return Err(BadPath::BadEscape),
                b'/' | b'\\' => return Err(BadPath::EncodedSeparator),
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    decoded.push(char::from(v));
                }
                _ => {
                    decoded.push('%');
                    decoded.push_str(&hex.to_ascii_uppercase());
                }
            }
            i += 3;
        } else {
            // NOTE: a whole character, not a byte: a UTF-8 path must reach the app unchanged.
            let c = path[i..]
                .chars()
                .next()
                .expect("i is at a character boundary");
            decoded.push(c);
            i += c.len_utf8();
        }
    }
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = format!("/{}", out.join("/"));
    if trailing && path.len() > 1 {
        path.push('/');
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::routes::PathMatch;

    #[test]
    fn a_utf8_path_is_kept_as_it_is_and_normalising_twice_changes_nothing() {
        // Found by the path_normalize fuzz target: bytes were taken for characters.
        assert_eq!(
            normalize("/caf\u{e9}/./men\u{fc}").as_deref(),
            Ok("/caf\u{e9}/men\u{fc}")
        );
        for p in ["/a/../\u{e9}", "/%41/b/", "/x/%2e%2e/y"] {
            let once = normalize(p).unwrap();
            assert_eq!(normalize(&once).unwrap(), once, "{p}");
        }
    }

    #[test]
    fn paths_are_normalised_or_refused() {
        for (raw, want) in [
            ("/admin", "/admin"),
            ("//admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/a/../admin", "/admin"),
            ("/./admin/./", "/admin/"),
            ("/../../admin", "/admin"),
            ("/a%20b", "/a%20b"),
            ("/", "/"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
        assert_eq!(normalize("/admin%2f"), Err(BadPath::EncodedSeparator));
        assert_eq!(normalize("/admin%5Cx"), Err(BadPath::EncodedSeparator));
        assert_eq!(normalize("/a%00"), Err(BadPath::BadEscape));
        assert_eq!(normalize("/a%zz"), Err(BadPath::BadEscape));
        assert_eq!(normalize("\\admin"), Err(BadPath::Backslash));
    }

    fn rule(f: impl FnOnce(&mut AuthzRule)) -> AuthzRule {
        let mut r = AuthzRule {
            identities: vec![],
            namespaces: vec![],
            service_accounts: vec![],
            networks: vec![],
            methods: vec![],
            paths: vec![],
            source: "AuthorizationPolicy shop/p@1".into(),
        };
        f(&mut r);
        r
    }

    #[test]
    fn deny_then_allow_then_default() {
        let checkout = "spiffe://cluster.local/ns/shop/sa/checkout";
        let ops = "spiffe://cluster.local/ns/ops/sa/oncall";
        let req =
            |peer: Option<&'static str>, method: &'static Method, path: &'static str| Request {
                peer,
                addr: Some([10, 1, 2, 3].into()),
                method,
                path,
            };
        let allow = vec![rule(|r| {
            r.identities = vec![checkout.into(), "spiffe://cluster.local/ns/ops/sa/*".into()];
            r.methods = vec![Method::POST];
            r.paths = vec![PathMatch::Prefix("/orders".into())];
        })];
        let deny = vec![rule(|r| r.paths = vec![PathMatch::Prefix("/admin".into())])];
        let d = |r: &Request<'_>| {
            decide(
                &deny,
                &allow,
                DefaultInbound::AllUnauthenticated,
                "cluster.local",
                r,
            )
        };
        assert_eq!(
            d(&req(Some(checkout), &Method::POST, "/orders/1")),
            Decision::Allow("allow-rule")
        );
        assert_eq!(
            d(&req(Some(ops), &Method::POST, "/orders")),
            Decision::Allow("allow-rule"),
            "the wildcard"
        );
        assert!(
            matches!(
                d(&req(Some(checkout), &Method::GET, "/orders")),
                Decision::Deny(_)
            ),
            "method"
        );
        assert!(
            matches!(d(&req(None, &Method::POST, "/orders")), Decision::Deny(_)),
            "no identity"
        );
        assert!(
            matches!(d(&req(Some(checkout), &Method::POST, "/admin")), Decision::Deny(m) if m.contains("shop/p@1"))
        );
        // Namespaces, service accounts and networks.
        let r = rule(|r| {
            r.namespaces = vec!["ops".into()];
            r.networks = vec![([10, 0, 0, 0].into(), 8)];
        });
        assert!(r.matches(&req(Some(ops), &Method::GET, "/")));
        assert!(!r.matches(&req(Some(checkout), &Method::GET, "/")));
        let r = rule(|r| r.service_accounts = vec!["shop/checkout".into()]);
        assert!(r.matches(&req(Some(checkout), &Method::GET, "/")));
        assert!(!r.matches(&req(Some(ops), &Method::GET, "/")));
        let r = rule(|r| r.networks = vec![([192, 168, 0, 0].into(), 16)]);
        assert!(!r.matches(&req(Some(ops), &Method::GET, "/")));
        // Defaults, when no allow rule exists.
        let none: &[AuthzRule] = &[];
        let dd = |default, peer| {
            decide(
                none,
                none,
                default,
                "cluster.local",
                &req(peer, &Method::GET, "/"),
            )
        };
        assert_eq!(
            dd(DefaultInbound::AllUnauthenticated, None),
            Decision::Allow("default")
        );
        assert!(matches!(
            dd(DefaultInbound::AllAuthenticated, None),
            Decision::Deny(_)
        ));
        assert_eq!(
            dd(DefaultInbound::AllAuthenticated, Some(ops)),
            Decision::Allow("default")
        );
        assert!(matches!(
            dd(
                DefaultInbound::ClusterAuthenticated,
                Some("spiffe://other.org/ns/a/sa/b")
            ),
            Decision::Deny(_)
        ));
        assert_eq!(
            dd(DefaultInbound::ClusterAuthenticated, Some(ops)),
            Decision::Allow("default")
        );
        assert!(matches!(
            dd(DefaultInbound::Deny, Some(ops)),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn identity_wildcards_cover_one_last_segment() {
        let p = "spiffe://cluster.local/ns/ops/sa/*";
        assert!(identity_matches(p, "spiffe://cluster.local/ns/ops/sa/x"));
        assert!(!identity_matches(p, "spiffe://cluster.local/ns/ops/sa/x/y"));
        assert!(!identity_matches(p, "spiffe://cluster.local/ns/opsx/sa/x"));
    }
}
