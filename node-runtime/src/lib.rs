//! HyperBox node runtime: pulls OCI images into EROFS and runs Workloads as supervised
//! libcontainer containers, behind an HTTP/JSON API.
//!
//! One folder per stage of the flow (ARCHITECTURE.md at the repository root draws it): a
//! request comes in through [`api`], [`workloads`] turns desired workloads into replicas,
//! [`images`] prepares their images and [`containers`] runs them on the kernel; [`pressure`],
//! [`telemetry`] and [`cluster`] stand beside the flow. No folder imports one that calls it.
//! [`daemon`] wires the folders together; [`cli`] holds the client commands of the binary.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod containers;
pub mod daemon;
pub mod fsutil;
pub mod images;
pub mod pressure;
pub mod state_lock;
pub mod telemetry;
pub mod workloads;
