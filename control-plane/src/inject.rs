//! Sidecar injection (API.md 2.c), shared by the admission webhook and `ferryctl inject`: a
//! pod (or a workload's pod template) gets the `ferrymesh-init` init container that installs
//! the iptables rules, the proxy as a native sidecar (`restartPolicy: Always`) running as UID
//! 2340, its identity, token and trust volumes, and probes rewritten to the proxy's health
//! port. It works on the JSON of the object, so fields it does not know (newer Kubernetes
//! versions, other tools' extensions) pass through untouched. Injecting an injected pod changes
//! nothing.

use serde_json::{Map, Value, json};

/// Opt-in annotation (namespace or pod).
pub const INJECT: &str = "ferrymesh.io/inject";
/// Set on every injected pod.
pub const INJECTED: &str = "ferrymesh.io/injected";
/// The proxy version the pod was injected with.
pub const PROXY_VERSION: &str = "ferrymesh.io/proxy-version";
/// The sidecar's container name.
pub const PROXY_CONTAINER: &str = "ferrymesh-proxy";
/// The init container's name.
pub const INIT_CONTAINER: &str = "ferrymesh-init";
/// The proxy's UID and GID.
pub const PROXY_UID: u32 = 2340;
/// Proxy ports (API.md 2.c).
pub const OUTBOUND_PORT: u16 = 4340;
/// Inbound listener.
pub const INBOUND_PORT: u16 = 4343;
/// Admin (loopback).
pub const ADMIN_PORT: u16 = 4390;
/// Health, metrics and rewritten probes.
pub const HEALTH_PORT: u16 = 4391;
/// Default opaque ports (server-speaks-first protocols).
pub const DEFAULT_OPAQUE_PORTS: &str = "25,587,3306,4444,5432,6379,9300,11211";

const ANN: &str = "config.ferrymesh.io/";

/// What the injector puts in: images and where the controller is.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The proxy image (init container and sidecar).
    pub image: String,
    /// Recorded in `ferrymesh.io/proxy-version`.
    pub version: String,
    /// The controller's Discovery address.
    pub discovery: String,
    /// The controller's Identity address.
    pub identity: String,
    /// The cluster's default inbound policy (the pod annotation overrides it).
    pub default_inbound_policy: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION").to_owned();
        Self {
            image: format!("ferrymesh/proxy:{version}"),
            version,
            discovery: "ferrymesh-controller.ferrymesh-system.svc:9091".into(),
            identity: "ferrymesh-controller.ferrymesh-system.svc:9090".into(),
            default_inbound_policy: None,
        }
    }
}

/// What happened to a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The pod now has the sidecar.
    Injected,
    /// Left as it was, and why.
    Skipped(String),
}

/// Why a pod could not be injected (a bad annotation): the pod is left alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{annotation}: {message}")]
pub struct BadAnnotation {
    /// The annotation.
    pub annotation: String,
    /// What is wrong.
    pub message: String,
}

/// Whether injection is asked for: the pod's `ferrymesh.io/inject` wins over the namespace's.
/// `default_on` is the answer when neither says (`ferryctl inject` injects unless told not to).
pub fn wanted(
    pod_template: &Value,
    namespace_annotations: &Map<String, Value>,
    default_on: bool,
) -> bool {
    let pod = pod_template
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(INJECT))
        .and_then(Value::as_str);
    match pod.or_else(|| namespace_annotations.get(INJECT).and_then(Value::as_str)) {
        Some(v) => v == "enabled",
        None => default_on,
    }
}

fn annotation<'a>(annotations: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    annotations
        .get(&format!("{ANN}{name}"))
        .and_then(Value::as_str)
}

fn names(list: Option<&Value>) -> impl Iterator<Item = &str> {
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
}

/// Injects the sidecar into a pod or pod template (`{metadata, spec}`), in place.
///
/// # Errors
/// An annotation has a value the proxy could not use; nothing is changed.
pub fn inject(pod: &mut Value, settings: &Settings) -> Result<Outcome, BadAnnotation> {
    let spec = pod.get("spec").cloned().unwrap_or(Value::Null);
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped(
            "hostNetwork pods share the node's network".into(),
        ));
    }
    let present = names(spec.get("containers"))
        .chain(names(spec.get("initContainers")))
        .any(|n| n == PROXY_CONTAINER);
    if present {
        return Ok(Outcome::Skipped("already injected".into()));
    }
    let annotations = pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let plan = Plan::read(&annotations, settings)?;
    let mut spec = spec;
    let probes = if plan.rewrite_probes {
        rewrite_probes(&mut spec)
    } else {
        Rewritten::default()
    };
    let mut skip_inbound = vec![ADMIN_PORT.to_string(), HEALTH_PORT.to_string()];
    skip_inbound.extend(plan.skip_inbound.iter().cloned());
    skip_inbound.extend(probes.https_ports.iter().map(ToString::to_string));
    let init = init_container(settings, &plan, &skip_inbound.join(","));
    let proxy = proxy_container(settings, &plan, &probes.originals);
    let spec_obj = spec.as_object_mut().expect("a pod spec is an object");
    let inits = spec_obj
        .entry("initContainers")
        .or_insert_with(|| Value::Array(Vec::new()));
    let inits = inits.as_array_mut().expect("initContainers is a list");
    if plan.native_sidecar {
        // The init container first, then the sidecar: it starts before every app container
        // (and before later init containers, so they too are meshed).
        inits.splice(0..0, [init, proxy]);
    } else {
        inits.insert(0, init);
        let containers = spec_obj
            .entry("containers")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Some(list) = containers.as_array_mut() {
            list.insert(0, proxy);
        }
    }
    let volumes = spec_obj
        .entry("volumes")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Some(list) = volumes.as_array_mut() {
        list.extend(volumes_json());
    }
    pod["spec"] = spec;
    let meta = pod
        .as_object_mut()
        .expect("a pod is an object")
        .entry("metadata")
        .or_insert_with(|| json!({}));
    let anns = meta
        .as_object_mut()
        .expect("metadata is an object")
        .entry("annotations")
        .or_insert_with(|| json!({}));
    anns[INJECTED] = json!("true");
    anns[PROXY_VERSION] = json!(settings.version);
    Ok(Outcome::Injected)
}

/// The annotations, read and checked.
#[derive(Debug)]
struct Plan {
    skip_inbound: Vec<String>,
    skip_outbound: Option<String>,
    skip_subnets: Option<String>,
    opaque_ports: String,
    rewrite_probes: bool,
    native_sidecar: bool,
    default_inbound_policy: Option<String>,
    log_level: Option<String>,
    cpu_request: String,
    memory_limit: String,
    trace_sampling: Option<String>,
}

impl Plan {
    fn read(a: &Map<String, Value>, settings: &Settings) -> Result<Plan, BadAnnotation> {
        let bad = |name: &str, message: String| BadAnnotation {
            annotation: format!("{ANN}{name}"),
            message,
        };
        let ports = |name: &str| -> Result<Option<String>, BadAnnotation> {
            match annotation(a, name).map(str::trim).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => ferrymesh_proto::ports::parse_ports(v)
                    .map(|_| Some(v.replace(' ', "")))
                    .map_err(|e| bad(name, e)),
            }
        };
        let flag = |name: &str| -> Result<bool, BadAnnotation> {
            match annotation(a, name) {
                None | Some("true") => Ok(true),
                Some("false") => Ok(false),
                Some(other) => Err(bad(name, format!("{other:?}: \"true\" or \"false\""))),
            }
        };
        let skip_subnets = match annotation(a, "skip-subnets")
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            None => None,
            Some(v) => {
                ferrymesh_proto::ports::parse_subnets(v).map_err(|e| bad("skip-subnets", e))?;
                Some(v.replace(' ', ""))
            }
        };
        let policy = annotation(a, "default-inbound-policy")
            .map(str::to_owned)
            .or_else(|| settings.default_inbound_policy.clone());
        if let Some(p) = &policy
            && !matches!(
                p.as_str(),
                "all-unauthenticated" | "all-authenticated" | "cluster-authenticated" | "deny"
            )
        {
            return Err(bad(
                "default-inbound-policy",
                format!(
                    "{p:?}: all-unauthenticated | all-authenticated | cluster-authenticated | deny"
                ),
            ));
        }
        let sampling = annotation(a, "trace-sampling").map(str::to_owned);
        if let Some(s) = &sampling
            && !s.parse::<f64>().is_ok_and(|r| (0.0..=1.0).contains(&r))
        {
            return Err(bad("trace-sampling", format!("{s:?}: a ratio 0..1")));
        }
        Ok(Plan {
            skip_inbound: ports("skip-inbound-ports")?.into_iter().collect(),
            skip_outbound: ports("skip-outbound-ports")?,
            skip_subnets,
            opaque_ports: ports("opaque-ports")?.unwrap_or_else(|| DEFAULT_OPAQUE_PORTS.into()),
            rewrite_probes: flag("rewrite-probes")?,
            native_sidecar: flag("native-sidecar")?,
            default_inbound_policy: policy,
            log_level: annotation(a, "proxy-log-level").map(str::to_owned),
            cpu_request: annotation(a, "proxy-cpu-request")
                .unwrap_or("10m")
                .to_owned(),
            memory_limit: annotation(a, "proxy-memory-limit")
                .unwrap_or("128Mi")
                .to_owned(),
            trace_sampling: sampling,
        })
    }
}

fn init_container(settings: &Settings, plan: &Plan, skip_inbound: &str) -> Value {
    let mut args = vec![
        "init-iptables".to_owned(),
        format!("--inbound-port={INBOUND_PORT}"),
        format!("--outbound-port={OUTBOUND_PORT}"),
        format!("--proxy-uid={PROXY_UID}"),
        format!("--skip-inbound-ports={skip_inbound}"),
    ];
    if let Some(p) = &plan.skip_outbound {
        args.push(format!("--skip-outbound-ports={p}"));
    }
    if let Some(s) = &plan.skip_subnets {
        args.push(format!("--skip-subnets={s}"));
    }
    args.push("--backend=nft".into());
    json!({
        "name": INIT_CONTAINER,
        "image": settings.image,
        "args": args,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "10Mi"}, "limits": {"memory": "50Mi"}},
    })
}

fn field_env(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
}

fn proxy_container(settings: &Settings, plan: &Plan, probes: &Map<String, Value>) -> Value {
    let mut env = vec![
        field_env("FERRYMESH_POD_NAME", "metadata.name"),
        field_env("FERRYMESH_POD_NAMESPACE", "metadata.namespace"),
        field_env("FERRYMESH_POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("FERRYMESH_POD_IPS", "status.podIPs"),
        field_env("FERRYMESH_NODE_NAME", "spec.nodeName"),
        json!({"name": "FERRYMESH_DISCOVERY_ADDR", "value": settings.discovery}),
        json!({"name": "FERRYMESH_IDENTITY_ADDR", "value": settings.identity}),
        json!({"name": "FERRYMESH_OPAQUE_PORTS", "value": plan.opaque_ports}),
    ];
    if !probes.is_empty() {
        env.push(json!({"name": "FERRYMESH_APP_PROBES", "value": Value::Object(probes.clone()).to_string()}));
    }
    if let Some(p) = &plan.default_inbound_policy {
        env.push(json!({"name": "FERRYMESH_DEFAULT_INBOUND_POLICY", "value": p}));
    }
    if let Some(l) = &plan.log_level {
        env.push(json!({"name": "FERRYMESH_LOG", "value": l}));
    }
    if let Some(s) = &plan.trace_sampling {
        env.push(json!({"name": "FERRYMESH_TRACE_SAMPLING", "value": s}));
    }
    let mut c = json!({
        "name": PROXY_CONTAINER,
        "image": settings.image,
        "args": ["run", "--mode=sidecar"],
        "env": env,
        "ports": [
            {"name": "fm-inbound", "containerPort": INBOUND_PORT},
            {"name": "fm-health", "containerPort": HEALTH_PORT},
        ],
        "startupProbe": {"httpGet": {"path": "/ready", "port": HEALTH_PORT}, "periodSeconds": 1, "failureThreshold": 120},
        "livenessProbe": {"httpGet": {"path": "/live", "port": HEALTH_PORT}, "initialDelaySeconds": 10},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": HEALTH_PORT}, "initialDelaySeconds": 2},
        "resources": {
            "requests": {"cpu": plan.cpu_request, "memory": "20Mi"},
            "limits": {"memory": plan.memory_limit},
        },
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "ferrymesh-identity", "mountPath": "/var/run/ferrymesh/identity"},
            {"name": "ferrymesh-token", "mountPath": "/var/run/ferrymesh/tokens", "readOnly": true},
            {"name": "ferrymesh-trust", "mountPath": "/var/run/ferrymesh/trust", "readOnly": true},
        ],
    });
    if plan.native_sidecar {
        c["restartPolicy"] = json!("Always");
    } else {
        // A classic container: the app containers start only once the proxy is ready.
        c["lifecycle"] =
            json!({"postStart": {"exec": {"command": ["/ferrymesh-proxy", "await-ready"]}}});
    }
    c
}

fn volumes_json() -> [Value; 3] {
    [
        json!({"name": "ferrymesh-identity", "emptyDir": {"medium": "Memory"}}),
        json!({"name": "ferrymesh-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": "identity.ferrymesh.io", "expirationSeconds": 86400, "path": "token"}}]}}),
        json!({"name": "ferrymesh-trust", "configMap": {"name": "ferrymesh-trust-anchors"}}),
    ]
}

/// What probe rewriting did.
#[derive(Debug, Default)]
struct Rewritten {
    /// `/app-health/<container>/<kind>` -> the original probe's action and timeout.
    originals: Map<String, Value>,
    /// Ports of HTTPS probes: left alone, and kept out of the inbound redirect so that the
    /// kubelet's TLS reaches the app.
    https_ports: Vec<u16>,
}

/// Resolves a probe port: a number, or the name of one of the container's ports.
fn port_of(container: &Value, port: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(name) => name.parse().ok().or_else(|| {
            container
                .get("ports")?
                .as_array()?
                .iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name))?
                .get("containerPort")?
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
        }),
        _ => None,
    }
}

fn rewrite_probes(spec: &mut Value) -> Rewritten {
    let mut out = Rewritten::default();
    let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) else {
        return out;
    };
    for container in containers {
        let name = container
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("app")
            .to_owned();
        for (field, kind) in [
            ("livenessProbe", "livez"),
            ("readinessProbe", "readyz"),
            ("startupProbe", "startupz"),
        ] {
            let Some(probe) = container.get(field).cloned() else {
                continue;
            };
            let mut original = Map::new();
            if let Some(h) = probe.get("httpGet") {
                let Some(port) = h.get("port").and_then(|p| port_of(container, p)) else {
                    continue;
                };
                if h.get("scheme")
                    .and_then(Value::as_str)
                    .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
                {
                    out.https_ports.push(port);
                    continue;
                }
                let mut h = h.clone();
                h["port"] = json!(port);
                if let Some(o) = h.as_object_mut() {
                    o.remove("scheme");
                }
                original.insert("httpGet".into(), h);
            } else if let Some(t) = probe.get("tcpSocket") {
                let Some(port) = t.get("port").and_then(|p| port_of(container, p)) else {
                    continue;
                };
                original.insert("tcpSocket".into(), json!({"port": port}));
            } else if let Some(g) = probe.get("grpc") {
                let mut g = g.clone();
                if let Some(o) = g.as_object_mut() {
                    o.retain(|k, _| k == "port" || k == "service");
                }
                original.insert("grpc".into(), g);
            } else {
                // exec probes run inside the container: nothing to rewrite.
                continue;
            }
            if let Some(t) = probe.get("timeoutSeconds") {
                original.insert("timeoutSeconds".into(), t.clone());
            }
            let path = format!("/app-health/{name}/{kind}");
            let mut rewritten = probe.clone();
            if let Some(o) = rewritten.as_object_mut() {
                o.remove("httpGet");
                o.remove("tcpSocket");
                o.remove("grpc");
                o.insert("httpGet".into(), json!({"path": path, "port": HEALTH_PORT}));
            }
            container[field] = rewritten;
            out.originals.insert(path, Value::Object(original));
        }
    }
    out
}

/// The pod template inside a workload object, by kind; `None` for kinds without pods.
pub fn pod_template_mut<'a>(kind: &str, object: &'a mut Value) -> Option<&'a mut Value> {
    match kind {
        "Pod" => Some(object),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => object.pointer_mut("/spec/template"),
        "CronJob" => object.pointer_mut("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
