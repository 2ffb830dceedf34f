//! `ferryctl tap SERVICE [--path P] [--count N] [--json]`: every request to or from a service,
//! live, with what the mesh decided for it, from every proxy's admin `/tap` stream.

use std::path::Path;

use anyhow::bail;
use serde_json::Value;

/// What to watch.
#[derive(Debug, Clone, clap::Args)]
pub struct TapArgs {
    /// The service (`name` or `namespace/name`).
    pub service: String,
    /// Only paths starting with this.
    #[arg(long)]
    pub path: Option<String>,
    /// Stop after this many requests (default: until Ctrl-C).
    #[arg(long)]
    pub count: Option<usize>,
    /// One JSON object per line (the access-log entry).
    #[arg(long)]
    pub json: bool,
}

/// One line for people.
pub fn render(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
    let decisions: Vec<&str> = v["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    format!(
        "{:<8} {:<16} {:<6} {} {} {:.1}ms{}{}{}",
        s("direction"),
        s("service"),
        s("method"),
        s("path"),
        v["status"],
        v["duration_ms"].as_f64().unwrap_or_default(),
        v["error"]
            .as_str()
            .map_or(String::new(), |e| format!(" error={e}")),
        v["peer"]
            .as_str()
            .map_or(String::new(), |p| format!(" peer={p}")),
        if decisions.is_empty() {
            String::new()
        } else {
            format!(" [{}]", decisions.join("; "))
        }
    )
}

/// Streams until `--count` requests were shown, or forever.
///
/// # Errors
/// The mesh does not answer, or no proxy can be tapped.
pub async fn run(state_dir: &Path, args: &TapArgs) -> anyhow::Result<()> {
    let status = crate::state::status(state_dir).await?;
    let admins: Vec<String> = status["proxies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["listeners"]["admin"].as_str().map(str::to_owned))
        .collect();
    if admins.is_empty() {
        bail!("no proxy is connected");
    }
    let client = reqwest::Client::builder().no_proxy().build()?;
    let mut query = format!("service={}", args.service);
    if let Some(p) = &args.path {
        query.push_str("&path=");
        query.push_str(p);
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    for admin in admins {
        let (client, tx, url) = (
            client.clone(),
            tx.clone(),
            format!("http://{admin}/tap?{query}"),
        );
        tokio::spawn(async move {
            let Ok(mut rsp) = client.get(url).send().await else {
                return;
            };
            let mut pending = Vec::new();
            while let Ok(Some(chunk)) = rsp.chunk().await {
                pending.extend_from_slice(&chunk);
                while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    let text = String::from_utf8_lossy(&line).trim().to_owned();
                    if tx.send(text).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    drop(tx);
    let mut shown = 0;
    while let Some(line) = rx.recv().await {
        if args.json {
            println!("{line}");
        } else if let Ok(v) = serde_json::from_str::<Value>(&line) {
            println!("{}", render(&v));
        }
        shown += 1;
        if args.count.is_some_and(|n| shown >= n) {
            break;
        }
    }
    Ok(())
}
