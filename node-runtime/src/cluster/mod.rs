//! Cluster: registration with a Kubernetes API server. The node creates its `HyperNode` and
//! heartbeats it ([`registration`]), refusing to merge with another node of the same name,
//! over kube's client ([`apiserver`]: kubeconfig or in-cluster credentials, server-side apply
//! with resourceVersion preconditions).
//!
//! It stands beside the flow: it reads the node's summary from `crate::workloads` and writes
//! nothing back into the node. Nothing else in the node calls it but the daemon that starts it.

pub mod apiserver;
pub mod registration;

pub use apiserver::{ApiServer, IN_CLUSTER};
pub use registration::{check_node_name, default_address, run, Registration};
