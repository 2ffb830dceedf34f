use http::HeaderValue;

use super::*;

fn rules() -> Rules {
    Rules {
        methods: vec![Method::GET, Method::HEAD],
        default_ttl: Duration::ZERO,
        max_ttl: Duration::from_mins(5),
        max_body_bytes: 1024,
    }
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_static(v));
    }
    h
}

fn entry(rsp: HeaderMap, lifetime: Duration) -> Entry {
    Entry {
        status: StatusCode::OK,
        initial_age: age(&rsp),
        headers: rsp,
        body: Bytes::from_static(b"x"),
        stored: Instant::now(),
        lifetime,
        vary: BTreeMap::new(),
    }
}

#[test]
fn what_a_shared_cache_may_store() {
    let r = rules();
    let ok = headers(&[("cache-control", "max-age=10")]);
    assert_eq!(
        storable(&r, &Method::GET, &HeaderMap::new(), StatusCode::OK, &ok, 10),
        Ok(())
    );
    assert_eq!(
        storable(
            &r,
            &Method::POST,
            &HeaderMap::new(),
            StatusCode::OK,
            &ok,
            10
        ),
        Err(NotStored::Method)
    );
    assert_eq!(
        storable(
            &r,
            &Method::GET,
            &HeaderMap::new(),
            StatusCode::INTERNAL_SERVER_ERROR,
            &ok,
            10
        ),
        Err(NotStored::Status)
    );
    let no_store = headers(&[("cache-control", "max-age=10, no-store")]);
    assert_eq!(
        storable(
            &r,
            &Method::GET,
            &HeaderMap::new(),
            StatusCode::OK,
            &no_store,
            10
        ),
        Err(NotStored::NoStore)
    );
    assert_eq!(
        storable(
            &r,
            &Method::GET,
            &headers(&[("cache-control", "no-store")]),
            StatusCode::OK,
            &ok,
            10
        ),
        Err(NotStored::NoStore),
        "no-store on the request"
    );
    let private = headers(&[("cache-control", "private, max-age=10")]);
    assert_eq!(
        storable(
            &r,
            &Method::GET,
            &HeaderMap::new(),
            StatusCode::OK,
            &private,
            10
        ),
        Err(NotStored::Private)
    );
}

#[test]
fn authorization_vary_star_size_and_freshness_rules() {
    let r = rules();
    let ok = headers(&[("cache-control", "max-age=10")]);
    let auth = headers(&[("authorization", "Bearer t")]);
    assert_eq!(
        storable(&r, &Method::GET, &auth, StatusCode::OK, &ok, 10),
        Err(NotStored::Authorization)
    );
    let shared = headers(&[("cache-control", "s-maxage=10")]);
    assert_eq!(
        storable(&r, &Method::GET, &auth, StatusCode::OK, &shared, 10),
        Ok(()),
        "s-maxage allows it (3.5)"
    );
    let vary_star = headers(&[("cache-control", "max-age=10"), ("vary", "*")]);
    assert_eq!(
        storable(
            &r,
            &Method::GET,
            &HeaderMap::new(),
            StatusCode::OK,
            &vary_star,
            10
        ),
        Err(NotStored::VaryStar)
    );
    assert_eq!(
        storable(
            &r,
            &Method::GET,
            &HeaderMap::new(),
            StatusCode::OK,
            &ok,
            2048
        ),
        Err(NotStored::TooLarge)
    );
    assert_eq!(
        storable(
            &r,
            &Method::GET,
            &HeaderMap::new(),
            StatusCode::OK,
            &HeaderMap::new(),
            10
        ),
        Err(NotStored::NoFreshness)
    );
    let with_default = Rules {
        default_ttl: Duration::from_secs(5),
        ..rules()
    };
    assert_eq!(
        storable(
            &with_default,
            &Method::GET,
            &HeaderMap::new(),
            StatusCode::OK,
            &HeaderMap::new(),
            10
        ),
        Ok(())
    );
}

#[test]
fn freshness_comes_from_s_maxage_then_max_age_then_expires_capped() {
    let r = rules();
    assert_eq!(
        freshness_lifetime(
            &r,
            &headers(&[("cache-control", "max-age=10, s-maxage=20")])
        ),
        Duration::from_secs(20)
    );
    assert_eq!(
        freshness_lifetime(&r, &headers(&[("cache-control", "max-age=10")])),
        Duration::from_secs(10)
    );
    assert_eq!(
        freshness_lifetime(&r, &headers(&[("cache-control", "max-age=99999")])),
        Duration::from_mins(5),
        "capped by maxTTL"
    );
    let h = headers(&[
        ("date", "Thu, 26 Nov 2026 10:00:00 GMT"),
        ("expires", "Thu, 26 Nov 2026 10:00:30 GMT"),
    ]);
    assert_eq!(freshness_lifetime(&r, &h), Duration::from_secs(30));
    assert_eq!(age(&headers(&[("age", "7")])), Duration::from_secs(7));
}

#[tokio::test(start_paused = true)]
async fn entries_go_stale_and_serve_stale_within_the_grace() {
    let e = entry(
        headers(&[("cache-control", "max-age=10"), ("age", "4")]),
        Duration::from_secs(10),
    );
    assert!(e.is_fresh());
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(!e.is_fresh(), "4s old on arrival + 6s");
    assert!(e.is_usable_stale(Duration::from_secs(30)));
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(!e.is_usable_stale(Duration::from_secs(30)));
    let must = entry(
        headers(&[("cache-control", "max-age=0, must-revalidate")]),
        Duration::ZERO,
    );
    assert!(
        !must.is_usable_stale(Duration::from_secs(30)),
        "must-revalidate forbids stale use"
    );
}

#[tokio::test(start_paused = true)]
async fn lookups_respect_vary_and_the_policys_vary_headers() {
    let mut s = Store::new(10, 1 << 20);
    let rsp = headers(&[("cache-control", "max-age=10"), ("vary", "Accept-Encoding")]);
    let gzip = headers(&[("accept-encoding", "gzip")]);
    let br = headers(&[("accept-encoding", "br")]);
    s.put(
        &Method::GET,
        "a.shop",
        "/x",
        &gzip,
        &["accept".into()],
        entry(rsp.clone(), Duration::from_secs(10)),
    );
    assert!(s.get(&Method::GET, "a.shop", "/x", &gzip).is_some());
    assert!(
        s.get(&Method::GET, "a.shop", "/x", &br).is_none(),
        "another encoding is another variant"
    );
    assert!(
        s.get(
            &Method::GET,
            "a.shop",
            "/x",
            &headers(&[("accept-encoding", "gzip"), ("accept", "text/html")])
        )
        .is_none(),
        "the policy varies on accept"
    );
    assert!(s.get(&Method::GET, "a.shop", "/y", &gzip).is_none());
    s.put(
        &Method::GET,
        "a.shop",
        "/x",
        &br,
        &["accept".into()],
        entry(rsp, Duration::from_secs(10)),
    );
    assert_eq!(s.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_store_is_bounded_and_drops_the_least_recently_used() {
    let mut s = Store::new(2, 1 << 20);
    let rsp = headers(&[("cache-control", "max-age=10")]);
    for path in ["/a", "/b"] {
        s.put(
            &Method::GET,
            "h",
            path,
            &HeaderMap::new(),
            &[],
            entry(rsp.clone(), Duration::from_secs(10)),
        );
    }
    assert!(s.get(&Method::GET, "h", "/a", &HeaderMap::new()).is_some()); // /a is now the freshest use
    s.put(
        &Method::GET,
        "h",
        "/c",
        &HeaderMap::new(),
        &[],
        entry(rsp.clone(), Duration::from_secs(10)),
    );
    assert_eq!(s.len(), 2);
    assert!(
        s.get(&Method::GET, "h", "/b", &HeaderMap::new()).is_none(),
        "least recently used went first"
    );
    let mut tiny = Store::new(10, 64);
    tiny.put(
        &Method::GET,
        "h",
        "/big",
        &HeaderMap::new(),
        &[],
        Entry {
            body: Bytes::from(vec![0; 100]),
            ..entry(rsp, Duration::from_secs(10))
        },
    );
    assert!(tiny.is_empty(), "larger than the whole store");
}

#[test]
fn age_is_one_non_negative_integer_and_partial_content_is_never_stored() {
    let fresh = headers(&[("cache-control", "max-age=60")]);
    let with_age = |age: &'static str| headers(&[("cache-control", "max-age=60"), ("age", age)]);
    // RFC 9111 5.1: of a list, the first member; anything else than digits: not stored.
    assert_eq!(age(&with_age("7200, 0")), Duration::from_hours(2));
    assert_eq!(age(&with_age("30")), Duration::from_secs(30));
    for bad in ["-1", "abc", "1.5", ""] {
        assert_eq!(
            storable(
                &rules(),
                &Method::GET,
                &HeaderMap::new(),
                StatusCode::OK,
                &with_age(bad),
                10
            ),
            Err(NotStored::InvalidAge),
            "{bad:?}"
        );
    }
    assert_eq!(
        storable(
            &rules(),
            &Method::GET,
            &HeaderMap::new(),
            StatusCode::PARTIAL_CONTENT,
            &fresh,
            10
        ),
        Err(NotStored::Status)
    );
}
