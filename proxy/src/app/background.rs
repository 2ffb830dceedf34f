//! Tasks beside the listeners: tracing and trust anchors as the controller sets them, and the
//! app's readiness reported to it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Inbound;
use crate::discovery::Discovery;
use crate::identity::Identity;
use crate::pool::Pool;
use crate::trace::Tracing;

/// Follows TELEMETRY: the collector and sampling the controller sets (none: tracing off).
pub(super) async fn follow_telemetry(
    tracing: Arc<Tracing>,
    mut telemetry: watch::Receiver<crate::discovery::State>,
) {
    loop {
        let (endpoint, sampling) = match &*telemetry.borrow_and_update() {
            crate::discovery::State::Found(held) => match &held.value {
                crate::discovery::Value::Telemetry { endpoint, sampling } => {
                    (endpoint.clone(), *sampling)
                }
                _ => (String::new(), 0.0),
            },
            _ => (String::new(), 0.0),
        };
        tracing.apply(&endpoint, sampling);
        if telemetry.changed().await.is_err() {
            return;
        }
    }
}

/// Applies every TRUST_BUNDLE the controller pushes (a CA rotation serves the old and the new
/// anchors together).
pub(super) async fn follow_trust_bundle(
    identity: Arc<crate::identity::Identity>,
    mut bundle: watch::Receiver<crate::discovery::State>,
) {
    loop {
        let anchors = match &*bundle.borrow_and_update() {
            crate::discovery::State::Found(held) => match &held.value {
                crate::discovery::Value::TrustBundle(a) => Some(a.clone()),
                _ => None,
            },
            _ => None,
        };
        if let Some(anchors) = anchors
            && let Err(e) = identity.set_anchors(&anchors)
        {
            tracing::warn!(error = %format!("{e:#}"), "trust bundle not applied");
        }
        if bundle.changed().await.is_err() {
            return;
        }
    }
}

/// Reports the app's readiness to the controller: polls `readinessPath` every second, or
/// reports ready at once when there is none.
pub(super) async fn readiness(
    inbound: Option<Inbound>,
    identity: Option<Arc<Identity>>,
    discovery: Discovery,
    pool: Arc<Pool>,
    drain: watch::Receiver<bool>,
) {
    let Some(inbound) = inbound else {
        return;
    };
    // With mTLS on, peers cannot reach the workload before it holds a certificate.
    if let Some(identity) = &identity {
        let mut held = identity.watch();
        let mut drain = drain.clone();
        tokio::select! {
            _ = held.wait_for(Option::is_some) => {}
            _ = drain.wait_for(|d| *d) => return,
        }
    }
    let Some(path) = inbound.readiness_path.clone() else {
        discovery.set_ready(true);
        return;
    };
    let authority: http::uri::Authority = inbound
        .app
        .to_string()
        .parse()
        .expect("a socket address is an authority");
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*drain.borrow() {
        interval.tick().await;
        let req = http::Request::get(path.as_str())
            .body(crate::http::empty())
            .expect("a path is a valid URI");
        let timeouts = crate::client::CallTimeouts {
            request: Some(Duration::from_secs(1)),
            connect: inbound.connect_timeout,
            idle: crate::pool::DEFAULT_IDLE,
        };
        let rsp = crate::client::send(&pool, inbound.app, &authority, req, timeouts, None).await;
        let ready = rsp.status().is_success();
        if ready != discovery.ready() {
            tracing::info!(ready, status = %rsp.status(), "app readiness changed");
        }
        discovery.set_ready(ready);
    }
}
