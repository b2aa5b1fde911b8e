//! HyperBox node runtime: pulls OCI images into EROFS and runs Workloads as supervised
//! libcontainer containers, behind an HTTP/JSON API.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod containers;
pub mod daemon;
pub mod fsutil;
pub mod images;
pub mod pressure;
pub mod telemetry;
pub mod workloads;
