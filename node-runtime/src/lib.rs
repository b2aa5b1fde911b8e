//! HyperBox node runtime: pulls OCI images into EROFS and runs Workloads as supervised
//! libcontainer containers, behind an HTTP/JSON API.

pub mod cli;
pub mod config;
pub mod container;
pub mod daemon;
pub mod erofs;
pub mod fsutil;
pub mod image;
pub mod kubeapi;
pub mod logs;
pub mod node;
pub mod policy;
pub mod pressure;
pub mod probe;
pub mod runtime;
pub mod seccomp;
pub mod server;
pub mod supervisor;
pub mod telemetry;
