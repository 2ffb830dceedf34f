//! Zero trust between sidecars, through real proxies and a real CA: every hop between meshed
//! workloads is mutually authenticated TLS 1.3, the app learns the caller's SPIFFE id from a
//! header only its own proxy sets, and an inbound port in Strict mode refuses every connection
//! that does not present a valid mesh certificate, before the app sees a byte.
#![allow(clippy::unwrap_used)] // test helpers, not #[test] functions, unwrap too

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferrymesh_test_support::mesh::yaml::service;
use ferrymesh_test_support::mesh::{Mesh, ProxySpec, client_proxy, get, proxied};
use ferrymesh_test_support::process::Spawned;
use ferrymesh_test_support::upstream::HttpEcho;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const STRICT: &str = "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: AuthenticationPolicy\nmetadata: {name: echo-strict, namespace: shop}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: echo}]\n  mtls: {mode: Strict}\n";

struct Secure {
    mesh: Mesh,
    echo: HttpEcho,
    server: Spawned,
    client: Spawned,
}

async fn secure(extra_files: &[(&str, &str)]) -> Secure {
    secure_with(&service("echo"), extra_files, &[]).await
}

/// A secure mesh with `echo` (declared by `echo_yaml`), `extra_files` and controller `args`:
/// an echo server behind its sidecar, and a ready client sidecar.
async fn secure_with(echo_yaml: &str, extra_files: &[(&str, &str)], args: &[&str]) -> Secure {
    let mut files = vec![("echo.yaml", echo_yaml)];
    files.extend_from_slice(extra_files);
    let mesh = Mesh::start_secure(&files, args);
    let echo = HttpEcho::start("echo-1").await;
    let server = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let client = client_proxy(&mesh, "echo.shop", 1).await;
    Secure {
        mesh,
        echo,
        server,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cross_sidecars_over_mtls_and_the_app_learns_the_callers_identity() {
    let s = secure(&[(("strict.yaml"), STRICT)]).await;
    let http = proxied(s.client.addr("outbound"));
    let rsp = http
        .get("http://echo.shop/who")
        .header(
            "x-ferrymesh-peer-identity",
            "spiffe://cluster.local/ns/shop/sa/admin",
        )
        .header(
            "x-forwarded-client-cert",
            "URI=spiffe://cluster.local/ns/shop/sa/admin",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200, "a Strict port serves mTLS");
    let seen: serde_json::Value = rsp.json().await.unwrap();
    assert_eq!(
        seen["headers"]["x-ferrymesh-peer-identity"], "spiffe://cluster.local/ns/shop/sa/client",
        "the caller's certificate, not what the caller wrote: {seen}"
    );
    // X-Forwarded-Client-Cert likewise: sanitised, then set from the verified certificate.
    assert_eq!(
        seen["headers"]["x-forwarded-client-cert"],
        "By=spiffe://cluster.local/ns/shop/sa/echo;URI=spiffe://cluster.local/ns/shop/sa/client",
        "{seen}"
    );
    // Both proxies hold certificates and are ready.
    for p in [&s.server, &s.client] {
        assert_eq!(get(p.addr("health"), "/ready").await.unwrap().0, 200);
    }
    // The handshake is counted on both sides, and every config update the client applied.
    let counter = ferrymesh_test_support::mesh::counter;
    let handshakes = "ferrymesh_proxy_tls_handshakes_total";
    let out = counter(
        s.client.addr("health"),
        handshakes,
        "direction=\"outbound\",result=\"ok\"",
    )
    .await;
    let inb = counter(
        s.server.addr("health"),
        handshakes,
        "direction=\"inbound\",result=\"ok\"",
    )
    .await;
    assert!(out >= 1 && inb >= 1, "outbound {out}, inbound {inb}");
    let applied = counter(
        s.client.addr("health"),
        "ferrymesh_proxy_config_updates_total",
        "type=\"CLIENT_POLICY\",outcome=\"applied\"",
    )
    .await;
    assert!(applied >= 1, "{applied}");
}

/// The mesh CA, loaded from the controller's folder, to mint test certificates.
fn mesh_ca(mesh: &Mesh) -> rcgen::Issuer<'static, rcgen::KeyPair> {
    let dir = mesh.identity_dir().join("ca");
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key.pem")).unwrap())
        .unwrap();
    rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(dir.join("ca.pem")).unwrap(), key)
        .unwrap()
}

/// A client certificate for `id`, signed by `issuer` (or self-signed by a foreign CA), valid
/// in the past when `expired`.
fn leaf(
    issuer: Option<&rcgen::Issuer<'static, rcgen::KeyPair>>,
    id: &str,
    expired: bool,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 2);
    }
    let foreign;
    let issuer = if let Some(i) = issuer {
        i
    } else {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        foreign = rcgen::Issuer::new(ca, ca_key);
        &foreign
    };
    let cert = params.signed_by(&key, issuer).unwrap();
    (
        vec![cert.der().clone()],
        PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
}

/// Trusts whatever the server presents: these tests probe what the *server* accepts.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects to `addr` over TLS with `cert` (or none) and sends a request; the answer's first
/// line, or the error that stopped it.
async fn probe(
    addr: std::net::SocketAddr,
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<String, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("echo").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // TLS 1.3: the server judges the client's certificate after the client's Finished, so a
    // refusal shows on the first read or write.
    tls.write_all(b"GET /probe HTTP/1.1\r\nhost: echo.shop\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; 256];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(0)) => Err("closed".into()),
        Ok(Ok(n)) => Ok(String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err("no answer".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_port_refuses_every_connection_without_a_valid_mesh_certificate() {
    let s = secure(&[(("strict.yaml"), STRICT)]).await;
    let inbound = s.server.addr("inbound");
    let ca = mesh_ca(&s.mesh);
    let caller = "spiffe://cluster.local/ns/shop/sa/client";
    // The control: a valid mesh certificate gets through.
    let ok = probe(inbound, Some(leaf(Some(&ca), caller, false))).await;
    assert_eq!(ok.as_deref(), Ok("HTTP/1.1 200 OK"), "{ok:?}");
    let hits = s.echo.hits.load(Ordering::SeqCst);
    for (case, cert) in [
        ("no client certificate", None),
        ("a foreign CA", Some(leaf(None, caller, false))),
        (
            "an expired certificate",
            Some(leaf(Some(&ca), caller, true)),
        ),
    ] {
        let refused = probe(inbound, cert).await;
        assert!(refused.is_err(), "{case}: {refused:?}");
        eprintln!("{case}: {}", refused.unwrap_err());
    }
    // Plaintext to a Strict port: closed without an answer.
    let mut tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    tcp.write_all(b"GET /plain HTTP/1.1\r\nhost: echo.shop\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "no answer: {:?}", String::from_utf8_lossy(&buf[..n]));
    assert_eq!(
        s.echo.hits.load(Ordering::SeqCst),
        hits,
        "the app never saw a refused connection"
    );
    let refused = ferrymesh_test_support::mesh::counter(
        s.server.addr("health"),
        "ferrymesh_proxy_inbound_connections_refused_total",
        "",
    )
    .await;
    assert!(refused >= 4, "every refusal is counted: {refused}");
    let failed = ferrymesh_test_support::mesh::counter(
        s.server.addr("health"),
        "ferrymesh_proxy_tls_handshakes_total",
        "direction=\"inbound\",result=\"failed\"",
    )
    .await;
    assert!(
        failed >= 3,
        "refused handshakes are failed handshakes: {failed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permissive_port_takes_plaintext_too_but_mtls_callers_still_use_tls() {
    let s = secure(&[]).await;
    let mut tcp = tokio::net::TcpStream::connect(s.server.addr("inbound"))
        .await
        .unwrap();
    tcp.write_all(b"GET /plain HTTP/1.1\r\nhost: echo.shop\r\nx-ferrymesh-peer-identity: spiffe://cluster.local/ns/shop/sa/admin\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.contains("sa/admin"),
        "a plaintext caller has no identity, and cannot claim one: {answer}"
    );
    let http = proxied(s.client.addr("outbound"));
    let seen: serde_json::Value = http
        .get("http://echo.shop/tls")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        seen["headers"]["x-ferrymesh-peer-identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
}

/// A server on loopback that presents `cert` (no client certificate asked) and counts the
/// connections on which any request byte arrived after the handshake.
async fn rogue(
    cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(cert.0, cert.1)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 64];
                    if matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (addr, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_presenting_another_identity_never_gets_the_request() {
    let mesh = Mesh::start_secure(&[("payments.yaml", &service("payments"))], &[]);
    // A workload with a perfectly valid mesh certificate, but for another service account,
    // answering where payments is registered.
    let intruder = leaf(
        Some(&mesh_ca(&mesh)),
        "spiffe://cluster.local/ns/shop/sa/intruder",
        false,
    );
    let (addr, requests) = rogue(intruder).await;
    let mut node = ferrymesh_test_support::nodes::local(
        "payments-1",
        "payments",
        u32::from(addr.port()),
        true,
    );
    node.local_workload.as_mut().unwrap().identity =
        "spiffe://cluster.local/ns/shop/sa/payments".into();
    node.service_account = "payments".into();
    // Registered the only way the controller allows: over mTLS with a payments certificate
    // (the endpoint's address is then taken over by the intruder).
    let payments = leaf(
        Some(&mesh_ca(&mesh)),
        "spiffe://cluster.local/ns/shop/sa/payments",
        false,
    );
    let (tx, mut registration) = announce(&mesh, Some(&payments), node).await.unwrap();
    let client = client_proxy(&mesh, "payments.shop", 1).await;
    let http = proxied(client.addr("outbound"));
    let rsp = http
        .get("http://payments.shop/payments")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 502);
    assert_eq!(rsp.headers()["ferrymesh-error"], "connect-failed");
    let body = rsp.text().await.unwrap();
    assert!(body.contains("TLS"), "{body}");
    assert_eq!(
        requests.load(Ordering::SeqCst),
        0,
        "not one byte of the request left"
    );
    drop(tx);
    let _ = registration.message().await;
}

/// Opens a Discovery stream to the mesh's controller over TLS, with `cert` as the client's,
/// announces `node` and subscribes to its inbound policy. Returns the request sender and the
/// response stream once answered, or the status it was refused with (UNAVAILABLE when the
/// connection itself failed).
async fn announce(
    mesh: &Mesh,
    cert: Option<&(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    node: ferrymesh_proto::discovery::v1::Node,
) -> Result<
    (
        tokio::sync::mpsc::Sender<ferrymesh_proto::discovery::v1::DiscoveryRequest>,
        tonic::Streaming<ferrymesh_proto::discovery::v1::DiscoveryResponse>,
    ),
    tonic::Status,
> {
    use ferrymesh_proto::discovery::v1 as pb;
    let ca = std::fs::read_to_string(mesh.identity_dir().join("ca/ca.pem")).unwrap();
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((chain, key)) = cert {
        let chain = pem::encode(&pem::Pem::new("CERTIFICATE", chain[0].to_vec()));
        let key = pem::encode(&pem::Pem::new("PRIVATE KEY", key.secret_der().to_vec()));
        tls = tls.identity(tonic::transport::Identity::from_pem(chain, key));
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", mesh.discovery))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::DiscoveryRequest {
        node: Some(node),
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(pb::DiscoveryRequest {
        r#type: pb::ResourceType::InboundPolicy.into(),
        subscribe: vec!["*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = pb::discovery_client::DiscoveryClient::new(channel)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // Accepted streams answer the subscription; refused ones end with their status.
    let first = responses.message().await?;
    assert!(first.is_some(), "the stream ended without an answer");
    Ok((tx, responses))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_is_mtls_and_a_certificate_speaks_only_for_its_own_workload() {
    use ferrymesh_proto::discovery::v1 as pb;
    let mesh = Mesh::start_secure(&[("payments.yaml", &service("payments"))], &[]);
    let ca = mesh_ca(&mesh);
    let node = |sa: &str, identity: &str| {
        let mut n = ferrymesh_test_support::nodes::local("payments-1", "payments", 1, true);
        n.service_account = sa.into();
        n.local_workload.as_mut().unwrap().identity = identity.into();
        n
    };
    let payments_id = "spiffe://cluster.local/ns/shop/sa/payments";
    let intruder_id = "spiffe://cluster.local/ns/shop/sa/intruder";

    // Plaintext: no gRPC at all.
    let plain =
        pb::discovery_client::DiscoveryClient::connect(format!("http://{}", mesh.discovery)).await;
    if let Ok(mut client) = plain {
        let (_tx, rx) = tokio::sync::mpsc::channel::<pb::DiscoveryRequest>(1);
        let refused = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        assert!(refused.is_err(), "a plaintext stream was served");
    }
    // TLS without a client certificate.
    let refused = announce(&mesh, None, node("payments", ""))
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("certificate"), "{refused:?}");
    // A foreign CA's certificate for the right name: refused at the handshake.
    let foreign = leaf(None, payments_id, false);
    let refused = announce(&mesh, Some(&foreign), node("payments", "")).await;
    assert!(refused.is_err(), "a foreign certificate was served");
    // A valid mesh certificate announcing another service account, or registering another
    // identity for its inbound port.
    let intruder = leaf(Some(&ca), intruder_id, false);
    for claimed in [node("payments", ""), node("intruder", payments_id)] {
        let refused = announce(&mesh, Some(&intruder), claimed)
            .await
            .err()
            .unwrap();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains(intruder_id), "{refused:?}");
    }
    // The workload's own certificate, for itself: served.
    let payments = leaf(Some(&ca), payments_id, false);
    let served = announce(&mesh, Some(&payments), node("payments", payments_id)).await;
    assert!(served.is_ok(), "{:?}", served.err());
}

/// The `notAfterUnix` of a proxy's current certificate.
async fn not_after(proxy: &Spawned) -> Option<u64> {
    let v = ferrymesh_test_support::mesh::get_json(proxy.addr("admin"), "/identity").await;
    v["notAfterUnix"].as_u64()
}

/// A mesh whose pooled connections close after 200 ms idle, so bursts of calls after a pause make
/// new mTLS handshakes with whatever certificates are current.
async fn rotating(lifetime: &str) -> Secure {
    let idle = ferrymesh_test_support::mesh::yaml::policy("echo", "  timeouts: {idle: 200ms}\n");
    let echo = service("echo") + &idle;
    secure_with(
        &echo,
        &[("strict.yaml", STRICT)],
        &["--cert-lifetime", lifetime],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let lifetime = std::env::var("FERRYMESH_TEST_CERT_LIFETIME").unwrap_or_else(|_| "1m".into());
    let s = rotating(&lifetime).await;
    let http = proxied(s.client.addr("outbound"));
    let (mut server_certs, mut client_certs) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    let (mut ok, mut failed) = (0u32, Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_mins(4);
    while (server_certs.len() < 4 || client_certs.len() < 4)
        && tokio::time::Instant::now() < deadline
    {
        for _ in 0..20 {
            let rsp = http.get("http://echo.shop/load").send().await.unwrap();
            if rsp.status() == 200 {
                ok += 1;
            } else {
                failed.push((rsp.status(), rsp.text().await.unwrap_or_default()));
            }
        }
        server_certs.extend(not_after(&s.server).await);
        client_certs.extend(not_after(&s.client).await);
        // Past the idle timeout (200 ms): the next burst opens a new mTLS connection.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!(
        "{ok} calls; server certificates {server_certs:?}, client certificates {client_certs:?}"
    );
    assert!(
        server_certs.len() >= 4 && client_certs.len() >= 4,
        "3 rotations on each side"
    );
    if !failed.is_empty() {
        for log in ["echo-1.proxy.log", "client.proxy.log"] {
            let text = std::fs::read_to_string(s.mesh.dir.path().join(log)).unwrap_or_default();
            let interesting: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("DEBUG") || l.contains("TLS") || l.contains("handshake"))
                .collect();
            eprintln!(
                "--- {log}\n{}",
                interesting[interesting.len().saturating_sub(40)..].join("\n")
            );
        }
    }
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(ok >= 1_000, "steady load: {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_controller_past_the_certificate_lifetime_calls_fail_closed_then_recover() {
    let mut s = rotating("20s").await;
    let http = proxied(s.client.addr("outbound"));
    assert_eq!(
        http.get("http://echo.shop/before")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    s.mesh.controller.kill();
    // Both certificates run out with no CA to renew them.
    let expired = |p: &Spawned| {
        let admin = p.addr("admin");
        async move {
            let v = ferrymesh_test_support::mesh::get_json(admin, "/identity").await;
            v["validForSeconds"].as_u64() == Some(0)
        }
    };
    ferrymesh_test_support::mesh::eventually(Duration::from_secs(40), || async {
        expired(&s.server).await && expired(&s.client).await
    })
    .await
    .expect("the certificates expire");
    // A connection opened before expiry may serve until it idles out (200 ms); new ones fail.
    ferrymesh_test_support::mesh::eventually(Duration::from_secs(5), || async {
        http.get("http://echo.shop/draining")
            .send()
            .await
            .is_ok_and(|r| r.status() == 502)
    })
    .await
    .expect("new connections fail once the certificates expired");
    let hits = s.echo.hits.load(Ordering::SeqCst);
    let rsp = http.get("http://echo.shop/during").send().await.unwrap();
    assert_eq!(rsp.status(), 502, "fails closed");
    assert_eq!(rsp.headers()["ferrymesh-error"], "connect-failed");
    let body = rsp.text().await.unwrap();
    assert!(
        body.contains("TLS"),
        "a TLS error, not a plaintext retry: {body}"
    );
    assert_eq!(
        s.echo.hits.load(Ordering::SeqCst),
        hits,
        "nothing reached the app"
    );
    // The controller comes back (same CA, same address): the proxies renew and traffic
    // recovers with no restart.
    s.mesh.restart_controller();
    let recovered = ferrymesh_test_support::mesh::eventually(Duration::from_mins(1), || async {
        http.get("http://echo.shop/after")
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await
    .expect("traffic recovers");
    eprintln!("recovered {recovered:?} after the controller came back");
}

/// Sends `GET http://echo.shop<path>` through `outbound` as written (no client-side path
/// cleaning), with `headers`; the status and the body.
async fn raw_get(outbound: std::net::SocketAddr, path: &str, headers: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
    tcp.write_all(
        format!("GET http://echo.shop{path} HTTP/1.1\r\nhost: echo.shop\r\n{headers}connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_allows_and_denies_by_identity_and_normalised_path() {
    let policies = "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: echo-api, namespace: shop}\n\
                    spec:\n  targetRefs: [{group: \"\", kind: Service, name: echo}]\n  action: Allow\n  rules:\n  - from: {identities: [\"spiffe://cluster.local/ns/shop/sa/client\"]}\n    to: {paths: [{type: PathPrefix, value: /api}, {type: PathPrefix, value: /admin}]}\n---\n\
                    apiVersion: policy.ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: echo-no-admin, namespace: shop}\n\
                    spec:\n  targetRefs: [{group: \"\", kind: Service, name: echo}]\n  action: Deny\n  rules:\n  - to: {paths: [{type: PathPrefix, value: /admin}]}\n";
    let s = secure(&[("authz.yaml", policies), ("strict.yaml", STRICT)]).await;
    let intruder = s.mesh.proxy(&ProxySpec {
        log: Some("warn".into()),
        service: Some("intruder".into()),
        ..ProxySpec::client("intruder-1")
    });
    let outbound = s.client.addr("outbound");
    let hits = || s.echo.hits.load(Ordering::SeqCst);
    let denials = || {
        ferrymesh_test_support::mesh::counter(
            s.server.addr("health"),
            "ferrymesh_proxy_authz_decisions_total",
            r#"decision="deny""#,
        )
    };
    // (The fixture's first call, to /healthz, may or may not have been denied already.)
    let denied_before = denials().await;
    // Allowed, and the app sees the normalised path.
    let (status, body) = raw_get(outbound, "/api/./v1/../items", "").await;
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        seen["path"], "/api/items",
        "the app sees the path the policy saw"
    );
    // Denied whatever the spelling of /admin; an encoded slash is refused outright.
    let before = hits();
    for path in [
        "/admin",
        "//admin",
        "/%61dmin",
        "/a/../admin",
        "/api/../admin/x",
    ] {
        let (status, body) = raw_get(outbound, path, "").await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.starts_with("forbidden:"), "{path}: {body}");
    }
    let (status, body) = raw_get(outbound, "/admin%2f", "").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(hits(), before, "no refused request reached the app");
    // Another identity is not allowed, and claiming one in a header changes nothing.
    let ready = s.mesh.identity.is_some();
    assert!(ready);
    ferrymesh_test_support::mesh::eventually(Duration::from_secs(10), || async {
        get(intruder.addr("health"), "/ready")
            .await
            .is_ok_and(|(s, _)| s == 200)
    })
    .await
    .unwrap();
    let spoof = "x-ferrymesh-peer-identity: spiffe://cluster.local/ns/shop/sa/client\r\n";
    let (status, body) = raw_get(intruder.addr("outbound"), "/api/items", spoof).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(hits(), before);
    assert_eq!(
        denials().await - denied_before,
        7,
        "every refusal is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_between_sidecars_goes_over_mtls_too() {
    let tcp_service = "apiVersion: v1\nkind: Service\nmetadata: {name: tcp, namespace: shop}\nspec: {ports: [{name: tcp, port: 80, appProtocol: tcp}]}\n";
    let strict = STRICT
        .replace("echo-strict", "tcp-strict")
        .replace("name: echo}", "name: tcp}");
    let mesh = Mesh::start_secure(&[("tcp.yaml", tcp_service), ("strict.yaml", &strict)], &[]);
    let app = ferrymesh_test_support::upstream::tcp_echo().await;
    let _server = mesh.proxy(&ProxySpec::app("tcp-1", "tcp", app));
    let client = client_proxy(&mesh, "tcp.shop", 1).await;
    let mut tcp =
        ferrymesh_test_support::mesh::tunnel(client.addr("outbound"), "tcp.shop:80").await;
    let payload = b"\x00\x01binary\xffpayload";
    tcp.write_all(payload).await.unwrap();
    let mut back = vec![0; payload.len()];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back))
        .await
        .expect("the bytes came back through a Strict (mTLS-only) port")
        .unwrap();
    assert_eq!(&back, payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_anchors_rotate_with_old_and_new_served_together() {
    let s = secure(&[("strict.yaml", STRICT)]).await;
    let inbound = s.server.addr("inbound");
    let caller = "spiffe://cluster.local/ns/shop/sa/client";
    let current = mesh_ca(&s.mesh);
    // The next CA, not yet trusted.
    let next_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut next_params = rcgen::CertificateParams::default();
    next_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let next_pem = next_params.self_signed(&next_key).unwrap().pem();
    let next = rcgen::Issuer::from_ca_cert_pem(&next_pem, next_key).unwrap();
    let accepted = |issuer: &rcgen::Issuer<'static, rcgen::KeyPair>| {
        let cert = leaf(Some(issuer), caller, false);
        async move { probe(inbound, Some(cert)).await.is_ok() }
    };
    assert!(accepted(&current).await);
    assert!(!accepted(&next).await, "an unknown CA is refused");
    // Step 1 of a rotation: the next anchor joins the bundle; proxies trust both.
    let anchors = s.mesh.identity_dir().join("ca/anchors.pem");
    std::fs::write(&anchors, &next_pem).unwrap();
    ferrymesh_test_support::mesh::eventually(Duration::from_secs(10), || accepted(&next))
        .await
        .expect("the bundle reaches the proxy");
    assert!(accepted(&current).await, "the old anchor is still served");
    // The last step: the old one leaves (here the extra one, to show removal reaches proxies).
    std::fs::remove_file(&anchors).unwrap();
    ferrymesh_test_support::mesh::eventually(Duration::from_secs(10), || async {
        !accepted(&next).await
    })
    .await
    .expect("a removed anchor is no longer trusted");
    assert!(accepted(&current).await);
}

/// A port is never served without its policy: a connection that arrives before the controller
/// answered waits for the inbound policy, and the policy then decides (here: denied), rather
/// than the request going through unchecked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_before_the_inbound_policy_waits_for_it() {
    let deny = "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: echo-closed, namespace: shop}\n\
                spec:\n  targetRefs: [{group: \"\", kind: Service, name: echo}]\n  action: Deny\n  rules:\n  - to: {paths: [{type: PathPrefix, value: /}]}\n";
    let mut mesh = Mesh::start(&[("echo.yaml", &service("echo")), ("deny.yaml", deny)]);
    mesh.controller.kill();
    let echo = HttpEcho::start("echo-1").await;
    let server = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let inbound = server.addr("inbound");
    let mut call = tokio::spawn(async move {
        reqwest::Client::new()
            .get(format!("http://{inbound}/orders"))
            .header("host", "echo.shop")
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    // No controller: the connection waits (not served with defaults, not refused at once).
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut call)
            .await
            .is_err(),
        "answered without an inbound policy"
    );
    mesh.restart_controller();
    let status = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("answered once the policy arrived")
        .unwrap()
        .unwrap();
    assert_eq!(status, 403, "the policy that arrived decided");
    assert_eq!(echo.hits.load(Ordering::SeqCst), 0, "the app never saw it");
}
