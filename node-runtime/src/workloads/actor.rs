//! One actor per workload. It alone owns the workload's record, its replicas and its files:
//! applies, deletes and every report from its containers, probes and timers arrive as messages
//! and are handled one at a time, in order. Decisions are made by the pure replica state
//! machine; this loop only performs the actions it returns.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use hyperbox_api::{ApplyAction, RollingUpdate, StrategyType, Workload};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::record::{self, WorkloadRecord};
use super::replica::{Action, Event, ImageFailure, Policy, Replica, Stage};
use super::rollout;
use super::Shared;
use crate::containers::StartRequest;
use crate::containers::{ProcHandle, Started};
use crate::fsutil::{now_unix_ms, remove_dir_all_if_exists};
use crate::images::{ImageError, PreparedImage};

/// Longest grace period a stop allows before SIGKILL, whatever the spec says: the same cap
/// validation puts on the spec (a record written before the cap still obeys it).
pub const MAX_GRACE: Duration =
    Duration::from_secs(hyperbox_api::validate::MAX_TERMINATION_GRACE_PERIOD_SECONDS as u64);

pub(crate) enum Msg {
    Apply {
        workload: Box<Workload>,
        hash: String,
        /// The manager applying it (none: by hand, which keeps the current owner).
        manager: Option<String>,
        reply: oneshot::Sender<ApplyAction>,
    },
    Delete {
        reply: oneshot::Sender<()>,
    },
    /// Stop one replica and keep it stopped (Failed/Evicted, with the reason); false when
    /// there is no such replica.
    Evict {
        replica: u32,
        reason: String,
        /// By pressure protection (reason `EvictedForPressure`), not by a controller.
        pressure: bool,
        reply: oneshot::Sender<bool>,
    },
    /// Stop and start again one replica (or all); answers false when there is no such replica.
    Restart {
        replica: Option<u32>,
        reply: oneshot::Sender<bool>,
    },
    Replica {
        slot: u64,
        index: u32,
        event: Event,
    },
    ImageDone {
        slot: u64,
        index: u32,
        token: u64,
        result: Result<PreparedImage, ImageError>,
    },
    Created {
        slot: u64,
        index: u32,
        token: u64,
        container_id: String,
        result: Result<Started, String>,
    },
    Exited {
        slot: u64,
        index: u32,
        token: u64,
        container_id: String,
        code: Option<i32>,
        oom: bool,
    },
    /// Daemon shutdown: stop the actor, leave the containers running.
    Detach,
}

/// What the supervisor keeps of an actor.
#[derive(Clone)]
pub(crate) struct ActorHandle {
    pub id: u64,
    pub tx: mpsc::UnboundedSender<Msg>,
    /// The record as of the last change, for readers (status, list, digests).
    pub snapshot: Arc<StdMutex<Arc<WorkloadRecord>>>,
    pub deleting: Arc<AtomicBool>,
    /// Becomes true when the actor is gone (deleted or detached).
    pub done: watch::Receiver<bool>,
}

/// How an actor begins.
pub(crate) enum Begin {
    /// A new workload: write its record, answer the apply, start.
    New(oneshot::Sender<ApplyAction>),
    /// Loaded from the state dir after a restart: re-adopt or replace its containers.
    Recovered,
}

pub(crate) struct Actor {
    shared: Arc<Shared>,
    id: u64,
    /// The workload's key (`name`, or `namespace/name`; see [`hyperbox_api::key`]).
    name: String,
    rec: WorkloadRecord,
    /// Source of replica slots: every replica (of any spec) gets its own, and every report
    /// from its effects is addressed by it.
    next_slot: u64,
    /// Replicas being stopped; `true` for those of an older spec, which must be gone before the
    /// current spec's replicas start (Recreate). Scaled-down replicas do not hold anyone up.
    retiring: Vec<(bool, Replica)>,
    policy: Policy,
    prepared: Option<PreparedImage>,
    procs: HashMap<String, Arc<ProcHandle>>,
    probes: HashMap<u64, JoinHandle<()>>,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    snapshot: Arc<StdMutex<Arc<WorkloadRecord>>>,
    deleting: Arc<AtomicBool>,
    done: watch::Sender<bool>,
    apply_replies: Vec<(oneshot::Sender<ApplyAction>, ApplyAction)>,
    delete_replies: Vec<oneshot::Sender<()>>,
    dirty: bool,
    /// A spec change being rolled out: when it was applied, and its `workload.reconcile` span
    /// (closed once every replica runs it).
    reconciling: Option<(std::time::Instant, tracing::Span)>,
}

impl Actor {
    /// Start the actor task; the handle goes into the supervisor's registry.
    pub(crate) fn spawn(
        shared: Arc<Shared>,
        id: u64,
        mut rec: WorkloadRecord,
        begin: Begin,
    ) -> ActorHandle {
        rec.config_hash = hyperbox_api::config_hash(&rec.workload);
        let (tx, rx) = mpsc::unbounded_channel();
        let snapshot = Arc::new(StdMutex::new(Arc::new(rec.clone())));
        let deleting = Arc::new(AtomicBool::new(rec.deleting));
        let (done_tx, done_rx) = watch::channel(false);
        let handle = ActorHandle {
            id,
            tx: tx.clone(),
            snapshot: snapshot.clone(),
            deleting: deleting.clone(),
            done: done_rx,
        };
        let actor = Actor {
            policy: super::policy_for(&shared.cfg, &rec.workload),
            name: rec.workload.key(),
            shared,
            id,
            rec,
            next_slot: 1,
            retiring: Vec::new(),
            prepared: None,
            procs: HashMap::new(),
            probes: HashMap::new(),
            tx,
            rx,
            snapshot,
            deleting,
            done: done_tx,
            apply_replies: Vec::new(),
            delete_replies: Vec::new(),
            dirty: false,
            reconciling: None,
        };
        tokio::spawn(actor.run(begin));
        handle
    }

    async fn run(mut self, begin: Begin) {
        for i in 0..self.rec.replicas.len() {
            self.rec.replicas[i].slot = self.take_slot();
        }
        for i in 0..self.rec.outgoing.len() {
            self.rec.outgoing[i].slot = self.take_slot();
        }
        match begin {
            Begin::New(reply) => {
                self.dirty = true;
                self.apply_replies.push((reply, ApplyAction::Created));
                self.begin_reconcile();
                self.start_idle();
            }
            Begin::Recovered => self.recover().await,
        }
        self.settle().await;
        while let Some(msg) = self.rx.recv().await {
            match msg {
                Msg::Detach => {
                    for (_, p) in self.probes.drain() {
                        p.abort();
                    }
                    let _ = self.done.send(true);
                    return;
                }
                msg => self.handle(msg).await,
            }
            if self.settle().await {
                return;
            }
        }
    }

    /// After every message: move on when retiring replicas are gone, write the record if it
    /// changed, answer waiting clients. True when the actor is finished (deleted).
    async fn settle(&mut self) -> bool {
        self.retiring.retain(|(_, r)| !r.is_stopped());
        if self.rec.deleting {
            if self.retiring.is_empty() {
                self.finish_delete().await;
                return true;
            }
        } else if !self.retiring.iter().any(|(older_spec, _)| *older_spec) {
            self.start_idle();
        }
        if self.rec.outgoing.is_empty() && !self.rec.outgoing_digests.is_empty() {
            self.rec.outgoing_digests.clear();
            self.dirty = true;
            // The old image may have just become unused.
            self.shared.gc_kick.notify_one();
        }
        if self.rec.progress_ms.is_some() && self.rollout_complete() {
            tracing::info!(workload = %self.name, generation = self.rec.generation, "rollout complete");
            self.rec.progress_ms = None;
            self.dirty = true;
        }
        if self.dirty {
            self.persist().await;
        }
        for (reply, action) in self.apply_replies.drain(..) {
            let _ = reply.send(action);
        }
        false
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Apply {
                workload,
                hash,
                manager,
                reply,
            } => {
                if let Some(m) = manager {
                    if self.rec.manager.as_deref() != Some(m.as_str()) {
                        tracing::info!(workload = %self.name, manager = %m, previous = ?self.rec.manager, "manager set");
                        self.rec.manager = Some(m);
                        self.dirty = true;
                    }
                }
                self.apply(*workload, hash, reply).await
            }
            Msg::Delete { reply } => {
                self.delete_replies.push(reply);
                if !self.rec.deleting {
                    self.begin_delete().await;
                }
            }
            Msg::Replica { slot, index, event } => self.feed(slot, index, event),
            Msg::Evict {
                replica,
                reason,
                pressure,
                reply,
            } => {
                let found = !self.rec.deleting && self.evict(replica, &reason, pressure);
                if found {
                    // Before answering: the caller tells the digests' watchers next.
                    self.publish();
                }
                let _ = reply.send(found);
            }
            Msg::Restart { replica, reply } => {
                let found = !self.rec.deleting && self.restart(replica);
                if found {
                    self.publish();
                }
                let _ = reply.send(found);
            }
            Msg::ImageDone {
                slot,
                index,
                token,
                result,
            } => {
                let event = match result {
                    Ok(img) => {
                        if self.is_current(slot) {
                            self.rec.image_digest = Some(img.digest.clone());
                            self.rec.rootfs = Some(img.rootfs_kind.clone());
                            self.prepared = Some(img);
                        }
                        Event::ImageReady {
                            token,
                            container_id: format!(
                                "{}-{index}-{:08x}",
                                record::container_prefix(&record::stem(&self.name)),
                                rand::random::<u32>()
                            ),
                        }
                    }
                    Err(e) => {
                        tracing::warn!(workload = %self.name, replica = index, error = %e, "image not ready");
                        Event::ImageFailed {
                            token,
                            kind: match e {
                                ImageError::InvalidImage(_) => ImageFailure::Invalid,
                                ImageError::Pull(_) => ImageFailure::Pull,
                                ImageError::Prepare(_) => ImageFailure::Prepare,
                            },
                            message: e.to_string(),
                        }
                    }
                };
                self.feed(slot, index, event);
            }
            Msg::Created {
                slot,
                index,
                token,
                container_id,
                result,
            } => match result {
                Ok(started) => {
                    let expected = self.replica(slot).is_some_and(|r| {
                        matches!(&r.stage, Stage::Creating { container_id: c, .. } if *c == container_id)
                    });
                    if !expected {
                        // Nobody wants this container any more: it must not run unowned.
                        self.destroy_later(container_id);
                        return;
                    }
                    tracing::info!(workload = %self.name, replica = index, container = %container_id, pid = started.proc.pid, "container started");
                    self.procs.insert(container_id, Arc::new(started.proc));
                    self.feed(
                        slot,
                        index,
                        Event::Started {
                            token,
                            identity: started.identity,
                        },
                    );
                }
                Err(message) => {
                    tracing::warn!(workload = %self.name, replica = index, error = %message, "container failed to start");
                    self.feed(slot, index, Event::StartFailed { token, message });
                }
            },
            Msg::Exited {
                slot,
                index,
                token,
                container_id,
                code,
                oom,
            } => {
                self.procs.remove(&container_id);
                tracing::info!(workload = %self.name, replica = index, container = %container_id, exit_code = ?code, oom, "container exited");
                self.feed(slot, index, Event::Exited { token, code, oom });
            }
            Msg::Detach => {}
        }
    }

    async fn apply(
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
        self.policy = super::policy_for(&self.shared.cfg, &self.rec.workload);
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

    async fn begin_delete(&mut self) {
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
    fn restart(&mut self, replica: Option<u32>) -> bool {
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

    fn evict(&mut self, index: u32, reason: &str, pressure: bool) -> bool {
        let Some(pos) = self.rec.replicas.iter().position(|r| r.index == index) else {
            return false;
        };
        let grace = grace_of(&self.rec.workload);
        let old = self.rec.replicas.remove(pos);
        tracing::info!(workload = %self.name, replica = index, reason, pressure, "evicting");
        let kind = if pressure {
            super::replica::Reason::EvictedForPressure
        } else {
            super::replica::Reason::Evicted
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
    fn scale(&mut self, want: u32, grace: Duration) {
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
    fn retire_outgoing(&mut self, pick: impl Fn(&Replica) -> bool, grace: Duration) {
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
    fn rollout_complete(&self) -> bool {
        self.rec.outgoing.is_empty()
            && self
                .rec
                .replicas
                .iter()
                .all(|r| r.ready || r.stage == Stage::Finished)
    }

    fn take_slot(&mut self) -> u64 {
        let s = self.next_slot;
        self.next_slot += 1;
        s
    }

    fn new_replica(&mut self, index: u32) -> Replica {
        let mut r = Replica::new(index);
        r.slot = self.take_slot();
        r
    }

    /// Whether the replica in `slot` belongs to the current spec (not retiring).
    fn is_current(&self, slot: u64) -> bool {
        self.rec.replicas.iter().any(|r| r.slot == slot)
    }

    async fn finish_delete(&mut self) {
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

    fn retire(&mut self, older_spec: bool, mut r: Replica, grace: Duration) {
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
    fn start_idle(&mut self) {
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
    fn roll(&mut self) {
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

    fn replica(&mut self, slot: u64) -> Option<&mut Replica> {
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

    fn feed(&mut self, slot: u64, index: u32, event: Event) {
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

    fn perform(&mut self, slot: u64, index: u32, actions: Vec<Action>) {
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

    fn create(&mut self, slot: u64, index: u32, token: u64, container_id: String) {
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

    fn start_probe(&mut self, slot: u64, index: u32, token: u64, container_id: String) {
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
                let ok = super::probe::run(
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

    fn destroy_later(&self, container_id: String) {
        let runtime = self.shared.runtime.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = runtime.destroy(&container_id) {
                tracing::warn!(container = %container_id, error = %format!("{e:#}"), "cleanup of an unwanted container failed");
            }
        });
    }

    /// Re-adopt what still runs with a proven identity, clean up the rest, and resume.
    async fn recover(&mut self) {
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

    async fn destroy_now(&self, container_id: String) {
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

    fn record_path(&self) -> PathBuf {
        self.shared.records_dir.join(record::file_name(&self.name))
    }

    /// A spec to roll out: time it (and trace it) until every replica runs it.
    fn begin_reconcile(&mut self) {
        self.reconciling = Some((
            std::time::Instant::now(),
            tracing::info_span!("workload.reconcile", workload = %self.name, generation = self.rec.generation),
        ));
    }

    fn publish(&mut self) {
        if self.reconciling.is_some()
            && self.rec.outgoing.is_empty()
            && self.rec.replicas.iter().all(|r| {
                matches!(r.stage, Stage::Running { .. })
                    && (r.ready || self.rec.workload.spec.readiness_probe.is_none())
            })
        {
            if let Some((t0, _span)) = self.reconciling.take() {
                crate::telemetry::COUNTERS
                    .reconcile_seconds
                    .observe(t0.elapsed());
            }
        }
        *self.snapshot.lock().unwrap() = Arc::new(self.rec.clone());
        self.shared.bump();
    }

    /// Write the record (not fsynced: an apply is made durable by the supervisor; a lost
    /// replica update only means recovery finds an unreferenced container and removes it).
    async fn persist(&mut self) {
        self.dirty = false;
        if let Err(e) = self.write_record(false).await {
            tracing::error!(workload = %self.name, error = %e, "persist state");
        }
        self.publish();
    }

    /// Hand the record to the node's record writer and wait for it to be written (and
    /// fsynced, when `durable`).
    async fn write_record(&self, durable: bool) -> Result<(), String> {
        let data = serde_json::to_vec(&self.rec).map_err(|e| format!("serialize record: {e}"))?;
        self.shared
            .records
            .write(self.record_path(), data, durable)
            .await
    }
}

fn grace_of(w: &Workload) -> Duration {
    Duration::from_secs(w.spec.termination_grace_period_seconds.unwrap_or(10) as u64).min(MAX_GRACE)
}
