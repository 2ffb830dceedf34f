//! Generates the Rust code for the Ferrymesh protos with protox (a protobuf compiler in Rust),
//! so building needs no system `protoc`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/ferrymesh/config/v1/common.proto",
    "proto/ferrymesh/config/v1/fault.proto",
    "proto/ferrymesh/config/v1/endpoints.proto",
    "proto/ferrymesh/config/v1/client.proto",
    "proto/ferrymesh/config/v1/inbound.proto",
    "proto/ferrymesh/discovery/v1/discovery.proto",
    "proto/ferrymesh/identity/v1/identity.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .out_dir(&out)
        // NOTE: BTreeMap keeps encoding deterministic, so a resource's version (a hash of its
        // bytes) is the same on every controller replica and every run.
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
