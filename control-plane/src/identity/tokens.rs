//! Bootstrap tokens (local mode): `<dir>/<namespace>/<service account>` holds the token that
//! proves that service account. `ferryctl up` writes them; the controller reads them at each
//! Certify, so a new workload needs no restart.

use std::path::PathBuf;

use super::SpiffeId;

/// Where tokens are looked up; `None`: no token is accepted.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    dir: Option<PathBuf>,
}

impl Tokens {
    /// Tokens kept under `dir`.
    pub fn in_dir(dir: PathBuf) -> Self {
        Self { dir: Some(dir) }
    }

    /// Whether `token` proves `id`.
    ///
    /// # Errors
    /// Why not, in words for the proxy's log.
    pub fn check(&self, id: &SpiffeId, token: &[u8]) -> Result<(), String> {
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
