//! The fleet core: what the operator decides about nodes and replicas, with no Git and no
//! Kubernetes in it. The sources (`crate::sync::fleet` for Git, `crate::k8s::controller` for
//! Kubernetes) feed it what they observe and carry out what it decides; every rule lives here
//! once, on plain data, and is unit-tested without I/O.
//!
//! - [`placement`]: where each replica runs (fit, spread, pressure), node by node.
//! - [`place`]: a desired set placed across node views, and the images to prewarm.
//! - [`rollout`]: a workload's rollout budget split between its nodes.
//! - [`decide`]: placement and rollout together: what each node gets of each workload.
//! - [`ledger`]: placements made one workload at a time, until the nodes report them.
//! - [`liveness`]: when a node is not ready, lost, and whether the fleet is disrupted.
//! - [`avoid`]: nodes a workload avoids (refusals, pressure evictions).
//! - [`orphans`]: copies whose workload is gone.
//!
//! May call: `hyperbox_api` types. Must not call: `crate::k8s`, `crate::sync`,
//! `crate::gitsource`, `crate::manifests`, the node client, or any I/O.

pub mod avoid;
pub mod decide;
pub mod ledger;
pub mod liveness;
pub mod orphans;
pub mod place;
pub mod placement;
pub mod rollout;
#[cfg(test)]
mod testing;
