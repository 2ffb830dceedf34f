use std::os::unix::fs::PermissionsExt as _;

use super::*;

fn csr(identity: &str) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
    let der = params.serialize_request(&key).unwrap().der().to_vec();
    (key, der)
}

const ID: &str = "spiffe://cluster.local/ns/shop/sa/pricing";

#[test]
fn spiffe_ids_parse_only_in_our_trust_domain() {
    let id = parse_spiffe(ID, "cluster.local").unwrap();
    assert_eq!(id.namespace, "shop");
    assert_eq!(id.service_account, "pricing");
    for bad in [
        "spiffe://other.local/ns/shop/sa/pricing",
        "spiffe://cluster.local/ns/shop/sa/pricing/x",
        "spiffe://cluster.local/ns//sa/pricing",
        "spiffe://cluster.local/sa/pricing/ns/shop",
        "spiffe://cluster.local/ns/Shop/sa/pricing",
        "https://cluster.local/ns/shop/sa/pricing",
    ] {
        assert!(parse_spiffe(bad, "cluster.local").is_none(), "{bad}");
    }
}

#[test]
fn the_ca_is_created_once_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let a = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_hours(24)).unwrap();
    let b = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_hours(24)).unwrap();
    assert_eq!(
        a.anchor_pem(),
        b.anchor_pem(),
        "the same anchor after a restart"
    );
    let mode = std::fs::metadata(dir.path().join(CA_KEY))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the CA key is private");
}

#[test]
fn a_certificate_names_only_the_identity_and_is_short_lived() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_hours(24)).unwrap();
    let (_, der) = csr(ID);
    let (leaf, not_after) = ca.certify(ID, &der, Some(Duration::from_mins(1))).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, [ID]);
    let validity = cert.validity();
    let span = validity.not_after.timestamp() - validity.not_before.timestamp();
    assert_eq!(span, 60 + 20, "the requested minute, backdated 20s");
    let left = not_after.duration_since(SystemTime::now()).unwrap();
    assert!(left <= Duration::from_mins(1) && left > Duration::from_secs(50));
    // Signed by the CA.
    let (_, anchor) = x509_parser::parse_x509_certificate(&ca.anchor).unwrap();
    cert.verify_signature(Some(anchor.public_key())).unwrap();
    // The CA's lifetime caps what is asked.
    let (leaf, _) = ca
        .certify(ID, &der, Some(Duration::from_hours(100)))
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let v = cert.validity();
    assert_eq!(
        v.not_after.timestamp() - v.not_before.timestamp(),
        24 * 3600 + 20
    );
}

#[test]
fn wrong_names_ids_and_csrs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_hours(24)).unwrap();
    let (_, other) = csr("spiffe://cluster.local/ns/shop/sa/payments");
    assert!(matches!(
        ca.certify(ID, &other, None),
        Err(CertifyError::NameMismatch(_))
    ));
    let (_, foreign) = csr("spiffe://evil.local/ns/shop/sa/pricing");
    assert!(matches!(
        ca.certify("spiffe://evil.local/ns/shop/sa/pricing", &foreign, None),
        Err(CertifyError::BadIdentity(..))
    ));
    assert!(matches!(
        ca.certify(ID, b"not a csr", None),
        Err(CertifyError::BadCsr(_))
    ));
}

#[tokio::test]
async fn bootstrap_tokens_prove_their_service_account_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("shop")).unwrap();
    std::fs::write(dir.path().join("shop/pricing"), "s3cret\n").unwrap();
    let tokens = tokens::Tokens::in_dir(dir.path().to_owned());
    let id = |sa: &str| SpiffeId {
        namespace: "shop".into(),
        service_account: sa.into(),
    };
    assert!(tokens.check(&id("pricing"), b"s3cret").await.is_ok());
    assert!(tokens.check(&id("pricing"), b"s3cre").await.is_err());
    assert!(tokens.check(&id("pricing"), b"").await.is_err());
    assert!(
        tokens
            .check(&id("payments"), b"s3cret")
            .await
            .unwrap_err()
            .contains("no bootstrap token for shop/payments")
    );
    assert!(
        tokens::Tokens::default()
            .check(&id("pricing"), b"s3cret")
            .await
            .is_err()
    );
}
