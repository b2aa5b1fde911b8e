//! Admission: whether this node takes a workload, as a pure function of plain data.
//!
//! A node admits a workload when its `nodeSelector` matches the node's labels and the requests
//! of its desired replicas, added to what the node has already admitted, fit the allocatable
//! (capacity minus `--reserve`). Accounting is by desired state, as a scheduler counts: a
//! workload holds its requests from the apply that admits it until it is deleted, whether or
//! not its containers run yet. A change that does not ask for more (the same requests, a
//! scale-down, a suspend) is never refused, even when the node is over-committed after its
//! reservations grew.

use std::collections::{BTreeMap, HashMap};

use hyperbox_api::refusal::{
    INSUFFICIENT_CPU, INSUFFICIENT_MEMORY, NODE_PRESSURE, NODE_SELECTOR_MISMATCH,
};
use hyperbox_api::validate::FieldError;
use hyperbox_api::{ResourceAmounts, Workload};

/// Workloads (by position) a node refuses, one error per problem.
pub type Refusals = Vec<(usize, FieldError)>;

/// What admission knows about this node.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: ResourceAmounts,
    pub allocatable: ResourceAmounts,
    /// New replicas are refused while this PSI signal is above its threshold.
    pub pressure_gate: Option<PressureGate>,
    /// The cgroup v2 directory of the node's workloads (its cgroup parent), whose pressure
    /// counts besides the host's.
    pub pressure_dir: Option<std::path::PathBuf>,
}

/// A PSI signal and its threshold (`--pressure-admission memory.full.avg10=10`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PressureGate {
    /// `cpu`, `memory` or `io`.
    pub resource: &'static str,
    /// `some` or `full`.
    pub kind: &'static str,
    /// `avg10`, `avg60` or `avg300`.
    pub window: &'static str,
    /// Percent of time stalled.
    pub threshold: f32,
}

/// Memory `full` over 10 s: the share of time in which every non-idle task of the node (or of
/// its workloads) was stalled on memory at once, which is lost work for all of them, not just
/// slower work. At 10%, one second in every ten is lost: well past the point where a new
/// replica would only deepen the stall, and well below systemd-oomd's default kill threshold
/// (memory pressure above 60% for 30 s).
pub const DEFAULT_PRESSURE_GATE: PressureGate = PressureGate {
    resource: "memory",
    kind: "full",
    window: "avg10",
    threshold: 10.0,
};

impl PressureGate {
    /// `RESOURCE.KIND.WINDOW=PERCENT` (`memory.full.avg10=10`), or `off`.
    pub fn parse(s: &str) -> Result<Option<PressureGate>, String> {
        if s == "off" {
            return Ok(None);
        }
        let (signal, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected RESOURCE.KIND.WINDOW=PERCENT or off"))?;
        let parts: Vec<&str> = signal.split('.').collect();
        let [resource, kind, window] = parts[..] else {
            return Err(format!(
                "{signal:?}: expected RESOURCE.KIND.WINDOW, for example memory.full.avg10"
            ));
        };
        let pick = |v: &str, allowed: &[&'static str], what: &str| {
            allowed
                .iter()
                .copied()
                .find(|a| *a == v)
                .ok_or_else(|| format!("{v:?} is not a {what} (one of {})", allowed.join(", ")))
        };
        let threshold = crate::pressure::psi::parse_percent(value)?;
        Ok(Some(PressureGate {
            resource: pick(resource, &["cpu", "memory", "io"], "PSI resource")?,
            kind: pick(kind, &["some", "full"], "PSI line")?,
            window: pick(window, &["avg10", "avg60", "avg300"], "PSI average")?,
            threshold,
        }))
    }

    /// The signal's value in a reading.
    pub fn value(&self, p: &hyperbox_api::Pressure) -> f32 {
        let r = match self.resource {
            "cpu" => &p.cpu,
            "memory" => &p.memory,
            _ => &p.io,
        };
        let a = if self.kind == "full" {
            &r.full
        } else {
            &r.some
        };
        match self.window {
            "avg10" => a.avg10,
            "avg60" => a.avg60,
            _ => a.avg300,
        }
    }

    pub fn name(&self) -> String {
        format!("{}.{}.{}", self.resource, self.kind, self.window)
    }

    /// The signal now: the higher of the host's reading and that of the node's workloads
    /// (`dir`, their cgroup v2 parent). `None` without PSI.
    pub fn read(&self, dir: Option<&std::path::Path>) -> Option<f32> {
        let host = crate::pressure::psi::node().map(|p| self.value(&p));
        let workloads = dir
            .and_then(crate::pressure::psi::cgroup)
            .map(|p| self.value(&p));
        match (host, workloads) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// `--pressure-admission`: a gate, or `off`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PressureAdmission(pub Option<PressureGate>);

impl std::str::FromStr for PressureAdmission {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PressureGate::parse(s).map(PressureAdmission)
    }
}

/// Pressure admission: while the gate's signal (`value`, the higher of the host's and the
/// node's workloads' reading) is above its threshold, every workload of the batch that adds
/// replicas (a new one, or more desired replicas than `current` holds by key) is refused with
/// `NodePressure` and the figures. Scaling down, suspending and changes that add no replica
/// pass: they relieve the node or leave it as it is.
pub fn pressure_refusals(
    node: &NodeFacts,
    value: Option<f32>,
    current: &HashMap<String, u32>,
    batch: &[&Workload],
) -> Refusals {
    let (Some(gate), Some(value)) = (node.pressure_gate, value) else {
        return Vec::new();
    };
    if value <= gate.threshold {
        return Vec::new();
    }
    batch
        .iter()
        .enumerate()
        .filter(|(_, w)| w.desired_replicas() > current.get(&w.key()).copied().unwrap_or(0))
        .map(|(pos, w)| {
            let had = current.get(&w.key()).copied().unwrap_or(0);
            (
                pos,
                refusal(
                    "spec.replicas",
                    NODE_PRESSURE,
                    format!(
                        "node {} is under pressure: {} is {value:.1}% (threshold {:.1}%); {} new replica(s) wait until it falls",
                        node.id,
                        gate.name(),
                        gate.threshold,
                        w.desired_replicas() - had
                    ),
                ),
            )
        })
        .collect()
}

/// Check a batch, in order, against what is already admitted (`admitted`: workload name →
/// requests of all its desired replicas). All or nothing: either every workload fits and the
/// new entries for `admitted` are returned, or the refusals by position (a workload may have
/// several: memory and cpu).
pub fn admit_batch(
    node: &NodeFacts,
    admitted: &HashMap<String, ResourceAmounts>,
    batch: &[&Workload],
) -> Result<Vec<(String, ResourceAmounts)>, Refusals> {
    let mut total = admitted
        .values()
        .fold(ResourceAmounts::default(), |a, b| a.plus(*b));
    let mut staged: Vec<(String, ResourceAmounts)> = Vec::with_capacity(batch.len());
    let mut refused = Vec::new();
    for (pos, w) in batch.iter().enumerate() {
        let name = &w.key();
        for (k, want) in &w.spec.node_selector {
            if node.labels.get(k) != Some(want) {
                let has = match node.labels.get(k) {
                    Some(v) => format!("{k}={v}"),
                    None => format!("no label {k}"),
                };
                refused.push((
                    pos,
                    refusal(
                        format!("spec.nodeSelector.{k}"),
                        NODE_SELECTOR_MISMATCH,
                        format!(
                            "the workload asks for {k}={want}; node {} has {has}",
                            node.id
                        ),
                    ),
                ));
            }
        }
        let need = w.total_request();
        let held = admitted.get(name).copied().unwrap_or_default();
        let others = total.minus(held);
        let after = others.plus(need);
        let per = w.request_per_replica();
        let n = w.desired_replicas();
        if need.memory_bytes > held.memory_bytes
            && after.memory_bytes > node.allocatable.memory_bytes
        {
            refused.push((
                pos,
                refusal(
                    "spec.resources.requests.memory",
                    INSUFFICIENT_MEMORY,
                    format!(
                        "{n} × {} requested; {} of the node's {} allocatable memory is free ({} requested by other workloads)",
                        bytes(per.memory_bytes),
                        bytes(node.allocatable.memory_bytes.saturating_sub(others.memory_bytes)),
                        bytes(node.allocatable.memory_bytes),
                        bytes(others.memory_bytes),
                    ),
                ),
            ));
        }
        if need.cpu_millis > held.cpu_millis && after.cpu_millis > node.allocatable.cpu_millis {
            refused.push((
                pos,
                refusal(
                    "spec.resources.requests.cpu",
                    INSUFFICIENT_CPU,
                    format!(
                        "{n} × {}m requested; {}m of the node's {}m allocatable cpu is free ({}m requested by other workloads)",
                        per.cpu_millis,
                        node.allocatable.cpu_millis.saturating_sub(others.cpu_millis),
                        node.allocatable.cpu_millis,
                        others.cpu_millis,
                    ),
                ),
            ));
        }
        if refused.last().is_none_or(|(p, _)| *p != pos) {
            // Admitted: later workloads of the batch see it.
            total = after;
            staged.push((name.clone(), need));
        }
    }
    if refused.is_empty() {
        Ok(staged)
    } else {
        Err(refused)
    }
}

fn refusal(field: impl Into<String>, reason: &str, message: String) -> FieldError {
    FieldError {
        field: field.into(),
        message,
        line: None,
        reason: Some(reason.to_string()),
    }
}

/// `1.5Gi`, `600Mi`, `12Ki`, `17B`: the largest binary unit that keeps a whole part.
pub fn bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if n >= size {
            let v = n as f64 / size as f64;
            return if v.fract() == 0.0 {
                format!("{v:.0}{unit}")
            } else {
                format!("{v:.1}{unit}")
            };
        }
    }
    format!("{n}B")
}

/// The labels every node has, Kubernetes' well-known ones, plus the operator's own.
pub fn node_labels(hostname: &str, extra: &[(String, String)]) -> BTreeMap<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    };
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), hostname.to_string()),
        ("kubernetes.io/arch".to_string(), arch.to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
    ]);
    for (k, v) in extra {
        labels.insert(k.clone(), v.clone());
    }
    labels
}

/// `key=value` for `--label`: a Kubernetes label key (optional DNS prefix and `/`, name of
/// at most 63 of `[A-Za-z0-9._-]`) and a value of at most 63 such characters.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?}: expected key=value"))?;
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 63
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && n.as_bytes()[0].is_ascii_alphanumeric()
            && n.as_bytes()[n.len() - 1].is_ascii_alphanumeric()
    };
    if !name_ok(name) {
        return Err(format!("label {s:?}: {name:?} is not a valid label name"));
    }
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(hyperbox_api::validate::is_dns_label);
        if !ok {
            return Err(format!("label {s:?}: {p:?} is not a DNS subdomain prefix"));
        }
    }
    if !(v.is_empty() || name_ok(v)) {
        return Err(format!("label {s:?}: {v:?} is not a valid label value"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// `cpu=500m,memory=1Gi` for `--reserve`.
pub fn parse_amounts(s: &str) -> Result<ResourceAmounts, String> {
    let mut out = ResourceAmounts::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some(("cpu", q)) => out.cpu_millis = hyperbox_api::quantity::parse_cpu_millis(q)?,
            Some(("memory", q)) => {
                out.memory_bytes = hyperbox_api::quantity::parse_memory_bytes(q)?
            }
            _ => {
                return Err(format!(
                    "{part:?}: expected cpu=QUANTITY or memory=QUANTITY"
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
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
}
