//! One round of pressure protection: read the signal, let [`crate::pressure::protect::Protector`]
//! decide, carry out its actions.

use std::path::PathBuf;
use std::time::Instant;

use super::replica::{Reason, Stage};
use super::Supervisor;
use crate::pressure::protect::{Action, Candidate, ProtectConfig, Protector, StallRate};

/// What the protection loop keeps between rounds besides the protector.
pub struct ProtectionState {
    pub protector: Protector,
    rate: StallRate,
    /// The workloads' cgroup v2 parent (its `memory.pressure`), or none for the host's.
    signal: Option<PathBuf>,
    rounds: u64,
}

/// On a calm node, the replicas are looked at once in this many rounds.
const FULL_ROUND_EVERY: u64 = 10;

impl ProtectionState {
    pub fn new(cfg: ProtectConfig, signal: Option<PathBuf>) -> ProtectionState {
        ProtectionState {
            protector: Protector::new(cfg),
            rate: StallRate::new(cfg.sustain),
            signal,
            rounds: 0,
        }
    }
}

/// Memory `full` total (microseconds) of the workloads' parent, or of the host where the
/// parent has none: one file.
fn memory_full_total(signal: Option<&std::path::Path>) -> Option<u64> {
    let parent = signal.map(|dir| dir.join("memory.pressure"));
    let r = match parent.filter(|f| f.exists()) {
        Some(f) => crate::pressure::psi::read(&f),
        None => crate::pressure::psi::read(std::path::Path::new("/proc/pressure/memory")),
    }?;
    Some(r.full.total)
}

impl Supervisor {
    /// Turn pressure protection on (see [`crate::pressure::protect`]). Throttles left by an earlier
    /// daemon are lifted now: which replicas they held back was not recorded.
    pub async fn enable_protection(&self, cfg: ProtectConfig, signal: Option<PathBuf>) {
        let (running, _) = self.protection_view().await;
        for (c, quota) in running {
            let _ = self.shared.runtime.controls(&c.container).unthrottle(quota);
        }
        *self.protection.lock().unwrap() = Some(ProtectionState::new(cfg, signal));
    }

    /// Running replicas (with the cpu quota their spec asks for) and the replicas evicted for
    /// pressure.
    async fn protection_view(&self) -> (Vec<(Candidate, i64)>, Vec<(String, u32)>) {
        let mut running = Vec::new();
        let mut evicted = Vec::new();
        for rec in self.snapshots().await {
            if rec.deleting {
                continue;
            }
            let key = rec.workload.key();
            let quota = crate::containers::spec::cpu_quota_us(&rec.workload.spec);
            for r in &rec.replicas {
                if r.reason == Some(Reason::EvictedForPressure) {
                    evicted.push((key.clone(), r.index));
                }
                if !matches!(r.stage, Stage::Running { .. }) {
                    continue;
                }
                let Some(c) = r.container_id() else { continue };
                running.push((
                    Candidate {
                        key: key.clone(),
                        replica: r.index,
                        container: c.to_string(),
                        priority: rec.workload.spec.priority,
                        memory_bytes: 0,
                    },
                    quota,
                ));
            }
        }
        (running, evicted)
    }

    /// One round (every second while protection is on).
    ///
    /// A calm node costs one small file read a round: the replicas are listed only while the
    /// signal is over the throttle threshold, while something is throttled or evicted, and
    /// every [`FULL_ROUND_EVERY`] rounds (to find replicas an earlier daemon evicted); their
    /// memory is read only while the signal is over the threshold.
    pub async fn protect_round(&self) {
        let signal = match &*self.protection.lock().unwrap() {
            Some(s) => s.signal.clone(),
            None => return,
        };
        let Ok(Some(total)) =
            tokio::task::spawn_blocking(move || memory_full_total(signal.as_deref())).await
        else {
            return;
        };
        let now = Instant::now();
        let (level, full) = {
            let mut guard = self.protection.lock().unwrap();
            let Some(st) = guard.as_mut() else { return };
            let Some(level) = st.rate.update(now, total) else {
                return;
            };
            st.rounds += 1;
            let p = &st.protector;
            let full = level >= p.cfg.throttle_at
                || p.throttled_count() > 0
                || p.evicted_count() > 0
                || st.rounds % FULL_ROUND_EVERY == 1;
            (level, full)
        };
        let (running, evicted) = if full {
            let (mut running, evicted) = self.protection_view().await;
            let over = {
                let guard = self.protection.lock().unwrap();
                guard
                    .as_ref()
                    .is_some_and(|s| level >= s.protector.cfg.throttle_at)
            };
            if over {
                let runtime = self.shared.runtime.clone();
                running = tokio::task::spawn_blocking(move || {
                    for (c, _) in &mut running {
                        c.memory_bytes = runtime.controls(&c.container).memory_bytes().unwrap_or(0);
                    }
                    running
                })
                .await
                .unwrap_or_default();
            }
            (running, evicted)
        } else {
            (Vec::new(), Vec::new())
        };
        let actions = {
            let mut guard = self.protection.lock().unwrap();
            let Some(st) = guard.as_mut() else { return };
            let candidates: Vec<Candidate> = running.iter().map(|(c, _)| c.clone()).collect();
            st.protector.tick(now, level, &candidates, &evicted)
        };
        let quota_of = |container: &str| {
            running
                .iter()
                .find(|(c, _)| c.container == container)
                .map(|(_, q)| *q)
                .unwrap_or(-1)
        };
        for a in actions {
            match a {
                Action::Throttle(c) => {
                    tracing::warn!(workload = %c.key, replica = c.replica, priority = c.priority, memory_mib = c.memory_bytes >> 20, "pressure protection: throttling");
                    if let Err(e) = self.shared.runtime.controls(&c.container).throttle() {
                        tracing::warn!(workload = %c.key, replica = c.replica, error = %e, "pressure protection: throttle failed");
                    }
                }
                Action::Unthrottle { container } => {
                    tracing::info!(container = %container, "pressure protection: lifting a throttle");
                    if let Err(e) = self
                        .shared
                        .runtime
                        .controls(&container)
                        .unthrottle(quota_of(&container))
                    {
                        tracing::warn!(container = %container, error = %e, "pressure protection: lifting a throttle failed");
                    }
                }
                Action::Evict { victim, why } => {
                    tracing::warn!(workload = %victim.key, replica = victim.replica, priority = victim.priority, memory_mib = victim.memory_bytes >> 20, %why, "pressure protection: evicting");
                    self.evict_for_pressure(&victim.key, victim.replica, &why)
                        .await;
                }
                Action::Restore { key, replica } => {
                    tracing::info!(workload = %key, replica, "pressure protection: restoring an evicted replica");
                    if matches!(self.restart(&key, Some(replica)).await, Ok(true)) {
                        self.bump_digests();
                    }
                }
            }
        }
    }

    /// Whether protection holds this container back now.
    pub(super) fn is_throttled(&self, container: &str) -> bool {
        self.protection
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|s| s.protector.is_throttled(container))
    }

    /// Protection's settings and record, for the node summary.
    pub fn protection_status(&self) -> Option<hyperbox_api::ProtectionStatus> {
        let guard = self.protection.lock().unwrap();
        let p = &guard.as_ref()?.protector;
        Some(hyperbox_api::ProtectionStatus {
            settings: p.cfg.describe(),
            level: p.level,
            throttled: p.throttled_count() as u32,
            evicted: p.evicted_count() as u32,
            throttles_total: p.throttles_total,
            evictions_total: p.evictions_total,
            restores_total: p.restores_total,
            last_action: p.last_action.clone(),
        })
    }
}
