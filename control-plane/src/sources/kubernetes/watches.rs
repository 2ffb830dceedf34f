//! The state of each Kubernetes watch, as `/status` and `ferryctl check --kube` report it:
//! synced (with how many objects), failing (with the last error), or not watched because the
//! API is not installed (Gateway API on a bare kind cluster). A kind whose API is missing is
//! looked up in API discovery every [`INSTALL_POLL`] until it appears, then watched: no watch
//! is started against an API that would answer 404, so the watch-error counter stays flat.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Kind;

/// How often a missing API is looked up again.
pub const INSTALL_POLL: Duration = Duration::from_secs(2);

/// Where one watch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchState {
    /// Started, not listed yet.
    Starting,
    /// Listed; following changes.
    Synced,
    /// The last list or watch failed; retrying with backoff.
    Failing,
    /// The API is not installed; not watched until it is.
    NotInstalled,
}

/// One watched kind in `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchStatus {
    /// Kind.
    pub kind: String,
    /// `group/version` (or `v1`).
    pub api_version: String,
    /// Optional APIs (Gateway API) may be missing from a healthy install.
    pub optional: bool,
    /// Where it stands.
    pub state: WatchState,
    /// The object count, the error, or why it is not watched.
    pub message: String,
}

/// Every watch's state, shared by the watch tasks and the admin server.
#[derive(Debug, Clone, Default)]
pub struct Watches {
    inner: Arc<Mutex<BTreeMap<&'static str, WatchStatus>>>,
}

impl Watches {
    /// Records `kind`'s state.
    pub fn set(&self, kind: &Kind, state: WatchState, message: impl Into<String>) {
        self.inner.lock().expect("watches lock").insert(
            kind.kind,
            WatchStatus {
                kind: kind.kind.to_owned(),
                api_version: kind.api_resource().api_version,
                optional: kind.optional,
                state,
                message: message.into(),
            },
        );
    }

    /// Whether each of `kinds` has listed at least once (an optional one may instead be not
    /// installed).
    pub fn all_listed(&self, kinds: &[Kind]) -> bool {
        let inner = self.inner.lock().expect("watches lock");
        kinds.iter().all(|k| {
            inner.get(k.kind).is_some_and(|w| {
                w.state == WatchState::Synced || (k.optional && w.state == WatchState::NotInstalled)
            })
        })
    }

    /// Every watch, by kind.
    pub fn all(&self) -> Vec<WatchStatus> {
        self.inner
            .lock()
            .expect("watches lock")
            .values()
            .cloned()
            .collect()
    }
}
