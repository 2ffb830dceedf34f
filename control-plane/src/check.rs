//! Offline checks of a config folder (`ferryctl check DIR`): the controller's own loading, parser
//! and merge (so an error here is exactly the error the controller would report), then lints for
//! what users of resilience policies get wrong: retrying non-idempotent methods, attempts that
//! cannot fit in the request timeout, retries without a budget of their own, outlier detection
//! over too few endpoints, and breaker thresholds unreachable at the expected traffic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrymesh_proto::config::v1 as cfg;
use ferrymesh_proto::discovery::v1 as pb;

use crate::index::IndexHandle;
use crate::index::ServiceKey;
use crate::sources::files::FileSource;
use crate::sources::{Object, ParseError, parse_documents};

/// What a check found.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Files the controller would reject (each names file, object, field and rule).
    pub errors: Vec<ParseError>,
    /// Documents skipped or ignored (unknown kinds, duplicates).
    pub warnings: Vec<String>,
    /// Valid but probably not what was meant.
    pub lints: Vec<Lint>,
}

/// One lint finding.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Lint {
    /// The file of the object.
    pub file: String,
    /// `Kind namespace/name`.
    pub object: String,
    /// The field the finding is about, e.g. `spec.retry.methods`.
    pub field: String,
    /// A stable name for the rule, e.g. `retry-non-idempotent`.
    pub rule: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

impl std::fmt::Display for Lint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}: {}: [{}] {}",
            self.file, self.object, self.field, self.rule, self.message
        )
    }
}

/// What the checker cannot read from the folder itself.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Requests per second a service is expected to get (breaker thresholds are judged by it).
    pub rps: f64,
    /// Endpoints known from elsewhere (for example Deployment replicas), by service.
    pub replicas: BTreeMap<ServiceKey, usize>,
}

/// Checks every YAML file under `dir`.
///
/// # Errors
/// The folder cannot be read.
pub fn check(dir: &Path, expect: &Expect) -> anyhow::Result<Report> {
    let index = IndexHandle::new();
    FileSource::new(dir.to_owned(), index.clone()).load()?;
    let snapshot = index.snapshot();
    let mut report = Report {
        errors: snapshot.file_errors.clone(),
        warnings: snapshot.warnings.clone(),
        lints: Vec::new(),
    };
    let rejected: BTreeSet<&PathBuf> = report.errors.iter().map(|e| &e.file).collect();
    let mut lints = BTreeSet::new();
    for path in crate::sources::files::list(dir)? {
        if rejected.contains(&path) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if let Ok(parsed) = parse_documents(&path, &text) {
            for object in &parsed.objects {
                lint_object(object, &mut lints);
            }
        }
    }
    for (key, resource) in &snapshot.resources.client_policies {
        let Some(pb::resource::Body::ClientPolicy(policy)) = &resource.body else {
            continue;
        };
        let endpoints = snapshot
            .resources
            .endpoints
            .get(key)
            .and_then(|r| match &r.body {
                Some(pb::resource::Body::Endpoints(e)) => Some(e.endpoints.len()),
                _ => None,
            })
            .unwrap_or(0)
            + expect.replicas.get(&key.0).copied().unwrap_or(0);
        lint_merged(policy, endpoints, expect.rps, &mut lints);
    }
    report.lints = lints.into_iter().collect();
    Ok(report)
}

fn object_name(object: &Object) -> String {
    let meta = object.meta();
    format!("{} {}/{}", object.kind(), meta.namespace, meta.name)
}

fn file_of(object: &Object) -> String {
    object
        .meta()
        .file
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Lints on one policy as written.
fn lint_object(object: &Object, out: &mut BTreeSet<Lint>) {
    let Object::Policy(policy) = object else {
        return;
    };
    let Some(retry) = policy.resilience.as_ref().and_then(|r| r.retry.as_ref()) else {
        return;
    };
    let lint = |field: &str, rule, message: String| Lint {
        file: file_of(object),
        object: object_name(object),
        field: field.to_owned(),
        rule,
        message,
    };
    for method in &retry.methods {
        let message = match method.as_str() {
            "POST" => "POST is retried only when the request carries an Idempotency-Key header; \
                       make sure the service deduplicates on it"
                .to_owned(),
            "PATCH" | "CONNECT" => {
                format!("{method} is not idempotent: a retried {method} can take effect twice")
            }
            _ => continue,
        };
        out.insert(lint("spec.retry.methods", "retry-non-idempotent", message));
    }
    if retry.attempts > 0 {
        if policy.spec.pointer("/retry/budget").is_none() {
            out.insert(lint(
                "spec.retry.budget",
                "retry-without-budget",
                "retries without a budget of their own: the default (ratio 0.2, 10/s over \
                 10s) caps them; say so explicitly so readers know the ceiling"
                    .to_owned(),
            ));
        } else {
            let ratio = policy
                .resilience
                .as_ref()
                .and_then(|r| r.budget)
                .map_or(0.0, |b| b.ratio);
            if ratio >= 1.0 {
                out.insert(lint(
                    "spec.retry.budget.ratio",
                    "retry-budget-unbounded",
                    format!(
                        "a budget ratio of {ratio} lets retries at least double the load on a \
                         failing service; 0.2 is the usual ceiling"
                    ),
                ));
            }
        }
    }
}

fn duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| Duration::try_from(*d).ok())
}

/// The proxies' default request timeout.
const DEFAULT_REQUEST: Duration = Duration::from_secs(15);

/// Lints on the merged policy of one service port.
fn lint_merged(policy: &cfg::ClientPolicy, endpoints: usize, rps: f64, out: &mut BTreeSet<Lint>) {
    let source = |section: &str| {
        policy.section_sources.get(section).map_or_else(
            || (String::new(), String::new()),
            |r| {
                (
                    r.file.clone(),
                    format!("{} {}/{}", r.kind, r.namespace, r.name),
                )
            },
        )
    };
    let lint = |section: &str, field: &str, rule, message: String| {
        let (file, object) = source(section);
        Lint {
            file,
            object,
            field: field.to_owned(),
            rule,
            message,
        }
    };
    let service = policy
        .service
        .as_ref()
        .map(|s| format!("{}/{}:{}", s.namespace, s.name, policy.port))
        .unwrap_or_default();
    if let Some(retry) = policy.retry.as_ref().filter(|r| r.attempts > 0) {
        let timeouts = policy.timeouts.as_ref();
        let request =
            duration(timeouts.and_then(|t| t.request.as_ref())).unwrap_or(DEFAULT_REQUEST);
        let per_try = duration(timeouts.and_then(|t| t.per_try.as_ref())).filter(|d| !d.is_zero());
        let tries = retry.attempts + 1;
        match per_try {
            Some(per_try) if !request.is_zero() && per_try * tries > request => {
                out.insert(lint(
                    "retry",
                    "spec.retry.attempts",
                    "retry-exceeds-timeout",
                    format!(
                        "for {service}: {tries} attempts x perTry {per_try:?} = {:?} exceeds the \
                         request timeout {request:?}: the last attempts can never finish (the \
                         proxy skips them)",
                        per_try * tries
                    ),
                ));
            }
            None => {
                out.insert(lint(
                    "retry",
                    "spec.timeouts.perTry",
                    "retry-without-per-try",
                    format!(
                        "for {service}: retries without timeouts.perTry: a hanging attempt uses \
                         the whole request timeout ({request:?}) and is never retried"
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    if policy.outlier.is_some() && endpoints < 3 {
        out.insert(lint(
            "outlierDetection",
            "spec.outlierDetection",
            "outlier-few-endpoints",
            format!(
                "for {service}: outlier detection over {endpoints} endpoint(s): ejecting one \
                 removes {}% of the capacity and leaves little to compare against; it needs 3 \
                 or more",
                100_usize.checked_div(endpoints).unwrap_or(100)
            ),
        ));
    }
    if let Some(b) = &policy.breaker
        && b.failure_ratio > 0.0
        && b.minimum_requests > 0
    {
        let window = duration(b.window.as_ref()).unwrap_or(Duration::from_secs(10));
        let needed = f64::from(b.minimum_requests) / window.as_secs_f64().max(f64::EPSILON);
        if needed > rps {
            out.insert(lint(
                "circuitBreaker",
                "spec.circuitBreaker.tripWhen.minimumRequests",
                "breaker-unreachable",
                format!(
                    "for {service}: failureRatio needs {} requests in {window:?} ({needed:.1}/s); \
                     at the expected {rps}/s it never trips (lower minimumRequests, lengthen the \
                     window, or rely on consecutiveFailures)",
                    b.minimum_requests
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests;
