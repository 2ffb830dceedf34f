//! `ferryctl check [DIR]`: validates a folder of mesh YAML offline with the controller's own
//! parser and merge (the same errors, naming file, object, field and rule), then lints what
//! users get wrong. Replicas of the folder's Deployments count as endpoints.

use std::path::{Path, PathBuf};

use anyhow::bail;
use ferrymesh_controller::check::{Expect, Report, check};
use ferrymesh_controller::index::ServiceKey;

/// What to check.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The folder (as served by the controller's file source).
    #[arg(default_value = "demo-apps/mesh")]
    pub dir: PathBuf,
    /// Requests per second each service is expected to get (breaker thresholds are judged by it).
    #[arg(long, default_value_t = 1.0)]
    pub rps: f64,
    /// Fail on lint findings too, not only on errors.
    #[arg(long)]
    pub strict: bool,
    /// The report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Check the Kubernetes install instead of a folder: CRDs, controller, webhook, proxies.
    #[arg(long)]
    pub kube: bool,
    /// With `--kube`: a kubeconfig (default: KUBECONFIG, then ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
}

pub mod kube;

/// Builds the report.
///
/// # Errors
/// The folder or a Deployment in it cannot be read.
pub fn report(dir: &Path, rps: f64) -> anyhow::Result<Report> {
    let replicas = crate::up::read_workloads(dir)?.into_iter().fold(
        std::collections::BTreeMap::new(),
        |mut m, w| {
            *m.entry(ServiceKey {
                namespace: w.namespace,
                name: w.service,
            })
            .or_insert(0) += w.replicas as usize;
            m
        },
    );
    check(dir, &Expect { rps, replicas })
}

/// Prints the report; fails when there are errors (or findings, with `--strict`).
///
/// # Errors
/// Errors in the folder, or findings with `--strict`.
pub async fn run(args: &CheckArgs) -> anyhow::Result<()> {
    if args.kube {
        return kube::run(args.kubeconfig.as_deref()).await;
    }
    let report = report(&args.dir, args.rps)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for e in &report.errors {
            println!("error: {e}");
        }
        for w in &report.warnings {
            println!("note: {w}");
        }
        for l in &report.lints {
            println!("warning: {l}");
        }
        println!(
            "{}: {} error(s), {} warning(s)",
            args.dir.display(),
            report.errors.len(),
            report.lints.len()
        );
    }
    if !report.errors.is_empty() {
        bail!("{} file(s) would be rejected", report.errors.len());
    }
    if args.strict && !report.lints.is_empty() {
        bail!("{} lint finding(s) (--strict)", report.lints.len());
    }
    Ok(())
}
