//! Every kustomize overlay under manifests/ (base, demo, observability) renders with
//! `kubectl kustomize`, its Kubernetes objects validate against the published Kubernetes
//! schemas (kubernetes-validate, strict) and our objects against our generated CRD schemas;
//! a broken overlay is caught with the object and field named. The checks are
//! scripts/validate-manifests.py; `make test` installs what it needs.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv's Python, or why the check cannot run here (a failure under CI).
fn python() -> Option<PathBuf> {
    let python = root().join("target/test-venv/bin/python");
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    let why = if !python.exists() {
        "target/test-venv is missing (scripts/test-deps.sh makes it)"
    } else if !kubectl {
        "kubectl is not installed (scripts/test-deps.sh installs it as root)"
    } else {
        return Some(python);
    };
    assert!(
        std::env::var_os("CI").is_none(),
        "manifest validation cannot run: {why}"
    );
    eprintln!("SKIPPED manifests: {why}");
    None
}

fn validate(python: &Path, overlays: &[&str]) -> (bool, String) {
    let out = Command::new(python)
        .arg(root().join("scripts/validate-manifests.py"))
        .args(overlays)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn every_overlay_renders_and_validates() {
    let Some(python) = python() else { return };
    let (ok, out) = validate(&python, &[]);
    assert!(ok, "{out}");
    for overlay in ["base: ", "demo: ", "observability: "] {
        assert!(out.contains(overlay), "{out}");
    }
    assert!(out.contains("0 problem(s)"), "{out}");
}

#[test]
fn a_broken_overlay_is_caught_with_the_object_and_field() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "resources: [bad.yaml]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x, namespace: shop}\n\
         spec:\n  replica: 2\n  selector: {matchLabels: {a: b}}\n  template: {metadata: {labels: {a: b}}, spec: {containers: [{name: c, image: i}]}}\n\
         ---\napiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: p, namespace: shop}\n\
         spec:\n  targetRefs: [{group: \"\", kind: Service, name: s}]\n  timeout: {request: 1s}\n  retry: {attempts: 20}\n",
    )
    .unwrap();
    let (ok, out) = validate(&python, &[dir.path().to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("Deployment shop/x: spec: Additional properties are not allowed ('replica'"),
        "{out}"
    );
    assert!(
        out.contains(
            "ResiliencePolicy shop/p: spec.retry.attempts: 20 is greater than the maximum"
        ),
        "{out}"
    );
    assert!(out.contains("('timeout' was unexpected)"), "{out}");
}

/// The objects `kubectl kustomize` renders from an overlay.
fn render(overlay: &str) -> Vec<serde_json::Value> {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(root().join("manifests").join(overlay))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml_ng::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_json::Value| v.is_object())
        .collect()
}

/// The committed CRDs, by `(group, kind)`: each version's schema.
fn committed_schemas() -> Vec<(String, String, serde_json::Value)> {
    ferrymesh_controller::crd::all()
        .into_iter()
        .map(|c| {
            let schema = serde_json::to_value(
                c.spec.versions[0]
                    .schema
                    .clone()
                    .unwrap()
                    .open_api_v3_schema
                    .unwrap(),
            )
            .unwrap();
            (c.spec.group, c.spec.names.kind, schema)
        })
        .collect()
}

/// As a real API server admits them: every CRD in the overlays passes the API server's CRD
/// rules (no error, no warning), and every custom resource its CRD's schema and CEL rules.
#[test]
fn every_object_passes_the_api_servers_own_checks() {
    use ferrymesh_test_support::kube_api::schema;
    if python().is_none() {
        return;
    }
    let schemas = committed_schemas();
    let mut crds = 0;
    let mut custom = 0;
    for overlay in ["base", "demo", "observability"] {
        for object in render(overlay) {
            let kind = object["kind"].as_str().unwrap_or("");
            let name = object["metadata"]["name"].as_str().unwrap_or("");
            if kind == "CustomResourceDefinition" {
                crds += 1;
                let problems = schema::check_crd(&object);
                assert!(problems.is_empty(), "{overlay}: CRD {name}: {problems:?}");
            }
            let group = object["apiVersion"]
                .as_str()
                .unwrap_or("")
                .split('/')
                .next()
                .unwrap_or("");
            if let Some((_, _, s)) = schemas.iter().find(|(g, k, _)| g == group && k == kind) {
                custom += 1;
                let errors = schema::validate(s, &object);
                assert!(errors.is_empty(), "{overlay}: {kind} {name}: {errors:?}");
            }
        }
    }
    assert_eq!(crds, 5, "the base installs every CRD");
    assert!(custom >= 5, "the demo's policies were checked ({custom})");
}
