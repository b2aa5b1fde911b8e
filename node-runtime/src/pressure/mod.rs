//! Pressure: what this machine can take. Reads the host's facts ([`host`]: capacity, stable
//! id, name, cgroup layout) and the kernel's pressure stall information ([`psi`], node-wide
//! and per cgroup v2 directory), decides admission as a pure function of
//! plain facts ([`admission`]: labels, capacity, a pressure gate), and decides pressure
//! protection ([`protect`]: whom to throttle or evict under sustained memory stall).
//!
//! It owns no state and runs nothing: the workloads (`crate::workloads`) hold the node's facts
//! and act on these decisions. It may call only `crate::fsutil` and the kernel's files; every
//! other folder may call it.

pub mod admission;
pub mod host;
pub mod protect;
pub mod psi;
