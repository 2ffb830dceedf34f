//! The injection webhook, as the API server calls it: HTTPS with a certificate from the
//! controller's CA (checked here against that CA and the in-cluster Service name), the CA
//! patched into the MutatingWebhookConfiguration's caBundle at start, and AdmissionReviews
//! answered with a JSONPatch that turns the pod into exactly what `ferryctl inject` makes.
//! Pods in namespaces that did not opt in, hostNetwork pods and pods with bad annotations are
//! admitted unchanged.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use ferrymesh_controller::inject::{Settings, inject};
use ferrymesh_test_support::kube_api::{FakeApi, apply};
use ferrymesh_test_support::mesh::{Mesh, eventually};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const NAMESPACES: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, annotations: {ferrymesh.io/inject: enabled}}\n---\n\
                          apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n";

const CONFIGURATION: &str = "apiVersion: admissionregistration.k8s.io/v1\nkind: MutatingWebhookConfiguration\n\
    metadata: {name: ferrymesh-proxy-injector}\nwebhooks:\n- name: inject.ferrymesh.io\n  admissionReviewVersions: [v1]\n  sideEffects: None\n\
    \x20 clientConfig: {service: {name: ferrymesh-controller, namespace: ferrymesh-system, path: /inject, port: 9443}}\n";

fn pod(annotations: &Value, host_network: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "catalog-", "namespace": "shop", "labels": {"app": "catalog"}, "annotations": annotations},
        "spec": {
            "hostNetwork": host_network,
            "serviceAccountName": "catalog",
            "containers": [{
                "name": "app", "image": "ferrymesh/ferry-shop:0.1.0", "args": ["catalog"],
                "ports": [{"name": "http", "containerPort": 8080}],
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}},
            }],
        },
    })
}

fn review(pod: &Value, namespace: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "c1a5b5e0-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "dryRun": false,
        },
    })
}

/// POSTs a review over TLS, trusting only `ca_pem` and checking the in-cluster name.
async fn post(addr: SocketAddr, ca_pem: &str, body: &Value) -> Value {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("ferrymesh-controller.ferrymesh-system.svc")
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/inject")
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let rsp = sender.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    serde_json::from_slice(&rsp.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

fn patched(original: &Value, response: &Value) -> Option<Value> {
    let patch = response["response"]["patch"].as_str()?;
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    let ops: json_patch::Patch = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap(),
    )
    .unwrap();
    let mut pod = original.clone();
    json_patch::patch(&mut pod, &ops).unwrap();
    Some(pod)
}

#[tokio::test]
async fn the_webhook_injects_pods_of_opted_in_namespaces_over_tls_from_the_mesh_ca() {
    let api = FakeApi::start().await;
    api.install_mesh_crds();
    let client = api.client().await;
    apply(&client, NAMESPACES).await;
    apply(&client, CONFIGURATION).await;
    let ca = tempfile::tempdir().unwrap();
    let ca_dir = ca.path().join("ca");
    let mesh = Mesh::start_kubernetes(
        &api.kubeconfig(),
        &[
            "--ca-dir",
            ca_dir.to_str().unwrap(),
            "--identity-listen",
            "127.0.0.1:0",
            "--webhook-listen",
            "127.0.0.1:0",
            "--proxy-image",
            "kind.local/ferrymesh/proxy:dev",
        ],
    );
    let webhook = mesh.controller.addr("webhook");
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();

    // The caBundle is patched in at start, every webhook of the configuration.
    let expected = base64::engine::general_purpose::STANDARD.encode(&ca_pem);
    eventually(Duration::from_secs(10), || {
        let got = api
            .get(
                "/apis/admissionregistration.k8s.io/v1",
                "mutatingwebhookconfigurations",
                "",
                "ferrymesh-proxy-injector",
            )
            .map(|c| c["webhooks"][0]["clientConfig"]["caBundle"].clone());
        let expected = expected.clone();
        async move { got.is_some_and(|b| b == expected.as_str()) }
    })
    .await
    .expect("the caBundle is the CA");
    let configuration = api
        .get(
            "/apis/admissionregistration.k8s.io/v1",
            "mutatingwebhookconfigurations",
            "",
            "ferrymesh-proxy-injector",
        )
        .unwrap();
    assert_eq!(
        configuration["webhooks"][0]["clientConfig"]["service"]["path"], "/inject",
        "the rest is kept"
    );

    // An opted-in namespace: the patch makes exactly what the offline injector makes.
    let original = pod(&json!({}), false);
    let answer = post(webhook, &ca_pem, &review(&original, "shop")).await;
    assert_eq!(
        answer["response"]["uid"],
        "c1a5b5e0-0000-4000-8000-000000000001"
    );
    assert_eq!(answer["response"]["allowed"], true);
    let mutated = patched(&original, &answer)
        .unwrap_or_else(|| panic!("no patch: {answer}\n{}", mesh.controller.log_text()));
    let mut offline = original.clone();
    let settings = Settings {
        image: "kind.local/ferrymesh/proxy:dev".into(),
        ..Settings::default()
    };
    inject(&mut offline, &settings).unwrap();
    assert_eq!(mutated, offline);
    assert_eq!(
        mutated["spec"]["initContainers"][1]["restartPolicy"],
        "Always"
    );

    // Re-invocation on an injected pod changes nothing.
    let again = post(webhook, &ca_pem, &review(&mutated, "shop")).await;
    assert_eq!(again["response"]["allowed"], true);
    assert!(patched(&mutated, &again).is_none_or(|p| p == mutated));

    // Not opted in, opted out on the pod, hostNetwork: admitted unchanged.
    for (p, ns) in [
        (pod(&json!({}), false), "other"),
        (
            pod(&json!({"ferrymesh.io/inject": "disabled"}), false),
            "shop",
        ),
        (pod(&json!({}), true), "shop"),
    ] {
        let a = post(webhook, &ca_pem, &review(&p, ns)).await;
        assert_eq!(a["response"]["allowed"], true);
        assert!(a["response"]["patch"].is_null(), "{ns}: {a}");
    }
    // A bad annotation: admitted unchanged, with a warning that says why.
    let bad = pod(
        &json!({"config.ferrymesh.io/skip-subnets": "10.0.0.0/99"}),
        false,
    );
    let a = post(webhook, &ca_pem, &review(&bad, "shop")).await;
    assert_eq!(a["response"]["allowed"], true);
    assert!(a["response"]["patch"].is_null());
    assert!(
        a["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("skip-subnets"),
        "{a}"
    );
}
