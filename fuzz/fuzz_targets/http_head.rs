//! What the proxy itself does with a request head: the target it routes on (any authority
//! string) and the hop-by-hop headers it strips (any header lines).
#![no_main]

use ferrymesh_proxy::http::strip_hop_by_hop;
use ferrymesh_proxy::outbound::Target;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.lines();
    if let Some(authority) = lines.next()
        && let Some(t) = Target::parse(authority, "shop")
        && let Some(name) = t.name
    {
        // A mesh name always carries a port.
        assert!(
            name.rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok()),
            "{name}"
        );
    }
    let mut headers = http::HeaderMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':')
            && let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.trim().as_bytes()),
                http::HeaderValue::from_str(v.trim()),
            )
        {
            headers.append(k, v);
        }
    }
    strip_hop_by_hop(&mut headers);
    assert!(!headers.contains_key(http::header::CONNECTION));
    assert!(!headers.contains_key(http::header::TRANSFER_ENCODING));
});
