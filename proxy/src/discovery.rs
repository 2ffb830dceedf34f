//! The proxy's view of the control plane: a cache of every resource it subscribed to, each
//! behind a `watch` channel, filled by one Discovery stream ([`client`]). Subscriptions are
//! lazy: the first [`Discovery::watch`] of a name subscribes it. Nothing is ever dropped while
//! the controller is away: the last good value stays until a response replaces it.

pub mod client;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ferrymesh_proto::discovery::v1 as pb;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::policy::{ClientPolicy, Endpoints, InboundPolicy};

/// A converted resource body.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", content = "value")]
pub enum Value {
    /// ENDPOINTS.
    Endpoints(Arc<Endpoints>),
    /// CLIENT_POLICY.
    ClientPolicy(Arc<ClientPolicy>),
    /// INBOUND_POLICY.
    InboundPolicy(Arc<InboundPolicy>),
    /// TRUST_BUNDLE: the anchors (DER) peers' chains must end at.
    TrustBundle(#[serde(skip)] Arc<Vec<rustls::pki_types::CertificateDer<'static>>>),
    /// TELEMETRY: the OTLP collector (empty: off) and the sampling ratio of new traces.
    Telemetry {
        /// `otlpEndpoint`.
        endpoint: String,
        /// `sampling`.
        sampling: f64,
    },
}

/// An object a resource was built from.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    /// `Kind namespace/name`.
    pub object: String,
    /// Port name, rule name, ...
    #[serde(skip_serializing_if = "String::is_empty")]
    pub section: String,
    /// `metadata.generation`.
    pub generation: i64,
    /// Local mode: the file it came from.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub file: String,
}

/// A resource as held.
#[derive(Debug, Clone, Serialize)]
pub struct Held {
    /// The version the controller gave it (a content hash).
    pub version: String,
    /// The objects it was built from.
    pub sources: Vec<Source>,
    /// The converted body.
    #[serde(flatten)]
    pub value: Value,
    /// When it arrived (or was last refreshed).
    #[serde(skip)]
    pub received: tokio::time::Instant,
    /// Faults only: the resource lapses unless refreshed within this.
    #[serde(skip)]
    pub ttl: Option<std::time::Duration>,
}

impl Held {
    /// False once a TTL'd resource went unrefreshed for its TTL (a dead controller).
    pub fn fresh(&self) -> bool {
        self.ttl.is_none_or(|ttl| self.received.elapsed() < ttl)
    }
}

/// What is known of a subscribed name.
#[derive(Debug, Clone, Default)]
pub enum State {
    /// Subscribed, no answer yet.
    #[default]
    Pending,
    /// The controller sent it.
    Found(Arc<Held>),
    /// The controller said it does not exist (or removed it).
    NotFound,
}

impl State {
    /// True once the controller answered.
    pub fn is_known(&self) -> bool {
        !matches!(self, State::Pending)
    }
}

#[derive(Debug)]
enum Command {
    Subscribe(pb::ResourceType, String),
    Ready(bool),
}

/// A cloneable handle on the cache.
#[derive(Clone, Debug)]
pub struct Discovery {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    entries: Mutex<BTreeMap<(pb::ResourceType, String), watch::Sender<State>>>,
    commands: mpsc::UnboundedSender<Command>,
    synced: watch::Sender<bool>,
    connected: AtomicBool,
    ready: AtomicBool,
    address: String,
    updates: std::sync::OnceLock<crate::metrics::ConfigUpdates>,
}

/// The receiving half of the command channel, owned by the stream task.
#[derive(Debug)]
pub struct Commands(mpsc::UnboundedReceiver<Command>);

impl Discovery {
    /// A cache for the controller at `address`, plus the commands its stream task consumes.
    pub fn new(address: String) -> (Self, Commands) {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Inner {
            entries: Mutex::default(),
            commands: tx,
            synced: watch::Sender::new(false),
            connected: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            address,
            updates: std::sync::OnceLock::new(),
        };
        (
            Self {
                inner: Arc::new(inner),
            },
            Commands(rx),
        )
    }

    /// Counts every applied or rejected update into `updates` (the proxy's metrics).
    pub fn count_updates(&self, updates: crate::metrics::ConfigUpdates) {
        let _ = self.inner.updates.set(updates);
    }

    /// Counts one response of `ty`.
    pub(crate) fn counted(&self, ty: pb::ResourceType, applied: bool) {
        if let Some(u) = self.inner.updates.get() {
            u.get_or_create(&crate::metrics::ConfigLabels {
                r#type: ty.as_str_name().to_owned(),
                outcome: if applied { "applied" } else { "rejected" },
            })
            .inc();
        }
    }

    /// Watches a name, subscribing it on first use.
    pub fn watch(&self, ty: pb::ResourceType, name: &str) -> watch::Receiver<State> {
        let mut entries = self
            .inner
            .entries
            .lock()
            .expect("discovery cache lock poisoned");
        if let Some(tx) = entries.get(&(ty, name.to_owned())) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(State::Pending);
        entries.insert((ty, name.to_owned()), tx);
        let _ = self
            .inner
            .commands
            .send(Command::Subscribe(ty, name.to_owned()));
        rx
    }

    /// Reports the local workload's readiness to the controller (now, or on reconnect).
    pub fn set_ready(&self, ready: bool) {
        if self.inner.ready.swap(ready, Ordering::SeqCst) != ready {
            let _ = self.inner.commands.send(Command::Ready(ready));
        }
    }

    /// The readiness last reported.
    pub fn ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst)
    }

    /// True once the first inbound policy arrived (the proxy's first sync).
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.inner.synced.subscribe()
    }

    /// True while a Discovery stream is up.
    pub fn connected(&self) -> bool {
        self.inner.connected.load(Ordering::SeqCst)
    }

    /// Every held resource, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let entries = self
            .inner
            .entries
            .lock()
            .expect("discovery cache lock poisoned");
        let resources: Vec<serde_json::Value> = entries
            .iter()
            .map(|((ty, name), tx)| {
                let mut v = serde_json::json!({ "type": ty.as_str_name(), "name": name });
                match &*tx.borrow() {
                    State::Pending => v["state"] = "pending".into(),
                    State::NotFound => v["state"] = "not_found".into(),
                    State::Found(held) => {
                        v["state"] = "found".into();
                        v["version"] = held.version.clone().into();
                        v["sources"] = serde_json::to_value(&held.sources).unwrap_or_default();
                        v["value"] =
                            serde_json::to_value(&held.value).unwrap_or_default()["value"].take();
                    }
                }
                v
            })
            .collect();
        serde_json::json!({
            "controlPlane": { "address": self.inner.address, "connected": self.connected() },
            "resources": resources,
        })
    }

    /// Names per type with the versions held, for a (re)connect.
    fn subscriptions(&self) -> BTreeMap<pb::ResourceType, Vec<(String, Option<String>)>> {
        let entries = self
            .inner
            .entries
            .lock()
            .expect("discovery cache lock poisoned");
        let mut out: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for ((ty, name), tx) in entries.iter() {
            let version = match &*tx.borrow() {
                State::Found(h) => Some(h.version.clone()),
                _ => None,
            };
            out.entry(*ty).or_default().push((name.clone(), version));
        }
        out
    }

    fn set(&self, ty: pb::ResourceType, name: &str, state: State) {
        let entries = self
            .inner
            .entries
            .lock()
            .expect("discovery cache lock poisoned");
        if let Some(tx) = entries.get(&(ty, name.to_owned())) {
            tx.send_replace(state);
        }
    }

    fn set_connected(&self, connected: bool) {
        self.inner.connected.store(connected, Ordering::SeqCst);
    }

    fn mark_synced(&self) {
        self.inner
            .synced
            .send_if_modified(|s| !std::mem::replace(s, true));
    }
}
