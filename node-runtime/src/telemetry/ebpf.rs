//! The eBPF side of telemetry: loads `ebpf/hyperbox.bpf.c` (compiled by build.rs, embedded
//! here) with aya, attaches every program, and reads the per-container counters it keeps.
//!
//! Programs are attached through BPF links owned by this process: when the daemon exits (even
//! killed -9) the kernel detaches and frees them. Nothing is pinned, so nothing outlives it.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use aya::maps::{MapData, PerCpuHashMap, PerCpuValues};
use aya::programs::{
    BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, Program, ProgramError,
};
use aya::{Btf, Ebpf, EbpfLoader};

/// The compiled object (empty when the build had no clang, bpftool or kernel BTF).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hyperbox.bpf.o"));

/// `built`, or `not built (why)`.
pub const BUILD: &str = env!("HYPERBOX_EBPF_BUILD");

/// Run-queue latency slots (see `RQ_SLOTS` in the C).
pub const RQ_SLOTS: usize = 24;

/// One container's counters; must match `struct cg_stats` in `ebpf/hyperbox.bpf.c`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgStats {
    pub execs: u64,
    pub exits: u64,
    pub oom_kills: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tcp_connects: u64,
    pub tcp_accepts: u64,
    pub tcp_retransmits: u64,
    pub rq_count: u64,
    pub rq_sum_ns: u64,
    pub rq_slots: [u64; RQ_SLOTS],
}

// SAFETY: plain old data: u64 fields only, no padding, any bit pattern is valid.
unsafe impl aya::Pod for CgStats {}

impl CgStats {
    /// Field-wise sum (a replica's earlier containers plus its current one).
    pub fn add(&mut self, o: &CgStats) {
        self.execs += o.execs;
        self.exits += o.exits;
        self.oom_kills += o.oom_kills;
        self.rx_bytes += o.rx_bytes;
        self.rx_packets += o.rx_packets;
        self.tx_bytes += o.tx_bytes;
        self.tx_packets += o.tx_packets;
        self.tcp_connects += o.tcp_connects;
        self.tcp_accepts += o.tcp_accepts;
        self.tcp_retransmits += o.tcp_retransmits;
        self.rq_count += o.rq_count;
        self.rq_sum_ns += o.rq_sum_ns;
        for (a, b) in self.rq_slots.iter_mut().zip(o.rq_slots.iter()) {
            *a += b;
        }
    }

    /// Upper bound of run-queue slot `i` in seconds (`+Inf` for the last).
    pub fn rq_bound_seconds(i: usize) -> f64 {
        if i + 1 >= RQ_SLOTS {
            f64::INFINITY
        } else {
            // Slot i holds waits below 2^i microseconds.
            (1u64 << i) as f64 / 1e6
        }
    }
}

/// The programs, what they attach to, and the name each is reported under.
const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("hb_exec", "sched_process_exec", "exec"),
    ("hb_exit", "sched_process_exit", "exit"),
    ("hb_oom", "mark_victim", "oom"),
    ("hb_wakeup", "sched_wakeup", "runqueue_wakeup"),
    ("hb_wakeup_new", "sched_wakeup_new", "runqueue_wakeup_new"),
    ("hb_switch", "sched_switch", "runqueue_switch"),
    ("hb_sock_state", "inet_sock_set_state", "tcp_state"),
    ("hb_retransmit", "tcp_retransmit_skb", "tcp_retransmit"),
];
const SKB: &[(&str, CgroupSkbAttachType, &str)] = &[
    ("hb_ingress", CgroupSkbAttachType::Ingress, "net_ingress"),
    ("hb_egress", CgroupSkbAttachType::Egress, "net_egress"),
];

/// The names programs are reported under in `features.ebpfPrograms`.
pub fn program_names() -> impl Iterator<Item = &'static str> {
    TRACEPOINTS
        .iter()
        .map(|t| t.2)
        .chain(SKB.iter().map(|s| s.2))
}

/// Loaded and attached programs and the counters map.
pub struct Probes {
    _bpf: Ebpf,
    stats: PerCpuHashMap<MapData, u64, CgStats>,
    /// Per program: `attached` or why not.
    pub programs: BTreeMap<String, String>,
}

impl Probes {
    /// Load the object and attach what can be. `parent` is the containers' cgroup v2 parent
    /// directory (created if missing). An error means nothing is loaded; a program that fails
    /// alone is reported in `programs` and the others run.
    pub fn load(parent: &Path, v2_root: &Path) -> Result<Probes, String> {
        if OBJECT.is_empty() {
            return Err(format!("eBPF {BUILD}"));
        }
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("create cgroup {}: {e}", parent.display()))?;
        let parent_id = crate::pressure::psi::cgroup_id(parent)
            .ok_or_else(|| format!("no cgroup id for {}", parent.display()))?;
        // The programs find a container by its depth in the kernel's hierarchy, and the depth
        // comes from the path below the mount: that is the true depth only if the mount shows
        // the hierarchy's root (cgroup id 1). A cgroup2 mount made inside a cgroup namespace
        // shows the namespace's root instead, and every container would go uncounted.
        let root_id = crate::pressure::psi::cgroup_id(v2_root);
        if root_id != Some(1) {
            return Err(format!(
                "the cgroup v2 mount {} is not the hierarchy's root (cgroup id {}; a cgroup \
                 namespace?): per-container attribution needs the host's cgroup2 mounted there",
                v2_root.display(),
                root_id.map_or("unknown".into(), |i| i.to_string())
            ));
        }
        let level = parent
            .strip_prefix(v2_root)
            .map_err(|_| format!("{} is not under {}", parent.display(), v2_root.display()))?
            .components()
            .count() as u32;
        let btf = Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"))?;
        let mut bpf = EbpfLoader::new()
            .btf(Some(&btf))
            // The run-queue timestamps are task storage, which aya creates but has no
            // userspace type for (only the programs use it).
            .allow_unsupported_maps()
            .override_global("parent_cgid", &parent_id, true)
            .override_global("parent_level", &level, true)
            .load(OBJECT)
            .map_err(|e| format!("load eBPF object: {}", chain(&e)))?;
        let mut programs = BTreeMap::new();
        for (prog, tp, name) in TRACEPOINTS {
            let r = program::<BtfTracePoint>(&mut bpf, prog).and_then(|p| {
                p.load(tp, &btf).map_err(step("load"))?;
                p.attach().map_err(step("attach")).map(drop)
            });
            programs.insert(name.to_string(), status(r));
        }
        let cgroup = File::open(parent).map_err(|e| format!("open {}: {e}", parent.display()))?;
        for (prog, kind, name) in SKB {
            let r = program::<CgroupSkb>(&mut bpf, prog).and_then(|p| {
                p.load().map_err(step("load"))?;
                // Through a BPF link (kernel 5.7+), which always sits beside other programs on
                // the cgroup; the mode only matters for the legacy attach.
                p.attach(&cgroup, *kind, CgroupAttachMode::Single)
                    .map_err(step("attach"))
                    .map(drop)
            });
            programs.insert(name.to_string(), status(r));
        }
        if !programs.values().any(|s| s == ATTACHED) {
            return Err(format!("no program attached ({})", failures(&programs)));
        }
        let stats = PerCpuHashMap::try_from(bpf.take_map("stats").ok_or("no stats map")?)
            .map_err(|e| format!("stats map: {}", chain(&e)))?;
        Ok(Probes {
            _bpf: bpf,
            stats,
            programs,
        })
    }

    /// Every container's counters, by cgroup id (the CPUs' copies summed).
    pub fn read_all(&self) -> Vec<(u64, CgStats)> {
        self.stats
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, sum(&v)))
            .collect()
    }

    /// One container's counters.
    pub fn read(&self, cgroup_id: u64) -> Option<CgStats> {
        self.stats.get(&cgroup_id, 0).ok().map(|v| sum(&v))
    }

    /// Forget a container (gone, its counters folded into its replica's).
    pub fn remove(&mut self, cgroup_id: u64) {
        let _ = self.stats.remove(&cgroup_id);
    }
}

fn sum(per_cpu: &PerCpuValues<CgStats>) -> CgStats {
    let mut total = CgStats::default();
    for v in per_cpu.iter() {
        total.add(v);
    }
    total
}

/// A program's state once it runs.
pub const ATTACHED: &str = "attached";

/// The programs not attached, with why: `name: why; ...`.
pub fn failures(programs: &BTreeMap<String, String>) -> String {
    programs
        .iter()
        .filter(|(_, s)| *s != ATTACHED)
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A program of the object as its type.
fn program<'a, T>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    bpf.program_mut(name)
        .ok_or_else(|| "not in the object".to_string())?
        .try_into()
        .map_err(|e: ProgramError| chain(&e))
}

/// The error of a load or attach step, with its cause.
fn step(what: &'static str) -> impl Fn(ProgramError) -> String {
    move |e| format!("{what}: {}", chain(&e))
}

fn status(r: Result<(), String>) -> String {
    match r {
        Ok(()) => ATTACHED.into(),
        Err(e) => e,
    }
}

/// An error and its sources on one line (aya's verifier errors carry the log in a source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        // The verifier log can be long: its last lines say what failed.
        let t = match t.len().checked_sub(600) {
            Some(from) => {
                let from = (from..t.len())
                    .find(|i| t.is_char_boundary(*i))
                    .unwrap_or(0);
                format!("...{}", &t[from..])
            }
            None => t,
        };
        // Some errors print their source in their own message already.
        if !s.contains(t.trim()) {
            s.push_str(": ");
            s.push_str(t.trim());
        }
        cur = c.source();
    }
    s
}
