//! Ferrymesh control-plane API, generated from `proto/` at build time.
//!
//! - [`discovery::v1`]: the Discovery service (one delta stream per proxy, ACK/NACK by nonce).
//! - [`config::v1`]: the resources it carries (endpoints, client and inbound policy).
//! - [`identity::v1`]: the certificate authority (`Certify`).
//! - [`spiffe_ids`]: the workload identities a certificate names (both sides check them).
#![allow(
    clippy::pedantic,
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms
)]

/// `google.rpc`: the standard gRPC error model.
#[allow(
    clippy::all,
    clippy::pedantic,
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms
)]
pub mod google {
    /// `google.rpc.Status`.
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

/// Ferrymesh packages (generated code).
#[allow(
    clippy::all,
    clippy::pedantic,
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms
)]
pub mod ferrymesh {
    /// `ferrymesh.config.*`.
    pub mod config {
        /// `ferrymesh.config.v1`.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/ferrymesh.config.v1.rs"));
        }
    }
    /// `ferrymesh.discovery.*`.
    pub mod discovery {
        /// `ferrymesh.discovery.v1`.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/ferrymesh.discovery.v1.rs"));
        }
    }
    /// `ferrymesh.identity.*`.
    pub mod identity {
        /// `ferrymesh.identity.v1`.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/ferrymesh.identity.v1.rs"));
        }
    }
}

pub use ferrymesh::{config, discovery, identity};

pub mod duration;
pub mod exposition;
pub mod ports;

/// The SPIFFE ids a DER certificate names (its `spiffe://` URI SANs); none when it does not
/// parse.
#[must_use]
pub fn spiffe_ids(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                Some((*u).to_owned())
            }
            _ => None,
        })
        .collect()
}
