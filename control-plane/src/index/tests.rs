use std::path::Path;

use ferrymesh_proto::discovery::v1 as pb;

use super::*;
use crate::sources::parse_documents;

const SHOP: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: pricing, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: a-service-wide, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: pricing}]
  timeouts: {request: 5s}
---
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: b-port, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: pricing, sectionName: http}]
  timeouts: {request: 2s}
"#;

fn load(index: &IndexHandle, file: &str, text: &str) {
    index.apply_file(Path::new(file), parse_documents(Path::new(file), text));
}

use ferrymesh_test_support::nodes::local as node;

fn endpoints(index: &IndexHandle, name: &str) -> Vec<u32> {
    match index
        .snapshot()
        .lookup(pb::ResourceType::Endpoints, name, None)
    {
        Lookup::Found(r) => {
            let Some(pb::resource::Body::Endpoints(e)) = r.body else {
                panic!("not endpoints")
            };
            e.endpoints
                .iter()
                .map(|e| e.addr.as_ref().unwrap().port)
                .collect()
        }
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn registered_workloads_are_endpoints_while_ready_and_connected() {
    let index = IndexHandle::new();
    load(&index, "shop.yaml", SHOP);
    index.stream_opened(1, &node("pricing-1", "pricing", 7001, true));
    index.stream_opened(2, &node("pricing-2", "pricing", 7002, false));
    assert_eq!(
        endpoints(&index, "pricing.shop.svc.cluster.local:80"),
        [7001]
    );
    index.workload_ready(2, true);
    assert_eq!(endpoints(&index, "pricing.shop:80"), [7001, 7002]);
    index.workload_ready(1, false);
    assert_eq!(endpoints(&index, "pricing.shop.svc:80"), [7002]);
    index.stream_closed(2);
    assert!(endpoints(&index, "pricing.shop:80").is_empty());
}

#[test]
fn versions_depend_on_content_not_on_order() {
    let a = IndexHandle::new();
    a.stream_opened(1, &node("x-1", "x", 7001, true));
    a.stream_opened(2, &node("x-2", "x", 7002, true));
    let b = IndexHandle::new();
    b.stream_opened(9, &node("x-2", "x", 7002, true));
    b.stream_opened(8, &node("x-1", "x", 7001, true));
    let version =
        |i: &IndexHandle| match i
            .snapshot()
            .lookup(pb::ResourceType::Endpoints, "x.shop:80", None)
        {
            Lookup::Found(r) => r.version,
            other => panic!("{other:?}"),
        };
    assert_eq!(version(&a), version(&b));
    b.stream_closed(9);
    assert_ne!(version(&a), version(&b));
}

#[test]
fn unknown_names_are_not_found_and_bad_names_invalid() {
    let index = IndexHandle::new();
    load(&index, "shop.yaml", SHOP);
    let snap = index.snapshot();
    assert_eq!(
        snap.lookup(pb::ResourceType::Endpoints, "nope.shop:80", None),
        Lookup::NotFound
    );
    assert_eq!(
        snap.lookup(pb::ResourceType::Endpoints, "pricing.shop:81", None),
        Lookup::NotFound
    );
    assert_eq!(
        snap.lookup(pb::ResourceType::Endpoints, "a.b.c.d.e.f:80", None),
        Lookup::NotFound
    );
    assert!(matches!(
        snap.lookup(pb::ResourceType::Endpoints, "pricing.shop", None),
        Lookup::Invalid(_)
    ));
    assert!(matches!(
        snap.lookup(pb::ResourceType::InboundPolicy, "*", None),
        Lookup::Found(_)
    ));
    assert!(matches!(
        snap.lookup(pb::ResourceType::Gateway, "*", None),
        Lookup::Invalid(_)
    ));
}

#[test]
fn the_most_specific_policy_sets_the_timeouts_section() {
    let index = IndexHandle::new();
    load(&index, "shop.yaml", SHOP);
    let Lookup::Found(r) =
        index
            .snapshot()
            .lookup(pb::ResourceType::ClientPolicy, "pricing.shop:80", None)
    else {
        panic!("no client policy")
    };
    let Some(pb::resource::Body::ClientPolicy(p)) = r.body else {
        panic!()
    };
    assert_eq!(p.timeouts.unwrap().request.unwrap().seconds, 2);
    let names: Vec<_> = r.sources.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["pricing", "b-port", "a-service-wide"]);
}

#[test]
fn a_rejected_reload_keeps_the_last_good_objects() {
    let index = IndexHandle::new();
    load(&index, "shop.yaml", SHOP);
    load(
        &index,
        "shop.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: pricing, namespace: shop}\nspec: {ports: []}\n",
    );
    let snap = index.snapshot();
    assert_eq!(snap.file_errors.len(), 1);
    assert_eq!(snap.file_errors[0].field, "spec.ports");
    assert!(matches!(
        snap.lookup(pb::ResourceType::Endpoints, "pricing.shop:80", None),
        Lookup::Found(_)
    ));
    index.remove_file(Path::new("shop.yaml"));
    assert_eq!(
        index
            .snapshot()
            .lookup(pb::ResourceType::Endpoints, "pricing.shop:80", None),
        Lookup::NotFound
    );
}

#[test]
fn static_endpoint_slices_carry_their_conditions() {
    let index = IndexHandle::new();
    load(
        &index,
        "legacy.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: legacy, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: legacy-a, namespace: shop, labels: {kubernetes.io/service-name: legacy}}\n\
         ports: [{name: http, port: 9000}]\nendpoints:\n- addresses: [127.0.0.2]\n- addresses: [127.0.0.3]\n  conditions: {ready: false, terminating: true}\n",
    );
    let Lookup::Found(r) =
        index
            .snapshot()
            .lookup(pb::ResourceType::Endpoints, "legacy.shop:80", None)
    else {
        panic!()
    };
    let Some(pb::resource::Body::Endpoints(e)) = r.body else {
        panic!()
    };
    assert_eq!(e.endpoints.len(), 2);
    assert!(e.endpoints[0].ready && !e.endpoints[1].ready && e.endpoints[1].terminating);
    assert_eq!(
        e.endpoints[0].proxy_inbound_port, 0,
        "static endpoints are unmeshed"
    );
}

#[test]
fn sections_merge_atomically_from_the_most_specific_policy_setting_each() {
    let index = IndexHandle::new();
    load(
        &index,
        "shop.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: pricing, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: namespace-wide, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Namespace, name: shop}]
  timeouts: {request: 10s, connect: 2s}
  retry: {attempts: 4, retryOn: [5xx]}
---
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: pricing, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: pricing}]
  timeouts: {request: 2s}
  fallback: {staticResponse: {status: 200, body: "{}"}}
"#,
    );
    let Lookup::Found(r) =
        index
            .snapshot()
            .lookup(pb::ResourceType::ClientPolicy, "pricing.shop:80", None)
    else {
        panic!("no client policy")
    };
    let Some(pb::resource::Body::ClientPolicy(p)) = r.body else {
        panic!()
    };
    let timeouts = p.timeouts.unwrap();
    assert_eq!(timeouts.request.unwrap().seconds, 2);
    assert!(
        timeouts.connect.is_none(),
        "the section is taken whole: no connect from the namespace policy"
    );
    assert_eq!(p.retry.unwrap().attempts, 4);
    assert!(p.budget.is_some(), "the budget comes with retry");
    assert!(p.fallback.is_some());
    assert!(p.breaker.is_none());
    let from = |s: &str| p.section_sources[s].name.clone();
    assert_eq!(
        (from("timeouts"), from("retry"), from("fallback")),
        ("pricing".into(), "namespace-wide".into(), "pricing".into())
    );
}

#[test]
fn faults_end_after_their_duration_and_carry_a_ttl_until_then() {
    let index = IndexHandle::with_fault_ttl(std::time::Duration::from_mins(1));
    load(
        &index,
        "f.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n---\n\
         apiVersion: policy.ferrymesh.io/v1alpha1\nkind: FaultInjection\nmetadata: {name: f, namespace: shop}\n\
         spec:\n  targetRefs: [{group: \"\", kind: Service, name: echo}]\n  duration: 1m\n  abort: {httpStatus: 503}\n",
    );
    let snap = index.snapshot();
    assert_eq!(snap.faults.len(), 1);
    let expires = snap.next_expiry.unwrap();
    let node = node("echo-1", "echo", 7001, true);
    let Lookup::Found(r) = snap.lookup(pb::ResourceType::InboundPolicy, "*", Some(&node)) else {
        panic!()
    };
    let Some(pb::resource::Body::InboundPolicy(p)) = &r.body else {
        panic!()
    };
    assert_eq!(p.faults.len(), 1, "the echo workload gets the fault");
    assert!(r.ttl.unwrap().seconds <= 60);
    let other = node_of("other-1", "other");
    let Lookup::Found(r) = snap.lookup(pb::ResourceType::InboundPolicy, "*", Some(&other)) else {
        panic!()
    };
    assert!(r.ttl.is_none(), "other workloads get the plain policy");
    // Past its end it is gone.
    let inner = index.inner.lock().unwrap();
    let later = faults::active(
        inner.files.values().flat_map(|f| f.objects.iter()),
        &inner.first_seen,
        expires,
    );
    assert!(later.is_empty());
}

fn node_of(instance: &str, service: &str) -> pb::Node {
    node(instance, service, 7002, true)
}

#[test]
fn route_sections_come_from_the_route_then_its_rule_then_the_whole_route() {
    let index = IndexHandle::new();
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: pricing, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: pricing}]
  rules:
  - name: own
    matches: [{path: {type: Exact, value: /a}}]
    timeouts: {request: 1s}
  - name: ruled
    matches: [{path: {type: Exact, value: /b}}]
  - name: plain
---
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: on-rule, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: pricing, sectionName: ruled}]
  timeouts: {request: 2s}
---
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: on-route, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: pricing}]
  timeouts: {request: 3s}
  cache: {maxEntries: 5}
"#;
    load(&index, "shop.yaml", SHOP);
    load(&index, "route.yaml", route);
    let Lookup::Found(r) = index.snapshot().lookup(
        pb::ResourceType::ClientPolicy,
        "pricing.shop.svc.cluster.local:80",
        None,
    ) else {
        panic!("no policy")
    };
    let Some(pb::resource::Body::ClientPolicy(p)) = r.body else {
        panic!("not a client policy")
    };
    let names: Vec<&str> = p.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["pricing/own", "pricing/ruled", "pricing/plain"]);
    let request = |i: usize| p.routes[i].timeouts.unwrap().request.unwrap().seconds;
    let source = |i: usize, s: &str| p.routes[i].section_sources[s].name.clone();
    assert_eq!(
        (request(0), source(0, "timeouts")),
        (1, "pricing".into()),
        "the route's own"
    );
    assert_eq!((request(1), source(1, "timeouts")), (2, "on-rule".into()));
    assert_eq!((request(2), source(2, "timeouts")), (3, "on-route".into()));
    for i in 0..3 {
        assert_eq!(source(i, "cache"), "on-route", "sections merge one by one");
    }
    assert_eq!(
        p.timeouts.unwrap().request.unwrap().seconds,
        2,
        "the service's own sections stay as they were"
    );
}

#[test]
fn a_route_naming_unknown_services_is_reported() {
    let index = IndexHandle::new();
    load(&index, "shop.yaml", SHOP);
    load(
        &index,
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: ghost}]\n  rules: [{backendRefs: [{name: pricing-v9, port: 80}]}]\n",
    );
    let warnings = index.snapshot().warnings.clone();
    assert!(
        warnings.contains(&"HTTPRoute shop/r: parent Service shop/ghost does not exist".to_owned()),
        "{warnings:?}"
    );
    assert!(
        warnings.contains(
            &"HTTPRoute shop/r: backend Service shop/pricing-v9 does not exist".to_owned()
        ),
        "{warnings:?}"
    );
}

#[test]
fn each_workload_gets_its_mtls_mode_authorization_and_the_cluster_default() {
    use ferrymesh_proto::config::v1 as cfg;
    let index = IndexHandle::new();
    index.set_default_inbound(ferrymesh_proto::config::v1::DefaultPolicy::ClusterAuthenticated);
    let policies = r#"
apiVersion: policy.ferrymesh.io/v1alpha1
kind: AuthenticationPolicy
metadata: {name: shop-permissive, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Namespace, name: shop}]
  mtls: {mode: Permissive}
---
apiVersion: policy.ferrymesh.io/v1alpha1
kind: AuthenticationPolicy
metadata: {name: pricing-strict, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: pricing}]
  mtls: {mode: Strict}
---
apiVersion: policy.ferrymesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: pricing-readers, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: pricing}]
  action: Allow
  rules: [{from: {serviceAccounts: [{namespace: shop, name: storefront}]}}]
---
apiVersion: policy.ferrymesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Namespace, name: shop}]
  action: Deny
  rules: [{to: {paths: [{type: PathPrefix, value: /admin}]}}]
"#;
    load(&index, "shop.yaml", SHOP);
    load(&index, "security.yaml", policies);
    let inbound = |node: &pb::Node| {
        let Lookup::Found(r) =
            index
                .snapshot()
                .lookup(pb::ResourceType::InboundPolicy, "*", Some(node))
        else {
            panic!("no inbound policy")
        };
        let Some(pb::resource::Body::InboundPolicy(p)) = r.body else {
            panic!("not an inbound policy")
        };
        p
    };
    let pricing = inbound(&node_of("pricing-1", "pricing"));
    assert_eq!(
        pricing.mtls,
        i32::from(cfg::MtlsMode::Strict),
        "the Service's wins"
    );
    assert_eq!(pricing.allow.len(), 1);
    assert_eq!(pricing.allow[0].service_accounts, ["shop/storefront"]);
    assert_eq!(
        pricing.allow[0].source.as_ref().unwrap().name,
        "pricing-readers"
    );
    assert_eq!(pricing.deny.len(), 1, "the namespace-wide deny applies too");
    assert_eq!(
        pricing.default_policy,
        i32::from(cfg::DefaultPolicy::ClusterAuthenticated)
    );
    let other = inbound(&node_of("catalog-1", "catalog"));
    assert_ne!(other.mtls, i32::from(cfg::MtlsMode::Strict));
    assert!(other.allow.is_empty());
    assert_eq!(other.deny.len(), 1);
}

#[test]
fn pod_endpoints_carry_their_service_accounts_identity_when_injected() {
    let index = IndexHandle::new();
    index.set_trust_domain("course.local");
    let objects = r#"
apiVersion: v1
kind: Service
metadata: {name: pricing, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: pricing-x, namespace: shop, labels: {kubernetes.io/service-name: pricing}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: ["10.0.0.1"], targetRef: {kind: Pod, name: pricing-a}}
- {addresses: ["10.0.0.2"], targetRef: {kind: Pod, name: pricing-b}}
- {addresses: ["10.0.0.3"]}
"#;
    load(&index, "k8s.yaml", objects);
    let pods = r#"
apiVersion: v1
kind: Pod
metadata: {name: pricing-a, namespace: shop, annotations: {ferrymesh.io/injected: "true"}}
spec: {serviceAccountName: pricing}
---
apiVersion: v1
kind: Pod
metadata: {name: pricing-b, namespace: shop}
spec: {serviceAccountName: pricing}
"#;
    load(&index, "pods.yaml", pods);
    let Lookup::Found(r) = index.snapshot().lookup(
        pb::ResourceType::Endpoints,
        "pricing.shop.svc.cluster.local:80",
        None,
    ) else {
        panic!("no endpoints")
    };
    let Some(pb::resource::Body::Endpoints(e)) = r.body else {
        panic!("not endpoints")
    };
    let identities: Vec<(&str, &str)> = e
        .endpoints
        .iter()
        .map(|e| (e.addr.as_ref().unwrap().ip.as_str(), e.identity.as_str()))
        .collect();
    // Injected: mTLS with the service account's identity. Not injected, or no Pod: plaintext.
    assert_eq!(
        identities,
        [
            ("10.0.0.1", "spiffe://course.local/ns/shop/sa/pricing"),
            ("10.0.0.2", ""),
            ("10.0.0.3", ""),
        ]
    );
    assert_eq!(e.endpoints[0].pod.as_ref().unwrap().name, "pricing-a");
}

/// Whether `wake` was notified (consumes the stored notification).
async fn woken(wake: &Arc<Notify>) -> bool {
    tokio::time::timeout(std::time::Duration::from_millis(20), wake.notified())
        .await
        .is_ok()
}

#[tokio::test]
async fn a_rebuild_wakes_only_the_streams_whose_names_changed() {
    let index = IndexHandle::new();
    load(&index, "shop.yaml", SHOP);
    load(
        &index,
        "other.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: catalog, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n",
    );
    let (pricing, catalog, inbound) = (
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let i = &index.interest;
    i.add(pb::ResourceType::Endpoints, "pricing.shop:80", 1, &pricing);
    i.add(
        pb::ResourceType::ClientPolicy,
        "pricing.shop:80",
        1,
        &pricing,
    );
    i.add(pb::ResourceType::Endpoints, "catalog.shop:80", 2, &catalog);
    i.add(pb::ResourceType::InboundPolicy, "*", 3, &inbound);
    assert_eq!(i.names(), 4);

    // A pricing instance registers: only pricing's subscriber wakes.
    index.stream_opened(10, &node("pricing-1", "pricing", 7001, true));
    assert!(woken(&pricing).await, "pricing's endpoints changed");
    assert!(!woken(&catalog).await, "catalog did not change");
    assert!(!woken(&inbound).await, "no inbound input changed");

    // A policy edit: pricing's client policy changed, nothing else.
    load(
        &index,
        "shop.yaml",
        &SHOP.replace("request: 2s", "request: 3s"),
    );
    assert!(woken(&pricing).await);
    assert!(!woken(&catalog).await);

    // A stream without a workload opens and closes: no rebuild at all.
    let generation = index.snapshot().generation;
    index.stream_opened(11, &pb::Node::default());
    index.stream_closed(11);
    assert_eq!(index.snapshot().generation, generation);
    assert!(!woken(&pricing).await);

    // Unsubscribed streams are forgotten.
    i.remove(pb::ResourceType::Endpoints, "catalog.shop:80", 2);
    assert_eq!(i.names(), 3);
}
