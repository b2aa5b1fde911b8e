//! What the node runtime reports: per-workload status and the node summary.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Kubernetes pod phase names.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PullProgress {
    pub layers_total: usize,
    pub layers_done: usize,
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// `resolving`, `downloading`, `building-erofs`, `mounting`, `done`.
    pub stage: String,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub index: u32,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<crate::Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub ready: bool,
    pub restarts: u32,
    #[serde(default)]
    pub last_exit_code: Option<i32>,
    #[serde(default)]
    pub container_id: Option<String>,
    #[serde(default)]
    pub pid: Option<i32>,
    /// RFC 3339 start time of the current container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// A replica of the previous spec still serving during a rolling update.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outdated: bool,
    /// The container's PSI (its cgroup v2 `*.pressure` files), as last sampled; none where
    /// the host has no cgroup v2 tree or PSI is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure: Option<Pressure>,
    /// How `some avg10` moved over the last samples (positive: rising).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure_trend: Option<PressureTrend>,
    /// The container's cgroup v2 id (the inode of its directory; what eBPF attributes by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// Held back by pressure protection (`memory.high`, or on cgroup v1 a memory soft limit
    /// and a cpu quota) until the node is calm again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub throttled: bool,
}

/// Change of each resource's `some avg10` over `over_seconds`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PressureTrend {
    pub cpu: f32,
    pub memory: f32,
    pub io: f32,
    pub over_seconds: f32,
}

/// The status of one workload on this node. Top-level fields summarise the replicas
/// (the worst phase wins; `restarts` is the sum) so single-replica workloads read naturally.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatus {
    pub name: String,
    /// Namespace of the workload (`default` from nodes that had none).
    #[serde(default = "crate::key::default_namespace")]
    pub namespace: String,
    pub phase: Phase,
    pub reason: Option<crate::Reason>,
    pub message: Option<String>,
    pub ready: bool,
    pub restarts: u32,
    pub last_exit_code: Option<i32>,
    pub image: String,
    pub image_digest: Option<String>,
    pub container_id: Option<String>,
    pub revision: Option<String>,
    /// Hash of the spec the node is running; unchanged specs are not restarted.
    pub spec_hash: String,
    /// Node-wide change counter when this status was taken (for long-polling).
    #[serde(default)]
    pub resource_version: u64,
    pub replicas: Vec<ReplicaStatus>,
    /// `erofs` or `directory` (the fallback when EROFS is unavailable).
    pub rootfs: Option<String>,
    pub pull: Option<PullProgress>,
    pub suspended: bool,
    /// Who manages the workload (`git:<url>#<path>`, …); none for ones applied by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<String>,
    /// Bumped by the node on every spec change (Kubernetes' `metadata.generation`).
    #[serde(default)]
    pub generation: u64,
    /// The generation this status describes; equal to `generation` once the node has acted
    /// on the latest spec.
    #[serde(default)]
    pub observed_generation: u64,
    /// Replicas the spec asks for (0 while suspended).
    #[serde(default)]
    pub desired_replicas: u32,
    /// Replicas with a container, of any spec (more than desired while a rollout surges).
    #[serde(default)]
    pub current_replicas: u32,
    /// Replicas of the current spec that were started.
    #[serde(default)]
    pub updated_replicas: u32,
    /// Ready replicas of any spec.
    #[serde(default)]
    pub ready_replicas: u32,
    /// Ready replicas of any spec (no minReadySeconds yet, so equal to readyReplicas).
    #[serde(default)]
    pub available_replicas: u32,
}

impl WorkloadStatus {
    /// A rollout is done (kstatus "Current"): the latest spec is observed, every desired
    /// replica is updated and available, and no old replica is left.
    pub fn rollout_complete(&self) -> bool {
        self.observed_generation == self.generation
            && self.updated_replicas == self.desired_replicas
            && self.available_replicas == self.desired_replicas
            && self.current_replicas == self.desired_replicas
    }
}

/// Outcome of applying one workload.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ApplyAction {
    Created,
    Configured,
    Unchanged,
    /// An action this client does not know (from a newer node): the answer still decodes.
    #[serde(other)]
    Unknown,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult {
    pub name: String,
    /// Namespace of the workload (`default` from nodes that had none).
    #[serde(default = "crate::key::default_namespace")]
    pub namespace: String,
    pub action: ApplyAction,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PsiAverages {
    pub avg10: f32,
    pub avg60: f32,
    pub avg300: f32,
    /// Total stall time in microseconds.
    pub total: u64,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PsiResource {
    pub some: PsiAverages,
    /// `cpu` has no meaningful `full` line on older kernels: zeros then.
    pub full: PsiAverages,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Pressure {
    pub cpu: PsiResource,
    pub memory: PsiResource,
    pub io: PsiResource,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ResourceAmounts {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl ResourceAmounts {
    pub fn times(self, n: u32) -> ResourceAmounts {
        ResourceAmounts {
            cpu_millis: self.cpu_millis.saturating_mul(n as u64),
            memory_bytes: self.memory_bytes.saturating_mul(n as u64),
        }
    }

    pub fn plus(self, o: ResourceAmounts) -> ResourceAmounts {
        ResourceAmounts {
            cpu_millis: self.cpu_millis.saturating_add(o.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(o.memory_bytes),
        }
    }

    pub fn minus(self, o: ResourceAmounts) -> ResourceAmounts {
        ResourceAmounts {
            cpu_millis: self.cpu_millis.saturating_sub(o.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(o.memory_bytes),
        }
    }
}

/// Why a node refuses a workload (`FieldError::reason`). Clients must accept reasons they do
/// not know: new ones (`NodePressure`) are added without a new API version.
pub mod refusal {
    pub const INSUFFICIENT_MEMORY: &str = "InsufficientMemory";
    pub const INSUFFICIENT_CPU: &str = "InsufficientCPU";
    pub const NODE_SELECTOR_MISMATCH: &str = "NodeSelectorMismatch";
    pub const NODE_PRESSURE: &str = "NodePressure";
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Features {
    pub erofs: bool,
    /// Why EROFS is off, when it is.
    pub erofs_reason: Option<String>,
    /// eBPF telemetry runs (at least one program attached).
    pub ebpf: bool,
    /// Why eBPF telemetry is off, or which programs failed, when not all are attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebpf_reason: Option<String>,
    /// Per eBPF program: `attached`, `disabled`, or why it is not running.
    #[serde(default)]
    pub ebpf_programs: std::collections::BTreeMap<String, String>,
    /// `v1`, `v2` or `hybrid`.
    pub cgroup: String,
    pub psi: bool,
    /// How images are prepared: `layers` (one read-only layer per image layer, shared between
    /// images) or `flattened` (one per image).
    #[serde(default)]
    pub image_store: String,
    /// What each prepared layer (or flattened image) is: `erofs` or `directory`.
    #[serde(default)]
    pub image_format: String,
    /// Layer files are sealed with fs-verity and measured before each mount.
    #[serde(default)]
    pub fsverity: bool,
    /// Why not, when they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsverity_reason: Option<String>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeSummary {
    pub name: String,
    /// Stable id, kept in the state dir (survives restarts and renames).
    #[serde(default)]
    pub id: String,
    pub version: String,
    /// `--label`s plus `kubernetes.io/hostname`, `kubernetes.io/arch`, `kubernetes.io/os`.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    pub capacity: ResourceAmounts,
    /// Capacity minus the reservations (`--reserve`): what workloads' requests may add up to.
    #[serde(default)]
    pub allocatable: ResourceAmounts,
    /// Sum of the requests of every admitted workload's desired replicas.
    #[serde(default)]
    pub requested: ResourceAmounts,
    /// Sum of the limits of running replicas (unlimited ones count 0).
    pub allocations: ResourceAmounts,
    pub workloads: usize,
    pub containers: usize,
    pub pressure: Option<Pressure>,
    /// PSI of the node's workloads together (their cgroup v2 parent), where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads_pressure: Option<Pressure>,
    /// The signal and threshold above which new replicas are refused (`NodePressure`);
    /// none when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure_admission: Option<String>,
    /// How the node's pressure moved over the last samples (the host's and its workloads'
    /// `some avg10`, whichever is higher; positive: rising).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure_trend: Option<PressureTrend>,
    /// Why the node is not registered with the Kubernetes API server although asked to be:
    /// another node heartbeats under its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_problem: Option<String>,
    /// Pressure protection: its settings, the signal now and what it has done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<ProtectionStatus>,
    /// Images kept ready for work likely to land here (standby workloads, a source's
    /// requests), and how far each is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prewarm: Vec<PrewarmedImage>,
    pub features: Features,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrewarmState {
    /// Waiting for its turn, or for the node to calm down (the message says which).
    Waiting,
    Pulling,
    /// Prepared: a start needs no registry (the message is the digest).
    Ready,
    /// The last try failed (the message says why); retried after a minute.
    Failed,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrewarmedImage {
    pub image: String,
    pub state: PrewarmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What pressure protection is set to and has done since the daemon started.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProtectionStatus {
    /// The settings (`throttle=10,evict=20,...`).
    pub settings: String,
    /// The signal: the memory `full` stall of the node's workloads, percent of the last
    /// `sustain` seconds; none before the first full window or without PSI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<f32>,
    /// Replicas throttled now.
    pub throttled: u32,
    /// Replicas evicted for pressure and not yet restored.
    pub evicted: u32,
    pub throttles_total: u64,
    pub evictions_total: u64,
    pub restores_total: u64,
    /// The last action, with its figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action: Option<String>,
}

/// Error body of every non-2xx API answer.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<crate::validate::FieldError>,
}

/// Result of preparing an image on the node.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PullResult {
    pub image: String,
    pub digest: String,
    /// `erofs` or `directory`
    pub rootfs: String,
    pub elapsed_ms: u64,
}

/// Every workload of a node with the node's change counter (the answer to a watch).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadList {
    /// The node's change counter when the list was taken: the `after` of the next watch.
    pub resource_version: u64,
    pub items: Vec<WorkloadStatus>,
}

/// The minimum a source needs to diff against the node: what runs, by hashes and revision.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadDigest {
    pub name: String,
    /// Namespace of the workload (`default` from nodes that had none).
    #[serde(default = "crate::key::default_namespace")]
    pub namespace: String,
    /// What decides a restart (see [`crate::spec_hash`]).
    pub spec_hash: String,
    /// The whole desired state, replica count included (see [`crate::config_hash`]); empty
    /// from nodes older than this field.
    #[serde(default)]
    pub config_hash: String,
    pub revision: Option<String>,
    /// Who manages the workload (`git:<url>#<path>`, …); none for ones applied by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<String>,
    /// Replicas the node evicted for pressure (reason `EvictedForPressure`): a source with
    /// other nodes places them there.
    #[serde(default, skip_serializing_if = "crate::util::is_zero")]
    pub evicted_for_pressure: u32,
}

macro_rules! keyed {
    ($($t:ty),*) => {$(
        impl $t {
            /// The workload's key (see [`crate::key`]).
            pub fn key(&self) -> String {
                crate::key::workload_key(&self.namespace, &self.name)
            }
        }
    )*};
}
keyed!(WorkloadStatus, ApplyResult, WorkloadDigest);
