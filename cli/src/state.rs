//! The local mesh's state folder (`.ferrymesh/` by default): `state.json` says where the
//! controller of the running `ferryctl up` listens; `proxies/` holds the ProxyConfigs written
//! for each instance and `logs/` every process's stderr.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// What `ferryctl up` records for the other commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// Controller admin address (`/status`).
    pub controller_admin: String,
    /// Controller Discovery address.
    pub controller_discovery: String,
    /// The entry (storefront) address.
    pub entry: String,
    /// The `ferryctl up` process.
    pub pid: u32,
}

/// The file inside a state folder.
pub fn file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

/// Writes the state.
///
/// # Errors
/// The folder cannot be written.
pub fn save(dir: &Path, state: &State) -> anyhow::Result<()> {
    std::fs::write(file(dir), serde_json::to_vec_pretty(state)?)
        .with_context(|| format!("writing {}", file(dir).display()))
}

/// Reads the state of a running `ferryctl up`.
///
/// # Errors
/// No mesh is up from this folder.
pub fn load(dir: &Path) -> anyhow::Result<State> {
    let bytes = std::fs::read(file(dir)).with_context(|| {
        format!(
            "no local mesh state in {} (is `ferryctl up` running here?)",
            dir.display()
        )
    })?;
    serde_json::from_slice(&bytes).with_context(|| format!("reading {}", file(dir).display()))
}

/// An HTTP client that never goes through `HTTP_PROXY` (the CLI talks to admin ports).
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(5))
        .build()?)
}

/// The controller's `/status` document.
///
/// # Errors
/// The controller does not answer.
pub async fn status(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let state = load(dir)?;
    let url = format!("http://{}/status", state.controller_admin);
    let rsp = http_client()?.get(&url).send().await.with_context(|| {
        format!("asking the controller at {url} (is `ferryctl up` still running?)")
    })?;
    Ok(rsp.error_for_status()?.json().await?)
}
