//! The node summary: capacity, allocations, pressure (PSI) and active features.

use std::fs;

use hyperbox_api::{Features, NodeSummary, Pressure, PsiAverages, PsiResource, ResourceAmounts};
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

fn avgs(r: &procfs::PressureRecord) -> PsiAverages {
    PsiAverages {
        avg10: r.avg10,
        avg60: r.avg60,
        avg300: r.avg300,
        total: r.total,
    }
}

/// Node-wide PSI, or `None` when the kernel does not expose it.
pub fn pressure() -> Option<Pressure> {
    let cpu = procfs::CpuPressure::current().ok()?;
    let mem = procfs::MemoryPressure::current().ok()?;
    let io = procfs::IoPressure::current().ok()?;
    Some(Pressure {
        cpu: PsiResource {
            some: avgs(&cpu.some),
            full: avgs(&cpu.full),
        },
        memory: PsiResource {
            some: avgs(&mem.some),
            full: avgs(&mem.full),
        },
        io: PsiResource {
            some: avgs(&io.some),
            full: avgs(&io.full),
        },
    })
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

pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn summary(
    allocations: ResourceAmounts,
    workloads: usize,
    containers: usize,
    erofs: Option<&crate::erofs::ErofsSupport>,
) -> NodeSummary {
    let pressure = pressure();
    NodeSummary {
        name: hostname(),
        version: env!("CARGO_PKG_VERSION").into(),
        capacity: capacity(),
        allocations,
        workloads,
        containers,
        features: Features {
            erofs: erofs.is_some_and(|e| e.enabled()),
            erofs_reason: erofs.and_then(|e| e.reason.clone()),
            ebpf: false,
            cgroup: cgroup_mode(),
            psi: pressure.is_some(),
        },
        pressure,
    }
}
