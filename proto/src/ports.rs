//! Port lists and CIDRs as the injection annotations and `init-iptables` take them
//! (`25,587,8000-8100`, `10.0.0.0/8,fd00::/8`): the injector validates with the same code the
//! init container applies.

use std::net::IpAddr;

/// A port or an inclusive range, as in `--skip-inbound-ports=25,8000-8100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports(pub u16, pub u16);

impl Ports {
    /// As iptables writes it: `80` or `8000:8100`.
    pub fn render(self) -> String {
        if self.0 == self.1 {
            self.0.to_string()
        } else {
            format!("{}:{}", self.0, self.1)
        }
    }

    /// What it counts for in a multiport list (a range is two).
    pub fn weight(self) -> usize {
        if self.0 == self.1 { 1 } else { 2 }
    }
}

/// Parses `25,587,8000-8100` (empty: none).
///
/// # Errors
/// A part is not a port or a range `low-high` with `low <= high`.
pub fn parse_ports(text: &str) -> Result<Vec<Ports>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (low, high) = p.split_once('-').unwrap_or((p, p));
            let port = |t: &str| {
                t.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("{p:?}: not a port"))
            };
            let (low, high) = (port(low)?, port(high)?);
            if low == 0 || low > high {
                return Err(format!("{p:?}: a port is 1..65535 and a range is low-high"));
            }
            Ok(Ports(low, high))
        })
        .collect()
}

/// A CIDR, `10.0.0.0/8` or `fd00::/8` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet(pub IpAddr, pub u8);

/// Parses a comma-separated CIDR list.
///
/// # Errors
/// A part is not an address with an optional prefix length that fits its family.
pub fn parse_subnets(text: &str) -> Result<Vec<Subnet>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (addr, len) = p.split_once('/').map_or((p, None), |(a, l)| (a, Some(l)));
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| format!("{p:?}: not an IP address"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let len = match len {
                None => max,
                Some(l) => l
                    .parse::<u8>()
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| format!("{p:?}: the prefix length is 0..={max}"))?,
            };
            Ok(Subnet(addr, len))
        })
        .collect()
}
