//! Every command docs/install-kind.md tells a student to type exists: each `make` target is in
//! the Makefile, each `ferryctl` command and flag is accepted, each file it names is in the
//! repository, and every `kubectl` line names only namespaces and objects the manifests create.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use ferrymesh_test_support::process::bin;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The lines of the guide's shell blocks.
fn commands() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("docs/install-kind.md")).unwrap();
    let mut out = Vec::new();
    let mut in_sh = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if in_sh && !line.trim().is_empty() {
            out.push(line.trim().to_owned());
        }
    }
    out
}

#[test]
fn every_command_of_the_kind_guide_exists() {
    let commands = commands();
    assert!(commands.len() >= 10, "{commands:?}");
    let makefile = std::fs::read_to_string(root().join("Makefile")).unwrap();
    let manifests: String = [
        "manifests/base",
        "manifests/demo",
        "manifests/observability",
    ]
    .iter()
    .flat_map(|d| std::fs::read_dir(root().join(d)).unwrap())
    .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
    .collect();
    for c in &commands {
        let words: Vec<&str> = c.split_whitespace().collect();
        match words[0] {
            "make" => assert!(
                makefile
                    .lines()
                    .any(|l| l.starts_with(&format!("{}:", words[1]))),
                "make target {} is not in the Makefile",
                words[1]
            ),
            "ferryctl" => {
                let flags: Vec<&str> = words[2..]
                    .iter()
                    .copied()
                    .filter(|w| w.starts_with("--"))
                    .collect();
                let out = Command::new(bin("ferryctl"))
                    .args([words[1], "--help"])
                    .output()
                    .unwrap();
                let help = String::from_utf8_lossy(&out.stdout);
                assert!(out.status.success(), "ferryctl {} does not exist", words[1]);
                for f in flags {
                    assert!(help.contains(f), "ferryctl {} has no {f}", words[1]);
                }
            }
            "kubectl" => {
                for (i, w) in words.iter().enumerate() {
                    if *w == "-f" || *w == "-k" {
                        assert!(
                            root().join(words[i + 1]).exists(),
                            "{c}: no {}",
                            words[i + 1]
                        );
                    }
                    if *w == "-n" {
                        assert!(
                            manifests.contains(&format!("name: {}", words[i + 1])),
                            "{c}: no namespace {}",
                            words[i + 1]
                        );
                    }
                    if let Some(name) = w.strip_prefix("svc/") {
                        assert!(
                            manifests.contains(&format!("name: {name}")),
                            "{c}: no Service {name}"
                        );
                    }
                }
            }
            "curl" => assert!(c.contains("localhost:8080"), "{c}"),
            other => panic!("the guide runs {other:?}, which this test does not know: {c}"),
        }
    }
}
