//! The Discovery stream task: connects, announces the node (with the local workload), subscribes
//! every cached name (with the versions held, so nothing unchanged is resent), applies responses
//! atomically with ACK/NACK, and reconnects with full-jitter exponential backoff (100ms..10s)
//! while the cache keeps serving the last good values. With an identity the stream is mTLS,
//! on the workload's current certificate (each reconnect takes the newest).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferrymesh_proto::discovery::v1 as pb;
use ferrymesh_proto::google::rpc;
use rand::Rng as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::{Command, Commands, Discovery, Held, Source, State, Value};
use crate::policy::{ClientPolicy, Endpoints, InboundPolicy};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Runs the stream until `shutdown` turns true; then closes it, so the controller drops this
/// workload from its service at once.
pub async fn run(
    discovery: Discovery,
    mut commands: Commands,
    node: pb::Node,
    identity: Option<Arc<crate::identity::Identity>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::default();
    loop {
        let result = tokio::select! {
            r = serve(&discovery, &mut commands, &node, identity.as_deref(), &mut backoff) => r,
            () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                discovery.set_connected(false);
                return;
            }
        };
        discovery.set_connected(false);
        match result {
            Ok(()) => tracing::warn!("discovery stream closed by the controller; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, "discovery stream failed; keeping the last good config");
            }
        }
        let sleep = backoff.next_sleep();
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        }
    }
}

/// Exponential backoff with full jitter: each sleep is anywhere in [0, cap], so proxies do
/// not reconnect in lockstep; the cap doubles from 100ms up to 10s, and resets once a response
/// arrives.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { cap: BACKOFF_MIN }
    }
}

impl Backoff {
    fn next_sleep(&mut self) -> Duration {
        let sleep = rand::rng().random_range(Duration::ZERO..=self.cap);
        self.cap = (self.cap * 2).min(BACKOFF_MAX);
        sleep
    }
}

async fn serve(
    discovery: &Discovery,
    commands: &mut Commands,
    node: &pb::Node,
    identity: Option<&crate::identity::Identity>,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let scheme = if identity.is_some() { "https" } else { "http" };
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", discovery.inner.address))?
            .connect_timeout(Duration::from_secs(1))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(3));
    if let Some(identity) = identity {
        endpoint = endpoint.tls_config(identity.discovery_tls().await)?;
    }
    let channel = endpoint.connect().await?;
    let mut client = pb::discovery_client::DiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel(64);

    let mut node = node.clone();
    if let Some(local) = node.local_workload.as_mut() {
        local.ready = discovery.ready();
    }
    tx.send(pb::DiscoveryRequest {
        node: Some(node),
        ..Default::default()
    })
    .await?;
    for (ty, names) in discovery.subscriptions() {
        let initial_versions: BTreeMap<String, String> = names
            .iter()
            .filter_map(|(n, v)| v.clone().map(|v| (n.clone(), v)))
            .collect();
        tx.send(pb::DiscoveryRequest {
            r#type: ty.into(),
            subscribe: names.into_iter().map(|(n, _)| n).collect(),
            initial_versions,
            ..Default::default()
        })
        .await?;
    }
    let mut responses = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    discovery.set_connected(true);
    tracing::info!(address = %discovery.inner.address, "discovery stream up");
    loop {
        tokio::select! {
            command = commands.0.recv() => {
                let request = match command {
                    Some(Command::Subscribe(ty, name)) => pb::DiscoveryRequest {
                        r#type: ty.into(), subscribe: vec![name], ..Default::default()
                    },
                    Some(Command::Ready(ready)) => pb::DiscoveryRequest {
                        workload_status: Some(pb::WorkloadStatus { ready }), ..Default::default()
                    },
                    None => return Ok(()),
                };
                tx.send(request).await?;
            }
            message = responses.message() => {
                let Some(response) = message? else { return Ok(()) };
                *backoff = Backoff::default();
                let ack = apply(discovery, response);
                tx.send(ack).await?;
            }
        }
    }
}

/// Applies one response atomically and returns the ACK or NACK for it.
fn apply(discovery: &Discovery, response: pb::DiscoveryResponse) -> pb::DiscoveryRequest {
    let ty = pb::ResourceType::try_from(response.r#type).unwrap_or(pb::ResourceType::Unspecified);
    let mut converted = Vec::new();
    let mut rejected = Vec::new();
    for resource in response.resources {
        let (name, version) = (resource.name.clone(), resource.version.clone());
        match convert(ty, resource) {
            Ok(held) => converted.push((name, held)),
            Err(reason) => rejected.push(pb::Rejection {
                name,
                version,
                reason,
            }),
        }
    }
    let mut ack = pb::DiscoveryRequest {
        r#type: ty.into(),
        response_nonce: response.nonce,
        ..Default::default()
    };
    if !rejected.is_empty() {
        // NOTE: all or nothing: one bad resource keeps every previous version of this response.
        for r in &rejected {
            tracing::warn!(name = %r.name, version = %r.version, reason = %r.reason, "rejecting a pushed resource");
        }
        ack.error_detail = Some(rpc::Status {
            code: tonic::Code::InvalidArgument as i32,
            message: format!("{} resource(s) rejected", rejected.len()),
            details: Vec::new(),
        });
        ack.rejected = rejected;
        discovery.counted(ty, false);
        return ack;
    }
    discovery.counted(ty, true);
    for (name, held) in converted {
        discovery.set(ty, &name, State::Found(Arc::new(held)));
    }
    for name in response.removed.iter().chain(&response.not_found) {
        discovery.set(ty, name, State::NotFound);
    }
    if ty == pb::ResourceType::InboundPolicy {
        discovery.mark_synced();
    }
    ack
}

fn convert(ty: pb::ResourceType, resource: pb::Resource) -> Result<Held, String> {
    use pb::resource::Body;
    let value = match (ty, resource.body) {
        (pb::ResourceType::Endpoints, Some(Body::Endpoints(e))) => {
            Value::Endpoints(Arc::new(Endpoints::try_from(e).map_err(|e| e.to_string())?))
        }
        (pb::ResourceType::ClientPolicy, Some(Body::ClientPolicy(p))) => Value::ClientPolicy(
            Arc::new(ClientPolicy::try_from(p).map_err(|e| e.to_string())?),
        ),
        (pb::ResourceType::InboundPolicy, Some(Body::InboundPolicy(p))) => Value::InboundPolicy(
            Arc::new(InboundPolicy::try_from(p).map_err(|e| e.to_string())?),
        ),
        (pb::ResourceType::TrustBundle, Some(Body::TrustBundle(b))) => {
            let anchors: Vec<_> = b
                .anchors_der
                .into_iter()
                .map(rustls::pki_types::CertificateDer::from)
                .collect();
            // Validated here, so a bad bundle is NACKed and the current anchors stay.
            crate::identity::roots(&anchors).map_err(|e| format!("trust bundle: {e:#}"))?;
            Value::TrustBundle(Arc::new(anchors))
        }
        (pb::ResourceType::Telemetry, Some(Body::Telemetry(t))) => {
            if !(0.0..=1.0).contains(&t.sampling) {
                return Err(format!(
                    "telemetry: sampling {} is not a ratio 0..1",
                    t.sampling
                ));
            }
            if !t.otlp_endpoint.is_empty() && t.otlp_endpoint.parse::<http::Uri>().is_err() {
                return Err(format!("telemetry: {:?} is not a URL", t.otlp_endpoint));
            }
            Value::Telemetry {
                endpoint: t.otlp_endpoint,
                sampling: t.sampling,
            }
        }
        (ty, _) => {
            return Err(format!(
                "body does not match resource type {}",
                ty.as_str_name()
            ));
        }
    };
    let sources = resource
        .sources
        .into_iter()
        .map(|s| Source {
            object: format!("{} {}/{}", s.kind, s.namespace, s.name),
            section: s.section,
            generation: s.generation,
            file: s.file,
        })
        .collect();
    let ttl = resource
        .ttl
        .and_then(|t| std::time::Duration::try_from(t).ok());
    Ok(Held {
        version: resource.version,
        sources,
        value,
        received: tokio::time::Instant::now(),
        ttl,
    })
}

#[cfg(test)]
mod tests {
    use ferrymesh_proto::config::v1 as cfg;

    use super::*;

    fn endpoints_resource(name: &str, ip: &str) -> pb::Resource {
        pb::Resource {
            name: name.into(),
            version: format!("v-{ip}"),
            body: Some(pb::resource::Body::Endpoints(cfg::ServiceEndpoints {
                service: Some(cfg::ServiceRef {
                    name: "a".into(),
                    namespace: "b".into(),
                }),
                port: 80,
                endpoints: vec![cfg::Endpoint {
                    addr: Some(cfg::SocketAddr {
                        ip: ip.into(),
                        port: 1,
                    }),
                    ready: true,
                    ..Default::default()
                }],
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn reconnect_sleeps_are_jittered_under_a_doubling_cap() {
        let mut b = Backoff::default();
        let mut caps = Vec::new();
        for _ in 0..10 {
            let cap = b.cap;
            let sleep = b.next_sleep();
            assert!(sleep <= cap, "{sleep:?} > {cap:?}");
            caps.push(cap.as_millis());
        }
        assert_eq!(
            caps,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        // Jitter: many draws under a 10s cap are not all equal.
        let draws: std::collections::HashSet<_> = (0..20).map(|_| b.next_sleep()).collect();
        assert!(draws.len() > 10);
    }

    #[test]
    fn a_bad_resource_nacks_the_whole_response_and_keeps_the_last_good() {
        let (d, _commands) = Discovery::new("127.0.0.1:1".into());
        let a = d.watch(pb::ResourceType::Endpoints, "a.b:80");
        let c = d.watch(pb::ResourceType::Endpoints, "c.b:80");
        let first = pb::DiscoveryResponse {
            r#type: pb::ResourceType::Endpoints.into(),
            resources: vec![endpoints_resource("a.b:80", "127.0.0.1")],
            not_found: vec!["c.b:80".into()],
            nonce: "1".into(),
            ..Default::default()
        };
        let ack = apply(&d, first);
        assert!(ack.error_detail.is_none());
        assert_eq!(ack.response_nonce, "1");
        assert!(matches!(&*c.borrow(), State::NotFound));

        let bad = pb::DiscoveryResponse {
            r#type: pb::ResourceType::Endpoints.into(),
            resources: vec![
                endpoints_resource("a.b:80", "127.0.0.2"),
                endpoints_resource("c.b:80", "not-an-ip"),
            ],
            nonce: "2".into(),
            ..Default::default()
        };
        let nack = apply(&d, bad);
        assert!(nack.error_detail.is_some());
        assert_eq!(nack.rejected.len(), 1);
        assert_eq!(nack.rejected[0].name, "c.b:80");
        let State::Found(held) = &*a.borrow() else {
            panic!("a was dropped")
        };
        assert_eq!(
            held.version, "v-127.0.0.1",
            "the good resource of a NACKed response is not applied"
        );
    }

    #[test]
    fn a_body_of_the_wrong_type_is_rejected() {
        let (d, _commands) = Discovery::new("127.0.0.1:1".into());
        let _rx = d.watch(pb::ResourceType::ClientPolicy, "a.b:80");
        let response = pb::DiscoveryResponse {
            r#type: pb::ResourceType::ClientPolicy.into(),
            resources: vec![endpoints_resource("a.b:80", "127.0.0.1")],
            nonce: "1".into(),
            ..Default::default()
        };
        assert_eq!(apply(&d, response).rejected.len(), 1);
    }

    #[test]
    fn the_first_inbound_policy_marks_the_proxy_synced() {
        let (d, _commands) = Discovery::new("127.0.0.1:1".into());
        let _rx = d.watch(pb::ResourceType::InboundPolicy, "*");
        assert!(!*d.synced().borrow());
        apply(
            &d,
            pb::DiscoveryResponse {
                r#type: pb::ResourceType::InboundPolicy.into(),
                resources: vec![pb::Resource {
                    name: "*".into(),
                    version: "1".into(),
                    body: Some(pb::resource::Body::InboundPolicy(
                        cfg::InboundPolicy::default(),
                    )),
                    ..Default::default()
                }],
                nonce: "1".into(),
                ..Default::default()
            },
        );
        assert!(*d.synced().borrow());
    }
}
