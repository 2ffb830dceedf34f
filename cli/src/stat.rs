//! `ferryctl stat [SERVICE] [--window 2s] [--watch] [--total] [--json]`: the golden metrics of
//! each service, as its own proxies see them (inbound: what callers got), like `linkerd viz
//! stat`: requests per second, success rate, p50 / p95 / p99 latency, and the retries callers
//! sent to it. Read from every proxy's `/metrics`, twice, a window apart (or once, since the
//! proxies started, with `--total`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

/// What to show.
#[derive(Debug, Clone, clap::Args)]
pub struct StatArgs {
    /// Only this service (`name` or `namespace/name`).
    pub service: Option<String>,
    /// The window the rates and percentiles cover, e.g. `2s`.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub window: Duration,
    /// Everything since the proxies started instead of a window (rps over that time).
    #[arg(long)]
    pub total: bool,
    /// Print again every window until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// As JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    ferrymesh_proto::duration::parse(text).map_err(|e| e.to_string())
}

/// One service's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// `namespace/name`.
    pub service: String,
    /// Requests answered in the window (inbound).
    pub requests: f64,
    /// Requests per second (`None` with `--total`).
    pub rps: Option<f64>,
    /// Share not answered 5xx, 0..1 (`None` without requests).
    pub success: Option<f64>,
    /// Latency percentiles, milliseconds (bucket upper bounds, interpolated).
    pub p50_ms: Option<f64>,
    /// 95th.
    pub p95_ms: Option<f64>,
    /// 99th.
    pub p99_ms: Option<f64>,
    /// Retries callers sent to it.
    pub retries: f64,
}

/// Counters summed over every proxy: per service, requests by status class, latency buckets,
/// retries.
#[derive(Debug, Default, Clone)]
struct Totals {
    requests: BTreeMap<String, (f64, f64)>,
    buckets: BTreeMap<String, BTreeMap<u64, f64>>,
    retries: BTreeMap<String, f64>,
}

fn value(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Counter(x)
        | prometheus_parse::Value::Gauge(x)
        | prometheus_parse::Value::Untyped(x) => *x,
        _ => 0.0,
    }
}

/// A bucket bound (seconds) in microseconds, as an ordered key (`+Inf` last).
fn bound_key(le: f64) -> u64 {
    if !le.is_finite() {
        return u64::MAX;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // small, positive
    let us = (le * 1_000_000.0).round() as u64;
    us
}

impl Totals {
    fn add(&mut self, text: &str) -> anyhow::Result<()> {
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
        for s in &scrape.samples {
            let service = s.labels.get("service").unwrap_or_default().to_owned();
            let inbound = s.labels.get("direction") == Some("inbound");
            match s.metric.as_str() {
                "ferrymesh_proxy_requests_total" if inbound => {
                    let e = self.requests.entry(service).or_default();
                    e.0 += value(&s.value);
                    if s.labels.get("status_class") != Some("5xx") {
                        e.1 += value(&s.value);
                    }
                }
                "ferrymesh_proxy_request_duration_seconds" if inbound => {
                    if let prometheus_parse::Value::Histogram(counts) = &s.value {
                        let buckets = self.buckets.entry(service).or_default();
                        for c in counts {
                            *buckets.entry(bound_key(c.less_than)).or_default() += c.count;
                        }
                    }
                }
                "ferrymesh_proxy_retries_total" => {
                    *self.retries.entry(service).or_default() += value(&s.value);
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn minus(&self, earlier: &Totals) -> Totals {
        let mut out = self.clone();
        for (k, (a, b)) in &earlier.requests {
            if let Some(e) = out.requests.get_mut(k) {
                e.0 -= a;
                e.1 -= b;
            }
        }
        for (k, bs) in &earlier.buckets {
            if let Some(e) = out.buckets.get_mut(k) {
                for (le, v) in bs {
                    if let Some(x) = e.get_mut(le) {
                        *x -= v;
                    }
                }
            }
        }
        for (k, v) in &earlier.retries {
            if let Some(x) = out.retries.get_mut(k) {
                *x -= v;
            }
        }
        out
    }
}

/// The `q` quantile of cumulative `buckets` (microsecond bounds -> counts), in ms:
/// interpolated within the bucket it falls in (Prometheus's `histogram_quantile`).
fn quantile(buckets: &BTreeMap<u64, f64>, q: f64) -> Option<f64> {
    let total = *buckets.get(&u64::MAX)?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0u64, 0.0);
    for (&le, &count) in buckets {
        if count >= rank {
            if le == u64::MAX {
                #[allow(clippy::cast_precision_loss)]
                return Some(lower.0 as f64 / 1_000.0);
            }
            let within = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                1.0
            };
            #[allow(clippy::cast_precision_loss)]
            let ms = (lower.0 as f64 + (le - lower.0) as f64 * within) / 1_000.0;
            return Some(ms);
        }
        lower = (le, count);
    }
    None
}

fn rows(t: &Totals, seconds: f64, only: Option<&str>) -> Vec<Row> {
    t.requests
        .iter()
        .filter(|(s, _)| only.is_none_or(|o| *s == o || s.ends_with(&format!("/{o}"))))
        .map(|(service, (requests, ok))| {
            let buckets = t.buckets.get(service).cloned().unwrap_or_default();
            Row {
                service: service.clone(),
                requests: *requests,
                rps: (seconds > 0.0).then(|| requests / seconds),
                success: (*requests > 0.0).then(|| ok / requests),
                p50_ms: quantile(&buckets, 0.5),
                p95_ms: quantile(&buckets, 0.95),
                p99_ms: quantile(&buckets, 0.99),
                retries: t.retries.get(service).copied().unwrap_or_default(),
            }
        })
        .collect()
}

async fn totals(client: &reqwest::Client, proxies: &[String]) -> anyhow::Result<Totals> {
    let mut t = Totals::default();
    for health in proxies {
        let Ok(rsp) = client.get(format!("http://{health}/metrics")).send().await else {
            continue; // a proxy that just stopped
        };
        t.add(&rsp.text().await?)
            .with_context(|| format!("parsing the metrics of {health}"))?;
    }
    Ok(t)
}

fn render(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<24} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8}\n",
        "SERVICE", "REQUESTS", "RPS", "SUCCESS", "P50 ms", "P95 ms", "P99 ms", "RETRIES"
    );
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    for r in rows {
        let _ = writeln!(
            out,
            "{:<24} {:>9.0} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8.0}",
            r.service,
            r.requests,
            r.rps.map_or("-".to_owned(), |v| format!("{v:.1}")),
            r.success
                .map_or("-".to_owned(), |s| format!("{:.1}%", s * 100.0)),
            opt(r.p50_ms),
            opt(r.p95_ms),
            opt(r.p99_ms),
            r.retries
        );
    }
    out
}

/// Prints the figures (again every window with `--watch`).
///
/// # Errors
/// The mesh does not answer, or a proxy's metrics do not parse.
pub async fn run(state_dir: &Path, args: &StatArgs) -> anyhow::Result<()> {
    let client = crate::state::http_client()?;
    loop {
        let status = crate::state::status(state_dir).await?;
        let proxies: Vec<String> = status["proxies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["listeners"]["health"].as_str().map(str::to_owned))
            .collect();
        let (t, seconds) = if args.total {
            (totals(&client, &proxies).await?, 0.0)
        } else {
            let first = totals(&client, &proxies).await?;
            tokio::time::sleep(args.window).await;
            let second = totals(&client, &proxies).await?;
            (second.minus(&first), args.window.as_secs_f64())
        };
        let rows = rows(&t, seconds, args.service.as_deref());
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print!("{}", render(&rows));
        }
        if !args.watch {
            return Ok(());
        }
        println!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        // 100 requests: 50 under 1ms, 45 more under 5ms, 5 more under 10ms.
        let b: BTreeMap<u64, f64> = [
            (1_000, 50.0),
            (5_000, 95.0),
            (10_000, 100.0),
            (u64::MAX, 100.0),
        ]
        .into_iter()
        .collect();
        assert_eq!(quantile(&b, 0.5), Some(1.0));
        assert_eq!(quantile(&b, 0.95), Some(5.0));
        let p99 = quantile(&b, 0.99).unwrap();
        assert!((p99 - 9.0).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&BTreeMap::new(), 0.5), None);
    }
}
