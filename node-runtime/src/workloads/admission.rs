//! Admission glue: the node's policy and facts, and the batch check that reserves a workload's
//! requests. The decisions themselves are pure functions in `crate::pressure::admission`.

use std::collections::HashMap;

use hyperbox_api::{ResourceAmounts, Workload};

use super::Supervisor;
use crate::containers::policy::NodePolicy;
use crate::pressure::admission::{self, NodeFacts};

impl Supervisor {
    pub fn set_policy(&self, policy: NodePolicy) {
        *self.policy.lock().unwrap() = Some(policy);
    }

    /// Turn on capacity and label admission with these facts about the node.
    pub fn set_node(&self, facts: NodeFacts) {
        *self.node.lock().unwrap() = Some(facts);
    }

    pub fn node_facts(&self) -> Option<NodeFacts> {
        self.node.lock().unwrap().clone()
    }

    /// Sum of the requests of every admitted workload.
    pub fn requested(&self) -> ResourceAmounts {
        self.admitted
            .lock()
            .unwrap()
            .values()
            .fold(ResourceAmounts::default(), |a, b| a.plus(*b))
    }

    /// Field errors for what the node's policy refuses in `w` (relative to the workload).
    pub fn admit(&self, w: &Workload) -> Vec<hyperbox_api::validate::FieldError> {
        match &*self.policy.lock().unwrap() {
            Some(p) => p.check(w),
            None => Vec::new(),
        }
    }

    /// Admit a batch or refuse it, nothing of it either way: under pressure nothing that adds
    /// replicas is admitted, and what does not fit the node is refused; an admitted batch's
    /// requests are reserved.
    pub(super) async fn admit_batch(
        &self,
        keys: &[String],
        workloads: &[Workload],
    ) -> Result<(), admission::Refusals> {
        // Under pressure, nothing that adds replicas is admitted.
        let facts = self.node.lock().unwrap().clone();
        if let Some(f) = facts.filter(|f| f.pressure_gate.is_some()) {
            let gate = f.pressure_gate.expect("filtered");
            let value = gate.read(f.pressure_dir.as_deref());
            let current: HashMap<String, u32> = {
                let reg = self.shared.registry.lock().await;
                keys.iter()
                    .filter_map(|k| {
                        let h = reg.get(k)?;
                        let n = h.snapshot.lock().unwrap().workload.desired_replicas();
                        Some((k.clone(), n))
                    })
                    .collect()
            };
            let batch: Vec<&Workload> = workloads.iter().collect();
            let refused = admission::pressure_refusals(&f, value, &current, &batch);
            if !refused.is_empty() {
                tracing::info!(signal = %gate.name(), value = ?value, threshold = gate.threshold, refused = refused.len(), "refusing new replicas under pressure");
                return Err(refused);
            }
        }
        {
            // Check and reserve under one lock: two concurrent applies never both take the
            // last room.
            let mut admitted = self.admitted.lock().unwrap();
            let batch: Vec<&Workload> = workloads.iter().collect();
            let staged = match &*self.node.lock().unwrap() {
                Some(node) => match admission::admit_batch(node, &admitted, &batch) {
                    Ok(staged) => staged,
                    Err(refused) => return Err(refused),
                },
                None => batch.iter().map(|w| (w.key(), w.total_request())).collect(),
            };
            admitted.extend(staged);
        }
        Ok(())
    }
}
