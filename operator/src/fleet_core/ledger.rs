//! The ledger of placements made one workload at a time (the Kubernetes controller places each
//! Workload in its own reconcile). A placement is decided before the nodes report it, so the
//! next workload's placement must count what the earlier ones took:
//! - requests placed on a node that has not reported them yet count as taken there (else two
//!   workloads placed one after the other see the same free room);
//! - replicas without a memory request weigh [`NOMINAL_MEMORY_REQUEST`] on their node when
//!   nodes are compared (else every such workload lands on the first of equal nodes).
//!
//! Pure data: the adapter says what each node reports.

use std::collections::{BTreeMap, HashMap};

use hyperbox_api::{ResourceAmounts, Workload};

use super::place::NodeView;
use super::placement::NOMINAL_MEMORY_REQUEST;

#[derive(Debug, Default)]
pub struct Ledger {
    /// Where the last placement of each workload put its replicas: node → count.
    placed: HashMap<String, BTreeMap<String, u32>>,
    /// The nominal memory of replicas placed without a memory request: workload → node → bytes.
    nominal: HashMap<String, BTreeMap<String, u64>>,
    /// Placements with requests some node has not reported yet: workload → (one replica's
    /// requests, node → replicas placed there).
    unconfirmed: HashMap<String, (ResourceAmounts, BTreeMap<String, u32>)>,
}

impl Ledger {
    /// Where `key`'s replicas were last placed, if this ledger placed it.
    pub fn placed(&self, key: &str) -> Option<&BTreeMap<String, u32>> {
        self.placed.get(key)
    }

    /// Adjust the node views for placing `key`: the other workloads' nominal load on each
    /// node, and the requests placed on a node that it has not reported yet. `reported` says
    /// how many replicas of a workload a node reports (node, workload). Placements every
    /// node now reports are dropped from the ledger here: the cost follows the placements in
    /// flight, not all workloads.
    pub fn adjust(
        &mut self,
        key: &str,
        views: &mut [NodeView],
        reported: impl Fn(&str, &str) -> u32,
    ) {
        let mut unreported: BTreeMap<String, ResourceAmounts> = BTreeMap::new();
        self.unconfirmed.retain(|other, (r, per_node)| {
            let mut open = false;
            for (node, &n) in per_node.iter() {
                let missing = u64::from(n.saturating_sub(reported(node, other)));
                if missing == 0 {
                    continue;
                }
                open = true;
                if other != key {
                    let e = unreported.entry(node.clone()).or_default();
                    e.cpu_millis += r.cpu_millis * missing;
                    e.memory_bytes += r.memory_bytes * missing;
                }
            }
            open
        });
        for v in views.iter_mut() {
            v.nominal_load = self
                .nominal
                .iter()
                .filter(|(k, _)| k.as_str() != key)
                .filter_map(|(_, per_node)| per_node.get(&v.key))
                .sum();
            if let (Some(s), Some(u)) = (v.summary.as_mut(), unreported.get(&v.key)) {
                s.requested.cpu_millis += u.cpu_millis;
                s.requested.memory_bytes += u.memory_bytes;
            }
        }
    }

    /// Record `key`'s new placement.
    pub fn record(&mut self, key: &str, w: &Workload, counts: &BTreeMap<String, u32>) {
        self.placed.insert(key.to_string(), counts.clone());
        let request = w.request_per_replica();
        if request.memory_bytes == 0 {
            let per_node = counts
                .iter()
                .map(|(n, c)| (n.clone(), u64::from(*c) * NOMINAL_MEMORY_REQUEST))
                .collect();
            self.nominal.insert(key.to_string(), per_node);
        } else {
            self.nominal.remove(key);
        }
        if request.cpu_millis > 0 || request.memory_bytes > 0 {
            self.unconfirmed
                .insert(key.to_string(), (request, counts.clone()));
        } else {
            self.unconfirmed.remove(key);
        }
    }

    /// `key` is gone.
    pub fn forget(&mut self, key: &str) {
        self.placed.remove(key);
        self.nominal.remove(key);
        self.unconfirmed.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet_core::decide::{decide, Known, Step};
    use crate::fleet_core::place::{Counts, Desired};
    use crate::fleet_core::placement::DEFAULT_PRESSURE_WEIGHTS;
    use crate::fleet_core::testing::{view, workloads};

    /// Place `w` alone, as the controller does, with the ledger's adjustments; record it.
    fn place_one(
        ledger: &mut Ledger,
        w: &Workload,
        nodes: &[NodeView],
        reported: impl Fn(&str, &str) -> u32,
    ) -> BTreeMap<String, u32> {
        let key = w.metadata.name.as_str();
        let mut views = nodes.to_vec();
        ledger.adjust(key, &mut views, reported);
        let desired: Desired = BTreeMap::from([(key, w)]);
        let previous = Counts::new();
        let none = BTreeMap::new();
        let d = decide(
            &desired,
            Known {
                previous: &previous,
                holders: &none,
                copies: &BTreeMap::new(),
                unknown: &BTreeMap::new(),
                avoid: &BTreeMap::new(),
            },
            &views,
            &DEFAULT_PRESSURE_WEIGHTS,
        );
        let counts: BTreeMap<String, u32> = d.steps[key]
            .iter()
            .filter_map(|(n, s)| match s {
                Step::Send(c) => Some((n.clone(), c.spec.replicas)),
                _ => None,
            })
            .collect();
        ledger.record(key, w, &counts);
        counts
    }

    #[test]
    fn requests_placed_and_not_yet_reported_are_taken_until_the_node_reports_them() {
        // Two nodes with 1000Mi; two workloads of 600Mi each, placed one after the other
        // before any node reports: they must not both land on the node with the most room.
        let ws = workloads(&[
            ("a", "  resources: {requests: {memory: 600Mi}}\n"),
            ("b", "  resources: {requests: {memory: 600Mi}}\n"),
        ]);
        let nodes = [view("n1", "x", 1000, 0), view("n2", "x", 1000, 0)];
        let mut ledger = Ledger::default();
        let nothing_reported = |_: &str, _: &str| 0;
        let a = place_one(&mut ledger, &ws[0], &nodes, nothing_reported);
        let b = place_one(&mut ledger, &ws[1], &nodes, nothing_reported);
        assert_eq!(a.len(), 1);
        assert_eq!(b.len(), 1);
        assert_ne!(a.keys().next(), b.keys().next(), "{a:?} {b:?}");
        // Once the nodes report them, the ledger lets go: the nodes' own figures count.
        let (na, nb) = (
            a.keys().next().unwrap().clone(),
            b.keys().next().unwrap().clone(),
        );
        let reported =
            |node: &str, w: &str| u32::from((w == "a" && node == na) || (w == "b" && node == nb));
        let mut views = nodes.to_vec();
        ledger.adjust("c", &mut views, reported);
        assert!(ledger.unconfirmed.is_empty());
        assert!(views
            .iter()
            .all(|v| v.summary.as_ref().unwrap().requested.memory_bytes == 0));
    }

    #[test]
    fn replicas_without_requests_weigh_nominally_so_equal_nodes_share_them() {
        let ws = workloads(&[("a", ""), ("b", ""), ("c", ""), ("d", "")]);
        let nodes = [view("n1", "x", 1000, 0), view("n2", "x", 1000, 0)];
        let mut ledger = Ledger::default();
        let mut per_node: BTreeMap<String, u32> = BTreeMap::new();
        for w in &ws {
            for (n, c) in place_one(&mut ledger, w, &nodes, |_, _| 0) {
                *per_node.entry(n).or_default() += c;
            }
        }
        assert_eq!(per_node.values().copied().collect::<Vec<_>>(), vec![2, 2]);
        // Forgotten workloads weigh nothing.
        for w in &ws {
            ledger.forget(&w.metadata.name);
        }
        let mut views = nodes.to_vec();
        ledger.adjust("e", &mut views, |_, _| 0);
        assert!(views.iter().all(|v| v.nominal_load == 0));
        assert!(ledger.placed("a").is_none());
    }
}
