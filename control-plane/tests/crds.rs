//! The committed CRDs under `manifests/crds/` are exactly what `ferrymesh-controller crds`
//! generates from the Rust types (`make crds`), and generating twice writes the same files: a
//! change to a type without `make crds` fails here.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use ferrymesh_test_support::process::bin;

fn read_dir(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&path).unwrap(),
            )
        })
        .collect()
}

fn generate(out: &Path) {
    let status = Command::new(bin("ferrymesh-controller"))
        .arg("crds")
        .arg("--out")
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn committed_crds_are_what_the_types_generate() {
    let dir = tempfile::tempdir().unwrap();
    // A stale file from an older kind is removed; other files stay.
    std::fs::write(
        dir.path().join("oldkinds.policy.ferrymesh.io.yaml"),
        "stale",
    )
    .unwrap();
    generate(dir.path());
    let first = read_dir(dir.path());
    generate(dir.path());
    assert_eq!(
        read_dir(dir.path()),
        first,
        "generating twice changes nothing"
    );
    assert!(!first.contains_key("oldkinds.policy.ferrymesh.io.yaml"));
    let committed = read_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds"));
    assert_eq!(
        committed.keys().collect::<Vec<_>>(),
        first.keys().collect::<Vec<_>>(),
        "run `make crds`"
    );
    for (name, text) in &first {
        assert!(committed[name] == *text, "{name} is stale: run `make crds`");
    }
}
