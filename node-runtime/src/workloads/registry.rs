//! The registry of workload actors: one actor per workload, created under the registry lock.
//! Applies (after the owner check and admission), deletes, restarts and evictions are handed
//! to the workload's actor; after a restart, recovery loads the records and starts an actor
//! for each.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use hyperbox_api::{spec_hash, ApplyAction, ApplyResult, Workload};
use tokio::sync::oneshot;

use super::actor::{Actor, Begin, Msg};
use super::record::{self, WorkloadRecord};
use super::{replica, Supervisor};
use crate::fsutil::{fsync_path, syncfs};
use crate::pressure::admission;

/// Why a batch was not applied; nothing of it was.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    /// Workloads (by position) owned by another manager, with the owner.
    Conflicts(Vec<(usize, String)>),
    /// Workloads (by position) the node has no room or no matching labels for.
    Admission(admission::Refusals),
}

impl Supervisor {
    /// Load the state dir after a (re)start: quarantine unreadable records, remove containers
    /// no record references (sparing those of quarantined records), then start one actor per
    /// workload, which re-adopts its live containers once their identity is proven.
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        let dir = self.shared.records_dir.clone();
        let loaded = tokio::task::spawn_blocking(move || record::load_all(&dir))
            .await
            .context("load records")??;
        let referenced: HashSet<String> = loaded
            .records
            .iter()
            .flat_map(|r| r.all_replicas().filter_map(|x| x.container_id()))
            .map(str::to_string)
            .collect();
        let spared: Vec<String> = loaded
            .quarantined
            .iter()
            .map(|q| format!("{}-", record::container_prefix(&q.name)))
            .collect();
        {
            let mut q = self.quarantined.lock().unwrap();
            for item in loaded.quarantined {
                q.insert(item.name.clone(), item);
            }
        }
        let runtime = self.shared.runtime.clone();
        tokio::task::spawn_blocking(move || {
            for id in runtime.list() {
                if referenced.contains(&id) {
                    continue;
                }
                if spared.iter().any(|p| id.starts_with(p)) {
                    tracing::warn!(container = %id, "keeping a container of a quarantined record");
                    continue;
                }
                tracing::warn!(container = %id, "removing leaked container");
                if let Err(e) = runtime.destroy(&id) {
                    tracing::warn!(container = %id, error = %format!("{e:#}"), "leak cleanup failed");
                }
            }
        })
        .await
        .context("sweep leaked containers")?;
        let count = loaded.records.len();
        {
            let mut admitted = self.admitted.lock().unwrap();
            for rec in loaded.records.iter().filter(|r| !r.deleting) {
                admitted.insert(rec.workload.key(), rec.workload.total_request());
            }
        }
        let mut reg = self.shared.registry.lock().await;
        for rec in loaded.records {
            let name = rec.workload.key();
            let id = self.shared.next_actor.fetch_add(1, Ordering::Relaxed);
            let handle = Actor::spawn(self.shared.clone(), id, rec, Begin::Recovered);
            reg.insert(name, handle);
        }
        tracing::info!(workloads = count, "recovery started");
        Ok(())
    }

    /// Apply desired workloads by hand (no manager). Unchanged specs are left alone (only
    /// metadata is refreshed). Answers once every record is durable.
    pub async fn apply(self: &Arc<Self>, workloads: Vec<Workload>) -> Result<Vec<ApplyResult>> {
        match self.apply_as(workloads, None, false).await? {
            Ok(r) => Ok(r),
            Err(refused) => anyhow::bail!("refused: {refused:?}"),
        }
    }

    /// Workloads (by position) that `manager` may not change: another manager owns them. None
    /// when there is no manager (changes by hand are always allowed) or `force` is set.
    pub async fn conflicts(
        &self,
        names: &[&str],
        manager: Option<&str>,
        force: bool,
    ) -> Vec<(usize, String)> {
        let Some(manager) = manager.filter(|_| !force) else {
            return Vec::new();
        };
        let reg = self.shared.registry.lock().await;
        names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let owner = reg.get(*name)?.snapshot.lock().unwrap().manager.clone()?;
                (owner != manager).then_some((i, owner))
            })
            .collect()
    }

    /// Apply as `manager`: nothing is applied when any workload belongs to another manager
    /// (`Refused::Conflicts`, by position and owner) unless `force` takes them over, or when
    /// any does not fit the node (`Refused::Admission`).
    pub async fn apply_as(
        self: &Arc<Self>,
        workloads: Vec<Workload>,
        manager: Option<String>,
        force: bool,
    ) -> Result<Result<Vec<ApplyResult>, Refused>> {
        let keys: Vec<String> = workloads.iter().map(Workload::key).collect();
        let names: Vec<&str> = keys.iter().map(String::as_str).collect();
        let conflicts = self.conflicts(&names, manager.as_deref(), force).await;
        if !conflicts.is_empty() {
            return Ok(Err(Refused::Conflicts(conflicts)));
        }
        if let Err(refused) = self.admit_batch(&keys, &workloads).await {
            return Ok(Err(Refused::Admission(refused)));
        }
        let mut pending = Vec::with_capacity(workloads.len());
        for w in workloads {
            let (namespace, name) = (w.metadata.namespace().to_string(), w.metadata.name.clone());
            let hash = spec_hash(&w);
            let (reply, answer) = oneshot::channel();
            self.send_apply(w, hash, manager.clone(), reply).await?;
            pending.push((namespace, name, answer));
        }
        let mut results = Vec::with_capacity(pending.len());
        for (namespace, name, answer) in pending {
            let action = answer.await.with_context(|| {
                format!(
                    "workload {}: its actor stopped",
                    hyperbox_api::workload_key(&namespace, &name)
                )
            })?;
            results.push(ApplyResult {
                name,
                namespace,
                action,
            });
        }
        if !results.is_empty() {
            self.bump_digests();
        }
        // The answer means "recorded": make the batch durable first. A few records are fsynced
        // one by one; a bulk apply (a Git sync of thousands of workloads) pays one syncfs.
        let dir = self.shared.records_dir.clone();
        let files: Vec<PathBuf> = results
            .iter()
            .map(|r| dir.join(record::file_name(&r.key())))
            .collect();
        tokio::task::spawn_blocking(move || -> Result<()> {
            if files.len() <= 8 {
                for f in &files {
                    fsync_path(f)?;
                }
                fsync_path(&dir)
            } else {
                syncfs(&dir)
            }
        })
        .await
        .context("sync records")??;
        Ok(Ok(results))
    }

    /// Hand one apply to the workload's actor, creating the actor (under the registry lock)
    /// when there is none. An apply that meets a workload being deleted waits for the delete
    /// to finish, then creates it afresh.
    async fn send_apply(
        self: &Arc<Self>,
        w: Workload,
        hash: String,
        manager: Option<String>,
        reply: oneshot::Sender<ApplyAction>,
    ) -> Result<()> {
        let name = w.key();
        loop {
            let mut reg = self.shared.registry.lock().await;
            match reg.get(&name) {
                Some(h) if h.deleting.load(Ordering::SeqCst) => {
                    let mut done = h.done.clone();
                    drop(reg);
                    let _ = done.wait_for(|d| *d).await;
                    continue;
                }
                Some(h) => {
                    h.tx.send(Msg::Apply {
                        workload: Box::new(w),
                        hash,
                        manager,
                        reply,
                    })
                    .map_err(|_| anyhow::anyhow!("workload {name}: its actor stopped"))?;
                    return Ok(());
                }
                None => {
                    if self
                        .quarantined
                        .lock()
                        .unwrap()
                        .contains_key(&record::stem(&name))
                    {
                        drop(reg);
                        self.clear_quarantined(&name).await;
                        continue;
                    }
                    let id = self.shared.next_actor.fetch_add(1, Ordering::Relaxed);
                    let replicas = (0..w.desired_replicas())
                        .map(replica::Replica::new)
                        .collect();
                    let rec = WorkloadRecord {
                        workload: w,
                        spec_hash: hash,
                        image_digest: None,
                        rootfs: None,
                        replicas,
                        deleting: false,
                        manager,
                        outgoing: Vec::new(),
                        outgoing_digests: Vec::new(),
                        generation: 1,
                        progress_ms: Some(crate::fsutil::now_unix_ms()),
                        config_hash: String::new(),
                    };
                    tracing::info!(workload = %name, "created");
                    let handle = Actor::spawn(self.shared.clone(), id, rec, Begin::New(reply));
                    reg.insert(name, handle);
                    return Ok(());
                }
            }
        }
    }

    /// Remove what a quarantined record left: its containers (by name prefix, unless a live
    /// record references them) and the report.
    async fn clear_quarantined(&self, name: &str) {
        let stem = record::stem(name);
        let Some(q) = self.quarantined.lock().unwrap().remove(&stem) else {
            return;
        };
        let referenced: HashSet<String> = self
            .snapshots()
            .await
            .iter()
            .flat_map(|r| {
                r.all_replicas()
                    .filter_map(|x| x.container_id().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .collect();
        let runtime = self.shared.runtime.clone();
        let prefix = format!("{}-", record::container_prefix(&stem));
        let _ = tokio::task::spawn_blocking(move || {
            for id in runtime.list() {
                if id.starts_with(&prefix) && !referenced.contains(&id) {
                    tracing::info!(container = %id, "removing a container of a quarantined record");
                    let _ = runtime.destroy(&id);
                }
            }
        })
        .await;
        tracing::info!(workload = %name, record = %q.moved_to.display(), "quarantined record resolved");
        self.shared.bump();
    }

    /// `delete` as `manager`: refused with the owner (`Ok(Err(owner))`) when another manager
    /// owns the workload, unless `force`.
    pub async fn delete_as(
        self: &Arc<Self>,
        name: &str,
        manager: Option<&str>,
        force: bool,
    ) -> Result<Result<bool, String>> {
        if let Some((_, owner)) = self
            .conflicts(&[name], manager, force)
            .await
            .into_iter()
            .next()
        {
            return Ok(Err(owner));
        }
        Ok(Ok(self.delete(name).await?))
    }

    /// Stop the workload's containers and forget it. Returns false when it does not exist.
    /// The delete is carried out by the workload's actor: a caller that goes away half-way
    /// does not stop it, and a restart finishes it.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        {
            // Flag and message under the registry lock: an apply (which checks the flag under
            // the same lock) is then either queued before the delete, or waits for it.
            let reg = self.shared.registry.lock().await;
            let Some(h) = reg.get(name) else {
                drop(reg);
                if self
                    .quarantined
                    .lock()
                    .unwrap()
                    .contains_key(&record::stem(name))
                {
                    self.clear_quarantined(name).await;
                    return Ok(true);
                }
                return Ok(false);
            };
            h.deleting.store(true, Ordering::SeqCst);
            // Its requests are free for others from the moment the delete is accepted.
            self.admitted.lock().unwrap().remove(name);
            self.bump_digests();
            if h.tx.send(Msg::Delete { reply }).is_err() {
                return Ok(true);
            }
        }
        let _ = answer.await;
        Ok(true)
    }

    /// Restart one replica, or all: false when the workload or the replica does not exist.
    /// Answers once the restart is under way (the old containers stop, then new ones start).
    pub async fn restart(&self, name: &str, replica: Option<u32>) -> Result<bool> {
        Ok(self
            .ask(name, |reply| Msg::Restart { replica, reply })
            .await)
    }

    /// Send the workload's actor a message that answers yes or no; false when there is no
    /// such workload (or its actor is gone).
    async fn ask(&self, name: &str, msg: impl FnOnce(oneshot::Sender<bool>) -> Msg) -> bool {
        let handle = self.shared.registry.lock().await.get(name).cloned();
        let Some(h) = handle else {
            return false;
        };
        let (reply, answer) = oneshot::channel();
        if h.tx.send(msg(reply)).is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }

    /// Evict one replica: stop it and keep it stopped with `reason` (for pressure protection
    /// and controllers that re-place work); false when there is no such replica.
    pub async fn evict(&self, name: &str, replica: u32, reason: &str) -> Result<bool> {
        Ok(self
            .ask(name, |reply| Msg::Evict {
                replica,
                reason: reason.to_string(),
                pressure: false,
                reply,
            })
            .await)
    }

    /// Evict one replica for pressure (reason `EvictedForPressure`); sources watching the
    /// digests learn of it at once.
    pub async fn evict_for_pressure(&self, name: &str, replica: u32, why: &str) -> bool {
        let done = self
            .ask(name, |reply| Msg::Evict {
                replica,
                reason: why.to_string(),
                pressure: true,
                reply,
            })
            .await;
        if done {
            self.bump_digests();
        }
        done
    }
}
