//! Per-container PSI on a real node: containers are placed in the cgroup v2 tree (on this
//! hybrid host the runtime does it itself), report their pressure and cgroup id, and leave no
//! v2 cgroup behind. Real CPU contention comes from `stress-ng` on the host.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use hyperbox_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// These tests make real pressure, which the kernel also counts host-wide: one at a time, so
/// that one test's stall is not another's signal.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Held for a test's duration; when dropped (after the test's nodes, declared later, are gone)
/// it waits until the host's memory pressure has fallen back, so that neither the next test
/// nor the next test binary's nodes see this test's stall (nodes refuse new replicas while
/// `memory.full.avg10` is above 10% by default).
struct Serial(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl Drop for Serial {
    fn drop(&mut self) {
        let calm = || {
            let text = fs::read_to_string("/proc/pressure/memory").ok()?;
            let full = text.lines().find(|l| l.starts_with("full"))?;
            let avg10: f64 = full
                .split_whitespace()
                .nth(1)?
                .strip_prefix("avg10=")?
                .parse()
                .ok()?;
            (avg10 < 2.0).then_some(())
        };
        if fs::metadata("/proc/pressure/memory").is_ok() {
            let _ = wait_until(
                Duration::from_secs(120),
                "host memory pressure to fall",
                calm,
            );
        }
    }
}

fn serial() -> Serial {
    Serial(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The v2 directory of a container of `node`: under the unified tree of a hybrid host, or
/// the root of a pure v2 host.
fn v2_dir(node: &Node, container: &str) -> Option<PathBuf> {
    let root = if fs::metadata("/sys/fs/cgroup/cgroup.controllers").is_ok() {
        PathBuf::from("/sys/fs/cgroup")
    } else if fs::metadata("/sys/fs/cgroup/unified/cgroup.controllers").is_ok() {
        PathBuf::from("/sys/fs/cgroup/unified")
    } else {
        return None;
    };
    Some(
        root.join(node.cgroup_parent.trim_start_matches('/'))
            .join(container),
    )
}

fn cpu_some10(v: &Value) -> f64 {
    v["replicas"][0]["pressure"]["cpu"]["some"]["avg10"]
        .as_f64()
        .unwrap_or(-1.0)
}

#[test]
fn containers_report_their_own_cpu_pressure() {
    let _serial = serial();
    let psi = fs::metadata("/proc/pressure/cpu").is_ok();
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    // No admission gate: this is about readings, not about what the node admits.
    let node = Node::start(&[
        "--insecure-registry",
        &reg.addr,
        "--pressure-admission",
        "off",
    ])
    .unwrap();
    node.apply(&workload(
        "hog",
        &image,
        "  command: [sh, -c, 'while :; do :; done']\n  terminationGracePeriodSeconds: 0\n",
    ));
    node.apply(&workload(
        "idle",
        &image,
        "  command: [sleep, '1000']\n  terminationGracePeriodSeconds: 0\n",
    ));
    let hog = node
        .wait_for("hog", T, "hog running", |v| v["phase"] == "Running")
        .unwrap();
    let id = container_ids(&hog)[0].clone();
    let pid = hog["replicas"][0]["pid"].as_i64().unwrap();
    let Some(dir) = v2_dir(&node, &id) else {
        eprintln!("no cgroup v2 tree on this host: per-container PSI is not available");
        return;
    };
    // The init (and what it runs) is in the container's v2 cgroup.
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l.trim() == pid.to_string()),
        "pid {pid} not in {}: {procs}",
        dir.display()
    );
    // The status reports its cgroup id, the inode of that directory.
    let with_id = node
        .wait_for("hog", T, "a cgroup id", |v| {
            v["replicas"][0]["cgroupId"].is_u64()
        })
        .unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        with_id["replicas"][0]["cgroupId"].as_u64().unwrap(),
        fs::metadata(&dir).unwrap().ino()
    );
    if !psi {
        eprintln!("PSI is off on this kernel: no readings to check");
        return;
    }
    // Contention on the host: the hog waits for CPU, and its own pressure rises.
    let mut stress = std::process::Command::new("stress-ng")
        .args(["--cpu", "4", "--timeout", "60s", "--quiet"])
        .spawn()
        .expect("stress-ng is installed (tests/install-deps.sh)");
    let loaded = node.wait_for("hog", T, "the hog's cpu pressure to rise", |v| {
        cpu_some10(v) > 5.0
    });
    let idle = node.get("idle").unwrap();
    let wide = String::from_utf8_lossy(&node.cli(&["get", "-o", "wide"]).stdout).to_string();
    let _ = stress.kill();
    let _ = stress.wait();
    let loaded = loaded.unwrap();
    assert!(
        loaded["replicas"][0]["pressureTrend"]["overSeconds"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0,
        "{loaded}"
    );
    // A sleeping container waits for nothing.
    assert!(cpu_some10(&idle) >= 0.0, "{idle}");
    assert!(
        cpu_some10(&idle) < cpu_some10(&loaded),
        "idle {idle}\nhog {loaded}"
    );
    assert!(wide.contains("PSI CPU/MEM/IO"), "{wide}");
    // Deleting the container removes its v2 cgroup too.
    assert!(node.cli(&["delete", "hog"]).status.success());
    wait_until(T, "the hog's v2 cgroup removed", || {
        (!dir.exists()).then_some(())
    })
    .unwrap();
    let n: Value = serde_json::from_slice(&node.cli(&["node", "-o", "json"]).stdout).unwrap();
    assert_eq!(n["features"]["psi"], true);
    assert!(n["pressure"]["cpu"]["some"]["total"].as_u64().unwrap() > 0);
    // The node's workloads together (their v2 parent), and the admission gate in force.
    assert!(
        n["workloadsPressure"]["cpu"]["some"]["total"]
            .as_u64()
            .unwrap()
            > 0,
        "{n}"
    );
    assert!(n.get("pressureAdmission").is_none(), "off: {n}");
}

/// Busybox plus a 96 MiB file: read over and over under a 32 MiB limit, it thrashes.
fn thrash_image(reg: &Registry) -> String {
    push_image(
        reg,
        "thrash",
        "1",
        vec![
            (busybox_layer().finish(), Compress::Gzip),
            (
                Layer::new().big_file("big", 96 << 20).finish(),
                Compress::Gzip,
            ),
        ],
        &[],
        &["sh"],
    )
    .unwrap()
    .0
}

/// A workload whose working set (the thrash image's file) does not fit its memory limit.
fn starved(image: &str) -> String {
    workload(
        "starved",
        image,
        "  command: [sh, -c, 'while :; do cat /big > /dev/null; done']\n  resources: {memory: 32Mi}\n  terminationGracePeriodSeconds: 0\n",
    )
}

fn mem_some10(v: &Value) -> f64 {
    v["replicas"][0]["pressure"]["memory"]["some"]["avg10"]
        .as_f64()
        .unwrap_or(-1.0)
}

/// A container whose working set (a 96 MiB file it reads over and over) does not fit its
/// 32 MiB memory limit stalls on refaults: its own memory pressure rises, a neighbour's not.
#[test]
fn a_memory_starved_container_shows_memory_pressure() {
    let _serial = serial();
    if fs::metadata("/proc/pressure/memory").is_err() {
        eprintln!("PSI is off on this kernel");
        return;
    }
    let reg = Registry::start(false).unwrap();
    let image = thrash_image(&reg);
    let node = Node::start(&[
        "--insecure-registry",
        &reg.addr,
        "--pressure-admission",
        "off",
    ])
    .unwrap();
    node.apply(&starved(&image));
    node.apply(&workload(
        "calm",
        &image,
        "  command: [sleep, '1000']\n  terminationGracePeriodSeconds: 0\n",
    ));
    let starved = node
        .wait_for(
            "starved",
            T,
            "memory pressure in the starved container",
            |v| mem_some10(v) > 5.0,
        )
        .unwrap();
    let calm = node.get("calm").unwrap();
    assert!(
        mem_some10(&calm) < mem_some10(&starved),
        "calm {calm}\nstarved {starved}"
    );
}

/// Admission under real memory pressure: while a starved container keeps the node's
/// workloads stalled, new replicas are refused with `NodePressure` and the figures; scaling
/// down still passes; once the pressure falls, the same apply is admitted.
#[test]
fn new_replicas_are_refused_under_memory_pressure() {
    let _serial = serial();
    if fs::metadata("/proc/pressure/memory").is_err() {
        eprintln!("PSI is off on this kernel");
        return;
    }
    let reg = Registry::start(false).unwrap();
    let image = thrash_image(&reg);
    // A low threshold on `some`, so that one starved container is enough.
    let node = Node::start(&[
        "--insecure-registry",
        &reg.addr,
        "--pressure-admission",
        "memory.some.avg10=5",
    ])
    .unwrap();
    let sleeper = |name: &str, replicas: u32| {
        workload(
            name,
            &image,
            &format!("  replicas: {replicas}\n  command: [sleep, '1000']\n  terminationGracePeriodSeconds: 0\n"),
        )
    };
    assert!(node.apply(&sleeper("calm", 2)).status.success());
    node.apply(&starved(&image));
    node.wait_for("starved", T, "memory pressure", |v| mem_some10(v) > 20.0)
        .unwrap();
    // New replicas: refused, with the reason and the figures.
    let out = node.apply(&sleeper("new", 1));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("(403)"), "{err}");
    assert!(
        err.contains("workloads[0].spec.replicas: NodePressure: node "),
        "{err}"
    );
    assert!(err.contains("memory.some.avg10 is "), "{err}");
    assert!(err.contains("(threshold 5.0%)"), "{err}");
    assert!(node.get("new").is_none());
    let out = node.apply(&sleeper("calm", 3));
    assert!(!out.status.success(), "a scale-up is new replicas too");
    // A scale-down relieves the node: admitted.
    let out = node.apply(&sleeper("calm", 1));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The pressure goes with the starved container; then the same apply is admitted.
    assert!(node.cli(&["delete", "starved"]).status.success());
    wait_until(
        Duration::from_secs(120),
        "admission once the pressure fell",
        || {
            node.apply(&sleeper("new", 1))
                .status
                .success()
                .then_some(())
        },
    )
    .unwrap();
    node.wait_for("new", T, "new running", |v| v["phase"] == "Running")
        .unwrap();
}

/// Placement prefers the calmer node: two node runtimes on this machine, real memory
/// pressure inside one node's cgroup parent (a starved container applied there by hand), and
/// the edge operator puts new workloads on the other.
#[test]
fn placement_prefers_the_calmer_node() {
    let _serial = serial();
    if fs::metadata("/proc/pressure/memory").is_err() {
        eprintln!("PSI is off on this kernel");
        return;
    }
    let reg = Registry::start(false).unwrap();
    let image = thrash_image(&reg);
    // No admission gate: on one machine the host-wide pressure the starved container makes
    // would close both nodes; this is about where the operator places.
    let args = [
        "--insecure-registry",
        &reg.addr,
        "--pressure-admission",
        "off",
    ];
    let busy = Node::start(&args).unwrap();
    let calm = Node::start(&args).unwrap();
    busy.apply(&starved(&image));
    // The busy node's workloads are stalled well past one pressure band (10 points).
    wait_until(T, "pressure in the busy node's workloads", || {
        let out = busy.cli(&["node", "-o", "json"]);
        let n: Value = serde_json::from_slice(&out.stdout).ok()?;
        (n["workloadsPressure"]["memory"]["some"]["avg10"].as_f64()? > 15.0).then_some(())
    })
    .unwrap();
    let repo = GitRepo::new().unwrap();
    for name in ["a", "b", "c"] {
        repo.write(
            &format!("{name}.yaml"),
            &workload(
                name,
                &image,
                "  command: [sleep, '1000']\n  terminationGracePeriodSeconds: 0\n",
            ),
        );
    }
    let rev = repo.commit_push("three new workloads");
    let busy_sock = format!("unix://{}", busy.socket.display());
    let op = Operator::start(
        &calm,
        &repo.url(),
        &["--node", &busy_sock, "--interval", "500ms"],
    )
    .unwrap();
    op.wait_status(T, "placed", |s| s["lastAppliedRevision"] == rev.as_str())
        .unwrap();
    for name in ["a", "b", "c"] {
        calm.wait_for(name, T, "running on the calm node", |v| {
            v["phase"] == "Running"
        })
        .unwrap();
        assert!(
            busy.get(name).is_none(),
            "{name} was placed on the busy node"
        );
    }
}
