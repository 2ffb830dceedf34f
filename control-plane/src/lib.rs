//! The Ferrymesh controller: watches the platform and streams config to proxies.
//!
//! Flow: a source ([`sources::files`] locally, Kubernetes later) delivers typed objects ->
//! [`index`] keeps the last good objects plus the workloads proxies registered, and derives a
//! snapshot of resources (endpoints, client and inbound policy) -> [`grpc`] streams each proxy
//! the resources it subscribed to, as deltas with ACK/NACK -> [`admin`] shows it all as JSON.

pub mod admin;
pub mod check;
// KubeSchema re-emits each type in a private module for its schema; those copies are
// "unreachable". Each printer column repeats `type_`, which clippy takes for a duplicate.
#[allow(
    unreachable_pub,
    clippy::duplicated_attributes,
    clippy::struct_field_names
)]
pub mod crd;
pub mod grpc;
pub mod guard;
pub mod identity;
pub mod index;
pub mod inject;
pub mod metrics;
pub mod model;
pub mod run;
pub mod sources;
pub mod webhook;
