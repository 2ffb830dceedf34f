//! `ferryctl inject` on the demo shop's Kubernetes manifests: every pod template gets the init
//! container that installs the iptables rules, the proxy as a native sidecar, probes rewritten
//! to the proxy's health port and the annotation that marks it injected; injecting the output
//! again changes nothing; stdin works as a file.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Stdio};

use ferrymesh_test_support::process::bin;
use serde_json::Value;

fn shop() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/demo/shop.yaml")
}

fn inject(input: &str) -> (String, String) {
    let mut child = Command::new(bin("ferryctl"))
        .args(["inject", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| v.is_object())
        .collect()
}

#[test]
fn the_demo_shop_is_injected_once_and_only_once() {
    let input = std::fs::read_to_string(shop()).unwrap();
    let (once, summary) = inject(&input);
    let deployments: Vec<Value> = objects(&once)
        .into_iter()
        .filter(|o| o["kind"] == "Deployment")
        .collect();
    assert_eq!(deployments.len(), 7, "{summary}");
    for d in &deployments {
        let name = d["metadata"]["name"].as_str().unwrap();
        assert!(
            summary.contains(&format!("deployment/{name} injected")),
            "{summary}"
        );
        let pod = &d["spec"]["template"];
        assert_eq!(
            pod["metadata"]["annotations"]["ferrymesh.io/injected"], "true",
            "{name}"
        );
        let inits = pod["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(inits[0]["name"], "ferrymesh-init", "{name}");
        assert_eq!(inits[0]["args"][0], "init-iptables");
        assert_eq!(inits[1]["name"], "ferrymesh-proxy");
        assert_eq!(
            inits[1]["restartPolicy"], "Always",
            "{name}: a native sidecar"
        );
        assert_eq!(inits[1]["securityContext"]["runAsUser"], 2340);
        let app = &pod["spec"]["containers"][0];
        assert_eq!(
            app["livenessProbe"]["httpGet"],
            serde_json::json!({"path": "/app-health/app/livez", "port": 4391}),
            "{name}"
        );
        assert_eq!(
            app["readinessProbe"]["httpGet"]["path"],
            "/app-health/app/readyz"
        );
        assert_eq!(
            app["readinessProbe"]["periodSeconds"], 2,
            "timing fields are kept"
        );
        let probes = inits[1]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "FERRYMESH_APP_PROBES")
            .unwrap();
        let originals: Value = serde_json::from_str(probes["value"].as_str().unwrap()).unwrap();
        assert_eq!(
            originals["/app-health/app/livez"]["httpGet"],
            serde_json::json!({"path": "/healthz", "port": 8080}),
            "the named port is resolved"
        );
    }
    // Everything else (Namespace, ServiceAccounts, Services) is untouched.
    let before = objects(&input);
    let after = objects(&once);
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        if b["kind"] != "Deployment" {
            assert_eq!(a, b);
        }
    }
    let (twice, summary) = inject(&once);
    assert_eq!(twice, once, "injecting twice changes nothing");
    assert!(
        summary.contains("deployment/catalog skipped: already injected"),
        "{summary}"
    );
}

#[test]
fn a_template_that_opts_out_is_left_alone() {
    let input = "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: report}\nspec:\n  schedule: '@daily'\n  jobTemplate:\n    spec:\n      template:\n        metadata: {annotations: {ferrymesh.io/inject: disabled}}\n        spec: {containers: [{name: job, image: x}]}\n";
    let (out, summary) = inject(input);
    assert_eq!(out, input);
    assert!(
        summary.contains("cronjob/report skipped: ferrymesh.io/inject: disabled"),
        "{summary}"
    );
}
