//! `ferryctl status`: services, instances, endpoints, versions and every proxy's listeners,
//! from the controller's `/status` (the `--json` form is that document, documented in
//! docs/status.md).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

/// Prints the status.
///
/// # Errors
/// The controller does not answer.
pub async fn run(state_dir: &Path, json: bool) -> anyhow::Result<()> {
    let mut status = crate::state::status(state_dir).await?;
    add_certificates(&mut status).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

/// Asks each proxy for its certificate's expiry (`/identity`), into `proxies[].certificate`.
async fn add_certificates(status: &mut Value) -> anyhow::Result<()> {
    let client = crate::state::http_client()?;
    for p in status["proxies"].as_array_mut().into_iter().flatten() {
        let Some(admin) = p["listeners"]["admin"].as_str() else {
            continue;
        };
        let Ok(rsp) = client.get(format!("http://{admin}/identity")).send().await else {
            continue;
        };
        let Ok(answer) = rsp.json::<Value>().await else {
            continue;
        };
        if !answer["validForSeconds"].is_null() {
            p["certificate"] = serde_json::json!({
                "notAfterUnix": answer["notAfterUnix"],
                "validForSeconds": answer["validForSeconds"],
            });
        }
    }
    Ok(())
}

/// `3h05m`, `59s`.
fn human(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// The human-readable form.
pub fn render(status: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "controller  discovery {}  admin {}",
        s(&status["controller"]["discovery"]),
        s(&status["controller"]["admin"])
    );
    let _ = writeln!(out, "\nSERVICES");
    for svc in status["services"].as_array().into_iter().flatten() {
        for port in svc["ports"].as_array().into_iter().flatten() {
            let eps: Vec<&Value> = port["endpoints"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default();
            let ready = eps
                .iter()
                .filter(|e| e["ready"].as_bool() == Some(true))
                .count();
            let _ = writeln!(
                out,
                "  {}/{}:{}  {}  endpoints {}/{} ready  version {}",
                s(&svc["namespace"]),
                s(&svc["name"]),
                port["port"],
                s(&port["protocol"]),
                ready,
                eps.len(),
                s(&port["endpointsVersion"])
            );
            for e in eps {
                let _ = writeln!(
                    out,
                    "      {}  {}  {}",
                    s(&e["address"]),
                    if e["ready"].as_bool() == Some(true) {
                        "ready"
                    } else {
                        "not-ready"
                    },
                    s(&e["instance"])
                );
            }
        }
    }
    let _ = writeln!(out, "\nPROXIES");
    for p in status["proxies"].as_array().into_iter().flatten() {
        let l = &p["listeners"];
        let _ = writeln!(
            out,
            "  {:<24} {:<6} app {:<21} outbound {:<21} inbound {:<21} admin {:<21} health {}",
            s(&p["workload"]),
            if p["ready"].as_bool() == Some(true) {
                "ready"
            } else {
                "-"
            },
            s(&p["app"]),
            s(&l["outbound"]),
            s(&l["inbound"]),
            s(&l["admin"]),
            s(&l["health"])
        );
        match (
            p["identity"].as_str(),
            p["certificate"]["validForSeconds"].as_u64(),
        ) {
            (Some(id), Some(left)) if !id.is_empty() => {
                let _ = writeln!(
                    out,
                    "      identity {id}  certificate expires in {}",
                    human(left)
                );
            }
            (Some(id), None) if !id.is_empty() => {
                let _ = writeln!(out, "      identity {id}  no certificate yet");
            }
            _ => {
                let _ = writeln!(out, "      plaintext (no identity)");
            }
        }
        for f in l["fixed"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "      fixed {} -> {}",
                s(&f["listen"]),
                s(&f["target"])
            );
        }
    }
    for e in status["fileErrors"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "\nREJECTED {}: {}: {}: {}",
            s(&e["file"]),
            s(&e["object"]),
            s(&e["field"]),
            s(&e["message"])
        );
    }
    out
}
