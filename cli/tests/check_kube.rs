//! `ferryctl check --kube` against a fake API server: each part of an install (CRDs and the
//! version they serve, the Gateway API, the controller and its watches (read from a real
//! controller through the API server's service proxy), the webhook's CA and Service, every
//! injected proxy) is reported, a missing or unready part fails the check by name, a missing
//! optional API is a warning, and a healthy install passes.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use ferrymesh_test_support::kube_api::{FakeApi, apply};
use ferrymesh_test_support::mesh::Mesh;
use ferrymesh_test_support::process::bin;

fn check(api: &FakeApi) -> (bool, String) {
    let out = Command::new(bin("ferryctl"))
        .env("RUST_BACKTRACE", "0")
        .args(["check", "--kube", "--kubeconfig"])
        .arg(api.kubeconfig())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

const CONTROLLER: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: ferrymesh-controller, namespace: ferrymesh-system}\n\
    spec: {replicas: 2, selector: {matchLabels: {a: b}}, template: {metadata: {labels: {a: b}}, spec: {containers: [{name: c, image: i}]}}}\n\
    status: {replicas: 2, readyReplicas: 2}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: ferrymesh-controller, namespace: ferrymesh-system}\nspec: {ports: [{name: https-webhook, port: 443}, {name: http-admin, port: 9990}]}\n---\n\
    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ferrymesh-controller-x, namespace: ferrymesh-system, labels: {kubernetes.io/service-name: ferrymesh-controller}}\n\
    addressType: IPv4\nports: [{name: https-webhook, port: 9443}]\nendpoints: [{addresses: [10.0.0.9], conditions: {ready: true}}]\n---\n\
    apiVersion: admissionregistration.k8s.io/v1\nkind: MutatingWebhookConfiguration\nmetadata: {name: ferrymesh-proxy-injector}\n\
    webhooks: [{name: inject.ferrymesh.io, clientConfig: {caBundle: LS0tLS1CRUdJTg==, service: {name: ferrymesh-controller, namespace: ferrymesh-system}}}]\n";

fn pod(name: &str, ready: bool) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, annotations: {{ferrymesh.io/injected: \"true\"}}}}\n\
         spec: {{containers: [{{name: app, image: x}}]}}\n\
         status: {{initContainerStatuses: [{{name: ferrymesh-proxy, ready: {ready}, restartCount: 0, image: p, imageID: p}}]}}\n"
    )
}

/// The controller's admin port as the Service's `http-admin` endpoint.
fn admin_slice(admin: std::net::SocketAddr) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: ferrymesh-controller-admin, namespace: ferrymesh-system, labels: {{kubernetes.io/service-name: ferrymesh-controller}}}}\n\
         addressType: IPv4\nports: [{{name: http-admin, port: {}}}]\nendpoints: [{{addresses: [\"{}\"], conditions: {{ready: true}}}}]\n",
        admin.port(),
        admin.ip()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_is_checked_part_by_part() {
    let api = FakeApi::start().await;
    let client = api.client().await;
    // Nothing installed: every part fails, by name.
    let (ok, out) = check(&api);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL CRDs missing: resiliencepolicies.policy.ferrymesh.io"),
        "{out}"
    );
    assert!(
        out.contains("FAIL controller Deployment ferrymesh-system/ferrymesh-controller not found"),
        "{out}"
    );
    assert!(
        out.contains("FAIL webhook configuration ferrymesh-proxy-injector not found"),
        "{out}"
    );
    assert!(
        out.contains("WARN Gateway API CRDs missing: httproutes.gateway.networking.k8s.io"),
        "{out}"
    );
    assert!(
        out.contains("FAIL controller watches: /status through the service proxy"),
        "{out}"
    );

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n != "kustomization.yaml") {
            apply(&client, &std::fs::read_to_string(path).unwrap()).await;
        }
    }
    apply(&client, CONTROLLER).await;
    // A real controller on the fake API, reached at its Service's admin port.
    let mesh = Mesh::start_kubernetes(&api.kubeconfig(), &[]);
    apply(&client, &admin_slice(mesh.controller.addr("admin"))).await;
    apply(&client, &pod("catalog-1", true)).await;
    apply(&client, &pod("catalog-2", false)).await;
    let out =
        ferrymesh_test_support::mesh::eventually(std::time::Duration::from_secs(10), || async {
            check(&api).1.contains("controller watches synced")
        })
        .await
        .map(|_| check(&api));
    let (ok, out) = out.unwrap_or_else(|e| panic!("{e}: {}", check(&api).1));
    assert!(!ok, "{out}");
    assert!(
        out.contains("ok   CRDs installed, established and serving v1alpha1 (5)"),
        "{out}"
    );
    assert!(
        out.contains("WARN controller watches synced (8/10); not watching GRPCRoute, HTTPRoute (API not installed)"),
        "{out}"
    );
    assert!(out.contains("ok   controller ready (2/2)"), "{out}");
    assert!(
        out.contains("ok   webhook configured with the mesh CA (1/1"),
        "{out}"
    );
    assert!(out.contains("ok   webhook reachable: Service ferrymesh-system/ferrymesh-controller has 2 ready endpoint(s)"), "{out}");
    assert!(
        out.contains("FAIL injected proxies not ready (1/2): shop/catalog-2"),
        "{out}"
    );

    // The kubelet reports the proxy ready (on the status subresource).
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client.clone(), "shop");
    let ready = serde_json::json!({"status": {"initContainerStatuses": [
        {"name": "ferrymesh-proxy", "ready": true, "restartCount": 0, "image": "p", "imageID": "p"}]}});
    pods.patch_status(
        "catalog-2",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&ready),
    )
    .await
    .unwrap();
    // The Gateway API installed later: watched, and the install is whole.
    api.install_gateway_api();
    ferrymesh_test_support::mesh::eventually(std::time::Duration::from_secs(10), || async {
        check(&api)
            .1
            .contains("ok   controller watches synced (10/10)")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", check(&api).1));
    let (ok, out) = check(&api);
    assert!(ok, "{out}");
    assert!(
        out.contains("ok   injected proxies connected and certified (2/2)"),
        "{out}"
    );
    assert!(
        out.contains("ok   Gateway API route CRDs installed"),
        "{out}"
    );
    assert!(!out.contains("WARN"), "{out}");
}
