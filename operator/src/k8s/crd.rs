//! The custom resources: `Workload` (namespaced) and `HyperNode` (cluster-scoped), derived
//! with kube's `CustomResource` around the shared spec types, so the same YAML is valid in
//! Git, on a node and in Kubernetes.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::core::{CustomResourceExt, ObjectMeta};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "hyperbox.dev";

/// The spec of a Workload custom resource: exactly the shared [`hyperbox_api::WorkloadSpec`].
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hyperbox.dev",
    version = "v1alpha1",
    kind = "Workload",
    root = "KubeWorkload",
    namespaced,
    status = "KubeWorkloadStatus",
    shortname = "hbw",
    category = "hyperbox",
    doc = "Container workload placed by HyperBox on its node runtimes: one container per replica.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.ready"),
    printcolumn(
        name = "Up-to-date",
        type_ = "integer",
        json_path = ".status.updatedReplicas"
    ),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.availableReplicas"
    ),
    printcolumn(name = "Nodes", type_ = "string", json_path = ".status.nodes"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(transparent)]
pub struct WorkloadCrSpec(pub hyperbox_api::WorkloadSpec);

/// Status in kstatus terms (`observedGeneration`, `Ready` / `Reconciling` / `Stalled`), with
/// the replica counts of a Deployment and where each replica runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubeWorkloadStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas with a container, on every node together.
    #[serde(default)]
    pub replicas: u32,
    #[serde(default)]
    pub ready_replicas: u32,
    #[serde(default)]
    pub updated_replicas: u32,
    #[serde(default)]
    pub available_replicas: u32,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default)]
    pub ready: String,
    /// The nodes its replicas run on (comma-separated HyperNode names).
    #[serde(default)]
    pub nodes: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// One entry per replica: where it runs and what.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_statuses: Vec<ReplicaPlacement>,
    /// Where the operator placed the replicas: HyperNode → replicas there (0 keeps only the
    /// definition). An operator that restarts places from this, not from the copies the
    /// nodes hold: a node back from an outage may hold a copy whose replicas moved.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub placement: std::collections::BTreeMap<String, u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaPlacement {
    /// The HyperNode it runs on.
    pub node: String,
    /// Its ordinal on that node.
    pub index: u32,
    pub phase: String,
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit_code: Option<i32>,
}

/// The spec of a HyperNode: the shared [`hyperbox_api::hypernode::HyperNodeSpec`], written by
/// the node runtime itself.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hyperbox.dev",
    version = "v1alpha1",
    kind = "HyperNode",
    root = "KubeHyperNode",
    status = "HyperNodeCrStatus",
    shortname = "hbn",
    category = "hyperbox",
    doc = "A HyperBox node runtime: its API address, capacity, allocations, pressure and heartbeat.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.address"),
    printcolumn(name = "Workloads", type_ = "integer", json_path = ".status.workloads"),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.heartbeatTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(transparent)]
pub struct HyperNodeCrSpec(pub hyperbox_api::hypernode::HyperNodeSpec);

/// The shared node status (see [`hyperbox_api::hypernode::HyperNodeStatus`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(transparent)]
pub struct HyperNodeCrStatus(pub hyperbox_api::hypernode::HyperNodeStatus);

/// Annotations that belong to the Kubernetes side and are not handed to the node.
fn kube_only_annotation(key: &str) -> bool {
    key.starts_with("kubectl.kubernetes.io/") || key.starts_with("argocd.argoproj.io/")
}

impl KubeWorkload {
    /// The shared document a node runs (namespace + name, labels, the annotations that are
    /// not Kubernetes' own, and the spec).
    pub fn to_workload(&self) -> hyperbox_api::Workload {
        let m = &self.metadata;
        hyperbox_api::Workload {
            api_version: hyperbox_api::API_VERSION.to_string(),
            kind: hyperbox_api::KIND_WORKLOAD.to_string(),
            metadata: hyperbox_api::ObjectMeta {
                name: m.name.clone().unwrap_or_default(),
                namespace: Some(
                    m.namespace
                        .clone()
                        .unwrap_or_else(|| hyperbox_api::DEFAULT_NAMESPACE.to_string()),
                ),
                labels: m.labels.clone().unwrap_or_default(),
                annotations: m
                    .annotations
                    .iter()
                    .flatten()
                    .filter(|(k, _)| !kube_only_annotation(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            },
            spec: self.spec.0.clone(),
        }
    }

    /// The custom resource for a shared document (what `kubectl apply` of the same YAML
    /// creates).
    pub fn from_workload(w: &hyperbox_api::Workload) -> KubeWorkload {
        let opt = |m: &BTreeMap<String, String>| (!m.is_empty()).then(|| m.clone());
        KubeWorkload {
            metadata: ObjectMeta {
                name: Some(w.metadata.name.clone()),
                namespace: Some(w.metadata.namespace().to_string()),
                labels: opt(&w.metadata.labels),
                annotations: opt(&w.metadata.annotations),
                ..ObjectMeta::default()
            },
            spec: WorkloadCrSpec(w.spec.clone()),
            status: None,
        }
    }
}

/// Both CRDs, in the order they are applied.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![KubeWorkload::crd(), KubeHyperNode::crd()]
}

/// The CRDs as one multi-document YAML file (what `hyperbox-operator crd` prints and
/// `crds/hyperbox.yaml` holds).
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Generated by `hyperbox-operator crd` from the Rust types: do not edit by hand.\n",
    );
    for (i, crd) in crds().iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_norway::to_string(crd).expect("serialize a CRD"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");

    fn example_files() -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(EXAMPLES)];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "yaml") {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn crds_in_the_repo_are_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/hyperbox.yaml");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == crds_yaml(),
            "crds/hyperbox.yaml is stale: run `cargo run -p hyperbox-operator -- crd > crds/hyperbox.yaml`"
        );
        let chart = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/hyperbox/crds/hyperbox.yaml"
        );
        assert!(
            std::fs::read_to_string(chart).unwrap_or_default() == on_disk,
            "charts/hyperbox/crds/hyperbox.yaml is stale: cp crds/hyperbox.yaml charts/hyperbox/crds/"
        );
    }

    #[test]
    fn every_example_workload_round_trips_through_the_custom_resource() {
        let mut seen = 0;
        for path in example_files() {
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_norway::Deserializer::from_str(&text) {
                let value = serde_norway::Value::deserialize(doc).unwrap();
                if value.get("kind").and_then(|k| k.as_str()) != Some("Workload") {
                    continue;
                }
                let shared: hyperbox_api::Workload =
                    serde_norway::from_value(value.clone()).unwrap();
                let cr: KubeWorkload = serde_norway::from_value(value).unwrap();
                let mut expect = shared.clone();
                expect.metadata.namespace = Some(shared.metadata.namespace().to_string());
                assert_eq!(cr.to_workload(), expect, "{}", path.display());
                assert_eq!(
                    KubeWorkload::from_workload(&shared).to_workload(),
                    expect,
                    "{}",
                    path.display()
                );
                // The CR serializes its spec exactly as the shared type does.
                assert_eq!(
                    serde_json::to_value(&cr.spec).unwrap(),
                    serde_json::to_value(&shared.spec).unwrap()
                );
                seen += 1;
            }
        }
        assert!(seen >= 3, "only {seen} example workloads found");
    }

    #[test]
    fn kubernetes_annotations_stay_on_the_kubernetes_side() {
        let mut cr = KubeWorkload::new(
            "web",
            WorkloadCrSpec(serde_json::from_str(r#"{"image":"busybox"}"#).unwrap()),
        );
        cr.metadata.annotations = Some(BTreeMap::from([
            (
                "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                "{}".to_string(),
            ),
            ("team".to_string(), "a".to_string()),
        ]));
        let w = cr.to_workload();
        assert_eq!(w.metadata.namespace(), "default");
        assert_eq!(
            w.metadata.annotations,
            BTreeMap::from([("team".to_string(), "a".to_string())])
        );
    }

    #[test]
    fn the_workload_crd_has_status_scale_columns_and_a_short_name() {
        let crd = KubeWorkload::crd();
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["hbw".to_string()]));
        let v = &crd.spec.versions[0];
        let sub = v.subresources.as_ref().unwrap();
        assert!(sub.status.is_some());
        assert_eq!(
            sub.scale.as_ref().unwrap().spec_replicas_path,
            ".spec.replicas"
        );
        let cols: Vec<&str> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["Ready", "Up-to-date", "Available", "Nodes", "Age"]);
        assert_eq!(KubeHyperNode::crd().spec.scope, "Cluster");
    }
}
