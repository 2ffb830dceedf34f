//! Identity on the Kubernetes source: the CA lives in a Secret (created on first start,
//! loaded on every later one, so a restarted controller keeps issuing from the same anchor),
//! and a workload proves its service account with its ServiceAccount token, checked by a
//! TokenReview against the API server with the audience `identity.ferrymesh.io`. Sidecars
//! certified that way talk mTLS; a token of another service account, or one issued for
//! another audience, gets no certificate.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use base64::Engine as _;

use ferrymesh_test_support::kube_api::{FakeApi, apply};
use ferrymesh_test_support::mesh::{
    Mesh, ProxySpec, client_proxy, eventually, get, get_json, proxied,
};
use ferrymesh_test_support::upstream::HttpEcho;

const SERVICE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n";
const AUDIENCE: &str = "identity.ferrymesh.io";

// Multi-threaded: the controller asks the fake API server for its CA before it reports its
// ports, while this thread waits for that report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_are_certified_by_token_review_from_a_ca_kept_in_a_secret() {
    let api = FakeApi::start().await;
    api.install_mesh_crds();
    let client = api.client().await;
    apply(&client, SERVICE).await;
    let mesh = Mesh::start_kubernetes_secure(&api.kubeconfig(), &[]);

    // The first start stored its new CA in the Secret.
    let secret = api
        .get("/api/v1", "secrets", "ferrymesh-system", "ferrymesh-ca")
        .expect("the CA Secret");
    let ca_pem = std::fs::read_to_string(mesh.identity_dir().join("ca/ca.pem")).unwrap();
    let stored = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["ca.pem"].as_str().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(stored).unwrap(), ca_pem);

    // Injected pods find the anchors in a ConfigMap of their namespace.
    eventually(Duration::from_secs(5), || {
        let cm = api.get("/api/v1", "configmaps", "shop", "ferrymesh-trust-anchors");
        let expected = ca_pem.clone();
        async move {
            cm.is_some_and(|c| {
                c["data"]["ca.pem"]
                    .as_str()
                    .is_some_and(|p| p.trim() == expected.trim())
            })
        }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}\n{}",
            api.get("/api/v1", "configmaps", "shop", "ferrymesh-trust-anchors"),
            mesh.controller.log_text()
        )
    });

    // Tokens as the kubelet would project them: one per service account, for our audience.
    let token = |sa: &str| std::fs::read_to_string(mesh.token(sa)).unwrap();
    api.add_token(&token("echo"), "shop", "echo", &[AUDIENCE]);
    api.add_token(&token("client"), "shop", "client", &[AUDIENCE]);
    // Another service account's token, and one for another audience.
    api.add_token(&token("thief"), "shop", "echo", &[AUDIENCE]);
    api.add_token(
        &token("elsewhere"),
        "shop",
        "elsewhere",
        &["https://kubernetes.default.svc"],
    );

    let echo = HttpEcho::start("echo-1").await;
    let server = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let client_side = client_proxy(&mesh, "echo.shop", 1).await;
    let rsp = proxied(client_side.addr("outbound"))
        .get("http://echo.shop/")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    let identity = get_json(server.addr("admin"), "/identity").await;
    assert_eq!(
        identity["identity"], "spiffe://cluster.local/ns/shop/sa/echo",
        "{identity}"
    );
    // The client reached it over mTLS: the endpoint it holds expects that identity.
    let dump = get_json(client_side.addr("admin"), "/config_dump").await;
    let endpoint = dump["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "ENDPOINTS")
        .unwrap()["value"]["endpoints"][0]
        .clone();
    assert_eq!(
        endpoint["identity"], "spiffe://cluster.local/ns/shop/sa/echo",
        "{endpoint}"
    );

    // "thief" holds a token of shop/echo, not of its own account; "elsewhere" holds one for
    // another audience. Neither gets a certificate, so neither becomes ready.
    for (sa, why) in [("thief", "belongs to"), ("elsewhere", "not valid")] {
        let p = mesh.proxy(&ProxySpec::app(sa, sa, echo.addr));
        // Refused at least twice (it retries), and still not ready.
        eventually(Duration::from_secs(10), || {
            let refusals = p.log_text().matches(why).count();
            async move { refusals >= 2 }
        })
        .await
        .unwrap_or_else(|e| panic!("{sa}: {e}: {}", p.log_text()));
        let (status, _) = get(p.addr("health"), "/ready").await.unwrap();
        assert_eq!(status, 503, "{sa} must not be certified");
    }

    // A new controller with an empty CA folder loads the same CA from the Secret.
    let again = Mesh::start_kubernetes_secure(&api.kubeconfig(), &[]);
    eventually(Duration::from_secs(5), || {
        let path = again.identity_dir().join("ca/ca.pem");
        let expected = ca_pem.clone();
        async move { std::fs::read_to_string(path).is_ok_and(|p| p == expected) }
    })
    .await
    .expect("the same CA after a restart");
}
