//! Per-container telemetry on a real kernel: the eBPF programs count a container's execs,
//! exits, network bytes, TCP connects, accepts and retransmits, OOM kills and run-queue waits, attributed by
//! its cgroup v2 id; a real OpenTelemetry Collector receives the OTLP export and a real
//! Prometheus scrapes `/metrics`. Also: the `--ebpf off` path, and that nothing of the programs
//! outlives a killed daemon.

use std::fs;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use hyperbox_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

fn project_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn start_node(reg: &Registry, more: &[&str]) -> (Node, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args: Vec<String> = vec![
        "--insecure-registry".into(),
        reg.addr.clone(),
        "--metrics-listen".into(),
        metrics.clone(),
    ];
    args.extend(more.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let node = Node::start(&refs).expect("start node");
    wait_until(T, "metrics listener", || {
        std::net::TcpStream::connect(&metrics).ok()
    })
    .unwrap();
    (node, metrics)
}

/// The value of the sample `name{labels...}` whose labels include all of `want`.
fn sample(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
            let end = r.find('}')?;
            (&r[..end], r[end + 1..].trim())
        } else {
            ("", rest.strip_prefix(' ')?.trim())
        };
        want.iter()
            .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.split_whitespace().next()?.parse().ok())?
    })
}

fn of(workload: &str) -> [(&str, &str); 3] {
    [
        ("namespace", "default"),
        ("workload", workload),
        ("replica", "0"),
    ]
}

const EXECS: u64 = 25;

/// A shell that runs /bin/true EXECS times (each a real execve: a path, so busybox's shell
/// cannot run the applet in process) and then execs sleep: the container's init exec of sh,
/// EXECS, and the last exec.
fn exec_loop() -> String {
    format!(
        "  command: [sh, -c, 'i=0; while [ $i -lt {EXECS} ]; do /bin/true; i=$((i+1)); done; exec /bin/sleep 1000']\n  terminationGracePeriodSeconds: 0\n"
    )
}

const SERVED: u64 = 1 << 20;

/// An HTTP server and a client in one container, over loopback: `bytes` of body go out of the
/// server's socket and into the client's, both the container's. `before_fetch` runs between
/// the server's start and the client's (a shell command list ending in `&&`, or nothing).
fn loopback_transfer(bytes: u64, before_fetch: &str) -> String {
    format!(
        "  command: [sh, -c, 'mkdir -p /tmp/www && head -c {bytes} /dev/zero > /tmp/www/f && httpd -p 127.0.0.1:8080 -h /tmp/www && {before_fetch}wget -q -O /dev/null http://127.0.0.1:8080/f && echo fetched && exec /bin/sleep 1000']\n  network: none\n  terminationGracePeriodSeconds: 0\n"
    )
}

#[test]
fn ebpf_counts_execs_network_oom_and_run_queue_per_container() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let (node, metrics) = start_node(&reg, &[]);
    let n = node.node_json();
    assert_eq!(n["features"]["ebpf"], true, "{}", n["features"]);
    let programs = n["features"]["ebpfPrograms"].as_object().unwrap();
    assert!(programs.len() >= 10, "{programs:?}");
    for (p, state) in programs {
        assert_eq!(state, "attached", "program {p}: {state}");
    }

    node.apply(&workload("execs", &image, &exec_loop()));
    node.apply(&workload("net", &image, &loopback_transfer(SERVED, "")));
    node.apply(&workload(
        "hog",
        &image,
        "  command: [dd, if=/dev/zero, of=/dev/null, bs=128M, count=1]\n  resources: {memory: 32Mi}\n  restartPolicy: Never\n",
    ));
    node.wait_for("execs", T, "execs running", |v| v["phase"] == "Running")
        .unwrap();
    let hog = node
        .wait_for("hog", T, "oom kill", |v| v["phase"] == "Failed")
        .unwrap();
    assert_eq!(hog["reason"], "OOMKilled", "{hog}");
    node.wait_for_log("net", "fetched", T).unwrap();

    // Execs: exactly the container's own, however long we wait.
    let execs = "hyperbox_container_process_execs_total";
    let m = wait_until(T, "the execs counted", || {
        let m = http_tcp(&metrics, "/metrics", None);
        (sample(&m, execs, &of("execs")) >= Some((EXECS + 2) as f64)).then_some(m)
    })
    .unwrap();
    assert_eq!(
        sample(&m, execs, &of("execs")),
        Some((EXECS + 2) as f64),
        "{m}"
    );
    assert_eq!(
        sample(&m, "hyperbox_container_process_exits_total", &of("execs")),
        Some(EXECS as f64),
        "{m}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let m = http_tcp(&metrics, "/metrics", None);
    assert_eq!(
        sample(&m, execs, &of("execs")),
        Some((EXECS + 2) as f64),
        "{m}"
    );

    // Loopback bytes: the body plus headers, both ways in the one container.
    for dir in ["transmit", "receive"] {
        let mut want = of("net").to_vec();
        want.push(("network_io_direction", dir));
        let bytes = sample(&m, "container_network_io_bytes_total", &want).unwrap_or(0.0) as u64;
        assert!(
            (SERVED..=SERVED + SERVED / 20).contains(&bytes),
            "{dir}: {bytes} bytes for a {SERVED}-byte body (tolerance +5% for headers and acks)\n{m}"
        );
        let packets = sample(&m, "hyperbox_container_network_packets_total", &want).unwrap_or(0.0);
        assert!(packets >= 4.0, "{dir}: {packets} packets\n{m}");
    }
    assert_eq!(
        sample(&m, "hyperbox_container_tcp_connects_total", &of("net")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "hyperbox_container_tcp_accepts_total", &of("net")),
        Some(1.0),
        "{m}"
    );
    // Nothing of the other containers leaks into this one.
    assert_eq!(
        sample(&m, "hyperbox_container_tcp_connects_total", &of("execs")),
        Some(0.0),
        "{m}"
    );
    // The OOM kill outlives the killed container (its counters went to the replica's).
    assert!(
        sample(&m, "hyperbox_container_oom_kills_total", &of("hog")) >= Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "hyperbox_container_oom_kills_total", &of("execs")),
        Some(0.0),
        "{m}"
    );
    // Run-queue waits: every exec'd process was woken and scheduled at least once.
    let rq = sample(
        &m,
        "hyperbox_container_runqueue_latency_seconds_count",
        &of("execs"),
    )
    .unwrap_or(0.0);
    assert!(rq >= EXECS as f64, "run-queue samples {rq}\n{m}");
    assert!(
        sample(&m, "container_cpu_time_seconds_total", &of("execs")) > Some(0.0),
        "{m}"
    );
    assert!(
        sample(&m, "container_memory_usage_bytes", &of("execs")) > Some(0.0),
        "{m}"
    );
    let digest = node.get("execs").unwrap()["imageDigest"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        sample(
            &m,
            "hyperbox_container_info",
            &[("workload", "execs"), ("image_digest", &digest)]
        ) == Some(1.0),
        "{m}"
    );
    // Runtime metrics.
    assert!(
        sample(
            &m,
            "hyperbox_container_starts_total",
            &[("result", "success")]
        ) >= Some(3.0),
        "{m}"
    );
    assert!(
        sample(&m, "hyperbox_image_pulls_total", &[("result", "success")]) >= Some(1.0),
        "{m}"
    );
    assert!(
        sample(&m, "hyperbox_reconcile_duration_seconds_count", &[]) >= Some(2.0),
        "{m}"
    );

    // A container's entries go when it goes.
    let entries = |m: &str| sample(m, "hyperbox_ebpf_map_entries", &[]).unwrap();
    assert!(entries(&m) >= 2.0, "{m}");
    for w in ["execs", "net", "hog"] {
        assert!(node.cli(&["delete", w]).status.success());
    }
    wait_until(T, "every map entry gone", || {
        let m = http_tcp(&metrics, "/metrics", None);
        (entries(&m) == 0.0 && sample(&m, execs, &of("execs")).is_none()).then_some(())
    })
    .unwrap();
}

const LOSSY: u64 = 4 << 20;

/// Before its client fetches, the lossy container says it serves and waits for /tmp/go, so
/// that the test can make its loopback lossy first.
const WAIT_FOR_GO: &str = "echo serving && until [ -e /tmp/go ]; do sleep 0.1; done && ";

/// A counter of the network namespace of `pid`: `file` under /proc/PID/net (snmp, netstat),
/// the line pair starting `group` ("Tcp:", "TcpExt:"), the column `name`.
fn net_counter(pid: i32, file: &str, group: &str, name: &str) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with(group));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let at = names.split_whitespace().position(|n| n == name).unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// TCP retransmits, on a real kernel: 10% of the container's loopback TCP packets are dropped
/// on input (real loss, so its server retransmits) and 10% on output (so some retransmits fail
/// to go out: the kernel counts those attempts in RetransSegs and again in TCPRetransFail, and
/// on newer kernels fires the tracepoint for them too). The count is the sender's; it is at
/// least one and at most the retransmitted segments that went out (a retransmitted GSO packet
/// is one event and several segments), so failed attempts are not counted; and a container on
/// a clean loopback counts none.
#[test]
fn tcp_retransmits_are_counted_for_the_sender() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let (node, metrics) = start_node(&reg, &[]);
    assert_eq!(node.node_json()["features"]["ebpf"], true);
    node.apply(&workload(
        "lossy",
        &image,
        &loopback_transfer(LOSSY, WAIT_FOR_GO),
    ));
    node.apply(&workload("clean", &image, &loopback_transfer(SERVED, "")));
    let v = node
        .wait_for("lossy", T, "lossy running", |v| v["phase"] == "Running")
        .unwrap();
    let pid = v["replicas"][0]["pid"].as_i64().unwrap() as i32;
    node.wait_for_log("lossy", "serving", T).unwrap();
    let ns = pid.to_string();
    for chain in [["INPUT", "-i"], ["OUTPUT", "-o"]] {
        let drop = Command::new("nsenter")
            .args([
                "-t", &ns, "-n", "iptables", "-A", chain[0], chain[1], "lo", "-p", "tcp",
            ])
            .args([
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.1",
            ])
            .args(["-j", "DROP"])
            .output()
            .unwrap();
        assert!(drop.status.success(), "iptables: {drop:?}");
    }
    let segs = || net_counter(pid, "snmp", "Tcp:", "RetransSegs");
    let fails = || net_counter(pid, "netstat", "TcpExt:", "TCPRetransFail");
    let (before, failed_before) = (segs(), fails());
    fs::write(format!("/proc/{pid}/root/tmp/go"), b"").unwrap();
    for w in ["lossy", "clean"] {
        node.wait_for_log(w, "fetched", T).unwrap();
    }
    let (kernel, failed) = (segs() - before, fails() - failed_before);
    let sent = kernel - failed;
    assert!(sent > 0, "the kernel retransmitted nothing: no loss?");
    let name = "hyperbox_container_tcp_retransmits_total";
    let m = wait_until(T, "retransmits counted", || {
        let m = http_tcp(&metrics, "/metrics", None);
        (sample(&m, name, &of("lossy")) > Some(0.0)).then_some(m)
    })
    .unwrap();
    let counted = sample(&m, name, &of("lossy")).unwrap() as u64;
    eprintln!("retransmits: {counted} counted, the kernel's RetransSegs +{kernel}, TCPRetransFail +{failed}");
    assert!(
        (1..=sent).contains(&counted),
        "{counted} retransmits counted; the kernel's RetransSegs rose by {kernel}, \
         TCPRetransFail by {failed}\n{m}"
    );
    assert_eq!(sample(&m, name, &of("clean")), Some(0.0), "{m}");
    // The loss cost packets, not bytes: the whole body still arrived, once, at the client.
    let mut want = of("lossy").to_vec();
    want.push(("network_io_direction", "receive"));
    let got = sample(&m, "container_network_io_bytes_total", &want).unwrap() as u64;
    assert!(
        got >= LOSSY,
        "{got} bytes received for a {LOSSY}-byte body\n{m}"
    );
}

#[test]
fn ebpf_off_exports_the_rest() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let (node, metrics) = start_node(&reg, &["--ebpf", "off"]);
    let n = node.node_json();
    assert_eq!(n["features"]["ebpf"], false, "{}", n["features"]);
    assert!(
        n["features"]["ebpfReason"]
            .as_str()
            .unwrap()
            .contains("--ebpf off"),
        "{}",
        n["features"]
    );
    for (p, state) in n["features"]["ebpfPrograms"].as_object().unwrap() {
        assert_eq!(state, "disabled", "{p}");
    }
    node.apply(&workload("web", &image, &exec_loop()));
    node.wait_for("web", T, "running", |v| v["phase"] == "Running")
        .unwrap();
    let m = wait_until(T, "cgroup readings", || {
        let m = http_tcp(&metrics, "/metrics", None);
        (sample(&m, "container_cpu_time_seconds_total", &of("web")) > Some(0.0)).then_some(m)
    })
    .unwrap();
    assert!(!m.contains("hyperbox_container_process_execs_total"), "{m}");
    assert!(
        sample(&m, "hyperbox_ebpf_program_attached", &[("program", "exec")]) == Some(0.0),
        "{m}"
    );
    // No eBPF program attached to this node's cgroup.
    let parent = node.v2_dir("").expect("a cgroup v2 tree");
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&parent)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Ids of the BPF programs a process holds (the `prog_id` of its file descriptors' fdinfo:
/// program fds and link fds both show it).
fn programs_of(pid: i32) -> Vec<u64> {
    let mut ids: Vec<u64> = fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn program_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn nothing_of_ebpf_outlives_a_killed_daemon() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let (mut node, metrics) = start_node(&reg, &[]);
    node.apply(&workload("web", &image, &exec_loop()));
    node.wait_for("web", T, "running", |v| v["phase"] == "Running")
        .unwrap();
    let ids = programs_of(node.pid());
    assert!(ids.len() >= 10, "programs held by the daemon: {ids:?}");
    let parent = node.v2_dir("").expect("a cgroup v2 tree");
    let attached = || {
        let out = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&parent)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(attached().contains("hb_ingress"), "{}", attached());
    node.kill9();
    // The kernel frees the programs and their links with the daemon's file descriptors.
    wait_until(Duration::from_secs(20), "programs freed", || {
        ids.iter().all(|id| !program_exists(*id)).then_some(())
    })
    .unwrap();
    assert!(!attached().contains("hb_"), "{}", attached());
    let pinned: Vec<_> = fs::read_dir("/sys/fs/bpf")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !pinned
            .iter()
            .any(|n| n.to_string_lossy().contains("hyperbox")),
        "{pinned:?}"
    );
    // The restarted daemon adopts the container and counts again from its own start.
    node.spawn().unwrap();
    node.wait_for("web", T, "adopted", |v| v["phase"] == "Running")
        .unwrap();
    assert!(programs_of(node.pid()).len() >= 10);
    let m = wait_until(T, "adopted replica exported", || {
        let m = http_tcp(&metrics, "/metrics", None);
        sample(&m, "hyperbox_container_process_execs_total", &of("web")).map(|_| m)
    })
    .unwrap();
    assert!(m.contains("hyperbox_ebpf_map_entries"), "{m}");
}

struct Collector {
    dir: tempfile::TempDir,
    port: u16,
}

impl Collector {
    fn start() -> Collector {
        let dir = tempfile::Builder::new()
            .prefix("otelcol")
            .tempdir()
            .unwrap();
        let port = free_port();
        let st = Command::new(project_root().join("tests/otel/collector.sh"))
            .arg("up")
            .arg(dir.path())
            .arg(port.to_string())
            .status()
            .unwrap();
        assert!(st.success(), "collector.sh up failed");
        Collector { dir, port }
    }

    /// Every OTLP/JSON object the collector wrote.
    fn received(&self) -> Vec<Value> {
        fs::read_to_string(self.dir.path().join("out.json"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = Command::new(project_root().join("tests/otel/collector.sh"))
            .arg("down")
            .arg(self.dir.path())
            .status();
    }
}

fn attrs(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["key"].as_str().unwrap_or_default().to_string(),
                a["value"]["stringValue"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

#[test]
fn otlp_export_reaches_a_real_collector() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let collector = Collector::start();
    let endpoint = format!("http://127.0.0.1:{}", collector.port);
    let (node, _metrics) = start_node(
        &reg,
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-interval",
            "1s",
            "--node-name",
            "edge-7",
        ],
    );
    let yaml = workload("web", &image, &exec_loop()).replace(
        "  name: web\n",
        "  name: web\n  annotations:\n    hyperbox.dev/revision: main@0123abcd\n",
    );
    node.apply(&yaml);
    let st = node
        .wait_for("web", T, "running", |v| v["phase"] == "Running")
        .unwrap();
    let digest = st["imageDigest"].as_str().unwrap().to_string();
    let container = st["replicas"][0]["containerId"]
        .as_str()
        .unwrap()
        .to_string();
    // The container's resource, with an execs count that includes all its execs.
    let (resource, metrics) = wait_until(T, "the container's metrics at the collector", || {
        collector.received().iter().rev().find_map(|obj| {
            obj["resourceMetrics"].as_array()?.iter().find_map(|rm| {
                let a = attrs(&rm["resource"]["attributes"]);
                let metrics = rm["scopeMetrics"][0]["metrics"].as_array()?.clone();
                let execs = metrics
                    .iter()
                    .find(|m| m["name"] == "hyperbox.container.process.execs")?;
                let v: u64 = execs["sum"]["dataPoints"][0]["asInt"]
                    .as_str()?
                    .parse()
                    .ok()?;
                (a.contains(&("hyperbox.workload.name".into(), "web".into())) && v == EXECS + 2)
                    .then_some((a, metrics))
            })
        })
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&node.daemon_log(), 3000)));
    for (k, v) in [
        ("host.name", "edge-7"),
        ("k8s.namespace.name", "default"),
        ("hyperbox.replica.index", "0"),
        ("container.id", container.as_str()),
        ("oci.manifest.digest", digest.as_str()),
        ("vcs.ref.head.revision", "main@0123abcd"),
    ] {
        assert!(
            resource.contains(&(k.to_string(), v.to_string())),
            "{k}={v} not in {resource:?}"
        );
    }
    let names: Vec<&str> = metrics.iter().filter_map(|m| m["name"].as_str()).collect();
    for want in [
        "container.cpu.time",
        "container.memory.usage",
        "container.network.io",
        "hyperbox.container.process.exits",
        "hyperbox.container.oom_kills",
        "hyperbox.container.tcp.connects",
        "hyperbox.container.runqueue.latency",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    let cpu = metrics
        .iter()
        .find(|m| m["name"] == "container.cpu.time")
        .unwrap();
    assert_eq!(cpu["unit"], "s");
    assert_eq!(cpu["sum"]["isMonotonic"], true);
    assert_eq!(cpu["sum"]["aggregationTemporality"], 2);
    let rq = metrics
        .iter()
        .find(|m| m["name"] == "hyperbox.container.runqueue.latency")
        .unwrap();
    assert!(
        rq["histogram"]["dataPoints"][0]["bucketCounts"].is_array(),
        "{rq}"
    );
    // The node's own resource: runtime metrics.
    wait_until(T, "the node's metrics", || {
        collector.received().iter().find_map(|obj| {
            obj["resourceMetrics"].as_array()?.iter().find(|rm| {
                let a = attrs(&rm["resource"]["attributes"]);
                a.contains(&("service.name".into(), "hyperbox-node".into()))
                    && rm["scopeMetrics"][0]["metrics"]
                        .as_array()
                        .is_some_and(|m| m.iter().any(|m| m["name"] == "hyperbox.container.starts"))
            })?;
            Some(())
        })
    })
    .unwrap();
    // Daemon traces: the pull and the container start.
    wait_until(T, "the daemon's spans", || {
        let spans: Vec<String> = collector
            .received()
            .iter()
            .filter_map(|o| o["resourceSpans"].as_array().cloned())
            .flatten()
            .flat_map(|rs| {
                rs["scopeSpans"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .flat_map(|ss| ss["spans"].as_array().cloned().unwrap_or_default())
            })
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect();
        ["image.pull", "container.start", "workload.reconcile"]
            .iter()
            .all(|n| spans.iter().any(|s| s == n))
            .then_some(())
    })
    .unwrap();
}

struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(target: &str) -> Prometheus {
    let dir = tempfile::Builder::new().prefix("prom").tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: hyperbox\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus (Debian package) is installed");
    Prometheus {
        child,
        addr,
        _dir: dir,
    }
}

#[test]
fn a_real_prometheus_scrapes_the_workload_series() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let (node, metrics) = start_node(&reg, &[]);
    node.apply(&workload("web", &image, &exec_loop()));
    node.wait_for("web", T, "running", |v| v["phase"] == "Running")
        .unwrap();
    let prom = start_prometheus(&metrics);
    let result = wait_until(T, "prometheus has the series", || {
        let body = std::panic::catch_unwind(|| {
            http_tcp(
                &prom.addr,
                "/api/v1/query?query=hyperbox_container_process_execs_total",
                None,
            )
        })
        .ok()?;
        let json: Value = serde_json::from_str(body.split("\r\n\r\n").nth(1)?).ok()?;
        let r = json["data"]["result"].as_array()?.clone();
        r.iter()
            .any(|s| s["metric"]["workload"] == "web")
            .then_some(r)
    })
    .unwrap();
    let web = result
        .iter()
        .find(|s| s["metric"]["workload"] == "web")
        .unwrap();
    assert_eq!(web["metric"]["namespace"], "default");
    assert_eq!(web["metric"]["replica"], "0");
    assert_eq!(web["value"][1], format!("{}", EXECS + 2), "{web}");
    // The scrape itself is healthy (OpenMetrics parsed, no errors).
    let targets = http_tcp(&prom.addr, "/api/v1/targets", None);
    assert!(targets.contains("\"health\":\"up\""), "{targets}");
}

/// Without permission to use bpf() (CAP_BPF and CAP_SYS_ADMIN dropped, as in a container that
/// is not privileged), the daemon still serves, says why once, and exports the rest.
/// A node started by `wrap`, given the node's command line (an `exec` for `sh -c`), with
/// `check` run on its `node -o json`, its metrics address and its log. Whatever happens, the
/// daemon is killed and its cgroup parent removed from every hierarchy afterwards.
fn wrapped_node(
    tag: &str,
    wrap: impl FnOnce(&str) -> Command,
    check: impl FnOnce(&Value, &str, &dyn Fn() -> String),
) {
    let dir = tempfile::Builder::new().prefix(tag).tempdir().unwrap();
    let sock = dir.path().join("node.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    let log = fs::File::create(dir.path().join("daemon.log")).unwrap();
    let node = bin("hyperbox-node");
    let parent = format!("hyperbox-{tag}-{}", std::process::id());
    let cmd = format!(
        "exec {} --socket {} serve --state-dir {} --run-dir {} --cgroup-parent /{parent} --metrics-listen {metrics}",
        node.display(),
        sock.display(),
        dir.path().join("state").display(),
        dir.path().join("run").display(),
    );
    let mut child = wrap(&cmd)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("the wrapper");
    let daemon_log = || fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
    let up = wait_until(Duration::from_secs(30), "node socket", || {
        std::os::unix::net::UnixStream::connect(&sock).ok()
    });
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        up.unwrap_or_else(|e| panic!("{e}\n{}", daemon_log()));
        let out = Command::new(&node)
            .arg("--socket")
            .arg(&sock)
            .args(["node", "-o", "json"])
            .output()
            .unwrap();
        let n: Value = serde_json::from_slice(&out.stdout).unwrap();
        check(&n, &metrics, &daemon_log);
    }));
    let _ = child.kill();
    let _ = child.wait();
    for hierarchy in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = fs::remove_dir(hierarchy.path().join(&parent));
    }
    let _ = fs::remove_dir(Path::new("/sys/fs/cgroup").join(&parent));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// What a node without eBPF still exports, and that it said why once.
fn exports_without_ebpf(n: &Value, metrics: &str, daemon_log: &dyn Fn() -> String) {
    for (p, state) in n["features"]["ebpfPrograms"].as_object().unwrap() {
        assert!(
            state.as_str().unwrap().starts_with("not loaded"),
            "{p}: {state}"
        );
    }
    assert_eq!(
        daemon_log().matches("eBPF telemetry off").count(),
        1,
        "{}",
        daemon_log()
    );
    let m = wait_until(T, "metrics", || {
        std::net::TcpStream::connect(metrics).ok()?;
        Some(http_tcp(metrics, "/metrics", None))
    })
    .unwrap();
    assert!(
        m.contains("hyperbox_ebpf_program_attached{program=\"exec\"} 0"),
        "{m}"
    );
    assert!(m.contains("hyperbox_container_starts_total"), "{m}");
}

#[test]
fn without_permission_the_node_runs_and_says_why() {
    wrapped_node(
        "nocap",
        |cmd| {
            let mut c = Command::new("capsh");
            c.args(["--drop=cap_bpf,cap_sys_admin,cap_perfmon", "--", "-c", cmd]);
            c
        },
        |n, metrics, daemon_log| {
            assert_eq!(n["features"]["ebpf"], false, "{}", n["features"]);
            let reason = n["features"]["ebpfReason"].as_str().unwrap().to_lowercase();
            assert!(
                reason.contains("not permitted") || reason.contains("permission"),
                "{reason}"
            );
            exports_without_ebpf(n, metrics, daemon_log);
        },
    );
}

/// In a cgroup namespace, a cgroup2 mount shows the namespace's root, and a container's depth
/// read from its path is not its depth in the kernel: the programs would count nothing. The
/// node sees that (the mount's cgroup id is not 1), says so and exports the rest.
#[test]
fn in_a_cgroup_namespace_the_node_says_why() {
    let v2 = v2_root().expect("cgroup v2");
    let ns_root = v2.join(format!("hbcgns-{}", std::process::id()));
    fs::create_dir_all(&ns_root).unwrap();
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            if let Ok(d) = fs::read_dir(&self.0) {
                for e in d.flatten().filter(|e| e.path().is_dir()) {
                    let _ = fs::remove_dir(e.path());
                }
            }
            let _ = fs::remove_dir(&self.0);
        }
    }
    let _rm = Rm(ns_root.clone());
    wrapped_node(
        "cgns",
        |cmd| {
            // Into the new cgroup first, so that it is the namespace's root; then, in a private
            // mount namespace, a new cgroup2 mount in place of the host's.
            let mut c = Command::new("sh");
            c.args([
                "-c",
                &format!(
                    "echo $$ > {}/cgroup.procs && exec unshare --cgroup --mount --propagation private sh -c \"$0\"",
                    ns_root.display()
                ),
                &format!(
                    "umount -l {v2} && mount -t cgroup2 none {v2} && {cmd}",
                    v2 = v2.display()
                ),
            ]);
            c
        },
        |n, metrics, daemon_log| {
            assert_eq!(n["features"]["ebpf"], false, "{}", n["features"]);
            let reason = n["features"]["ebpfReason"].as_str().unwrap();
            assert!(
                reason.contains("is not the hierarchy's root") && reason.contains("namespace"),
                "{reason}"
            );
            exports_without_ebpf(n, metrics, daemon_log);
        },
    );
}
