//! The sidecar injector as a mutating admission webhook (API.md 2.c): HTTPS with a serving
//! certificate from the controller's own CA, `POST /inject` with an `AdmissionReview` for Pod
//! CREATE, answered with a JSONPatch made by [`crate::inject`] (the same code as `ferryctl
//! inject`). At start the CA's anchor is patched into the `caBundle` of the
//! MutatingWebhookConfiguration, so the API server trusts the webhook without a cert-manager.
//! A pod the injector cannot mutate (a bad annotation) is still admitted, unchanged, with a
//! warning: cluster availability over mesh coverage, as `failurePolicy: Ignore` says.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::inject::{self, Outcome, Settings};

/// The MutatingWebhookConfiguration the controller keeps the caBundle of.
pub const CONFIGURATION: &str = "ferrymesh-proxy-injector";

/// What the webhook needs.
#[derive(Clone)]
pub struct Webhook {
    /// The injector's settings (image, controller addresses, cluster default policy).
    pub settings: Settings,
    /// Reads namespace annotations (the opt-in lives there as often as on the pod).
    pub client: Option<kube::Client>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("settings", &self.settings)
            .field("client", &self.client.is_some())
            .finish()
    }
}

/// Patches `caBundle` (base64 PEM of the CA anchors) into every webhook of `configuration`.
///
/// # Errors
/// The configuration does not exist or cannot be patched.
pub async fn patch_ca_bundle(
    client: &kube::Client,
    configuration: &str,
    ca_pem: &str,
) -> anyhow::Result<()> {
    let ar = kube::core::ApiResource {
        group: "admissionregistration.k8s.io".into(),
        version: "v1".into(),
        api_version: "admissionregistration.k8s.io/v1".into(),
        kind: "MutatingWebhookConfiguration".into(),
        plural: "mutatingwebhookconfigurations".into(),
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let current = api
        .get(configuration)
        .await
        .with_context(|| format!("reading MutatingWebhookConfiguration {configuration}"))?;
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let mut webhooks = current.data["webhooks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for w in &mut webhooks {
        w["clientConfig"]["caBundle"] = json!(bundle);
    }
    // A merge patch replaces the list whole: every webhook keeps its fields, with the bundle.
    api.patch(
        configuration,
        &PatchParams::default(),
        &Patch::Merge(json!({"webhooks": webhooks})),
    )
    .await
    .with_context(|| format!("patching the caBundle of {configuration}"))?;
    tracing::info!(configuration, "webhook caBundle patched");
    Ok(())
}

/// The answer to one review.
async fn review(hook: &Webhook, body: &[u8]) -> Result<Value, String> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|e| format!("no request in the review: {e}"))?;
    let mut response = AdmissionResponse::from(&request);
    let is_pod = request.kind.kind == "Pod" && request.kind.group.is_empty();
    if let (true, Some(object)) = (is_pod, &request.object) {
        let original = serde_json::to_value(object).map_err(|e| e.to_string())?;
        let namespace = request.namespace.clone().unwrap_or_default();
        let ns_annotations = namespace_annotations(hook, &namespace).await;
        if inject::wanted(&original, &ns_annotations, false) {
            let mut pod = original.clone();
            match inject::inject(&mut pod, &hook.settings) {
                Ok(Outcome::Injected) => {
                    let patch = json_patch::diff(&original, &pod);
                    response = response.with_patch(patch).map_err(|e| e.to_string())?;
                    tracing::info!(%namespace, name = ?request.name, "injected");
                }
                Ok(Outcome::Skipped(why)) => tracing::debug!(%namespace, why, "not injected"),
                Err(e) => {
                    tracing::warn!(%namespace, error = %e, "not injected: bad annotation");
                    response.warnings = Some(vec![format!("ferrymesh: not injected: {e}")]);
                }
            }
        }
    }
    let mut review = serde_json::to_value(response.into_review()).map_err(|e| e.to_string())?;
    // The API documents the patch as base64 (Go's []byte); kube-core writes an array of numbers.
    if let Some(bytes) = review["response"]["patch"].as_array() {
        let raw: Vec<u8> = bytes
            .iter()
            .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect();
        review["response"]["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(raw));
    }
    Ok(review)
}

async fn namespace_annotations(hook: &Webhook, namespace: &str) -> serde_json::Map<String, Value> {
    let Some(client) = &hook.client else {
        return serde_json::Map::new();
    };
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    match api.get(namespace).await {
        Ok(ns) => ns
            .metadata
            .annotations
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
        Err(e) => {
            tracing::warn!(namespace, error = %e, "namespace annotations unavailable");
            serde_json::Map::new()
        }
    }
}

async fn handle(hook: Arc<Webhook>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let respond = |status: StatusCode, body: String| {
        let mut rsp = Response::new(Full::new(Bytes::from(body)));
        *rsp.status_mut() = status;
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        rsp
    };
    if req.method() != Method::POST || req.uri().path() != "/inject" {
        return respond(StatusCode::NOT_FOUND, "{}".into());
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return respond(
                StatusCode::BAD_REQUEST,
                json!({"error": e.to_string()}).to_string(),
            );
        }
    };
    match review(&hook, &body).await {
        Ok(v) => respond(StatusCode::OK, v.to_string()),
        Err(e) => respond(StatusCode::BAD_REQUEST, json!({"error": e}).to_string()),
    }
}

/// Binds the webhook's listener.
///
/// # Errors
/// The address cannot be bound.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the webhook listener on {addr}"))
}

/// Serves the webhook over TLS (`cert`, `key` PEM) until shutdown.
///
/// # Errors
/// The certificate cannot be loaded.
pub async fn serve(
    hook: Webhook,
    listener: TcpListener,
    cert_pem: &str,
    key_pem: &str,
    limits: crate::guard::Limits,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject as _;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the webhook certificate")?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .context("the webhook key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let hook = Arc::new(hook);
    // The API server reaches this port; nobody else who can should be able to exhaust it.
    let mut incoming = crate::guard::incoming(
        listener,
        "webhook",
        limits,
        metrics,
        crate::guard::tls(acceptor),
        shutdown,
    );
    while let Some(Ok(tls)) = futures::StreamExt::next(&mut incoming).await {
        let hook = hook.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let hook = hook.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(hook, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
    Ok(())
}
