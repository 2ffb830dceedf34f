//! Active health checks: while a policy with `healthCheck` applies to a service, a task probes
//! every ready endpoint each `interval` (HTTP GET with expected statuses, a TCP connect, or
//! grpc.health.v1 Check), after a random initial delay up to `initialJitter`. An endpoint that
//! fails `unhealthyThreshold` probes in a row leaves load balancing until it passes
//! `healthyThreshold` in a row. The task ends with the policy (or the target).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::{Request, StatusCode};
use rand::Rng as _;

use super::logical::Logical;
use crate::client::{CallTimeouts, grpc_serving, send};
use crate::http::empty;
use crate::metrics::Metrics;
use crate::policy::HealthCheckPolicy;
use crate::policy::resilience::Check;
use crate::pool::Pool;

#[derive(Debug, Default)]
struct Runs {
    /// (failures in a row, successes in a row) per endpoint.
    runs: HashMap<SocketAddr, (u32, u32)>,
    unhealthy: HashSet<SocketAddr>,
}

/// The health of a service's endpoints as probes see it; probing stops when it is dropped.
#[derive(Debug)]
pub struct HealthChecker {
    state: Arc<Mutex<Runs>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HealthChecker {
    /// Starts probing the endpoints of `logical` (held weakly: the checker lives in it).
    pub fn start(
        policy: HealthCheckPolicy,
        logical: Weak<Logical>,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        service: String,
    ) -> Self {
        let state = Arc::new(Mutex::new(Runs::default()));
        let task = tokio::spawn(probe_loop(
            policy,
            logical,
            (pool, metrics),
            service,
            state.clone(),
        ));
        Self { state, task }
    }

    /// True while `addr` failed its last `unhealthyThreshold` probes.
    pub fn is_unhealthy(&self, addr: &SocketAddr) -> bool {
        self.state
            .lock()
            .expect("health lock poisoned")
            .unhealthy
            .contains(addr)
    }
}

async fn probe_loop(
    policy: HealthCheckPolicy,
    logical: Weak<Logical>,
    (pool, metrics): (Arc<Pool>, Arc<Metrics>),
    service: String,
    state: Arc<Mutex<Runs>>,
) {
    let pool = &pool;
    let jitter = if policy.initial_jitter.is_zero() {
        Duration::ZERO
    } else {
        rand::rng().random_range(Duration::ZERO..=policy.initial_jitter)
    };
    tokio::time::sleep(jitter).await;
    let mut tick = tokio::time::interval(policy.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(logical) = logical.upgrade() else {
            return;
        };
        let endpoints: Vec<SocketAddr> = logical
            .balancer
            .slots()
            .iter()
            .filter(|s| s.endpoint.ready)
            .map(|s| s.endpoint.addr)
            .collect();
        drop(logical);
        let policy = &policy;
        let probes = endpoints.iter().map(|addr| {
            let target = if policy.port == 0 {
                *addr
            } else {
                SocketAddr::new(addr.ip(), policy.port)
            };
            async move { (*addr, probe(policy, pool, target).await) }
        });
        let results = futures::future::join_all(probes).await;
        let mut s = state.lock().expect("health lock poisoned");
        s.runs.retain(|a, _| endpoints.contains(a));
        s.unhealthy.retain(|a| endpoints.contains(a));
        for (addr, ok) in results {
            metrics.health_check(&service, ok);
            let run = s.runs.entry(addr).or_default();
            *run = if ok { (0, run.1 + 1) } else { (run.0 + 1, 0) };
            let (failures, successes) = *run;
            if !ok && failures >= policy.unhealthy_threshold && s.unhealthy.insert(addr) {
                tracing::info!(%service, endpoint = %addr, "endpoint failed its health checks");
            } else if ok && successes >= policy.healthy_threshold && s.unhealthy.remove(&addr) {
                tracing::info!(%service, endpoint = %addr, "endpoint passes its health checks again");
            }
        }
    }
}

async fn probe(policy: &HealthCheckPolicy, pool: &Pool, addr: SocketAddr) -> bool {
    let check = async {
        match &policy.check {
            Check::Tcp => tokio::net::TcpStream::connect(addr).await.is_ok(),
            Check::Http { path, statuses } => {
                let Ok(req) = Request::get(path.as_str()).body(empty()) else {
                    return false;
                };
                let authority: http::uri::Authority = addr
                    .to_string()
                    .parse()
                    .expect("a socket address is an authority");
                let timeouts = CallTimeouts {
                    request: None,
                    connect: policy.timeout,
                    idle: crate::pool::DEFAULT_IDLE,
                };
                let rsp = send(pool, addr, &authority, req, timeouts, None).await;
                let ok = if statuses.is_empty() {
                    rsp.status() == StatusCode::OK
                } else {
                    statuses.contains(&rsp.status())
                };
                ok && crate::http::ProxyError::of(&rsp).is_none()
            }
            Check::Grpc { service } => grpc_serving(addr, service).await,
        }
    };
    tokio::time::timeout(policy.timeout, check)
        .await
        .unwrap_or(false)
}
