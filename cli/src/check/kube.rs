//! `ferryctl check --kube`: the health of an install, as a student checks it after
//! `make kind-deploy`. Each line says ok or FAIL and what to look at:
//! - the CRDs are installed (every kind `ferrymesh-controller crds` generates), established,
//!   and serving the version the controller reads;
//! - the Gateway API's route CRDs are installed (a warning when not: the controller then does
//!   not watch routes);
//! - the controller Deployment has ready replicas, and its watches are healthy (its `/status`,
//!   read through the API server's service proxy): every kind listed, none failing;
//! - the injection webhook is configured with the mesh CA (caBundle set on every webhook) and
//!   its Service has ready endpoints to reach;
//! - every injected pod's proxy is ready, which it only is once connected to the controller and
//!   holding a certificate.

use anyhow::bail;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{DynamicObject, ListParams};

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Passed.
    pub ok: bool,
    /// Passed, but something optional is missing.
    pub warn: bool,
    /// What was checked, and what was found.
    pub text: String,
}

fn line(ok: bool, text: impl Into<String>) -> Line {
    Line {
        ok,
        warn: false,
        text: text.into(),
    }
}

fn warning(text: impl Into<String>) -> Line {
    Line {
        ok: true,
        warn: true,
        text: text.into(),
    }
}

const SYSTEM: &str = "ferrymesh-system";
const CONTROLLER: &str = "ferrymesh-controller";

async fn crds(client: &kube::Client) -> Line {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    let all = ferrymesh_controller::crd::all();
    for crd in &all {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let version = crd.spec.versions[0].name.clone();
        match api.get_opt(&name).await {
            Ok(Some(installed)) => {
                let served = installed
                    .spec
                    .versions
                    .iter()
                    .any(|v| v.name == version && v.served);
                let established = installed
                    .status
                    .and_then(|s| s.conditions)
                    .into_iter()
                    .flatten()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if !served {
                    wrong.push(format!("{name} does not serve {version}"));
                } else if !established {
                    wrong.push(format!("{name} is not Established"));
                }
            }
            _ => missing.push(name),
        }
    }
    if !wrong.is_empty() {
        line(
            false,
            format!(
                "CRDs not usable: {} (kubectl apply --server-side -k manifests/crds)",
                wrong.join(", ")
            ),
        )
    } else if missing.is_empty() {
        line(
            true,
            format!(
                "CRDs installed, established and serving v1alpha1 ({})",
                all.len()
            ),
        )
    } else {
        line(
            false,
            format!(
                "CRDs missing: {} (kubectl apply --server-side -k manifests/base)",
                missing.join(", ")
            ),
        )
    }
}

async fn controller(client: &kube::Client) -> Line {
    let api: Api<Deployment> = Api::namespaced(client.clone(), SYSTEM);
    match api.get_opt(CONTROLLER).await {
        Ok(Some(d)) => {
            let wanted = d.spec.and_then(|s| s.replicas).unwrap_or(1);
            let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            line(
                ready >= 1,
                format!(
                    "controller ready ({ready}/{wanted}){}",
                    if ready >= 1 {
                        ""
                    } else {
                        ": kubectl -n ferrymesh-system logs deploy/ferrymesh-controller"
                    }
                ),
            )
        }
        Ok(None) => line(
            false,
            "controller Deployment ferrymesh-system/ferrymesh-controller not found",
        ),
        Err(e) => line(false, format!("controller: {e}")),
    }
}

async fn webhook(client: &kube::Client) -> Vec<Line> {
    let ar = kube::core::ApiResource {
        group: "admissionregistration.k8s.io".into(),
        version: "v1".into(),
        api_version: "admissionregistration.k8s.io/v1".into(),
        kind: "MutatingWebhookConfiguration".into(),
        plural: "mutatingwebhookconfigurations".into(),
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let configured = match api
        .get_opt(ferrymesh_controller::webhook::CONFIGURATION)
        .await
    {
        Ok(Some(c)) => {
            let hooks = c.data["webhooks"].as_array().cloned().unwrap_or_default();
            let with_ca = hooks
                .iter()
                .filter(|w| {
                    w["clientConfig"]["caBundle"]
                        .as_str()
                        .is_some_and(|b| !b.is_empty())
                })
                .count();
            line(
                !hooks.is_empty() && with_ca == hooks.len(),
                format!(
                    "webhook configured with the mesh CA ({with_ca}/{} webhooks have the caBundle)",
                    hooks.len()
                ),
            )
        }
        Ok(None) => line(
            false,
            "webhook configuration ferrymesh-proxy-injector not found",
        ),
        Err(e) => line(false, format!("webhook configuration: {e}")),
    };
    // The API server reaches the webhook through the controller Service's ready endpoints.
    let services: Api<Service> = Api::namespaced(client.clone(), SYSTEM);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), SYSTEM);
    let reachable = match services.get_opt(CONTROLLER).await {
        Ok(Some(_)) => {
            let lp =
                ListParams::default().labels(&format!("kubernetes.io/service-name={CONTROLLER}"));
            let ready = slices.list(&lp).await.map_or(0, |l| {
                l.items
                    .iter()
                    .flat_map(|s| &s.endpoints)
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                    .count()
            });
            line(
                ready > 0,
                format!(
                    "webhook reachable: Service {SYSTEM}/{CONTROLLER} has {ready} ready endpoint(s)"
                ),
            )
        }
        Ok(None) => line(
            false,
            format!("webhook unreachable: no Service {SYSTEM}/{CONTROLLER}"),
        ),
        Err(e) => line(false, format!("webhook Service: {e}")),
    };
    vec![configured, reachable]
}

async fn proxies(client: &kube::Client) -> Line {
    let api: Api<Pod> = Api::all(client.clone());
    let pods = match api.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(e) => return line(false, format!("pods: {e}")),
    };
    let injected: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ferrymesh_controller::inject::INJECTED))
                .is_some_and(|v| v == "true")
        })
        .collect();
    let mut not_ready = Vec::new();
    for p in &injected {
        let status = p.status.as_ref();
        let proxy_ready = status
            .into_iter()
            .flat_map(|s| {
                s.init_container_statuses
                    .iter()
                    .flatten()
                    .chain(s.container_statuses.iter().flatten())
            })
            .any(|c| c.name == ferrymesh_controller::inject::PROXY_CONTAINER && c.ready);
        if !proxy_ready {
            not_ready.push(format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or(""),
                p.metadata.name.as_deref().unwrap_or("")
            ));
        }
    }
    let ready = injected.len() - not_ready.len();
    if not_ready.is_empty() {
        line(
            true,
            format!(
                "injected proxies connected and certified ({ready}/{})",
                injected.len()
            ),
        )
    } else {
        line(
            false,
            format!(
                "injected proxies not ready ({ready}/{}): {} (kubectl logs <pod> -c ferrymesh-proxy)",
                injected.len(),
                not_ready.join(", ")
            ),
        )
    }
}

/// The Gateway API route CRDs (standard channel) the controller watches when present.
async fn gateway_api(client: &kube::Client) -> Line {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut missing = Vec::new();
    for name in [
        "httproutes.gateway.networking.k8s.io",
        "grpcroutes.gateway.networking.k8s.io",
    ] {
        if !matches!(api.get_opt(name).await, Ok(Some(_))) {
            missing.push(name);
        }
    }
    if missing.is_empty() {
        line(true, "Gateway API route CRDs installed")
    } else {
        warning(format!(
            "Gateway API CRDs missing: {}: routes are not watched until they are (make gateway-api)",
            missing.join(", ")
        ))
    }
}

/// The controller's watches, from its `/status` through the API server's service proxy.
async fn watches(client: &kube::Client) -> Line {
    let path =
        format!("/api/v1/namespaces/{SYSTEM}/services/http:{CONTROLLER}:http-admin/proxy/status");
    let request = match http::Request::get(&path).body(Vec::new()) {
        Ok(r) => r,
        Err(e) => return line(false, format!("controller watches: {e}")),
    };
    let status: serde_json::Value = match client.request(request).await {
        Ok(s) => s,
        Err(e) => {
            return line(
                false,
                format!("controller watches: /status through the service proxy: {e}"),
            );
        }
    };
    let watches = status["watches"].as_array().cloned().unwrap_or_default();
    if watches.is_empty() {
        return line(
            false,
            "controller watches: none reported (is the controller on --source kubernetes?)",
        );
    }
    let mut bad = Vec::new();
    let mut optional = Vec::new();
    for w in &watches {
        let kind = w["kind"].as_str().unwrap_or("?");
        let message = w["message"].as_str().unwrap_or("");
        match w["state"].as_str().unwrap_or("") {
            "Synced" => {}
            "NotInstalled" if w["optional"] == true => optional.push(kind.to_owned()),
            state => bad.push(format!("{kind} {state}: {message}")),
        }
    }
    let synced = watches.len() - bad.len() - optional.len();
    if !bad.is_empty() {
        line(
            false,
            format!(
                "controller watches unhealthy ({synced}/{} synced): {}",
                watches.len(),
                bad.join("; ")
            ),
        )
    } else if optional.is_empty() {
        line(
            true,
            format!("controller watches synced ({synced}/{})", watches.len()),
        )
    } else {
        warning(format!(
            "controller watches synced ({synced}/{}); not watching {} (API not installed)",
            watches.len(),
            optional.join(", ")
        ))
    }
}

/// Every check, in order.
pub async fn checks(client: &kube::Client) -> Vec<Line> {
    let mut lines = vec![
        crds(client).await,
        gateway_api(client).await,
        controller(client).await,
        watches(client).await,
    ];
    lines.extend(webhook(client).await);
    lines.push(proxies(client).await);
    lines
}

/// Runs the checks and prints them.
///
/// # Errors
/// No cluster to talk to, or a check failed.
pub async fn run(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<()> {
    let client = ferrymesh_controller::run::kube_client(kubeconfig).await?;
    let lines = checks(&client).await;
    for l in &lines {
        let mark = match (l.ok, l.warn) {
            (false, _) => "FAIL",
            (true, true) => "WARN",
            (true, false) => "ok  ",
        };
        println!("{mark} {}", l.text);
    }
    let failed = lines.iter().filter(|l| !l.ok).count();
    if failed > 0 {
        bail!("{failed} install check(s) failed");
    }
    Ok(())
}
