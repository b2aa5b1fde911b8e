//! HyperBox node runtime: pulls OCI images into EROFS and runs Workloads as supervised
//! libcontainer containers, behind an HTTP/JSON API.

pub mod cli;
pub mod config;
pub mod containers;
pub mod daemon;
pub mod fsutil;
pub mod images;
pub mod kubeapi;
pub mod logs;
pub mod node;
pub mod pressure;
pub mod server;
pub mod supervisor;
pub mod telemetry;
