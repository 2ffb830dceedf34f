//! `ferryctl breaker SERVICE --trip | --isolate | --reset`: manual control of the circuit
//! breakers every proxy of the local mesh holds for a service (Polly's `ManualControl`, for
//! labs): trip it as a real trip would, hold it open, or close it and forget its history.

use std::path::Path;

use anyhow::{Context as _, bail};
use serde_json::Value;

/// What to do to the breakers.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["trip", "isolate", "reset"])))]
pub struct BreakerArgs {
    /// The service, e.g. `pricing`.
    pub service: String,
    /// Open it now; it half-opens after its open time, as after a real trip.
    #[arg(long)]
    pub trip: bool,
    /// Hold it open until `--reset`.
    #[arg(long)]
    pub isolate: bool,
    /// Close it and forget its trips and recent calls.
    #[arg(long)]
    pub reset: bool,
    /// Namespace of the service.
    #[arg(long, default_value = "shop")]
    pub namespace: String,
}

impl BreakerArgs {
    fn action(&self) -> &'static str {
        if self.trip {
            "trip"
        } else if self.isolate {
            "isolate"
        } else {
            "reset"
        }
    }
}

/// Applies the action on every proxy that holds a breaker for the service.
///
/// # Errors
/// No proxy holds one, or a proxy refuses.
pub async fn run(state_dir: &Path, args: &BreakerArgs) -> anyhow::Result<()> {
    let status = crate::state::status(state_dir).await?;
    let client = crate::state::http_client()?;
    let action = args.action();
    let mut changed = 0;
    for proxy in status["proxies"].as_array().into_iter().flatten() {
        let (Some(workload), Some(admin)) = (
            proxy["workload"].as_str(),
            proxy["listeners"]["admin"].as_str(),
        ) else {
            continue;
        };
        let url = format!(
            "http://{admin}/breakers/{}/{}/{action}",
            args.namespace, args.service
        );
        let rsp = client
            .post(&url)
            .send()
            .await
            .with_context(|| format!("{workload} at {admin}"))?;
        match rsp.status().as_u16() {
            200 => {
                let answer: Value = rsp.json().await?;
                for (target, state) in answer["breakers"].as_object().into_iter().flatten() {
                    println!("{workload}: {target}: {}", state.as_str().unwrap_or("?"));
                    changed += 1;
                }
            }
            404 => {} // this proxy has no breaker for the service
            _ => bail!(
                "{workload} refused: {}",
                rsp.text().await.unwrap_or_default()
            ),
        }
    }
    if changed == 0 {
        bail!(
            "no proxy holds a breaker for {}/{}: a proxy builds it on its first call to the \
             service, and only when the service's ResiliencePolicy has a circuitBreaker section",
            args.namespace,
            args.service
        );
    }
    Ok(())
}
