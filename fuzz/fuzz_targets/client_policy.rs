//! A client policy as it arrives on Discovery (protobuf bytes): decoded and validated, or
//! refused, never a panic.
#![no_main]

use ferrymesh_proto::config::v1 as cfg;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    if let Ok(pb) = cfg::ClientPolicy::decode(data) {
        let _ = ferrymesh_proxy::policy::ClientPolicy::try_from(pb);
    }
    if let Ok(pb) = cfg::InboundPolicy::decode(data) {
        let _ = ferrymesh_proxy::policy::InboundPolicy::try_from(pb);
    }
});
