//! Test helpers shared by the workspace's integration tests: real processes on loopback.
//!
//! - [`process`]: find the workspace's binaries, start them, read the address line they print,
//!   stop them with SIGTERM or SIGKILL.
//! - [`upstream`]: in-process apps: an HTTP echo server (HTTP/1.1 and h2c) and a gRPC echo
//!   service (unary, server streaming, bidi), each answer naming its instance.
//! - [`mesh`]: a controller on a temporary config folder plus sidecar proxies in front of apps.

pub mod kube_api;
pub mod layering;
pub mod mesh;
pub mod netns;
pub mod otlp;
pub mod process;
pub mod sim;
pub mod upstream;

/// Generated code of the test gRPC service.
#[allow(
    clippy::pedantic,
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms
)]
pub mod echo_pb {
    include!(concat!(env!("OUT_DIR"), "/ferrymesh.test.v1.rs"));
}

/// Discovery messages tests build often.
pub mod nodes {
    use ferrymesh_proto::config::v1 as cfg;
    use ferrymesh_proto::discovery::v1 as pb;

    /// The first-message node of a local proxy fronting `instance` of `service` (namespace
    /// `shop`), reachable at 127.0.0.1:`port`.
    pub fn local(instance: &str, service: &str, port: u32, ready: bool) -> pb::Node {
        pb::Node {
            workload: format!("shop/{instance}"),
            namespace: "shop".into(),
            local_workload: Some(pb::LocalWorkload {
                service: Some(cfg::ServiceRef {
                    name: service.into(),
                    namespace: "shop".into(),
                }),
                instance: instance.into(),
                inbound: Some(cfg::SocketAddr {
                    ip: "127.0.0.1".into(),
                    port,
                }),
                ready,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}
