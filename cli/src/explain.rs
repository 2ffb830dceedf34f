//! `ferryctl explain TRACE_ID [--json]`: the path of one traced request through the mesh, hop
//! by hop, with what each proxy decided (attempts, retries, ejections, breaker, fallback,
//! cache, faults, authorization). Each proxy keeps the entries of its last traced requests
//! (those carrying a W3C `traceparent`); this asks every proxy of the local mesh.

use std::path::Path;

use anyhow::bail;
use serde_json::Value;

/// Which request.
#[derive(Debug, Clone, clap::Args)]
pub struct ExplainArgs {
    /// The trace id (32 hex digits, from `traceparent` or the access log).
    pub trace_id: String,
    /// The hops as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Every hop of `trace` the proxies still hold, in time order.
///
/// # Errors
/// The mesh does not answer.
pub async fn hops(state_dir: &Path, trace: &str) -> anyhow::Result<Vec<Value>> {
    let status = crate::state::status(state_dir).await?;
    let client = crate::state::http_client()?;
    let mut hops = Vec::new();
    for p in status["proxies"].as_array().into_iter().flatten() {
        let Some(admin) = p["listeners"]["admin"].as_str() else {
            continue;
        };
        let Ok(rsp) = client
            .get(format!("http://{admin}/recent?trace_id={trace}"))
            .send()
            .await
        else {
            continue;
        };
        if let Ok(Value::Array(entries)) = rsp.json::<Value>().await {
            for mut e in entries {
                e["proxy"] = p["workload"].clone();
                hops.push(e);
            }
        }
    }
    hops.sort_by_key(|h| (h["start_ms"].as_u64(), h["direction"] != "outbound"));
    Ok(hops)
}

/// Prints the hops.
///
/// # Errors
/// The mesh does not answer, or no proxy holds the trace.
pub async fn run(state_dir: &Path, args: &ExplainArgs) -> anyhow::Result<()> {
    let hops = hops(state_dir, &args.trace_id).await?;
    if hops.is_empty() {
        bail!(
            "no proxy holds trace {} (only requests with a traceparent are kept, the last 1000 per proxy)",
            args.trace_id
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&hops)?);
        return Ok(());
    }
    for (i, h) in hops.iter().enumerate() {
        println!(
            "{}. {} at {}: {}",
            i + 1,
            h["direction"].as_str().unwrap_or("-"),
            h["proxy"].as_str().unwrap_or("-"),
            crate::tap::render(h)
        );
        for d in h["decisions"].as_array().into_iter().flatten() {
            println!("     - {}", d.as_str().unwrap_or_default());
        }
    }
    Ok(())
}
