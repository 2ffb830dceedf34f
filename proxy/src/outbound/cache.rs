//! The client-side response cache of one service (the policy's `cache` section), in front of
//! retries: a fresh stored response answers without an upstream call; a stale one with a
//! validator is revalidated (`If-None-Match` / `If-Modified-Since`, 304 refreshes it); within
//! `serveStaleOnError` a stale one answers an upstream 5xx. The rules are RFC 9111's
//! (`ferrymesh_resilience::cache`). Responses are stored only when their length is known and
//! within `maxBodyBytes`. Every answer for a cached method says `ferrymesh-cache: hit | miss |
//! stale | revalidated`.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use ferrymesh_resilience::cache::{Entry, Rules, Store, age, freshness_lifetime, storable};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body as _;
use http_body_util::{BodyExt as _, Full};
use tokio::time::Instant;

use crate::explain::Explain;
use crate::http::{Body, boxed};
use crate::metrics::Metrics;
use crate::policy::CachePolicy;

/// The cache of one service under one policy.
#[derive(Debug)]
pub struct ResponseCache {
    store: Mutex<Store>,
    rules: Rules,
    vary: Vec<String>,
    stale_grace: Duration,
}

impl ResponseCache {
    /// An empty cache for `policy`.
    pub fn new(policy: &CachePolicy) -> Self {
        Self {
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
    cache: &ResponseCache,
    authority: &str,
    mut req: Request<Body>,
    metrics: &Metrics,
    service: &str,
    call: F,
) -> Response<Body>
where
    F: FnOnce(Request<Body>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    let method = req.method().clone();
    if !cache.rules.methods.contains(&method) {
        return call(req).await;
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str)
        .to_owned();
    let explain = req.extensions().get::<Explain>().cloned();
    let outcome = |what: &'static str| {
        metrics.cache(service, what);
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
    if let Some(e) = &stored {
        if e.is_fresh() {
            outcome("hit");
            return answer(e, "hit");
        }
        // Stale: ask the upstream whether it changed.
        if let Some(etag) = e.headers.get(header::ETAG) {
            req.headers_mut()
                .insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(modified) = e.headers.get(header::LAST_MODIFIED) {
            req.headers_mut()
                .insert(header::IF_MODIFIED_SINCE, modified.clone());
        }
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
            return answer(&e, "revalidated");
        }
        if rsp.status().is_server_error() && e.is_usable_stale(cache.stale_grace) {
            outcome("stale");
            return answer(&e, "stale");
        }
    }
    outcome("miss");
    store_miss(cache, &method, authority, &path, &request_headers, rsp).await
}

/// Stores a miss when the rules allow it and its length is known, and answers it.
async fn store_miss(
    cache: &ResponseCache,
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
    let storable_now = known_len.is_some_and(|len| {
        storable(
            &cache.rules,
            method,
            request_headers,
            rsp.status(),
            rsp.headers(),
            len,
        )
        .is_ok()
    });
    let (parts, body) = rsp.into_parts();
    if !storable_now {
        let mut r = Response::from_parts(parts, body);
        r.headers_mut()
            .insert("ferrymesh-cache", HeaderValue::from_static("miss"));
        return r;
    }
    let Ok(collected) = body.collect().await else {
        return crate::http::proxy_response(
            StatusCode::BAD_GATEWAY,
            "upstream-reset",
            "the response body failed",
        );
    };
    let bytes: Bytes = collected.to_bytes();
    let entry = Entry {
        status: parts.status,
        initial_age: age(&parts.headers),
        lifetime: freshness_lifetime(&cache.rules, &parts.headers),
        headers: parts.headers.clone(),
        body: bytes.clone(),
        stored: Instant::now(),
        vary: std::collections::BTreeMap::new(),
    };
    cache.store.lock().expect("cache lock poisoned").put(
        method,
        authority,
        path,
        request_headers,
        &cache.vary,
        entry,
    );
    let mut r = Response::from_parts(parts, boxed(Full::new(bytes)));
    r.headers_mut()
        .insert("ferrymesh-cache", HeaderValue::from_static("miss"));
    r
}
