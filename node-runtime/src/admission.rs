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

use hyperbox_api::refusal::{INSUFFICIENT_CPU, INSUFFICIENT_MEMORY, NODE_SELECTOR_MISMATCH};
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
        }
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
