//! One actor per workload. It alone owns the workload's record, its replicas and its files:
//! applies, deletes and every report from its containers, probes and timers arrive as messages
//! and are handled one at a time, in order. Decisions are made by the pure replica state
//! machine; this loop only performs the actions it returns.
//!
//! Here: the messages, the loop and the record it publishes and persists. What a message asks
//! (apply, scale, restart, evict, delete, the rollout) is in `commands`; carrying out the
//! state machine's actions, and re-adoption after a restart, in `effects`.

mod commands;
mod effects;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use hyperbox_api::{ApplyAction, Workload};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::record::{self, WorkloadRecord};
use super::replica::{Event, ImageFailure, Policy, Replica, Stage};
use super::Shared;
use crate::containers::{ProcHandle, Started};
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
