//! The actor's effects: feeding events to a replica's state machine and carrying out the
//! actions it returns (prepare the image, create the container, probe, stop, destroy), and
//! re-adopting containers after a daemon restart.

use std::sync::Arc;
use std::time::Duration;

use super::{grace_of, Actor, Msg};
use crate::containers::StartRequest;
use crate::fsutil::now_unix_ms;
use crate::workloads::replica::{Action, Event, Replica, Stage};

impl Actor {
    pub(super) fn replica(&mut self, slot: u64) -> Option<&mut Replica> {
        if let Some(r) = self.rec.replicas.iter_mut().find(|r| r.slot == slot) {
            return Some(r);
        }
        if let Some(r) = self.rec.outgoing.iter_mut().find(|r| r.slot == slot) {
            return Some(r);
        }
        self.retiring
            .iter_mut()
            .find(|(_, r)| r.slot == slot)
            .map(|(_, r)| r)
    }

    pub(super) fn feed(&mut self, slot: u64, index: u32, event: Event) {
        let policy = self.policy.clone();
        let outgoing = self.rec.outgoing.iter().any(|r| r.slot == slot);
        let now = now_unix_ms();
        let Some(r) = self.replica(slot) else {
            return;
        };
        let was_ready = r.ready;
        let mut actions = r.handle(event, now, &policy);
        let (ready, serving) = (
            r.ready,
            matches!(r.stage, Stage::Running { .. } | Stage::Stopping { .. }),
        );
        if outgoing {
            // An old replica is never started again: once it leaves its container (exited,
            // lost, stopped) its ordinal is free for the new spec.
            actions.retain(|a| {
                !matches!(
                    a,
                    Action::PrepareImage { .. } | Action::CreateContainer { .. }
                )
            });
            if !serving {
                self.rec.outgoing.retain(|r| r.slot != slot);
                self.dirty = true;
            }
        } else if ready && !was_ready && self.rec.progress_ms.is_some() {
            self.rec.progress_ms = Some(now);
            self.dirty = true;
        }
        self.perform(slot, index, actions);
    }

    pub(super) fn perform(&mut self, slot: u64, index: u32, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Persist => self.dirty = true,
                Action::PrepareImage { token } => {
                    let images = self.shared.images.clone();
                    let image = self.rec.workload.spec.image.clone();
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let result = images.prepare(image).await;
                        let _ = tx.send(Msg::ImageDone {
                            slot,
                            index,
                            token,
                            result,
                        });
                    });
                }
                Action::CreateContainer {
                    token,
                    container_id,
                } => self.create(slot, index, token, container_id),
                Action::WatchExit {
                    token,
                    container_id,
                } => {
                    let Some(proc) = self.procs.get(&container_id).cloned() else {
                        tracing::error!(container = %container_id, "no process handle to watch");
                        continue;
                    };
                    let runtime = self.shared.runtime.clone();
                    let tx = self.tx.clone();
                    // A plain thread: it blocks for the container's whole life, and a node
                    // with many containers must not exhaust the blocking pool.
                    let spawned = std::thread::Builder::new()
                        .name("hb-exit".into())
                        .spawn(move || {
                            let code = runtime.wait(&proc);
                            let oom = runtime.oom_kills(&container_id) > 0;
                            if let Err(e) = runtime.destroy(&container_id) {
                                tracing::warn!(container = %container_id, error = %format!("{e:#}"), "cleanup after exit failed");
                            }
                            let _ = tx.send(Msg::Exited {
                                slot,
                                index,
                                token,
                                container_id,
                                code,
                                oom,
                            });
                        });
                    if let Err(e) = spawned {
                        tracing::error!(error = %e, "spawn exit watcher");
                    }
                }
                Action::StartProbe {
                    token,
                    container_id,
                } => self.start_probe(slot, index, token, container_id),
                Action::StopProbe => {
                    if let Some(p) = self.probes.remove(&slot) {
                        p.abort();
                    }
                }
                Action::Schedule { token, after } => {
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = tx.send(Msg::Replica {
                            slot,
                            index,
                            event: Event::TimerFired { token },
                        });
                    });
                }
                Action::Terminate { container_id } => {
                    tracing::info!(workload = %self.name, container = %container_id, "stopping container");
                    if let Some(p) = self.procs.get(&container_id) {
                        self.shared.runtime.signal(&container_id, p, libc::SIGTERM);
                    }
                }
                Action::KillAll { container_id } => {
                    tracing::info!(container = %container_id, "grace period over, sending SIGKILL");
                    let runtime = self.shared.runtime.clone();
                    tokio::task::spawn_blocking(move || runtime.kill_all(&container_id));
                }
            }
        }
    }

    pub(super) fn create(&mut self, slot: u64, index: u32, token: u64, container_id: String) {
        let tx = self.tx.clone();
        let Some(image) = self.prepared.clone().filter(|_| self.is_current(slot)) else {
            let _ = tx.send(Msg::Created {
                slot,
                index,
                token,
                container_id,
                result: Err("no prepared image for this spec".into()),
            });
            return;
        };
        let runtime = self.shared.runtime.clone();
        let workload = self.rec.workload.clone();
        let log_file = self.shared.log_path(&self.name, index);
        // A creation that never returns (the kernel or libcontainer stuck) cannot be cancelled
        // from here; at least say so, with the container, instead of staying silent.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let (name, id) = (self.name.clone(), container_id.clone());
        tokio::spawn(async move {
            if tokio::time::timeout(Duration::from_secs(30), done_rx)
                .await
                .is_err()
            {
                tracing::warn!(workload = %name, replica = index, container = %id, "container creation has taken over 30s");
            }
        });
        tokio::task::spawn_blocking(move || {
            let _done = done_tx;
            if let Some(parent) = log_file.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let result = runtime
                .start(&StartRequest {
                    id: &container_id,
                    workload: &workload,
                    replica: index,
                    image: &image,
                    log_file: &log_file,
                })
                .map_err(|e| format!("{e:#}"));
            let _ = tx.send(Msg::Created {
                slot,
                index,
                token,
                container_id,
                result,
            });
        });
    }

    pub(super) fn start_probe(&mut self, slot: u64, index: u32, token: u64, container_id: String) {
        let Some(probe) = self.rec.workload.spec.readiness_probe.clone() else {
            return;
        };
        let Some(proc) = self.procs.get(&container_id).cloned() else {
            return;
        };
        let runtime = self.shared.runtime.clone();
        let slots = self.shared.probe_slots.clone();
        let tx = self.tx.clone();
        let task = tokio::spawn(async move {
            let period = Duration::from_secs_f64(probe.period_seconds.unwrap_or(10.0).max(0.05));
            let timeout = Duration::from_secs_f64(probe.timeout_seconds.unwrap_or(1.0).max(0.05));
            tokio::time::sleep(Duration::from_secs(
                probe.initial_delay_seconds.unwrap_or(0) as u64,
            ))
            .await;
            loop {
                let ok = crate::workloads::probe::run(
                    runtime.clone(),
                    slots.clone(),
                    &container_id,
                    proc.clone(),
                    &probe,
                    timeout,
                )
                .await;
                crate::telemetry::COUNTERS.probes.record(ok);
                if tx
                    .send(Msg::Replica {
                        slot,
                        index,
                        event: Event::Probe { token, ok },
                    })
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(period).await;
            }
        });
        if let Some(old) = self.probes.insert(slot, task) {
            old.abort();
        }
    }

    pub(super) fn destroy_later(&self, container_id: String) {
        let runtime = self.shared.runtime.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = runtime.destroy(&container_id) {
                tracing::warn!(container = %container_id, error = %format!("{e:#}"), "cleanup of an unwanted container failed");
            }
        });
    }

    /// Re-adopt what still runs with a proven identity, clean up the rest, and resume.
    pub(super) async fn recover(&mut self) {
        let grace = grace_of(&self.rec.workload);
        let (mut adopted, mut replaced) = (0, 0);
        // Current replicas, then the old ones of an interrupted rolling update (adopted the
        // same way; those that cannot be are dropped, and the rollout goes on).
        let targets: Vec<u64> = self
            .rec
            .replicas
            .iter()
            .chain(self.rec.outgoing.iter())
            .map(|r| r.slot)
            .collect();
        for slot in targets {
            let Some(r) = self.replica(slot) else {
                continue;
            };
            let old = std::mem::replace(&mut r.stage, Stage::Idle);
            let index = r.index;
            let (container_id, identity, started_at_ms, was_stopping) = match old {
                Stage::Running {
                    container_id,
                    identity,
                    started_at_ms,
                } => (container_id, identity, started_at_ms, false),
                Stage::Stopping {
                    container_id,
                    identity,
                    ..
                } => (container_id, identity, now_unix_ms(), true),
                Stage::Creating { container_id, .. } => {
                    // Half-created when the daemon died: never started, so not a restart.
                    self.destroy_now(container_id).await;
                    continue;
                }
                Stage::Finished => {
                    if let Some(r) = self.replica(slot) {
                        r.stage = Stage::Finished;
                    }
                    continue;
                }
                _ => continue,
            };
            let runtime = self.shared.runtime.clone();
            let (id2, ident2) = (container_id.clone(), identity.clone());
            let verdict = tokio::task::spawn_blocking(move || runtime.adopt(&id2, &ident2))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            match verdict {
                Ok(proc) => {
                    tracing::info!(workload = %self.name, replica = index, container = %container_id, pid = identity.pid, "re-adopted running container");
                    self.procs.insert(container_id.clone(), Arc::new(proc));
                    self.feed(
                        slot,
                        index,
                        Event::Adopted {
                            container_id,
                            identity,
                            started_at_ms,
                        },
                    );
                    if was_stopping {
                        self.feed(slot, index, Event::Stop { grace });
                    }
                    adopted += 1;
                }
                Err(why) => {
                    // Never signalled: whatever holds that pid now is not proven to be ours.
                    tracing::warn!(workload = %self.name, replica = index, container = %container_id, pid = identity.pid, reason = %why, "not adopting container, starting the replica again");
                    self.destroy_now(container_id).await;
                    self.feed(slot, index, Event::Lost);
                    replaced += 1;
                }
            }
        }
        // Old replicas with no container left have nothing to serve.
        let before = self.rec.outgoing.len();
        self.rec
            .outgoing
            .retain(|r| matches!(r.stage, Stage::Running { .. } | Stage::Stopping { .. }));
        self.dirty |= self.rec.outgoing.len() != before;
        // The record always matches its spec, but be lenient with a hand-edited one.
        let want = self.rec.workload.desired_replicas();
        if self.rec.replicas.len() != want as usize
            || self.rec.replicas.iter().any(|r| r.index >= want)
        {
            self.scale(want, grace);
        }
        if self.rec.deleting {
            for r in std::mem::take(&mut self.rec.replicas) {
                self.retire(true, r, grace);
            }
            for r in std::mem::take(&mut self.rec.outgoing) {
                self.retire(true, r, grace);
            }
        }
        tracing::info!(workload = %self.name, adopted, replaced, "recovered workload");
        self.publish();
    }

    pub(super) async fn destroy_now(&self, container_id: String) {
        let runtime = self.shared.runtime.clone();
        let r = tokio::task::spawn_blocking(move || {
            runtime
                .destroy(&container_id)
                .map_err(|e| format!("{container_id}: {e:#}"))
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "cleanup of a dead container failed");
        }
    }
}
