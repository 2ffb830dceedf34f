//! Where a request goes, as the app named it: the authority it sent and the discovery name it
//! maps to.

use http::uri::Authority;

/// Where a request goes, as the app named it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The authority as sent (kept on the forwarded request).
    pub authority: Authority,
    /// The discovery name, `None` for names outside the mesh's forms.
    pub name: Option<String>,
}

impl Target {
    /// Parses an authority (default port 80) and derives its discovery name: `name`,
    /// `name.ns`, `name.ns.svc` and `name.ns.svc.cluster.local` are mesh forms (the first in
    /// the proxy's own namespace); IP addresses are looked up as-is (ClusterIPs).
    pub fn parse(authority: &str, namespace: &str) -> Option<Target> {
        let authority: Authority = authority.parse().ok()?;
        let port = authority.port_u16().unwrap_or(80);
        let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = if bare.parse::<std::net::IpAddr>().is_ok() {
            Some(if bare.contains(':') {
                format!("[{bare}]:{port}")
            } else {
                format!("{bare}:{port}")
            })
        } else {
            let labels: Vec<&str> = host.split('.').collect();
            match labels.as_slice() {
                [s] => Some(format!("{s}.{namespace}.svc.cluster.local:{port}")),
                [s, ns] | [s, ns, "svc"] | [s, ns, "svc", "cluster", "local"] => {
                    Some(format!("{s}.{ns}.svc.cluster.local:{port}"))
                }
                _ => None,
            }
        };
        Some(Target { authority, name })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_map_to_discovery_names() {
        let name = |a: &str| Target::parse(a, "shop").and_then(|t| t.name);
        assert_eq!(
            name("pricing").as_deref(),
            Some("pricing.shop.svc.cluster.local:80")
        );
        assert_eq!(
            name("pricing.shop:8080").as_deref(),
            Some("pricing.shop.svc.cluster.local:8080")
        );
        assert_eq!(
            name("Pricing.Shop.svc.").as_deref(),
            Some("pricing.shop.svc.cluster.local:80")
        );
        assert_eq!(
            name("pricing.shop.svc.cluster.local:80").as_deref(),
            Some("pricing.shop.svc.cluster.local:80")
        );
        assert_eq!(name("10.96.0.1:443").as_deref(), Some("10.96.0.1:443"));
        assert_eq!(name("[::1]:80").as_deref(), Some("[::1]:80"));
        assert_eq!(name("www.example.test"), None);
        assert!(Target::parse("bad host", "shop").is_none());
    }
}
