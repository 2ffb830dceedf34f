//! HTTP plumbing shared by the inbound and outbound sides: the body type, hop-by-hop header
//! removal (RFC 9110 7.6.1) and responses the proxy makes itself.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

pub use crate::error::{FERRYMESH_ERROR, ProxyError};

/// Any error, as tower services return them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error of a forwarded body.
// NOTE: a named type, not `BoxError` itself: with a `dyn Error` trait object in the body type,
// rustc fails to prove the tower futures `Send` ("not general enough" over the object's lifetime).
#[derive(Debug)]
pub struct BodyError(pub BoxError);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The body every proxy service speaks.
pub type Body = UnsyncBoxBody<Bytes, BodyError>;

/// Boxes any body into [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(|e| BodyError(e.into())).boxed_unsync()
}

/// Set once the downstream caller's request body failed (an aborted upload, malformed chunked
/// framing): what then fails upstream is the caller's fault, never the upstream's. Carried in the
/// request's extensions, so every attempt of a call shares it.
#[derive(Debug, Clone, Default)]
pub struct ClientFault(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl ClientFault {
    /// The caller's body failed.
    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The caller's body, noting its failure in a [`ClientFault`].
struct Downstream<B> {
    inner: B,
    fault: ClientFault,
}

impl<B> http_body::Body for Downstream<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(_))) = &polled {
            self.fault
                .0
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request as it arrives from the downstream caller: boxed, with a [`ClientFault`] that
/// records whether its body failed.
pub fn from_downstream(req: http::Request<hyper::body::Incoming>) -> http::Request<Body> {
    let fault = ClientFault::default();
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(fault.clone());
    http::Request::from_parts(parts, boxed(Downstream { inner: body, fault }))
}

/// An empty body.
pub fn empty() -> Body {
    boxed(http_body_util::Empty::new())
}

/// A response made by the proxy (not the app): the typed [`ProxyError`] in its extensions (the
/// edge writes it as `ferrymesh-error`) and `<label>: <detail>` as a plain-text body.
pub fn proxy_response(status: StatusCode, error: ProxyError, detail: &str) -> Response<Body> {
    let mut rsp = Response::new(boxed(Full::new(Bytes::from(format!(
        "{error}: {detail}\n"
    )))));
    *rsp.status_mut() = status;
    rsp.extensions_mut().insert(error);
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

/// Removes hop-by-hop headers: the fixed list plus any named in `Connection`. `TE: trailers` is
/// kept, since gRPC needs it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if name != header::TE {
            headers.remove(&name);
        }
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The status class label of a status: `2xx` .. `5xx`.
pub fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_but_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-kept"], "1");
    }

    #[test]
    fn proxy_responses_name_their_cause() {
        let rsp = proxy_response(
            StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::NoEndpoints,
            "pricing.shop:80",
        );
        assert_eq!(rsp.status(), 503);
        assert_eq!(ProxyError::of(&rsp), Some(ProxyError::NoEndpoints));
    }
}
