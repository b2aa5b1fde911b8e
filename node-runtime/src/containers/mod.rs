//! Containers: a prepared image and a workload's spec in, a running process out. The OCI
//! runtime spec ([`spec`], with the default [`seccomp`] profile and the node's [`policy`]),
//! the libcontainer (youki) calls that create, signal, exec in and delete containers
//! ([`lifecycle`], through the [`spawner`] process), the pidfd handle of a container's init
//! ([`process`]), HTTP GET inside a container's network namespace ([`netns`]), and the
//! [`Runtime`] trait the workloads drive them through, with [`fake::FakeRuntime`] for tests
//! without root.
//!
//! It may call `crate::images` (the prepared image, the overlay mount), `crate::pressure`
//! (cgroup v2 placement and the protection controls), `crate::telemetry` (counters, the
//! container's cgroup readings), `crate::fsutil` and the kernel. It never names the workloads'
//! types (records, replicas, the supervisor): the workloads call it, never the other way.

pub mod dirs;
pub mod fake;
pub mod lifecycle;
pub mod netns;
pub mod policy;
pub mod process;
pub mod runtime;
pub mod seccomp;
pub mod spawner;
pub mod spec;

pub use dirs::RuntimeDirs;
pub use lifecycle::{cgroup_parent_dirs, StartRequest};
pub use process::{ProcHandle, ProcIdentity};
pub use runtime::{LibcontainerRuntime, Runtime, Started};
