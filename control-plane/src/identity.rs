//! The mesh's certificate authority and the `Identity.Certify` service. The CA is an ECDSA P-256
//! issuer whose key and certificate live in a folder (generated on first start, reused after,
//! so proxies keep trusting it across restarts). A proxy proves its identity with a token and
//! sends a CSR for a key that never leaves it; it gets a short-lived certificate (24 h by
//! default, backdated 20 s for clock skew) for `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, usable
//! as a TLS client and server certificate.
//!
//! Locally the tokens are bootstrap tokens that `ferryctl up` writes: `<token dir>/<ns>/<sa>`
//! holds the token of that service account. In a cluster the same check becomes a TokenReview.

pub mod secret;
pub mod tokens;

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use ferrymesh_proto::identity::v1 as pb;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use tonic::{Request, Response, Status};

/// Clock-skew allowance: certificates start this long before they are issued.
pub const BACKDATE: Duration = Duration::from_secs(20);

/// Why a certificate was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertifyError {
    /// The identity is not a SPIFFE id of this trust domain.
    #[error("identity {0:?} is not spiffe://{1}/ns/<namespace>/sa/<service account>")]
    BadIdentity(String, String),
    /// The CSR does not parse or its signature is wrong.
    #[error("the CSR is malformed: {0}")]
    BadCsr(String),
    /// The CSR asks for another name than the identity.
    #[error("the CSR names {0:?}, not the identity (exactly one URI SAN equal to it)")]
    NameMismatch(Vec<String>),
    /// The token does not prove the identity.
    #[error("{0}")]
    Unauthenticated(String),
}

impl From<CertifyError> for Status {
    fn from(e: CertifyError) -> Status {
        match e {
            CertifyError::BadCsr(_) => Status::invalid_argument(e.to_string()),
            CertifyError::BadIdentity(..) | CertifyError::NameMismatch(_) => {
                Status::permission_denied(e.to_string())
            }
            CertifyError::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
        }
    }
}

/// A SPIFFE id split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

/// Parses `spiffe://<trust_domain>/ns/<ns>/sa/<sa>`.
pub fn parse_spiffe(id: &str, trust_domain: &str) -> Option<SpiffeId> {
    let rest = id.strip_prefix("spiffe://")?.strip_prefix(trust_domain)?;
    let mut parts = rest.strip_prefix('/')?.split('/');
    let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    (valid(ns) && valid(sa)).then(|| SpiffeId {
        namespace: ns.to_owned(),
        service_account: sa.to_owned(),
    })
}

/// The certificate authority.
#[derive(Debug)]
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    anchor: CertificateDer<'static>,
    anchor_pem: String,
    lifetime: Duration,
    dir: Option<std::path::PathBuf>,
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key.pem";
/// More anchors to trust besides the issuer (a CA rotation: the next or the previous one).
const EXTRA_ANCHORS: &str = "anchors.pem";

impl Ca {
    /// The CA kept in `dir`: loaded when there, else created and written there (key mode 0600).
    ///
    /// # Errors
    /// The folder cannot be read or written, or holds a CA that does not load.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        lifetime: Duration,
    ) -> anyhow::Result<Ca> {
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        let (anchor_pem, key) = if cert_path.exists() && key_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?;
            let key = KeyPair::from_pem(&key_pem).context("the CA key does not load")?;
            let cert = std::fs::read_to_string(&cert_path)
                .with_context(|| format!("reading {}", cert_path.display()))?;
            (cert, key)
        } else {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(
                DnType::CommonName,
                format!("ferrymesh root CA ({trust_domain})"),
            );
            params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - BACKDATE;
            params.not_after = now + Duration::from_hours(24 * 365);
            let cert = params.self_signed(&key)?;
            write_private(&key_path, &key.serialize_pem())?;
            std::fs::write(&cert_path, cert.pem())
                .with_context(|| format!("writing {}", cert_path.display()))?;
            tracing::info!(dir = %dir.display(), "created the mesh CA");
            (cert.pem(), key)
        };
        let anchor = CertificateDer::from_pem_slice(anchor_pem.as_bytes())
            .context("the CA certificate does not parse")?;
        let issuer = Issuer::from_ca_cert_pem(&anchor_pem, key).context("the CA does not load")?;
        Ok(Ca {
            trust_domain: trust_domain.to_owned(),
            issuer,
            anchor,
            anchor_pem,
            lifetime,
            dir: Some(dir.to_owned()),
        })
    }

    /// The trust anchor (PEM).
    pub fn anchor_pem(&self) -> &str {
        &self.anchor_pem
    }

    /// Every anchor peers must be able to end at: the issuer's, then those of `anchors.pem`
    /// in the CA folder (read now, so a rotation needs no restart). A broken `anchors.pem`
    /// is logged and left out.
    pub fn bundle(&self) -> Vec<Vec<u8>> {
        let mut anchors = vec![self.anchor.to_vec()];
        let Some(dir) = &self.dir else {
            return anchors;
        };
        let Ok(text) = std::fs::read(dir.join(EXTRA_ANCHORS)) else {
            return anchors;
        };
        for cert in CertificateDer::pem_slice_iter(&text) {
            match cert {
                Ok(c) if !anchors.contains(&c.to_vec()) => anchors.push(c.to_vec()),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "anchors.pem: a certificate does not parse"),
            }
        }
        anchors
    }

    /// [`Ca::bundle`] as PEM.
    pub fn bundle_pem(&self) -> String {
        pem::encode_many_config(
            &self
                .bundle()
                .into_iter()
                .map(|der| pem::Pem::new("CERTIFICATE", der))
                .collect::<Vec<_>>(),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        )
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Signs `csr_der` for `identity`, for `ttl` capped by the CA's lifetime.
    ///
    /// # Errors
    /// [`CertifyError`] when the identity, the CSR or its names are wrong.
    pub fn certify(
        &self,
        identity: &str,
        csr_der: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(CertificateDer<'static>, SystemTime), CertifyError> {
        if parse_spiffe(identity, &self.trust_domain).is_none() {
            return Err(CertifyError::BadIdentity(
                identity.to_owned(),
                self.trust_domain.clone(),
            ));
        }
        let mut csr = CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(csr_der.to_vec()),
        )
        .map_err(|e| CertifyError::BadCsr(e.to_string()))?;
        let names: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|n| match n {
                SanType::URI(u) => u.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if names != [identity] {
            return Err(CertifyError::NameMismatch(names));
        }
        let lifetime = ttl.map_or(self.lifetime, |t| t.min(self.lifetime));
        let now = time::OffsetDateTime::now_utc();
        let p = &mut csr.params;
        p.not_before = now - BACKDATE;
        p.not_after = now + lifetime;
        p.is_ca = IsCa::ExplicitNoCa;
        p.distinguished_name = DistinguishedName::new();
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        p.use_authority_key_identifier_extension = true;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| CertifyError::BadCsr(e.to_string()))?;
        let not_after = SystemTime::now() + lifetime;
        Ok((cert.der().clone(), not_after))
    }

    /// A TLS server certificate for the controller itself (the Identity endpoint), with its key
    /// (PEM): valid for `localhost`, 127.0.0.1 and the in-cluster Service name.
    ///
    /// # Errors
    /// Key generation or signing fails.
    pub fn server_identity(&self) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "ferrymesh-controller.ferrymesh-system.svc".to_owned(),
        ])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::from_hours(24 * 365);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// `Identity.Certify`.
#[derive(Debug)]
pub struct IdentityService {
    ca: std::sync::Arc<Ca>,
    tokens: tokens::Tokens,
}

impl IdentityService {
    /// Serves certificates from `ca` to holders of `tokens`.
    pub fn new(ca: std::sync::Arc<Ca>, tokens: tokens::Tokens) -> Self {
        Self { ca, tokens }
    }

    /// As a tonic service.
    pub fn into_server(self) -> pb::identity_server::IdentityServer<Self> {
        pb::identity_server::IdentityServer::new(self)
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let req = request.into_inner();
        let Some(id) = parse_spiffe(&req.identity, self.ca.trust_domain()) else {
            return Err(
                CertifyError::BadIdentity(req.identity, self.ca.trust_domain.clone()).into(),
            );
        };
        self.tokens
            .check(&id, &req.token)
            .await
            .map_err(CertifyError::Unauthenticated)?;
        let ttl = req.requested_ttl.and_then(|d| Duration::try_from(d).ok());
        let (leaf, not_after) = self.ca.certify(&req.identity, &req.csr_der, ttl)?;
        tracing::info!(identity = %req.identity, "certificate issued");
        Ok(Response::new(pb::CertifyResponse {
            leaf_der: leaf.to_vec(),
            intermediates_der: Vec::new(),
            not_after: Some(prost_types::Timestamp::from(not_after)),
            trust_anchors_der: self.ca.bundle(),
        }))
    }
}

#[cfg(test)]
mod tests;
