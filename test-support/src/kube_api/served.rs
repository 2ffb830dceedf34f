//! What the fake API server serves: the built-in kinds, the custom kinds whose CRDs are
//! installed, discovery documents listing both, and the admission checks a write passes
//! (CRDs against the API server's CRD rules, custom resources against their schema).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{ResourceKey, schema};

/// The built-in kinds served from the start: `(api prefix, plural, kind, namespaced)`.
pub const BUILTIN: &[(&str, &str, &str, bool)] = &[
    ("/api/v1", "namespaces", "Namespace", false),
    ("/api/v1", "nodes", "Node", false),
    ("/api/v1", "pods", "Pod", true),
    ("/api/v1", "services", "Service", true),
    ("/api/v1", "endpoints", "Endpoints", true),
    ("/api/v1", "secrets", "Secret", true),
    ("/api/v1", "configmaps", "ConfigMap", true),
    ("/api/v1", "serviceaccounts", "ServiceAccount", true),
    ("/api/v1", "events", "Event", true),
    (
        "/apis/discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
        true,
    ),
    ("/apis/apps/v1", "deployments", "Deployment", true),
    ("/apis/apps/v1", "statefulsets", "StatefulSet", true),
    ("/apis/apps/v1", "daemonsets", "DaemonSet", true),
    ("/apis/apps/v1", "replicasets", "ReplicaSet", true),
    ("/apis/batch/v1", "jobs", "Job", true),
    ("/apis/batch/v1", "cronjobs", "CronJob", true),
    (
        "/apis/policy/v1",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
        true,
    ),
    ("/apis/coordination.k8s.io/v1", "leases", "Lease", true),
    (
        "/apis/authentication.k8s.io/v1",
        "tokenreviews",
        "TokenReview",
        false,
    ),
    (
        "/apis/admissionregistration.k8s.io/v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        false,
    ),
    (
        "/apis/admissionregistration.k8s.io/v1",
        "validatingwebhookconfigurations",
        "ValidatingWebhookConfiguration",
        false,
    ),
    (
        "/apis/apiextensions.k8s.io/v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
    ),
];

/// The CRD resource.
pub fn crd_resource() -> ResourceKey {
    (
        "/apis/apiextensions.k8s.io/v1".to_owned(),
        "customresourcedefinitions".to_owned(),
    )
}

/// One served custom kind (a version of an installed CRD).
#[derive(Debug, Clone)]
pub struct Custom {
    /// The CRD's name.
    pub crd: String,
    /// Kind.
    pub kind: String,
    /// Namespaced.
    pub namespaced: bool,
    /// The version's OpenAPI schema.
    pub schema: Value,
}

/// The custom kinds served now, by resource.
#[derive(Debug, Default)]
pub struct Registry {
    custom: BTreeMap<ResourceKey, Custom>,
}

impl Registry {
    /// Whether the resource is served.
    pub fn serves(&self, resource: &ResourceKey) -> bool {
        self.custom.contains_key(resource)
            || BUILTIN
                .iter()
                .any(|(p, plural, ..)| *p == resource.0 && *plural == resource.1)
    }

    /// The custom kind at `resource`, if it is one.
    pub fn custom(&self, resource: &ResourceKey) -> Option<&Custom> {
        self.custom.get(resource)
    }

    /// Serves every served version of an (accepted) CRD.
    pub fn install(&mut self, crd: &Value) {
        let name = crd["metadata"]["name"].as_str().unwrap_or("").to_owned();
        self.remove(&name);
        let spec = &crd["spec"];
        let group = spec["group"].as_str().unwrap_or("");
        for v in spec["versions"].as_array().into_iter().flatten() {
            if v["served"] == Value::Bool(false) {
                continue;
            }
            let version = v["name"].as_str().unwrap_or("");
            self.custom.insert(
                (
                    format!("/apis/{group}/{version}"),
                    spec["names"]["plural"].as_str().unwrap_or("").to_owned(),
                ),
                Custom {
                    crd: name.clone(),
                    kind: spec["names"]["kind"].as_str().unwrap_or("").to_owned(),
                    namespaced: spec["scope"] == "Namespaced",
                    schema: v["schema"]["openAPIV3Schema"].clone(),
                },
            );
        }
    }

    /// Stops serving a CRD's kinds; returns their resources (whose objects go with them).
    pub fn remove(&mut self, crd: &str) -> Vec<ResourceKey> {
        let gone: Vec<ResourceKey> = self
            .custom
            .iter()
            .filter(|(_, c)| c.crd == crd)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.custom.remove(k);
        }
        gone
    }

    /// Every served `(prefix, plural, kind, namespaced)`.
    fn all(&self) -> Vec<(String, String, String, bool)> {
        BUILTIN
            .iter()
            .map(|(p, r, k, n)| ((*p).to_owned(), (*r).to_owned(), (*k).to_owned(), *n))
            .chain(
                self.custom
                    .iter()
                    .map(|((p, r), c)| (p.clone(), r.clone(), c.kind.clone(), c.namespaced)),
            )
            .collect()
    }

    /// The discovery document at `path` (`/api`, `/api/v1`, `/apis`, `/apis/<g>/<v>`), if
    /// that is a discovery path of a served API.
    pub fn discovery(&self, path: &str) -> Option<Value> {
        let path = path.trim_end_matches('/');
        let all = self.all();
        match path {
            "/api" => Some(json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})),
            "/apis" => {
                let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (prefix, ..) in &all {
                    if let Some(gv) = prefix.strip_prefix("/apis/")
                        && let Some((g, v)) = gv.split_once('/')
                    {
                        let versions = groups.entry(g.to_owned()).or_default();
                        if !versions.iter().any(|x| x == v) {
                            versions.push(v.to_owned());
                        }
                    }
                }
                let groups: Vec<Value> = groups
                    .into_iter()
                    .map(|(g, vs)| {
                        let versions: Vec<Value> = vs
                            .iter()
                            .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                            .collect();
                        json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                    })
                    .collect();
                Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
            }
            _ => {
                let resources: Vec<Value> = all
                    .iter()
                    .filter(|(p, ..)| p == path)
                    .map(|(_, plural, kind, namespaced)| {
                        json!({"name": plural, "singularName": kind.to_ascii_lowercase(), "namespaced": namespaced, "kind": kind,
                               "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
                    })
                    .collect();
                if resources.is_empty() {
                    return None;
                }
                let group_version = path
                    .strip_prefix("/apis/")
                    .or_else(|| path.strip_prefix("/api/"))?;
                Some(json!({"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": group_version, "resources": resources}))
            }
        }
    }
}

/// Why a write is refused (`422 Invalid` with the server's message), or the warnings it
/// comes back with.
pub fn admit(
    registry: &Registry,
    resource: &ResourceKey,
    object: &Value,
) -> Result<Vec<String>, String> {
    let name = object["metadata"]["name"].as_str().unwrap_or("");
    if *resource == crd_resource() {
        let problems = schema::check_crd(object);
        let (warnings, errors): (Vec<_>, Vec<_>) = problems.into_iter().partition(|p| p.warning);
        if errors.is_empty() {
            return Ok(warnings.into_iter().map(|p| p.message).collect());
        }
        let list: Vec<String> = errors.into_iter().map(|p| p.message).collect();
        return Err(format!(
            "CustomResourceDefinition.apiextensions.k8s.io {name:?} is invalid: [{}]",
            list.join(", ")
        ));
    }
    if let Some(custom) = registry.custom(resource) {
        let errors = schema::validate(&custom.schema, object);
        if !errors.is_empty() {
            let group = resource
                .0
                .trim_start_matches("/apis/")
                .split('/')
                .next()
                .unwrap_or("");
            return Err(format!(
                "{}.{group} {name:?} is invalid: [{}]",
                custom.kind,
                errors.join(", ")
            ));
        }
    }
    Ok(Vec::new())
}

/// What the server stores of a write: for built-in kinds, a nil slice without `omitempty`
/// comes back `null` (EndpointSlice `endpoints` and `ports`); an accepted CRD is marked
/// Established with its names accepted.
pub fn normalize(resource: &ResourceKey, object: &mut Value) {
    if resource.1 == "endpointslices" && resource.0 == "/apis/discovery.k8s.io/v1" {
        for field in ["endpoints", "ports"] {
            let empty = object
                .get(field)
                .is_none_or(|v| v.as_array().is_some_and(Vec::is_empty));
            if empty {
                object[field] = Value::Null;
            }
        }
    }
    if *resource == crd_resource() {
        object["status"] = json!({
            "acceptedNames": object["spec"]["names"].clone(),
            "storedVersions": object["spec"]["versions"].as_array().into_iter().flatten()
                .filter(|v| v["storage"] == Value::Bool(true)).map(|v| v["name"].clone()).collect::<Vec<_>>(),
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            ],
        });
    }
}
