//! Admission on plain data: labels, capacity, reservations and the pressure gate.

use super::*;

const MI: u64 = 1 << 20;

fn node(mem_mi: u64, cpu_m: u64) -> NodeFacts {
    NodeFacts {
        id: "n1".into(),
        labels: node_labels("box", &[("zone".into(), "a".into())]),
        capacity: ResourceAmounts {
            cpu_millis: cpu_m,
            memory_bytes: mem_mi * MI,
        },
        allocatable: ResourceAmounts {
            cpu_millis: cpu_m,
            memory_bytes: mem_mi * MI,
        },
        pressure_gate: None,
        pressure_dir: None,
    }
}

#[test]
fn pressure_gates_parse_with_clear_errors() {
    assert_eq!(PressureGate::parse("off").unwrap(), None);
    assert_eq!(
        PressureGate::parse("memory.full.avg10=10").unwrap(),
        Some(DEFAULT_PRESSURE_GATE)
    );
    let g = PressureGate::parse("cpu.some.avg60=25%").unwrap().unwrap();
    assert_eq!(
        (g.resource, g.kind, g.window, g.threshold),
        ("cpu", "some", "avg60", 25.0)
    );
    for (bad, says) in [
        ("memory", "RESOURCE.KIND.WINDOW=PERCENT"),
        ("disk.full.avg10=1", "not a PSI resource"),
        ("memory.half.avg10=1", "not a PSI line"),
        ("memory.full.avg5=1", "not a PSI average"),
        ("memory.full.avg10=x", "not a percentage"),
        ("memory.full.avg10=120", "between 0 and 100"),
    ] {
        let e = PressureGate::parse(bad).unwrap_err();
        assert!(e.contains(says), "{bad}: {e}");
    }
}

#[test]
fn under_pressure_only_new_replicas_are_refused() {
    let mut n = node(1000, 1000);
    n.pressure_gate = Some(DEFAULT_PRESSURE_GATE);
    let current: HashMap<String, u32> = [("a".to_string(), 2)].into();
    let (grow, same, shrink, new) = (
        w("a", "  replicas: 3\n"),
        w("a", "  replicas: 2\n"),
        w("a", "  replicas: 1\n"),
        w("b", ""),
    );
    let batch = [&grow, &same, &shrink, &new];
    // Calm (or no reading, or no gate): nothing is refused.
    assert!(pressure_refusals(&n, Some(3.0), &current, &batch).is_empty());
    assert!(pressure_refusals(&n, None, &current, &batch).is_empty());
    let refused = pressure_refusals(&n, Some(12.5), &current, &batch);
    let at: Vec<usize> = refused.iter().map(|(i, _)| *i).collect();
    assert_eq!(at, [0, 3]);
    let e = &refused[0].1;
    assert_eq!(e.reason.as_deref(), Some("NodePressure"));
    assert_eq!(e.field, "spec.replicas");
    assert!(
        e.message
            .contains("memory.full.avg10 is 12.5% (threshold 10.0%); 1 new replica"),
        "{}",
        e.message
    );
    n.pressure_gate = None;
    assert!(pressure_refusals(&n, Some(99.0), &current, &batch).is_empty());
}

fn w(name: &str, extra: &str) -> Workload {
    serde_norway::from_str(&format!(
        "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n  image: x\n{extra}"
    ))
    .unwrap()
}

fn admitted(entries: &[(&str, u64, u64)]) -> HashMap<String, ResourceAmounts> {
    entries
        .iter()
        .map(|(n, mem, cpu)| {
            (
                n.to_string(),
                ResourceAmounts {
                    memory_bytes: mem * MI,
                    cpu_millis: *cpu,
                },
            )
        })
        .collect()
}

#[test]
fn requests_default_to_limits_and_multiply_by_replicas() {
    let a = w(
        "a",
        "  replicas: 3\n  resources: {memory: 100Mi, cpu: 200m}\n",
    );
    assert_eq!(a.total_request().memory_bytes, 300 * MI);
    assert_eq!(a.total_request().cpu_millis, 600);
    let b = w(
        "b",
        "  replicas: 2\n  resources: {memory: 100Mi, requests: {memory: 10Mi}}\n",
    );
    assert_eq!(b.total_request().memory_bytes, 20 * MI);
    assert_eq!(b.total_request().cpu_millis, 0);
    let s = w("s", "  suspend: true\n  resources: {memory: 100Mi}\n");
    assert_eq!(s.total_request(), ResourceAmounts::default());
    // Nothing requested: always fits, like a BestEffort pod.
    let none = w("n", "  replicas: 50\n");
    assert!(admit_batch(&node(0, 0), &HashMap::new(), &[&none]).is_ok());
}

#[test]
fn a_batch_is_admitted_in_order_and_all_or_nothing() {
    let n = node(1000, 2000);
    let a = w("a", "  resources: {requests: {memory: 600Mi}}\n");
    let b = w("b", "  resources: {requests: {memory: 300Mi}}\n");
    let c = w(
        "c",
        "  resources: {requests: {memory: 200Mi, cpu: 2500m}}\n",
    );
    let staged = admit_batch(&n, &HashMap::new(), &[&a, &b]).unwrap();
    assert_eq!(staged.len(), 2);
    let errs = admit_batch(&n, &HashMap::new(), &[&a, &b, &c]).unwrap_err();
    // c needs 200Mi with 100Mi left after a and b, and more cpu than the node has.
    let reasons: Vec<_> = errs
        .iter()
        .map(|(p, e)| (*p, e.reason.clone().unwrap()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (2, INSUFFICIENT_MEMORY.to_string()),
            (2, INSUFFICIENT_CPU.to_string())
        ]
    );
    let mem = &errs[0].1;
    assert_eq!(mem.field, "spec.resources.requests.memory");
    assert!(mem.message.contains("1 × 200Mi requested; 100Mi of the node's 1000Mi allocatable memory is free (900Mi requested by other workloads)"), "{}", mem.message);
    assert!(
        errs[1].1.message.contains("1 × 2500m requested"),
        "{}",
        errs[1].1.message
    );
}

#[test]
fn a_workload_counts_its_own_previous_requests_once() {
    let n = node(1000, 1000);
    let held = admitted(&[("a", 600, 0), ("other", 300, 0)]);
    // a grows from 600Mi to 700Mi: 300Mi others + 700Mi = the whole node, fits.
    let grown = w("a", "  resources: {requests: {memory: 700Mi}}\n");
    assert!(admit_batch(&n, &held, &[&grown]).is_ok());
    // Scaling to two replicas of 600Mi does not fit.
    let scaled = w(
        "a",
        "  replicas: 2\n  resources: {requests: {memory: 600Mi}}\n",
    );
    let errs = admit_batch(&n, &held, &[&scaled]).unwrap_err();
    assert_eq!(errs[0].1.reason.as_deref(), Some(INSUFFICIENT_MEMORY));
    assert!(
        errs[0].1.message.contains("2 × 600Mi"),
        "{}",
        errs[0].1.message
    );
    // A node over-committed after a bigger reservation still accepts what asks no more.
    let small = node(500, 1000);
    let same = w("a", "  resources: {requests: {memory: 600Mi}}\n");
    assert!(admit_batch(&small, &held, &[&same]).is_ok());
    let down = w(
        "a",
        "  replicas: 0\n  resources: {requests: {memory: 600Mi}}\n",
    );
    assert!(admit_batch(&small, &held, &[&down]).is_ok());
}

#[test]
fn the_node_selector_must_match_the_labels() {
    let n = node(1000, 1000);
    let ok = w("a", "  nodeSelector: {zone: a, kubernetes.io/os: linux}\n");
    assert!(admit_batch(&n, &HashMap::new(), &[&ok]).is_ok());
    let other = w("b", "  nodeSelector: {zone: b, disk: ssd}\n");
    let errs = admit_batch(&n, &HashMap::new(), &[&other]).unwrap_err();
    assert_eq!(errs.len(), 2);
    assert!(errs
        .iter()
        .all(|(_, e)| e.reason.as_deref() == Some(NODE_SELECTOR_MISMATCH)));
    assert_eq!(errs[0].1.field, "spec.nodeSelector.disk");
    assert!(
        errs[0].1.message.contains("has no label disk"),
        "{}",
        errs[0].1.message
    );
    assert!(
        errs[1].1.message.contains("node n1 has zone=a"),
        "{}",
        errs[1].1.message
    );
}

#[test]
fn labels_and_amounts_parse_like_kubernetes() {
    assert_eq!(
        parse_label("topology.kubernetes.io/zone=eu-1").unwrap(),
        ("topology.kubernetes.io/zone".into(), "eu-1".into())
    );
    assert_eq!(parse_label("edge=").unwrap(), ("edge".into(), "".into()));
    for bad in ["novalue", "-x=1", "a b=c", "Bad_Prefix!/x=1", "x=-y"] {
        assert!(parse_label(bad).is_err(), "{bad}");
    }
    let labels = node_labels(
        "box",
        &[("kubernetes.io/hostname".into(), "renamed".into())],
    );
    assert_eq!(labels["kubernetes.io/hostname"], "renamed");
    assert_eq!(labels["kubernetes.io/os"], "linux");
    let r = parse_amounts("cpu=500m, memory=1Gi").unwrap();
    assert_eq!((r.cpu_millis, r.memory_bytes), (500, 1 << 30));
    assert!(parse_amounts("gpu=1").is_err());
    assert_eq!(bytes(1536 * MI), "1.5Gi");
    assert_eq!(bytes(600 * MI), "600Mi");
    assert_eq!(bytes(17), "17B");
}
