//! The host's facts: its capacity, stable id, name, cgroup layout and node-wide PSI.

use std::fs;

use hyperbox_api::{Pressure, ResourceAmounts};
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

/// Node-wide PSI, or `None` when the kernel does not expose it (see [`super::psi`]).
pub fn pressure() -> Option<Pressure> {
    super::psi::node()
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
