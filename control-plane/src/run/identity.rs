//! The controller as a CA: the Identity listener, the trust bundle it publishes, and the TLS
//! its own ports serve with.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{RunArgs, SourceKind, kube_client};
use crate::identity::tokens::Tokens;
use crate::identity::{Ca, IdentityService};
use crate::index::IndexHandle;
use crate::metrics::Metrics;

/// Publishes the trust bundle and serves Identity, when the mesh has a CA.
pub(super) async fn spawn_identity(
    args: &RunArgs,
    identity: Option<(Arc<Ca>, TcpListener)>,
    index: &IndexHandle,
    metrics: &Arc<Metrics>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    Ok(match identity {
        Some((ca, listener)) => {
            tokio::spawn(publish_bundle(
                ca.clone(),
                args.trust_domain.clone(),
                index.clone(),
                shutdown.clone(),
            ));
            let tokens = match args.source {
                // Pods prove their service account with its projected token, and find the
                // anchors in a ConfigMap of their namespace.
                SourceKind::Kubernetes => {
                    let client = kube_client(args.kubeconfig.as_deref()).await?;
                    tokio::spawn(crate::identity::secret::publish_trust_anchors(
                        client.clone(),
                        ca.clone(),
                        Duration::from_secs(10),
                    ));
                    Tokens::token_review(client)
                }
                SourceKind::Files => args
                    .token_dir
                    .clone()
                    .map(Tokens::in_dir)
                    .unwrap_or_default(),
            };
            Some(tokio::spawn(serve_identity(
                ca,
                tokens,
                listener,
                crate::guard::Limits::with_handshake(args.handshake_timeout),
                metrics.clone(),
                shutdown.clone(),
            )))
        }
        None => None,
    })
}

/// Serves the CA's trust bundle on Discovery, re-reading it every 2 s so anchors added or
/// removed in the CA folder (a rotation) reach every proxy without a restart.
async fn publish_bundle(
    ca: Arc<Ca>,
    trust_domain: String,
    index: IndexHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                index.set_trust_bundle(crate::index::trust_bundle(&trust_domain, ca.bundle()));
            }
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// The CA and the Identity listener, when `--ca-dir` turns identity on.
pub(super) async fn bind_identity(
    args: &RunArgs,
) -> anyhow::Result<Option<(Arc<Ca>, TcpListener)>> {
    let Some(dir) = &args.ca_dir else {
        return Ok(None);
    };
    if let Some(secret) = &args.ca_secret {
        let (namespace, name) = secret
            .split_once('/')
            .context("--ca-secret is namespace/name")?;
        let client = kube_client(args.kubeconfig.as_deref()).await?;
        crate::identity::secret::sync(&client, namespace, name, dir, &args.trust_domain).await?;
        tokio::spawn(crate::identity::secret::follow(
            client,
            namespace.to_owned(),
            name.to_owned(),
            dir.clone(),
            Duration::from_secs(10),
        ));
    }
    let ca = Arc::new(Ca::load_or_create(
        dir,
        &args.trust_domain,
        args.cert_lifetime,
    )?);
    let listener = TcpListener::bind(args.identity_listen)
        .await
        .with_context(|| format!("binding the Identity listener on {}", args.identity_listen))?;
    Ok(Some((ca, listener)))
}

/// Discovery's TLS: a server certificate from the CA; client certificates asked for and
/// checked against every anchor of the CA, optional at the handshake so that a proxy without
/// one gets a gRPC status saying what is missing rather than a bare TLS alert.
pub(super) fn discovery_tls(ca: &Ca) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for anchor in rustls::pki_types::CertificateDer::pem_slice_iter(ca.bundle_pem().as_bytes()) {
        roots.add(anchor.context("a trust anchor")?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .allow_unauthenticated()
    .build()?;
    server_tls(ca, Some(verifier))
}

/// A TLS acceptor with the CA's server certificate, speaking h2 (gRPC), with client
/// certificates checked by `verifier` when given.
fn server_tls(
    ca: &Ca,
    verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject as _;
    let (cert, key) = ca.server_identity()?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the server certificate")?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())
        .context("the server key")?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `Identity.Certify` over TLS with a server certificate from `ca` itself.
async fn serve_identity(
    ca: Arc<Ca>,
    tokens: Tokens,
    listener: TcpListener,
    limits: crate::guard::Limits,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let acceptor = server_tls(&ca, None).context("the Identity server's TLS")?;
    let incoming = crate::guard::incoming(
        listener,
        "identity",
        limits,
        metrics,
        crate::guard::tls(acceptor),
        shutdown.clone(),
    );
    let mut shutdown = shutdown;
    tonic::transport::Server::builder()
        .add_service(IdentityService::new(ca, tokens).into_server())
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
        .context("serving Identity")
}
