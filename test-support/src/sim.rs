//! Simulated proxies: many real Discovery streams from one process, each subscribing as a
//! sidecar does (its node, INBOUND_POLICY `*`, TRUST_BUNDLE and TELEMETRY `*`, then ENDPOINTS
//! and CLIENT_POLICY of the services it calls), acknowledging every response. Used by the
//! control plane's scale test and by `make bench` to measure what the controller does with
//! thousands of proxies: connecting, staying connected, and how fast an edit reaches them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymesh_proto::discovery::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

/// The shape of the simulated fleet.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// Proxies (one connection and one stream each).
    pub proxies: usize,
    /// Each proxy calls this many services, chosen round-robin from `services`.
    pub calls: usize,
    /// The services' discovery names (`name.ns.svc.cluster.local:port`).
    pub services: Vec<String>,
    /// Streams opened at once (the rest wait for a slot): a connect storm, bounded.
    pub connect_concurrency: usize,
}

/// What a fleet saw, shared with its streams.
#[derive(Debug, Default)]
pub struct Seen {
    /// Streams that got their first answer for every subscription.
    pub synced: AtomicUsize,
    /// Streams that ended before being stopped (errors, resets, keep-alive timeouts).
    pub dropped: AtomicUsize,
    /// Why streams ended, by message.
    pub errors: Mutex<HashMap<String, usize>>,
    /// When each stream first saw a CLIENT_POLICY version containing the marker set by
    /// [`Fleet::watch_for`]: stream index -> time.
    arrivals: Mutex<Vec<Instant>>,
    marker: Mutex<Option<String>>,
    stop: AtomicBool,
}

impl Seen {
    /// Starts recording when each stream first receives a CLIENT_POLICY whose content
    /// (debug form) contains `marker`.
    pub fn watch_for(&self, marker: &str) {
        self.arrivals.lock().expect("arrivals lock").clear();
        *self.marker.lock().expect("marker lock") = Some(marker.to_owned());
    }

    /// The arrival times recorded since [`Seen::watch_for`].
    pub fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().expect("arrivals lock").clone()
    }

    fn record(&self, response: &pb::DiscoveryResponse) {
        let marker = self.marker.lock().expect("marker lock").clone();
        let Some(marker) = marker else { return };
        if response.r#type == i32::from(pb::ResourceType::ClientPolicy)
            && response
                .resources
                .iter()
                .any(|r| format!("{:?}", r.body).contains(&marker))
        {
            self.arrivals
                .lock()
                .expect("arrivals lock")
                .push(Instant::now());
        }
    }

    fn ended(&self, why: String) {
        if self.stop.load(Ordering::Acquire) {
            return;
        }
        self.dropped.fetch_add(1, Ordering::AcqRel);
        *self
            .errors
            .lock()
            .expect("errors lock")
            .entry(why)
            .or_default() += 1;
    }
}

/// A running fleet; its streams end when it is dropped.
#[derive(Debug)]
pub struct Running {
    /// What the streams saw.
    pub seen: Arc<Seen>,
    tasks: tokio::task::JoinSet<()>,
}

impl Running {
    /// Ends every stream (not counted as dropped).
    pub async fn stop(mut self) {
        self.seen.stop.store(true, Ordering::Release);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Fleet {
    /// Opens every stream against the controller's Discovery address (plaintext) and returns
    /// at once; [`Seen::synced`] counts those that are up.
    pub fn start(&self, discovery: SocketAddr) -> Running {
        let seen = Arc::new(Seen::default());
        let slots = Arc::new(tokio::sync::Semaphore::new(self.connect_concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..self.proxies {
            let calls: Vec<String> = (0..self.calls)
                .filter_map(|c| {
                    let n = self.services.len();
                    (n > 0).then(|| self.services[(i + c) % n].clone())
                })
                .collect();
            let (seen, slots) = (seen.clone(), slots.clone());
            tasks.spawn(async move {
                let permit = slots.acquire_owned().await;
                if let Err(e) = proxy(i, discovery, calls, &seen, permit.ok()).await {
                    seen.ended(e.to_string());
                }
            });
        }
        Running { seen, tasks }
    }
}

fn request(ty: pb::ResourceType, names: Vec<String>) -> pb::DiscoveryRequest {
    pb::DiscoveryRequest {
        r#type: ty.into(),
        subscribe: names,
        ..Default::default()
    }
}

/// One simulated proxy: connects, subscribes, acknowledges, until the stream ends.
async fn proxy(
    i: usize,
    discovery: SocketAddr,
    calls: Vec<String>,
    seen: &Seen,
    mut permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> anyhow::Result<()> {
    // As the proxy's own client: keep-alive pings every 10 s, 3 s to answer. Each proxy has
    // its own source address, as pods do (the controller caps connections per source).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{discovery}"))?
        .local_address(Some(source(i)))
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(3))
        .connect()
        .await?;
    let mut client = pb::discovery_client::DiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    let node = pb::Node {
        workload: format!("sim-{i}"),
        namespace: "sim".into(),
        service_account: "default".into(),
        ..Default::default()
    };
    tx.send(pb::DiscoveryRequest {
        node: Some(node),
        ..Default::default()
    })
    .await?;
    let mut pending = 3;
    tx.send(request(pb::ResourceType::InboundPolicy, vec!["*".into()]))
        .await?;
    tx.send(request(pb::ResourceType::TrustBundle, vec!["*".into()]))
        .await?;
    tx.send(request(pb::ResourceType::Telemetry, vec!["*".into()]))
        .await?;
    if !calls.is_empty() {
        pending += 2;
        tx.send(request(pb::ResourceType::Endpoints, calls.clone()))
            .await?;
        tx.send(request(pb::ResourceType::ClientPolicy, calls))
            .await?;
    }
    let mut responses = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    loop {
        let Some(response) = responses.message().await? else {
            anyhow::bail!("the controller ended the stream");
        };
        seen.record(&response);
        if pending > 0 {
            pending -= 1;
            if pending == 0 {
                seen.synced.fetch_add(1, Ordering::AcqRel);
                permit.take(); // the next proxy may connect
            }
        }
        tx.send(pb::DiscoveryRequest {
            r#type: response.r#type,
            response_nonce: response.nonce,
            ..Default::default()
        })
        .await?;
    }
}

/// The source address of proxy `i`: 250 proxies per address in 127.1.0.0/16 (loopback).
fn source(i: usize) -> std::net::IpAddr {
    let block = u8::try_from(i / 250 % 250).unwrap_or(0);
    let host = u8::try_from(i % 250 + 1).unwrap_or(1);
    std::net::IpAddr::from([127, 1, block, host])
}

/// Raises this process's open-file limit to its hard limit (a fleet holds a socket per
/// proxy); returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    }
}

/// The `q` quantile (0..=1) of `samples`.
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )] // an index into a short list
    let at = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[at.min(samples.len() - 1)]
}
