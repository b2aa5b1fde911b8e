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
#[path = "admission_tests.rs"]
mod tests;
