//! The Git sync loop: poll with jitter or sync at once on a signed webhook, reconcile each
//! revision onto the node, keep status and inventory in the state dir, back off while the
//! source or the node is unreachable (running work is never torn down for that).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::{Mutex, PoisonError};

use anyhow::{anyhow, Context, Result};
use hyperbox_api::NodeSummary;
use hyperbox_client::NodeClient;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::apply::{deliver, Delivery, Limits};
use crate::fleet::{merge_results, node_set, place_fleet, Counts, NodeView};
use crate::fleet_core::avoid::{AvoidMemory, PRESSURE_AVOID};
use crate::fleet_core::liveness::{keeps_replicas, Health, Judge, Liveness, LivenessTimings};
use crate::fleet_core::rollout::{self, Copy, Gate, Share};
use crate::gitsource::GitSource;
use crate::manifests::{assemble, FileReport, ManifestSet};
use crate::nodewatch::NodeWatch;
use crate::reconcile::{plan, Inventory, Observed, Outcome, WorkloadResult};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    pub url: String,
    pub reference: String,
    pub path: String,
    pub last_fetched_revision: Option<String>,
    pub last_fetch_unix: Option<u64>,
    pub last_applied_revision: Option<String>,
    pub last_applied_unix: Option<u64>,
    /// True when the last sync failed (fetch, manifests, node, state dir): what runs may be
    /// from an older revision than the source's.
    pub stale: bool,
    /// Why the last sync failed.
    pub error: Option<String>,
    /// Failed syncs in a row; retries back off with it.
    pub consecutive_failures: u32,
    pub last_sync_ms: Option<u64>,
    /// Sync attempts since the operator started (each one recorded here, success or not):
    /// lets a watcher wait for "a sync has run since" instead of sleeping.
    #[serde(default)]
    pub syncs: u64,
    pub files: Vec<FileReport>,
    pub workloads: Vec<WorkloadResult>,
    /// With several `--node`s: each node as the last sync saw it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeStatus>,
    /// Requests to the nodes since the operator started, and their bytes on the wire.
    #[serde(default)]
    pub node_api: hyperbox_client::WireTotals,
    /// How the nodes are observed: `watch` or `poll`.
    #[serde(default)]
    pub node_observation: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The node's address, as given with `--node`.
    pub node: String,
    /// The node's stable id, once it answered.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub reachable: bool,
    /// Seconds since it last answered, while it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_for_s: Option<u64>,
    /// Past the grace period: its replicas were moved to other nodes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub evacuated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Replicas of this source placed on it.
    pub replicas: u32,
}

pub struct SyncOptions {
    pub state_dir: PathBuf,
    pub interval: Duration,
    pub prune: bool,
    pub verify_signatures: Option<PathBuf>,
    /// How applies are cut into requests the node accepts.
    pub apply_limits: Limits,
    /// Watch the nodes' digests (each round held this long) instead of listing them at every
    /// sync; None polls (see [`crate::nodewatch`]).
    pub node_watch: Option<Duration>,
    /// How node pressure ranks nodes (several nodes).
    pub pressure_weights: crate::placement::PressureWeights,
}

pub struct Syncer {
    /// Shared with the blocking threads that fetch and read manifests: a hung fetch then holds
    /// a thread, never the task that answers signals.
    source: Arc<Mutex<GitSource>>,
    node: NodeClient,
    opts: SyncOptions,
    status: SourceStatus,
    inventory: Inventory,
    /// Set with several nodes: placement across them (see [`crate::fleet`]).
    fleet: Option<Fleet>,
    /// The watch of the single node (see [`crate::nodewatch`]), once `run` started it.
    watch: Option<NodeWatch>,
}

/// What this source owns on each node, and where it placed each workload's replicas.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FleetState {
    inventories: BTreeMap<String, Inventory>,
    counts: Counts,
    /// Each node's last answer (labels, room), so that a node that is down when the
    /// operator starts keeps its share for the grace period instead of losing it at once.
    #[serde(default)]
    summaries: BTreeMap<String, NodeSummary>,
    /// Workloads rolling out across nodes (some node waits for its turn or still rolls):
    /// each sync asks their nodes how far they are.
    #[serde(default)]
    rolling: BTreeSet<String>,
}

struct FleetNode {
    key: String,
    client: NodeClient,
    /// The last summary it answered with.
    summary: Option<NodeSummary>,
    /// Its answers, for the fleet core's liveness (no heartbeats here: reachability alone).
    liveness: Liveness,
    /// What the last sync made of them.
    health: Health,
    error: Option<String>,
    watch: Option<NodeWatch>,
}

struct Fleet {
    nodes: Vec<FleetNode>,
    /// How long an unreachable node keeps its replicas.
    grace: Duration,
    /// Judges the nodes at each sync, and remembers whether most looked down.
    judge: Judge,
    state: FleetState,
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

fn fleet_path(state_dir: &Path) -> PathBuf {
    state_dir.join("fleet.json")
}

/// What a sync attempt that got to the end did.
enum Synced {
    /// Same revision and no drift: nothing to do.
    Unchanged { revision: String },
    Applied {
        revision: String,
        files: Vec<FileReport>,
        workloads: Vec<WorkloadResult>,
        /// Node operations (applies, prunes) that failed; retried at the next sync.
        failed: usize,
        /// Why, where known beyond the per-workload results (an unreachable node).
        why: Vec<String>,
    },
}

/// Shortest and longest wait before retrying a failed sync.
const MIN_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);

/// How long to wait after `failures` consecutive failed syncs: doubling from 1 s, capped at the
/// poll interval (within 1 s..5 min: a failing source is retried at least as often as a healthy
/// one is polled), then shortened by up to half (`unit` is uniform in 0..1) so a fleet that
/// failed together does not retry in lockstep.
pub fn retry_delay(failures: u32, interval: Duration, unit: f64) -> Duration {
    let cap = interval.clamp(MIN_RETRY, MAX_RETRY);
    let doubled = MIN_RETRY.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(cap).mul_f64(1.0 - 0.5 * unit.clamp(0.0, 1.0))
}

pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

fn inventory_path(state_dir: &Path) -> PathBuf {
    state_dir.join("inventory.json")
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let data = serde_json::to_vec_pretty(value)?;
    hyperbox_api::util::write_atomic(path, &data, true)
        .with_context(|| format!("write {}", path.display()))
}

impl Syncer {
    pub fn new(source: GitSource, node: NodeClient, opts: SyncOptions) -> Result<Syncer> {
        std::fs::create_dir_all(&opts.state_dir)
            .with_context(|| format!("create {}", opts.state_dir.display()))?;
        let inventory = match std::fs::read(inventory_path(&opts.state_dir)) {
            Ok(b) => serde_json::from_slice(&b).context("parse inventory.json")?,
            Err(_) => Inventory::new(),
        };
        let mut status: SourceStatus = std::fs::read(status_path(&opts.state_dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let cfg = source.config();
        status.url = cfg.url.clone();
        status.reference = cfg.reference.to_string();
        status.path = cfg.path.clone();
        Ok(Syncer {
            source: Arc::new(Mutex::new(source)),
            node,
            opts,
            status,
            inventory,
            fleet: None,
            watch: None,
        })
    }

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

    pub fn status(&self) -> &SourceStatus {
        &self.status
    }

    fn save_status(&self) {
        if let Err(e) = write_json(&status_path(&self.opts.state_dir), &self.status) {
            tracing::error!(error = %format!("{e:#}"), "write status");
        }
    }

    /// The last sync applied `revision` without an error and without a failed workload:
    /// if the nodes still hold what was applied, there is nothing to do. (Workloads a node
    /// refused are retried at every sync: what stood in the way may be gone.)
    fn settled_at(&self, revision: &str) -> bool {
        self.status.last_applied_revision.as_deref() == Some(revision)
            && self.status.error.is_none()
            && !self
                .status
                .workloads
                .iter()
                .any(|w| w.outcome == Outcome::Failed)
    }

    /// Read and assemble the manifests of `revision` (on a blocking thread).
    async fn read_manifests(&self, revision: &str) -> Result<ManifestSet> {
        let rev = revision.to_string();
        self.with_source("read manifests", move |s| {
            s.manifests(&rev)
                .map(assemble)
                .with_context(|| format!("read manifests at {}", short(&rev)))
        })
        .await
    }

    /// Run blocking Git work (network, object database, parsing) on a blocking thread.
    async fn with_source<T, F>(&self, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut GitSource) -> Result<T> + Send + 'static,
    {
        let source = self.source.clone();
        tokio::task::spawn_blocking(move || {
            // A panic mid-parse leaves nothing half-written that matters: the cache is keyed
            // by content.
            let mut s = source.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut s)
        })
        .await
        .with_context(|| format!("git source: {what}"))?
    }

    /// One sync: fetch, parse, diff against the node, act, record. Errors leave what runs
    /// alone. Every attempt, failed or not, is recorded in one place (`record`).
    pub async fn sync_once(&mut self) -> Result<()> {
        let started = Instant::now();
        let attempt = self.attempt(started).await;
        self.record(started, attempt)
    }

    /// Status, error and failure count from one attempt; a failure comes back as `Err`.
    fn record(&mut self, started: Instant, attempt: Result<Synced>) -> Result<()> {
        let result = match attempt {
            Ok(Synced::Unchanged { revision }) => {
                tracing::debug!(%revision, "no change");
                Ok(())
            }
            Ok(Synced::Applied {
                revision,
                files,
                workloads,
                failed,
                why,
            }) => {
                self.status.files = files;
                self.status.workloads = workloads;
                if failed == 0 {
                    self.status.last_applied_revision = Some(revision);
                    self.status.last_applied_unix = Some(hyperbox_api::util::now_unix());
                    Ok(())
                } else {
                    let why = if why.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", why.join("; "))
                    };
                    Err(anyhow!(
                        "{failed} node operations failed at {}{why}; retrying",
                        short(&revision)
                    ))
                }
            }
            Err(e) => Err(e),
        };
        self.status.last_sync_ms = Some(started.elapsed().as_millis() as u64);
        self.status.syncs += 1;
        self.status.nodes = self.fleet_status();
        self.status.node_api = self.wire_totals();
        self.status.node_observation = if self.opts.node_watch.is_some() {
            "watch"
        } else {
            "poll"
        }
        .to_string();
        match &result {
            Ok(()) => {
                self.status.stale = false;
                self.status.error = None;
                self.status.consecutive_failures = 0;
            }
            Err(e) => {
                self.status.stale = true;
                self.status.error = Some(format!("{e:#}"));
                self.status.consecutive_failures =
                    self.status.consecutive_failures.saturating_add(1);
            }
        }
        self.save_status();
        result
    }

    async fn attempt(&mut self, started: Instant) -> Result<Synced> {
        let revision = self.with_source("fetch", |s| s.fetch()).await?;
        let fetch_ms = started.elapsed().as_millis() as u64;
        self.status.last_fetched_revision = Some(revision.clone());
        self.status.last_fetch_unix = Some(hyperbox_api::util::now_unix());
        if let Some(keyring) = self.opts.verify_signatures.clone() {
            let rev = revision.clone();
            self.with_source("verify signature", move |s| {
                s.verify_signature(&rev, &keyring)
            })
            .await?;
        }
        if let Some(mut fleet) = self.fleet.take() {
            let r = self
                .attempt_fleet(&mut fleet, revision, started, fetch_ms)
                .await;
            self.fleet = Some(fleet);
            return r;
        }
        let current = self
            .watch
            .as_ref()
            .and_then(|w| w.current(self.node.digests_version_seen()));
        let observed = match current {
            Some(digests) => observe(digests.iter().cloned()),
            None => observe(self.node.digest_hashes().await.context("node")?),
        };
        // Nothing new and no drift: a no-change sync costs one fetch and one list.
        // Workloads the node refused last time (another source owned them, its policy, size)
        // are retried at every sync: what stood in the way may be gone.
        let unchanged = self.settled_at(&revision)
            && self.inventory.iter().all(|(name, e)| {
                observed
                    .get(name)
                    .is_some_and(|o| o.spec_hash == e.spec_hash)
            });
        if unchanged {
            return Ok(Synced::Unchanged { revision });
        }
        let parse_started = Instant::now();
        let mut set = self.read_manifests(&revision).await?;
        let p = plan(&set, &revision, &self.inventory, &observed, self.opts.prune);
        let parse_ms = parse_started.elapsed().as_millis() as u64;
        let node_started = Instant::now();
        // Record what we are about to own before acting, so a crash mid-sync can still prune it.
        let mut union = self.inventory.clone();
        union.extend(p.inventory.clone());
        write_json(&inventory_path(&self.opts.state_dir), &union)
            .context("record the inventory before applying")?;
        let errors = set.error_count();
        let workload_count = set.workloads.len();
        // The plan holds what is sent; the parsed set is not needed while the node works.
        set.workloads.clear();
        let done = carry_out(
            &self.node,
            self.opts.apply_limits,
            &self.inventory,
            union,
            p,
        )
        .await?;
        write_json(&inventory_path(&self.opts.state_dir), &done.inventory)
            .context("record the inventory after applying")?;
        self.inventory = done.inventory;
        let (results, failed) = (done.results, done.failed);
        let count = |o: Outcome| results.iter().filter(|r| r.outcome == o).count();
        tracing::info!(
            %revision,
            workloads = workload_count,
            created = count(Outcome::Created),
            updated = count(Outcome::Updated),
            restored = count(Outcome::Restored),
            pruned = count(Outcome::Pruned),
            skipped = count(Outcome::Skipped),
            failed = count(Outcome::Failed),
            file_errors = errors,
            fetch_ms,
            parse_ms,
            node_ms = node_started.elapsed().as_millis() as u64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "synced"
        );
        for f in &set.files {
            for e in &f.errors {
                tracing::warn!(error = %e, "manifest skipped");
            }
        }
        Ok(Synced::Applied {
            revision,
            files: set.files,
            workloads: results,
            failed,
            why: Vec::new(),
        })
    }

    /// One sync over several nodes: observe them, place, then reconcile each reachable node
    /// with its share like a single node.
    async fn attempt_fleet(
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
        let placement = place_fleet(
            &set,
            &fleet.state.counts,
            &views,
            &avoid,
            &self.opts.pressure_weights,
        );
        // Images to keep ready on each node (standby workloads, pending replicas): asked for
        // at each placement, which renews the node's hour.
        let hints = crate::fleet::prewarm_hints(&set, &placement, &views);
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
        // Rollouts across nodes: each workload's bounds split between its nodes.
        let (gates, rolling) = rollout_gates(
            &fleet.nodes,
            &fleet.state.rolling,
            &set,
            &placement.counts,
            &observed,
        )
        .await;
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
            let mut share = node_set(&set, &placement.counts, &n.key);
            let mut held = Vec::new();
            for (name, per_node) in &gates {
                match per_node.get(&n.key) {
                    Some(Gate::Roll(b)) => {
                        if let Some(sw) = share.workloads.get_mut(name) {
                            rollout::with_bounds(&mut sw.workload, *b);
                        }
                    }
                    Some(Gate::Hold) => held.push(name),
                    _ => {}
                }
            }
            let mut p = plan(&share, &revision, &own, obs, self.opts.prune);
            // A node whose turn has not come keeps its copy, and we own it as we did.
            for name in held {
                p.apply.retain(|w| w.key() != *name);
                match own.get(name) {
                    Some(e) => p.inventory.insert(name.clone(), e.clone()),
                    None => p.inventory.remove(name),
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
            counts: placement.counts.clone(),
            summaries: fleet
                .nodes
                .iter()
                .filter_map(|n| n.summary.clone().map(|s| (n.key.clone(), s)))
                .collect(),
            rolling,
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
        let results = merge_results(&set, &per_node, &placement);
        tracing::info!(
            %revision,
            workloads = set.workloads.len(),
            nodes = fleet.nodes.len(),
            reachable = observed.len(),
            unplaced = placement.unplaced.values().map(Vec::len).sum::<usize>(),
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
    fn fleet_status(&self) -> Vec<NodeStatus> {
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

    /// Requests and wire bytes of every node client so far.
    fn wire_totals(&self) -> hyperbox_client::WireTotals {
        match &self.fleet {
            Some(f) => f
                .nodes
                .iter()
                .fold(Default::default(), |t, n| t.plus(n.client.wire_totals())),
            None => self.node.wire_totals(),
        }
    }

    /// Start watching the nodes (with `node_watch`): a change wakes `trigger`.
    fn start_watches(&mut self, trigger: &Arc<Notify>) {
        let Some(timeout) = self.opts.node_watch else {
            return;
        };
        match &mut self.fleet {
            Some(f) => {
                for n in &mut f.nodes {
                    n.watch = Some(NodeWatch::start(n.client.clone(), timeout, trigger.clone()));
                }
            }
            None => {
                self.watch = Some(NodeWatch::start(
                    self.node.clone(),
                    timeout,
                    trigger.clone(),
                ))
            }
        }
    }

    /// Poll forever (with jitter), syncing at once when `trigger` fires (a webhook, or a
    /// node's digests changed); after a failure, retry with a jittered exponential backoff.
    pub async fn run(&mut self, trigger: Arc<Notify>) {
        self.start_watches(&trigger);
        loop {
            let wait = match self.sync_once().await {
                // A rollout across nodes moves on when a node finishes its part, which its
                // digests do not show: look again soon.
                Ok(())
                    if self
                        .fleet
                        .as_ref()
                        .is_some_and(|f| !f.state.rolling.is_empty()) =>
                {
                    ROLLOUT_POLL.min(self.opts.interval)
                }
                Ok(()) => jitter(self.opts.interval),
                Err(e) => {
                    let failures = self.status.consecutive_failures;
                    let backoff = retry_delay(failures, self.opts.interval, rand::random());
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        failures,
                        retry_in_ms = backoff.as_millis() as u64,
                        "sync failed; running workloads are left alone"
                    );
                    backoff
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = trigger.notified() => tracing::info!("webhook or node change: syncing now"),
            }
        }
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
const ROLLOUT_POLL: Duration = Duration::from_secs(2);

/// What each node gets of each workload that rolls out across nodes (workload → node →
/// gate), and the workloads still rolling. A workload rolls while one of its nodes holds a
/// copy of another spec, or did at the last sync (its nodes may still be rolling): for those
/// only, each node holding a copy is asked how far it is. A node that does not answer waits.
async fn rollout_gates(
    nodes: &[FleetNode],
    was_rolling: &BTreeSet<String>,
    set: &ManifestSet,
    counts: &Counts,
    observed: &BTreeMap<String, BTreeMap<String, Observed>>,
) -> (BTreeMap<String, BTreeMap<String, Gate>>, BTreeSet<String>) {
    let mut gates = BTreeMap::new();
    let mut rolling = BTreeSet::new();
    for (name, sw) in &set.workloads {
        let Some(per_node) = counts.get(name) else {
            continue;
        };
        let target = hyperbox_api::spec_hash(&sw.workload);
        let holders: Vec<&FleetNode> = nodes
            .iter()
            .filter(|n| per_node.contains_key(&n.key))
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
        let mut unanswered = Vec::new();
        let mut copies = BTreeMap::new();
        for (node, r) in answers {
            match r {
                Ok(st) => {
                    copies.insert(node, Copy::of(&st));
                }
                Err(e) => {
                    tracing::warn!(workload = %name, node = %node, error = %e, "rollout: node did not say how far it is; it waits");
                    unanswered.push(node);
                }
            }
        }
        let runs = !sw.workload.spec.suspend && !sw.workload.spec.standby;
        let shares: BTreeMap<String, Share> = per_node
            .iter()
            .map(|(node, &n)| {
                let share = Share {
                    replicas: if runs { n } else { 0 },
                    copy: copies.remove(node),
                };
                (node.clone(), share)
            })
            .collect();
        let mut g = rollout::gate(&sw.workload.spec.strategy, &target, &shares);
        for node in unanswered {
            g.insert(node, Gate::Hold);
        }
        if g.values().any(|g| *g != Gate::Send) {
            rolling.insert(name.clone());
            tracing::info!(workload = %name, gates = ?g, "rolling out across nodes");
        }
        gates.insert(name.clone(), g);
    }
    (gates, rolling)
}

/// What carrying out one node's plan did.
struct Done {
    results: Vec<WorkloadResult>,
    /// The inventory to keep: what this source now owns on the node.
    inventory: Inventory,
    /// Node operations that failed (retried at the next sync).
    failed: usize,
    /// Workloads the node refused or that were too large: not applied.
    not_applied: Vec<String>,
}

/// Apply and prune one node's plan. `previous` is the inventory before the sync, `union` the
/// one recorded before acting (previous and planned): kept whole when something failed.
async fn carry_out(
    node: &NodeClient,
    limits: Limits,
    previous: &Inventory,
    union: Inventory,
    p: crate::reconcile::Plan,
) -> Result<Done> {
    let crate::reconcile::Plan {
        apply,
        delete,
        mut results,
        inventory: planned,
    } = p;
    let mut failed = 0usize;
    let docs: Vec<Vec<u8>> = apply
        .iter()
        .map(|w| serde_json::to_vec(w).context("serialize workload"))
        .collect::<Result<_>>()?;
    // Only the JSON is sent: at 10,000 workloads the structs are several MiB that need not
    // stay alive while it is.
    let names: Vec<String> = apply.iter().map(hyperbox_api::Workload::key).collect();
    drop(apply);
    let deliveries = deliver(&docs, &limits, |body| async move {
        node.apply_json(body).await.map(drop)
    })
    .await;
    let mut not_applied = Vec::new();
    for (name, d) in names.iter().zip(&deliveries) {
        match d {
            Delivery::Applied => continue,
            Delivery::TooLarge { .. } => {
                not_applied.push(name.clone());
                tracing::warn!(workload = %name, "workload too large for the node; not applied");
            }
            Delivery::Refused(_) => {
                not_applied.push(name.clone());
                tracing::warn!(workload = %name, "node refused the workload; not applied");
            }
            Delivery::Failed(_) => failed += 1,
        }
        if let Some(r) = results.iter_mut().find(|r| &r.name == name) {
            r.outcome = Outcome::Failed;
            r.message = d.message(name, &limits);
        }
    }
    let deletes = delete.iter().map(|name| {
        let node = node.clone();
        let name = name.clone();
        async move { (name.clone(), node.delete(&name).await) }
    });
    let mut taken_over = Vec::new();
    for (name, r) in futures_join_all(deletes).await {
        if let Err(e) = r {
            if e.status() == Some(409) {
                // Another manager owns it now: it is no longer ours to prune.
                tracing::warn!(workload = %name, error = %e, "not pruned: managed by another source");
                taken_over.push(name);
            } else if e.status() != Some(404) {
                failed += 1;
                tracing::error!(workload = %name, error = %e, "prune failed");
            }
        }
    }
    let mut inventory = planned;
    if failed > 0 {
        // Keep ownership of everything we may have touched; the next sync retries.
        inventory = union;
    }
    // What was never applied is owned as before: its previous version, or nothing.
    for name in &not_applied {
        match previous.get(name) {
            Some(before) => inventory.insert(name.clone(), before.clone()),
            None => inventory.remove(name),
        };
    }
    for name in &taken_over {
        inventory.remove(name);
    }
    Ok(Done {
        results,
        inventory,
        failed,
        not_applied,
    })
}

/// A node's digests as the diff needs them.
fn observe(
    digests: impl IntoIterator<Item = hyperbox_client::DigestHash>,
) -> BTreeMap<String, Observed> {
    digests
        .into_iter()
        .map(|d| {
            (
                d.key(),
                Observed {
                    // Nodes older than config_hash only have the spec hash.
                    spec_hash: if d.config_hash.is_empty() {
                        d.spec_hash.clone()
                    } else {
                        d.config_hash
                    },
                    template_hash: d.spec_hash,
                    evicted_for_pressure: d.evicted_for_pressure,
                },
            )
        })
        .collect()
}

fn short(revision: &str) -> &str {
    revision.get(..12).unwrap_or(revision)
}

/// ±10% so many edge boxes polling one server spread out.
fn jitter(d: Duration) -> Duration {
    let f: f64 = 0.9 + rand::random::<f64>() * 0.2;
    d.mul_f64(f)
}

async fn futures_join_all<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn retry_delay_doubles_up_to_the_interval() {
        let no_jitter = |n| retry_delay(n, S(30), 0.0);
        let got: Vec<Duration> = (1..=7).map(no_jitter).collect();
        assert_eq!(got, vec![S(1), S(2), S(4), S(8), S(16), S(30), S(30)]);
        // Never slower than 5 minutes, never faster than 1 s.
        assert_eq!(retry_delay(20, S(3600), 0.0), S(300));
        assert_eq!(retry_delay(u32::MAX, S(3600), 0.0), S(300));
        assert_eq!(retry_delay(5, Duration::from_millis(300), 0.0), S(1));
        assert_eq!(retry_delay(0, S(30), 0.0), S(1));
    }

    #[test]
    fn retry_delay_is_jittered_down_by_at_most_half() {
        assert_eq!(retry_delay(4, S(30), 1.0), S(4));
        assert_eq!(retry_delay(4, S(30), 0.5), S(6));
        for _ in 0..100 {
            let d = retry_delay(6, S(60), rand::random());
            assert!(d >= S(16) && d <= S(32), "{d:?}");
        }
    }
}
