//! What a message asks of the actor: apply a spec (a rolling update or a recreate), scale,
//! restart, evict, delete; each turns into replicas to start, retire or stop.

use std::sync::atomic::Ordering;
use std::time::Duration;

use hyperbox_api::{ApplyAction, RollingUpdate, StrategyType, Workload};
use tokio::sync::oneshot;

use super::{grace_of, Actor};
use crate::fsutil::{now_unix_ms, remove_dir_all_if_exists};
use crate::workloads::record::{self};
use crate::workloads::replica::{Event, Replica, Stage};
use crate::workloads::rollout;

impl Actor {
    pub(super) async fn apply(
        &mut self,
        workload: Workload,
        hash: String,
        reply: oneshot::Sender<ApplyAction>,
    ) {
        if self.rec.deleting {
            // Cannot happen (the supervisor orders applies and deletes under one lock); if it
            // did, dropping the reply makes the apply fail instead of answering for a workload
            // about to disappear.
            tracing::error!(workload = %self.name, "apply reached a workload being deleted");
            drop(reply);
            return;
        }
        if hash == self.rec.spec_hash {
            // Same containers wanted. The replica count, priority and nodeSelector are not part
            // of the hash: a new count scales without touching the survivors, the rest (labels,
            // annotations such as the source revision) is recorded without a restart.
            let (have, want) = (
                self.rec.workload.desired_replicas(),
                workload.desired_replicas(),
            );
            let action = if workload == self.rec.workload {
                ApplyAction::Unchanged
            } else {
                self.dirty = true;
                if want == have {
                    ApplyAction::Unchanged
                } else {
                    ApplyAction::Configured
                }
            };
            let grace = grace_of(&self.rec.workload);
            if workload.spec != self.rec.workload.spec {
                self.rec.generation += 1;
            }
            self.rec.config_hash = hyperbox_api::config_hash(&workload);
            self.rec.workload = workload;
            if want != have {
                tracing::info!(workload = %self.name, from = have, to = want, "scaling");
                self.scale(want, grace);
            }
            self.apply_replies.push((reply, action));
            return;
        }
        let grace = grace_of(&self.rec.workload);
        let old = std::mem::take(&mut self.rec.replicas);
        let old_digest = self.rec.image_digest.clone();
        let rolling = workload.spec.strategy.kind == StrategyType::RollingUpdate;
        tracing::info!(workload = %self.name, strategy = ?workload.spec.strategy.kind, "spec changed, replacing containers");
        self.rec.config_hash = hyperbox_api::config_hash(&workload);
        self.rec.workload = workload;
        self.rec.spec_hash = hash;
        self.rec.generation += 1;
        self.rec.progress_ms = Some(now_unix_ms());
        self.begin_reconcile();
        self.policy = crate::workloads::policy_for(&self.shared.cfg, &self.rec.workload);
        self.prepared = None;
        let want = self.rec.workload.desired_replicas();
        self.rec.replicas = (0..want).map(|i| self.new_replica(i)).collect();
        if rolling {
            // Running replicas keep serving until their replacements are ready; the rest
            // stop now without holding anything up. One old replica per ordinal: of two (an
            // update during an update), the ready one stays.
            for r in old {
                let serving = matches!(r.stage, Stage::Running { .. }) && r.index < want;
                if !serving {
                    self.retire(false, r, grace);
                    continue;
                }
                match self.rec.outgoing.iter().position(|o| o.index == r.index) {
                    None => self.rec.outgoing.push(r),
                    Some(pos) if r.ready || !self.rec.outgoing[pos].ready => {
                        let older = std::mem::replace(&mut self.rec.outgoing[pos], r);
                        self.retire(false, older, grace);
                    }
                    Some(_) => self.retire(false, r, grace),
                }
            }
            self.retire_outgoing(|o| o.index >= want, grace);
            if let Some(d) = old_digest.filter(|_| !self.rec.outgoing.is_empty()) {
                if !self.rec.outgoing_digests.contains(&d) {
                    self.rec.outgoing_digests.push(d);
                }
            }
        } else {
            for r in old {
                self.retire(true, r, grace);
            }
            for r in std::mem::take(&mut self.rec.outgoing) {
                self.retire(true, r, grace);
            }
        }
        self.dirty = true;
        self.apply_replies.push((reply, ApplyAction::Configured));
    }

    pub(super) async fn begin_delete(&mut self) {
        self.rec.deleting = true;
        self.deleting.store(true, Ordering::SeqCst);
        // Durable before anything stops: from here on a restart finishes the delete.
        if let Err(e) = self.write_record(true).await {
            tracing::error!(workload = %self.name, error = %e, "persist delete");
        }
        let grace = grace_of(&self.rec.workload);
        for r in std::mem::take(&mut self.rec.replicas) {
            self.retire(true, r, grace);
        }
        for r in std::mem::take(&mut self.rec.outgoing) {
            self.retire(true, r, grace);
        }
        self.publish();
    }

    /// Replace replicas by new ones at the same ordinals: the old containers stop (grace
    /// period) before the new ones start, so an ordinal never runs twice. The restart count
    /// carries over and counts this restart.
    pub(super) fn restart(&mut self, replica: Option<u32>) -> bool {
        let targets: Vec<u32> = self
            .rec
            .replicas
            .iter()
            .map(|r| r.index)
            .filter(|i| replica.is_none_or(|n| n == *i))
            .collect();
        if targets.is_empty() {
            return false;
        }
        let grace = grace_of(&self.rec.workload);
        for index in targets {
            let pos = self
                .rec
                .replicas
                .iter()
                .position(|r| r.index == index)
                .expect("target replica");
            let old = self.rec.replicas.remove(pos);
            let mut fresh = self.new_replica(index);
            fresh.restarts = old.restarts + 1;
            tracing::info!(workload = %self.name, replica = index, "restart requested");
            self.rec.replicas.insert(pos, fresh);
            self.retire(true, old, grace);
        }
        self.dirty = true;
        true
    }

    pub(super) fn evict(&mut self, index: u32, reason: &str, pressure: bool) -> bool {
        let Some(pos) = self.rec.replicas.iter().position(|r| r.index == index) else {
            return false;
        };
        let grace = grace_of(&self.rec.workload);
        let old = self.rec.replicas.remove(pos);
        tracing::info!(workload = %self.name, replica = index, reason, pressure, "evicting");
        let kind = if pressure {
            crate::workloads::replica::Reason::EvictedForPressure
        } else {
            crate::workloads::replica::Reason::Evicted
        };
        let mut gone = Replica::evicted(index, old.restarts, kind, &format!("evicted: {reason}"));
        gone.slot = self.take_slot();
        self.rec.replicas.insert(pos, gone);
        self.retire(false, old, grace);
        self.retire_outgoing(|o| o.index == index, grace);
        self.dirty = true;
        true
    }

    /// Add or remove replicas at the top ordinals; survivors are not touched.
    pub(super) fn scale(&mut self, want: u32, grace: Duration) {
        let (keep, extra): (Vec<Replica>, Vec<Replica>) = std::mem::take(&mut self.rec.replicas)
            .into_iter()
            .partition(|r| r.index < want);
        self.rec.replicas = keep;
        for r in extra {
            self.retire(false, r, grace);
        }
        self.retire_outgoing(|o| o.index >= want, grace);
        for index in 0..want {
            if !self.rec.replicas.iter().any(|r| r.index == index) {
                let r = self.new_replica(index);
                self.rec.replicas.push(r);
            }
        }
        self.rec.replicas.sort_by_key(|r| r.index);
        self.dirty = true;
    }

    /// Stop the outgoing replicas that `pick` chooses (they hold nothing up).
    pub(super) fn retire_outgoing(&mut self, pick: impl Fn(&Replica) -> bool, grace: Duration) {
        let (gone, keep): (Vec<Replica>, Vec<Replica>) = std::mem::take(&mut self.rec.outgoing)
            .into_iter()
            .partition(|o| pick(o));
        self.rec.outgoing = keep;
        for r in gone {
            self.retire(false, r, grace);
        }
    }

    /// Done when no old replica is left and every current one is ready (or has finished
    /// for good: a completed job, an evicted replica).
    pub(super) fn rollout_complete(&self) -> bool {
        self.rec.outgoing.is_empty()
            && self
                .rec
                .replicas
                .iter()
                .all(|r| r.ready || r.stage == Stage::Finished)
    }

    pub(super) fn take_slot(&mut self) -> u64 {
        let s = self.next_slot;
        self.next_slot += 1;
        s
    }

    pub(super) fn new_replica(&mut self, index: u32) -> Replica {
        let mut r = Replica::new(index);
        r.slot = self.take_slot();
        r
    }

    /// Whether the replica in `slot` belongs to the current spec (not retiring).
    pub(super) fn is_current(&self, slot: u64) -> bool {
        self.rec.replicas.iter().any(|r| r.slot == slot)
    }

    pub(super) async fn finish_delete(&mut self) {
        let path = self.record_path();
        let logs = self.shared.logs_dir.join(record::stem(&self.name));
        let volumes = self.shared.volumes_dir.join(record::stem(&self.name));
        let name = self.name.clone();
        let r = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(dir) = path.parent() {
                crate::fsutil::fsync_path(dir)?;
            }
            remove_dir_all_if_exists(&logs)?;
            remove_dir_all_if_exists(&volumes)?;
            Ok(())
        })
        .await;
        if let Ok(Err(e)) | Err(e) = r.map_err(anyhow::Error::from) {
            tracing::error!(workload = %name, error = %format!("{e:#}"), "delete cleanup");
        }
        tracing::info!(workload = %name, "deleted");
        {
            let mut reg = self.shared.registry.lock().await;
            if reg.get(&self.name).is_some_and(|h| h.id == self.id) {
                reg.remove(&self.name);
            }
        }
        self.shared.bump();
        let _ = self.done.send(true);
        for r in self.delete_replies.drain(..) {
            let _ = r.send(());
        }
        // The image may have just become unused.
        self.shared.gc_kick.notify_one();
    }

    pub(super) fn retire(&mut self, older_spec: bool, mut r: Replica, grace: Duration) {
        if r.is_stopped() {
            return;
        }
        let actions = r.handle(Event::Stop { grace }, now_unix_ms(), &self.policy);
        let (slot, index) = (r.slot, r.index);
        if !r.is_stopped() {
            self.retiring.push((older_spec, r));
        }
        self.perform(slot, index, actions);
    }

    /// Start every replica of the current spec that has not started yet; during a rolling
    /// update, only those the rollout plan releases, and stop the old ones it retires.
    pub(super) fn start_idle(&mut self) {
        if !self.rec.outgoing.is_empty() {
            self.roll();
            return;
        }
        let idle: Vec<(u64, u32)> = self
            .rec
            .replicas
            .iter()
            .filter(|r| r.stage == Stage::Idle)
            .map(|r| (r.slot, r.index))
            .collect();
        for (slot, index) in idle {
            self.feed(slot, index, Event::Start);
        }
    }

    /// One step of a rolling update (see [`rollout::plan`]).
    pub(super) fn roll(&mut self) {
        let want = self.rec.workload.desired_replicas();
        let default = RollingUpdate::default();
        let params = self
            .rec
            .workload
            .spec
            .strategy
            .rolling_update
            .as_ref()
            .unwrap_or(&default);
        let bounds = rollout::Bounds::resolve(params, want);
        let slots: Vec<(Option<rollout::Old>, rollout::New)> = (0..want)
            .map(|i| {
                let old = self.rec.outgoing.iter().find(|r| r.index == i).map(|r| {
                    let stopping = matches!(r.stage, Stage::Stopping { .. });
                    rollout::Old {
                        ready: r.ready && !stopping,
                        stopping,
                    }
                });
                let new = self
                    .rec
                    .replicas
                    .iter()
                    .find(|r| r.index == i)
                    .map(|r| rollout::New {
                        started: r.stage != Stage::Idle,
                        ready: r.ready,
                    })
                    .unwrap_or_default();
                (old, new)
            })
            .collect();
        let step = rollout::plan(&slots, bounds);
        let grace = grace_of(&self.rec.workload);
        for i in step.stop {
            if let Some(slot) = self
                .rec
                .outgoing
                .iter()
                .find(|r| r.index == i)
                .map(|r| r.slot)
            {
                tracing::info!(workload = %self.name, replica = i, "rollout: stopping the old replica");
                self.feed(slot, i, Event::Stop { grace });
            }
        }
        for i in step.start {
            let slot = self
                .rec
                .replicas
                .iter()
                .find(|r| r.index == i && r.stage == Stage::Idle)
                .map(|r| r.slot);
            if let Some(slot) = slot {
                tracing::info!(workload = %self.name, replica = i, "rollout: starting the new replica");
                self.feed(slot, i, Event::Start);
            }
        }
    }
}
