//! Regression tests for correctness under races, reboots and hostile input: each one failed
//! before its fix. Real daemon, real registry, real containers; they need root (CI is root).

use std::fs;
use std::process::{Child, Command};
use std::time::Duration;

use hyperbox_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn phase(v: &Value) -> &str {
    v["phase"].as_str().unwrap_or("")
}

fn start_node(reg: &Registry) -> Node {
    Node::start(&[
        "--insecure-registry",
        &reg.addr,
        "--backoff-base",
        "200ms",
        "--backoff-max",
        "2s",
    ])
    .expect("start node")
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn start_ticks(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Start `sleep 600` as exactly `pid`, by setting the kernel's last-assigned pid just below it.
fn decoy_at(pid: i32) -> Option<Child> {
    for _ in 0..200 {
        fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
        let mut c = Command::new("sleep").arg("600").spawn().ok()?;
        if c.id() as i32 == pid {
            return Some(c);
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    None
}

#[test]
fn a_reused_pid_is_never_adopted_or_signalled() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let mut node = start_node(&reg);
    node.apply(&workload(
        "svc",
        &image,
        "  command: [sleep, '1000']\n  terminationGracePeriodSeconds: 1\n",
    ));
    let before = node
        .wait_for("svc", T, "running", |v| phase(v) == "Running")
        .unwrap();
    let pid = before["replicas"][0]["pid"].as_i64().unwrap() as i32;

    // The daemon dies, then the container's init dies, then an unrelated process gets its pid.
    node.kill9();
    // SAFETY: plain kill of our test container's init.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until(T, "the old init to be reaped", || {
        fs::metadata(format!("/proc/{pid}")).is_err().then_some(())
    })
    .unwrap();
    let mut decoy = decoy_at(pid).expect("a decoy process at the container's old pid");
    let decoy_ticks = start_ticks(pid).unwrap();

    node.spawn().unwrap();
    let after = node
        .wait_for("svc", T, "running again as a new container", |v| {
            phase(v) == "Running"
                && !v["containerId"].is_null()
                && v["containerId"] != before["containerId"]
        })
        .unwrap();
    assert_ne!(after["replicas"][0]["pid"].as_i64(), Some(pid as i64));
    assert!(
        node.daemon_log().contains("not adopting container"),
        "{}",
        tail(&node.daemon_log(), 3000)
    );
    // Stopping the workload signals its real container only.
    let out = node.cli(&["delete", "svc"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(alive(pid), "the decoy was killed");
    assert_eq!(
        start_ticks(pid),
        Some(decoy_ticks),
        "pid {pid} is not the decoy any more"
    );
    assert_eq!(
        decoy.try_wait().unwrap(),
        None,
        "the decoy must still be running"
    );
    let _ = decoy.kill();
    let _ = decoy.wait();
}

#[test]
fn two_spellings_of_one_image_prepare_it_once_and_survive_kill9() {
    let reg = Registry::start(false).unwrap();
    let (tagged, digest) = push_image(
        &reg,
        "twice",
        "1",
        vec![
            (busybox_layer().finish(), Compress::Gzip),
            (
                Layer::new().big_file("a", 120 << 20).finish(),
                Compress::Gzip,
            ),
            (
                Layer::new().big_file("b", 120 << 20).finish(),
                Compress::Gzip,
            ),
        ],
        &[],
        &["sh"],
    )
    .unwrap();
    let by_digest = format!("{}/twice@{digest}", reg.addr);
    let mut node = start_node(&reg);
    let pull = |node: &Node, r: &str| {
        let socket = node.socket.clone();
        let r = r.to_string();
        std::thread::spawn(move || {
            Command::new(bin("hyperbox-node"))
                .arg("--socket")
                .arg(socket)
                .args(["pull", &r])
                .output()
                .unwrap()
        })
    };
    // Both spellings at once, and a kill -9 while they run.
    let a = pull(&node, &tagged);
    let b = pull(&node, &by_digest);
    // Staging of the image (flattened store) or of its layers (layer store) exists.
    wait_until(T, "staging in progress", || {
        fs::read_dir(node.state.join("images/tmp"))
            .ok()?
            .flatten()
            .any(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.starts_with(&digest[7..]) || n.starts_with("layer-")
            })
            .then_some(())
    })
    .unwrap();
    node.kill9();
    let _ = (a.join(), b.join());
    node.spawn().unwrap();
    let image_dir = node.state.join("images").join(&digest[7..]);
    assert!(
        !image_dir.exists() || image_dir.join("meta.json").exists(),
        "a half-prepared image was published"
    );
    // Again, to the end this time.
    let a = pull(&node, &tagged);
    let b = pull(&node, &by_digest);
    for out in [a.join().unwrap(), b.join().unwrap()] {
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&node.daemon_log(), 3000)
        );
    }
    assert!(image_dir.join("meta.json").exists());
    assert_eq!(
        fs::read_dir(node.state.join("images/tmp")).unwrap().count(),
        0,
        "staging left behind"
    );
    // Both spellings run containers from the complete image.
    node.apply(&workload(
        "by-tag",
        &tagged,
        "  command: [sh, -c, 'test -s /a && test -s /b && sleep 1000']\n  restartPolicy: Never\n",
    ));
    node.apply(&workload(
        "by-digest",
        &by_digest,
        "  command: [sh, -c, 'test -s /a && test -s /b && sleep 1000']\n  restartPolicy: Never\n",
    ));
    for n in ["by-tag", "by-digest"] {
        let v = node
            .wait_for(n, T, "running", |v| {
                phase(v) == "Running" || phase(v) == "Failed"
            })
            .unwrap();
        assert_eq!(phase(&v), "Running", "{v}");
        assert_eq!(v["imageDigest"], digest);
    }
}

#[test]
fn a_hostile_passwd_is_read_inside_the_image_only() {
    let reg = Registry::start(false).unwrap();
    // A host file the image points at by an absolute symlink.
    let host = tempfile::tempdir().unwrap();
    let host_passwd = host.path().join("passwd");
    fs::write(&host_passwd, "hostuser:x:4242:4242::/:/bin/sh\n").unwrap();
    let (abs_link, _) = push_image(
        &reg,
        "abs-link",
        "1",
        vec![
            (busybox_layer().finish(), Compress::Gzip),
            (
                Layer::new()
                    .symlink("etc/passwd", host_passwd.to_str().unwrap())
                    .finish(),
                Compress::Gzip,
            ),
        ],
        &[],
        &["sh"],
    )
    .unwrap();
    // A passwd that is not a file at all.
    let (to_dir, _) = push_image(
        &reg,
        "to-dir",
        "1",
        vec![
            (busybox_layer().finish(), Compress::Gzip),
            (
                Layer::new().symlink("etc/passwd", "/dev").finish(),
                Compress::Gzip,
            ),
        ],
        &[],
        &["sh"],
    )
    .unwrap();
    // A passwd that would never end.
    let (to_zero, _) = push_image(
        &reg,
        "to-zero",
        "1",
        vec![
            (busybox_layer().finish(), Compress::Gzip),
            (
                Layer::new()
                    .symlink("etc/passwd", "/proc/self/../../dev/zero")
                    .finish(),
                Compress::Gzip,
            ),
        ],
        &[],
        &["sh"],
    )
    .unwrap();
    let node = start_node(&reg);
    node.apply(&workload(
        "abs",
        &abs_link,
        "  command: [sleep, '1000']\n  user: hostuser\n",
    ));
    node.apply(&workload(
        "dir",
        &to_dir,
        "  command: [sleep, '1000']\n  user: app\n",
    ));
    node.apply(&workload(
        "zero",
        &to_zero,
        "  command: [sleep, '1000']\n  user: app\n",
    ));
    let v = node
        .wait_for("abs", T, "refused", |v| {
            v["reason"] == "CreateContainerError"
        })
        .unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("no user \"hostuser\""),
        "{v}"
    );
    let v = node
        .wait_for("dir", T, "refused", |v| {
            v["reason"] == "CreateContainerError"
        })
        .unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("not a regular file"),
        "{v}"
    );
    node.wait_for("zero", T, "refused", |v| {
        v["reason"] == "CreateContainerError"
    })
    .unwrap();
    // The daemon stays small and responsive.
    let rss_kb: u64 = fs::read_to_string(format!("/proc/{}/status", node.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(rss_kb < 512 * 1024, "daemon rss {rss_kb} KiB");
    assert!(node.get("abs").is_some());
}

#[test]
fn an_unreadable_record_never_kills_its_containers() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let mut node = start_node(&reg);
    node.apply(&workload("keep", &image, "  command: [sleep, '1000']\n"));
    node.apply(&workload("other", &image, "  command: [sleep, '1000']\n"));
    let v = node
        .wait_for("keep", T, "running", |v| phase(v) == "Running")
        .unwrap();
    node.wait_for("other", T, "running", |v| phase(v) == "Running")
        .unwrap();
    let pid = v["replicas"][0]["pid"].as_i64().unwrap() as i32;
    node.kill9();
    fs::write(
        node.state.join("workloads/keep.json"),
        b"{\"workload\": tru",
    )
    .unwrap();
    node.spawn().unwrap();
    let v = node
        .wait_for("keep", T, "reported", |v| v["reason"] == "RecordUnreadable")
        .unwrap();
    assert_eq!(phase(&v), "Unknown");
    assert!(v["message"].as_str().unwrap().contains("quarantine"), "{v}");
    // Recovery (with its sweep of unreferenced containers) finishes before the API answers,
    // so the answer above means the sweep has already run.
    assert!(
        alive(pid),
        "the container of the unreadable record was killed"
    );
    assert!(node.daemon_log().contains("quarantined"));
    node.wait_for("other", T, "other still running", |v| phase(v) == "Running")
        .unwrap();
    // Deleting it resolves the report and removes its container.
    let out = node.cli(&["delete", "keep"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(T, "its container gone", || (!alive(pid)).then_some(())).unwrap();
    assert!(node.get("keep").is_none());
}

#[test]
fn exec_probes_are_killed_at_their_timeout() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let node = start_node(&reg);
    node.apply(&workload(
        "slowprobe",
        &image,
        "  command: [sleep, '1000']\n  readinessProbe:\n    exec: {command: [sleep, '60']}\n    periodSeconds: 0.1\n    timeoutSeconds: 0.3\n",
    ));
    node.wait_for("slowprobe", T, "running", |v| phase(v) == "Running")
        .unwrap();
    // Let 20 probes time out (each is logged), then count what is left in the container.
    wait_until(T, "20 probe runs", || {
        (node.daemon_log().matches("readiness probe").count() >= 20).then_some(())
    })
    .unwrap();
    // Without the kill, every period would leave one more `sleep 60` behind.
    let procs = node.container_pids().len();
    assert!(procs <= 3, "{procs} processes in the container");
    let v = node.get("slowprobe").unwrap();
    assert_eq!(v["ready"], false);
    let threads: usize = fs::read_to_string(format!("/proc/{}/status", node.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(threads < 64, "{threads} daemon threads");
}
