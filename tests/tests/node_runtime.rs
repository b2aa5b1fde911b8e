//! End-to-end tests of `hyperbox-node` with a real registry, real containers, real mounts and
//! cgroups. They need root (CI runs as root).

use std::fs;
use std::time::Duration;

use hyperbox_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn phase(v: &Value) -> &str {
    v["phase"].as_str().unwrap_or("")
}

fn reason(v: &Value) -> &str {
    v["reason"].as_str().unwrap_or("")
}

fn insecure(reg: &Registry) -> Vec<String> {
    vec!["--insecure-registry".into(), reg.addr.clone()]
}

fn start_node(reg: &Registry, more: &[&str]) -> Node {
    start_node_with_backoff(reg, "200ms", more)
}

fn start_node_with_backoff(reg: &Registry, base: &str, more: &[&str]) -> Node {
    let mut args: Vec<String> = insecure(reg);
    args.extend([
        "--backoff-base".into(),
        base.into(),
        "--backoff-max".into(),
        "10s".into(),
    ]);
    args.extend(more.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    Node::start(&refs).expect("start node")
}

#[test]
fn output_and_exit_code_of_a_container() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let node = start_node(&reg, &[]);
    let out = node.apply(&workload(
        "exit3",
        &image,
        "  command: [sh, -c, 'echo hello from $(hostname); echo to-stderr >&2; exit 3']\n  restartPolicy: Never\n",
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = node
        .wait_for("exit3", T, "container to finish", |v| phase(v) == "Failed")
        .unwrap();
    assert_eq!(v["lastExitCode"], 3);
    assert_eq!(reason(&v), "Error");
    assert!(v["imageDigest"].as_str().unwrap().starts_with("sha256:"));
    let logs = node.cli(&["logs", "exit3"]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains("hello from exit3"), "logs: {text}");
    assert!(text.contains("to-stderr"), "logs: {text}");

    // Exit 0 with Never: Succeeded.
    node.apply(&workload(
        "ok",
        &image,
        "  command: ['true']\n  restartPolicy: Never\n",
    ));
    let v = node
        .wait_for("ok", T, "success", |v| phase(v) == "Succeeded")
        .unwrap();
    assert_eq!(v["lastExitCode"], 0);
    // Nothing of finished containers is left mounted.
    assert!(
        node.mounts().iter().all(|m| !m.contains("/containers/")),
        "{:?}",
        node.mounts()
    );
}

#[test]
fn pull_by_tag_and_digest_with_auth() {
    let reg = Registry::start(true).unwrap();
    let (by_tag, digest) = push_image(
        &reg,
        "private/bb",
        "v1",
        vec![(busybox_layer().finish(), Compress::Zstd)],
        &[],
        &["sh"],
    )
    .unwrap();
    let auth = tempfile::NamedTempFile::new().unwrap();
    reg.write_auth_file(auth.path()).unwrap();

    // Without credentials the registry says no, and the status says why.
    let anon = start_node(&reg, &[]);
    anon.apply(&workload("anon", &by_tag, "  command: [sleep, '100']\n"));
    let v = anon
        .wait_for("anon", T, "pull failure", |v| {
            matches!(reason(v), "ErrImagePull" | "ImagePullBackOff")
        })
        .unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("auth")
            || v["message"].as_str().unwrap().contains("401"),
        "{v}"
    );

    let node = start_node(
        &reg,
        &["--registry-auth-file", auth.path().to_str().unwrap()],
    );
    node.apply(&workload("bytag", &by_tag, "  command: [sleep, '100']\n"));
    let v = node
        .wait_for("bytag", T, "running by tag", |v| phase(v) == "Running")
        .unwrap();
    assert_eq!(v["imageDigest"], digest.as_str());
    let by_digest = format!("{}/private/bb@{digest}", reg.addr);
    node.apply(&workload(
        "bydigest",
        &by_digest,
        "  command: [sleep, '100']\n",
    ));
    let v = node
        .wait_for("bydigest", T, "running by digest", |v| {
            phase(v) == "Running"
        })
        .unwrap();
    assert_eq!(v["imageDigest"], digest.as_str());
    // A digest that does not exist fails cleanly.
    let missing = format!("{}/private/bb@sha256:{}", reg.addr, "0".repeat(64));
    node.apply(&workload("missing", &missing, ""));
    node.wait_for("missing", T, "missing digest", |v| {
        matches!(reason(v), "ErrImagePull" | "ImagePullBackOff")
    })
    .unwrap();
    // Both workloads share one prepared image.
    let images: Vec<_> = fs::read_dir(node.state.join("images"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().len() == 64)
        .collect();
    assert_eq!(images.len(), 1);
}

#[test]
fn corrupted_layer_is_refused() {
    let reg = Registry::start(false).unwrap();
    let layer = Layer::new()
        .file("hello.txt", b"good content", 0o644)
        .finish();
    let dir = tempfile::tempdir().unwrap();
    write_layout(
        dir.path(),
        "1",
        vec![
            (busybox_layer().finish(), Compress::Gzip),
            (layer, Compress::None),
        ],
        &[],
        &["sh"],
    )
    .unwrap();
    let pushed = reg.push(dir.path(), "1", "corrupt").unwrap();
    // Flip bytes of the second layer as stored in the registry: it now serves wrong content.
    // (Read the manifest the registry holds: skopeo may have recompressed layers.)
    let manifest: Value =
        serde_json::from_slice(&fs::read(reg.blob_data(&pushed)).unwrap()).unwrap();
    let layer_digest = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let data_path = reg.blob_data(&layer_digest);
    let mut data = fs::read(&data_path).unwrap();
    let n = data.len();
    data[n / 2] ^= 0xff;
    fs::write(&data_path, data).unwrap();

    let node = start_node(&reg, &[]);
    node.apply(&workload(
        "corrupt",
        &format!("{}/corrupt:1", reg.addr),
        "  command: [sleep, '10']\n",
    ));
    let v = node
        .wait_for("corrupt", T, "digest failure", |v| {
            matches!(reason(v), "ErrImagePull" | "ImagePullBackOff")
        })
        .unwrap();
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains(&layer_digest),
        "message names the layer: {msg}"
    );
    assert!(msg.to_lowercase().contains("digest"), "{msg}");
    // The bad blob never made it into the store, and no image was prepared.
    let blob = node
        .state
        .join("images/blobs/sha256")
        .join(layer_digest.trim_start_matches("sha256:"));
    assert!(!blob.exists());
    assert_eq!(v["phase"], "Pending");
}

/// Each malicious layer is refused with the layer and entry named, and nothing lands outside.
#[test]
fn malicious_layers_are_refused() {
    let reg = Registry::start(false).unwrap();
    let canary_dir = tempfile::tempdir().unwrap();
    let canary = canary_dir.path().join("pwned");
    // Relative path from the staging rootfs up to `/`: deep enough for any state dir.
    let up = "../".repeat(12);
    let canary_rel = canary.to_str().unwrap().trim_start_matches('/');
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "traversal",
            Layer::new()
                .file(&format!("{up}{canary_rel}"), b"x", 0o644)
                .finish(),
            "..",
        ),
        (
            "symlink-escape",
            Layer::new()
                .symlink("evil", canary_dir.path().to_str().unwrap())
                .file("evil/pwned", b"x", 0o644)
                .finish(),
            "evil/pwned",
        ),
        (
            "absolute-hardlink",
            Layer::new().hardlink("shadow", "/etc/shadow").finish(),
            "shadow",
        ),
        (
            "device",
            Layer::new()
                .dir("dev/", 0o755)
                .char_device("dev/mem", 1, 1)
                .finish(),
            "dev/mem",
        ),
        (
            "oversized",
            Layer::new().big_file("big.bin", 64 << 20).finish(),
            "big.bin",
        ),
    ];
    let mut images = Vec::new();
    for (name, tar, entry) in cases {
        let (r, _) = push_image(
            &reg,
            &format!("evil/{name}"),
            "1",
            vec![
                (busybox_layer().finish(), Compress::Gzip),
                (tar, Compress::Gzip),
            ],
            &[],
            &["sh"],
        )
        .unwrap();
        images.push((name, r, entry));
    }
    let node = start_node(&reg, &["--max-image-bytes", &(32u64 << 20).to_string()]);
    for (name, image, entry) in &images {
        node.apply(&workload(name, image, "  command: [sleep, '10']\n"));
        let v = node
            .wait_for(name, T, "refusal", |v| reason(v) == "InvalidImage")
            .unwrap();
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains("layer sha256:"), "{name}: {msg}");
        assert!(msg.contains(entry) || *name == "oversized", "{name}: {msg}");
        if *name == "oversized" {
            assert!(msg.contains("limit"), "{msg}");
        }
    }
    assert!(!canary.exists(), "a layer wrote outside the rootfs");
    assert!(!canary_dir.path().join("evil").exists());
    // Retries keep failing the same way; once the workloads are gone, no staging dir or
    // staging mount is left behind (even when a retry was under way at delete time).
    for (name, _, _) in &images {
        assert!(node.cli(&["delete", name]).status.success());
    }
    let tmp = node.state.join("images/tmp");
    wait_until(T, "staging cleaned up", || {
        (fs::read_dir(&tmp).unwrap().count() == 0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", fs::read_dir(&tmp).unwrap().collect::<Vec<_>>()));
    assert!(!node.mounts().iter().any(|m| m.contains("/images/tmp")));
    let prepared: Vec<_> = fs::read_dir(node.state.join("images"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().len() == 64)
        .collect();
    assert!(prepared.is_empty(), "{prepared:?}");
}

#[test]
fn whiteouts_delete_lower_files() {
    let reg = Registry::start(false).unwrap();
    let lower = Layer::new()
        .dir("data/", 0o755)
        .file("data/keep", b"k", 0o644)
        .file("data/gone", b"g", 0o644)
        .dir("data/olddir/", 0o755)
        .file("data/olddir/x", b"x", 0o644)
        .dir("opq/", 0o755)
        .file("opq/lower-only", b"l", 0o644)
        .finish();
    let upper = Layer::new()
        .file("data/.wh.gone", b"", 0o644)
        .file("data/.wh.olddir", b"", 0o644)
        .dir("opq/", 0o755)
        .file("opq/.wh..wh..opq", b"", 0o644)
        .file("opq/new", b"n", 0o644)
        .finish();
    let (image, _) = push_image(
        &reg,
        "wh",
        "1",
        vec![
            (busybox_layer().finish(), Compress::Gzip),
            (lower, Compress::Gzip),
            (upper, Compress::Zstd),
        ],
        &[],
        &["sh"],
    )
    .unwrap();
    let node = start_node(&reg, &[]);
    node.apply(&workload(
        "wh",
        &image,
        "  command: [sh, -c, 'ls -a /data /opq']\n  restartPolicy: Never\n",
    ));
    node.wait_for("wh", T, "ls to finish", |v| phase(v) == "Succeeded")
        .unwrap();
    let out = String::from_utf8_lossy(&node.cli(&["logs", "wh"]).stdout).to_string();
    assert!(out.contains("keep"), "{out}");
    assert!(!out.contains("gone"), "{out}");
    assert!(!out.contains("olddir"), "{out}");
    assert!(!out.contains("lower-only"), "{out}");
    assert!(out.contains("new"), "{out}");
    assert!(!out.contains(".wh."), "{out}");
}

#[test]
fn memory_limit_is_enforced_as_oomkilled() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let node = start_node(&reg, &[]);
    node.apply(&workload(
        "hog",
        &image,
        "  command: [dd, if=/dev/zero, of=/dev/null, bs=128M, count=1]\n  resources: {memory: 32Mi}\n  restartPolicy: Never\n",
    ));
    let v = node
        .wait_for("hog", T, "oom kill", |v| phase(v) == "Failed")
        .unwrap();
    assert_eq!(reason(&v), "OOMKilled", "{v}");
    assert_eq!(v["lastExitCode"], 137);
}

#[test]
fn restart_backoff_grows() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    // A base well above container start time, so the doubling dominates the gaps.
    let node = start_node_with_backoff(&reg, "400ms", &[]);
    // Each start prints the node's uptime; /proc/uptime is not namespaced.
    node.apply(&workload(
        "crash",
        &image,
        "  command: [sh, -c, 'cat /proc/uptime; exit 1']\n  restartPolicy: Always\n",
    ));
    node.wait_for("crash", T, "four restarts", |v| {
        v["restarts"].as_u64().unwrap_or(0) >= 4
    })
    .unwrap();
    let v = node.get("crash").unwrap();
    assert_eq!(reason(&v), "CrashLoopBackOff");
    assert_eq!(v["lastExitCode"], 1);
    let logs = String::from_utf8_lossy(&node.cli(&["logs", "crash"]).stdout).to_string();
    let starts: Vec<f64> = logs
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(starts.len() >= 4, "{logs}");
    let gaps: Vec<f64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    // 400ms, 800ms, 1.6s...: every gap clearly longer than the one before.
    for g in gaps.windows(2) {
        assert!(g[1] > g[0] * 1.4, "gaps do not grow: {gaps:?}");
    }
}

#[test]
fn readiness_probe_flips() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let node = start_node(&reg, &[]);
    node.apply(&workload(
        "probe",
        &image,
        "  command: [sh, -c, 'sleep 1; touch /tmp/ready; sleep 3; rm /tmp/ready; sleep 1000']\n  readinessProbe:\n    exec: {command: [test, -f, /tmp/ready]}\n    periodSeconds: 0.2\n    failureThreshold: 1\n",
    ));
    node.wait_for("probe", T, "running, not ready", |v| {
        phase(v) == "Running" && v["ready"] == false
    })
    .unwrap();
    node.wait_for("probe", T, "ready", |v| v["ready"] == true)
        .unwrap();
    node.wait_for("probe", T, "not ready again", |v| v["ready"] == false)
        .unwrap();

    // HTTP probe from inside the container's own network namespace.
    node.apply(&workload(
        "web",
        &image,
        "  command: [sh, -c, 'mkdir -p /www; echo ok > /www/index.html; sleep 1; httpd -f -p 8080 -h /www']\n  network: none\n  readinessProbe:\n    httpGet: {path: /index.html, port: 8080}\n    periodSeconds: 0.2\n",
    ));
    node.wait_for("web", T, "http ready", |v| v["ready"] == true)
        .unwrap();
}

#[test]
fn changed_spec_replaces_unchanged_does_nothing() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let node = start_node(&reg, &[]);
    let doc = workload("svc", &image, "  command: [sleep, '1000']\n");
    node.apply(&doc);
    let v1 = node
        .wait_for("svc", T, "running", |v| phase(v) == "Running")
        .unwrap();
    let out = node.apply(&doc);
    // The answer is the event: the workload's actor decided "unchanged" before answering, and
    // took no action.
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged"));
    let v2 = node.get("svc").unwrap();
    assert_eq!(v1["containerId"], v2["containerId"]);
    // Annotations alone (a new Git revision) do not restart either, but are reported.
    let annotated = doc.replace(
        "  name: svc\n",
        "  name: svc\n  annotations: {hyperbox.dev/revision: abc123}\n",
    );
    assert!(String::from_utf8_lossy(&node.apply(&annotated).stdout).contains("unchanged"));
    let v3 = node.get("svc").unwrap();
    assert_eq!(v3["revision"], "abc123");
    assert_eq!(v1["containerId"], v3["containerId"]);
    let changed = workload(
        "svc",
        &image,
        "  command: [sleep, '2000']\n  terminationGracePeriodSeconds: 1\n",
    );
    assert!(String::from_utf8_lossy(&node.apply(&changed).stdout).contains("configured"));
    let v4 = node
        .wait_for("svc", T, "replaced", |v| {
            phase(v) == "Running"
                && v["containerId"] != v1["containerId"]
                && !v["containerId"].is_null()
        })
        .unwrap();
    assert_eq!(v4["restarts"], 0);
    // The old container is gone: one container process tree only.
    let distinct = || -> std::collections::HashSet<String> {
        node.cgroups()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
            .collect()
    };
    wait_until(T, "old container's cgroups removed", || {
        (distinct().len() == 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", distinct()));
    assert!(distinct().contains(v4["containerId"].as_str().unwrap()));
}

#[test]
fn invalid_spec_names_file_line_and_field() {
    let reg = Registry::start(false).unwrap();
    let node = start_node(&reg, &[]);
    let yaml = "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: bad\nspec:\n  image: x/y:1\n  resources:\n    memory: lots\n";
    let f = node.dir.path().join("bad.yaml");
    fs::write(&f, yaml).unwrap();
    let out = node.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:8: spec.resources.memory", f.display())),
        "{err}"
    );
    // The API itself refuses bad specs with 400 and the field path.
    let body = r#"{"workloads":[{"apiVersion":"hyperbox.dev/v1alpha1","kind":"Workload","metadata":{"name":"x"},"spec":{"image":"a/b:1","replicas":"two"}}]}"#;
    let resp = http_over_unix(&node.socket, "POST", "/v1/workloads", body);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("workloads[0].spec.replicas"), "{resp}");
    assert!(node.get("x").is_none());
}

/// A node that also listens on TCP (the API, with a bearer token) and serves `/metrics`.
struct TcpNode {
    node: Node,
    api: String,
    metrics: String,
    token: String,
    token_file: tempfile::NamedTempFile,
}

fn tcp_node(reg: &Registry) -> TcpNode {
    let token_file = tempfile::NamedTempFile::new().unwrap();
    let token = format!("tok-{}-{}", random_suffix(), random_suffix());
    fs::write(token_file.path(), &token).unwrap();
    // Port 0: the kernel picks free ports (no choose-then-bind race); the log says which.
    let node = start_node(
        reg,
        &[
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            token_file.path().to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let api = wait_until(T, "tcp listener address", || {
        logged_addr(&node.daemon_log(), "node api listening on tcp")
    })
    .unwrap();
    let metrics = wait_until(T, "metrics listener address", || {
        logged_addr(&node.daemon_log(), "metrics listening")
    })
    .unwrap();
    TcpNode {
        node,
        api,
        metrics,
        token,
        token_file,
    }
}

#[test]
fn tcp_api_requires_the_token() {
    let reg = Registry::start(false).unwrap();
    let tcp = tcp_node(&reg);
    let (addr, metrics, token) = (tcp.api.clone(), tcp.metrics.clone(), tcp.token.clone());
    let node = &tcp.node;
    wait_until(T, "tcp listener", || {
        std::net::TcpStream::connect(&addr).ok()
    })
    .unwrap();
    assert!(http_tcp(&addr, "/v1/workloads", None).starts_with("HTTP/1.1 401"));
    assert!(
        http_tcp(&addr, "/v1/workloads", Some("wrong-token-wrong-token"))
            .starts_with("HTTP/1.1 401")
    );
    assert!(http_tcp(&addr, "/v1/workloads", Some(&token)).starts_with("HTTP/1.1 200"));
    // The CLI over TCP.
    let out = std::process::Command::new(bin("hyperbox-node"))
        .args([
            "--server",
            &format!("http://{addr}"),
            "--token-file",
            tcp.token_file.path().to_str().unwrap(),
            "node",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(n["capacity"]["memoryBytes"].as_u64().unwrap() > 0);
    assert!(n["pressure"]["memory"]["some"]["avg10"].is_number(), "{n}");
    assert!(n["features"]["erofs"].is_boolean());
    // Prometheus text at /metrics.
    wait_until(T, "metrics listener", || {
        std::net::TcpStream::connect(&metrics).ok()
    })
    .unwrap();
    let m = http_tcp(&metrics, "/metrics", None);
    assert!(
        m.contains(
            "hyperbox_node_pressure_avg10{scope=\"host\",resource=\"memory\",kind=\"some\"}"
        ),
        "{m}"
    );
    assert!(
        m.contains("# TYPE hyperbox_protection_evictions counter"),
        "{m}"
    );
    // The unix socket is private.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&node.socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn kill9_and_restart_converges_without_leaks() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let mut node = start_node(&reg, &[]);
    node.apply(&workload(
        "a",
        &image,
        "  command: [sleep, '1000']\n  replicas: 2\n",
    ));
    node.apply(&workload(
        "b",
        &image,
        "  command: [sh, -c, 'sleep 1000']\n  restartPolicy: Always\n",
    ));
    node.apply(&workload(
        "c",
        &image,
        "  command: [sleep, '1000']\n  restartPolicy: Always\n",
    ));
    for n in ["a", "b", "c"] {
        node.wait_for(n, T, "running", |v| {
            phase(v) == "Running"
                && v["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|r| r["phase"] == "Running")
        })
        .unwrap();
    }
    let before_a = node.get("a").unwrap();
    let before_b = node.get("b").unwrap();
    let before_c = node.get("c").unwrap();
    let mounts_before = {
        let mut m = node.mounts();
        m.sort();
        m
    };
    let cgroups_before = node.cgroups();
    let pids_before = node.container_pids();
    assert_eq!(
        cgroups_before
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect::<std::collections::HashSet<_>>()
            .len(),
        4
    );

    node.kill9();
    // While the daemon is down, one container dies.
    let dead_pid = before_c["replicas"][0]["pid"].as_i64().unwrap() as i32;
    // SAFETY: plain kill of a test container.
    unsafe { libc::kill(dead_pid, libc::SIGKILL) };
    wait_until(T, "the killed container to be reaped", || {
        fs::metadata(format!("/proc/{dead_pid}"))
            .is_err()
            .then_some(())
    })
    .unwrap();
    node.spawn().unwrap();

    // Survivors are re-adopted: same container ids and pids.
    let after_a = node
        .wait_for("a", T, "a adopted", |v| phase(v) == "Running")
        .unwrap();
    let after_b = node
        .wait_for("b", T, "b adopted", |v| phase(v) == "Running")
        .unwrap();
    // Same replicas, same containers, same processes (the PSI samples move on).
    let identity = |v: &Value| -> Vec<(Value, Value, Value, Value)> {
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["index"].clone(),
                    r["containerId"].clone(),
                    r["pid"].clone(),
                    r["startedAt"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(identity(&before_a), identity(&after_a));
    assert_eq!(before_b["containerId"], after_b["containerId"]);
    // The dead one is restarted as a new container per its policy.
    let after_c = node
        .wait_for("c", T, "c restarted", |v| {
            phase(v) == "Running"
                && v["containerId"] != before_c["containerId"]
                && !v["containerId"].is_null()
        })
        .unwrap();
    assert_eq!(after_c["replicas"][0]["phase"], "Running");
    // It died while nobody watched: that counts as a restart (exit code unknown).
    assert_eq!(after_c["restarts"], 1);
    // No duplicates, no leaks: same number of mounts, cgroups and container processes.
    let mut mounts_after = node.mounts();
    mounts_after.sort();
    assert_eq!(
        mounts_before.len(),
        mounts_after.len(),
        "{mounts_before:?} vs {mounts_after:?}"
    );
    assert_eq!(cgroups_before.len(), node.cgroups().len());
    assert_eq!(pids_before.len(), node.container_pids().len());

    // Kill it again mid-way and delete everything: nothing may remain.
    node.kill9();
    node.spawn().unwrap();
    for n in ["a", "b", "c"] {
        let out = node.cli(&["delete", n]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(node.container_pids().is_empty());
    assert!(node.cgroups().is_empty(), "{:?}", node.cgroups());
    let left: Vec<String> = node
        .mounts()
        .into_iter()
        .filter(|m| m.contains("/containers/"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn process_settings_mounts_and_isolation() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let host_dir = tempfile::tempdir().unwrap();
    fs::write(host_dir.path().join("from-host"), "host-data\n").unwrap();
    let node = start_node(
        &reg,
        &["--allow-host-path", host_dir.path().to_str().unwrap()],
    );
    let spec = format!(
        "  command: [sh, -c]\n  args: ['id -u; id -g; pwd; echo $GREETING; cat /host/from-host; echo x > /scratch/f && cat /scratch/f; echo y > /host/nope || echo ro-ok; grep -E \"^(NoNewPrivs|Seccomp):\" /proc/self/status; sleep 1000']\n  user: '1000:1000'\n  workingDir: /tmp\n  env: [{{name: GREETING, value: hi-there}}]\n  network: none\n  volumes:\n  - {{name: host, hostPath: {{path: {}}}}}\n  - {{name: scratch, emptyDir: {{}}}}\n  mounts:\n  - {{name: host, mountPath: /host, readOnly: true}}\n  - {{name: scratch, mountPath: /scratch}}\n",
        host_dir.path().display()
    );
    // The emptyDir must be writable by uid 1000: make the test image's user own nothing special,
    // so write as that user into a fresh emptyDir created by the runtime (mode 0777 not assumed):
    let spec = spec.replace("user: '1000:1000'", "user: '0:1000'");
    node.apply(&workload("proc", &image, &spec));
    node.wait_for("proc", T, "running", |v| phase(v) == "Running")
        .unwrap();
    let logs = wait_until(T, "output", || {
        let l = String::from_utf8_lossy(&node.cli(&["logs", "proc"]).stdout).to_string();
        l.contains("Seccomp").then_some(l)
    })
    .unwrap();
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines[0], "0", "{logs}");
    assert_eq!(lines[1], "1000", "{logs}");
    assert_eq!(lines[2], "/tmp", "{logs}");
    assert_eq!(lines[3], "hi-there", "{logs}");
    assert_eq!(lines[4], "host-data", "{logs}");
    assert_eq!(lines[5], "x", "{logs}");
    assert!(logs.contains("ro-ok"), "{logs}");
    assert!(logs.contains("NoNewPrivs:\t1"), "{logs}");
    assert!(logs.contains("Seccomp:\t2"), "{logs}");
    assert!(!host_dir.path().join("nope").exists());
    // The image layer is read-only EROFS below a writable overlay.
    let wide = String::from_utf8_lossy(&node.cli(&["get", "-o", "wide"]).stdout).to_string();
    assert!(wide.contains("erofs"), "{wide}");
    // Process isolation: the container sees itself as pid 1 and no host network interfaces.
    let v = node.get("proc").unwrap();
    let pid = v["replicas"][0]["pid"].as_i64().unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.trim_end().ends_with("\t1"), "{nspid}");
    let host_net = fs::read_link("/proc/self/ns/net").unwrap();
    let ctr_net = fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(host_net, ctr_net);
}

#[test]
fn erofs_fallback_and_image_gc() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    // Fallback: without EROFS the image is a plain directory, and get -o wide says so.
    let mut args = insecure(&reg);
    args.extend(["--image-keep-for".into(), "0s".into()]);
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let node = Node::start_with_env(&refs, &[("HYPERBOX_DISABLE_EROFS", "1")]).unwrap();
    node.apply(&workload("plain", &image, "  command: [sleep, '1000']\n"));
    let v = node
        .wait_for("plain", T, "running", |v| phase(v) == "Running")
        .unwrap();
    assert_eq!(v["rootfs"], "directory");
    let n: Value = serde_json::from_slice(&node.cli(&["node", "-o", "json"]).stdout).unwrap();
    assert_eq!(n["features"]["erofs"], false);
    assert!(node.daemon_log().contains("erofs unavailable"));
    drop(node);

    // With EROFS: the image (its one layer, in the layer store) is mounted once, and
    // collected (unmounted, removed) when unused.
    let node = Node::start(&refs).unwrap();
    node.apply(&workload("e1", &image, "  command: [sleep, '1000']\n"));
    node.apply(&workload("e2", &image, "  command: [sleep, '1000']\n"));
    for n in ["e1", "e2"] {
        let v = node
            .wait_for(n, T, "running", |v| phase(v) == "Running")
            .unwrap();
        assert_eq!(v["rootfs"], "erofs");
    }
    let erofs_mounts = |node: &Node| {
        node.mounts()
            .into_iter()
            .filter(|m| m.contains("/images/mnt/") || m.contains("/images/lmnt/"))
            .count()
    };
    assert_eq!(erofs_mounts(&node), 1);
    let gc_runs = |node: &Node| {
        node.daemon_log()
            .matches("image garbage collection ran")
            .count()
    };
    let before = gc_runs(&node);
    assert!(node.cli(&["delete", "e1"]).status.success());
    // The delete asks for a collection; once it has run, the image must still be there.
    wait_until(T, "a collection after the delete", || {
        (gc_runs(&node) > before).then_some(())
    })
    .unwrap();
    assert_eq!(erofs_mounts(&node), 1, "still used by e2");
    assert!(node.cli(&["delete", "e2"]).status.success());
    let prepared = |node: &Node| {
        fs::read_dir(node.state.join("images"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().len() == 64)
            .count()
    };
    let blobs = |node: &Node| {
        fs::read_dir(node.state.join("images/blobs/sha256"))
            .unwrap()
            .count()
    };
    let layers = |node: &Node| {
        fs::read_dir(node.state.join("images/layers"))
            .unwrap()
            .count()
    };
    wait_until(T, "image, its layers and blobs collected", || {
        (erofs_mounts(&node) == 0
            && prepared(&node) == 0
            && blobs(&node) == 0
            && layers(&node) == 0)
            .then_some(())
    })
    .unwrap();
}

#[test]
fn multi_arch_index_picks_this_platform() {
    let reg = Registry::start(false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = |arch: &str| Layer::new().file("arch", arch.as_bytes(), 0o644).finish();
    write_multiarch_layout(
        dir.path(),
        "multi",
        vec![
            (
                "arm64",
                vec![
                    (busybox_layer().finish(), Compress::Gzip),
                    (marker("arm64"), Compress::Gzip),
                ],
            ),
            (
                "amd64",
                vec![
                    (busybox_layer().finish(), Compress::Gzip),
                    (marker("amd64"), Compress::Gzip),
                ],
            ),
        ],
        &["sh"],
    )
    .unwrap();
    reg.push_with(dir.path(), "multi", "multi", &["--all"])
        .unwrap();
    let node = start_node(&reg, &[]);
    node.apply(&workload(
        "arch",
        &format!("{}/multi:multi", reg.addr),
        "  command: [cat, /arch]\n  restartPolicy: Never\n",
    ));
    node.wait_for("arch", T, "done", |v| phase(v) == "Succeeded")
        .unwrap();
    let out = String::from_utf8_lossy(&node.cli(&["logs", "arch"]).stdout).to_string();
    assert_eq!(
        out.trim(),
        std::env::consts::ARCH
            .replace("x86_64", "amd64")
            .replace("aarch64", "arm64")
    );
}

#[test]
fn pull_shows_progress_and_logs_rotate() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    // Big enough (64 MB unpacked) that the pull takes a while to report progress on.
    let (big, _) = push_image(
        &reg,
        "big",
        "1",
        vec![
            (busybox_layer().finish(), Compress::Gzip),
            (
                Layer::new().big_file("zeros", 64 << 20).finish(),
                Compress::Gzip,
            ),
        ],
        &[],
        &["sh"],
    )
    .unwrap();
    let node = start_node(&reg, &["--log-max-bytes", "20000"]);
    // `pull` prepares the image and reports progress on stderr (not a terminal here: lines).
    let out = node.cli(&["pull", &big]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("sha256:") && stdout.contains("erofs"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pulling") && stderr.contains("layers"),
        "no progress shown: {stderr}"
    );
    // rmi removes an unused image (unmounted, files gone); a later pull fetches it again.
    assert!(node.cli(&["rmi", &big]).status.success());
    assert!(!node
        .mounts()
        .iter()
        .any(|m| m.contains("/images/mnt/") || m.contains("/images/lmnt/")));
    assert!(node.cli(&["pull", &big]).status.success());
    // A chatty container: its log stays capped (current + one rotated file).
    node.apply(&workload(
        "chatty",
        &image,
        "  command: [sh, -c, 'while true; do echo 0123456789abcdefghijklmnopqrstuvwxyz; done']\n",
    ));
    node.wait_for("chatty", T, "running", |v| phase(v) == "Running")
        .unwrap();
    let rmi = node.cli(&["rmi", &image]);
    assert!(!rmi.status.success());
    assert!(String::from_utf8_lossy(&rmi.stderr).contains("used by a workload"));
    let dir = node.state.join("logs/chatty");
    wait_until(T, "a rotation", || {
        fs::metadata(dir.join("0.log.1"))
            .is_ok_and(|m| m.len() > 0)
            .then_some(())
    })
    .unwrap();
    let cur = fs::metadata(dir.join("0.log")).unwrap().len();
    let old = fs::metadata(dir.join("0.log.1"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(old > 0, "log was never rotated");
    // Rotation runs every 2s: allow what a busy writer adds in between, but not unbounded growth.
    assert!(cur < 200 << 20, "current log is {cur} bytes");
    let tail = node.cli(&["logs", "chatty", "--tail", "100"]);
    assert!(tail.stdout.len() <= 100 && String::from_utf8_lossy(&tail.stdout).contains("xyz"));
}

#[test]
fn https_registry_with_a_private_ca() {
    let reg = Registry::start_tls().unwrap();
    let image = push_busybox(&reg).unwrap();
    let ca = reg.ca.clone().unwrap();
    // Not listed as insecure: HTTPS with certificate checks.
    let untrusting = Node::start(&["--backoff-base", "200ms"]).unwrap();
    untrusting.apply(&workload("tls", &image, "  command: [sleep, '100']\n"));
    let v = untrusting
        .wait_for("tls", T, "certificate refusal", |v| {
            matches!(reason(v), "ErrImagePull" | "ImagePullBackOff")
        })
        .unwrap();
    assert!(v["message"].as_str().unwrap().contains(&reg.addr), "{v}");
    drop(untrusting);
    let node = Node::start(&["--registry-ca", ca.to_str().unwrap()]).unwrap();
    node.apply(&workload("tls", &image, "  command: [sleep, '100']\n"));
    node.wait_for("tls", T, "pulled over https", |v| phase(v) == "Running")
        .unwrap();
}

#[test]
fn kill9_mid_pull_leaves_no_staging_mounts() {
    let reg = Registry::start(false).unwrap();
    // Slow enough to interrupt: a few hundred MB of zeros to unpack and turn into EROFS.
    let (big, _) = push_image(
        &reg,
        "slow",
        "1",
        vec![
            (busybox_layer().finish(), Compress::Gzip),
            (
                Layer::new().big_file("a", 200 << 20).finish(),
                Compress::Gzip,
            ),
            (
                Layer::new().big_file("b", 200 << 20).finish(),
                Compress::Gzip,
            ),
        ],
        &[],
        &["sh"],
    )
    .unwrap();
    let mut node = start_node(&reg, &[]);
    let client = {
        let socket = node.socket.clone();
        let big = big.clone();
        std::thread::spawn(move || {
            std::process::Command::new(bin("hyperbox-node"))
                .arg("--socket")
                .arg(socket)
                .args(["pull", &big])
                .output()
        })
    };
    let staging = node.state.join("images/tmp");
    // Kill while the in-memory staging area is mounted: the case a restart must clean up.
    wait_until(T, "tmpfs staging mounted", || {
        node.mounts()
            .iter()
            .any(|m| m.contains("/images/tmp"))
            .then_some(())
    })
    .unwrap();
    node.kill9();
    let _ = client.join();
    node.spawn().unwrap();
    let stale: Vec<String> = node
        .mounts()
        .into_iter()
        .filter(|m| m.contains("/images/tmp"))
        .collect();
    assert!(
        stale.is_empty(),
        "staging mounts left after restart: {stale:?}"
    );
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
    // And the image can be prepared after all.
    let out = node.cli(&["pull", &big]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn scaling_keeps_the_survivors_running() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let node = start_node(&reg, &[]);
    let doc = |n: u32| {
        workload(
            "scaled",
            &image,
            &format!(
                "  command: [sleep, '1000']\n  replicas: {n}\n  terminationGracePeriodSeconds: 1\n"
            ),
        )
    };
    let ids = |v: &Value| -> Vec<(u64, String)> {
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["index"].as_u64().unwrap(),
                    r["containerId"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let all_running = |n: usize| {
        move |v: &Value| {
            let reps = v["replicas"].as_array().unwrap();
            reps.len() == n && reps.iter().all(|r| r["phase"] == "Running")
        }
    };
    node.apply(&doc(2));
    let two = ids(&node
        .wait_for("scaled", T, "2 running", all_running(2))
        .unwrap());
    let out = node.apply(&doc(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configured"));
    let three = ids(&node
        .wait_for("scaled", T, "3 running", all_running(3))
        .unwrap());
    assert_eq!(&three[..2], &two[..], "survivors keep their containers");
    assert_eq!(three[2].0, 2, "the new replica is ordinal 2");
    node.apply(&doc(1));
    let one = ids(&node
        .wait_for("scaled", T, "1 running", all_running(1))
        .unwrap());
    assert_eq!(one, two[..1].to_vec(), "ordinal 0 survives, untouched");
    // The removed replicas' containers are gone.
    wait_until(T, "one container left", || {
        (node
            .cgroups()
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect::<std::collections::HashSet<_>>()
            .len()
            == 1)
            .then_some(())
    })
    .unwrap();
    assert_eq!(node.get("scaled").unwrap()["restarts"], 0);
}

#[test]
fn restart_one_replica_and_watch_the_node() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let node = start_node(&reg, &[]);
    node.apply(&workload(
        "two",
        &image,
        "  command: [sleep, '1000']\n  replicas: 2\n  terminationGracePeriodSeconds: 1\n",
    ));
    let v = node
        .wait_for("two", T, "running", |v| {
            v["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["phase"] == "Running")
                && v["replicas"].as_array().unwrap().len() == 2
        })
        .unwrap();
    // A watch of the whole node answers with the change counter.
    let list: Value = serde_json::from_str(
        http_over_unix(&node.socket, "GET", "/v1/workloads?watch=true", "")
            .split("\r\n\r\n")
            .nth(1)
            .unwrap(),
    )
    .unwrap();
    let rv = list["resourceVersion"].as_u64().unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    // A long-poll from that version returns once something changes: the restart below.
    let socket = node.socket.clone();
    let watcher = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let resp = http_over_unix(
            &socket,
            "GET",
            &format!("/v1/workloads?watch=true&after={rv}&timeoutMs=30000"),
            "",
        );
        (started.elapsed(), resp)
    });
    let out = node.cli(&["restart", "two", "--replica", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (took, resp) = watcher.join().unwrap();
    assert!(
        took < Duration::from_secs(20),
        "the watch did not wake up: {took:?}"
    );
    assert!(resp.contains("\"resourceVersion\""), "{resp}");
    let after = node
        .wait_for("two", T, "replica 1 replaced", |w| {
            let r = w["replicas"].as_array().unwrap();
            r.len() == 2
                && r[1]["phase"] == "Running"
                && r[1]["containerId"] != v["replicas"][1]["containerId"]
                && !r[1]["containerId"].is_null()
        })
        .unwrap();
    assert_eq!(
        after["replicas"][0]["containerId"],
        v["replicas"][0]["containerId"]
    );
    assert_eq!(after["replicas"][1]["restarts"], 1);
    // Evict replica 0 (what pressure protection does): it stops and stays stopped, with the
    // reason; replica 1 keeps running.
    let resp = http_over_unix(
        &node.socket,
        "POST",
        "/v1/workloads/default/two/replicas/0/evict",
        r#"{"reason":"test eviction"}"#,
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let ev = node
        .wait_for("two", T, "replica 0 evicted", |w| {
            w["replicas"][0]["reason"] == "Evicted"
        })
        .unwrap();
    assert_eq!(ev["replicas"][0]["phase"], "Failed");
    assert!(ev["replicas"][0]["message"]
        .as_str()
        .unwrap()
        .contains("test eviction"));
    assert_eq!(
        ev["replicas"][1]["containerId"],
        after["replicas"][1]["containerId"]
    );
    let missing = node.cli(&["restart", "two", "--replica", "5"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no replica 5"));
}

/// A second `serve` on a state dir in use (the package's unit beside a DaemonSet, a manual
/// debug run) exits at once with an error naming the first daemon's pid, and touches nothing:
/// the first daemon's socket, its image staging dir and its running containers are as they were.
#[test]
fn a_second_daemon_on_the_same_state_dir_exits_and_touches_nothing() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let mut node = start_node(&reg, &[]);
    node.apply(&workload(
        "a",
        &image,
        "  command: [sleep, '1000']\n  terminationGracePeriodSeconds: 0\n",
    ));
    node.wait_for("a", T, "running", |v| v["phase"] == "Running")
        .unwrap();
    let pids = node.container_pids();
    assert_eq!(pids.len(), 1);
    // Something the second daemon's sweeps would remove if it got that far.
    let staging = node.state.join("images/tmp/keep-me");
    fs::create_dir_all(&staging).unwrap();
    let other_socket = node.dir.path().join("second.sock");
    let log = node.dir.path().join("second.log");
    let mut second = std::process::Command::new(bin("hyperbox-node"))
        .arg("--socket")
        .arg(&other_socket)
        .arg("serve")
        .arg("--state-dir")
        .arg(&node.state)
        .arg("--run-dir")
        .arg(node.dir.path().join("run2"))
        .arg("--cgroup-parent")
        .arg(&node.cgroup_parent)
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(10), "the second daemon to exit", || {
        second.try_wait().unwrap()
    });
    let _ = second.kill();
    let _ = second.wait();
    let err = fs::read_to_string(&log).unwrap();
    let status = exited.unwrap_or_else(|e| panic!("{e:#}\n{err}"));
    assert!(!status.success());
    assert!(
        err.contains(&format!(
            "is in use by another hyperbox-node (pid {})",
            node.pid()
        )),
        "{err}"
    );
    assert!(!other_socket.exists());
    assert!(staging.exists());
    assert!(node.socket.exists());
    assert_eq!(node.container_pids(), pids);
    assert_eq!(node.get("a").unwrap()["phase"], "Running");
    // The lock goes with its holder, however it dies: a restart on the dir works.
    node.kill9();
    node.spawn().unwrap();
    node.wait_for("a", T, "re-adopted", |v| v["phase"] == "Running")
        .unwrap();
}

/// A flood of idle connections from anyone who can reach the TCP ports, with the daemon held
/// to 1,024 open files (systemd's default soft limit): 1,100 connections that send nothing
/// leave the unix API doing real work (an apply, a record write, a container start), the
/// daemon's descriptors stay well below the limit (each listener caps its connections), and
/// the server closes every one of them within 60 s (the header read timeout; those beyond a
/// cap at once).
#[test]
fn a_flood_of_idle_connections_is_dropped_and_the_unix_api_keeps_answering() {
    use std::io::Read;
    // This test holds 1,100 sockets itself: its soft limit up to its hard one.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and fill the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        assert!(
            lim.rlim_max >= 1200,
            "hard limit {} is too low",
            lim.rlim_max
        );
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let tcp = tcp_node(&reg);
    let (api, metrics) = (tcp.api.clone(), tcp.metrics.clone());
    let node = &tcp.node;
    let pid = node.pid().to_string();
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=1024:1024"])
        .status()
        .unwrap();
    assert!(limited.success());
    let fds = || fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let opened = std::time::Instant::now();
    let mut conns = Vec::new();
    for i in 0..1100 {
        let addr: std::net::SocketAddr = if i % 11 == 0 { &metrics } else { &api }.parse().unwrap();
        // A connection the server closed at once may still connect: the kernel accepts it.
        if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            conns.push(c);
        }
    }
    assert!(conns.len() > 1000, "only {} connected", conns.len());
    let most_fds = fds();
    // The unix API works, and so do the records and container starts behind it.
    node.apply(&workload(
        "during",
        &image,
        "  command: [sleep, '1000']\n  terminationGracePeriodSeconds: 0\n",
    ));
    node.wait_for("during", T, "running during the flood", |v| {
        v["phase"] == "Running"
    })
    .unwrap();
    assert!(node.cli(&["node", "-o", "json"]).status.success());
    assert!(most_fds < 600, "{most_fds} descriptors open in the daemon");
    // Every connection is closed by the server (end of stream or reset) within 60 s.
    let deadline = opened + Duration::from_secs(60);
    let mut buf = [0u8; 64];
    for (i, c) in conns.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        c.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match c.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!(
                "connection {i} still open {:?} after the flood began: {other:?}",
                opened.elapsed()
            ),
        }
    }
    assert!(fds() < 200, "{} descriptors open after the flood", fds());
}
