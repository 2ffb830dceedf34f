//! The proxy's workload identity and its TLS: a private key generated in memory (never
//! written), a CSR for `spiffe://<trust domain>/ns/<ns>/sa/<sa>`, a certificate from the
//! controller's `Identity.Certify`, renewed at 70% of its lifetime (the old one keeps serving
//! while renewal is retried). From it come the TLS 1.3 configs of both sides:
//!
//! - client (outbound to a meshed endpoint): our certificate, and the peer's chain must end at
//!   a trust anchor and name the endpoint's expected SPIFFE id;
//! - server (inbound): a client certificate is required and must chain to a trust anchor; its
//!   SPIFFE id is the caller's identity.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use ferrymesh_proto::identity::v1 as pb;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::sync::watch;

use crate::config::{IdentityConfig, Workload};

/// Renew at this share of the lifetime.
const RENEW_AT: f64 = 0.7;
/// Never wait less than this between renewals (API.md: refresh min 10s).
const MIN_RENEW: Duration = Duration::from_secs(10);
/// Retry backoff bounds while the controller cannot certify.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

pub use ferrymesh_proto::spiffe_ids;

/// When a certificate stops being valid.
pub fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The certificate in use, read by both TLS sides at each handshake.
#[derive(Debug, Default)]
struct Slot(RwLock<Option<Arc<CertifiedKey>>>);

impl Slot {
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().expect("identity lock poisoned").clone()
    }
}

impl rustls::client::ResolvesClientCert for Slot {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for Slot {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

/// What the current certificate says, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// When it stops being valid.
    pub not_after: SystemTime,
}

/// The workload's identity.
#[derive(Debug)]
pub struct Identity {
    spiffe: String,
    config: IdentityConfig,
    slot: Arc<Slot>,
    held: watch::Sender<Option<Held>>,
    provider: Arc<CryptoProvider>,
    roots: RwLock<Arc<RootCertStore>>,
    anchors_pem: String,
    server: RwLock<Arc<ServerConfig>>,
    clients: Mutex<HashMap<(String, bool), Arc<ClientConfig>>>,
    /// The current chain and key as PEM, for the controller's Discovery (mTLS). In memory
    /// only, like the key itself.
    pem: RwLock<Option<(String, String)>>,
}

/// The inbound side's TLS config over `roots`.
fn server_config(
    roots: Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    slot: &Arc<Slot>,
) -> anyhow::Result<ServerConfig> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .context("building the client certificate verifier")?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(slot.clone());
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // NOTE: no session resumption: a resumed TLS 1.3 session skips the certificate checks,
    // so a peer could keep going on a certificate that has since expired.
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    Ok(server)
}

/// A root store of `anchors` (DER).
///
/// # Errors
/// An anchor that is not a CA certificate, or none at all.
pub fn roots(anchors: &[CertificateDer<'static>]) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for a in anchors {
        roots
            .add(a.clone())
            .context("a trust anchor is not a CA certificate")?;
    }
    anyhow::ensure!(!roots.is_empty(), "no trust anchor");
    Ok(roots)
}

impl Identity {
    /// The identity of `workload`, trusting the anchors of `config` (no certificate yet).
    ///
    /// # Errors
    /// The trust anchors cannot be read or parsed.
    pub fn new(workload: &Workload, config: &IdentityConfig) -> anyhow::Result<Identity> {
        let spiffe = format!(
            "spiffe://{}/ns/{}/sa/{}",
            config.trust_domain, workload.namespace, workload.service_account
        );
        let anchors_pem = std::fs::read_to_string(&config.trust_anchors).with_context(|| {
            format!(
                "reading the trust anchors {}",
                config.trust_anchors.display()
            )
        })?;
        let anchors = CertificateDer::pem_slice_iter(anchors_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("a trust anchor does not parse")?;
        let roots = Arc::new(
            roots(&anchors)
                .with_context(|| format!("trust anchors in {}", config.trust_anchors.display()))?,
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let slot = Arc::new(Slot::default());
        let server = server_config(roots.clone(), &provider, &slot)?;
        Ok(Identity {
            spiffe,
            config: config.clone(),
            slot,
            held: watch::channel(None).0,
            provider,
            roots: RwLock::new(roots),
            anchors_pem,
            server: RwLock::new(Arc::new(server)),
            clients: Mutex::default(),
            pem: RwLock::default(),
        })
    }

    /// `spiffe://...` of this workload.
    pub fn spiffe(&self) -> &str {
        &self.spiffe
    }

    /// The current certificate, once one is held.
    pub fn held(&self) -> Option<Held> {
        *self.held.borrow()
    }

    /// Watches for the certificate.
    pub fn watch(&self) -> watch::Receiver<Option<Held>> {
        self.held.subscribe()
    }

    /// The inbound side's TLS config.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.read().expect("identity lock poisoned").clone()
    }

    /// Trusts `anchors` from now on (a TRUST_BUNDLE push): new handshakes on both sides use
    /// them; connections already made keep going.
    ///
    /// # Errors
    /// An anchor is not a CA certificate, or there is none: the current anchors stay.
    pub fn set_anchors(&self, anchors: &[CertificateDer<'static>]) -> anyhow::Result<()> {
        let roots = Arc::new(roots(anchors)?);
        let server = server_config(roots.clone(), &self.provider, &self.slot)?;
        *self.roots.write().expect("identity lock poisoned") = roots;
        *self.server.write().expect("identity lock poisoned") = Arc::new(server);
        self.clients.lock().expect("identity lock poisoned").clear();
        tracing::info!(anchors = anchors.len(), "trust anchors updated");
        Ok(())
    }

    /// The outbound side's TLS config for a peer that must be `expected`, offering ALPN `h2`
    /// or `http/1.1`.
    pub fn client_config(&self, expected: &str, h2: bool) -> Arc<ClientConfig> {
        let mut clients = self.clients.lock().expect("identity lock poisoned");
        clients
            .entry((expected.to_owned(), h2))
            .or_insert_with(|| {
                let verifier = Arc::new(PeerVerifier {
                    roots: self.roots.read().expect("identity lock poisoned").clone(),
                    expected: expected.to_owned(),
                    algs: self.provider.signature_verification_algorithms,
                });
                let mut c = ClientConfig::builder_with_provider(self.provider.clone())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("the ring provider supports TLS 1.3")
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_client_cert_resolver(self.slot.clone());
                c.alpn_protocols = vec![if h2 {
                    b"h2".to_vec()
                } else {
                    b"http/1.1".to_vec()
                }];
                // The peer is checked by its SPIFFE id, not a DNS name: no SNI to leak.
                c.enable_sni = false;
                // Every connection checks both certificates afresh (see the server side).
                c.resumption = rustls::client::Resumption::disabled();
                Arc::new(c)
            })
            .clone()
    }

    /// Gets a certificate and keeps renewing it until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = RETRY_MIN;
        loop {
            let wait = match self.certify().await {
                Ok(lifetime) => {
                    backoff = RETRY_MIN;
                    lifetime.mul_f64(RENEW_AT).max(MIN_RENEW.min(lifetime / 2))
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), identity = %self.spiffe, "certificate request failed; retrying (the current certificate, if any, stays in use)");
                    let wait = rand::random_range(RETRY_MIN..=backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// TLS to the controller: its server certificate checked against the trust anchors
    /// (re-read, so a rotated anchor file counts) for the configured server name.
    fn controller_tls(&self) -> tonic::transport::ClientTlsConfig {
        let anchors = std::fs::read_to_string(&self.config.trust_anchors)
            .unwrap_or_else(|_| self.anchors_pem.clone());
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(anchors))
            .domain_name(self.config.server_name.clone())
    }

    /// TLS for the Discovery stream: [`Identity::controller_tls`] with the current certificate
    /// as the client's, once a valid one is held (waits for it: an expired one would only be
    /// refused).
    pub async fn discovery_tls(&self) -> tonic::transport::ClientTlsConfig {
        let mut held = self.watch();
        let _ = held
            .wait_for(|h| h.is_some_and(|h| h.not_after > SystemTime::now()))
            .await;
        let tls = self.controller_tls();
        match self.pem.read().expect("identity lock poisoned").clone() {
            Some((chain, key)) => tls.identity(tonic::transport::Identity::from_pem(chain, key)),
            None => tls,
        }
    }

    /// One Certify round: a fresh key and CSR, the new certificate in use. Returns its lifetime.
    async fn certify(&self) -> anyhow::Result<Duration> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(self.spiffe.as_str().try_into()?)];
        let csr = params.serialize_request(&key)?;
        let token = std::fs::read(&self.config.token_file)
            .with_context(|| format!("reading the token {}", self.config.token_file.display()))?;
        let tls = self.controller_tls();
        let channel =
            tonic::transport::Endpoint::from_shared(format!("https://{}", self.config.address))?
                .tls_config(tls)?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5))
                .connect()
                .await
                .with_context(|| {
                    format!(
                        "connecting to the controller's Identity at {}",
                        self.config.address
                    )
                })?;
        let rsp = pb::identity_client::IdentityClient::new(channel)
            .certify(pb::CertifyRequest {
                identity: self.spiffe.clone(),
                token,
                csr_der: csr.der().to_vec(),
                requested_ttl: self
                    .config
                    .lifetime
                    .and_then(|l| prost_types::Duration::try_from(l).ok()),
            })
            .await
            .map_err(|s| anyhow::anyhow!("Certify: {}: {}", s.code(), s.message()))?
            .into_inner();
        let mut chain = vec![CertificateDer::from(rsp.leaf_der)];
        chain.extend(rsp.intermediates_der.into_iter().map(CertificateDer::from));
        anyhow::ensure!(
            spiffe_ids(&chain[0]) == [self.spiffe.clone()],
            "the controller issued a certificate for another name"
        );
        let signer = self
            .provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key.serialize_der().into()))?;
        let not_after = rsp
            .not_after
            .and_then(|t| SystemTime::try_from(t).ok())
            .context("the answer has no expiry")?;
        let chain_pem = pem::encode_many(
            &chain
                .iter()
                .map(|c| pem::Pem::new("CERTIFICATE", c.to_vec()))
                .collect::<Vec<_>>(),
        );
        *self.pem.write().expect("identity lock poisoned") = Some((chain_pem, key.serialize_pem()));
        *self.slot.0.write().expect("identity lock poisoned") =
            Some(Arc::new(CertifiedKey::new(chain, signer)));
        self.held.send_replace(Some(Held { not_after }));
        let lifetime = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tracing::info!(identity = %self.spiffe, valid_for = ?lifetime, "certificate renewed");
        Ok(lifetime)
    }
}

/// Checks a peer's certificate chain against the trust anchors and its SPIFFE id against the
/// endpoint's expected identity (not a DNS name).
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    algs: WebPkiSupportedAlgorithms,
}

/// The peer's certificate names another identity.
#[derive(Debug)]
struct WrongIdentity {
    expected: String,
    got: Vec<String>,
}

impl std::fmt::Display for WrongIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer is {:?}, expected {}", self.got, self.expected)
    }
}

impl std::error::Error for WrongIdentity {}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let got = spiffe_ids(end_entity);
        if got.contains(&self.expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(WrongIdentity {
                    expected: self.expected.clone(),
                    got,
                }))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
