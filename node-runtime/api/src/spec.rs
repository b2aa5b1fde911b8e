//! The `hyperbox.dev/v1alpha1` `Workload` document: the one schema shared by the node runtime,
//! the Git source and the Kubernetes custom resource.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "hyperbox.dev/v1alpha1";
pub const KIND_WORKLOAD: &str = "Workload";
/// Annotation carrying the source revision (for example a Git commit) that produced a workload.
pub const REVISION_ANNOTATION: &str = "hyperbox.dev/revision";

/// A whole `Workload` document as written in YAML or sent to the node API.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: WorkloadSpec,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ObjectMeta {
    /// The namespace, `default` when none is given.
    pub fn namespace(&self) -> &str {
        match self.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => ns,
            _ => crate::key::DEFAULT_NAMESPACE,
        }
    }
}

impl Workload {
    /// What a node and a source know this workload by (see [`crate::key`]).
    pub fn key(&self) -> String {
        crate::key::workload_key(self.metadata.namespace(), &self.metadata.name)
    }
}

/// One container per replica, Pod-like.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Image reference: `registry/repo:tag` or `registry/repo@sha256:...`.
    pub image: String,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Replaces the image's cmd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// `uid[:gid]`, or a user name from the image's /etc/passwd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub network: NetworkMode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<VolumeMount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    /// Seconds between SIGTERM and SIGKILL when stopping (default 10, at most 3600: a stop
    /// never waits longer than an hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<u32>,
    /// A suspended workload keeps its definition but runs no container.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// A standby workload runs no container either, but each node that holds it keeps its
    /// image pulled and prepared while the node is calm: setting it back to false starts the
    /// replicas without a registry round trip (a warm spare).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standby: bool,
    /// How a spec change replaces running replicas (default: RollingUpdate, 25% surge, 25%
    /// unavailable, like a Deployment).
    #[serde(default, skip_serializing_if = "Strategy::is_default")]
    pub strategy: Strategy,
    /// A rollout that makes no progress (no new replica becomes ready) for this long is
    /// reported as `ProgressDeadlineExceeded` (default 600, as for a Deployment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline_seconds: Option<u32>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Strategy {
    #[serde(rename = "type", default)]
    pub kind: StrategyType,
    /// Only with `type: RollingUpdate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_update: Option<RollingUpdate>,
}

impl Strategy {
    pub fn is_default(&self) -> bool {
        *self == Strategy::default()
    }
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StrategyType {
    /// Replace replicas a few at a time; old ones keep serving until new ones are ready.
    #[default]
    RollingUpdate,
    /// Stop every old replica, then start the new ones.
    Recreate,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RollingUpdate {
    /// Replicas that may be unready during the update: a count or a percentage of
    /// `replicas`, rounded down (default 25%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrPercent>,
    /// Replicas that may run above `replicas` during the update: a count or a percentage,
    /// rounded up (default 25%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_surge: Option<IntOrPercent>,
}

/// The bounds of a rolling update, resolved against a replica count like Kubernetes does:
/// surge rounds up, unavailable rounds down, and when both come to 0, one replica may be
/// unavailable. A node resolves its copy's bounds against its share; the operator resolves a
/// workload's against all its replicas and splits them between the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutBounds {
    pub max_surge: u32,
    pub max_unavailable: u32,
}

impl RolloutBounds {
    pub fn resolve(r: &RollingUpdate, replicas: u32) -> RolloutBounds {
        let resolve = |v: &Option<IntOrPercent>, up: bool| -> u32 {
            match v.as_ref().unwrap_or(&IntOrPercent::Percent("25%".into())) {
                IntOrPercent::Int(n) => *n,
                IntOrPercent::Percent(p) => {
                    let pct: u64 = p.trim_end_matches('%').parse().unwrap_or(25);
                    let scaled = pct * replicas as u64;
                    (if up {
                        scaled.div_ceil(100)
                    } else {
                        scaled / 100
                    }) as u32
                }
            }
        };
        let max_surge = resolve(&r.max_surge, true);
        let mut max_unavailable = resolve(&r.max_unavailable, false);
        if max_surge == 0 && max_unavailable == 0 {
            max_unavailable = 1;
        }
        RolloutBounds {
            max_surge,
            max_unavailable,
        }
    }
}

/// `2` or `"25%"`, as Kubernetes' IntOrString.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrPercent {
    Int(u32),
    Percent(String),
}

/// Kubernetes' own schema for IntOrString (an untagged enum's `anyOf` is not structural).
impl JsonSchema for IntOrPercent {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IntOrPercent".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A count (`2`) or a percentage of `replicas` (`\"25%\"`).",
            "x-kubernetes-int-or-string": true
        })
    }
}

/// Default `progressDeadlineSeconds`.
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: u32 = 600;

fn default_replicas() -> u32 {
    1
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// Memory limit, Kubernetes quantity (`64Mi`, `1G`, `1048576`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::quantity::Memory>,
    /// CPU limit, Kubernetes quantity (`500m`, `1`, `0.25`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<crate::quantity::Cpu>,
    /// Maximum number of processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
    /// What one replica is guaranteed, for admission and placement (a node admits a replica
    /// only while the requests of everything it runs fit its allocatable). A request left
    /// out defaults to the limit above, as in Kubernetes; with neither it is 0.
    #[serde(default, skip_serializing_if = "Requests::is_empty")]
    pub requests: Requests,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        self.memory.is_none()
            && self.cpu.is_none()
            && self.pids.is_none()
            && self.requests.is_empty()
    }
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requests {
    /// Kubernetes quantity (`64Mi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::quantity::Memory>,
    /// Kubernetes quantity (`250m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<crate::quantity::Cpu>,
}

impl Requests {
    pub fn is_empty(&self) -> bool {
        self.memory.is_none() && self.cpu.is_none()
    }
}

impl Workload {
    /// What one replica requests (explicit requests, else the limits, else 0). Unparsable
    /// quantities count 0: validation refuses them before anything is admitted.
    pub fn request_per_replica(&self) -> crate::ResourceAmounts {
        let r = &self.spec.resources;
        let memory = r.requests.memory.as_ref().or(r.memory.as_ref());
        let cpu = r.requests.cpu.as_ref().or(r.cpu.as_ref());
        crate::ResourceAmounts {
            memory_bytes: memory.map_or(0, |m| m.or_zero()),
            cpu_millis: cpu.map_or(0, |c| c.or_zero()),
        }
    }

    /// Replicas the spec asks for (none while suspended or on standby).
    pub fn desired_replicas(&self) -> u32 {
        if self.spec.suspend || self.spec.standby {
            0
        } else {
            self.spec.replicas
        }
    }

    /// What all its desired replicas request together.
    pub fn total_request(&self) -> crate::ResourceAmounts {
        self.request_per_replica().times(self.desired_replicas())
    }
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Share the node's network namespace.
    #[default]
    Host,
    /// A private network namespace with only loopback.
    None,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Volume {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolume>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolume>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostPathVolume {
    pub path: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmptyDirVolume {}

/// An object with no fields (`additionalProperties: false` is not a structural schema:
/// Kubernetes prunes and, with strict validation, refuses unknown fields by itself).
impl JsonSchema for EmptyDirVolume {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "EmptyDirVolume".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A scratch directory that lives as long as the replica.",
            "type": "object"
        })
    }
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeMount {
    /// Name of an entry in `volumes`.
    pub name: String,
    /// Absolute path inside the container.
    pub mount_path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay_seconds: Option<u32>,
    /// Seconds between probes (default 10, fractions allowed for fast checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecAction {
    pub command: Vec<String>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGetAction {
    #[serde(default = "default_probe_path")]
    pub path: String,
    pub port: u16,
    /// Defaults to 127.0.0.1 (the probe runs from the node; use `network: host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

fn default_probe_path() -> String {
    "/".to_string()
}

/// Hash of what decides whether running containers must be replaced: the name and the spec,
/// without what only says how many run, where and how they are replaced (`replicas`,
/// `priority`, `nodeSelector`, `strategy`, `progressDeadlineSeconds`).
/// Labels and annotations (the source revision, say) change without a restart either, and a
/// new replica count scales without touching the survivors.
pub fn spec_hash(w: &Workload) -> String {
    let mut spec = w.spec.clone();
    spec.replicas = 1;
    spec.priority = 0;
    spec.node_selector.clear();
    spec.strategy = Strategy::default();
    spec.progress_deadline_seconds = None;
    hash_of(&w.metadata.name, &spec)
}

/// Hash of the whole desired state of a workload: name, full spec, labels and annotations,
/// except the source revision annotation. A source compares it to tell whether the node has
/// what it wants (scaling and metadata included); a new revision that leaves a workload as it
/// was does not make it differ, so a push re-applies only what it changed.
pub fn config_hash(w: &Workload) -> String {
    use sha2::{Digest, Sha256};
    let mut annotations = w.metadata.annotations.clone();
    annotations.remove(REVISION_ANNOTATION);
    let mut h = Sha256::new();
    h.update(w.metadata.name.as_bytes());
    h.update(serde_json::to_vec(&w.spec).expect("serialize spec"));
    h.update(b"\0labels");
    h.update(serde_json::to_vec(&w.metadata.labels).expect("serialize labels"));
    h.update(b"\0annotations");
    h.update(serde_json::to_vec(&annotations).expect("serialize annotations"));
    hex::encode(&h.finalize()[..16])
}

fn hash_of(name: &str, spec: &WorkloadSpec) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(serde_json::to_vec(spec).expect("serialize spec"));
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(extra: &str) -> Workload {
        serde_norway::from_str(&format!(
            "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata: {{name: a}}\nspec:\n  image: x\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn spec_hash_ignores_metadata_and_placement_config_hash_does_not() {
        let base = w("");
        let h = spec_hash(&base);
        let mut annotated = base.clone();
        annotated
            .metadata
            .annotations
            .insert(REVISION_ANNOTATION.into(), "abc".into());
        assert_eq!(h, spec_hash(&annotated));
        assert_eq!(config_hash(&base), config_hash(&annotated));
        // Other metadata is part of what a source wants: a change is applied, drift restored.
        for key in ["team", "hyperbox.dev/prune"] {
            let mut labelled = base.clone();
            labelled.metadata.labels.insert(key.into(), "x".into());
            assert_eq!(h, spec_hash(&labelled));
            assert_ne!(config_hash(&base), config_hash(&labelled), "label {key}");
            let mut noted = base.clone();
            noted.metadata.annotations.insert(key.into(), "x".into());
            assert_eq!(h, spec_hash(&noted));
            assert_ne!(config_hash(&base), config_hash(&noted), "annotation {key}");
            assert_ne!(
                config_hash(&labelled),
                config_hash(&noted),
                "label vs annotation {key}"
            );
        }
        for extra in [
            "  replicas: 3\n",
            "  priority: 5\n",
            "  nodeSelector: {zone: a}\n",
            "  strategy: {type: Recreate}\n",
            "  progressDeadlineSeconds: 30\n",
        ] {
            let scaled = w(extra);
            assert_eq!(h, spec_hash(&scaled), "{extra}");
            assert_ne!(config_hash(&base), config_hash(&scaled), "{extra}");
        }
        for extra in [
            "  args: [x]\n",
            "  suspend: true\n",
            "  env: [{name: A, value: b}]\n",
        ] {
            assert_ne!(h, spec_hash(&w(extra)), "{extra}");
        }
    }
}
