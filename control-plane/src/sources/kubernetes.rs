//! The Kubernetes source (`--source kubernetes`): kube-runtime watchers on Services,
//! EndpointSlices, Pods, Namespaces, our policy CRDs and Gateway API routes. Each object is
//! turned into the same YAML text a file would hold and parsed by the file source's parser,
//! under a path of its own (`kubernetes/<plural>.<group>/<namespace>/<name>`), so everything
//! after the source (validation, index, translation, discovery) is one code path. A rejected
//! update keeps the object's last good version in the index, as a rejected file does.
//!
//! A watch that fails, expires (410 Gone) or restarts relists: the full list replaces that kind's
//! objects in one index update ([`IndexHandle::replace_prefix`]), so nothing is lost or
//! duplicated. Policy status is written back with server-side apply ([`status`]).

pub mod status;
pub mod watches;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};

use super::{ParseError, Parsed, parse_documents};
use crate::index::IndexHandle;

/// One watched kind.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// API group, `""` for core.
    pub group: &'static str,
    /// Version.
    pub version: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Resource (plural).
    pub plural: &'static str,
    /// An API a healthy install may lack (Gateway API): watched once it is installed.
    pub optional: bool,
}

impl Kind {
    /// The kube-rs resource description.
    pub fn api_resource(&self) -> ApiResource {
        let api_version = if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        };
        ApiResource {
            group: self.group.to_owned(),
            version: self.version.to_owned(),
            api_version,
            kind: self.kind.to_owned(),
            plural: self.plural.to_owned(),
        }
    }

    /// Where this kind's objects live in the index.
    pub fn prefix(&self) -> PathBuf {
        PathBuf::from("kubernetes").join(if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        })
    }

    /// A policy kind (its status is ours to write).
    pub fn is_policy(&self) -> bool {
        self.group.ends_with("ferrymesh.io")
    }
}

/// Every kind the controller watches.
pub const KINDS: &[Kind] = &[
    Kind {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        optional: false,
    },
    Kind {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        optional: false,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        optional: false,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        optional: false,
    },
    Kind {
        group: "policy.ferrymesh.io",
        version: "v1alpha1",
        kind: "ResiliencePolicy",
        plural: "resiliencepolicies",
        optional: false,
    },
    Kind {
        group: "policy.ferrymesh.io",
        version: "v1alpha1",
        kind: "AuthenticationPolicy",
        plural: "authenticationpolicies",
        optional: false,
    },
    Kind {
        group: "policy.ferrymesh.io",
        version: "v1alpha1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        optional: false,
    },
    Kind {
        group: "policy.ferrymesh.io",
        version: "v1alpha1",
        kind: "FaultInjection",
        plural: "faultinjections",
        optional: false,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "HTTPRoute",
        plural: "httproutes",
        optional: true,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "GRPCRoute",
        plural: "grpcroutes",
        optional: true,
    },
];

/// The latest parse of each policy object, for the status writer.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    inner: Arc<Mutex<std::collections::BTreeMap<PathBuf, Observed>>>,
}

/// What the source saw of one policy object.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The kind.
    pub kind: Kind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.generation`.
    pub generation: i64,
    /// `spec.targetRefs` as written.
    pub targets: Vec<super::TargetRef>,
    /// Services the policy refers to besides its targets (`fallback.backendRef`), as
    /// (namespace, name).
    pub backends: Vec<(String, String)>,
    /// `None` when it parsed, else why it was refused.
    pub error: Option<String>,
    /// The status the object carries now (written by us, or by an earlier controller).
    pub status: Option<serde_json::Value>,
}

impl PartialEq for Kind {
    fn eq(&self, other: &Self) -> bool {
        self.group == other.group && self.kind == other.kind
    }
}

impl Seen {
    /// Every policy object seen, by index path.
    pub fn all(&self) -> Vec<Observed> {
        self.inner
            .lock()
            .expect("seen lock")
            .values()
            .cloned()
            .collect()
    }

    fn set(&self, path: PathBuf, observed: Option<Observed>) {
        let mut inner = self.inner.lock().expect("seen lock");
        match observed {
            Some(o) => {
                inner.insert(path, o);
            }
            None => {
                inner.remove(&path);
            }
        }
    }

    fn retain_prefix(&self, prefix: &std::path::Path, keep: &[PathBuf]) {
        self.inner
            .lock()
            .expect("seen lock")
            .retain(|p, _| !p.starts_with(prefix) || keep.contains(p));
    }
}

/// An object's path in the index.
fn path_of(kind: &Kind, object: &DynamicObject) -> PathBuf {
    kind.prefix()
        .join(object.metadata.namespace.as_deref().unwrap_or("_cluster"))
        .join(object.metadata.name.as_deref().unwrap_or("_"))
}

/// The object as the file source would read it: with its apiVersion and kind, without the
/// server's bookkeeping.
fn to_text(kind: &Kind, object: &DynamicObject) -> String {
    let mut json = serde_json::to_value(object).unwrap_or_default();
    json["apiVersion"] = kind.api_resource().api_version.into();
    json["kind"] = kind.kind.into();
    if let Some(meta) = json
        .get_mut("metadata")
        .and_then(serde_json::Value::as_object_mut)
    {
        meta.remove("managedFields");
    }
    if kind.is_policy()
        && let Some(o) = json.as_object_mut()
    {
        o.remove("status");
    }
    json.to_string()
}

fn parse(
    kind: &Kind,
    object: &DynamicObject,
    seen: &Seen,
) -> (PathBuf, Result<Parsed, ParseError>) {
    let path = path_of(kind, object);
    let result = parse_documents(&path, &to_text(kind, object));
    if kind.is_policy() {
        let targets = object
            .data
            .pointer("/spec/targetRefs")
            .and_then(|t| serde_json::from_value(t.clone()).ok())
            .unwrap_or_default();
        let namespace = object.metadata.namespace.clone().unwrap_or_default();
        let backends = object
            .data
            .pointer("/spec/fallback/backendRef")
            .and_then(|b| {
                let name = b.get("name")?.as_str()?.to_owned();
                let ns = b
                    .get("namespace")
                    .and_then(|n| n.as_str())
                    .unwrap_or(&namespace);
                Some((ns.to_owned(), name))
            })
            .into_iter()
            .collect();
        seen.set(
            path.clone(),
            Some(Observed {
                backends,
                kind: *kind,
                namespace,
                name: object.metadata.name.clone().unwrap_or_default(),
                generation: object.metadata.generation.unwrap_or(1),
                targets,
                error: result
                    .as_ref()
                    .err()
                    .map(|e| format!("{}: {}", e.field, e.message)),
                status: object.data.get("status").cloned(),
            }),
        );
    }
    if let Err(e) = &result {
        tracing::warn!(error = %e, "object rejected; its last good version stays");
    }
    (path, result)
}

/// How long ago the object was last written, by its newest managedFields time (the API
/// server records one per write, to the second).
fn lag(object: &DynamicObject) -> Option<std::time::Duration> {
    let newest = object
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|f| serde_json::to_value(f.time.as_ref()?).ok())
        .filter_map(|t| {
            time::OffsetDateTime::parse(t.as_str()?, &time::format_description::well_known::Rfc3339)
                .ok()
        })
        .max()?;
    let age = time::OffsetDateTime::now_utc() - newest;
    std::time::Duration::try_from(age).ok()
}

/// Whether `kind`'s API is served, by API discovery (`/apis/<group>/<version>`): a custom
/// kind is served only once its CRD is installed.
///
/// # Errors
/// The API server could not be asked (not a 404).
pub async fn installed(client: &kube::Client, kind: &Kind) -> Result<bool, kube::Error> {
    if kind.group.is_empty() {
        return Ok(true);
    }
    match client
        .list_api_group_resources(&kind.api_resource().api_version)
        .await
    {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == kind.plural)),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Watches one kind until the process ends, feeding the index; a kind whose API is not
/// installed is looked up again every [`watches::INSTALL_POLL`] and watched once it is (one log
/// line when it is missing, one when it appears).
pub async fn watch_when_installed(client: kube::Client, kind: Kind, to: Sinks) {
    let watches = &to.watches;
    let api_version = kind.api_resource().api_version;
    let mut said = false;
    loop {
        match installed(&client, &kind).await {
            Ok(true) => break,
            Ok(false) => {
                let why = format!(
                    "{api_version} is not installed (no {} in API discovery); watched once it is",
                    kind.plural
                );
                if !said {
                    if kind.optional {
                        tracing::info!(kind = kind.kind, "not watching {}: {why}", kind.kind);
                    } else {
                        tracing::error!(
                            kind = kind.kind,
                            "not watching {}: {why} (kubectl apply --server-side -k manifests/crds)",
                            kind.kind
                        );
                    }
                    said = true;
                }
                watches.set(&kind, watches::WatchState::NotInstalled, why);
            }
            Err(e) => {
                tracing::debug!(kind = kind.kind, error = %e, "API discovery failed; asking again");
            }
        }
        tokio::time::sleep(watches::INSTALL_POLL).await;
    }
    if said {
        tracing::info!(
            kind = kind.kind,
            "{api_version} is installed now: watching {}",
            kind.kind
        );
    }
    watch(client, kind, &to).await;
}

/// Where a watch's events go: the index, the policies seen (for status), the metrics and the
/// watch states.
#[derive(Debug, Clone)]
pub struct Sinks {
    /// The index the objects feed.
    pub index: IndexHandle,
    /// Policy objects, for the status writer.
    pub seen: Seen,
    /// Watch errors and lag.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Each watch's state.
    pub watches: watches::Watches,
}

/// Watches one kind until the process ends, feeding the index.
async fn watch(client: kube::Client, kind: Kind, to: &Sinks) {
    let Sinks {
        index,
        seen,
        metrics,
        watches,
    } = to;
    watches.set(&kind, watches::WatchState::Starting, "listing");
    let api: Api<DynamicObject> = Api::all_with(client, &kind.api_resource());
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut buffer: Option<Vec<(PathBuf, Result<Parsed, ParseError>)>> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => buffer = Some(Vec::new()),
            Ok(Event::InitApply(object)) => {
                let entry = parse(&kind, &object, seen);
                buffer.get_or_insert_with(Vec::new).push(entry);
            }
            Ok(Event::InitDone) => {
                let entries = buffer.take().unwrap_or_default();
                let keep: Vec<PathBuf> = entries.iter().map(|(p, _)| p.clone()).collect();
                tracing::info!(kind = kind.kind, objects = entries.len(), "listed");
                watches.set(
                    &kind,
                    watches::WatchState::Synced,
                    format!("{} object(s) at the last list", entries.len()),
                );
                seen.retain_prefix(&kind.prefix(), &keep);
                index.replace_prefix(&kind.prefix(), entries);
            }
            Ok(Event::Apply(object)) => {
                if let Some(lag) = lag(&object) {
                    metrics.watch_lag(kind.kind, lag);
                }
                let (path, result) = parse(&kind, &object, seen);
                index.apply_file(&path, result);
            }
            Ok(Event::Delete(object)) => {
                let path = path_of(&kind, &object);
                seen.set(path.clone(), None);
                index.remove_file(&path);
            }
            Err(e) => {
                metrics.watch_error(kind.kind);
                watches.set(&kind, watches::WatchState::Failing, e.to_string());
                tracing::warn!(kind = kind.kind, error = %e, "watch failed; retrying with backoff");
            }
        }
    }
}
