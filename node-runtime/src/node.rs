//! The node summary: capacity, allocations, pressure (PSI) and active features.

use std::fs;

use hyperbox_api::{Features, NodeSummary, Pressure, ResourceAmounts};
use procfs::Current;

/// Cgroup layout of this host: `v2` (unified only), `hybrid` (v1 controllers plus a v2 tree at
/// /sys/fs/cgroup/unified) or `v1`.
pub fn cgroup_mode() -> String {
    if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2".into()
    } else if std::path::Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
        "hybrid".into()
    } else {
        "v1".into()
    }
}

/// Node-wide PSI, or `None` when the kernel does not expose it (see [`crate::pressure::psi`]).
pub fn pressure() -> Option<Pressure> {
    crate::pressure::psi::node()
}

pub fn capacity() -> ResourceAmounts {
    let memory_bytes = procfs::Meminfo::current().map(|m| m.mem_total).unwrap_or(0);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u64;
    ResourceAmounts {
        cpu_millis: cpus * 1000,
        memory_bytes,
    }
}

/// The node's stable id: 32 hex characters, created on first start and kept in
/// `STATE/node-id`, so a rename or a restart keeps it. An unreadable or malformed file is an
/// error, not a new identity.
pub fn load_or_create_id(state_dir: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let path = state_dir.join("node-id");
    match fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                anyhow::bail!(
                    "{}: {id:?} is not a node id (32 hex characters); remove the file to make a new one",
                    path.display()
                );
            }
            Ok(id.to_ascii_lowercase())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = hex::encode(rand::random::<[u8; 16]>());
            crate::fsutil::write_atomic(&path, format!("{id}\n").as_bytes())?;
            tracing::info!(node_id = %id, "new node id");
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn summary(
    facts: Option<&crate::pressure::admission::NodeFacts>,
    requested: ResourceAmounts,
    allocations: ResourceAmounts,
    workloads: usize,
    containers: usize,
    images: Option<&crate::images::ImageStore>,
) -> NodeSummary {
    let erofs = images.map(|s| s.erofs());
    let layered = images.is_some_and(|s| s.layered());
    let verity = images.map(|s| s.verity());
    let pressure = pressure();
    let capacity = facts.map(|f| f.capacity).unwrap_or_else(capacity);
    let telemetry = crate::telemetry::get();
    NodeSummary {
        name: hostname(),
        id: facts.map(|f| f.id.clone()).unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").into(),
        labels: facts.map(|f| f.labels.clone()).unwrap_or_default(),
        allocatable: facts.map(|f| f.allocatable).unwrap_or(capacity),
        requested,
        capacity,
        allocations,
        workloads,
        containers,
        features: Features {
            erofs: erofs.is_some_and(|e| e.enabled()),
            erofs_reason: erofs.and_then(|e| e.reason.clone()),
            ebpf: telemetry.is_some_and(|t| t.ebpf.active),
            ebpf_reason: match telemetry {
                Some(t) => t.ebpf.reason.clone(),
                None => Some("telemetry not started".into()),
            },
            ebpf_programs: telemetry
                .map(|t| t.ebpf.programs.clone())
                .unwrap_or_default(),
            cgroup: cgroup_mode(),
            psi: pressure.is_some(),
            image_store: if layered { "layers" } else { "flattened" }.into(),
            image_format: if erofs.is_some_and(|e| e.enabled()) {
                "erofs"
            } else {
                "directory"
            }
            .into(),
            fsverity: verity.is_some_and(|v| v.is_ok()),
            fsverity_reason: verity.and_then(|v| v.as_ref().err().cloned()),
        },
        pressure,
        workloads_pressure: facts
            .and_then(|f| f.pressure_dir.as_deref())
            .and_then(crate::pressure::psi::cgroup),
        pressure_admission: facts
            .and_then(|f| f.pressure_gate)
            .map(|g| format!("{}={}", g.name(), g.threshold)),
        pressure_trend: None,
        protection: None,
        prewarm: Vec::new(),
    }
}
