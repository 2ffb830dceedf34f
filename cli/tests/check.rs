//! `ferryctl check`: the demo folder is clean, and a folder with mistakes gets each one named,
//! with the exit status telling errors (and, with `--strict`, findings) apart.
#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::process::Command;

use ferrymesh_test_support::mesh::yaml::{policy, service};
use ferrymesh_test_support::process::bin;

fn check(dir: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(bin("ferryctl"))
        .env("RUST_BACKTRACE", "0")
        .arg("check")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_demo_folder_is_clean_even_strictly() {
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo-apps/mesh");
    let (ok, out) = check(&demo, &["--strict"]);
    assert!(ok, "{out}");
    assert!(out.contains("0 error(s), 0 warning(s)"), "{out}");
}

#[test]
fn mistakes_are_named_and_errors_fail_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let lint = policy(
        "pricing",
        "  timeouts: {request: 1s, perTry: 600ms}\n  retry: {attempts: 2, retryOn: [5xx], methods: [GET, POST]}\n",
    );
    std::fs::write(dir.path().join("a.yaml"), service("pricing") + &lint).unwrap();
    let (ok, out) = check(dir.path(), &[]);
    assert!(ok, "findings alone pass: {out}");
    for want in [
        "warning: ",
        "a.yaml: ResiliencePolicy shop/pricing: spec.retry.methods: [retry-non-idempotent] POST",
        "[retry-without-budget]",
        "[retry-exceeds-timeout] for shop/pricing:80: 3 attempts x perTry 600ms = 1.8s",
        "0 error(s), 3 warning(s)",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    let (ok, out) = check(dir.path(), &["--strict"]);
    assert!(!ok, "--strict fails on findings: {out}");

    let bad = policy("catalog", "  retry: {attempts: 11}\n");
    std::fs::write(dir.path().join("b.yaml"), service("catalog") + &bad).unwrap();
    let (ok, out) = check(dir.path(), &["--json"]);
    assert!(!ok, "an invalid file fails the check");
    let json: serde_json::Value = serde_json::from_str(&out[..=out.rfind('}').unwrap()]).unwrap();
    let error = &json["errors"][0];
    assert!(
        error["file"].as_str().unwrap().ends_with("b.yaml"),
        "{json}"
    );
    assert_eq!(error["object"], "ResiliencePolicy shop/catalog");
    assert_eq!(error["field"], "spec.retry.attempts");
    assert_eq!(
        json["lints"].as_array().unwrap().len(),
        3,
        "a.yaml still linted"
    );
}

#[test]
fn every_example_policy_passes_a_strict_check_beside_the_demo_folder() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut examples: Vec<_> = std::fs::read_dir(root.join("demo-apps/policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 10, "{examples:?}");
    for example in examples {
        let dir = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(root.join("demo-apps/mesh")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
        }
        std::fs::copy(&example, dir.path().join(example.file_name().unwrap())).unwrap();
        let (ok, out) = check(dir.path(), &["--strict"]);
        assert!(ok, "{}: {out}", example.display());
        assert!(
            out.contains("0 error(s), 0 warning(s)"),
            "{}: {out}",
            example.display()
        );
    }
}
