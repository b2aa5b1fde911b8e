//! Workload identity on a real node: namespaces keep equal names apart, and a 253-character
//! name (the Kubernetes maximum) runs, restarts, is evicted, survives a daemon restart and is
//! deleted without leaking, with every kernel- and file-system-facing name shortened.

use std::time::Duration;

use hyperbox_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// A 253-character DNS subdomain.
fn long_name() -> String {
    format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    )
}

fn doc(namespace: Option<&str>, name: &str, image: &str, extra: &str) -> String {
    let ns = namespace
        .map(|n| format!("  namespace: {n}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\n{ns}spec:\n  image: {image}\n  command: [sh, -c, 'echo host=$(hostname); echo env=$HOSTNAME; echo {name} > /data/who; sleep 1000']\n  terminationGracePeriodSeconds: 0\n  volumes: [{{name: data, emptyDir: {{}}}}]\n  mounts: [{{name: data, mountPath: /data}}]\n{extra}"
    )
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn running(v: &Value, n: usize) -> bool {
    v["replicas"].as_array().is_some_and(|r| {
        r.len() == n
            && r.iter()
                .all(|r| r["phase"] == "Running" && !r["containerId"].is_null())
    })
}

#[test]
fn namespaces_and_253_character_names() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let mut node = Node::start(&["--insecure-registry", &reg.addr]).unwrap();
    let long = long_name();
    let long_key = format!("team-b/{long}");
    let yaml = [
        doc(None, "web", &image, ""),
        doc(Some("team-a"), "web", &image, ""),
        doc(Some("team-b"), &long, &image, "  replicas: 2\n"),
    ]
    .join("---\n");
    let out = ok(&node.apply(&yaml));
    assert!(out.contains("workload/web created"), "{out}");
    assert!(out.contains("workload/team-a/web created"), "{out}");
    assert!(
        out.contains(&format!("workload/{long_key} created")),
        "{out}"
    );

    let web = node
        .wait_for("web", T, "web running", |v| running(v, 1))
        .unwrap();
    let team_web = node
        .wait_for("team-a/web", T, "team-a/web running", |v| running(v, 1))
        .unwrap();
    let lw = node
        .wait_for(&long_key, T, "long running", |v| running(v, 2))
        .unwrap();
    assert_eq!(web["namespace"], "default");
    assert_eq!(team_web["namespace"], "team-a");
    assert_eq!(team_web["name"], "web");
    assert_eq!(lw["namespace"], "team-b");
    assert_eq!(lw["name"], long.as_str(), "the API keeps the full name");
    // Equal names in two namespaces are two workloads with their own containers.
    assert_ne!(container_ids(&web), container_ids(&team_web));
    assert!(container_ids(&team_web)[0].starts_with("team-a_web-"));
    // `-n` and NS/NAME address the same workload.
    let by_flag: Value =
        serde_json::from_str(&ok(&node.cli(&["get", "-n", "team-b", &long, "-o", "json"])))
            .unwrap();
    assert_eq!(by_flag["name"], long.as_str());
    // Container ids (cgroup and state dir names) are shortened, unique and stable in form.
    let ids = container_ids(&lw);
    for id in &ids {
        assert!(id.len() <= 64, "{id}");
        assert!(id.starts_with("team-b_aaaa") && id.contains("__"), "{id}");
    }
    assert_ne!(ids[0], ids[1]);
    // The hostname is the name cut to a DNS label.
    let logs = ok(&node.cli(&["logs", &long_key]));
    let host = "a".repeat(63);
    assert!(logs.contains(&format!("host={host}\n")), "{logs}");
    assert!(logs.contains(&format!("env={host}\n")), "{logs}");
    // Every file the node keeps for it has a bounded name.
    for dir in ["workloads", "logs", "volumes"] {
        for e in std::fs::read_dir(node.state.join(dir)).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            assert!(n.len() <= 205, "{dir}/{n}");
        }
    }
    // Volumes are per workload: web and team-a/web each write their own directory.
    for stem in ["web", "team-a_web"] {
        let who = node.state.join(format!("volumes/{stem}/data/who"));
        wait_until(T, "volume written", || who.exists().then_some(())).unwrap();
    }

    // The list has all three, the table shows the keys.
    let list: Value = serde_json::from_str(&ok(&node.cli(&["get", "-o", "json"]))).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    let table = ok(&node.cli(&["get"]));
    assert!(table.contains("team-a/web"), "{table}");
    assert!(table.contains(&long_key), "{table}");

    // The digests name the namespace.
    let digests = http_over_unix(&node.socket, "GET", "/v1/digests", "");
    assert!(digests.contains("\"namespace\":\"team-a\""), "{digests}");
    assert!(digests.contains("\"namespace\":\"default\""), "{digests}");

    // Per-replica control through the namespaced paths: restart replica 0, evict replica 1.
    let out = ok(&node.cli(&["restart", "-n", "team-b", &long, "--replica", "0"]));
    assert!(out.contains("replica 0 restarting"), "{out}");
    let restarted = node
        .wait_for(&long_key, T, "replica 0 replaced", |v| {
            running(v, 2) && container_ids(v)[0] != ids[0]
        })
        .unwrap();
    assert_eq!(
        container_ids(&restarted)[1],
        ids[1],
        "replica 1 kept running"
    );
    let resp = http_over_unix(
        &node.socket,
        "POST",
        &format!("/v1/workloads/team-b/{long}/replicas/1/evict"),
        r#"{"reason":"test"}"#,
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let evicted = node
        .wait_for(&long_key, T, "replica 1 evicted", |v| {
            v["replicas"][1]["reason"] == "Evicted"
        })
        .unwrap();
    // A malformed namespace or name in a path is refused before it is used.
    let bad = http_over_unix(&node.socket, "GET", "/v1/workloads/Team/web", "");
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    assert!(bad.contains("not a valid namespace"), "{bad}");
    let bad = http_over_unix(&node.socket, "GET", "/v1/workloads/default/..", "");
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");

    // A daemon restart re-adopts everything: same container ids, the long name included.
    let before: Vec<Vec<String>> = ["web", "team-a/web", &long_key]
        .iter()
        .map(|k| container_ids(&node.get(k).unwrap()))
        .collect();
    node.kill9();
    node.spawn().unwrap();
    for (k, ids) in ["web", "team-a/web", long_key.as_str()].iter().zip(&before) {
        let v = node
            .wait_for(k, T, "recovered", |v| {
                v["replicas"][0]["phase"] == "Running"
            })
            .unwrap();
        assert_eq!(&container_ids(&v), ids, "{k} was not re-adopted");
    }
    assert_eq!(
        node.get(&long_key).unwrap()["replicas"][1]["reason"],
        evicted["replicas"][1]["reason"]
    );

    // Deleting team-a/web leaves web alone and removes its files.
    ok(&node.cli(&["delete", "team-a/web"]));
    assert!(node.get("team-a/web").is_none());
    let web_after = node.get("web").unwrap();
    assert_eq!(container_ids(&web_after), container_ids(&web));
    assert!(!node.state.join("workloads/team-a_web.json").exists());
    assert!(!node.state.join("logs/team-a_web").exists());
    assert!(!node.state.join("volumes/team-a_web").exists());
    assert!(node.state.join("workloads/web.json").exists());

    // Deleting the long one (by -n) leaves no container, cgroup or files of it.
    ok(&node.cli(&["delete", "-n", "team-b", &long]));
    ok(&node.cli(&["delete", "web"]));
    wait_until(T, "no containers", || {
        node.cgroups().is_empty().then_some(())
    })
    .unwrap();
    for dir in ["workloads", "logs", "volumes"] {
        let left: Vec<_> = std::fs::read_dir(node.state.join(dir))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "quarantine")
            .collect();
        assert!(left.is_empty(), "{dir}: {left:?}");
    }
}

#[test]
fn digests_watch_answers_on_change_and_times_out_quietly() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let node = Node::start(&["--insecure-registry", &reg.addr]).unwrap();
    let body = |resp: &str| -> Value {
        let (_, b) = resp.split_once("\r\n\r\n").unwrap();
        serde_json::from_str(b).unwrap_or_else(|e| panic!("{e}: {resp}"))
    };
    let first = body(&http_over_unix(
        &node.socket,
        "GET",
        "/v1/digests?watch=true",
        "",
    ));
    let v0 = first["resourceVersion"].as_u64().unwrap();
    assert_eq!(first["items"], serde_json::json!([]));
    // Nothing changes: the watch answers after its timeout, with the version and no items.
    let started = std::time::Instant::now();
    let quiet = body(&http_over_unix(
        &node.socket,
        "GET",
        &format!("/v1/digests?watch=true&after={v0}&timeoutMs=400"),
        "",
    ));
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(quiet["resourceVersion"], v0);
    assert!(quiet.get("items").is_none(), "{quiet}");
    // An apply while the watch is open answers it at once, with the new digests.
    let sock = node.socket.clone();
    let waiter = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let r = http_over_unix(
            &sock,
            "GET",
            &format!("/v1/digests?watch=true&after={v0}&timeoutMs=30000"),
            "",
        );
        (r, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    ok(&node.apply(&doc(Some("team-a"), "web", &image, "")));
    let (resp, took) = waiter.join().unwrap();
    assert!(took < Duration::from_secs(10), "{took:?}");
    let changed = body(&resp);
    assert_ne!(changed["resourceVersion"], v0);
    assert_eq!(changed["items"][0]["name"], "web");
    assert_eq!(changed["items"][0]["namespace"], "team-a");
    // A delete is a change too.
    let v1 = changed["resourceVersion"].as_u64().unwrap();
    ok(&node.cli(&["delete", "team-a/web"]));
    let after_delete = body(&http_over_unix(
        &node.socket,
        "GET",
        &format!("/v1/digests?watch=true&after={v1}&timeoutMs=5000"),
        "",
    ));
    assert_ne!(after_delete["resourceVersion"], v1);
    assert_eq!(after_delete["items"], serde_json::json!([]));
    // A restart never hands out a version seen before, even with the clock set back a day (an
    // edge box without an RTC): versions count the daemon's lives on its state dir, not time.
    let seen = after_delete["resourceVersion"].as_u64().unwrap();
    let mut node = node;
    node.kill9();
    node.env.push((
        "LD_PRELOAD".into(),
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1".into(),
    ));
    node.env.push(("FAKETIME".into(), "-1d".into()));
    node.spawn().unwrap();
    let restarted = body(&http_over_unix(
        &node.socket,
        "GET",
        "/v1/digests?watch=true",
        "",
    ));
    let v2 = restarted["resourceVersion"].as_u64().unwrap();
    assert!(v2 > seen, "{v2} after a restart, {seen} before it");
}
