//! `ferryctl inject FILE|-`: the admission webhook's injection, offline, on YAML. Every pod
//! (Pod, or the template of a Deployment, StatefulSet, DaemonSet, ReplicaSet, Job or CronJob;
//! `List` items too) gets the init container, the native sidecar and rewritten probes, unless
//! its template says `ferrymesh.io/inject: disabled`. Documents without pods are written back
//! exactly as they came; a summary goes to stderr.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use ferrymesh_controller::inject::{self, Outcome, Settings};
use serde_json::Value;

/// What to inject.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// A YAML file (multi-document), or `-` for stdin.
    pub file: PathBuf,
    /// The proxy image.
    #[arg(long)]
    pub image: Option<String>,
}

/// Splits multi-document YAML at `---` lines, keeping each document's text.
fn documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end();
        let is_separator = bare == "---"
            || bare
                .strip_prefix("---")
                .is_some_and(|rest| rest.starts_with([' ', '\t', '#']));
        if is_separator {
            docs.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs
}

/// The outcome for one object, for the summary.
struct Line {
    what: String,
    outcome: Result<Outcome, String>,
}

fn describe(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or("?").to_ascii_lowercase(),
        object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?")
    )
}

/// Injects one object in place (a `List`'s items each); `true` when anything changed.
fn inject_object(object: &mut Value, settings: &Settings, lines: &mut Vec<Line>) -> bool {
    let kind = object["kind"].as_str().unwrap_or_default().to_owned();
    if kind == "List" {
        let mut changed = false;
        if let Some(items) = object.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                changed |= inject_object(item, settings, lines);
            }
        }
        return changed;
    }
    let what = describe(object);
    let Some(template) = inject::pod_template_mut(&kind, object) else {
        return false;
    };
    if !inject::wanted(template, &serde_json::Map::new(), true) {
        lines.push(Line {
            what,
            outcome: Ok(Outcome::Skipped("ferrymesh.io/inject: disabled".into())),
        });
        return false;
    }
    let outcome = inject::inject(template, settings).map_err(|e| e.to_string());
    let changed = outcome == Ok(Outcome::Injected);
    lines.push(Line { what, outcome });
    changed
}

/// Injects every document of `text`; returns the new text and the summary lines, or the
/// first document that is not YAML.
///
/// # Errors
/// A document does not parse; a pod has a bad annotation (named in the message).
pub fn inject_text(text: &str, settings: &Settings) -> anyhow::Result<(String, Vec<String>)> {
    let mut out = String::new();
    let mut lines = Vec::new();
    for (i, doc) in documents(text).into_iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        let parsed: Option<Value> = serde_yaml_ng::from_str(doc)
            .with_context(|| format!("document {}: not YAML", i + 1))?;
        let Some(mut object) = parsed.filter(Value::is_object) else {
            out.push_str(doc);
            continue;
        };
        if inject_object(&mut object, settings, &mut lines) {
            out.push_str(&serde_yaml_ng::to_string(&object)?);
        } else {
            out.push_str(doc);
        }
    }
    let mut summary = Vec::new();
    let mut bad = Vec::new();
    for l in lines {
        match l.outcome {
            Ok(Outcome::Injected) => summary.push(format!("{} injected", l.what)),
            Ok(Outcome::Skipped(why)) => summary.push(format!("{} skipped: {why}", l.what)),
            Err(e) => bad.push(format!("{}: {e}", l.what)),
        }
    }
    if !bad.is_empty() {
        bail!("not injected:\n  {}", bad.join("\n  "));
    }
    Ok((out, summary))
}

/// Runs `ferryctl inject`.
///
/// # Errors
/// The input cannot be read or injected.
pub fn run(args: &InjectArgs) -> anyhow::Result<()> {
    let text = if args.file.as_os_str() == "-" {
        let mut t = String::new();
        std::io::stdin().read_to_string(&mut t)?;
        t
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let mut settings = Settings::default();
    if let Some(image) = &args.image {
        settings.image.clone_from(image);
    }
    let (out, summary) = inject_text(&text, &settings)?;
    print!("{out}");
    for line in summary {
        eprintln!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_at_separator_lines_only() {
        let docs = documents("a: 1\n---\nb: '---'\n--- # two\nc: 3\n");
        assert_eq!(docs, ["a: 1\n", "b: '---'\n", "c: 3\n"]);
    }

    #[test]
    fn unknown_kinds_pass_through_byte_for_byte() {
        let text = "# a comment\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {k: v}\n---\nkind: Secret\n";
        let (out, summary) = inject_text(text, &Settings::default()).unwrap();
        assert_eq!(out, text);
        assert!(summary.is_empty());
    }

    #[test]
    fn list_items_are_injected_and_bad_annotations_fail_with_the_object() {
        let list = "kind: List\nitems:\n- kind: Pod\n  metadata: {name: a}\n  spec: {containers: [{name: app, image: x}]}\n";
        let (out, summary) = inject_text(list, &Settings::default()).unwrap();
        assert!(out.contains("ferrymesh-proxy"), "{out}");
        assert_eq!(summary, ["pod/a injected"]);
        let bad = "kind: Pod\nmetadata: {name: b, annotations: {config.ferrymesh.io/skip-subnets: nope}}\nspec: {containers: []}\n";
        let err = inject_text(bad, &Settings::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pod/b: config.ferrymesh.io/skip-subnets"),
            "{err}"
        );
    }
}
