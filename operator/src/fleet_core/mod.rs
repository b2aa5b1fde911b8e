//! The fleet core: what the operator decides about nodes and replicas, with no Git and no
//! Kubernetes in it. The sources (`crate::sync` for Git, `crate::k8s` for Kubernetes) feed it
//! what they observe and carry out what it decides; every rule lives here once, on plain data,
//! and is unit-tested without I/O.
//!
//! May call: `crate::placement` (the pure placement of replicas), `hyperbox_api` types. Must not
//! call: `crate::k8s`, `crate::sync`, `crate::gitsource`, the node client, or any I/O.

pub mod avoid;
pub mod liveness;
pub mod orphans;
pub mod rollout;
