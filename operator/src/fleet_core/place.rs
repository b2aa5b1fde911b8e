//! Placing a desired set of workloads across the nodes: each workload's replicas go to the
//! nodes whose labels match its `nodeSelector` and that have room for its requests, spread,
//! and kept where they run (see [`super::placement`] for the rules). A workload that runs no
//! replica (suspended, `replicas: 0`) still gets a home for its definition. The images a node
//! should keep ready (standby workloads, replicas that fit nowhere) come from the same view.

use std::collections::{BTreeMap, BTreeSet};

use hyperbox_api::NodeSummary;

use hyperbox_api::Workload;

use super::placement::{matches, place_with, Amounts, Demand, NodeInfo, PressureWeights, Unplaced};

/// Workload → node (its `--node` address) → replicas there. A zero entry keeps the definition
/// of a workload that runs no replica (suspended, or `replicas: 0`) on that node.
pub type Counts = BTreeMap<String, BTreeMap<String, u32>>;

/// The workloads to place, by name (a Git source's key, or a Workload's `namespace/name`).
pub type Desired<'a> = BTreeMap<&'a str, &'a Workload>;

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
    desired: &Desired,
    previous: &Counts,
    nodes: &[NodeView],
    avoid: &BTreeMap<String, BTreeSet<String>>,
    weights: &PressureWeights,
) -> FleetPlacement {
    // Requests of this source's replicas on each node: what the node's `requested` holds for
    // us, and that this placement hands out again.
    let mut ours: BTreeMap<&str, Amounts> = BTreeMap::new();
    for (name, per_node) in previous {
        let Some(w) = desired.get(name.as_str()) else {
            continue;
        };
        let r = w.request_per_replica();
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
    let demands: Vec<Demand> = desired
        .iter()
        .map(|(&name, w)| {
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
                workload: name.to_string(),
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
    for (&name, w) in desired {
        if w.desired_replicas() > 0 {
            continue;
        }
        let avoided = avoid.get(name);
        let usable = |key: &str| {
            infos.iter().any(|n| {
                n.id == key
                    && n.schedulable
                    && avoided.is_none_or(|a| !a.contains(key))
                    && matches(&n.labels, &w.spec.node_selector)
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
                .entry(name.to_string())
                .or_default()
                .push(Unplaced::NoMatchingNode);
        }
        for k in home {
            out.counts.entry(name.to_string()).or_default().insert(k, 0);
        }
    }
    out
}

/// Images each node should keep ready (see the node's prewarming): those of `standby: true`
/// workloads on every node that matches their selector, and those of replicas no node could
/// take (pending) on every node that matches: when room appears there, the start needs no
/// registry. Only nodes that can take work.
pub fn prewarm_hints(
    desired: &Desired,
    placement: &FleetPlacement,
    nodes: &[NodeView],
) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (&name, w) in desired {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet_core::placement::DEFAULT_PRESSURE_WEIGHTS;
    use crate::fleet_core::testing::{desired, view, workloads};

    /// Placement without refusals, with the default weights.
    fn place_plain(s: &[Workload], prev: &Counts, nodes: &[NodeView]) -> FleetPlacement {
        place_fleet(
            &desired(s),
            prev,
            nodes,
            &BTreeMap::new(),
            &DEFAULT_PRESSURE_WEIGHTS,
        )
    }

    #[test]
    fn replicas_spread_and_each_node_gets_its_share() {
        let s = workloads(&[("web", "  replicas: 3\n"), ("job", "  replicas: 1\n")]);
        let nodes = [view("a", "x", 1000, 0), view("b", "x", 1000, 0)];
        let p = place_plain(&s, &Counts::new(), &nodes);
        let web = &p.counts["web"];
        assert_eq!(web.values().sum::<u32>(), 3);
        assert!(web.values().all(|n| *n >= 1), "{p:?}");
        // job runs on one node only.
        assert_eq!(p.counts["job"].len(), 1, "{p:?}");
    }

    #[test]
    fn our_own_requests_are_not_counted_twice_and_others_are() {
        // Node a: 1000Mi, of which 600Mi are requested by our web (2 x 300Mi) already.
        let s = workloads(&[(
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
        let s = workloads(&[
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
        let s = workloads(&[
            ("off", "  suspend: true\n  replicas: 3\n"),
            ("zero", "  replicas: 0\n"),
        ]);
        let nodes = [view("a", "x", 1000, 0), view("b", "x", 1000, 0)];
        let p = place_plain(&s, &Counts::new(), &nodes);
        assert_eq!(p.counts["off"], [("a".to_string(), 0)].into());
        assert_eq!(p.counts["zero"], [("a".to_string(), 0)].into());
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
        let s = workloads(&[("web", "  replicas: 1\n")]);
        let place = |a: NodeView, b: NodeView, w: &PressureWeights| {
            let p = place_fleet(&desired(&s), &Counts::new(), &[a, b], &BTreeMap::new(), w);
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
        let s = workloads(&[
            ("spare", "  standby: true\n  nodeSelector: {zone: x}\n"),
            ("huge", "  resources: {requests: {memory: 5000Mi}}\n"),
            ("web", "  replicas: 2\n"),
        ]);
        let nodes = [view("a", "x", 1000, 0), view("b", "y", 1000, 0)];
        let p = place_plain(&s, &Counts::new(), &nodes);
        assert!(p.unplaced.contains_key("huge"));
        let hints = prewarm_hints(&desired(&s), &p, &nodes);
        let img = |n: &str| desired(&s)[n].spec.image.clone();
        let mut a = vec![img("huge"), img("spare")];
        a.sort();
        a.dedup();
        assert_eq!(hints["a"], a, "{hints:?}");
        assert_eq!(hints["b"], vec![img("huge")], "{hints:?}");
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
}
