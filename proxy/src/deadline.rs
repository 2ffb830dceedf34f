//! Deadline propagation: a caller's remaining budget arrives as `grpc-timeout` (gRPC) or
//! `ferrymesh-timeout: <milliseconds>` (HTTP); the outbound proxy shortens its own request
//! timeout to it and writes the time left on every attempt it sends, so each hop only has what
//! remains (relative times, no clock sync needed).

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

/// The HTTP form of the budget: whole milliseconds left.
pub static FERRYMESH_TIMEOUT: HeaderName = HeaderName::from_static("ferrymesh-timeout");
/// The gRPC form (PROTOCOL-HTTP2.md: up to 8 digits and a unit H, M, S, m, u, n).
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Parses a `grpc-timeout` value.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a `grpc-timeout` value (milliseconds, or seconds when that does not fit 8 digits).
pub fn format_grpc_timeout(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 100_000_000 {
        format!("{ms}m")
    } else {
        format!("{}S", d.as_secs().min(99_999_999))
    }
}

/// The budget the caller sent, if any (the smaller of the two forms when both are present).
pub fn incoming(headers: &HeaderMap) -> Option<Duration> {
    let grpc = headers
        .get(&GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let http = headers
        .get(&FERRYMESH_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis);
    match (grpc, http) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Writes the time left into the request headers, in the form the request already uses
/// (`grpc-timeout` for gRPC, `ferrymesh-timeout` otherwise).
pub fn write(headers: &mut HeaderMap, left: Duration) {
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        if let Ok(v) = HeaderValue::from_str(&format_grpc_timeout(left)) {
            headers.insert(&GRPC_TIMEOUT, v);
        }
    } else {
        headers.insert(
            &FERRYMESH_TIMEOUT,
            HeaderValue::from(u64::try_from(left.as_millis()).unwrap_or(u64::MAX)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_format() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_hours(1)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        for bad in ["", "5", "m", "123456789m", "1.5S", "10x", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(format_grpc_timeout(Duration::from_millis(1234)), "1234m");
        assert_eq!(
            parse_grpc_timeout(&format_grpc_timeout(Duration::from_secs(200_000))),
            Some(Duration::from_secs(200_000))
        );
    }

    #[test]
    fn the_smaller_budget_wins_and_is_written_in_the_requests_form() {
        let mut h = HeaderMap::new();
        h.insert(&GRPC_TIMEOUT, HeaderValue::from_static("3S"));
        h.insert(&FERRYMESH_TIMEOUT, HeaderValue::from_static("1500"));
        assert_eq!(incoming(&h), Some(Duration::from_millis(1500)));
        let mut grpc = HeaderMap::new();
        grpc.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        write(&mut grpc, Duration::from_millis(42));
        assert_eq!(grpc[&GRPC_TIMEOUT], "42m");
        let mut plain = HeaderMap::new();
        write(&mut plain, Duration::from_millis(42));
        assert_eq!(plain[&FERRYMESH_TIMEOUT], "42");
    }
}
