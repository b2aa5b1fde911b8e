//! The node as its workloads see it: the summary `GET /v1/node` answers and the HyperNode's
//! status carries (capacity, allocations, pressure, features, protection, prewarm), and
//! everything telemetry exports, gathered once.

use std::collections::HashMap;

use hyperbox_api::{Features, NodeSummary, ResourceAmounts};

use super::replica::Stage;
use super::Supervisor;
use crate::images::ImageStore;
use crate::pressure::admission::NodeFacts;
use crate::pressure::host;

impl Supervisor {
    /// The node's summary: its facts, what its workloads request and use, its pressure and
    /// its trend, pressure protection and prewarmed images.
    pub async fn node_summary(&self) -> NodeSummary {
        let (cpu_millis, memory_bytes, containers) = self.allocations().await;
        let facts = self.node_facts();
        let mut summary = summary(
            facts.as_ref(),
            self.requested(),
            ResourceAmounts {
                cpu_millis,
                memory_bytes,
            },
            self.workload_count().await,
            containers,
            self.store().map(|s| s.as_ref()),
        );
        summary.pressure_trend = self.node_trend();
        summary.protection = self.protection_status();
        summary.prewarm = self.prewarm_status().await;
        summary.registration_problem = self.registration_problem();
        summary
    }

    /// Everything the node exports, gathered once (see [`crate::telemetry::snapshot`]): both
    /// `/metrics` and the OTLP export encode this.
    pub async fn telemetry_snapshot(&self) -> crate::telemetry::Snapshot {
        let list = self.list().await;
        let summary = self.node_summary().await;
        let readings = self
            .cgroup_readings(
                list.iter()
                    .flat_map(|w| w.replicas.iter().filter_map(|r| r.container_id.clone()))
                    .collect(),
            )
            .await;
        crate::telemetry::snapshot::build(list, summary, readings).await
    }

    /// Limits of running replicas: (cpu millis, memory bytes, containers).
    pub async fn allocations(&self) -> (u64, u64, usize) {
        let (mut cpu, mut mem, mut n) = (0, 0, 0);
        for rec in self.snapshots().await {
            let running = rec
                .all_replicas()
                .filter(|r| matches!(r.stage, Stage::Running { .. }))
                .count() as u64;
            let res = &rec.workload.spec.resources;
            cpu += running * res.cpu.as_ref().map_or(0, |c| c.or_zero());
            mem += running * res.memory.as_ref().map_or(0, |m| m.or_zero());
            n += running as usize;
        }
        (cpu, mem, n)
    }

    pub async fn workload_count(&self) -> usize {
        self.shared.registry.lock().await.len()
    }

    /// What telemetry reads of each container's cgroups (cgroup id, CPU time, memory), off
    /// the async threads.
    pub async fn cgroup_readings(
        &self,
        ids: Vec<String>,
    ) -> HashMap<String, crate::telemetry::CgroupReading> {
        let runtime = self.shared.runtime.clone();
        tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .map(|id| {
                    let v2 = runtime.v2_cgroup(&id);
                    let controls = runtime.controls(&id);
                    // Memory where its controller is: v2 on pure v2 hosts, else v1.
                    let memory = controls.v2.or(controls.v1_memory);
                    let reading = crate::telemetry::CgroupReading {
                        cgroup_id: v2.as_deref().and_then(crate::pressure::psi::cgroup_id),
                        cpu_usec: v2.as_deref().and_then(crate::telemetry::cpu_usec),
                        memory_bytes: memory.as_deref().and_then(crate::telemetry::memory_bytes),
                    };
                    (id, reading)
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }
}

/// The summary of the node's facts, its workloads' figures and the features it runs with.
fn summary(
    facts: Option<&NodeFacts>,
    requested: ResourceAmounts,
    allocations: ResourceAmounts,
    workloads: usize,
    containers: usize,
    images: Option<&ImageStore>,
) -> NodeSummary {
    let erofs = images.map(|s| s.erofs());
    let layered = images.is_some_and(|s| s.layered());
    let verity = images.map(|s| s.verity());
    let pressure = host::pressure();
    let capacity = facts.map(|f| f.capacity).unwrap_or_else(host::capacity);
    let telemetry = crate::telemetry::get();
    NodeSummary {
        name: host::hostname(),
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
            cgroup: host::cgroup_mode(),
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
        registration_problem: None,
        protection: None,
        prewarm: Vec::new(),
    }
}
