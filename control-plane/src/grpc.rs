//! The Discovery gRPC server: one bidirectional stream per proxy, all resource types, delta
//! updates, nonce-based ACK/NACK (API.md 2.b "Stream semantics").
//!
//! Each stream is served by one task that owns the stream's subscriptions and what it last sent
//! for each name. It wakes on requests from the proxy and when a new index snapshot changed one
//! of the names it watches (the index's [`Interest`]), and sends only resources whose version
//! changed, `removed` for names that stopped existing, and `not_found` for names that never did.
//!
//! When the controller is the mesh's CA, Discovery is served over mTLS: a stream needs the
//! proxy's mesh certificate, and the node it announces must be that certificate's workload
//! (namespace and service account, and the identity it registers for its inbound port), else
//! PERMISSION_DENIED: a process cannot claim another workload's place (API.md 2.b).

use std::collections::{BTreeMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferrymesh_proto::discovery::v1 as pb;
use futures::Stream;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::index::{IndexHandle, Interest, Lookup, Snapshot};
use crate::metrics::Metrics;

/// At most this many names on one stream (RESOURCE_EXHAUSTED beyond).
pub const MAX_SUBSCRIPTIONS: usize = 10_000;

/// The Discovery service.
#[derive(Clone, Debug)]
pub struct DiscoveryService {
    index: IndexHandle,
    metrics: Arc<Metrics>,
    next_stream: Arc<AtomicU64>,
    shutdown: watch::Receiver<bool>,
    /// Set (the trust domain) when streams must come with a mesh certificate.
    mtls: Option<String>,
    /// Until this turns true (the sources synced, registrations had their grace), an endpoint
    /// set a reconnecting proxy already holds is not replaced: the workloads behind it may not
    /// be known again yet, and an empty set would fail every call (503 no-endpoints).
    released: watch::Receiver<bool>,
}

impl DiscoveryService {
    /// A service over `index`; streams end when `shutdown` turns true.
    pub fn new(index: IndexHandle, metrics: Arc<Metrics>, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            index,
            metrics,
            next_stream: Arc::new(AtomicU64::new(1)),
            shutdown,
            mtls: None,
            released: watch::channel(true).1,
        }
    }

    /// Until `released` turns true, endpoint sets that reconnecting proxies hold (their
    /// `initial_versions`) are kept as they are; then they are brought up to date.
    #[must_use]
    pub fn hold_endpoints_until(mut self, released: watch::Receiver<bool>) -> Self {
        self.released = released;
        self
    }

    /// Streams must present a certificate of `trust_domain` naming the node they announce
    /// (serve it with TLS and the CA as client root).
    #[must_use]
    pub fn require_mtls(mut self, trust_domain: &str) -> Self {
        self.mtls = Some(trust_domain.to_owned());
        self
    }

    /// Over mTLS: the trust domain and the SPIFFE id of the caller's certificate
    /// (UNAUTHENTICATED without one); `None` when Discovery is plaintext.
    fn peer<T>(&self, request: &Request<T>) -> Result<Option<(String, String)>, Status> {
        let Some(trust_domain) = &self.mtls else {
            return Ok(None);
        };
        let id = request
            .peer_certs()
            .and_then(|chain| Some(ferrymesh_proto::spiffe_ids(chain.first()?)))
            .and_then(|ids| ids.into_iter().next())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "Discovery needs the proxy's mesh certificate (mTLS); certify first",
                )
            })?;
        Ok(Some((trust_domain.clone(), id)))
    }

    /// As a tonic service.
    pub fn into_server(self) -> pb::discovery_server::DiscoveryServer<Self> {
        pb::discovery_server::DiscoveryServer::new(self)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::discovery_server::Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn stream(
        &self,
        request: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = self.peer(&request)?;
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(16);
        let stream = StreamTask {
            id,
            index: self.index.clone(),
            metrics: self.metrics.clone(),
            tx,
            subs: BTreeMap::new(),
            nacked: HashSet::new(),
            nonce: 0,
            opened: false,
            node: None,
            with_ttl: BTreeMap::new(),
            peer,
            reported_ready: false,
            inbound_sent: false,
            released: self.released.clone(),
            held: HashSet::new(),
            wake: Arc::new(Notify::new()),
            interest: self.index.interest.clone(),
        };
        // NOTE: the task ends when the proxy hangs up, when the response channel closes, or on
        // shutdown; it never outlives the server.
        tokio::spawn(stream.run(request.into_inner(), self.shutdown.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        self.peer(&request)?;
        let req = request.into_inner();
        let ty = resource_type(req.r#type)?;
        let snapshot = self.index.snapshot();
        let mut response = pb::FetchResponse::default();
        for name in req.names {
            match snapshot.lookup(ty, &name, None) {
                Lookup::Found(r) => response.resources.push(*r),
                Lookup::NotFound => response.not_found.push(name),
                Lookup::Invalid(e) => return Err(Status::invalid_argument(e)),
            }
        }
        Ok(Response::new(response))
    }
}

/// The node a certificate `id` may announce: its own namespace and service account, and no
/// other identity for its inbound port.
fn check_node(trust_domain: &str, id: &str, node: &pb::Node) -> Result<(), Status> {
    let claimed = format!(
        "spiffe://{trust_domain}/ns/{}/sa/{}",
        node.namespace, node.service_account
    );
    if id != claimed {
        return Err(Status::permission_denied(format!(
            "the certificate names {id}; the node announces {claimed}"
        )));
    }
    if let Some(w) = &node.local_workload
        && !w.identity.is_empty()
        && w.identity != id
    {
        return Err(Status::permission_denied(format!(
            "the certificate names {id}; the workload registers {}",
            w.identity
        )));
    }
    Ok(())
}

fn resource_type(raw: i32) -> Result<pb::ResourceType, Status> {
    match pb::ResourceType::try_from(raw) {
        Ok(pb::ResourceType::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
            "unknown resource type {raw}"
        ))),
        Ok(t) => Ok(t),
    }
}

/// What a stream last sent for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    Nothing,
    Version(String),
    NotFound,
}

struct StreamTask {
    id: u64,
    index: IndexHandle,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<Result<pb::DiscoveryResponse, Status>>,
    /// type -> name -> what was sent.
    subs: BTreeMap<pb::ResourceType, BTreeMap<String, Sent>>,
    /// (name, version) pairs the proxy rejected: never sent again.
    nacked: HashSet<(String, String)>,
    nonce: u64,
    opened: bool,
    /// The proxy's node (its workload selects inbound faults).
    node: Option<pb::Node>,
    /// Names whose last resource had a TTL: re-sent before it lapses (heartbeat).
    with_ttl: BTreeMap<pb::ResourceType, HashSet<String>>,
    /// Over mTLS: (trust domain, the SPIFFE id of the proxy's certificate).
    peer: Option<(String, String)>,
    /// The local workload's readiness as its proxy reports it. It becomes an endpoint only
    /// once this stream was sent its INBOUND_POLICY, so no caller reaches it before its
    /// proxy holds the port's mTLS mode and authorization.
    reported_ready: bool,
    inbound_sent: bool,
    /// See [`DiscoveryService::hold_endpoints_until`].
    released: watch::Receiver<bool>,
    /// ENDPOINTS names this proxy held when it subscribed within the hold: not replaced
    /// until it ends.
    held: HashSet<String>,
    /// Woken when a resource this stream watches changed.
    wake: Arc<Notify>,
    interest: Arc<Interest>,
}

impl StreamTask {
    async fn run(
        mut self,
        mut requests: Streaming<pb::DiscoveryRequest>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let snapshots = self.index.subscribe();
        self.metrics.streams.inc();
        // NOTE: resources with a TTL (faults) are re-sent at a third of it, so a proxy keeps
        // them only while the controller is alive.
        let beat = (self.index.snapshot().fault_ttl / 3).max(std::time::Duration::from_millis(100));
        let mut heartbeat = tokio::time::interval(beat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut released_signal = self.released.clone();
        let mut released = *released_signal.borrow();
        loop {
            tokio::select! {
                ok = async { released_signal.wait_for(|r| *r).await.is_ok() }, if !released => {
                    released = true;
                    if ok && !self.held.is_empty() {
                        self.held.clear();
                        let snapshot = snapshots.borrow().clone();
                        if !self.push(pb::ResourceType::Endpoints, None, &snapshot, false).await {
                            break;
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    let snapshot = snapshots.borrow().clone();
                    let due: Vec<(pb::ResourceType, Vec<String>)> =
                        self.with_ttl.iter().map(|(ty, names)| (*ty, names.iter().cloned().collect())).collect();
                    for (ty, names) in due {
                        if let Some(subs) = self.subs.get_mut(&ty) {
                            for n in &names {
                                if let Some(sent) = subs.get_mut(n) {
                                    *sent = Sent::Nothing;
                                }
                            }
                        }
                        if !names.is_empty() && !self.push(ty, Some(&names), &snapshot, false).await {
                            break;
                        }
                    }
                }
                message = requests.message() => match message {
                    Ok(Some(req)) => {
                        if let Err(status) = self.handle(req, &snapshots).await {
                            let _ = self.tx.send(Err(status)).await;
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(stream = self.id, error = %e, "discovery stream failed");
                        // The stream ends with the error, never with OK: an oversized message
                        // is RESOURCE_EXHAUSTED (the gRPC spec's code; tonic says OUT_OF_RANGE).
                        let status = if e.code() == tonic::Code::OutOfRange {
                            Status::resource_exhausted(e.message().to_owned())
                        } else {
                            e
                        };
                        let _ = self.tx.send(Err(status)).await;
                        break;
                    }
                },
                () = self.wake.notified() => {
                    let snapshot = snapshots.borrow().clone();
                    let types: Vec<_> = self.subs.keys().copied().collect();
                    for ty in types {
                        if !self.push(ty, None, &snapshot, false).await { break }
                    }
                }
                () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
                    let _ = self.tx.send(Err(Status::unavailable("controller shutting down"))).await;
                    break;
                }
                () = self.tx.closed() => break,
            }
        }
        self.metrics.streams.dec();
        for (ty, names) in &self.subs {
            for name in names.keys() {
                self.interest.remove(*ty, name, self.id);
            }
        }
        if self.opened {
            self.index.stream_closed(self.id);
        }
    }

    async fn handle(
        &mut self,
        req: pb::DiscoveryRequest,
        snapshots: &watch::Receiver<Arc<Snapshot>>,
    ) -> Result<(), Status> {
        if !self.opened {
            let node = req
                .node
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("the first request must carry node"))?;
            if let Some((trust_domain, id)) = &self.peer {
                check_node(trust_domain, id, node)?;
            }
            tracing::info!(stream = self.id, workload = %node.workload, "proxy connected");
            let mut registered = node.clone();
            if let Some(w) = registered.local_workload.as_mut() {
                self.reported_ready = w.ready;
                w.ready = false;
            }
            self.index.stream_opened(self.id, &registered);
            self.node = Some(node.clone());
            self.opened = true;
        }
        if let Some(status) = req.workload_status {
            self.reported_ready = status.ready;
            if self.inbound_sent {
                self.index.workload_ready(self.id, status.ready);
            }
        }
        if req.r#type == 0
            && req.subscribe.is_empty()
            && req.unsubscribe.is_empty()
            && req.response_nonce.is_empty()
        {
            return Ok(()); // a node or status message only
        }
        let ty = resource_type(req.r#type)?;
        if !req.response_nonce.is_empty()
            && let Some(error) = &req.error_detail
        {
            self.metrics.nack(ty);
            for r in &req.rejected {
                tracing::warn!(stream = self.id, name = %r.name, version = %r.version, reason = %r.reason, "proxy rejected a resource");
                self.nacked.insert((r.name.clone(), r.version.clone()));
            }
            tracing::warn!(stream = self.id, nonce = %req.response_nonce, error = %error.message, "NACK");
        }
        let subs = self.subs.entry(ty).or_default();
        for name in &req.unsubscribe {
            if subs.remove(name).is_some() {
                self.interest.remove(ty, name, self.id);
            }
        }
        if subs.len() + req.subscribe.len() > MAX_SUBSCRIPTIONS {
            return Err(Status::resource_exhausted(format!(
                "more than {MAX_SUBSCRIPTIONS} subscriptions on one stream"
            )));
        }
        if req.subscribe.is_empty() {
            return Ok(());
        }
        let holding = ty == pb::ResourceType::Endpoints && !*self.released.borrow();
        for name in &req.subscribe {
            let sent = req
                .initial_versions
                .get(name)
                .map_or(Sent::Nothing, |v| Sent::Version(v.clone()));
            if holding && matches!(sent, Sent::Version(_)) {
                self.held.insert(name.clone());
            }
            if subs.insert(name.clone(), sent).is_none() {
                self.interest.add(ty, name, self.id, &self.wake);
            }
        }
        // NOTE: the snapshot is read after the interest is registered: a rebuild in between
        // wakes this stream, so no change is missed.
        let snapshot = snapshots.borrow().clone();
        // NOTE: every subscribe is answered, even when nothing changed (the proxy's cached
        // versions are current): the answer is the proxy's "synced" signal.
        self.push(ty, Some(&req.subscribe), &snapshot, true).await;
        Ok(())
    }

    /// Sends what changed for `names` (all subscribed names when `None`). Returns false when
    /// the proxy is gone.
    async fn push(
        &mut self,
        ty: pb::ResourceType,
        names: Option<&[String]>,
        snapshot: &Snapshot,
        always: bool,
    ) -> bool {
        let mut response = pb::DiscoveryResponse {
            r#type: ty.into(),
            ..Default::default()
        };
        let Some(subs) = self.subs.get_mut(&ty) else {
            return true;
        };
        let all: Vec<String>;
        let names = if let Some(n) = names {
            n
        } else {
            all = subs.keys().cloned().collect();
            &all
        };
        for name in names {
            let Some(sent) = subs.get_mut(name) else {
                continue;
            };
            if ty == pb::ResourceType::Endpoints && self.held.contains(name) {
                continue;
            }
            // The version first: an unchanged resource is not copied to be compared.
            if let (Sent::Version(v), Some(current)) = (&*sent, snapshot.version(ty, name))
                && v == current
            {
                continue;
            }
            match snapshot.lookup(ty, name, self.node.as_ref()) {
                Lookup::Found(r) => {
                    let ttl_names = self.with_ttl.entry(ty).or_default();
                    if r.ttl.is_some() {
                        ttl_names.insert(name.clone());
                    } else {
                        ttl_names.remove(name);
                    }
                    if *sent != Sent::Version(r.version.clone())
                        && !self.nacked.contains(&(name.clone(), r.version.clone()))
                    {
                        *sent = Sent::Version(r.version.clone());
                        response.resources.push(*r);
                    }
                }
                Lookup::NotFound | Lookup::Invalid(_) => match sent {
                    Sent::Version(_) => {
                        *sent = Sent::NotFound;
                        response.removed.push(name.clone());
                    }
                    Sent::Nothing => {
                        *sent = Sent::NotFound;
                        response.not_found.push(name.clone());
                    }
                    Sent::NotFound => {}
                },
            }
        }
        if !always
            && response.resources.is_empty()
            && response.removed.is_empty()
            && response.not_found.is_empty()
        {
            return true;
        }
        self.nonce += 1;
        response.nonce = format!("{}-{}", self.id, self.nonce);
        response.system_version = snapshot.generation.to_string();
        self.metrics.push(ty);
        let sent = self.tx.send(Ok(response)).await.is_ok();
        if sent && ty == pb::ResourceType::InboundPolicy && !self.inbound_sent {
            self.inbound_sent = true;
            if self.reported_ready {
                self.index.workload_ready(self.id, true);
            }
        }
        sent
    }
}
