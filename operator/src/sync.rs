//! The Git sync loop: poll with jitter or sync at once on a signed webhook, reconcile each
//! revision onto the node, keep status and inventory in the state dir, back off while the
//! source or the node is unreachable (running work is never torn down for that).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use hyperbox_api::client::NodeClient;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::gitsource::GitSource;
use crate::manifests::{assemble, FileReport};
use crate::reconcile::{plan, Inventory, Observed, Outcome, WorkloadResult};

/// Workloads per apply request (the node caps request bodies).
const APPLY_CHUNK: usize = 500;

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
    /// True when the last fetch failed: what runs is from an older revision.
    pub stale: bool,
    pub error: Option<String>,
    pub consecutive_failures: u32,
    pub last_sync_ms: Option<u64>,
    pub files: Vec<FileReport>,
    pub workloads: Vec<WorkloadResult>,
}

pub struct SyncOptions {
    pub state_dir: PathBuf,
    pub interval: Duration,
    pub prune: bool,
    pub verify_signatures: Option<PathBuf>,
}

pub struct Syncer {
    source: GitSource,
    node: NodeClient,
    opts: SyncOptions,
    status: SourceStatus,
    inventory: Inventory,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

fn inventory_path(state_dir: &Path) -> PathBuf {
    state_dir.join("inventory.json")
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let data = serde_json::to_vec_pretty(value)?;
    {
        use std::io::Write;
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("rename into {}", path.display()))
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
            source,
            node,
            opts,
            status,
            inventory,
        })
    }

    fn save_status(&self) {
        if let Err(e) = write_json(&status_path(&self.opts.state_dir), &self.status) {
            tracing::error!(error = %format!("{e:#}"), "write status");
        }
    }

    /// One sync: fetch, parse, diff against the node, act, record. Errors leave what runs alone.
    pub async fn sync_once(&mut self) -> Result<()> {
        let started = Instant::now();
        let revision = match tokio::task::block_in_place(|| self.source.fetch()) {
            Ok(r) => r,
            Err(e) => {
                self.status.stale = true;
                self.status.error = Some(format!("{e:#}"));
                self.status.consecutive_failures += 1;
                self.save_status();
                return Err(e);
            }
        };
        let fetch_ms = started.elapsed().as_millis() as u64;
        self.status.last_fetched_revision = Some(revision.clone());
        self.status.last_fetch_unix = Some(now_unix());
        if let Some(keyring) = &self.opts.verify_signatures {
            if let Err(e) =
                tokio::task::block_in_place(|| self.source.verify_signature(&revision, keyring))
            {
                self.status.error = Some(format!("{e:#}"));
                self.status.consecutive_failures += 1;
                self.save_status();
                return Err(e);
            }
        }
        let observed: BTreeMap<String, Observed> = match self.node.digests().await {
            Ok(list) => list
                .into_iter()
                .map(|d| {
                    (
                        d.name,
                        Observed {
                            spec_hash: d.spec_hash,
                            revision: d.revision,
                        },
                    )
                })
                .collect(),
            Err(e) => {
                self.status.error = Some(format!("node: {e}"));
                self.status.consecutive_failures += 1;
                self.save_status();
                return Err(e.into());
            }
        };
        // Nothing new and no drift: a no-change sync costs one fetch and one list.
        let unchanged = self.status.last_applied_revision.as_deref() == Some(revision.as_str())
            && self.status.error.is_none()
            && self.inventory.iter().all(|(name, e)| {
                observed.get(name).is_some_and(|o| {
                    o.spec_hash == e.spec_hash && o.revision.as_deref() == Some(revision.as_str())
                })
            });
        if unchanged {
            self.status.stale = false;
            self.status.consecutive_failures = 0;
            self.status.last_sync_ms = Some(started.elapsed().as_millis() as u64);
            self.save_status();
            tracing::debug!(%revision, "no change");
            return Ok(());
        }
        let parse_started = Instant::now();
        let files = tokio::task::block_in_place(|| self.source.manifests(&revision))?;
        let set = assemble(files);
        let p = plan(&set, &revision, &self.inventory, &observed, self.opts.prune);
        let parse_ms = parse_started.elapsed().as_millis() as u64;
        let node_started = Instant::now();
        // Record what we are about to own before acting, so a crash mid-sync can still prune it.
        let mut union = self.inventory.clone();
        union.extend(p.inventory.clone());
        write_json(&inventory_path(&self.opts.state_dir), &union)?;

        let mut results = p.results.clone();
        let mut failed = 0usize;
        for chunk in p.apply.chunks(APPLY_CHUNK) {
            if let Err(e) = self.node.apply(chunk.to_vec()).await {
                failed += chunk.len();
                tracing::error!(error = %e, "apply to node failed");
                for w in chunk {
                    if let Some(r) = results.iter_mut().find(|r| r.name == w.metadata.name) {
                        r.outcome = Outcome::Skipped;
                        r.message = Some(format!("node refused it: {e}"));
                    }
                }
            }
        }
        let deletes = p.delete.iter().map(|name| {
            let node = self.node.clone();
            let name = name.clone();
            async move { (name.clone(), node.delete(&name).await) }
        });
        for (name, r) in futures_join_all(deletes).await {
            if let Err(e) = r {
                if e.status() != Some(404) {
                    failed += 1;
                    tracing::error!(workload = %name, error = %e, "prune failed");
                }
            }
        }
        let errors = set.error_count();
        let mut final_inventory = p.inventory;
        if failed > 0 {
            // Keep ownership of everything we may have touched; the next sync retries.
            final_inventory = union;
        }
        write_json(&inventory_path(&self.opts.state_dir), &final_inventory)?;
        self.inventory = final_inventory;
        let count = |o: Outcome| results.iter().filter(|r| r.outcome == o).count();
        tracing::info!(
            %revision,
            workloads = set.workloads.len(),
            created = count(Outcome::Created),
            updated = count(Outcome::Updated),
            restored = count(Outcome::Restored),
            pruned = count(Outcome::Pruned),
            skipped = count(Outcome::Skipped),
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
        self.status.files = set.files;
        self.status.workloads = results;
        self.status.stale = false;
        self.status.last_sync_ms = Some(started.elapsed().as_millis() as u64);
        if failed == 0 {
            self.status.last_applied_revision = Some(revision);
            self.status.last_applied_unix = Some(now_unix());
            self.status.error = None;
            self.status.consecutive_failures = 0;
        } else {
            self.status.error = Some(format!("{failed} node operations failed; retrying"));
            self.status.consecutive_failures += 1;
        }
        self.save_status();
        Ok(())
    }

    /// Poll forever (with jitter), syncing at once when `trigger` fires.
    pub async fn run(&mut self, trigger: Arc<Notify>) {
        loop {
            let wait = match self.sync_once().await {
                Ok(()) => jitter(self.opts.interval),
                Err(e) => {
                    let backoff = Duration::from_secs(1 << self.status.consecutive_failures.min(6))
                        .min(self.opts.interval.max(Duration::from_secs(1)));
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "sync failed; running workloads are left alone");
                    backoff
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = trigger.notified() => tracing::info!("webhook: syncing now"),
            }
        }
    }
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
