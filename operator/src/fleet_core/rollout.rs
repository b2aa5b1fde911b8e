//! Rollouts across nodes. A workload's `maxSurge` and `maxUnavailable` bound all its replicas
//! together, wherever they run: with `maxUnavailable: 1` and one replica on each of four
//! nodes, one node at a time may take its replica down, not all four at once because each
//! applied the bound to its own share.
//!
//! The operator resolves the bounds against the workload's total replicas and splits them
//! between the nodes that still run the previous spec: a node whose turn has come gets its
//! copy of the new spec with its part of the budget as the copy's own (integer) bounds, and
//! the others keep their copy as it is until budget frees up. Nodes that are already rolling
//! come first, so a node keeps its part until it is done. Replicas that are down already (a
//! crash, a node still starting them) count against the budget, except on their own node:
//! replacing a replica that is down takes nothing more down, so a broken replica never
//! blocks the rollout.
//!
//! A node that holds no copy yet, or whose copy already runs the new spec to completion, gets
//! the spec as written: there is nothing for it to roll. `Recreate` is sent to every node at
//! once, as a Deployment takes every replica down for it.

use std::collections::BTreeMap;

use hyperbox_api::{
    IntOrPercent, RollingUpdate, RolloutBounds, Strategy, StrategyType, Workload, WorkloadStatus,
};

/// What a node reports of its copy of the workload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Copy {
    /// The pod-template hash of the spec the copy wants ([`hyperbox_api::spec_hash`]).
    pub spec_hash: String,
    /// Its rollout is done: every replica of that spec is started and ready, none is left of
    /// the previous one.
    pub complete: bool,
    /// Replicas the copy asks for.
    pub desired: u32,
    /// Replicas with a container, of any spec (above `desired` while it surges).
    pub current: u32,
    /// Ready replicas, of any spec.
    pub ready: u32,
}

impl Copy {
    pub fn of(s: &WorkloadStatus) -> Copy {
        Copy {
            spec_hash: s.spec_hash.clone(),
            complete: s.rollout_complete(),
            desired: s.desired_replicas,
            current: s.current_replicas,
            ready: s.ready_replicas,
        }
    }

    /// Replicas down now (asked for and not ready).
    fn down(&self) -> u32 {
        self.desired.saturating_sub(self.ready)
    }

    /// Replicas above the desired count now.
    fn surging(&self) -> u32 {
        self.current.saturating_sub(self.desired)
    }
}

/// One node's share of a workload: the replicas placed there, and its copy if it holds one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub replicas: u32,
    pub copy: Option<Copy>,
}

/// What to send a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The spec as written: the node has nothing to roll.
    Send,
    /// The new spec, rolled on that node within these bounds (its part of the budget).
    Roll(RolloutBounds),
    /// Nothing: the node keeps its copy as it is until its turn.
    Hold,
}

/// Split the workload's rollout budget between its nodes. `target` is the spec hash of the
/// new spec; `shares` has every node the workload is placed on.
pub fn gate(
    strategy: &Strategy,
    target: &str,
    shares: &BTreeMap<String, Share>,
) -> BTreeMap<String, Gate> {
    let mut out: BTreeMap<String, Gate> = shares
        .keys()
        .map(|node| (node.clone(), Gate::Send))
        .collect();
    if strategy.kind == StrategyType::Recreate {
        return out;
    }
    let total: u32 = shares.values().map(|s| s.replicas).sum();
    let default = RollingUpdate::default();
    let bounds =
        RolloutBounds::resolve(strategy.rolling_update.as_ref().unwrap_or(&default), total);
    // Rolling: has the new spec, not done yet. Waiting: still has the previous spec.
    let mut rolling = Vec::new();
    let mut waiting = Vec::new();
    for (node, share) in shares {
        let Some(copy) = share.copy.as_ref().filter(|_| share.replicas > 0) else {
            continue;
        };
        if copy.spec_hash == target {
            if !copy.complete {
                rolling.push((node, share.replicas, copy));
            }
        } else {
            waiting.push((node, share.replicas, copy));
        }
    }
    if rolling.is_empty() && waiting.is_empty() {
        return out;
    }
    let copies = rolling.iter().chain(&waiting).map(|(_, _, c)| *c);
    let mut unavailable_left = bounds
        .max_unavailable
        .saturating_sub(copies.clone().map(Copy::down).sum());
    let mut surge_left = bounds
        .max_surge
        .saturating_sub(copies.map(Copy::surging).sum());
    for (node, replicas, copy) in rolling.iter().chain(&waiting) {
        // What is down or surging on the node already is its own; more comes from what is
        // left of the budget.
        let own_down = copy.down().min(*replicas);
        let own_surge = copy.surging().min(*replicas);
        let more_down = unavailable_left.min(replicas - own_down);
        let more_surge = surge_left.min(replicas - own_surge);
        unavailable_left -= more_down;
        surge_left -= more_surge;
        let b = RolloutBounds {
            max_surge: own_surge + more_surge,
            max_unavailable: own_down + more_down,
        };
        // No budget: a waiting node waits, and a rolling one (replicas went down elsewhere)
        // keeps the bounds it has.
        let gate = if b.max_surge + b.max_unavailable > 0 {
            Gate::Roll(b)
        } else {
            Gate::Hold
        };
        out.insert((*node).clone(), gate);
    }
    out
}

/// A node's copy that rolls within `b`: the bounds become integers for its share.
pub fn with_bounds(w: &mut Workload, b: RolloutBounds) {
    w.spec.strategy = Strategy {
        kind: StrategyType::RollingUpdate,
        rolling_update: Some(RollingUpdate {
            max_surge: Some(IntOrPercent::Int(b.max_surge)),
            max_unavailable: Some(IntOrPercent::Int(b.max_unavailable)),
        }),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strategy(surge: u32, unavailable: u32) -> Strategy {
        Strategy {
            kind: StrategyType::RollingUpdate,
            rolling_update: Some(RollingUpdate {
                max_surge: Some(IntOrPercent::Int(surge)),
                max_unavailable: Some(IntOrPercent::Int(unavailable)),
            }),
        }
    }

    fn b(max_surge: u32, max_unavailable: u32) -> Gate {
        Gate::Roll(RolloutBounds {
            max_surge,
            max_unavailable,
        })
    }

    /// A copy that runs `spec` with all `n` replicas ready.
    fn done(spec: &str, n: u32) -> Copy {
        Copy {
            spec_hash: spec.into(),
            complete: true,
            desired: n,
            current: n,
            ready: n,
        }
    }

    fn shares(copies: &[(&str, u32, Option<Copy>)]) -> BTreeMap<String, Share> {
        copies
            .iter()
            .map(|(node, replicas, copy)| {
                (
                    node.to_string(),
                    Share {
                        replicas: *replicas,
                        copy: copy.clone(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn one_node_at_a_time_when_one_replica_may_be_down() {
        let s = shares(&[
            ("a", 1, Some(done("v1", 1))),
            ("b", 1, Some(done("v1", 1))),
            ("c", 1, Some(done("v1", 1))),
            ("d", 1, Some(done("v1", 1))),
        ]);
        let g = gate(&strategy(0, 1), "v2", &s);
        assert_eq!(g["a"], b(0, 1));
        for n in ["b", "c", "d"] {
            assert_eq!(g[n], Gate::Hold, "{n}");
        }
        // With a surge of one instead, one node surges and the others wait.
        let g = gate(&strategy(1, 0), "v2", &s);
        assert_eq!(g["a"], b(1, 0));
        assert_eq!(g["b"], Gate::Hold);
    }

    #[test]
    fn percentages_resolve_against_every_replica_of_the_workload() {
        // 25% of 8 replicas is 2 down and 2 surging, given out in node order: the first node
        // takes all of it, not 25% of its own 2 replicas (1 surging, 0 down).
        let s = shares(&[
            ("a", 2, Some(done("v1", 2))),
            ("b", 2, Some(done("v1", 2))),
            ("c", 2, Some(done("v1", 2))),
            ("d", 2, Some(done("v1", 2))),
        ]);
        let pct = Strategy {
            kind: StrategyType::RollingUpdate,
            rolling_update: Some(RollingUpdate::default()),
        };
        let g = gate(&pct, "v2", &s);
        assert_eq!(g["a"], b(2, 2));
        assert_eq!(g["b"], Gate::Hold);
        assert_eq!(g["c"], Gate::Hold);
    }

    #[test]
    fn new_copies_finished_nodes_and_recreate_are_sent_as_written() {
        let s = shares(&[
            ("a", 1, Some(done("v2", 1))),
            ("b", 1, None),
            ("c", 0, Some(done("v1", 1))),
        ]);
        let g = gate(&strategy(0, 1), "v2", &s);
        assert!(g.values().all(|g| *g == Gate::Send), "{g:?}");
        let s = shares(&[("a", 1, Some(done("v1", 1))), ("b", 1, Some(done("v1", 1)))]);
        let recreate = Strategy {
            kind: StrategyType::Recreate,
            rolling_update: None,
        };
        let g = gate(&recreate, "v2", &s);
        assert!(g.values().all(|g| *g == Gate::Send), "{g:?}");
    }

    #[test]
    fn a_rolling_node_keeps_its_part_and_the_next_waits_for_it() {
        // a took its replica down for v2 (not ready yet): b waits, even though b sorts first
        // among the waiting ones.
        let rolling = Copy {
            spec_hash: "v2".into(),
            complete: false,
            desired: 1,
            current: 1,
            ready: 0,
        };
        let s = shares(&[
            ("a", 1, Some(rolling)),
            ("b", 1, Some(done("v1", 1))),
            ("c", 1, Some(done("v1", 1))),
        ]);
        let g = gate(&strategy(0, 1), "v2", &s);
        assert_eq!(g["a"], b(0, 1));
        assert_eq!(g["b"], Gate::Hold);
        assert_eq!(g["c"], Gate::Hold);
    }

    #[test]
    fn a_replica_already_down_is_replaced_without_taking_more_down() {
        // c's replica crashed: the budget is spent by it, yet c may replace it, and a and b
        // wait.
        let crashed = Copy {
            spec_hash: "v1".into(),
            complete: false,
            desired: 1,
            current: 1,
            ready: 0,
        };
        let s = shares(&[
            ("a", 1, Some(done("v1", 1))),
            ("b", 1, Some(done("v1", 1))),
            ("c", 1, Some(crashed)),
        ]);
        let g = gate(&strategy(0, 1), "v2", &s);
        assert_eq!(g["a"], Gate::Hold);
        assert_eq!(g["b"], Gate::Hold);
        assert_eq!(g["c"], b(0, 1));
    }

    /// A node's share in the simulation: old replicas ready, new ones ready, new ones
    /// starting (ready at the next tick unless the new version never gets ready).
    #[derive(Debug, Clone)]
    struct Sim {
        replicas: u32,
        old: u32,
        new_ready: u32,
        new_starting: u32,
        has_new: bool,
        bounds: RolloutBounds,
    }

    impl Sim {
        fn copy(&self) -> Copy {
            let desired = self.replicas;
            let current = self.old + self.new_ready + self.new_starting;
            let spec = if self.has_new { "v2" } else { "v1" };
            Copy {
                spec_hash: spec.into(),
                complete: self.has_new && self.new_ready == desired && current == desired,
                desired,
                current,
                ready: self.old + self.new_ready,
            }
        }

        /// One step of a node's own rollout within its bounds (a Deployment's rules).
        fn step(&mut self, new_gets_ready: bool) {
            if !self.has_new {
                return;
            }
            if new_gets_ready {
                self.new_ready += self.new_starting;
                self.new_starting = 0;
            }
            let n = self.replicas;
            let min_ready = n.saturating_sub(self.bounds.max_unavailable);
            // Old replicas replaced by ready new ones go.
            while self.old > 0 && self.old + self.new_ready > n {
                self.old -= 1;
            }
            // Make room while enough stay ready.
            while self.old > 0 && self.old + self.new_ready > min_ready {
                self.old -= 1;
            }
            // Start new ones within replicas + surge.
            let total = self.old + self.new_ready + self.new_starting;
            let missing = n - self.new_ready - self.new_starting;
            let room = (n + self.bounds.max_surge).saturating_sub(total);
            self.new_starting += missing.min(room);
        }
    }

    /// Roll a workload over nodes with these shares; returns the fewest ready replicas seen,
    /// the most containers seen, and whether every node finished.
    fn simulate(sizes: &[u32], s: &Strategy, new_gets_ready: bool) -> (u32, u32, bool) {
        let mut nodes: BTreeMap<String, Sim> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    format!("n{i}"),
                    Sim {
                        replicas: *n,
                        old: *n,
                        new_ready: 0,
                        new_starting: 0,
                        has_new: false,
                        bounds: RolloutBounds {
                            max_surge: 0,
                            max_unavailable: 0,
                        },
                    },
                )
            })
            .collect();
        let mut fewest_ready = u32::MAX;
        let mut most = 0;
        for _ in 0..200 {
            let shares: BTreeMap<String, Share> = nodes
                .iter()
                .map(|(k, n)| {
                    (
                        k.clone(),
                        Share {
                            replicas: n.replicas,
                            copy: Some(n.copy()),
                        },
                    )
                })
                .collect();
            if shares.values().all(|s| s.copy.as_ref().unwrap().complete) {
                return (fewest_ready, most, true);
            }
            for (k, g) in gate(s, "v2", &shares) {
                let n = nodes.get_mut(&k).unwrap();
                match g {
                    Gate::Roll(b) => {
                        n.has_new = true;
                        n.bounds = b;
                    }
                    Gate::Send => n.has_new = true,
                    Gate::Hold => {}
                }
            }
            for n in nodes.values_mut() {
                n.step(new_gets_ready);
            }
            let ready: u32 = nodes.values().map(|n| n.old + n.new_ready).sum();
            let containers: u32 = nodes
                .values()
                .map(|n| n.old + n.new_ready + n.new_starting)
                .sum();
            fewest_ready = fewest_ready.min(ready);
            most = most.max(containers);
        }
        (fewest_ready, most, false)
    }

    #[test]
    fn the_workloads_bounds_hold_across_all_its_nodes_to_the_end() {
        for (sizes, surge, unavailable) in [
            (vec![1, 1, 1, 1], 0, 1),
            (vec![1, 1, 1, 1], 1, 0),
            (vec![1, 1, 1, 1], 2, 1),
            (vec![3, 1, 2, 2], 1, 2),
            (vec![5, 5], 0, 3),
            (vec![2, 2, 2], 3, 0),
        ] {
            let total: u32 = sizes.iter().sum();
            let (ready, most, finished) = simulate(&sizes, &strategy(surge, unavailable), true);
            assert!(finished, "{sizes:?} {surge}/{unavailable} never finished");
            assert!(
                ready >= total - unavailable,
                "{sizes:?} {surge}/{unavailable}: {ready} ready of {total}"
            );
            assert!(
                most <= total + surge,
                "{sizes:?} {surge}/{unavailable}: {most} containers for {total}"
            );
        }
    }

    #[test]
    fn a_version_that_never_gets_ready_stops_at_the_budget() {
        let (ready, _, finished) = simulate(&[1, 1, 1, 1], &strategy(0, 1), false);
        assert!(!finished);
        assert_eq!(ready, 3);
        let (ready, most, finished) = simulate(&[2, 2], &strategy(1, 1), false);
        assert!(!finished);
        assert_eq!(ready, 3);
        assert!(most <= 5);
    }
}
