//! The `HyperNode` resource's spec and status as plain types: the node runtime writes them to
//! the Kubernetes API with its own small client (the node side does not depend on `kube`),
//! and the operator wraps them in its custom resource types.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Pressure, ResourceAmounts};

pub const KIND_HYPERNODE: &str = "HyperNode";
/// Plural of the HyperNode resource (its REST path).
pub const HYPERNODES: &str = "hypernodes";
/// The condition a node keeps `True` with its heartbeats and the operator turns `False`
/// when they stop.
pub const CONDITION_READY: &str = "Ready";

/// Where the node's API is and who it is.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HyperNodeSpec {
    /// The node API (`https://host:port`, `http://host:port`) the operator talks to.
    pub address: String,
    /// The node's stable id (kept in its state dir).
    pub node_id: String,
}

/// What the node reports with each heartbeat.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HyperNodeStatus {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    #[serde(default)]
    pub capacity: ResourceAmounts,
    #[serde(default)]
    pub allocatable: ResourceAmounts,
    /// Requests of the replicas the node admitted.
    #[serde(default)]
    pub requested: ResourceAmounts,
    /// Limits of the running replicas.
    #[serde(default)]
    pub allocations: ResourceAmounts,
    #[serde(default)]
    pub workloads: u32,
    #[serde(default)]
    pub containers: u32,
    /// The node's PSI; none without PSI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure: Option<Pressure>,
    /// RFC 3339 time of the last heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_time: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<NodeCondition>,
}

/// A Kubernetes-style condition (`type`, `status`, `reason`, `message`, transition time).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeCondition {
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339 time the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

impl HyperNodeStatus {
    pub fn condition(&self, kind: &str) -> Option<&NodeCondition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }
}
