//! Rolling updates with real containers and real readiness probes, sampled through the
//! node-wide watch (every change wakes it), not by sleeping.

use std::path::Path;
use std::time::{Duration, Instant};

use hyperbox_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

fn get_json(sock: &Path, path: &str) -> Value {
    let out = http(To::Unix(sock), "GET", path, &[], b"");
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Follow the node's watch until `done` holds for workload `name`; every status seen is
/// passed to `each`. Returns the last status.
fn watch_until(
    sock: &Path,
    name: &str,
    mut each: impl FnMut(&Value),
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    let mut rv = 0u64;
    loop {
        assert!(started.elapsed() < T, "watch of {name} timed out");
        let list = get_json(
            sock,
            &format!("/v1/workloads?watch=true&after={rv}&timeoutMs=5000"),
        );
        rv = list["resourceVersion"].as_u64().unwrap();
        if let Some(w) = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
        {
            each(w);
            if done(w) {
                return w.clone();
            }
        }
    }
}

fn spec(command: &str, extra: &str) -> String {
    format!(
        "  replicas: 4\n  terminationGracePeriodSeconds: 0\n  command: [sh, -c, '{command}']\n  readinessProbe:\n    exec: {{command: [test, -f, /tmp/ready]}}\n    periodSeconds: 0.2\n{extra}"
    )
}

fn complete(w: &Value, generation: u64) -> bool {
    w["generation"] == generation
        && w["observedGeneration"] == generation
        && w["updatedReplicas"] == 4
        && w["availableReplicas"] == 4
        && w["currentReplicas"] == 4
}

#[test]
fn rolling_update_keeps_three_of_four_ready_and_a_broken_version_halts() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let node = Node::start(&["--insecure-registry", &reg.addr]).unwrap();
    let v1 = "touch /tmp/ready; exec sleep 1000";
    node.apply(&workload("web", &image, &spec(v1, "")));
    let w1 = watch_until(&node.socket, "web", |_| {}, |w| complete(w, 1));
    let old = container_ids(&w1);
    assert_eq!(old.len(), 4);

    // v2 takes a second to become ready: with the defaults (25% of 4: one surge replica, one
    // unavailable) the ready count must never go below 3, nor the containers above 5.
    let v2 = "sleep 1; touch /tmp/ready; exec sleep 1001";
    let out = node.apply(&workload("web", &image, &spec(v2, "")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut min_ready, mut max_current, mut samples) = (u64::MAX, 0, 0);
    let started = Instant::now();
    let w2 = watch_until(
        &node.socket,
        "web",
        |w| {
            if w["generation"] == 2 {
                samples += 1;
                min_ready = min_ready.min(w["readyReplicas"].as_u64().unwrap());
                max_current = max_current.max(w["currentReplicas"].as_u64().unwrap());
            }
        },
        |w| complete(w, 2),
    );
    let took = started.elapsed();
    assert!(samples > 8, "only {samples} changes seen");
    assert!(min_ready >= 3, "ready went down to {min_ready}");
    assert!(max_current <= 5, "{max_current} containers at once");
    // Four replicas of a second each, at most two at a time: at least two seconds.
    assert!(took >= Duration::from_secs(2), "{took:?}");
    let new = container_ids(&w2);
    assert_eq!(new.len(), 4);
    assert!(new.iter().all(|c| !old.contains(c)), "{old:?} {new:?}");
    assert!(w2["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["outdated"].is_null()));
    assert_eq!(w2["ready"], true);

    // v3 crash-loops: the rollout halts with ProgressDeadlineExceeded and three v2 replicas
    // keep running and passing their readiness probe.
    let out = node.apply(&workload(
        "web",
        &image,
        &spec("exit 3", "  progressDeadlineSeconds: 3\n"),
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w3 = node
        .wait_for("web", T, "deadline exceeded", |w| {
            w["reason"] == "ProgressDeadlineExceeded"
        })
        .unwrap();
    let msg = w3["message"].as_str().unwrap();
    assert!(msg.contains("3 old replicas keep serving"), "{msg}");
    assert_eq!(w3["readyReplicas"], 3, "{w3:#}");
    assert_eq!(w3["ready"], false);
    let serving: Vec<&Value> = w3["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["outdated"] == true)
        .collect();
    assert_eq!(serving.len(), 3, "{w3:#}");
    for r in &serving {
        assert!(new.contains(&r["containerId"].as_str().unwrap().to_string()));
        let pid = r["pid"].as_i64().unwrap() as i32;
        // SAFETY: signal 0 only checks that the process exists.
        assert_eq!(
            unsafe { libc::kill(pid, 0) },
            0,
            "old replica {pid} is gone"
        );
    }
    // Still serving a few probe periods later: the old replicas are not restarted or stopped.
    std::thread::sleep(Duration::from_secs(2));
    let later = node.get("web").unwrap();
    assert_eq!(later["readyReplicas"], 3);
    let still: Vec<String> = later["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["outdated"] == true && r["ready"] == true)
        .filter_map(|r| r["containerId"].as_str().map(str::to_string))
        .collect();
    assert_eq!(still.len(), 3);
}
