//! A local mesh for tests: the real controller on a temporary config folder, and real proxy
//! processes in front of in-process apps, all on loopback with ports chosen by the kernel.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;

use crate::process::{Spawned, bin};

/// A controller with its config folder.
#[derive(Debug)]
pub struct Mesh {
    /// Holds the config folder, proxy configs and logs.
    pub dir: tempfile::TempDir,
    /// The controller.
    pub controller: Spawned,
    /// Its Discovery address (kept across restarts).
    pub discovery: SocketAddr,
    controller_args: Vec<String>,
    /// The controller's Identity (CA) address, when the mesh runs with mTLS.
    pub identity: Option<SocketAddr>,
}

/// What a test proxy fronts and offers.
#[derive(Debug, Clone, Default)]
pub struct ProxySpec {
    /// Instance name.
    pub name: String,
    /// Service (default: the name).
    pub service: Option<String>,
    /// The app behind it; none for a client-only proxy.
    pub app: Option<SocketAddr>,
    /// App readiness path polled by the proxy.
    pub readiness_path: Option<String>,
    /// `Opaque` to skip protocol detection inbound.
    pub inbound_protocol: Option<String>,
    /// Fixed-target listeners: targets like `echo.shop:80`.
    pub fixed: Vec<String>,
    /// `Passthrough` (default) or `Reject`.
    pub unknown_hosts: Option<String>,
    /// Drain timeout, e.g. `2s`.
    pub drain_timeout: Option<String>,
    /// `FERRYMESH_LOG` (default: info, debug for the proxy's own modules).
    pub log: Option<String>,
    /// Workload labels.
    pub labels: Vec<(String, String)>,
    /// mTLS identity: `None` follows the mesh (on in a [`Mesh::start_secure`] mesh).
    pub identity: Option<bool>,
    /// The access log's sample (0..=1); `None`: off.
    pub access_log: Option<f64>,
    /// The workload's zone.
    pub zone: Option<String>,
}

impl ProxySpec {
    /// A proxy named `name` in front of `app`.
    pub fn app(name: &str, service: &str, app: SocketAddr) -> Self {
        Self {
            name: name.into(),
            service: Some(service.into()),
            app: Some(app),
            ..Self::default()
        }
    }

    /// A client-only proxy (outbound listener, no app).
    pub fn client(name: &str) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    fn yaml(&self, discovery: SocketAddr, identity: Option<(&Path, SocketAddr)>) -> String {
        let service = self.service.clone().unwrap_or_else(|| self.name.clone());
        let n = &self.name;
        let mut s = format!(
            "apiVersion: config.ferrymesh.io/v1alpha1\nkind: ProxyConfig\nmetadata: {{name: {n}}}\nspec:\n  \
             workload: {{name: {n}, namespace: shop, service: {service}, zone: \"{zone}\", labels: {{{labels}}}}}\n",
            zone = self.zone.as_deref().unwrap_or_default(),
            labels = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(app) = self.app {
            let _ = writeln!(
                s,
                "  inbound:\n    listen: \"127.0.0.1:0\"\n    app: \"{app}\""
            );
            if let Some(p) = &self.readiness_path {
                let _ = writeln!(s, "    readinessPath: {p}");
            }
            if let Some(p) = &self.inbound_protocol {
                let _ = writeln!(s, "    protocol: {p}");
            }
        }
        let unknown = self.unknown_hosts.as_deref().unwrap_or("Passthrough");
        let _ = writeln!(
            s,
            "  outbound:\n    mode: HttpProxy\n    listen: \"127.0.0.1:0\"\n    unknownHosts: {unknown}"
        );
        if !self.fixed.is_empty() {
            s.push_str("    listeners:\n");
            for t in &self.fixed {
                let _ = writeln!(s, "    - {{listen: \"127.0.0.1:0\", service: \"{t}\"}}");
            }
        }
        let _ = writeln!(
            s,
            "  admin: {{listen: \"127.0.0.1:0\", healthListen: \"127.0.0.1:0\"}}"
        );
        match identity {
            Some((dir, address)) => {
                let service = self.service.clone().unwrap_or_else(|| self.name.clone());
                let _ = writeln!(
                    s,
                    "  identity: {{mode: ControlPlane, tokenFile: \"{}\", trustAnchors: \"{}\"}}",
                    dir.join("tokens/shop").join(&service).display(),
                    dir.join("ca/ca.pem").display()
                );
                let _ = writeln!(
                    s,
                    "  controlPlane: {{discovery: \"{discovery}\", identity: \"{address}\"}}"
                );
            }
            None => {
                let _ = writeln!(s, "  controlPlane: {{discovery: \"{discovery}\"}}");
            }
        }
        if let Some(sample) = self.access_log {
            let _ = writeln!(s, "  accessLog: {{sample: {sample}}}");
        }
        if let Some(d) = &self.drain_timeout {
            let _ = writeln!(s, "  drainTimeout: {d}");
        }
        s
    }
}

impl Mesh {
    /// Writes `files` (name, YAML) into a new config folder and starts the controller on it.
    ///
    /// # Panics
    /// When the controller does not start.
    pub fn start(files: &[(&str, &str)]) -> Mesh {
        Self::start_with(files, &[])
    }

    /// As [`Mesh::start`], with extra controller arguments (e.g. `--fault-ttl 1s`).
    ///
    /// # Panics
    /// When the controller does not start.
    pub fn start_with(files: &[(&str, &str)], controller_args: &[&str]) -> Mesh {
        Self::start_in(files, controller_args, false, [127, 0, 0, 1].into())
    }

    /// As [`Mesh::start`], with the controller as the mesh's CA and every proxy on mTLS (its
    /// own bootstrap token per service account; `extra` controller arguments, e.g. a
    /// certificate lifetime).
    ///
    /// # Panics
    /// When the controller does not start.
    pub fn start_secure(files: &[(&str, &str)], extra: &[&str]) -> Mesh {
        Self::start_in(files, extra, true, [127, 0, 0, 1].into())
    }

    /// As [`Mesh::start_secure`], with Discovery and Identity on `host` (the gateway of a
    /// [`crate::netns::Network`], so pods reach them), and every folder readable by the
    /// proxy's UID.
    ///
    /// # Panics
    /// When the controller does not start.
    pub fn start_secure_at(host: std::net::IpAddr, files: &[(&str, &str)], extra: &[&str]) -> Mesh {
        Self::start_in(files, extra, true, host)
    }

    /// A controller on the Kubernetes source, reading the API server `kubeconfig` names (a
    /// [`crate::kube_api::FakeApi`]); `extra` controller arguments.
    ///
    /// # Panics
    /// When the controller does not start.
    pub fn start_kubernetes(kubeconfig: &Path, extra: &[&str]) -> Mesh {
        Self::kubernetes(kubeconfig, extra, false)
    }

    /// [`Mesh::start_kubernetes`] with the CA kept in the Secret `ferrymesh-system/ferrymesh-ca`
    /// and workloads proving their service account with a TokenReview: proxies get the token
    /// of [`Mesh::token`], which the test registers with the fake API server.
    ///
    /// # Panics
    /// When the controller does not start.
    pub fn start_kubernetes_secure(kubeconfig: &Path, extra: &[&str]) -> Mesh {
        Self::kubernetes(kubeconfig, extra, true)
    }

    fn kubernetes(kubeconfig: &Path, extra: &[&str], secure: bool) -> Mesh {
        let mut args: Vec<String> = vec![
            "--source".into(),
            "kubernetes".into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let dir = tempfile::tempdir().expect("a temporary folder");
        if secure {
            let identity = dir.path().join("identity");
            std::fs::create_dir_all(identity.join("tokens/shop"))
                .expect("creating the token folder");
            args.extend([
                "--ca-dir".to_owned(),
                identity.join("ca").display().to_string(),
                "--ca-secret".to_owned(),
                "ferrymesh-system/ferrymesh-ca".to_owned(),
                "--identity-listen".to_owned(),
                "127.0.0.1:0".to_owned(),
            ]);
        }
        let controller = start_controller(dir.path(), "127.0.0.1:0".parse().expect("valid"), &args);
        let discovery = controller.addr("discovery");
        let identity = secure.then(|| controller.addr("identity"));
        if let Some(addr) = identity
            && let Some(i) = args.iter().position(|a| a == "--identity-listen")
        {
            args[i + 1] = addr.to_string();
        }
        Mesh {
            dir,
            controller,
            discovery,
            controller_args: args,
            identity,
        }
    }

    fn start_in(
        files: &[(&str, &str)],
        controller_args: &[&str],
        secure: bool,
        host: std::net::IpAddr,
    ) -> Mesh {
        let dir = tempfile::tempdir().expect("a temporary folder");
        crate::netns::open_up(dir.path());
        std::fs::create_dir_all(dir.path().join("mesh")).expect("creating the config folder");
        for (name, text) in files {
            std::fs::write(dir.path().join("mesh").join(name), text)
                .expect("writing a config file");
        }
        let mut args: Vec<String> = controller_args.iter().map(|a| (*a).to_owned()).collect();
        if secure {
            let identity = dir.path().join("identity");
            std::fs::create_dir_all(identity.join("tokens/shop"))
                .expect("creating the token folder");
            args.extend([
                "--ca-dir".to_owned(),
                identity.join("ca").display().to_string(),
                "--token-dir".to_owned(),
                identity.join("tokens").display().to_string(),
                "--identity-listen".to_owned(),
                SocketAddr::new(host, 0).to_string(),
            ]);
        }
        let controller = start_controller(dir.path(), SocketAddr::new(host, 0), &args);
        let discovery = controller.addr("discovery");
        let identity = secure.then(|| controller.addr("identity"));
        // A restarted controller keeps the Identity address the proxies were given.
        if let Some(addr) = identity
            && let Some(i) = args.iter().position(|a| a == "--identity-listen")
        {
            args[i + 1] = addr.to_string();
        }
        Mesh {
            dir,
            controller,
            discovery,
            controller_args: args,
            identity,
        }
    }

    /// Writes what `ferryctl up` would record for this mesh into `state_dir/state.json`, so
    /// ferryctl commands can be pointed at it (`--state-dir`).
    ///
    /// # Panics
    /// When it cannot be written.
    pub fn write_ferryctl_state(&self, state_dir: &Path) {
        let record = serde_json::json!({
            "controllerAdmin": self.controller.addr("admin").to_string(),
            "controllerDiscovery": self.discovery.to_string(),
            "entry": "127.0.0.1:1",
            "pid": std::process::id(),
        });
        std::fs::write(state_dir.join("state.json"), record.to_string())
            .expect("writing state.json");
    }

    /// The identity folder of a secure mesh (`ca/ca.pem`, `tokens/<ns>/<sa>`).
    pub fn identity_dir(&self) -> PathBuf {
        self.dir.path().join("identity")
    }

    /// Writes (once) the bootstrap token of service account `shop/<sa>`.
    ///
    /// # Panics
    /// When it cannot be written.
    pub fn token(&self, sa: &str) -> PathBuf {
        let path = self.identity_dir().join("tokens/shop").join(sa);
        if !path.exists() {
            // Distinct per service account (a TokenReview tells accounts apart by token).
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            let token: String = (0..32)
                .map(|i| {
                    for b in sa.bytes().chain([i]) {
                        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
                    }
                    char::from(b'a' + u8::try_from(h % 26).expect("small"))
                })
                .collect();
            std::fs::write(&path, token).expect("writing a token");
        }
        path
    }

    /// The config folder.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("mesh")
    }

    /// Replaces a config file atomically (write, then rename), as editors do.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("writing a config file");
        std::fs::rename(&tmp, self.config_dir().join(name)).expect("moving a config file in place");
    }

    /// Starts a proxy.
    ///
    /// # Panics
    /// When it does not start.
    pub fn proxy(&self, spec: &ProxySpec) -> Spawned {
        let config = self.dir.path().join(format!("{}.proxy.yaml", spec.name));
        let identity = match (spec.identity, self.identity) {
            (Some(false), _) | (None | Some(true), None) => None,
            (None | Some(true), Some(addr)) => {
                self.token(spec.service.as_deref().unwrap_or(&spec.name));
                Some((self.identity_dir(), addr))
            }
        };
        let identity_ref = identity.as_ref().map(|(d, a)| (d.as_path(), *a));
        std::fs::write(&config, spec.yaml(self.discovery, identity_ref))
            .expect("writing a proxy config");
        let mut cmd = Command::new(bin("ferrymesh-proxy"));
        cmd.arg("run").arg("--config").arg(&config).env(
            "FERRYMESH_LOG",
            spec.log.as_deref().unwrap_or("info,ferrymesh_proxy=debug"),
        );
        Spawned::start(
            &format!("proxy {}", spec.name),
            cmd,
            &self.dir.path().join(format!("{}.proxy.log", spec.name)),
        )
        .expect("starting a proxy")
    }

    /// Starts a demo-shop instance (`ferry-shop SERVICE`) on a free port, with chaos `env`
    /// (e.g. `CHAOS_ERROR_RATE`), and no `HTTP_PROXY`.
    ///
    /// # Panics
    /// When it does not start.
    pub fn shop(&self, service: &str, instance: &str, env: &[(&str, &str)]) -> Spawned {
        let mut cmd = Command::new(bin("ferry-shop"));
        cmd.args([service, "--listen", "127.0.0.1:0", "--instance", instance])
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Spawned::start(
            instance,
            cmd,
            &self.dir.path().join(format!("{instance}.log")),
        )
        .expect("starting a shop instance")
    }

    /// Stops the controller (SIGKILL) and starts a new one on the same Discovery address.
    ///
    /// # Panics
    /// When it does not come back.
    pub fn restart_controller(&mut self) {
        self.controller.kill();
        self.controller = start_controller(self.dir.path(), self.discovery, &self.controller_args);
    }

    /// The controller's `/status`.
    ///
    /// # Panics
    /// When it does not answer.
    pub async fn status(&self) -> serde_json::Value {
        let (status, body) = get(self.controller.addr("admin"), "/status")
            .await
            .expect("controller /status");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("status is JSON")
    }
}

fn start_controller(dir: &Path, discovery: SocketAddr, extra: &[String]) -> Spawned {
    let mut cmd = Command::new(bin("ferrymesh-controller"));
    cmd.args(extra);
    if !extra.iter().any(|a| a == "--source") {
        cmd.args(["--source", "files", "--config-dir"])
            .arg(dir.join("mesh"));
    }
    cmd.args(["--admin-listen", "127.0.0.1:0", "--discovery-listen"])
        .arg(discovery.to_string())
        .env("FERRYMESH_LOG", "info,ferrymesh_controller=debug");
    // NOTE: a restarted controller binds the port its predecessor held; retry briefly.
    let mut last = None;
    for attempt in 0..20 {
        let log = dir.join(format!("controller-{attempt}.log"));
        match Spawned::start("controller", cmd_clone(&cmd), &log) {
            Ok(s) => return s,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the controller did not start: {last:?}");
}

fn cmd_clone(cmd: &Command) -> Command {
    let mut c = Command::new(cmd.get_program());
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    c
}

/// A plain HTTP/1.1 GET to `addr` (no proxy), returning status and body.
///
/// # Errors
/// Connecting or the exchange fails.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let rsp = sender.send_request(req).await?;
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// GETs JSON from an admin address.
///
/// # Panics
/// When it does not answer 200 with JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"));
    assert_eq!(status, 200, "GET {addr}{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {addr}{path}: {e}: {body}"))
}

/// Polls `check` every 20ms until it returns true or `timeout` passes; returns how long it took.
///
/// # Errors
/// The timeout passed.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if check().await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            anyhow::bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of a counter over every series whose labels contain `matching` (e.g.
/// `direction="inbound"`), read from a proxy's `/metrics`.
///
/// # Panics
/// When `/metrics` does not answer.
pub async fn counter(health: SocketAddr, name: &str, matching: &str) -> u64 {
    let (_, text) = get(health, "/metrics").await.expect("/metrics answers");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(matching))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Opens a CONNECT tunnel to `authority` through the explicit proxy at `outbound`.
///
/// # Panics
/// When the proxy does not answer 200.
pub async fn tunnel(outbound: SocketAddr, authority: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(outbound)
        .await
        .expect("connecting to the proxy");
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .expect("writing CONNECT");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.expect("reading the CONNECT answer"));
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// An HTTP client that sends everything through a proxy's `outbound` listener.
///
/// # Panics
/// Never in practice (a fixed, valid configuration).
pub fn proxied(outbound: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{outbound}")).expect("a valid proxy URL"))
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(64)
        .build()
        .expect("a valid client")
}

/// A client proxy that holds `count` ready endpoints of `host` (`name.namespace`, port 80) and
/// a client policy, subscribing it first.
///
/// # Panics
/// When that does not happen within 10 s.
pub async fn client_proxy(mesh: &Mesh, host: &str, count: usize) -> Spawned {
    client_proxy_with(mesh, ProxySpec::client("client"), host, count).await
}

/// [`client_proxy`] from `spec`.
///
/// # Panics
/// When that does not happen within 10 s.
pub async fn client_proxy_with(mesh: &Mesh, spec: ProxySpec, host: &str, count: usize) -> Spawned {
    let proxy = mesh.proxy(&ProxySpec {
        log: Some("warn".into()),
        ..spec
    });
    let http = proxied(proxy.addr("outbound"));
    let _ = http.get(format!("http://{host}/healthz")).send().await;
    let admin = proxy.addr("admin");
    let health = proxy.addr("health");
    let name = format!("{host}.svc.cluster.local:80");
    eventually(Duration::from_secs(10), || {
        let name = name.clone();
        async move {
            let dump = get_json(admin, "/config_dump").await;
            let resources = dump["resources"].as_array().cloned().unwrap_or_default();
            resources.iter().any(|r| {
                r["type"] == "ENDPOINTS"
                    && r["name"] == name.as_str()
                    && r["value"]["endpoints"]
                        .as_array()
                        .is_some_and(|e| e.len() == count)
            }) && resources
                .iter()
                .any(|r| r["type"] == "CLIENT_POLICY" && r["state"] == "found")
                && get(health, "/ready").await.is_ok_and(|(s, _)| s == 200)
        }
    })
    .await
    .expect("the client proxy holds the endpoints and policy");
    proxy
}

/// YAML for the file source.
pub mod yaml {
    use std::net::SocketAddr;

    /// A Service `name` in `shop` with one port, `http` 80, and the document separator.
    pub fn service(name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n"
        )
    }

    /// A ResiliencePolicy for Service `service` in `shop`; `spec` is indented by two spaces.
    pub fn policy(service: &str, spec: &str) -> String {
        format!(
            "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: {service}, namespace: shop}}\n\
             spec:\n  targetRefs: [{{group: \"\", kind: Service, name: {service}}}]\n{spec}"
        )
    }

    /// A static EndpointSlice for Service `service` (port `http`): an unmeshed backend at `addr`.
    pub fn unmeshed(service: &str, addr: SocketAddr) -> String {
        unmeshed_in_zone(service, addr, "")
    }

    /// [`unmeshed`] with the endpoint in `zone`.
    pub fn unmeshed_in_zone(service: &str, addr: SocketAddr, zone: &str) -> String {
        let (port, ip) = (addr.port(), addr.ip());
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-{port}, namespace: shop, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints: [{{addresses: [\"{ip}\"], zone: \"{zone}\"}}]\n---\n"
        )
    }
}
