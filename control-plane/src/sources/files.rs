//! Local mode source: a folder of multi-document YAML (`*.yaml`, `*.yml`), watched for changes.
//! Changes are debounced (250 ms), then the folder is rescanned and each changed file reloaded
//! all-or-nothing: an invalid file is logged with file, object and field, and its last good
//! objects stay in the index.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use notify::Watcher as _;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::parse_documents;
use crate::index::IndexHandle;

/// How long the folder must be quiet before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// The file source of one folder.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    index: IndexHandle,
    /// Content hash per file, to reload only what changed.
    hashes: BTreeMap<PathBuf, [u8; 32]>,
}

impl FileSource {
    /// A source for `dir`, feeding `index`.
    pub fn new(dir: PathBuf, index: IndexHandle) -> Self {
        Self {
            dir,
            index,
            hashes: BTreeMap::new(),
        }
    }

    /// Loads every file once. Returns how many files were rejected.
    ///
    /// # Errors
    /// The folder cannot be read.
    pub fn load(&mut self) -> anyhow::Result<usize> {
        let files = list(&self.dir)
            .with_context(|| format!("reading config folder {}", self.dir.display()))?;
        let mut rejected = 0;
        for gone in self
            .hashes
            .keys()
            .filter(|p| !files.contains(p))
            .cloned()
            .collect::<Vec<_>>()
        {
            tracing::info!(file = %gone.display(), "config file removed");
            self.hashes.remove(&gone);
            self.index.remove_file(&gone);
        }
        for path in files {
            let Ok(bytes) = std::fs::read(&path) else {
                continue; // removed between listing and reading: the next event handles it
            };
            let hash: [u8; 32] = Sha256::digest(&bytes).into();
            if self.hashes.get(&path) == Some(&hash) {
                continue;
            }
            self.hashes.insert(path.clone(), hash);
            let result = std::str::from_utf8(&bytes)
                .map_err(|e| super::ParseError {
                    file: path.clone(),
                    object: "file".into(),
                    field: ".".into(),
                    message: format!("not UTF-8: {e}"),
                })
                .and_then(|text| parse_documents(&path, text));
            match &result {
                Ok(parsed) => {
                    for w in &parsed.warnings {
                        tracing::warn!("{w}");
                    }
                    tracing::info!(file = %path.display(), objects = parsed.objects.len(), "config file loaded");
                }
                Err(e) => {
                    rejected += 1;
                    tracing::error!(file = %path.display(), error = %e, "config file rejected; keeping its last good objects");
                }
            }
            self.index.apply_file(&path, result);
        }
        Ok(rejected)
    }

    /// Watches the folder until `shutdown` fires, reloading after each quiet period.
    ///
    /// # Errors
    /// The watcher cannot be set up.
    pub async fn watch(
        mut self,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok() {
                    let _ = tx.send(());
                }
            })
            .context("creating the file watcher")?;
        watcher
            .watch(&self.dir, notify::RecursiveMode::Recursive)
            .with_context(|| format!("watching {}", self.dir.display()))?;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                event = rx.recv() => if event.is_none() { return Ok(()) },
            }
            // Debounce: wait until no event arrived for DEBOUNCE.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            if let Err(e) = self.load() {
                tracing::error!(error = %e, "reloading the config folder");
            }
        }
    }
}

/// Config files below `dir`, sorted, hidden files, editor temporaries and kustomize
/// `kustomization.yaml` files left out.
pub fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
                // A kustomization says how to assemble objects; it is not one.
                && !matches!(
                    name.to_string_lossy().as_ref(),
                    "kustomization.yaml" | "kustomization.yml"
                )
            {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}
