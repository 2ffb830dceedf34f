use super::*;

const DOC: &str = r#"
apiVersion: config.ferrymesh.io/v1alpha1
kind: ProxyConfig
metadata: {name: catalog-2}
spec:
  workload: {name: catalog-2, namespace: shop, service: catalog}
  inbound: {listen: "127.0.0.1:0", app: "127.0.0.1:8080", readinessPath: /readyz}
  outbound:
    mode: HttpProxy
    listen: "127.0.0.1:0"
    unknownHosts: Reject
    listeners: [{listen: "127.0.0.1:0", service: "payments.shop:80"}]
  admin: {listen: "127.0.0.1:0", healthListen: "127.0.0.1:0"}
  identity: {mode: Disabled}
  controlPlane: {discovery: "127.0.0.1:9091"}
"#;

#[test]
fn loads_a_local_proxy_config() {
    let c = Config::parse(DOC, |_| None).unwrap();
    assert_eq!(c.workload.service, "catalog");
    assert_eq!(c.workload.service_account, "catalog");
    assert_eq!(c.outbound.unknown_hosts, UnknownHosts::Reject);
    assert_eq!(c.outbound.listeners[0].target, "payments.shop:80");
    assert_eq!(
        c.inbound.unwrap().connect_timeout,
        Duration::from_millis(100)
    );
    assert_eq!(c.drain_timeout, Duration::from_secs(10));
}

#[test]
fn env_overrides_the_file() {
    let env = |k: &str| match k {
        "FERRYMESH_PROXY_CONTROL_PLANE_DISCOVERY" => Some("127.0.0.1:7000".to_owned()),
        "FERRYMESH_PROXY_OUTBOUND_CONNECT_TIMEOUT" => Some("250ms".to_owned()),
        _ => None,
    };
    let c = Config::parse(DOC, env).unwrap();
    assert_eq!(c.control_plane.discovery, "127.0.0.1:7000");
    assert_eq!(c.outbound.connect_timeout, Duration::from_millis(250));
}

#[test]
fn every_problem_is_reported_at_once() {
    let bad = DOC
        .replace("\"127.0.0.1:8080\"", "nope")
        .replace("mode: Disabled", "mode: ControlPlane")
        .replace("payments.shop:80", "payments");
    let err = Config::parse(&bad, |_| None).unwrap_err();
    // The bad address, the listener target, and the three things ControlPlane needs.
    assert_eq!(err.0.len(), 5, "{err}");
    for field in [
        "controlPlane.identity",
        "identity.tokenFile",
        "identity.trustAnchors",
    ] {
        assert!(
            err.0
                .iter()
                .any(|p| p.starts_with(field) && p.contains("required")),
            "{field}: {err}"
        );
    }
}

#[test]
fn control_plane_identity_names_its_files_and_the_ca() {
    let doc = DOC
            .replace(
                "identity: {mode: Disabled}",
                "identity: {mode: ControlPlane, tokenFile: /t/shop/catalog, trustAnchors: /ca.pem, lifetime: 1m}",
            )
            .replace("controlPlane: {", "controlPlane: {identity: \"127.0.0.1:9090\", ");
    let c = Config::parse(&doc, |_| None).unwrap();
    let i = c.identity.unwrap();
    assert_eq!(i.address, "127.0.0.1:9090");
    assert_eq!(i.token_file, std::path::Path::new("/t/shop/catalog"));
    assert_eq!(i.trust_domain, "cluster.local");
    assert_eq!(i.server_name, "localhost");
    assert_eq!(i.lifetime, Some(Duration::from_mins(1)));
}

#[test]
fn a_pod_sidecar_is_transparent_both_ways_with_the_injectors_probes() {
    let doc = DOC
        .replace(
            "readinessPath: /readyz}",
            "readinessPath: /readyz, transparent: true}",
        )
        .replace(
            "mode: HttpProxy",
            "mode: Transparent\n    listenV6: \"[::1]:4340\"",
        );
    let probes = r#"{"/app-health/web/livez":{"httpGet":{"path":"/healthz","port":8080}}}"#;
    let env = |k: &str| (k == "FERRYMESH_APP_PROBES").then(|| probes.to_owned());
    let c = Config::parse(&doc, env).unwrap();
    assert!(c.outbound.transparent && c.inbound.unwrap().transparent);
    assert_eq!(c.outbound.listen_v6, Some("[::1]:4340".parse().unwrap()));
    assert_eq!(
        c.app_probes["/app-health/web/livez"]
            .http_get
            .as_ref()
            .unwrap()
            .port,
        8080
    );
    // An IPv6 listener means nothing to an explicit proxy; bad probes are refused.
    let explicit = DOC.replace(
        "mode: HttpProxy",
        "mode: HttpProxy\n    listenV6: \"[::1]:4340\"",
    );
    let err = Config::parse(&explicit, |_| None).unwrap_err();
    assert!(err.0[0].starts_with("outbound.listenV6"), "{err}");
    let err = Config::parse(DOC, |k: &str| {
        (k == "FERRYMESH_APP_PROBES").then(|| r#"{"/x":{"tcpSocket":{"port":1}}}"#.to_owned())
    })
    .unwrap_err();
    assert!(err.0[0].contains("/app-health/"), "{err}");
}

#[test]
fn an_injected_sidecar_is_configured_by_its_pods_environment() {
    let vars: std::collections::HashMap<&str, &str> = [
        ("FERRYMESH_POD_NAME", "web-7d9f-abcde"),
        ("FERRYMESH_POD_NAMESPACE", "shop"),
        ("FERRYMESH_POD_SERVICE_ACCOUNT", "web"),
        (
            "FERRYMESH_DISCOVERY_ADDR",
            "ferrymesh-controller.ferrymesh-system.svc:9091",
        ),
        (
            "FERRYMESH_IDENTITY_ADDR",
            "ferrymesh-controller.ferrymesh-system.svc:9090",
        ),
        ("FERRYMESH_OPAQUE_PORTS", "5432,6379"),
        ("FERRYMESH_DEFAULT_INBOUND_POLICY", "all-authenticated"),
        (
            "FERRYMESH_APP_PROBES",
            r#"{"/app-health/web/livez":{"tcpSocket":{"port":8080}}}"#,
        ),
    ]
    .into_iter()
    .collect();
    let env = |k: &str| vars.get(k).map(|v| (*v).to_owned());
    let c = Config::sidecar(env, true).unwrap();
    assert!(c.sidecar);
    assert_eq!(c.workload.namespace, "shop");
    assert_eq!(c.workload.service_account, "web");
    let inbound = c.inbound.as_ref().unwrap();
    assert!(inbound.transparent);
    assert_eq!(inbound.listen, "[::]:4343".parse().unwrap());
    assert_eq!(
        inbound.default_policy,
        crate::authz::DefaultInbound::from_name("all-authenticated")
    );
    assert!(c.outbound.transparent);
    assert_eq!(c.outbound.listen, Some("127.0.0.1:4340".parse().unwrap()));
    assert_eq!(c.outbound.listen_v6, Some("[::1]:4340".parse().unwrap()));
    assert_eq!(c.admin.listen, "127.0.0.1:4390".parse().unwrap());
    let id = c.identity.as_ref().unwrap();
    assert_eq!(id.server_name, "ferrymesh-controller.ferrymesh-system.svc");
    assert_eq!(
        id.token_file,
        std::path::Path::new("/var/run/ferrymesh/tokens/token")
    );
    assert!(c.is_opaque(6379) && !c.is_opaque(8080));
    assert_eq!(c.app_probes.len(), 1);
    // Without IPv6, IPv4 only; without the injector's variables, each is named.
    let v4 = Config::sidecar(env, false).unwrap();
    assert_eq!(v4.outbound.listen_v6, None);
    assert_eq!(v4.inbound.unwrap().listen, "0.0.0.0:4343".parse().unwrap());
    let err = Config::sidecar(|_| None, true).unwrap_err();
    assert_eq!(err.0.len(), 5, "{err}");
}

#[test]
fn unknown_fields_are_refused_with_their_path() {
    let err = Config::parse(&DOC.replace("readinessPath", "readinesPath"), |_| None).unwrap_err();
    assert!(err.0[0].starts_with("spec.inbound"), "{err}");
}
