//! Local mode source: a folder of multi-document YAML (`*.yaml`, `*.yml`), watched for changes.
//! Changes are debounced (250 ms), then the folder is rescanned and each changed file reloaded
//! all-or-nothing: an invalid file is logged with file, object and field, and its last good
//! objects stay in the index.
//!
//! Only changes wake the source (creations, writes, renames, removals), never its own reads.
//! A reload that would drop objects (an empty file, or fewer documents than before) may be a
//! write caught half-way: it is applied only when a second read, after the next quiet period,
//! finds the same bytes, so an editor that truncates and rewrites never leaves the mesh without
//! its policies. (A file that does not parse keeps its last good objects anyway.)

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
    /// Objects of each file's last good load.
    counts: BTreeMap<PathBuf, usize>,
    /// Files read in a state that may be a write in progress: the hash of what was read.
    unsettled: BTreeMap<PathBuf, [u8; 32]>,
}

impl FileSource {
    /// A source for `dir`, feeding `index`.
    pub fn new(dir: PathBuf, index: IndexHandle) -> Self {
        Self {
            dir,
            index,
            hashes: BTreeMap::new(),
            counts: BTreeMap::new(),
            unsettled: BTreeMap::new(),
        }
    }

    /// Files whose content looked like a write in progress at the last load: [`Self::load`]
    /// again after a quiet period settles them.
    pub fn unsettled(&self) -> bool {
        !self.unsettled.is_empty()
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
            self.unsettled.remove(&gone);
            self.counts.remove(&gone);
            self.index.remove_file(&gone);
        }
        for path in files {
            let Ok(bytes) = std::fs::read(&path) else {
                continue; // removed between listing and reading: the next event handles it
            };
            let hash: [u8; 32] = Sha256::digest(&bytes).into();
            if self.hashes.get(&path) == Some(&hash) {
                self.unsettled.remove(&path);
                continue;
            }
            let result = std::str::from_utf8(&bytes)
                .map_err(|e| super::ParseError {
                    file: path.clone(),
                    object: "file".into(),
                    field: ".".into(),
                    message: format!("not UTF-8: {e}"),
                })
                .and_then(|text| parse_documents(&path, text));
            // Fewer objects than last time may be a half-written file: applied only when a
            // second read finds the same bytes.
            let before = self.counts.get(&path).copied().unwrap_or(0);
            let suspect = result.as_ref().is_ok_and(|p| p.objects.len() < before);
            if suspect && self.unsettled.get(&path) != Some(&hash) {
                tracing::debug!(file = %path.display(), "config file may be mid-write; reading it again");
                self.unsettled.insert(path, hash);
                continue;
            }
            self.unsettled.remove(&path);
            self.hashes.insert(path.clone(), hash);
            match &result {
                Ok(parsed) => {
                    self.counts.insert(path.clone(), parsed.objects.len());
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
                // NOTE: reads are events too (inotify's open and close-after-read): reacting
                // to them made every reload trigger the next one.
                if event.is_ok_and(|e| changes(e.kind)) {
                    let _ = tx.send(());
                }
            })
            .context("creating the file watcher")?;
        watcher
            .watch(&self.dir, notify::RecursiveMode::Recursive)
            .with_context(|| format!("watching {}", self.dir.display()))?;
        loop {
            // A file read mid-write is read again after a quiet period, event or not.
            let settle = self.unsettled();
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                event = rx.recv() => if event.is_none() { return Ok(()) },
                () = tokio::time::sleep(DEBOUNCE), if settle => {}
            }
            // Debounce: wait until no event arrived for DEBOUNCE.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            if let Err(e) = self.load() {
                tracing::error!(error = %e, "reloading the config folder");
            }
        }
    }
}

/// Whether a watcher event is a change to the folder's content (not an access).
fn changes(kind: notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match kind {
        // A file closed after writing is the end of a write.
        EventKind::Create(_)
        | EventKind::Modify(_)
        | EventKind::Remove(_)
        | EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
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

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: shop}\nspec: {ports: [{port: 80}]}\n---\n\
                       apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: shop}\nspec: {ports: [{port: 80}]}\n";
    const ONE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: shop}\nspec: {ports: [{port: 80}]}\n";

    fn services(index: &IndexHandle) -> Vec<String> {
        index
            .snapshot()
            .services
            .keys()
            .map(|k| format!("{k:?}"))
            .collect()
    }

    #[test]
    fn a_file_that_loses_objects_is_applied_only_once_it_reads_the_same_twice() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("services.yaml");
        std::fs::write(&path, TWO).expect("write");
        let index = IndexHandle::new();
        let mut source = FileSource::new(dir.path().to_owned(), index.clone());
        source.load().expect("load");
        assert_eq!(services(&index).len(), 2);
        assert!(!source.unsettled());

        // Truncated by an editor, not yet rewritten: the last good objects stay.
        std::fs::write(&path, "").expect("truncate");
        source.load().expect("load");
        assert_eq!(services(&index).len(), 2, "a half-written file was applied");
        assert!(source.unsettled());
        // The write completes: applied at once (it has all its objects).
        std::fs::write(&path, TWO).expect("rewrite");
        source.load().expect("load");
        assert_eq!(services(&index).len(), 2);
        assert!(!source.unsettled());

        // A real edit that removes an object is applied on the second read.
        std::fs::write(&path, ONE).expect("edit");
        source.load().expect("load");
        assert_eq!(services(&index).len(), 2);
        source.load().expect("load");
        assert_eq!(services(&index).len(), 1, "a settled edit was not applied");
        assert!(!source.unsettled());
    }

    #[test]
    fn the_sources_own_reads_are_not_changes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("services.yaml");
        std::fs::write(&path, ONE).expect("write");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            if let Ok(e) = e {
                let _ = tx.send(e.kind);
            }
        })
        .expect("watcher");
        watcher
            .watch(dir.path(), notify::RecursiveMode::Recursive)
            .expect("watch");
        let mut source = FileSource::new(dir.path().to_owned(), IndexHandle::new());
        source.load().expect("load");
        let mut read = Vec::new();
        while let Ok(k) = rx.recv_timeout(Duration::from_millis(500)) {
            read.push(k);
        }
        assert!(
            !read.is_empty(),
            "inotify reports reads (the case filtered out)"
        );
        assert!(read.iter().all(|k| !changes(*k)), "{read:?}");
        std::fs::write(&path, TWO).expect("write");
        let mut written = Vec::new();
        while let Ok(k) = rx.recv_timeout(Duration::from_millis(500)) {
            written.push(k);
        }
        assert!(written.iter().any(|k| changes(*k)), "{written:?}");
    }
}
