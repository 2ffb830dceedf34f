//! What proves a workload's service account at Certify. Locally, bootstrap tokens:
//! `<dir>/<namespace>/<service account>` holds the token, written by `ferryctl up` and read at
//! each Certify, so a new workload needs no restart. In Kubernetes, the pod's projected
//! ServiceAccount token (audience `identity.ferrymesh.io`), checked with a TokenReview.

use std::path::PathBuf;

use super::SpiffeId;

/// The audience a pod's projected token must be issued for.
pub const AUDIENCE: &str = "identity.ferrymesh.io";

/// Where tokens are checked; neither: no token is accepted.
#[derive(Clone, Default)]
pub struct Tokens {
    dir: Option<PathBuf>,
    review: Option<kube::Client>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("dir", &self.dir)
            .field("token_review", &self.review.is_some())
            .finish()
    }
}

impl Tokens {
    /// Tokens kept under `dir`.
    pub fn in_dir(dir: PathBuf) -> Self {
        Self {
            dir: Some(dir),
            review: None,
        }
    }

    /// ServiceAccount tokens, checked by the API server (TokenReview).
    pub fn token_review(client: kube::Client) -> Self {
        Self {
            dir: None,
            review: Some(client),
        }
    }

    /// Whether `token` proves `id`.
    ///
    /// # Errors
    /// Why not, in words for the proxy's log.
    pub async fn check(&self, id: &SpiffeId, token: &[u8]) -> Result<(), String> {
        if let Some(client) = &self.review {
            return review(client, id, token).await;
        }
        let Some(dir) = &self.dir else {
            return Err("this controller has no token source".into());
        };
        let path = dir.join(&id.namespace).join(&id.service_account);
        let Ok(expected) = std::fs::read(&path) else {
            return Err(format!(
                "no bootstrap token for {}/{}",
                id.namespace, id.service_account
            ));
        };
        let expected = expected.trim_ascii();
        let token = token.trim_ascii();
        // NOTE: compared in constant time, so the time taken says nothing of the token.
        let same = expected.len() == token.len()
            && expected
                .iter()
                .zip(token)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same && !expected.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the token does not prove {}/{}",
                id.namespace, id.service_account
            ))
        }
    }
}

/// Asks the API server whether `token` is a live token of `id`'s service account, issued for
/// our audience.
async fn review(client: &kube::Client, id: &SpiffeId, token: &[u8]) -> Result<(), String> {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let token =
        std::str::from_utf8(token.trim_ascii()).map_err(|_| "the token is not text".to_owned())?;
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![AUDIENCE.to_owned()]),
        },
        ..TokenReview::default()
    };
    let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let answer = api
        .create(&kube::api::PostParams::default(), &request)
        .await
        .map_err(|e| format!("TokenReview failed: {e}"))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(format!(
            "the token is not valid: {}",
            status.error.unwrap_or_else(|| "not authenticated".into())
        ));
    }
    if !status
        .audiences
        .unwrap_or_default()
        .iter()
        .any(|a| a == AUDIENCE)
    {
        return Err(format!("the token is not issued for {AUDIENCE}"));
    }
    let expected = format!(
        "system:serviceaccount:{}:{}",
        id.namespace, id.service_account
    );
    let user = status.user.and_then(|u| u.username).unwrap_or_default();
    if user == expected {
        Ok(())
    } else {
        Err(format!("the token belongs to {user:?}, not {expected}"))
    }
}
