//! One Git source, several nodes (a small site without Kubernetes): the pure part.
//!
//! Each workload's replicas are placed with [`crate::placement`] across the nodes whose labels
//! match its `nodeSelector` and that have room for its requests, spread, and kept where they
//! run. Each node then gets its own copy of the workload with `replicas` set to its share, and
//! is reconciled like a single node ([`crate::reconcile::plan`]): a replica that moves is a
//! scale-up on one node and a scale-down (or prune) on another, so no survivor restarts.
//! A node that is unreachable keeps its share for a grace period; after it, its replicas move.
//! A node that refuses a workload (its admission) is avoided for it until the next revision.

use std::collections::{BTreeMap, BTreeSet};

use hyperbox_api::NodeSummary;

use crate::manifests::ManifestSet;
use crate::placement::{matches, place_with, Amounts, Demand, NodeInfo, PressureWeights, Unplaced};
use crate::reconcile::{Outcome, WorkloadResult};

/// Workload → node (its `--node` address) → replicas there. A zero entry keeps the definition
/// of a workload that runs no replica (suspended, or `replicas: 0`) on that node.
pub type Counts = BTreeMap<String, BTreeMap<String, u32>>;

/// What the operator knows about one node this sync.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub key: String,
    /// The last summary it answered with (labels, allocatable, requested), if ever.
    pub summary: Option<NodeSummary>,
    /// Answered now, or not yet past the grace period: its replicas stay and it takes work.
    pub schedulable: bool,
    /// See [`NodeInfo::nominal_load`] (0 when the whole set is placed at once).
    pub nominal_load: u64,
}

/// Where every desired workload's replicas go, and the replicas that fit nowhere (by workload,
/// with the reason of each).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetPlacement {
    pub counts: Counts,
    pub unplaced: BTreeMap<String, Vec<Unplaced>>,
}

fn amounts(a: hyperbox_api::ResourceAmounts) -> Amounts {
    Amounts {
        cpu_millis: a.cpu_millis,
        memory_bytes: a.memory_bytes,
    }
}

/// Place the desired set. `previous` is where replicas run now (this source's own counts);
/// `avoid` the nodes that refused a workload.
pub fn place_fleet(
    set: &ManifestSet,
    previous: &Counts,
    nodes: &[NodeView],
    avoid: &BTreeMap<String, BTreeSet<String>>,
    weights: &PressureWeights,
) -> FleetPlacement {
    // Requests of this source's replicas on each node: what the node's `requested` holds for
    // us, and that this placement hands out again.
    let mut ours: BTreeMap<&str, Amounts> = BTreeMap::new();
    for (name, per_node) in previous {
        let Some(sw) = set.workloads.get(name) else {
            continue;
        };
        let r = sw.workload.request_per_replica();
        for (node, n) in per_node {
            let e = ours.entry(node.as_str()).or_default();
            e.cpu_millis += r.cpu_millis * *n as u64;
            e.memory_bytes += r.memory_bytes * *n as u64;
        }
    }
    let infos: Vec<NodeInfo> = nodes
        .iter()
        .map(|v| {
            let s = v.summary.clone().unwrap_or_default();
            let mine = ours.get(v.key.as_str()).copied().unwrap_or_default();
            NodeInfo {
                id: v.key.clone(),
                labels: s.labels.clone(),
                allocatable: amounts(s.allocatable),
                reserved: Amounts {
                    cpu_millis: s.requested.cpu_millis.saturating_sub(mine.cpu_millis),
                    memory_bytes: s.requested.memory_bytes.saturating_sub(mine.memory_bytes),
                },
                schedulable: v.schedulable && v.summary.is_some(),
                nominal_load: v.nominal_load,
                // The host's pressure, plus what the node's own workloads suffer on top (of
                // two nodes on one stalled host, the one whose workloads stall is worse), plus
                // how fast it rises.
                pressure: weights.score(
                    &[s.pressure.as_ref(), s.workloads_pressure.as_ref()]
                        .into_iter()
                        .flatten()
                        .collect::<Vec<_>>(),
                    s.pressure_trend.as_ref(),
                ),
            }
        })
        .collect();
    let demands: Vec<Demand> = set
        .workloads
        .iter()
        .map(|(name, sw)| {
            let w = &sw.workload;
            // Current replicas get ordinals node by node, in the order of the nodes given.
            let mut current = BTreeMap::new();
            let mut ordinal = 0u32;
            if let Some(per_node) = previous.get(name) {
                for v in nodes {
                    for _ in 0..per_node.get(&v.key).copied().unwrap_or(0) {
                        current.insert(ordinal, v.key.clone());
                        ordinal += 1;
                    }
                }
            }
            Demand {
                workload: name.clone(),
                replicas: w.desired_replicas(),
                node_selector: w.spec.node_selector.clone(),
                request: amounts(w.request_per_replica()),
                current,
                avoid: avoid.get(name).cloned().unwrap_or_default(),
            }
        })
        .collect();
    let placed = place_with(&demands, &infos, weights.band);
    let mut out = FleetPlacement::default();
    for ((name, _), node) in &placed.assigned {
        *out.counts
            .entry(name.clone())
            .or_default()
            .entry(node.clone())
            .or_default() += 1;
    }
    for ((name, _), why) in &placed.unplaced {
        out.unplaced.entry(name.clone()).or_default().push(*why);
    }
    // A workload with no replica to run still needs its definition somewhere: where it was,
    // else on the first node that matches and takes work.
    for (name, sw) in &set.workloads {
        if sw.workload.desired_replicas() > 0 {
            continue;
        }
        let avoided = avoid.get(name);
        let usable = |key: &str| {
            infos.iter().any(|n| {
                n.id == key
                    && n.schedulable
                    && avoided.is_none_or(|a| !a.contains(key))
                    && matches(&n.labels, &sw.workload.spec.node_selector)
            })
        };
        let kept: Vec<String> = previous
            .get(name)
            .map(|m| m.keys().filter(|k| usable(k)).cloned().collect())
            .unwrap_or_default();
        let home = if kept.is_empty() {
            infos
                .iter()
                .map(|n| n.id.clone())
                .find(|k| usable(k))
                .into_iter()
                .collect()
        } else {
            kept
        };
        if home.is_empty() {
            out.unplaced
                .entry(name.clone())
                .or_default()
                .push(Unplaced::NoMatchingNode);
        }
        for k in home {
            out.counts.entry(name.clone()).or_default().insert(k, 0);
        }
    }
    out
}

/// Images each node should keep ready (see the node's prewarming): those of `standby: true`
/// workloads on every node that matches their selector, and those of replicas no node could
/// take (pending) on every node that matches: when room appears there, the start needs no
/// registry. Only nodes that can take work.
pub fn prewarm_hints(
    set: &ManifestSet,
    placement: &FleetPlacement,
    nodes: &[NodeView],
) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, sw) in &set.workloads {
        let w = &sw.workload;
        if !(w.spec.standby || placement.unplaced.contains_key(name)) || w.spec.suspend {
            continue;
        }
        for v in nodes.iter().filter(|v| v.schedulable) {
            let Some(s) = &v.summary else { continue };
            if matches(&s.labels, &w.spec.node_selector) {
                out.entry(v.key.clone())
                    .or_default()
                    .push(w.spec.image.clone());
            }
        }
    }
    for images in out.values_mut() {
        images.sort();
        images.dedup();
    }
    out
}

/// The desired set for one node: the workloads placed there, each with `replicas` set to the
/// node's share (a suspended one keeps its spec).
pub fn node_set(set: &ManifestSet, counts: &Counts, node: &str) -> ManifestSet {
    let mut out = ManifestSet {
        workloads: BTreeMap::new(),
        files: set.files.clone(),
        protected: set.protected.clone(),
        broken_files: set.broken_files.clone(),
    };
    for (name, sw) in &set.workloads {
        let Some(n) = counts.get(name).and_then(|m| m.get(node)) else {
            continue;
        };
        let mut copy = sw.clone();
        if !copy.workload.spec.suspend && !copy.workload.spec.standby {
            copy.workload.spec.replicas = *n;
        }
        out.workloads.insert(name.clone(), copy);
    }
    out
}

fn rank(o: Outcome) -> u8 {
    match o {
        Outcome::Failed => 7,
        Outcome::Restored => 6,
        Outcome::Updated => 5,
        Outcome::Created => 4,
        Outcome::Skipped => 3,
        Outcome::Orphaned => 2,
        Outcome::Pruned => 1,
        Outcome::Unchanged => 0,
    }
}

/// One result per workload from the nodes' results. A desired workload that left a node
/// (pruned there) has moved, not gone: its outcome comes from the nodes that run it, and a
/// move to a new node counts as an update. Replicas that fit nowhere make it `failed`.
pub fn merge_results(
    set: &ManifestSet,
    per_node: &[(String, Vec<WorkloadResult>)],
    placement: &FleetPlacement,
) -> Vec<WorkloadResult> {
    let mut by_name: BTreeMap<String, Vec<(&str, &WorkloadResult)>> = BTreeMap::new();
    for (node, results) in per_node {
        for r in results {
            by_name.entry(r.name.clone()).or_default().push((node, r));
        }
    }
    for name in placement.unplaced.keys() {
        by_name.entry(name.clone()).or_default();
    }
    let mut out = Vec::new();
    for (name, rs) in by_name {
        let desired = set.workloads.contains_key(&name);
        let mut keep: Vec<(&str, &WorkloadResult)> = rs
            .iter()
            .copied()
            .filter(|(_, r)| !desired || r.outcome != Outcome::Pruned)
            .collect();
        let moved = desired && keep.len() < rs.len();
        if keep.is_empty() {
            keep = rs.clone();
        }
        let top = keep.iter().max_by_key(|(_, r)| rank(r.outcome));
        let mut outcome = top.map(|(_, r)| r.outcome).unwrap_or(Outcome::Failed);
        if moved && outcome == Outcome::Unchanged {
            outcome = Outcome::Updated;
        }
        let mut messages: Vec<String> = keep
            .iter()
            .filter_map(|(node, r)| r.message.as_ref().map(|m| format!("{node}: {m}")))
            .collect();
        if let Some(why) = placement.unplaced.get(&name) {
            let want = set
                .workloads
                .get(&name)
                .map(|sw| sw.workload.desired_replicas())
                .unwrap_or(0);
            let mut reasons: Vec<&str> = why.iter().map(|u| u.reason()).collect();
            reasons.dedup();
            messages.insert(
                0,
                format!(
                    "{} of {want} replicas could not be placed on any node: {}",
                    why.len(),
                    reasons.join(", ")
                ),
            );
            outcome = Outcome::Failed;
        }
        if let Some(per_node) = placement.counts.get(&name) {
            let shares: Vec<String> = per_node.iter().map(|(k, n)| format!("{k}={n}")).collect();
            messages.push(format!("placed: {}", shares.join(", ")));
        }
        out.push(WorkloadResult {
            name,
            file: top.and_then(|(_, r)| r.file.clone()),
            outcome,
            message: (!messages.is_empty()).then(|| messages.join("; ")),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::{assemble, parse_file};
    use crate::placement::DEFAULT_PRESSURE_WEIGHTS;
    use std::sync::Arc;

    const MI: u64 = 1 << 20;

    fn set(docs: &[(&str, &str)]) -> ManifestSet {
        assemble(
            docs.iter()
                .map(|(name, extra)| {
                    let text = format!(
                        "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n  image: r.io/a:1\n{extra}"
                    );
                    (format!("{name}.yaml"), Arc::new(parse_file(text.as_bytes())))
                })
                .collect(),
        )
    }

    /// Placement without refusals, with the default weights.
    fn place_plain(s: &ManifestSet, prev: &Counts, nodes: &[NodeView]) -> FleetPlacement {
        place_fleet(s, prev, nodes, &BTreeMap::new(), &DEFAULT_PRESSURE_WEIGHTS)
    }

    fn view(key: &str, zone: &str, mem_mi: u64, requested_mi: u64) -> NodeView {
        NodeView {
            key: key.into(),
            summary: Some(NodeSummary {
                labels: [("zone".to_string(), zone.to_string())].into(),
                allocatable: hyperbox_api::ResourceAmounts {
                    cpu_millis: 2000,
                    memory_bytes: mem_mi * MI,
                },
                requested: hyperbox_api::ResourceAmounts {
                    cpu_millis: 0,
                    memory_bytes: requested_mi * MI,
                },
                ..Default::default()
            }),
            schedulable: true,
            nominal_load: 0,
        }
    }

    #[test]
    fn replicas_spread_and_each_node_gets_its_share() {
        let s = set(&[("web", "  replicas: 3\n"), ("job", "  replicas: 1\n")]);
        let nodes = [view("a", "x", 1000, 0), view("b", "x", 1000, 0)];
        let p = place_plain(&s, &Counts::new(), &nodes);
        let web = &p.counts["web"];
        assert_eq!(web.values().sum::<u32>(), 3);
        assert!(web.values().all(|n| *n >= 1), "{p:?}");
        let a = node_set(&s, &p.counts, "a");
        let b = node_set(&s, &p.counts, "b");
        assert_eq!(
            a.workloads["web"].workload.spec.replicas + b.workloads["web"].workload.spec.replicas,
            3
        );
        // job runs on one node only; the other does not get a copy.
        assert_eq!(
            a.workloads.contains_key("job") as u8 + b.workloads.contains_key("job") as u8,
            1
        );
    }

    #[test]
    fn our_own_requests_are_not_counted_twice_and_others_are() {
        // Node a: 1000Mi, of which 600Mi are requested by our web (2 x 300Mi) already.
        let s = set(&[(
            "web",
            "  replicas: 2\n  resources: {requests: {memory: 300Mi}}\n",
        )]);
        let prev: Counts = [("web".to_string(), [("a".to_string(), 2)].into())].into();
        let p = place_plain(&s, &prev, &[view("a", "x", 1000, 600)]);
        assert_eq!(p.counts["web"]["a"], 2, "{p:?}");
        assert!(p.unplaced.is_empty());
        // With 600Mi requested by someone else, only one fits.
        let p = place_plain(&s, &Counts::new(), &[view("a", "x", 1000, 600)]);
        assert_eq!(p.counts["web"]["a"], 1);
        assert_eq!(p.unplaced["web"], vec![Unplaced::InsufficientMemory]);
    }

    #[test]
    fn an_unschedulable_node_loses_its_replicas_and_selectors_hold() {
        let s = set(&[
            ("web", "  replicas: 2\n"),
            ("north", "  nodeSelector: {zone: n}\n"),
        ]);
        let prev: Counts = [
            (
                "web".to_string(),
                [("a".to_string(), 1), ("b".to_string(), 1)].into(),
            ),
            ("north".to_string(), [("a".to_string(), 1)].into()),
        ]
        .into();
        let mut nodes = [view("a", "n", 1000, 0), view("b", "s", 1000, 0)];
        let p = place_plain(&s, &prev, &nodes);
        assert_eq!(p.counts, prev);
        nodes[0].schedulable = false;
        let p = place_plain(&s, &prev, &nodes);
        assert_eq!(p.counts["web"], [("b".to_string(), 2)].into());
        assert!(!p.counts.contains_key("north"));
        assert_eq!(p.unplaced["north"], vec![Unplaced::NoMatchingNode]);
    }

    #[test]
    fn workloads_without_replicas_keep_one_definition() {
        let s = set(&[
            ("off", "  suspend: true\n  replicas: 3\n"),
            ("zero", "  replicas: 0\n"),
        ]);
        let nodes = [view("a", "x", 1000, 0), view("b", "x", 1000, 0)];
        let p = place_plain(&s, &Counts::new(), &nodes);
        assert_eq!(p.counts["off"], [("a".to_string(), 0)].into());
        assert_eq!(p.counts["zero"], [("a".to_string(), 0)].into());
        // A suspended workload keeps its spec (replicas included) on its node.
        let a = node_set(&s, &p.counts, "a");
        assert_eq!(a.workloads["off"].workload.spec.replicas, 3);
        assert!(node_set(&s, &p.counts, "b").workloads.is_empty());
        // It stays where it is.
        let prev: Counts = [("off".to_string(), [("b".to_string(), 0)].into())].into();
        let p = place_plain(&s, &prev, &nodes);
        assert_eq!(p.counts["off"], [("b".to_string(), 0)].into());
    }

    fn psi(cpu: f32, memory: f32) -> hyperbox_api::Pressure {
        let mut p = hyperbox_api::Pressure::default();
        p.cpu.some.avg10 = cpu;
        p.memory.some.avg10 = memory;
        p
    }

    #[test]
    fn pressure_levels_and_rises_steer_new_replicas_by_the_weights() {
        let s = set(&[("web", "  replicas: 1\n")]);
        let place = |a: NodeView, b: NodeView, w: &PressureWeights| {
            let p = place_fleet(&s, &Counts::new(), &[a, b], &BTreeMap::new(), w);
            p.counts["web"].keys().next().unwrap().clone()
        };
        // Equal room; "a" has more memory free, so it wins while both are calm.
        let calm = |k: &str, mem: u64| view(k, "x", mem, 0);
        assert_eq!(
            place(calm("a", 2000), calm("b", 1000), &DEFAULT_PRESSURE_WEIGHTS),
            "a"
        );
        // cpu 15 on "a" (band 1) against memory 4 on "b" (8 points, band 0): "b".
        let mut a = calm("a", 2000);
        a.summary.as_mut().unwrap().pressure = Some(psi(15.0, 0.0));
        let mut b = calm("b", 1000);
        b.summary.as_mut().unwrap().pressure = Some(psi(0.0, 4.0));
        assert_eq!(place(a.clone(), b.clone(), &DEFAULT_PRESSURE_WEIGHTS), "b");
        // With memory weighted 5, "b" scores 20 (band 2): "a".
        let heavy = PressureWeights::parse("memory=5").unwrap();
        assert_eq!(place(a.clone(), b.clone(), &heavy), "a");
        // A rising node loses a tie of levels: same level, "a" rising by 12 points.
        let mut a = calm("a", 2000);
        a.summary.as_mut().unwrap().pressure_trend = Some(hyperbox_api::PressureTrend {
            cpu: 12.0,
            over_seconds: 10.0,
            ..Default::default()
        });
        assert_eq!(
            place(a.clone(), calm("b", 1000), &DEFAULT_PRESSURE_WEIGHTS),
            "b"
        );
        // ... unless the trend is weighted out, and a fall earns nothing.
        let no_trend = PressureWeights::parse("trend=0").unwrap();
        assert_eq!(place(a.clone(), calm("b", 1000), &no_trend), "a");
        a.summary.as_mut().unwrap().pressure_trend = Some(hyperbox_api::PressureTrend {
            cpu: -30.0,
            ..Default::default()
        });
        let mut b = calm("b", 1000);
        b.summary.as_mut().unwrap().pressure = Some(psi(0.0, 0.0));
        assert_eq!(place(a, b, &DEFAULT_PRESSURE_WEIGHTS), "a");
    }

    #[test]
    fn standby_and_pending_images_are_prewarmed_on_matching_nodes() {
        let s = set(&[
            ("spare", "  standby: true\n  nodeSelector: {zone: x}\n"),
            ("huge", "  resources: {requests: {memory: 5000Mi}}\n"),
            ("web", "  replicas: 2\n"),
        ]);
        let nodes = [view("a", "x", 1000, 0), view("b", "y", 1000, 0)];
        let p = place_plain(&s, &Counts::new(), &nodes);
        assert!(p.unplaced.contains_key("huge"));
        let hints = prewarm_hints(&s, &p, &nodes);
        let img = |n: &str| s.workloads[n].workload.spec.image.clone();
        let mut a = vec![img("huge"), img("spare")];
        a.sort();
        a.dedup();
        assert_eq!(hints["a"], a, "{hints:?}");
        assert_eq!(hints["b"], vec![img("huge")], "{hints:?}");
        // A standby workload runs no replica on the node that holds it.
        let holder = p.counts["spare"].keys().next().unwrap().clone();
        assert_eq!(
            node_set(&s, &p.counts, &holder).workloads["spare"]
                .workload
                .desired_replicas(),
            0
        );
    }

    #[test]
    fn pressure_weights_parse_with_clear_errors() {
        let w = PressureWeights::parse("cpu=0.5, trend=2,band=5").unwrap();
        assert_eq!((w.cpu, w.memory, w.trend, w.band), (0.5, 2.0, 2.0, 5.0));
        assert_eq!(
            PressureWeights::parse("").unwrap(),
            DEFAULT_PRESSURE_WEIGHTS
        );
        for (bad, says) in [
            ("cpu", "NAME=NUMBER"),
            ("cpu=-1", "zero or more"),
            ("cpu=lots", "zero or more"),
            ("band=0", "above zero"),
            ("gpu=1", "not a pressure weight"),
        ] {
            let e = PressureWeights::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn results_merge_moves_and_unplaced_replicas() {
        let s = set(&[("web", "  replicas: 3\n"), ("gone", "")]);
        let r = |name: &str, outcome| WorkloadResult {
            name: name.into(),
            file: Some(format!("{name}.yaml")),
            outcome,
            message: None,
        };
        let placement = FleetPlacement {
            counts: [("web".to_string(), [("b".to_string(), 2)].into())].into(),
            unplaced: [("web".to_string(), vec![Unplaced::InsufficientCpu])].into(),
        };
        let merged = merge_results(
            &s,
            &[
                (
                    "a".into(),
                    vec![r("web", Outcome::Pruned), r("old", Outcome::Pruned)],
                ),
                ("b".into(), vec![r("web", Outcome::Unchanged)]),
            ],
            &placement,
        );
        let web = merged.iter().find(|m| m.name == "web").unwrap();
        assert_eq!(web.outcome, Outcome::Failed);
        let msg = web.message.as_deref().unwrap();
        assert!(
            msg.starts_with("1 of 3 replicas could not be placed on any node: InsufficientCPU"),
            "{msg}"
        );
        assert!(msg.ends_with("placed: b=2"), "{msg}");
        let old = merged.iter().find(|m| m.name == "old").unwrap();
        assert_eq!(old.outcome, Outcome::Pruned);
        // A move alone reads as an update.
        let placed = FleetPlacement {
            counts: placement.counts.clone(),
            unplaced: BTreeMap::new(),
        };
        let merged = merge_results(
            &s,
            &[
                ("a".into(), vec![r("web", Outcome::Pruned)]),
                ("b".into(), vec![r("web", Outcome::Unchanged)]),
            ],
            &placed,
        );
        assert_eq!(merged[0].outcome, Outcome::Updated);
    }
}
