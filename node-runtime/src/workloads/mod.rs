//! Workloads: the supervisor. Desired workloads in, running containers out.
//!
//! It is a registry of workload actors (`registry`, [`actor`]): one per workload, created
//! under the registry lock, owning its record, replicas and files. Replica decisions are a pure
//! state machine ([`replica`], rolling updates in [`rollout`]); records and their recovery live
//! in [`record`], written by one thread (`writer`). Readers (`status`, `digests`) see each
//! actor's last published snapshot and never wait for an actor. Around the actors: admission
//! glue (`admission`), readiness probes (`probe`), log files ([`logs`]), PSI samples and trends
//! (`samples`), pressure protection (`protection`), prewarmed images (`prewarm`), image GC
//! (`gc`), and what the node reports (`node`: its summary, the telemetry it exports).
//!
//! It may call `crate::images` (prepare, remove, collect), `crate::containers` (through the
//! [`crate::containers::Runtime`] trait), `crate::pressure` (facts, PSI, admission and
//! protection decisions), `crate::telemetry` (counters, the snapshot it gathers) and
//! `crate::fsutil`. Only the daemon, `crate::api` and `crate::cluster` call it.

pub mod actor;
mod admission;
mod digests;
pub mod epoch;
pub mod fence;
mod gc;
pub mod logs;
mod node;
mod prewarm;
mod probe;
mod protection;
pub mod record;
mod registry;
pub mod replica;
pub mod rollout;
mod samples;
mod status;
mod writer;

pub use prewarm::MAX_IMAGES as MAX_PREWARM_IMAGES;
pub use registry::Refused;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use anyhow::{Context, Result};
use hyperbox_api::{ResourceAmounts, Workload};
use tokio::sync::{watch, Notify, Semaphore};

use self::actor::{ActorHandle, Msg};
use self::record::{Quarantined, WorkloadRecord};
use self::replica::Policy;
use self::samples::{PressureHistory, PressureSamples};
use crate::containers::Runtime;
use crate::images::{ImageSource, ImageStore};
use crate::pressure::admission::NodeFacts;

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
    /// delete, and starts above every version of the daemon's earlier lives on this state dir
    /// (see [`epoch`]), so a watcher that knew an earlier daemon sees a newer version and
    /// lists again.
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
    /// The newest leader epoch seen per scope (see [`fence`]).
    fences: fence::Fences,
    /// Why the node is not registered with the API server, when it is kept from it (another
    /// node heartbeats under its name).
    registration_problem: StdMutex<Option<String>>,
}

impl Supervisor {
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
        let first_version = epoch::first_version(epoch::next(state_dir)?);
        let fences = fence::Fences::open(state_dir)?;
        Ok(Arc::new(Supervisor {
            shared: Arc::new(Shared {
                runtime,
                images,
                cfg,
                records_dir,
                logs_dir,
                volumes_dir,
                changes: watch::channel(first_version).0,
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
            digests_version: watch::channel(first_version).0,
            pressure: StdMutex::new(HashMap::new()),
            node_pressure: StdMutex::new(std::collections::VecDeque::new()),
            protection: StdMutex::new(None),
            prewarm: StdMutex::new(prewarm::Prewarm::default()),
            prewarm_kick: Notify::new(),
            fences,
            registration_problem: StdMutex::new(None),
        }))
    }

    /// Record why the node is kept from registering (none: it is registered, or not asked to).
    pub fn set_registration_problem(&self, problem: Option<String>) {
        *self
            .registration_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = problem;
    }

    pub(crate) fn registration_problem(&self) -> Option<String> {
        self.registration_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The leader epochs writes are fenced by.
    pub fn fences(&self) -> &fence::Fences {
        &self.fences
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
                if let Err(e) = crate::workloads::logs::rotate_if_needed(&p, max) {
                    tracing::warn!(file = %p.display(), error = %format!("{e:#}"), "log rotation failed");
                }
            }
        })
        .await;
    }

    /// The current change counter.
    pub fn version(&self) -> u64 {
        *self.shared.changes.borrow()
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
}

#[cfg(test)]
mod tests;
