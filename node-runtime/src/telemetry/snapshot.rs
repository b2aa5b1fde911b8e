//! Everything the node exports, in one snapshot: node and container PSI, pressure protection,
//! workload states, per-container cgroup readings and eBPF counters, and the runtime's own
//! counters. Both `/metrics` ([`super::prom`]) and the OTLP export ([`super::otlp`]) encode it.
//! It is built from plain data that the workloads gather (`Supervisor::telemetry_snapshot`).

use std::collections::{BTreeMap, HashMap};

use hyperbox_api::{NodeSummary, WorkloadStatus};

use super::{
    Attrs, CgStats, CgroupReading, Current, HistogramValue, Kind, ReplicaKey, Resource, Snapshot,
    Value, COUNTERS,
};

/// The snapshot of the node's workloads (`list`), its `summary` and its containers' cgroup
/// `readings` (by container id), with the eBPF totals and the runtime's own counters.
pub async fn build(
    list: Vec<WorkloadStatus>,
    summary: NodeSummary,
    readings: HashMap<String, CgroupReading>,
) -> Snapshot {
    let telemetry = super::get();
    let since = telemetry
        .map(|t| t.since)
        .unwrap_or_else(std::time::SystemTime::now);
    let node_name = telemetry
        .map(|t| t.node_name.clone())
        .unwrap_or_else(|| summary.name.clone());
    let mut snap = Snapshot {
        resources: vec![Resource {
            otel: vec![
                ("service.name", "hyperbox-node".into()),
                ("service.version", env!("CARGO_PKG_VERSION").into()),
                ("host.name", node_name.clone()),
                ("hyperbox.node.id", summary.id.clone()),
            ],
            labels: vec![],
            since,
        }],
        families: vec![],
        at: std::time::SystemTime::now(),
    };
    // One resource per replica with a container (or with counters from earlier ones).
    let mut current: BTreeMap<ReplicaKey, Option<Current>> = BTreeMap::new();
    let mut replicas = Vec::new();
    for w in &list {
        for r in &w.replicas {
            let key = ReplicaKey {
                namespace: w.namespace.clone(),
                workload: w.name.clone(),
                replica: r.index,
            };
            // The cgroup id comes with the PSI sample; until then, from this snapshot's read.
            let cur = r.container_id.as_ref().and_then(|id| {
                let reading = readings.get(id).copied().unwrap_or_default();
                Some(Current {
                    id: id.clone(),
                    cgroup_id: r.cgroup_id.or(reading.cgroup_id)?,
                    cpu_usec: reading.cpu_usec,
                })
            });
            // An outdated replica of a rolling update shares the index: the current one wins.
            if r.outdated && current.contains_key(&key) {
                continue;
            }
            current.insert(key.clone(), cur);
            let mut otel = vec![
                ("host.name", node_name.clone()),
                ("k8s.namespace.name", w.namespace.clone()),
                ("hyperbox.workload.name", w.name.clone()),
                ("hyperbox.replica.index", r.index.to_string()),
                ("container.name", format!("{}-{}", w.name, r.index)),
                ("container.runtime", "hyperbox".into()),
                ("container.image.name", w.image.clone()),
            ];
            if let Some(id) = &r.container_id {
                otel.push(("container.id", id.clone()));
            }
            if let Some(d) = &w.image_digest {
                otel.push(("oci.manifest.digest", d.clone()));
            }
            if let Some(rev) = &w.revision {
                otel.push(("vcs.ref.head.revision", rev.clone()));
            }
            snap.resources.push(Resource {
                otel,
                labels: vec![
                    ("namespace", w.namespace.clone()),
                    ("workload", w.name.clone()),
                    ("replica", r.index.to_string()),
                ],
                since,
            });
            replicas.push((snap.resources.len() - 1, key, w, r));
        }
    }
    let totals = match telemetry {
        Some(t) => tokio::task::spawn_blocking(move || t.replica_totals(&current))
            .await
            .unwrap_or_default(),
        None => Default::default(),
    };

    let pressure_points =
        |snap: &mut Snapshot,
         prefix: (&'static str, &'static str),
         help: (&'static str, &'static str),
         readings: Vec<(usize, Attrs, hyperbox_api::Pressure)>| {
            for (res, attrs, p) in readings {
                for (rname, r) in [("cpu", &p.cpu), ("memory", &p.memory), ("io", &p.io)] {
                    for (kind, a) in [("some", &r.some), ("full", &r.full)] {
                        let mut at = attrs.clone();
                        at.push(("resource", rname.to_string()));
                        at.push(("kind", kind.to_string()));
                        snap.family(prefix.0, help.0, "%", Kind::Gauge).push(
                            res,
                            at.clone(),
                            Value::Float(f64::from(a.avg10)),
                        );
                        snap.family(prefix.1, help.1, "s", Kind::Counter).push(
                            res,
                            at,
                            Value::Float(a.total as f64 / 1e6),
                        );
                    }
                }
            }
        };
    let node_readings: Vec<_> = [
        ("host", &summary.pressure),
        ("workloads", &summary.workloads_pressure),
    ]
    .into_iter()
    .filter_map(|(scope, p)| Some((0, vec![("scope", scope.to_string())], p.clone()?)))
    .collect();
    pressure_points(
        &mut snap,
        ("hyperbox.node.pressure.avg10", "hyperbox.node.pressure.stalled"),
        (
            "The host (scope=host) and the node's workloads together (scope=workloads): PSI share of time stalled over 10s (percent).",
            "The host (scope=host) and the node's workloads together (scope=workloads): PSI total stall time.",
        ),
        node_readings,
    );
    let container_readings: Vec<_> = replicas
        .iter()
        .filter_map(|(res, _, _, r)| Some((*res, vec![], r.pressure.clone()?)))
        .collect();
    pressure_points(
        &mut snap,
        (
            "hyperbox.container.pressure.avg10",
            "hyperbox.container.pressure.stalled",
        ),
        (
            "A container: PSI share of time stalled over 10s (percent).",
            "A container: PSI total stall time.",
        ),
        container_readings,
    );

    for (res, key, w, r) in &replicas {
        let int = |v: u64| Value::Int(v);
        snap.family(
            "hyperbox.container.info",
            "The replica's current container, image and source revision (value 1).",
            "",
            Kind::Gauge,
        )
        .push(
            *res,
            vec![
                ("container.id", r.container_id.clone().unwrap_or_default()),
                ("image", w.image.clone()),
                ("image.digest", w.image_digest.clone().unwrap_or_default()),
                ("revision", w.revision.clone().unwrap_or_default()),
            ],
            int(1),
        );
        snap.family(
            "hyperbox.container.restarts",
            "Restarts of the replica's container.",
            "{restart}",
            Kind::Counter,
        )
        .push(*res, vec![], int(u64::from(r.restarts)));
        if r.throttled {
            snap.family(
                "hyperbox.container.throttled",
                "Whether pressure protection holds the replica back.",
                "",
                Kind::Gauge,
            )
            .push(*res, vec![], int(1));
        }
        if let Some(id) = &r.container_id {
            if let Some(m) = readings.get(id).and_then(|x| x.memory_bytes) {
                snap.family(
                    "container.memory.usage",
                    "Memory used by the container's cgroup.",
                    "By",
                    Kind::Gauge,
                )
                .push(*res, vec![], int(m));
            }
        }
        let Some(t) = totals.by_replica.get(key) else {
            continue;
        };
        snap.family(
            "container.cpu.time",
            "CPU time the replica's containers used.",
            "s",
            Kind::Counter,
        )
        .push(*res, vec![], Value::Float(t.cpu_usec as f64 / 1e6));
        if !telemetry.is_some_and(|t| t.ebpf.active) {
            continue;
        }
        let e = &t.ebpf;
        for (dir, bytes, packets) in [
            ("transmit", e.tx_bytes, e.tx_packets),
            ("receive", e.rx_bytes, e.rx_packets),
        ] {
            snap.family(
                "container.network.io",
                "Bytes the replica's containers sent and received (IP packets, eBPF cgroup_skb).",
                "By",
                Kind::Counter,
            )
            .push(*res, vec![("network.io.direction", dir.into())], int(bytes));
            snap.family(
                "hyperbox.container.network.packets",
                "IP packets the replica's containers sent and received.",
                "{packet}",
                Kind::Counter,
            )
            .push(
                *res,
                vec![("network.io.direction", dir.into())],
                int(packets),
            );
        }
        for (name, help, unit, v) in [
            (
                "hyperbox.container.process.execs",
                "Successful execve calls in the replica's containers.",
                "{exec}",
                e.execs,
            ),
            (
                "hyperbox.container.process.exits",
                "Processes (not threads) that exited in the replica's containers.",
                "{process}",
                e.exits,
            ),
            (
                "hyperbox.container.oom_kills",
                "Processes of the replica's containers chosen by the OOM killer.",
                "{kill}",
                e.oom_kills,
            ),
            (
                "hyperbox.container.tcp.connects",
                "TCP connections the replica's containers opened (SYN sent).",
                "{connection}",
                e.tcp_connects,
            ),
            (
                "hyperbox.container.tcp.accepts",
                "TCP connections the replica's containers' listeners established.",
                "{connection}",
                e.tcp_accepts,
            ),
            (
                "hyperbox.container.tcp.retransmits",
                "TCP retransmissions the replica's containers sent (one per retransmitted packet, which may carry several segments).",
                "{packet}",
                e.tcp_retransmits,
            ),
        ] {
            snap.family(name, help, unit, Kind::Counter)
                .push(*res, vec![], int(v));
        }
        // The kernel's power-of-two slots, two to a bucket (2 us, 8 us, ... 2.1 s, +Inf):
        // half the series per container, still a factor of 4 between bounds.
        let buckets: Vec<(f64, u64)> = e
            .rq_slots
            .chunks(2)
            .enumerate()
            .map(|(i, c)| {
                (
                    CgStats::rq_bound_seconds(2 * i + c.len() - 1),
                    c.iter().sum(),
                )
            })
            .collect();
        snap.family(
            "hyperbox.container.runqueue.latency",
            "Time the replica's tasks waited in a run queue (wakeup or preemption to running).",
            "s",
            Kind::Histogram,
        )
        .push(
            *res,
            vec![],
            Value::Histogram(HistogramValue {
                buckets,
                sum: e.rq_sum_ns as f64 / 1e9,
                count: e.rq_count,
            }),
        );
    }

    if let Some(p) = &summary.protection {
        snap.family("hyperbox.protection.level", "Pressure protection's signal: the workloads' memory full stall over its sustain window (percent).", "", Kind::Gauge)
            .push(0, vec![], Value::Float(f64::from(p.level.unwrap_or(0.0))));
        for (name, v, help) in [
            (
                "hyperbox.protection.throttles",
                p.throttles_total,
                "Replicas throttled by pressure protection.",
            ),
            (
                "hyperbox.protection.evictions",
                p.evictions_total,
                "Replicas evicted by pressure protection (EvictedForPressure).",
            ),
            (
                "hyperbox.protection.restores",
                p.restores_total,
                "Evicted replicas started again once the node was calm.",
            ),
        ] {
            snap.family(name, help, "", Kind::Counter)
                .push(0, vec![], Value::Int(v));
        }
    }
    if let Some(g) = &summary.pressure_admission {
        snap.family(
            "hyperbox.pressure_admission.info",
            "The signal and threshold above which new replicas are refused (NodePressure).",
            "",
            Kind::Gauge,
        )
        .push(0, vec![("gate", g.clone())], Value::Int(1));
    }
    for w in &list {
        let labels = vec![
            ("namespace", w.namespace.clone()),
            ("workload", w.name.clone()),
        ];
        snap.family(
            "hyperbox.workload.ready",
            "Whether all replicas of the workload are ready.",
            "",
            Kind::Gauge,
        )
        .push(0, labels.clone(), Value::Int(u64::from(w.ready)));
        snap.family(
            "hyperbox.workload.restarts",
            "Container restarts of the workload.",
            "",
            Kind::Counter,
        )
        .push(0, labels, Value::Int(u64::from(w.restarts)));
    }
    // The runtime's own counters.
    let c = &COUNTERS;
    for (name, help, o) in [
        (
            "hyperbox.image.pulls",
            "Image pulls from a registry, by result.",
            &c.pulls,
        ),
        (
            "hyperbox.image.prepares",
            "Image preparations (pull if needed, unpack into the store), by result.",
            &c.prepares,
        ),
        (
            "hyperbox.container.starts",
            "Container creations, by result.",
            &c.starts,
        ),
        (
            "hyperbox.probe.runs",
            "Readiness probe runs, by result.",
            &c.probes,
        ),
    ] {
        let f = snap.family(name, help, "", Kind::Counter);
        for (result, v) in [("success", &o.ok), ("failure", &o.failed)] {
            f.push(
                0,
                vec![("result", result.into())],
                Value::Int(v.load(std::sync::atomic::Ordering::Relaxed)),
            );
        }
    }
    for (name, help, h) in [
        (
            "hyperbox.image.prepare.duration",
            "How long image preparations took (pull included).",
            &c.prepare_seconds,
        ),
        (
            "hyperbox.container.start.duration",
            "How long container creation and start took.",
            &c.start_seconds,
        ),
        (
            "hyperbox.reconcile.duration",
            "From a workload's spec being applied to all its replicas running it.",
            &c.reconcile_seconds,
        ),
    ] {
        snap.family(name, help, "s", Kind::Histogram)
            .push(0, vec![], Value::Histogram(h.read()));
    }
    if let Some(t) = telemetry {
        let f = snap.family(
            "hyperbox.ebpf.program.attached",
            "Whether each eBPF telemetry program is attached.",
            "",
            Kind::Gauge,
        );
        for (p, state) in &t.ebpf.programs {
            f.push(
                0,
                vec![("program", p.clone())],
                Value::Int(u64::from(state == super::ebpf::ATTACHED)),
            );
        }
        snap.family(
            "hyperbox.ebpf.map.entries",
            "Containers in the eBPF counters map.",
            "",
            Kind::Gauge,
        )
        .push(0, vec![], Value::Int(totals.map_entries as u64));
    }
    snap
}
