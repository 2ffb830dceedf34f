//! The Ferrymesh data-plane proxy.
//!
//! Request flow (local mode):
//! app -> [`outbound`] explicit HTTP proxy or fixed-target listener -> authority resolved to a
//! service through [`discovery`] (lazy subscriptions on one stream to the controller) ->
//! [`balance`] picks an endpoint (P2C over peak-EWMA) -> [`pool`] connection to the peer's
//! [`inbound`] listener -> the peer's app on loopback. [`detect`] tells HTTP/1, HTTP/2 and opaque
//! bytes apart; [`admin`] serves `/live`, `/ready`, `/metrics` and `/config_dump`; [`app`] wires
//! it together and drains on shutdown.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod authz;
pub mod balance;
pub mod client;
pub mod config;
pub mod deadline;
pub mod detect;
pub mod discovery;
pub mod error;
pub mod explain;
pub mod fault;
pub mod flood;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod iptables;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod probes;
pub mod server;
pub mod trace;
pub mod transparent;
