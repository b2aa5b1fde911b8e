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
        // Three busy loops of its own: a container is one cgroup, and on a cgroup v1 cpu
        // controller a cgroup with one busy task competes with host tasks as a single entity,
        // so one loop alone hardly waits (about 1% here with `stress-ng --cpu 4` beside it).
        "  command: [sh, -c, 'for i in 1 2 3; do (while :; do :; done) & done; wait']\n  terminationGracePeriodSeconds: 0\n",
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
    let Some(dir) = node.v2_dir(&id) else {
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

/// A workload whose working set (the thrash image's file) does not fit its memory limit,
/// read by four readers at once.
///
/// One reader's stall depends on the disk: the refault reads wait on I/O, which PSI counts as
/// I/O pressure, so on a slow disk a lone reader's memory `some` stays low (measured here with
/// the disk throttled to 20 MB/s: 6%, with 20% wanted; a fresh CI machine saw 10.5%). With
/// several readers of one file, a page one reader faults in is soon read by another, so its
/// eviction and refault count as thrashing (memory stall, waits included), and `some` counts
/// any one reader stalled: 40% at 30 s here, quiet or with both cores busy, at 20 MB/s, and
/// 28% at 5 MB/s (RELIABILITY.md, "memory pressure in tests").
fn starved(image: &str) -> String {
    workload(
        "starved",
        image,
        "  command: [sh, -c, 'for i in 1 2 3 4; do (while :; do cat /big > /dev/null; done) & done; wait']\n  resources: {memory: 32Mi}\n  terminationGracePeriodSeconds: 0\n",
    )
}

/// Whether this kernel has no memory PSI (said on stderr): the test has nothing to check.
fn memory_psi_off() -> bool {
    let off = fs::metadata("/proc/pressure/memory").is_err();
    if off {
        eprintln!("PSI is off on this kernel");
    }
    off
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
    if memory_psi_off() {
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
    if memory_psi_off() {
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
    if memory_psi_off() {
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

/// What one run of the protection scenario measured.
#[derive(Debug)]
struct Scenario {
    protection: bool,
    /// Kernel OOM kills in the node's memory cgroup.
    oom_kills: u64,
    /// Memory `full` stall of the high-priority container in the 60 s after the hog started.
    high_stall_ms: u64,
    /// Latency of the high-priority workload's HTTP endpoint over the same span.
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Requests that failed or took over 5 s.
    failed: usize,
    /// From the hog's start until it was evicted or killed (NaN: it survived).
    hog_gone_s: f64,
    /// How the hog ended (`EvictedForPressure`, `OOMKilled`, ...).
    hog_reason: String,
    low_reason: String,
    high_restarts: u64,
    daemon_log: String,
}

fn memory_full_total(dir: &std::path::Path) -> u64 {
    let text = fs::read_to_string(dir.join("memory.pressure")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("full"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("total="))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Kernel OOM kills whose memory cgroup was `parent` (from the kernel log: on cgroup v1 the
/// parent's own `oom_kill` counter stays 0 when the victim is in a child).
fn oom_kills(parent: &str) -> u64 {
    let out = std::process::Command::new("dmesg").output().unwrap();
    let needle = format!("oom_memcg={parent},");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&needle))
        .count() as u64
}

/// A GET over a fresh connection; its latency, or none when it failed or took over 5 s.
fn timed_get(addr: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let start = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    String::from_utf8_lossy(&buf)
        .starts_with("HTTP/1.")
        .then(|| start.elapsed().as_secs_f64() * 1000.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// A scratch volume on the node's disk: file pages there are reclaimed under pressure and
/// read back from the disk (the image's files are not a good working set for this: they come
/// from an EROFS image whose backing file stays in the host's page cache).
const SCRATCH: &str =
    "  volumes: [{name: data, emptyDir: {}}]\n  mounts: [{name: data, mountPath: /data}]\n";

/// The node's workloads share a 384 MiB memory cgroup. `high` (priority 1000) serves HTTP and
/// re-reads a 96 MiB file of random bytes every second; `low` (priority 0) sleeps; then `hog` (priority 500)
/// holds 200 MiB and re-reads its own copy of the file without pause: the file pages no longer
/// fit, and everyone thrashes. After 20 s the hog also grows by 8 MiB a second, until the
/// kernel's OOM killer stops it (if nothing did before). Measured over the 60 s after the hog
/// starts.
fn protection_scenario(protection: bool) -> Scenario {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let node = Node::start(&[
        "--insecure-registry",
        &reg.addr,
        "--pressure-admission",
        "off",
        "--pressure-protection",
        if protection { "on" } else { "off" },
    ])
    .unwrap();
    let memcg =
        PathBuf::from("/sys/fs/cgroup/memory").join(node.cgroup_parent.trim_start_matches('/'));
    fs::create_dir_all(&memcg).unwrap();
    fs::write(
        memcg.join("memory.limit_in_bytes"),
        (384u64 << 20).to_string(),
    )
    .unwrap();
    let port = free_port();
    node.apply(&workload(
        "high",
        &image,
        &format!(
            "  priority: 1000\n  command: [sh, -c, 'mkdir -p /tmp/www && echo ok > /tmp/www/index.html && httpd -p 127.0.0.1:{port} -h /tmp/www && head -c 100663296 /dev/urandom > /data/big && while :; do cat /data/big > /dev/null; sleep 1; done']\n  terminationGracePeriodSeconds: 0\n{SCRATCH}"
        ),
    ));
    node.apply(&workload(
        "low",
        &image,
        "  priority: 0\n  command: [sleep, '100000']\n  terminationGracePeriodSeconds: 0\n",
    ));
    let high = node
        .wait_for("high", T, "high running", |v| v["phase"] == "Running")
        .unwrap();
    node.wait_for("low", T, "low running", |v| v["phase"] == "Running")
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    wait_until(T, "high's http endpoint", || timed_get(&addr)).unwrap();
    let high_dir = node
        .v2_dir(&container_ids(&high)[0])
        .expect("a cgroup v2 tree");
    // Let high's working set settle in before the hog comes.
    std::thread::sleep(Duration::from_secs(5));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut failed = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match timed_get(&addr) {
                    Some(ms) => lat.push(ms),
                    None => failed += 1,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (lat, failed)
        })
    };
    let stall0 = memory_full_total(&high_dir);
    let started = std::time::Instant::now();
    node.apply(&workload(
        "hog",
        &image,
        &format!("  priority: 500\n  restartPolicy: Never\n  command: [sh, -c, 'head -c 100663296 /dev/urandom > /data/big; (while :; do cat /data/big; done) > /dev/null & (head -c 209715200 /dev/zero; sleep 20; while :; do head -c 8388608 /dev/zero; sleep 1; done) | busybox tail > /dev/null']\n  terminationGracePeriodSeconds: 0\n{SCRATCH}"),
    ));
    let parent_v2 = node.v2_dir("").unwrap();
    let mut hog_gone_s = None;
    let mut levels = Vec::new();
    let mut last_total = memory_full_total(&parent_v2);
    while started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(1));
        let t = memory_full_total(&parent_v2);
        levels.push(((t - last_total) / 10_000).to_string());
        last_total = t;
        if hog_gone_s.is_none()
            && node
                .get("hog")
                .is_some_and(|v| v["replicas"][0]["phase"] == "Failed")
        {
            hog_gone_s = Some(started.elapsed().as_secs_f64());
        }
    }
    eprintln!(
        "protection {protection}: the workloads' memory full stall each second (%): {}; memory cgroup usage {} of {}",
        levels.join(" "),
        fs::read_to_string(memcg.join("memory.max_usage_in_bytes")).unwrap_or_default().trim(),
        fs::read_to_string(memcg.join("memory.limit_in_bytes")).unwrap_or_default().trim(),
    );
    let high_stall_ms = (memory_full_total(&high_dir) - stall0) / 1000;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut lat, failed) = prober.join().unwrap();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let hog = node.get("hog").unwrap();
    let low = node.get("low").unwrap();
    let high = node.get("high").unwrap();
    Scenario {
        protection,
        oom_kills: oom_kills(&node.cgroup_parent),
        high_stall_ms,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        failed,
        hog_gone_s: hog_gone_s.unwrap_or(f64::NAN),
        hog_reason: hog["replicas"][0]["reason"].as_str().unwrap_or("").into(),
        low_reason: low["replicas"][0]["reason"].as_str().unwrap_or("").into(),
        high_restarts: high["restarts"].as_u64().unwrap_or(99),
        daemon_log: node.daemon_log(),
    }
}

/// The A/B of pressure protection: with it, the lowest priority goes first, then the hog,
/// and the high priority keeps running with no OOM kill; without it, the same scenario ends
/// in a kernel OOM kill (or a longer stall of the high priority). The figures are printed
/// for tests/bench/protection.sh.
#[test]
fn protection_evicts_the_lowest_priority_first_and_the_high_priority_survives() {
    let _serial = serial();
    if fs::metadata("/proc/pressure/memory").is_err()
        || fs::metadata("/sys/fs/cgroup/memory/memory.oom_control").is_err()
    {
        eprintln!("needs PSI and the cgroup v1 memory controller (this hybrid host's)");
        return;
    }
    let on = protection_scenario(true);
    let off = protection_scenario(false);
    for s in [&on, &off] {
        println!(
            "PROTECTION_AB {{\"protection\":{},\"oomKills\":{},\"highStallMs\":{},\"p50Ms\":{:.1},\"p99Ms\":{:.1},\"maxMs\":{:.1},\"failed\":{},\"hogGoneS\":{:.1},\"hog\":\"{}\",\"low\":\"{}\"}}",
            s.protection, s.oom_kills, s.high_stall_ms, s.p50_ms, s.p99_ms, s.max_ms, s.failed, s.hog_gone_s, s.hog_reason, s.low_reason
        );
    }
    let log = &on.daemon_log;
    let line_of = |what: &str, who: &str| {
        log.lines()
            .position(|l| l.contains(what) && l.contains(&format!("workload={who}")))
    };
    // With protection: low throttled, then evicted; then the hog; high untouched.
    assert_eq!(on.low_reason, "EvictedForPressure", "{}", tail(log, 4000));
    assert_eq!(on.hog_reason, "EvictedForPressure", "{}", tail(log, 4000));
    let (Some(t_low), Some(e_low), Some(e_hog)) = (
        line_of("pressure protection: throttling", "low"),
        line_of("pressure protection: evicting", "low"),
        line_of("pressure protection: evicting", "hog"),
    ) else {
        panic!("protection's actions are logged:\n{}", tail(log, 4000));
    };
    assert!(t_low < e_low && e_low < e_hog, "{}", tail(log, 4000));
    assert!(
        line_of("pressure protection", "high").is_none(),
        "high was touched:\n{log}"
    );
    assert_eq!(on.high_restarts, 0);
    assert_eq!(on.oom_kills, 0, "protection came before the OOM killer");
    // Without: the kernel's OOM killer ends it, or high stalls longer.
    assert!(
        off.oom_kills >= 1 || off.high_stall_ms > on.high_stall_ms,
        "on {on:?}\noff {off:?}"
    );
    assert_ne!(off.low_reason, "EvictedForPressure");
}

fn prewarm_state(node: &Node, image: &str) -> Option<String> {
    let n: Value = serde_json::from_slice(&node.cli(&["node", "-o", "json"]).stdout).ok()?;
    n["prewarm"]
        .as_array()?
        .iter()
        .find(|p| p["image"] == image)
        .and_then(|p| p["state"].as_str().map(str::to_string))
}

/// Images asked for through the API and those of `standby: true` workloads are pulled and
/// prepared while the node is calm; with the registry stopped, both then start.
#[test]
fn prewarmed_images_start_with_the_registry_stopped() {
    let _serial = serial();
    let reg = Registry::start(false).unwrap();
    let image = |tag: &str, content: &[u8]| {
        push_image(
            &reg,
            "warm",
            tag,
            vec![
                (busybox_layer().finish(), Compress::Gzip),
                (
                    Layer::new().file("version", content, 0o644).finish(),
                    Compress::Gzip,
                ),
            ],
            &[],
            &["sh"],
        )
        .unwrap()
        .0
    };
    let next = image("2", b"two\n");
    let spare = image("spare", b"spare\n");
    let metrics = format!("127.0.0.1:{}", free_port());
    let node = Node::start(&[
        "--insecure-registry",
        &reg.addr,
        "--metrics-listen",
        &metrics,
    ])
    .unwrap();
    // A bad request names the bad entry.
    let bad = http_over_unix(
        &node.socket,
        "POST",
        "/v1/images/prewarm",
        r#"{"images": ["ok.example/a:1", "UPPER/Case::x"]}"#,
    );
    assert!(bad.contains("400") && bad.contains("images[1]"), "{bad}");
    let answer = http_over_unix(
        &node.socket,
        "POST",
        "/v1/images/prewarm",
        &format!(r#"{{"images": ["{next}"]}}"#),
    );
    assert!(answer.contains("202"), "{answer}");
    node.apply(&workload(
        "spare",
        &spare,
        "  standby: true\n  command: [sh, -c, 'cat /version; sleep 1000']\n  terminationGracePeriodSeconds: 0\n",
    ));
    let st = node
        .wait_for("spare", T, "spare on standby", |v| v["reason"] == "Standby")
        .unwrap();
    assert_eq!(st["replicas"].as_array().unwrap().len(), 0, "{st}");
    for i in [&next, &spare] {
        wait_until(T, "prewarmed", || {
            (prewarm_state(&node, i).as_deref() == Some("Ready")).then_some(())
        })
        .unwrap();
    }
    // Garbage collection keeps them: no workload uses them yet.
    drop(reg);
    node.apply(&workload(
        "app",
        &next,
        "  command: [sh, -c, 'cat /version; sleep 1000']\n  terminationGracePeriodSeconds: 0\n",
    ));
    node.apply(&workload(
        "spare",
        &spare,
        "  command: [sh, -c, 'cat /version; sleep 1000']\n  terminationGracePeriodSeconds: 0\n",
    ));
    for name in ["app", "spare"] {
        node.wait_for(name, T, "running without a registry", |v| {
            v["phase"] == "Running"
        })
        .unwrap();
    }
    let logs = String::from_utf8_lossy(&node.cli(&["logs", "app"]).stdout).to_string();
    assert!(logs.contains("two"), "{logs}");
    // Per-container PSI in /metrics (once sampled), each family declared once.
    if fs::metadata("/proc/pressure/memory").is_ok() && node.v2_dir("").is_some() {
        let m = wait_until(T, "per-container PSI in /metrics", || {
            let m = http_tcp(&metrics, "/metrics", None);
            m.contains("hyperbox_container_pressure_avg10{namespace=\"default\",workload=\"app\",replica=\"0\",resource=\"memory\",kind=\"some\"}")
                .then_some(m)
        })
        .unwrap();
        assert!(m.contains("hyperbox_container_pressure_stalled_seconds_total{namespace=\"default\",workload=\"spare\",replica=\"0\",resource=\"cpu\",kind=\"some\"}"), "{m}");
        assert!(m.contains("hyperbox_protection_level "), "{m}");
        let mut types: Vec<&str> = m.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let n = types.len();
        types.sort();
        types.dedup();
        assert_eq!(types.len(), n, "a family declared twice:\n{m}");
    }
}
