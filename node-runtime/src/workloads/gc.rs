//! Images the workloads hold: what is in use (by current and outgoing replicas, and prewarmed),
//! `rmi`, and image garbage collection.

use std::collections::HashSet;

use anyhow::Result;

use super::Supervisor;

impl Supervisor {
    /// Image digests used by current workloads and by the old replicas of their rolling
    /// updates (for image GC).
    pub async fn images_in_use(&self) -> HashSet<String> {
        let mut used: HashSet<String> = self
            .snapshots()
            .await
            .iter()
            .flat_map(|r| {
                r.image_digest
                    .iter()
                    .chain(r.outgoing_digests.iter())
                    .cloned()
            })
            .collect();
        // Prewarmed images are kept while wanted.
        used.extend(self.prewarmed_digests());
        used
    }

    /// `rmi`: remove an image now unless a workload uses it.
    pub async fn remove_image(&self, image: &str) -> Result<Option<String>> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let in_use = self.images_in_use().await;
        store.remove(image, &in_use).await
    }

    pub async fn gc_images(&self) {
        let Some(store) = &self.store else {
            return;
        };
        let in_use = self.images_in_use().await;
        match store.gc(&in_use, self.shared.cfg.image_keep_for).await {
            Ok(removed) => {
                tracing::debug!(
                    removed = removed.len(),
                    in_use = in_use.len(),
                    "image garbage collection ran"
                )
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "image garbage collection failed"),
        }
    }
}
