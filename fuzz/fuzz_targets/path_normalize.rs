//! Path normalisation for authorization: a normalised path has no dot segments or empty
//! segments left, and normalising it again changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = ferrymesh_proxy::authz::normalize(path) {
        assert!(n.starts_with('/'), "{n}");
        assert!(
            !n.contains("/../") && !n.ends_with("/..") && !n.contains("/./"),
            "{n}"
        );
        assert_eq!(
            ferrymesh_proxy::authz::normalize(&n).as_deref(),
            Ok(n.as_str())
        );
    }
});
