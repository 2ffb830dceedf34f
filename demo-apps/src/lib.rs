//! The Ferrymesh demo shop: a small set of services with chaos knobs, for learning what goes
//! wrong between microservices and how each mitigation changes it.
//!
//! - [`chaos`]: per-instance knobs (error rate, latency, hangs, readiness, liveness).
//! - [`services`]: storefront, catalog, pricing, inventory, reviews, orders, payments.

pub mod chaos;
pub mod services;
