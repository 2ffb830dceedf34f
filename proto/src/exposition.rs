//! Metrics in the format the scraper asks for. `prometheus-client` writes OpenMetrics; a
//! scrape whose `Accept` does not name `application/openmetrics-text` (curl, older Prometheus
//! servers, most tools) gets the Prometheus text format 0.0.4 instead, where a counter's
//! `HELP` and `TYPE` lines name the `_total` series and there is no `# EOF` or `# UNIT`, so
//! `promtool check metrics` passes on both.

/// OpenMetrics' content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format's content type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type and body for a scrape with this `Accept` header.
pub fn negotiate(accept: Option<&str>, openmetrics: String) -> (&'static str, String) {
    let wants_openmetrics = accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut params = part.split(';');
            let media = params.next().unwrap_or("").trim();
            let q_zero = params.any(|p| p.trim().replace(' ', "") == "q=0");
            media.eq_ignore_ascii_case("application/openmetrics-text") && !q_zero
        })
    });
    if wants_openmetrics {
        (OPENMETRICS, openmetrics)
    } else {
        (PROMETHEUS_TEXT, to_prometheus_text(&openmetrics))
    }
}

/// Rewrites OpenMetrics text as the Prometheus text format 0.0.4.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, kind)| kind.trim() == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let tail = match tail.trim() {
                "unknown" if *prefix == "# TYPE " => "untyped",
                "info" | "stateset" if *prefix == "# TYPE " => "gauge",
                "gaugehistogram" if *prefix == "# TYPE " => "histogram",
                _ => tail,
            };
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
                .or_else(|| (tail != rest).then(|| format!("{prefix}{name} {tail}")))
        });
        match rewritten {
            Some(l) => out.push_str(&l),
            // An exemplar (` # {...}`) is OpenMetrics only.
            None => out.push_str(line.split(" # {").next().unwrap_or(line)),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OM: &str = "# HELP ferrymesh_proxy_requests Requests.\n# TYPE ferrymesh_proxy_requests counter\n\
        ferrymesh_proxy_requests_total{status=\"2xx\"} 3\n# HELP up Up.\n# TYPE up gauge\n# UNIT up seconds\nup 1\n# EOF\n";

    #[test]
    fn counters_are_named_by_their_total_series_in_the_text_format() {
        let text = to_prometheus_text(OM);
        assert_eq!(
            text,
            "# HELP ferrymesh_proxy_requests_total Requests.\n# TYPE ferrymesh_proxy_requests_total counter\n\
             ferrymesh_proxy_requests_total{status=\"2xx\"} 3\n# HELP up Up.\n# TYPE up gauge\nup 1\n"
        );
    }

    #[test]
    fn the_accept_header_picks_the_format() {
        let prometheus =
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(prometheus), OM.into()).0, OPENMETRICS);
        assert_eq!(negotiate(None, OM.into()).0, PROMETHEUS_TEXT);
        assert_eq!(negotiate(Some("*/*"), OM.into()).0, PROMETHEUS_TEXT);
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0"), OM.into()).0,
            PROMETHEUS_TEXT
        );
    }
}
