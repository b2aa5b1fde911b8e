//! The supervisor: desired workloads in, running containers out.
//!
//! It is a registry of workload actors ([`actor`]): one per workload, created under the
//! registry lock, owning its record, replicas and files. Replica decisions are a pure state
//! machine ([`replica`]); records and their recovery live in [`record`]. Readers (status, list,
//! digests) see each actor's last published snapshot and never wait for an actor.

pub mod actor;
mod prewarm;
mod probe;
pub use prewarm::MAX_IMAGES as MAX_PREWARM_IMAGES;
mod protection;
pub mod record;
pub mod replica;
pub mod rollout;
mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use anyhow::{Context, Result};
use hyperbox_api::quantity::{parse_cpu_millis, parse_memory_bytes};
use hyperbox_api::{
    spec_hash, ApplyAction, ApplyResult, Phase, ReplicaStatus, ResourceAmounts, Workload,
    WorkloadStatus, REVISION_ANNOTATION,
};
use tokio::sync::{oneshot, watch, Notify, Semaphore};

use self::actor::{Actor, ActorHandle, Begin, Msg};
use self::record::{Quarantined, WorkloadRecord};
use self::replica::{Policy, Stage};
use crate::containers::Runtime;
use crate::fsutil::{fsync_path, syncfs};
use crate::images::{ImageSource, ImageStore};
use crate::pressure::admission::{self, NodeFacts};

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

pub(crate) fn policy_for(cfg: &SupervisorConfig, w: &Workload) -> Policy {
    let probe = w.spec.readiness_probe.as_ref();
    Policy {
        restart: w.spec.restart_policy,
        backoff_base: cfg.backoff_base,
        backoff_max: cfg.backoff_max,
        backoff_reset_after: cfg.backoff_reset_after,
        has_probe: probe.is_some(),
        success_threshold: probe.and_then(|p| p.success_threshold).unwrap_or(1),
        failure_threshold: probe.and_then(|p| p.failure_threshold).unwrap_or(3),
        image: w.spec.image.clone(),
    }
}

/// What every actor shares.
pub(crate) struct Shared {
    pub runtime: Arc<dyn Runtime>,
    pub images: Arc<dyn ImageSource>,
    pub cfg: SupervisorConfig,
    pub records_dir: PathBuf,
    pub logs_dir: PathBuf,
    pub volumes_dir: PathBuf,
    /// Bumped on every state change; clients long-poll on it instead of sleeping.
    pub changes: watch::Sender<u64>,
    pub probe_slots: Arc<Semaphore>,
    pub registry: tokio::sync::Mutex<BTreeMap<String, ActorHandle>>,
    /// Asks the daemon to collect unused images soon.
    pub gc_kick: Notify,
    /// Writes every record (one thread, batched).
    pub records: writer::RecordWriter,
    next_actor: AtomicU64,
}

impl Shared {
    pub fn bump(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// Log file of replica `index` of the workload with key `key`.
    pub fn log_path(&self, key: &str, index: u32) -> PathBuf {
        self.logs_dir
            .join(record::stem(key))
            .join(format!("{index}.log"))
    }
}

pub struct Supervisor {
    shared: Arc<Shared>,
    /// The real image store (for pull, rmi, GC and features); absent with a test double.
    store: Option<Arc<ImageStore>>,
    quarantined: StdMutex<BTreeMap<String, Quarantined>>,
    /// The node's policy for admission (none in tests that do not care).
    policy: StdMutex<Option<crate::containers::policy::NodePolicy>>,
    /// Labels and allocatable for capacity admission (none: everything fits).
    node: StdMutex<Option<NodeFacts>>,
    /// Requests of every admitted workload's desired replicas, by key.
    admitted: StdMutex<HashMap<String, ResourceAmounts>>,
    /// Version of the digests (`GET /v1/digests?watch=true`): changes with every apply and
    /// delete, and starts at the daemon's start time in microseconds, so a watcher that knew
    /// an earlier daemon sees a different version and lists again.
    digests_version: watch::Sender<u64>,
    /// The last PSI samples of each running container, by container id.
    pressure: StdMutex<HashMap<String, PressureSamples>>,
    /// The node's own PSI samples (the higher of the host's and the workloads'), for its trend.
    node_pressure: StdMutex<PressureHistory>,
    /// Pressure protection, when on.
    protection: StdMutex<Option<protection::ProtectionState>>,
    /// Images kept ready for work likely to land here.
    prewarm: StdMutex<prewarm::Prewarm>,
    prewarm_kick: Notify,
}

/// Recent PSI readings of one container (the latest, and `some avg10` of the last few for the
/// trend).
#[derive(Default, Clone)]
struct PressureSamples {
    latest: Option<hyperbox_api::Pressure>,
    cgroup_id: Option<u64>,
    history: PressureHistory,
}

/// `some avg10` of cpu, memory and io, with when each was read.
type PressureHistory = std::collections::VecDeque<(std::time::Instant, [f32; 3])>;

/// `some avg10` of cpu, memory and io of a reading.
fn some_avg10(p: &hyperbox_api::Pressure) -> [f32; 3] {
    [p.cpu.some.avg10, p.memory.some.avg10, p.io.some.avg10]
}

/// Add a sample, keeping the last [`PRESSURE_HISTORY`].
fn push_sample(h: &mut PressureHistory, at: std::time::Instant, sample: [f32; 3]) {
    h.push_back((at, sample));
    while h.len() > PRESSURE_HISTORY {
        h.pop_front();
    }
}

/// Change of `some avg10` from the first sample to the last (at least two).
fn trend_of(h: &PressureHistory) -> Option<hyperbox_api::PressureTrend> {
    match (h.front(), h.back()) {
        (Some(first), Some(last)) if h.len() >= 2 => Some(hyperbox_api::PressureTrend {
            cpu: last.1[0] - first.1[0],
            memory: last.1[1] - first.1[1],
            io: last.1[2] - first.1[2],
            over_seconds: last.0.duration_since(first.0).as_secs_f32(),
        }),
        _ => None,
    }
}

/// Samples kept for the trend (at the 2 s sampling period: about 10 s).
const PRESSURE_HISTORY: usize = 6;

/// Why a batch was not applied; nothing of it was.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    /// Workloads (by position) owned by another manager, with the owner.
    Conflicts(Vec<(usize, String)>),
    /// Workloads (by position) the node has no room or no matching labels for.
    Admission(admission::Refusals),
}

impl Supervisor {
    pub fn set_policy(&self, policy: crate::containers::policy::NodePolicy) {
        *self.policy.lock().unwrap() = Some(policy);
    }

    /// Turn on capacity and label admission with these facts about the node.
    pub fn set_node(&self, facts: NodeFacts) {
        *self.node.lock().unwrap() = Some(facts);
    }

    pub fn node_facts(&self) -> Option<NodeFacts> {
        self.node.lock().unwrap().clone()
    }

    /// Sum of the requests of every admitted workload.
    pub fn requested(&self) -> ResourceAmounts {
        self.admitted
            .lock()
            .unwrap()
            .values()
            .fold(ResourceAmounts::default(), |a, b| a.plus(*b))
    }

    /// Field errors for what the node's policy refuses in `w` (relative to the workload).
    pub fn admit(&self, w: &Workload) -> Vec<hyperbox_api::validate::FieldError> {
        match &*self.policy.lock().unwrap() {
            Some(p) => p.check(w),
            None => Vec::new(),
        }
    }

    pub fn new(
        state_dir: &Path,
        volumes_dir: PathBuf,
        runtime: Arc<dyn Runtime>,
        images: Arc<dyn ImageSource>,
        store: Option<Arc<ImageStore>>,
        cfg: SupervisorConfig,
    ) -> Result<Arc<Supervisor>> {
        let records_dir = state_dir.join("workloads");
        let logs_dir = state_dir.join("logs");
        for d in [&records_dir, &logs_dir, &volumes_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        Ok(Arc::new(Supervisor {
            shared: Arc::new(Shared {
                runtime,
                images,
                cfg,
                records_dir,
                logs_dir,
                volumes_dir,
                changes: watch::channel(0).0,
                probe_slots: Arc::new(Semaphore::new(probe::MAX_CONCURRENT_PROBES)),
                registry: tokio::sync::Mutex::new(BTreeMap::new()),
                gc_kick: Notify::new(),
                records: writer::RecordWriter::start().context("start the record writer")?,
                next_actor: AtomicU64::new(1),
            }),
            store,
            quarantined: StdMutex::new(BTreeMap::new()),
            policy: StdMutex::new(None),
            node: StdMutex::new(None),
            admitted: StdMutex::new(HashMap::new()),
            digests_version: watch::channel(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(1),
            )
            .0,
            pressure: StdMutex::new(HashMap::new()),
            node_pressure: StdMutex::new(std::collections::VecDeque::new()),
            protection: StdMutex::new(None),
            prewarm: StdMutex::new(prewarm::Prewarm::default()),
            prewarm_kick: Notify::new(),
        }))
    }

    pub fn store(&self) -> Option<&Arc<ImageStore>> {
        self.store.as_ref()
    }

    pub fn images(&self) -> Arc<dyn ImageSource> {
        self.shared.images.clone()
    }

    pub fn log_path(&self, name: &str, index: u32) -> PathBuf {
        self.shared.log_path(name, index)
    }

    /// Resolves when an actor asks for image garbage collection.
    pub async fn gc_requested(&self) {
        self.shared.gc_kick.notified().await
    }

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
        // Under pressure, nothing that adds replicas is admitted.
        let facts = self.node.lock().unwrap().clone();
        if let Some(f) = facts.filter(|f| f.pressure_gate.is_some()) {
            let gate = f.pressure_gate.expect("filtered");
            let value = gate.read(f.pressure_dir.as_deref());
            let current: HashMap<String, u32> = {
                let reg = self.shared.registry.lock().await;
                keys.iter()
                    .filter_map(|k| {
                        let h = reg.get(k)?;
                        let n = h.snapshot.lock().unwrap().workload.desired_replicas();
                        Some((k.clone(), n))
                    })
                    .collect()
            };
            let batch: Vec<&Workload> = workloads.iter().collect();
            let refused = admission::pressure_refusals(&f, value, &current, &batch);
            if !refused.is_empty() {
                tracing::info!(signal = %gate.name(), value = ?value, threshold = gate.threshold, refused = refused.len(), "refusing new replicas under pressure");
                return Ok(Err(Refused::Admission(refused)));
            }
        }
        {
            // Check and reserve under one lock: two concurrent applies never both take the
            // last room.
            let mut admitted = self.admitted.lock().unwrap();
            let batch: Vec<&Workload> = workloads.iter().collect();
            let staged = match &*self.node.lock().unwrap() {
                Some(node) => match admission::admit_batch(node, &admitted, &batch) {
                    Ok(staged) => staged,
                    Err(refused) => return Ok(Err(Refused::Admission(refused))),
                },
                None => batch.iter().map(|w| (w.key(), w.total_request())).collect(),
            };
            admitted.extend(staged);
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

    async fn snapshots(&self) -> Vec<Arc<WorkloadRecord>> {
        let reg = self.shared.registry.lock().await;
        reg.values()
            .map(|h| h.snapshot.lock().unwrap().clone())
            .collect()
    }

    async fn snapshot(&self, name: &str) -> Option<Arc<WorkloadRecord>> {
        let reg = self.shared.registry.lock().await;
        reg.get(name).map(|h| h.snapshot.lock().unwrap().clone())
    }

    pub async fn workload(&self, name: &str) -> Option<Workload> {
        self.snapshot(name).await.map(|r| r.workload.clone())
    }

    pub async fn status(&self, name: &str) -> Option<WorkloadStatus> {
        match self.snapshot(name).await {
            Some(rec) => Some(self.render(&rec)),
            None => self
                .quarantined
                .lock()
                .unwrap()
                .get(&record::stem(name))
                .map(|q| self.render_quarantined(q)),
        }
    }

    pub async fn list(&self) -> Vec<WorkloadStatus> {
        let mut out: Vec<WorkloadStatus> = self
            .snapshots()
            .await
            .iter()
            .map(|r| self.render(r))
            .collect();
        let q: Vec<WorkloadStatus> = self
            .quarantined
            .lock()
            .unwrap()
            .values()
            .map(|q| self.render_quarantined(q))
            .collect();
        out.extend(q);
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    /// Name, hashes, revision and manager of every workload (`GET /v1/digests`, a
    /// `Vec<WorkloadDigest>`), serialized straight from the snapshots: no copy of every name
    /// and hash.
    pub async fn digests_json(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Digest<'a> {
            name: &'a str,
            namespace: &'a str,
            spec_hash: &'a str,
            config_hash: &'a str,
            revision: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            manager: Option<&'a str>,
            #[serde(skip_serializing_if = "hyperbox_api::util::is_zero")]
            evicted_for_pressure: u32,
        }
        // A delete counts from when it is accepted (the handle's flag, set before the digests'
        // version changes), not from when the actor gets to it.
        let snapshots: Vec<Arc<WorkloadRecord>> = {
            let reg = self.shared.registry.lock().await;
            reg.values()
                .filter(|h| !h.deleting.load(Ordering::SeqCst))
                .map(|h| h.snapshot.lock().unwrap().clone())
                .collect()
        };
        let digests: Vec<Digest<'_>> = snapshots
            .iter()
            .filter(|r| !r.deleting)
            .map(|rec| Digest {
                name: &rec.workload.metadata.name,
                namespace: rec.workload.metadata.namespace(),
                spec_hash: &rec.spec_hash,
                config_hash: &rec.config_hash,
                revision: rec
                    .workload
                    .metadata
                    .annotations
                    .get(REVISION_ANNOTATION)
                    .map(String::as_str),
                manager: rec.manager.as_deref(),
                evicted_for_pressure: rec
                    .replicas
                    .iter()
                    .filter(|r| r.reason == Some(replica::Reason::EvictedForPressure))
                    .count() as u32,
            })
            .collect();
        serde_json::to_vec(&digests).expect("serialize digests")
    }

    /// Limits of running replicas: (cpu millis, memory bytes, containers).
    pub async fn allocations(&self) -> (u64, u64, usize) {
        let (mut cpu, mut mem, mut n) = (0, 0, 0);
        for rec in self.snapshots().await {
            let running = rec
                .all_replicas()
                .filter(|r| matches!(r.stage, Stage::Running { .. }))
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
        self.shared.registry.lock().await.len()
    }

    /// Image digests used by current workloads and by the old replicas of their rolling
    /// updates (for image GC).
    pub async fn images_in_use(&self) -> HashSet<String> {
        let mut used: HashSet<String> = self
            .snapshots()
            .await
            .iter()
            .flat_map(|r| {
                r.image_digest
                    .iter()
                    .chain(r.outgoing_digests.iter())
                    .cloned()
            })
            .collect();
        // Prewarmed images are kept while wanted.
        used.extend(self.prewarmed_digests());
        used
    }

    /// Rotate oversized log files of every replica (off the async threads).
    pub async fn rotate_logs(&self) {
        let paths: Vec<PathBuf> = self
            .snapshots()
            .await
            .iter()
            .flat_map(|rec| {
                let key = rec.workload.key();
                rec.replicas
                    .iter()
                    .map(|r| self.log_path(&key, r.index))
                    .collect::<Vec<_>>()
            })
            .collect();
        let max = self.shared.cfg.log_max_bytes;
        let _ = tokio::task::spawn_blocking(move || {
            for p in paths {
                if let Err(e) = crate::logs::rotate_if_needed(&p, max) {
                    tracing::warn!(file = %p.display(), error = %format!("{e:#}"), "log rotation failed");
                }
            }
        })
        .await;
    }

    fn render_quarantined(&self, q: &Quarantined) -> WorkloadStatus {
        let key = record::key_of_stem(&q.name);
        let (namespace, name) = hyperbox_api::split_key(&key);
        let (namespace, name) = (namespace.to_string(), name.to_string());
        WorkloadStatus {
            name,
            namespace,
            phase: Phase::Unknown,
            reason: Some("RecordUnreadable".into()),
            message: Some(format!(
                "the node's record of this workload could not be read ({}); it was moved to {} and its containers were left running; apply or delete the workload to resolve",
                q.error,
                q.moved_to.display()
            )),
            resource_version: self.version(),
            ..Default::default()
        }
    }

    fn render(&self, rec: &WorkloadRecord) -> WorkloadStatus {
        let w = &rec.workload;
        let replica_status = |r: &replica::Replica, outdated: bool| {
            let (pressure, pressure_trend, cgroup_id) = match r.container_id() {
                Some(c) if matches!(r.stage, Stage::Running { .. }) => self.pressure_of(c),
                _ => (None, None, None),
            };
            let throttled = r.container_id().is_some_and(|c| self.is_throttled(c));
            ReplicaStatus {
                index: r.index,
                phase: r.phase,
                reason: r.reason.map(|x| x.as_str().to_string()),
                message: r.message.clone(),
                ready: r.ready,
                restarts: r.restarts,
                last_exit_code: r.last_exit_code,
                container_id: r.container_id().map(str::to_string),
                pid: r.pid(),
                started_at: r.started_at_ms().map(|ms| format_rfc3339(ms / 1000)),
                outdated,
                pressure,
                pressure_trend,
                cgroup_id,
                throttled,
            }
        };
        let replicas: Vec<ReplicaStatus> = rec
            .replicas
            .iter()
            .map(|r| replica_status(r, false))
            .collect();
        let outdated: Vec<ReplicaStatus> = rec
            .outgoing
            .iter()
            .map(|r| replica_status(r, true))
            .collect();
        let phase = if w.spec.suspend || w.spec.standby || replicas.is_empty() {
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
        let deadline_s = w
            .spec
            .progress_deadline_seconds
            .unwrap_or(hyperbox_api::DEFAULT_PROGRESS_DEADLINE_SECONDS);
        let stalled_for_s = rec
            .progress_ms
            .map(|p| crate::fsutil::now_unix_ms().saturating_sub(p) / 1000)
            .filter(|s| *s >= deadline_s as u64);
        let (reason, message) = if rec.deleting {
            (
                Some("Terminating".to_string()),
                Some("the workload is being deleted".to_string()),
            )
        } else if w.spec.suspend {
            (
                Some("Suspended".to_string()),
                Some("spec.suspend is true".to_string()),
            )
        } else if w.spec.standby {
            (
                Some("Standby".to_string()),
                Some(
                    "spec.standby is true: no replica runs; the image is kept ready while the node is calm"
                        .to_string(),
                ),
            )
        } else if let Some(s) = stalled_for_s {
            let ready_new = replicas.iter().filter(|r| r.ready).count();
            let lead_reason = lead
                .and_then(|r| r.reason.clone())
                .map(|r| format!(" (replica {}: {r})", lead.map(|l| l.index).unwrap_or(0)))
                .unwrap_or_default();
            (
                Some("ProgressDeadlineExceeded".to_string()),
                Some(format!(
                    "no progress for {s}s (progressDeadlineSeconds {deadline_s}): {ready_new} of {} replicas of generation {} ready{lead_reason}; {} old replicas keep serving",
                    replicas.len(),
                    rec.generation,
                    outdated.len()
                )),
            )
        } else {
            (
                lead.and_then(|r| r.reason.clone()),
                lead.and_then(|r| r.message.clone()),
            )
        };
        let ready_all = replicas.iter().chain(&outdated).filter(|r| r.ready).count() as u32;
        let pulling = replicas
            .iter()
            .any(|r| r.reason.as_deref() == Some("ContainerCreating"));
        WorkloadStatus {
            name: w.metadata.name.clone(),
            namespace: w.metadata.namespace().to_string(),
            phase,
            reason,
            message,
            ready: !w.spec.suspend
                && !w.spec.standby
                && !replicas.is_empty()
                && replicas.len() == w.spec.replicas as usize
                && replicas.iter().all(|r| r.ready)
                && outdated.is_empty(),
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
                self.shared.images.progress_of(&w.spec.image)
            } else {
                None
            },
            suspended: w.spec.suspend,
            manager: rec.manager.clone(),
            generation: rec.generation,
            observed_generation: rec.generation,
            desired_replicas: w.desired_replicas(),
            current_replicas: (rec
                .replicas
                .iter()
                .filter(|r| r.container_id().is_some())
                .count()
                + rec.outgoing.len()) as u32,
            updated_replicas: rec
                .replicas
                .iter()
                .filter(|r| r.stage != Stage::Idle)
                .count() as u32,
            ready_replicas: ready_all,
            available_replicas: ready_all,
            replicas: replicas.into_iter().chain(outdated).collect(),
        }
    }

    /// What telemetry reads of each container's cgroups (cgroup id, CPU time, memory), off
    /// the async threads.
    pub async fn cgroup_readings(
        &self,
        ids: Vec<String>,
    ) -> HashMap<String, crate::telemetry::CgroupReading> {
        let runtime = self.shared.runtime.clone();
        tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .map(|id| {
                    let v2 = runtime.v2_cgroup(&id);
                    let controls = runtime.controls(&id);
                    // Memory where its controller is: v2 on pure v2 hosts, else v1.
                    let memory = controls.v2.or(controls.v1_memory);
                    let reading = crate::telemetry::CgroupReading {
                        cgroup_id: v2.as_deref().and_then(crate::pressure::psi::cgroup_id),
                        cpu_usec: v2.as_deref().and_then(crate::telemetry::cpu_usec),
                        memory_bytes: memory.as_deref().and_then(crate::telemetry::memory_bytes),
                    };
                    (id, reading)
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// The current change counter.
    pub fn version(&self) -> u64 {
        *self.shared.changes.borrow()
    }

    /// Read the PSI of every running container (its cgroup v2 `*.pressure` files), off the
    /// async threads; what status reports until the next round.
    pub async fn sample_pressure(&self) {
        let ids: Vec<String> = self
            .snapshots()
            .await
            .iter()
            .flat_map(|r| {
                r.all_replicas()
                    .filter(|x| matches!(x.stage, Stage::Running { .. }))
                    .filter_map(|x| x.container_id().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .collect();
        let runtime = self.shared.runtime.clone();
        let parent = self.node_facts().and_then(|f| f.pressure_dir);
        let Ok((readings, node)) = tokio::task::spawn_blocking(move || {
            let readings = ids
                .into_iter()
                .map(|id| {
                    let dir = runtime.v2_cgroup(&id);
                    let p = dir.as_deref().and_then(crate::pressure::psi::cgroup);
                    let cid = dir.as_deref().and_then(crate::pressure::psi::cgroup_id);
                    (id, p, cid)
                })
                .collect::<Vec<_>>();
            let host = crate::pressure::psi::node().as_ref().map(some_avg10);
            let workloads = parent
                .as_deref()
                .and_then(crate::pressure::psi::cgroup)
                .as_ref()
                .map(some_avg10);
            let node = match (host, workloads) {
                (Some(a), Some(b)) => Some([a[0].max(b[0]), a[1].max(b[1]), a[2].max(b[2])]),
                (a, b) => a.or(b),
            };
            (readings, node)
        })
        .await
        else {
            return;
        };
        let now = std::time::Instant::now();
        if let Some(n) = node {
            push_sample(&mut self.node_pressure.lock().unwrap(), now, n);
        }
        let mut map = self.pressure.lock().unwrap();
        let mut next = HashMap::with_capacity(readings.len());
        for (id, p, cid) in readings {
            let mut s = map.remove(&id).unwrap_or_default();
            if let Some(p) = &p {
                push_sample(&mut s.history, now, some_avg10(p));
            }
            s.latest = p;
            s.cgroup_id = cid;
            next.insert(id, s);
        }
        *map = next;
    }

    /// The last PSI sample, trend and cgroup id of a container.
    fn pressure_of(
        &self,
        container: &str,
    ) -> (
        Option<hyperbox_api::Pressure>,
        Option<hyperbox_api::PressureTrend>,
        Option<u64>,
    ) {
        let map = self.pressure.lock().unwrap();
        let Some(s) = map.get(container) else {
            return (None, None, None);
        };
        (s.latest.clone(), trend_of(&s.history), s.cgroup_id)
    }

    /// How the node's pressure (the higher of the host's and its workloads') moved over the
    /// last samples.
    pub fn node_trend(&self) -> Option<hyperbox_api::PressureTrend> {
        trend_of(&self.node_pressure.lock().unwrap())
    }

    /// A change the digests' watchers must see that is not an apply or a delete (a pressure
    /// eviction or restore).
    pub fn bump_digests(&self) {
        self.digests_version.send_modify(|v| *v += 1);
    }

    /// The digests' version (see `digests_version`).
    pub fn digests_version(&self) -> u64 {
        *self.digests_version.borrow()
    }

    /// Wait until the digests' version differs from `seen`, or `timeout` elapses; returns the
    /// version then.
    pub async fn wait_digests(&self, seen: u64, timeout: Duration) -> u64 {
        let mut rx = self.digests_version.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|v| *v != seen)).await;
        let v = *rx.borrow();
        v
    }

    /// Wait until the change counter passes `after`, or `timeout` elapses.
    pub async fn wait_change(&self, after: u64, timeout: Duration) {
        let mut rx = self.shared.changes.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|v| *v > after)).await;
    }

    /// Stop every actor without touching the containers (daemon shutdown): they keep running
    /// and are re-adopted on the next start.
    pub async fn detach_all(&self) {
        let handles: Vec<ActorHandle> = self
            .shared
            .registry
            .lock()
            .await
            .values()
            .cloned()
            .collect();
        for h in &handles {
            let _ = h.tx.send(Msg::Detach);
        }
        for h in handles {
            let mut done = h.done.clone();
            let _ = tokio::time::timeout(Duration::from_secs(5), done.wait_for(|d| *d)).await;
        }
    }

    /// `rmi`: remove an image now unless a workload uses it.
    pub async fn remove_image(&self, image: &str) -> Result<Option<String>> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let in_use = self.images_in_use().await;
        store.remove(image, &in_use).await
    }

    pub async fn gc_images(&self) {
        let Some(store) = &self.store else {
            return;
        };
        let in_use = self.images_in_use().await;
        match store.gc(&in_use, self.shared.cfg.image_keep_for).await {
            Ok(removed) => {
                tracing::debug!(
                    removed = removed.len(),
                    in_use = in_use.len(),
                    "image garbage collection ran"
                )
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "image garbage collection failed"),
        }
    }
}

pub(crate) fn format_rfc3339(unix: u64) -> String {
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
mod tests;
