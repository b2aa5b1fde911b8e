//! The pure part of a sync: desired (one revision's manifests) + what this source applied before
//! (the inventory) + what the node runs (observed) -> what to apply, what to prune, and a result
//! per workload. No I/O here.

use std::collections::BTreeMap;

use hyperbox_api::{config_hash, Workload, REVISION_ANNOTATION};
use serde::{Deserialize, Serialize};

use crate::manifests::ManifestSet;

/// Set on a workload to keep it when it disappears from the source (Flux's `prune: disabled`).
pub const PRUNE_ANNOTATION: &str = "hyperbox.dev/prune";

/// What this source applied, by workload name: the basis for pruning only our own workloads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryEntry {
    pub file: String,
    pub spec_hash: String,
    /// False when the workload carries `hyperbox.dev/prune: disabled`.
    pub prune: bool,
}

pub type Inventory = BTreeMap<String, InventoryEntry>;

/// A workload as the node reports it. `spec_hash` holds its config hash (the whole desired
/// state, replica count included), the same hash the inventory records.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    /// The config hash of the node's copy (the spec hash from nodes older than it).
    pub spec_hash: String,
    /// The pod-template hash of the node's copy ([`hyperbox_api::spec_hash`]).
    pub template_hash: String,
    /// Replicas the node evicted for pressure (a fleet places them on other nodes).
    pub evicted_for_pressure: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// New on the node.
    Created,
    /// The spec changed in the source.
    Updated,
    /// Deleted or changed on the node out of band, and put back.
    Restored,
    Unchanged,
    /// Bad in this revision: the previous version (if any) keeps running.
    Skipped,
    /// Removed from the source and deleted from the node.
    Pruned,
    /// Removed from the source but kept running (prune off, or the workload opted out).
    Orphaned,
    /// The node did not take it (unreachable, refused, or too large to send): the previous
    /// version, if any, keeps running.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadResult {
    pub name: String,
    pub file: Option<String>,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub apply: Vec<Workload>,
    pub delete: Vec<String>,
    pub results: Vec<WorkloadResult>,
    /// The inventory to record once the plan has been carried out.
    pub inventory: Inventory,
}

pub fn plan(
    desired: &ManifestSet,
    revision: &str,
    inventory: &Inventory,
    observed: &BTreeMap<String, Observed>,
    prune: bool,
) -> Plan {
    let mut p = Plan::default();
    for (name, sw) in &desired.workloads {
        let mut w = sw.workload.clone();
        w.metadata
            .annotations
            .insert(REVISION_ANNOTATION.to_string(), revision.to_string());
        let hash = config_hash(&w);
        let previous = inventory.get(name);
        let outcome = match observed.get(name) {
            None if previous.is_some() => Outcome::Restored,
            None => Outcome::Created,
            // Same hash as what we applied last time: the node was changed behind our back.
            Some(o) if o.spec_hash != hash && previous.is_some_and(|e| e.spec_hash == hash) => {
                Outcome::Restored
            }
            // Changed in the source (or someone else's workload of that name, taken over).
            Some(o) if o.spec_hash != hash => Outcome::Updated,
            Some(_) => Outcome::Unchanged,
        };
        // A workload this revision leaves as it was is not sent again: it keeps the revision
        // annotation of the commit that last changed it, and a push costs what it changed.
        let needs_apply = observed.get(name).is_none_or(|o| o.spec_hash != hash);
        if needs_apply {
            p.apply.push(w.clone());
        }
        p.results.push(WorkloadResult {
            name: name.clone(),
            file: Some(sw.file.clone()),
            outcome,
            message: None,
        });
        p.inventory.insert(
            name.clone(),
            InventoryEntry {
                file: sw.file.clone(),
                spec_hash: hash,
                prune: w
                    .metadata
                    .annotations
                    .get(PRUNE_ANNOTATION)
                    .map(String::as_str)
                    != Some("disabled"),
            },
        );
    }
    for name in &desired.protected {
        let kept = inventory.get(name);
        p.results.push(WorkloadResult {
            name: name.clone(),
            file: kept.map(|e| e.file.clone()),
            outcome: Outcome::Skipped,
            message: Some(if kept.is_some() {
                "invalid in this revision: the previously applied version keeps running".into()
            } else {
                "invalid in this revision: not applied".into()
            }),
        });
        if let Some(e) = kept {
            p.inventory.insert(name.clone(), e.clone());
        }
    }
    for (name, entry) in inventory {
        if desired.workloads.contains_key(name) || desired.protected.contains(name) {
            continue;
        }
        if desired.broken_files.contains(&entry.file) {
            // Its file could not be read to the end: it may well still be there.
            p.results.push(WorkloadResult {
                name: name.clone(),
                file: Some(entry.file.clone()),
                outcome: Outcome::Skipped,
                message: Some(format!(
                    "{} is unreadable in this revision: the previously applied version keeps running",
                    entry.file
                )),
            });
            p.inventory.insert(name.clone(), entry.clone());
            continue;
        }
        let (outcome, message) = if !prune {
            (Outcome::Orphaned, "removed from the source; pruning is off")
        } else if !entry.prune {
            (
                Outcome::Orphaned,
                "removed from the source; hyperbox.dev/prune: disabled",
            )
        } else {
            if observed.contains_key(name) {
                p.delete.push(name.clone());
            }
            (Outcome::Pruned, "removed from the source")
        };
        p.results.push(WorkloadResult {
            name: name.clone(),
            file: Some(entry.file.clone()),
            outcome,
            message: Some(message.into()),
        });
    }
    p.results.sort_by(|a, b| a.name.cmp(&b.name));
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::{assemble, parse_file};
    use std::sync::Arc;

    fn doc(name: &str, arg: &str) -> String {
        format!("apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  image: r.io/a:1\n  args: ['{arg}']\n")
    }

    fn set(files: &[(&str, String)]) -> ManifestSet {
        assemble(
            files
                .iter()
                .map(|(p, t)| (p.to_string(), Arc::new(parse_file(t.as_bytes()))))
                .collect(),
        )
    }

    fn observe(p: &Plan) -> BTreeMap<String, Observed> {
        p.apply
            .iter()
            .map(|w| {
                (
                    w.metadata.name.clone(),
                    Observed {
                        spec_hash: config_hash(w),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    fn outcome(p: &Plan, name: &str) -> Outcome {
        p.results.iter().find(|r| r.name == name).unwrap().outcome
    }

    #[test]
    fn create_then_nothing_then_update_then_prune() {
        let s1 = set(&[("a.yaml", doc("a", "1")), ("b.yaml", doc("b", "1"))]);
        let p1 = plan(&s1, "r1", &Inventory::new(), &BTreeMap::new(), true);
        assert_eq!(p1.apply.len(), 2);
        assert_eq!(outcome(&p1, "a"), Outcome::Created);
        assert_eq!(p1.apply[0].metadata.annotations[REVISION_ANNOTATION], "r1");
        let obs = observe(&p1);

        let p2 = plan(&s1, "r1", &p1.inventory, &obs, true);
        assert!(p2.apply.is_empty() && p2.delete.is_empty());
        assert_eq!(outcome(&p2, "b"), Outcome::Unchanged);

        // A new revision that changes a, removes b.
        let s3 = set(&[("a.yaml", doc("a", "2"))]);
        let p3 = plan(&s3, "r2", &p1.inventory, &obs, true);
        assert_eq!(outcome(&p3, "a"), Outcome::Updated);
        assert_eq!(outcome(&p3, "b"), Outcome::Pruned);
        assert_eq!(p3.delete, vec!["b"]);
        assert!(!p3.inventory.contains_key("b"));
    }

    #[test]
    fn a_new_revision_sends_only_what_it_changed() {
        let s = set(&[("a.yaml", doc("a", "1")), ("b.yaml", doc("b", "1"))]);
        let p1 = plan(&s, "r1", &Inventory::new(), &BTreeMap::new(), true);
        let obs = observe(&p1);
        let p2 = plan(&s, "r2", &p1.inventory, &obs, true);
        assert!(p2.apply.is_empty(), "{:?}", p2.apply);
        assert_eq!(outcome(&p2, "a"), Outcome::Unchanged);
        assert_eq!(p2.inventory, p1.inventory);
        let s3 = set(&[("a.yaml", doc("a", "2")), ("b.yaml", doc("b", "1"))]);
        let p3 = plan(&s3, "r3", &p2.inventory, &obs, true);
        assert_eq!(p3.apply.len(), 1);
        assert_eq!(p3.apply[0].metadata.name, "a");
        assert_eq!(p3.apply[0].metadata.annotations[REVISION_ANNOTATION], "r3");
        assert_eq!(outcome(&p3, "b"), Outcome::Unchanged);
    }

    #[test]
    fn drift_is_restored() {
        let s = set(&[("a.yaml", doc("a", "1")), ("b.yaml", doc("b", "1"))]);
        let p1 = plan(&s, "r1", &Inventory::new(), &BTreeMap::new(), true);
        let mut obs = observe(&p1);
        obs.remove("a"); // deleted on the node
        obs.get_mut("b").unwrap().spec_hash = "edited".into(); // changed on the node
        let p2 = plan(&s, "r1", &p1.inventory, &obs, true);
        assert_eq!(outcome(&p2, "a"), Outcome::Restored);
        assert_eq!(outcome(&p2, "b"), Outcome::Restored);
        assert_eq!(p2.apply.len(), 2);
    }

    #[test]
    fn broken_documents_keep_the_previous_version() {
        let s1 = set(&[
            ("a.yaml", doc("a", "1")),
            ("b.yaml", doc("b", "1")),
            ("c.yaml", doc("c", "1")),
        ]);
        let p1 = plan(&s1, "r1", &Inventory::new(), &BTreeMap::new(), true);
        let obs = observe(&p1);
        let bad_b = doc("b", "2").replace("args:", "argz:");
        let s2 = set(&[
            ("a.yaml", doc("a", "2")),
            ("b.yaml", bad_b),
            ("c.yaml", "key: [oops\n".into()),
        ]);
        let p2 = plan(&s2, "r2", &p1.inventory, &obs, true);
        assert_eq!(outcome(&p2, "a"), Outcome::Updated);
        assert_eq!(outcome(&p2, "b"), Outcome::Skipped);
        assert_eq!(outcome(&p2, "c"), Outcome::Skipped);
        assert!(p2.delete.is_empty(), "nothing broken is pruned");
        assert_eq!(
            p2.apply
                .iter()
                .map(|w| w.metadata.name.as_str())
                .collect::<Vec<_>>(),
            vec!["a"]
        );
        assert_eq!(p2.inventory["b"], p1.inventory["b"]);
        assert!(p2.inventory.contains_key("c"));
    }

    #[test]
    fn prune_off_and_opt_out_orphan_instead() {
        let keep = doc("k", "1").replace(
            "  name: k\n",
            "  name: k\n  annotations: {hyperbox.dev/prune: disabled}\n",
        );
        let s1 = set(&[("a.yaml", doc("a", "1")), ("k.yaml", keep)]);
        let p1 = plan(&s1, "r1", &Inventory::new(), &BTreeMap::new(), true);
        let obs = observe(&p1);
        let empty = set(&[]);
        let p2 = plan(&empty, "r2", &p1.inventory, &obs, true);
        assert_eq!(outcome(&p2, "a"), Outcome::Pruned);
        assert_eq!(outcome(&p2, "k"), Outcome::Orphaned);
        assert_eq!(p2.delete, vec!["a"]);
        let p3 = plan(&empty, "r2", &p1.inventory, &obs, false);
        assert!(p3.delete.is_empty());
        assert_eq!(outcome(&p3, "a"), Outcome::Orphaned);
    }

    #[test]
    fn only_our_own_workloads_are_pruned() {
        let s = set(&[]);
        let mut obs = BTreeMap::new();
        obs.insert(
            "someone-elses".to_string(),
            Observed {
                spec_hash: "x".into(),
                ..Default::default()
            },
        );
        let p = plan(&s, "r1", &Inventory::new(), &obs, true);
        assert!(p.delete.is_empty());
    }
}
