use serde_json::{Value, json};

use super::*;

fn web_pod() -> Value {
    json!({
        "metadata": {"labels": {"app": "web"}, "annotations": {"config.ferrymesh.io/skip-outbound-ports": "5432"}},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "web",
                "image": "shop/web",
                "ports": [{"name": "http", "containerPort": 8080}],
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5, "timeoutSeconds": 2},
                "readinessProbe": {"tcpSocket": {"port": 8080}},
                "startupProbe": {"exec": {"command": ["true"]}},
                "futureField": {"kept": true},
            }, {
                "name": "admin",
                "image": "shop/admin",
                "livenessProbe": {"httpGet": {"path": "/", "port": 8443, "scheme": "HTTPS"}},
                "readinessProbe": {"grpc": {"port": 9000, "service": "admin"}},
            }],
        },
    })
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {list}"))
}

fn env<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
}

#[test]
fn a_pod_gets_the_init_container_the_native_sidecar_and_its_volumes() {
    let mut pod = web_pod();
    assert_eq!(
        inject(&mut pod, &Settings::default()),
        Ok(Outcome::Injected)
    );
    let inits = &pod["spec"]["initContainers"];
    assert_eq!(inits[0]["name"], INIT_CONTAINER);
    assert_eq!(
        inits[1]["name"], PROXY_CONTAINER,
        "the sidecar starts right after the rules"
    );
    let init = &inits[0];
    let args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "init-iptables");
    assert!(args.contains(&"--proxy-uid=2340"));
    assert!(args.contains(&"--skip-outbound-ports=5432"));
    // The admin and health ports, plus the HTTPS probe's port the kubelet must reach directly.
    assert!(
        args.contains(&"--skip-inbound-ports=4390,4391,8443"),
        "{args:?}"
    );
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );

    let proxy = &inits[1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["args"], json!(["run", "--mode=sidecar"]));
    assert_eq!(proxy["securityContext"]["runAsUser"], 2340);
    assert_eq!(proxy["securityContext"]["runAsNonRoot"], true);
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(
        env(proxy, "FERRYMESH_POD_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        env(proxy, "FERRYMESH_DISCOVERY_ADDR").unwrap()["value"],
        "ferrymesh-controller.ferrymesh-system.svc:9091"
    );
    let volumes: Vec<&str> = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        volumes,
        ["ferrymesh-identity", "ferrymesh-token", "ferrymesh-trust"]
    );
    let token = &pod["spec"]["volumes"][1]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "identity.ferrymesh.io");
    assert_eq!(pod["metadata"]["annotations"][INJECTED], "true");
    assert_eq!(
        pod["metadata"]["annotations"][PROXY_VERSION],
        env!("CARGO_PKG_VERSION")
    );
    // Fields the injector does not know are kept.
    assert_eq!(
        container(&pod["spec"]["containers"], "web")["futureField"]["kept"],
        true
    );
}

#[test]
fn probes_are_rewritten_to_the_health_port_and_their_originals_handed_to_the_proxy() {
    let mut pod = web_pod();
    inject(&mut pod, &Settings::default()).unwrap();
    let web = container(&pod["spec"]["containers"], "web");
    assert_eq!(
        web["livenessProbe"],
        json!({"httpGet": {"path": "/app-health/web/livez", "port": 4391}, "periodSeconds": 5, "timeoutSeconds": 2})
    );
    assert_eq!(
        web["readinessProbe"]["httpGet"]["path"],
        "/app-health/web/readyz"
    );
    assert!(web["readinessProbe"].get("tcpSocket").is_none());
    assert_eq!(
        web["startupProbe"],
        json!({"exec": {"command": ["true"]}}),
        "exec probes stay"
    );
    let admin = container(&pod["spec"]["containers"], "admin");
    assert_eq!(
        admin["livenessProbe"]["httpGet"]["scheme"], "HTTPS",
        "HTTPS probes stay"
    );
    assert_eq!(
        admin["readinessProbe"]["httpGet"]["path"],
        "/app-health/admin/readyz"
    );

    let proxy = container(&pod["spec"]["initContainers"], PROXY_CONTAINER);
    let originals: Value = serde_json::from_str(
        env(proxy, "FERRYMESH_APP_PROBES").unwrap()["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        originals,
        json!({
            "/app-health/web/livez": {"httpGet": {"path": "/healthz", "port": 8080}, "timeoutSeconds": 2},
            "/app-health/web/readyz": {"tcpSocket": {"port": 8080}},
            "/app-health/admin/readyz": {"grpc": {"port": 9000, "service": "admin"}},
        })
    );
}

#[test]
fn injecting_twice_changes_nothing() {
    let mut pod = web_pod();
    inject(&mut pod, &Settings::default()).unwrap();
    let once = pod.clone();
    assert_eq!(
        inject(&mut pod, &Settings::default()),
        Ok(Outcome::Skipped("already injected".into()))
    );
    assert_eq!(pod, once);
}

#[test]
fn host_network_pods_are_skipped_and_bad_annotations_refused_untouched() {
    let mut pod = web_pod();
    pod["spec"]["hostNetwork"] = json!(true);
    let before = pod.clone();
    assert!(matches!(
        inject(&mut pod, &Settings::default()),
        Ok(Outcome::Skipped(_))
    ));
    assert_eq!(pod, before);

    for (name, value) in [
        ("skip-inbound-ports", "80,http"),
        ("skip-subnets", "10.0.0.0/40"),
        ("native-sidecar", "yes"),
        ("default-inbound-policy", "allow-all"),
        ("trace-sampling", "2"),
    ] {
        let mut pod = web_pod();
        pod["metadata"]["annotations"][format!("config.ferrymesh.io/{name}")] = json!(value);
        let before = pod.clone();
        let err = inject(&mut pod, &Settings::default()).unwrap_err();
        assert_eq!(err.annotation, format!("config.ferrymesh.io/{name}"));
        assert_eq!(pod, before, "{name}: nothing changed");
    }
}

#[test]
fn without_native_sidecars_the_proxy_is_the_first_container_and_holds_the_app_back() {
    let mut pod = web_pod();
    pod["metadata"]["annotations"]["config.ferrymesh.io/native-sidecar"] = json!("false");
    pod["metadata"]["annotations"]["config.ferrymesh.io/rewrite-probes"] = json!("false");
    inject(&mut pod, &Settings::default()).unwrap();
    let first = &pod["spec"]["containers"][0];
    assert_eq!(first["name"], PROXY_CONTAINER);
    assert!(first.get("restartPolicy").is_none());
    assert_eq!(
        first["lifecycle"]["postStart"]["exec"]["command"][1],
        "await-ready"
    );
    assert_eq!(pod["spec"]["initContainers"].as_array().unwrap().len(), 1);
    // Probes untouched when rewriting is off.
    assert_eq!(
        pod["spec"]["containers"][1]["readinessProbe"],
        json!({"tcpSocket": {"port": 8080}})
    );
}

#[test]
fn the_pods_annotation_wins_over_the_namespaces() {
    let on: Map<String, Value> = [(INJECT.to_owned(), json!("enabled"))]
        .into_iter()
        .collect();
    let mut pod = web_pod();
    assert!(wanted(&pod, &on, false));
    assert!(!wanted(&pod, &Map::new(), false));
    assert!(wanted(&pod, &Map::new(), true));
    pod["metadata"]["annotations"][INJECT] = json!("disabled");
    assert!(!wanted(&pod, &on, true));
}

#[test]
fn workload_kinds_lead_to_their_pod_template() {
    let mut cron = json!({"spec": {"jobTemplate": {"spec": {"template": {"spec": {}}}}}});
    assert!(pod_template_mut("CronJob", &mut cron).is_some());
    let mut deploy = json!({"spec": {"template": {"spec": {}}}});
    assert!(pod_template_mut("Deployment", &mut deploy).is_some());
    assert!(pod_template_mut("ConfigMap", &mut json!({})).is_none());
}
