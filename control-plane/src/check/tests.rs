use super::*;

const SERVICES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: pricing, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: catalog, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
";

fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn expect(rps: f64, replicas: &[(&str, usize)]) -> Expect {
    Expect {
        rps,
        replicas: replicas
            .iter()
            .map(|(name, n)| {
                (
                    ServiceKey {
                        namespace: "shop".into(),
                        name: (*name).into(),
                    },
                    *n,
                )
            })
            .collect(),
    }
}

fn rules(report: &Report) -> Vec<(&str, &str, &str)> {
    report
        .lints
        .iter()
        .map(|l| (l.object.as_str(), l.field.as_str(), l.rule))
        .collect()
}

#[test]
fn a_careful_policy_has_no_findings() {
    let policy = "\
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: pricing, namespace: shop}
spec:
  targetRefs: [{group: \"\", kind: Service, name: pricing}]
  timeouts: {request: 2s, perTry: 500ms}
  retry:
    attempts: 2
    retryOn: [5xx]
    budget: {ratio: \"0.2\", minRetriesPerSecond: 10, window: 10s}
  circuitBreaker: {tripWhen: {consecutiveFailures: 5, failureRatio: \"0.5\", minimumRequests: 10, window: 10s}}
  outlierDetection: {consecutiveErrors: 5}
";
    let dir = folder(&[("shop.yaml", SERVICES), ("policy.yaml", policy)]);
    let report = check(dir.path(), &expect(5.0, &[("pricing", 3)])).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.lints.is_empty(), "{:?}", report.lints);
}

#[test]
fn every_lint_names_the_object_the_field_and_the_rule() {
    let policy = "\
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: pricing, namespace: shop}
spec:
  targetRefs: [{group: \"\", kind: Service, name: pricing}]
  timeouts: {request: 1s, perTry: 400ms}
  retry:
    attempts: 3
    retryOn: [5xx]
    methods: [GET, POST, PATCH]
  circuitBreaker: {tripWhen: {failureRatio: \"0.5\", minimumRequests: 100, window: 10s}}
  outlierDetection: {consecutiveErrors: 5}
---
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: catalog, namespace: shop}
spec:
  targetRefs: [{group: \"\", kind: Service, name: catalog}]
  retry:
    attempts: 2
    retryOn: [5xx]
    budget: {ratio: \"1\"}
";
    let dir = folder(&[("shop.yaml", SERVICES), ("policy.yaml", policy)]);
    let report = check(dir.path(), &expect(1.0, &[("pricing", 2)])).unwrap();
    let found = rules(&report);
    let pricing = "ResiliencePolicy shop/pricing";
    let catalog = "ResiliencePolicy shop/catalog";
    for want in [
        (pricing, "spec.retry.methods", "retry-non-idempotent"),
        (pricing, "spec.retry.budget", "retry-without-budget"),
        (pricing, "spec.retry.attempts", "retry-exceeds-timeout"),
        (pricing, "spec.outlierDetection", "outlier-few-endpoints"),
        (
            pricing,
            "spec.circuitBreaker.tripWhen.minimumRequests",
            "breaker-unreachable",
        ),
        (catalog, "spec.retry.budget.ratio", "retry-budget-unbounded"),
        (catalog, "spec.timeouts.perTry", "retry-without-per-try"),
    ] {
        assert!(found.contains(&want), "{want:?} missing from {found:#?}");
    }
    assert_eq!(
        found
            .iter()
            .filter(|(_, _, r)| *r == "retry-non-idempotent")
            .count(),
        2,
        "POST and PATCH, not GET"
    );
    let exceeds = report
        .lints
        .iter()
        .find(|l| l.rule == "retry-exceeds-timeout")
        .unwrap();
    assert!(
        exceeds
            .message
            .contains("4 attempts x perTry 400ms = 1.6s exceeds the request timeout 1s"),
        "{exceeds}"
    );
    assert!(exceeds.file.ends_with("policy.yaml"), "{exceeds}");
    let few = report
        .lints
        .iter()
        .find(|l| l.rule == "outlier-few-endpoints")
        .unwrap();
    assert!(few.message.contains("over 2 endpoint(s)"), "{few}");
}

#[test]
fn the_expected_rate_and_replicas_decide_the_traffic_lints() {
    let policy = "\
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: pricing, namespace: shop}
spec:
  targetRefs: [{group: \"\", kind: Service, name: pricing}]
  circuitBreaker: {tripWhen: {failureRatio: \"0.5\", minimumRequests: 100, window: 10s}}
  outlierDetection: {consecutiveErrors: 5}
";
    let dir = folder(&[("shop.yaml", SERVICES), ("policy.yaml", policy)]);
    let quiet = check(dir.path(), &expect(1.0, &[("pricing", 1)])).unwrap();
    let quiet: Vec<_> = quiet.lints.iter().map(|l| l.rule).collect();
    assert_eq!(quiet, ["breaker-unreachable", "outlier-few-endpoints"]);
    let busy = check(dir.path(), &expect(50.0, &[("pricing", 3)])).unwrap();
    assert!(busy.lints.is_empty(), "{:?}", busy.lints);
}

#[test]
fn invalid_files_are_errors_with_file_object_field_and_rule() {
    let policy = "\
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: pricing, namespace: shop}
spec:
  targetRefs: [{group: \"\", kind: Service, name: pricing}]
  timeouts: {request: 3s, perTry: 4s}
";
    let dir = folder(&[("shop.yaml", SERVICES), ("bad.yaml", policy)]);
    let report = check(dir.path(), &expect(1.0, &[])).unwrap();
    assert_eq!(report.errors.len(), 1);
    let e = &report.errors[0];
    assert!(e.file.ends_with("bad.yaml"));
    assert_eq!(e.object, "ResiliencePolicy shop/pricing");
    assert_eq!(e.field, "spec.timeouts.perTry");
    assert!(e.message.contains("perTry <= request"), "{e}");
    assert!(report.lints.is_empty(), "a rejected file is not linted");
}
