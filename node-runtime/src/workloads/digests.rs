//! The digests (`GET /v1/digests`): every workload's name, hashes, revision and manager, and
//! the version a source watches instead of polling.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyperbox_api::REVISION_ANNOTATION;

use super::record::WorkloadRecord;
use super::{replica, Supervisor};

impl Supervisor {
    /// Name, hashes, revision and manager of every workload (`GET /v1/digests`, a
    /// `Vec<WorkloadDigest>`), serialized straight from the snapshots: no copy of every name
    /// and hash.
    pub async fn digests_json(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Digest<'a> {
            name: &'a str,
            namespace: &'a str,
            spec_hash: &'a str,
            config_hash: &'a str,
            revision: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            manager: Option<&'a str>,
            #[serde(skip_serializing_if = "hyperbox_api::util::is_zero")]
            evicted_for_pressure: u32,
        }
        // A delete counts from when it is accepted (the handle's flag, set before the digests'
        // version changes), not from when the actor gets to it.
        let snapshots: Vec<Arc<WorkloadRecord>> = {
            let reg = self.shared.registry.lock().await;
            reg.values()
                .filter(|h| !h.deleting.load(Ordering::SeqCst))
                .map(|h| h.snapshot.lock().unwrap().clone())
                .collect()
        };
        let digests: Vec<Digest<'_>> = snapshots
            .iter()
            .filter(|r| !r.deleting)
            .map(|rec| Digest {
                name: &rec.workload.metadata.name,
                namespace: rec.workload.metadata.namespace(),
                spec_hash: &rec.spec_hash,
                config_hash: &rec.config_hash,
                revision: rec
                    .workload
                    .metadata
                    .annotations
                    .get(REVISION_ANNOTATION)
                    .map(String::as_str),
                manager: rec.manager.as_deref(),
                evicted_for_pressure: rec
                    .replicas
                    .iter()
                    .filter(|r| r.reason == Some(replica::Reason::EvictedForPressure))
                    .count() as u32,
            })
            .collect();
        serde_json::to_vec(&digests).expect("serialize digests")
    }

    /// A change the digests' watchers must see that is not an apply or a delete (a pressure
    /// eviction or restore).
    pub fn bump_digests(&self) {
        self.digests_version.send_modify(|v| *v += 1);
    }

    /// The digests' version (see `digests_version`).
    pub fn digests_version(&self) -> u64 {
        *self.digests_version.borrow()
    }

    /// Wait until the digests' version differs from `seen`, or `timeout` elapses; returns the
    /// version then.
    pub async fn wait_digests(&self, seen: u64, timeout: Duration) -> u64 {
        let mut rx = self.digests_version.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|v| *v != seen)).await;
        let v = *rx.borrow();
        v
    }
}
