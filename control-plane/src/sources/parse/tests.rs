use super::*;

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
    assert_eq!(
        p.timeouts.as_ref().unwrap().request,
        Some(std::time::Duration::from_secs(2))
    );
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
