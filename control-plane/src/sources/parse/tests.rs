use super::*;
use crate::sources::{PortProtocol, ServicePort};

fn parse(text: &str) -> Result<Parsed, ParseError> {
    parse_documents(Path::new("mesh/shop.yaml"), text)
}

#[test]
fn reads_services_slices_and_policies_from_one_file() {
    let parsed = parse(
        r#"
apiVersion: v1
kind: Service
metadata: {name: pricing, namespace: shop}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: legacy-1
  namespace: shop
  labels: {kubernetes.io/service-name: legacy}
addressType: IPv4
ports: [{name: http, port: 9000}]
endpoints:
- addresses: ["127.0.0.1"]
  conditions: {ready: false}
---
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: pricing, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: pricing}]
  timeouts: {request: 2s, perTry: 500ms}
---
"#,
    )
    .unwrap();
    assert_eq!(parsed.objects.len(), 3);
    let Object::Service(svc) = &parsed.objects[0] else {
        panic!("not a service")
    };
    assert_eq!(
        svc.ports,
        vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: PortProtocol::Http
        }]
    );
    let Object::EndpointSlice(slice) = &parsed.objects[1] else {
        panic!("not a slice")
    };
    assert_eq!(slice.service, "legacy");
    assert!(!slice.endpoints[0].ready && !slice.endpoints[0].serving);
    let Object::Policy(p) = &parsed.objects[2] else {
        panic!("not a policy")
    };
    let timeouts = p.resilience.as_ref().unwrap().timeouts.as_ref().unwrap();
    assert_eq!(timeouts.request.unwrap().seconds, 2);
}

#[test]
fn unknown_kinds_are_skipped_with_a_warning() {
    let parsed = parse("apiVersion: example.test/v1\nkind: Widget\nmetadata: {name: x}\n").unwrap();
    assert!(parsed.objects.is_empty());
    assert_eq!(parsed.warnings.len(), 1);
    assert!(
        parsed.warnings[0].contains("example.test/v1"),
        "{:?}",
        parsed.warnings
    );
}

#[test]
fn errors_name_file_object_and_field() {
    let err = parse(
        "apiVersion: v1\nkind: Service\nmetadata: {name: ok, namespace: shop}\nspec: {ports: [{port: 80}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: pricing, namespace: shop}\nspec:\n  ports: [{name: http, port: 99999}]\n",
    )
    .unwrap_err();
    assert_eq!(err.file, Path::new("mesh/shop.yaml"));
    assert_eq!(err.object, "Service shop/pricing");
    assert_eq!(err.field, "spec.ports[0].port");
}

#[test]
fn bad_timeouts_are_rejected_with_the_field() {
    let doc = |t: &str| {
        format!(
            "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: p, namespace: shop}}\n\
             spec:\n  targetRefs: [{{group: \"\", kind: Service, name: pricing}}]\n  timeouts: {t}\n"
        )
    };
    assert_eq!(
        parse(&doc("{request: 2x}")).unwrap_err().field,
        "spec.timeouts.request"
    );
    assert_eq!(
        parse(&doc("{request: 1s, perTry: 2s}")).unwrap_err().field,
        "spec.timeouts.perTry"
    );
    assert_eq!(
        parse(&doc("{requests: 1s}")).unwrap_err().field,
        "spec.timeouts.requests"
    );
}

#[test]
fn policies_need_valid_targets() {
    let err = parse(
        "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: p, namespace: shop}\n\
         spec:\n  targetRefs: [{group: apps, kind: Deployment, name: x}]\n",
    )
    .unwrap_err();
    assert_eq!(err.field, "spec.targetRefs[0]");
    let err = parse("apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: p}\nspec: {}\n").unwrap_err();
    assert_eq!(err.field, "spec.targetRefs");
}

#[test]
fn duplicate_objects_and_bad_yaml_reject_the_file() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n";
    assert_eq!(
        parse(&format!("{svc}---\n{svc}")).unwrap_err().field,
        "metadata.name"
    );
    assert_eq!(parse("kind: [unclosed").unwrap_err().object, "document 1");
    assert_eq!(parse("apiVersion: v1\nkind: Service\nmetadata: {name: Bad_Name}\nspec: {ports: [{port: 80}]}\n").unwrap_err().field, "metadata.name");
}

#[test]
fn port_protocol_comes_from_app_protocol_or_name() {
    let parsed = parse(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports:\n  - {name: grpc-api, port: 1}\n  - {name: db, port: 2, appProtocol: tcp}\n  - {name: web, port: 3, appProtocol: kubernetes.io/h2c}\n",
    )
    .unwrap();
    let Object::Service(svc) = &parsed.objects[0] else {
        panic!()
    };
    let protocols: Vec<_> = svc.ports.iter().map(|p| p.protocol).collect();
    assert_eq!(
        protocols,
        [
            PortProtocol::Grpc,
            PortProtocol::Opaque,
            PortProtocol::Http2
        ]
    );
}

/// The full example of API.md 2.a: every section.
const FULL: &str = r#"
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: payments, namespace: shop}
spec:
  targetRefs:
  - {group: "", kind: Service, name: payments, sectionName: http}
  timeouts: {request: 3s, perTry: 800ms, connect: 1s, idle: 1h, deadlinePropagation: Enabled}
  retry:
    attempts: 2
    retryOn: [connect-failure, refused-stream, reset, gateway-error, "429"]
    grpcRetryOn: [unavailable, resource-exhausted]
    methods: [GET, HEAD, OPTIONS, PUT, DELETE]
    backoff: {strategy: ExponentialFullJitter, base: 25ms, max: 250ms}
    respectRetryAfter: true
    maxRequestBodyBytes: 65536
    budget: {ratio: "0.2", minRetriesPerSecond: 10, window: 10s}
  circuitBreaker:
    limits: {maxRequests: 1024}
    tripWhen: {consecutiveFailures: 7, failureRatio: "0.5", minimumRequests: 20, window: 10s}
    failureOn: [5xx, connect-failure, timeout]
    open: {base: 5s, max: 60s, jitter: "0.5"}
    halfOpenProbes: 3
  outlierDetection:
    consecutiveErrors: 5
    consecutiveGatewayErrors: 0
    interval: 10s
    baseEjectionTime: 30s
    maxEjectionTime: 300s
    maxEjectionPercent: 10
    minReadyEndpoints: 1
  healthCheck:
    http: {path: /healthz, expectedStatuses: [200]}
    port: 8081
    interval: 3s
    timeout: 1s
    unhealthyThreshold: 3
    healthyThreshold: 1
    initialJitter: 1s
  fallback:
    triggers: [circuit-open, no-endpoints, timeout, 5xx]
    backendRef: {name: payments-degraded, port: 8080}
  cache:
    methods: [GET, HEAD]
    defaultTTL: 0s
    maxTTL: 5m
    maxEntries: 1000
    maxBodyBytes: 1048576
    varyHeaders: [accept, accept-encoding]
    serveStaleOnError: 30s
  loadBalancer:
    algorithm: PeakEWMA
    zoneAware: PreferSameZone
"#;

fn sections(text: &str) -> crate::sources::ResilienceSections {
    let parsed = parse(text).unwrap();
    let Object::Policy(p) = &parsed.objects[0] else {
        panic!("not a policy")
    };
    p.resilience.clone().unwrap()
}

#[test]
fn the_full_example_parses_into_every_section() {
    let s = sections(FULL);
    let retry = s.retry.unwrap();
    assert_eq!(retry.attempts, 2);
    assert_eq!(retry.retry_on_status, [429]);
    assert_eq!(retry.grpc_retry_on, [14, 8]);
    assert!((s.budget.unwrap().ratio - 0.2).abs() < f64::EPSILON);
    let breaker = s.breaker.unwrap();
    assert_eq!(
        (
            breaker.consecutive_failures,
            breaker.minimum_requests,
            breaker.half_open_probes
        ),
        (7, 20, 3)
    );
    assert_eq!(s.outlier.unwrap().max_ejection_time.unwrap().seconds, 300);
    assert!(matches!(
        s.health_check.unwrap().check,
        Some(ferrymesh_proto::config::v1::health_check::Check::Http(_))
    ));
    assert!(s.fallback.unwrap().target.is_some());
    assert_eq!(s.cache.unwrap().vary_headers, ["accept", "accept-encoding"]);
    assert!(s.lb.unwrap().prefer_same_zone);
    assert!(s.timeouts.unwrap().deadline_propagation);
}

#[test]
fn retry_alone_gets_the_default_budget() {
    let s = sections(
        "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: p, namespace: shop}\n\
         spec:\n  targetRefs: [{group: \"\", kind: Service, name: a}]\n  retry: {attempts: 3}\n",
    );
    let budget = s.budget.unwrap();
    assert_eq!(
        (
            budget.min_retries_per_second,
            budget.window.unwrap().seconds
        ),
        (10, 10)
    );
    let retry = s.retry.unwrap();
    assert_eq!(retry.methods, ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]);
    assert_eq!(
        retry.retry_on.len(),
        3,
        "connect-failure, refused-stream, reset by default"
    );
}

/// Every validation rule: (what to replace in FULL, with what, field, words of the rule).
const RULE_CASES: &[(&str, &str, &str, &str)] = &[
    (
        "perTry: 800ms",
        "perTry: 4s",
        "spec.timeouts.perTry",
        "perTry <= request",
    ),
    (
        "base: 25ms, max: 250ms",
        "base: 300ms, max: 250ms",
        "spec.retry.backoff.base",
        "base <= max",
    ),
    (
        "attempts: 2",
        "attempts: 11",
        "spec.retry.attempts",
        "attempts 0..10",
    ),
    (
        "reset, gateway-error, \"429\"",
        "reset, gateway-error, \"700\"",
        "spec.retry.retryOn[4]",
        "status code 100..599",
    ),
    (
        "reset, gateway-error",
        "reset, teapot",
        "spec.retry.retryOn[3]",
        "retryOn is one of",
    ),
    (
        "[unavailable, resource-exhausted]",
        "[unavailable, sad]",
        "spec.retry.grpcRetryOn[1]",
        "grpcRetryOn is one of",
    ),
    (
        "ratio: \"0.2\"",
        "ratio: \"1.2\"",
        "spec.retry.budget.ratio",
        "ratio is a decimal 0..1",
    ),
    (
        "failureRatio: \"0.5\"",
        "failureRatio: \"half\"",
        "spec.circuitBreaker.tripWhen.failureRatio",
        "ratio is a decimal 0..1",
    ),
    (
        "jitter: \"0.5\"",
        "jitter: \"-1\"",
        "spec.circuitBreaker.open.jitter",
        "ratio is a decimal 0..1",
    ),
    (
        "minimumRequests: 20",
        "minimumRequests: 0",
        "spec.circuitBreaker.tripWhen.minimumRequests",
        "minimumRequests >= 1",
    ),
    (
        "maxEjectionPercent: 10",
        "maxEjectionPercent: 101",
        "spec.outlierDetection.maxEjectionPercent",
        "percentage 0..100",
    ),
    (
        "http: {path: /healthz, expectedStatuses: [200]}",
        "http: {path: /healthz}\n    tcp: {}",
        "spec.healthCheck.http",
        "exactly one of http, tcp, grpc",
    ),
    (
        "\n    backendRef: {name: payments-degraded, port: 8080}",
        "",
        "spec.fallback.backendRef",
        "exactly one of backendRef, staticResponse",
    ),
    (
        "triggers: [circuit-open, no-endpoints, timeout, 5xx]",
        "triggers: [sometimes]",
        "spec.fallback.triggers[0]",
        "triggers are",
    ),
    (
        "backendRef: {name: payments-degraded, port: 8080}",
        "staticResponse: {status: 200}\n    backendRef: {name: x, port: 1}",
        "spec.fallback.backendRef",
        "exactly one of backendRef, staticResponse",
    ),
    (
        "methods: [GET, HEAD]\n    defaultTTL",
        "methods: [GET, POST]\n    defaultTTL",
        "spec.cache.methods[1]",
        "methods subset of GET, HEAD",
    ),
    (
        "algorithm: PeakEWMA",
        "algorithm: ConsistentHash",
        "spec.loadBalancer.hashOn",
        "hashOn is required iff algorithm is ConsistentHash",
    ),
    (
        "zoneAware: PreferSameZone",
        "zoneAware: PreferSameZone\n    hashOn: {header: x-user}",
        "spec.loadBalancer.hashOn",
        "hashOn is required iff",
    ),
    (
        "algorithm: PeakEWMA",
        "algorithm: Fastest",
        "spec.loadBalancer.algorithm",
        "algorithm is",
    ),
    (
        "idle: 1h",
        "idle: 1 hour",
        "spec.timeouts.idle",
        "duration format",
    ),
    (
        "interval: 3s",
        "intervall: 3s",
        "spec.healthCheck.intervall",
        "unknown field",
    ),
    (
        "strategy: ExponentialFullJitter",
        "strategy: Linear",
        "spec.retry.backoff.strategy",
        "strategy is",
    ),
];

#[test]
fn every_rule_is_enforced_with_field_and_rule() {
    let cases = RULE_CASES;
    for (from, to, field, rule) in cases {
        assert!(FULL.contains(from), "case {from:?} does not apply");
        let err = parse(&FULL.replacen(from, to, 1)).unwrap_err();
        assert_eq!(err.field, *field, "{from} -> {to}: {err}");
        assert!(err.message.contains(rule), "{from} -> {to}: {err}");
        assert_eq!(err.object, "ResiliencePolicy shop/payments");
    }
}

#[test]
fn a_policy_with_no_section_is_refused() {
    let err = parse(
        "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: p, namespace: shop}\n\
         spec:\n  targetRefs: [{group: \"\", kind: Service, name: a}]\n",
    )
    .unwrap_err();
    assert_eq!(err.field, "spec");
    assert!(err.message.contains("at least one section"), "{err}");
}

#[test]
fn the_demo_config_folder_and_its_commented_example_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo-apps/mesh");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed = parse_documents(&path, &text).unwrap_or_else(|e| panic!("{e}"));
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        // The example policy students uncomment must be valid too.
        if let Some((_, example)) = text.split_once("# ---\n") {
            let uncommented: String = example
                .lines()
                .map(|l| l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#')))
                .collect::<Vec<_>>()
                .join("\n");
            let parsed = parse_documents(&path, &uncommented)
                .unwrap_or_else(|e| panic!("the commented example: {e}"));
            assert_eq!(parsed.objects.len(), 1);
        }
    }
}

fn fault_doc(spec: &str) -> String {
    format!(
        "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: FaultInjection\nmetadata: {{name: f, namespace: shop}}\n\
         spec:\n  targetRefs: [{{group: \"\", kind: Service, name: ratings}}]\n{spec}"
    )
}

#[test]
fn fault_injection_rules_are_enforced() {
    let ok = parse(&fault_doc("  duration: 15m\n  delay: {fixed: 2s, percentage: 25}\n  abort: {grpcStatus: 14, percentage: 10}\n")).unwrap();
    let Object::Policy(p) = &ok.objects[0] else {
        panic!()
    };
    let f = p.fault.as_ref().unwrap();
    assert_eq!(f.abort, Some((crate::sources::FaultAbort::Grpc(14), 10.0)));
    assert_eq!(f.duration, std::time::Duration::from_mins(15));
    let cases = [
        ("  duration: 15m\n", "spec", "at least one of delay, abort"),
        (
            "  abort: {httpStatus: 503}\n",
            "spec.duration",
            "duration is required",
        ),
        (
            "  duration: 30s\n  abort: {httpStatus: 503}\n",
            "spec.duration",
            "duration 1m..24h",
        ),
        (
            "  duration: 25h\n  abort: {httpStatus: 503}\n",
            "spec.duration",
            "duration 1m..24h",
        ),
        (
            "  duration: 5m\n  abort: {httpStatus: 503, grpcStatus: 14}\n",
            "spec.abort",
            "exactly one of httpStatus, grpcStatus",
        ),
        (
            "  duration: 5m\n  abort: {httpStatus: 99}\n",
            "spec.abort.httpStatus",
            "httpStatus 200..599",
        ),
        (
            "  duration: 5m\n  abort: {grpcStatus: 17}\n",
            "spec.abort.grpcStatus",
            "grpcStatus 0..16",
        ),
        (
            "  duration: 5m\n  abort: {httpStatus: 503, percentage: 101}\n",
            "spec.abort.percentage",
            "percentage 0..100",
        ),
        (
            "  duration: 5m\n  side: Client\n  workloadSelector: {matchLabels: {v: x}}\n  abort: {httpStatus: 503}\n",
            "spec.workloadSelector",
            "forbidden when side is Client",
        ),
    ];
    for (spec, field, rule) in cases {
        let err = parse(&fault_doc(spec)).unwrap_err();
        assert_eq!(err.field, field, "{spec}: {err}");
        assert!(err.message.contains(rule), "{spec}: {err}");
    }
}

const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: pricing, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: pricing, port: 80}]
  rules:
  - name: canary
    matches: [{path: {type: PathPrefix, value: /prices}, method: GET, headers: [{name: X-Canary, value: "1"}], queryParams: [{name: v, value: "2"}]}]
    backendRefs: [{name: pricing-v2, port: 80, weight: 10}]
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 2, codes: [503], backoff: 50ms}
  - {}
"#;

#[test]
fn http_routes_with_service_parents_are_read_whole() {
    let parsed = parse(ROUTE).unwrap();
    let Object::Route(r) = &parsed.objects[0] else {
        panic!("not a route")
    };
    assert_eq!(r.kind, "HTTPRoute");
    assert_eq!(r.parents[0].name, "pricing");
    assert_eq!(r.parents[0].namespace, "shop");
    assert_eq!(r.parents[0].port, Some(80));
    assert!(!r.gateway_parents);
    let canary = &r.rules[0];
    assert_eq!(canary.name.as_deref(), Some("canary"));
    let m = &canary.matches[0];
    assert_eq!(m.path.as_ref().unwrap().value, "/prices");
    assert_eq!(m.method, "GET");
    assert_eq!(
        m.headers[0].name, "x-canary",
        "header names are lower-cased"
    );
    assert_eq!(m.query_params[0].value, "2");
    assert_eq!(canary.backends[0].weight, 10);
    assert_eq!(
        canary.backends[0].service.as_ref().unwrap().namespace,
        "shop"
    );
    let t = canary.timeouts.unwrap();
    assert_eq!(t.request.unwrap().seconds, 2);
    assert_eq!(
        t.per_try.unwrap().nanos,
        500_000_000,
        "backendRequest is the per-try timeout"
    );
    let (retry, _) = canary.retry.as_ref().unwrap();
    assert_eq!(
        (retry.attempts, retry.retry_on_status.clone()),
        (2, vec![503])
    );
    let all = &r.rules[1];
    assert_eq!(
        all.matches[0].path.as_ref().unwrap().value,
        "/",
        "no match: every request"
    );
    assert!(all.backends.is_empty(), "no backend: the parent itself");
}

#[test]
fn what_mesh_routes_cannot_do_is_refused_by_field() {
    for (from, to, field, rule) in [
        (
            "type: PathPrefix, value: /prices",
            "type: RegularExpression, value: /p.*",
            "spec.rules[0].matches[0].path.type",
            "RegularExpression",
        ),
        (
            "value: /prices}",
            "value: prices}",
            "spec.rules[0].matches[0].path.value",
            "starts with /",
        ),
        (
            "method: GET",
            "method: FETCH",
            "spec.rules[0].matches[0].method",
            "method is one of",
        ),
        (
            "{name: pricing-v2, port: 80, weight: 10}",
            "{name: pricing-v2}",
            "spec.rules[0].backendRefs[0].port",
            "names its port",
        ),
        (
            "backendRequest: 500ms",
            "backendRequest: 5s",
            "spec.rules[0].timeouts.backendRequest",
            "backendRequest <= request",
        ),
        (
            "codes: [503]",
            "codes: [200]",
            "spec.rules[0].retry.codes[0]",
            "400..599",
        ),
        (
            "- {}",
            "- {filters: [{type: RequestHeaderModifier}]}",
            "spec.rules[1].filters",
            "not supported",
        ),
        (
            "kind: Service, name: pricing, port",
            "kind: Pod, name: pricing, port",
            "spec.parentRefs[0]",
            "a parent is a Service",
        ),
        (
            "- name: canary",
            "- name: canary\n  - name: canary",
            "spec.rules[1].name",
            "unique",
        ),
    ] {
        assert!(ROUTE.contains(from), "{from}");
        let e = parse(&ROUTE.replacen(from, to, 1)).unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains(rule), "{e}");
        assert_eq!(e.object, "HTTPRoute shop/pricing");
    }
}

#[test]
fn a_policy_on_a_route_takes_only_per_request_sections() {
    let policy = |section: &str| {
        format!(
            "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: p, namespace: shop}}\n\
             spec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: pricing}}]\n  {section}\n"
        )
    };
    assert!(parse(&policy("timeouts: {request: 1s}")).is_ok());
    assert!(parse(&policy("cache: {maxEntries: 10}")).is_ok());
    let e = parse(&policy(
        "circuitBreaker: {tripWhen: {consecutiveFailures: 3}}",
    ))
    .unwrap_err();
    assert_eq!(e.field, "spec.circuitBreaker");
    assert!(e.message.contains("per backend Service"), "{e}");
    let e = parse(&policy("loadBalancer: {algorithm: RoundRobin}")).unwrap_err();
    assert_eq!(e.field, "spec.loadBalancer");
}

#[test]
fn grpc_routes_match_services_and_methods_as_paths() {
    let parsed = parse(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - matches: [{method: {service: echo.Echo, method: Unary}}]
  - matches: [{method: {service: echo.Echo}, headers: [{name: x-v, value: "2"}]}]
"#,
    )
    .unwrap();
    let Object::Route(r) = &parsed.objects[0] else {
        panic!("not a route")
    };
    let path = |i: usize| r.rules[i].matches[0].path.clone().unwrap();
    assert_eq!(path(0).value, "/echo.Echo/Unary");
    assert_eq!(
        path(0).kind,
        i32::from(ferrymesh_proto::config::v1::path_match::Kind::Exact)
    );
    assert_eq!(path(1).value, "/echo.Echo/");
    assert_eq!(
        path(1).kind,
        i32::from(ferrymesh_proto::config::v1::path_match::Kind::Prefix)
    );
    assert_eq!(r.rules[1].matches[0].headers[0].name, "x-v");
}

#[test]
fn a_fault_on_a_route_must_be_client_side() {
    let fault = |side: &str| {
        format!(
            "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: FaultInjection\nmetadata: {{name: f, namespace: shop}}\n\
             spec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}}]\n{side}  abort: {{httpStatus: 503, percentage: 10}}\n  duration: 5m\n"
        )
    };
    let e = parse(&fault("")).unwrap_err();
    assert_eq!(e.field, "spec.side");
    assert!(e.message.contains("set side: Client"), "{e}");
    assert!(parse(&fault("  side: Client\n")).is_ok());
}

const AUTHZ: &str = r#"
apiVersion: policy.ferrymesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: orders-writers, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: orders}]
  action: Allow
  rules:
  - from:
      identities: ["spiffe://cluster.local/ns/shop/sa/checkout", "spiffe://cluster.local/ns/ops/sa/*"]
      serviceAccounts: [{namespace: edge, name: gateway}]
      namespaces: [shop]
      networks: [10.0.0.0/8]
    to:
      methods: [POST, PUT]
      paths: [{type: PathPrefix, value: /orders}]
"#;

#[test]
fn authorization_policies_are_read_whole() {
    let parsed = parse(AUTHZ).unwrap();
    let Object::Policy(p) = &parsed.objects[0] else {
        panic!("not a policy")
    };
    let a = p.authorization.as_ref().unwrap();
    assert!(!a.deny);
    let r = &a.rules[0];
    assert_eq!(r.identities.len(), 2);
    assert_eq!(r.service_accounts, ["edge/gateway"]);
    assert_eq!(r.namespaces, ["shop"]);
    assert_eq!(r.networks, ["10.0.0.0/8"]);
    assert_eq!(r.methods, ["POST", "PUT"]);
    assert_eq!(r.paths[0].value, "/orders");
}

#[test]
fn authorization_rules_are_enforced_by_field() {
    for (from, to, field, rule) in [
        (
            "action: Allow",
            "action: Audit",
            "spec.action",
            "Allow | Deny",
        ),
        (
            "ops/sa/*",
            "ops/*/x",
            "spec.rules[0].from.identities[1]",
            "trailing * segment",
        ),
        (
            "\"spiffe://cluster.local/ns/shop/sa/checkout\"",
            "\"checkout\"",
            "spec.rules[0].from.identities[0]",
            "spiffe://",
        ),
        (
            "10.0.0.0/8",
            "10.0.0.0/33",
            "spec.rules[0].from.networks[0]",
            "CIDR",
        ),
        (
            "[POST, PUT]",
            "[post]",
            "spec.rules[0].to.methods[0]",
            "capitals",
        ),
        (
            "type: PathPrefix",
            "type: RegularExpression",
            "spec.rules[0].to.paths[0].type",
            "Exact | PathPrefix",
        ),
        (
            "namespaces: [shop]",
            "requestPrincipals: [\"https://sso/*\"]",
            "spec.rules[0].from.requestPrincipals",
            "JWT",
        ),
        (
            "kind: Service, name: orders",
            "kind: HTTPRoute, name: orders",
            "spec.targetRefs[0]",
            "",
        ),
    ] {
        assert!(AUTHZ.contains(from), "{from}");
        let e = parse(&AUTHZ.replacen(from, to, 1)).unwrap_err();
        assert!(e.field.starts_with(field), "{field}: {e}");
        assert!(e.message.contains(rule), "{e}");
    }
    let empty = AUTHZ.split("  rules:").next().unwrap().to_owned() + "  rules: []\n";
    assert_eq!(parse(&empty).unwrap_err().field, "spec.rules");
}

#[test]
fn authentication_policies_set_the_mtls_mode() {
    let policy = |mode: &str| {
        format!(
            "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: AuthenticationPolicy\nmetadata: {{name: a, namespace: shop}}\n\
             spec:\n  targetRefs: [{{group: \"\", kind: Service, name: orders}}]\n  mtls: {{mode: {mode}}}\n"
        )
    };
    let Object::Policy(p) = &parse(&policy("Strict")).unwrap().objects[0] else {
        panic!("not a policy")
    };
    assert_eq!(p.mtls_strict, Some(true));
    let Object::Policy(p) = &parse(&policy("Permissive")).unwrap().objects[0] else {
        panic!("not a policy")
    };
    assert_eq!(p.mtls_strict, Some(false));
    let e = parse(&policy("Optional")).unwrap_err();
    assert_eq!(e.field, "spec.mtls.mode");
}

#[test]
fn an_empty_slice_as_the_api_server_serves_it_has_no_endpoints() {
    // A real API server serves an EndpointSlice with no endpoints (the Service's selector
    // matches no pod any more) as `"endpoints": null`, and `"ports": null` likewise.
    let parsed = parse(
        "{\"apiVersion\": \"discovery.k8s.io/v1\", \"kind\": \"EndpointSlice\",\
          \"metadata\": {\"name\": \"a-x\", \"namespace\": \"shop\", \"labels\": {\"kubernetes.io/service-name\": \"a\"}},\
          \"addressType\": \"IPv4\", \"ports\": null, \"endpoints\": null}",
    )
    .unwrap();
    let Object::EndpointSlice(slice) = &parsed.objects[0] else {
        panic!("{:?}", parsed.objects)
    };
    assert!(slice.endpoints.is_empty());
    assert!(slice.ports.is_empty());
    let svc = |ports: &str| {
        parse(&format!(
            "{{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {{\"name\": \"a\", \"namespace\": \"shop\"}},\
              \"spec\": {{\"ports\": {ports}, \"clusterIPs\": null}}}}"
        ))
    };
    assert!(svc("[{\"port\": 80}]").is_ok());
    // No ports at all is still refused for what it is, not as a type error.
    assert_eq!(
        svc("null").unwrap_err().message,
        "a Service needs at least one port"
    );
}

#[test]
fn bulkhead_fields_the_proxy_does_not_enforce_are_refused_with_the_reason() {
    let doc = |limits: &str| {
        format!(
            "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: p, namespace: shop}}\n\
             spec:\n  targetRefs: [{{group: \"\", kind: Service, name: pricing}}]\n  circuitBreaker: {{limits: {limits}}}\n"
        )
    };
    let e = parse(&doc("{maxConnections: 10}")).unwrap_err();
    assert_eq!(e.field, "spec.circuitBreaker.limits.maxConnections");
    assert!(e.message.contains("not supported"), "{}", e.message);
    let e = parse(&doc("{maxPendingRequests: 10}")).unwrap_err();
    assert_eq!(e.field, "spec.circuitBreaker.limits.maxPendingRequests");
    assert!(parse(&doc("{maxRequests: 10}")).is_ok());
}
