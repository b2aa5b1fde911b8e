//! Carrying out one node's plan (applies cut to the node's limits, prunes at once), and a
//! node's digests as the diff needs them. The single-node sync and the Git fleet share it.

use anyhow::{Context, Result};
use hyperbox_client::NodeClient;
use std::collections::BTreeMap;

use crate::apply::{deliver, Delivery, Limits};
use crate::reconcile::{Inventory, Observed, Outcome, WorkloadResult};

/// What carrying out one node's plan did.
pub(super) struct Done {
    pub results: Vec<WorkloadResult>,
    /// The inventory to keep: what this source now owns on the node.
    pub inventory: Inventory,
    /// Node operations that failed (retried at the next sync).
    pub failed: usize,
    /// Workloads the node refused or that were too large: not applied.
    pub not_applied: Vec<String>,
}

/// Apply and prune one node's plan. `previous` is the inventory before the sync, `union` the
/// one recorded before acting (previous and planned): kept whole when something failed.
pub(super) async fn carry_out(
    node: &NodeClient,
    limits: Limits,
    previous: &Inventory,
    union: Inventory,
    p: crate::reconcile::Plan,
) -> Result<Done> {
    let crate::reconcile::Plan {
        apply,
        delete,
        mut results,
        inventory: planned,
    } = p;
    let mut failed = 0usize;
    let docs: Vec<Vec<u8>> = apply
        .iter()
        .map(|w| serde_json::to_vec(w).context("serialize workload"))
        .collect::<Result<_>>()?;
    // Only the JSON is sent: at 10,000 workloads the structs are several MiB that need not
    // stay alive while it is.
    let names: Vec<String> = apply.iter().map(hyperbox_api::Workload::key).collect();
    drop(apply);
    let deliveries = deliver(&docs, &limits, |body| async move {
        node.apply_json(body).await.map(drop)
    })
    .await;
    let mut not_applied = Vec::new();
    for (name, d) in names.iter().zip(&deliveries) {
        match d {
            Delivery::Applied => continue,
            Delivery::TooLarge { .. } => {
                not_applied.push(name.clone());
                tracing::warn!(workload = %name, "workload too large for the node; not applied");
            }
            Delivery::Refused(_) => {
                not_applied.push(name.clone());
                tracing::warn!(workload = %name, "node refused the workload; not applied");
            }
            Delivery::Failed(_) => failed += 1,
        }
        if let Some(r) = results.iter_mut().find(|r| &r.name == name) {
            r.outcome = Outcome::Failed;
            r.message = d.message(name, &limits);
        }
    }
    let deletes = delete.iter().map(|name| {
        let node = node.clone();
        let name = name.clone();
        async move { (name.clone(), node.delete(&name).await) }
    });
    let mut taken_over = Vec::new();
    for (name, r) in futures_join_all(deletes).await {
        if let Err(e) = r {
            if e.status() == Some(409) {
                // Another manager owns it now: it is no longer ours to prune.
                tracing::warn!(workload = %name, error = %e, "not pruned: managed by another source");
                taken_over.push(name);
            } else if e.status() != Some(404) {
                failed += 1;
                tracing::error!(workload = %name, error = %e, "prune failed");
            }
        }
    }
    let mut inventory = planned;
    if failed > 0 {
        // Keep ownership of everything we may have touched; the next sync retries.
        inventory = union;
    }
    // What was never applied is owned as before: its previous version, or nothing.
    for name in &not_applied {
        match previous.get(name) {
            Some(before) => inventory.insert(name.clone(), before.clone()),
            None => inventory.remove(name),
        };
    }
    for name in &taken_over {
        inventory.remove(name);
    }
    Ok(Done {
        results,
        inventory,
        failed,
        not_applied,
    })
}

/// A node's digests as the diff needs them.
pub(super) fn observe(
    digests: impl IntoIterator<Item = hyperbox_client::DigestHash>,
) -> BTreeMap<String, Observed> {
    digests
        .into_iter()
        .map(|d| {
            (
                d.key(),
                Observed {
                    // Nodes older than config_hash only have the spec hash.
                    spec_hash: if d.config_hash.is_empty() {
                        d.spec_hash.clone()
                    } else {
                        d.config_hash
                    },
                    template_hash: d.spec_hash,
                    evicted_for_pressure: d.evicted_for_pressure,
                },
            )
        })
        .collect()
}

async fn futures_join_all<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}
