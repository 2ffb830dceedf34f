//! The proxy's bootstrap config: a `ProxyConfig` document (API.md "Local mode"), then
//! `FERRYMESH_PROXY_*` environment overrides, validated as a whole. What the control plane
//! changes at run time is policy, not config.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Every problem found in a config, reported at once.
#[derive(Debug, thiserror::Error)]
#[error("invalid proxy config:\n  - {}", .0.join("\n  - "))]
pub struct InvalidConfig(pub Vec<String>);

/// The proxy's config tree.
#[derive(Debug, Clone)]
pub struct Config {
    /// `metadata.name`.
    pub name: String,
    /// The workload this proxy fronts.
    pub workload: Workload,
    /// Inbound side; `None` for an edge proxy with no app behind it.
    pub inbound: Option<Inbound>,
    /// Outbound side.
    pub outbound: Outbound,
    /// Admin and health listeners.
    pub admin: Admin,
    /// The controller.
    pub control_plane: ControlPlane,
    /// Workload identity and mTLS; `None`: plaintext (`identity.mode: Disabled`).
    pub identity: Option<IdentityConfig>,
    /// The share of requests written to the access log (0..=1); `None`: off.
    pub access_log: Option<f64>,
    /// How long in-flight requests may finish after SIGTERM. Default 10s.
    pub drain_timeout: Duration,
    /// The app's original probes behind `/app-health/...` on the health listener
    /// (`appProbes`, or `FERRYMESH_APP_PROBES` as the injector sets it).
    pub app_probes: probes::Probes,
    /// Runtime worker threads. Default 1: a sidecar shares its pod's CPU, and one thread
    /// avoids cross-thread wake-ups (the cheapest CPU per request); raise it for a gateway.
    pub workers: std::num::NonZeroUsize,
    /// Injected into a Kubernetes pod (`run --mode=sidecar`) rather than started locally: the
    /// controller learns the pod's endpoints from EndpointSlices, not from this proxy.
    pub sidecar: bool,
    /// This workload's share of new traces (`FERRYMESH_TRACE_SAMPLING`, the injector's
    /// `trace-sampling` annotation), over the controller's.
    pub trace_sampling: Option<f64>,
    /// Ports whose connections are never sniffed for HTTP (server-speaks-first protocols),
    /// by original destination port.
    pub opaque_ports: Vec<ferrymesh_proto::ports::Ports>,
}

/// Who this proxy is.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Instance name (unique within the service), e.g. `catalog-2`.
    pub name: String,
    /// Namespace. Default `default`.
    pub namespace: String,
    /// Service account. Default: the service name.
    pub service_account: String,
    /// The service this workload is an endpoint of. Default: `name`.
    pub service: String,
    /// Zone, for zone-aware balancing. Default empty.
    pub zone: String,
    /// Labels, as a pod's (FaultInjection `workloadSelector`). Default none.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Inbound listener settings.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Where peers connect (port 0: any free port).
    pub listen: SocketAddr,
    /// The address announced to the controller. Default: `listen`, with 127.0.0.1 for 0.0.0.0.
    pub advertise: Option<SocketAddr>,
    /// The app on loopback.
    pub app: SocketAddr,
    /// `Http` (detected on the first bytes, opaque otherwise) or `Opaque`.
    pub protocol: InboundProtocol,
    /// An HTTP path on the app polled every second for readiness; unset: ready when listening.
    pub readiness_path: Option<String>,
    /// Connect timeout to the app. Default 100ms.
    pub connect_timeout: Duration,
    /// This workload's default inbound policy, over the cluster's.
    pub default_policy: Option<crate::authz::DefaultInbound>,
    /// Connections redirected here by iptables go to the app on the port they were meant for
    /// (`app`'s IP, the original destination's port); direct ones go to `app`.
    pub transparent: bool,
}

/// How the inbound side treats bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum InboundProtocol {
    /// Detect HTTP/1.1 or HTTP/2; anything else is forwarded as opaque TCP.
    #[serde(rename = "HTTP")]
    Http,
    /// No detection.
    Opaque,
}

/// Outbound side settings.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The explicit HTTP proxy listener (`HTTP_PROXY`), if any. In `Transparent` mode it also
    /// takes the connections iptables redirects, each routed by its original destination.
    pub listen: Option<SocketAddr>,
    /// `Transparent` mode: an IPv6 listener beside `listen` (iptables redirects IPv6
    /// connections to `[::1]`).
    pub listen_v6: Option<SocketAddr>,
    /// Routes redirected connections by their original destination (SO_ORIGINAL_DST).
    pub transparent: bool,
    /// What to do with hosts the controller does not know.
    pub unknown_hosts: UnknownHosts,
    /// Listeners that forward everything to one service (for clients that ignore proxy env).
    pub listeners: Vec<FixedListener>,
    /// Connect timeout to endpoints. Default 1s.
    pub connect_timeout: Duration,
    /// Whole-request timeout when no policy sets one. Default 15s.
    pub default_request_timeout: Duration,
}

/// What the outbound side does with an authority the controller answers `not_found` for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum UnknownHosts {
    /// Resolve it with DNS and forward as it is.
    Passthrough,
    /// Answer 502 with `ferrymesh-error: unknown-host`.
    Reject,
}

/// A listener bound to one target.
#[derive(Debug, Clone)]
pub struct FixedListener {
    /// Where to listen.
    pub listen: SocketAddr,
    /// `name.namespace:port` (or any authority form the outbound side accepts).
    pub target: String,
}

/// Admin listeners.
#[derive(Debug, Clone)]
pub struct Admin {
    /// `/config_dump` and everything below, loopback only. Default 127.0.0.1:4390.
    pub listen: SocketAddr,
    /// `/live`, `/ready`, `/metrics`. Default 127.0.0.1:4391.
    pub health_listen: SocketAddr,
}

/// The controller.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// Discovery gRPC address (`host:port`).
    pub discovery: String,
}

/// `identity.mode: ControlPlane`: the proxy gets its certificate from the controller's CA.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The Identity (Certify) address, `host:port`.
    pub address: String,
    /// The name the controller's TLS certificate is checked against. Default `localhost`.
    pub server_name: String,
    /// The token that proves the workload's service account.
    pub token_file: std::path::PathBuf,
    /// PEM trust anchors: the controller's server certificate and every peer chain end here.
    pub trust_anchors: std::path::PathBuf,
    /// SPIFFE trust domain. Default `cluster.local`.
    pub trust_domain: String,
    /// Certificate lifetime to ask for; the controller may give less. Default: its own.
    pub lifetime: Option<Duration>,
}

pub mod probes;
mod raw;
use raw::{RawDoc, RawIdentity, RawInbound, RawOutbound};

/// Collects problems while converting.
struct Problems(Vec<String>);

impl Problems {
    fn addr(&mut self, field: &str, text: &str) -> SocketAddr {
        text.parse().unwrap_or_else(|_| {
            self.0
                .push(format!("{field}: {text:?} is not an ip:port address"));
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn duration(&mut self, field: &str, text: Option<&str>, default: Duration) -> Duration {
        match text.map(ferrymesh_proto::duration::parse) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.0.push(format!("{field}: {e}"));
                default
            }
        }
    }
}

impl Config {
    /// Loads `file`, applies overrides from `env` (a lookup, so tests need no process env),
    /// and validates.
    ///
    /// # Errors
    /// The file cannot be read, or [`InvalidConfig`] with every problem.
    pub fn load(file: &Path, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
        Ok(Self::parse(&text, env)?)
    }

    /// Parses a ProxyConfig document.
    ///
    /// # Errors
    /// [`InvalidConfig`] with every problem found.
    pub fn parse(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, InvalidConfig> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let raw: RawDoc = serde_path_to_error::deserialize(de)
            .map_err(|e| InvalidConfig(vec![format!("{}: {}", e.path(), e.inner())]))?;
        let mut p = Problems(Vec::new());
        if raw.api_version != "config.ferrymesh.io/v1alpha1" || raw.kind != "ProxyConfig" {
            p.0.push(format!(
                "apiVersion/kind: expected config.ferrymesh.io/v1alpha1 ProxyConfig, got {} {}",
                raw.api_version, raw.kind
            ));
        }
        let s = raw.spec;
        let identity = identity(&mut p, &s.identity, s.control_plane.identity.as_deref());
        let access_log = match env("FERRYMESH_PROXY_ACCESS_LOG_SAMPLE").map(|v| v.parse::<f64>()) {
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => {
                p.0.push("FERRYMESH_PROXY_ACCESS_LOG_SAMPLE: not a number".into());
                None
            }
            None => s.access_log.as_ref().map(|a| a.sample.unwrap_or(1.0)),
        };
        if access_log.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
            p.0.push("accessLog.sample: a share of requests, 0..1".into());
        }
        let service = s
            .workload
            .service
            .clone()
            .unwrap_or_else(|| s.workload.name.clone());
        let workload = Workload {
            namespace: s.workload.namespace.unwrap_or_else(|| "default".into()),
            service_account: s
                .workload
                .service_account
                .unwrap_or_else(|| service.clone()),
            service,
            zone: s.workload.zone.unwrap_or_default(),
            labels: s.workload.labels,
            name: s.workload.name,
        };
        let inbound = s.inbound.map(|i| inbound(&mut p, &i));
        let outbound = outbound(&mut p, s.outbound, &env);
        for (i, l) in outbound.listeners.iter().enumerate() {
            if !l.target.contains(':') {
                p.0.push(format!(
                    "outbound.listeners[{i}].service: {:?}: expected name.namespace:port",
                    l.target
                ));
            }
        }
        let admin = Admin {
            listen: p.addr(
                "admin.listen",
                s.admin.listen.as_deref().unwrap_or("127.0.0.1:4390"),
            ),
            health_listen: p.addr(
                "admin.healthListen",
                s.admin.health_listen.as_deref().unwrap_or("127.0.0.1:4391"),
            ),
        };
        let discovery =
            env("FERRYMESH_PROXY_CONTROL_PLANE_DISCOVERY").unwrap_or(s.control_plane.discovery);
        let drain = env("FERRYMESH_PROXY_DRAIN_TIMEOUT").or(s.drain_timeout);
        let drain_timeout = p.duration("drainTimeout", drain.as_deref(), Duration::from_secs(10));
        let workers = workers(&mut p, s.workers, &env);
        if outbound.listen.is_none() && outbound.listeners.is_empty() && inbound.is_none() {
            p.0.push("spec: the proxy needs at least one of inbound, outbound.listen, outbound.listeners".into());
        }
        let app_probes = app_probes(&mut p, &s.app_probes, &env);
        let trace_sampling = trace_sampling(&mut p, &env);
        let opaque_ports = env("FERRYMESH_OPAQUE_PORTS")
            .or(s.opaque_ports)
            .map(|o| {
                ferrymesh_proto::ports::parse_ports(&o).unwrap_or_else(|e| {
                    p.0.push(format!("opaquePorts: {e}"));
                    Vec::new()
                })
            })
            .unwrap_or_default();
        if !p.0.is_empty() {
            return Err(InvalidConfig(p.0));
        }
        Ok(Config {
            name: raw.metadata.name,
            workload,
            inbound,
            outbound,
            admin,
            control_plane: ControlPlane { discovery },
            identity,
            access_log,
            drain_timeout,
            workers,
            app_probes,
            sidecar: false,
            opaque_ports,
            trace_sampling,
        })
    }
}

impl Config {
    /// Whether connections to `port` skip protocol detection.
    pub fn is_opaque(&self, port: u16) -> bool {
        self.opaque_ports
            .iter()
            .any(|p| (p.0..=p.1).contains(&port))
    }
}

/// Files the injected sidecar finds in its pod (API.md 2.c volumes).
const POD_TOKEN: &str = "/var/run/ferrymesh/tokens/token";
const POD_TRUST: &str = "/var/run/ferrymesh/trust/ca.pem";

impl Config {
    /// The config of a sidecar the injector put into a Kubernetes pod (`run --mode=sidecar`):
    /// everything comes from the environment the injector set (`FERRYMESH_POD_*`, the
    /// controller's addresses, `FERRYMESH_APP_PROBES`, ...) and the pod's volumes; the ports
    /// are API.md's. Dual stack where the kernel has IPv6.
    ///
    /// # Errors
    /// [`InvalidConfig`] naming each missing or bad variable.
    pub fn sidecar(
        env: impl Fn(&str) -> Option<String>,
        ipv6: bool,
    ) -> Result<Config, InvalidConfig> {
        let mut missing = Vec::new();
        let mut need = |k: &str| {
            env(k).unwrap_or_else(|| {
                missing.push(format!(
                    "{k}: required in sidecar mode (set by the injector)"
                ));
                String::new()
            })
        };
        let name = need("FERRYMESH_POD_NAME");
        let namespace = need("FERRYMESH_POD_NAMESPACE");
        let sa = need("FERRYMESH_POD_SERVICE_ACCOUNT");
        let discovery = need("FERRYMESH_DISCOVERY_ADDR");
        let identity = need("FERRYMESH_IDENTITY_ADDR");
        if !missing.is_empty() {
            return Err(InvalidConfig(missing));
        }
        let any = if ipv6 { "[::]" } else { "0.0.0.0" };
        let server_name = identity
            .rsplit_once(':')
            .map_or(identity.as_str(), |(h, _)| h);
        let mut outbound = serde_json::json!({"mode": "Transparent", "listen": "127.0.0.1:4340"});
        if ipv6 {
            outbound["listenV6"] = "[::1]:4340".into();
        }
        let mut inbound = serde_json::json!({
            "listen": format!("{any}:4343"), "app": "127.0.0.1:80", "transparent": true,
        });
        if let Some(p) = env("FERRYMESH_DEFAULT_INBOUND_POLICY") {
            inbound["defaultPolicy"] = p.into();
        }
        let doc = serde_json::json!({
            "apiVersion": "config.ferrymesh.io/v1alpha1",
            "kind": "ProxyConfig",
            "metadata": {"name": name},
            "spec": {
                "workload": {"name": name, "namespace": namespace, "serviceAccount": sa, "service": sa},
                "inbound": inbound,
                "outbound": outbound,
                "admin": {"listen": "127.0.0.1:4390", "healthListen": format!("{any}:4391")},
                "identity": {
                    "mode": "ControlPlane", "tokenFile": POD_TOKEN, "trustAnchors": POD_TRUST,
                    "serverName": server_name,
                },
                "controlPlane": {"discovery": discovery, "identity": identity},
            },
        });
        let mut config = Config::parse(&doc.to_string(), env)?;
        config.sidecar = true;
        Ok(config)
    }
}

/// `FERRYMESH_TRACE_SAMPLING` (the injector's `trace-sampling` annotation).
fn trace_sampling(p: &mut Problems, env: &impl Fn(&str) -> Option<String>) -> Option<f64> {
    env("FERRYMESH_TRACE_SAMPLING").and_then(|v| {
        let r = v.parse::<f64>().ok().filter(|r| (0.0..=1.0).contains(r));
        if r.is_none() {
            p.0.push(format!(
                "FERRYMESH_TRACE_SAMPLING: {v:?} is not a ratio 0..1"
            ));
        }
        r
    })
}

/// `FERRYMESH_PROXY_WORKERS` or `workers`, default 1.
fn workers(
    p: &mut Problems,
    raw: Option<usize>,
    env: &impl Fn(&str) -> Option<String>,
) -> std::num::NonZeroUsize {
    let workers = match env("FERRYMESH_PROXY_WORKERS").map(|w| w.parse::<usize>()) {
        Some(Ok(w)) => Some(w),
        Some(Err(_)) => {
            p.0.push("FERRYMESH_PROXY_WORKERS: not a whole number".into());
            None
        }
        None => raw,
    };
    std::num::NonZeroUsize::new(workers.unwrap_or(1)).unwrap_or_else(|| {
        p.0.push("workers: must be at least 1".into());
        std::num::NonZeroUsize::MIN
    })
}

/// `FERRYMESH_APP_PROBES` (as the injector sets it) or `appProbes`.
fn app_probes(
    p: &mut Problems,
    raw: &serde_json::Value,
    env: &impl Fn(&str) -> Option<String>,
) -> probes::Probes {
    let json = env("FERRYMESH_APP_PROBES").or_else(|| (!raw.is_null()).then(|| raw.to_string()));
    match json.as_deref().map(probes::parse) {
        None => probes::Probes::new(),
        Some(Ok(probes)) => probes,
        Some(Err(e)) => {
            p.0.push(e);
            probes::Probes::new()
        }
    }
}

fn identity(p: &mut Problems, i: &RawIdentity, address: Option<&str>) -> Option<IdentityConfig> {
    match i.mode.as_deref() {
        None | Some("Disabled") => None,
        Some("ControlPlane") => {
            let mut need = |field: &str, v: Option<&str>| {
                v.map_or_else(
                    || {
                        p.0.push(format!("{field}: required with identity.mode ControlPlane"));
                        String::new()
                    },
                    str::to_owned,
                )
            };
            let address = need("controlPlane.identity", address);
            let token_file = need("identity.tokenFile", i.token_file.as_deref());
            let trust_anchors = need("identity.trustAnchors", i.trust_anchors.as_deref());
            let lifetime = i
                .lifetime
                .as_deref()
                .map(|l| p.duration("identity.lifetime", Some(l), Duration::ZERO));
            Some(IdentityConfig {
                address,
                server_name: i.server_name.clone().unwrap_or_else(|| "localhost".into()),
                token_file: token_file.into(),
                trust_anchors: trust_anchors.into(),
                trust_domain: i
                    .trust_domain
                    .clone()
                    .unwrap_or_else(|| "cluster.local".into()),
                lifetime,
            })
        }
        Some(other) => {
            p.0.push(format!("identity.mode: {other:?}: ControlPlane | Disabled"));
            None
        }
    }
}

fn inbound(p: &mut Problems, i: &RawInbound) -> Inbound {
    Inbound {
        listen: p.addr("inbound.listen", &i.listen),
        advertise: i
            .advertise
            .as_deref()
            .map(|a| p.addr("inbound.advertise", a)),
        app: p.addr("inbound.app", &i.app),
        protocol: i.protocol.unwrap_or(InboundProtocol::Http),
        readiness_path: i.readiness_path.clone(),
        connect_timeout: p.duration(
            "inbound.connectTimeout",
            i.connect_timeout.as_deref(),
            Duration::from_millis(100),
        ),
        default_policy: i.default_policy.as_deref().and_then(|d| {
            let parsed = crate::authz::DefaultInbound::from_name(d);
            if parsed.is_none() {
                p.0.push(format!(
                    "inbound.defaultPolicy: {d:?}: all-unauthenticated | all-authenticated | cluster-authenticated | deny"
                ));
            }
            parsed
        }),
        transparent: i.transparent,
    }
}

fn outbound(p: &mut Problems, o: RawOutbound, env: &impl Fn(&str) -> Option<String>) -> Outbound {
    let transparent = match o.mode.as_deref() {
        None | Some("HttpProxy") => false,
        Some("Transparent") => true,
        Some(mode) => {
            p.0.push(format!("outbound.mode: {mode:?}: HttpProxy | Transparent"));
            false
        }
    };
    if o.listen_v6.is_some() && !transparent {
        p.0.push("outbound.listenV6: only with mode Transparent".into());
    }
    let connect_timeout = env("FERRYMESH_PROXY_OUTBOUND_CONNECT_TIMEOUT").or(o.connect_timeout);
    Outbound {
        listen: o.listen.as_deref().map(|a| p.addr("outbound.listen", a)),
        listen_v6: o
            .listen_v6
            .as_deref()
            .map(|a| p.addr("outbound.listenV6", a)),
        transparent,
        unknown_hosts: o.unknown_hosts.unwrap_or(UnknownHosts::Passthrough),
        listeners: o
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| FixedListener {
                listen: p.addr(&format!("outbound.listeners[{i}].listen"), &l.listen),
                target: l.service.clone(),
            })
            .collect(),
        connect_timeout: p.duration(
            "outbound.connectTimeout",
            connect_timeout.as_deref(),
            Duration::from_secs(1),
        ),
        default_request_timeout: p.duration(
            "outbound.requestTimeout",
            o.request_timeout.as_deref(),
            Duration::from_secs(15),
        ),
    }
}

#[cfg(test)]
mod tests;
