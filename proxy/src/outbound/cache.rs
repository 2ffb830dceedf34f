//! The client-side response cache of one service (the policy's `cache` section), in front of
//! retries: a fresh stored response answers without an upstream call; a stale one with a
//! validator is revalidated (`If-None-Match` / `If-Modified-Since`, 304 refreshes it); within
//! `serveStaleOnError` a stale one answers an upstream 5xx. The rules are RFC 9111's
//! (`ferrymesh_resilience::cache`). A miss streams to the caller and is stored once its body has
//! ended within `maxBodyBytes` (known length or chunked). Every answer for a cached method says `ferrymesh-cache: hit | miss |
//! stale | revalidated`.
//!
//! What a shared cache must also get right (RFC 9111), and this one does: a request with
//! `Range` passes by the cache both ways (ranges are not served, and a 206 is never stored, so
//! one caller's range cannot poison everyone's full answer, 3.4); a successful POST, PUT, PATCH
//! or DELETE drops what is stored for its URI (4.4); the request's own `Cache-Control` counts
//! (`no-cache` and `max-age` revalidate, `no-store` stores nothing, `only-if-cached` gets 504
//! when nothing usable is stored, 5.2.1); a conditional request a stored response satisfies is
//! answered 304 (4.3.2); an `Age` that is not a number is not stored (5.1).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrymesh_resilience::cache::{
    Entry, RequestAllows, Rules, Store, age, directives, freshness_lifetime, not_modified,
    request_allows, storable,
};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body as _, Frame};
use http_body_util::Full;
use tokio::time::Instant;

use crate::explain::Explain;
use crate::http::{Body, BodyError, boxed};
use crate::metrics::CacheOutcomes;
use crate::policy::CachePolicy;

/// The cache of one service under one policy.
#[derive(Debug)]
pub struct ResponseCache {
    store: Mutex<Store>,
    /// The outcome counters of this cache's service.
    outcomes: CacheOutcomes,
    rules: Rules,
    vary: Vec<String>,
    stale_grace: Duration,
}

impl ResponseCache {
    /// An empty cache for `policy`.
    pub fn new(policy: &CachePolicy, outcomes: CacheOutcomes) -> Self {
        Self {
            outcomes,
            store: Mutex::new(Store::new(
                policy.max_entries as usize,
                (policy.max_entries as usize)
                    .saturating_mul(policy.max_body_bytes as usize)
                    .max(1),
            )),
            rules: Rules {
                methods: policy.methods.clone(),
                default_ttl: policy.default_ttl,
                max_ttl: policy.max_ttl,
                max_body_bytes: policy.max_body_bytes as usize,
            },
            vary: policy.vary_headers.clone(),
            stale_grace: policy.serve_stale_on_error,
        }
    }
}

/// A stored response answering a conditional request the caller's validators match: 304 with
/// the stored headers and no body.
fn answer_not_modified(e: &Entry, outcome: &'static str) -> Response<Body> {
    let mut r = answer(e, outcome);
    *r.status_mut() = StatusCode::NOT_MODIFIED;
    *r.body_mut() = boxed(Full::new(Bytes::new()));
    r.headers_mut().remove(header::CONTENT_LENGTH);
    r
}

fn answer(e: &Entry, outcome: &'static str) -> Response<Body> {
    let mut r = Response::new(boxed(Full::new(e.body.clone())));
    *r.status_mut() = e.status;
    *r.headers_mut() = e.headers.clone();
    r.headers_mut()
        .insert(header::AGE, HeaderValue::from(e.current_age().as_secs()));
    r.headers_mut()
        .insert("ferrymesh-cache", HeaderValue::from_static(outcome));
    r
}

/// Calls `call` through the cache.
pub async fn through<F, Fut>(
    cache: &Arc<ResponseCache>,
    authority: &str,
    mut req: Request<Body>,
    call: F,
) -> Response<Body>
where
    F: FnOnce(Request<Body>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str)
        .to_owned();
    if !cache.rules.methods.contains(&method) {
        if method.is_safe() {
            return call(req).await;
        }
        // 4.4: a successful unsafe request invalidates what is stored for its URI.
        let rsp = call(req).await;
        if rsp.status().is_success() || rsp.status().is_redirection() {
            cache
                .store
                .lock()
                .expect("cache lock poisoned")
                .invalidate(authority, &path);
        }
        return rsp;
    }
    // 3.4: ranges are not served from, nor stored into, this cache.
    if req.headers().contains_key(header::RANGE) {
        return call(req).await;
    }
    let explain = req.extensions().get::<Explain>().cloned();
    let outcome = |what: &'static str| {
        cache.outcomes.of(what).inc();
        if let Some(e) = &explain {
            e.note(format!("cache {what}"));
        }
    };
    let request_headers = req.headers().clone();
    let stored = cache.store.lock().expect("cache lock poisoned").get(
        &method,
        authority,
        &path,
        &request_headers,
    );
    let conditional = request_headers.contains_key(header::IF_NONE_MATCH)
        || request_headers.contains_key(header::IF_MODIFIED_SINCE);
    if let Some(e) = &stored {
        if e.is_fresh() && request_allows(&request_headers, e) == RequestAllows::Fresh {
            outcome("hit");
            if conditional && not_modified(&request_headers, e) {
                return answer_not_modified(e, "hit");
            }
            return answer(e, "hit");
        }
        // Stale: ask the upstream whether it changed, with the stored response's validators
        // (so a 304 speaks of it); the caller's are answered from the result.
        req.headers_mut().remove(header::IF_NONE_MATCH);
        req.headers_mut().remove(header::IF_MODIFIED_SINCE);
        if let Some(etag) = e.headers.get(header::ETAG) {
            req.headers_mut()
                .insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(modified) = e.headers.get(header::LAST_MODIFIED) {
            req.headers_mut()
                .insert(header::IF_MODIFIED_SINCE, modified.clone());
        }
    }
    // 5.2.1.7: only-if-cached and nothing usable stored.
    if directives(&request_headers).only_if_cached {
        outcome("miss");
        return crate::http::proxy_response(
            StatusCode::GATEWAY_TIMEOUT,
            crate::http::ProxyError::CacheMiss,
            "only-if-cached and no fresh stored response",
        );
    }
    let rsp = call(req).await;
    if let Some(mut e) = stored {
        if rsp.status() == StatusCode::NOT_MODIFIED {
            // 304: the stored response is current again, with the new response's freshness.
            for (k, v) in rsp.headers() {
                if k != header::CONTENT_LENGTH {
                    e.headers.insert(k.clone(), v.clone());
                }
            }
            e.stored = Instant::now();
            e.initial_age = age(rsp.headers());
            e.lifetime = freshness_lifetime(&cache.rules, &e.headers);
            cache.store.lock().expect("cache lock poisoned").put(
                &method,
                authority,
                &path,
                &request_headers,
                &cache.vary,
                e.clone(),
            );
            outcome("revalidated");
            if conditional && not_modified(&request_headers, &e) {
                return answer_not_modified(&e, "revalidated");
            }
            return answer(&e, "revalidated");
        }
        if rsp.status().is_server_error() && e.is_usable_stale(cache.stale_grace) {
            outcome("stale");
            return answer(&e, "stale");
        }
    }
    outcome("miss");
    store_miss(cache, &method, authority, &path, &request_headers, rsp)
}

/// Answers a miss, storing it when the rules allow: the body streams to the caller as it
/// arrives and is kept aside up to `maxBodyBytes`; the entry is stored once the body has ended
/// whole (no error, no trailers, within the cap), whatever its framing (length or chunked).
fn store_miss(
    cache: &Arc<ResponseCache>,
    method: &http::Method,
    authority: &str,
    path: &str,
    request_headers: &http::HeaderMap,
    rsp: Response<Body>,
) -> Response<Body> {
    let known_len = rsp
        .body()
        .size_hint()
        .exact()
        .and_then(|n| usize::try_from(n).ok());
    let storable_now = storable(
        &cache.rules,
        method,
        request_headers,
        rsp.status(),
        rsp.headers(),
        known_len.unwrap_or(0),
    )
    .is_ok();
    let (parts, body) = rsp.into_parts();
    let pending = storable_now.then(|| Pending {
        cache: cache.clone(),
        method: method.clone(),
        authority: authority.to_owned(),
        path: path.to_owned(),
        request_headers: request_headers.clone(),
        entry: Entry {
            status: parts.status,
            initial_age: age(&parts.headers),
            lifetime: freshness_lifetime(&cache.rules, &parts.headers),
            headers: parts.headers.clone(),
            body: Bytes::new(),
            stored: Instant::now(),
            vary: std::collections::BTreeMap::new(),
        },
        kept: BytesMut::new(),
    });
    let mut r = Response::from_parts(
        parts,
        match pending {
            Some(pending) => boxed(Tee {
                inner: body,
                pending: Some(pending),
            }),
            None => body,
        },
    );
    r.headers_mut()
        .insert("ferrymesh-cache", HeaderValue::from_static("miss"));
    r
}

/// A response on its way into the cache.
struct Pending {
    cache: Arc<ResponseCache>,
    method: http::Method,
    authority: String,
    path: String,
    request_headers: http::HeaderMap,
    entry: Entry,
    kept: BytesMut,
}

impl Pending {
    fn store(self) {
        let Pending {
            cache,
            method,
            authority,
            path,
            request_headers,
            mut entry,
            kept,
        } = self;
        entry.body = kept.freeze();
        cache.store.lock().expect("cache lock poisoned").put(
            &method,
            &authority,
            &path,
            &request_headers,
            &cache.vary,
            entry,
        );
    }
}

/// Passes a body through, keeping a copy for the cache.
struct Tee {
    inner: Body,
    pending: Option<Pending>,
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(p) = &mut this.pending {
                    match f.data_ref() {
                        Some(data) if p.kept.len() + data.len() <= p.cache.rules.max_body_bytes => {
                            p.kept.extend_from_slice(data);
                        }
                        // Too large, or trailers: not stored.
                        _ => this.pending = None,
                    }
                }
            }
            Some(Err(_)) => this.pending = None,
            None => {}
        }
        // NOTE: hyper stops polling once `is_end_stream` says so, so the end may never be seen
        // as `None`.
        if (frame.is_none() || this.inner.is_end_stream())
            && let Some(p) = this.pending.take()
        {
            p.store();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn cache(max_body_bytes: u32) -> Arc<ResponseCache> {
        Arc::new(ResponseCache::new(
            &CachePolicy {
                methods: vec![http::Method::GET],
                default_ttl: Duration::ZERO,
                max_ttl: Duration::from_mins(5),
                max_entries: 10,
                max_body_bytes,
                vary_headers: vec![],
                serve_stale_on_error: Duration::ZERO,
            },
            CacheOutcomes::default(),
        ))
    }

    /// A chunked answer (two frames, no length) through `store_miss`, read to the end.
    async fn chunked_miss(cache: &Arc<ResponseCache>) -> Bytes {
        let frames =
            ["abc", "def"].map(|s| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(s))));
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let rsp = Response::builder()
            .header(header::CACHE_CONTROL, "max-age=60")
            .body(boxed(body))
            .unwrap();
        let rsp = store_miss(
            cache,
            &http::Method::GET,
            "a.shop",
            "/x",
            &http::HeaderMap::new(),
            rsp,
        );
        rsp.into_body().collect().await.unwrap().to_bytes()
    }

    fn stored(cache: &ResponseCache) -> Option<Entry> {
        cache
            .store
            .lock()
            .unwrap()
            .get(&http::Method::GET, "a.shop", "/x", &http::HeaderMap::new())
    }

    #[tokio::test]
    async fn a_chunked_answer_is_stored_once_it_ends_within_the_cap() {
        let roomy = cache(6);
        assert_eq!(chunked_miss(&roomy).await, "abcdef");
        assert_eq!(stored(&roomy).unwrap().body, "abcdef");
        let tight = cache(5);
        assert_eq!(
            chunked_miss(&tight).await,
            "abcdef",
            "the caller gets it all"
        );
        assert!(stored(&tight).is_none(), "over the cap: not stored");
    }
}
