//! `ferryctl`, the Ferrymesh command line: thin commands over the controller's and proxies'
//! admin APIs.
//!
//! - [`up`]: the local mesh (controller, demo shop with sidecars, storefront entry).
//! - [`status`]: what the controller knows. [`chaos`]: break an instance on purpose.
//! - [`state`]: the state folder the commands share.

pub mod breaker;
pub mod chaos;
pub mod check;
pub mod explain;
pub mod inject;
pub mod stat;
pub mod state;
pub mod status;
pub mod tap;
pub mod up;
