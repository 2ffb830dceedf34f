//! Durations in the Gateway API format (GEP-2257): one to four `<number><unit>` parts, units
//! `h`, `m`, `s`, `ms`, numbers of at most 5 digits, e.g. `250ms`, `1h30m`, `0s`. Shared by the
//! controller (policy files, CRDs) and the proxy (ProxyConfig), so both read times the same way.

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Nothing to parse.
    #[error("empty duration (expected e.g. \"250ms\", \"1h30m\", \"0s\")")]
    Empty,
    /// A part has no digits, more than 5, or an unknown unit.
    #[error(
        "invalid duration {0:?} (expected 1-4 parts of <up to 5 digits><h|m|s|ms>, e.g. \"1h30m\")"
    )]
    Invalid(String),
}

/// Parses a GEP-2257 duration.
///
/// # Errors
/// [`DurationError`] when the text is not in that format.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let invalid = || DurationError::Invalid(text.to_owned());
    let bytes = text.as_bytes();
    let mut total = Duration::ZERO;
    let mut i = 0;
    let mut parts = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &text[start..i];
        if digits.is_empty() || digits.len() > 5 {
            return Err(invalid());
        }
        let n: u64 = digits.parse().map_err(|_| invalid())?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        total += match &text[unit_start..i] {
            "h" => Duration::from_secs(n * 3600),
            "m" => Duration::from_secs(n * 60),
            "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            _ => return Err(invalid()),
        };
        parts += 1;
        if parts > 4 {
            return Err(invalid());
        }
    }
    Ok(total)
}

/// Formats a duration in the same format (the shortest exact form), for status and dumps.
pub fn format(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gateway_api_durations() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse("1h1m1s1ms"), Ok(Duration::from_millis(3_661_001)));
    }

    #[test]
    fn rejects_other_forms() {
        for bad in [
            "",
            "5",
            "s",
            "1.5s",
            "1d",
            "123456s",
            "1h1m1s1ms1ms",
            "-1s",
            " 1s",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn formats_round_trip() {
        for text in ["250ms", "1h30m", "0s", "10s", "1h1m1s1ms"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
    }
}
