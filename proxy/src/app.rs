//! Builds the proxy from its config (binding every listener up front, so ports are known before
//! anything is announced) and runs it until shutdown, then drains: leave the endpoint set,
//! keep serving briefly while peers learn it, stop accepting, let in-flight requests finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ferrymesh_proto::config::v1 as cfg;
use ferrymesh_proto::discovery::v1 as pb;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::config::{Config, Inbound};
use crate::discovery::{Commands, Discovery, client};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::outbound::{Outbound, Target};
use crate::pool::Pool;
use crate::server::{HttpVersion, serve_http};
use crate::trace::Tracing;

/// How long a draining proxy keeps accepting after leaving the endpoint set, so that peers
/// stop picking it before its listeners close.
mod background;
use background::{follow_telemetry, follow_trust_bundle, readiness};

const LEAVE_GRACE: Duration = Duration::from_millis(500);

/// The bound addresses, printed at start and announced to the controller.
#[derive(Debug, Clone, Serialize)]
pub struct Addresses {
    /// Explicit HTTP proxy (and transparent listener).
    pub outbound: Option<SocketAddr>,
    /// The transparent IPv6 listener.
    pub outbound_v6: Option<SocketAddr>,
    /// Inbound.
    pub inbound: Option<SocketAddr>,
    /// Admin.
    pub admin: SocketAddr,
    /// Health.
    pub health: SocketAddr,
    /// Fixed-target listeners: `[address, target]`.
    pub fixed: Vec<(SocketAddr, String)>,
}

/// A built, not yet running, proxy.
#[derive(Debug)]
pub struct App {
    config: Arc<Config>,
    discovery: Discovery,
    identity: Option<Arc<Identity>>,
    sides: Sides,
    commands: Commands,
    outbound: Vec<TcpListener>,
    inbound: Option<(TcpListener, Arc<Inbound>)>,
    fixed: Vec<(TcpListener, Target)>,
    admin: TcpListener,
    health: TcpListener,
    addresses: Addresses,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener on {addr}"))?;
    let local = l.local_addr()?;
    Ok((l, local))
}

fn sock(a: SocketAddr) -> cfg::SocketAddr {
    cfg::SocketAddr {
        ip: a.ip().to_string(),
        port: u32::from(a.port()),
    }
}

impl App {
    /// Binds every listener.
    ///
    /// # Errors
    /// A listener cannot be bound, or a fixed target is not a valid authority.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let config = Arc::new(config);
        let (admin, admin_addr) = bind(config.admin.listen, "admin").await?;
        let (health, health_addr) = bind(config.admin.health_listen, "health").await?;
        let mut outbound = Vec::new();
        let mut outbound_addrs = [None, None];
        for (slot, addr) in [config.outbound.listen, config.outbound.listen_v6]
            .into_iter()
            .enumerate()
        {
            if let Some(addr) = addr {
                let (l, a) = bind(addr, "outbound").await?;
                outbound.push(l);
                outbound_addrs[slot] = Some(a);
            }
        }
        let [outbound_addr, outbound_v6] = outbound_addrs;
        let (inbound, inbound_addr) = match &config.inbound {
            Some(i) => {
                let (l, a) = bind(i.listen, "inbound").await?;
                (Some((l, Arc::new(i.clone()))), Some(a))
            }
            None => (None, None),
        };
        let mut fixed = Vec::new();
        let mut fixed_addrs = Vec::new();
        for f in &config.outbound.listeners {
            let target =
                Target::parse(&f.target, &config.workload.namespace).with_context(|| {
                    format!("fixed listener target {:?} is not host:port", f.target)
                })?;
            let (l, a) = bind(f.listen, "fixed-target").await?;
            fixed.push((l, target));
            fixed_addrs.push((a, f.target.clone()));
        }
        let addresses = Addresses {
            outbound: outbound_addr,
            outbound_v6,
            inbound: inbound_addr,
            admin: admin_addr,
            health: health_addr,
            fixed: fixed_addrs,
        };
        let (discovery, commands) = Discovery::new(config.control_plane.discovery.clone());
        let identity = config
            .identity
            .as_ref()
            .map(|i| crate::identity::Identity::new(&config.workload, i).map(Arc::new))
            .transpose()?;
        let sides = Sides::new(&config, &discovery, identity.as_ref());
        Ok(App {
            config,
            discovery,
            identity,
            sides,
            commands,
            outbound,
            inbound,
            fixed,
            admin,
            health,
            addresses,
        })
    }

    /// The bound addresses.
    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    fn node(&self) -> pb::Node {
        let c = &self.config;
        // An injected sidecar is an endpoint through its Pod's EndpointSlice, not by announcing
        // itself; only a local proxy registers its inbound address.
        let inbound = self.addresses.inbound.filter(|_| !c.sidecar);
        let local_workload = inbound.map(|inbound| {
            let advertised = c
                .inbound
                .as_ref()
                .and_then(|i| i.advertise)
                .unwrap_or_else(|| {
                    if inbound.ip().is_unspecified() {
                        SocketAddr::from(([127, 0, 0, 1], inbound.port()))
                    } else {
                        inbound
                    }
                });
            pb::LocalWorkload {
                service: Some(cfg::ServiceRef {
                    name: c.workload.service.clone(),
                    namespace: c.workload.namespace.clone(),
                }),
                instance: c.workload.name.clone(),
                inbound: Some(sock(advertised)),
                app: c.inbound.as_ref().map(|i| sock(i.app)),
                ready: false,
                listeners: None,
                labels: c.workload.labels.clone(),
                identity: String::new(),
            }
        });
        let listeners = pb::ProxyListeners {
            outbound: self.addresses.outbound.map(sock),
            inbound: self.addresses.inbound.map(sock),
            admin: Some(sock(self.addresses.admin)),
            health: Some(sock(self.addresses.health)),
            fixed: self
                .addresses
                .fixed
                .iter()
                .map(|(a, t)| pb::FixedListener {
                    listen: Some(sock(*a)),
                    target: t.clone(),
                })
                .collect(),
        };
        // A proxy without an app (an edge proxy) still announces its listeners, with no service.
        let mut local_workload = local_workload.unwrap_or_default();
        local_workload.listeners = Some(listeners);
        if let Some(identity) = &self.identity {
            identity.spiffe().clone_into(&mut local_workload.identity);
        }
        if local_workload.instance.is_empty() {
            local_workload.instance.clone_from(&c.workload.name);
        }
        pb::Node {
            workload: format!("{}/{}", c.workload.namespace, c.workload.name),
            namespace: c.workload.namespace.clone(),
            service_account: c.workload.service_account.clone(),
            zone: c.workload.zone.clone(),
            mode: if c.sidecar {
                pb::ProxyMode::Sidecar
            } else {
                pb::ProxyMode::Local
            }
            .into(),
            proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
            features: Vec::new(),
            local_workload: Some(local_workload),
        }
    }

    /// Runs until `shutdown` turns true, then drains.
    ///
    /// # Errors
    /// Never at present; kept for future listeners that can fail at run time.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let node = self.node();
        let App {
            config,
            discovery,
            identity,
            sides:
                Sides {
                    pool,
                    tracing,
                    outbound_side,
                    inbound_side,
                    admin_side,
                },
            commands,
            outbound,
            inbound,
            fixed,
            admin,
            health,
            ..
        } = self;
        let tracker = TaskTracker::new();
        let (drain_tx, drain) = watch::channel(false);
        let (leave_tx, leave) = watch::channel(false);

        let _inbound_policy = discovery.watch(pb::ResourceType::InboundPolicy, "*");
        pool.start_sweeping();
        if let Some(identity) = &identity {
            tokio::spawn(identity.clone().run(shutdown.clone()));
            tokio::spawn(follow_trust_bundle(
                identity.clone(),
                discovery.watch(pb::ResourceType::TrustBundle, "*"),
            ));
        }
        tokio::spawn(follow_telemetry(
            tracing,
            discovery.watch(pb::ResourceType::Telemetry, "*"),
        ));
        let stream = tokio::spawn(client::run(
            discovery.clone(),
            commands,
            node,
            identity.clone(),
            leave,
        ));
        let readiness = tokio::spawn(readiness(
            config.inbound.clone(),
            identity,
            discovery,
            pool.clone(),
            drain.clone(),
        ));

        for (listener, full) in [(admin, true), (health, false)] {
            let (admin, pool) = (admin_side.clone(), pool.clone());
            spawn_accept(&tracker, listener, drain.clone(), move |stream, drain| {
                serve_admin(admin.clone(), pool.clone(), stream, full, drain)
            });
        }
        for listener in outbound {
            let ctx = outbound_side.clone();
            spawn_accept(&tracker, listener, drain.clone(), move |stream, drain| {
                serve_outbound(ctx.clone(), stream, drain)
            });
        }
        for (listener, target) in fixed {
            let ctx = outbound_side.clone();
            spawn_accept(&tracker, listener, drain.clone(), move |stream, drain| {
                crate::outbound::serve_fixed(ctx.clone(), stream, target.clone(), drain)
            });
        }
        if let Some((listener, port)) = inbound {
            accept_inbound(&tracker, listener, port, &config, &inbound_side, &drain);
        }

        let _ = shutdown.wait_for(|s| *s).await;
        tracing::info!("draining: leaving the endpoint set");
        let _ = leave_tx.send(true);
        let _ = stream.await;
        let grace = LEAVE_GRACE.min(config.drain_timeout / 2);
        tokio::time::sleep(grace).await;
        let _ = drain_tx.send(true);
        readiness.abort();
        tracker.close();
        let deadline = config.drain_timeout.saturating_sub(grace);
        if tokio::time::timeout(deadline, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = tracker.len(),
                "drain deadline passed; closing the remaining connections"
            );
        } else {
            tracing::info!("drained");
        }
        Ok(())
    }
}

/// The handles each side of the proxy is given (nothing reaches the whole proxy).
#[derive(Debug)]
struct Sides {
    pool: Arc<Pool>,
    tracing: Arc<Tracing>,
    outbound_side: Arc<Outbound>,
    inbound_side: Arc<crate::inbound::Shared>,
    admin_side: Arc<Admin>,
}

impl Sides {
    fn new(config: &Arc<Config>, discovery: &Discovery, identity: Option<&Arc<Identity>>) -> Self {
        let service_label = format!("{}/{}", config.workload.namespace, config.workload.service);
        let tracing = Arc::new(crate::trace::Tracing::new(
            service_label.clone(),
            vec![
                opentelemetry::KeyValue::new(
                    "k8s.namespace.name",
                    config.workload.namespace.clone(),
                ),
                opentelemetry::KeyValue::new("ferrymesh.workload", config.workload.name.clone()),
                opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ],
            config.trace_sampling,
        ));
        let metrics = Arc::new(Metrics::new());
        discovery.count_updates(metrics.config_updates.clone());
        let pool = Arc::new(Pool::counting(metrics.tls_handshakes.clone()));
        let tap = Arc::new(crate::access_log::Tap::default());
        let identity = identity.cloned();
        let outbound_side = Arc::new(Outbound::new(
            config.clone(),
            discovery.clone(),
            pool.clone(),
            metrics.clone(),
            tracing.clone(),
            tap.clone(),
            identity.clone(),
        ));
        let inbound_side = Arc::new(crate::inbound::Shared {
            config: config.clone(),
            inbound_requests: metrics
                .request_handles(crate::metrics::Direction::inbound, &service_label),
            inbound_policy: discovery.watch(pb::ResourceType::InboundPolicy, "*"),
            identity: identity.clone(),
            service_label: service_label.clone(),
            metrics: metrics.clone(),
            tracing: tracing.clone(),
            tap: tap.clone(),
            pool: pool.clone(),
        });
        let admin_side = Arc::new(Admin {
            config: config.clone(),
            discovery: discovery.clone(),
            metrics,
            identity,
            tracing: tracing.clone(),
            tap,
            outbound: outbound_side.clone(),
            service_label,
        });
        Sides {
            pool,
            tracing,
            outbound_side,
            inbound_side,
            admin_side,
        }
    }
}

/// Accepts inbound connections, each served with its port's settings (a redirected one on the
/// port the peer dialled).
fn accept_inbound(
    tracker: &TaskTracker,
    listener: TcpListener,
    config: Arc<Inbound>,
    proxy: &Arc<Config>,
    shared: &Arc<crate::inbound::Shared>,
    drain: &watch::Receiver<bool>,
) {
    let (opaque_ports, ctx) = (proxy.clone(), shared.clone());
    spawn_accept(tracker, listener, drain.clone(), move |stream, drain| {
        let addr = stream.peer_addr().ok();
        // Redirected by iptables: the app listens on the port the peer dialled.
        let config = match config
            .transparent
            .then(|| crate::transparent::original_destination(&stream))
            .flatten()
        {
            Some(original) => Arc::new(Inbound {
                app: SocketAddr::new(config.app.ip(), original.port()),
                protocol: if opaque_ports.is_opaque(original.port()) {
                    crate::config::InboundProtocol::Opaque
                } else {
                    config.protocol
                },
                ..(*config).clone()
            }),
            None => config.clone(),
        };
        crate::inbound::serve(ctx.clone(), config, stream, drain, addr)
    });
}

/// Serves the admin (`full`) or health listener; the health one also answers the app's
/// rewritten probes.
async fn serve_admin(
    admin: Arc<Admin>,
    pool: Arc<Pool>,
    stream: TcpStream,
    full: bool,
    drain: watch::Receiver<bool>,
) {
    let streams_end = drain.clone();
    serve_http(
        stream,
        HttpVersion::Http1,
        move |req| {
            let (admin, pool) = (admin.clone(), pool.clone());
            let streams_end = streams_end.clone();
            async move {
                let path = req.uri().path();
                if !full && path.starts_with("/app-health/") {
                    let app_ip = admin
                        .config
                        .inbound
                        .as_ref()
                        .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |i| i.app.ip());
                    crate::probes::run(&admin.config.app_probes, path, app_ip, &pool).await
                } else {
                    crate::admin::handle(&admin, &req, full, &streams_end)
                }
            }
        },
        drain,
    )
    .await;
}

/// Serves an outbound connection: one iptables redirected is routed by where the app meant it
/// to go; one made to the listener itself is an explicit-proxy client.
async fn serve_outbound(ctx: Arc<Outbound>, stream: TcpStream, drain: watch::Receiver<bool>) {
    let original = ctx
        .config
        .outbound
        .transparent
        .then(|| crate::transparent::original_destination(&stream))
        .flatten();
    match original {
        Some(addr) => {
            tracing::debug!(original = %addr, "redirected connection");
            let target = Target::parse(&addr.to_string(), &ctx.config.workload.namespace)
                .expect("a socket address is an authority");
            if ctx.config.is_opaque(addr.port()) {
                crate::outbound::serve_opaque(ctx, stream, target).await;
            } else {
                crate::outbound::serve_fixed(ctx, stream, target, drain).await;
            }
        }
        None => crate::outbound::serve_explicit(ctx, stream, drain).await,
    }
}

/// Accepts on `listener` until drain, serving each connection in a tracked task.
fn spawn_accept<F, Fut>(
    tracker: &TaskTracker,
    listener: TcpListener,
    mut drain: watch::Receiver<bool>,
    serve: F,
) where
    F: Fn(TcpStream, watch::Receiver<bool>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let conn_tracker = tracker.clone();
    tracker.spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = async { let _ = drain.wait_for(|d| *d).await; } => return,
            };
            match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    conn_tracker.spawn(serve(stream, drain.clone()));
                }
                Err(e) => {
                    // NOTE: EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
}
