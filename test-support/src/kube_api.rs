//! A fake Kubernetes API server, faithful where the controller's client depends on it: list
//! and watch with resourceVersions (list at a version, watch from it, events replayed in order),
//! bookmarks, `410 Gone` for a watch from a compacted version (the client must relist),
//! create / replace / delete with `generation` bumped on spec changes only, and status
//! patches (server-side apply on the `status` subresource) that do not touch `generation`.
//! Point `KUBECONFIG` at [`FakeApi::kubeconfig`] and the production kube client runs unchanged.
//!
//! It holds the rules of a real API server that the controller and our manifests meet:
//! - **Only installed APIs are served.** The built-in kinds of [`served::BUILTIN`] always; a custom
//!   kind once its CustomResourceDefinition is created (and no longer once it is deleted).
//!   Anything else answers `404 page not found`, as a real server does for an API that is not
//!   installed. Discovery (`/api`, `/apis`, `/apis/<group>/<version>`) lists the same.
//! - **CRDs are checked as the server checks them** ([`schema::check_crd`]: structural
//!   schema, defaults valid against their own schema, known formats only (others come back as
//!   `Warning` headers), list-map keys required, CEL rules compiled and within the cost budget
//!   estimated as the server does ([`cel_cost`])); a refused CRD is `422 Invalid` with the
//!   server's field paths.
//! - **Custom resources are checked against their CRD's schema and CEL rules**
//!   ([`schema::validate`]) on create, replace and patch.
//! - **Empty lists come back as `null`** where Go's types serialise a nil slice without
//!   `omitempty`: an EndpointSlice with no endpoints is served `"endpoints": null` (and
//!   `"ports": null`), as the real server serves it after the protobuf round trip through etcd.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub mod cel_cost;
pub mod schema;
pub mod served;

type Body = BoxBody<Bytes, Infallible>;

/// `(api prefix, plural)`, e.g. `("/apis/policy.ferrymesh.io/v1alpha1", "resiliencepolicies")`.
type ResourceKey = (String, String);
/// `(namespace or "", name)`.
type ObjectName = (String, String);

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    resource: ResourceKey,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    /// Watches from a version at or below this get 410 Gone.
    compacted: u64,
    objects: BTreeMap<ResourceKey, BTreeMap<ObjectName, Value>>,
    log: Vec<Event>,
    /// Every status patch: (resource plural, namespace/name, field manager, content type).
    status_patches: Vec<(String, String, String, String)>,
    uid: u64,
    /// TokenReview answers: token -> (username, audiences it was issued for).
    tokens: BTreeMap<String, (String, Vec<String>)>,
    /// The custom kinds served (installed CRDs).
    registry: served::Registry,
}

/// The fake API server; stops when dropped.
#[derive(Debug)]
pub struct FakeApi {
    /// Where it listens (plain HTTP on loopback).
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    /// Closing this ends every open watch (as an API server restart or a timeout would).
    cut: Arc<Mutex<broadcast::Sender<()>>>,
    task: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

fn status_error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn with_warnings(mut rsp: Response<Body>, warnings: &[String]) -> Response<Body> {
    for w in warnings {
        let text = format!("299 - {w:?}");
        if let Ok(v) = http::HeaderValue::from_str(&text) {
            rsp.headers_mut().append("warning", v);
        }
    }
    rsp
}

/// `404 page not found`, as a real server answers for an API that is not installed.
fn not_installed() -> Response<Body> {
    let mut rsp = Response::new(Full::new(Bytes::from_static(b"404 page not found\n")).boxed());
    *rsp.status_mut() = StatusCode::NOT_FOUND;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

/// A parsed request path.
#[derive(Debug)]
struct Target {
    resource: ResourceKey,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (format!("/api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("/apis/{g}/{v}"), rest),
        _ => return None,
    };
    let owned = |s: &&str| (*s).to_owned();
    let (namespace, rest) = match rest {
        // `namespaces/<name>` alone is the Namespace object itself.
        ["namespaces", ns, plural, tail @ ..] => (Some(owned(ns)), {
            let mut v = vec![*plural];
            v.extend_from_slice(tail);
            v
        }),
        other => (None, other.to_vec()),
    };
    let (plural, name, status) = match rest.as_slice() {
        [plural] => (plural, None, false),
        [plural, name] => (plural, Some(owned(name)), false),
        [plural, name, "status"] => (plural, Some(owned(name)), true),
        _ => return None,
    };
    Some(Target {
        resource: (prefix, (*plural).to_owned()),
        namespace,
        name,
        status,
    })
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The object without `status` and server-set metadata: what `generation` counts changes of.
fn spec_of(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("status");
        m.remove("metadata");
    }
    o
}

/// RFC 7386 JSON merge.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl State {
    fn record(
        &mut self,
        events: &broadcast::Sender<Event>,
        resource: &ResourceKey,
        kind: &'static str,
        object: &Value,
    ) {
        let event = Event {
            rv: self.rv,
            resource: resource.clone(),
            kind,
            object: object.clone(),
        };
        self.log.push(event.clone());
        let _ = events.send(event);
    }

    fn bump(&mut self, object: &mut Value) {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        // The API server records each write's time (to the second) in managedFields.
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        object["metadata"]["managedFields"] =
            json!([{"manager": "test", "operation": "Update", "apiVersion": "v1", "time": now}]);
    }
}

impl FakeApi {
    /// Starts one on a free loopback port.
    ///
    /// # Panics
    /// When it cannot bind.
    pub async fn start() -> FakeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake API server");
        let addr = listener.local_addr().expect("bound");
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            ..State::default()
        }));
        let (events, _) = broadcast::channel(4096);
        let (cut_tx, _) = broadcast::channel(4);
        let cut = Arc::new(Mutex::new(cut_tx));
        let (s, e, c) = (state.clone(), events.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, e, c) = (s.clone(), e.clone(), c.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (s, e, c) = (s.clone(), e.clone(), c.clone());
                        async move { Ok::<_, Infallible>(handle(req, &s, &e, &c).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let dir = tempfile::tempdir().expect("a temporary folder");
        crate::netns::open_up(dir.path());
        let api = FakeApi {
            addr,
            state,
            events,
            cut,
            task,
            dir,
        };
        std::fs::write(
            api.kubeconfig(),
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{addr}\"}}}}]\n\
                 users: [{{name: fake, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: default}}}}]\n\
                 current-context: fake\n"
            ),
        )
        .expect("writing the kubeconfig");
        api
    }

    /// A kubeconfig that points at this server.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// A kube client on this server, configured from [`FakeApi::kubeconfig`] as the controller
    /// is.
    ///
    /// # Panics
    /// When the kubeconfig cannot be read.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig =
            kube::config::Kubeconfig::read_from(self.kubeconfig()).expect("reading the kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("a client config");
        kube::Client::try_from(config).expect("a client")
    }

    /// Ends every open watch and compacts history: watchers that come back with the version
    /// they had get 410 Gone and must relist (an etcd compaction, or an API server restart).
    pub fn expire_watches(&self) {
        {
            let mut s = self.state.lock().expect("state lock");
            s.rv += 1;
            s.compacted = s.rv;
            s.log.clear();
        }
        let _ = self.cut.lock().expect("cut lock").send(());
    }

    /// Every status patch so far: (plural, `namespace/name`, field manager, content type).
    pub fn status_patches(&self) -> Vec<(String, String, String, String)> {
        self.state
            .lock()
            .expect("state lock")
            .status_patches
            .clone()
    }

    /// The stored object, if any.
    pub fn get(&self, prefix: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let s = self.state.lock().expect("state lock");
        s.objects
            .get(&(prefix.to_owned(), plural.to_owned()))?
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Makes `token` a live ServiceAccount token of `namespace/service_account`, issued for
    /// `audiences` (what TokenReview answers for it).
    pub fn add_token(
        &self,
        token: &str,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
    ) {
        self.state.lock().expect("state lock").tokens.insert(
            token.to_owned(),
            (
                format!("system:serviceaccount:{namespace}:{service_account}"),
                audiences.iter().map(|a| (*a).to_owned()).collect(),
            ),
        );
    }

    /// The number of open watch streams.
    pub fn watchers(&self) -> usize {
        self.events.receiver_count()
    }

    /// Creates the CustomResourceDefinitions of a YAML text (one or more documents) as
    /// `kubectl apply` would, through the API server's CRD checks: the warnings it answers
    /// with, or why it refused (the first refusal; the CRDs before it stay).
    ///
    /// # Errors
    /// The server's `422 Invalid` message.
    pub fn install_crds(&self, yaml: &str) -> Result<Vec<String>, String> {
        let mut warnings = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let crd: Value = serde::Deserialize::deserialize(doc).map_err(|e| e.to_string())?;
            if !crd.is_object() {
                continue;
            }
            let admitted = served::admit(
                &self.state.lock().expect("state lock").registry,
                &served::crd_resource(),
                &crd,
            );
            warnings.extend(admitted?);
            let target = Target {
                resource: served::crd_resource(),
                namespace: None,
                name: None,
                status: false,
            };
            let rsp = create(&target, crd, &self.state, &self.events);
            if !rsp.status().is_success() {
                return Err(format!("CRD not created: {}", rsp.status()));
            }
        }
        Ok(warnings)
    }

    /// Installs the mesh's committed CRDs (`manifests/crds/`), as `make kind-deploy` does.
    ///
    /// # Panics
    /// When the API server's checks refuse one or warn about one: the committed CRDs must
    /// install cleanly on a real cluster.
    pub fn install_mesh_crds(&self) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("manifests/crds")
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
            .collect();
        files.sort();
        for path in files {
            let yaml = std::fs::read_to_string(&path).expect("a CRD file");
            let warnings = self
                .install_crds(&yaml)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(warnings.is_empty(), "{}: {warnings:?}", path.display());
        }
    }

    /// Installs HTTPRoute and GRPCRoute (`gateway.networking.k8s.io/v1`), as the Gateway API's
    /// standard channel does. Their schema here keeps every field (the upstream CRDs' own
    /// schema is not needed to test who watches them).
    ///
    /// # Panics
    /// Never: the CRDs are fixed and valid.
    pub fn install_gateway_api(&self) {
        for (kind, plural) in [("HTTPRoute", "httproutes"), ("GRPCRoute", "grpcroutes")] {
            let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": format!("{plural}.gateway.networking.k8s.io")},
                "spec": {"group": "gateway.networking.k8s.io", "scope": "Namespaced",
                    "names": {"kind": kind, "plural": plural, "listKind": format!("{kind}List"), "singular": kind.to_ascii_lowercase()},
                    "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                        "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}});
            self.install_crds(&crd.to_string())
                .expect("the Gateway API route CRDs are valid");
        }
    }
}

/// Where a list or event's object kind comes from (for `ERROR` and `BOOKMARK` events).
fn list_kind(resource: &ResourceKey, items: &[Value]) -> String {
    items
        .first()
        .and_then(|i| i["kind"].as_str())
        .map_or_else(|| format!("{}List", resource.1), |k| format!("{k}List"))
}

async fn handle(
    req: Request<Incoming>,
    state: &Arc<Mutex<State>>,
    events: &broadcast::Sender<Event>,
    cut: &Arc<Mutex<broadcast::Sender<()>>>,
) -> Response<Body> {
    if req.method() == Method::GET {
        let doc = state
            .lock()
            .expect("state lock")
            .registry
            .discovery(req.uri().path());
        if let Some(doc) = doc {
            return json_response(StatusCode::OK, &doc);
        }
    }
    if let Some(rsp) = service_proxy(req.uri().path(), state).await {
        return rsp;
    }
    let Some(target) = parse_path(req.uri().path()) else {
        return not_installed();
    };
    if !state
        .lock()
        .expect("state lock")
        .registry
        .serves(&target.resource)
    {
        return not_installed();
    }
    let q = query(req.uri());
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        }
    };
    match (&method, &target.name) {
        (&Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(&target, &q, state, events, cut)
        }
        (&Method::GET, None) => list(&target, state),
        (&Method::GET, Some(name)) => {
            let s = state.lock().expect("state lock");
            let key = (target.namespace.clone().unwrap_or_default(), name.clone());
            match s.objects.get(&target.resource).and_then(|m| m.get(&key)) {
                Some(o) => json_response(StatusCode::OK, o),
                None => status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                ),
            }
        }
        (&Method::POST, None) => create(&target, body, state, events),
        (&Method::PUT, Some(name)) => replace(&target, name, body, state, events),
        (&Method::PATCH, Some(name)) => {
            patch(&target, name, &body, &q, &content_type, state, events)
        }
        (&Method::DELETE, Some(name)) => delete(&target, name, state, events),
        _ => status_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported",
        ),
    }
}

/// The API server's service proxy, `/api/v1/namespaces/<ns>/services/[<scheme>:]<name>[:<port>]/proxy/<path>`
/// (GET only): to a ready endpoint of the Service's port, found through its EndpointSlices.
/// `None` when the path is not a service proxy path.
async fn service_proxy(path: &str, state: &Arc<Mutex<State>>) -> Option<Response<Body>> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once("/services/")?;
    let (spec, tail) = rest.split_once("/proxy")?;
    let parts: Vec<&str> = spec.split(':').collect();
    let (name, port) = match parts.as_slice() {
        [name] => (*name, ""),
        [name, port] | [_, name, port] => (*name, *port),
        _ => {
            return Some(status_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "bad service",
            ));
        }
    };
    let target = {
        let s = state.lock().expect("state lock");
        let service = s
            .objects
            .get(&("/api/v1".to_owned(), "services".to_owned()))
            .and_then(|m| m.get(&(ns.to_owned(), name.to_owned())))
            .cloned();
        let Some(service) = service else {
            return Some(status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("services {name:?} not found"),
            ));
        };
        let port_name = service["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| {
                port.is_empty()
                    || p["name"] == port
                    || (!port.is_empty() && port.parse::<u64>().ok() == p["port"].as_u64())
            })
            .map(|p| p["name"].as_str().unwrap_or("").to_owned());
        let slices = s
            .objects
            .get(&(
                "/apis/discovery.k8s.io/v1".to_owned(),
                "endpointslices".to_owned(),
            ))
            .cloned()
            .unwrap_or_default();
        slices
            .iter()
            .filter(|((n, _), o)| {
                n == ns && o["metadata"]["labels"]["kubernetes.io/service-name"] == name
            })
            .find_map(|(_, o)| {
                let number = o["ports"].as_array()?.iter().find(|p| {
                    port_name
                        .as_deref()
                        .is_none_or(|w| p["name"].as_str().unwrap_or("") == w)
                })?["port"]
                    .as_u64()?;
                let address = o["endpoints"]
                    .as_array()?
                    .iter()
                    .find(|e| e["conditions"]["ready"] != false)?["addresses"][0]
                    .as_str()?
                    .to_owned();
                Some(format!("{address}:{number}"))
            })
    };
    let Some(target) = target else {
        return Some(status_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            &format!("no endpoints available for service {name:?}"),
        ));
    };
    let url = format!(
        "http://{target}{}",
        if tail.is_empty() { "/" } else { tail }
    );
    Some(match reqwest::get(&url).await {
        Ok(r) => {
            let status = r.status();
            let body = r.bytes().await.unwrap_or_default();
            let mut rsp = Response::new(Full::new(body).boxed());
            *rsp.status_mut() =
                StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            rsp
        }
        Err(e) => status_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            &e.to_string(),
        ),
    })
}

fn list(target: &Target, state: &Arc<Mutex<State>>) -> Response<Body> {
    let s = state.lock().expect("state lock");
    let items: Vec<Value> = s
        .objects
        .get(&target.resource)
        .map(|m| {
            m.iter()
                .filter(|((ns, _), _)| target.namespace.as_ref().is_none_or(|t| t == ns))
                .map(|(_, o)| o.clone())
                .collect()
        })
        .unwrap_or_default();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": list_kind(&target.resource, &items),
            "apiVersion": "v1",
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        }),
    )
}

fn watch(
    target: &Target,
    q: &BTreeMap<String, String>,
    state: &Arc<Mutex<State>>,
    events: &broadcast::Sender<Event>,
    cut: &Arc<Mutex<broadcast::Sender<()>>>,
) -> Response<Body> {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290),
    );
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(256);
    let line = |event: &Value| Ok(Frame::data(Bytes::from(format!("{event}\n"))));
    let resource = target.resource.clone();
    let namespace = target.namespace.clone();
    let matches = move |e: &Event| {
        e.resource == resource
            && namespace
                .as_ref()
                .is_none_or(|ns| e.object["metadata"]["namespace"].as_str() == Some(ns))
    };
    let (backlog, mut updates, mut cut_rx, current) = {
        let s = state.lock().expect("state lock");
        if from != 0 && from < s.compacted {
            let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": format!("too old resource version: {from} ({})", s.compacted),
                "reason": "Expired", "code": 410}});
            let _ = tx.try_send(line(&gone));
            drop(tx);
            return streaming(rx);
        }
        let backlog: Vec<Value> = if from == 0 {
            // "Start at most recent": every current object as ADDED first.
            s.objects
                .get(&target.resource)
                .into_iter()
                .flat_map(|m| m.values())
                .map(|o| json!({"type": "ADDED", "object": o}))
                .collect()
        } else {
            s.log
                .iter()
                .filter(|e| e.rv > from && matches(e))
                .map(|e| json!({"type": e.kind, "object": e.object}))
                .collect()
        };
        (
            backlog,
            events.subscribe(),
            cut.lock().expect("cut lock").subscribe(),
            s.rv,
        )
    };
    let kind = target.resource.1.clone();
    tokio::spawn(async move {
        for e in &backlog {
            if tx.send(line(e)).await.is_err() {
                return;
            }
        }
        let mut last = current;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                e = updates.recv() => match e {
                    Ok(e) if e.rv > from && matches(&e) => {
                        last = last.max(e.rv);
                        if tx.send(line(&json!({"type": e.kind, "object": e.object}))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let mark = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": "v1",
                        "metadata": {"resourceVersion": last.to_string()}}});
                    if tx.send(line(&mark)).await.is_err() {
                        return;
                    }
                }
                _ = cut_rx.recv() => return,
                () = &mut deadline => return,
            }
        }
    });
    streaming(rx)
}

fn streaming(rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>) -> Response<Body> {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut rsp = Response::new(StreamBody::new(stream).boxed());
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

/// TokenReview: authenticated when the token is known and issued for one of the audiences
/// asked about (the API server's audience check).
fn token_review(mut body: Value, state: &Arc<Mutex<State>>) -> Response<Body> {
    let s = state.lock().expect("state lock");
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<&str> = body["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    body["status"] = match s.tokens.get(token) {
        Some((user, audiences))
            if wanted.is_empty() || wanted.iter().any(|w| audiences.iter().any(|a| a == w)) =>
        {
            json!({"authenticated": true, "user": {"username": user}, "audiences": audiences})
        }
        Some(_) => json!({"authenticated": false, "error": "token audiences do not match"}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    json_response(StatusCode::CREATED, &body)
}

fn create(
    target: &Target,
    mut body: Value,
    state: &Arc<Mutex<State>>,
    events: &broadcast::Sender<Event>,
) -> Response<Body> {
    if target.resource.1 == "tokenreviews" {
        return token_review(body, state);
    }
    let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
        return status_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name is required",
        );
    };
    let ns = target.namespace.clone().unwrap_or_default();
    let mut s = state.lock().expect("state lock");
    let key = (ns.clone(), name.clone());
    if s.objects
        .get(&target.resource)
        .is_some_and(|m| m.contains_key(&key))
    {
        return status_error(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{name} already exists"),
        );
    }
    let warnings = match served::admit(&s.registry, &target.resource, &body) {
        Ok(w) => w,
        Err(e) => return status_error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e),
    };
    s.uid += 1;
    if !ns.is_empty() {
        body["metadata"]["namespace"] = json!(ns);
    }
    served::normalize(&target.resource, &mut body);
    if target.resource == served::crd_resource() {
        s.registry.install(&body);
    }
    body["metadata"]["uid"] = json!(format!("uid-{}", s.uid));
    body["metadata"]["generation"] = json!(1);
    body["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    s.bump(&mut body);
    s.objects
        .entry(target.resource.clone())
        .or_default()
        .insert(key, body.clone());
    s.record(events, &target.resource, "ADDED", &body);
    with_warnings(json_response(StatusCode::CREATED, &body), &warnings)
}

fn replace(
    target: &Target,
    name: &str,
    mut body: Value,
    state: &Arc<Mutex<State>>,
    events: &broadcast::Sender<Event>,
) -> Response<Body> {
    let key = (
        target.namespace.clone().unwrap_or_default(),
        name.to_owned(),
    );
    let mut s = state.lock().expect("state lock");
    let Some(old) = s
        .objects
        .get(&target.resource)
        .and_then(|m| m.get(&key))
        .cloned()
    else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{name} not found"),
        );
    };
    for field in ["uid", "creationTimestamp", "namespace", "name"] {
        body["metadata"][field] = old["metadata"][field].clone();
    }
    let warnings = match served::admit(&s.registry, &target.resource, &body) {
        Ok(w) => w,
        Err(e) => return status_error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e),
    };
    served::normalize(&target.resource, &mut body);
    if target.resource == served::crd_resource() {
        s.registry.install(&body);
    }
    let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
    let changed = spec_of(&old) != spec_of(&body);
    body["metadata"]["generation"] = json!(if changed { generation + 1 } else { generation });
    // The status subresource: a write to the object keeps the stored status.
    match old.get("status") {
        Some(st) => body["status"] = st.clone(),
        None => {
            if let Some(o) = body.as_object_mut() {
                o.remove("status");
            }
        }
    }
    s.bump(&mut body);
    s.objects
        .entry(target.resource.clone())
        .or_default()
        .insert(key, body.clone());
    s.record(events, &target.resource, "MODIFIED", &body);
    with_warnings(json_response(StatusCode::OK, &body), &warnings)
}

fn patch(
    target: &Target,
    name: &str,
    body: &Value,
    q: &BTreeMap<String, String>,
    content_type: &str,
    state: &Arc<Mutex<State>>,
    events: &broadcast::Sender<Event>,
) -> Response<Body> {
    let key = (
        target.namespace.clone().unwrap_or_default(),
        name.to_owned(),
    );
    let exists = state
        .lock()
        .expect("state lock")
        .objects
        .get(&target.resource)
        .is_some_and(|m| m.contains_key(&key));
    // Server-side apply creates what does not exist yet.
    if content_type.starts_with("application/apply-patch") && !exists && !target.status {
        let mut body = body.clone();
        body["metadata"]["name"] = json!(name);
        return create(target, body, state, events);
    }
    let mut s = state.lock().expect("state lock");
    let Some(mut object) = s
        .objects
        .get(&target.resource)
        .and_then(|m| m.get(&key))
        .cloned()
    else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{name} not found"),
        );
    };
    if target.status {
        if content_type.starts_with("application/apply-patch") && !q.contains_key("fieldManager") {
            return status_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "fieldManager is required for apply patch",
            );
        }
        s.status_patches.push((
            target.resource.1.clone(),
            format!("{}/{}", key.0, key.1),
            q.get("fieldManager").cloned().unwrap_or_default(),
            content_type.to_owned(),
        ));
        // One manager owns the whole status here: apply replaces it.
        object["status"] = body["status"].clone();
    } else {
        let before = spec_of(&object);
        let mut patch = body.clone();
        if let Some(o) = patch.as_object_mut() {
            o.remove("status");
        }
        merge(&mut object, &patch);
        if let Err(e) = served::admit(&s.registry, &target.resource, &object) {
            return status_error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e);
        }
        served::normalize(&target.resource, &mut object);
        if target.resource == served::crd_resource() {
            s.registry.install(&object);
        }
        if spec_of(&object) != before {
            let generation = object["metadata"]["generation"].as_i64().unwrap_or(1);
            object["metadata"]["generation"] = json!(generation + 1);
        }
    }
    s.bump(&mut object);
    s.objects
        .entry(target.resource.clone())
        .or_default()
        .insert(key, object.clone());
    s.record(events, &target.resource, "MODIFIED", &object);
    json_response(StatusCode::OK, &object)
}

fn delete(
    target: &Target,
    name: &str,
    state: &Arc<Mutex<State>>,
    events: &broadcast::Sender<Event>,
) -> Response<Body> {
    let key = (
        target.namespace.clone().unwrap_or_default(),
        name.to_owned(),
    );
    let mut s = state.lock().expect("state lock");
    let Some(mut object) = s
        .objects
        .get_mut(&target.resource)
        .and_then(|m| m.remove(&key))
    else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{name} not found"),
        );
    };
    s.bump(&mut object);
    s.record(events, &target.resource, "DELETED", &object);
    if target.resource == served::crd_resource() {
        // The CRD's kinds stop being served, and their objects go with them.
        for resource in s.registry.remove(name) {
            s.objects.remove(&resource);
        }
    }
    json_response(StatusCode::OK, &object)
}

/// Applies YAML documents through `client` (create, or replace when the object exists), as
/// `kubectl apply` would.
///
/// # Panics
/// When a document is not a Kubernetes object or the server refuses it.
pub async fn apply(client: &kube::Client, yaml: &str) {
    if let Err(e) = try_apply(client, yaml).await {
        panic!("applying: {e}");
    }
}

/// [`apply`], with the server's refusal returned.
///
/// # Errors
/// The API server refused a document (the ones before it are applied).
///
/// # Panics
/// When a document is not a Kubernetes object.
pub async fn try_apply(client: &kube::Client, yaml: &str) -> Result<(), kube::Error> {
    use kube::api::{Api, DynamicObject, PostParams};
    use kube::discovery::ApiResource;
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value: Value = serde::Deserialize::deserialize(doc).expect("a YAML document");
        if !value.is_object() {
            continue;
        }
        let object: DynamicObject = serde_json::from_value(value.clone()).expect("an object");
        let types = object.types.clone().expect("apiVersion and kind");
        let (group, version) = types
            .api_version
            .split_once('/')
            .unwrap_or(("", &types.api_version));
        let plural = plural(&types.kind);
        let ar = ApiResource {
            group: group.to_owned(),
            version: version.to_owned(),
            api_version: types.api_version.clone(),
            kind: types.kind.clone(),
            plural,
        };
        let api: Api<DynamicObject> = match &object.metadata.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        let name = object.metadata.name.clone().expect("a name");
        match api.get_opt(&name).await? {
            None => {
                api.create(&PostParams::default(), &object).await?;
            }
            Some(old) => {
                let mut object = object;
                object.metadata.resource_version = old.metadata.resource_version;
                api.replace(&name, &PostParams::default(), &object).await?;
            }
        }
    }
    Ok(())
}

/// Deletes the object a YAML document names.
///
/// # Panics
/// When the server refuses.
pub async fn delete_object(
    client: &kube::Client,
    api_version: &str,
    kind: &str,
    namespace: &str,
    name: &str,
) {
    use kube::api::{Api, DeleteParams, DynamicObject};
    use kube::discovery::ApiResource;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let ar = ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: api_version.to_owned(),
        kind: kind.to_owned(),
        plural: plural(kind),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
    api.delete(name, &DeleteParams::default())
        .await
        .expect("deleting");
}

fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower.ends_with("policy") {
        format!("{}ies", &lower[..lower.len() - 1])
    } else if lower.ends_with('s') {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    }
}
