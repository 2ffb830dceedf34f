//! `ferryctl up`: the local mesh. Starts the controller on the config folder, then every replica
//! of every Deployment found there as a `ferry-shop` process with its own sidecar proxy (ports
//! allocated, ProxyConfigs written to the state folder), then an entry proxy that serves the
//! storefront. Stops everything on Ctrl-C or SIGTERM, leaving no process behind.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::state::{self, State};

/// The line every Ferrymesh binary prints once its ports are bound.
pub const LISTENING_PREFIX: &str = "FERRYMESH_LISTENING ";

/// `ferryctl up` options.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// The folder of YAML served by the controller (Services, policies, Deployments to start).
    #[arg(long, default_value = "demo-apps/mesh")]
    pub config_dir: PathBuf,
    /// Where the storefront is served.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub entry: SocketAddr,
    /// Where the ferrymesh-controller, ferrymesh-proxy and ferry-shop binaries are (default:
    /// beside ferryctl).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// No identities and no mTLS between sidecars (plaintext, as before the zero-trust lab).
    #[arg(long)]
    pub plaintext: bool,
}

/// How proxies reach the controller, and their identity setup (none: plaintext).
#[derive(Debug, Clone)]
pub struct Control {
    /// Discovery address.
    pub discovery: String,
    /// The identity folder (`ca/`, `tokens/<ns>/<sa>`) and the Identity address.
    pub identity: Option<(PathBuf, String)>,
}

impl Control {
    /// The bootstrap token file of `namespace/sa`, created with a random token when missing.
    ///
    /// # Errors
    /// It cannot be written.
    pub fn token(&self, namespace: &str, sa: &str) -> anyhow::Result<Option<PathBuf>> {
        let Some((dir, _)) = &self.identity else {
            return Ok(None);
        };
        let path = dir.join("tokens").join(namespace).join(sa);
        if !path.exists() {
            std::fs::create_dir_all(path.parent().context("a token has a folder")?)?;
            let mut bytes = [0u8; 24];
            std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
            let token = bytes.iter().fold(String::new(), |mut t, b| {
                let _ = write!(t, "{b:02x}");
                t
            });
            std::fs::write(&path, token)?;
        }
        Ok(Some(path))
    }
}

/// A Deployment, as far as local mode reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// `metadata.name`; instances are `<name>-<n>`.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// The service the instances serve (`app` label, else the name).
    pub service: String,
    /// Replicas.
    pub replicas: u32,
    /// Arguments of the first container (`ferry-shop <args>`).
    pub args: Vec<String>,
    /// Env of the first container.
    pub env: Vec<(String, String)>,
}

#[derive(Deserialize)]
struct RawDeployment {
    metadata: RawMeta,
    spec: RawDeploymentSpec,
}

#[derive(Deserialize)]
struct RawMeta {
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawDeploymentSpec {
    replicas: Option<u32>,
    template: RawTemplate,
}

#[derive(Deserialize)]
struct RawTemplate {
    spec: RawPodSpec,
}

#[derive(Deserialize)]
struct RawPodSpec {
    containers: Vec<RawContainer>,
}

#[derive(Deserialize)]
struct RawContainer {
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<RawEnv>,
}

#[derive(Deserialize)]
struct RawEnv {
    name: String,
    #[serde(default)]
    value: String,
}

/// Every Deployment in the YAML files of `dir` (not recursive), in file order.
///
/// # Errors
/// A file cannot be read, or a Deployment is malformed.
pub fn read_workloads(dir: &Path) -> anyhow::Result<Vec<Workload>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_yaml_ng::Value::deserialize(doc)
                .with_context(|| format!("{}: bad YAML", file.display()))?;
            if value.get("kind").and_then(|k| k.as_str()) != Some("Deployment") {
                continue;
            }
            let d: RawDeployment = serde_yaml_ng::from_value(value)
                .with_context(|| format!("{}: bad Deployment", file.display()))?;
            let container = d
                .spec
                .template
                .spec
                .containers
                .into_iter()
                .next()
                .with_context(|| {
                    format!("{}: {} has no container", file.display(), d.metadata.name)
                })?;
            out.push(Workload {
                service: d
                    .metadata
                    .labels
                    .get("app")
                    .cloned()
                    .unwrap_or_else(|| d.metadata.name.clone()),
                namespace: d.metadata.namespace.unwrap_or_else(|| "default".into()),
                replicas: d.spec.replicas.unwrap_or(1),
                args: container.args,
                env: container
                    .env
                    .into_iter()
                    .map(|e| (e.name, e.value))
                    .collect(),
                name: d.metadata.name,
            });
        }
    }
    Ok(out)
}

/// A started process.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
}

fn free_port() -> anyhow::Result<u16> {
    // NOTE: the port is free now and handed to a child a moment later; the window is tiny, and
    // the child fails loudly if it lost the race.
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn bin(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found (build the workspace first: cargo build --release)",
            path.display()
        );
    }
    Ok(path)
}

/// Starts `cmd`, sends its stderr to `log`, and waits for its `FERRYMESH_LISTENING` line.
async fn start(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<(Proc, Value)> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdout(Stdio::piped())
        .stderr(log_file)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let listening = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(json) = line.strip_prefix(LISTENING_PREFIX) {
                return Ok::<_, anyhow::Error>(serde_json::from_str::<Value>(json)?);
            }
        }
        bail!("{name} exited before listening; see {}", log.display())
    })
    .await
    .with_context(|| format!("{name} did not start within 30s; see {}", log.display()))??;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((
        Proc {
            name: name.to_owned(),
            child,
        },
        listening,
    ))
}

fn proxy_config(
    name: &str,
    namespace: &str,
    service: &str,
    control: &Control,
    app_port: Option<u16>,
    fixed: Option<(SocketAddr, &str)>,
) -> anyhow::Result<String> {
    let inbound = app_port.map_or(String::new(), |p| {
        format!("  inbound: {{listen: \"127.0.0.1:0\", app: \"127.0.0.1:{p}\", readinessPath: /readyz}}\n")
    });
    let outbound = match fixed {
        Some((listen, target)) => format!(
            "  outbound: {{listeners: [{{listen: \"{listen}\", service: \"{target}\"}}]}}\n"
        ),
        None => {
            "  outbound: {mode: HttpProxy, listen: \"127.0.0.1:0\", unknownHosts: Passthrough}\n"
                .to_owned()
        }
    };
    let discovery = &control.discovery;
    let identity = match (&control.identity, control.token(namespace, service)?) {
        (Some((dir, address)), Some(token)) => format!(
            "  identity: {{mode: ControlPlane, tokenFile: \"{}\", trustAnchors: \"{}\"}}\n  \
             controlPlane: {{discovery: \"{discovery}\", identity: \"{address}\"}}\n",
            token.display(),
            dir.join("ca/ca.pem").display()
        ),
        _ => format!(
            "  identity: {{mode: Disabled}}\n  controlPlane: {{discovery: \"{discovery}\"}}\n"
        ),
    };
    Ok(format!(
        "apiVersion: config.ferrymesh.io/v1alpha1\nkind: ProxyConfig\nmetadata: {{name: {name}}}\nspec:\n  \
         workload: {{name: {name}, namespace: {namespace}, service: {service}}}\n{inbound}{outbound}  \
         admin: {{listen: \"127.0.0.1:0\", healthListen: \"127.0.0.1:0\"}}\n{identity}  drainTimeout: 5s\n"
    ))
}

/// Runs the local mesh until Ctrl-C or SIGTERM.
///
/// # Errors
/// A binary is missing or a process fails to start (everything started is stopped).
pub async fn run(state_dir: &Path, args: &UpArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut procs = Vec::new();
    let result = tokio::select! {
        r = start_all(state_dir, args, &mut procs) => r,
        _ = term.recv() => Err(anyhow::anyhow!("stopped while starting")),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("stopped while starting")),
    };
    if let Err(e) = result {
        stop_all(procs).await;
        let _ = std::fs::remove_file(state::file(state_dir));
        return Err(e);
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                for p in &mut procs {
                    if let Ok(Some(status)) = p.child.try_wait() {
                        eprintln!("ferryctl: {} exited ({status})", p.name);
                    }
                }
                procs.retain_mut(|p| !matches!(p.child.try_wait(), Ok(Some(_))));
            }
        }
    }
    eprintln!("ferryctl: stopping");
    stop_all(procs).await;
    let _ = std::fs::remove_file(state::file(state_dir));
    eprintln!("ferryctl: stopped");
    Ok(())
}

/// Paths every start needs.
struct Layout {
    proxy_bin: PathBuf,
    shop_bin: PathBuf,
    logs: PathBuf,
    configs: PathBuf,
    control: Control,
}

async fn start_all(state_dir: &Path, args: &UpArgs, procs: &mut Vec<Proc>) -> anyhow::Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("ferryctl has no folder")?
            .to_owned(),
    };
    let controller_bin = bin(&bin_dir, "ferrymesh-controller")?;
    let workloads = read_workloads(&args.config_dir)?;
    let logs = state_dir.join("logs");
    let configs = state_dir.join("proxies");
    std::fs::create_dir_all(&logs)?;
    std::fs::create_dir_all(&configs)?;

    let mut cmd = Command::new(&controller_bin);
    cmd.args([
        "--source",
        "files",
        "--discovery-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--config-dir",
    ])
    .arg(&args.config_dir);
    // The CA lives in the state folder, so identities survive a restart of the mesh.
    let identity_dir = state_dir.join("identity");
    if !args.plaintext {
        cmd.arg("--ca-dir")
            .arg(identity_dir.join("ca"))
            .arg("--token-dir")
            .arg(identity_dir.join("tokens"))
            .args(["--identity-listen", "127.0.0.1:0"]);
    }
    let (proc, listening) = start("controller", cmd, &logs.join("controller.log")).await?;
    procs.push(proc);
    let discovery = listening["discovery"]
        .as_str()
        .context("controller did not report its discovery address")?
        .to_owned();
    let admin = listening["admin"]
        .as_str()
        .context("controller did not report its admin address")?
        .to_owned();
    let identity = match listening["identity"].as_str() {
        Some(address) if !args.plaintext => Some((identity_dir, address.to_owned())),
        _ => None,
    };
    let layout = Layout {
        proxy_bin: bin(&bin_dir, "ferrymesh-proxy")?,
        shop_bin: bin(&bin_dir, "ferry-shop")?,
        logs,
        configs,
        control: Control {
            discovery,
            identity,
        },
    };

    println!(
        "{:<14} {:<14} {:<22} {:<22} {:<22}",
        "SERVICE", "INSTANCE", "APP", "PROXY OUTBOUND", "PROXY INBOUND"
    );
    for w in &workloads {
        for i in 1..=w.replicas {
            let name = if w.replicas == 1 {
                w.name.clone()
            } else {
                format!("{}-{i}", w.name)
            };
            start_instance(&layout, w, &name, procs).await?;
        }
    }
    let entry = start_entry(&layout, args.entry, procs).await?;
    let discovery = layout.control.discovery.clone();
    let mtls = if layout.control.identity.is_some() {
        "mTLS between every sidecar (the controller is the CA)"
    } else {
        "plaintext (--plaintext)"
    };
    state::save(
        state_dir,
        &State {
            controller_admin: admin.clone(),
            controller_discovery: discovery.clone(),
            entry: entry.clone(),
            pid: std::process::id(),
        },
    )?;
    println!("\ncontroller: discovery {discovery}, status http://{admin}/status");
    println!("identity:   {mtls}");
    println!("storefront: http://{entry}/   product page: http://{entry}/api/product-page?id=1");
    println!("logs and proxy configs: {}", state_dir.display());
    println!("try: ferryctl status | ferryctl chaos pricing --error-rate 1 | Ctrl-C to stop");
    println!(
        "{LISTENING_PREFIX}{}",
        serde_json::json!({ "entry": entry, "controllerAdmin": admin, "controllerDiscovery": discovery })
    );
    Ok(())
}

/// One replica: its sidecar first (so the app's `HTTP_PROXY` is known), then the app.
async fn start_instance(
    layout: &Layout,
    w: &Workload,
    name: &str,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<()> {
    let app_port = free_port()?;
    let config = layout.configs.join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        proxy_config(
            name,
            &w.namespace,
            &w.service,
            &layout.control,
            Some(app_port),
            None,
        )?,
    )?;
    let mut cmd = Command::new(&layout.proxy_bin);
    cmd.arg("run").arg("--config").arg(&config);
    let (proc, proxy) = start(
        &format!("{name}-proxy"),
        cmd,
        &layout.logs.join(format!("{name}-proxy.log")),
    )
    .await?;
    procs.push(proc);
    let outbound = proxy["outbound"]
        .as_str()
        .context("proxy did not report its outbound address")?
        .to_owned();
    let mut cmd = Command::new(&layout.shop_bin);
    cmd.args(&w.args)
        .env("FERRY_LISTEN", format!("127.0.0.1:{app_port}"))
        .env("FERRY_INSTANCE", name)
        .env("FERRY_NAMESPACE", &w.namespace)
        .env("HTTP_PROXY", format!("http://{outbound}"))
        .env("http_proxy", format!("http://{outbound}"))
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    for (k, v) in &w.env {
        cmd.env(k, v);
    }
    let (proc, _) = start(name, cmd, &layout.logs.join(format!("{name}.log"))).await?;
    procs.push(proc);
    println!(
        "{:<14} {:<14} {:<22} {:<22} {:<22}",
        w.service,
        name,
        format!("127.0.0.1:{app_port}"),
        outbound,
        proxy["inbound"].as_str().unwrap_or("-")
    );
    Ok(())
}

/// The entry: a proxy with one fixed-target listener on the storefront.
async fn start_entry(
    layout: &Layout,
    listen: SocketAddr,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<String> {
    let config = layout.configs.join("entry.yaml");
    std::fs::write(
        &config,
        proxy_config(
            "entry",
            "shop",
            "entry",
            &layout.control,
            None,
            Some((listen, "storefront.shop:80")),
        )?,
    )?;
    let mut cmd = Command::new(&layout.proxy_bin);
    cmd.arg("run").arg("--config").arg(&config);
    let (proc, entry) = start("entry-proxy", cmd, &layout.logs.join("entry-proxy.log")).await?;
    procs.push(proc);
    Ok(entry["fixed"][0][0]
        .as_str()
        .context("entry proxy did not report its listener")?
        .to_owned())
}

/// SIGTERM to every process (workloads and proxies first, the controller last), then SIGKILL
/// after 10s to whatever is left.
async fn stop_all(mut procs: Vec<Proc>) {
    let controller = procs
        .iter()
        .position(|p| p.name == "controller")
        .map(|i| procs.remove(i));
    stop(procs).await;
    if let Some(c) = controller {
        stop(vec![c]).await;
    }
}

async fn stop(procs: Vec<Proc>) {
    for p in &procs {
        if let Some(pid) = p.child.id().and_then(|id| i32::try_from(id).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for mut p in procs {
        if tokio::time::timeout(Duration::from_secs(10), p.child.wait())
            .await
            .is_err()
        {
            eprintln!("ferryctl: {} did not stop in 10s; killing it", p.name);
            let _ = p.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_folder_starts_every_shop_service() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo-apps/mesh");
        let workloads = read_workloads(&dir).unwrap();
        let names: Vec<_> = workloads
            .iter()
            .map(|w| (w.service.as_str(), w.replicas))
            .collect();
        for service in [
            "storefront",
            "catalog",
            "pricing",
            "inventory",
            "reviews",
            "orders",
            "payments",
        ] {
            assert!(
                names.iter().any(|(s, _)| *s == service),
                "{service} missing from {names:?}"
            );
        }
        assert!(names.contains(&("catalog", 3)));
    }

    #[test]
    fn proxy_configs_written_for_instances_load() {
        let plain = Control {
            discovery: "127.0.0.1:9091".into(),
            identity: None,
        };
        let text = proxy_config("catalog-2", "shop", "catalog", &plain, Some(8081), None).unwrap();
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(
            value["spec"]["inbound"]["app"].as_str(),
            Some("127.0.0.1:8081")
        );
        assert_eq!(
            value["spec"]["workload"]["service"].as_str(),
            Some("catalog")
        );
        assert_eq!(value["spec"]["identity"]["mode"].as_str(), Some("Disabled"));
        let dir = tempfile::tempdir().unwrap();
        let secure = Control {
            discovery: "127.0.0.1:9091".into(),
            identity: Some((dir.path().to_owned(), "127.0.0.1:9090".into())),
        };
        let entry = proxy_config(
            "entry",
            "shop",
            "entry",
            &secure,
            None,
            Some(("127.0.0.1:8080".parse().unwrap(), "storefront.shop:80")),
        )
        .unwrap();
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&entry).unwrap();
        assert!(value["spec"].get("inbound").is_none());
        assert_eq!(
            value["spec"]["outbound"]["listeners"][0]["service"].as_str(),
            Some("storefront.shop:80")
        );
        assert_eq!(
            value["spec"]["identity"]["mode"].as_str(),
            Some("ControlPlane")
        );
        assert_eq!(
            value["spec"]["controlPlane"]["identity"].as_str(),
            Some("127.0.0.1:9090")
        );
        let token = std::fs::read_to_string(dir.path().join("tokens/shop/entry")).unwrap();
        assert_eq!(token.len(), 48, "a random token, written once");
        proxy_config("entry", "shop", "entry", &secure, None, None).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("tokens/shop/entry")).unwrap(),
            token
        );
    }
}
