//! The fleet core's one decision: given the desired workloads, where their replicas are now,
//! what the nodes hold and how far their copies are, and the nodes as the core judges them,
//! decide where the replicas go and what each node gets of each workload. Both sources call
//! it: the Git fleet for its whole set at each sync, the Kubernetes controller for one
//! Workload at each reconcile. They only observe (nodes, copies) and carry out the steps.
//!
//! For every workload, each node it is placed on gets a [`Step::Send`] of its own copy (the
//! workload with `replicas` set to the node's share, and its part of the rollout budget when
//! it rolls) or a [`Step::Hold`] (its turn in the rollout has not come: it keeps the copy it
//! has). A node that held the workload or had replicas placed on it, and is no longer placed
//! on, gets a [`Step::Remove`].

use std::collections::{BTreeMap, BTreeSet};

use hyperbox_api::{spec_hash, Workload};

use super::place::{place_fleet, Counts, Desired, FleetPlacement, NodeView};
use super::placement::PressureWeights;
use super::rollout::{self, Copy, Gate, Share};

/// What one node gets of one workload.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// This copy: the node's share of the replicas, and its rollout bounds when it rolls.
    Send(Box<Workload>),
    /// Nothing: the node keeps the copy it has until its turn in the rollout.
    Hold,
    /// The node should no longer run it (its replicas went elsewhere, or it is not desired).
    Remove,
}

/// What the core is told of the fleet besides the desired set and the nodes.
#[derive(Debug, Clone, Copy)]
pub struct Known<'a> {
    /// Where each workload's replicas were placed (workload → node → replicas).
    pub previous: &'a Counts,
    /// Nodes holding a copy of ours, by workload: a node back from an outage can hold one
    /// that is no longer placed there.
    pub holders: &'a BTreeMap<String, BTreeSet<String>>,
    /// How far each node's copy is, by workload, where it is known (a workload with none
    /// here is not rolling: every node gets the spec as written).
    pub copies: &'a BTreeMap<String, BTreeMap<String, Copy>>,
    /// Copies whose state was asked for and is not known, by workload (the nodes that did
    /// not answer): in a rollout they wait, since their replicas cannot be counted.
    pub unknown: &'a BTreeMap<String, BTreeSet<String>>,
    /// Nodes each workload avoids (refused it, evicted it for pressure lately).
    pub avoid: &'a BTreeMap<String, BTreeSet<String>>,
}

/// What the core decided for a desired set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    pub placement: FleetPlacement,
    /// Workload → node → step.
    pub steps: BTreeMap<String, BTreeMap<String, Step>>,
    /// Workloads rolling out across nodes: some node holds, or rolls within a part of the
    /// budget. The source looks at their nodes again soon.
    pub rolling: BTreeSet<String>,
}

impl Decision {
    /// The step of one workload on one node, if any.
    pub fn step(&self, workload: &str, node: &str) -> Option<&Step> {
        self.steps.get(workload).and_then(|m| m.get(node))
    }
}

/// The node's copy of a workload: its share of the replicas, unless the workload runs none
/// (suspended or standby keep their spec as written).
pub fn copy_for(w: &Workload, replicas: u32) -> Workload {
    let mut copy = w.clone();
    if runs_replicas(w) {
        copy.spec.replicas = replicas;
    }
    copy
}

fn runs_replicas(w: &Workload) -> bool {
    !w.spec.suspend && !w.spec.standby
}

/// Place the desired set and decide each node's step for each workload.
pub fn decide(
    desired: &Desired,
    known: Known,
    nodes: &[NodeView],
    weights: &PressureWeights,
) -> Decision {
    let placement = place_fleet(desired, known.previous, nodes, known.avoid, weights);
    let mut steps: BTreeMap<String, BTreeMap<String, Step>> = BTreeMap::new();
    let mut rolling = BTreeSet::new();
    let empty = BTreeMap::new();
    for (&name, w) in desired {
        let counts = placement.counts.get(name).unwrap_or(&empty);
        let mut gates: BTreeMap<String, Gate> = match known.copies.get(name) {
            // No copy of it is known: nothing rolls, and its spec is not hashed (the Git
            // fleet knows copies only of workloads that roll).
            Some(copies) if !copies.is_empty() => {
                let runs = runs_replicas(w);
                let shares: BTreeMap<String, Share> = counts
                    .iter()
                    .map(|(node, &n)| {
                        let share = Share {
                            replicas: if runs { n } else { 0 },
                            copy: copies.get(node).cloned(),
                        };
                        (node.clone(), share)
                    })
                    .collect();
                rollout::gate(&w.spec.strategy, &spec_hash(w), &shares)
            }
            _ => counts.keys().map(|n| (n.clone(), Gate::Send)).collect(),
        };
        for node in known.unknown.get(name).into_iter().flatten() {
            if let Some(gate) = gates.get_mut(node) {
                *gate = Gate::Hold;
            }
        }
        if gates.values().any(|g| *g != Gate::Send) {
            rolling.insert(name.to_string());
        }
        let per_node = steps.entry(name.to_string()).or_default();
        for (node, &n) in counts {
            let step = match gates.get(node).copied().unwrap_or(Gate::Send) {
                Gate::Hold => Step::Hold,
                Gate::Send => Step::Send(Box::new(copy_for(w, n))),
                Gate::Roll(b) => {
                    let mut copy = copy_for(w, n);
                    rollout::with_bounds(&mut copy, b);
                    Step::Send(Box::new(copy))
                }
            };
            per_node.insert(node.clone(), step);
        }
    }
    // Every node that had a workload placed on it, or holds a copy, and is not placed on now.
    let had = known
        .previous
        .iter()
        .map(|(name, m)| (name, m.keys().collect::<Vec<_>>()))
        .chain(
            known
                .holders
                .iter()
                .map(|(name, s)| (name, s.iter().collect())),
        );
    for (name, was_on) in had {
        let per_node = steps.entry(name.clone()).or_default();
        for node in was_on {
            per_node.entry(node.clone()).or_insert(Step::Remove);
        }
    }
    steps.retain(|_, m| !m.is_empty());
    Decision {
        placement,
        steps,
        rolling,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet_core::placement::DEFAULT_PRESSURE_WEIGHTS;
    use crate::fleet_core::testing::{view, workloads};

    fn nothing_known(previous: &Counts) -> Known<'_> {
        static HOLDERS: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        static COPIES: BTreeMap<String, BTreeMap<String, Copy>> = BTreeMap::new();
        static UNKNOWN: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        static AVOID: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        Known {
            previous,
            holders: &HOLDERS,
            copies: &COPIES,
            unknown: &UNKNOWN,
            avoid: &AVOID,
        }
    }

    fn sent(d: &Decision, workload: &str, node: &str) -> Option<Workload> {
        match d.step(workload, node)? {
            Step::Send(w) => Some((**w).clone()),
            _ => None,
        }
    }

    #[test]
    fn each_node_gets_its_share_and_a_workload_without_replicas_keeps_its_spec() {
        let ws = workloads(&[
            ("web", "  replicas: 3\n"),
            ("job", "  replicas: 1\n"),
            ("off", "  suspend: true\n  replicas: 3\n"),
            ("spare", "  standby: true\n"),
        ]);
        let desired: Desired = ws.iter().map(|w| (w.metadata.name.as_str(), w)).collect();
        let nodes = [view("a", "x", 1000, 0), view("b", "x", 1000, 0)];
        let d = decide(
            &desired,
            nothing_known(&Counts::new()),
            &nodes,
            &DEFAULT_PRESSURE_WEIGHTS,
        );
        let share = |name: &str, node: &str| sent(&d, name, node).map(|w| w.spec.replicas);
        assert_eq!(
            share("web", "a").unwrap_or(0) + share("web", "b").unwrap_or(0),
            3
        );
        // job runs on one node only: the other gets no step at all.
        assert_eq!(d.steps["job"].len(), 1, "{:?}", d.steps["job"]);
        // A suspended workload keeps its replicas as written on the node that holds it, and a
        // standby one runs none.
        let (node, _) = d.steps["off"].iter().next().unwrap();
        assert_eq!(share("off", node), Some(3));
        let (node, _) = d.steps["spare"].iter().next().unwrap();
        assert_eq!(sent(&d, "spare", node).unwrap().desired_replicas(), 0);
        assert!(d.rolling.is_empty());
    }

    #[test]
    fn a_node_no_longer_placed_on_or_holding_a_stale_copy_is_told_to_remove_it() {
        let ws = workloads(&[("web", "  replicas: 2\n")]);
        let desired: Desired = ws.iter().map(|w| (w.metadata.name.as_str(), w)).collect();
        // web ran on a and b; b is gone for placement; c holds a copy from before an outage.
        let previous: Counts = [(
            "web".to_string(),
            [("a".to_string(), 1), ("b".to_string(), 1)].into(),
        )]
        .into();
        let holders = [("web".to_string(), ["c".to_string()].into())].into();
        let mut nodes = [
            view("a", "x", 1000, 0),
            view("b", "x", 1000, 0),
            view("c", "y", 1000, 0),
        ];
        nodes[1].schedulable = false;
        nodes[2].schedulable = false;
        // "gone" is no longer desired; it ran on a.
        let previous_all = {
            let mut p = previous.clone();
            p.insert("gone".to_string(), [("a".to_string(), 1)].into());
            p
        };
        let known = Known {
            holders: &holders,
            ..nothing_known(&previous_all)
        };
        let d = decide(&desired, known, &nodes, &DEFAULT_PRESSURE_WEIGHTS);
        assert_eq!(sent(&d, "web", "a").unwrap().spec.replicas, 2);
        assert_eq!(d.step("web", "b"), Some(&Step::Remove));
        assert_eq!(d.step("web", "c"), Some(&Step::Remove));
        assert_eq!(d.step("gone", "a"), Some(&Step::Remove));
    }

    fn copy(spec_hash: &str, complete: bool, desired: u32, ready: u32) -> Copy {
        Copy {
            spec_hash: spec_hash.into(),
            complete,
            desired,
            current: desired,
            ready,
        }
    }

    #[test]
    fn a_rollout_over_four_nodes_releases_one_node_and_holds_the_rest() {
        let ws = workloads(&[(
            "web",
            "  replicas: 4\n  strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 0, maxUnavailable: 1}}\n",
        )]);
        let desired: Desired = ws.iter().map(|w| (w.metadata.name.as_str(), w)).collect();
        let nodes: Vec<NodeView> = ["a", "b", "c", "d"]
            .iter()
            .map(|k| view(k, "x", 1000, 0))
            .collect();
        let previous: Counts = [(
            "web".to_string(),
            nodes.iter().map(|n| (n.key.clone(), 1)).collect(),
        )]
        .into();
        // Every node holds the previous spec, ready.
        let copies = [(
            "web".to_string(),
            nodes
                .iter()
                .map(|n| (n.key.clone(), copy("old", true, 1, 1)))
                .collect(),
        )]
        .into();
        let known = Known {
            copies: &copies,
            ..nothing_known(&previous)
        };
        let d = decide(&desired, known, &nodes, &DEFAULT_PRESSURE_WEIGHTS);
        let released: Vec<&String> = d.steps["web"]
            .iter()
            .filter(|(_, s)| matches!(s, Step::Send(_)))
            .map(|(n, _)| n)
            .collect();
        assert_eq!(released, vec!["a"], "{:?}", d.steps);
        let w = sent(&d, "web", "a").unwrap();
        let ru = w.spec.strategy.rolling_update.unwrap();
        assert_eq!(ru.max_unavailable, Some(hyperbox_api::IntOrPercent::Int(1)));
        assert_eq!(ru.max_surge, Some(hyperbox_api::IntOrPercent::Int(0)));
        assert!(d.rolling.contains("web"));
        // A node whose copy could not be read waits even when the budget would let it go.
        let unknown = [("web".to_string(), ["a".to_string()].into())].into();
        let known = Known {
            copies: &copies,
            unknown: &unknown,
            ..nothing_known(&previous)
        };
        let d = decide(&desired, known, &nodes, &DEFAULT_PRESSURE_WEIGHTS);
        assert_eq!(d.step("web", "a"), Some(&Step::Hold));
    }
}
