//! Per-container telemetry: eBPF counters (execs, exits, OOM kills, run-queue latency,
//! network bytes and packets, TCP connects, accepts and retransmits), cgroup readings (CPU
//! time, memory, PSI) and the runtime's own counters, gathered into one [`Snapshot`] that is
//! exported two ways: Prometheus text at `/metrics` ([`prom`]) and OTLP/HTTP protobuf to a
//! collector ([`otlp`]). The snapshot is built ([`snapshot`]) from plain data the workloads
//! gather, so telemetry never names a workload's type.
//!
//! It may call `crate::pressure` (cgroup ids, the cgroup v2 root) and the kernel (eBPF
//! programs, cgroup files). The images, containers and workloads call it (counters, a
//! container's start and removal, readings).
//!
//! Attribution: the kernel side keys its counters by the container's cgroup v2 id. The runtime
//! tells us which replica each container (and so each cgroup id) belongs to when it starts the
//! container, and again on every snapshot (adopted containers after a daemon restart). When a
//! container goes, its final counters are folded into its replica's, so a replica's counters
//! only grow across restarts (an OOM kill stays counted after the container is replaced), and
//! its map entry is deleted. A replica's totals go when the replica goes.

pub mod ebpf;
pub mod otlp;
pub mod prom;
pub mod snapshot;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

pub use ebpf::CgStats;

/// Whether to load the eBPF programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EbpfMode {
    /// Load them where the kernel allows; otherwise say why once and go on without.
    Auto,
    /// Never load them.
    Off,
}

impl std::str::FromStr for EbpfMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" | "on" => Ok(EbpfMode::Auto),
            "off" => Ok(EbpfMode::Off),
            _ => Err(format!("--ebpf: expected auto or off, got {s:?}")),
        }
    }
}

/// What `features` reports about eBPF.
#[derive(Debug, Clone, Default)]
pub struct EbpfStatus {
    /// At least one program is attached.
    pub active: bool,
    /// Why not (or which programs failed), when not all are attached.
    pub reason: Option<String>,
    /// Per program: `attached`, `disabled`, or why it is not running.
    pub programs: BTreeMap<String, String>,
}

/// A replica: what a container's counters are attributed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaKey {
    pub namespace: String,
    pub workload: String,
    pub replica: u32,
}

#[derive(Default)]
struct Books {
    /// Live containers: id -> (cgroup id, replica).
    live: HashMap<String, (u64, ReplicaKey)>,
    /// Counters of a replica's containers that are gone.
    retired: HashMap<ReplicaKey, Totals>,
}

/// A replica's current container, as a snapshot sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub id: String,
    pub cgroup_id: u64,
    /// Its cgroup's CPU time so far (microseconds).
    pub cpu_usec: Option<u64>,
}

/// A container's cgroup readings, taken for one snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupReading {
    pub cgroup_id: Option<u64>,
    /// CPU time so far (microseconds).
    pub cpu_usec: Option<u64>,
    pub memory_bytes: Option<u64>,
}

/// Each replica's totals, and how many containers the eBPF counters map holds (bounded by
/// `MAX_CONTAINERS` in the C), from one read of the map.
#[derive(Debug, Clone, Default)]
pub struct ReplicaTotals {
    pub by_replica: BTreeMap<ReplicaKey, Totals>,
    pub map_entries: usize,
}

/// Attributes of a series or a resource.
pub type Attrs = Vec<(&'static str, String)>;

/// A replica's counters: eBPF's and the CPU time its containers used (microseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub ebpf: CgStats,
    pub cpu_usec: u64,
}

/// CPU time a cgroup v2 used (`usage_usec` of `cpu.stat`, present without the cpu controller).
pub fn cpu_usec(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// Memory a container's cgroup uses: v2 `memory.current` or v1 `memory.usage_in_bytes`.
pub fn memory_bytes(dir: &Path) -> Option<u64> {
    ["memory.current", "memory.usage_in_bytes"]
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .and_then(|t| t.trim().parse().ok())
}

/// The node's telemetry state (one per daemon; see [`init`]).
pub struct Telemetry {
    probes: Mutex<Option<ebpf::Probes>>,
    pub ebpf: EbpfStatus,
    books: Mutex<Books>,
    /// The containers' cgroup v2 parent (where orphaned map entries are checked against).
    v2_parent: Option<PathBuf>,
    /// When counting began (the start time of every cumulative series).
    pub since: SystemTime,
    /// The node's name (`host.name` of every resource).
    pub node_name: String,
}

static TELEMETRY: OnceLock<Telemetry> = OnceLock::new();

/// Set up telemetry for this daemon: load the eBPF programs unless `mode` is off. Failing to
/// load them is logged once and leaves everything else working.
pub fn init(mode: EbpfMode, cgroup_parent: &str, node_name: String) -> &'static Telemetry {
    TELEMETRY.get_or_init(|| Telemetry::new(mode, cgroup_parent, node_name))
}

/// The daemon's telemetry, once [`init`] ran.
pub fn get() -> Option<&'static Telemetry> {
    TELEMETRY.get()
}

impl Telemetry {
    fn new(mode: EbpfMode, cgroup_parent: &str, node_name: String) -> Telemetry {
        let rel = cgroup_parent.trim_start_matches('/');
        let v2_root = crate::pressure::psi::v2_root();
        let v2_parent = v2_root.as_ref().map(|r| r.join(rel));
        let all = |state: &str| -> BTreeMap<String, String> {
            ebpf::program_names()
                .map(|n| (n.to_string(), state.to_string()))
                .collect()
        };
        // Said once, here: everything else goes on without the programs.
        let not_loaded = |e: String| {
            tracing::warn!(reason = %e, "eBPF telemetry off; cgroup and runtime metrics are still exported");
            EbpfStatus {
                active: false,
                programs: all(&format!("not loaded: {e}")),
                reason: Some(e),
            }
        };
        let (probes, ebpf) = match (mode, &v2_root, &v2_parent) {
            (EbpfMode::Off, _, _) => (
                None,
                EbpfStatus {
                    active: false,
                    reason: Some("disabled (--ebpf off)".into()),
                    programs: all("disabled"),
                },
            ),
            (_, Some(root), Some(parent)) if !rel.is_empty() => {
                let loaded = ebpf::Probes::load(parent, root);
                // Loading parses the kernel's whole BTF (megabytes, freed right after): give
                // the freed heap back rather than carry it for the daemon's life.
                // SAFETY: malloc_trim has no preconditions.
                unsafe { libc::malloc_trim(0) };
                match loaded {
                    Ok(mut p) => {
                        let failed = ebpf::failures(&p.programs);
                        let reason = (!failed.is_empty()).then_some(failed);
                        match &reason {
                            Some(r) => {
                                tracing::warn!(failed = %r, "some eBPF telemetry programs did not attach; the others run")
                            }
                            None => {
                                tracing::info!(programs = p.programs.len(), cgroup = %parent.display(), "eBPF telemetry attached")
                            }
                        }
                        let programs = std::mem::take(&mut p.programs);
                        (
                            Some(p),
                            EbpfStatus {
                                active: true,
                                reason,
                                programs,
                            },
                        )
                    }
                    Err(e) => (None, not_loaded(e)),
                }
            }
            _ => (
                None,
                not_loaded("no cgroup v2 hierarchy (or no cgroup parent) to attribute by".into()),
            ),
        };
        Telemetry {
            probes: Mutex::new(probes),
            ebpf,
            books: Mutex::new(Books::default()),
            v2_parent,
            since: SystemTime::now(),
            node_name,
        }
    }

    /// A container of `key` started in the cgroup with this id.
    pub fn container_started(&self, id: &str, key: ReplicaKey, cgroup_id: u64) {
        self.books
            .lock()
            .unwrap()
            .live
            .insert(id.to_string(), (cgroup_id, key));
    }

    /// A container is going (its processes are gone; `cpu_usec` is its cgroup's last CPU
    /// reading): fold its counters into its replica's and delete its map entry. Unknown
    /// containers are left to the orphan sweep.
    pub fn container_removed(&self, id: &str, cpu_usec: Option<u64>) {
        let mut books = self.books.lock().unwrap();
        let Some((cgid, key)) = books.live.remove(id) else {
            return;
        };
        let total = books.retired.entry(key).or_default();
        total.cpu_usec += cpu_usec.unwrap_or(0);
        let mut probes = self.probes.lock().unwrap();
        if let Some(p) = probes.as_mut() {
            if let Some(s) = p.read(cgid) {
                total.ebpf.add(&s);
            }
            p.remove(cgid);
        }
    }

    /// Each replica's totals: its gone containers' plus, from `current` (replica -> its
    /// current container's id, cgroup id and CPU reading, if it runs), the current one's.
    /// Replicas not in `current` are forgotten; map entries of cgroups that no longer exist and
    /// belong to no known container are deleted. Blocking (bpf syscalls per container, and a
    /// directory listing when there are orphans): call it off the async threads.
    pub fn replica_totals(&self, current: &BTreeMap<ReplicaKey, Option<Current>>) -> ReplicaTotals {
        let mut books = self.books.lock().unwrap();
        for (key, c) in current {
            if let Some(c) = c {
                books
                    .live
                    .entry(c.id.clone())
                    .or_insert_with(|| (c.cgroup_id, key.clone()));
            }
        }
        books.retired.retain(|k, _| current.contains_key(k));
        let mut by_replica: BTreeMap<ReplicaKey, Totals> = current
            .iter()
            .map(|(k, c)| {
                let mut t = books.retired.get(k).copied().unwrap_or_default();
                t.cpu_usec += c.as_ref().and_then(|c| c.cpu_usec).unwrap_or(0);
                (k.clone(), t)
            })
            .collect();
        let mut probes = self.probes.lock().unwrap();
        let Some(p) = probes.as_mut() else {
            return ReplicaTotals {
                by_replica,
                map_entries: 0,
            };
        };
        let entries = p.read_all();
        let by_cgid: HashMap<u64, &ReplicaKey> =
            books.live.values().map(|(c, k)| (*c, k)).collect();
        let mut orphans = Vec::new();
        for (cgid, s) in &entries {
            match by_cgid.get(cgid).and_then(|k| by_replica.get_mut(*k)) {
                Some(total) => total.ebpf.add(s),
                None if by_cgid.contains_key(cgid) => {}
                None => orphans.push(*cgid),
            }
        }
        let mut removed = 0;
        if !orphans.is_empty() {
            // Listed after the map was read: a cgroup that had an entry then and still exists
            // is listed, so only the gone ones are deleted.
            let existing = self
                .v2_parent
                .as_deref()
                .map(cgroup_ids_below)
                .unwrap_or_default();
            for cgid in orphans {
                if !existing.contains(&cgid) {
                    p.remove(cgid);
                    removed += 1;
                }
            }
        }
        ReplicaTotals {
            by_replica,
            map_entries: entries.len() - removed,
        }
    }
}

/// Ids of the cgroups directly below `parent`.
fn cgroup_ids_below(parent: &Path) -> HashSet<u64> {
    std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| crate::pressure::psi::cgroup_id(&e.path()))
        .collect()
}

/// A latency histogram with fixed bounds (seconds), safe to update from any thread.
pub struct Histogram {
    pub bounds: &'static [f64],
    counts: [AtomicU64; 16],
    sum_us: AtomicU64,
}

/// Bounds for operations that take milliseconds to minutes (pulls, starts, reconciles).
pub const OP_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

impl Histogram {
    pub const fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: [const { AtomicU64::new(0) }; 16],
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(self.bounds.len())
            .min(self.counts.len() - 1);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Counts per bucket (the last bound is `+Inf`), the sum in seconds and the count.
    pub fn read(&self) -> HistogramValue {
        let buckets: Vec<(f64, u64)> = (0..=self.bounds.len())
            .map(|i| {
                (
                    self.bounds.get(i).copied().unwrap_or(f64::INFINITY),
                    self.counts[i].load(Ordering::Relaxed),
                )
            })
            .collect();
        HistogramValue {
            count: buckets.iter().map(|b| b.1).sum(),
            buckets,
            sum: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// A counter split by outcome.
pub struct Outcomes {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

impl Outcomes {
    pub const fn new() -> Outcomes {
        Outcomes {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }
    pub fn record(&self, ok: bool) {
        if ok { &self.ok } else { &self.failed }.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for Outcomes {
    fn default() -> Self {
        Self::new()
    }
}

/// The runtime's own counters (process-wide: the code that counts has no handle to pass).
pub struct RuntimeCounters {
    /// Image pulls from a registry (manifest and layers fetched).
    pub pulls: Outcomes,
    /// Image preparations (pull when needed, then unpack into the store), and how long.
    pub prepares: Outcomes,
    pub prepare_seconds: Histogram,
    /// Container creations, and how long create-and-start took.
    pub starts: Outcomes,
    pub start_seconds: Histogram,
    /// Readiness probe runs.
    pub probes: Outcomes,
    /// Applied spec to all replicas running it (ready where probed).
    pub reconcile_seconds: Histogram,
}

pub static COUNTERS: RuntimeCounters = RuntimeCounters {
    pulls: Outcomes::new(),
    prepares: Outcomes::new(),
    prepare_seconds: Histogram::new(OP_BOUNDS),
    starts: Outcomes::new(),
    start_seconds: Histogram::new(OP_BOUNDS),
    probes: Outcomes::new(),
    reconcile_seconds: Histogram::new(OP_BOUNDS),
};

// ---------------------------------------------------------------------------------------------
// The snapshot both exporters encode.

/// What kind of series a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistogramValue {
    /// (upper bound, count in this bucket alone); the last bound is `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
    Histogram(HistogramValue),
}

/// One series: the resource it belongs to (index into [`Snapshot::resources`]; 0 is the node)
/// and its own attributes.
#[derive(Debug, Clone)]
pub struct Point {
    pub resource: usize,
    pub attrs: Attrs,
    pub value: Value,
}

/// A metric family. Names are OpenTelemetry-style (dots); the Prometheus name is derived the
/// standard way (dots to underscores, the unit as a suffix, `_total` on counters).
#[derive(Debug, Clone)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    /// UCUM unit (`s`, `By`, `1`, `{exec}`...).
    pub unit: &'static str,
    pub kind: Kind,
    pub points: Vec<Point>,
}

/// A telemetry resource: the node, or one replica's container.
#[derive(Debug, Clone)]
pub struct Resource {
    /// OpenTelemetry resource attributes.
    pub otel: Attrs,
    /// The Prometheus labels every series of this resource carries.
    pub labels: Attrs,
    /// When its cumulative series started counting.
    pub since: SystemTime,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub resources: Vec<Resource>,
    pub families: Vec<Family>,
    pub at: SystemTime,
}

impl Snapshot {
    pub fn family(
        &mut self,
        name: &'static str,
        help: &'static str,
        unit: &'static str,
        kind: Kind,
    ) -> &mut Family {
        if let Some(i) = self.families.iter().position(|f| f.name == name) {
            return &mut self.families[i];
        }
        self.families.push(Family {
            name,
            help,
            unit,
            kind,
            points: Vec::new(),
        });
        self.families.last_mut().unwrap()
    }
}

impl Family {
    pub fn push(&mut self, resource: usize, attrs: Attrs, value: Value) {
        self.points.push(Point {
            resource,
            attrs,
            value,
        });
    }
}

#[cfg(test)]
mod tests;
