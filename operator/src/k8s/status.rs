//! The pure part of the Kubernetes controller: from where a Workload's replicas were placed and
//! what the nodes report, its status in kstatus terms. No I/O here.

use std::collections::BTreeMap;

use hyperbox_api::{Phase, Reason, WorkloadStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::crd::{KubeWorkloadStatus, ReplicaPlacement};

pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";

/// Replica reasons that do not clear without a change (a new spec, a new image, room on a
/// node): the workload is stalled, not progressing.
const STALLED_REASONS: &[Reason] = &[
    Reason::ImagePullBackOff,
    Reason::ErrImagePull,
    Reason::InvalidImage,
    Reason::ErrImagePrepare,
    Reason::CreateContainerError,
    Reason::CrashLoopBackOff,
    Reason::ProgressDeadlineExceeded,
];

/// What the controller knows about one Workload at the end of a reconcile.
#[derive(Debug, Clone, Default)]
pub struct Observation<'a> {
    pub generation: i64,
    /// Replicas the spec asks for (0 while suspended or on standby).
    pub desired: u32,
    pub suspended: bool,
    /// Where its replicas were placed: node → replicas there.
    pub counts: BTreeMap<String, u32>,
    /// What each of those nodes reports for it (none before the node's first answer, or
    /// when the node does not have it yet).
    pub reports: BTreeMap<String, Option<&'a WorkloadStatus>>,
    /// The spec hash of the desired spec: a node report with another one is not updated yet.
    pub spec_hash: String,
    /// Replicas that fit on no node, and why (the first reason counts).
    pub unplaced: Vec<(&'static str, String)>,
    /// Why the controller could not act (invalid spec, a node refused it or is unreachable,
    /// another manager owns it): (reason, message, stalled).
    pub problem: Option<(String, String, bool)>,
    /// Every node took the current spec (else the workload is not Ready, whatever the nodes
    /// report).
    pub applied: bool,
    pub previous: Option<&'a KubeWorkloadStatus>,
}

fn condition(
    kind: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: i64,
) -> Condition {
    Condition {
        type_: kind.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: Some(generation),
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

/// The status to write. Conditions keep their `lastTransitionTime` while their status does
/// not change, so an unchanged workload produces an identical status (no write, no flapping).
pub fn workload_status(o: &Observation) -> KubeWorkloadStatus {
    let mut s = KubeWorkloadStatus {
        placement: o.counts.clone(),
        // The generation this status describes: every reconcile that saw it says so, refusals
        // and failures included (the conditions say how it went). Left behind, kstatus and
        // Argo CD would read a refused spec as in progress forever.
        observed_generation: Some(o.generation),
        ..Default::default()
    };
    let mut complete = true;
    let mut stalled: Option<(String, String)> = None;
    let mut waiting: Option<String> = None;
    let mut succeeded = 0u32;
    let mut nodes = Vec::new();
    for (node, &n) in &o.counts {
        let report = o.reports.get(node).copied().flatten();
        let Some(r) = report else {
            if n > 0 || o.desired == 0 {
                complete = false;
                waiting.get_or_insert_with(|| format!("waiting for node {node} to report"));
            }
            continue;
        };
        if n > 0 {
            nodes.push(node.clone());
        }
        s.replicas += r.current_replicas;
        s.ready_replicas += r.ready_replicas;
        s.available_replicas += r.available_replicas;
        if r.spec_hash == o.spec_hash {
            s.updated_replicas += r.updated_replicas;
        }
        if r.spec_hash != o.spec_hash || r.desired_replicas != n || !r.rollout_complete() {
            complete = false;
        }
        for rep in &r.replicas {
            if rep.phase == Phase::Succeeded {
                succeeded += 1;
            }
            if let Some(reason) = rep.reason.as_ref() {
                if STALLED_REASONS.contains(reason) && stalled.is_none() {
                    stalled = Some((
                        reason.to_string(),
                        format!(
                            "replica {} on {node}: {}",
                            rep.index,
                            rep.message.clone().unwrap_or_else(|| reason.to_string())
                        ),
                    ));
                }
            }
            s.replica_statuses.push(ReplicaPlacement {
                node: node.clone(),
                index: rep.index,
                phase: format!("{:?}", rep.phase),
                ready: rep.ready,
                reason: rep.reason.as_ref().map(Reason::to_string),
                container_id: rep.container_id.clone(),
                image_digest: r.image_digest.clone(),
                restarts: rep.restarts,
                last_exit_code: rep.last_exit_code,
            });
        }
        if let Some(reason) = r.reason.as_ref() {
            if *reason == Reason::ProgressDeadlineExceeded && stalled.is_none() {
                stalled = Some((
                    reason.to_string(),
                    format!(
                        "on {node}: {}",
                        r.message.clone().unwrap_or_else(|| reason.to_string())
                    ),
                ));
            }
        }
    }
    s.ready = format!("{}/{}", s.ready_replicas, o.desired);
    s.nodes = nodes.join(",");
    // Jobs (restartPolicy Never/OnFailure) that ran to completion are done, not unready.
    let done = succeeded > 0 && succeeded == o.desired;
    if let Some((reason, message)) = o.unplaced.first() {
        let count = o.unplaced.len();
        stalled = Some((
            reason.to_string(),
            format!("{count} replica(s) fit on no node: {message}"),
        ));
    }
    if let Some((reason, message, true)) = &o.problem {
        stalled = Some((reason.clone(), message.clone()));
    }
    let g = o.generation;
    let mut conditions = Vec::new();
    if let Some((reason, message)) = stalled {
        conditions.push(condition(READY, false, &reason, message.clone(), g));
        conditions.push(condition(STALLED, true, &reason, message, g));
    } else if let Some((reason, message, false)) = &o.problem {
        conditions.push(condition(READY, false, reason, message.clone(), g));
        conditions.push(condition(RECONCILING, true, reason, message.clone(), g));
    } else if (complete && s.ready_replicas == o.desired && o.applied) || (done && o.applied) {
        let (reason, message) = if o.suspended {
            ("Suspended", "suspended: no replica runs".to_string())
        } else if done {
            ("Completed", format!("{succeeded} replica(s) completed"))
        } else {
            (
                "Available",
                format!("{} of {} replicas ready", s.ready_replicas, o.desired),
            )
        };
        conditions.push(condition(READY, true, reason, message, g));
    } else {
        let message = waiting.unwrap_or_else(|| {
            format!(
                "{} of {} replicas ready, {} updated",
                s.ready_replicas, o.desired, s.updated_replicas
            )
        });
        conditions.push(condition(READY, false, "Progressing", message.clone(), g));
        conditions.push(condition(RECONCILING, true, "Progressing", message, g));
    }
    // Keep the transition time of a condition whose status did not change.
    if let Some(prev) = o.previous {
        for c in &mut conditions {
            if let Some(p) = prev.conditions.iter().find(|p| p.type_ == c.type_) {
                if p.status == c.status {
                    c.last_transition_time = p.last_transition_time.clone();
                }
            }
        }
    }
    s.conditions = conditions;
    s
}

/// Whether two statuses say the same (the transition times aside): no write needed.
pub fn same_status(a: &KubeWorkloadStatus, b: &KubeWorkloadStatus) -> bool {
    let strip = |s: &KubeWorkloadStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

/// The condition of a type, if set.
pub fn find<'a>(s: &'a KubeWorkloadStatus, kind: &str) -> Option<&'a Condition> {
    s.conditions.iter().find(|c| c.type_ == kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperbox_api::ReplicaStatus;

    fn report(desired: u32, ready: u32, hash: &str) -> WorkloadStatus {
        WorkloadStatus {
            name: "w".into(),
            spec_hash: hash.into(),
            generation: 1,
            observed_generation: 1,
            desired_replicas: desired,
            current_replicas: desired,
            updated_replicas: desired,
            ready_replicas: ready,
            available_replicas: ready,
            image_digest: Some("sha256:abc".into()),
            replicas: (0..desired)
                .map(|i| ReplicaStatus {
                    index: i,
                    phase: Phase::Running,
                    ready: i < ready,
                    container_id: Some(format!("c{i}")),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn status_of(kind: &str, s: &KubeWorkloadStatus) -> (String, String) {
        let c = find(s, kind).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn all_replicas_ready_on_every_node_is_ready_at_this_generation() {
        let (a, b) = (report(2, 2, "h"), report(1, 1, "h"));
        let o = Observation {
            generation: 3,
            desired: 3,
            counts: BTreeMap::from([("n1".into(), 2), ("n2".into(), 1)]),
            reports: BTreeMap::from([("n1".into(), Some(&a)), ("n2".into(), Some(&b))]),
            spec_hash: "h".into(),
            applied: true,
            ..Default::default()
        };
        let s = workload_status(&o);
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(status_of(READY, &s), ("True".into(), "Available".into()));
        assert!(find(&s, RECONCILING).is_none() && find(&s, STALLED).is_none());
        assert_eq!(
            (s.replicas, s.ready_replicas, s.updated_replicas),
            (3, 3, 3)
        );
        assert_eq!(s.ready, "3/3");
        assert_eq!(s.nodes, "n1,n2");
        assert_eq!(s.replica_statuses.len(), 3);
        assert_eq!(s.replica_statuses[2].node, "n2");
        assert_eq!(
            s.replica_statuses[0].image_digest.as_deref(),
            Some("sha256:abc")
        );
    }

    #[test]
    fn an_old_spec_or_unready_replica_is_reconciling() {
        let a = report(2, 2, "old");
        let mut o = Observation {
            generation: 2,
            desired: 2,
            counts: BTreeMap::from([("n1".into(), 2)]),
            reports: BTreeMap::from([("n1".into(), Some(&a))]),
            spec_hash: "new".into(),
            applied: true,
            ..Default::default()
        };
        let s = workload_status(&o);
        assert_eq!(status_of(READY, &s), ("False".into(), "Progressing".into()));
        assert_eq!(status_of(RECONCILING, &s).0, "True");
        assert_eq!(s.updated_replicas, 0);
        // Not yet reported by the node at all.
        o.reports.insert("n1".into(), None);
        let s = workload_status(&o);
        assert!(find(&s, READY)
            .unwrap()
            .message
            .contains("waiting for node n1"));
    }

    #[test]
    fn unplaced_replicas_and_crash_loops_stall() {
        let a = report(1, 1, "h");
        let o = Observation {
            generation: 1,
            desired: 2,
            counts: BTreeMap::from([("n1".into(), 1)]),
            reports: BTreeMap::from([("n1".into(), Some(&a))]),
            spec_hash: "h".into(),
            unplaced: vec![("InsufficientMemory", "no node has 1Gi free".into())],
            applied: true,
            ..Default::default()
        };
        let s = workload_status(&o);
        assert_eq!(
            status_of(STALLED, &s),
            ("True".into(), "InsufficientMemory".into())
        );
        assert_eq!(status_of(READY, &s).0, "False");
        let mut crash = report(1, 0, "h");
        crash.replicas[0].reason = Some(Reason::CrashLoopBackOff);
        let o = Observation {
            generation: 1,
            desired: 1,
            counts: BTreeMap::from([("n1".into(), 1)]),
            reports: BTreeMap::from([("n1".into(), Some(&crash))]),
            spec_hash: "h".into(),
            applied: true,
            ..Default::default()
        };
        let s = workload_status(&o);
        assert_eq!(
            status_of(STALLED, &s),
            ("True".into(), "CrashLoopBackOff".into())
        );
    }

    #[test]
    fn an_unchanged_observation_keeps_its_transition_times() {
        let a = report(1, 1, "h");
        let mut o = Observation {
            generation: 1,
            desired: 1,
            counts: BTreeMap::from([("n1".into(), 1)]),
            reports: BTreeMap::from([("n1".into(), Some(&a))]),
            spec_hash: "h".into(),
            applied: true,
            ..Default::default()
        };
        let mut first = workload_status(&o);
        first.conditions[0].last_transition_time = Time("2026-01-01T00:00:00Z".parse().unwrap());
        o.previous = Some(&first);
        let second = workload_status(&o);
        assert_eq!(second, first);
        assert!(same_status(&second, &first));
        // Not applied (a node unreachable): the new generation is observed, and the status
        // says it is still being reconciled, and why.
        o.applied = false;
        o.generation = 2;
        o.problem = Some((
            "NodeUnreachable".into(),
            "n1: connection refused".into(),
            false,
        ));
        let third = workload_status(&o);
        assert_eq!(third.observed_generation, Some(2));
        assert_eq!(
            status_of(RECONCILING, &third),
            ("True".into(), "NodeUnreachable".into())
        );
    }

    #[test]
    fn suspended_and_completed_workloads_are_ready() {
        let mut a = report(0, 0, "h");
        a.replicas.clear();
        let o = Observation {
            generation: 1,
            desired: 0,
            suspended: true,
            counts: BTreeMap::from([("n1".into(), 0)]),
            reports: BTreeMap::from([("n1".into(), Some(&a))]),
            spec_hash: "h".into(),
            applied: true,
            ..Default::default()
        };
        assert_eq!(
            status_of(READY, &workload_status(&o)),
            ("True".into(), "Suspended".into())
        );
        let mut job = report(1, 0, "h");
        job.replicas[0].phase = Phase::Succeeded;
        job.available_replicas = 0;
        let o = Observation {
            generation: 1,
            desired: 1,
            counts: BTreeMap::from([("n1".into(), 1)]),
            reports: BTreeMap::from([("n1".into(), Some(&job))]),
            spec_hash: "h".into(),
            applied: true,
            ..Default::default()
        };
        assert_eq!(
            status_of(READY, &workload_status(&o)),
            ("True".into(), "Completed".into())
        );
    }
}
