//! Prewarming: while the node is calm, pull and prepare the images of work that is likely to
//! land here (`standby: true` workloads, and images a source asked for through
//! `POST /v1/images/prewarm`: its pending replicas, the next version of a rollout), so that a
//! later start needs no registry. Prewarmed images are kept from garbage collection while
//! they are wanted.
//!
//! One image at a time, and only while the admission gate's signal is below half its
//! threshold (with the gate off: while memory `full` avg10 is below 5%): a pull is I/O and
//! memory, the last thing a stalled node needs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hyperbox_api::{PrewarmState, PrewarmedImage};

use super::Supervisor;

/// How long an image asked for through the API stays wanted (each request renews it).
pub const REQUEST_TTL: Duration = Duration::from_secs(3600);
/// After a failed preparation, the next try waits this long.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// Most images one request may name.
pub const MAX_IMAGES: usize = 256;

#[derive(Default)]
pub struct Prewarm {
    /// Asked for through the API, until when.
    requested: BTreeMap<String, Instant>,
    /// Prepared, with the digest.
    ready: BTreeMap<String, String>,
    /// The last failure and when.
    failed: BTreeMap<String, (Instant, String)>,
    /// Being prepared now.
    in_flight: Option<String>,
    /// Why nothing is being prepared (the node is under pressure), if so.
    waiting: Option<String>,
}

impl Supervisor {
    /// Ask for images to be prewarmed (renewing those already asked for).
    pub fn request_prewarm(&self, images: &[String]) {
        let until = Instant::now() + REQUEST_TTL;
        let mut p = self.prewarm.lock().unwrap();
        for i in images {
            p.requested.insert(i.clone(), until);
            p.failed.remove(i);
        }
        drop(p);
        self.prewarm_kick.notify_one();
    }

    /// References wanted now: standby workloads' images and unexpired requests.
    async fn prewarm_wanted(&self) -> Vec<String> {
        let mut wanted: Vec<String> = self
            .snapshots()
            .await
            .iter()
            .filter(|r| r.workload.spec.standby && !r.deleting)
            .map(|r| r.workload.spec.image.clone())
            .collect();
        let now = Instant::now();
        let mut p = self.prewarm.lock().unwrap();
        p.requested.retain(|_, until| *until > now);
        wanted.extend(p.requested.keys().cloned());
        wanted.sort();
        wanted.dedup();
        let keep: std::collections::HashSet<&String> = wanted.iter().collect();
        p.ready.retain(|r, _| keep.contains(r));
        p.failed.retain(|r, _| keep.contains(r));
        wanted
    }

    /// Digests of the prewarmed images still wanted (kept from garbage collection).
    pub(super) fn prewarmed_digests(&self) -> Vec<String> {
        self.prewarm
            .lock()
            .unwrap()
            .ready
            .values()
            .cloned()
            .collect()
    }

    /// Whether the node is calm enough to pull (see the module's notes), or why not.
    fn calm_for_prewarm(&self) -> Result<(), String> {
        let facts = self.node_facts();
        let gate = facts
            .as_ref()
            .and_then(|f| f.pressure_gate)
            .unwrap_or(crate::pressure::admission::DEFAULT_PRESSURE_GATE);
        let limit = gate.threshold / 2.0;
        match gate.read(facts.as_ref().and_then(|f| f.pressure_dir.as_deref())) {
            Some(v) if v >= limit => Err(format!(
                "the node is under pressure: {} is {v:.1}% (prewarming waits below {limit:.1}%)",
                gate.name()
            )),
            _ => Ok(()),
        }
    }

    /// Prepare the next wanted image that is not ready yet (one at a time); returns whether
    /// one was prepared or tried.
    pub async fn prewarm_round(&self) -> bool {
        let wanted = self.prewarm_wanted().await;
        let next = {
            let p = self.prewarm.lock().unwrap();
            if p.in_flight.is_some() {
                return false;
            }
            wanted.into_iter().find(|r| {
                !p.ready.contains_key(r)
                    && p.failed
                        .get(r)
                        .is_none_or(|(at, _)| at.elapsed() >= RETRY_AFTER)
            })
        };
        let Some(image) = next else {
            self.prewarm.lock().unwrap().waiting = None;
            return false;
        };
        if let Err(why) = self.calm_for_prewarm() {
            let mut p = self.prewarm.lock().unwrap();
            if p.waiting.as_deref() != Some(why.as_str()) {
                tracing::info!(%image, %why, "prewarming waits");
            }
            p.waiting = Some(why);
            return false;
        }
        {
            let mut p = self.prewarm.lock().unwrap();
            p.waiting = None;
            p.in_flight = Some(image.clone());
        }
        let started = Instant::now();
        let result = self.shared.images.clone().prepare(image.clone()).await;
        let mut p = self.prewarm.lock().unwrap();
        p.in_flight = None;
        match result {
            Ok(img) => {
                tracing::info!(%image, digest = %img.digest, elapsed_ms = started.elapsed().as_millis() as u64, "image prewarmed");
                p.failed.remove(&image);
                p.ready.insert(image, img.digest);
            }
            Err(e) => {
                tracing::warn!(%image, error = %e, "prewarming failed; retrying later");
                p.failed.insert(image, (Instant::now(), e.to_string()));
            }
        }
        true
    }

    /// Resolves when a prewarm request arrives.
    pub async fn prewarm_requested(&self) {
        self.prewarm_kick.notified().await
    }

    /// Every wanted image and its state, for the node summary.
    pub async fn prewarm_status(&self) -> Vec<PrewarmedImage> {
        let wanted = self.prewarm_wanted().await;
        let p = self.prewarm.lock().unwrap();
        wanted
            .into_iter()
            .map(|image| {
                let (state, message) = if let Some(d) = p.ready.get(&image) {
                    (PrewarmState::Ready, Some(d.clone()))
                } else if p.in_flight.as_deref() == Some(image.as_str()) {
                    (PrewarmState::Pulling, None)
                } else if let Some((_, e)) = p.failed.get(&image) {
                    (PrewarmState::Failed, Some(e.clone()))
                } else {
                    (PrewarmState::Waiting, p.waiting.clone())
                };
                PrewarmedImage {
                    image,
                    state,
                    message,
                }
            })
            .collect()
    }
}
