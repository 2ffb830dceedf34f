//! Transparent interception: the destination a connection had before iptables redirected it
//! to the proxy (SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST for IPv6).

use std::net::SocketAddr;

use nix::sys::socket::{SockaddrIn, SockaddrIn6, getsockopt, sockopt};
use tokio::net::TcpStream;

/// Where the peer meant to connect, when a redirect sent it here instead; `None` when the
/// connection was made to the proxy's own address (no redirect, or no conntrack entry).
pub fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let v4 = || {
        getsockopt(stream, sockopt::OriginalDst)
            .ok()
            .map(|a| SocketAddr::from(SockaddrIn::from(a)))
    };
    let v6 = || {
        getsockopt(stream, sockopt::Ip6tOriginalDst)
            .ok()
            .map(|a| SocketAddr::from(SockaddrIn6::from(a)))
    };
    // A dual-stack listener carries IPv4 connections as v4-mapped addresses.
    let ipv4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let original = if ipv4 {
        v4().or_else(v6)
    } else {
        v6().or_else(v4)
    }?;
    let same = original == local
        || match (original, local) {
            (SocketAddr::V4(o), SocketAddr::V6(l)) => {
                l.ip().to_ipv4_mapped() == Some(*o.ip()) && l.port() == o.port()
            }
            _ => false,
        };
    (!same).then_some(original)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.unwrap();
        assert_eq!(original_destination(&server), None);
    }
}
