//! Pressure samples: the last PSI readings of every running container and of the node, and
//! how they moved over the last few (the trend status reports).

use std::collections::HashMap;

use super::replica::Stage;
use super::Supervisor;

/// Recent PSI readings of one container (the latest, and `some avg10` of the last few for the
/// trend).
#[derive(Default, Clone)]
pub(super) struct PressureSamples {
    latest: Option<hyperbox_api::Pressure>,
    cgroup_id: Option<u64>,
    history: PressureHistory,
}

/// `some avg10` of cpu, memory and io, with when each was read.
pub(super) type PressureHistory = std::collections::VecDeque<(std::time::Instant, [f32; 3])>;

/// `some avg10` of cpu, memory and io of a reading.
fn some_avg10(p: &hyperbox_api::Pressure) -> [f32; 3] {
    [p.cpu.some.avg10, p.memory.some.avg10, p.io.some.avg10]
}

/// Add a sample, keeping the last [`PRESSURE_HISTORY`].
fn push_sample(h: &mut PressureHistory, at: std::time::Instant, sample: [f32; 3]) {
    h.push_back((at, sample));
    while h.len() > PRESSURE_HISTORY {
        h.pop_front();
    }
}

/// Change of `some avg10` from the first sample to the last (at least two).
fn trend_of(h: &PressureHistory) -> Option<hyperbox_api::PressureTrend> {
    match (h.front(), h.back()) {
        (Some(first), Some(last)) if h.len() >= 2 => Some(hyperbox_api::PressureTrend {
            cpu: last.1[0] - first.1[0],
            memory: last.1[1] - first.1[1],
            io: last.1[2] - first.1[2],
            over_seconds: last.0.duration_since(first.0).as_secs_f32(),
        }),
        _ => None,
    }
}

/// Samples kept for the trend (at the 2 s sampling period: about 10 s).
const PRESSURE_HISTORY: usize = 6;

impl Supervisor {
    /// Read the PSI of every running container (its cgroup v2 `*.pressure` files), off the
    /// async threads; what status reports until the next round.
    pub async fn sample_pressure(&self) {
        let ids: Vec<String> = self
            .snapshots()
            .await
            .iter()
            .flat_map(|r| {
                r.all_replicas()
                    .filter(|x| matches!(x.stage, Stage::Running { .. }))
                    .filter_map(|x| x.container_id().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .collect();
        let runtime = self.shared.runtime.clone();
        let parent = self.node_facts().and_then(|f| f.pressure_dir);
        let Ok((readings, node)) = tokio::task::spawn_blocking(move || {
            let readings = ids
                .into_iter()
                .map(|id| {
                    let dir = runtime.v2_cgroup(&id);
                    let p = dir.as_deref().and_then(crate::pressure::psi::cgroup);
                    let cid = dir.as_deref().and_then(crate::pressure::psi::cgroup_id);
                    (id, p, cid)
                })
                .collect::<Vec<_>>();
            let host = crate::pressure::psi::node().as_ref().map(some_avg10);
            let workloads = parent
                .as_deref()
                .and_then(crate::pressure::psi::cgroup)
                .as_ref()
                .map(some_avg10);
            let node = match (host, workloads) {
                (Some(a), Some(b)) => Some([a[0].max(b[0]), a[1].max(b[1]), a[2].max(b[2])]),
                (a, b) => a.or(b),
            };
            (readings, node)
        })
        .await
        else {
            return;
        };
        let now = std::time::Instant::now();
        if let Some(n) = node {
            push_sample(&mut self.node_pressure.lock().unwrap(), now, n);
        }
        let mut map = self.pressure.lock().unwrap();
        let mut next = HashMap::with_capacity(readings.len());
        for (id, p, cid) in readings {
            let mut s = map.remove(&id).unwrap_or_default();
            if let Some(p) = &p {
                push_sample(&mut s.history, now, some_avg10(p));
            }
            s.latest = p;
            s.cgroup_id = cid;
            next.insert(id, s);
        }
        *map = next;
    }

    /// The last PSI sample, trend and cgroup id of a container.
    pub(super) fn pressure_of(
        &self,
        container: &str,
    ) -> (
        Option<hyperbox_api::Pressure>,
        Option<hyperbox_api::PressureTrend>,
        Option<u64>,
    ) {
        let map = self.pressure.lock().unwrap();
        let Some(s) = map.get(container) else {
            return (None, None, None);
        };
        (s.latest.clone(), trend_of(&s.history), s.cgroup_id)
    }

    /// How the node's pressure (the higher of the host's and its workloads') moved over the
    /// last samples.
    pub fn node_trend(&self) -> Option<hyperbox_api::PressureTrend> {
        trend_of(&self.node_pressure.lock().unwrap())
    }
}
