//! Where each replica runs, as a pure function of plain data: the nodes (labels, room, whether
//! they can take work) and the workloads (replicas, node selector, requests, where their
//! replicas are now). The edge operator with several `--node`s uses it, and so will the
//! Kubernetes controller.
//!
//! Rules, in order:
//! 1. A replica stays where it is while that node still matches the selector and can take work
//!    (moving running work is the expensive mistake).
//! 2. Otherwise it goes to a matching node with room for its requests, preferring the node
//!    with the fewest replicas of that workload (spread), then the calmest node (by pressure
//!    band), then the most free memory, then the node id (deterministic). For that preference only, a replica without a memory request
//!    counts as [`NOMINAL_MEMORY_REQUEST`] (as kube-scheduler's scoring does with its
//!    non-zero defaults): otherwise workloads that request nothing would all land on the
//!    first of equal nodes.
//! 3. A replica no node can take is reported with the reason, never half-placed.

use std::collections::{BTreeMap, BTreeSet};

/// What a replica without a memory request counts as when nodes are compared (not when its
/// fit is checked): 200 MiB, kube-scheduler's default for the same purpose.
pub const NOMINAL_MEMORY_REQUEST: u64 = 200 << 20;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl Amounts {
    fn fits_in(&self, free: &Amounts) -> bool {
        self.cpu_millis <= free.cpu_millis && self.memory_bytes <= free.memory_bytes
    }
}

#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub allocatable: Amounts,
    /// Requests of work on the node that this placement does not manage.
    pub reserved: Amounts,
    /// False for a node that refused work or has been unreachable past the grace period: its
    /// replicas move.
    pub schedulable: bool,
    /// How stalled the node is (see [`PressureWeights::score`]; 0 without PSI): calmer nodes are
    /// preferred, in bands of [`PRESSURE_BAND`] so that noise does not move new replicas
    /// from one node to another.
    pub pressure: f32,
    /// Nominal requests of replicas placed earlier without a memory request (see
    /// [`NOMINAL_MEMORY_REQUEST`]): counted by the preference only, never by the fit. A
    /// caller that places one workload at a time passes what it placed before, so that
    /// workloads requesting nothing still spread over equal nodes.
    pub nominal_load: u64,
}

/// Width of a pressure band: nodes whose scores fall in the same band count as equally calm
/// (then free memory decides). 10 points is one second of stall per ten on the cpu or io, or
/// half a second on memory.
pub const PRESSURE_BAND: f32 = 10.0;

fn band(pressure: f32, width: f32) -> u32 {
    (pressure.max(0.0) / width.max(0.001)) as u32
}

#[derive(Debug, Clone)]
pub struct Demand {
    pub workload: String,
    pub replicas: u32,
    pub node_selector: BTreeMap<String, String>,
    /// Requests of one replica.
    pub request: Amounts,
    /// Where its replicas run now, by ordinal.
    pub current: BTreeMap<u32, String>,
    /// Nodes not to use for it (they refused it).
    pub avoid: BTreeSet<String>,
}

/// Why a replica could not be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unplaced {
    /// No node has the labels the selector asks for (or none can take work).
    NoMatchingNode,
    InsufficientCpu,
    InsufficientMemory,
}

impl Unplaced {
    pub fn reason(&self) -> &'static str {
        match self {
            Unplaced::NoMatchingNode => "NoMatchingNode",
            Unplaced::InsufficientCpu => "InsufficientCPU",
            Unplaced::InsufficientMemory => "InsufficientMemory",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// (workload, ordinal) -> node id.
    pub assigned: BTreeMap<(String, u32), String>,
    pub unplaced: BTreeMap<(String, u32), Unplaced>,
}

impl Placement {
    /// Replicas of `workload` on `node`, by ordinal.
    pub fn on_node(&self, workload: &str, node: &str) -> BTreeSet<u32> {
        self.assigned
            .iter()
            .filter(|((w, _), n)| w == workload && *n == node)
            .map(|((_, o), _)| *o)
            .collect()
    }
}

/// Whether `labels` (a node's) hold every label the selector asks for.
pub(crate) fn matches(
    labels: &BTreeMap<String, String>,
    selector: &BTreeMap<String, String>,
) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|x| x == v))
}

pub fn place(demands: &[Demand], nodes: &[NodeInfo]) -> Placement {
    place_with(demands, nodes, PRESSURE_BAND)
}

/// [`place`] with pressure bands `band_width` points wide.
pub fn place_with(demands: &[Demand], nodes: &[NodeInfo], band_width: f32) -> Placement {
    let mut free: BTreeMap<&str, Amounts> = nodes
        .iter()
        .map(|n| {
            (
                n.id.as_str(),
                Amounts {
                    cpu_millis: n
                        .allocatable
                        .cpu_millis
                        .saturating_sub(n.reserved.cpu_millis),
                    memory_bytes: n
                        .allocatable
                        .memory_bytes
                        .saturating_sub(n.reserved.memory_bytes),
                },
            )
        })
        .collect();
    let by_id: BTreeMap<&str, &NodeInfo> = nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    // Free memory as the preference sees it (nominal requests included; below zero once
    // nominal requests exceed the node, so that nodes still compare).
    let mut score_free: BTreeMap<&str, i128> = free
        .iter()
        .map(|(id, f)| {
            let load = by_id.get(id).map_or(0, |n| n.nominal_load);
            (*id, i128::from(f.memory_bytes) - i128::from(load))
        })
        .collect();
    let take = |free: &mut BTreeMap<&str, Amounts>,
                score_free: &mut BTreeMap<&str, i128>,
                node: &str,
                r: &Amounts| {
        if let Some(f) = free.get_mut(node) {
            f.cpu_millis = f.cpu_millis.saturating_sub(r.cpu_millis);
            f.memory_bytes = f.memory_bytes.saturating_sub(r.memory_bytes);
        }
        if let Some(f) = score_free.get_mut(node) {
            let nominal = if r.memory_bytes == 0 {
                NOMINAL_MEMORY_REQUEST
            } else {
                r.memory_bytes
            };
            *f -= i128::from(nominal);
        }
    };
    let mut out = Placement::default();
    // Pass 1: replicas that may stay keep their node (and its room).
    let mut pending: Vec<(&Demand, u32)> = Vec::new();
    for d in demands {
        for ordinal in 0..d.replicas {
            let stays = d
                .current
                .get(&ordinal)
                .and_then(|n| by_id.get(n.as_str()))
                .filter(|n| {
                    n.schedulable
                        && matches(&n.labels, &d.node_selector)
                        && !d.avoid.contains(&n.id)
                });
            match stays {
                Some(n) => {
                    take(&mut free, &mut score_free, &n.id, &d.request);
                    out.assigned
                        .insert((d.workload.clone(), ordinal), n.id.clone());
                }
                None => pending.push((d, ordinal)),
            }
        }
    }
    // Pass 2: the rest, spread.
    for (d, ordinal) in pending {
        let candidates: Vec<&NodeInfo> = nodes
            .iter()
            .filter(|n| {
                n.schedulable && matches(&n.labels, &d.node_selector) && !d.avoid.contains(&n.id)
            })
            .collect();
        if candidates.is_empty() {
            out.unplaced
                .insert((d.workload.clone(), ordinal), Unplaced::NoMatchingNode);
            continue;
        }
        let with_room: Vec<&NodeInfo> = candidates
            .iter()
            .copied()
            .filter(|n| d.request.fits_in(&free[n.id.as_str()]))
            .collect();
        let best = with_room.iter().min_by_key(|n| {
            let mine = out.on_node(&d.workload, &n.id).len();
            let f = score_free[n.id.as_str()];
            (
                mine,
                band(n.pressure, band_width),
                std::cmp::Reverse(f),
                n.id.clone(),
            )
        });
        let Some(best) = best else {
            // Say which resource is short on the roomiest matching node.
            let roomiest = candidates
                .iter()
                .map(|n| free[n.id.as_str()])
                .max_by_key(|f| f.memory_bytes)
                .unwrap_or_default();
            let why = if d.request.memory_bytes > roomiest.memory_bytes {
                Unplaced::InsufficientMemory
            } else {
                Unplaced::InsufficientCpu
            };
            out.unplaced.insert((d.workload.clone(), ordinal), why);
            continue;
        };
        take(&mut free, &mut score_free, &best.id, &d.request);
        out.assigned
            .insert((d.workload.clone(), ordinal), best.id.clone());
    }
    out
}

/// How a node's pressure becomes its score (`--pressure-weights`): each resource's
/// `some avg10` times its weight, for the host and for the node's workloads, plus `trend`
/// times how much that weighted sum rose over the last samples (about 10 s); a falling
/// pressure earns nothing back. Scores fall in bands `band` points wide.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PressureWeights {
    pub cpu: f32,
    pub memory: f32,
    pub io: f32,
    pub trend: f32,
    pub band: f32,
}

/// The defaults and why:
/// - memory counts double: a memory stall also costs reclaim and heads for the OOM killer,
///   where a cpu or io stall only slows work down;
/// - a rise counts as much as a level (`trend=1`): a node going from 0 to 10 in ten seconds
///   is heading where a node at 10 already is, and a new replica would land in the middle of
///   it;
/// - bands of 10 points (one second in ten stalled on cpu or io) so that noise does not move
///   new replicas back and forth between nodes of like load.
pub const DEFAULT_PRESSURE_WEIGHTS: PressureWeights = PressureWeights {
    cpu: 1.0,
    memory: 2.0,
    io: 1.0,
    trend: 1.0,
    band: PRESSURE_BAND,
};

impl PressureWeights {
    /// `cpu=1,memory=2,io=1,trend=1,band=10`: any subset, over the defaults.
    pub fn parse(s: &str) -> Result<PressureWeights, String> {
        let mut w = DEFAULT_PRESSURE_WEIGHTS;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected NAME=NUMBER"))?;
            let n: f32 = v
                .trim()
                .parse()
                .ok()
                .filter(|n: &f32| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| format!("{k}: {v:?} is not a number of zero or more"))?;
            match k.trim() {
                "cpu" => w.cpu = n,
                "memory" => w.memory = n,
                "io" => w.io = n,
                "trend" => w.trend = n,
                "band" if n > 0.0 => w.band = n,
                "band" => return Err("band: must be above zero".into()),
                other => {
                    return Err(format!(
                        "{other:?} is not a pressure weight (cpu, memory, io, trend, band)"
                    ))
                }
            }
        }
        Ok(w)
    }

    fn weigh(&self, cpu: f32, memory: f32, io: f32) -> f32 {
        self.cpu * cpu + self.memory * memory + self.io * io
    }

    /// A node's score from its host and workloads readings and its trend.
    pub fn score(
        &self,
        readings: &[&hyperbox_api::Pressure],
        trend: Option<&hyperbox_api::PressureTrend>,
    ) -> f32 {
        let level: f32 = readings
            .iter()
            .map(|p| self.weigh(p.cpu.some.avg10, p.memory.some.avg10, p.io.some.avg10))
            .sum();
        let rise = trend
            .map(|t| self.weigh(t.cpu, t.memory, t.io).max(0.0))
            .unwrap_or(0.0);
        level + self.trend * rise
    }
}

/// `--pressure-weights`.
impl std::str::FromStr for PressureWeights {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PressureWeights::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    fn node(id: &str, labels: &[(&str, &str)], mem_gi: u64) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            allocatable: Amounts {
                cpu_millis: 2000,
                memory_bytes: mem_gi * GI,
            },
            reserved: Amounts::default(),
            schedulable: true,
            nominal_load: 0,
            pressure: 0.0,
        }
    }

    #[test]
    fn nominal_load_spreads_workloads_placed_one_at_a_time() {
        // Two equal nodes; `a` already holds 3 replicas without a memory request (placed
        // earlier, one workload at a time): the next one goes to `b`. The fit check ignores
        // the nominal bytes: an `a` "full" by nominal count alone still takes it.
        let mut a = node("a", &[], 1);
        a.nominal_load = 3 * NOMINAL_MEMORY_REQUEST;
        let b = node("b", &[], 1);
        let d = Demand {
            workload: "w".into(),
            replicas: 1,
            node_selector: BTreeMap::new(),
            request: Amounts::default(),
            current: BTreeMap::new(),
            avoid: BTreeSet::new(),
        };
        let p = place(std::slice::from_ref(&d), &[a.clone(), b]);
        assert_eq!(p.assigned[&("w".to_string(), 0)], "b");
        a.nominal_load = 100 * GI;
        let p = place(&[d], &[a]);
        assert_eq!(p.assigned[&("w".to_string(), 0)], "a");
    }

    #[test]
    fn calmer_nodes_are_preferred_by_band() {
        let mut a = node("a", &[], 8);
        let mut b = node("b", &[], 4);
        // b has less room but is calm; a is stalled: new workloads go to b.
        a.pressure = 35.0;
        b.pressure = 2.0;
        let p = place(
            &[demand("web", 1, 1), demand("api", 1, 1)],
            &[a.clone(), b.clone()],
        );
        assert!(p.assigned.values().all(|n| n == "b"), "{p:?}");
        // Within one band, free memory decides (noise does not move replicas).
        a.pressure = 4.0;
        b.pressure = 1.0;
        let p = place(&[demand("web", 1, 1)], &[a.clone(), b.clone()]);
        assert_eq!(p.assigned[&("web".to_string(), 0)], "a");
        // Spread still comes first: one replica per node before any node gets two.
        a.pressure = 90.0;
        b.pressure = 0.0;
        let p = place(&[demand("web", 2, 1)], &[a, b]);
        let on_a = p.assigned.values().filter(|n| *n == "a").count();
        assert_eq!(on_a, 1, "{p:?}");
    }

    fn demand(w: &str, replicas: u32, mem_gi: u64) -> Demand {
        Demand {
            workload: w.into(),
            replicas,
            node_selector: BTreeMap::new(),
            request: Amounts {
                cpu_millis: 100,
                memory_bytes: mem_gi * GI,
            },
            current: BTreeMap::new(),
            avoid: BTreeSet::new(),
        }
    }

    #[test]
    fn workloads_without_requests_spread_over_equal_nodes() {
        let nothing = |i: usize| Demand {
            request: Amounts::default(),
            ..demand(&format!("w{i}"), 1, 0)
        };
        let demands: Vec<Demand> = (0..30).map(nothing).collect();
        let nodes = [node("a", &[], 8), node("b", &[], 8), node("c", &[], 8)];
        let p = place(&demands, &nodes);
        for n in ["a", "b", "c"] {
            let count = p.assigned.values().filter(|v| *v == n).count();
            assert_eq!(count, 10, "{n}: {p:?}");
        }
        // More nominal requests than the nodes hold still spread.
        let many: Vec<Demand> = (0..300).map(nothing).collect();
        let p = place(&many, &nodes);
        for n in ["a", "b", "c"] {
            let count = p.assigned.values().filter(|v| *v == n).count();
            assert_eq!(count, 100, "{n}");
        }
        // Unequal nodes: the bigger one takes more, the smaller one its share too.
        let nodes = [node("big", &[], 4), node("small", &[], 2)];
        let p = place(&demands, &nodes);
        let small = p.assigned.values().filter(|v| *v == "small").count();
        assert!((8..=12).contains(&small), "{small}");
        assert!(p.unplaced.is_empty());
    }

    #[test]
    fn replicas_spread_across_nodes() {
        let nodes = [node("a", &[], 8), node("b", &[], 8), node("c", &[], 8)];
        let p = place(&[demand("web", 6, 1)], &nodes);
        for n in ["a", "b", "c"] {
            assert_eq!(p.on_node("web", n).len(), 2, "{p:?}");
        }
        assert!(p.unplaced.is_empty());
    }

    #[test]
    fn running_replicas_stay_and_only_the_missing_ones_move() {
        let nodes = [node("a", &[], 8), node("b", &[], 8), node("c", &[], 8)];
        let mut d = demand("web", 3, 1);
        d.current = [
            (0, "a".to_string()),
            (1, "a".to_string()),
            (2, "b".to_string()),
        ]
        .into();
        let p = place(&[d.clone()], &nodes);
        assert_eq!(p.assigned[&("web".into(), 0)], "a");
        assert_eq!(p.assigned[&("web".into(), 1)], "a");
        assert_eq!(p.assigned[&("web".into(), 2)], "b");
        // Node a goes away: its two replicas move, spread over b and c; b's stays.
        let mut gone = nodes.clone();
        gone[0].schedulable = false;
        let p = place(&[d], &gone);
        assert_eq!(p.assigned[&("web".into(), 2)], "b");
        assert_eq!(p.on_node("web", "a").len(), 0);
        let (b, c) = (p.on_node("web", "b").len(), p.on_node("web", "c").len());
        assert_eq!(b + c, 3, "{p:?}");
        assert!(b.abs_diff(c) <= 1, "spread: {p:?}");
    }

    #[test]
    fn selectors_and_room_decide_and_refusals_have_reasons() {
        let nodes = [
            node("edge-1", &[("zone", "north")], 2),
            node("edge-2", &[("zone", "south")], 2),
        ];
        let mut north = demand("n", 3, 1);
        north.node_selector = [("zone".to_string(), "north".to_string())].into();
        let p = place(&[north], &nodes);
        assert_eq!(p.on_node("n", "edge-1").len(), 2);
        assert_eq!(
            p.unplaced[&("n".into(), 2)],
            Unplaced::InsufficientMemory,
            "the third does not fit the 2 GiB node"
        );
        let mut nowhere = demand("x", 1, 1);
        nowhere.node_selector = [("zone".to_string(), "east".to_string())].into();
        let p = place(&[nowhere], &nodes);
        assert_eq!(p.unplaced[&("x".into(), 0)], Unplaced::NoMatchingNode);
        let mut cpu_heavy = demand("c", 1, 0);
        cpu_heavy.request.cpu_millis = 4000;
        let p = place(&[cpu_heavy], &nodes);
        assert_eq!(p.unplaced[&("c".into(), 0)], Unplaced::InsufficientCpu);
        assert_eq!(Unplaced::InsufficientCpu.reason(), "InsufficientCPU");
    }

    #[test]
    fn nodes_that_refused_a_workload_are_avoided() {
        let nodes = [node("a", &[], 8), node("b", &[], 8)];
        let mut d = demand("web", 2, 1);
        d.current = [(0, "a".to_string()), (1, "b".to_string())].into();
        d.avoid = ["a".to_string()].into();
        let p = place(&[d.clone()], &nodes);
        assert_eq!(p.on_node("web", "b").len(), 2, "{p:?}");
        d.avoid = ["a".to_string(), "b".to_string()].into();
        let p = place(&[d], &nodes);
        assert_eq!(p.unplaced.len(), 2);
        assert_eq!(p.unplaced[&("web".into(), 0)], Unplaced::NoMatchingNode);
    }

    #[test]
    fn placement_is_deterministic_and_never_overcommits() {
        let nodes: Vec<NodeInfo> = (0..5).map(|i| node(&format!("n{i}"), &[], 4)).collect();
        let demands: Vec<Demand> = (0..7).map(|i| demand(&format!("w{i}"), 3, 1)).collect();
        let p1 = place(&demands, &nodes);
        let p2 = place(&demands, &nodes);
        assert_eq!(p1, p2);
        // 5 nodes x 4 GiB = 20 replicas of 1 GiB fit; 21 were asked for.
        assert_eq!(p1.assigned.len(), 20);
        assert_eq!(p1.unplaced.len(), 1);
        for n in &nodes {
            let used = p1.assigned.values().filter(|x| **x == n.id).count();
            assert!(used <= 4, "{} holds {used}", n.id);
        }
    }
}
