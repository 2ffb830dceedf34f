//! `make bench`: the upstream ([`load`]), the standard load generators ([`tools`]), the peer
//! proxies ([`peers`]) and process accounting ([`procstat`]) behind the `ferrymesh-bench`
//! binary.

pub mod load;
pub mod peers;
pub mod procstat;
pub mod tools;
