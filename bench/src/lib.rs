//! `make bench`: the load generator ([`load`]), the peer proxies ([`peers`]) and process
//! accounting ([`procstat`]) behind the `ferrymesh-bench` binary.

pub mod load;
pub mod peers;
pub mod procstat;
