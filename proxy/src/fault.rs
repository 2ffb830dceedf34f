//! Fault injection: a FaultInjection the proxy holds delays and/or aborts a share of the
//! requests that match its headers, until it expires (its end time, or its TTL without a
//! refresh from the controller). Server side, the inbound proxy injects, so callers' retries,
//! breakers and outlier detection react as to a real failure; client side, the outbound proxy
//! injects before its own retries (as Istio does).

use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use rand::Rng as _;

use crate::http::{Body, ProxyError, boxed};
use crate::metrics::{Direction, Metrics};
use crate::policy::FaultPolicy;
use crate::policy::resilience::FaultAbort;

/// True when every header of the fault matches and it has not ended.
fn applies(fault: &FaultPolicy, headers: &HeaderMap, now: SystemTime) -> bool {
    now < fault.expires_at
        && fault.headers.iter().all(|(name, value)| {
            headers
                .get(name.as_str())
                .is_some_and(|v| v.as_bytes() == value.as_bytes())
        })
}

fn roll(percentage: f64) -> bool {
    percentage >= 100.0 || (percentage > 0.0 && rand::rng().random_range(0.0..100.0) < percentage)
}

/// Applies the first fault that matches: waits its delay (when rolled), then answers its
/// abort (when rolled). `None`: the request goes on.
pub async fn inject(
    faults: &[FaultPolicy],
    headers: &HeaderMap,
    metrics: &Metrics,
    direction: Direction,
    service: &str,
) -> Option<Response<Body>> {
    let now = SystemTime::now();
    let fault = faults.iter().find(|f| applies(f, headers, now))?;
    if let Some((delay, pct)) = fault.delay
        && roll(pct)
    {
        metrics.fault(direction, service, "delay");
        tokio::time::sleep(delay).await;
    }
    let (abort, pct) = fault.abort?;
    if !roll(pct) {
        return None;
    }
    metrics.fault(direction, service, "abort");
    let mut rsp = match abort {
        FaultAbort::Http(code) => {
            let mut r = Response::new(boxed(Full::new(Bytes::from(format!(
                "fault-injected: {}\n",
                fault.source
            )))));
            *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            r
        }
        FaultAbort::Grpc(code) => {
            // A trailers-only gRPC answer: status in the headers.
            let mut r = Response::new(boxed(Full::new(Bytes::new())));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            r.headers_mut()
                .insert("grpc-status", HeaderValue::from(code));
            r.headers_mut()
                .insert("grpc-message", HeaderValue::from_static("fault-injected"));
            r
        }
    };
    rsp.extensions_mut().insert(ProxyError::FaultInjected);
    Some(rsp)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn fault(
        abort: Option<(FaultAbort, f64)>,
        headers: Vec<(&str, &str)>,
        ends_in: i64,
    ) -> FaultPolicy {
        let now = SystemTime::now();
        let expires_at = if ends_in >= 0 {
            now + Duration::from_secs(ends_in.unsigned_abs())
        } else {
            now - Duration::from_secs(ends_in.unsigned_abs())
        };
        FaultPolicy {
            headers: headers
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
            delay: None,
            abort,
            expires_at,
            source: "FaultInjection shop/f".into(),
        }
    }

    #[tokio::test]
    async fn aborts_match_headers_and_stop_at_their_end() {
        let m = Metrics::new();
        let mut chaos = HeaderMap::new();
        chaos.insert("x-chaos", HeaderValue::from_static("on"));
        let f = fault(
            Some((FaultAbort::Http(503), 100.0)),
            vec![("x-chaos", "on")],
            60,
        );
        let rsp = inject(
            std::slice::from_ref(&f),
            &chaos,
            &m,
            Direction::inbound,
            "shop/a",
        )
        .await
        .unwrap();
        assert_eq!(rsp.status(), 503);
        assert_eq!(ProxyError::of(&rsp), Some(ProxyError::FaultInjected));
        assert!(
            inject(
                std::slice::from_ref(&f),
                &HeaderMap::new(),
                &m,
                Direction::inbound,
                "shop/a"
            )
            .await
            .is_none(),
            "no opt-in header"
        );
        let ended = fault(Some((FaultAbort::Http(503), 100.0)), vec![], -1);
        assert!(
            inject(&[ended], &chaos, &m, Direction::inbound, "shop/a")
                .await
                .is_none(),
            "ended"
        );
        assert!(m.encode().contains(r#"ferrymesh_proxy_faults_injected_total{direction="inbound",service="shop/a",kind="abort"} 1"#));
    }

    #[tokio::test]
    async fn grpc_aborts_answer_with_a_grpc_status() {
        let m = Metrics::new();
        let f = fault(Some((FaultAbort::Grpc(14), 100.0)), vec![], 60);
        let rsp = inject(&[f], &HeaderMap::new(), &m, Direction::inbound, "shop/a")
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.headers()["grpc-status"], "14");
    }

    #[tokio::test(start_paused = true)]
    async fn delays_wait_and_percentages_split() {
        let m = Metrics::new();
        let mut f = fault(None, vec![], 3600);
        f.delay = Some((Duration::from_secs(2), 100.0));
        let start = tokio::time::Instant::now();
        assert!(
            inject(
                std::slice::from_ref(&f),
                &HeaderMap::new(),
                &m,
                Direction::inbound,
                "shop/a"
            )
            .await
            .is_none()
        );
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        let half = fault(Some((FaultAbort::Http(500), 50.0)), vec![], 3600);
        let mut aborted = 0;
        for _ in 0..400 {
            if inject(
                std::slice::from_ref(&half),
                &HeaderMap::new(),
                &m,
                Direction::inbound,
                "shop/a",
            )
            .await
            .is_some()
            {
                aborted += 1;
            }
        }
        assert!((140..=260).contains(&aborted), "{aborted} of 400 at 50%");
    }
}
