//! The index: every object the sources delivered plus the workloads registered on Discovery
//! streams, and the [`Snapshot`] of resources derived from them. One mutex guards the inputs;
//! each change rebuilds the snapshot and publishes it on a watch channel, so Discovery streams
//! see a consistent view and push only what changed.
//!
//! At scale (10,000 proxies) two rules keep the cost of a change proportional to what it
//! touches: a stream that registers no workload changes no resource, so opening or closing it
//! rebuilds nothing; and a rebuild wakes only the streams subscribed to a name whose resource
//! changed ([`Interest`]), not every stream. (Registrations of local-mode workloads still
//! rebuild once each: a local mesh has tens of them, not thousands.)

mod faults;
mod routes;
mod translate;

pub use translate::trust_bundle;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferrymesh_proto::discovery::v1 as pb;
use tokio::sync::{Notify, watch};

pub use crate::model::ServiceKey;
use crate::model::{Object, ObjectKey, ParseError, Parsed};
pub use translate::{Lookup, ResourceKey};

/// A workload registered by a local-mode proxy on its Discovery stream.
#[derive(Clone, Debug)]
pub struct Registered {
    /// The stream that registered it; the registration ends with the stream.
    pub stream: u64,
    /// What the proxy announced.
    pub node: pb::Node,
    /// Current readiness, from the announcement and later `workload_status` messages.
    pub ready: bool,
}

#[derive(Debug, Default)]
struct FileState {
    /// The last good objects of the file.
    objects: Vec<Object>,
    /// The error of the last reload, when it was rejected (the objects above stay).
    error: Option<ParseError>,
    warnings: Vec<String>,
}

/// Everything the controller knows, and the snapshot derived from it.
#[derive(Debug, Default)]
struct Index {
    files: BTreeMap<PathBuf, FileState>,
    workloads: BTreeMap<u64, Registered>,
    generation: u64,
    /// When each FaultInjection was first seen (its start; files carry no creationTimestamp).
    first_seen: BTreeMap<ObjectKey, std::time::SystemTime>,
    /// TTL of resources that carry faults.
    fault_ttl: std::time::Duration,
    default_inbound: i32,
    trust_bundle: Option<Arc<pb::Resource>>,
    telemetry: Option<Arc<pb::Resource>>,
    /// The SPIFFE trust domain of Pod identities (`cluster.local` until set).
    trust_domain: Option<String>,
}

/// A consistent view of every resource, rebuilt on every change.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases with every rebuild (debugging only).
    pub generation: u64,
    /// Every resource, by type and key.
    pub resources: translate::Resources,
    /// Services (declared and implicit) with their ports.
    pub services: BTreeMap<ServiceKey, translate::ServiceInfo>,
    /// Registered local workloads.
    pub workloads: Vec<Registered>,
    /// Files whose last reload was rejected.
    pub file_errors: Vec<ParseError>,
    /// Documents skipped or objects ignored.
    pub warnings: Vec<String>,
    /// FaultInjections in force.
    pub faults: Vec<faults::ActiveFault>,
    /// When the next fault ends (the snapshot is rebuilt then).
    pub next_expiry: Option<std::time::SystemTime>,
    /// TTL of resources that carry faults.
    pub fault_ttl: std::time::Duration,
    /// mTLS modes set by AuthenticationPolicies.
    pub mtls: Vec<MtlsRule>,
    /// AuthorizationPolicies, by what they target.
    pub authz: Vec<AuthzEntry>,
    /// The cluster's default inbound policy (`DefaultPolicy`), for ports no Allow rule covers.
    pub default_inbound: i32,
    /// The trust anchors proxies must use (TRUST_BUNDLE), when the mesh has identities.
    pub trust_bundle: Option<Arc<pb::Resource>>,
    /// Where proxies export spans (TELEMETRY).
    pub telemetry: Option<Arc<pb::Resource>>,
}

/// An AuthorizationPolicy's rules for a Namespace or a Service.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthzEntry {
    /// Namespace.
    pub namespace: String,
    /// The Service; `None`: every workload of the namespace.
    pub service: Option<String>,
    /// A Deny policy (else Allow).
    pub deny: bool,
    /// Its rules, each naming its source.
    pub rules: Vec<ferrymesh_proto::config::v1::AuthzRule>,
}

impl AuthzEntry {
    /// The (deny, allow) rules for workloads of `namespace/service`: every policy that
    /// targets them is evaluated (no merge).
    pub fn rules_for(
        entries: &[AuthzEntry],
        namespace: &str,
        service: &str,
    ) -> (
        Vec<ferrymesh_proto::config::v1::AuthzRule>,
        Vec<ferrymesh_proto::config::v1::AuthzRule>,
    ) {
        let (mut deny, mut allow) = (Vec::new(), Vec::new());
        for e in entries.iter().filter(|e| {
            e.namespace == namespace && e.service.as_deref().is_none_or(|s| s == service)
        }) {
            let list = if e.deny { &mut deny } else { &mut allow };
            list.extend(e.rules.iter().cloned());
        }
        (deny, allow)
    }
}

/// An AuthenticationPolicy's `mtls.mode` for a Namespace or a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsRule {
    /// Namespace.
    pub namespace: String,
    /// The Service; `None`: the whole namespace.
    pub service: Option<String>,
    /// Strict (else Permissive).
    pub strict: bool,
    /// The policy's name (ties: the first by name wins).
    pub policy: String,
}

impl MtlsRule {
    /// The mode for workloads of `namespace/service`: the most specific rule, Permissive when
    /// none applies (the course default).
    pub fn mode_for(rules: &[MtlsRule], namespace: &str, service: &str) -> bool {
        rules
            .iter()
            .filter(|r| {
                r.namespace == namespace && r.service.as_deref().is_none_or(|s| s == service)
            })
            .min_by(|a, b| {
                b.service
                    .is_some()
                    .cmp(&a.service.is_some())
                    .then_with(|| a.policy.cmp(&b.policy))
            })
            .is_some_and(|r| r.strict)
    }
}

impl Snapshot {
    /// Looks a resource up by the name a proxy subscribed with; `node` (the subscriber)
    /// selects the faults of an inbound policy.
    pub fn lookup(&self, ty: pb::ResourceType, name: &str, node: Option<&pb::Node>) -> Lookup {
        translate::lookup(self, ty, name, node)
    }

    /// Whether every input of INBOUND_POLICY (the base, faults, mTLS modes, authorization,
    /// the default) is the same in both snapshots: then no subscriber's answer changed.
    pub fn inbound_inputs_eq(&self, other: &Snapshot) -> bool {
        self.resources.inbound.as_ref().map(|r| &r.version)
            == other.resources.inbound.as_ref().map(|r| &r.version)
            && self.faults == other.faults
            && self.mtls == other.mtls
            && self.authz == other.authz
            && self.default_inbound == other.default_inbound
    }

    /// The version of the answer to `(ty, name)` without copying it, for types whose answer
    /// does not depend on the subscriber (all but INBOUND_POLICY, which gives `None`).
    pub fn version(&self, ty: pb::ResourceType, name: &str) -> Option<&str> {
        translate::version(self, ty, name)
    }

    /// Whether the answer to `(ty, name)` may differ between the two snapshots.
    fn changed(&self, other: &Snapshot, ty: pb::ResourceType, name: &str) -> bool {
        match ty {
            pb::ResourceType::InboundPolicy => !self.inbound_inputs_eq(other),
            _ => translate::version(self, ty, name) != translate::version(other, ty, name),
        }
    }
}

/// The streams watching one name, by stream id.
type Watchers = HashMap<u64, Arc<Notify>>;

/// Which streams are subscribed to which names, so that a rebuild wakes only those whose
/// resources changed. Each stream has one [`Notify`]; a wake-up with nobody waiting is kept,
/// so a change between a stream's subscribing and its next wait is never lost.
#[derive(Debug, Default)]
pub struct Interest {
    by_name: Mutex<HashMap<(pb::ResourceType, String), Watchers>>,
}

impl Interest {
    /// Stream `stream` watches `(ty, name)`.
    pub fn add(&self, ty: pb::ResourceType, name: &str, stream: u64, wake: &Arc<Notify>) {
        let mut by_name = self.by_name.lock().expect("interest lock poisoned");
        by_name
            .entry((ty, name.to_owned()))
            .or_default()
            .insert(stream, wake.clone());
    }

    /// Stream `stream` no longer watches `(ty, name)`.
    pub fn remove(&self, ty: pb::ResourceType, name: &str, stream: u64) {
        let mut by_name = self.by_name.lock().expect("interest lock poisoned");
        let key = (ty, name.to_owned());
        if let Some(streams) = by_name.get_mut(&key) {
            streams.remove(&stream);
            if streams.is_empty() {
                by_name.remove(&key);
            }
        }
    }

    /// Names watched by at least one stream.
    pub fn names(&self) -> usize {
        self.by_name.lock().expect("interest lock poisoned").len()
    }

    /// Wakes the streams of every name whose answer changed from `old` to `new`.
    fn wake(&self, old: &Snapshot, new: &Snapshot) {
        let by_name = self.by_name.lock().expect("interest lock poisoned");
        let inbound_changed = !old.inbound_inputs_eq(new);
        for ((ty, name), streams) in by_name.iter() {
            let changed = if *ty == pb::ResourceType::InboundPolicy {
                inbound_changed
            } else {
                old.changed(new, *ty, name)
            };
            if changed {
                for wake in streams.values() {
                    wake.notify_one();
                }
            }
        }
    }
}

/// A cloneable handle on the index, shared by the sources and the Discovery server.
#[derive(Clone, Debug)]
pub struct IndexHandle {
    inner: Arc<Mutex<Index>>,
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
    /// Streams connected now, registered or not: stream id -> node (not part of any
    /// resource, so kept out of the snapshot).
    streams: Arc<Mutex<BTreeMap<u64, pb::Node>>>,
    /// Who watches what.
    pub interest: Arc<Interest>,
}

impl Default for IndexHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl IndexHandle {
    /// An empty index.
    pub fn new() -> Self {
        Self::with_fault_ttl(std::time::Duration::from_mins(1))
    }

    /// An empty index whose fault-carrying resources get `fault_ttl` (60s by default).
    pub fn with_fault_ttl(fault_ttl: std::time::Duration) -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        let index = Index {
            fault_ttl,
            ..Index::default()
        };
        Self {
            inner: Arc::new(Mutex::new(index)),
            tx: Arc::new(tx),
            streams: Arc::default(),
            interest: Arc::default(),
        }
    }

    /// The streams connected now: id -> the node each announced.
    pub fn streams(&self) -> BTreeMap<u64, pb::Node> {
        self.streams.lock().expect("streams lock poisoned").clone()
    }

    /// Rebuilds when a fault has ended since the last build (called every second).
    pub fn expire_faults(&self) {
        let due = self
            .tx
            .borrow()
            .next_expiry
            .is_some_and(|t| t <= std::time::SystemTime::now());
        if due {
            self.update(|_| {});
        }
    }

    /// Snapshots, latest first: the receiver is marked changed on every rebuild.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    fn update(&self, f: impl FnOnce(&mut Index)) {
        let mut index = self
            .inner
            .lock()
            .expect("index lock poisoned: a panic while updating");
        f(&mut index);
        self.publish(&mut index);
    }

    /// Rebuilds from `index` (locked by the caller), publishes, and wakes the streams whose
    /// names changed.
    fn publish(&self, index: &mut Index) {
        index.generation += 1;
        let snapshot = Arc::new(index.build());
        let old = self.tx.send_replace(snapshot.clone());
        self.interest.wake(&old, &snapshot);
    }

    /// Sets the cluster's default inbound policy (`ferrymesh.config.v1.DefaultPolicy`).
    pub fn set_default_inbound(&self, policy: ferrymesh_proto::config::v1::DefaultPolicy) {
        self.update(|index| index.default_inbound = policy.into());
    }

    /// Serves `bundle` as TRUST_BUNDLE `*` (a no-op when its version did not change).
    pub fn set_trust_bundle(&self, bundle: pb::Resource) {
        let unchanged = self
            .snapshot()
            .trust_bundle
            .as_ref()
            .is_some_and(|b| b.version == bundle.version);
        if !unchanged {
            self.update(|index| index.trust_bundle = Some(Arc::new(bundle)));
        }
    }

    /// Serves TELEMETRY `*`: the OTLP collector (empty: no export) and the sampling ratio.
    pub fn set_telemetry(&self, otlp_endpoint: &str, sampling: f64) {
        let r = translate::telemetry(otlp_endpoint, sampling);
        self.update(|index| index.telemetry = Some(Arc::new(r)));
    }

    /// The trust domain Pod identities are issued in (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    pub fn set_trust_domain(&self, trust_domain: &str) {
        self.update(|index| index.trust_domain = Some(trust_domain.to_owned()));
    }

    /// Replaces every object whose path starts with `prefix` by `entries`, in one rebuild: a
    /// source's full relist (after a restart or a 410 Gone) neither loses nor duplicates.
    pub fn replace_prefix(
        &self,
        prefix: &Path,
        entries: Vec<(PathBuf, Result<Parsed, ParseError>)>,
    ) {
        self.update(|index| {
            index.files.retain(|path, _| !path.starts_with(prefix));
            for (path, result) in entries {
                let state = index.files.entry(path).or_default();
                match result {
                    Ok(parsed) => {
                        state.objects = parsed.objects;
                        state.warnings = parsed.warnings;
                        state.error = None;
                    }
                    Err(e) => state.error = Some(e),
                }
            }
        });
    }

    /// Applies a file's reload: all of it, or (on error) none of it, keeping its last good objects.
    pub fn apply_file(&self, path: &Path, result: Result<Parsed, ParseError>) {
        self.update(|index| {
            let state = index.files.entry(path.to_owned()).or_default();
            match result {
                Ok(parsed) => {
                    state.objects = parsed.objects;
                    state.warnings = parsed.warnings;
                    state.error = None;
                }
                Err(e) => state.error = Some(e),
            }
        });
    }

    /// Forgets a deleted file and its objects.
    pub fn remove_file(&self, path: &Path) {
        self.update(|index| {
            index.files.remove(path);
        });
    }

    /// A Discovery stream opened with this node; registers its local workload, if any.
    pub fn stream_opened(&self, stream: u64, node: &pb::Node) {
        self.streams
            .lock()
            .expect("streams lock poisoned")
            .insert(stream, node.clone());
        // A stream without a workload changes no resource: nothing to rebuild.
        if node.local_workload.is_none() {
            return;
        }
        self.update(|index| {
            if let Some(local) = &node.local_workload {
                index.workloads.insert(
                    stream,
                    Registered {
                        stream,
                        node: node.clone(),
                        ready: local.ready,
                    },
                );
            }
        });
    }

    /// The local workload of a stream changed readiness.
    pub fn workload_ready(&self, stream: u64, ready: bool) {
        self.update(|index| {
            if let Some(w) = index.workloads.get_mut(&stream) {
                w.ready = ready;
            }
        });
    }

    /// A stream ended: its workload leaves the endpoint sets at once.
    pub fn stream_closed(&self, stream: u64) {
        let node = self
            .streams
            .lock()
            .expect("streams lock poisoned")
            .remove(&stream);
        if node.is_some_and(|n| n.local_workload.is_none()) {
            return;
        }
        self.update(|index| {
            index.workloads.remove(&stream);
        });
    }
}

impl Index {
    fn build(&mut self) -> Snapshot {
        let mut objects: BTreeMap<ObjectKey, &Object> = BTreeMap::new();
        let mut warnings = Vec::new();
        let mut file_errors = Vec::new();
        for (path, state) in &self.files {
            warnings.extend(state.warnings.iter().cloned());
            if let Some(e) = &state.error {
                file_errors.push(e.clone());
            }
            for object in &state.objects {
                let key = object.key();
                if let Some(first) = objects.get(&key) {
                    warnings.push(format!(
                        "{}: {} {}/{}: ignored: already defined in {}",
                        path.display(),
                        key.kind,
                        key.namespace,
                        key.name,
                        first
                            .meta()
                            .file
                            .as_deref()
                            .unwrap_or(Path::new("?"))
                            .display()
                    ));
                    continue;
                }
                objects.insert(key, object);
            }
        }
        let now = std::time::SystemTime::now();
        let fault_keys: std::collections::BTreeSet<ObjectKey> = objects
            .iter()
            .filter(|(_, o)| matches!(o, Object::Policy(p) if p.fault.is_some()))
            .map(|(k, _)| k.clone())
            .collect();
        self.first_seen.retain(|k, _| fault_keys.contains(k));
        for k in fault_keys {
            self.first_seen.entry(k).or_insert(now);
        }
        let faults = faults::active(objects.values().copied(), &self.first_seen, now);
        let authz = authz_entries(&objects);
        let mtls = mtls_rules(&objects);
        let workloads: Vec<Registered> = self.workloads.values().cloned().collect();
        let (resources, services) = translate::build(
            objects.values().copied(),
            &workloads,
            &faults,
            self.fault_ttl,
            self.trust_domain.as_deref().unwrap_or("cluster.local"),
            &mut warnings,
        );
        Snapshot {
            generation: self.generation,
            resources,
            services,
            workloads,
            file_errors,
            warnings,
            next_expiry: faults.iter().map(|f| f.expires_at).min(),
            faults,
            fault_ttl: self.fault_ttl,
            mtls,
            authz,
            default_inbound: self.default_inbound,
            trust_bundle: self.trust_bundle.clone(),
            telemetry: self.telemetry.clone(),
        }
    }
}

fn authz_entries(objects: &BTreeMap<ObjectKey, &Object>) -> Vec<AuthzEntry> {
    objects
        .values()
        .filter_map(|o| match o {
            Object::Policy(p) => Some(p),
            _ => None,
        })
        .filter_map(|p| Some((p, p.authorization.as_ref()?)))
        .flat_map(|(p, a)| {
            let source = translate::object_ref(&p.group, &p.kind, &p.meta, "");
            p.target_refs.iter().map(move |t| AuthzEntry {
                namespace: p.meta.namespace.clone(),
                service: (t.kind == "Service").then(|| t.name.clone()),
                deny: a.deny,
                rules: a
                    .rules
                    .iter()
                    .cloned()
                    .map(|mut r| {
                        r.source = Some(source.clone());
                        r
                    })
                    .collect(),
            })
        })
        .collect()
}

fn mtls_rules(objects: &BTreeMap<ObjectKey, &Object>) -> Vec<MtlsRule> {
    objects
        .values()
        .filter_map(|o| match o {
            Object::Policy(p) => Some(p),
            _ => None,
        })
        .filter_map(|p| Some((p, p.mtls_strict?)))
        .flat_map(|(p, strict)| {
            p.target_refs.iter().map(move |t| MtlsRule {
                namespace: p.meta.namespace.clone(),
                service: (t.kind == "Service").then(|| t.name.clone()),
                strict,
                policy: p.meta.name.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
