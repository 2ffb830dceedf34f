//! `ferryctl chaos SERVICE`: sets the chaos knobs of a service's instances (all, or one) through
//! each instance's `PUT /chaos`.

use std::path::Path;

use anyhow::{Context as _, bail};
use serde_json::{Map, Value, json};

/// What to change.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// The service, e.g. `pricing`.
    pub service: String,
    /// Only this instance: its number (1-based, in name order) or its name (e.g. `catalog-2`).
    #[arg(long)]
    pub instance: Option<String>,
    /// Fraction of requests answered 500, 0..=1.
    #[arg(long)]
    pub error_rate: Option<f64>,
    /// Latency added to every request, e.g. `200ms`.
    #[arg(long)]
    pub latency: Option<String>,
    /// Fraction of requests that never get an answer, 0..=1.
    #[arg(long)]
    pub hang_rate: Option<f64>,
    /// Readiness (`/readyz`): false takes the instance out of the endpoints.
    #[arg(long)]
    pub ready: Option<bool>,
    /// Liveness (`/healthz`).
    #[arg(long)]
    pub live: Option<bool>,
    /// Back to the start values first.
    #[arg(long)]
    pub reset: bool,
    /// Namespace of the service.
    #[arg(long, default_value = "shop")]
    pub namespace: String,
}

/// The `PUT /chaos` body for these arguments.
pub fn body(args: &ChaosArgs) -> Value {
    let mut m = Map::new();
    if let Some(v) = args.error_rate {
        m.insert("errorRate".into(), json!(v));
    }
    if let Some(v) = &args.latency {
        m.insert("latency".into(), json!(v));
    }
    if let Some(v) = args.hang_rate {
        m.insert("hangRate".into(), json!(v));
    }
    if let Some(v) = args.ready {
        m.insert("ready".into(), json!(v));
    }
    if let Some(v) = args.live {
        m.insert("live".into(), json!(v));
    }
    if args.reset {
        m.insert("reset".into(), json!(true));
    }
    Value::Object(m)
}

/// Applies the knobs and prints each instance's result.
///
/// # Errors
/// The service has no instance, or an instance refuses the change.
pub async fn run(state_dir: &Path, args: &ChaosArgs) -> anyhow::Result<()> {
    let status = crate::state::status(state_dir).await?;
    let service = format!("{}/{}", args.namespace, args.service);
    let mut instances: Vec<(String, String)> = status["proxies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["service"] == service.as_str())
        .filter_map(|p| {
            Some((
                p["instance"].as_str()?.to_owned(),
                p["app"].as_str()?.to_owned(),
            ))
        })
        .collect();
    instances.sort();
    if instances.is_empty() {
        bail!("no instance of {service} is connected");
    }
    if let Some(pick) = &args.instance {
        let chosen = match pick.parse::<usize>() {
            Ok(n) if (1..=instances.len()).contains(&n) => instances[n - 1].clone(),
            Ok(n) => bail!(
                "{service} has {} instances; --instance {n} is out of range",
                instances.len()
            ),
            Err(_) => instances
                .iter()
                .find(|(name, _)| name == pick)
                .cloned()
                .with_context(|| format!("no instance named {pick} in {service}"))?,
        };
        instances = vec![chosen];
    }
    let client = crate::state::http_client()?;
    let body = body(args);
    for (name, app) in instances {
        let rsp = client
            .put(format!("http://{app}/chaos"))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("{name} at {app}"))?;
        let ok = rsp.status().is_success();
        let result: Value = rsp.json().await.unwrap_or(Value::Null);
        if !ok {
            bail!("{name} refused the change: {result}");
        }
        println!("{name}: {result}");
    }
    Ok(())
}
