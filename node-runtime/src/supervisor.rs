//! The supervisor: desired workloads in, running containers out. One task per workload owns its
//! replicas; each replica loop pulls the image, starts the container, waits for it, applies the
//! restart policy with exponential backoff and runs the readiness probe. Everything it knows is
//! written to the state dir so a restarted daemon re-adopts what still runs.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use hyperbox_api::quantity::{parse_cpu_millis, parse_memory_bytes};
use hyperbox_api::{
    spec_hash, ApplyAction, ApplyResult, Phase, Probe, ReplicaStatus, RestartPolicy, Workload,
    WorkloadStatus, REVISION_ANNOTATION,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::container::{self, RuntimeDirs, StartRequest};
use crate::fsutil::{fsync_path, remove_dir_all_if_exists, syncfs, write_json_atomic_nosync};
use crate::image::ImageStore;
use crate::logs;

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// First restart delay; doubles per consecutive failure (kubelet: 10s).
    pub backoff_base: Duration,
    /// Longest restart delay (kubelet: 5m).
    pub backoff_max: Duration,
    /// A container that ran this long resets the backoff.
    pub backoff_reset_after: Duration,
    pub log_max_bytes: u64,
    pub image_keep_for: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            backoff_reset_after: Duration::from_secs(600),
            log_max_bytes: 10 << 20,
            image_keep_for: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReplicaRecord {
    index: u32,
    phase: Phase,
    reason: Option<String>,
    message: Option<String>,
    ready: bool,
    restarts: u32,
    last_exit_code: Option<i32>,
    /// Written before the container is created, so a crash mid-create leaves a trace to clean.
    container_id: Option<String>,
    pid: Option<i32>,
    started_at_unix: Option<u64>,
}

/// What the state dir holds for one workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadRecord {
    workload: Workload,
    spec_hash: String,
    image_digest: Option<String>,
    rootfs: Option<String>,
    replicas: Vec<ReplicaRecord>,
}

struct Entry {
    desired: watch::Sender<Option<Arc<Workload>>>,
    record: Arc<StdMutex<WorkloadRecord>>,
    task: JoinHandle<()>,
}

pub struct Supervisor {
    dirs: RuntimeDirs,
    records_dir: PathBuf,
    logs_dir: PathBuf,
    images: Arc<ImageStore>,
    cfg: SupervisorConfig,
    entries: tokio::sync::Mutex<BTreeMap<String, Entry>>,
    /// Bumped on every state change; clients long-poll on it instead of sleeping.
    changes: watch::Sender<u64>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn short_random() -> String {
    format!("{:08x}", rand::random::<u32>())
}

impl Supervisor {
    pub fn new(
        state_dir: &std::path::Path,
        dirs: RuntimeDirs,
        images: Arc<ImageStore>,
        cfg: SupervisorConfig,
    ) -> Result<Arc<Supervisor>> {
        let records_dir = state_dir.join("workloads");
        let logs_dir = state_dir.join("logs");
        for d in [
            &records_dir,
            &logs_dir,
            &dirs.containers,
            &dirs.libcontainer_root,
            &dirs.volumes,
        ] {
            fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        Ok(Arc::new(Supervisor {
            dirs,
            records_dir,
            logs_dir,
            images,
            cfg,
            entries: tokio::sync::Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
        }))
    }

    pub fn images(&self) -> &Arc<ImageStore> {
        &self.images
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.records_dir.join(format!("{name}.json"))
    }

    pub fn log_path(&self, name: &str, index: u32) -> PathBuf {
        self.logs_dir.join(name).join(format!("{index}.log"))
    }

    /// Load the state dir after a (re)start: re-adopt live containers, clean up what died or
    /// was half-created, and remove anything of ours that no record references.
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        let mut records = Vec::new();
        for e in fs::read_dir(&self.records_dir)? {
            let path = e?.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            match fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<WorkloadRecord>(&b)?))
            {
                Ok(r) => records.push(r),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %format!("{e:#}"), "unreadable workload record, skipping it")
                }
            }
        }
        let referenced: HashSet<String> = records
            .iter()
            .flat_map(|r| r.replicas.iter().filter_map(|x| x.container_id.clone()))
            .collect();
        self.sweep_leaks(&referenced);
        let mut adopted = 0;
        for rec in records {
            let name = rec.workload.metadata.name.clone();
            let mut adopt = BTreeMap::new();
            let mut died = Vec::new();
            for r in &rec.replicas {
                if let Some(id) = &r.container_id {
                    match container::running_pid(&self.dirs, id) {
                        Some(pid) => {
                            adopt.insert(r.index, (id.clone(), pid));
                            adopted += 1;
                        }
                        None => {
                            if let Err(e) = container::destroy(&self.dirs, id) {
                                tracing::warn!(container = %id, error = %format!("{e:#}"), "cleanup of dead container failed");
                            }
                            died.push(r.index);
                        }
                    }
                }
            }
            // Containers that exited while the daemon was away: their exit code is lost, so
            // they count as failures for the restart policy.
            let mut rec = rec;
            let never = rec.workload.spec.restart_policy == RestartPolicy::Never;
            for r in rec.replicas.iter_mut().filter(|r| died.contains(&r.index)) {
                r.container_id = None;
                r.pid = None;
                r.ready = false;
                r.last_exit_code = None;
                if never {
                    r.phase = Phase::Failed;
                    r.reason = Some("Unknown".into());
                    r.message = Some(
                        "the container exited while the daemon was down; its exit code is unknown"
                            .into(),
                    );
                } else if r.phase == Phase::Running {
                    r.restarts += 1;
                }
            }
            tracing::info!(workload = %name, adopted = adopt.len(), died = died.len(), "recovered workload");
            self.start_entry(rec, adopt).await;
        }
        tracing::info!(adopted, "recovery finished");
        Ok(())
    }

    /// Remove bundles, libcontainer state, cgroups and mounts of containers nobody references.
    fn sweep_leaks(&self, referenced: &HashSet<String>) {
        let mut ids = HashSet::new();
        for dir in [&self.dirs.containers, &self.dirs.libcontainer_root] {
            if let Ok(entries) = fs::read_dir(dir) {
                for e in entries.flatten() {
                    ids.insert(e.file_name().to_string_lossy().to_string());
                }
            }
        }
        for parent in container::cgroup_parent_dirs(&self.dirs.cgroup_parent) {
            if let Ok(entries) = fs::read_dir(parent) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        ids.insert(e.file_name().to_string_lossy().to_string());
                    }
                }
            }
        }
        for id in ids.difference(referenced) {
            tracing::warn!(container = %id, "removing leaked container");
            if let Err(e) = container::destroy(&self.dirs, id) {
                tracing::warn!(container = %id, error = %format!("{e:#}"), "leak cleanup failed");
            }
        }
    }

    /// Apply desired workloads. Unchanged specs are left alone (only metadata is refreshed).
    pub async fn apply(self: &Arc<Self>, workloads: Vec<Workload>) -> Result<Vec<ApplyResult>> {
        let mut results = Vec::new();
        for w in workloads {
            let name = w.metadata.name.clone();
            let hash = spec_hash(&w);
            let mut entries = self.entries.lock().await;
            let action = if let Some(e) = entries.get(&name) {
                let mut rec = e.record.lock().unwrap();
                let same = rec.spec_hash == hash;
                rec.workload = w.clone();
                rec.spec_hash = hash;
                write_json_atomic_nosync(&self.record_path(&name), &*rec)?;
                drop(rec);
                if same {
                    ApplyAction::Unchanged
                } else {
                    tracing::info!(workload = %name, "spec changed, replacing containers");
                    let _ = e.desired.send(Some(Arc::new(w)));
                    ApplyAction::Configured
                }
            } else {
                drop(entries);
                let rec = WorkloadRecord {
                    workload: w,
                    spec_hash: hash,
                    image_digest: None,
                    rootfs: None,
                    replicas: vec![],
                };
                write_json_atomic_nosync(&self.record_path(&name), &rec)?;
                tracing::info!(workload = %name, "created");
                self.start_entry(rec, BTreeMap::new()).await;
                entries = self.entries.lock().await;
                ApplyAction::Created
            };
            drop(entries);
            self.bump();
            results.push(ApplyResult { name, action });
        }
        // The answer means "recorded": make the batch durable first. A few records are fsynced
        // one by one; a bulk apply (a Git sync of thousands of workloads) pays one syncfs.
        if results.len() <= 8 {
            for r in &results {
                fsync_path(&self.record_path(&r.name))?;
            }
            fsync_path(&self.records_dir)?;
        } else {
            syncfs(&self.records_dir)?;
        }
        Ok(results)
    }

    async fn start_entry(
        self: &Arc<Self>,
        rec: WorkloadRecord,
        adopt: BTreeMap<u32, (String, i32)>,
    ) {
        let name = rec.workload.metadata.name.clone();
        let (tx, rx) = watch::channel(Some(Arc::new(rec.workload.clone())));
        let record = Arc::new(StdMutex::new(rec));
        let sup = self.clone();
        let rec2 = record.clone();
        let task = tokio::spawn(async move { sup.run_workload(rec2, rx, adopt).await });
        self.entries.lock().await.insert(
            name,
            Entry {
                desired: tx,
                record,
                task,
            },
        );
    }

    /// Stop the workload's containers and forget it. Returns false when it does not exist.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<bool> {
        let entry = self.entries.lock().await.remove(name);
        let Some(entry) = entry else {
            return Ok(false);
        };
        let _ = entry.desired.send(None);
        let _ = entry.task.await;
        let _ = fs::remove_file(self.record_path(name));
        remove_dir_all_if_exists(&self.logs_dir.join(name))?;
        remove_dir_all_if_exists(&self.dirs.volumes.join(name))?;
        tracing::info!(workload = %name, "deleted");
        self.bump();
        // The image may have just become unused.
        let sup = self.clone();
        tokio::spawn(async move { sup.gc_images().await });
        Ok(true)
    }

    pub async fn workload(&self, name: &str) -> Option<Workload> {
        let entries = self.entries.lock().await;
        entries
            .get(name)
            .map(|e| e.record.lock().unwrap().workload.clone())
    }

    pub async fn status(&self, name: &str) -> Option<WorkloadStatus> {
        let entries = self.entries.lock().await;
        let rec = entries.get(name)?.record.lock().unwrap().clone();
        Some(self.render(&rec))
    }

    pub async fn list(&self) -> Vec<WorkloadStatus> {
        let recs: Vec<WorkloadRecord> = {
            let entries = self.entries.lock().await;
            entries
                .values()
                .map(|e| e.record.lock().unwrap().clone())
                .collect()
        };
        recs.iter().map(|r| self.render(r)).collect()
    }

    /// What runs, by spec hash and revision, without rendering full statuses.
    pub async fn digests(&self) -> Vec<hyperbox_api::WorkloadDigest> {
        let entries = self.entries.lock().await;
        entries
            .values()
            .map(|e| {
                let rec = e.record.lock().unwrap();
                hyperbox_api::WorkloadDigest {
                    name: rec.workload.metadata.name.clone(),
                    spec_hash: rec.spec_hash.clone(),
                    revision: rec
                        .workload
                        .metadata
                        .annotations
                        .get(REVISION_ANNOTATION)
                        .cloned(),
                }
            })
            .collect()
    }

    /// Limits of running replicas: (cpu millis, memory bytes, containers).
    pub async fn allocations(&self) -> (u64, u64, usize) {
        let entries = self.entries.lock().await;
        let mut cpu = 0;
        let mut mem = 0;
        let mut n = 0;
        for e in entries.values() {
            let rec = e.record.lock().unwrap();
            let running = rec
                .replicas
                .iter()
                .filter(|r| r.phase == Phase::Running && r.pid.is_some())
                .count() as u64;
            let res = &rec.workload.spec.resources;
            cpu += running
                * res
                    .cpu
                    .as_deref()
                    .and_then(|c| parse_cpu_millis(c).ok())
                    .unwrap_or(0);
            mem += running
                * res
                    .memory
                    .as_deref()
                    .and_then(|m| parse_memory_bytes(m).ok())
                    .unwrap_or(0);
            n += running as usize;
        }
        (cpu, mem, n)
    }

    pub async fn workload_count(&self) -> usize {
        self.entries.lock().await.len()
    }

    /// Image digests used by current workloads (for image GC).
    pub async fn images_in_use(&self) -> HashSet<String> {
        let entries = self.entries.lock().await;
        entries
            .values()
            .filter_map(|e| e.record.lock().unwrap().image_digest.clone())
            .collect()
    }

    /// Rotate oversized log files of every replica.
    pub async fn rotate_logs(&self) {
        let paths: Vec<PathBuf> = {
            let entries = self.entries.lock().await;
            entries
                .values()
                .flat_map(|e| {
                    let rec = e.record.lock().unwrap();
                    let name = rec.workload.metadata.name.clone();
                    (0..rec.workload.spec.replicas)
                        .map(move |i| self.log_path(&name, i))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        for p in paths {
            if let Err(e) = logs::rotate_if_needed(&p, self.cfg.log_max_bytes) {
                tracing::warn!(file = %p.display(), error = %format!("{e:#}"), "log rotation failed");
            }
        }
    }

    fn render(&self, rec: &WorkloadRecord) -> WorkloadStatus {
        let w = &rec.workload;
        let replicas: Vec<ReplicaStatus> = rec
            .replicas
            .iter()
            .map(|r| ReplicaStatus {
                index: r.index,
                phase: r.phase,
                reason: r.reason.clone(),
                message: r.message.clone(),
                ready: r.ready,
                restarts: r.restarts,
                last_exit_code: r.last_exit_code,
                container_id: r.container_id.clone(),
                pid: r.pid,
                started_at: r.started_at_unix.map(format_rfc3339),
            })
            .collect();
        let phase = if w.spec.suspend || replicas.is_empty() {
            Phase::Pending
        } else if replicas.iter().any(|r| r.phase == Phase::Failed) {
            Phase::Failed
        } else if replicas.iter().any(|r| r.phase == Phase::Pending) {
            Phase::Pending
        } else if replicas.iter().all(|r| r.phase == Phase::Succeeded) {
            Phase::Succeeded
        } else if replicas.iter().any(|r| r.phase == Phase::Unknown) {
            Phase::Unknown
        } else {
            Phase::Running
        };
        // The replica most in need of attention speaks for the workload.
        let lead = replicas
            .iter()
            .find(|r| !r.ready && r.reason.is_some())
            .or_else(|| replicas.iter().find(|r| r.reason.is_some()))
            .or(replicas.first());
        let (reason, message) = if w.spec.suspend {
            (
                Some("Suspended".to_string()),
                Some("spec.suspend is true".to_string()),
            )
        } else {
            (
                lead.and_then(|r| r.reason.clone()),
                lead.and_then(|r| r.message.clone()),
            )
        };
        let pulling = replicas.iter().any(|r| {
            r.reason.as_deref() == Some("ContainerCreating")
                || r.reason.as_deref() == Some("Pulling")
        });
        WorkloadStatus {
            name: w.metadata.name.clone(),
            phase,
            reason,
            message,
            ready: !w.spec.suspend
                && !replicas.is_empty()
                && replicas.len() == w.spec.replicas as usize
                && replicas.iter().all(|r| r.ready),
            restarts: replicas.iter().map(|r| r.restarts).sum(),
            last_exit_code: lead.and_then(|r| r.last_exit_code),
            image: w.spec.image.clone(),
            image_digest: rec.image_digest.clone(),
            container_id: lead.and_then(|r| r.container_id.clone()),
            revision: w.metadata.annotations.get(REVISION_ANNOTATION).cloned(),
            spec_hash: rec.spec_hash.clone(),
            resource_version: self.version(),
            rootfs: rec.rootfs.clone(),
            pull: if pulling {
                self.images.progress_of(&w.spec.image)
            } else {
                None
            },
            suspended: w.spec.suspend,
            replicas,
        }
    }

    fn bump(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// The current change counter.
    pub fn version(&self) -> u64 {
        *self.changes.borrow()
    }

    /// Wait until the change counter passes `after`, or `timeout` elapses.
    pub async fn wait_change(&self, after: u64, timeout: Duration) {
        let mut rx = self.changes.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|v| *v > after)).await;
    }

    /// Write the record. Replica updates are not fsynced: a rename over the existing record is
    /// atomic, and if a crash loses the newest container id, recovery removes that container
    /// as unreferenced (no duplicate, no leak) and starts the replica again.
    fn persist(&self, record: &StdMutex<WorkloadRecord>) {
        self.bump();
        let rec = record.lock().unwrap().clone();
        let path = self.record_path(&rec.workload.metadata.name);
        if let Err(e) = write_json_atomic_nosync(&path, &rec) {
            tracing::error!(workload = %rec.workload.metadata.name, error = %format!("{e:#}"), "persist state");
        }
    }

    fn update_replica(
        &self,
        record: &StdMutex<WorkloadRecord>,
        index: u32,
        f: impl FnOnce(&mut ReplicaRecord),
    ) {
        {
            let mut rec = record.lock().unwrap();
            if let Some(r) = rec.replicas.iter_mut().find(|r| r.index == index) {
                f(r);
            }
        }
        self.persist(record);
    }

    /// The workload task: runs the replicas of the current spec until the spec changes (then
    /// replaces them) or the workload is deleted (then stops them).
    async fn run_workload(
        self: Arc<Self>,
        record: Arc<StdMutex<WorkloadRecord>>,
        mut desired: watch::Receiver<Option<Arc<Workload>>>,
        mut adopt: BTreeMap<u32, (String, i32)>,
    ) {
        // Replica history survives a daemon restart (first round) but not a spec change:
        // a new spec gets new containers, like new pods.
        let mut first_round = true;
        loop {
            let Some(w) = desired.borrow_and_update().clone() else {
                return;
            };
            let replicas = if w.spec.suspend { 0 } else { w.spec.replicas };
            let changed = {
                let mut rec = record.lock().unwrap();
                let before = serde_json::to_vec(&rec.replicas).unwrap_or_default();
                let old: BTreeMap<u32, ReplicaRecord> =
                    rec.replicas.drain(..).map(|r| (r.index, r)).collect();
                rec.replicas = (0..replicas)
                    .map(|i| {
                        let mut r = if first_round {
                            old.get(&i).cloned().unwrap_or_default()
                        } else {
                            ReplicaRecord::default()
                        };
                        r.index = i;
                        if !adopt.contains_key(&i) {
                            r.container_id = None;
                            r.pid = None;
                            r.ready = false;
                            if !matches!(r.phase, Phase::Succeeded | Phase::Failed) {
                                r.phase = Phase::Pending;
                            }
                        }
                        r
                    })
                    .collect();
                serde_json::to_vec(&rec.replicas).unwrap_or_default() != before
            };
            first_round = false;
            // A new suspended or just-recovered workload often has nothing new to record.
            if changed {
                self.persist(&record);
            }
            let (stop_tx, stop_rx) = watch::channel(false);
            let mut tasks = Vec::new();
            for i in 0..replicas {
                let sup = self.clone();
                let rec = record.clone();
                let w = w.clone();
                let stop = stop_rx.clone();
                let adopted = adopt.remove(&i);
                tasks.push(tokio::spawn(async move {
                    sup.run_replica(rec, w, i, stop, adopted).await
                }));
            }
            // Leftover adoptions (replicas scaled down while we were away) are stopped.
            for (_, (id, pid)) in std::mem::take(&mut adopt) {
                self.stop_container(&id, pid, Duration::from_secs(10), None)
                    .await;
            }
            let _ = desired.changed().await;
            let _ = stop_tx.send(true);
            for t in tasks {
                let _ = t.await;
            }
            if desired.borrow().is_none() {
                return;
            }
        }
    }

    async fn run_replica(
        self: Arc<Self>,
        record: Arc<StdMutex<WorkloadRecord>>,
        w: Arc<Workload>,
        index: u32,
        mut stop: watch::Receiver<bool>,
        mut adopted: Option<(String, i32)>,
    ) {
        let name = w.metadata.name.clone();
        let grace =
            Duration::from_secs(w.spec.termination_grace_period_seconds.unwrap_or(10) as u64);
        let mut consecutive_failures: u32 = 0;
        // A replica that already finished for good (restart policy) stays finished.
        let finished =
            adopted.is_none()
                && record.lock().unwrap().replicas.iter().any(|r| {
                    r.index == index && matches!(r.phase, Phase::Succeeded | Phase::Failed)
                });
        if finished {
            wait_stop(&mut stop).await;
            return;
        }
        loop {
            if *stop.borrow() {
                return;
            }
            let (id, pid, exit_rx, own_child) = if let Some((id, pid)) = adopted.take() {
                tracing::info!(workload = %name, replica = index, container = %id, pid, "re-adopted running container");
                (id, pid, watch_exit(pid, false), false)
            } else {
                // Image.
                self.update_replica(&record, index, |r| {
                    r.phase = Phase::Pending;
                    r.reason = Some("ContainerCreating".into());
                    r.message = Some(format!("preparing image {}", w.spec.image));
                });
                let image = tokio::select! {
                    r = self.images.ensure(&w.spec.image) => r,
                    _ = wait_stop(&mut stop) => return,
                };
                let image = match image {
                    Ok(img) => img,
                    Err(e) => {
                        tracing::warn!(workload = %name, replica = index, error = %e, "image not ready");
                        let delay = self.backoff(consecutive_failures);
                        consecutive_failures += 1;
                        let reason = if e.reason() == "InvalidImage" {
                            "InvalidImage"
                        } else if consecutive_failures > 1 {
                            "ImagePullBackOff"
                        } else {
                            e.reason()
                        };
                        self.update_replica(&record, index, |r| {
                            r.phase = Phase::Pending;
                            r.reason = Some(reason.into());
                            r.message = Some(e.to_string());
                        });
                        if sleep_or_stop(&mut stop, delay).await {
                            return;
                        }
                        continue;
                    }
                };
                {
                    let mut rec = record.lock().unwrap();
                    rec.image_digest = Some(image.digest.clone());
                    rec.rootfs = Some(image.rootfs_kind.clone());
                }
                // Container: record the id first so a crash mid-create leaves a trace.
                let id = format!("{name}-{index}-{}", short_random());
                self.update_replica(&record, index, |r| {
                    r.container_id = Some(id.clone());
                    r.pid = None;
                });
                let log_file = self.log_path(&name, index);
                if let Some(parent) = log_file.parent() {
                    let _ = fs::create_dir_all(parent);
                }
                let dirs = self.dirs.clone();
                let w2 = w.clone();
                let id2 = id.clone();
                let started = tokio::task::spawn_blocking(move || {
                    container::create_and_start(
                        &dirs,
                        &StartRequest {
                            id: &id2,
                            workload: &w2,
                            image: &image,
                            log_file: &log_file,
                        },
                    )
                })
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("start task: {e}")));
                let pid = match started {
                    Ok(pid) => pid,
                    Err(e) => {
                        let msg = format!("{e:#}");
                        tracing::warn!(workload = %name, replica = index, error = %msg, "container failed to start");
                        let delay = self.backoff(consecutive_failures);
                        consecutive_failures += 1;
                        self.update_replica(&record, index, |r| {
                            r.container_id = None;
                            r.phase = Phase::Pending;
                            r.reason = Some("CreateContainerError".into());
                            r.message = Some(msg);
                        });
                        if sleep_or_stop(&mut stop, delay).await {
                            return;
                        }
                        continue;
                    }
                };
                tracing::info!(workload = %name, replica = index, container = %id, pid, "container started");
                (id, pid, watch_exit(pid, true), true)
            };
            let started_at = Instant::now();
            let has_probe = w.spec.readiness_probe.is_some();
            self.update_replica(&record, index, |r| {
                r.phase = Phase::Running;
                r.reason = None;
                r.message = None;
                r.pid = Some(pid);
                r.ready = !has_probe;
                if own_child || r.started_at_unix.is_none() {
                    r.started_at_unix = Some(now_unix());
                }
            });
            let prober = w.spec.readiness_probe.clone().map(|p| {
                let sup = self.clone();
                let rec = record.clone();
                let id = id.clone();
                tokio::spawn(async move { sup.probe_loop(rec, index, id, pid, p).await })
            });
            let mut exit_rx = exit_rx;
            let exit = tokio::select! {
                e = &mut exit_rx => e.ok().flatten(),
                _ = wait_stop(&mut stop) => {
                    if let Some(p) = prober { p.abort(); }
                    self.stop_container(&id, pid, grace, Some(exit_rx)).await;
                    self.update_replica(&record, index, |r| {
                        r.container_id = None;
                        r.pid = None;
                        r.ready = false;
                    });
                    return;
                }
            };
            if let Some(p) = prober {
                p.abort();
            }
            let oom = container::oom_kills(&self.dirs, &id) > 0;
            let dirs = self.dirs.clone();
            let id2 = id.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || container::destroy(&dirs, &id2))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")))
            {
                tracing::warn!(container = %id, error = %format!("{e:#}"), "cleanup after exit failed");
            }
            let ran = started_at.elapsed();
            if ran >= self.cfg.backoff_reset_after {
                consecutive_failures = 0;
            }
            let reason = if oom {
                "OOMKilled"
            } else if exit == Some(0) {
                "Completed"
            } else if exit.is_none() {
                "Unknown"
            } else {
                "Error"
            };
            let restart = match w.spec.restart_policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => exit != Some(0),
                RestartPolicy::Never => false,
            };
            tracing::info!(workload = %name, replica = index, container = %id, exit_code = ?exit, reason, restart, "container exited");
            if !restart {
                self.update_replica(&record, index, |r| {
                    r.phase = if exit == Some(0) { Phase::Succeeded } else { Phase::Failed };
                    r.reason = Some(reason.into());
                    r.message = exit.is_none().then(|| {
                        "exit code unknown: the container exited while adopted after a daemon restart".to_string()
                    });
                    r.last_exit_code = exit;
                    r.container_id = None;
                    r.pid = None;
                    r.ready = false;
                });
                wait_stop(&mut stop).await;
                return;
            }
            let delay = self.backoff(consecutive_failures);
            consecutive_failures += 1;
            self.update_replica(&record, index, |r| {
                r.phase = Phase::Running;
                r.reason = Some(if oom {
                    "OOMKilled".into()
                } else {
                    "CrashLoopBackOff".into()
                });
                r.message = Some(format!(
                    "last exit {}; back-off {:.1}s restarting the container",
                    match exit {
                        Some(c) => c.to_string(),
                        None => "unknown".into(),
                    },
                    delay.as_secs_f64()
                ));
                r.last_exit_code = exit;
                r.restarts += 1;
                r.container_id = None;
                r.pid = None;
                r.ready = false;
            });
            if sleep_or_stop(&mut stop, delay).await {
                return;
            }
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.min(20));
        self.cfg
            .backoff_base
            .saturating_mul(factor)
            .min(self.cfg.backoff_max)
    }

    /// SIGTERM, grace period, SIGKILL to everything in the container, then clean up.
    async fn stop_container(
        &self,
        id: &str,
        pid: i32,
        grace: Duration,
        exit_rx: Option<tokio::sync::oneshot::Receiver<Option<i32>>>,
    ) {
        tracing::info!(container = %id, pid, grace_secs = grace.as_secs(), "stopping container");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let exit_rx = match exit_rx {
            Some(rx) => rx,
            None => watch_exit(pid, false),
        };
        let mut exit_rx = exit_rx;
        if tokio::time::timeout(grace, &mut exit_rx).await.is_err() {
            tracing::info!(container = %id, "grace period over, sending SIGKILL");
            let dirs = self.dirs.clone();
            let id2 = id.to_string();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(mut c) = container::load(&dirs, &id2) {
                    let _ = c.kill(nix::sys::signal::Signal::SIGKILL, true);
                }
            })
            .await;
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = tokio::time::timeout(Duration::from_secs(10), exit_rx).await;
        }
        let dirs = self.dirs.clone();
        let id2 = id.to_string();
        if let Err(e) = tokio::task::spawn_blocking(move || container::destroy(&dirs, &id2))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")))
        {
            tracing::warn!(container = %id, error = %format!("{e:#}"), "cleanup after stop failed");
        }
    }

    async fn probe_loop(
        self: Arc<Self>,
        record: Arc<StdMutex<WorkloadRecord>>,
        index: u32,
        id: String,
        pid: i32,
        probe: Probe,
    ) {
        let period = Duration::from_secs_f64(probe.period_seconds.unwrap_or(10.0));
        let timeout = Duration::from_secs_f64(probe.timeout_seconds.unwrap_or(1.0));
        let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
        let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
        tokio::time::sleep(Duration::from_secs(
            probe.initial_delay_seconds.unwrap_or(0) as u64,
        ))
        .await;
        let (mut ok_run, mut fail_run) = (0u32, 0u32);
        loop {
            let ok = crate::probe::run(&self.dirs, &id, pid, &probe, timeout).await;
            if ok {
                ok_run += 1;
                fail_run = 0;
            } else {
                fail_run += 1;
                ok_run = 0;
            }
            let current = record
                .lock()
                .unwrap()
                .replicas
                .iter()
                .find(|r| r.index == index)
                .map(|r| r.ready)
                .unwrap_or(false);
            if !current && ok_run >= success_threshold {
                tracing::info!(container = %id, "readiness probe passed: ready");
                self.update_replica(&record, index, |r| r.ready = true);
            } else if current && fail_run >= failure_threshold {
                tracing::info!(container = %id, "readiness probe failed: not ready");
                self.update_replica(&record, index, |r| r.ready = false);
            }
            tokio::time::sleep(period).await;
        }
    }

    /// Stop every workload task without touching the containers (daemon shutdown): they keep
    /// running and are re-adopted on the next start.
    pub async fn detach_all(&self) {
        let entries = self.entries.lock().await;
        for e in entries.values() {
            e.task.abort();
        }
    }

    /// `rmi`: remove an image now unless a workload uses it.
    pub async fn remove_image(&self, image: &str) -> Result<Option<String>> {
        let in_use = self.images_in_use().await;
        self.images.remove(image, &in_use).await
    }

    pub async fn gc_images(&self) {
        let in_use = self.images_in_use().await;
        if let Err(e) = self.images.gc(&in_use, self.cfg.image_keep_for).await {
            tracing::warn!(error = %format!("{e:#}"), "image garbage collection failed");
        }
    }
}

/// Sleep unless told to stop first; true when stopping.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = wait_stop(stop) => return true,
    }
    let stopping = *stop.borrow();
    stopping
}

/// Resolves once the replica is told to stop (holds no watch guard across awaits).
async fn wait_stop(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A thread that waits for `pid` to exit and reports its exit code: collected with waitpid for
/// our own children, unknown (`None`) for re-adopted ones.
fn watch_exit(pid: i32, own_child: bool) -> tokio::sync::oneshot::Receiver<Option<i32>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let code = if own_child {
            container::wait_exit(pid).ok()
        } else {
            wait_pidfd_exit(pid)
        };
        let _ = tx.send(code);
    });
    rx
}

/// Wait for a process that is not our child (re-adopted after a restart) to exit. Its exit
/// code is not ours to collect, so the result is `None`.
fn wait_pidfd_exit(pid: i32) -> Option<i32> {
    // SAFETY: pidfd_open has no memory arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        // Already gone, or our own child: fall back to waitpid.
        return container::wait_exit(pid).ok();
    }
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r > 0 {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    // It may still be our child after all (same daemon): reap it to get the code.
    let mut status = 0;
    // SAFETY: non-blocking waitpid.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL | libc::WNOHANG) };
    if r == pid {
        if libc::WIFEXITED(status) {
            return Some(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            return Some(128 + libc::WTERMSIG(status));
        }
    }
    None
}

fn format_rfc3339(unix: u64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm), UTC.
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn hash_ignores_annotations() {
        let mut w: Workload = serde_norway::from_str(
            "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata: {name: a}\nspec: {image: x}\n",
        )
        .unwrap();
        let h = spec_hash(&w);
        w.metadata
            .annotations
            .insert(REVISION_ANNOTATION.into(), "abc".into());
        assert_eq!(h, spec_hash(&w));
        w.spec.args = vec!["x".into()];
        assert_ne!(h, spec_hash(&w));
    }
}
