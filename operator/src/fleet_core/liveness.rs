//! Node liveness, judged on the operator's own monotonic clock.
//!
//! A node is alive when the operator saw its heartbeat *change* recently (the heartbeat's own
//! time is never compared with the operator's wall clock, so a skewed clock on either side
//! cannot make a node look dead) or when the operator reaches the node's API directly. Only a
//! node that has been neither for the monitor grace is not ready, and only one not ready for
//! the eviction grace is lost: its replicas are placed elsewhere. When most of the nodes look
//! down at once the operator, not the nodes, is the likelier fault: nothing moves
//! ([`disrupted`], Kubernetes' `--unhealthy-zone-threshold` rule).
//!
//! Pure: callers pass the time of each observation; the tests drive it with made-up instants.

use std::time::{Duration, Instant};

/// How long a node may be silent before it is not ready, and not ready before it is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessTimings {
    pub monitor_grace: Duration,
    pub eviction_grace: Duration,
}

/// What the operator makes of a node now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// A heartbeat changed within the monitor grace, or the node answers directly.
    Ready,
    /// Silent and unreachable, for `for_` (less than the eviction grace): it keeps its
    /// replicas.
    NotReady { for_: Duration },
    /// Not ready for the eviction grace or longer: its replicas belong elsewhere (unless the
    /// fleet is [`disrupted`]).
    Lost { for_: Duration },
}

impl Health {
    pub fn is_ready(self) -> bool {
        matches!(self, Health::Ready)
    }

    pub fn is_lost(self) -> bool {
        matches!(self, Health::Lost { .. })
    }

    /// How long the node has not been ready (zero while it is).
    pub fn down_for(self) -> Duration {
        match self {
            Health::Ready => Duration::ZERO,
            Health::NotReady { for_ } | Health::Lost { for_ } => for_,
        }
    }
}

/// What the operator observed of one node.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    /// The heartbeat value last seen (opaque: compared for change only).
    heartbeat: Option<String>,
    /// When the operator saw it change (its first sighting counts as a change).
    heartbeat_changed: Option<Instant>,
    /// The outcome of the latest direct contact with the node's API (none before the first).
    reachable: Option<bool>,
    /// The last evaluation that found the node ready.
    last_ready: Option<Instant>,
    /// Since when the node has been neither heartbeating nor reachable, as last evaluated.
    silent_since: Option<Instant>,
}

impl Liveness {
    /// A heartbeat as the node last wrote it (`None`: the node reports none, or reports itself
    /// not ready, which is no sign of life).
    pub fn heartbeat(&mut self, value: Option<&str>, now: Instant) {
        let Some(value) = value else {
            return;
        };
        if self.heartbeat.as_deref() != Some(value) {
            self.heartbeat = Some(value.to_string());
            self.heartbeat_changed = Some(now);
        }
    }

    /// The outcome of a direct request to the node's API.
    pub fn contact(&mut self, ok: bool) {
        self.reachable = Some(ok);
    }

    /// Whether the latest direct contact succeeded.
    pub fn reachable(&self) -> bool {
        self.reachable == Some(true)
    }

    /// Whether the node's API was contacted at all (answered or not).
    pub fn contacted(&self) -> bool {
        self.reachable.is_some()
    }

    /// The node's health at `now`. A node never heard of counts as silent from its first
    /// evaluation, so it is lost only after both graces.
    pub fn evaluate(&mut self, now: Instant, t: LivenessTimings) -> Health {
        let beating = self
            .heartbeat_changed
            .is_some_and(|at| now.saturating_duration_since(at) < t.monitor_grace);
        if beating || self.reachable() {
            self.silent_since = None;
            self.last_ready = Some(now);
            return Health::Ready;
        }
        // Silent since its last sign of life (the end of its last heartbeat's grace, or the
        // last time it was found ready), or since we started looking.
        let last_sign = [
            self.heartbeat_changed.map(|at| at + t.monitor_grace),
            self.last_ready,
        ]
        .into_iter()
        .flatten()
        .max();
        let since = *self
            .silent_since
            .get_or_insert(last_sign.map_or(now, |s| s.min(now)));
        let for_ = now.saturating_duration_since(since);
        if for_ >= t.eviction_grace {
            Health::Lost { for_ }
        } else {
            Health::NotReady { for_ }
        }
    }
}

/// The share of not-ready nodes from which the fleet counts as disrupted (Kubernetes'
/// default `--unhealthy-zone-threshold`).
pub const UNHEALTHY_THRESHOLD: f64 = 0.55;

/// Whether so many nodes look down that the operator should move nothing: every node down
/// (full disruption), or more than two down and at least [`UNHEALTHY_THRESHOLD`] of them
/// (partial disruption; Kubernetes then stops evictions in clusters of up to 50 nodes).
pub fn disrupted(health: impl IntoIterator<Item = Health>) -> bool {
    let (mut ready, mut down) = (0usize, 0usize);
    for h in health {
        if h.is_ready() {
            ready += 1;
        } else {
            down += 1;
        }
    }
    if down == 0 {
        return false;
    }
    ready == 0 || (down > 2 && down as f64 / (ready + down) as f64 >= UNHEALTHY_THRESHOLD)
}

/// Whether a node keeps its replicas (and may take work): anything but lost, and even lost
/// while the fleet is disrupted.
pub fn keeps_replicas(health: Health, fleet_disrupted: bool) -> bool {
    !health.is_lost() || fleet_disrupted
}

/// Every node of a fleet judged at one instant, and whether the fleet is disrupted. Both
/// front ends judge through it, and it logs each node's change between ready and not and
/// each change of the disruption once.
#[derive(Debug, Default)]
pub struct Judge {
    frozen: bool,
}

impl Judge {
    /// Whether the last judgement found the fleet disrupted.
    pub fn frozen(&self) -> bool {
        self.frozen
    }

    /// Judge each `(name, liveness, health)` at `now`, updating its health, and return
    /// whether the fleet is disrupted.
    pub fn judge<'a>(
        &mut self,
        nodes: impl IntoIterator<Item = (&'a str, &'a mut Liveness, &'a mut Health)>,
        now: Instant,
        t: LivenessTimings,
    ) -> bool {
        let mut all = Vec::new();
        for (name, liveness, health) in nodes {
            let now_health = liveness.evaluate(now, t);
            if health.is_ready() && !now_health.is_ready() {
                tracing::warn!(node = %name, monitor_grace_s = t.monitor_grace.as_secs(), "node not ready: no heartbeat seen to change and its api does not answer");
            } else if !health.is_ready() && now_health.is_ready() {
                tracing::info!(node = %name, "node ready again");
            }
            *health = now_health;
            all.push(now_health);
        }
        let frozen = disrupted(all.iter().copied());
        if frozen != self.frozen {
            if frozen {
                tracing::warn!(
                    down = all.iter().filter(|h| !h.is_ready()).count(),
                    nodes = all.len(),
                    "most nodes look down at once: replicas stay where they are until they are back or fewer are down"
                );
            } else {
                tracing::info!("fewer nodes down: replicas of lost nodes move again");
            }
        }
        self.frozen = frozen;
        frozen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: LivenessTimings = LivenessTimings {
        monitor_grace: Duration::from_secs(40),
        eviction_grace: Duration::from_secs(60),
    };

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_changing_heartbeat_keeps_a_node_ready_whatever_time_it_carries() {
        // The heartbeat's own time is far in the past and then far in the future: only its
        // changes count, so a clock skewed by minutes (or years) changes nothing.
        let t0 = Instant::now();
        let mut l = Liveness::default();
        let beats = [
            "1999-01-01T00:00:00Z",
            "2999-01-01T00:00:00Z",
            "1970-01-01T00:00:10Z",
        ];
        for (i, b) in beats.iter().enumerate() {
            let now = t0 + s(30 * i as u64);
            l.heartbeat(Some(b), now);
            assert_eq!(l.evaluate(now + s(39), T), Health::Ready, "beat {i}");
        }
    }

    #[test]
    fn a_reachable_node_is_ready_without_heartbeats() {
        // Its heartbeats no longer reach the API server, but the operator reaches the node.
        let t0 = Instant::now();
        let mut l = Liveness::default();
        l.heartbeat(Some("a"), t0);
        l.contact(true);
        assert_eq!(l.evaluate(t0 + s(3600), T), Health::Ready);
        // Once it stops answering too, it is silent from that evaluation on.
        l.contact(false);
        assert_eq!(l.evaluate(t0 + s(3600), T), Health::NotReady { for_: s(0) });
        assert_eq!(l.evaluate(t0 + s(3660), T), Health::Lost { for_: s(60) });
    }

    #[test]
    fn a_silent_unreachable_node_goes_not_ready_then_lost() {
        let t0 = Instant::now();
        let mut l = Liveness::default();
        l.heartbeat(Some("a"), t0);
        l.contact(false);
        assert_eq!(l.evaluate(t0 + s(39), T), Health::Ready);
        // Silent from the end of its last heartbeat's grace.
        assert_eq!(l.evaluate(t0 + s(50), T), Health::NotReady { for_: s(10) });
        assert_eq!(l.evaluate(t0 + s(99), T), Health::NotReady { for_: s(59) });
        assert_eq!(l.evaluate(t0 + s(100), T), Health::Lost { for_: s(60) });
        // The same heartbeat again is no sign of life.
        l.heartbeat(Some("a"), t0 + s(101));
        assert!(l.evaluate(t0 + s(101), T).is_lost());
        // A new one is.
        l.heartbeat(Some("b"), t0 + s(102));
        assert_eq!(l.evaluate(t0 + s(102), T), Health::Ready);
        assert_eq!(l.evaluate(t0 + s(143), T), Health::NotReady { for_: s(1) });
    }

    #[test]
    fn a_node_never_heard_of_waits_both_graces_from_the_first_look() {
        let t0 = Instant::now();
        let mut l = Liveness::default();
        assert_eq!(l.evaluate(t0, T), Health::NotReady { for_: s(0) });
        assert_eq!(l.evaluate(t0 + s(59), T), Health::NotReady { for_: s(59) });
        assert!(l.evaluate(t0 + s(60), T).is_lost());
        // A heartbeat that says "not ready" is no sign of life either.
        l.heartbeat(None, t0 + s(61));
        assert!(l.evaluate(t0 + s(61), T).is_lost());
    }

    fn health(ready: usize, down: usize) -> Vec<Health> {
        let mut v = vec![Health::Ready; ready];
        v.extend(std::iter::repeat_n(Health::Lost { for_: s(60) }, down));
        v
    }

    #[test]
    fn most_nodes_down_at_once_is_a_disruption() {
        assert!(!disrupted(health(0, 0)));
        assert!(!disrupted(health(4, 0)));
        // One of two down: that node's replicas move.
        assert!(!disrupted(health(1, 1)));
        // All down, however few: the operator is cut off, not the nodes.
        assert!(disrupted(health(0, 1)));
        assert!(disrupted(health(0, 2)));
        // Two of three down: not more than two, so they still move.
        assert!(!disrupted(health(1, 2)));
        // Three of five (60%): disrupted; three of six (50%): not.
        assert!(disrupted(health(2, 3)));
        assert!(!disrupted(health(3, 3)));
        assert!(disrupted(health(4, 5)));
    }

    #[test]
    fn the_judge_updates_every_node_and_remembers_the_disruption() {
        let t0 = Instant::now();
        let mut nodes: Vec<(String, Liveness, Health)> = ["a", "b"]
            .iter()
            .map(|n| (n.to_string(), Liveness::default(), Health::Ready))
            .collect();
        nodes[0].1.contact(true);
        nodes[1].1.contact(false);
        let mut judge = Judge::default();
        let mut run = |nodes: &mut Vec<(String, Liveness, Health)>, at: Instant| {
            judge.judge(nodes.iter_mut().map(|(n, l, h)| (n.as_str(), l, h)), at, T)
        };
        assert!(!run(&mut nodes, t0 + s(60)));
        assert!(nodes[0].2.is_ready());
        assert_eq!(nodes[1].2, Health::NotReady { for_: s(0) });
        // Both silent: the fleet is disrupted, and stays so until one answers again.
        nodes[0].1.contact(false);
        assert!(run(&mut nodes, t0 + s(120)));
        assert!(run(&mut nodes, t0 + s(180)));
        assert!(nodes[1].2.is_lost());
        nodes[0].1.contact(true);
        assert!(!run(&mut nodes, t0 + s(181)));
    }

    #[test]
    fn lost_nodes_keep_their_replicas_while_the_fleet_is_disrupted() {
        let lost = Health::Lost { for_: s(600) };
        assert!(!keeps_replicas(lost, false));
        assert!(keeps_replicas(lost, true));
        assert!(keeps_replicas(Health::NotReady { for_: s(1) }, false));
        assert!(keeps_replicas(Health::Ready, false));
    }
}
