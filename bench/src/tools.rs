//! The standard load generators `make bench` drives, as separate processes: oha (crates.io)
//! at a fixed arrival rate with its latency correction (latency from when each request was
//! due, so a stalled proxy cannot hide its queue), and wrk (Debian) for the maximum
//! throughput over keep-alive connections. Their own reports are parsed; nothing here
//! measures time itself.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

/// What oha reported for a fixed-rate run.
#[derive(Debug, Clone, Copy)]
pub struct FixedRate {
    /// Latency quantiles, milliseconds.
    pub p50: f64,
    /// 99th percentile, ms.
    pub p99: f64,
    /// 99.9th percentile, ms.
    pub p999: f64,
    /// Requests completed.
    pub requests: u64,
    /// Requests that failed or got a status other than 200.
    pub errors: u64,
}

/// What wrk reported for a saturation run.
#[derive(Debug, Clone, Copy)]
pub struct Saturation {
    /// Requests answered 2xx/3xx per second.
    pub rps: f64,
    /// Requests answered 2xx/3xx.
    pub requests: u64,
    /// Socket errors and non-2xx/3xx answers.
    pub errors: u64,
}

/// The `Host` every request names. Spelt `Host`: wrk replaces its own only for that exact
/// spelling and otherwise sends two, which a conforming proxy answers 400 (RFC 9112 3.2).
const HOST: &str = "Host: upstream.bench";

/// The oha binary: `$OHA`, else on `PATH`, else cargo's bin folder.
fn oha() -> String {
    if let Ok(p) = std::env::var("OHA") {
        return p;
    }
    let home = std::env::var("CARGO_HOME")
        .or_else(|_| std::env::var("HOME").map(|h| format!("{h}/.cargo")))
        .unwrap_or_default();
    let in_cargo = format!("{home}/bin/oha");
    if std::path::Path::new(&in_cargo).exists() {
        in_cargo
    } else {
        "oha".to_owned()
    }
}

/// `rate` requests per second for `duration` on `connections` keep-alive connections.
///
/// # Errors
/// oha cannot run or its report cannot be read.
pub fn fixed_rate(
    addr: SocketAddr,
    rate: u32,
    duration: Duration,
    connections: u32,
) -> anyhow::Result<FixedRate> {
    let out = Command::new(oha())
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "--latency-correction",
        ])
        .args(["-z", &format!("{}s", duration.as_secs())])
        .args(["-q", &rate.to_string()])
        .args(["-c", &connections.to_string()])
        .args(["-H", HOST])
        .arg(format!("http://{addr}/ping"))
        .output()
        .context("running oha (bench/setup.sh installs it)")?;
    if !out.status.success() {
        bail!("oha failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading oha's JSON report")?;
    let q = |k: &str| report["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let statuses = report["statusCodeDistribution"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let ok = statuses
        .get("200")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let all_statuses: u64 = statuses
        .values()
        .filter_map(serde_json::Value::as_u64)
        .sum();
    let failed: u64 = report["errorDistribution"].as_object().map_or(0, |e| {
        e.values().filter_map(serde_json::Value::as_u64).sum()
    });
    Ok(FixedRate {
        p50: q("p50"),
        p99: q("p99"),
        p999: q("p99.9"),
        requests: ok,
        errors: failed + (all_statuses - ok),
    })
}

/// wrk with `connections` connections on 2 threads for `duration`.
///
/// # Errors
/// wrk cannot run or its report cannot be read.
pub fn saturate(
    addr: SocketAddr,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<Saturation> {
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{connections}")])
        .arg(format!("-d{}s", duration.as_secs()))
        .args(["-H", HOST])
        .arg(format!("http://{addr}/ping"))
        .output()
        .context("running wrk (bench/setup.sh installs it)")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// Reads wrk's text report.
fn parse_wrk(text: &str) -> anyhow::Result<Saturation> {
    let number_after = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.trim_end_matches(',').parse().ok())
    };
    let all_rps = number_after("Requests/sec:").context("no Requests/sec in wrk's report")?;
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .context("no request count in wrk's report")?;
    let non_2xx = number_after("Non-2xx or 3xx responses:").unwrap_or(0.0);
    let socket: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map_or(0.0, |rest| {
            rest.split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<f64>().ok())
                .sum()
        });
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // counts
    let errors = (non_2xx + socket) as u64;
    // Only answered requests count towards throughput: a fast 400 or a reset is not served.
    #[allow(clippy::cast_precision_loss)] // request counts are far below 2^52
    let rps = all_rps * requests.saturating_sub(errors) as f64 / requests.max(1) as f64;
    Ok(Saturation {
        rps,
        requests: requests.saturating_sub(errors),
        errors,
    })
}

/// The median of `values` (NaN when empty).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        f64::midpoint(values[mid - 1], values[mid])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_reports_are_read() {
        let text = "Running 5s test @ http://127.0.0.1:1/ping\n  2 threads and 32 connections\n\
                    \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
                    \x20   Latency   1.10ms  200.00us   5.00ms   90.00%\n\
                    \x20 123456 requests in 5.00s, 20.00MB read\n\
                    \x20 Socket errors: connect 0, read 2, write 0, timeout 1\n\
                    \x20 Non-2xx or 3xx responses: 4\n\
                    Requests/sec:  24691.20\nTransfer/sec:      4.00MB\n";
        let s = parse_wrk(text).unwrap();
        assert!((s.rps - 24_691.2 * 123_449.0 / 123_456.0).abs() < 0.01);
        assert_eq!(s.requests, 123_449, "answered requests only");
        assert_eq!(s.errors, 7);
        // Every answer a 400 (two Host headers): nothing was served.
        let refused = text.replace(
            "Non-2xx or 3xx responses: 4",
            "Non-2xx or 3xx responses: 123453",
        );
        let s = parse_wrk(&refused).unwrap();
        assert!(s.rps.abs() < f64::EPSILON);
        assert_eq!(s.requests, 0);
        assert!(parse_wrk("nothing").is_err());
    }

    #[test]
    fn medians() {
        assert!((median(&mut [3.0, 1.0, 2.0]) - 2.0).abs() < f64::EPSILON);
        assert!((median(&mut [4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < f64::EPSILON);
        assert!(median(&mut []).is_nan());
    }
}
