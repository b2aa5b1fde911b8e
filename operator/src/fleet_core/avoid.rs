//! Where a workload should not go for now: the nodes that refused its spec (admission, policy,
//! another manager's workload of that name), until that spec changes; and the nodes that
//! evicted one of its replicas for pressure, for [`PRESSURE_AVOID`], so that its replicas move
//! to calmer nodes instead of coming back to the stalled one.
//!
//! What "that spec" is belongs to the front end: the Git source passes the revision (a new
//! commit retries every refusal), Kubernetes the workload's config hash. Pure: callers pass the
//! time of each observation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// How long a workload avoids a node that evicted one of its replicas for pressure: long
/// enough for the node to calm down (its own restore waits 60 s of calm), short enough that
/// the workload comes back when there is nowhere better.
pub const PRESSURE_AVOID: Duration = Duration::from_secs(300);

/// The nodes each workload avoids, and why.
#[derive(Debug, Default, Clone)]
pub struct AvoidMemory {
    /// Workload → (the spec it was refused at, the nodes that refused it).
    refused: BTreeMap<String, (String, BTreeSet<String>)>,
    /// Workload → node → when the operator first saw a pressure eviction there.
    pressure: BTreeMap<String, BTreeMap<String, Instant>>,
}

impl AvoidMemory {
    /// `node` refused `workload` at `spec`.
    pub fn refused(&mut self, workload: &str, spec: &str, node: &str) {
        let e = self
            .refused
            .entry(workload.to_string())
            .or_insert_with(|| (spec.to_string(), BTreeSet::new()));
        if e.0 != spec {
            *e = (spec.to_string(), BTreeSet::new());
        }
        e.1.insert(node.to_string());
    }

    /// `node` reports replicas of `workload` evicted for pressure. True when this is news (the
    /// node was not avoided for it yet): the workload should be placed again.
    pub fn evicted_for_pressure(&mut self, workload: &str, node: &str, now: Instant) -> bool {
        let m = self.pressure.entry(workload.to_string()).or_default();
        if m.contains_key(node) {
            return false;
        }
        m.insert(node.to_string(), now);
        true
    }

    /// Forget pressure evictions older than [`PRESSURE_AVOID`].
    pub fn expire(&mut self, now: Instant) {
        self.pressure.retain(|_, m| {
            m.retain(|_, at| now.saturating_duration_since(*at) < PRESSURE_AVOID);
            !m.is_empty()
        });
    }

    /// The nodes `workload` avoids now, at `spec`.
    pub fn avoid(&self, workload: &str, spec: &str) -> BTreeSet<String> {
        let mut nodes = match self.refused.get(workload) {
            Some((at, nodes)) if at == spec => nodes.clone(),
            _ => BTreeSet::new(),
        };
        if let Some(m) = self.pressure.get(workload) {
            nodes.extend(m.keys().cloned());
        }
        nodes
    }

    /// [`AvoidMemory::avoid`] for every workload with something to avoid, all at `spec`.
    pub fn avoid_all(&self, spec: &str) -> BTreeMap<String, BTreeSet<String>> {
        self.refused
            .keys()
            .chain(self.pressure.keys())
            .map(|w| (w.clone(), self.avoid(w, spec)))
            .filter(|(_, nodes)| !nodes.is_empty())
            .collect()
    }

    /// The workload is gone: nothing to remember for it.
    pub fn forget(&mut self, workload: &str) {
        self.refused.remove(workload);
        self.pressure.remove(workload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_refusal_holds_until_the_spec_changes() {
        let mut m = AvoidMemory::default();
        m.refused("web", "h1", "n1");
        m.refused("web", "h1", "n2");
        assert_eq!(m.avoid("web", "h1"), set(&["n1", "n2"]));
        assert_eq!(m.avoid("db", "h1"), set(&[]));
        // A new spec tries every node again; a refusal at it starts a new list.
        assert_eq!(m.avoid("web", "h2"), set(&[]));
        m.refused("web", "h2", "n3");
        assert_eq!(m.avoid("web", "h2"), set(&["n3"]));
        assert_eq!(m.avoid("web", "h1"), set(&[]));
    }

    #[test]
    fn a_pressure_eviction_is_news_once_and_expires() {
        let t0 = Instant::now();
        let mut m = AvoidMemory::default();
        assert!(m.evicted_for_pressure("web", "n1", t0));
        assert!(!m.evicted_for_pressure("web", "n1", t0 + Duration::from_secs(10)));
        // Whatever the spec.
        assert_eq!(m.avoid("web", "any"), set(&["n1"]));
        m.expire(t0 + PRESSURE_AVOID - Duration::from_secs(1));
        assert_eq!(m.avoid("web", "any"), set(&["n1"]));
        m.expire(t0 + PRESSURE_AVOID);
        assert_eq!(m.avoid("web", "any"), set(&[]));
        // Seen again after it expired: news again.
        assert!(m.evicted_for_pressure("web", "n1", t0 + PRESSURE_AVOID));
    }

    #[test]
    fn every_workload_at_once_and_forgetting_one() {
        let t0 = Instant::now();
        let mut m = AvoidMemory::default();
        m.refused("a", "rev1", "n1");
        m.evicted_for_pressure("b", "n2", t0);
        m.refused("c", "rev0", "n3");
        let all = m.avoid_all("rev1");
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all["a"], set(&["n1"]));
        assert_eq!(all["b"], set(&["n2"]));
        m.forget("a");
        assert!(!m.avoid_all("rev1").contains_key("a"));
    }
}
