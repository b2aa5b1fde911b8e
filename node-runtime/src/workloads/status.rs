//! What a workload reports (`GET /v1/workloads`): its status rendered from the actor's last
//! published record, or the report of a record that could not be read.

use hyperbox_api::{Phase, Reason, ReplicaStatus, WorkloadStatus, REVISION_ANNOTATION};

use super::record::{self, Quarantined, WorkloadRecord};
use super::replica::{self, Stage};
use super::Supervisor;
use crate::fsutil::format_rfc3339;

impl Supervisor {
    pub async fn status(&self, name: &str) -> Option<WorkloadStatus> {
        match self.snapshot(name).await {
            Some(rec) => Some(self.render(&rec)),
            None => self
                .quarantined
                .lock()
                .unwrap()
                .get(&record::stem(name))
                .map(|q| self.render_quarantined(q)),
        }
    }

    pub async fn list(&self) -> Vec<WorkloadStatus> {
        let mut out: Vec<WorkloadStatus> = self
            .snapshots()
            .await
            .iter()
            .map(|r| self.render(r))
            .collect();
        let q: Vec<WorkloadStatus> = self
            .quarantined
            .lock()
            .unwrap()
            .values()
            .map(|q| self.render_quarantined(q))
            .collect();
        out.extend(q);
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    fn render_quarantined(&self, q: &Quarantined) -> WorkloadStatus {
        let key = record::key_of_stem(&q.name);
        let (namespace, name) = hyperbox_api::split_key(&key);
        let (namespace, name) = (namespace.to_string(), name.to_string());
        WorkloadStatus {
            name,
            namespace,
            phase: Phase::Unknown,
            reason: Some(Reason::RecordUnreadable),
            message: Some(format!(
                "the node's record of this workload could not be read ({}); it was moved to {} and its containers were left running; apply or delete the workload to resolve",
                q.error,
                q.moved_to.display()
            )),
            resource_version: self.version(),
            ..Default::default()
        }
    }

    fn render(&self, rec: &WorkloadRecord) -> WorkloadStatus {
        let w = &rec.workload;
        let replica_status = |r: &replica::Replica, outdated: bool| {
            let (pressure, pressure_trend, cgroup_id) = match r.container_id() {
                Some(c) if matches!(r.stage, Stage::Running { .. }) => self.pressure_of(c),
                _ => (None, None, None),
            };
            let throttled = r.container_id().is_some_and(|c| self.is_throttled(c));
            ReplicaStatus {
                index: r.index,
                phase: r.phase,
                reason: r.reason.clone(),
                message: r.message.clone(),
                ready: r.ready,
                restarts: r.restarts,
                last_exit_code: r.last_exit_code,
                container_id: r.container_id().map(str::to_string),
                pid: r.pid(),
                started_at: r.started_at_ms().map(|ms| format_rfc3339(ms / 1000)),
                outdated,
                pressure,
                pressure_trend,
                cgroup_id,
                throttled,
            }
        };
        let replicas: Vec<ReplicaStatus> = rec
            .replicas
            .iter()
            .map(|r| replica_status(r, false))
            .collect();
        let outdated: Vec<ReplicaStatus> = rec
            .outgoing
            .iter()
            .map(|r| replica_status(r, true))
            .collect();
        let phase = if w.spec.suspend || w.spec.standby || replicas.is_empty() {
            Phase::Pending
        } else if replicas.iter().any(|r| r.phase == Phase::Failed) {
            Phase::Failed
        } else if replicas.iter().any(|r| r.phase == Phase::Pending) {
            Phase::Pending
        } else if replicas.iter().all(|r| r.phase == Phase::Succeeded) {
            Phase::Succeeded
        } else if replicas.iter().any(|r| r.phase == Phase::Unknown) {
            Phase::Unknown
        } else {
            Phase::Running
        };
        // The replica most in need of attention speaks for the workload.
        let lead = replicas
            .iter()
            .find(|r| !r.ready && r.reason.is_some())
            .or_else(|| replicas.iter().find(|r| r.reason.is_some()))
            .or(replicas.first());
        let deadline_s = w
            .spec
            .progress_deadline_seconds
            .unwrap_or(hyperbox_api::DEFAULT_PROGRESS_DEADLINE_SECONDS);
        let stalled_for_s = rec
            .progress_ms
            .map(|p| crate::fsutil::now_unix_ms().saturating_sub(p) / 1000)
            .filter(|s| *s >= deadline_s as u64);
        let (reason, message) = if rec.deleting {
            (
                Some(Reason::Terminating),
                Some("the workload is being deleted".to_string()),
            )
        } else if w.spec.suspend {
            (
                Some(Reason::Suspended),
                Some("spec.suspend is true".to_string()),
            )
        } else if w.spec.standby {
            (
                Some(Reason::Standby),
                Some(
                    "spec.standby is true: no replica runs; the image is kept ready while the node is calm"
                        .to_string(),
                ),
            )
        } else if let Some(s) = stalled_for_s {
            let ready_new = replicas.iter().filter(|r| r.ready).count();
            let lead_reason = lead
                .and_then(|r| r.reason.clone())
                .map(|r| format!(" (replica {}: {r})", lead.map(|l| l.index).unwrap_or(0)))
                .unwrap_or_default();
            (
                Some(Reason::ProgressDeadlineExceeded),
                Some(format!(
                    "no progress for {s}s (progressDeadlineSeconds {deadline_s}): {ready_new} of {} replicas of generation {} ready{lead_reason}; {} old replicas keep serving",
                    replicas.len(),
                    rec.generation,
                    outdated.len()
                )),
            )
        } else {
            (
                lead.and_then(|r| r.reason.clone()),
                lead.and_then(|r| r.message.clone()),
            )
        };
        let ready_all = replicas.iter().chain(&outdated).filter(|r| r.ready).count() as u32;
        let pulling = replicas
            .iter()
            .any(|r| r.reason == Some(Reason::ContainerCreating));
        WorkloadStatus {
            name: w.metadata.name.clone(),
            namespace: w.metadata.namespace().to_string(),
            phase,
            reason,
            message,
            ready: !w.spec.suspend
                && !w.spec.standby
                && !replicas.is_empty()
                && replicas.len() == w.spec.replicas as usize
                && replicas.iter().all(|r| r.ready)
                && outdated.is_empty(),
            restarts: replicas.iter().map(|r| r.restarts).sum(),
            last_exit_code: lead.and_then(|r| r.last_exit_code),
            image: w.spec.image.clone(),
            image_digest: rec.image_digest.clone(),
            container_id: lead.and_then(|r| r.container_id.clone()),
            revision: w.metadata.annotations.get(REVISION_ANNOTATION).cloned(),
            spec_hash: rec.spec_hash.clone(),
            resource_version: self.version(),
            rootfs: rec.rootfs.clone(),
            pull: if pulling {
                self.shared.images.progress_of(&w.spec.image)
            } else {
                None
            },
            suspended: w.spec.suspend,
            manager: rec.manager.clone(),
            generation: rec.generation,
            observed_generation: rec.generation,
            desired_replicas: w.desired_replicas(),
            current_replicas: (rec
                .replicas
                .iter()
                .filter(|r| r.container_id().is_some())
                .count()
                + rec.outgoing.len()) as u32,
            updated_replicas: rec
                .replicas
                .iter()
                .filter(|r| r.stage != Stage::Idle)
                .count() as u32,
            ready_replicas: ready_all,
            available_replicas: ready_all,
            replicas: replicas.into_iter().chain(outdated).collect(),
        }
    }
}
