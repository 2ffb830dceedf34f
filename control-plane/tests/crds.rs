//! The committed CRDs under `manifests/crds/` are exactly what `ferrymesh-controller crds`
//! generates from the Rust types (`make crds`), and generating twice writes the same files: a
//! change to a type without `make crds` fails here.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use ferrymesh_test_support::process::bin;

fn read_dir(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&path).unwrap(),
            )
        })
        .collect()
}

fn generate(out: &Path) {
    let status = Command::new(bin("ferrymesh-controller"))
        .arg("crds")
        .arg("--out")
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn committed_crds_are_what_the_types_generate() {
    let dir = tempfile::tempdir().unwrap();
    // A stale file from an older kind is removed; other files stay.
    std::fs::write(
        dir.path().join("oldkinds.policy.ferrymesh.io.yaml"),
        "stale",
    )
    .unwrap();
    generate(dir.path());
    let first = read_dir(dir.path());
    generate(dir.path());
    assert_eq!(
        read_dir(dir.path()),
        first,
        "generating twice changes nothing"
    );
    assert!(!first.contains_key("oldkinds.policy.ferrymesh.io.yaml"));
    let committed = read_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds"));
    assert_eq!(
        committed.keys().collect::<Vec<_>>(),
        first.keys().collect::<Vec<_>>(),
        "run `make crds`"
    );
    for (name, text) in &first {
        assert!(committed[name] == *text, "{name} is stale: run `make crds`");
    }
}

/// A fake API server's answer to installing each CRD file of `dir`: `(file, Ok(warnings) or
/// Err(refusal))`.
async fn install_each(dir: &Path) -> BTreeMap<String, Result<Vec<String>, String>> {
    let mut out = BTreeMap::new();
    for (name, text) in read_dir(dir) {
        if name == "kustomization.yaml" {
            continue;
        }
        let api = ferrymesh_test_support::kube_api::FakeApi::start().await;
        out.insert(name, api.install_crds(&text));
    }
    out
}

#[tokio::test]
async fn the_committed_crds_install_on_an_api_server_without_a_warning() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
    let results = install_each(&dir).await;
    assert_eq!(results.len(), 5);
    for (name, result) in results {
        assert_eq!(result, Ok(Vec::new()), "{name}");
    }
}

/// The CRDs as they were when a Kubernetes 1.36 API server refused four of them (kept as a
/// fixture): the fake server refuses the same four, with the real server's messages.
#[tokio::test]
async fn the_crds_a_real_api_server_refused_are_refused_here_too() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../test-support/fixtures/crds-refused-by-1.36");
    let results = install_each(&dir).await;
    let refusal = |name: &str| results[name].clone().unwrap_err();
    let min_items = "spec.validation.openAPIV3Schema.properties[spec].properties[targetRefs].default: Invalid value: 0: in body should have at least 1 items";
    for name in [
        "resiliencepolicies.policy.ferrymesh.io.yaml",
        "authenticationpolicies.policy.ferrymesh.io.yaml",
        "authorizationpolicies.policy.ferrymesh.io.yaml",
        "faultinjections.policy.ferrymesh.io.yaml",
    ] {
        assert!(
            refusal(name).contains(min_items),
            "{name}: {}",
            refusal(name)
        );
    }
    assert!(
        refusal("authorizationpolicies.policy.ferrymesh.io.yaml").contains(
            "properties[rules].default: Invalid value: 0: in body should have at least 1 items"
        )
    );
    assert!(
        refusal("authenticationpolicies.policy.ferrymesh.io.yaml").contains(
            "properties[jwt].properties[providers].items.x-kubernetes-validations[0].rule: Forbidden: estimated rule cost exceeds budget by factor of 5.0x"
        ),
        "{}",
        refusal("authenticationpolicies.policy.ferrymesh.io.yaml")
    );
    // The fifth was accepted, with the server's warning about its integer format.
    let warnings = results["aggregations.gateway.ferrymesh.io.yaml"]
        .clone()
        .unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("unrecognized format \"uint16\"")),
        "{warnings:?}"
    );
}
