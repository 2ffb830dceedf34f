//! A logical target: one service port as the app named it. Resolves it through discovery
//! (lazily subscribing ENDPOINTS and CLIENT_POLICY), keeps its balancer in step with the
//! endpoint set, and forwards requests to the endpoint the balancer picks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymesh_proto::discovery::v1 as pb;
use tokio::sync::watch;

use crate::balance::Balancer;
use crate::discovery::{Discovery, State, Value};
use crate::policy::{ClientPolicy, Endpoints};

/// How long a request waits for the controller's first answer on a new name.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);

/// What a name resolved to.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// A mesh service port.
    Service {
        /// Its endpoints.
        endpoints: Arc<Endpoints>,
        /// Its client policy, when the controller sent one.
        policy: Option<Arc<ClientPolicy>>,
    },
    /// The controller does not know the name.
    Unknown,
}

/// Why a name could not be resolved in time.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no answer from the controller within {DISCOVERY_TIMEOUT:?}")]
pub struct DiscoveryTimeout;

/// One service port, resolved and balanced.
#[derive(Debug)]
pub struct Logical {
    /// The discovery name (`name.namespace.svc.cluster.local:port` or `ip:port`).
    pub name: String,
    endpoints: watch::Receiver<State>,
    policy: watch::Receiver<State>,
    /// The balancer over the endpoints.
    pub balancer: Balancer,
    /// The stack state of the current policy (retry budget, breaker), kept across requests.
    pub stack: super::concrete::StackCache,
    applied: Mutex<Option<String>>,
    /// A policy whose faults expired, and its copy without them.
    stale: Mutex<Option<(Arc<ClientPolicy>, Arc<ClientPolicy>)>>,
    /// The policy of this target when the controller sent none (a route's sections are
    /// merged over it): one per target, so the merged policy and its stack are reused.
    empty: std::sync::OnceLock<Arc<ClientPolicy>>,
    /// The request metrics of calls to this target (resolved on the first).
    requests: std::sync::OnceLock<crate::metrics::RequestHandles>,
}

impl Logical {
    /// Hands the balancer an endpoint set it does not hold yet (by version).
    fn apply_endpoints(&self, version: &str, endpoints: &[crate::policy::Endpoint]) {
        let mut applied = self.applied.lock().expect("logical lock poisoned");
        if applied.as_deref() != Some(version) {
            self.balancer.update(endpoints);
            *applied = Some(version.to_owned());
        }
    }

    /// Brings the balancer up to the latest endpoints held, without waiting: what
    /// `/config_dump` shows is then current, not as of this target's last request.
    pub fn sync_endpoints(&self) {
        let latest = match &*self.endpoints.borrow() {
            State::Found(held) => match &held.value {
                Value::Endpoints(e) => Some((held.version.clone(), e.endpoints.clone())),
                _ => None,
            },
            _ => None,
        };
        if let Some((version, endpoints)) = latest {
            self.apply_endpoints(&version, &endpoints);
        }
    }

    /// Subscribes `name` (if not yet) and returns its target.
    pub fn new(discovery: &Discovery, name: String) -> Self {
        Self {
            endpoints: discovery.watch(pb::ResourceType::Endpoints, &name),
            policy: discovery.watch(pb::ResourceType::ClientPolicy, &name),
            name,
            balancer: Balancer::default(),
            stack: super::concrete::StackCache::default(),
            applied: Mutex::new(None),
            stale: Mutex::new(None),
            empty: std::sync::OnceLock::new(),
            requests: std::sync::OnceLock::new(),
        }
    }

    /// The request metrics of calls to this target, labelled `service` (`namespace/name`, the
    /// same for every call of a target).
    pub fn request_metrics(
        &self,
        metrics: &crate::metrics::Metrics,
        service: &str,
    ) -> crate::metrics::RequestHandles {
        self.requests
            .get_or_init(|| metrics.request_handles(crate::metrics::Direction::outbound, service))
            .clone()
    }

    /// The policy of a target that has none (`service` is its `namespace/name`), the same
    /// `Arc` on every call.
    pub fn empty_policy(&self, service: &str) -> Arc<ClientPolicy> {
        self.empty
            .get_or_init(|| Arc::new(ClientPolicy::empty(service)))
            .clone()
    }

    /// Waits (at most [`DISCOVERY_TIMEOUT`]) for the controller's answer and returns it, with
    /// the balancer updated to the latest endpoints.
    ///
    /// # Errors
    /// [`DiscoveryTimeout`] when the controller has not answered.
    pub async fn resolve(&self) -> Result<Resolution, DiscoveryTimeout> {
        let mut endpoints = self.endpoints.clone();
        let mut policy = self.policy.clone();
        let wait = async {
            let e = endpoints.wait_for(State::is_known).await.map(|s| s.clone());
            let p = policy.wait_for(State::is_known).await.map(|s| s.clone());
            (e, p)
        };
        let (e, p) = tokio::time::timeout(DISCOVERY_TIMEOUT, wait)
            .await
            .map_err(|_| DiscoveryTimeout)?;
        let (Ok(State::Found(e)), p) = (e, p) else {
            return Ok(Resolution::Unknown);
        };
        let Value::Endpoints(endpoints) = &e.value else {
            return Ok(Resolution::Unknown);
        };
        self.apply_endpoints(&e.version, &endpoints.endpoints);
        let policy = match p {
            Ok(State::Found(held)) => match &held.value {
                // A client-side fault whose TTL lapsed (a dead controller) no longer applies.
                // The copy without it is kept, so the stack built on it lives on.
                Value::ClientPolicy(p) if p.has_faults() && !held.fresh() => {
                    let mut stale = self.stale.lock().expect("logical lock poisoned");
                    match stale.as_ref() {
                        Some((of, copy)) if Arc::ptr_eq(of, p) => Some(copy.clone()),
                        _ => {
                            let copy = Arc::new(p.without_faults());
                            *stale = Some((p.clone(), copy.clone()));
                            Some(copy)
                        }
                    }
                }
                Value::ClientPolicy(p) => Some(p.clone()),
                _ => None,
            },
            _ => None,
        };
        Ok(Resolution::Service {
            endpoints: endpoints.clone(),
            policy,
        })
    }
}
