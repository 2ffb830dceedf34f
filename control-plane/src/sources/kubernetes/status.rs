//! Policy status, written back with server-side apply (field manager `ferrymesh-controller`):
//! `Accepted` (False/Invalid with the parser's message when the latest generation was refused,
//! False/TargetNotFound when no target exists), `ResolvedRefs` (False/BackendNotFound for a
//! fallback Service that does not exist) and `Programmed` (True once accepted and served), each
//! with `observedGeneration`, rolled up at the top and repeated per target in `ancestors`
//! (GEP-713). A condition keeps its `lastTransitionTime` until its status changes; unchanged
//! statuses are not written again, also not by a restarted controller or a second replica,
//! which compare against the status the object already carries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{Observed, Seen};
use crate::crd::CONTROLLER_NAME;
use crate::index::{ServiceKey, Snapshot};

/// The field manager of our status writes.
pub const FIELD_MANAGER: &str = "ferrymesh-controller";

/// One condition before timestamps: (type, status, reason, message).
type Cond = (&'static str, bool, &'static str, String);

fn conditions_for(o: &Observed, snapshot: &Snapshot) -> (Vec<Cond>, Vec<(Value, Vec<Cond>)>) {
    let exists = |name: &str| {
        snapshot.services.contains_key(&ServiceKey {
            namespace: o.namespace.clone(),
            name: name.to_owned(),
        })
    };
    let mut ancestors = Vec::new();
    let mut found = 0;
    for t in &o.targets {
        let resolved = t.kind != "Service" || exists(&t.name);
        found += usize::from(resolved);
        let accepted: Cond = match (&o.error, resolved) {
            (Some(e), _) => ("Accepted", false, "Invalid", e.clone()),
            (None, false) => (
                "Accepted",
                false,
                "TargetNotFound",
                format!("Service {}/{} not found", o.namespace, t.name),
            ),
            (None, true) => ("Accepted", true, "Accepted", String::new()),
        };
        let programmed = accepted.1;
        let reference = json!({
            "group": t.group, "kind": t.kind, "name": t.name, "namespace": o.namespace,
            "sectionName": t.section_name,
        });
        ancestors.push((reference, vec![accepted, programmed_cond(programmed)]));
    }
    let accepted: Cond = match &o.error {
        Some(e) => ("Accepted", false, "Invalid", e.clone()),
        None if found == 0 => (
            "Accepted",
            false,
            "TargetNotFound",
            "none of the targets exists".to_owned(),
        ),
        None => ("Accepted", true, "Accepted", String::new()),
    };
    let missing: Vec<String> = o
        .backends
        .iter()
        .filter(|(ns, name)| {
            !snapshot.services.contains_key(&ServiceKey {
                namespace: ns.clone(),
                name: name.clone(),
            })
        })
        .map(|(ns, name)| format!("{ns}/{name}"))
        .collect();
    let resolved: Cond = if missing.is_empty() {
        ("ResolvedRefs", true, "ResolvedRefs", String::new())
    } else {
        (
            "ResolvedRefs",
            false,
            "BackendNotFound",
            format!("fallback.backendRef {} not found", missing.join(", ")),
        )
    };
    let programmed = programmed_cond(accepted.1);
    (vec![accepted, resolved, programmed], ancestors)
}

fn programmed_cond(accepted: bool) -> Cond {
    if accepted {
        (
            "Programmed",
            true,
            "Programmed",
            "served to the proxies".to_owned(),
        )
    } else {
        (
            "Programmed",
            false,
            "Rejected",
            "not served: proxies keep the last accepted generation".to_owned(),
        )
    }
}

/// Conditions with `observedGeneration` and transition times carried over from `previous`.
fn render(
    conds: &[Cond],
    generation: i64,
    previous: &BTreeMap<String, (bool, String)>,
    now: &str,
) -> Value {
    Value::Array(
        conds
            .iter()
            .map(|(ty, ok, reason, message)| {
                let time = previous
                    .get(*ty)
                    .filter(|(was, _)| was == ok)
                    .map_or_else(|| now.to_owned(), |(_, t)| t.clone());
                json!({
                    "type": ty,
                    "status": if *ok { "True" } else { "False" },
                    "reason": reason,
                    "message": message,
                    "observedGeneration": generation,
                    "lastTransitionTime": time,
                })
            })
            .collect(),
    )
}

/// The status document for `o`, reusing transition times from the last one written.
pub fn status(o: &Observed, snapshot: &Snapshot, last: Option<&Value>, now: &str) -> Value {
    let times = |conds: Option<&Value>| -> BTreeMap<String, (bool, String)> {
        conds
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some((
                    c["type"].as_str()?.to_owned(),
                    (
                        c["status"] == "True",
                        c["lastTransitionTime"].as_str()?.to_owned(),
                    ),
                ))
            })
            .collect()
    };
    let (rollup, ancestors) = conditions_for(o, snapshot);
    let top = render(
        &rollup,
        o.generation,
        &times(last.map(|l| &l["conditions"])),
        now,
    );
    let ancestors: Vec<Value> = ancestors
        .into_iter()
        .enumerate()
        .map(|(i, (reference, conds))| {
            let previous = last.map(|l| &l["ancestors"][i]["conditions"]);
            json!({
                "ancestorRef": reference,
                "controllerName": CONTROLLER_NAME,
                "conditions": render(&conds, o.generation, &times(previous), now),
            })
        })
        .collect();
    json!({"observedGeneration": o.generation, "conditions": top, "ancestors": ancestors})
}

/// Without timestamps, to tell whether anything changed.
fn comparable(status: &Value) -> Value {
    let mut s = status.clone();
    let strip = |conds: &mut Value| {
        if let Some(list) = conds.as_array_mut() {
            for c in list {
                if let Some(o) = c.as_object_mut() {
                    o.remove("lastTransitionTime");
                }
            }
        }
    };
    strip(&mut s["conditions"]);
    if let Some(list) = s["ancestors"].as_array_mut() {
        for a in list {
            strip(&mut a["conditions"]);
        }
    }
    s
}

/// Writes statuses as policies and the services they name change, until the process ends.
/// Nothing is written until every watch has listed once (an optional API may be missing): a
/// status computed from a half-known cluster (a policy seen before its Service) would be
/// wrong, and rewriting it a moment later would lose its transition times.
pub async fn run(
    client: kube::Client,
    seen: Seen,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<crate::metrics::Metrics>,
    watches: super::watches::Watches,
) {
    let mut written: BTreeMap<(String, String, String), Value> = BTreeMap::new();
    while !watches.all_listed(super::KINDS) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        for o in seen.all() {
            let key = (o.kind.kind.to_owned(), o.namespace.clone(), o.name.clone());
            // The object's own status comes first: after a restart (or from another replica)
            // it is what we wrote before, so its transition times are kept and nothing is
            // rewritten. What we wrote last covers the moment before the watch shows it.
            let last = o.status.as_ref().or_else(|| written.get(&key));
            let next = status(&o, &snapshot, last, &now);
            let same = |l: &Value| comparable(l) == comparable(&next);
            if o.status.as_ref().is_some_and(same) || written.get(&key).is_some_and(same) {
                continue;
            }
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &o.namespace, &o.kind.api_resource());
            let body = json!({
                "apiVersion": o.kind.api_resource().api_version,
                "kind": o.kind.kind,
                "status": next,
            });
            match api
                .patch_status(
                    &o.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await
            {
                Ok(_) => {
                    metrics.status_write(o.kind.kind);
                    written.insert(key, next);
                }
                Err(e) => {
                    tracing::warn!(kind = o.kind.kind, namespace = %o.namespace, name = %o.name, error = %e, "status not written; retrying");
                }
            }
        }
        // Objects that are gone need no status.
        let live: Vec<(String, String, String)> = seen
            .all()
            .into_iter()
            .map(|o| (o.kind.kind.to_owned(), o.namespace, o.name))
            .collect();
        written.retain(|k, _| live.contains(k));
        tokio::select! {
            _ = snapshots.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
