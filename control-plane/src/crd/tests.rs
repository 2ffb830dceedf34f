use serde_json::{Value, json};

use super::*;

fn policy(kind: &str, spec: &Value) -> Value {
    json!({
        "apiVersion": "policy.ferrymesh.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": spec,
    })
}

fn svc() -> Value {
    json!([{"group": "", "kind": "Service", "name": "payments"}])
}

fn failures(kind: &str, spec: &Value) -> Vec<String> {
    check_cel(POLICY_GROUP, kind, &policy(kind, spec)).map_or_else(
        |e| {
            e.into_iter()
                .map(|(path, msg)| format!("{path}: {msg}"))
                .collect()
        },
        |()| Vec::new(),
    )
}

#[test]
fn every_kind_has_its_names_columns_and_status() {
    let crds = all();
    let names: Vec<String> = crds
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "resiliencepolicies.policy.ferrymesh.io",
            "authenticationpolicies.policy.ferrymesh.io",
            "authorizationpolicies.policy.ferrymesh.io",
            "faultinjections.policy.ferrymesh.io",
            "aggregations.gateway.ferrymesh.io",
        ]
    );
    let short: Vec<String> = crds
        .iter()
        .map(|c| c.spec.names.short_names.clone().unwrap()[0].clone())
        .collect();
    assert_eq!(short, ["rpol", "authn", "authz", "fault", "agg"]);
    for c in &crds {
        let v = &c.spec.versions[0];
        assert!(
            v.subresources.as_ref().unwrap().status.is_some(),
            "{:?}",
            c.metadata.name
        );
        let columns: Vec<&str> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert!(
            columns.contains(&"Accepted") && columns.contains(&"Age"),
            "{columns:?}"
        );
        if c.spec.names.kind == "AuthorizationPolicy" {
            assert_eq!(columns[0], "Action");
        }
        if c.spec.names.kind == "FaultInjection" {
            assert!(columns.contains(&"Delay%") && columns.contains(&"Expires"));
        }
    }
}

#[test]
fn the_api_md_example_passes_every_rule() {
    let spec = json!({
        "targetRefs": [{"group": "", "kind": "Service", "name": "payments", "sectionName": "http"}],
        "timeouts": {"request": "3s", "perTry": "800ms", "connect": "1s", "idle": "1h", "deadlinePropagation": "Enabled"},
        "retry": {"attempts": 2, "retryOn": ["connect-failure", "429"], "backoff": {"strategy": "ExponentialFullJitter", "base": "25ms", "max": "250ms"},
                  "budget": {"ratio": "0.2", "minRetriesPerSecond": 10, "window": "10s"}},
        "circuitBreaker": {"tripWhen": {"failureRatio": "0.5", "minimumRequests": 20, "window": "10s"}},
        "healthCheck": {"http": {"path": "/healthz"}, "interval": "3s"},
        "fallback": {"backendRef": {"name": "payments-degraded", "port": 8080}},
        "cache": {"methods": ["GET", "HEAD"], "maxTTL": "5m"},
        "loadBalancer": {"algorithm": "ConsistentHash", "hashOn": {"header": "x-user-id"}},
    });
    assert_eq!(failures("ResiliencePolicy", &spec), Vec::<String>::new());
}

/// (kind, spec, the message expected).
fn refusals() -> Vec<(&'static str, Value, &'static str)> {
    vec![
        (
            "ResiliencePolicy",
            json!({"targetRefs": svc()}),
            "at least one section",
        ),
        (
            "ResiliencePolicy",
            json!({"targetRefs": svc(), "timeouts": {"request": "1s", "perTry": "2s"}}),
            "perTry <= request",
        ),
        (
            "ResiliencePolicy",
            json!({"targetRefs": svc(), "retry": {"backoff": {"base": "1s", "max": "100ms"}}}),
            "backoff.base <= backoff.max",
        ),
        (
            "ResiliencePolicy",
            json!({"targetRefs": svc(), "healthCheck": {"http": {"path": "/"}, "tcp": {}}}),
            "exactly one of http, tcp, grpc",
        ),
        (
            "ResiliencePolicy",
            json!({"targetRefs": svc(), "fallback": {"triggers": ["5xx"]}}),
            "exactly one of backendRef, staticResponse",
        ),
        (
            "ResiliencePolicy",
            json!({"targetRefs": svc(), "cache": {"methods": ["POST"]}}),
            "subset of GET, HEAD",
        ),
        (
            "ResiliencePolicy",
            json!({"targetRefs": svc(), "loadBalancer": {"hashOn": {"header": "x"}}}),
            "hashOn is required with ConsistentHash",
        ),
        (
            "ResiliencePolicy",
            json!({"targetRefs": [{"group": "apps", "kind": "Deployment", "name": "x"}], "timeouts": {}}),
            "target kinds are",
        ),
        (
            "AuthorizationPolicy",
            json!({"targetRefs": svc(), "action": "Allow", "rules": [{"from": {"identities": ["spiffe://cluster.local/*/sa/x"]}}]}),
            "at most one trailing",
        ),
        (
            "AuthorizationPolicy",
            json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}], "action": "Allow", "rules": [{}]}),
            "targets a Namespace or a Service",
        ),
        (
            "FaultInjection",
            json!({"targetRefs": svc(), "duration": "15m"}),
            "at least one of delay, abort",
        ),
        (
            "FaultInjection",
            json!({"targetRefs": svc(), "duration": "30s", "delay": {"fixed": "1s"}}),
            "duration is required, 1m..24h",
        ),
        (
            "FaultInjection",
            json!({"targetRefs": svc(), "delay": {"fixed": "1s"}}),
            "duration is required, 1m..24h",
        ),
        (
            "FaultInjection",
            json!({"targetRefs": svc(), "duration": "5m", "abort": {"httpStatus": 503, "grpcStatus": 14}}),
            "exactly one of httpStatus, grpcStatus",
        ),
        (
            "FaultInjection",
            json!({"targetRefs": svc(), "duration": "5m", "side": "Client", "workloadSelector": {"matchLabels": {"v": "2"}}, "delay": {"fixed": "1s"}}),
            "server side only",
        ),
        (
            "AuthenticationPolicy",
            json!({"targetRefs": svc(), "jwt": {"providers": [{"name": "a", "issuer": "i", "algorithms": ["HS256"], "jwks": {"inline": "{}"}}]}}),
            "HS* algorithms need jwks.secretRef",
        ),
        (
            "AuthenticationPolicy",
            json!({"targetRefs": svc(), "jwt": {"providers": [{"name": "a", "issuer": "i", "jwks": {"remote": {"uri": "http://x"}}}]}}),
            "remote.uri is https",
        ),
    ]
}

#[test]
fn each_cel_rule_refuses_what_api_md_forbids() {
    for (kind, spec, expected) in refusals() {
        let got = failures(kind, &spec);
        assert!(
            got.iter().any(|f| f.contains(expected)),
            "{kind} {spec}: expected {expected:?}, got {got:?}"
        );
    }
    // And the valid neighbours of those cases pass.
    for (kind, spec) in [
        (
            "ResiliencePolicy",
            json!({"targetRefs": svc(), "timeouts": {"request": "0s", "perTry": "2s"}}),
        ),
        (
            "AuthorizationPolicy",
            json!({"targetRefs": svc(), "action": "Deny", "rules": [{"from": {"identities": ["spiffe://cluster.local/ns/ops/sa/*"]}}]}),
        ),
        (
            "FaultInjection",
            json!({"targetRefs": svc(), "duration": "24h", "abort": {"grpcStatus": 14}}),
        ),
    ] {
        assert_eq!(failures(kind, &spec), Vec::<String>::new(), "{kind} {spec}");
    }
}

/// Every node of a schema with its `x-kubernetes-validations` rules.
fn rules_in(schema: &Value, out: &mut Vec<(Value, String)>) {
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for r in rules {
            out.push((schema.clone(), r["rule"].as_str().unwrap().to_owned()));
        }
    }
    for key in ["properties", "items", "additionalProperties"] {
        match schema.get(key) {
            Some(Value::Object(m)) if key == "properties" => {
                m.values().for_each(|s| rules_in(s, out));
            }
            Some(s @ Value::Object(_)) => rules_in(s, out),
            _ => {}
        }
    }
}

#[test]
fn every_rule_compiles_and_fits_the_api_servers_cost_budget() {
    let mut count = 0;
    for crd in all() {
        let json = serde_json::to_value(&crd).unwrap();
        let mut rules = Vec::new();
        rules_in(
            &json["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
            &mut rules,
        );
        count += rules.len();
        // Compiled and costed as the API server does (unbounded lists and strings at their
        // largest), along with the other CRD rules: no error and no warning.
        let problems = ferrymesh_test_support::kube_api::schema::check_crd(&json);
        assert!(problems.is_empty(), "{:?}: {problems:?}", crd.metadata.name);
    }
    assert!(count >= 15, "{count} rules");
}
