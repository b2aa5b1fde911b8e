//! The life of one replica as a pure state machine: events in, actions out.
//!
//! Nothing here touches the kernel, the clock or the disk. The workload actor feeds it what
//! happened (an image became ready, a container started or exited, a probe answered, a timer
//! fired, someone asked it to stop) together with the current time, and performs the actions it
//! returns. Every effect that will later report back carries the replica's `token`; a report
//! with a stale token (from an attempt that was superseded) is ignored, so late results can
//! never move a replica backwards.
//!
//! Longer than 600 lines on purpose: one state machine, its vocabulary (reasons, stages,
//! events, actions) beside the transitions that use it; its tests are in `replica_tests.rs`.

use std::time::Duration;

use hyperbox_api::{Phase, RestartPolicy};
use serde::{Deserialize, Serialize};

use crate::containers::ProcIdentity;

/// Why a replica is in its phase: the wire's vocabulary (see [`hyperbox_api::Reason`]).
pub use hyperbox_api::Reason;

/// How an image preparation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFailure {
    /// The reference or the image itself is unusable: retrying will not help soon.
    Invalid,
    Pull,
    Prepare,
}

/// Where the replica is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "camelCase")]
pub enum Stage {
    /// Wants a container; nothing in flight.
    Idle,
    /// Waiting for its image.
    Preparing,
    /// A container is being created under this id.
    #[serde(rename_all = "camelCase")]
    Creating {
        container_id: String,
        /// A stop arrived meanwhile: stop the container as soon as it exists.
        stop_grace_ms: Option<u64>,
    },
    #[serde(rename_all = "camelCase")]
    Running {
        container_id: String,
        identity: ProcIdentity,
        started_at_ms: u64,
    },
    /// Waiting before the next attempt.
    #[serde(rename_all = "camelCase")]
    BackOff { until_ms: u64 },
    /// SIGTERM sent; SIGKILL follows when the grace period ends.
    #[serde(rename_all = "camelCase")]
    Stopping {
        container_id: String,
        identity: ProcIdentity,
        killed: bool,
    },
    /// Done for good under its restart policy (Succeeded or Failed).
    Finished,
    /// Stopped on request; the container is gone.
    Stopped,
}

/// What the replica wants done. The actor performs these; results come back as events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Make the image ready, then report `ImageReady` or `ImageFailed`.
    PrepareImage {
        token: u64,
    },
    /// Create and start a container with this id, then report `Started` or `StartFailed`.
    CreateContainer {
        token: u64,
        container_id: String,
    },
    /// Report `Exited` when the container's init is gone (and cleaned up).
    WatchExit {
        token: u64,
        container_id: String,
    },
    StartProbe {
        token: u64,
        container_id: String,
    },
    StopProbe,
    /// Report `TimerFired` after this long.
    Schedule {
        token: u64,
        after: Duration,
    },
    /// Graceful stop request to the container's init.
    Terminate {
        container_id: String,
    },
    /// SIGKILL every process of the container.
    KillAll {
        container_id: String,
    },
    /// The record changed in a way worth writing down.
    Persist,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Begin (or resume) trying to run a container.
    Start,
    /// The image is ready; `container_id` is the fresh id the next container will get.
    ImageReady {
        token: u64,
        container_id: String,
    },
    ImageFailed {
        token: u64,
        kind: ImageFailure,
        message: String,
    },
    Started {
        token: u64,
        identity: ProcIdentity,
    },
    StartFailed {
        token: u64,
        message: String,
    },
    /// The container's init exited; `code` is unknown for containers adopted after a restart.
    Exited {
        token: u64,
        code: Option<i32>,
        oom: bool,
    },
    Probe {
        token: u64,
        ok: bool,
    },
    TimerFired {
        token: u64,
    },
    /// Stop the container, if any, allowing this long before SIGKILL.
    Stop {
        grace: Duration,
    },
    /// Found running after a daemon restart, with its identity proven.
    Adopted {
        container_id: String,
        identity: ProcIdentity,
        started_at_ms: u64,
    },
    /// The container died (or could not be proven to be ours) while the daemon was away.
    Lost,
}

/// The parts of the workload spec and node configuration the state machine needs.
#[derive(Debug, Clone)]
pub struct Policy {
    pub restart: RestartPolicy,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A container that ran this long resets the backoff.
    pub backoff_reset_after: Duration,
    pub has_probe: bool,
    pub success_threshold: u32,
    pub failure_threshold: u32,
    pub image: String,
}

impl Policy {
    /// `failures` counts from 0 here (the first restart waits `backoff_base`).
    fn backoff(&self, failures: u32) -> Duration {
        hyperbox_api::backoff::Backoff::new(self.backoff_base, self.backoff_max)
            .after(failures.saturating_add(1))
    }
}

/// After SIGKILL, how long to wait for the exit before giving up on the container.
pub const KILL_WAIT: Duration = Duration::from_secs(10);

/// One replica's state, as the record stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Replica {
    pub index: u32,
    #[serde(flatten)]
    pub stage: Stage,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub last_exit_code: Option<i32>,
    /// Failures since the last long-enough run (drives the backoff).
    #[serde(default)]
    pub failures: u32,
    #[serde(default)]
    pub token: u64,
    /// The actor's address for this replica's reports (in memory only; not part of the state
    /// machine).
    #[serde(default, skip)]
    pub slot: u64,
    #[serde(default, skip)]
    probe_ok_run: u32,
    #[serde(default, skip)]
    probe_fail_run: u32,
}

impl Replica {
    pub fn new(index: u32) -> Replica {
        Replica {
            index,
            stage: Stage::Idle,
            phase: Phase::Pending,
            reason: None,
            message: None,
            ready: false,
            restarts: 0,
            last_exit_code: None,
            failures: 0,
            token: 0,
            slot: 0,
            probe_ok_run: 0,
            probe_fail_run: 0,
        }
    }

    /// A replica that was evicted: finished (Failed/Evicted) with the reason given, so that
    /// neither the restart policy nor recovery starts it again.
    pub fn evicted(index: u32, restarts: u32, reason: Reason, why: &str) -> Replica {
        let mut r = Replica::new(index);
        r.stage = Stage::Finished;
        r.restarts = restarts;
        r.set(Phase::Failed, Some(reason), Some(why.to_string()));
        r
    }

    /// The container this replica currently owns, if any.
    pub fn container_id(&self) -> Option<&str> {
        match &self.stage {
            Stage::Creating { container_id, .. }
            | Stage::Running { container_id, .. }
            | Stage::Stopping { container_id, .. } => Some(container_id),
            _ => None,
        }
    }

    pub fn identity(&self) -> Option<&ProcIdentity> {
        match &self.stage {
            Stage::Running { identity, .. } | Stage::Stopping { identity, .. } => Some(identity),
            _ => None,
        }
    }

    pub fn pid(&self) -> Option<i32> {
        self.identity().map(|i| i.pid)
    }

    pub fn started_at_ms(&self) -> Option<u64> {
        match &self.stage {
            Stage::Running { started_at_ms, .. } => Some(*started_at_ms),
            _ => None,
        }
    }

    /// True once a stop request has fully completed.
    pub fn is_stopped(&self) -> bool {
        self.stage == Stage::Stopped
    }

    fn next_token(&mut self) -> u64 {
        self.token += 1;
        self.token
    }

    fn set(&mut self, phase: Phase, reason: Option<Reason>, message: Option<String>) {
        self.phase = phase;
        self.reason = reason;
        self.message = message;
    }

    /// Apply one event at time `now_ms` (unix milliseconds); returns what to do.
    pub fn handle(&mut self, event: Event, now_ms: u64, policy: &Policy) -> Vec<Action> {
        // Reports from superseded attempts are dropped here, once, for every event kind.
        if let Some(t) = event_token(&event) {
            if t != self.token {
                return Vec::new();
            }
        }
        match (std::mem::replace(&mut self.stage, Stage::Idle), event) {
            (Stage::Idle, Event::Start) => self.prepare(policy),
            (
                Stage::Idle,
                Event::Adopted {
                    container_id,
                    identity,
                    started_at_ms,
                },
            ) => self.running(container_id, identity, started_at_ms, policy, true),
            (Stage::Idle, Event::Lost) => {
                self.ready = false;
                self.last_exit_code = None;
                if policy.restart == RestartPolicy::Never {
                    self.stage = Stage::Finished;
                    self.set(
                        Phase::Failed,
                        Some(Reason::Unknown),
                        Some(
                            "the container exited while the daemon was down; its exit code is unknown"
                                .into(),
                        ),
                    );
                    vec![Action::Persist]
                } else {
                    // Restarted at once: whatever backoff it had is lost with the daemon.
                    self.restarts += 1;
                    self.prepare(policy)
                }
            }
            (Stage::Preparing, Event::ImageReady { container_id, .. }) => {
                let token = self.next_token();
                self.stage = Stage::Creating {
                    container_id: container_id.clone(),
                    stop_grace_ms: None,
                };
                // Persisted before the create, so a crash mid-create leaves a trace to clean.
                vec![
                    Action::Persist,
                    Action::CreateContainer {
                        token,
                        container_id,
                    },
                ]
            }
            (Stage::Preparing, Event::ImageFailed { kind, message, .. }) => {
                let reason = match kind {
                    ImageFailure::Invalid => Reason::InvalidImage,
                    _ if self.failures > 0 => Reason::ImagePullBackOff,
                    ImageFailure::Pull => Reason::ErrImagePull,
                    ImageFailure::Prepare => Reason::ErrImagePrepare,
                };
                self.set(Phase::Pending, Some(reason), Some(message));
                self.back_off(now_ms, policy)
            }
            (
                Stage::Creating {
                    container_id,
                    stop_grace_ms,
                },
                Event::Started { identity, .. },
            ) => {
                // A stop that arrived during the create applies at once: no probe then.
                let probe = stop_grace_ms.is_none();
                let mut out = self.running(container_id, identity, now_ms, policy, probe);
                if let Some(grace) = stop_grace_ms {
                    out.extend(self.handle(
                        Event::Stop {
                            grace: Duration::from_millis(grace),
                        },
                        now_ms,
                        policy,
                    ));
                }
                out
            }
            (Stage::Creating { stop_grace_ms, .. }, Event::StartFailed { message, .. }) => {
                if stop_grace_ms.is_some() {
                    self.stage = Stage::Stopped;
                    self.ready = false;
                    return vec![Action::Persist];
                }
                self.set(
                    Phase::Pending,
                    Some(Reason::CreateContainerError),
                    Some(message),
                );
                self.back_off(now_ms, policy)
            }
            (Stage::Running { started_at_ms, .. }, Event::Exited { code, oom, .. }) => self.exited(
                code,
                oom,
                now_ms.saturating_sub(started_at_ms),
                now_ms,
                policy,
            ),
            (stage @ Stage::Running { .. }, Event::Probe { ok, .. }) => {
                self.stage = stage;
                self.probe(ok, policy)
            }
            (Stage::BackOff { .. }, Event::TimerFired { .. }) => self.prepare(policy),
            (
                Stage::Stopping {
                    container_id,
                    identity,
                    killed: false,
                },
                Event::TimerFired { .. },
            ) => {
                let token = self.token;
                self.stage = Stage::Stopping {
                    container_id: container_id.clone(),
                    identity,
                    killed: true,
                };
                vec![
                    Action::KillAll { container_id },
                    Action::Schedule {
                        token,
                        after: KILL_WAIT,
                    },
                ]
            }
            (Stage::Stopping { killed: true, .. }, Event::TimerFired { .. }) => {
                // Unkillable (stuck in the kernel): give up waiting; the exit watcher still
                // cleans up if it ever exits.
                self.stopped()
            }
            (Stage::Stopping { .. }, Event::Exited { code, .. }) => {
                self.last_exit_code = code;
                self.stopped()
            }
            // Stop requests.
            (
                Stage::Running {
                    container_id,
                    identity,
                    ..
                },
                Event::Stop { grace },
            ) => {
                // The exit watcher keeps running under the same token and reports the end.
                let token = self.token;
                self.stage = Stage::Stopping {
                    container_id: container_id.clone(),
                    identity,
                    killed: false,
                };
                self.ready = false;
                self.reason = Some(Reason::Terminating);
                vec![
                    Action::StopProbe,
                    Action::Terminate { container_id },
                    Action::Schedule {
                        token,
                        after: grace,
                    },
                    Action::Persist,
                ]
            }
            (Stage::Creating { container_id, .. }, Event::Stop { grace }) => {
                self.stage = Stage::Creating {
                    container_id,
                    stop_grace_ms: Some(grace.as_millis() as u64),
                };
                Vec::new()
            }
            (
                Stage::Idle | Stage::Preparing | Stage::BackOff { .. } | Stage::Finished,
                Event::Stop { .. },
            ) => {
                // Nothing runs; an image preparation in flight finishes on its own.
                self.next_token();
                self.stopped()
            }
            (stage, _) => {
                // Anything else does not apply in this stage (a second stop, a probe result
                // after the exit): nothing changes.
                self.stage = stage;
                Vec::new()
            }
        }
    }

    /// Enter Running with this container (just started, or adopted): watch its exit, and
    /// probe it when the spec has a probe and `probe` allows.
    fn running(
        &mut self,
        container_id: String,
        identity: ProcIdentity,
        started_at_ms: u64,
        policy: &Policy,
        probe: bool,
    ) -> Vec<Action> {
        let token = self.next_token();
        self.stage = Stage::Running {
            container_id: container_id.clone(),
            identity,
            started_at_ms,
        };
        self.set(Phase::Running, None, None);
        self.ready = !policy.has_probe;
        let mut out = vec![
            Action::WatchExit {
                token,
                container_id: container_id.clone(),
            },
            Action::Persist,
        ];
        if probe && policy.has_probe {
            out.push(Action::StartProbe {
                token,
                container_id,
            });
        }
        out
    }

    fn prepare(&mut self, policy: &Policy) -> Vec<Action> {
        let token = self.next_token();
        self.stage = Stage::Preparing;
        self.ready = false;
        let message = Some(format!("preparing image {}", policy.image));
        self.set(Phase::Pending, Some(Reason::ContainerCreating), message);
        vec![Action::Persist, Action::PrepareImage { token }]
    }

    fn back_off(&mut self, now_ms: u64, policy: &Policy) -> Vec<Action> {
        let delay = policy.backoff(self.failures);
        self.failures = self.failures.saturating_add(1);
        let token = self.next_token();
        self.stage = Stage::BackOff {
            until_ms: now_ms + delay.as_millis() as u64,
        };
        self.ready = false;
        vec![
            Action::Persist,
            Action::Schedule {
                token,
                after: delay,
            },
        ]
    }

    fn exited(
        &mut self,
        code: Option<i32>,
        oom: bool,
        ran_ms: u64,
        now_ms: u64,
        policy: &Policy,
    ) -> Vec<Action> {
        if ran_ms >= policy.backoff_reset_after.as_millis() as u64 {
            self.failures = 0;
        }
        let reason = if oom {
            Reason::OomKilled
        } else {
            match code {
                Some(0) => Reason::Completed,
                None => Reason::Unknown,
                Some(_) => Reason::Error,
            }
        };
        self.last_exit_code = code;
        self.ready = false;
        let restart = match policy.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => code != Some(0),
            RestartPolicy::Never => false,
        };
        let mut out = vec![Action::StopProbe];
        if !restart {
            self.next_token();
            self.stage = Stage::Finished;
            let phase = if code == Some(0) {
                Phase::Succeeded
            } else {
                Phase::Failed
            };
            let message = code.is_none().then(|| {
                "exit code unknown: the container exited while adopted after a daemon restart"
                    .to_string()
            });
            self.set(phase, Some(reason), message);
            out.push(Action::Persist);
            return out;
        }
        self.restarts += 1;
        let delay = policy.backoff(self.failures);
        let code_text = code.map_or_else(|| "unknown".to_string(), |c| c.to_string());
        self.set(
            Phase::Running,
            Some(if oom {
                Reason::OomKilled
            } else {
                Reason::CrashLoopBackOff
            }),
            Some(format!(
                "last exit {code_text}; back-off {:.1}s restarting the container",
                delay.as_secs_f64()
            )),
        );
        let (phase, reason, message) = (self.phase, self.reason.clone(), self.message.clone());
        out.extend(self.back_off(now_ms, policy));
        self.set(phase, reason, message);
        out
    }

    fn probe(&mut self, ok: bool, policy: &Policy) -> Vec<Action> {
        if ok {
            self.probe_ok_run += 1;
            self.probe_fail_run = 0;
        } else {
            self.probe_fail_run += 1;
            self.probe_ok_run = 0;
        }
        if !self.ready && self.probe_ok_run >= policy.success_threshold.max(1) {
            self.ready = true;
            return vec![Action::Persist];
        }
        if self.ready && self.probe_fail_run >= policy.failure_threshold.max(1) {
            self.ready = false;
            return vec![Action::Persist];
        }
        Vec::new()
    }

    fn stopped(&mut self) -> Vec<Action> {
        self.stage = Stage::Stopped;
        self.ready = false;
        vec![Action::Persist]
    }
}

fn event_token(e: &Event) -> Option<u64> {
    match e {
        Event::ImageReady { token, .. }
        | Event::ImageFailed { token, .. }
        | Event::Started { token, .. }
        | Event::StartFailed { token, .. }
        | Event::Exited { token, .. }
        | Event::Probe { token, .. }
        | Event::TimerFired { token } => Some(*token),
        Event::Start | Event::Stop { .. } | Event::Adopted { .. } | Event::Lost => None,
    }
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
