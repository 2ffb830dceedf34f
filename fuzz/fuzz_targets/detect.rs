//! Protocol detection on the first bytes of a connection: any bytes, a decision or "more".
#![no_main]

use ferrymesh_proxy::detect::{Detected, decide};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Deciding on a prefix never contradicts deciding on the whole.
    if let Some(d) = decide(data) {
        for end in data.len()..data.len().min(64) {
            assert_eq!(decide(&data[..end]).map(|x| x == d), Some(true));
        }
        let _ = matches!(d, Detected::Opaque);
    }
});
