//! Pure parts of telemetry: bookkeeping across container restarts, the snapshot's two
//! encodings, histograms. No root, no kernel.

use super::*;

fn key(w: &str, i: u32) -> ReplicaKey {
    ReplicaKey {
        namespace: "default".into(),
        workload: w.into(),
        replica: i,
    }
}

fn current(id: &str, cg: u64, cpu: u64) -> Option<Current> {
    Some(Current {
        id: id.into(),
        cgroup_id: cg,
        cpu_usec: Some(cpu),
    })
}

#[test]
fn the_struct_matches_the_c_layout() {
    // 12 counters and RQ_SLOTS slots, all u64: `struct cg_stats` in ebpf/hyperbox.bpf.c.
    assert_eq!(std::mem::size_of::<CgStats>(), 8 * (12 + ebpf::RQ_SLOTS));
    let src = include_str!("../../../ebpf/hyperbox.bpf.c");
    assert!(src.contains(&format!("#define RQ_SLOTS {}", ebpf::RQ_SLOTS)));
}

#[test]
fn a_replica_keeps_its_gone_containers_cpu_and_is_forgotten_with_its_replica() {
    let t = Telemetry::new(EbpfMode::Off, "/hyperbox-unit", "n1".into());
    assert!(!t.ebpf.active);
    assert!(t.ebpf.programs.values().all(|s| s == "disabled"));
    t.container_started("a-0-1", key("a", 0), 11);
    // The first container used 1.5 s, then went; its replacement has used 0.25 s.
    t.container_removed("a-0-1", Some(1_500_000));
    let mut cur = BTreeMap::new();
    cur.insert(key("a", 0), current("a-0-2", 12, 250_000));
    cur.insert(key("b", 0), None);
    let totals = t.replica_totals(&cur).by_replica;
    assert_eq!(totals[&key("a", 0)].cpu_usec, 1_750_000);
    assert_eq!(totals[&key("b", 0)], Totals::default());
    // The replica goes: so does what it had.
    cur.remove(&key("a", 0));
    t.replica_totals(&cur);
    cur.insert(key("a", 0), current("a-0-3", 13, 10));
    assert_eq!(t.replica_totals(&cur).by_replica[&key("a", 0)].cpu_usec, 10);
    // An unknown container going is not an error.
    t.container_removed("nobody", Some(5));
}

#[test]
fn counters_add_field_by_field() {
    let mut a = CgStats {
        execs: 1,
        rx_bytes: 10,
        ..Default::default()
    };
    a.rq_slots[3] = 2;
    let mut b = a;
    b.oom_kills = 1;
    a.add(&b);
    assert_eq!(
        (a.execs, a.rx_bytes, a.oom_kills, a.rq_slots[3]),
        (2, 20, 1, 4)
    );
    assert_eq!(CgStats::rq_bound_seconds(0), 1e-6);
    assert_eq!(CgStats::rq_bound_seconds(10), 1024e-6);
    assert!(CgStats::rq_bound_seconds(ebpf::RQ_SLOTS - 1).is_infinite());
}

#[test]
fn histogram_buckets_by_upper_bound() {
    let h = Histogram::new(&[0.1, 1.0]);
    h.observe(Duration::from_millis(50));
    h.observe(Duration::from_millis(100));
    h.observe(Duration::from_millis(500));
    h.observe(Duration::from_secs(7));
    let v = h.read();
    assert_eq!(v.buckets, vec![(0.1, 2), (1.0, 1), (f64::INFINITY, 1)]);
    assert_eq!(v.count, 4);
    assert!((v.sum - 7.65).abs() < 1e-9, "{}", v.sum);
}

#[test]
fn ebpf_mode_parses() {
    assert_eq!("auto".parse::<EbpfMode>(), Ok(EbpfMode::Auto));
    assert_eq!("off".parse::<EbpfMode>(), Ok(EbpfMode::Off));
    assert!("maybe".parse::<EbpfMode>().unwrap_err().contains("--ebpf"));
}

fn sample_snapshot() -> Snapshot {
    let t0 = UNIX_EPOCH_PLUS(1_000);
    let mut s = Snapshot {
        resources: vec![
            Resource {
                otel: vec![("host.name", "n1".into())],
                labels: vec![],
                since: t0,
            },
            Resource {
                otel: vec![
                    ("hyperbox.workload.name", "web".into()),
                    ("oci.manifest.digest", "sha256:ab".into()),
                ],
                labels: vec![
                    ("namespace", "default".into()),
                    ("workload", "web".into()),
                    ("replica", "0".into()),
                ],
                since: t0,
            },
        ],
        families: vec![],
        at: UNIX_EPOCH_PLUS(1_010),
    };
    s.family("container.cpu.time", "CPU.", "s", Kind::Counter)
        .push(1, vec![], Value::Float(1.5));
    s.family("container.network.io", "Bytes.", "By", Kind::Counter)
        .push(
            1,
            vec![("network.io.direction", "transmit".into())],
            Value::Int(42),
        );
    s.family("container.memory.usage", "Memory.", "By", Kind::Gauge)
        .push(1, vec![], Value::Int(4096));
    s.family("hyperbox.ebpf.map.entries", "Entries.", "", Kind::Gauge)
        .push(0, vec![], Value::Int(3));
    s.family(
        "hyperbox.container.runqueue.latency",
        "Waits.",
        "s",
        Kind::Histogram,
    )
    .push(
        1,
        vec![],
        Value::Histogram(HistogramValue {
            buckets: vec![(0.001, 2), (0.01, 3), (f64::INFINITY, 1)],
            sum: 0.5,
            count: 6,
        }),
    );
    s
}

#[allow(non_snake_case)]
fn UNIX_EPOCH_PLUS(secs: u64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(secs)
}

#[test]
fn prometheus_names_units_labels_and_cumulative_buckets() {
    let text = prom::encode(sample_snapshot());
    for want in [
        "# TYPE container_cpu_time_seconds counter",
        "container_cpu_time_seconds_total{namespace=\"default\",workload=\"web\",replica=\"0\"} 1.5",
        "container_network_io_bytes_total{namespace=\"default\",workload=\"web\",replica=\"0\",network_io_direction=\"transmit\"} 42",
        "container_memory_usage_bytes{namespace=\"default\",workload=\"web\",replica=\"0\"} 4096",
        // No empty braces on a series without labels.
        "\nhyperbox_ebpf_map_entries 3\n",
        "hyperbox_container_runqueue_latency_seconds_bucket{le=\"0.001\",namespace=\"default\",workload=\"web\",replica=\"0\"} 2",
        "hyperbox_container_runqueue_latency_seconds_bucket{le=\"0.01\",namespace=\"default\",workload=\"web\",replica=\"0\"} 5",
        "hyperbox_container_runqueue_latency_seconds_bucket{le=\"+Inf\",namespace=\"default\",workload=\"web\",replica=\"0\"} 6",
        "hyperbox_container_runqueue_latency_seconds_count{namespace=\"default\",workload=\"web\",replica=\"0\"} 6",
        "# EOF",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
}

#[test]
fn otlp_request_has_one_resource_per_container_and_cumulative_sums() {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let req = otlp::request(&sample_snapshot());
    assert_eq!(req.resource_metrics.len(), 2);
    let container = &req.resource_metrics[1];
    let attrs: Vec<(String, String)> = container
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Any::StringValue(s)) => s.clone(),
                other => panic!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect();
    assert!(attrs.contains(&("oci.manifest.digest".into(), "sha256:ab".into())));
    let metrics = &container.scope_metrics[0].metrics;
    let cpu = metrics
        .iter()
        .find(|m| m.name == "container.cpu.time")
        .unwrap();
    assert_eq!(cpu.unit, "s");
    match cpu.data.as_ref().unwrap() {
        Data::Sum(s) => {
            assert!(s.is_monotonic);
            assert_eq!(s.aggregation_temporality, 2);
            assert_eq!(s.data_points[0].start_time_unix_nano, 1_000_000_000_000);
            assert_eq!(s.data_points[0].time_unix_nano, 1_010_000_000_000);
        }
        other => panic!("{other:?}"),
    }
    let rq = metrics
        .iter()
        .find(|m| m.name == "hyperbox.container.runqueue.latency")
        .unwrap();
    match rq.data.as_ref().unwrap() {
        Data::Histogram(h) => {
            let p = &h.data_points[0];
            assert_eq!(p.bucket_counts, vec![2, 3, 1]);
            assert_eq!(p.explicit_bounds, vec![0.001, 0.01]);
            assert_eq!(p.count, 6);
        }
        other => panic!("{other:?}"),
    }
    // The node's gauge stays on the node's resource.
    let node = &req.resource_metrics[0].scope_metrics[0].metrics;
    assert_eq!(node.len(), 1);
    assert_eq!(node[0].name, "hyperbox.ebpf.map.entries");
}

#[test]
fn otlp_endpoint_must_be_a_url() {
    assert_eq!(
        otlp::metrics_url("http://127.0.0.1:4318/").unwrap(),
        "http://127.0.0.1:4318/v1/metrics"
    );
    let e = otlp::metrics_url("127.0.0.1:4318").unwrap_err().to_string();
    assert!(e.contains("--otlp-endpoint"), "{e}");
}
