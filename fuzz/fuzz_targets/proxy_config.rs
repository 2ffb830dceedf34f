//! The proxy's YAML config: any text is parsed or refused with a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ferrymesh_proxy::config::Config::parse(text, |_| None);
    }
});
