use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use tokio::time::Instant;
use tower::ServiceExt as _;
use tower_test::mock;

use super::*;

type Req = Request<ReplayBody<Full<Bytes>>>;

fn policy(attempts: u32, strategy: Strategy) -> Arc<RetryPolicy> {
    Arc::new(RetryPolicy {
        attempts,
        backoff: Backoff {
            strategy,
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        },
        methods: vec![Method::GET, Method::PUT],
        respect_retry_after: true,
        max_request_body_bytes: 64 * 1024,
    })
}

/// 5xx is a retryable failure.
fn classify() -> Classifier<String> {
    Arc::new(|rsp: &Response<String>| rsp.status().is_server_error().then_some("5xx"))
}

fn recorder() -> (Observer, Arc<Mutex<Vec<RetryEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    (
        Arc::new(move |ev: &RetryEvent, _: &http::Extensions| {
            e.lock().unwrap().push(ev.clone());
        }),
        events,
    )
}

fn status(code: u16) -> Response<String> {
    Response::builder()
        .status(code)
        .body(String::new())
        .unwrap()
}

fn request(method: Method, body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("/x")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// Answers the next request with `code`.
async fn answer(handle: &mut mock::Handle<Req, Response<String>>, code: u16) {
    handle
        .next_request()
        .await
        .unwrap()
        .1
        .send_response(status(code));
}

type Events = Arc<Mutex<Vec<RetryEvent>>>;
type MockRetry = Retry<mock::Mock<Req, Response<String>>, String>;
type MockHandle = mock::Handle<Req, Response<String>>;

/// A retry over a mock service, with the mock's handle and the decisions it reports.
fn retry_over_mock(
    policy: Arc<RetryPolicy>,
    budget: RetryBudget,
) -> (MockRetry, MockHandle, Events) {
    let (service, handle) = mock::pair::<Req, Response<String>>();
    let (observe, events) = recorder();
    (
        Retry::new(service, policy, budget, classify(), observe),
        handle,
        events,
    )
}

fn budget() -> RetryBudget {
    RetryBudget::new(0.2, 100, Duration::from_secs(10))
}

#[tokio::test(start_paused = true)]
async fn failures_are_retried_with_the_body_until_success() {
    let (retry, mut handle, events) = retry_over_mock(policy(3, Strategy::Constant), budget());
    let call = tokio::spawn(retry.oneshot(request(Method::PUT, "payload")));
    for (i, code) in [503, 500, 200].into_iter().enumerate() {
        let (req, respond) = handle.next_request().await.unwrap();
        let attempt = req.extensions().get::<Attempt>().unwrap().number;
        assert_eq!(attempt, u32::try_from(i).unwrap() + 1);
        assert_eq!(
            req.into_body().collect().await.unwrap().to_bytes(),
            "payload",
            "attempt {attempt} carries the body"
        );
        respond.send_response(status(code));
    }
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    let events = events.lock().unwrap();
    assert_eq!(events.len(), 2);
    assert!(
        matches!(events[0], RetryEvent::Retry { attempt: 1, reason: "5xx", delay } if delay == Duration::from_millis(25))
    );
}

#[tokio::test(start_paused = true)]
async fn attempts_run_out_and_the_last_answer_is_returned() {
    let (retry, mut handle, events) = retry_over_mock(policy(2, Strategy::Exponential), budget());
    let start = Instant::now();
    let call = tokio::spawn(retry.oneshot(request(Method::GET, "")));
    for _ in 0..3 {
        answer(&mut handle, 503).await;
    }
    assert_eq!(call.await.unwrap().unwrap().status(), 503);
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(25 + 50),
        "exponential: 25ms then 50ms"
    );
    assert_eq!(
        events.lock().unwrap().last(),
        Some(&RetryEvent::Skipped {
            reason: "5xx",
            skip: Skip::AttemptsExhausted
        })
    );
}

#[tokio::test(start_paused = true)]
async fn post_is_retried_only_with_an_idempotency_key() {
    let (retry, mut handle, events) = retry_over_mock(policy(2, Strategy::Constant), budget());
    let call = tokio::spawn(retry.clone().oneshot(request(Method::POST, "order")));
    answer(&mut handle, 503).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 503, "not retried");
    assert_eq!(
        events.lock().unwrap()[0],
        RetryEvent::Skipped {
            reason: "5xx",
            skip: Skip::NotIdempotent
        }
    );

    let mut keyed = request(Method::POST, "order");
    keyed
        .headers_mut()
        .insert("idempotency-key", HeaderValue::from_static("k-1"));
    let call = tokio::spawn(retry.oneshot(keyed));
    answer(&mut handle, 503).await;
    answer(&mut handle, 201).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 201);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_retried_goes_through_as_it_is_and_decisions_see_its_extensions() {
    #[derive(Clone, Debug, PartialEq)]
    struct Caller(&'static str);
    let (service, mut handle) = mock::pair::<Req, Response<String>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let observe: Observer = Arc::new(move |ev: &RetryEvent, ext: &http::Extensions| {
        s.lock()
            .unwrap()
            .push((ev.clone(), ext.get::<Caller>().cloned()));
    });
    let retry = Retry::new(
        service,
        policy(2, Strategy::Constant),
        budget(),
        classify(),
        observe,
    );
    let mut req = request(Method::POST, "order");
    req.extensions_mut().insert(Caller("storefront"));
    let call = tokio::spawn(retry.oneshot(req));
    let (sent, respond) = handle.next_request().await.unwrap();
    assert!(
        sent.extensions().get::<Attempt>().is_none(),
        "the first and only attempt"
    );
    assert!(
        !sent.body().is_replayable(),
        "nothing buffered for a replay"
    );
    assert_eq!(
        sent.extensions().get::<Caller>(),
        Some(&Caller("storefront"))
    );
    respond.send_response(status(503));
    let rsp = call.await.unwrap().unwrap();
    assert_eq!(rsp.extensions().get::<Skip>(), Some(&Skip::NotIdempotent));
    assert_eq!(
        *seen.lock().unwrap(),
        [(
            RetryEvent::Skipped {
                reason: "5xx",
                skip: Skip::NotIdempotent
            },
            Some(Caller("storefront"))
        )]
    );
}

#[tokio::test(start_paused = true)]
async fn an_empty_budget_stops_retries() {
    let empty = RetryBudget::new(0.0, 0, Duration::from_secs(1));
    let (retry, mut handle, events) = retry_over_mock(policy(3, Strategy::Constant), empty);
    let call = tokio::spawn(retry.oneshot(request(Method::GET, "")));
    answer(&mut handle, 503).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 503);
    assert_eq!(
        events.lock().unwrap()[0],
        RetryEvent::Skipped {
            reason: "5xx",
            skip: Skip::BudgetExhausted
        }
    );
}

#[tokio::test(start_paused = true)]
async fn the_budget_allows_a_fraction_of_requests_plus_the_floor() {
    // 20% of requests, no floor: 50 failing requests may add about 10 retries.
    let (retry, mut handle, _events) = retry_over_mock(
        policy(3, Strategy::Constant),
        RetryBudget::new(0.2, 0, Duration::from_secs(10)),
    );
    let answer = tokio::spawn(async move {
        let mut upstream = 0;
        while let Some((_, respond)) = handle.next_request().await {
            upstream += 1;
            respond.send_response(status(503));
        }
        upstream
    });
    for _ in 0..50 {
        let _ = retry.clone().oneshot(request(Method::GET, "")).await;
    }
    drop(retry);
    let upstream = answer.await.unwrap();
    assert!(
        (50..=61).contains(&upstream),
        "{upstream} upstream attempts for 50 requests"
    );
}

#[tokio::test(start_paused = true)]
async fn no_retry_starts_that_cannot_finish_before_the_deadline() {
    let (retry, mut handle, events) = retry_over_mock(policy(3, Strategy::Constant), budget());
    let mut req = request(Method::GET, "");
    req.extensions_mut()
        .insert(Deadline(Instant::now() + Duration::from_millis(20)));
    let call = tokio::spawn(retry.oneshot(req));
    answer(&mut handle, 503).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 503);
    assert_eq!(
        events.lock().unwrap()[0],
        RetryEvent::Skipped {
            reason: "5xx",
            skip: Skip::Deadline
        }
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured() {
    let (retry, mut handle, _) = retry_over_mock(policy(1, Strategy::Constant), budget());
    let start = Instant::now();
    let call = tokio::spawn(retry.oneshot(request(Method::GET, "")));
    let mut busy = status(503);
    busy.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("2"));
    handle.next_request().await.unwrap().1.send_response(busy);
    answer(&mut handle, 200).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn a_body_past_the_cap_is_not_retried() {
    let small_cap = Arc::new(RetryPolicy {
        max_request_body_bytes: 4,
        ..(*policy(3, Strategy::Constant)).clone()
    });
    let (retry, mut handle, events) = retry_over_mock(small_cap, budget());
    let call = tokio::spawn(retry.oneshot(request(Method::PUT, "too long a body")));
    let (req, respond) = handle.next_request().await.unwrap();
    assert_eq!(
        req.into_body().collect().await.unwrap().to_bytes(),
        "too long a body"
    );
    respond.send_response(status(503));
    assert_eq!(call.await.unwrap().unwrap().status(), 503);
    assert_eq!(
        events.lock().unwrap()[0],
        RetryEvent::Skipped {
            reason: "5xx",
            skip: Skip::BodyTooLarge
        }
    );
}

#[test]
fn backoff_strategies_stay_in_their_bounds() {
    let b = |strategy| Backoff {
        strategy,
        base: Duration::from_millis(25),
        max: Duration::from_millis(250),
    };
    assert_eq!(
        b(Strategy::Constant).delay(5, Duration::ZERO),
        Duration::from_millis(25)
    );
    let exp: Vec<_> = (1..=6)
        .map(|n| {
            b(Strategy::Exponential)
                .delay(n, Duration::ZERO)
                .as_millis()
        })
        .collect();
    assert_eq!(exp, [25, 50, 100, 200, 250, 250]);
    for n in 1..=10 {
        let cap = b(Strategy::Exponential).delay(n, Duration::ZERO);
        assert!(b(Strategy::ExponentialFullJitter).delay(n, Duration::ZERO) <= cap);
        let d = b(Strategy::DecorrelatedJitter).delay(n, Duration::from_millis(40));
        assert!(
            d >= Duration::from_millis(25) && d <= Duration::from_millis(120),
            "{d:?}"
        );
    }
    assert_eq!(
        retry_after(Some(&HeaderValue::from_static("3"))),
        Some(Duration::from_secs(3))
    );
    assert_eq!(retry_after(Some(&HeaderValue::from_static("soon"))), None);
}
