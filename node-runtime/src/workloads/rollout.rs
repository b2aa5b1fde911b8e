//! Rolling updates as a pure function: given, for each ordinal, the replica of the previous
//! spec (if it still runs) and the replica of the current spec, decide which new replicas may
//! start and which old ones may stop now. The actor asks again after every event.
//!
//! Deployment semantics, per ordinal instead of per pod:
//! - at most `replicas + maxSurge` containers exist (a stopping one still counts until gone);
//! - at least `replicas - maxUnavailable` are ready, unless fewer were ready to begin with;
//! - an old replica stops as soon as the new one at its ordinal is ready, or earlier while
//!   the ready count stays at the minimum;
//! - a new version that never becomes ready therefore never takes more than `maxUnavailable`
//!   old replicas down: the rollout halts and the old ones keep serving.

/// The two bounds, resolved against the replica count (shared with the operator, which
/// splits a workload's bounds between its nodes).
pub use hyperbox_api::RolloutBounds as Bounds;

/// The previous spec's replica at an ordinal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Old {
    pub ready: bool,
    /// Already asked to stop (still counts until its container is gone).
    pub stopping: bool,
}

/// The current spec's replica at an ordinal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct New {
    /// Released: it has a container or is getting one (not held back by the rollout).
    pub started: bool,
    pub ready: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// Ordinals whose new replica may start.
    pub start: Vec<u32>,
    /// Ordinals whose old replica should stop now.
    pub stop: Vec<u32>,
}

/// One planning step over ordinals `0..slots.len()`: `(old, new)` per ordinal.
pub fn plan(slots: &[(Option<Old>, New)], bounds: Bounds) -> Step {
    let replicas = slots.len() as u32;
    let max_total = replicas + bounds.max_surge;
    let min_ready = replicas.saturating_sub(bounds.max_unavailable);
    let mut total: u32 = 0;
    let mut ready: u32 = 0;
    for (old, new) in slots {
        if old.is_some() {
            total += 1;
            ready += old.is_some_and(|o| o.ready && !o.stopping) as u32;
        }
        if new.started {
            total += 1;
            ready += new.ready as u32;
        }
    }
    let mut step = Step::default();
    let mut started = vec![false; slots.len()];
    let mut stopped = vec![false; slots.len()];
    // 1. An old replica whose replacement is ready has done its job.
    for (i, (old, new)) in slots.iter().enumerate() {
        if let Some(o) = old.filter(|o| !o.stopping) {
            if new.ready {
                step.stop.push(i as u32);
                stopped[i] = true;
                ready -= o.ready as u32;
            }
        }
    }
    // 2. A free ordinal (its old replica gone) gets its new replica at once: that only brings
    //    the count back up to `replicas`.
    for (i, (old, new)) in slots.iter().enumerate() {
        if old.is_none() && !new.started {
            step.start.push(i as u32);
            started[i] = true;
            total += 1;
        }
    }
    // 3. Surge: start replacements next to old replicas while the total allows.
    for (i, (old, new)) in slots.iter().enumerate() {
        if old.is_some() && !new.started && total < max_total {
            step.start.push(i as u32);
            started[i] = true;
            total += 1;
        }
    }
    // 4. Make room: stop old replicas while enough stay ready, as a Deployment scales its old
    //    ReplicaSet down. Unready ones first (stopping them costs nothing), then those whose
    //    replacement is already on its way, then by ordinal.
    let mut candidates: Vec<usize> = (0..slots.len())
        .filter(|&i| !stopped[i] && slots[i].0.is_some_and(|o| !o.stopping))
        .collect();
    candidates.sort_by_key(|&i| {
        let ready = slots[i].0.is_some_and(|o| o.ready);
        let replacing = slots[i].1.started || started[i];
        (ready, !replacing, i)
    });
    for i in candidates {
        let o_ready = slots[i].0.is_some_and(|o| o.ready);
        if o_ready && ready <= min_ready {
            break;
        }
        step.stop.push(i as u32);
        ready -= o_ready as u32;
    }
    step.stop.sort_unstable();
    step
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperbox_api::{IntOrPercent, RollingUpdate};

    fn b(max_surge: u32, max_unavailable: u32) -> Bounds {
        Bounds {
            max_surge,
            max_unavailable,
        }
    }

    /// Drive a rollout of `n` replicas to the end, making every started replica ready at the
    /// next step and every stopped one gone at the next step; returns the minimum ready count
    /// and the maximum total seen, and the number of steps.
    fn simulate(n: usize, bounds: Bounds, new_ever_ready: bool) -> (u32, u32, usize, bool) {
        let mut slots: Vec<(Option<Old>, New)> = (0..n)
            .map(|_| {
                (
                    Some(Old {
                        ready: true,
                        stopping: false,
                    }),
                    New::default(),
                )
            })
            .collect();
        let (mut min_ready, mut max_total) = (u32::MAX, 0);
        for step_no in 0..100 {
            let ready: u32 = slots
                .iter()
                .map(|(o, nw)| o.is_some_and(|o| o.ready && !o.stopping) as u32 + nw.ready as u32)
                .sum();
            let total: u32 = slots
                .iter()
                .map(|(o, nw)| o.is_some() as u32 + nw.started as u32)
                .sum();
            min_ready = min_ready.min(ready);
            max_total = max_total.max(total);
            if slots.iter().all(|(o, nw)| o.is_none() && nw.ready) {
                return (min_ready, max_total, step_no, true);
            }
            // Effects of the previous step land: stopping ones are gone, started ones ready.
            for (o, nw) in slots.iter_mut() {
                if o.is_some_and(|o| o.stopping) {
                    *o = None;
                }
                if nw.started && new_ever_ready {
                    nw.ready = true;
                }
            }
            let step = plan(&slots, bounds);
            if step.start.is_empty()
                && step.stop.is_empty()
                && !slots.iter().any(|(o, _)| o.is_some_and(|o| o.stopping))
                && !new_ever_ready
            {
                return (min_ready, max_total, step_no, false);
            }
            for i in step.start {
                slots[i as usize].1.started = true;
            }
            for i in step.stop {
                slots[i as usize].0.as_mut().unwrap().stopping = true;
            }
        }
        panic!("the rollout did not settle");
    }

    #[test]
    fn bounds_resolve_like_deployments() {
        let ru = |s: Option<IntOrPercent>, u: Option<IntOrPercent>| RollingUpdate {
            max_surge: s,
            max_unavailable: u,
        };
        assert_eq!(Bounds::resolve(&ru(None, None), 4), b(1, 1));
        assert_eq!(Bounds::resolve(&ru(None, None), 10), b(3, 2));
        assert_eq!(Bounds::resolve(&ru(None, None), 1), b(1, 0));
        assert_eq!(
            Bounds::resolve(
                &ru(Some(IntOrPercent::Int(0)), Some(IntOrPercent::Int(0))),
                3
            ),
            b(0, 1)
        );
        assert_eq!(
            Bounds::resolve(
                &ru(
                    Some(IntOrPercent::Percent("50%".into())),
                    Some(IntOrPercent::Int(2))
                ),
                5
            ),
            b(3, 2)
        );
    }

    #[test]
    fn rollouts_finish_within_their_bounds() {
        for n in [1usize, 2, 4, 10] {
            for (s, u) in [(1, 0), (0, 1), (1, 1), (3, 2), (0, 3), (2, 0)] {
                let (min_ready, max_total, steps, done) = simulate(n, b(s, u), true);
                assert!(done, "n={n} s={s} u={u}");
                let want_min = (n as u32).saturating_sub(u);
                assert!(
                    min_ready >= want_min,
                    "n={n} s={s} u={u}: {min_ready} ready < {want_min}"
                );
                assert!(
                    max_total <= n as u32 + s,
                    "n={n} s={s} u={u}: {max_total} containers"
                );
                assert!(steps <= 3 * n + 3, "n={n} s={s} u={u}: {steps} steps");
            }
        }
    }

    #[test]
    fn a_version_that_never_gets_ready_takes_down_at_most_max_unavailable() {
        for (s, u) in [(1, 1), (0, 1), (2, 0), (1, 2)] {
            let (min_ready, _, _, done) = simulate(4, b(s, u), false);
            assert!(!done);
            assert_eq!(min_ready, 4 - u, "s={s} u={u}");
        }
    }

    #[test]
    fn free_ordinals_start_at_once_and_unready_old_replicas_go_first() {
        let old = |ready| {
            Some(Old {
                ready,
                stopping: false,
            })
        };
        // Ordinal 1's old replica is gone; ordinal 2's is not ready.
        let slots = vec![
            (old(true), New::default()),
            (None, New::default()),
            (old(false), New::default()),
        ];
        let step = plan(&slots, b(0, 1));
        assert_eq!(step.start, vec![1]);
        // The unready one costs nothing; the ready one must stay (1 ready, at least 2 wanted).
        assert_eq!(step.stop, vec![2]);
        // With room for one unavailable replica, the lowest ready ordinal goes first.
        let slots = vec![(old(true), New::default()), (old(true), New::default())];
        assert_eq!(plan(&slots, b(0, 1)).stop, vec![0]);
        // A ready replacement retires its old replica.
        let slots = vec![(
            old(true),
            New {
                started: true,
                ready: true,
            },
        )];
        assert_eq!(plan(&slots, b(0, 0)).stop, vec![0]);
    }
}
