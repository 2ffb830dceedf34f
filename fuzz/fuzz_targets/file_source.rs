//! The controller's file source (and, through it, every Kubernetes object): any YAML text is
//! parsed into objects or refused with file, object and field, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ferrymesh_controller::sources::parse_documents(
            std::path::Path::new("mesh/fuzz.yaml"),
            text,
        );
    }
});
