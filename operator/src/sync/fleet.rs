//! The Git fleet: one Git source, several nodes (a small site without Kubernetes). An adapter
//! around the fleet core ([`crate::fleet_core`]): each sync observes the nodes (all at once,
//! each within its deadline), feeds the core what they answered, and carries out what it
//! decided. Each node's steps become that node's desired set, reconciled like a single node
//! ([`crate::reconcile::plan`]): a replica that moves is a scale-up on one node and a
//! scale-down (or prune) on another, so no survivor restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use hyperbox_api::NodeSummary;
use hyperbox_client::NodeClient;
use serde::{Deserialize, Serialize};

use super::carry::{carry_out, observe};
use super::{write_json, NodeStatus, SyncOptions, Synced, Syncer};
use crate::fleet_core::avoid::{AvoidMemory, PRESSURE_AVOID};
use crate::fleet_core::decide::{decide, Decision, Known, Step};
use crate::fleet_core::liveness::{keeps_replicas, Health, Judge, Liveness, LivenessTimings};
use crate::fleet_core::place::{prewarm_hints, Counts, Desired, FleetPlacement, NodeView};
use crate::fleet_core::rollout::Copy;
use crate::gitsource::GitSource;
use crate::manifests::{ManifestSet, SourcedWorkload};
use crate::nodewatch::NodeWatch;
use crate::reconcile::{plan, Inventory, Observed, Outcome, WorkloadResult};

/// What this source owns on each node, and where it placed each workload's replicas.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct FleetState {
    inventories: BTreeMap<String, Inventory>,
    counts: Counts,
    /// Each node's last answer (labels, room), so that a node that is down when the
    /// operator starts keeps its share for the grace period instead of losing it at once.
    #[serde(default)]
    summaries: BTreeMap<String, NodeSummary>,
    /// Workloads rolling out across nodes (some node waits for its turn or still rolls):
    /// each sync asks their nodes how far they are.
    #[serde(default)]
    pub(super) rolling: BTreeSet<String>,
}

pub(super) struct FleetNode {
    pub(super) key: String,
    pub(super) client: NodeClient,
    /// The last summary it answered with.
    summary: Option<NodeSummary>,
    /// Its answers, for the fleet core's liveness (no heartbeats here: reachability alone).
    liveness: Liveness,
    /// What the last sync made of them.
    health: Health,
    error: Option<String>,
    pub(super) watch: Option<NodeWatch>,
}

pub(super) struct Fleet {
    pub(super) nodes: Vec<FleetNode>,
    /// How long an unreachable node keeps its replicas.
    grace: Duration,
    /// Judges the nodes at each sync, and remembers whether most looked down.
    judge: Judge,
    pub(super) state: FleetState,
    /// Nodes each workload avoids: refused at this revision, or evicted for pressure lately.
    avoid: AvoidMemory,
}

impl Fleet {
    /// Each node's health from its answers (the fleet core's liveness: an unreachable node is
    /// not ready at once and lost after the grace), and whether the fleet is disrupted.
    fn judge_liveness(&mut self) -> bool {
        let now = Instant::now();
        let timings = LivenessTimings {
            monitor_grace: Duration::ZERO,
            eviction_grace: self.grace,
        };
        self.judge.judge(
            self.nodes
                .iter_mut()
                .map(|n| (n.key.as_str(), &mut n.liveness, &mut n.health)),
            now,
            timings,
        )
    }
}

pub(super) fn fleet_path(state_dir: &Path) -> PathBuf {
    state_dir.join("fleet.json")
}

impl Syncer {
    /// A syncer over several nodes (address, client): replicas are placed across them, and
    /// move off a node that stays unreachable for `grace`.
    pub fn new_fleet(
        source: GitSource,
        nodes: Vec<(String, NodeClient)>,
        grace: Duration,
        opts: SyncOptions,
    ) -> Result<Syncer> {
        let first = nodes
            .first()
            .map(|(_, c)| c.clone())
            .ok_or_else(|| anyhow!("no node given"))?;
        let mut syncer = Syncer::new(source, first, opts)?;
        let state: FleetState = match std::fs::read(fleet_path(&syncer.opts.state_dir)) {
            Ok(b) => serde_json::from_slice(&b).context("parse fleet.json")?,
            // From one node to several: what was applied to the first node is still ours.
            Err(_) => FleetState {
                inventories: nodes
                    .first()
                    .map(|(k, _)| (k.clone(), syncer.inventory.clone()))
                    .into_iter()
                    .collect(),
                counts: Counts::new(),
                summaries: BTreeMap::new(),
                rolling: BTreeSet::new(),
            },
        };
        syncer.fleet = Some(Fleet {
            nodes: nodes
                .into_iter()
                .map(|(key, client)| FleetNode {
                    summary: state.summaries.get(&key).cloned(),
                    key,
                    client,
                    liveness: Liveness::default(),
                    health: Health::Ready,
                    error: None,
                    watch: None,
                })
                .collect(),
            grace,
            judge: Judge::default(),
            state,
            avoid: AvoidMemory::default(),
        });
        Ok(syncer)
    }

    /// One sync over several nodes: observe them, place, then reconcile each reachable node
    /// with its share like a single node.
    pub(super) async fn attempt_fleet(
        &self,
        fleet: &mut Fleet,
        revision: String,
        started: Instant,
        fetch_ms: u64,
    ) -> Result<Synced> {
        let mut observed: BTreeMap<String, BTreeMap<String, Observed>> = BTreeMap::new();
        let watching = self.opts.node_watch.is_some();
        // Every node at once, each within its deadline: a node that hangs delays the sync by
        // its deadline, not by a request timeout per node.
        let answers = futures::future::join_all(fleet.nodes.iter().map(|n| async move {
            let current = n
                .watch
                .as_ref()
                .and_then(|w| w.current(n.client.digests_version_seen()));
            let answer = async {
                // Polling asks for the summary at every sync; with a watch it is asked for
                // when a placement needs it (below).
                let summary = if watching && n.summary.is_some() {
                    None
                } else {
                    Some(n.client.node().await?)
                };
                let digests = match current {
                    Some(d) => d.as_ref().clone(),
                    None => n.client.digest_hashes().await?,
                };
                Ok::<_, anyhow::Error>((summary, digests))
            };
            let deadline = if n.health.is_ready() {
                OBSERVE_DEADLINE
            } else {
                SUSPECT_DEADLINE
            };
            within(deadline, answer).await
        }))
        .await;
        for (n, answer) in fleet.nodes.iter_mut().zip(answers) {
            match answer {
                Ok((summary, digests)) => {
                    if summary.is_some() {
                        n.summary = summary;
                    }
                    n.liveness.contact(true);
                    n.error = None;
                    observed.insert(n.key.clone(), observe(digests));
                }
                Err(e) => {
                    n.liveness.contact(false);
                    tracing::warn!(node = %n.key, error = %format!("{e:#}"), "node unreachable");
                    n.error = Some(format!("{e:#}"));
                }
            }
        }
        // Pressure evictions: the workload leaves that node for a while.
        let now = Instant::now();
        fleet.avoid.expire(now);
        let mut newly_evicted = false;
        for (node, obs) in &observed {
            for (name, o) in obs.iter().filter(|(_, o)| o.evicted_for_pressure > 0) {
                if fleet.avoid.evicted_for_pressure(name, node, now) {
                    tracing::warn!(workload = %name, node = %node, replicas = o.evicted_for_pressure, avoid_s = PRESSURE_AVOID.as_secs(), "node evicted replicas for pressure; placing the workload elsewhere");
                    newly_evicted = true;
                }
            }
        }
        let all_reachable = observed.len() == fleet.nodes.len();
        let unchanged = !newly_evicted
            && all_reachable
            && fleet.state.rolling.is_empty()
            && self.settled_at(&revision)
            && fleet.state.inventories.iter().all(|(key, inv)| {
                let obs = observed.get(key);
                inv.iter().all(|(name, e)| {
                    // Still placed there (a node back from an outage holds copies to prune)
                    // and as applied.
                    fleet
                        .state
                        .counts
                        .get(name)
                        .is_some_and(|m| m.contains_key(key))
                        && obs
                            .and_then(|o| o.get(name))
                            .is_some_and(|o| o.spec_hash == e.spec_hash)
                })
            });
        if unchanged {
            return Ok(Synced::Unchanged { revision });
        }
        if watching {
            // Placing: every reachable node's room and labels as of now (all at once).
            let summaries = futures::future::join_all(fleet.nodes.iter().map(|n| {
                let asked = observed.contains_key(&n.key);
                async move {
                    if asked {
                        Some(within(OBSERVE_DEADLINE, n.client.node()).await)
                    } else {
                        None
                    }
                }
            }))
            .await;
            for (n, answer) in fleet.nodes.iter_mut().zip(summaries) {
                let Some(answer) = answer else {
                    continue;
                };
                match answer {
                    Ok(summary) => n.summary = Some(summary),
                    Err(e) => {
                        n.liveness.contact(false);
                        tracing::warn!(node = %n.key, error = %format!("{e:#}"), "node unreachable");
                        n.error = Some(format!("{e:#}"));
                        observed.remove(&n.key);
                    }
                }
            }
        }
        let parse_started = Instant::now();
        let set = self.read_manifests(&revision).await?;
        let parse_ms = parse_started.elapsed().as_millis() as u64;
        let node_started = Instant::now();
        let grace = fleet.grace;
        let frozen = fleet.judge_liveness();
        let evacuated = |n: &FleetNode| !keeps_replicas(n.health, frozen);
        let views: Vec<NodeView> = fleet
            .nodes
            .iter()
            .map(|n| NodeView {
                key: n.key.clone(),
                summary: n.summary.clone(),
                schedulable: !evacuated(n),
                nominal_load: 0,
            })
            .collect();
        // Refusals hold until the next revision.
        let avoid = fleet.avoid.avoid_all(&revision);
        let desired: Desired = set
            .workloads
            .iter()
            .map(|(name, sw)| (name.as_str(), &sw.workload))
            .collect();
        // Rollouts across nodes: how far the copies of rolling workloads are.
        let (copies, unknown) =
            rollout_copies(&fleet.nodes, &fleet.state.rolling, &desired, &observed).await;
        let mut decision = decide(
            &desired,
            Known {
                previous: &fleet.state.counts,
                // Copies a node holds and that are not placed there are pruned by its plan
                // (they are in its inventory, not in its share).
                holders: &BTreeMap::new(),
                copies: &copies,
                unknown: &unknown,
                avoid: &avoid,
            },
            &views,
            &self.opts.pressure_weights,
        );
        for name in &decision.rolling {
            tracing::info!(workload = %name, steps = ?decision.steps.get(name).map(|m| m.iter().map(|(n, s)| (n, step_name(s))).collect::<Vec<_>>()), "rolling out across nodes");
        }
        // Images to keep ready on each node (standby workloads, pending replicas): asked for
        // at each placement, which renews the node's hour.
        let hints = prewarm_hints(&desired, &decision.placement, &views);
        let prewarms = fleet.nodes.iter().filter_map(|n| {
            let images = hints
                .get(&n.key)
                .filter(|_| observed.contains_key(&n.key))?;
            Some(async move {
                if let Err(e) = n.client.prewarm(images).await {
                    tracing::warn!(node = %n.key, error = %e, "prewarm request failed");
                }
            })
        });
        futures::future::join_all(prewarms).await;
        // Plans for the nodes that answered; record the union of what we own before acting.
        let mut plans = Vec::new();
        let mut before = fleet.state.clone();
        for n in &fleet.nodes {
            let Some(obs) = observed.get(&n.key) else {
                continue;
            };
            let own = fleet
                .state
                .inventories
                .get(&n.key)
                .cloned()
                .unwrap_or_default();
            let (share, held) = node_share(&set, &mut decision, &n.key);
            let mut p = plan(&share, &revision, &own, obs, self.opts.prune);
            // A node whose turn has not come keeps its copy, and we own it as we did.
            for name in held {
                p.apply.retain(|w| w.key() != name);
                match own.get(&name) {
                    Some(e) => p.inventory.insert(name, e.clone()),
                    None => p.inventory.remove(&name),
                };
            }
            before
                .inventories
                .entry(n.key.clone())
                .or_default()
                .extend(p.inventory.clone());
            plans.push((n.key.clone(), n.client.clone(), own, p));
        }
        write_json(&fleet_path(&self.opts.state_dir), &before)
            .context("record the fleet inventory before applying")?;
        let waiting: Vec<&FleetNode> = fleet
            .nodes
            .iter()
            .filter(|n| !n.health.is_ready() && !evacuated(n))
            .collect();
        let mut failed = waiting.len();
        let unreachable_why: Vec<String> = waiting
            .iter()
            .map(|n| {
                let then = if frozen {
                    "its replicas stay while most nodes are down".to_string()
                } else {
                    format!("its replicas move after {}s", grace.as_secs())
                };
                format!(
                    "node {} unreachable for {}s, {then}: {}",
                    n.key,
                    n.health.down_for().as_secs(),
                    n.error.as_deref().unwrap_or("no answer")
                )
            })
            .collect();
        let mut per_node = Vec::new();
        let mut after = FleetState {
            inventories: fleet.state.inventories.clone(),
            counts: decision.placement.counts.clone(),
            summaries: fleet
                .nodes
                .iter()
                .filter_map(|n| n.summary.clone().map(|s| (n.key.clone(), s)))
                .collect(),
            rolling: decision.rolling.clone(),
        };
        // Every node's plan at once: a slow node (a long grace period to prune, a slow
        // apply) does not hold the others' back.
        let limits = self.opts.apply_limits;
        let outcomes = futures::future::join_all(plans.into_iter().map(|(key, client, own, p)| {
            let union = before.inventories.get(&key).cloned().unwrap_or_default();
            async move {
                let done = carry_out(&client, limits, &own, union, p).await;
                (key, done)
            }
        }))
        .await;
        for (key, done) in outcomes {
            let done = done?;
            failed += done.failed;
            for name in &done.not_applied {
                // Avoided until the next revision; what ran there before still runs there.
                fleet.avoid.refused(name, &revision, &key);
                let before = fleet
                    .state
                    .counts
                    .get(name)
                    .and_then(|m| m.get(&key))
                    .copied();
                let e = after.counts.entry(name.clone()).or_default();
                match before {
                    Some(c) => e.insert(key.clone(), c),
                    None => e.remove(&key),
                };
            }
            after.inventories.insert(key.clone(), done.inventory);
            per_node.push((key, done.results));
        }
        // Nodes that did not answer keep their share until the grace period ends; after that
        // their replicas were placed elsewhere, and their copies are pruned when they return.
        for n in fleet
            .nodes
            .iter()
            .filter(|n| !observed.contains_key(&n.key))
        {
            if evacuated(n) {
                continue;
            }
            for (name, per) in &fleet.state.counts {
                if let Some(c) = per.get(&n.key) {
                    after
                        .counts
                        .entry(name.clone())
                        .or_default()
                        .insert(n.key.clone(), *c);
                }
            }
        }
        after.counts.retain(|_, m| !m.is_empty());
        write_json(&fleet_path(&self.opts.state_dir), &after)
            .context("record the fleet inventory after applying")?;
        fleet.state = after;
        let results = merge_results(&set, &per_node, &decision.placement);
        tracing::info!(
            %revision,
            workloads = set.workloads.len(),
            nodes = fleet.nodes.len(),
            reachable = observed.len(),
            unplaced = decision.placement.unplaced.values().map(Vec::len).sum::<usize>(),
            failed,
            fetch_ms,
            parse_ms,
            node_ms = node_started.elapsed().as_millis() as u64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "synced"
        );
        Ok(Synced::Applied {
            revision,
            files: set.files,
            workloads: results,
            failed,
            why: unreachable_why,
        })
    }

    /// Each node as the last sync saw it (for status).
    pub(super) fn fleet_status(&self) -> Vec<NodeStatus> {
        let Some(fleet) = &self.fleet else {
            return Vec::new();
        };
        fleet
            .nodes
            .iter()
            .map(|n| NodeStatus {
                node: n.key.clone(),
                id: n.summary.as_ref().map(|s| s.id.clone()).unwrap_or_default(),
                reachable: n.health.is_ready() && n.summary.is_some(),
                unreachable_for_s: (!n.health.is_ready()).then(|| n.health.down_for().as_secs()),
                evacuated: !keeps_replicas(n.health, fleet.judge.frozen()),
                error: n.error.clone(),
                replicas: fleet
                    .state
                    .counts
                    .values()
                    .filter_map(|m| m.get(&n.key))
                    .sum(),
            })
            .collect()
    }
}

/// How long a node that answered at the last sync may take to answer a sync's questions.
const OBSERVE_DEADLINE: Duration = Duration::from_secs(15);
/// The same for a node that did not answer at the last sync: a node that hangs costs each
/// sync this much, not a request timeout.
const SUSPECT_DEADLINE: Duration = Duration::from_secs(2);

/// `answer`, or an error naming `deadline` when the node takes longer.
async fn within<T, E: Into<anyhow::Error>>(
    deadline: Duration,
    answer: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(deadline, answer).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(anyhow!("no answer within {}s", deadline.as_secs())),
    }
}

/// How often a fleet syncs while a workload rolls out across its nodes.
pub(super) const ROLLOUT_POLL: Duration = Duration::from_secs(2);

/// How far the copies of workloads rolling out across nodes are (workload → node → copy), and
/// the copies that were asked for and not answered (they wait). A workload rolls while one
/// of its nodes holds a copy of another spec, or did at the last sync (its nodes may still be
/// rolling): for those only, each node holding a copy is asked.
async fn rollout_copies(
    nodes: &[FleetNode],
    was_rolling: &BTreeSet<String>,
    desired: &Desired<'_>,
    observed: &BTreeMap<String, BTreeMap<String, Observed>>,
) -> (
    BTreeMap<String, BTreeMap<String, Copy>>,
    BTreeMap<String, BTreeSet<String>>,
) {
    let mut copies = BTreeMap::new();
    let mut unknown: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (&name, w) in desired {
        let target = hyperbox_api::spec_hash(w);
        let holders: Vec<&FleetNode> = nodes
            .iter()
            .filter(|n| observed.get(&n.key).is_some_and(|o| o.contains_key(name)))
            .collect();
        let stale = holders
            .iter()
            .any(|n| observed[&n.key][name].template_hash != target);
        if !stale && !was_rolling.contains(name) {
            continue;
        }
        let answers = futures::future::join_all(
            holders
                .iter()
                .map(|n| async move { (n.key.clone(), n.client.get(name).await) }),
        )
        .await;
        let per_node: &mut BTreeMap<String, Copy> = copies.entry(name.to_string()).or_default();
        for (node, r) in answers {
            match r {
                Ok(st) => {
                    per_node.insert(node, Copy::of(&st));
                }
                Err(e) => {
                    tracing::warn!(workload = %name, node = %node, error = %e, "rollout: node did not say how far it is; it waits");
                    unknown.entry(name.to_string()).or_default().insert(node);
                }
            }
        }
    }
    (copies, unknown)
}

fn step_name(s: &Step) -> &'static str {
    match s {
        Step::Send(_) => "send",
        Step::Hold => "hold",
        Step::Remove => "remove",
    }
}

/// The desired set for one node from the core's steps: each workload sent there as the core
/// made its copy, and those that hold (with their current definition, which the caller does
/// not apply: the node keeps its copy).
fn node_share(
    set: &ManifestSet,
    decision: &mut Decision,
    node: &str,
) -> (ManifestSet, Vec<String>) {
    let mut out = ManifestSet {
        workloads: BTreeMap::new(),
        files: set.files.clone(),
        protected: set.protected.clone(),
        broken_files: set.broken_files.clone(),
    };
    let mut held = Vec::new();
    for (name, steps) in decision.steps.iter_mut() {
        let Some(sw) = set.workloads.get(name) else {
            continue;
        };
        // The copy is taken out of the decision: each node's is made once.
        match steps.remove(node) {
            Some(Step::Send(workload)) => {
                let copy = SourcedWorkload {
                    file: sw.file.clone(),
                    workload: *workload,
                };
                out.workloads.insert(name.clone(), copy);
            }
            Some(Step::Hold) => {
                held.push(name.clone());
                out.workloads.insert(name.clone(), sw.clone());
            }
            Some(Step::Remove) | None => {}
        }
    }
    (out, held)
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
    use crate::fleet_core::placement::Unplaced;
    use crate::manifests::{assemble, parse_file};
    use std::sync::Arc;

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
