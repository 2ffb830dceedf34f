//! The CA's trust anchors in a Kubernetes Secret (`--ca-secret namespace/name`): the first
//! controller creates the CA and stores it there; every later start (a restart, a new
//! replica) loads the same one, so workload certificates stay valid across controller pods.
//! The Secret's `anchors.pem` (the next or previous anchor during a rotation) is copied into
//! the CA folder every few seconds, and the bundle on Discovery follows it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;

use super::{CA_CERT, CA_KEY, EXTRA_ANCHORS, write_private};

/// Writes the Secret's files into `dir`; `false` when the Secret does not exist.
async fn pull(api: &Api<Secret>, name: &str, dir: &Path) -> anyhow::Result<bool> {
    let Some(secret) = api.get_opt(name).await.context("reading the CA Secret")? else {
        return Ok(false);
    };
    let data = secret.data.unwrap_or_default();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for file in [CA_CERT, CA_KEY] {
        let bytes = data
            .get(file)
            .with_context(|| format!("the CA Secret {name} has no {file}"))?;
        write_private(&dir.join(file), &String::from_utf8_lossy(&bytes.0))?;
    }
    match data.get(EXTRA_ANCHORS) {
        Some(b) => std::fs::write(dir.join(EXTRA_ANCHORS), &b.0)?,
        None => {
            let _ = std::fs::remove_file(dir.join(EXTRA_ANCHORS));
        }
    }
    Ok(true)
}

/// Makes `dir` hold the CA of Secret `namespace/name`, creating both when neither exists.
///
/// # Errors
/// The Secret cannot be read or created, or holds no CA.
pub async fn sync(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    dir: &Path,
    trust_domain: &str,
) -> anyhow::Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if pull(&api, name, dir).await? {
        tracing::info!(secret = %format!("{namespace}/{name}"), "loaded the mesh CA from its Secret");
        return Ok(());
    }
    // No Secret yet: create the CA here and store it.
    super::Ca::load_or_create(dir, trust_domain, Duration::from_hours(24))?;
    let mut data = BTreeMap::new();
    for file in [CA_CERT, CA_KEY] {
        let bytes = std::fs::read(dir.join(file))?;
        data.insert(file.to_owned(), ByteString(bytes));
    }
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(
                [(
                    "app.kubernetes.io/part-of".to_owned(),
                    "ferrymesh".to_owned(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), "stored the new mesh CA in its Secret");
        }
        // Another replica stored its CA first: use that one.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            anyhow::ensure!(pull(&api, name, dir).await?, "the CA Secret vanished");
        }
        Err(e) => return Err(e).context("creating the CA Secret"),
    }
    Ok(())
}

/// Copies the Secret's anchors into `dir` every `every` (a rotation adds `anchors.pem`).
pub async fn follow(
    client: kube::Client,
    namespace: String,
    name: String,
    dir: std::path::PathBuf,
    every: Duration,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = pull(&api, &name, &dir).await {
            tracing::warn!(error = %format!("{e:#}"), "the CA Secret could not be re-read");
        }
    }
}

/// The ConfigMap injected pods mount as their trust anchors (API.md 2.c).
pub const TRUST_CONFIGMAP: &str = "ferrymesh-trust-anchors";

/// Keeps `ferrymesh-trust-anchors` (`ca.pem`: every anchor of the bundle) in every namespace
/// but Kubernetes' own, so any injected pod finds it (server-side apply, every `every`).
pub async fn publish_trust_anchors(
    client: kube::Client,
    ca: std::sync::Arc<super::Ca>,
    every: Duration,
) {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    use kube::api::{ListParams, Patch, PatchParams};
    let namespaces: Api<Namespace> = Api::all(client.clone());
    loop {
        let pem = ca.bundle_pem();
        match namespaces.list(&ListParams::default()).await {
            Ok(list) => {
                for ns in list.items {
                    let Some(name) = ns.metadata.name else {
                        continue;
                    };
                    if name.starts_with("kube-") {
                        continue;
                    }
                    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
                    let body = serde_json::json!({
                        "apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": TRUST_CONFIGMAP, "namespace": name,
                                     "labels": {"app.kubernetes.io/part-of": "ferrymesh"}},
                        "data": {"ca.pem": pem},
                    });
                    if let Err(e) = api
                        .patch(
                            TRUST_CONFIGMAP,
                            &PatchParams::apply("ferrymesh-controller").force(),
                            &Patch::Apply(&body),
                        )
                        .await
                    {
                        tracing::warn!(namespace = %name, error = %e, "trust anchors not published");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "namespaces not listed; trust anchors not published");
            }
        }
        tokio::time::sleep(every).await;
    }
}
