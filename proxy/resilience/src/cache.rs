//! The response cache's rules (RFC 9111), as pure functions and a bounded store, so the proxy's
//! cache layer only moves bodies around:
//!
//! - [`storable`]: may this response to this request be stored by a shared cache (method,
//!   status, `no-store`, `private`, the Authorization rule of 3.5, `Vary: *`, size)?
//! - [`freshness_lifetime`]: `s-maxage`, else `max-age`, else `Expires - Date`, else the
//!   policy's default TTL; capped by the policy's max TTL.
//! - [`age`]: the response's current age (`Age` header + time in the cache).
//! - [`Store`]: entries keyed by method, authority, path and the request headers the response
//!   varies on; bounded by entries and bytes, least recently used first out.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, StatusCode, header};
use tokio::time::Instant;

/// Statuses cacheable by default (RFC 9110 15.1; Envoy's list), less 206: this cache does not
/// serve ranges, so a partial response is never stored (RFC 9111 3.4), nor answered from a full
/// entry.
const CACHEABLE: [u16; 12] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 451, 501];

/// The `Cache-Control` directives that matter here.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // one per directive of RFC 9111 5.2
pub struct Directives {
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache`: store, but revalidate before every use.
    pub no_cache: bool,
    /// `private`: not for a shared cache.
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `max-age`.
    pub max_age: Option<u64>,
    /// `s-maxage`.
    pub s_maxage: Option<u64>,
    /// `only-if-cached` (a request directive).
    pub only_if_cached: bool,
}

/// Parses every `Cache-Control` header.
pub fn directives(headers: &HeaderMap) -> Directives {
    let mut d = Directives::default();
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for part in text.split(',') {
            let (name, arg) = part
                .trim()
                .split_once('=')
                .map_or((part.trim(), None), |(n, a)| {
                    (n.trim(), Some(a.trim().trim_matches('"')))
                });
            match name.to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                "max-age" => d.max_age = arg.and_then(|a| a.parse().ok()),
                "s-maxage" => d.s_maxage = arg.and_then(|a| a.parse().ok()),
                "only-if-cached" => d.only_if_cached = true,
                _ => {}
            }
        }
    }
    d
}

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    /// The method is not cached by the policy.
    Method,
    /// The status is not cacheable.
    Status,
    /// `no-store` on the request or the response.
    NoStore,
    /// `private`.
    Private,
    /// The request had `Authorization` and the response does not say a shared cache may keep it.
    Authorization,
    /// `Vary: *`.
    VaryStar,
    /// The body is larger than the policy allows.
    TooLarge,
    /// No freshness information and no default TTL.
    NoFreshness,
    /// An `Age` that is not a non-negative integer (RFC 9111 5.1: ignore the response).
    InvalidAge,
}

/// The cache policy the rules need.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Cached methods (GET and/or HEAD).
    pub methods: Vec<Method>,
    /// TTL for responses without freshness information (zero: not stored).
    pub default_ttl: Duration,
    /// Longest freshness honoured.
    pub max_ttl: Duration,
    /// Largest body stored.
    pub max_body_bytes: usize,
}

/// Whether a shared cache may store this response (RFC 9111 3, 3.5).
///
/// # Errors
/// The reason it may not.
pub fn storable(
    rules: &Rules,
    method: &Method,
    req: &HeaderMap,
    status: StatusCode,
    rsp: &HeaderMap,
    body_len: usize,
) -> Result<(), NotStored> {
    if !rules.methods.contains(method) {
        return Err(NotStored::Method);
    }
    if !CACHEABLE.contains(&status.as_u16()) {
        return Err(NotStored::Status);
    }
    let r = directives(rsp);
    if r.no_store || directives(req).no_store {
        return Err(NotStored::NoStore);
    }
    if r.private {
        return Err(NotStored::Private);
    }
    // 3.5: a response to a request with Authorization is stored only when the response says so.
    if req.contains_key(header::AUTHORIZATION)
        && !(r.public || r.s_maxage.is_some() || r.must_revalidate)
    {
        return Err(NotStored::Authorization);
    }
    if rsp.get_all(header::VARY).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|p| p.trim() == "*"))
    }) {
        return Err(NotStored::VaryStar);
    }
    if body_len > rules.max_body_bytes {
        return Err(NotStored::TooLarge);
    }
    if rsp.contains_key(header::AGE) && parse_age(rsp).is_none() {
        return Err(NotStored::InvalidAge);
    }
    if freshness_lifetime(rules, rsp).is_zero() && !r.no_cache {
        return Err(NotStored::NoFreshness);
    }
    Ok(())
}

fn http_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    httpdate::parse_http_date(headers.get(name)?.to_str().ok()?).ok()
}

/// How long a response stays fresh (RFC 9111 4.2.1), capped by `max_ttl`.
pub fn freshness_lifetime(rules: &Rules, rsp: &HeaderMap) -> Duration {
    let d = directives(rsp);
    let explicit = d
        .s_maxage
        .or(d.max_age)
        .map(Duration::from_secs)
        .or_else(|| {
            let expires = http_date(rsp, &header::EXPIRES)?;
            let date = http_date(rsp, &header::DATE).unwrap_or_else(SystemTime::now);
            Some(expires.duration_since(date).unwrap_or_default())
        });
    explicit.unwrap_or(rules.default_ttl).min(rules.max_ttl)
}

/// The `Age` field as RFC 9111 5.1 reads it: of a list (or repeated lines) the first member;
/// `None` when that is not a non-negative integer (digits only).
fn parse_age(rsp: &HeaderMap) -> Option<u64> {
    let first = rsp
        .get(header::AGE)?
        .to_str()
        .ok()?
        .split(',')
        .next()?
        .trim();
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Larger than fits: as old as can be (2^31 seconds, RFC 9111 1.2.2).
    Some(first.parse::<u64>().unwrap_or(1 << 31))
}

/// The age a stored response had on arrival (its `Age` header, RFC 9111 5.1).
pub fn age(rsp: &HeaderMap) -> Duration {
    parse_age(rsp).map_or(Duration::ZERO, Duration::from_secs)
}

/// What the request's own `Cache-Control` allows of a stored response (RFC 9111 5.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestAllows {
    /// Serve it if fresh.
    Fresh,
    /// Validate it with the origin first (`no-cache`, or older than the request's `max-age`).
    Revalidate,
}

/// Reads the request's directives against a stored entry.
pub fn request_allows(req: &HeaderMap, entry: &Entry) -> RequestAllows {
    let d = directives(req);
    let too_old = d
        .max_age
        .is_some_and(|max| entry.current_age() > Duration::from_secs(max));
    if d.no_cache || too_old || req.get(header::PRAGMA).is_some_and(|p| p == "no-cache") {
        RequestAllows::Revalidate
    } else {
        RequestAllows::Fresh
    }
}

/// Whether a conditional request (`If-None-Match`, else `If-Modified-Since`) is satisfied by
/// the stored entry, so a 304 answers it (RFC 9111 4.3.2, RFC 9110 13.1).
pub fn not_modified(req: &HeaderMap, entry: &Entry) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = entry
            .headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        // Weak comparison: W/ is ignored on both sides.
        let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        return inm.trim() == "*" || inm.split(',').any(|t| bare(t) == bare(etag));
    }
    let since = http_date(req, &header::IF_MODIFIED_SINCE);
    let modified = http_date(&entry.headers, &header::LAST_MODIFIED);
    matches!((since, modified), (Some(s), Some(m)) if m <= s)
}

/// A stored response.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Status.
    pub status: StatusCode,
    /// Headers (as received).
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// When it was stored.
    pub stored: Instant,
    /// Its age then.
    pub initial_age: Duration,
    /// How long it is fresh from its origin.
    pub lifetime: Duration,
    /// The request headers it varies on, with the values the stored request had.
    pub vary: BTreeMap<String, Option<String>>,
}

impl Entry {
    /// Its current age.
    pub fn current_age(&self) -> Duration {
        self.initial_age + self.stored.elapsed()
    }

    /// Fresh now (and not `no-cache`).
    pub fn is_fresh(&self) -> bool {
        !directives(&self.headers).no_cache && self.current_age() < self.lifetime
    }

    /// Stale by at most `grace` (for serve-stale-on-error).
    pub fn is_usable_stale(&self, grace: Duration) -> bool {
        self.current_age() < self.lifetime + grace && !directives(&self.headers).must_revalidate
    }

    fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len())
                .sum::<usize>()
    }
}

/// The request headers a response varies on: the policy's `varyHeaders` and the response's `Vary`.
pub fn vary_names(policy_vary: &[String], rsp: &HeaderMap) -> Vec<String> {
    let mut names: Vec<String> = policy_vary.iter().map(|h| h.to_ascii_lowercase()).collect();
    for v in rsp.get_all(header::VARY) {
        if let Ok(text) = v.to_str() {
            names.extend(
                text.split(',')
                    .map(|n| n.trim().to_ascii_lowercase())
                    .filter(|n| !n.is_empty()),
            );
        }
    }
    names.sort();
    names.dedup();
    names
}

fn vary_values(names: &[String], req: &HeaderMap) -> BTreeMap<String, Option<String>> {
    names
        .iter()
        .map(|n| {
            (
                n.clone(),
                req.get(n.as_str())
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            )
        })
        .collect()
}

/// Entries bounded by count and bytes; least recently used out first.
#[derive(Debug)]
pub struct Store {
    max_entries: usize,
    max_bytes: usize,
    bytes: usize,
    /// Stored responses (all variants).
    count: usize,
    /// Primary key (method, authority, path) -> (last use, variants).
    entries: HashMap<String, (u64, Vec<Entry>)>,
    /// Last use -> primary key: the first is the least recently used.
    lru: BTreeMap<u64, String>,
    clock: u64,
}

impl Store {
    /// An empty store.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            max_entries,
            max_bytes,
            bytes: 0,
            count: 0,
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
        }
    }

    fn key(method: &Method, authority: &str, path: &str) -> String {
        format!("{method} {authority}{path}")
    }

    /// The stored response for this request, if one matches its varying headers.
    pub fn get(
        &mut self,
        method: &Method,
        authority: &str,
        path: &str,
        req: &HeaderMap,
    ) -> Option<Entry> {
        let key = Self::key(method, authority, path);
        let (_, variants) = self.entries.get(&key)?;
        let hit = variants
            .iter()
            .find(|e| e.vary == vary_values(&e.vary.keys().cloned().collect::<Vec<_>>(), req))?
            .clone();
        self.touch(&key);
        Some(hit)
    }

    /// Stores a response (replacing the variant with the same varying values).
    pub fn put(
        &mut self,
        method: &Method,
        authority: &str,
        path: &str,
        req: &HeaderMap,
        policy_vary: &[String],
        mut entry: Entry,
    ) {
        let key = Self::key(method, authority, path);
        entry.vary = vary_values(&vary_names(policy_vary, &entry.headers), req);
        let size = entry.size();
        if size > self.max_bytes {
            return;
        }
        let (_, variants) = self.entries.entry(key.clone()).or_insert((0, Vec::new()));
        if let Some(i) = variants.iter().position(|e| e.vary == entry.vary) {
            let old = variants.remove(i);
            self.bytes -= old.size();
            self.count -= 1;
        }
        variants.push(entry);
        self.bytes += size;
        self.count += 1;
        self.touch(&key);
        while self.bytes > self.max_bytes || self.count > self.max_entries {
            let Some((_, oldest)) = self.lru.pop_first() else {
                break;
            };
            if let Some((_, vs)) = self.entries.remove(&oldest) {
                self.bytes -= vs.iter().map(Entry::size).sum::<usize>();
                self.count -= vs.len();
            }
        }
    }

    /// Marks `key` as the most recently used.
    fn touch(&mut self, key: &str) {
        let Some((used, _)) = self.entries.get_mut(key) else {
            return;
        };
        self.lru.remove(used);
        self.clock += 1;
        *used = self.clock;
        self.lru.insert(self.clock, key.to_owned());
    }

    /// Drops every stored response (all methods and variants) for a target URI: what a
    /// successful unsafe request to it does (RFC 9111 4.4).
    pub fn invalidate(&mut self, authority: &str, path: &str) {
        for method in [Method::GET, Method::HEAD] {
            let key = Self::key(&method, authority, path);
            if let Some((used, vs)) = self.entries.remove(&key) {
                self.lru.remove(&used);
                self.bytes -= vs.iter().map(Entry::size).sum::<usize>();
                self.count -= vs.len();
            }
        }
    }

    /// Stored responses.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests;
