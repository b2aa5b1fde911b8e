//! HyperBox operator: sources of desired state (Git now, Kubernetes next), validation,
//! reconcile planning and status.

pub mod apply;
pub mod config;
pub mod fleet_core;
pub mod gitsource;
pub mod init;
pub mod k8s;
pub mod manifests;
pub mod node_api;
pub mod nodewatch;
pub mod reconcile;
pub mod sync;
pub mod validate;
pub mod webhook;
