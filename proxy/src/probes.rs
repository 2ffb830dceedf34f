//! The app's probes, rewritten by the injector to `:4391/app-health/<container>/<kind>`: the
//! kubelet asks the proxy, and the proxy runs the original probe (from `FERRYMESH_APP_PROBES`)
//! against the app on loopback. Without this, an inbound redirect would let the proxy answer a
//! tcpSocket probe for a dead app, and a Strict mTLS port would refuse the kubelet.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;

use crate::client::{CallTimeouts, send};
use crate::http::{Body, boxed, empty};
use crate::pool::Pool;

pub use crate::config::probes::{Grpc, Header, HttpGet, PortOnly, Probe, Probes, parse};

fn answer(status: StatusCode, body: String) -> Response<Body> {
    let mut rsp = Response::new(boxed(Full::new(Bytes::from(body))));
    *rsp.status_mut() = status;
    rsp
}

/// Runs the probe behind `path` against the app at `app_ip` and answers as the kubelet
/// expects: 200 when it passes, 503 with the reason when it fails, 404 for an unknown path.
pub async fn run(probes: &Probes, path: &str, app_ip: IpAddr, pool: &Pool) -> Response<Body> {
    let Some(probe) = probes.get(path) else {
        return answer(StatusCode::NOT_FOUND, format!("no app probe at {path}\n"));
    };
    let ip = if app_ip.is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        app_ip
    };
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1));
    let check = async {
        if let Some(h) = &probe.http_get {
            let addr = SocketAddr::new(ip, h.port);
            let mut req = Request::get(h.path.as_deref().unwrap_or("/"));
            for header in &h.http_headers {
                req = req.header(header.name.as_str(), header.value.as_str());
            }
            let host = h.host.clone().unwrap_or_else(|| addr.to_string());
            let (Ok(req), Ok(authority)) = (
                req.header(http::header::HOST, host.as_str()).body(empty()),
                addr.to_string().parse::<http::uri::Authority>(),
            ) else {
                return Err("the probe is not a valid request".to_owned());
            };
            let timeouts = CallTimeouts {
                request: Some(timeout),
                connect: timeout,
                idle: crate::pool::DEFAULT_IDLE,
            };
            let rsp = send(pool, addr, &authority, req, timeouts, None).await;
            // The kubelet's rule: 200..=399 passes.
            let code = rsp.status().as_u16();
            if (200..400).contains(&code) && crate::http::ProxyError::of(&rsp).is_none() {
                Ok(format!("httpGet {addr}: {code}"))
            } else {
                Err(format!("httpGet {addr}: {code}"))
            }
        } else if let Some(t) = &probe.tcp_socket {
            let addr = SocketAddr::new(ip, t.port);
            tokio::net::TcpStream::connect(addr)
                .await
                .map(|_| format!("tcpSocket {addr}: connected"))
                .map_err(|e| format!("tcpSocket {addr}: {e}"))
        } else if let Some(g) = &probe.grpc {
            let addr = SocketAddr::new(ip, g.port);
            if crate::client::grpc_serving(addr, g.service.as_deref().unwrap_or("")).await {
                Ok(format!("grpc {addr}: SERVING"))
            } else {
                Err(format!("grpc {addr}: not serving"))
            }
        } else {
            Err("the probe has no action".to_owned())
        }
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok(msg)) => answer(StatusCode::OK, msg + "\n"),
        Ok(Err(msg)) => answer(StatusCode::SERVICE_UNAVAILABLE, msg + "\n"),
        Err(_) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("timed out after {}s\n", timeout.as_secs()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_injectors_json_and_refuses_bad_probes() {
        let p = parse(
            r#"{"/app-health/web/livez":{"httpGet":{"path":"/healthz","port":8080}},
                "/app-health/web/readyz":{"tcpSocket":{"port":8080},"timeoutSeconds":3}}"#,
        )
        .unwrap();
        assert_eq!(
            p["/app-health/web/livez"].http_get.as_ref().unwrap().port,
            8080
        );
        assert_eq!(p["/app-health/web/readyz"].timeout_seconds, Some(3));
        assert!(parse(r#"{"/x":{"tcpSocket":{"port":1}}}"#).is_err());
        assert!(parse(r#"{"/app-health/a/livez":{}}"#).is_err());
        assert!(
            parse(r#"{"/app-health/a/livez":{"httpGet":{"port":1,"scheme":"HTTPS"}}}"#).is_err()
        );
    }

    #[tokio::test]
    async fn a_tcp_probe_fails_when_the_app_is_gone_and_passes_when_it_listens() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let probes = parse(&format!(
            r#"{{"/app-health/web/livez":{{"tcpSocket":{{"port":{port}}}}}}}"#
        ))
        .unwrap();
        let pool = Pool::default();
        let ip = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let up = run(&probes, "/app-health/web/livez", ip, &pool).await;
        assert_eq!(up.status(), StatusCode::OK);
        drop(listener);
        let down = run(&probes, "/app-health/web/livez", ip, &pool).await;
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        let missing = run(&probes, "/app-health/web/startupz", ip, &pool).await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    }
}
