//! The Git sync loop: poll with jitter or sync at once on a signed webhook, reconcile each
//! revision onto the node, keep status and inventory in the state dir, back off while the
//! source or the node is unreachable (running work is never torn down for that).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::{Mutex, PoisonError};

use anyhow::{anyhow, Context, Result};
use hyperbox_client::NodeClient;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::apply::Limits;
use crate::gitsource::GitSource;
use crate::manifests::{assemble, FileReport, ManifestSet};
use crate::nodewatch::NodeWatch;
use crate::reconcile::{plan, Inventory, Outcome, WorkloadResult};

use carry::{carry_out, observe};
use fleet::{Fleet, ROLLOUT_POLL};

mod carry;
pub mod fleet;

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
    pub pressure_weights: crate::fleet_core::placement::PressureWeights,
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

/// What a sync attempt that got to the end did.
pub(super) enum Synced {
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
    hyperbox_api::backoff::Backoff::new(MIN_RETRY, cap).jittered(failures, unit)
}

pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

fn inventory_path(state_dir: &Path) -> PathBuf {
    state_dir.join("inventory.json")
}

pub(super) fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
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

pub(super) fn short(revision: &str) -> &str {
    revision.get(..12).unwrap_or(revision)
}

/// ±10% so many edge boxes polling one server spread out.
fn jitter(d: Duration) -> Duration {
    let f: f64 = 0.9 + rand::random::<f64>() * 0.2;
    d.mul_f64(f)
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
